//! TLS on a node's listeners, with clients we did not write: Debian's
//! etcdctl and curl. A certificate from `meshwork cert`, plaintext refused,
//! another authority, a host name the certificate does not name and an
//! expired certificate refused with the client's clear error; a new
//! certificate taken without a restart; mutual TLS, where a client without a
//! certificate is refused and, with store auth on, a certificate's common
//! name is the user (as etcd's --client-cert-auth). Skips when etcdctl or
//! curl is missing; fails instead under MESHWORK_REQUIRE_PEERS=1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meshwork_testkit::blocking::until;
use meshwork_testkit::peer;

fn meshwork(args: &[&str]) {
    let out = Command::new(meshwork_tests::bin())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "meshwork {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Node {
    child: Child,
    etcd: String,
    http: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `meshwork server` with TLS from `certs` (and mutual TLS with `mtls`).
fn start(dir: &Path, certs: &Path, mtls: bool) -> Node {
    let mut cmd = Command::new(meshwork_tests::bin());
    cmd.arg("server")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args([
            "--etcd-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--roles",
            "store,coord",
        ])
        .arg("--tls-cert")
        .arg(certs.join("node.pem"))
        .arg("--tls-key")
        .arg(certs.join("node-key.pem"))
        .env("MESHWORK_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if mtls {
        cmd.arg("--tls-client-ca").arg(certs.join("ca.pem"));
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let etcd = lines
        .next()
        .unwrap()
        .unwrap()
        .trim_start_matches("etcd gRPC: ")
        .to_string();
    let http = lines
        .next()
        .unwrap()
        .unwrap()
        .trim_start_matches("HTTP: https://")
        .to_string();
    std::thread::spawn(move || for _ in lines {});
    Node { child, etcd, http }
}

struct Ctl {
    bin: PathBuf,
    ep: String,
}

impl Ctl {
    /// etcdctl over TLS with these extra flags: success and what it printed.
    fn run(&self, tls: &[&str], args: &[&str]) -> (bool, String) {
        let out = Command::new(&self.bin)
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &self.ep,
                "--dial-timeout",
                "3s",
                "--command-timeout",
                "10s",
            ])
            .args(tls)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

/// Two authorities under `dir`: `certs` (with a certificate for the node,
/// `node.pem`) and `other`, whose CA a client may wrongly trust.
fn authorities(dir: &Path) -> (PathBuf, PathBuf) {
    let certs = dir.join("certs");
    let other = dir.join("other");
    let c = path(&certs);
    meshwork(&["cert", "init", "--dir", c]);
    meshwork(&["cert", "issue", "--dir", c, "--name", "node"]);
    meshwork(&["cert", "init", "--dir", path(&other)]);
    (certs, other)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn etcdctl_and_curl_over_tls_and_what_they_refuse() {
    let (Some(etcdctl), Some(curl)) = (peer::on_path("etcdctl"), peer::on_path("curl")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (certs, other) = authorities(dir.path());
    let c = path(&certs);
    let node = start(dir.path(), &certs, false);
    let ctl = Ctl {
        bin: etcdctl,
        ep: format!("https://{}", node.etcd),
    };
    let ca = certs.join("ca.pem");
    let ca_flag = ["--cacert", path(&ca)];
    until(
        "the node to answer over TLS",
        Duration::from_secs(30),
        || ctl.run(&ca_flag, &["endpoint", "health"]).0,
    );
    let (ok, out) = ctl.run(&ca_flag, &["put", "k", "v"]);
    assert!(ok, "{out}");
    let (ok, out) = ctl.run(&ca_flag, &["get", "k", "--print-value-only"]);
    assert!(ok && out.trim() == "v", "{out}");
    // Another authority: refused by the client.
    let other_ca = other.join("ca.pem");
    let (ok, out) = ctl.run(&["--cacert", path(&other_ca)], &["get", "k"]);
    // (etcdctl 3.4 reports only a deadline; curl below names the cause.)
    assert!(!ok, "{out}");
    // Plaintext to the TLS port: no answer.
    let plain = Ctl {
        bin: ctl.bin.clone(),
        ep: node.etcd.clone(),
    };
    let (ok, out) = plain.run(&[], &["get", "k"]);
    assert!(!ok, "{out}");
    // curl: the HTTP port speaks TLS; plaintext gets nothing.
    let curl_run = |args: &[&str]| {
        let out = Command::new(&curl)
            .args(["-s", "-S", "--max-time", "5"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = curl_run(&[
        "--cacert",
        path(&ca),
        &format!("https://{}/readyz", node.http),
    ]);
    assert!(ok && out.contains("ready"), "{out}");
    let (ok, out) = curl_run(&[&format!("http://{}/readyz", node.http)]);
    assert!(!ok, "{out}");
    let (ok, out) = curl_run(&[
        "--cacert",
        path(&other_ca),
        &format!("https://{}/readyz", node.http),
    ]);
    assert!(!ok && out.contains("certificate"), "{out}");

    // Meshwork's own clients: the CLI (gRPC and HTTP) trusting the CA, and
    // a second node whose coordination runs on this one's store over TLS.
    let mw = |args: &[&str], envs: &[(&str, &str)]| {
        let out = Command::new(meshwork_tests::bin())
            .args(args)
            .envs(envs.iter().copied())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = mw(
        &[
            "kv",
            "--endpoints",
            &node.etcd,
            "--cacert",
            path(&ca),
            "get",
            "k",
        ],
        &[],
    );
    assert!(ok && out.contains('v'), "{out}");
    let (ok, out) = mw(&["kv", "--endpoints", &node.etcd, "get", "k"], &[]);
    assert!(!ok, "plaintext from the CLI: {out}");
    let https_api = format!("https://{}", node.http);
    let (ok, out) = mw(
        &["id", "--http", &https_api, "next", "--count", "2"],
        &[("MESHWORK_CACERT", path(&ca))],
    );
    assert!(ok, "{out}");
    let (ok, out) = mw(&["id", "--http", &https_api, "next"], &[]);
    assert!(!ok && out.contains("MESHWORK_CACERT"), "{out}");
    let second = meshwork_tests::start(
        &dir.path().join("second"),
        &[
            "--roles",
            "coord",
            "--name",
            "second",
            "--store",
            &format!("etcd://{}", node.etcd),
            "--store-cacert",
            path(&ca),
        ],
        &[],
    );
    let (code, body) = meshwork_testkit::http::blocking::get(&second.http, "/v1/nodes").unwrap();
    assert!(
        code == 200 && body.matches("\"name\"").count() >= 2,
        "{body}"
    );

    // A certificate for another host name, then an expired one: swapped in
    // place, taken without a restart, and refused by the client.
    let swap = |name: &str| {
        std::fs::copy(certs.join(format!("{name}.pem")), certs.join("node.pem")).unwrap();
        std::fs::copy(
            certs.join(format!("{name}-key.pem")),
            certs.join("node-key.pem"),
        )
        .unwrap();
    };
    meshwork(&[
        "cert",
        "issue",
        "--dir",
        c,
        "--name",
        "elsewhere",
        "--host",
        "elsewhere.example",
    ]);
    swap("elsewhere");
    let https = format!("https://{}/readyz", node.http);
    until(
        "the new certificate to be served",
        Duration::from_secs(20),
        || {
            let (ok, out) = curl_run(&["--cacert", path(&ca), &https]);
            !ok && out.contains("subject name")
        },
    );
    assert!(!ctl.run(&ca_flag, &["get", "k"]).0);
    meshwork(&[
        "cert", "issue", "--dir", c, "--name", "expired", "--days", "0",
    ]);
    swap("expired");
    until(
        "the expired certificate to be refused",
        Duration::from_secs(20),
        || {
            let (ok, out) = curl_run(&["--cacert", path(&ca), &https]);
            !ok && out.contains("expired")
        },
    );
    assert!(!ctl.run(&ca_flag, &["get", "k"]).0);
    meshwork(&["cert", "issue", "--dir", c, "--name", "fresh"]);
    swap("fresh");
    until("a good certificate again", Duration::from_secs(20), || {
        ctl.run(&ca_flag, &["get", "k"]).0
    });
}

#[test]
fn mutual_tls_names_the_store_user() {
    let Some(etcdctl) = peer::on_path("etcdctl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let c = path(&certs);
    meshwork(&["cert", "init", "--dir", c]);
    meshwork(&["cert", "issue", "--dir", c, "--name", "node"]);
    meshwork(&["cert", "issue", "--dir", c, "--name", "root", "--client"]);
    meshwork(&["cert", "issue", "--dir", c, "--name", "alice", "--client"]);
    let node = start(dir.path(), &certs, true);
    let ctl = Ctl {
        bin: etcdctl,
        ep: format!("https://{}", node.etcd),
    };
    let ca = certs.join("ca.pem");
    let as_user = |u: &str| -> Vec<String> {
        vec![
            "--cacert".into(),
            path(&ca).into(),
            "--cert".into(),
            path(&certs.join(format!("{u}.pem"))).into(),
            "--key".into(),
            path(&certs.join(format!("{u}-key.pem"))).into(),
        ]
    };
    let run = |flags: &[String], args: &[&str]| {
        let f: Vec<&str> = flags.iter().map(String::as_str).collect();
        ctl.run(&f, args)
    };
    let root = as_user("root");
    until(
        "the node to answer over mutual TLS",
        Duration::from_secs(30),
        || run(&root, &["endpoint", "health"]).0,
    );
    // No client certificate: refused in the handshake.
    let (ok, out) = ctl.run(&["--cacert", path(&ca)], &["get", "k"]);
    assert!(!ok, "{out}");
    // Auth on: the certificate's name is the user.
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["auth", "enable"],
        &["role", "add", "app"],
        &[
            "role",
            "grant-permission",
            "app",
            "readwrite",
            "/alice/",
            "--prefix",
        ],
    ] {
        let (ok, out) = run(&root, args);
        assert!(ok, "{args:?}: {out}");
    }
    let alice = as_user("alice");
    let (ok, out) = run(&alice, &["put", "/alice/x", "1"]);
    assert!(
        !ok && out.contains("permission denied"),
        "no user alice yet: {out}"
    );
    let (ok, out) = run(&root, &["user", "add", "alice", "--no-password"]);
    assert!(ok, "{out}");
    let (ok, out) = run(&root, &["user", "grant-role", "alice", "app"]);
    assert!(ok, "{out}");
    let (ok, out) = run(&alice, &["put", "/alice/x", "1"]);
    assert!(ok, "{out}");
    let (ok, out) = run(&alice, &["put", "/other", "1"]);
    assert!(!ok && out.contains("permission denied"), "{out}");
    let (ok, out) = run(&alice, &["user", "list"]);
    assert!(!ok && out.contains("permission denied"), "{out}");
    let (ok, out) = run(&root, &["get", "/alice/x", "--print-value-only"]);
    assert!(ok && out.trim() == "1", "{out}");
}

/// The cache's RESP port speaks TLS with the node's certificate, as Redis 6
/// does with `tls-port`: Debian's `redis-cli --tls` works against it, a
/// plaintext client or one trusting another authority gets nothing, and a
/// client that never handshakes is let go.
#[test]
fn redis_cli_over_tls_to_the_cache() {
    let Some(redis_cli) = peer::on_path("redis-cli") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (certs, other) = authorities(dir.path());
    let node = meshwork_tests::start(
        &dir.path().join("data"),
        &[
            "--roles",
            "store,coord,cache",
            "--cache-addr",
            "127.0.0.1:0",
            "--tls-cert",
            path(&certs.join("node.pem")),
            "--tls-key",
            path(&certs.join("node-key.pem")),
        ],
        &[],
    );
    let port = node.cache.clone().unwrap();
    let port = port.rsplit(':').next().unwrap().to_string();
    let cli = |tls: &[&str], args: &[&str]| {
        let out = Command::new(&redis_cli)
            .args(["-h", "127.0.0.1", "-p", &port])
            .args(tls)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let ca = certs.join("ca.pem");
    let good = ["--tls", "--cacert", path(&ca)];
    assert_eq!(cli(&good, &["PING"]).trim(), "PONG");
    assert_eq!(cli(&good, &["SET", "k", "over tls"]).trim(), "OK");
    assert_eq!(cli(&good, &["GET", "k"]).trim(), "over tls");
    // Plaintext: the handshake fails, no command runs.
    let plain = cli(&[], &["GET", "k"]);
    assert!(!plain.contains("over tls"), "{plain}");
    // Another authority: redis-cli refuses the certificate.
    let other_ca = other.join("ca.pem");
    let wrong = cli(&["--tls", "--cacert", path(&other_ca)], &["GET", "k"]);
    assert!(!wrong.contains("over tls"), "{wrong}");
    assert!(
        wrong.to_lowercase().contains("ssl") || wrong.to_lowercase().contains("certificate"),
        "{wrong}"
    );
    // Silent clients are closed past the handshake deadline, and the port
    // still serves.
    let mut idle = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut b = [0u8; 16];
    let n = std::io::Read::read(&mut idle, &mut b).unwrap_or(0);
    assert_eq!(n, 0, "closed without a word");
    assert_eq!(cli(&good, &["GET", "k"]).trim(), "over tls");
}
