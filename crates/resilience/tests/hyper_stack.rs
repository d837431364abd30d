//! Layers composed over real hyper servers on 127.0.0.1: timeout, retry,
//! P2C balancing and a breaker per endpoint, with one backend failing.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report we want

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshwork_resilience::BoxError;
use meshwork_resilience::balance::{Balance, Change, P2c, channel};
use meshwork_resilience::breaker::{Breaker, BreakerConfig, BreakerLayer, State};
use meshwork_resilience::classify::HttpServerErrors;
use meshwork_resilience::outlier::{OutlierConfig, OutlierDetector};
use meshwork_resilience::retry::{RetryConfig, RetryHttp, RetryLayer};
use meshwork_resilience::timeout::{DEADLINE_HEADER, TimeoutConfig, TimeoutLayer};
use parking_lot::Mutex;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

/// Starts a backend answering with `status`; counts the requests it serves.
async fn backend(status: u16, delay: Duration) -> (SocketAddr, Arc<AtomicU32>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU32::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    h.fetch_add(1, Ordering::SeqCst);
                    let deadline = req.headers().get(DEADLINE_HEADER).cloned();
                    async move {
                        tokio::time::sleep(delay).await;
                        let mut resp = hyper::Response::builder().status(status);
                        if let Some(d) = deadline {
                            resp = resp.header("x-seen-deadline-ms", d);
                        }
                        Ok::<_, Infallible>(
                            resp.body(Full::new(Bytes::from(addr.port().to_string())))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

/// A tower service reaching one backend through a shared hyper client.
#[derive(Clone)]
struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
}

impl Service<http::Request<Bytes>> for Upstream {
    type Response = http::Response<Bytes>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Bytes>) -> Self::Future {
        let client = self.client.clone();
        let addr = self.addr;
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            parts.uri = format!("http://{addr}{}", parts.uri.path()).parse()?;
            let resp = client
                .request(http::Request::from_parts(parts, Full::new(body)))
                .await?;
            let (parts, body) = resp.into_parts();
            Ok(http::Response::from_parts(
                parts,
                body.collect().await?.to_bytes(),
            ))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_retry_timeout_p2c_over_three_real_backends() {
    // The failing backend answers fastest, so P2C (latency-driven) prefers
    // it whenever it is one of the two candidates: the worst case for a
    // balancer, which the breaker, the outlier detector and retries handle.
    let (a, hits_a) = backend(200, Duration::from_millis(2)).await;
    let (b, hits_b) = backend(200, Duration::from_millis(2)).await;
    let (bad, hits_bad) = backend(503, Duration::ZERO).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();

    let breaker_cfg = BreakerConfig {
        consecutive_failures: Some(3),
        failure_rate_threshold: None,
        open_duration_ms: 60_000,
        ..Default::default()
    };
    let (tx, changes) = channel();
    let mut breakers = Vec::new();
    for addr in [a, b, bad] {
        let breaker = Breaker::new(BreakerConfig {
            name: addr.to_string(),
            ..breaker_cfg.clone()
        })
        .unwrap();
        breakers.push(breaker.clone());
        let svc = BreakerLayer::with_classifier(breaker, HttpServerErrors).layer(Upstream {
            client: client.clone(),
            addr,
        });
        tx.send(Change::Insert {
            key: addr,
            service: svc,
            weight: 1,
        })
        .unwrap();
    }
    // Failures (503s, then fast CircuitOpen rejections) eject the endpoint,
    // so P2C stops choosing it for its low latency.
    let detector = Arc::new(Mutex::new(
        OutlierDetector::new(OutlierConfig {
            consecutive_failures: Some(4),
            success_rate: None,
            ..Default::default()
        })
        .unwrap(),
    ));
    let balance = Balance::new(changes, P2c::default())
        .with_default_rtt(Duration::ZERO)
        .with_outlier_detection(detector.clone(), HttpServerErrors);
    // Up to 4 attempts can hit the bad endpoint before it is ejected.
    let retry = RetryConfig {
        max_attempts: 6,
        initial_backoff_ms: 1,
        max_backoff_ms: 5,
        ..Default::default()
    };
    let stack = ServiceBuilder::new()
        .layer(TimeoutLayer::new(TimeoutConfig { timeout_ms: 2_000 }).unwrap())
        .layer(RetryLayer::new(retry, RetryHttp::default()).unwrap())
        .buffer(64)
        .service(balance);

    let mut ok = 0;
    for _ in 0..200 {
        let req = http::Request::builder()
            .uri("/hello")
            .body(Bytes::new())
            .unwrap();
        match stack.clone().oneshot(req).await {
            Ok(resp) if resp.status() == 200 => {
                ok += 1;
                let seen: u64 = resp.headers()["x-seen-deadline-ms"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(seen <= 2_000 && seen > 1_000, "deadline propagated: {seen}");
            }
            other => panic!("request failed: {:?}", other.map(|r| r.status())),
        }
    }
    eprintln!(
        "hits: a={} b={} bad={}",
        hits_a.load(Ordering::SeqCst),
        hits_b.load(Ordering::SeqCst),
        hits_bad.load(Ordering::SeqCst)
    );
    assert_eq!(ok, 200, "retries route around the failing backend");
    assert_eq!(
        breakers[2].state(),
        State::Open,
        "the failing backend's breaker opened"
    );
    assert_eq!(
        hits_bad.load(Ordering::SeqCst),
        3,
        "the open breaker keeps calls off the failing backend"
    );
    assert!(
        detector
            .lock()
            .is_ejected(&bad, tokio::time::Instant::now())
    );
    assert_eq!(breakers[0].state(), State::Closed);
    let good = hits_a.load(Ordering::SeqCst) + hits_b.load(Ordering::SeqCst);
    assert_eq!(good, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_cuts_a_slow_real_backend() {
    let (slow, _) = backend(200, Duration::from_millis(500)).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let svc = TimeoutLayer::new(TimeoutConfig { timeout_ms: 50 })
        .unwrap()
        .layer(Upstream { client, addr: slow });
    let req = http::Request::builder()
        .uri("/")
        .body(Bytes::new())
        .unwrap();
    let err = svc.oneshot(req).await.unwrap_err();
    assert!(err.is::<meshwork_resilience::Elapsed>(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_and_bulkhead_degrade_to_fallback_over_a_real_backend() {
    use meshwork_resilience::fallback::{FallbackLayer, Rejection};
    use meshwork_resilience::limit::concurrency::{BulkheadConfig, BulkheadLayer};
    use meshwork_resilience::limit::rate::{GcraConfig, RateLimitLayer};

    let (addr, hits) = backend(200, Duration::from_millis(50)).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let degraded = tower::service_fn(|_r: Rejection| async {
        Ok::<_, Infallible>(
            http::Response::builder()
                .status(200)
                .body(Bytes::from_static(b"degraded"))
                .unwrap(),
        )
    });
    let stack = ServiceBuilder::new()
        .layer(FallbackLayer::new(degraded))
        .layer(
            RateLimitLayer::gcra(GcraConfig {
                rate_per_sec: 1.0,
                burst: 6,
            })
            .unwrap(),
        )
        .layer(
            BulkheadLayer::new(BulkheadConfig {
                max_in_flight: 2,
                max_queued: 1,
                max_wait_ms: 10,
            })
            .unwrap(),
        )
        .service(Upstream { client, addr });
    // 10 concurrent calls: 6 pass the rate limit, of which 2 run, 1 queues
    // (and times out after 10 ms), 3 are turned away by the bulkhead.
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let svc = stack.clone();
            tokio::spawn(async move {
                let req = http::Request::builder()
                    .uri("/")
                    .body(Bytes::new())
                    .unwrap();
                svc.oneshot(req).await.unwrap().into_body()
            })
        })
        .collect();
    let mut served = 0;
    let mut degraded_count = 0;
    for c in calls {
        if &c.await.unwrap()[..] == b"degraded" {
            degraded_count += 1;
        } else {
            served += 1;
        }
    }
    assert_eq!(served + degraded_count, 10, "every caller got an answer");
    assert_eq!(
        served, 2,
        "only the bulkhead's two slots reached the backend"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}
