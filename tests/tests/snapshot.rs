//! Snapshot interchange with etcd, checked with etcd's own tools (Debian's
//! etcd 3.4 and etcdctl): a snapshot saved from Meshwork passes `etcdctl
//! snapshot status` and `restore`, and a real etcd started on it holds the
//! same keys, revisions and leases; a snapshot saved from etcd restores with
//! `meshwork snapshot restore` into a node that holds the same. Fails
//! instead of skipping when MESHWORK_REQUIRE_PEERS=1 and a peer is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshwork_testkit::blocking::{eventually, until};
use meshwork_testkit::http::blocking as http;
use meshwork_testkit::peer;
use meshwork_tests::free_port;
use serde_json::Value;

struct Ctl {
    bin: PathBuf,
}

impl Ctl {
    fn try_run(&self, ep: Option<&str>, args: &[&str]) -> std::process::Output {
        let mut c = Command::new(&self.bin);
        c.env("ETCDCTL_API", "3");
        if let Some(ep) = ep {
            c.args([
                "--endpoints",
                ep,
                "--dial-timeout",
                "5s",
                "--command-timeout",
                "30s",
            ]);
        }
        c.args(args).output().unwrap()
    }

    fn run(&self, ep: Option<&str>, args: &[&str]) -> String {
        let out = self.try_run(ep, args);
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, ep: Option<&str>, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-w", "json"]);
        serde_json::from_str(&self.run(ep, &a)).unwrap()
    }
}

/// A real etcd on free loopback ports, killed on drop.
struct Etcd {
    child: Child,
    ep: String,
}

impl Etcd {
    fn start(bin: &Path, ctl: &Ctl, data_dir: &Path, name: &str, peer_port: u16) -> Etcd {
        let mut peer_port = peer_port;
        for _ in 0..3 {
            let peer = format!("http://127.0.0.1:{peer_port}");
            let mut etcd = Etcd::spawn(bin, data_dir, name, peer_port, &format!("{name}={peer}"));
            if etcd.wait_healthy(ctl) {
                return etcd;
            }
            // It exited: a port picked free was taken by a parallel test
            // meanwhile. Start over on new ports (a fresh member: a restored
            // data directory would name the old peer port).
            peer_port = free_port();
            let _ = std::fs::remove_dir_all(data_dir);
        }
        panic!(
            "etcd exited three times on start (see {})",
            data_dir.with_extension("log").display()
        );
    }

