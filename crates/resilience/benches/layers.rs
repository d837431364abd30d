//! Per-call overhead of each layer, uncontended and with 2 threads
//! contending, side by side with `governor` and tower's own middleware.
//!
//! Run: `cargo bench -p meshwork-resilience -- --warm-up-time 1 --measurement-time 2`

#![allow(clippy::unwrap_used)] // benchmark setup: a panic is the failure report we want

use std::future::Future;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::pin::pin;
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant as StdInstant};

use criterion::{Criterion, criterion_group, criterion_main};
use meshwork_resilience::BoxError;
use meshwork_resilience::balance::{Balance, Change, P2c};
use meshwork_resilience::breaker::{BreakerConfig, BreakerCore, BreakerLayer};
use meshwork_resilience::classify::Outcome;
use meshwork_resilience::limit::concurrency::{BulkheadConfig, BulkheadLayer};
use meshwork_resilience::limit::rate::{Gcra, GcraConfig, RateLimitLayer};
use meshwork_resilience::retry::{RetryConfig, RetryErrors, RetryLayer};
use meshwork_resilience::timeout::{TimeoutConfig, TimeoutLayer};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder};

/// Polls a future that must complete at once.
fn now_or_panic<F: Future>(f: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(f).poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("benchmark future did not complete at once"),
    }
}

/// One request through a service: poll_ready, call, poll the response.
fn one<S: Service<u64>>(svc: &mut S) -> Result<S::Response, S::Error> {
    let mut cx = Context::from_waker(Waker::noop());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        Poll::Ready(Err(e)) => return Err(e),
        Poll::Pending => panic!("not ready"),
    }
    now_or_panic(svc.call(black_box(1)))
}

/// The cheapest inner service: answers at once.
fn echo()
-> impl Service<u64, Response = u64, Error = BoxError, Future: Send> + Clone + Send + Sync + 'static
{
    tower::service_fn(|x: u64| std::future::ready(Ok::<_, BoxError>(x)))
}

