//! System-load guard: shed calls when the work in flight exceeds what the
//! service has shown it can serve, in the spirit of Sentinel's adaptive
//! system protection (a BBR-like check).
//!
//! Over a sliding window of buckets it measures the best completion rate
//! (calls/s) and the minimum latency. By Little's law the service can hold
//! `max_rate * min_latency` calls in flight without queueing; a call arriving
//! when more than `headroom` times that (and more than `min_in_flight`) are
//! already in flight is rejected with [`Overloaded`]. `max_in_flight` is an
//! absolute cap on top.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use pin_project_lite::pin_project;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tower::{Layer, Service};

use super::Overloaded;
use crate::BoxError;
use crate::config::{ConfigError, check};

/// Guard configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SystemGuardConfig {
    /// Measurement window, milliseconds.
    pub window_ms: u64,
    /// Buckets in the window (1..=100).
    pub buckets: u32,
    /// Never shed below this many calls in flight (>= 1).
    pub min_in_flight: u64,
    /// Absolute cap on calls in flight.
    pub max_in_flight: u64,
    /// Multiplier on the estimated capacity (>= 1).
    pub headroom: f64,
}

impl Default for SystemGuardConfig {
    fn default() -> Self {
        Self {
            window_ms: 1_000,
            buckets: 10,
            min_in_flight: 10,
            max_in_flight: 10_000,
            headroom: 1.5,
        }
    }
}

impl SystemGuardConfig {
    /// Checks the fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            (1..=100).contains(&self.buckets),
            "system_guard.buckets",
            self.buckets,
            "1..=100",
        )?;
        check(
            self.window_ms >= u64::from(self.buckets),
            "system_guard.window_ms",
            self.window_ms,
            ">= buckets",
        )?;
        check(
            self.min_in_flight >= 1,
            "system_guard.min_in_flight",
            self.min_in_flight,
            "at least 1",
        )?;
        check(
            self.max_in_flight >= self.min_in_flight,
            "system_guard.max_in_flight",
            self.max_in_flight,
            "at least min_in_flight",
        )?;
        check(
            self.headroom >= 1.0 && self.headroom.is_finite(),
            "system_guard.headroom",
            self.headroom,
            ">= 1",
        )
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    epoch: u64,
    completions: u64,
    min_rtt_nanos: u64,
}

/// The guard's measurements and decision.
#[derive(Debug)]
pub struct SystemLoad {
    cfg: SystemGuardConfig,
    base: Instant,
    width_nanos: u64,
    in_flight: AtomicU64,
    buckets: Mutex<Vec<Bucket>>,
    shed: metrics::Counter,
}

impl SystemLoad {
    /// No measurements yet (nothing is shed until there are some).
    pub fn new(cfg: SystemGuardConfig, now: Instant) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Self {
            base: now,
            width_nanos: (cfg.window_ms * 1_000_000 / u64::from(cfg.buckets)).max(1),
            in_flight: AtomicU64::new(0),
            buckets: Mutex::new(vec![Bucket::default(); cfg.buckets as usize]),
            shed: metrics::counter!("meshwork_shed_total", "by" => "system_guard"),
            cfg,
        })
    }

    fn epoch(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_nanos() as u64 / self.width_nanos + 1
    }

    /// Estimated calls the service can hold in flight, if measured.
    pub fn capacity(&self, now: Instant) -> Option<f64> {
        let epoch = self.epoch(now);
        let buckets = self.buckets.lock();
        let n = buckets.len() as u64;
        let width = self.width_nanos as f64 / 1e9;
        let mut max_rate = 0.0f64;
        let mut min_rtt = u64::MAX;
        for b in buckets
            .iter()
            .filter(|b| b.epoch != 0 && b.epoch + n > epoch && b.epoch < epoch)
        {
            max_rate = max_rate.max(b.completions as f64 / width);
            min_rtt = min_rtt.min(b.min_rtt_nanos);
        }
        (min_rtt != u64::MAX && max_rate > 0.0).then(|| max_rate * min_rtt as f64 / 1e9)
    }

    /// Admits a call at `now` or sheds it.
    pub fn try_acquire(&self, now: Instant) -> Result<(), Overloaded> {
        let n = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let cap = self.cfg.max_in_flight;
        let shed = if n >= cap {
            Some(cap)
        } else if n >= self.cfg.min_in_flight {
            self.capacity(now)
                .map(|c| ((c * self.cfg.headroom).ceil() as u64).max(self.cfg.min_in_flight))
                .filter(|&limit| n >= limit)
        } else {
            None
        };
        if let Some(limit) = shed {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.shed.increment(1);
            return Err(Overloaded {
                in_flight: n,
                limit,
            });
        }
        Ok(())
    }

    /// Records a completed call that took `rtt`.
    pub fn release(&self, rtt: Duration, now: Instant) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        let epoch = self.epoch(now);
        let mut buckets = self.buckets.lock();
        let n = buckets.len() as u64;
        let b = &mut buckets[(epoch % n) as usize];
        if b.epoch != epoch {
            *b = Bucket {
                epoch,
                completions: 0,
                min_rtt_nanos: u64::MAX,
            };
        }
        b.completions += 1;
        b.min_rtt_nanos = b.min_rtt_nanos.min(rtt.as_nanos() as u64);
    }
}

