//! Adaptive concurrency limit: the limit on calls in flight is not
//! configured but discovered from measured latency, as Netflix's
//! concurrency-limits does.
//!
//! * [`Algorithm::Aimd`]: additive increase (+1 when the limit is at least
//!   half used and the call succeeded), multiplicative decrease (x
//!   `backoff_ratio`) on a failed or too-slow call.
//! * [`Algorithm::Gradient`]: compares the no-load latency (the minimum
//!   seen) with the latest sample; when latency grows (queueing), the
//!   gradient `tolerance x min / sample` falls below 1 and shrinks the limit;
//!   a `sqrt(limit)` headroom lets it probe upwards. Every `probe_interval`
//!   samples the limit drops to `sqrt(limit)` for one round and the minimum
//!   is measured afresh, so a stale minimum cannot let the limit drift up
//!   (Netflix `GradientLimit`). A simulation test checks it settles near the
//!   server's real capacity.
//!
//! Admission is one `fetch_add` against the current limit (an atomic); the
//! limit is recomputed per sample under a short mutex.

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
use crate::classify::{Classify, ErrorsAsFailures, Outcome};
use crate::config::{ConfigError, check};

/// How the limit is found.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Algorithm {
    /// Additive increase, multiplicative decrease.
    Aimd {
        /// Factor applied on a drop (0.5..1).
        backoff_ratio: f64,
        /// A call slower than this (ms) counts as a drop.
        timeout_ms: u64,
    },
    /// Latency gradient.
    Gradient {
        /// Latency may reach this x the no-load latency before the limit
        /// shrinks (>= 1).
        tolerance: f64,
        /// Weight of a new limit estimate (0 < x <= 1).
        smoothing: f64,
        /// Samples between two no-load latency probes (>= 1).
        probe_interval: u32,
    },
}

/// Adaptive limit configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptiveConfig {
    /// Limit to start with.
    pub initial_limit: u64,
    /// Never below this (>= 1).
    pub min_limit: u64,
    /// Never above this.
    pub max_limit: u64,
    /// The algorithm.
    pub algorithm: Algorithm,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self {
            initial_limit: 20,
            min_limit: 1,
            max_limit: 1000,
            algorithm: Algorithm::Gradient {
                tolerance: 1.5,
                smoothing: 0.2,
                probe_interval: 1000,
            },
        }
    }
}

impl AdaptiveConfig {
    /// Checks the fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            self.min_limit >= 1,
            "adaptive.min_limit",
            self.min_limit,
            "at least 1",
        )?;
        check(
            self.max_limit >= self.min_limit,
            "adaptive.max_limit",
            self.max_limit,
            "at least min_limit",
        )?;
        check(
            (self.min_limit..=self.max_limit).contains(&self.initial_limit),
            "adaptive.initial_limit",
            self.initial_limit,
            "between min_limit and max_limit",
        )?;
        match self.algorithm {
            Algorithm::Aimd {
                backoff_ratio,
                timeout_ms,
            } => {
                check(
                    (0.5..1.0).contains(&backoff_ratio),
                    "adaptive.algorithm.backoff_ratio",
                    backoff_ratio,
                    "in [0.5, 1)",
                )?;
                check(
                    timeout_ms >= 1,
                    "adaptive.algorithm.timeout_ms",
                    timeout_ms,
                    "at least 1",
                )
            }
            Algorithm::Gradient {
                tolerance,
                smoothing,
                probe_interval,
            } => {
                check(
                    tolerance >= 1.0 && tolerance.is_finite(),
                    "adaptive.algorithm.tolerance",
                    tolerance,
                    ">= 1",
                )?;
                check(
                    smoothing > 0.0 && smoothing <= 1.0,
                    "adaptive.algorithm.smoothing",
                    smoothing,
                    "in (0, 1]",
                )?;
                check(
                    probe_interval >= 1,
                    "adaptive.algorithm.probe_interval",
                    probe_interval,
                    "at least 1",
                )
            }
        }
    }
}

