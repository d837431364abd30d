//! Test harness: runs the real `meshwork` binary as a child process.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `meshwork server` child.
pub struct Server {
    pub child: Child,
    pub etcd: String,
    pub http: String,
    /// The gateway's address, when started with `--gateway-addr`.
    pub gateway: Option<String>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_meshwork")
}

/// Starts `meshwork server` on free ports; returns once `/readyz` answers 200.
pub fn start(data_dir: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Server {
    start_cmd(Command::new(bin()), data_dir, extra, envs)
}

/// As [`start`], with the child's open-files limit set to `soft`/`hard`
/// (what `ulimit -Sn`/`-Hn` would set in a shell).
pub fn start_with_nofile(
    data_dir: &Path,
    extra: &[&str],
    envs: &[(&str, &str)],
    soft: u64,
    hard: u64,
) -> Server {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin());
    #[allow(unsafe_code)]
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    start_cmd(cmd, data_dir, extra, envs)
}

fn start_cmd(mut cmd: Command, data_dir: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Server {
    cmd.arg("server").arg("--data-dir").arg(data_dir);
    if !extra.contains(&"--etcd-addr") {
        cmd.args(["--etcd-addr", "127.0.0.1:0"]);
    }
    if !extra.contains(&"--http-addr") {
        cmd.args(["--http-addr", "127.0.0.1:0"]);
    }
    // Store tests count revisions exactly: run the store alone unless asked.
    if !extra.contains(&"--roles") {
        cmd.args(["--roles", "store"]);
    }
    cmd.args(extra)
        .envs(envs.iter().copied())
        .env("MESHWORK_LOG", "warn");
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = cmd.spawn().expect("spawn meshwork");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let etcd = lines
        .next()
        .expect("first line")
        .unwrap()
        .trim_start_matches("etcd gRPC: ")
        .to_string();
    let http = lines
        .next()
        .expect("second line")
        .unwrap()
        .trim_start_matches("HTTP: http://")
        .to_string();
    let gateway = extra.contains(&"--gateway-addr").then(|| {
        lines
            .next()
            .expect("third line")
            .unwrap()
            .trim_start_matches("Gateway: http://")
            .to_string()
    });
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _)) = http_get(&http, "/readyz") {
            break;
        }
        assert!(Instant::now() < deadline, "server did not become ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server {
        child,
        etcd,
        http,
        gateway,
    }
}

impl Server {
    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        // SAFETY-free: libc::kill on our own child's PID.
        let pid = self.child.id() as i32;
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        self.child.wait().unwrap().code()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a `meshwork` command against a node's HTTP API: (success, stdout, stderr).
pub fn meshwork_http(http: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin())
        .args(args)
        .args(["--http", http])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A minimal HTTP/1.1 GET over a raw socket: (status, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, "")
}

/// A minimal HTTP/1.1 POST of a JSON body: (status, body).
pub fn http_post(addr: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "POST", path, body)
}

/// One request over a raw socket with `Connection: close`: (status, body).
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let (status, out) = http_raw(
        addr,
        &format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json"),
        body,
    )?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// One HTTP/1.1 request from its head lines (request line and headers,
/// without `Connection` and `Content-Length`, which are added) and body:
/// the status and the whole response.
pub fn http_raw(addr: &str, head: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{head}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, out))
}

/// Whether peer tests must fail rather than skip when a peer is missing.
pub fn peers_required() -> bool {
    std::env::var("MESHWORK_REQUIRE_PEERS").is_ok_and(|v| v == "1")
}

/// Finds a peer binary on PATH; panics under MESHWORK_REQUIRE_PEERS=1 when missing.
pub fn peer(name: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    });
    if found.is_none() {
        assert!(
            !peers_required(),
            "peer {name} is missing and MESHWORK_REQUIRE_PEERS=1 (install Debian's package, see .ci/run)"
        );
        eprintln!("skipping: peer {name} not installed");
    }
    found
}
