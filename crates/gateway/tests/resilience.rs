//! Faults: dead upstreams, failing upstreams, slow upstreams, reloads under
//! load, rate limits and bulkheads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::*;
use meshwork_gateway::RouteSet;

#[tokio::test]
async fn killing_one_of_three_upstreams_under_load_is_invisible_to_clients() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let victim = Upstream::start("victim").await;
    let routes = format!(
        r#"
        [[routes]]
        name = "lb"
        [routes.forward]
        upstreams = ["{}", "{}", "{}"]
        retry = {{ max_attempts = 3, initial_backoff_ms = 1, max_backoff_ms = 5 }}
        outlier = {{ consecutive_failures = 2, base_ejection_ms = 60000 }}
        "#,
        a.addr, b.addr, victim.addr
    );
    let gw = Gw::start(&routes).await;
    let url = gw.url("/");
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (url, done, errors) = (url.clone(), done.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..100 {
                let r = get(&c, &url).await;
                if r.status != 200 {
                    errors.lock().push(format!("{} {}", r.status, r.text()));
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    until("load under way", WITHIN, async || victim.hits() >= 20).await;
    victim.kill().await;
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), 800);
    assert!(
        errors.lock().is_empty(),
        "client-visible errors: {:?}",
        errors.lock()
    );
    let ups = gw.gateway.upstreams();
    let ejected: Vec<_> = ups[0].endpoints.iter().filter(|e| e.ejected).collect();
    assert_eq!(ejected.len(), 1, "{ups:?}");
}

fn breaker_routes(addr: std::net::SocketAddr, open_duration_ms: u64) -> String {
    format!(
        r#"
        [[routes]]
        name = "br"
        [routes.forward]
        upstreams = ["{addr}"]
        outlier_detection = false
        breaker = {{ consecutive_failures = 3, failure_rate_threshold = 0.5, minimum_calls = 100, open_duration_ms = {open_duration_ms}, half_open_max_probes = 1 }}
        "#
    )
}

/// Three failures open the breaker; while open, requests fail fast with 503.
/// The open duration is five minutes (the longest a breaker allows by
/// default), so nothing but the failures decides what the fourth request
/// sees, however slow the machine.
#[tokio::test]
async fn breaker_opens_when_all_fail() {
    let up = Upstream::start("a").await;
    let gw = Gw::start(&breaker_routes(up.addr, 300_000)).await;
    let c = client();
    assert_eq!(get(&c, &gw.url("/")).await.status, 200);
    up.kill().await;
    for _ in 0..3 {
        let r = get(&c, &gw.url("/")).await;
        assert_eq!(r.status, 502);
        assert_eq!(r.code(), "upstream_unavailable");
    }
    let r = get(&c, &gw.url("/")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.code(), "breaker_open");
    assert!(r.headers.contains_key("retry-after"));
    let info = gw.gateway.route_info();
    assert_eq!(info[0].breakers, vec![("default".to_owned(), "open")]);
}

/// After its open duration the breaker lets a probe through and closes when
/// the upstream is back: observed as answers turning 200, with no assumption
/// about how fast the machine is.
#[tokio::test]
async fn breaker_recovers_when_the_upstream_returns() {
    let up = Upstream::start("a").await;
    let addr = up.addr;
    let gw = Gw::start(&breaker_routes(addr, 200)).await;
    let c = client();
    assert_eq!(get(&c, &gw.url("/")).await.status, 200);
    up.kill().await;
    for _ in 0..3 {
        assert_ne!(get(&c, &gw.url("/")).await.status, 200);
    }
    let up = Upstream::start_on(addr, "a").await;
    until("breaker closes", WITHIN, async || {
        get(&c, &gw.url("/")).await.status == 200
    })
    .await;
    assert_eq!(get(&c, &gw.url("/")).await.status, 200);
    assert_eq!(
        gw.gateway.route_info()[0].breakers,
        vec![("default".to_owned(), "closed")]
    );
    drop(up);
}

#[tokio::test]
async fn slow_upstream_times_out_with_504() {
    let up = Upstream::start("a").await;
    let routes = format!(
        "[[routes]]\nname = \"t\"\n[routes.forward]\nupstreams = [\"{}\"]\ntimeout_ms = 150\n",
        up.addr
    );
    let gw = Gw::start(&routes).await;
    let r = get(&client(), &gw.url("/hold")).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.code(), "upstream_timeout");
    up.release.notify_waiters();
}

#[tokio::test]
async fn per_try_timeout_retries_elsewhere() {
    let slow = Upstream::start("slow").await;
    let fast = Upstream::start("fast").await;
    let routes = format!(
        r#"
        [[routes]]
        name = "t"
        [routes.forward]
        upstreams = ["{}", "{}"]
        lb = {{ policy = "wrr" }}
        per_try_timeout_ms = 100
        timeout_ms = 10000
        retry = {{ max_attempts = 2, initial_backoff_ms = 1, max_backoff_ms = 1 }}
        "#,
        slow.addr, fast.addr
    );
    let gw = Gw::start(&routes).await;
    let c = client();
    // "slow" never answers /hold-if/slow; every request that tries it times
    // out after 100 ms and is retried on "fast".
    for _ in 0..4 {
        let r = get(&c, &gw.url("/hold-if/slow")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["upstream"], "fast");
    }
    assert!(slow.hits() > 0, "the slow endpoint was tried");
    slow.release.notify_waiters();
}