/// Layer for [`SystemGuard`].
#[derive(Debug, Clone)]
pub struct SystemGuardLayer {
    load: Arc<SystemLoad>,
}

impl SystemGuardLayer {
    /// A layer over one new guard.
    pub fn new(cfg: SystemGuardConfig) -> Result<Self, ConfigError> {
        Ok(Self {
            load: Arc::new(SystemLoad::new(cfg, Instant::now())?),
        })
    }
    /// The shared measurements.
    pub fn load(&self) -> &Arc<SystemLoad> {
        &self.load
    }
}

impl<S> Layer<S> for SystemGuardLayer {
    type Service = SystemGuard<S>;
    fn layer(&self, inner: S) -> SystemGuard<S> {
        SystemGuard {
            inner,
            load: self.load.clone(),
        }
    }
}

/// Sheds calls beyond measured capacity with [`Overloaded`].
#[derive(Debug, Clone)]
pub struct SystemGuard<S> {
    inner: S,
    load: Arc<SystemLoad>,
}

impl<S, Req> Service<Req> for SystemGuard<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let now = Instant::now();
        match self.load.try_acquire(now) {
            Ok(()) => ResponseFuture::Called {
                inner: self.inner.call(req),
                track: Some((self.load.clone(), now)),
            },
            Err(e) => ResponseFuture::Rejected { error: Some(e) },
        }
    }
}

pin_project! {
    /// Future of [`SystemGuard`].
    #[project = Proj]
    #[allow(missing_docs)] // variant fields are private in spirit
    pub enum ResponseFuture<F> {
        /// Admitted.
        Called { #[pin] inner: F, track: Option<(Arc<SystemLoad>, Instant)> },
        /// Shed.
        Rejected { error: Option<Overloaded> },
    }
    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            // A cancelled call frees its slot without a latency sample.
            if let Proj::Called { track, .. } = this.project()
                && let Some((load, _)) = track.take()
            {
                load.in_flight.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Called { inner, track } => {
                let out = std::task::ready!(inner.poll(cx));
                if let Some((load, start)) = track.take() {
                    let now = Instant::now();
                    load.release(now - start, now);
                }
                Poll::Ready(out.map_err(Into::into))
            }
            Proj::Rejected { error } => Poll::Ready(Err(error
                .take()
                .map_or_else(|| "polled after completion".into(), Into::into))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheds_beyond_littles_law_capacity() {
        let t0 = Instant::now();
        let cfg = SystemGuardConfig {
            min_in_flight: 2,
            headroom: 1.0,
            ..Default::default()
        };
        let g = SystemLoad::new(cfg, t0).unwrap();
        // 100 calls of 10 ms completing within one 100 ms bucket: 1000/s x 10 ms = 10.
        for _ in 0..100 {
            g.try_acquire(t0).unwrap();
            g.release(Duration::from_millis(10), t0 + Duration::from_millis(50));
        }
        let now = t0 + Duration::from_millis(150);
        assert_eq!(g.capacity(now).map(|c| c.round()), Some(10.0));
        for _ in 0..10 {
            g.try_acquire(now).unwrap();
        }
        let e = g.try_acquire(now).unwrap_err();
        assert_eq!(e.limit, 10);
    }
}