    /// `n` members of one new cluster, once each is healthy.
    fn cluster(bin: &Path, ctl: &Ctl, dir: &Path, n: usize) -> Vec<Etcd> {
        std::fs::create_dir_all(dir).unwrap();
        let peers: Vec<(String, u16)> = (0..n).map(|i| (format!("m{i}"), free_port())).collect();
        let initial = peers
            .iter()
            .map(|(name, port)| format!("{name}=http://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<Etcd> = peers
            .iter()
            .map(|(name, port)| Etcd::spawn(bin, &dir.join(name), name, *port, &initial))
            .collect();
        for m in &mut members {
            assert!(
                m.wait_healthy(ctl),
                "an etcd member exited on start (see {})",
                dir.display()
            );
        }
        members
    }

    fn spawn(bin: &Path, data_dir: &Path, name: &str, peer_port: u16, initial: &str) -> Etcd {
        let client_port = free_port();
        let ep = format!("127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log = std::fs::File::create(data_dir.with_extension("log")).unwrap();
        let child = Command::new(bin)
            .args(["--name", name, "--data-dir"])
            .arg(data_dir)
            .args([
                "--listen-client-urls",
                &format!("http://{ep}"),
                "--advertise-client-urls",
                &format!("http://{ep}"),
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                initial,
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Etcd { child, ep }
    }

    /// True once healthy; false if the process exited first.
    fn wait_healthy(&mut self, ctl: &Ctl) -> bool {
        eventually("etcd to become healthy", Duration::from_secs(60), || {
            if ctl
                .try_run(Some(&self.ep), &["endpoint", "health"])
                .status
                .success()
            {
                Some(true)
            } else if self.child.try_wait().ok().flatten().is_some() {
                Some(false)
            } else {
                None
            }
        })
    }

    /// Sends `sig` to this member.
    fn signal(&self, sig: i32) {
        #[allow(unsafe_code)]
        // SAFETY: a signal to the etcd child this test started.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The same history against any endpoint: puts and overwrites, a lease with
/// a key, deletes, a compaction, writes after it. Returns the lease id (hex).
fn write_history(ctl: &Ctl, ep: &str) -> String {
    for i in 0..40 {
        ctl.run(
            Some(ep),
            &["put", &format!("/app/k{i:02}"), &format!("v{i}")],
        );
    }
    for i in 0..10 {
        ctl.run(
            Some(ep),
            &["put", &format!("/app/k{i:02}"), &format!("w{i}")],
        );
    }
    let grant = ctl.run(Some(ep), &["lease", "grant", "600"]);
    let lease = grant.split_whitespace().nth(1).unwrap().to_string();
    ctl.run(Some(ep), &["put", "/session/a", "held", "--lease", &lease]);
    // etcdctl prints ids zero-padded; `lease list` JSON has them as numbers.
    let lease = format!("{:x}", u64::from_str_radix(&lease, 16).unwrap());
    ctl.run(Some(ep), &["del", "/app/k3", "--prefix"]);
    let rev = ctl.json(Some(ep), &["get", "/app/k00"])["header"]["revision"]
        .as_i64()
        .unwrap();
    ctl.run(Some(ep), &["compaction", &(rev - 8).to_string()]);
    ctl.run(Some(ep), &["put", "/after", "the compaction"]);
    lease
}

/// Every key-value (key, value, create/mod revision, version, lease) and
/// the revision, as etcdctl prints them.
fn state(ctl: &Ctl, ep: &str, rev: Option<i64>) -> (i64, Vec<Value>) {
    let mut args = vec!["get", "", "--from-key"];
    let r;
    if let Some(rev) = rev {
        r = format!("--rev={rev}");
        args.push(&r);
    }
    let v = ctl.json(Some(ep), &args);
    let mut kvs = v["kvs"].as_array().cloned().unwrap_or_default();
    for kv in &mut kvs {
        if let Some(o) = kv.as_object_mut() {
            o.entry("lease").or_insert(Value::from(0));
        }
    }
    (v["header"]["revision"].as_i64().unwrap(), kvs)
}

fn leases(ctl: &Ctl, ep: &str) -> Vec<String> {
    let v = ctl.json(Some(ep), &["lease", "list"]);
    let mut ids: Vec<String> = v["leases"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|l| format!("{:x}", l["id"].as_i64().unwrap()))
        .collect();
    ids.sort();
    ids
}

/// `meshwork snapshot restore FILE --data-dir DIR`.
fn meshwork_restore(file: &Path, dir: &Path) -> std::process::Output {
    Command::new(meshwork_tests::bin())
        .args(["snapshot", "restore"])
        .arg(file)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap()
}

fn peers() -> Option<(Ctl, PathBuf)> {
    let ctl = Ctl {
        bin: peer::on_path("etcdctl")?,
    };
    let etcd = peer::on_path("etcd")?;
    Some((ctl, etcd))
}

#[test]
fn a_meshwork_snapshot_restores_into_a_real_etcd() {
    let Some((ctl, etcd_bin)) = peers() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let node = meshwork_tests::start(&dir.path().join("data"), &[], &[]);
    let lease = write_history(&ctl, &node.etcd);
    let (rev, kvs) = state(&ctl, &node.etcd, None);
    let older = state(&ctl, &node.etcd, Some(rev - 3));

    let snap = dir.path().join("from-meshwork.db");
    let out = ctl.run(
        Some(&node.etcd),
        &["snapshot", "save", snap.to_str().unwrap()],
    );
    assert!(out.contains("Snapshot saved"), "{out}");
    // etcd's own reader accepts the file and sees our revision and keys.
    let status = ctl.json(None, &["snapshot", "status", snap.to_str().unwrap()]);
    assert_eq!(status["revision"].as_i64(), Some(rev), "{status}");
    assert!(
        status["totalKey"].as_i64().unwrap() >= kvs.len() as i64,
        "{status}"
    );

    let peer_port = free_port();
    let etcd_dir = dir.path().join("etcd-restored");
    ctl.run(
        None,
        &[
            "snapshot",
            "restore",
            snap.to_str().unwrap(),
            "--name",
            "m1",
            "--data-dir",
            etcd_dir.to_str().unwrap(),
            "--initial-cluster",
            &format!("m1=http://127.0.0.1:{peer_port}"),
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer_port}"),
        ],
    );
    let etcd = Etcd::start(&etcd_bin, &ctl, &etcd_dir, "m1", peer_port);
    let (etcd_rev, etcd_kvs) = state(&ctl, &etcd.ep, None);
    assert_eq!(etcd_rev, rev, "the restored etcd is at our revision");
    assert_eq!(
        etcd_kvs, kvs,
        "same keys, values, revisions, versions, leases"
    );
    assert_eq!(
        state(&ctl, &etcd.ep, Some(rev - 3)).1,
        older.1,
        "same history"
    );
    assert_eq!(leases(&ctl, &etcd.ep), vec![lease.clone()]);
    // And it keeps working as an etcd: the next write is the next revision.
    let put = ctl.json(Some(&etcd.ep), &["put", "/x", "y"]);
    assert_eq!(put["header"]["revision"].as_i64(), Some(rev + 1));
    drop(node);
}

#[test]
fn an_etcd_snapshot_restores_into_meshwork() {
    let Some((ctl, etcd_bin)) = peers() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(
        &etcd_bin,
        &ctl,
        &dir.path().join("etcd"),
        "src",
        free_port(),
    );
    let lease = write_history(&ctl, &etcd.ep);
    let (rev, kvs) = state(&ctl, &etcd.ep, None);
    let older = state(&ctl, &etcd.ep, Some(rev - 3));
    let snap = dir.path().join("from-etcd.db");
    ctl.run(
        Some(&etcd.ep),
        &["snapshot", "save", snap.to_str().unwrap()],
    );
    drop(etcd);

    let data = dir.path().join("meshwork");
    let out = meshwork_restore(&snap, &data);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("restored etcd snapshot") && text.contains("SHA-256 checked"),
        "{text}"
    );
    // A second restore into the same directory is refused.
    let again = meshwork_restore(&snap, &data);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("empty directory"));

    let node = meshwork_tests::start(&data, &[], &[]);
    let (m_rev, m_kvs) = state(&ctl, &node.etcd, None);
    assert_eq!(m_rev, rev);
    assert_eq!(m_kvs, kvs);
    assert_eq!(state(&ctl, &node.etcd, Some(rev - 3)).1, older.1);
    assert_eq!(leases(&ctl, &node.etcd), vec![lease]);
    let put = ctl.json(Some(&node.etcd), &["put", "/x", "y"]);
    assert_eq!(put["header"]["revision"].as_i64(), Some(rev + 1));
    // A damaged snapshot is refused with etcd's reason, nothing written.
    let mut bytes = std::fs::read(&snap).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    let bad = dir.path().join("bad.db");
    std::fs::write(&bad, &bytes).unwrap();
    let out = meshwork_restore(&bad, &dir.path().join("never"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("integrity check failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.path().join("never").join("meshwork.redb").exists());
}

/// The same history without leases (lease ids differ between servers):
/// puts, overwrites, a multi-key delete (several changes in one revision),
/// a compaction, more writes.
fn write_lease_free_history(ctl: &Ctl, ep: &str) -> i64 {
    for i in 0..30 {
        ctl.run(Some(ep), &["put", &format!("/h/k{i:02}"), &format!("v{i}")]);
    }
    for i in 0..10 {
        ctl.run(Some(ep), &["put", &format!("/h/k{i:02}"), ""]);
    }
    ctl.run(Some(ep), &["del", "/h/k1", "--prefix"]);
    let rev = ctl.json(Some(ep), &["get", "/h/k00"])["header"]["revision"]
        .as_i64()
        .unwrap();
    ctl.run(Some(ep), &["compaction", &(rev - 12).to_string()]);
    for i in 0..5 {
        ctl.run(Some(ep), &["put", &format!("/h/z{i}"), "after"]);
    }
    rev
}

fn hash_kv(ctl: &Ctl, ep: &str, rev: Option<i64>) -> (i64, i64) {
    let mut args = vec!["endpoint", "hashkv"];
    let r;
    if let Some(rev) = rev {
        r = format!("--rev={rev}");
        args.push(&r);
    }
    let v = ctl.json(Some(ep), &args);
    let h = &v[0]["HashKV"];
    (
        h["hash"].as_i64().unwrap(),
        h["compact_revision"].as_i64().unwrap_or(0),
    )
}

#[test]
fn hashkv_agrees_with_etcd_after_the_same_history() {
    let Some((ctl, etcd_bin)) = peers() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&etcd_bin, &ctl, &dir.path().join("etcd"), "h", free_port());
    let node = meshwork_tests::start(&dir.path().join("data"), &[], &[]);
    let re = write_lease_free_history(&ctl, &etcd.ep);
    let rm = write_lease_free_history(&ctl, &node.etcd);
    assert_eq!(re, rm, "the same history gives the same revisions");
    let (he, ce) = hash_kv(&ctl, &etcd.ep, None);
    let (hm, cm) = hash_kv(&ctl, &node.etcd, None);
    assert_eq!((hm, cm), (he, ce), "HashKV at the current revision");
    for back in [1, 3, 7] {
        assert_eq!(
            hash_kv(&ctl, &node.etcd, Some(re + 5 - back)),
            hash_kv(&ctl, &etcd.ep, Some(re + 5 - back)),
            "HashKV at {back} revisions back"
        );
    }
    // The same refusals: below the compaction, and in the future.
    for rev in [re - 13, re + 100] {
        let args = ["endpoint", "hashkv", &format!("--rev={rev}")];
        let (oe, om) = (
            ctl.try_run(Some(&etcd.ep), &args),
            ctl.try_run(Some(&node.etcd), &args),
        );
        assert!(!oe.status.success() && !om.status.success());
        let msg = |o: &std::process::Output| {
            let s = String::from_utf8_lossy(&o.stderr).into_owned();
            s.split("etcdserver: ")
                .nth(1)
                .and_then(|m| m.split('"').next())
                .unwrap_or(&s)
                .to_string()
        };
        assert_eq!(msg(&om), msg(&oe), "rev {rev}");
    }
}

/// Raises `alarm` about `member` (or clears it), answering the alarms the
/// server reported.
async fn alarm(
    c: &mut meshwork_etcd::Client,
    action: i32,
    member: u64,
    alarm: i32,
) -> Vec<(u64, i32)> {
    use meshwork_etcd::proto::etcdserverpb as pb;
    c.maintenance
        .alarm(pb::AlarmRequest {
            action,
            member_id: member,
            alarm,
        })
        .await
        .unwrap()
        .into_inner()
        .alarms
        .iter()
        .map(|a| (a.member_id, a.alarm))
        .collect()
}

/// The status (code and message) of a put, or None if it succeeded.
async fn put_status(c: &mut meshwork_etcd::Client, key: &str) -> Option<(tonic::Code, String)> {
    use meshwork_etcd::proto::etcdserverpb as pb;
    c.kv.put(pb::PutRequest {
        key: key.as_bytes().to_vec().into(),
        value: b"v".to_vec().into(),
        ..Default::default()
    })
    .await
    .err()
    .map(|s| (s.code(), s.message().to_string()))
}

async fn range_status(c: &mut meshwork_etcd::Client) -> Option<(tonic::Code, String)> {
    use meshwork_etcd::proto::etcdserverpb as pb;
    c.kv.range(pb::RangeRequest {
        key: b"a".to_vec().into(),
        ..Default::default()
    })
    .await
    .err()
    .map(|s| (s.code(), s.message().to_string()))
}

#[test]
fn alarms_are_raised_refused_kept_and_disarmed_as_etcd_does() {
    use meshwork_etcd::proto::etcdserverpb::{AlarmType, alarm_request::AlarmAction};
    let Some((ctl, etcd_bin)) = peers() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&etcd_bin, &ctl, &dir.path().join("etcd"), "al", free_port());
    let data = dir.path().join("data");
    let mut node = meshwork_tests::start(&data, &[], &[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (act, deact) = (AlarmAction::Activate as i32, AlarmAction::Deactivate as i32);
    let (nospace, corrupt) = (AlarmType::Nospace as i32, AlarmType::Corrupt as i32);
    let mut seen = Vec::new();
    for ep in [&etcd.ep, &node.etcd] {
        let got = rt.block_on(async {
            let mut c = meshwork_etcd::Client::connect(std::slice::from_ref(ep))
                .await
                .unwrap();
            let raised = alarm(&mut c, act, 42, nospace).await;
            let again = alarm(&mut c, act, 42, nospace).await;
            let put = put_status(&mut c, "k").await;
            let read = range_status(&mut c).await;
            let listed = alarm(&mut c, AlarmAction::Get as i32, 0, 0).await;
            let cleared = alarm(&mut c, deact, 42, nospace).await;
            let put_after = put_status(&mut c, "k").await;
            let raised_c = alarm(&mut c, act, 7, corrupt).await;
            let read_c = range_status(&mut c).await;
            let put_c = put_status(&mut c, "k").await;
            (
                raised, again, put, read, listed, cleared, put_after, raised_c, read_c, put_c,
            )
        });
        seen.push(got);
    }
    let (e, m) = (&seen[0], &seen[1]);
    assert_eq!(m.0, vec![(42, nospace)]);
    assert_eq!(
        m.2.as_ref().map(|s| s.0),
        Some(tonic::Code::ResourceExhausted)
    );
    assert_eq!(m.9.as_ref().map(|s| s.0), Some(tonic::Code::DataLoss));
    assert_eq!(
        format!("{m:?}"),
        format!("{e:?}"),
        "Meshwork answers as etcd does"
    );
    // `etcdctl alarm list` sees it; the alarm outlives a restart.
    assert!(
        ctl.run(Some(&node.etcd), &["alarm", "list"])
            .contains("alarm:CORRUPT")
    );
    node.terminate();
    let node = meshwork_tests::start(&data, &[], &[]);
    rt.block_on(async {
        let mut c = meshwork_etcd::Client::connect(std::slice::from_ref(&node.etcd))
            .await
            .unwrap();
        assert_eq!(
            put_status(&mut c, "k").await.map(|s| s.0),
            Some(tonic::Code::DataLoss)
        );
        assert_eq!(range_status(&mut c).await, None, "reads still answer");
    });
    ctl.run(Some(&node.etcd), &["alarm", "disarm"]);
    assert_eq!(ctl.run(Some(&node.etcd), &["alarm", "list"]), "");
    ctl.run(Some(&node.etcd), &["put", "k", "back"]);
}

/// A coordination node on `store` (`etcd://...`) with a 3 s node TTL and a
/// 3 s call deadline.
fn coord_node(dir: &Path, store: &str) -> meshwork_tests::Server {
    let config = dir.join("meshwork.toml");
    std::fs::write(&config, "[coord]\netcd_retry_for_ms = 3000\n").unwrap();
    meshwork_tests::start(
        &dir.join("node"),
        &[
            "--roles",
            "coord",
            "--store",
            store,
            "--node-ttl",
            "3",
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    )
}

/// Readiness on an external store tells the truth: with the etcd cluster
/// frozen (SIGSTOP: no answers at all), `/readyz` turns 503 and says why,
/// a write fails within the configured deadline saying what happened, and
/// reads from the node's watched copies keep answering; thawed, it is ready
/// again.
#[test]
fn readiness_follows_an_external_store_that_stops_answering() {
    let Some((ctl, etcd_bin)) = peers() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(
        &etcd_bin,
        &ctl,
        &dir.path().join("etcd"),
        "ext",
        free_port(),
    );
    let store = format!("etcd://{}", etcd.ep);
    let node = coord_node(dir.path(), &store);
    let h = node.http.as_str();
    let (code, body) =
        http::request(h, "PUT", "/v1/config/public/app/a", r#"{"content":"x"}"#).unwrap();
    assert_eq!(code, 201, "{body}");
    let readyz = || http::get(h, "/readyz").unwrap();
    assert_eq!(readyz().0, 200);
    etcd.signal(libc::SIGSTOP);
    let why = eventually(
        "/readyz to turn 503 with the store frozen",
        Duration::from_secs(20),
        || {
            let (code, body) = readyz();
            (code == 503).then_some(body)
        },
    );
    assert!(why.contains("no quorum, or unreachable"), "{why}");
    let asked = Instant::now();
    let (code, body) =
        http::request(h, "PUT", "/v1/config/public/app/b", r#"{"content":"y"}"#).unwrap();
    let took = asked.elapsed();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("unreachable") && body.contains("does not answer"),
        "{body}"
    );
    assert!(
        took < Duration::from_secs(6),
        "the write failed within its 3 s deadline (plus slack): {took:?}"
    );
    assert_eq!(
        http::get(h, "/v1/config/public/app/a").unwrap().0,
        200,
        "reads from the watched copy still answer"
    );
    etcd.signal(libc::SIGCONT);
    until("/readyz to come back", Duration::from_secs(30), || {
        readyz().0 == 200
    });
}

/// A 3-member etcd cluster behind `--store`: with two members frozen the
/// one the node talks to answers but has no leader, and a write fails
/// within its deadline saying so (no quorum), `/readyz` turns 503 and cached
/// reads answer; thawed, all is well; then the member in use is SIGKILLed
/// and the next write succeeds on another member at once.
#[test]
fn an_etcd_cluster_without_quorum_or_with_a_dead_member() {
    let Some((ctl, etcd_bin)) = peers() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut members = Etcd::cluster(&etcd_bin, &ctl, &dir.path().join("etcd"), 3);
    let store = format!(
        "etcd://{}",
        members
            .iter()
            .map(|m| m.ep.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    let node = coord_node(dir.path(), &store);
    let h = node.http.as_str();
    let put = |key: &str| {
        let asked = Instant::now();
        let (code, body) = http::request(
            h,
            "PUT",
            &format!("/v1/config/public/app/{key}"),
            r#"{"content":"x"}"#,
        )
        .unwrap();
        (code, body, asked.elapsed())
    };
    assert_eq!(put("a").0, 201);
    // The node talks to the first endpoint; freeze the other two.
    members[1].signal(libc::SIGSTOP);
    members[2].signal(libc::SIGSTOP);
    // Once the live member has noticed (its election timeout, 1 s), writes
    // fail within the deadline saying there is no quorum.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (body, took) = loop {
        let (code, body, took) = put("b");
        assert_ne!(code, 201, "a write committed without quorum: {body}");
        if body.contains("no quorum") {
            break (body, took);
        }
        assert!(Instant::now() < deadline, "never said no quorum: {body}");
    };
    assert!(took < Duration::from_secs(6), "{took:?}: {body}");
    until(
        "/readyz to turn 503 without quorum",
        Duration::from_secs(20),
        || http::get(h, "/readyz").unwrap().0 == 503,
    );
    assert_eq!(http::get(h, "/v1/config/public/app/a").unwrap().0, 200);
    members[1].signal(libc::SIGCONT);
    members[2].signal(libc::SIGCONT);
    until("/readyz to come back", Duration::from_secs(30), || {
        http::get(h, "/readyz").unwrap().0 == 200
    });
    // SIGKILL the member in use: the write goes to another one.
    members[0].child.kill().unwrap();
    members[0].child.wait().unwrap();
    let (code, body, took) = put("c");
    assert_eq!(code, 201, "{body}");
    assert!(took < Duration::from_secs(3), "failed over in {took:?}");
}
