//! Pacing (a leaky bucket with a queue): calls are spaced exactly
//! `1 / rate` apart; a call that would have to wait more than `max_wait_ms`
//! for its slot is rejected instead. This is Sentinel's "rate limiter"
//! control behaviour: smooths bursts into an even flow.
//!
//! [`Pacer`] hands out slots with one CAS; [`Pacing`] is the service that
//! waits for the slot (paused-clock friendly) before calling the inner one.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tower::{Layer, Service};

use super::RateLimited;
use crate::BoxError;
use crate::config::{ConfigError, check};

/// Pacing limits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PacingConfig {
    /// Calls per second (> 0, <= 1e9).
    pub rate_per_sec: f64,
    /// Longest a call may queue for its slot, milliseconds.
    pub max_wait_ms: u64,
}

impl Default for PacingConfig {
    fn default() -> Self {
        Self {
            rate_per_sec: 100.0,
            max_wait_ms: 500,
        }
    }
}

impl PacingConfig {
    /// Checks the fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            self.rate_per_sec.is_finite() && self.rate_per_sec > 0.0 && self.rate_per_sec <= 1e9,
            "pacing.rate_per_sec",
            self.rate_per_sec,
            "a number in (0, 1e9]",
        )?;
        check(
            self.max_wait_ms <= 3_600_000,
            "pacing.max_wait_ms",
            self.max_wait_ms,
            "at most one hour",
        )
    }
}

/// Slot dispenser.
#[derive(Debug)]
pub struct Pacer {
    base: Instant,
    next: AtomicU64,
    interval: AtomicU64,
    max_wait: AtomicU64,
}

impl Pacer {
    /// A pacer whose first slot is `now`.
    pub fn new(cfg: PacingConfig, now: Instant) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let p = Self {
            base: now,
            next: AtomicU64::new(0),
            interval: AtomicU64::new(0),
            max_wait: AtomicU64::new(0),
        };
        p.set_limit(cfg)?;
        Ok(p)
    }

    /// Changes rate and maximum wait at run time.
    pub fn set_limit(&self, cfg: PacingConfig) -> Result<(), ConfigError> {
        cfg.validate()?;
        self.interval
            .store(((1e9 / cfg.rate_per_sec) as u64).max(1), Ordering::Relaxed);
        self.max_wait
            .store(cfg.max_wait_ms * 1_000_000, Ordering::Relaxed);
        Ok(())
    }

    /// Reserves the next slot: how long to wait for it, or a rejection.
    pub fn reserve(&self, now: Instant) -> Result<Duration, RateLimited> {
        let now_n = crate::nanos_since(self.base, now);
        let interval = self.interval.load(Ordering::Relaxed);
        let max_wait = self.max_wait.load(Ordering::Relaxed);
        let mut next = self.next.load(Ordering::Relaxed);
        loop {
            let slot = next.max(now_n);
            let wait = slot - now_n;
            if wait > max_wait {
                return Err(RateLimited {
                    retry_after: Duration::from_nanos(wait - max_wait),
                });
            }
            match self.next.compare_exchange_weak(
                next,
                slot.saturating_add(interval),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(Duration::from_nanos(wait)),
                Err(cur) => next = cur,
            }
        }
    }
}

/// Layer for [`Pacing`].
#[derive(Debug, Clone)]
pub struct PacingLayer {
    pacer: Arc<Pacer>,
}

impl PacingLayer {
    /// A layer sharing one new pacer.
    pub fn new(cfg: PacingConfig) -> Result<Self, ConfigError> {
        Ok(Self {
            pacer: Arc::new(Pacer::new(cfg, Instant::now())?),
        })
    }
    /// The shared pacer (to change limits at run time).
    pub fn pacer(&self) -> &Arc<Pacer> {
        &self.pacer
    }
}

impl<S> Layer<S> for PacingLayer {
    type Service = Pacing<S>;
    fn layer(&self, inner: S) -> Pacing<S> {
        Pacing {
            inner,
            pacer: self.pacer.clone(),
        }
    }
}

/// Service that delays each call to its paced slot.
#[derive(Debug, Clone)]
pub struct Pacing<S> {
    inner: S,
    pacer: Arc<Pacer>,
}

impl<S, Req> Service<Req> for Pacing<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: Into<BoxError>,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.pacer.reserve(Instant::now()) {
            Err(e) => Box::pin(std::future::ready(Err(e.into()))),
            Ok(wait) if wait.is_zero() => {
                let fut = self.inner.call(req);
                Box::pin(async move { fut.await.map_err(Into::into) })
            }
            Ok(wait) => {
                // The ready service goes with the call; keep a fresh clone.
                let clone = self.inner.clone();
                let mut ready = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move {
                    tokio::time::sleep(wait).await;
                    ready.call(req).await.map_err(Into::into)
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[test]
    fn slots_are_spaced_and_long_waits_rejected() {
        let t0 = Instant::now();
        let p = Pacer::new(
            PacingConfig {
                rate_per_sec: 10.0,
                max_wait_ms: 250,
            },
            t0,
        )
        .unwrap();
        let waits: Vec<_> = (0..3).map(|_| p.reserve(t0).unwrap()).collect();
        assert_eq!(
            waits,
            [
                Duration::ZERO,
                Duration::from_millis(100),
                Duration::from_millis(200)
            ]
        );
        assert!(p.reserve(t0).is_err(), "300 ms > max wait");
        assert_eq!(
            p.reserve(t0 + Duration::from_secs(1)).unwrap(),
            Duration::ZERO
        );
    }

    #[tokio::test(start_paused = true)]
    async fn service_waits_for_its_slot() {
        let layer = PacingLayer::new(PacingConfig {
            rate_per_sec: 10.0,
            max_wait_ms: 1000,
        })
        .unwrap();
        let svc = layer.layer(tower::service_fn(|_: ()| async {
            Ok::<_, BoxError>(Instant::now())
        }));
        let start = Instant::now();
        let mut times = Vec::new();
        for _ in 0..3 {
            times.push(svc.clone().oneshot(()).await.unwrap() - start);
        }
        assert_eq!(
            times,
            [
                Duration::ZERO,
                Duration::from_millis(100),
                Duration::from_millis(200)
            ]
        );
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Granted slots are at least one interval apart and no call waits
        /// more than max_wait.
        #[test]
        fn slots_are_spaced_and_waits_bounded(
            rate in 1.0f64..1000.0,
            max_wait_ms in 0u64..500,
            gaps in proptest::collection::vec(0u64..20_000_000, 1..300),
        ) {
            let t0 = Instant::now();
            let p = Pacer::new(PacingConfig { rate_per_sec: rate, max_wait_ms }, t0).unwrap();
            let interval = Duration::from_nanos(((1e9 / rate) as u64).max(1));
            let mut now = t0;
            let mut last: Option<Instant> = None;
            for gap in gaps {
                now += Duration::from_nanos(gap);
                if let Ok(wait) = p.reserve(now) {
                    prop_assert!(wait <= Duration::from_millis(max_wait_ms));
                    let slot = now + wait;
                    if let Some(prev) = last { prop_assert!(slot >= prev + interval); }
                    last = Some(slot);
                }
            }
        }
    }
}
