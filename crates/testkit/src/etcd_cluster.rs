//! A real etcd cluster (Debian's `etcd-server`) of child processes on
//! loopback (feature `etcd`), each member with its own data directory, torn
//! down (SIGKILL) on drop.

use std::fs::File;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use meshwork_etcd::Client;
use meshwork_etcd::proto::etcdserverpb as pb;

/// Where Debian's etcd-server installs the server (`MESHWORK_ETCD` overrides).
pub const ETCD: &str = "/usr/bin/etcd";

/// Longest wait for a fresh cluster to elect a leader and take a write.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// The etcd server binary, or None (skip) when it is not installed; a test
/// failure instead under `MESHWORK_REQUIRE_PEERS=1`.
pub fn etcd_binary() -> Option<PathBuf> {
    crate::peer::at("etcd", "MESHWORK_ETCD", ETCD)
}

/// Next candidate port: below the ephemeral range (32768+), spread by process id so
/// concurrent test processes rarely probe the same ports.
static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

/// A port on 127.0.0.1 that was free a moment ago, below the ephemeral range.
pub fn free_port() -> u16 {
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let offset = (std::process::id() % 400) * 30;
    for _ in 0..SPAN {
        let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (offset + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}

/// One etcd member.
pub struct Member {
    /// Member name (`m0`, `m1`, ...).
    pub name: String,
    /// Client port on 127.0.0.1.
    pub client_port: u16,
    /// Peer port on 127.0.0.1.
    pub peer_port: u16,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its log file (stdout and stderr).
    pub log: PathBuf,
    child: Option<Child>,
}

impl Member {
    /// `http://127.0.0.1:PORT`.
    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL (`Child::kill` sends SIGKILL on Unix) and reap; no-op if not running.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The last `n` bytes of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        let cut = s.len().saturating_sub(n);
        let cut = (cut..=s.len())
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(s.len());
        s[cut..].to_string()
    }
}

/// A running etcd cluster; every member is SIGKILLed when this is dropped.
pub struct EtcdCluster {
    /// The members, in `--initial-cluster` order.
    pub members: Vec<Member>,
    /// The cluster token (unique per cluster).
    pub token: String,
    dir: tempfile::TempDir,
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill9();
        }
    }
}

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

impl EtcdCluster {
    /// Starts an `n`-member cluster and waits until it has a leader and takes a write;
    /// None (after printing why) when etcd is not installed and peers are optional.
    pub async fn start(n: usize) -> Option<EtcdCluster> {
        let bin = etcd_binary()?;
        let mut last = String::new();
        // A port may be taken between probing and etcd binding it: retry on new ports.
        for _attempt in 0..3 {
            let mut c = EtcdCluster::spawn(&bin, n);
            match c.wait_ready().await {
                Ok(()) => return Some(c),
                Err(e) => {
                    last = format!("{e}\n{}", c.logs());
                    let exited = c.members.iter_mut().any(|m| !m.is_running());
                    if !exited {
                        break;
                    }
                    eprintln!("etcd cluster did not start ({e}); retrying on other ports");
                }
            }
        }
        panic!("etcd cluster did not become ready: {last}");
    }

    fn spawn(bin: &Path, n: usize) -> EtcdCluster {
        let dir = tempfile::tempdir().unwrap();
        let token = format!(
            "meshwork-test-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        );
        let mut members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                data_dir: dir.path().join(format!("m{i}.etcd")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial: Vec<String> = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let initial = initial.join(",");
        for m in &mut members {
            let log = File::create(&m.log).unwrap();
            let client = m.client_url();
            let peer = format!("http://127.0.0.1:{}", m.peer_port);
            let mut cmd = Command::new(bin);
            // Settings from the environment (ETCD_*) would override ours.
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("ETCD") {
                    cmd.env_remove(k);
                }
            }
            cmd.arg("--name")
                .arg(&m.name)
                .arg("--data-dir")
                .arg(&m.data_dir)
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &token])
                .args(["--heartbeat-interval", "50"])
                .args(["--election-timeout", "500"])
                .args(["--logger", "zap", "--log-outputs", "stderr"])
                .args(["--log-level", "warn"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            m.child = Some(cmd.spawn().expect("spawn etcd"));
        }
        EtcdCluster {
            members,
            token,
            dir,
        }
    }

    /// Every member's client URL, in member order.
    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill9();
    }

    /// The tail of every member's log, for failure messages.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("--- {} log ---\n{}", m.name, m.log_tail(3000)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The root of the members' data directories.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        loop {
            for m in &mut self.members {
                if !m.is_running() {
                    return Err(format!("etcd member {} exited during startup", m.name));
                }
            }
            let last = match self.ready_once().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("not ready within {READY_WITHIN:?}: {last}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every member reports a leader, and a put through each member succeeds.
    async fn ready_once(&self) -> Result<(), String> {
        for m in &self.members {
            let st = status(&m.client_url()).await?;
            if st.leader == 0 {
                return Err(format!("{} has no leader yet", m.name));
            }
            let mut c = connect(&m.client_url()).await?;
            tokio::time::timeout(
                Duration::from_secs(2),
                c.kv.put(pb::PutRequest {
                    key: format!("/meshwork-harness/ready/{}", m.name).into(),
                    value: "1".into(),
                    ..Default::default()
                }),
            )
            .await
            .map_err(|_| format!("put via {} timed out", m.name))?
            .map_err(|e| format!("put via {}: {e}", m.name))?;
        }
        Ok(())
    }

    /// The index of the current leader, as the running members report it (bounded
    /// wait while an election is in progress).
    pub async fn leader(&mut self) -> usize {
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        loop {
            let mut ids = Vec::new();
            let mut leader = 0;
            for m in &mut self.members {
                if !m.is_running() {
                    ids.push(0);
                    continue;
                }
                match status(&m.client_url()).await {
                    Ok(st) => {
                        ids.push(st.header.map(|h| h.member_id).unwrap_or(0));
                        if st.leader != 0 {
                            leader = st.leader;
                        }
                    }
                    Err(_) => ids.push(0),
                }
            }
            if let Some(i) = ids.iter().position(|&id| id != 0 && id == leader) {
                return i;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no etcd leader within {READY_WITHIN:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn connect(url: &str) -> Result<Client, String> {
    let ep = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_millis(500));
    let ch = ep.connect().await.map_err(|e| format!("{url}: {e}"))?;
    Ok(Client::from_channel(ch))
}

async fn status(url: &str) -> Result<pb::StatusResponse, String> {
    let mut c = connect(url).await?;
    tokio::time::timeout(
        Duration::from_secs(1),
        c.maintenance.status(pb::StatusRequest {}),
    )
    .await
    .map_err(|_| format!("status of {url} timed out"))?
    .map(tonic::Response::into_inner)
    .map_err(|e| format!("status of {url}: {e}"))
}
