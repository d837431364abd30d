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

/// Pipelined requests over one connection: reads until as many bytes as
/// `want` came (or the connection ends), then compares.
fn expect(addr: &str, req: &[u8], want: &str) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < want.len() {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(String::from_utf8_lossy(&got), want);
}

/// A node with the store, coordination and the cache on a free port; the cache's
/// address.
fn cache_node(dir: &std::path::Path) -> (meshwork_tests::Server, String) {
    let node = meshwork_tests::start(
        dir,
        &[
            "--roles",
            "store,coord,cache",
            "--cache-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    let addr = node.cache.clone().expect("the cache's address");
    (node, addr)
}

#[test]
fn the_node_serves_resp_that_redis_cli_uses() {
    let dir = tempfile::tempdir().unwrap();
    let (node, addr) = cache_node(dir.path());
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

/// A thousand idle clients on the cache port of a node whose open-files limit is
/// 1,024 and cannot be raised: the cache takes what fits its share (the surplus is
/// answered Redis' max-clients error and closed), the store keeps committing, and
/// the cache serves again once they leave.
#[test]
fn idle_cache_clients_past_the_open_files_limit_do_not_stop_the_store() {
    // This process holds the idle sockets: its own soft limit up to its hard one.
    #[allow(unsafe_code)]
    // SAFETY: getrlimit/setrlimit on structs we own, for this process.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let node = meshwork_tests::start_with_nofile(
        dir.path(),
        &[
            "--roles",
            "store,coord,cache",
            "--cache-addr",
            "127.0.0.1:0",
        ],
        &[],
        1024,
        1024,
    );
    let addr = node.cache.clone().unwrap();
    let mut idle: Vec<std::net::TcpStream> = (0..1100)
        .map(|i| {
            std::net::TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    // The store commits meanwhile.
    for i in 0..5 {
        let out = Command::new(meshwork_tests::bin())
            .args([
                "kv",
                "put",
                &format!("during/{i}"),
                "v",
                "--endpoints",
                &node.etcd,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        meshwork_testkit::http::blocking::get(&node.http, "/readyz")
            .unwrap()
            .0,
        200
    );
    // The newest were refused with Redis' error and closed.
    let mut refused = 0;
    for s in idle.iter_mut().rev().take(500) {
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 64];
        if let Ok(n) = s.read(&mut buf)
            && buf[..n].starts_with(b"-ERR max number of clients reached")
        {
            refused += 1;
        }
    }
    assert!(refused >= 400, "{refused} of the last 500 refused");
    drop(idle);
    meshwork_testkit::blocking::until("the cache to serve again", Duration::from_secs(10), || {
        std::net::TcpStream::connect(&addr).is_ok() && resp(&addr, b"PING\r\n") == "+PONG\r\n"
    });
}

/// The SDK finds the node's cache through the registry (its record names the
/// address actually bound) and keeps its entries there.
#[test]
fn the_sdk_finds_cache_nodes_through_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let (node, addr) = cache_node(dir.path());
    let (_, nodes) = meshwork_testkit::http::blocking::get(&node.http, "/v1/nodes").unwrap();
    assert!(nodes.contains(&format!("\"cache\":\"{addr}\"")), "{nodes}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let opts = meshwork_sdk::Options::new("catalog", vec![node.etcd.clone()]).unwrap();
        let mw = meshwork_sdk::Meshwork::connect(opts).await.unwrap();
        let c = mw.cache("products").await.unwrap();
        let v = c
            .get_or_load("sku-1", Duration::from_secs(60), || async {
                Ok::<_, std::io::Error>(Some(1250u32))
            })
            .await
            .unwrap();
        assert_eq!(v, Some(1250));
        assert_eq!(c.stats().l2_errors, 0, "{:?}", c.stats());
        mw.shutdown().await;
    });
    assert_eq!(resp(&addr, b"GET products:sku-1\r\n"), "$4\r\n1250\r\n");
}

/// With `[cache] snapshot = true` the data outlives a restart (written at SIGTERM,
/// read at start, TTLs kept); without it the cache starts empty.
#[test]
fn a_snapshot_carries_the_data_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cache.toml");
    std::fs::write(&config, "[cache]\nsnapshot = true\n").unwrap();
    let data = dir.path().join("node");
    let args = [
        "--roles",
        "store,cache",
        "--cache-addr",
        "127.0.0.1:0",
        "--config",
        config.to_str().unwrap(),
    ];
    let mut node = meshwork_tests::start(&data, &args, &[]);
    let addr = node.cache.clone().unwrap();
    expect(
        &addr,
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n$2\r\nEX\r\n$4\r\n1000\r\nRPUSH l a b\r\nZADD z 1.5 m\r\nSELECT 2\r\nSET other x\r\n",
        "+OK\r\n:2\r\n:1\r\n+OK\r\n+OK\r\n",
    );
    assert_eq!(node.terminate(), Some(0));
    assert!(data.join("cache.snapshot").exists());

    let node = meshwork_tests::start(&data, &args, &[]);
    let addr = node.cache.clone().unwrap();
    expect(
        &addr,
        b"GET k\r\nLRANGE l 0 -1\r\nZSCORE z m\r\nSELECT 2\r\nGET other\r\nDBSIZE\r\n",
        "$1\r\nv\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n$3\r\n1.5\r\n+OK\r\n$1\r\nx\r\n:1\r\n",
    );
    let ttl = resp(&addr, b"TTL k\r\n");
    let secs: i64 = ttl.trim_start_matches(':').trim().parse().unwrap();
    assert!((990..=1000).contains(&secs), "{ttl}");
}

/// The console's Cache page and its JSON show the node's figures, the slow log and
/// the hit ratio the SDK caches report.
#[test]
fn the_console_shows_the_cache_and_the_sdk_hit_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let (node, addr) = cache_node(dir.path());
    expect(
        &addr,
        b"CONFIG SET slowlog-log-slower-than 0\r\nSELECT 2\r\nSET a 1\r\n",
        "+OK\r\n+OK\r\n+OK\r\n",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let opts = meshwork_sdk::Options::new("catalog", vec![node.etcd.clone()]).unwrap();
        let mw = meshwork_sdk::Meshwork::connect(opts).await.unwrap();
        let c = mw
            .cache_with(
                "prices",
                meshwork_sdk::cache::CacheOptions {
                    report_every: Some(Duration::from_millis(100)),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        // One load, then three L1 hits.
        for _ in 0..4 {
            let v = c
                .get_or_load("sku-1", Duration::from_secs(60), || async {
                    Ok::<_, std::io::Error>(Some(7u32))
                })
                .await
                .unwrap();
            assert_eq!(v, Some(7));
        }
        let http = node.http.clone();
        meshwork_testkit::until("the SDK's report", Duration::from_secs(20), async || {
            let h = http.clone();
            tokio::task::spawn_blocking(move || {
                meshwork_testkit::http::blocking::get(&h, "/v1/console/cache")
            })
            .await
            .unwrap()
            .is_ok_and(|(_, b)| b.contains("\"name\":\"prices\",\"l1_hits\":3,"))
        })
        .await;
        mw.shutdown().await;
    });
    let (status, json) =
        meshwork_testkit::http::blocking::get(&node.http, "/v1/console/cache").unwrap();
    assert_eq!(status, 200, "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        v["port"].as_u64(),
        addr.rsplit(':').next().unwrap().parse().ok()
    );
    let db2 = v["dbs"].as_array().unwrap().iter().find(|d| d["db"] == 2);
    assert_eq!(db2.map(|d| d["keys"].as_u64()), Some(Some(1)), "{json}");
    let sdk = &v["sdk"][0];
    assert_eq!(
        (sdk["l1_hits"].as_u64(), sdk["loads"].as_u64()),
        (Some(3), Some(1)),
        "{json}"
    );
    assert!(
        v["slowlog"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["args"] == serde_json::json!(["SET", "a", "1"])),
        "{json}"
    );
    let (status, html) = meshwork_testkit::http::blocking::get(&node.http, "/ui/cache").unwrap();
    assert_eq!(status, 200);
    for want in [
        "<h1>Cache</h1>",
        "hit ratio",
        "<td>prices</td><td>75.0 %</td>",
        "<td>db2</td><td>1</td>",
        "<code>SET a 1</code>",
    ] {
        assert!(html.contains(want), "{want} in {html}");
    }
}

/// A client we did not write: redis-py (Debian's python3-redis, a peer) runs
/// `tests/scripts/redis_py.py` against the node — strings, pipelines, MULTI/EXEC
/// and WATCH, the SCAN family's iterators, sorted sets, blocking pops, pub/sub,
/// INFO, CONFIG, CLIENT, SLOWLOG and error replies as the library parses them (the
/// script passes against redis-server 7.0 too).
#[test]
fn redis_py_works_against_the_node() {
    let Some(py) = meshwork_testkit::peer::at("python3", "MESHWORK_PYTHON3", "/usr/bin/python3")
    else {
        return;
    };
    let has_module = Command::new(&py)
        .args(["-c", "import redis"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_module {
        assert!(
            !meshwork_testkit::peer::required(),
            "peer python3-redis is missing and MESHWORK_REQUIRE_PEERS=1 (install Debian's package, see .ci/run)"
        );
        eprintln!("skipping: peer python3-redis is missing");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_node, addr) = cache_node(dir.path());
    let port = addr.rsplit(':').next().unwrap().to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/redis_py.py");
    let out = Command::new(&py).arg(script).arg(&port).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}
