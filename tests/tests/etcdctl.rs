//! Peer tests: Debian's real `etcdctl` (etcd-client 3.4) against `meshwork server`.
//! They fail instead of skipping when MESHWORK_REQUIRE_PEERS=1 and etcdctl is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use meshwork_testkit::blocking::until;
use meshwork_testkit::http::blocking as http;
use meshwork_testkit::peer;

struct Ctl {
    bin: std::path::PathBuf,
    ep: String,
}

impl Ctl {
    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("ETCDCTL_API", "3").args([
            "--endpoints",
            &self.ep,
            "--dial-timeout",
            "5s",
            "--command-timeout",
            "20s",
        ]);
        c
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn run_stdin(&self, args: &[&str], input: &str) -> String {
        let out = peer::run_with_input(self.cmd().args(args), input);
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn setup() -> Option<(meshwork_tests::Server, Ctl, tempfile::TempDir)> {
    let bin = peer::on_path("etcdctl")?;
    let dir = tempfile::tempdir().unwrap();
    let s = meshwork_tests::start(&dir.path().join("data"), &[], &[]);
    let ctl = Ctl {
        bin,
        ep: s.etcd.clone(),
    };
    Some((s, ctl, dir))
}

#[test]
fn etcdctl_kv_prefix_txn_and_status() {
    let Some((_s, ctl, _d)) = setup() else { return };
    assert_eq!(ctl.run(&["put", "app/a", "1"]).trim(), "OK");
    ctl.run(&["put", "app/b", "2"]);
    ctl.run(&["put", "other", "3"]);
    assert_eq!(
        ctl.run(&["get", "app/", "--prefix"]),
        "app/a\n1\napp/b\n2\n"
    );
    assert_eq!(
        ctl.run(&["get", "app/", "--prefix", "--keys-only"])
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["app/a", "app/b"]
    );
    let fields = ctl.run(&["get", "app/", "--prefix", "--limit", "1", "-w", "fields"]);
    assert!(
        fields.lines().any(|l| l.trim() == "\"Count\" : 2"),
        "{fields}"
    );
    assert!(
        fields.lines().any(|l| l.trim() == "\"More\" : true"),
        "{fields}"
    );
    let txn = ctl.run_stdin(
        &["txn"],
        "value(\"app/a\") = \"1\"\n\nput app/a 10\nget app/a\n\nput app/a failed\n\n",
    );
    assert!(txn.starts_with("SUCCESS"), "{txn}");
    assert!(txn.contains("10"));
    assert_eq!(
        ctl.run(&["get", "app/a", "--print-value-only"]).trim(),
        "10"
    );
    assert_eq!(ctl.run(&["del", "app/", "--prefix"]).trim(), "2");
    assert_eq!(ctl.run(&["get", "app/", "--prefix"]), "");
    let status = ctl.run(&["endpoint", "status", "-w", "json"]);
    assert!(status.contains("\"revision\""), "{status}");
    let health = ctl.cmd().args(["endpoint", "health"]).output().unwrap();
    assert!(health.status.success());
    assert!(
        String::from_utf8_lossy(&health.stdout).contains("is healthy")
            || String::from_utf8_lossy(&health.stderr).contains("is healthy")
    );
    let members = ctl.run(&["member", "list"]);
    assert!(members.contains("started"), "{members}");
    // Compaction and the compacted error.
    ctl.run(&["compact", "3"]);
    let out = ctl
        .cmd()
        .args(["get", "other", "--rev", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("required revision has been compacted"));
}

#[test]
fn etcdctl_watch_sees_puts_and_deletes() {
    let Some((_s, ctl, _d)) = setup() else { return };
    let mut w = ctl
        .cmd()
        .args(["watch", "wk", "--prefix"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(w.stdout.take().unwrap()).lines();
    // The watcher is registered once a put shows up; keep writing until it does.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.by_ref() {
            if tx.send(l.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut got = Vec::new();
    until("the watch to see a put", Duration::from_secs(20), || {
        ctl.run(&["put", "wk1", "v"]);
        while let Ok(l) = rx.recv_timeout(Duration::from_millis(300)) {
            got.push(l);
        }
        got.iter().any(|l| l == "PUT")
    });
    ctl.run(&["del", "wk1"]);
    let mut seen_delete = false;
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(10)) {
        if l == "DELETE" {
            seen_delete = true;
            break;
        }
    }
    assert!(seen_delete);
    let _ = w.kill();
    let _ = w.wait();
}

#[test]
fn etcdctl_leases_lock_elect_and_snapshot() {
    let Some((_s, ctl, dir)) = setup() else {
        return;
    };
    let grant = ctl.run(&["lease", "grant", "60"]);
    let id = grant.split_whitespace().nth(1).unwrap().to_string();
    ctl.run(&["put", "leased", "v", "--lease", &id]);
    let ttl = ctl.run(&["lease", "timetolive", &id, "--keys"]);
    assert!(
        ttl.contains("granted with TTL(60s)") && ttl.contains("leased"),
        "{ttl}"
    );
    assert!(
        ctl.run(&["lease", "keep-alive", "--once", &id])
            .contains("keepalived with TTL(60)")
    );
    assert!(ctl.run(&["lease", "list"]).contains(&id));
    assert!(ctl.run(&["lease", "revoke", &id]).contains("revoked"));
    assert_eq!(ctl.run(&["get", "leased"]), "");

    // lock: the command runs while the lock is held; a second locker waits for it.
    let out = ctl.run(&["lock", "mylock", "echo", "locked"]);
    assert!(out.contains("locked"), "{out}");
    // Mutual exclusion: the holder logs start, waits, logs end; a second locker started
    // once the holder is inside must log only after the holder's end.
    let log = dir.path().join("lock.log");
    let l = log.to_str().unwrap().to_string();
    let mut holder = ctl
        .cmd()
        .args([
            "lock",
            "l2",
            "--",
            "sh",
            "-c",
            &format!("echo A-start >> {l}; sleep 1; echo A-end >> {l}"),
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    until(
        "the first locker to get the lock",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("A-start")
        },
    );
    ctl.run(&["lock", "l2", "--", "sh", "-c", &format!("echo B >> {l}")]);
    assert!(holder.wait().unwrap().success());
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "A-start\nA-end\nB\n"
    );

    // elect: a candidate becomes leader; `elect -l` observes it.
    let mut cand = ctl
        .cmd()
        .args(["elect", "myelection", "p1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut cand_out = BufReader::new(cand.stdout.take().unwrap()).lines();
    let first = cand_out.next().unwrap().unwrap();
    assert!(first.starts_with("myelection/"), "{first}");
    let mut obs = ctl
        .cmd()
        .args(["elect", "-l", "myelection"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut obs_out = BufReader::new(obs.stdout.take().unwrap()).lines();
    assert!(obs_out.next().unwrap().unwrap().starts_with("myelection/"));
    assert_eq!(obs_out.next().unwrap().unwrap(), "p1");
    let _ = obs.kill();
    let _ = cand.kill();
    let _ = obs.wait();
    let _ = cand.wait();

    // snapshot save: a consistent copy streamed and checksummed.
    ctl.run(&["put", "snap", "shot"]);
    let path = dir.path().join("snap.db");
    let out = ctl.run(&["snapshot", "save", path.to_str().unwrap()]);
    assert!(out.contains("Snapshot saved"), "{out}");
    assert!(std::fs::metadata(&path).unwrap().len() > 512);
}

/// Coordination's locks and elections use etcd's own layout: `etcdctl lock` and
/// `etcdctl elect` interoperate with the HTTP API on the same names.
#[test]
fn etcdctl_interoperates_with_coordination_locks_and_elections() {
    let Some(bin) = peer::on_path("etcdctl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = meshwork_tests::start(&dir.path().join("data"), &["--roles", "store,coord"], &[]);
    let ctl = Ctl {
        bin,
        ep: s.etcd.clone(),
    };
    // A leader elected over HTTP is what `etcdctl elect -l` sees.
    let (code, body) = http::post(
        &s.http,
        "/v1/elections/sched/campaign",
        r#"{"value":"node-a","ttl_seconds":30}"#,
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let mut observer = ctl
        .cmd()
        .args(["elect", "-l", "/meshwork/elections/sched"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(observer.stdout.take().unwrap()).lines();
    let key = lines.next().unwrap().unwrap();
    let value = lines.next().unwrap().unwrap();
    assert!(key.starts_with("/meshwork/elections/sched/"), "{key}");
    assert_eq!(value, "node-a");
    let _ = observer.kill();
    let _ = observer.wait();
    // A lock held by `etcdctl lock` blocks the HTTP lock; once etcdctl releases it,
    // the HTTP lock gets it.
    let release = dir.path().join("release");
    let script = format!(
        "echo held; while [ ! -e {} ]; do sleep 0.05; done",
        release.display()
    );
    let mut holder = ctl
        .cmd()
        .args(["lock", "/meshwork/locks/job", "--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(holder.stdout.take().unwrap()).lines();
    assert_eq!(out.next().unwrap().unwrap(), "held");
    let (code, body) = http::post(
        &s.http,
        "/v1/locks/job",
        r#"{"ttl_seconds":10,"timeout_ms":200}"#,
    )
    .unwrap();
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("lock_held"), "{body}");
    std::fs::write(&release, "").unwrap();
    let (code, body) = http::post(
        &s.http,
        "/v1/locks/job",
        r#"{"ttl_seconds":10,"timeout_ms":10000}"#,
    )
    .unwrap();
    let _ = holder.wait();
    assert_eq!(code, 200, "{body}");
}

/// `etcdctl` output and errors of a run that may fail.
fn attempt(ctl: &Ctl, args: &[&str]) -> (bool, String) {
    let out = ctl.cmd().args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn store_auth_on_a_node_keeps_coordination_working_and_survives_a_crash() {
    let Some(bin) = peer::on_path("etcdctl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let roles = ["--roles", "store,coord"];
    let mut s = meshwork_tests::start(&data, &roles, &[]);
    let ctl = Ctl {
        bin: bin.clone(),
        ep: s.etcd.clone(),
    };
    ctl.run(&["user", "add", "root:rootpw"]);
    ctl.run(&["auth", "enable"]);
    let (ok, out) = attempt(&ctl, &["get", "/meshwork/", "--prefix"]);
    assert!(!ok && out.contains("user name is empty"), "{out}");
    // A reader of the registry only.
    let root = ["--user", "root:rootpw"];
    let as_root = |args: &[&str]| ctl.run(&[&root[..], args].concat());
    as_root(&["role", "add", "registry-reader"]);
    as_root(&[
        "role",
        "grant-permission",
        "registry-reader",
        "read",
        "/meshwork/registry/s/",
        "--prefix",
    ]);
    as_root(&["user", "add", "viewer:viewerpw"]);
    as_root(&["user", "grant-role", "viewer", "registry-reader"]);

    // The node's own coordination reaches the store in-process: it is not
    // locked out by auth.
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = target.local_addr().unwrap().port();
    let body = format!(r#"{{"address":"127.0.0.1","port":{port},"ephemeral":false}}"#);
    let (code, resp) = http::post(&s.http, "/v1/services/web/instances", &body).unwrap();
    assert_eq!(code, 201, "{resp}");
    assert!(matches!(http::get(&s.http, "/readyz"), Ok((200, _))));
    let viewer = ["--user", "viewer:viewerpw"];
    let listed = ctl.run(
        &[
            &viewer[..],
            &["get", "/meshwork/registry/s/", "--prefix", "--keys-only"],
        ]
        .concat(),
    );
    assert!(listed.contains("web"), "{listed}");
    let (ok, out) = attempt(
        &ctl,
        &[
            &viewer[..],
            &["put", "/meshwork/registry/s/web/i/x", "evil"],
        ]
        .concat(),
    );
    assert!(!ok && out.contains("permission denied"), "{out}");
    let (ok, out) = attempt(
        &ctl,
        &[&viewer[..], &["del", "/meshwork/", "--prefix"]].concat(),
    );
    assert!(!ok && out.contains("permission denied"), "{out}");

    // Meshwork's own command line logs in with --user.
    let mw = |args: &[&str]| {
        std::process::Command::new(meshwork_tests::bin())
            .arg("kv")
            .args(args)
            .args(["--endpoints", &s.etcd])
            .output()
            .unwrap()
    };
    let out = mw(&["put", "/cli", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("user name is empty"));
    let out = mw(&["--user", "root:rootpw", "put", "/cli", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = mw(&["--user", "root:nope", "get", "/cli"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("authentication failed"));

    // A crash loses no user, role or switch.
    s.kill9();
    let s = meshwork_tests::start(&data, &roles, &[]);
    let ctl = Ctl {
        bin: bin.clone(),
        ep: s.etcd.clone(),
    };
    let (ok, out) = attempt(&ctl, &["get", "x"]);
    assert!(!ok && out.contains("user name is empty"), "{out}");
    let (ok, out) = attempt(&ctl, &["--user", "root:wrong", "get", "x"]);
    assert!(!ok && out.contains("authentication failed"), "{out}");
    let listed = ctl.run(
        &[
            &viewer[..],
            &["get", "/meshwork/registry/s/", "--prefix", "--keys-only"],
        ]
        .concat(),
    );
    assert!(listed.contains("web"), "{listed}");
    let (code, _) = http::get(&s.http, "/v1/services/web/instances").unwrap();
    assert_eq!(code, 200);
    ctl.run(&[&root[..], &["auth", "disable"]].concat());
    assert_eq!(ctl.run(&["put", "open", "again"]).trim(), "OK");
}

#[test]
fn jwt_tokens_from_a_node_work_with_etcdctl() {
    let Some(bin) = peer::on_path("etcdctl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("jwt.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef-test-key").unwrap();
    let s = meshwork_tests::start(
        &dir.path().join("data"),
        &[
            "--auth-token",
            "jwt",
            "--auth-jwt-key-file",
            key.to_str().unwrap(),
        ],
        &[],
    );
    let ctl = Ctl {
        bin,
        ep: s.etcd.clone(),
    };
    ctl.run(&["user", "add", "root:rootpw"]);
    ctl.run(&["auth", "enable"]);
    assert_eq!(
        ctl.run(&["--user", "root:rootpw", "put", "k", "v"]).trim(),
        "OK"
    );
    assert_eq!(
        ctl.run(&["--user", "root:rootpw", "get", "k", "--print-value-only"])
            .trim(),
        "v"
    );
    // A short key file is refused at start, with the reason.
    std::fs::write(&key, "short").unwrap();
    let out = std::process::Command::new(meshwork_tests::bin())
        .args(["server", "--data-dir"])
        .arg(dir.path().join("other"))
        .args(["--etcd-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args([
            "--auth-token",
            "jwt",
            "--auth-jwt-key-file",
            key.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at least 32 bytes"), "{err}");
}
