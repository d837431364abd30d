//! Retries: exponential backoff with full jitter, at most `max_attempts`,
//! only for results the [`RetryPolicy`] calls retryable, bounded by a shared
//! [`RetryBudget`], and never past the caller's deadline.
//!
//! Counters: `meshwork_retry_attempts_total` (retries made) and
//! `meshwork_retry_budget_exhausted_total`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use meshwork_resilience::retry::{RetryConfig, RetryLayer, RetryErrors};
//! use tower::{Layer, ServiceExt};
//!
//! let calls = Arc::new(AtomicU32::new(0));
//! let c = calls.clone();
//! let flaky = tower::service_fn(move |x: u32| {
//!     let n = c.fetch_add(1, Ordering::SeqCst);
//!     async move { if n < 2 { Err("transient") } else { Ok(x) } }
//! });
//! let svc = RetryLayer::new(RetryConfig::default(), RetryErrors).unwrap().layer(flaky);
//! assert_eq!(svc.oneshot(7).await.unwrap(), 7);
//! assert_eq!(calls.load(Ordering::SeqCst), 3);
//! # }
//! ```

mod backoff;
mod budget;
mod policy;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tower::{Layer, Service};

pub use self::backoff::{ceiling, full_jitter};
pub use self::budget::{RetryBudget, RetryBudgetConfig};
pub use self::policy::{HttpTryEnd, RetryErrors, RetryHttp, RetryPolicy, idempotent, should_retry};
use crate::BoxError;
use crate::config::{ConfigError, check};

/// Retry configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in total, the first included (1..=100; 1 = no retry).
    pub max_attempts: u32,
    /// Backoff ceiling of the first retry, milliseconds.
    pub initial_backoff_ms: u64,
    /// Backoff ceiling never exceeds this, milliseconds.
    pub max_backoff_ms: u64,
    /// Ceiling growth per retry (>= 1).
    pub multiplier: f64,
    /// The budget shared by every service of the layer.
    pub budget: RetryBudgetConfig,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff_ms: 25,
            max_backoff_ms: 1_000,
            multiplier: 2.0,
            budget: RetryBudgetConfig::default(),
        }
    }
}

impl RetryConfig {
    /// Checks the fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            (1..=100).contains(&self.max_attempts),
            "retry.max_attempts",
            self.max_attempts,
            "1..=100",
        )?;
        check(
            self.max_backoff_ms >= self.initial_backoff_ms,
            "retry.max_backoff_ms",
            self.max_backoff_ms,
            "at least initial_backoff_ms",
        )?;
        check(
            self.max_backoff_ms <= 3_600_000,
            "retry.max_backoff_ms",
            self.max_backoff_ms,
            "at most one hour",
        )?;
        check(
            self.multiplier.is_finite() && self.multiplier >= 1.0,
            "retry.multiplier",
            self.multiplier,
            "a finite number >= 1",
        )?;
        self.budget.validate()
    }
}

#[derive(Debug)]
struct Shared {
    cfg: RetryConfig,
    budget: RetryBudget,
    retries: metrics::Counter,
    exhausted: metrics::Counter,
}

/// Layer for [`Retry`].
#[derive(Debug, Clone)]
pub struct RetryLayer<P> {
    shared: Arc<Shared>,
    policy: P,
}

impl<P> RetryLayer<P> {
    /// A layer with a new budget.
    pub fn new(cfg: RetryConfig, policy: P) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Self {
            shared: Arc::new(Shared {
                budget: RetryBudget::new(cfg.budget, Instant::now())?,
                cfg,
                retries: metrics::counter!("meshwork_retry_attempts_total"),
                exhausted: metrics::counter!("meshwork_retry_budget_exhausted_total"),
            }),
            policy,
        })
    }

    /// The budget shared by the layer's services.
    pub fn budget(&self) -> &RetryBudget {
        &self.shared.budget
    }
}

impl<S, P: Clone> Layer<S> for RetryLayer<P> {
    type Service = Retry<S, P>;
    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            shared: self.shared.clone(),
            policy: self.policy.clone(),
        }
    }
}

/// The retrying service.
#[derive(Debug, Clone)]
pub struct Retry<S, P> {
    inner: S,
    shared: Arc<Shared>,
    policy: P,
}

