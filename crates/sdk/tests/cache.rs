//! The SDK's two-level cache over real sockets: over the cache node (in this
//! process, on a real port) and over Debian's redis-server (a peer: skipped when
//! missing, failed under `MESHWORK_REQUIRE_PEERS=1`), and over a three-node Redis
//! Cluster made with `redis-cli --cluster create`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use meshwork_sdk::cache::{Cache, CacheOptions, L2Spec};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A redis-server child without persistence; killed when dropped.
struct Redis {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis(extra: &[&str]) -> Option<Redis> {
    let bin = meshwork_testkit::peer::at(
        "redis-server",
        "MESHWORK_REDIS_SERVER",
        "/usr/bin/redis-server",
    )?;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server not ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(Redis {
        port,
        child,
        _dir: dir,
    })
}

fn node() -> (String, meshwork_cache::Workers) {
    let w = meshwork_cache::spawn_workers(
        "127.0.0.1:0".parse().unwrap(),
        meshwork_cache::CacheConfig::default(),
        Some(2),
    )
    .unwrap();
    (format!("redis://{}", w.addr), w)
}

async fn open(url: &str, name: &str, opts: CacheOptions) -> Cache {
    Cache::open(name, L2Spec::Redis(url.into()), opts)
        .await
        .unwrap()
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The behaviour every L2 must give.
async fn two_levels_defend_the_source(url: &str) {
    // Single flight: a thousand concurrent misses of one key make one load.
    let c = open(url, "sf", CacheOptions::default()).await;
    let loads = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..1_000 {
        let (c, loads) = (c.clone(), loads.clone());
        tasks.push(tokio::spawn(async move {
            c.get_or_load("hot", Duration::from_secs(60), || async move {
                loads.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, std::io::Error>(Some(42u32))
            })
            .await
            .unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Some(42));
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    let s = c.stats();
    assert_eq!(s.loads, 1);
    assert_eq!(s.misses, 1);

    // Across processes (another cache has its own L1): its concurrent misses wait
    // for one load through the lock in L2.
    let (a, b) = (
        open(url, "xp", CacheOptions::default()).await,
        open(url, "xp", CacheOptions::default()).await,
    );
    let loads = Arc::new(AtomicUsize::new(0));
    let load = |loads: Arc<AtomicUsize>| {
        move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok::<_, std::io::Error>(Some("v".to_string()))
        }
    };
    let (ra, rb) = tokio::join!(
        a.get_or_load("k", Duration::from_secs(60), load(loads.clone())),
        b.get_or_load("k", Duration::from_secs(60), load(loads.clone())),
    );
    assert_eq!(
        (ra.unwrap(), rb.unwrap()),
        (Some("v".into()), Some("v".into()))
    );
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(a.stats().l2_hits + b.stats().l2_hits, 1);

    // Penetration: an absence is remembered in L1 and in L2 (as an empty string).
    let loads = Arc::new(AtomicUsize::new(0));
    for _ in 0..3 {
        let l = loads.clone();
        let v: Option<u8> = a
            .get_or_load("nothing", Duration::from_secs(60), || async move {
                l.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(None)
            })
            .await
            .unwrap();
        assert_eq!(v, None);
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    let mut r = raw(url).await;
    let stored: Option<String> = redis::cmd("GET")
        .arg("xp:nothing")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(stored.as_deref(), Some(""));
    let pttl: i64 = redis::cmd("PTTL")
        .arg("xp:nothing")
        .query_async(&mut r)
        .await
        .unwrap();
    assert!((1..=5_500).contains(&pttl), "negative TTL {pttl}");
    // The other cache finds it in L2 without loading.
    let v: Option<u8> = b
        .get_or_load("nothing", Duration::from_secs(60), || async {
            Err::<Option<u8>, _>("must not load")
        })
        .await
        .unwrap();
    assert_eq!(v, None);

    // A loader's error is returned and not cached.
    let e = a
        .get_or_load::<u8, _, _, _>("bad", Duration::from_secs(60), || async {
            Err("database down")
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("database down"), "{e}");
    let v = a
        .get_or_load("bad", Duration::from_secs(60), || async {
            Ok::<_, std::io::Error>(Some(1u8))
        })
        .await
        .unwrap();
    assert_eq!(v, Some(1));

    // Avalanche: TTLs spread over [ttl, ttl * (1 + jitter)].
    let j = open(
        url,
        "jit",
        CacheOptions {
            jitter: 0.5,
            ..CacheOptions::default()
        },
    )
    .await;
    let mut ttls = Vec::new();
    for i in 0..20 {
        j.set(&format!("k{i}"), &i, Duration::from_secs(100))
            .await
            .unwrap();
        let t: i64 = redis::cmd("PTTL")
            .arg(format!("jit:k{i}"))
            .query_async(&mut r)
            .await
            .unwrap();
        assert!((99_000..=150_000).contains(&t), "ttl {t}");
        ttls.push(t / 1000);
    }
    ttls.sort();
    ttls.dedup();
    assert!(ttls.len() > 5, "TTLs spread: {ttls:?}");

    // Invalidation reaches the other cache's L1.
    let v: Option<String> = b.get("k").await.unwrap();
    assert_eq!(v.as_deref(), Some("v")); // now in b's L1
    a.set("k", &"w", Duration::from_secs(60)).await.unwrap();
    meshwork_testkit::until("b's L1 dropped k", Duration::from_secs(10), async || {
        b.get::<String>("k").await.unwrap().as_deref() == Some("w")
    })
    .await;
    a.invalidate("k").await.unwrap();
    meshwork_testkit::until("k gone from b", Duration::from_secs(10), async || {
        b.get::<String>("k").await.unwrap().is_none()
    })
    .await;
    // Both messages reached b (they arrive on their own connection: wait for
    // them rather than race them).
    meshwork_testkit::until(
        "b counted both invalidations",
        Duration::from_secs(10),
        async || b.stats().invalidations >= 2,
    )
    .await;

    // Bad input is refused with a message.
    assert!(a.get::<u8>("").await.is_err());
    assert!(a.get::<u8>(&"x".repeat(2_000)).await.is_err());
    assert!(
        Cache::open(
            "bad name",
            L2Spec::Redis(url.into()),
            CacheOptions::default()
        )
        .await
        .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_cache_node() {
    let (url, _node) = node();
    two_levels_defend_the_source(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_redis() {
    let Some(r) = redis(&[]) else { return };
    two_levels_defend_the_source(&format!("redis://127.0.0.1:{}", r.port)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bloom_filter_answers_for_keys_never_admitted() {
    let (url, _node) = node();
    let c = open(
        &url,
        "bf",
        CacheOptions {
            bloom: Some((1_000, 0.001)),
            ..CacheOptions::default()
        },
    )
    .await;
    c.admit("known");
    let loads = Arc::new(AtomicUsize::new(0));
    for key in ["known", "guess-1", "guess-2"] {
        let l = loads.clone();
        let _: Option<u8> = c
            .get_or_load(key, Duration::from_secs(60), || async move {
                l.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(Some(1))
            })
            .await
            .unwrap();
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(c.stats().rejected, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_l2_degrades_to_the_loader() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let c = open(
        &url,
        "down",
        CacheOptions {
            l2_timeout: Duration::from_millis(200),
            ..CacheOptions::default()
        },
    )
    .await;
    let v = c
        .get_or_load("k", Duration::from_secs(60), || async {
            Ok::<_, std::io::Error>(Some(7u8))
        })
        .await
        .unwrap();
    assert_eq!(v, Some(7));
    assert!(c.stats().l2_errors > 0);
    // Then served from L1.
    let v: Option<u8> = c.get("k").await.unwrap();
    assert_eq!(v, Some(7));
    assert!(c.set("k", &8u8, Duration::from_secs(1)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_redis_cluster() {
    let Some(cli) =
        meshwork_testkit::peer::at("redis-cli", "MESHWORK_REDIS_CLI", "/usr/bin/redis-cli")
    else {
        return;
    };
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let Some(r) = redis(&["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]) else {
            return;
        };
        nodes.push(r);
    }
    let addrs: Vec<String> = nodes
        .iter()
        .map(|r| format!("127.0.0.1:{}", r.port))
        .collect();
    let out = Command::new(cli)
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Every node agrees the cluster is ok (one saying so is not enough: the others
    // may still answer CLUSTERDOWN while the slot map spreads).
    for addr in &addrs {
        meshwork_testkit::until("the cluster is ok", Duration::from_secs(30), async || {
            let mut c = raw(&format!("redis://{addr}")).await;
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut c)
                .await
                .unwrap_or_default();
            info.contains("cluster_state:ok")
        })
        .await;
    }
    let spec = L2Spec::parse(&format!("redis+cluster://{}", addrs.join(","))).unwrap();
    // What this test checks is slot routing, not latency: a budget that a loaded
    // CI machine's first topology discovery fits in.
    let opts = CacheOptions {
        l2_timeout: Duration::from_secs(5),
        ..CacheOptions::default()
    };
    let (a, b) = (
        Cache::open("cl", spec.clone(), opts.clone()).await.unwrap(),
        Cache::open("cl", spec, opts).await.unwrap(),
    );
    // Keys land on all three nodes (slot routing); every one reads back.
    for i in 0..60 {
        a.set(&format!("k{i}"), &i, Duration::from_secs(60))
            .await
            .unwrap();
    }
    let mut per_node = Vec::new();
    for addr in &addrs {
        let mut c = raw(&format!("redis://{addr}")).await;
        let n: i64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
        per_node.push(n);
    }
    assert!(per_node.iter().all(|n| *n > 0), "{per_node:?}");
    for i in 0..60 {
        let v: Option<i32> = b.get(&format!("k{i}")).await.unwrap();
        assert_eq!(v, Some(i));
    }
    assert_eq!(b.stats().l2_hits, 60);
    // Invalidation through the cluster's pub/sub reaches b's L1.
    a.invalidate("k1").await.unwrap();
    meshwork_testkit::until("k1 gone from b", Duration::from_secs(10), async || {
        b.get::<i32>("k1").await.unwrap().is_none()
    })
    .await;
}
