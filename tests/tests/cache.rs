//! The cache role through the node: `meshwork server --cache-addr` serves RESP that
//! `redis-cli` (Debian's redis-tools, a peer) uses as it would Redis, a `[cache]`
//! password guards it, and a bad `[cache]` table is refused at start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

/// One RESP exchange over a fresh connection: the raw reply.
fn resp(addr: &str, req: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req).unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn the_node_serves_resp_that_redis_cli_uses() {
    let dir = tempfile::tempdir().unwrap();
    let node = meshwork_tests::start(
        dir.path(),
        &[
            "--roles",
            "store,coord,cache",
            "--cache-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    let addr = node.cache.clone().expect("the cache's address");
    assert_eq!(resp(&addr, b"PING\r\n"), "+PONG\r\n");
    assert_eq!(
        resp(
            &addr,
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
        ),
        "+OK\r\n$1\r\nv\r\n"
    );
    // The node lists the role in its membership.
    let (_, nodes) = meshwork_testkit::http::blocking::get(&node.http, "/v1/nodes").unwrap();
    assert!(nodes.contains("\"cache\""), "{nodes}");
    // Its figures are on the node's /metrics (refreshed every second).
    meshwork_testkit::blocking::until("the cache's metrics", Duration::from_secs(20), || {
        meshwork_testkit::http::blocking::get(&node.http, "/metrics").is_ok_and(|(_, m)| {
            m.lines().any(|l| l == "meshwork_cache_keys 1")
                && m.lines()
                    .any(|l| l.starts_with("meshwork_cache_commands_total "))
                && m.lines()
                    .any(|l| l.starts_with("meshwork_cache_keyspace_hits_total 1"))
        })
    });

    let Some(cli) =
        meshwork_testkit::peer::at("redis-cli", "MESHWORK_REDIS_CLI", "/usr/bin/redis-cli")
    else {
        return;
    };
    let port = addr.rsplit(':').next().unwrap().to_string();
    let run = |args: &[&str]| {
        let out = Command::new(&cli)
            .args(["-h", "127.0.0.1", "-p", &port])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(run(&["SET", "greeting", "hello"]), "OK");
    assert_eq!(run(&["GET", "greeting"]), "hello");
    assert_eq!(run(&["EXPIRE", "greeting", "100"]), "1");
    assert_eq!(run(&["DBSIZE"]), "2");
}

#[test]
fn a_password_from_the_config_file_guards_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cache.toml");
    std::fs::write(
        &config,
        "[cache]\npassword = \"s3cret\"\nmax_clients = 100\n",
    )
    .unwrap();
    let node = meshwork_tests::start(
        &dir.path().join("node"),
        &[
            "--roles",
            "store,coord,cache",
            "--cache-addr",
            "127.0.0.1:0",
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    );
    let addr = node.cache.clone().unwrap();
    assert_eq!(
        resp(&addr, b"GET k\r\n"),
        "-NOAUTH Authentication required.\r\n"
    );
    assert_eq!(resp(&addr, b"AUTH s3cret\r\nGET k\r\n"), "+OK\r\n$-1\r\n");

    // A bad table stops the start with a message naming it.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[cache]\nmax_clients = 0\n").unwrap();
    let out = Command::new(meshwork_tests::bin())
        .args([
            "server",
            "--roles",
            "cache",
            "--cache-addr",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&bad)
        .arg("--data-dir")
        .arg(dir.path().join("bad"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[cache] table"), "{err}");
    // And the cache role without an address is refused.
    let out = Command::new(meshwork_tests::bin())
        .args(["server", "--roles", "cache", "--data-dir"])
        .arg(dir.path().join("noaddr"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cache-addr"));
}