impl<S, P, Req> Service<Req> for Retry<S, P>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: Into<BoxError> + Send,
    P: RetryPolicy<Req, S::Response, S::Error>,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let clone = self.inner.clone();
        let mut svc = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let policy = self.policy.clone();
        Box::pin(async move {
            let now = Instant::now();
            shared.budget.deposit(now);
            let cfg = &shared.cfg;
            let deadline = policy.deadline(&req, now);
            let mut req = req;
            let mut attempt = 1;
            loop {
                let backup = (attempt < cfg.max_attempts)
                    .then(|| policy.clone_request(&req))
                    .flatten();
                if attempt > 1 {
                    std::future::poll_fn(|cx| svc.poll_ready(cx))
                        .await
                        .map_err(Into::into)?;
                }
                let result = svc.call(req).await;
                let Some(next) = backup else {
                    return result.map_err(Into::into);
                };
                if !policy.retryable(result.as_ref()) {
                    return result.map_err(Into::into);
                }
                let wait = full_jitter(
                    Duration::from_millis(cfg.initial_backoff_ms),
                    Duration::from_millis(cfg.max_backoff_ms),
                    cfg.multiplier,
                    attempt,
                );
                let now = Instant::now();
                if deadline.is_some_and(|d| now + wait >= d) {
                    return result.map_err(Into::into);
                }
                if !shared.budget.try_withdraw(now) {
                    shared.exhausted.increment(1);
                    return result.map_err(Into::into);
                }
                shared.retries.increment(1);
                drop(result);
                tokio::time::sleep(wait).await;
                req = next;
                attempt += 1;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tower::ServiceExt;

    fn always_failing(
        calls: Arc<AtomicU32>,
    ) -> impl Service<u32, Response = u32, Error = BoxError, Future: Send> + Clone + Send + 'static
    {
        tower::service_fn(move |_: u32| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<u32, BoxError>("down".into()) }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_max_attempts_and_budget() {
        let calls = Arc::new(AtomicU32::new(0));
        let cfg = RetryConfig {
            max_attempts: 4,
            budget: RetryBudgetConfig {
                ratio: 0.5,
                min_per_sec: 0,
                ttl_ms: 10_000,
            },
            ..Default::default()
        };
        let svc = RetryLayer::new(cfg, RetryErrors)
            .unwrap()
            .layer(always_failing(calls.clone()));
        for _ in 0..10 {
            assert!(svc.clone().oneshot(1).await.is_err());
        }
        // 10 requests, budget 50 %: 5 retries in all, never more than 3 per request.
        assert_eq!(calls.load(Ordering::SeqCst), 15);
    }

    #[tokio::test(start_paused = true)]
    async fn never_retries_past_the_deadline() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let inner = tower::service_fn(move |_: http::Request<()>| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, BoxError>(http::Response::builder().status(503).body(()).unwrap()) }
        });
        let cfg = RetryConfig {
            max_attempts: 10,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 1_000,
            multiplier: 1.0,
            budget: RetryBudgetConfig {
                ratio: 10.0,
                min_per_sec: 100,
                ttl_ms: 10_000,
            },
        };
        let svc = RetryLayer::new(cfg, RetryHttp::default())
            .unwrap()
            .layer(inner);
        let req = http::Request::builder()
            .header(crate::timeout::DEADLINE_HEADER, "1")
            .body(())
            .unwrap();
        let resp = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 503);
        // A 1 ms budget: a retry is started only if its jittered wait fits.
        assert!(calls.load(Ordering::SeqCst) <= 3);
        let post = http::Request::builder().method("POST").body(()).unwrap();
        calls.store(0, Ordering::SeqCst);
        svc.oneshot(post).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "POST is not retried");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Through the real service with one shared budget: whatever fails,
        /// retries stay within ratio x requests + the per-second floor, and
        /// no request makes more than `max_attempts` calls.
        #[test]
        fn service_retries_never_exceed_the_budget(
            ratio in 0.0f64..0.5,
            min_per_sec in 0u32..3,
            max_attempts in 1u32..5,
            fails in proptest::collection::vec(any_fail(), 1..60),
            gap_ms in 0u64..200,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            let requests = fails.len();
            let attempts: Arc<parking_lot::Mutex<Vec<u32>>> = Arc::new(parking_lot::Mutex::new(vec![0; requests]));
            let a = attempts.clone();
            let fails = Arc::new(fails);
            let inner = tower::service_fn(move |i: usize| {
                let n = {
                    let mut a = a.lock();
                    a[i] += 1;
                    a[i]
                };
                let fail = n <= fails[i];
                async move { if fail { Err::<u32, BoxError>("fail".into()) } else { Ok(n) } }
            });
            let cfg = RetryConfig {
                max_attempts,
                initial_backoff_ms: 1,
                max_backoff_ms: 10,
                multiplier: 2.0,
                budget: RetryBudgetConfig { ratio, min_per_sec, ttl_ms: 1_000 },
            };
            let svc = RetryLayer::new(cfg, RetryErrors).unwrap().layer(inner);
            let elapsed = rt.block_on(async move {
                let start = Instant::now();
                for i in 0..requests {
                    let _ = svc.clone().oneshot(i).await;
                    tokio::time::advance(Duration::from_millis(gap_ms)).await;
                }
                start.elapsed()
            });
            let attempts = attempts.lock();
            proptest::prop_assert!(attempts.iter().all(|&n| n <= max_attempts));
            let retries: u32 = attempts.iter().map(|&n| n - 1).sum();
            let secs = elapsed.as_secs_f64() + 2.0;
            let bound = ratio * requests as f64 + f64::from(min_per_sec) * secs;
            proptest::prop_assert!(f64::from(retries) <= bound, "{} retries > {}", retries, bound);
        }
    }

    fn any_fail() -> impl proptest::strategy::Strategy<Value = u32> {
        0u32..6
    }
}
