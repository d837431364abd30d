//! Per-call timeout with deadline propagation.
//!
//! [`Timeout`] gives each call `timeout_ms`, or less if the request already
//! carries an earlier deadline (from the caller, via [`DeadlineCarrier`]);
//! it stamps the effective deadline back on the request so the next hop
//! sees the remaining budget (`x-meshwork-deadline-ms`, `grpc-timeout` for
//! gRPC requests, and the [`Deadline`] extension for in-process layers like
//! retry). A call whose budget is already spent is not started. Expiry fails
//! with [`Elapsed`].
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use meshwork_resilience::timeout::{TimeoutConfig, TimeoutLayer, DEADLINE_HEADER};
//! use meshwork_resilience::Elapsed;
//! use tower::{Layer, ServiceExt};
//!
//! let layer = TimeoutLayer::new(TimeoutConfig { timeout_ms: 100 }).unwrap();
//! let svc = layer.layer(tower::service_fn(|req: http::Request<()>| async move {
//!     // The callee sees its remaining budget.
//!     assert_eq!(req.headers()[DEADLINE_HEADER], "100");
//!     tokio::time::sleep(std::time::Duration::from_secs(1)).await;
//!     Ok::<_, std::io::Error>(())
//! }));
//! let err = svc.oneshot(http::Request::new(())).await.unwrap_err();
//! assert!(err.is::<Elapsed>());
//! # }
//! ```

mod deadline;
mod error;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

pub use self::deadline::{
    DEADLINE_HEADER, Deadline, DeadlineCarrier, GRPC_TIMEOUT_HEADER, format_grpc_timeout,
    parse_grpc_timeout,
};
pub use self::error::Elapsed;
use crate::BoxError;
use crate::config::{ConfigError, check};

/// Timeout configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutConfig {
    /// Budget of one call, milliseconds (1..=1 day).
    pub timeout_ms: u64,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        Self { timeout_ms: 10_000 }
    }
}

impl TimeoutConfig {
    /// Checks the fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            (1..=86_400_000).contains(&self.timeout_ms),
            "timeout.timeout_ms",
            self.timeout_ms,
            "1..=86400000",
        )
    }
}

/// How a [`Timeout`] reads and writes the deadline of a request.
pub trait DeadlinePolicy<Req>: Clone {
    /// The deadline `req` already carries.
    fn incoming(&self, req: &Req, now: Instant) -> Option<Instant>;
    /// Stamps the effective deadline on `req`.
    fn outgoing(&self, req: &mut Req, deadline: Instant, now: Instant);
}

/// Reads and propagates deadlines through [`DeadlineCarrier`] (HTTP/gRPC
/// headers and the [`Deadline`] extension).
#[derive(Debug, Clone, Copy, Default)]
pub struct Propagate;

impl<Req: DeadlineCarrier> DeadlinePolicy<Req> for Propagate {
    fn incoming(&self, req: &Req, now: Instant) -> Option<Instant> {
        req.deadline(now)
    }
    fn outgoing(&self, req: &mut Req, deadline: Instant, now: Instant) {
        req.set_deadline(deadline, now);
    }
}

/// Only enforces the timeout; works for any request type.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPropagation;

impl<Req> DeadlinePolicy<Req> for NoPropagation {
    fn incoming(&self, _: &Req, _: Instant) -> Option<Instant> {
        None
    }
    fn outgoing(&self, _: &mut Req, _: Instant, _: Instant) {}
}

/// Layer for [`Timeout`].
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer<D = Propagate> {
    timeout: Duration,
    policy: D,
}

impl TimeoutLayer {
    /// A layer giving each call `timeout_ms` and propagating deadlines
    /// (requests must implement [`DeadlineCarrier`], as `http::Request` does).
    pub fn new(cfg: TimeoutConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Self {
            timeout: Duration::from_millis(cfg.timeout_ms),
            policy: Propagate,
        })
    }
}

impl TimeoutLayer<NoPropagation> {
    /// A layer giving each call `timeout_ms`, for any request type.
    pub fn plain(cfg: TimeoutConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Self {
            timeout: Duration::from_millis(cfg.timeout_ms),
            policy: NoPropagation,
        })
    }
}

impl<S, D: Clone> Layer<S> for TimeoutLayer<D> {
    type Service = Timeout<S, D>;
    fn layer(&self, inner: S) -> Timeout<S, D> {
        Timeout {
            inner,
            timeout: self.timeout,
            policy: self.policy.clone(),
        }
    }
}

/// The timeout service.
#[derive(Debug, Clone)]
pub struct Timeout<S, D = Propagate> {
    inner: S,
    timeout: Duration,
    policy: D,
}

impl<S, D, Req> Service<Req> for Timeout<S, D>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    D: DeadlinePolicy<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let now = Instant::now();
        let own = now + self.timeout;
        let deadline = self.policy.incoming(&req, now).map_or(own, |d| d.min(own));
        let budget = deadline.saturating_duration_since(now);
        if budget.is_zero() {
            return ResponseFuture::Expired {
                error: Some(Elapsed { after: budget }),
            };
        }
        self.policy.outgoing(&mut req, deadline, now);
        ResponseFuture::Running {
            inner: self.inner.call(req),
            sleep: tokio::time::sleep_until(deadline),
            budget,
        }
    }
}

pin_project! {
    /// Future of [`Timeout`].
    #[project = Proj]
    #[allow(missing_docs)] // variant fields are private in spirit
    #[derive(Debug)]
    pub enum ResponseFuture<F> {
        /// The call races its deadline.
        Running { #[pin] inner: F, #[pin] sleep: Sleep, budget: Duration },
        /// No budget left: never started.
        Expired { error: Option<Elapsed> },
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
            Proj::Running {
                inner,
                sleep,
                budget,
            } => {
                if let Poll::Ready(out) = inner.poll(cx) {
                    return Poll::Ready(out.map_err(Into::into));
                }
                std::task::ready!(sleep.poll(cx));
                Poll::Ready(Err(Elapsed { after: *budget }.into()))
            }
            Proj::Expired { error } => Poll::Ready(Err(error
                .take()
                .map_or_else(|| "polled after completion".into(), Into::into))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn caller_deadline_shortens_the_budget() {
        let layer = TimeoutLayer::new(TimeoutConfig { timeout_ms: 1000 }).unwrap();
        let svc = layer.layer(tower::service_fn(|req: http::Request<()>| async move {
            let ms: u64 = req.headers()[DEADLINE_HEADER]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
            Ok::<_, BoxError>(ms)
        }));
        let req = http::Request::builder()
            .header(DEADLINE_HEADER, "300")
            .body(())
            .unwrap();
        assert_eq!(svc.clone().oneshot(req).await.unwrap(), 300);
        let req = http::Request::builder()
            .header(GRPC_TIMEOUT_HEADER, "100m")
            .body(())
            .unwrap();
        let e = svc.clone().oneshot(req).await.unwrap_err();
        assert_eq!(
            e.downcast_ref::<Elapsed>().unwrap().after,
            Duration::from_millis(100)
        );
        let req = http::Request::builder()
            .header(DEADLINE_HEADER, "0")
            .body(())
            .unwrap();
        assert!(svc.oneshot(req).await.unwrap_err().is::<Elapsed>());
    }
}
