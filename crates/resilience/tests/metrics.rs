//! The layers export through the `metrics` facade: a tiny in-memory recorder
//! sees the breaker's transitions and rejections, the rate limiter's
//! rejections and the adaptive limiter's gauge.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report we want

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use meshwork_resilience::BoxError;
use meshwork_resilience::breaker::{BreakerConfig, BreakerLayer};
use meshwork_resilience::limit::concurrency::{AdaptiveConfig, AdaptiveLayer};
use meshwork_resilience::limit::rate::{GcraConfig, RateLimitLayer};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};
use parking_lot::Mutex;
use tower::{Layer, Service};

#[derive(Default)]
struct Cell(AtomicU64);

impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::SeqCst);
    }
}

impl GaugeFn for Cell {
    fn increment(&self, value: f64) {
        self.set(f64::from_bits(self.0.load(Ordering::SeqCst)) + value)
    }
    fn decrement(&self, value: f64) {
        self.set(f64::from_bits(self.0.load(Ordering::SeqCst)) - value)
    }
    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::SeqCst);
    }
}

/// Keeps every counter and gauge by its rendered key.
#[derive(Default)]
struct Memory {
    cells: Mutex<HashMap<String, Arc<Cell>>>,
}

impl Memory {
    fn cell(&self, key: &Key) -> Arc<Cell> {
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        self.cells.lock().entry(name).or_default().clone()
    }
    fn counter(&self, name: &str) -> u64 {
        self.cells
            .lock()
            .get(name)
            .map_or(0, |c| c.0.load(Ordering::SeqCst))
    }
    fn gauge(&self, name: &str) -> Option<f64> {
        self.cells
            .lock()
            .get(name)
            .map(|c| f64::from_bits(c.0.load(Ordering::SeqCst)))
    }
}

impl Recorder for Memory {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.cell(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.cell(key))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn call<S: Service<u32>>(svc: &mut S, req: u32) -> Result<S::Response, S::Error> {
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    match pin!(svc.call(req)).poll(&mut cx) {
        Poll::Ready(r) => r,
        Poll::Pending => panic!("test services answer at once"),
    }
}

#[test]
fn layers_export_metrics() {
    let memory = Memory::default();
    metrics::with_local_recorder(&memory, || {
        let failing =
            tower::service_fn(|_: u32| std::future::ready(Err::<u32, BoxError>("down".into())));
        let cfg = BreakerConfig {
            name: "payments".into(),
            consecutive_failures: Some(2),
            failure_rate_threshold: None,
            ..Default::default()
        };
        let mut breaker = BreakerLayer::new(cfg).unwrap().layer(failing);
        for _ in 0..3 {
            assert!(call(&mut breaker, 1).is_err());
        }

        let ok = tower::service_fn(|x: u32| std::future::ready(Ok::<u32, BoxError>(x)));
        let mut limited = RateLimitLayer::gcra(GcraConfig {
            rate_per_sec: 1.0,
            burst: 1,
        })
        .unwrap()
        .layer(ok);
        call(&mut limited, 1).unwrap();
        assert!(call(&mut limited, 2).is_err());

        let mut adaptive = AdaptiveLayer::new(AdaptiveConfig::default())
            .unwrap()
            .layer(ok);
        call(&mut adaptive, 1).unwrap();
    });
    assert_eq!(
        memory.counter("meshwork_breaker_transitions_total{name=payments,to=open}"),
        1
    );
    assert_eq!(
        memory.gauge("meshwork_breaker_state{name=payments}"),
        Some(1.0)
    );
    assert_eq!(
        memory.counter("meshwork_breaker_rejected_total{name=payments}"),
        1
    );
    assert_eq!(memory.counter("meshwork_rate_limited_total{name=gcra}"), 1);
    assert!(memory.gauge("meshwork_adaptive_limit{}").is_some());
}
