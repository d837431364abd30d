//! The coordination test suite, written against "an etcd v3 endpoint set": run on
//! Meshwork's embedded store (`embedded.rs`) and on a real etcd cluster
//! (`etcd_cluster.rs`). Every function is one feature, driven over real sockets.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use meshwork_coord::backend::{Backend, BackendOptions};
use meshwork_coord::config::secret::{MasterKey, MasterKeys};
use meshwork_coord::config::{
    BetaRequest, ClientIdentity, ConfigCenter, ConfigKey, ConfigOptions, Format, Listening,
    Publish, checksum,
};
use meshwork_coord::registry::{Filter, InstanceSpec, Registry, RegistryOptions, ServiceSettings};
use meshwork_coord::{Coord, CoordError, CoordOptions, lock};

/// Calls `$run!(names...)` with every test of the suite: each backend's harness
/// defines `$run` to make one test per name, so a new suite test runs everywhere.
macro_rules! for_each_suite_test {
    ($run:ident) => {
        $run!(
            registry_ephemeral_and_persistent,
            health_checks_follow_the_instance,
            discovery_filters_protection_blocking_watch,
            config_versions_history_rollback,
            config_listen_subscribe_gray,
            locks_exclusive_fenced_freed,
            election_campaign_observe_resign,
            ids_unique_across_nodes,
            checks_move_when_their_node_dies,
            client_typed_config_session_and_guards,
            backend_loads_large_prefixes_in_pages,
            config_secrets_sealed_opened_rotated,
        );
    };
}
pub(crate) use for_each_suite_test;

/// Generous bound for anything that should happen "soon".
pub const SOON: Duration = Duration::from_secs(10);

/// Starts a coordination node named `name` on `endpoints`.
pub async fn node(endpoints: &[String], name: &str) -> Coord {
    Coord::start(
        endpoints,
        CoordOptions {
            node_name: name.to_string(),
            node_ttl: 2,
            ..CoordOptions::default()
        },
    )
    .await
    .unwrap()
}

pub use meshwork_testkit::eventually;

/// The first item of `stream` that satisfies `pred`, failing after `within`.
pub async fn next_matching<S, T>(stream: &mut S, within: Duration, pred: impl Fn(&T) -> bool) -> T
where
    S: futures_util::Stream<Item = T> + Unpin,
{
    tokio::time::timeout(within, async {
        loop {
            let v = stream.next().await.expect("stream ended");
            if pred(&v) {
                return v;
            }
        }
    })
    .await
    .expect("timed out waiting for a matching stream item")
}

fn spec(json: serde_json::Value) -> InstanceSpec {
    serde_json::from_value(json).unwrap()
}

/// An HTTP health endpoint whose answer the test flips.
pub struct Toggle {
    /// Address it listens on.
    pub addr: SocketAddr,
    /// True = 200, false = 503.
    pub up: Arc<AtomicBool>,
    /// Probes received.
    pub hits: Arc<AtomicUsize>,
}

/// Starts a [`Toggle`] server.
pub async fn toggle_server() -> Toggle {
    let up = Arc::new(AtomicBool::new(true));
    let hits = Arc::new(AtomicUsize::new(0));
    let (u, h) = (up.clone(), hits.clone());
    let app = axum::Router::new().route(
        "/healthz",
        axum::routing::get(move || {
            let (u, h) = (u.clone(), h.clone());
            async move {
                h.fetch_add(1, Ordering::Relaxed);
                if u.load(Ordering::Relaxed) {
                    (axum::http::StatusCode::OK, "ok")
                } else {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "down")
                }
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    Toggle { addr, up, hits }
}

fn http_check(port: u16) -> serde_json::Value {
    serde_json::json!({"address": "127.0.0.1", "port": port, "ephemeral": false,
        "check": {"type": "http", "path": "/healthz", "interval_ms": 150, "timeout_ms": 100,
                  "healthy_threshold": 1, "unhealthy_threshold": 1}})
}

fn health_of(reg: &Registry, svc: &str, id: &str) -> Option<(bool, String, String)> {
    let c = reg.cache().lock();
    let h = c.service(svc)?.health.get(id)?;
    Some((h.healthy, h.detail.clone(), h.checker.clone()))
}

/// Ephemeral instances vanish within their TTL once heartbeats stop; persistent ones
/// stay; heartbeats keep per-instance leases alive; deregistration removes both.
pub async fn registry_ephemeral_and_persistent(endpoints: Vec<String>) {
    let n = node(&endpoints, "reg-a").await;
    // Another "process": its own backend and a session lease kept alive by heartbeat.
    let other = Backend::connect(&endpoints, BackendOptions::default())
        .await
        .unwrap();
    let reg_other = Registry::open(&other, Some("eph"), RegistryOptions::default())
        .await
        .unwrap();
    let lease = other.grant(2).await.unwrap();
    let keeper = other.keep_alive(lease, 2);
    let r = reg_other
        .register(
            "eph",
            spec(serde_json::json!({"address": "127.0.0.1", "port": 7001, "tags": ["a"]})),
            "test process",
            Some(lease),
        )
        .await
        .unwrap();
    assert_eq!(r.instance.spec.id, "127.0.0.1:7001");
    n.registry
        .register(
            "eph",
            spec(serde_json::json!({"address": "127.0.0.1", "port": 7002, "ephemeral": false})),
            "test",
            None,
        )
        .await
        .unwrap();
    eventually("both instances on node a", SOON, || async {
        (n.registry
            .discover("eph", &Filter::default())
            .instances
            .len()
            == 2)
            .then_some(())
    })
    .await;
    // Heartbeats keep it across several TTLs.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        n.registry
            .discover("eph", &Filter::default())
            .instances
            .len(),
        2
    );
    // The process "dies": no more heartbeats. Gone within the TTL (plus slack).
    drop(keeper);
    eventually(
        "ephemeral instance expired",
        Duration::from_secs(8),
        || async {
            let d = n.registry.discover("eph", &Filter::default());
            (d.instances.len() == 1 && d.instances[0].instance.spec.port == 7002).then_some(())
        },
    )
    .await;
    // HTTP-style registration: its own lease, renewed by heartbeat calls.
    let own = n
        .registry
        .register(
            "eph",
            spec(serde_json::json!({"address": "127.0.0.1", "port": 7003, "ttl_seconds": 2})),
            "http 127.0.0.1",
            None,
        )
        .await
        .unwrap();
    assert_ne!(own.lease, 0);
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(n.registry.heartbeat("eph", "127.0.0.1:7003").await.unwrap() > 0);
    }
    assert!(matches!(
        n.registry.heartbeat("eph", "127.0.0.1:7002").await,
        Err(CoordError::Invalid(_))
    ));
    n.registry
        .deregister("eph", "127.0.0.1:7002")
        .await
        .unwrap();
    n.registry
        .deregister("eph", "127.0.0.1:7003")
        .await
        .unwrap();
    assert!(matches!(
        n.registry.deregister("eph", "127.0.0.1:7003").await,
        Err(CoordError::NotFound(_))
    ));
    assert!(
        n.registry
            .discover("eph", &Filter::default())
            .instances
            .is_empty()
    );
    // Bad input: clear errors, nothing written.
    let e = n
        .registry
        .register(
            "bad/name",
            spec(serde_json::json!({"address": "a", "port": 1})),
            "t",
            None,
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("service name"), "{e}");
    let e = n
        .registry
        .register(
            "eph",
            spec(serde_json::json!({"address": "127.0.0.1", "port": 1, "weight": 20000})),
            "t",
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), "invalid_argument");
    assert!(n.registry.services().iter().all(|s| s.name != "bad/name"));
    n.shutdown().await;
}