#[derive(Debug)]
struct Estimate {
    limit: f64,
    /// Lowest latency seen since the last probe, seconds.
    min_rtt: f64,
    /// Samples since the last probe.
    samples: u64,
}

/// The limit core: admission counter and limit estimator.
#[derive(Debug)]
pub struct AdaptiveLimit {
    cfg: AdaptiveConfig,
    in_flight: AtomicU64,
    limit: AtomicU64,
    estimate: Mutex<Estimate>,
    limit_gauge: metrics::Gauge,
    shed: metrics::Counter,
}

impl AdaptiveLimit {
    /// A limit at `initial_limit`.
    pub fn new(cfg: AdaptiveConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Self {
            in_flight: AtomicU64::new(0),
            limit: AtomicU64::new(cfg.initial_limit),
            estimate: Mutex::new(Estimate {
                limit: cfg.initial_limit as f64,
                min_rtt: f64::INFINITY,
                samples: 0,
            }),
            limit_gauge: metrics::gauge!("meshwork_adaptive_limit"),
            shed: metrics::counter!("meshwork_shed_total", "by" => "adaptive"),
            cfg,
        })
    }

    /// The limit in force.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Takes a slot; returns the in-flight count including this call.
    pub fn try_acquire(&self) -> Result<u64, Overloaded> {
        let limit = self.limit.load(Ordering::Relaxed);
        let n = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        if n > limit {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.shed.increment(1);
            return Err(Overloaded {
                in_flight: n - 1,
                limit,
            });
        }
        Ok(n)
    }

    /// Releases a slot and feeds the estimator with the call's latency,
    /// the in-flight count when it started and whether it was dropped
    /// (failed / timed out).
    pub fn release(&self, rtt: Duration, in_flight: u64, dropped: bool) -> u64 {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        let mut e = self.estimate.lock();
        let rtt = rtt.as_secs_f64().max(1e-9);
        let (min, max) = (self.cfg.min_limit as f64, self.cfg.max_limit as f64);
        let new = match self.cfg.algorithm {
            Algorithm::Aimd {
                backoff_ratio,
                timeout_ms,
            } => {
                if dropped || rtt * 1000.0 > timeout_ms as f64 {
                    e.limit * backoff_ratio
                } else if (in_flight as f64) * 2.0 >= e.limit {
                    e.limit + 1.0
                } else {
                    e.limit
                }
            }
            Algorithm::Gradient {
                tolerance,
                smoothing,
                probe_interval,
            } => {
                e.samples += 1;
                if e.samples >= u64::from(probe_interval) {
                    // Probe: drain to measure the no-load latency again.
                    e.samples = 0;
                    e.min_rtt = f64::INFINITY;
                    e.limit.sqrt().max(min)
                } else if !dropped && (in_flight as f64) < e.limit / 2.0 {
                    // Not using half the limit: no signal about capacity.
                    e.min_rtt = e.min_rtt.min(rtt);
                    e.limit
                } else {
                    e.min_rtt = e.min_rtt.min(rtt);
                    let gradient = (tolerance * e.min_rtt / rtt).clamp(0.5, 1.0);
                    let gradient = if dropped { 0.5 } else { gradient };
                    let target = e.limit * gradient + e.limit.sqrt();
                    e.limit * (1.0 - smoothing) + target * smoothing
                }
            }
        };
        e.limit = new.clamp(min, max);
        let rounded = e.limit as u64;
        self.limit
            .store(rounded.max(self.cfg.min_limit), Ordering::Relaxed);
        self.limit_gauge.set(e.limit);
        rounded
    }
}

/// Layer for [`Adaptive`].
#[derive(Debug, Clone)]
pub struct AdaptiveLayer<C = ErrorsAsFailures> {
    limit: Arc<AdaptiveLimit>,
    classifier: C,
}

impl AdaptiveLayer {
    /// A layer over one new limit, `Err` counting as a drop.
    pub fn new(cfg: AdaptiveConfig) -> Result<Self, ConfigError> {
        Ok(Self {
            limit: Arc::new(AdaptiveLimit::new(cfg)?),
            classifier: ErrorsAsFailures,
        })
    }
}