#[tokio::test]
async fn route_reload_under_load_drops_nothing() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let set = |addr: std::net::SocketAddr, extra: &str| {
        RouteSet::from_toml(&format!(
            "[[routes]]\nname = \"r\"\n[routes.forward]\nupstreams = [\"{addr}\"]\n{extra}\n"
        ))
        .unwrap()
    };
    let gw = Gw::start(&format!(
        "[[routes]]\nname = \"r\"\n[routes.forward]\nupstreams = [\"{}\"]\n",
        a.addr
    ))
    .await;
    let url = gw.url("/");
    let failures = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (url, failures, done) = (url.clone(), failures.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..150 {
                if get(&c, &url).await.status != 200 {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let mut applied = 0;
    while done.load(Ordering::SeqCst) < 900 && applied < 200 {
        let (addr, extra) = if applied % 2 == 0 {
            (b.addr, "strip_prefix = \"/x\"")
        } else {
            (a.addr, "")
        };
        gw.gateway.apply(set(addr, extra)).await.unwrap();
        applied += 1;
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(applied > 2);
    assert_eq!(failures.load(Ordering::SeqCst), 0);
    assert!(a.hits() > 0 && b.hits() > 0);
}

#[tokio::test]
async fn rate_limits_per_route_ip_header_and_cluster() {
    let gw = Gw::start(
        r#"
        [[routes]]
        name = "route"
        match = { path = { prefix = "/route" } }
        respond = { body = "ok" }
        rate_limits = [{ by = "route", rate_per_sec = 0.001, burst = 2 }]

        [[routes]]
        name = "ip"
        match = { path = { prefix = "/ip" } }
        respond = { body = "ok" }
        rate_limits = [{ by = "client_ip", rate_per_sec = 0.001, burst = 1 }]

        [[routes]]
        name = "header"
        match = { path = { prefix = "/header" } }
        respond = { body = "ok" }
        rate_limits = [{ by = "header", header = "x-tenant", rate_per_sec = 0.001, burst = 1 }]

        [[routes]]
        name = "cluster"
        match = { path = { prefix = "/cluster" } }
        respond = { body = "ok" }
        rate_limits = [{ by = "route", rate_per_sec = 0.001, burst = 1, cluster = true }]
        "#,
    )
    .await;
    let c = client();
    assert_eq!(get(&c, &gw.url("/route")).await.status, 200);
    assert_eq!(get(&c, &gw.url("/route")).await.status, 200);
    let r = get(&c, &gw.url("/route")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.code(), "rate_limited");
    assert!(
        r.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(get(&c, &gw.url("/ip")).await.status, 200);
    assert_eq!(get(&c, &gw.url("/ip")).await.status, 429);
    let tenant = |t: &str| {
        req("GET", &gw.url("/header"))
            .header("x-tenant", t)
            .body(empty())
            .unwrap()
    };
    assert_eq!(send(&c, tenant("a")).await.status, 200);
    assert_eq!(send(&c, tenant("a")).await.status, 429);
    assert_eq!(
        send(&c, tenant("b")).await.status,
        200,
        "keys are independent"
    );
    assert_eq!(
        get(&c, &gw.url("/header")).await.status,
        200,
        "no key, no limit"
    );
    assert_eq!(get(&c, &gw.url("/cluster")).await.status, 200);
    assert_eq!(get(&c, &gw.url("/cluster")).await.status, 429);
    let stats = gw.gateway.route_info();
    let route = stats.iter().find(|r| r.name == "route").unwrap();
    assert_eq!(route.counters.rate_limited, 1);
    assert_eq!(route.counters.status_classes[3], 1);
    // A reload with the same limit keeps the bucket (no fresh burst).
    gw.gateway.apply(gw.gateway.routes()).await.unwrap();
    assert_eq!(get(&c, &gw.url("/route")).await.status, 429);
}

#[tokio::test]
async fn bulkhead_rejects_beyond_its_limit() {
    let up = Upstream::start("a").await;
    let routes = format!(
        r#"
        [[routes]]
        name = "b"
        [routes.forward]
        upstreams = ["{}"]
        bulkhead = {{ max_in_flight = 1, max_queued = 0 }}
        "#,
        up.addr
    );
    let gw = Gw::start(&routes).await;
    let url = gw.url("/hold");
    let held = tokio::spawn(async move { get(&client(), &url).await.status });
    until("first request held", WITHIN, async || up.hits() == 1).await;
    let r = get(&client(), &gw.url("/x")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.code(), "overloaded");
    up.release.notify_waiters();
    assert_eq!(held.await.unwrap(), 200);
    assert_eq!(get(&client(), &gw.url("/x")).await.status, 200);
}