/// Active HTTP checks mark a persistent instance unhealthy (with the reason) and
/// healthy again; healthy-only discovery follows.
pub async fn health_checks_follow_the_instance(endpoints: Vec<String>) {
    let n = node(&endpoints, "hc-a").await;
    let t = toggle_server().await;
    n.registry
        .register("hc", spec(http_check(t.addr.port())), "test", None)
        .await
        .unwrap();
    let id = format!("127.0.0.1:{}", t.addr.port());
    let healthy = Filter {
        healthy: true,
        ..Filter::default()
    };
    eventually("first check passes", SOON, || async {
        health_of(&n.registry, "hc", &id)
            .filter(|h| h.0)
            .map(|_| ())
    })
    .await;
    assert_eq!(n.registry.discover("hc", &healthy).instances.len(), 1);
    t.up.store(false, Ordering::Relaxed);
    let (_, detail, checker) = eventually("check fails", SOON, || async {
        health_of(&n.registry, "hc", &id).filter(|h| !h.0)
    })
    .await;
    assert!(detail.contains("503"), "{detail}");
    assert_eq!(checker, "hc-a");
    let d = n.registry.discover("hc", &healthy);
    assert!(d.instances.is_empty());
    assert_eq!((d.healthy_count, d.total_count), (0, 1));
    let all = n.registry.discover("hc", &Filter::default());
    assert_eq!(all.instances[0].health, "failing");
    t.up.store(true, Ordering::Relaxed);
    eventually("check recovers", SOON, || async {
        health_of(&n.registry, "hc", &id)
            .filter(|h| h.0)
            .map(|_| ())
    })
    .await;
    let ev = n.registry.events(Some("hc"), 100);
    let kinds: Vec<&str> = ev.iter().map(|e| e.kind).collect();
    assert!(
        kinds.contains(&"registered") && kinds.contains(&"unhealthy"),
        "{kinds:?}"
    );
    assert!(
        ev.iter()
            .any(|e| e.kind == "unhealthy" && e.detail.contains("503"))
    );
    // Deregistering removes the health record too.
    n.registry.deregister("hc", &id).await.unwrap();
    eventually("health record gone", SOON, || async {
        health_of(&n.registry, "hc", &id).is_none().then_some(())
    })
    .await;
    n.shutdown().await;
}

