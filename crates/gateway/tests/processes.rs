//! Faults with real upstream processes killed with SIGKILL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::*;

struct Proc {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Proc {
    fn spawn(name: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_meshwork-bench-upstream"))
            .args(["127.0.0.1:0", "13", name])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .unwrap()
            .parse()
            .unwrap();
        Self { child, addr }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn sigkill_one_of_three_upstream_processes_under_load() {
    let procs = [Proc::spawn("p0"), Proc::spawn("p1"), Proc::spawn("p2")];
    let routes = format!(
        r#"
        [[routes]]
        name = "lb"
        [routes.forward]
        upstreams = ["{}", "{}", "{}"]
        retry = {{ max_attempts = 3, initial_backoff_ms = 1, max_backoff_ms = 5 }}
        outlier = {{ consecutive_failures = 2, base_ejection_ms = 60000 }}
        "#,
        procs[0].addr, procs[1].addr, procs[2].addr
    );
    kill_one_of_three_under_load(procs, &routes, 800, true).await;
}

/// With the route's defaults (no `retry` settings, default outlier
/// detection) and ejections short enough that the dead endpoint comes back
/// on trial several times during the load: still no client sees an error.
#[tokio::test]
async fn sigkill_one_of_three_with_default_routes_and_trials() {
    let procs = [Proc::spawn("p0"), Proc::spawn("p1"), Proc::spawn("p2")];
    let routes = format!(
        r#"
        [[routes]]
        name = "lb"
        [routes.forward]
        upstreams = ["{}", "{}", "{}"]
        outlier = {{ base_ejection_ms = 50, max_ejection_ms = 50 }}
        "#,
        procs[0].addr, procs[1].addr, procs[2].addr
    );
    let gw = kill_one_of_three_under_load(procs, &routes, 1600, false).await;
    assert!(
        gw.gateway.upstreams()[0].ejections_total >= 2,
        "the dead endpoint failed its trials: {:?}",
        gw.gateway.upstreams()
    );
}

/// 8 clients send `total` GETs; the third process is SIGKILLed once it has
/// served some. Every request must succeed.
async fn kill_one_of_three_under_load(
    procs: [Proc; 3],
    routes: &str,
    total: u64,
    expect_ejected: bool,
) -> Gw {
    let gw = Gw::start(routes).await;
    let url = gw.url("/");
    let done = Arc::new(AtomicU64::new(0));
    let victim_hits = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let per_client = total / 8;
        let (url, done, errors, victim_hits) = (
            url.clone(),
            done.clone(),
            errors.clone(),
            victim_hits.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..per_client {
                let r = get(&c, &url).await;
                if r.status != 200 {
                    errors.lock().push(format!("{} {}", r.status, r.text()));
                } else if r.headers["x-upstream"] == "p2" {
                    victim_hits.fetch_add(1, Ordering::SeqCst);
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    until("load reaches the victim", WITHIN, async || {
        victim_hits.load(Ordering::SeqCst) >= 10
    })
    .await;
    let [p0, p1, mut p2] = procs;
    p2.child.kill().unwrap();
    p2.child.wait().unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), total);
    assert!(
        errors.lock().is_empty(),
        "client-visible errors: {:?}",
        errors.lock()
    );
    let snap = gw.gateway.upstreams();
    let dead = snap[0]
        .endpoints
        .iter()
        .find(|e| e.addr == p2.addr)
        .unwrap();
    if expect_ejected {
        assert!(dead.ejected, "{snap:?}");
    }
    assert!(dead.failures > 0, "the dead endpoint was tried: {snap:?}");
    drop((p0, p1));
    gw
}
