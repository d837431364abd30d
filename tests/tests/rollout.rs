//! Progressive delivery end to end, over real processes: a node running the
//! store, coordination and the gateway; a stable and a new version of a
//! service registered with their versions; `meshwork rollout start` while a
//! client drives traffic through the gateway. A healthy new version is
//! promoted step by step; a failing one is rolled back by the analysis
//! before it gets more than its first step's share; a pinned request
//! reaches the new version before any traffic shifts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use meshwork_testkit::blocking::until;
use meshwork_testkit::http::blocking as http;
use meshwork_tests::meshwork_http as meshwork;

/// An upstream that answers `name` (or 500 with `fail`), on a thread with its
/// own runtime.
fn upstream(name: &'static str, fail: bool) -> u16 {
    let status = if fail {
        axum::http::StatusCode::INTERNAL_SERVER_ERROR
    } else {
        axum::http::StatusCode::OK
    };
    meshwork_tests::serve_app(axum::Router::new().fallback(move || async move { (status, name) }))
}

/// Requests through the gateway from a background thread until dropped;
/// counts answers by "status body".
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<parking_lot::Mutex<HashMap<String, u64>>>,
    sent: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(gw: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(parking_lot::Mutex::new(HashMap::new()));
        let sent = Arc::new(AtomicU64::new(0));
        let (s, m, n) = (stop.clone(), seen.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok((code, body)) = http::get(&gw, "/api/x") {
                    *m.lock().entry(format!("{code} {body}")).or_insert(0) += 1;
                }
                n.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Load {
            stop,
            seen,
            sent,
            thread: Some(thread),
        }
    }

    fn seen(&self, key: &str) -> u64 {
        self.seen.lock().get(key).copied().unwrap_or(0)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn register(h: &str, service: &str, port: u16, version: &str) {
    let (ok, _, err) = meshwork(
        h,
        &[
            "svc",
            "register",
            service,
            "--address",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--instance-version",
            version,
            "--persistent",
        ],
    );
    assert!(ok, "{err}");
}

/// A node with the gateway routing `/api` to `web` (round robin: every
/// instance takes its turn, whatever its latency), and `web` v1 answering.
fn setup(dir: &std::path::Path) -> (meshwork_tests::Server, String) {
    let s = meshwork_tests::start(
        dir,
        &[
            "--roles",
            "store,coord,gateway",
            "--gateway-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    let gw = s.gateway.clone().unwrap();
    register(&s.http, "web", upstream("v1", false), "1");
    let routes = dir.join("routes.toml");
    std::fs::write(
        &routes,
        "[[routes]]\nname = \"web\"\n[routes.match]\npath = { prefix = \"/api\" }\n[routes.forward]\nservice = \"web\"\nstrip_prefix = \"/api\"\nlb = { policy = \"wrr\" }\n",
    )
    .unwrap();
    let (ok, _, err) = meshwork(
        &s.http,
        &["gateway", "apply", "-f", routes.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    until("the route to go live", WAIT, || {
        http::get(&gw, "/api/x").is_ok_and(|(c, b)| c == 200 && b == "v1")
    });
    (s, gw)
}

const WAIT: Duration = Duration::from_secs(10);

fn rollout(h: &str, service: &str) -> serde_json::Value {
    let (ok, out, err) = meshwork(h, &["rollout", "status", service, "-o", "json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn actions(r: &serde_json::Value) -> Vec<String> {
    r["status"]["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| format!("{}@{}", d["action"].as_str().unwrap(), d["weight"]))
        .collect()
}

#[test]
fn a_healthy_new_version_is_promoted_step_by_step() {
    let dir = tempfile::tempdir().unwrap();
    let (s, gw) = setup(dir.path());
    let h = s.http.as_str();
    let load = Load::start(gw.clone());
    let (ok, out, err) = meshwork(
        h,
        &[
            "rollout",
            "start",
            "web",
            "--to-version",
            "2",
            "--steps",
            "20,50,100",
            "--interval",
            "2s",
            "--min-requests",
            "10",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("waiting"), "{out}");
    // Nothing of version 2 runs yet: while a few hundred requests go
    // through (controller ticks pass), the rollout waits, traffic stays on v1.
    let v1 = load.seen("200 v1");
    until("more requests through the gateway", WAIT, || {
        load.seen("200 v1") >= v1 + 300
    });
    assert_eq!(rollout(h, "web")["status"]["phase"], "waiting");
    assert_eq!(load.seen("200 v2"), 0);
    register(h, "web", upstream("v2", false), "2");
    until(
        "the rollout to be promoted",
        Duration::from_secs(60),
        || rollout(h, "web")["status"]["phase"] == "promoted",
    );
    let r = rollout(h, "web");
    assert_eq!(
        actions(&r),
        ["advance@20", "advance@50", "advance@100", "promote@100"],
        "{r:#}"
    );
    // Each passed step recorded the figures it was judged on.
    for d in &r["status"]["decisions"].as_array().unwrap()[1..] {
        assert!(d["canary"]["requests"].as_u64().unwrap() >= 10, "{d}");
        assert_eq!(d["canary"]["failures"], 0, "{d}");
    }
    // Promoted: every request goes to version 2.
    let before = load.seen("200 v1");
    let v2 = load.seen("200 v2");
    until("only v2 to answer", WAIT, || load.seen("200 v2") >= v2 + 50);
    assert!(
        load.seen("200 v1") <= before + 2,
        "v1 still served after promotion"
    );
    let (ok, out, _) = meshwork(h, &["rollout", "list"]);
    assert!(
        ok && out.contains("promoted") && out.contains("100%"),
        "{out}"
    );
    drop(load);
}

#[test]
fn a_failing_new_version_is_rolled_back_by_the_analysis() {
    let dir = tempfile::tempdir().unwrap();
    let (s, gw) = setup(dir.path());
    let h = s.http.as_str();
    let load = Load::start(gw.clone());
    register(h, "web", upstream("v2", true), "2");
    // Registered before the rollout: until it starts, v2 takes its share.
    until("v2 to take traffic", WAIT, || load.seen("500 v2") > 0);
    let (ok, _, err) = meshwork(
        h,
        &[
            "rollout",
            "start",
            "web",
            "--to-version",
            "2",
            "--steps",
            "10,50,100",
            "--interval",
            "30s",
            "--min-requests",
            "10",
        ],
    );
    assert!(ok, "{err}");
    until("the rollout to roll back", Duration::from_secs(30), || {
        rollout(h, "web")["status"]["phase"] == "rolled_back"
    });
    let r = rollout(h, "web");
    assert_eq!(actions(&r), ["advance@10", "rollback@0"], "{r:#}");
    let d = &r["status"]["decisions"][1];
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .starts_with("error rate 100.00%"),
        "{d}"
    );
    // Rolled back long before the step's 30 s: on the numbers, not the clock.
    let took = d["at_ms"].as_u64().unwrap() - r["status"]["started_ms"].as_u64().unwrap();
    assert!(took < 30_000, "{took} ms");
    // From now on v2 gets nothing, though it is still registered.
    let (v1, bad) = (load.seen("200 v1"), load.seen("500 v2"));
    until("v1 to answer alone", WAIT, || {
        load.seen("200 v1") >= v1 + 100
    });
    assert!(
        load.seen("500 v2") <= bad + 2,
        "v2 still served after the rollback"
    );
    // A finished rollout refuses commands; removing it sends traffic to both again.
    let (ok, _, err) = meshwork(h, &["rollout", "promote", "web"]);
    assert!(!ok && err.contains("rolled_back"), "{err}");
    // v2 still runs: removing the rollout would send it traffic again.
    let (ok, _, err) = meshwork(h, &["rollout", "rm", "web"]);
    assert!(!ok && err.contains("still registered"), "{err}");
    let (ok, _, err) = meshwork(h, &["rollout", "rm", "web", "--force"]);
    assert!(ok, "{err}");
    let bad = load.seen("500 v2");
    until("v2 to take traffic again", WAIT, || {
        load.seen("500 v2") > bad
    });
    assert!(load.sent.load(Ordering::Relaxed) > 0);
    drop(load);
}

#[test]
fn a_pinned_request_reaches_the_new_version_before_any_traffic_shifts() {
    let dir = tempfile::tempdir().unwrap();
    let (s, gw) = setup(dir.path());
    let h = s.http.as_str();
    register(h, "web", upstream("v2", false), "2");
    // Waits for 5 healthy instances of v2 that never come: weight 0.
    let (ok, _, err) = meshwork(
        h,
        &[
            "rollout",
            "start",
            "web",
            "--to-version",
            "2",
            "--min-healthy",
            "5",
            "--pin-header",
            "x-canary=yes",
        ],
    );
    assert!(ok, "{err}");
    let pinned = |value: &str| {
        let head = format!("GET /api/x HTTP/1.1\r\nHost: web\r\nx-canary: {value}");
        http::raw(&gw, &head, "").unwrap().1
    };
    until("the pin to route to v2", WAIT, || {
        pinned("yes").ends_with("v2")
    });
    for _ in 0..20 {
        assert_eq!(http::get(&gw, "/api/x").unwrap(), (200, "v1".to_string()));
        assert!(pinned("no").ends_with("v1"));
    }
    // Paused and resumed by hand, the decisions name who.
    let (ok, _, err) = meshwork(h, &["rollout", "pause", "web"]);
    assert!(ok, "{err}");
    let (ok, _, err) = meshwork(h, &["rollout", "abort", "web"]);
    assert!(ok, "{err}");
    let r = rollout(h, "web");
    assert_eq!(actions(&r), ["pause@0", "rollback@0"]);
    assert_eq!(r["status"]["decisions"][1]["by"], "anonymous");
    // After a rollback the pin is over too.
    until("the pin to stop routing to v2", WAIT, || {
        pinned("yes").ends_with("v1")
    });
}