/// Filters, the protection threshold, blocking queries and watch streams.
pub async fn discovery_filters_protection_blocking_watch(endpoints: Vec<String>) {
    let n = node(&endpoints, "disc-a").await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    for (port, zone, version, tags, check) in [
        (8001u16, "z1", "v1", vec!["blue"], false),
        (8002, "z1", "v2", vec!["green"], false),
        (closed, "z2", "v1", vec!["blue"], true),
        (8004, "z2", "v2", vec!["blue", "canary"], true),
    ] {
        let mut s = serde_json::json!({"address": "127.0.0.1", "port": port, "zone": zone,
            "version": version, "tags": tags, "ephemeral": false});
        if check {
            // Nothing listens there: the TCP check fails.
            s["port"] = serde_json::json!(closed);
            s["id"] = serde_json::json!(format!("i{port}"));
            s["check"] = serde_json::json!({"type": "tcp", "interval_ms": 150, "timeout_ms": 100,
                "unhealthy_threshold": 1});
        }
        n.registry
            .register("disc", spec(s), "t", None)
            .await
            .unwrap();
    }
    let f = |tags: &[&str], zone: Option<&str>, version: Option<&str>| Filter {
        healthy: false,
        tags: tags.iter().map(|s| s.to_string()).collect(),
        zone: zone.map(str::to_string),
        version: version.map(str::to_string),
    };
    assert_eq!(
        n.registry
            .discover("disc", &f(&["blue"], None, None))
            .instances
            .len(),
        3
    );
    assert_eq!(
        n.registry
            .discover("disc", &f(&["blue", "canary"], None, None))
            .instances
            .len(),
        1
    );
    assert_eq!(
        n.registry
            .discover("disc", &f(&[], Some("z1"), None))
            .instances
            .len(),
        2
    );
    assert_eq!(
        n.registry
            .discover("disc", &f(&[], Some("z2"), Some("v2")))
            .instances
            .len(),
        1
    );
    eventually("two instances failing", SOON, || async {
        let d = n.registry.discover("disc", &Filter::default());
        (d.instances.iter().filter(|v| v.health == "failing").count() == 2).then_some(())
    })
    .await;
    let healthy = Filter {
        healthy: true,
        ..Filter::default()
    };
    let d = n.registry.discover("disc", &healthy);
    assert_eq!(d.instances.len(), 2);
    assert!(!d.protection_triggered);
    // 2 of 4 healthy = 0.5 < 0.6: protection returns every instance.
    n.registry
        .put_settings(
            "disc",
            &ServiceSettings {
                protect_threshold: 0.6,
                ..ServiceSettings::default()
            },
        )
        .await
        .unwrap();
    let d = n.registry.discover("disc", &healthy);
    assert!(d.protection_triggered);
    assert_eq!(d.instances.len(), 4);
    assert!(matches!(
        n.registry
            .put_settings(
                "disc",
                &ServiceSettings {
                    protect_threshold: 1.5,
                    ..ServiceSettings::default()
                }
            )
            .await,
        Err(CoordError::Invalid(_))
    ));
    // Blocking query: returns when the index moves.
    let idx = n.registry.discover("disc", &Filter::default()).index;
    let r2 = n.registry.clone();
    let waiter = tokio::spawn(async move {
        r2.discover_blocking("disc", &Filter::default(), idx, Duration::from_secs(30))
            .await
    });
    let mut watch = Box::pin(n.registry.watch("disc", Filter::default()));
    let first = watch.next().await.unwrap();
    assert_eq!(first.instances.len(), 4);
    n.registry
        .register(
            "disc",
            spec(serde_json::json!({"address": "127.0.0.1", "port": 8005, "ephemeral": false})),
            "t",
            None,
        )
        .await
        .unwrap();
    let d = tokio::time::timeout(SOON, waiter).await.unwrap().unwrap();
    assert!(d.index > idx);
    assert_eq!(d.instances.len(), 5);
    let next = next_matching(&mut watch, SOON, |d| d.instances.len() == 5).await;
    assert!(next.index > idx);
    // No change: a blocking query returns after its wait with the same index.
    let same = n
        .registry
        .discover_blocking(
            "disc",
            &Filter::default(),
            next.index,
            Duration::from_millis(300),
        )
        .await;
    assert_eq!(same.index, next.index);
    // Taking an instance out of rotation.
    n.registry
        .set_enabled("disc", "127.0.0.1:8005", false)
        .await
        .unwrap();
    let v = n.registry.discover("disc", &Filter::default());
    let i = v
        .instances
        .iter()
        .find(|i| i.instance.spec.port == 8005)
        .unwrap();
    assert!(!i.healthy);
    n.shutdown().await;
}

fn key(id: &str) -> ConfigKey {
    ConfigKey::new("test", "DEFAULT_GROUP", id).unwrap()
}

fn publish(content: &str, format: Format) -> Publish {
    Publish {
        content: content.into(),
        format,
        author: "tester".into(),
        description: String::new(),
        if_version: None,
        secret: None,
    }
}

/// Publish validates and versions; CAS; history, diff, rollback, delete.
pub async fn config_versions_history_rollback(endpoints: Vec<String>) {
    let n = node(&endpoints, "cfg-a").await;
    let c = &n.config;
    let k = key("app.toml");
    let v1 = c
        .publish(&k, publish("port = 80\nname = \"a\"\n", Format::Toml))
        .await
        .unwrap();
    assert_eq!((v1.entry.version, v1.changed), (1, true));
    // Bad TOML: rejected with line and column; nothing written.
    let e = c
        .publish(&k, publish("port = 80\nname = \n", Format::Toml))
        .await
        .unwrap_err();
    match &e {
        CoordError::Format(f) => assert_eq!(f.line, Some(2), "{e}"),
        other => panic!("expected a format error, got {other}"),
    }
    assert!(matches!(
        c.publish(&key("j"), publish("{\"a\": }", Format::Json))
            .await,
        Err(CoordError::Format(_))
    ));
    assert!(matches!(
        c.publish(&key("y"), publish("a: [1,\n", Format::Yaml))
            .await,
        Err(CoordError::Format(_))
    ));
    assert_eq!(c.history(&k, 100).await.unwrap().len(), 1);
    // Compare-and-set.
    let mut p = publish("port = 81\nname = \"a\"\n", Format::Toml);
    p.if_version = Some(7);
    assert!(matches!(
        c.publish(&k, p.clone()).await,
        Err(CoordError::Conflict(_))
    ));
    p.if_version = Some(1);
    let v2 = c.publish(&k, p).await.unwrap();
    assert_eq!(v2.entry.version, 2);
    // Same content: nothing written.
    let again = c
        .publish(&k, publish("port = 81\nname = \"a\"\n", Format::Toml))
        .await
        .unwrap();
    assert!(!again.changed);
    assert_eq!(again.entry.version, 2);
    // Size limit.
    let big = "x".repeat(c.options().max_content + 1);
    assert!(matches!(
        c.publish(&key("big"), publish(&big, Format::Text)).await,
        Err(CoordError::TooLarge(_))
    ));
    // History newest first; diff; rollback is a new version.
    let h = c.history(&k, 100).await.unwrap();
    assert_eq!(
        h.iter().map(|v| v.entry.version).collect::<Vec<_>>(),
        vec![2, 1]
    );
    let d = c.diff(&k, 1, 2).await.unwrap();
    assert!(
        d.unified.contains("-port = 80") && d.unified.contains("+port = 81"),
        "{}",
        d.unified
    );
    assert!(d.rows.iter().any(|r| r.old.as_deref() == Some("port = 80")));
    let r = c.rollback(&k, 1, "ops").await.unwrap();
    assert_eq!(r.entry.version, 3);
    assert_eq!(c.get(&k).unwrap().content, "port = 80\nname = \"a\"\n");
    let v3 = c.version(&k, 3).await.unwrap();
    assert_eq!((v3.op.as_str(), v3.restored_from), ("rollback", Some(1)));
    assert!(matches!(
        c.rollback(&k, 99, "ops").await,
        Err(CoordError::NotFound(_))
    ));
    // Delete is a version; publishing again continues the numbering.
    assert_eq!(c.delete(&k, "ops", None).await.unwrap(), 4);
    assert!(c.get(&k).is_none());
    let v5 = c
        .publish(&k, publish("port = 82\n", Format::Toml))
        .await
        .unwrap();
    assert_eq!(v5.entry.version, 5);
    assert_eq!(c.history(&k, 100).await.unwrap().len(), 5);
    assert!(
        c.list(Some("test"), None)
            .iter()
            .any(|e| e.key == k && e.content.is_empty())
    );
    assert!(c.namespaces().contains_key("test"));
    n.shutdown().await;
}

