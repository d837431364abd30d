//! The SDK end to end over real sockets: a control plane (embedded store behind
//! an etcd endpoint, reached through a cuttable proxy), services served with
//! `Server`, and callers using the resilient client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::get;
use bytes::Bytes;
use common::ControlPlane;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use meshwork_coord::config::{ConfigKey, Format, Publish};
use meshwork_resilience::retry::RetryConfig;
use meshwork_sdk::client::Lb;
use meshwork_sdk::server::{Server, ServerOptions};
use meshwork_sdk::{CallError, Meshwork, Options, RequestContext, TargetPolicy};
use meshwork_telemetry::TraceContext;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(15);

async fn connect(cp: &ControlPlane, name: &str, f: impl FnOnce(Options) -> Options) -> Meshwork {
    let mut opts = Options::new(name, vec![cp.endpoint.clone()]).unwrap();
    opts.session_ttl = 2;
    Meshwork::connect(f(opts)).await.unwrap()
}

/// A running instance of a service; stops (gracefully) when `stop` is sent.
struct Instance {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
    mw: Meshwork,
}

impl Instance {
    async fn start(cp: &ControlPlane, service: &str, router: Router, opts: ServerOptions) -> Self {
        let mw = connect(cp, service, |o| o).await;
        let bound = Server::new(&mw, router, opts).bind().await.unwrap();
        let addr = bound.local_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            bound
                .run_until(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        let inst = Instance {
            addr,
            stop: Some(tx),
            done,
            mw,
        };
        inst.wait_registered(service).await;
        inst
    }

    async fn wait_registered(&self, service: &str) {
        let port = self.addr.port();
        timeout(WAIT, async {
            loop {
                let list = self.mw.instances(service).await.unwrap();
                if list.iter().any(|v| v.instance.spec.port == port) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("instance registered");
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.done.await.unwrap();
        self.mw.shutdown().await;
    }
}

/// Waits until `mw`'s copy of the registry lists `n` instances of `service`.
async fn wait_instances(mw: &Meshwork, service: &str, n: usize) {
    timeout(WAIT, async {
        while mw.instances(service).await.unwrap().len() < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the instances appear");
}

fn named(name: &'static str) -> Router {
    Router::new().route(
        "/who",
        get(move |headers: HeaderMap| async move {
            let tp = headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            format!("{name} {tp}")
        }),
    )
}

async fn raw_get(addr: std::net::SocketAddr, path: &str) -> (u16, HeaderMap, String) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let resp = client
        .get(format!("http://{addr}{path}").parse().unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn round_robin(o: Options, service: &str, f: impl FnOnce(&mut TargetPolicy)) -> Options {
    let mut p = TargetPolicy {
        lb: Lb::RoundRobin,
        ..TargetPolicy::default()
    };
    f(&mut p);
    o.target(service, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_balanced_and_continue_the_trace() {
    let cp = ControlPlane::start().await;
    let a = Instance::start(&cp, "inventory", named("a"), ServerOptions::default()).await;
    let b = Instance::start(&cp, "inventory", named("b"), ServerOptions::default()).await;
    let caller = connect(&cp, "order", |o| round_robin(o, "inventory", |_| {})).await;
    // Both instances are visible to the caller once its copy has them.
    wait_instances(&caller, "inventory", 2).await;

    let ctx = RequestContext {
        trace: TraceContext::new_root(),
        deadline: None,
    };
    let trace_id = ctx.trace.trace_id.clone();
    let http = caller.http().clone();
    let answers = ctx
        .scope(async move {
            let mut v = Vec::new();
            for _ in 0..10 {
                let r = http.get("inventory", "/who").await.unwrap();
                assert_eq!(r.status(), 200);
                v.push(String::from_utf8(r.body().to_vec()).unwrap());
            }
            v
        })
        .await;
    let from_a = answers.iter().filter(|s| s.starts_with("a ")).count();
    assert_eq!(from_a, 5, "round robin over two instances: {answers:?}");
    for a in &answers {
        let tp = a.split(' ').nth(1).unwrap();
        let t = TraceContext::parse(tp).expect("a valid traceparent reached the service");
        assert_eq!(t.trace_id, trace_id, "the caller's trace continues");
    }
    a.stop().await;
    b.stop().await;
    caller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instance_is_hidden_by_retries() {
    let cp = ControlPlane::start().await;
    let live = Instance::start(&cp, "inventory", named("live"), ServerOptions::default()).await;
    // An instance whose port refuses connections.
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    live.mw
        .register(meshwork_sdk::instance("127.0.0.1", dead_port).build())
        .await
        .unwrap();
    let caller = connect(&cp, "order", |o| round_robin(o, "inventory", |_| {})).await;
    wait_instances(&caller, "inventory", 2).await;
    for _ in 0..20 {
        let r = caller.http().get("inventory", "/who").await.unwrap();
        assert!(String::from_utf8_lossy(r.body()).starts_with("live"));
    }
    live.stop().await;
    caller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_open_the_breaker_and_the_fallback_answers() {
    let cp = ControlPlane::start().await;
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let failing = Router::new().route(
        "/charge",
        get(move || {
            h.fetch_add(1, Ordering::Relaxed);
            async { (http::StatusCode::SERVICE_UNAVAILABLE, "down") }
        }),
    );
    let payment = Instance::start(&cp, "payment", failing, ServerOptions::default()).await;
    let policy = |p: &mut TargetPolicy| {
        p.retry = RetryConfig {
            max_attempts: 1,
            ..RetryConfig::default()
        };
        p.breaker.consecutive_failures = Some(3);
        p.breaker.open_duration_ms = 60_000;
        p.outlier = None;
    };
    let caller = connect(&cp, "order", |o| round_robin(o, "payment", policy)).await;
    for _ in 0..3 {
        let r = caller.http().get("payment", "/charge").await.unwrap();
        assert_eq!(r.status(), 503, "the service's answer is passed on");
    }
    let err = caller.http().get("payment", "/charge").await.unwrap_err();
    assert!(matches!(err, CallError::CircuitOpen { .. }), "{err}");
    assert_eq!(err.code(), "circuit_open");
    assert_eq!(caller.http().breaker_state("payment").await, Some("open"));
    assert_eq!(
        hits.load(Ordering::Relaxed),
        3,
        "an open breaker fails fast"
    );

    // The same failures with a fallback: the caller gets the fallback's answer.
    let with_fallback = connect(&cp, "order", |o| {
        round_robin(o, "payment", |p| {
            policy(p);
            *p = p.clone().with_fallback(|e| {
                Some(
                    http::Response::builder()
                        .status(200)
                        .body(Bytes::from(format!("queued ({})", e.code())))
                        .unwrap(),
                )
            });
        })
    })
    .await;
    for _ in 0..3 {
        with_fallback
            .http()
            .get("payment", "/charge")
            .await
            .unwrap();
    }
    let r = with_fallback
        .http()
        .get("payment", "/charge")
        .await
        .unwrap();
    assert_eq!(r.body().as_ref(), b"queued (circuit_open)");
    payment.stop().await;
    caller.shutdown().await;
    with_fallback.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_error_never_takes_a_lone_instance_down() {
    let cp = ControlPlane::start().await;
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let h2 = hits.clone();
    let router = Router::new()
        .route(
            "/charge",
            get(move || {
                h.fetch_add(1, Ordering::Relaxed);
                async {
                    (
                        http::StatusCode::INTERNAL_SERVER_ERROR,
                        "card declined by rule",
                    )
                }
            }),
        )
        .route(
            "/maintenance",
            get(move || {
                h2.fetch_add(1, Ordering::Relaxed);
                async {
                    (
                        http::StatusCode::SERVICE_UNAVAILABLE,
                        "payments switched off",
                    )
                }
            }),
        )
        .route("/balance", get(|| async { "42" }));
    let payment = Instance::start(&cp, "payment", router, ServerOptions::default()).await;
    // Default breaker and outlier settings, no retries (to count calls).
    let caller = connect(&cp, "order", |o| {
        round_robin(o, "payment", |p| {
            p.retry.max_attempts = 1;
        })
    })
    .await;
    // A 500 is the handler's answer, not the instance failing: the breaker
    // stays closed however many there are.
    for _ in 0..20 {
        let r = caller.http().get("payment", "/charge").await.unwrap();
        assert_eq!(r.status(), 500);
    }
    assert_eq!(hits.load(Ordering::Relaxed), 20, "every call reached it");
    assert_eq!(caller.http().breaker_state("payment").await, Some("closed"));
    // 503s with the breaker set high: outlier ejection alone never takes
    // out the only instance.
    let lenient = connect(&cp, "order", |o| {
        round_robin(o, "payment", |p| {
            p.retry.max_attempts = 1;
            p.breaker.consecutive_failures = Some(1_000);
            p.breaker.failure_rate_threshold = None;
        })
    })
    .await;
    for _ in 0..20 {
        let r = lenient.http().get("payment", "/maintenance").await.unwrap();
        assert_eq!(r.status(), 503, "the instance's own answer");
    }
    assert_eq!(hits.load(Ordering::Relaxed), 40, "never ejected");
    let r = lenient.http().get("payment", "/balance").await.unwrap();
    assert_eq!(r.body().as_ref(), b"42");
    payment.stop().await;
    caller.shutdown().await;
    lenient.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_the_callers_deadline_bound_a_call() {
    let cp = ControlPlane::start().await;
    let seen = Arc::new(parking_lot::Mutex::new(Vec::<u64>::new()));
    let s = seen.clone();
    let stuck = Router::new().route(
        "/slow",
        get(move |headers: HeaderMap| {
            if let Some(ms) = headers
                .get("x-meshwork-deadline-ms")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
            {
                s.lock().push(ms);
            }
            // Never answers: only the caller's clock ends the call.
            std::future::pending::<String>()
        }),
    );
    let slow = Instance::start(&cp, "report", stuck, ServerOptions::default()).await;
    let caller = connect(&cp, "order", |o| {
        round_robin(o, "report", |p| {
            p.timeout_ms = 300;
            p.retry.max_attempts = 1;
        })
    })
    .await;
    let err = caller.http().get("report", "/slow").await.unwrap_err();
    assert!(matches!(err, CallError::Timeout { .. }), "{err}");

    // A caller with 100 ms left: the call ends then and the callee is told.
    let ctx = RequestContext {
        trace: TraceContext::new_root(),
        deadline: Some(tokio::time::Instant::now() + Duration::from_millis(100)),
    };
    let http = caller.http().clone();
    let err = ctx
        .scope(async move { http.get("report", "/slow").await })
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Timeout { .. }), "{err}");
    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 2, "both calls reached the service: {seen:?}");
    assert!(seen[0] <= 300 && seen[1] <= 100, "deadlines sent: {seen:?}");
    caller.shutdown().await;
    slow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_serves_from_the_local_copy_while_the_control_plane_is_away() {
    let cp = ControlPlane::start().await;
    let inv = Instance::start(&cp, "inventory", named("a"), ServerOptions::default()).await;
    let caller = connect(&cp, "order", |o| o).await;
    caller.http().get("inventory", "/who").await.unwrap();

    cp.cut();
    let mut up = caller.coord().control_plane();
    timeout(WAIT, async {
        while *up.borrow_and_update() {
            up.changed().await.unwrap();
        }
    })
    .await
    .expect("the SDK notices the control plane is gone");
    assert!(!caller.control_plane_reachable());
    for _ in 0..5 {
        let r = caller.http().get("inventory", "/who").await.unwrap();
        assert!(String::from_utf8_lossy(r.body()).starts_with("a "));
    }
    assert_eq!(caller.instances("inventory").await.unwrap().len(), 1);

    cp.restore();
    timeout(WAIT, async {
        while !*up.borrow_and_update() {
            up.changed().await.unwrap();
        }
    })
    .await
    .expect("the SDK reconnects");
    // The instance's own session was lost too: it is registered again.
    inv.wait_registered("inventory").await;
    caller.http().get("inventory", "/who").await.unwrap();
    inv.stop().await;
    caller.shutdown().await;
}

#[derive(Debug, serde::Deserialize, PartialEq)]
struct Features {
    payments_enabled: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_update_keeps_the_last_good_value() {
    let cp = ControlPlane::start().await;
    let mw = connect(&cp, "order", |o| o).await;
    let center = mw.coord().config().await.unwrap().clone();
    let key = ConfigKey::parse("shop/features/flags").unwrap();
    let publish = |content: &str| Publish {
        content: content.into(),
        format: Format::Json,
        author: "test".into(),
        description: String::new(),
        if_version: None,
        secret: None,
    };
    center
        .publish(&key, publish(r#"{"payments_enabled": true}"#))
        .await
        .unwrap();
    let mut flags = mw.config::<Features>("shop/features/flags").await.unwrap();
    assert_eq!(
        flags.current().as_deref(),
        Some(&Features {
            payments_enabled: true
        })
    );
    center
        .publish(&key, publish(r#"{"payments_enabled": false}"#))
        .await
        .unwrap();
    let next = timeout(WAIT, flags.changed()).await.unwrap().unwrap();
    assert!(!next.payments_enabled);
    // Valid JSON, wrong type: reported, the last good value stays.
    center
        .publish(&key, publish(r#"{"payments_enabled": "maybe"}"#))
        .await
        .unwrap();
    timeout(WAIT, async {
        while flags.last_error().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert!(!flags.current().unwrap().payments_enabled);
    assert!(flags.last_error().unwrap().contains("version 3"));
    mw.shutdown().await;
}

/// A secret entry reaches a service that holds the master key, decoded like
/// any other; a service without it keeps no value and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_config_opens_with_the_master_key_only() {
    use meshwork_coord::config::secret::{MasterKey, MasterKeys};
    let cp = ControlPlane::start().await;
    let master = MasterKey::from_text(&MasterKey::generate_text().unwrap()).unwrap();
    let keys = MasterKeys(vec![master]);
    let with_key = connect(&cp, "order", |mut o| {
        o.secret_keys = keys.clone();
        o
    })
    .await;
    let center = with_key.coord().config().await.unwrap().clone();
    let key = ConfigKey::parse("shop/features/flags").unwrap();
    center
        .publish(
            &key,
            Publish {
                content: r#"{"payments_enabled": true}"#.into(),
                format: Format::Json,
                author: "test".into(),
                description: String::new(),
                if_version: None,
                secret: Some(true),
            },
        )
        .await
        .unwrap();
    let flags = with_key
        .config::<Features>("shop/features/flags")
        .await
        .unwrap();
    assert_eq!(
        flags.current().as_deref(),
        Some(&Features {
            payments_enabled: true
        })
    );
    let without = connect(&cp, "payment", |o| o).await;
    let locked = without
        .config::<Features>("shop/features/flags")
        .await
        .unwrap();
    assert!(locked.current().is_none());
    let why = locked.last_error().unwrap();
    assert!(why.contains("no secrets master key"), "{why}");
    with_key.shutdown().await;
    without.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_limits_reports_health_and_leaves_rotation_on_shutdown() {
    let cp = ControlPlane::start().await;
    let opts = ServerOptions {
        rate_limit: Some(meshwork_resilience::limit::rate::GcraConfig {
            rate_per_sec: 0.01,
            burst: 2,
        }),
        ..ServerOptions::default()
    };
    let inv = Instance::start(&cp, "inventory", named("a"), opts).await;
    assert_eq!(raw_get(inv.addr, "/who").await.0, 200);
    assert_eq!(raw_get(inv.addr, "/who").await.0, 200);
    let (status, headers, body) = raw_get(inv.addr, "/who").await;
    assert_eq!(status, 429, "{body}");
    assert!(headers.contains_key("retry-after"));
    assert!(body.contains("rate_limited"));
    // Health and metrics are not rate limited.
    assert_eq!(raw_get(inv.addr, "/health").await.0, 200);
    let (status, _, metrics) = raw_get(inv.addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("meshwork_sdk_server_requests_total"),
        "{metrics}"
    );

    let watcher = connect(&cp, "order", |o| o).await;
    assert_eq!(watcher.instances("inventory").await.unwrap().len(), 1);
    inv.stop().await;
    timeout(WAIT, async {
        while !watcher.instances("inventory").await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a stopped server is deregistered");
    watcher.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_election_and_ids() {
    let cp = ControlPlane::start().await;
    let a = connect(&cp, "order", |o| o).await;
    let b = connect(&cp, "order", |o| o).await;
    let guard = a.lock("sweeper", None).await.unwrap();
    let busy = b.lock("sweeper", Some(Duration::from_millis(200))).await;
    assert!(
        matches!(busy, Err(meshwork_sdk::Error::Coord(_))),
        "a held lock is not taken twice"
    );
    let token = guard.fencing_token();
    drop(guard);
    let second = timeout(WAIT, b.lock("sweeper", None))
        .await
        .unwrap()
        .unwrap();
    assert!(second.fencing_token() > token, "tokens increase");
    second.release().await.unwrap();

    let lead = a.campaign("leader", "a", None).await.unwrap();
    assert!(
        b.campaign("leader", "b", Some(Duration::from_millis(200)))
            .await
            .is_err()
    );
    assert!(lead.resign().await.unwrap());
    let lead_b = timeout(WAIT, b.campaign("leader", "b", None))
        .await
        .unwrap()
        .unwrap();
    lead_b.proclaim("b2").await.unwrap();

    let ids = a.ids(1000).await.unwrap();
    let more = b.ids(1000).await.unwrap();
    let mut all: Vec<i64> = ids.iter().chain(more.iter()).copied().collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 2000, "ids are unique across processes");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_channel_reaches_a_tonic_service_found_in_the_registry() {
    use meshwork_etcd::proto::etcdserverpb::{PutRequest, RangeRequest, kv_client::KvClient};
    let cp = ControlPlane::start().await;
    // The control plane's own etcd endpoint is a tonic service: register it.
    let mw = connect(&cp, "order", |o| o).await;
    let direct: std::net::SocketAddr = cp.direct.parse().unwrap();
    let mut spec = meshwork_sdk::instance("127.0.0.1", direct.port()).build();
    spec.protocol = meshwork_coord::registry::Protocol::Grpc;
    mw.coord().register("etcd", spec).await.unwrap();
    let channel = mw.grpc_channel("etcd").await.unwrap();
    let mut kv = KvClient::new(channel);
    kv.put(PutRequest {
        key: Bytes::from_static(b"k"),
        value: Bytes::from_static(b"v"),
        ..Default::default()
    })
    .await
    .unwrap();
    let got = kv
        .range(RangeRequest {
            key: Bytes::from_static(b"k"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.kvs[0].value.as_ref(), b"v");
    mw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_follow_a_rollouts_split_between_versions() {
    use meshwork_coord::rollout::{
        Analysis, Pin, PinKind, Rollouts, Spec, Strategy, machine::Command,
    };
    let cp = ControlPlane::start().await;
    let with_version = |v: &str| ServerOptions {
        version: v.to_string(),
        ..ServerOptions::default()
    };
    let v1 = Instance::start(&cp, "inventory", named("v1"), with_version("1")).await;
    let v2 = Instance::start(&cp, "inventory", named("v2"), with_version("2")).await;
    let caller = connect(&cp, "order", |o| round_robin(o, "inventory", |_| {})).await;
    wait_instances(&caller, "inventory", 2).await;
    let who = |headers: Option<(&'static str, &'static str)>| {
        let http = caller.http().clone();
        async move {
            let mut req = http::Request::get("/who").body(Bytes::new()).unwrap();
            if let Some((k, v)) = headers {
                req.headers_mut().insert(k, v.parse().unwrap());
            }
            let r = http.call("inventory", req).await.unwrap();
            String::from_utf8(r.body().to_vec()).unwrap()
        }
    };
    // No rollout: both versions take turns.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(who(None).await[..2].to_string());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // A rollout to v2 waiting at 0 %, with a cookie pin: only pinned calls reach v2.
    let rollouts = Rollouts::open(caller.coord().backend()).await.unwrap();
    rollouts
        .start(Spec {
            service: "inventory".into(),
            to_version: "2".into(),
            strategy: Strategy::Canary,
            steps: vec![50, 100],
            interval_ms: 3_600_000,
            analysis: Analysis::default(),
            auto_rollback: true,
            min_healthy: 5,
            deadline_ms: 3_600_000,
            pin: Some(Pin {
                kind: PinKind::Cookie,
                name: "beta".into(),
                value: "yes".into(),
            }),
        })
        .await
        .unwrap();
    // The caller's copy follows the store within a watch round trip.
    timeout(WAIT, async {
        while !who(Some(("cookie", "a=1; beta=yes")))
            .await
            .starts_with("v2")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the pinned call to reach v2");
    for _ in 0..10 {
        assert!(who(None).await.starts_with("v1"));
        assert!(who(Some(("cookie", "beta=no"))).await.starts_with("v1"));
    }
    // The caller publishes its figures by version for the rollout's analysis.
    timeout(WAIT, async {
        loop {
            let f = rollouts.figures("inventory").await.unwrap();
            if f.iter()
                .any(|f| f.canary.requests >= 1 && f.stable.requests >= 20)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the caller's figures in the store");
    // Promoted: every call goes to v2.
    rollouts
        .command("inventory", Command::Promote { full: true }, "test")
        .await
        .unwrap();
    timeout(WAIT, async {
        while !who(None).await.starts_with("v2") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("calls to move to v2");
    for _ in 0..10 {
        assert!(who(None).await.starts_with("v2"));
    }
    v1.stop().await;
    v2.stop().await;
    caller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_call_leaves_a_failing_new_version_for_the_stable_one() {
    use meshwork_coord::rollout::{
        Analysis, Pin, PinKind, Rollouts, Spec, Strategy, machine::Command,
    };
    let cp = ControlPlane::start().await;
    let hits = Arc::new(AtomicUsize::new(0));
    let failing = {
        let hits = hits.clone();
        Router::new().route(
            "/who",
            get(move || {
                let hits = hits.clone();
                async move {
                    hits.fetch_add(1, Ordering::Relaxed);
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "v2 down")
                }
            }),
        )
    };
    let with_version = |v: &str| ServerOptions {
        version: v.to_string(),
        ..ServerOptions::default()
    };
    let v1 = Instance::start(&cp, "inventory", named("v1"), with_version("1")).await;
    let v2 = Instance::start(&cp, "inventory", failing, with_version("2")).await;
    // Outlier ejection off: v2 keeps its place, so every pinned call tries it.
    let caller = connect(&cp, "order", |o| {
        round_robin(o, "inventory", |p| p.outlier = None)
    })
    .await;
    wait_instances(&caller, "inventory", 2).await;
    // At 10 %, with a header pin: a pinned call's first try goes to v2.
    let rollouts = Rollouts::open(caller.coord().backend()).await.unwrap();
    rollouts
        .start(Spec {
            service: "inventory".into(),
            to_version: "2".into(),
            strategy: Strategy::Canary,
            steps: vec![10, 100],
            interval_ms: 3_600_000,
            analysis: Analysis::default(),
            auto_rollback: false,
            min_healthy: 1,
            deadline_ms: 3_600_000,
            pin: Some(Pin {
                kind: PinKind::Header,
                name: "x-canary".into(),
                value: "1".into(),
            }),
        })
        .await
        .unwrap();
    rollouts
        .command("inventory", Command::Promote { full: false }, "test")
        .await
        .unwrap();
    let http = caller.http().clone();
    let pinned = || async {
        let mut req = http::Request::get("/who").body(Bytes::new()).unwrap();
        req.headers_mut().insert("x-canary", "1".parse().unwrap());
        http.call("inventory", req).await.unwrap()
    };
    // Once the caller follows the rollout, each pinned call tries v2 first...
    timeout(WAIT, async {
        while hits.load(Ordering::Relaxed) == 0 {
            pinned().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a pinned call to reach v2");
    // ...and its retry goes to v1: every call answers, v2 tried once each.
    let before = hits.load(Ordering::Relaxed);
    for _ in 0..10 {
        let r = pinned().await;
        assert_eq!(r.status(), 200);
        assert!(r.body().starts_with(b"v1"), "{:?}", r.body());
    }
    assert_eq!(hits.load(Ordering::Relaxed) - before, 10);
    v1.stop().await;
    v2.stop().await;
    caller.shutdown().await;
}