/// Runs `op` `iters` times on each of 2 threads at once; time per call.
fn contended<T: Send>(
    iters: u64,
    make: impl Fn() -> T + Sync,
    op: impl Fn(&mut T) + Sync,
) -> Duration {
    let barrier = Barrier::new(2);
    let times: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let (barrier, make, op) = (&barrier, &make, &op);
                s.spawn(move || {
                    let mut state = make();
                    barrier.wait();
                    let start = StdInstant::now();
                    for _ in 0..iters {
                        op(&mut state);
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .collect()
    });
    times.into_iter().max().unwrap_or_default()
}

fn gcra(c: &mut Criterion) {
    let mut g = c.benchmark_group("gcra");
    let ours = Arc::new(
        Gcra::new(
            GcraConfig {
                rate_per_sec: 1e9,
                burst: 1_000_000,
            },
            Instant::now(),
        )
        .unwrap(),
    );
    let quota = governor::Quota::per_second(NonZeroU32::new(1_000_000_000).unwrap())
        .allow_burst(NonZeroU32::new(1_000_000).unwrap());
    let theirs = Arc::new(governor::RateLimiter::direct(quota));
    g.bench_function("meshwork/uncontended", |b| {
        b.iter(|| black_box(ours.check(Instant::now()).is_ok()))
    });
    g.bench_function("governor/uncontended", |b| {
        b.iter(|| black_box(theirs.check().is_ok()))
    });
    // The core alone, time supplied by the caller (as a gateway that reads
    // the clock once per request would): a fresh limiter, time advancing.
    let core = Gcra::new(
        GcraConfig {
            rate_per_sec: 1e9,
            burst: 1_000_000,
        },
        Instant::now(),
    )
    .unwrap();
    let base = Instant::now();
    let mut tick = 0u64;
    g.bench_function("meshwork-core-caller-clock/uncontended", |b| {
        b.iter(|| {
            tick += 10;
            black_box(core.check(base + Duration::from_nanos(tick)).is_ok())
        })
    });
    g.bench_function("meshwork/2-threads", |b| {
        b.iter_custom(|n| {
            contended(
                n,
                || ours.clone(),
                |l| {
                    black_box(l.check(Instant::now()).is_ok());
                },
            )
        })
    });
    g.bench_function("governor/2-threads", |b| {
        b.iter_custom(|n| {
            contended(
                n,
                || theirs.clone(),
                |l| {
                    black_box(l.check().is_ok());
                },
            )
        })
    });
    g.finish();
}

fn breaker(c: &mut Criterion) {
    let mut g = c.benchmark_group("breaker");
    let cfg = BreakerConfig {
        consecutive_failures: Some(5),
        failure_rate_threshold: None,
        ..Default::default()
    };
    let core = Arc::new(BreakerCore::new(cfg.clone(), Instant::now()).unwrap());
    let now = Instant::now();
    g.bench_function("core-acquire+record/uncontended", |b| {
        b.iter(|| {
            let p = core.try_acquire(now).unwrap();
            black_box(core.record(p, Outcome::Success, Duration::ZERO, now))
        })
    });
    let mut bare = echo();
    g.bench_function("baseline-bare-service/uncontended", |b| {
        b.iter(|| one(&mut bare).unwrap())
    });
    let layer = BreakerLayer::new(cfg.clone()).unwrap();
    let mut svc = layer.layer(echo());
    g.bench_function("service/uncontended", |b| b.iter(|| one(&mut svc).unwrap()));
    g.bench_function("service/2-threads", |b| {
        b.iter_custom(|n| contended(n, || layer.layer(echo()), |s| assert!(one(s).is_ok())))
    });
    let windowed = BreakerConfig {
        failure_rate_threshold: Some(0.5),
        ..cfg
    };
    let layer_w = BreakerLayer::new(windowed).unwrap();
    let mut svc_w = layer_w.layer(echo());
    g.bench_function("service-with-count-window/uncontended", |b| {
        b.iter(|| one(&mut svc_w).unwrap())
    });
    g.finish();
}

fn rate_limit_service(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("rate-limit-service");
    let layer = RateLimitLayer::gcra(GcraConfig {
        rate_per_sec: 1e9,
        burst: 1_000_000,
    })
    .unwrap();
    let mut ours = layer.layer(echo());
    g.bench_function("meshwork/uncontended", |b| {
        b.iter(|| one(&mut ours).unwrap())
    });
    let mut theirs =
        tower::limit::RateLimitLayer::new(1_000_000_000, Duration::from_secs(1)).layer(echo());
    g.bench_function("tower-RateLimit/uncontended", |b| {
        b.iter(|| one(&mut theirs).unwrap())
    });
    g.finish();
}

fn concurrency(c: &mut Criterion) {
    let mut g = c.benchmark_group("concurrency-limit");
    let layer = BulkheadLayer::new(BulkheadConfig {
        max_in_flight: 1000,
        max_queued: 0,
        max_wait_ms: 0,
    })
    .unwrap();
    let mut ours = layer.layer(echo());
    g.bench_function("meshwork-bulkhead/uncontended", |b| {
        b.iter(|| one(&mut ours).unwrap())
    });
    let tower_layer = tower::limit::ConcurrencyLimitLayer::new(1000);
    let mut theirs = tower_layer.layer(echo());
    g.bench_function("tower-ConcurrencyLimit/uncontended", |b| {
        b.iter(|| one(&mut theirs).unwrap())
    });
    g.bench_function("meshwork-bulkhead/2-threads", |b| {
        b.iter_custom(|n| contended(n, || layer.layer(echo()), |s| assert!(one(s).is_ok())))
    });
    // tower's layer makes a new semaphore per service: share one via a
    // single ConcurrencyLimit built from the same Arc<Semaphore>.
    let sem = Arc::new(tokio::sync::Semaphore::new(1000));
    g.bench_function("tower-ConcurrencyLimit/2-threads", |b| {
        b.iter_custom(|n| {
            contended(
                n,
                || tower::limit::ConcurrencyLimit::with_semaphore(echo(), sem.clone()),
                |s| assert!(one(s).is_ok()),
            )
        })
    });
    g.finish();
}

fn p2c(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("p2c");
    let changes = futures_util::stream::iter(
        (0..8u32)
            .map(|k| Change::Insert {
                key: k,
                service: echo(),
                weight: 1,
            })
            .collect::<Vec<_>>(),
    );
    let mut ours = Balance::new(changes, P2c::default());
    g.bench_function("meshwork-p2c-peak-ewma/8-endpoints", |b| {
        b.iter(|| one(&mut ours).unwrap())
    });
    let endpoints: Vec<_> = (0..8)
        .map(|_| {
            tower::load::PeakEwma::new(
                echo(),
                Duration::from_millis(30),
                Duration::from_secs(10).as_nanos() as f64,
                tower::load::CompleteOnResponse::default(),
            )
        })
        .collect();
    let mut theirs =
        tower::balance::p2c::Balance::new(tower::discover::ServiceList::new(endpoints));
    g.bench_function("tower-p2c-peak-ewma/8-endpoints", |b| {
        b.iter(|| one(&mut theirs).unwrap())
    });
    g.finish();
}

fn stack(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("stack");
    let breaker = BreakerLayer::new(BreakerConfig {
        consecutive_failures: Some(5),
        failure_rate_threshold: None,
        ..Default::default()
    })
    .unwrap();
    let limiter = RateLimitLayer::gcra(GcraConfig {
        rate_per_sec: 1e9,
        burst: 1_000_000,
    })
    .unwrap();
    let retry = RetryLayer::new(RetryConfig::default(), RetryErrors).unwrap();
    let mut bare = echo();
    g.bench_function("baseline-bare-service", |b| {
        b.iter(|| one(&mut bare).unwrap())
    });
    let mut svc = ServiceBuilder::new()
        .layer(breaker.clone())
        .layer(limiter.clone())
        .layer(retry.clone())
        .service(echo());
    g.bench_function("breaker+limiter+retry", |b| {
        b.iter(|| one(&mut svc).unwrap())
    });
    let timeout = TimeoutLayer::plain(TimeoutConfig { timeout_ms: 1_000 }).unwrap();
    let mut svc_t = ServiceBuilder::new()
        .layer(timeout)
        .layer(breaker.clone())
        .layer(limiter.clone())
        .layer(retry.clone())
        .service(echo());
    g.bench_function("timeout+breaker+limiter+retry", |b| {
        b.iter(|| one(&mut svc_t).unwrap())
    });
    g.bench_function("breaker+limiter+retry/2-threads", |b| {
        b.iter_custom(|n| {
            contended(
                n,
                || {
                    ServiceBuilder::new()
                        .layer(breaker.clone())
                        .layer(limiter.clone())
                        .layer(retry.clone())
                        .service(echo())
                },
                |s| {
                    let _ = black_box(one(s));
                },
            )
        })
    });
    g.finish();
}

/// Per-call overhead of every other layer, uncontended, on the success path.
fn each_layer(c: &mut Criterion) {
    use meshwork_resilience::fallback::{FallbackLayer, Rejection};
    use meshwork_resilience::limit::concurrency::{
        AdaptiveConfig, AdaptiveLayer, SystemGuardConfig, SystemGuardLayer,
    };
    use meshwork_resilience::limit::rate::{
        Keyed, KeyedConfig, KeyedLimiter, SlidingWindowConfig, WarmUpConfig,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("layer");
    let mut retry = RetryLayer::new(RetryConfig::default(), RetryErrors)
        .unwrap()
        .layer(echo());
    g.bench_function("retry", |b| b.iter(|| one(&mut retry).unwrap()));
    let mut timeout = TimeoutLayer::plain(TimeoutConfig { timeout_ms: 1_000 })
        .unwrap()
        .layer(echo());
    g.bench_function("timeout", |b| b.iter(|| one(&mut timeout).unwrap()));
    let window = SlidingWindowConfig {
        limit: u64::MAX / 2,
        window_ms: 1_000,
        buckets: 10,
    };
    let mut sliding = RateLimitLayer::sliding_window(window)
        .unwrap()
        .layer(echo());
    g.bench_function("rate-sliding-window", |b| {
        b.iter(|| one(&mut sliding).unwrap())
    });
    let warm = WarmUpConfig {
        rate_per_sec: 1e9,
        warm_up_period_ms: 1,
        cold_factor: 2.0,
    };
    let mut warm_up = RateLimitLayer::warm_up(warm).unwrap().layer(echo());
    g.bench_function("rate-warm-up", |b| {
        b.iter(|| black_box(one(&mut warm_up).is_ok()))
    });
    let keyed_cfg = KeyedConfig {
        rate_per_sec: 1e9,
        burst: 1_000_000,
        ..Default::default()
    };
    let limiter = KeyedLimiter::new(keyed_cfg, Instant::now()).unwrap();
    let mut keyed = RateLimitLayer::new(
        "bench",
        Keyed {
            limiter,
            key: |x: &u64| Some(*x % 1024),
        },
    )
    .layer(echo());
    g.bench_function("rate-keyed-1024-keys", |b| {
        b.iter(|| one(&mut keyed).unwrap())
    });
    let mut adaptive = AdaptiveLayer::new(AdaptiveConfig::default())
        .unwrap()
        .layer(echo());
    g.bench_function("adaptive-gradient", |b| {
        b.iter(|| one(&mut adaptive).unwrap())
    });
    let mut guard = SystemGuardLayer::new(SystemGuardConfig::default())
        .unwrap()
        .layer(echo());
    g.bench_function("system-guard", |b| b.iter(|| one(&mut guard).unwrap()));
    let fallback = tower::service_fn(|_: Rejection| {
        std::future::ready(Ok::<u64, std::convert::Infallible>(0))
    });
    let mut fb = FallbackLayer::new(fallback).layer(echo());
    g.bench_function("fallback", |b| b.iter(|| one(&mut fb).unwrap()));
    g.finish();
}

/// Picking an endpoint among 16 (the decision cores alone).
fn pickers(c: &mut Criterion) {
    use meshwork_resilience::balance::{
        EndpointId, Maglev, PickContext, Picker, RandomPicker, Ring, SmoothWrr, mix,
    };
    let mut g = c.benchmark_group("pick-16-endpoints");
    let available = |_: EndpointId| true;
    let load = |id: EndpointId| f64::from(id.0);
    let mut all: Vec<(&str, Box<dyn Picker>)> = vec![
        ("p2c", Box::new(P2c::default())),
        ("smooth-wrr", Box::new(SmoothWrr::default())),
        ("random", Box::new(RandomPicker::default())),
        ("ring-160-vnodes", Box::new(Ring::default())),
        ("maglev-65537", Box::new(Maglev::default())),
    ];
    for (name, picker) in all.iter_mut() {
        for i in 0..16u32 {
            picker.insert(EndpointId(i), mix(u64::from(i)), 1 + i % 3);
        }
        let mut h = 0u64;
        g.bench_function(*name, |b| {
            b.iter(|| {
                h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let ctx = PickContext {
                    request_hash: Some(h),
                    available: &available,
                    load: &load,
                };
                black_box(picker.pick(&ctx))
            })
        });
    }
    g.finish();
}

/// What reading the clock costs: every limiter service reads it once per call.
fn clock(c: &mut Criterion) {
    use governor::clock::Clock as _;
    let mut g = c.benchmark_group("clock");
    g.bench_function("std-Instant-now", |b| {
        b.iter(|| black_box(StdInstant::now()))
    });
    g.bench_function("tokio-Instant-now", |b| {
        b.iter(|| black_box(Instant::now()))
    });
    let q = governor::clock::DefaultClock::default();
    g.bench_function("governor-DefaultClock-now", |b| {
        b.iter(|| black_box(q.now()))
    });
    g.finish();
}

mod group {
    #![allow(missing_docs)] // generated by criterion's macro
    use super::*;
    criterion_group!(
        benches,
        clock,
        each_layer,
        pickers,
        gcra,
        breaker,
        rate_limit_service,
        concurrency,
        p2c,
        stack
    );
}
criterion_main!(group::benches);