/// Long-poll listeners and subscriptions see changes; gray releases reach only the
/// targeted clients, then are promoted or withdrawn.
pub async fn config_listen_subscribe_gray(endpoints: Vec<String>) {
    let a = node(&endpoints, "cfg-l-a").await;
    let b = node(&endpoints, "cfg-l-b").await;
    let k = key("feature.json");
    let anyone = ClientIdentity::default();
    // A listener on node b holding "absent" wakes when node a publishes.
    let items = vec![Listening {
        key: k.clone(),
        checksum: String::new(),
    }];
    let b2 = b.config.clone();
    let items2 = items.clone();
    let listener = tokio::spawn(async move {
        b2.listen(&items2, &ClientIdentity::default(), Duration::from_secs(30))
            .await
    });
    let mut sub = Box::pin(b.config.subscribe(k.clone(), anyone.clone()));
    assert!(sub.next().await.unwrap().is_none());
    let p = a
        .config
        .publish(&k, publish("{\"on\": false}", Format::Json))
        .await
        .unwrap();
    let changed = tokio::time::timeout(SOON, listener).await.unwrap().unwrap();
    assert_eq!(changed, vec![k.clone()]);
    let got = tokio::time::timeout(SOON, sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.entry.checksum, p.entry.checksum);
    // Holding the current checksum: the long-poll times out empty.
    let held = vec![Listening {
        key: k.clone(),
        checksum: p.entry.checksum.clone(),
    }];
    assert!(
        b.config
            .listen(&held, &anyone, Duration::from_millis(200))
            .await
            .is_empty()
    );
    // Gray release to one address and one label.
    let canary_ip = ClientIdentity {
        address: "10.0.0.7".into(),
        labels: Default::default(),
    };
    let canary_label = ClientIdentity {
        address: "10.9.9.9".into(),
        labels: [("track".to_string(), "canary".to_string())].into(),
    };
    let b3 = b.config.clone();
    let held2 = held.clone();
    let canary_wait = tokio::spawn(async move {
        b3.listen(
            &held2,
            &ClientIdentity {
                address: "10.0.0.7".into(),
                labels: Default::default(),
            },
            Duration::from_secs(30),
        )
        .await
    });
    a.config
        .start_beta(
            &k,
            BetaRequest {
                content: "{\"on\": true}".into(),
                format: Format::Json,
                addresses: vec!["10.0.0.7".into()],
                labels: [("track".to_string(), "canary".to_string())].into(),
                author: "ops".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        tokio::time::timeout(SOON, canary_wait)
            .await
            .unwrap()
            .unwrap(),
        vec![k.clone()]
    );
    eventually("beta visible on node b", SOON, || async {
        b.config.beta(&k).map(|_| ())
    })
    .await;
    assert!(b.config.get_for(&k, &canary_ip).unwrap().beta);
    assert!(b.config.get_for(&k, &canary_label).unwrap().beta);
    let other = b.config.get_for(&k, &anyone).unwrap();
    assert!(!other.beta);
    assert_eq!(other.entry.content, "{\"on\": false}");
    // Everyone else keeps the stable content: their long-poll does not fire.
    assert!(
        b.config
            .listen(&held, &anyone, Duration::from_millis(200))
            .await
            .is_empty()
    );
    // Bad beta content is rejected.
    assert!(
        a.config
            .start_beta(
                &k,
                BetaRequest {
                    content: "{".into(),
                    format: Format::Json,
                    addresses: vec!["10.0.0.8".into()],
                    ..BetaRequest::default()
                }
            )
            .await
            .is_err()
    );
    // Promote: everyone gets it as a new version, the beta is gone.
    let promoted = a.config.end_beta(&k, true, "ops").await.unwrap().unwrap();
    assert_eq!(promoted.entry.version, 2);
    eventually("promotion reaches node b", SOON, || async {
        let s = b.config.get_for(&k, &anyone)?;
        (s.entry.content == "{\"on\": true}" && b.config.beta(&k).is_none()).then_some(())
    })
    .await;
    // Withdraw: a second gray release that ends without publishing.
    a.config
        .start_beta(
            &k,
            BetaRequest {
                content: "{\"on\": 3}".into(),
                format: Format::Json,
                addresses: vec!["10.0.0.7".into()],
                ..BetaRequest::default()
            },
        )
        .await
        .unwrap();
    assert!(a.config.end_beta(&k, false, "ops").await.unwrap().is_none());
    assert_eq!(
        a.config.get_for(&k, &canary_ip).unwrap().entry.content,
        "{\"on\": true}"
    );
    assert_eq!(a.config.get(&k).unwrap().version, 2);
    a.shutdown().await;
    b.shutdown().await;
}

/// Locks exclude, fence with increasing tokens, time out, and free on lease end.
pub async fn locks_exclusive_fenced_freed(endpoints: Vec<String>) {
    let n = node(&endpoints, "lock-a").await;
    let be = n.backend.clone();
    let la = be.grant(30).await.unwrap();
    let lb = be.grant(30).await.unwrap();
    let a = lock::lock(&be, "res", la, "a", Some(Duration::ZERO))
        .await
        .unwrap();
    let e = lock::lock(&be, "res", lb, "b", Some(Duration::from_millis(200)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "lock_held");
    assert_eq!(e.http_status(), 409);
    assert!(e.to_string().contains(r#"held by "a""#), "{e}");
    let states = lock::list_locks(&be).await.unwrap();
    let s = states.iter().find(|s| s.name == "res").unwrap();
    assert_eq!(
        (s.holder.as_str(), s.held.fencing_token, s.waiters),
        ("a", a.fencing_token, 0)
    );
    // b waits; a's holder "dies" (its lease is revoked): b gets it with a larger token.
    let be2 = be.clone();
    let waiting = tokio::spawn(async move { lock::lock(&be2, "res", lb, "b", None).await });
    eventually("b queued", SOON, || async {
        let st = lock::list_locks(&be).await.ok()?;
        (st.iter().find(|s| s.name == "res")?.waiters == 1).then_some(())
    })
    .await;
    be.revoke(la).await.unwrap();
    let b = tokio::time::timeout(SOON, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(b.fencing_token > a.fencing_token);
    assert!(
        !lock::unlock(&be, &a).await.unwrap(),
        "a stale holder cannot unlock"
    );
    assert!(lock::unlock(&be, &b).await.unwrap());
    // A waiter whose lease ends while it waits must not come out holding the lock.
    let lh = be.grant(30).await.unwrap();
    let lx = be.grant(2).await.unwrap();
    let ly = be.grant(30).await.unwrap();
    let h = lock::lock(&be, "exp", lh, "h", None).await.unwrap();
    let bx = be.clone();
    let x = tokio::spawn(async move { lock::lock(&bx, "exp", lx, "x", None).await });
    eventually("x queued", SOON, || async {
        let st = lock::list_locks(&be).await.ok()?;
        (st.iter().find(|s| s.name == "exp")?.waiters == 1).then_some(())
    })
    .await;
    // x's lease (2 s, never renewed) runs out; its key goes.
    eventually("x's lease expired", SOON, || async {
        let st = lock::list_locks(&be).await.ok()?;
        (st.iter().find(|s| s.name == "exp")?.waiters == 0).then_some(())
    })
    .await;
    let by = be.clone();
    let y = tokio::spawn(async move { lock::lock(&by, "exp", ly, "y", None).await });
    eventually("y queued", SOON, || async {
        let st = lock::list_locks(&be).await.ok()?;
        (st.iter().find(|s| s.name == "exp")?.waiters == 1).then_some(())
    })
    .await;
    assert!(lock::unlock(&be, &h).await.unwrap());
    let y = tokio::time::timeout(SOON, y)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let x = tokio::time::timeout(SOON, x).await.unwrap().unwrap();
    assert!(
        x.is_err(),
        "a waiter whose lease expired came out holding the lock"
    );
    assert!(lock::unlock(&be, &y).await.unwrap());
    // Many contenders: never two holders, tokens strictly increase.
    let holders = Arc::new(AtomicUsize::new(0));
    let last = Arc::new(AtomicI64::new(0));
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (be, holders, last) = (be.clone(), holders.clone(), last.clone());
        tasks.push(tokio::spawn(async move {
            let lease = be.grant(30).await.unwrap();
            for _ in 0..4 {
                let h = lock::lock(&be, "hot", lease, &format!("t{i}"), None)
                    .await
                    .unwrap();
                assert_eq!(holders.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                let prev = last.swap(h.fencing_token, Ordering::SeqCst);
                assert!(
                    h.fencing_token > prev,
                    "token went {prev} -> {}",
                    h.fencing_token
                );
                tokio::task::yield_now().await;
                holders.fetch_sub(1, Ordering::SeqCst);
                assert!(lock::unlock(&be, &h).await.unwrap());
            }
            be.revoke(lease).await.unwrap();
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap()
            .unwrap();
    }
    assert!(lock::lock(&be, "bad name", lb, "x", None).await.is_err());
    n.shutdown().await;
}

/// Campaign, observe, proclaim, resign; a dead leader's successor takes over.
pub async fn election_campaign_observe_resign(endpoints: Vec<String>) {
    let n = node(&endpoints, "elect-a").await;
    let be = n.backend.clone();
    let mut obs = Box::pin(lock::observe(&be, "leader").unwrap());
    assert!(obs.next().await.unwrap().is_none());
    assert!(lock::leader(&be, "leader").await.unwrap().is_none());
    let la = be.grant(30).await.unwrap();
    let lb = be.grant(30).await.unwrap();
    let a = lock::campaign(&be, "leader", la, "node-a", None)
        .await
        .unwrap();
    let l = tokio::time::timeout(SOON, obs.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(l.value, "node-a");
    let be2 = be.clone();
    let b_task =
        tokio::spawn(async move { lock::campaign(&be2, "leader", lb, "node-b", None).await });
    lock::proclaim(&be, &a, "node-a v2").await.unwrap();
    let l = tokio::time::timeout(SOON, obs.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(l.value, "node-a v2");
    assert!(!b_task.is_finished());
    assert!(lock::resign(&be, &a).await.unwrap());
    let b = tokio::time::timeout(SOON, b_task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let l = next_matching(&mut obs, SOON, |l| {
        l.as_ref().is_some_and(|l| l.value == "node-b")
    })
    .await;
    assert_eq!(l.unwrap().held, b);
    assert!(matches!(
        lock::proclaim(&be, &a, "stale").await,
        Err(CoordError::Conflict(_))
    ));
    assert_eq!(
        lock::leader(&be, "leader").await.unwrap().unwrap().value,
        "node-b"
    );
    // Timeout gives up the candidacy.
    let lc = be.grant(30).await.unwrap();
    assert_eq!(
        lock::campaign(
            &be,
            "leader",
            lc,
            "node-c",
            Some(Duration::from_millis(200))
        )
        .await
        .unwrap_err()
        .code(),
        "timeout"
    );
    be.revoke(lb).await.unwrap();
    next_matching(&mut obs, SOON, |l| l.is_none()).await;
    n.shutdown().await;
}

/// Two nodes get different worker ids; ids are unique and increasing.
pub async fn ids_unique_across_nodes(endpoints: Vec<String>) {
    let a = node(&endpoints, "ids-a").await;
    let b = node(&endpoints, "ids-b").await;
    let (ga, gb) = (a.ids().unwrap(), b.ids().unwrap());
    assert_ne!(ga.worker(), gb.worker());
    let mut seen = HashSet::new();
    for g in [&ga, &gb] {
        let batch = g.next_batch(5000).unwrap();
        assert!(batch.windows(2).all(|w| w[0] < w[1]));
        for id in batch {
            assert!(seen.insert(id), "duplicate id {id}");
        }
    }
    assert!(ga.next_batch(0).is_err());
    a.shutdown().await;
    b.shutdown().await;
}

/// When the node running a check dies, another takes it over within its TTL plus an
/// interval, and checking goes on.
pub async fn checks_move_when_their_node_dies(endpoints: Vec<String>) {
    let a = node(&endpoints, "move-a").await;
    let b = node(&endpoints, "move-b").await;
    let t = toggle_server().await;
    // Find an instance id that node a owns, so that killing a moves it.
    let mut id = String::new();
    for i in 0..64 {
        let cand = format!("inst-{i}");
        if a.membership
            .owner_of("checker", &format!("mv/{cand}"))
            .as_deref()
            == Some("move-a")
        {
            id = cand;
            break;
        }
    }
    assert!(!id.is_empty());
    let mut s = http_check(t.addr.port());
    s["id"] = serde_json::json!(id);
    b.registry.register("mv", spec(s), "t", None).await.unwrap();
    eventually("node a checks it", SOON, || async {
        health_of(&b.registry, "mv", &id)
            .filter(|h| h.2 == "move-a")
            .map(|_| ())
    })
    .await;
    // "Kill" node a: drop it without leaving; its session lease (2 s) runs out.
    drop(a);
    let (healthy, _, _) = eventually("node b takes over", Duration::from_secs(8), || async {
        health_of(&b.registry, "mv", &id).filter(|h| h.2 == "move-b")
    })
    .await;
    assert!(healthy);
    t.up.store(false, Ordering::Relaxed);
    eventually("node b sees it fail", SOON, || async {
        health_of(&b.registry, "mv", &id)
            .filter(|h| !h.0)
            .map(|_| ())
    })
    .await;
    b.shutdown().await;
}

#[derive(Debug, serde::Deserialize, PartialEq)]
struct AppConfig {
    port: u16,
    name: String,
}

/// The application client: typed config (a bad update keeps the last good value),
/// session-bound registrations removed on close, lock guards released on drop.
pub async fn client_typed_config_session_and_guards(endpoints: Vec<String>) {
    let n = node(&endpoints, "client-node").await;
    let k = key("typed.yaml");
    n.config
        .publish(&k, publish("port: 80\nname: a\n", Format::Yaml))
        .await
        .unwrap();
    let c = meshwork_coord::CoordClient::connect(
        &endpoints,
        meshwork_coord::ClientOptions {
            name: "shop-order".into(),
            session_ttl: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut cfg = c
        .subscribe::<AppConfig>("test/DEFAULT_GROUP/typed.yaml")
        .await
        .unwrap();
    assert_eq!(
        *cfg.current().unwrap(),
        AppConfig {
            port: 80,
            name: "a".into()
        }
    );
    n.config
        .publish(&k, publish("port: 81\nname: b\n", Format::Yaml))
        .await
        .unwrap();
    let v = tokio::time::timeout(SOON, cfg.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.port, 81);
    // Valid YAML, wrong shape for the type: reported, last good value kept.
    n.config
        .publish(&k, publish("port: many\nname: c\n", Format::Yaml))
        .await
        .unwrap();
    eventually("the bad update is reported", SOON, || async {
        cfg.last_error()
    })
    .await;
    assert_eq!(cfg.current().unwrap().port, 81);
    // Registrations ride the session; close removes them.
    c.register(
        "client-svc",
        spec(serde_json::json!({"address": "127.0.0.1", "port": 9900})),
    )
    .await
    .unwrap();
    eventually("registered", SOON, || async {
        (n.registry
            .discover("client-svc", &Filter::default())
            .instances
            .len()
            == 1)
            .then_some(())
    })
    .await;
    // The client's own discovery mirrors just that service.
    let mine = c.discovery("client-svc").await.unwrap();
    assert_eq!(
        mine.discover("client-svc", &Filter::default())
            .instances
            .len(),
        1
    );
    assert!(mine.services().iter().all(|s| s.name == "client-svc"));
    let g = c.lock("client-lock", Some(Duration::ZERO)).await.unwrap();
    assert!(g.fencing_token() > 0);
    assert!(
        c.lock("client-lock", Some(Duration::from_millis(100)))
            .await
            .is_ok(),
        "same session: one holder"
    );
    drop(g);
    let lease = n.backend.grant(10).await.unwrap();
    let other = eventually("guard released on drop", SOON, || async {
        lock::lock(
            &n.backend,
            "client-lock",
            lease,
            "other",
            Some(Duration::ZERO),
        )
        .await
        .ok()
    })
    .await;
    assert!(other.fencing_token > 0);
    c.close().await.unwrap();
    eventually("deregistered on close", SOON, || async {
        n.registry
            .discover("client-svc", &Filter::default())
            .instances
            .is_empty()
            .then_some(())
    })
    .await;
    n.shutdown().await;
}

/// A prefix larger than one page loads whole and consistent (a registry of 100,000
/// instances must not depend on one giant range response).
pub async fn backend_loads_large_prefixes_in_pages(endpoints: Vec<String>) {
    let be = Backend::connect(&endpoints, BackendOptions::default())
        .await
        .unwrap();
    let n = meshwork_coord::backend::LOAD_PAGE as usize * 2 + 123;
    let keys: Vec<String> = (0..n).map(|i| format!("/paging/k{i:06}")).collect();
    for chunk in keys.chunks(100) {
        be.txn(meshwork_etcd::proto::etcdserverpb::TxnRequest {
            compare: vec![],
            success: chunk
                .iter()
                .map(|k| meshwork_coord::backend::txn::put(k.clone(), "v", 0))
                .collect(),
            failure: vec![],
        })
        .await
        .unwrap();
    }
    let (kvs, rev) = be.load_prefix("/paging/").await.unwrap();
    assert!(rev > 0);
    assert_eq!(kvs.len(), n);
    let got: Vec<String> = kvs
        .iter()
        .map(|kv| String::from_utf8(kv.key.to_vec()).unwrap())
        .collect();
    assert_eq!(got, keys);
}

/// A config center on `endpoints` holding these master keys.
async fn center(endpoints: &[String], keys: &[&MasterKey]) -> ConfigCenter {
    let backend = Backend::connect(endpoints, BackendOptions::default())
        .await
        .unwrap();
    ConfigCenter::open(
        &backend,
        ConfigOptions {
            secret_keys: MasterKeys(keys.iter().map(|k| (*k).clone()).collect()),
            ..ConfigOptions::default()
        },
    )
    .await
    .unwrap()
}

/// Every value stored under `/meshwork/config/`, as one byte string.
async fn stored_config(endpoints: &[String]) -> Vec<u8> {
    let backend = Backend::connect(endpoints, BackendOptions::default())
        .await
        .unwrap();
    let (kvs, _) = backend.get_prefix("/meshwork/config/", 0).await.unwrap();
    kvs.iter().flat_map(|kv| kv.value.to_vec()).collect()
}

fn holds(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Secret entries: only ciphertext in the store (entry and history), opened
/// by a process with the master key, locked (with the reason) for one without
/// or with another key, bound to their entry, refused a gray release; a key
/// rotation reseals them and keeps history readable, and a master key is
/// replaced by rotating with the old one as previous.
pub async fn config_secrets_sealed_opened_rotated(endpoints: Vec<String>) {
    let key_a = MasterKey::from_text(&MasterKey::generate_text().unwrap()).unwrap();
    let key_b = MasterKey::from_text(&MasterKey::generate_text().unwrap()).unwrap();
    let a = center(&endpoints, &[&key_a]).await;
    let k = ConfigKey::new("prod", "db", "password").unwrap();
    const PLAIN: &str = "password = \"correct-horse-battery-staple\"\n";
    let mut p = publish(PLAIN, Format::Toml);
    p.secret = Some(true);
    let first = a.publish(&k, p.clone()).await.unwrap();
    assert!(first.changed && first.entry.secret);
    assert_eq!(first.entry.content, "", "a publish does not echo a secret");
    assert_ne!(
        first.entry.checksum,
        checksum(PLAIN),
        "the checksum tells nothing"
    );
    // A secret is never compared ("unchanged" would confirm a writer's
    // guess): the same content again is a new version.
    let again = a.publish(&k, p.clone()).await.unwrap();
    assert!(again.changed && again.entry.version == 2);
    assert_ne!(again.entry.checksum, first.entry.checksum);
    let mut p2 = publish("password = \"second-secret-value\"\n", Format::Toml);
    p2.secret = None; // keeps the mark
    let second = a.publish(&k, p2).await.unwrap();
    assert!(second.changed && second.entry.secret && second.entry.version == 3);
    let raw = stored_config(&endpoints).await;
    assert!(!holds(&raw, "correct-horse"), "no plaintext in the store");
    assert!(!holds(&raw, "second-secret"), "no plaintext in the store");

    // Opened for a reader with the key: live, a history version, a diff.
    let anyone = ClientIdentity::default();
    let served = a.get_for(&k, &anyone).unwrap();
    assert_eq!(served.entry.content, "password = \"second-secret-value\"\n");
    assert!(served.locked.is_none());
    assert_eq!(a.version(&k, 1).await.unwrap().entry.content, PLAIN);
    assert!(a.diff(&k, 1, 3).await.unwrap().secret);
    // Lists, history and `get` never carry it.
    assert!(
        a.list(Some("prod"), None)
            .iter()
            .all(|e| e.content.is_empty() && e.secret)
    );
    assert!(
        a.history(&k, 10)
            .await
            .unwrap()
            .iter()
            .all(|v| v.entry.content.is_empty())
    );
    assert_eq!(a.get(&k).unwrap().content, "");

    // Without a key, or with another: locked, saying why; no secret publish.
    let none = center(&endpoints, &[]).await;
    let locked = none.get_for(&k, &anyone).unwrap();
    assert_eq!(locked.entry.content, "");
    assert!(locked.locked.unwrap().contains("no secrets master key"));
    let err = none.publish(&k, p.clone()).await.unwrap_err().to_string();
    assert!(err.contains("no secrets master key"), "{err}");
    let other = center(&endpoints, &[&key_b]).await;
    let why = other.get_for(&k, &anyone).unwrap().locked.unwrap();
    assert!(why.contains("which this process does not have"), "{why}");

    // A sealed value copied onto another entry does not open there.
    let backend = Backend::connect(&endpoints, BackendOptions::default())
        .await
        .unwrap();
    let (kv, _) = backend
        .get("/meshwork/config/live/items/prod/db/password")
        .await
        .unwrap();
    let stolen = String::from_utf8(kv.unwrap().value.to_vec())
        .unwrap()
        .replace("\"password\"", "\"copy\"");
    backend
        .put("/meshwork/config/live/items/prod/db/copy", stolen, 0)
        .await
        .unwrap();
    let copy = ConfigKey::new("prod", "db", "copy").unwrap();
    // Nor does an older version's sealed value replayed as the current one.
    let replay_key = ConfigKey::new("prod", "db", "replayed").unwrap();
    for content in ["token = \"old\"\n", "token = \"new\"\n"] {
        let mut p = publish(content, Format::Toml);
        p.secret = Some(true);
        a.publish(&replay_key, p).await.unwrap();
    }
    let (old, _) = backend
        .get("/meshwork/config/history/prod/db/replayed/000000000001")
        .await
        .unwrap();
    let old: serde_json::Value = serde_json::from_slice(&old.unwrap().value).unwrap();
    let (cur, _) = backend
        .get("/meshwork/config/live/items/prod/db/replayed")
        .await
        .unwrap();
    let mut replayed: serde_json::Value = serde_json::from_slice(&cur.unwrap().value).unwrap();
    replayed["sealed"] = old["sealed"].clone();
    backend
        .put(
            "/meshwork/config/live/items/prod/db/replayed",
            serde_json::to_vec(&replayed).unwrap(),
            0,
        )
        .await
        .unwrap();
    let why = eventually("the copy in the local view", SOON, async || {
        a.get_for(&copy, &anyone).and_then(|s| s.locked)
    })
    .await;
    assert!(why.contains("not authentic"), "{why}");
    let why = eventually("the replay in the local view", SOON, async || {
        a.get_for(&replay_key, &anyone).and_then(|s| s.locked)
    })
    .await;
    assert!(why.contains("not authentic"), "{why}");

    // A gray release started before an entry is made secret does not outlive it.
    let flags = ConfigKey::new("prod", "db", "flags").unwrap();
    a.publish(&flags, publish("x = 1\n", Format::Toml))
        .await
        .unwrap();
    a.start_beta(
        &flags,
        BetaRequest {
            content: "x = 2\n".into(),
            format: Format::Toml,
            addresses: vec!["10.0.0.9".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut made_secret = publish("x = 3\n", Format::Toml);
    made_secret.secret = Some(true);
    a.publish(&flags, made_secret).await.unwrap();
    assert!(
        a.beta(&flags).is_none(),
        "the beta went with the secret mark"
    );

    // No gray release of a secret.
    let beta = BetaRequest {
        content: "x = 1".into(),
        format: Format::Toml,
        addresses: vec!["10.0.0.1".into()],
        ..Default::default()
    };
    assert!(
        a.start_beta(&k, beta)
            .await
            .unwrap_err()
            .to_string()
            .contains("secret")
    );

    // Rotation: a new data key, the entry resealed, history still readable.
    let before = a.secrets_status();
    let r = a.rotate_secrets().await.unwrap();
    assert_ne!(Some(r.active.clone()), before.active);
    assert!(r.resealed >= 1, "{r:?}");
    assert_eq!(
        r.unreadable,
        vec!["prod/db/copy".to_string(), "prod/db/replayed".to_string()],
        "the tampered entries are reported, not resealed"
    );
    eventually("the new active key", SOON, async || {
        (a.secrets_status().active.as_deref() == Some(r.active.as_str())).then_some(())
    })
    .await;
    assert_eq!(
        a.get_for(&k, &anyone).unwrap().entry.content,
        "password = \"second-secret-value\"\n"
    );
    assert_eq!(a.version(&k, 1).await.unwrap().entry.content, PLAIN);

    // A new master key: start with it first and the old one as previous,
    // rotate, and from then on the new key alone opens everything.
    let both = center(&endpoints, &[&key_b, &key_a]).await;
    let r = both.rotate_secrets().await.unwrap();
    assert!(r.rewrapped >= 2, "every data key rewrapped: {r:?}");
    let only_b = center(&endpoints, &[&key_b]).await;
    eventually("the rewrapped keyring", SOON, async || {
        only_b
            .get_for(&k, &anyone)
            .filter(|s| s.locked.is_none())
            .map(|s| s.entry.content)
    })
    .await;
    assert_eq!(only_b.version(&k, 1).await.unwrap().entry.content, PLAIN);
    let status = only_b.secrets_status();
    assert!(
        status
            .keys
            .iter()
            .all(|k| k.usable && k.master == key_b.id()),
        "{status:?}"
    );
    // The old key alone no longer opens anything.
    let only_a = center(&endpoints, &[&key_a]).await;
    assert!(only_a.get_for(&k, &anyone).unwrap().locked.is_some());

    // Unmarking makes it plain again.
    let mut plain = publish("public = true\n", Format::Toml);
    plain.secret = Some(false);
    let r = a.publish(&k, plain).await;
    // `a` holds only the old key now: it cannot compare, but it can write plain content.
    let r = r.unwrap();
    assert!(!r.entry.secret && r.entry.content == "public = true\n");
}