impl<C> AdaptiveLayer<C> {
    /// Uses `classifier` to tell drops.
    pub fn with_classifier<C2>(self, classifier: C2) -> AdaptiveLayer<C2> {
        AdaptiveLayer {
            limit: self.limit,
            classifier,
        }
    }
    /// The shared limit.
    pub fn limit(&self) -> &Arc<AdaptiveLimit> {
        &self.limit
    }
}

impl<S, C: Clone> Layer<S> for AdaptiveLayer<C> {
    type Service = Adaptive<S, C>;
    fn layer(&self, inner: S) -> Self::Service {
        Adaptive {
            inner,
            limit: self.limit.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

/// Sheds calls above the adaptive limit with [`Overloaded`].
#[derive(Debug, Clone)]
pub struct Adaptive<S, C = ErrorsAsFailures> {
    inner: S,
    limit: Arc<AdaptiveLimit>,
    classifier: C,
}

impl<S, C, Req> Service<Req> for Adaptive<S, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.limit.try_acquire() {
            Ok(in_flight) => ResponseFuture::Called {
                inner: self.inner.call(req),
                track: Some((
                    self.limit.clone(),
                    self.classifier.clone(),
                    Instant::now(),
                    in_flight,
                )),
            },
            Err(e) => ResponseFuture::Rejected { error: Some(e) },
        }
    }
}

pin_project! {
    /// Future of [`Adaptive`].
    #[project = Proj]
    #[allow(missing_docs)] // variant fields are private in spirit
    pub enum ResponseFuture<F, C> {
        /// Admitted.
        Called { #[pin] inner: F, track: Option<(Arc<AdaptiveLimit>, C, Instant, u64)> },
        /// Shed.
        Rejected { error: Option<Overloaded> },
    }
    impl<F, C> PinnedDrop for ResponseFuture<F, C> {
        fn drop(this: Pin<&mut Self>) {
            // A cancelled call still frees its slot (counted as a drop).
            if let Proj::Called { track, .. } = this.project()
                && let Some((limit, _, start, n)) = track.take()
            {
                limit.release(start.elapsed(), n, true);
            }
        }
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T, E>,
{
    type Output = Result<T, BoxError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Called { inner, track } => {
                let out = std::task::ready!(inner.poll(cx));
                if let Some((limit, classifier, start, n)) = track.take() {
                    let dropped = classifier.classify(out.as_ref()) == Outcome::Failure;
                    limit.release(start.elapsed(), n, dropped);
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
    fn aimd_grows_under_load_and_halves_on_drops() {
        let cfg = AdaptiveConfig {
            initial_limit: 10,
            min_limit: 1,
            max_limit: 100,
            algorithm: Algorithm::Aimd {
                backoff_ratio: 0.5,
                timeout_ms: 100,
            },
        };
        let l = AdaptiveLimit::new(cfg).unwrap();
        for _ in 0..20 {
            l.try_acquire().unwrap();
            let busy = l.limit();
            l.release(Duration::from_millis(10), busy, false);
        }
        assert_eq!(l.limit(), 30);
        let n = l.try_acquire().unwrap();
        l.release(Duration::from_millis(500), n, false); // too slow
        assert_eq!(l.limit(), 15);
    }

    #[test]
    fn gradient_shrinks_when_latency_grows_and_rejects_over_limit() {
        let cfg = AdaptiveConfig {
            initial_limit: 50,
            min_limit: 5,
            max_limit: 200,
            algorithm: Algorithm::Gradient {
                tolerance: 1.0,
                smoothing: 0.5,
                probe_interval: 1000,
            },
        };
        let l = AdaptiveLimit::new(cfg).unwrap();
        for _ in 0..50 {
            l.release(Duration::from_millis(10), l.limit(), false);
            l.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        let healthy = l.limit();
        for _ in 0..50 {
            l.release(Duration::from_millis(100), l.limit(), false);
            l.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        assert!(l.limit() < healthy / 2, "{} vs {healthy}", l.limit());
        let limit = l.limit();
        l.in_flight.store(0, Ordering::Relaxed);
        for _ in 0..limit {
            l.try_acquire().unwrap();
        }
        assert!(l.try_acquire().is_err());
    }

    /// Closed-loop simulation: 1000 clients against a server that serves
    /// `capacity` calls at once in 10 ms and queues the rest (latency grows
    /// linearly past `capacity` in flight). Returns the final limit and its
    /// mean over the last quarter of the run.
    fn settle(algorithm: Algorithm, capacity: f64) -> (u64, f64) {
        let cfg = AdaptiveConfig {
            initial_limit: 5,
            min_limit: 1,
            max_limit: 1000,
            algorithm,
        };
        let l = AdaptiveLimit::new(cfg).unwrap();
        let base_ms = 10.0;
        let mut now = 0.0f64;
        // (finish time, rtt, in-flight at start)
        let mut running: Vec<(f64, f64, u64)> = Vec::new();
        let mut limits = Vec::new();
        for step in 0..20_000 {
            while running.len() < 1000 {
                let Ok(n) = l.try_acquire() else { break };
                let rtt = base_ms * (n as f64 / capacity).max(1.0);
                running.push((now + rtt, rtt, n));
            }
            let next = (0..running.len())
                .min_by(|&a, &b| running[a].0.total_cmp(&running[b].0))
                .expect("something runs");
            let (finish, rtt, n) = running.swap_remove(next);
            now = finish;
            l.release(Duration::from_secs_f64(rtt / 1000.0), n, false);
            if step >= 15_000 {
                limits.push(l.limit() as f64);
            }
        }
        let mean = limits.iter().sum::<f64>() / limits.len() as f64;
        (l.limit(), mean)
    }

    #[test]
    fn finds_the_servers_capacity_from_latency() {
        let gradient = Algorithm::Gradient {
            tolerance: 1.5,
            smoothing: 0.2,
            probe_interval: 1000,
        };
        let aimd = Algorithm::Aimd {
            backoff_ratio: 0.9,
            timeout_ms: 25,
        };
        for capacity in [20.0, 80.0] {
            let (_, g) = settle(gradient, capacity);
            let (_, a) = settle(aimd, capacity);
            eprintln!("capacity {capacity}: gradient settles at {g:.1}, aimd at {a:.1}");
            // Gradient: about tolerance x capacity (+ sqrt headroom, - probes).
            assert!(
                (0.75 * capacity..=2.0 * capacity).contains(&g),
                "gradient {g} for {capacity}"
            );
            // AIMD's signal is its timeout, 2.5 x the no-load latency.
            assert!(
                (1.0 * capacity..=2.6 * capacity).contains(&a),
                "aimd {a} for {capacity}"
            );
        }
    }

    proptest::proptest! {
        /// The limit stays within [min, max] and admissions never exceed it.
        #[test]
        fn limit_stays_in_bounds_and_is_enforced(
            aimd in proptest::bool::ANY,
            samples in proptest::collection::vec((1u64..500, proptest::bool::weighted(0.2), 0u8..4), 1..300),
        ) {
            let algorithm = if aimd {
                Algorithm::Aimd { backoff_ratio: 0.7, timeout_ms: 200 }
            } else {
                Algorithm::Gradient { tolerance: 1.5, smoothing: 0.3, probe_interval: 50 }
            };
            let cfg = AdaptiveConfig { initial_limit: 10, min_limit: 2, max_limit: 50, algorithm };
            let l = AdaptiveLimit::new(cfg).unwrap();
            let mut held = Vec::new();
            for (rtt_ms, dropped, burst) in samples {
                for _ in 0..burst {
                    let limit = l.limit();
                    match l.try_acquire() {
                        Ok(n) => {
                            proptest::prop_assert!(n <= limit, "admitted #{} over limit {}", n, limit);
                            held.push(n);
                        }
                        Err(e) => proptest::prop_assert!(e.in_flight >= limit),
                    }
                }
                if let Some(n) = held.pop() {
                    l.release(Duration::from_millis(rtt_ms), n, dropped);
                }
                proptest::prop_assert!((2..=50).contains(&l.limit()), "limit {}", l.limit());
            }
        }
    }
}
