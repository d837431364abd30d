//! The binary as users and scripts drive it: config precedence (file < env < flag),
//! printed addresses, health endpoints, `meshwork kv` / `status`, graceful SIGTERM.
//! The system tests (clusters, crashes, peers, the browser, the shop) are in
//! the workspace's `tests/` package.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meshwork_testkit::http::blocking as http;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_meshwork")
}

/// A running `meshwork server` child (the store alone), killed on drop.
struct Server {
    child: Child,
    etcd: String,
    http: String,
}

/// Starts `meshwork server --roles store` on free ports; returns once
/// `/readyz` answers 200.
fn start(data_dir: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Server {
    let mut child = Command::new(bin())
        .arg("server")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--etcd-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(["--roles", "store"])
        .args(extra)
        .envs(envs.iter().copied())
        .env("MESHWORK_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn meshwork");
    // The addresses it prints, in this order, are what scripts read.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut line = |prefix: &str| {
        let l = lines.next().expect("an address line").unwrap();
        l.strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{l:?} does not start with {prefix:?}"))
            .to_string()
    };
    let etcd = line("etcd gRPC: ");
    let http = line("HTTP: http://");
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    meshwork_testkit::blocking::until(
        "the server to become ready",
        Duration::from_secs(60),
        || matches!(http::get(&http, "/readyz"), Ok((200, _))),
    );
    Server { child, etcd, http }
}

impl Server {
    /// SIGTERM; returns the exit code.
    fn terminate(&mut self) -> Option<i32> {
        let pid = self.child.id() as i32;
        #[allow(unsafe_code)]
        // SAFETY: kill(2) has no memory effects; the pid is our own child's.
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

fn kv(ep: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin())
        .args(["kv", "--endpoints", ep])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn kv_commands_status_health_and_graceful_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = start(dir.path(), &[], &[]);
    assert_eq!(http::get(&s.http, "/healthz").unwrap().0, 200);
    let (code, metrics) = http::get(&s.http, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("meshwork_store_keys"));

    let (ok, out, _) = kv(&s.etcd, &["put", "greeting", "hello"]);
    assert!(ok);
    assert!(out.contains("revision 2"), "{out}");
    kv(&s.etcd, &["put", "greeting2", "world"]);
    let (_, out, _) = kv(&s.etcd, &["get", "greeting", "--prefix"]);
    assert_eq!(out, "greeting\nhello\ngreeting2\nworld\n");
    let (_, out, _) = kv(&s.etcd, &["--json", "get", "greeting"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["kvs"][0]["value"], "hello");
    assert_eq!(v["kvs"][0]["mod_revision"], 2);
    let (_, out, _) = kv(
        &s.etcd,
        &[
            "watch", "greeting", "--rev", "2", "--count", "2", "--prefix",
        ],
    );
    assert_eq!(out, "PUT\ngreeting\nhello\nPUT\ngreeting2\nworld\n");
    let (_, out, _) = kv(&s.etcd, &["del", "greeting", "--prefix"]);
    assert_eq!(out.trim(), "2");
    let st = Command::new(bin())
        .args(["status", "--json", "--endpoints", &s.etcd])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(v["revision"], 4);
    // Bad input: a clear error and a non-zero exit.
    let (ok, _, err) = kv(&s.etcd, &["put", "k", "v", "--lease", "zz"]);
    assert!(!ok);
    assert!(err.contains("lease \"zz\""), "{err}");

    assert_eq!(s.terminate(), Some(0), "SIGTERM exits 0");
    // Data survived the clean shutdown.
    let s2 = start(dir.path(), &[], &[]);
    let (_, out, _) = kv(&s2.etcd, &["--json", "get", "x"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["revision"], 4);
}

#[test]
fn config_file_env_and_flags_apply_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("meshwork.toml");
    std::fs::write(
        &cfg,
        "[server]\nname = \"from-file\"\n[store]\nmax_txn_ops = 3\nmax_key_bytes = 10\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let cfg_s = cfg.to_str().unwrap();
    // The env var overrides the file's name; the flag overrides the env's.
    let s = start(
        &data,
        &["--config", cfg_s, "--name", "from-flag"],
        &[("MESHWORK_NAME", "from-env")],
    );
    let st = Command::new(bin())
        .args(["status", "--json", "--endpoints", &s.etcd])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(v["members"][0]["name"], "from-flag");
    drop(s);
    let s = start(
        &data,
        &["--config", cfg_s],
        &[("MESHWORK_NAME", "from-env")],
    );
    let st = Command::new(bin())
        .args(["status", "--json", "--endpoints", &s.etcd])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(v["members"][0]["name"], "from-env");
    // The file's store limit is in force.
    let (ok, _, err) = kv(&s.etcd, &["put", "a-key-longer-than-ten", "v"]);
    assert!(!ok);
    assert!(err.contains("key is too large"), "{err}");
    drop(s);
    // A bad config is refused with a message naming the field.
    std::fs::write(&cfg, "[store]\nmax_txn_ops = 0\n").unwrap();
    let out = Command::new(bin())
        .args(["server", "--config", cfg_s, "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("store.max_txn_ops"));
    std::fs::write(&cfg, "[store]\nmax_txn_opz = 1\n").unwrap();
    let out = Command::new(bin())
        .args(["server", "--config", cfg_s, "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_txn_opz"));
}
