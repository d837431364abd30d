//! Fallback / degradation: turn a rejection into the response of a fallback
//! service.
//!
//! [`Fallback`] calls the inner service; when it fails with an error the
//! predicate accepts (by default [`is_rejection`]: an open breaker, a rate
//! limit, shed load, a full bulkhead or a timeout), it calls the fallback
//! service with that error (as a [`Rejection`]) and returns its response
//! instead. Other errors pass through. The fallback gets the error, not the
//! request (which the inner service consumed): degrade to a cached or static
//! answer.
//!
//! Give the fallback service a concrete error type, ideally
//! `std::convert::Infallible` (a fallback that can fail is rarely useful):
//! with `BoxError` as the fallback's error, rustc (as of 1.95) cannot prove
//! the stack's future `Send` inside `tokio::spawn` (a known higher-ranked
//! lifetime limitation with `Box<dyn Error>`).
//! Counted in `meshwork_fallback_total`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use meshwork_resilience::fallback::{FallbackLayer, Rejection};
//! use meshwork_resilience::{BoxError, CircuitOpen};
//! use tower::{Layer, ServiceExt};
//!
//! let failing = tower::service_fn(|_: ()| async {
//!     Err::<&str, BoxError>(Box::new(CircuitOpen { remaining: Default::default() }))
//! });
//! let degraded = tower::service_fn(|r: Rejection| async move {
//!     assert!(r.is::<CircuitOpen>());
//!     Ok::<_, std::convert::Infallible>("cached answer")
//! });
//! let svc = FallbackLayer::new(degraded).layer(failing);
//! assert_eq!(svc.oneshot(()).await.unwrap(), "cached answer");
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::BoxError;
use crate::limit::concurrency::{BulkheadFull, Overloaded};
use crate::{CircuitOpen, Elapsed, RateLimited};

/// True for the errors this crate produces when it refuses or abandons a
/// call: [`CircuitOpen`], [`RateLimited`], [`Overloaded`], [`BulkheadFull`],
/// [`Elapsed`], and [`NoEndpoint`](crate::balance::NoEndpoint).
pub fn is_rejection(e: &BoxError) -> bool {
    e.is::<CircuitOpen>()
        || e.is::<RateLimited>()
        || e.is::<Overloaded>()
        || e.is::<BulkheadFull>()
        || e.is::<Elapsed>()
        || e.is::<crate::balance::NoEndpoint>()
}

/// The error a fallback service is called with.
///
/// A named type rather than a bare `BoxError`, so that closures taking it
/// (`service_fn(|r: Rejection| ...)`) stay `Send` across `tokio::spawn`.
#[derive(Debug)]
pub struct Rejection {
    /// Why the call was refused.
    pub error: BoxError,
}

impl Rejection {
    /// Whether the error is a `T`.
    pub fn is<T: std::error::Error + 'static>(&self) -> bool {
        self.error.is::<T>()
    }
}

/// Layer for [`Fallback`].
#[derive(Debug, Clone)]
pub struct FallbackLayer<F> {
    fallback: F,
    predicate: fn(&Rejection) -> bool,
}

impl<F> FallbackLayer<F> {
    /// Falls back on [`is_rejection`] errors.
    pub fn new(fallback: F) -> Self {
        Self {
            fallback,
            predicate: |r| is_rejection(&r.error),
        }
    }
    /// Falls back on errors `predicate` accepts.
    pub fn when(fallback: F, predicate: fn(&Rejection) -> bool) -> Self {
        Self {
            fallback,
            predicate,
        }
    }
}

impl<S, F: Clone> Layer<S> for FallbackLayer<F> {
    type Service = Fallback<S, F>;
    fn layer(&self, inner: S) -> Self::Service {
        Fallback {
            inner,
            fallback: self.fallback.clone(),
            predicate: self.predicate,
        }
    }
}

/// The fallback service.
#[derive(Debug, Clone)]
pub struct Fallback<S, F> {
    inner: S,
    fallback: F,
    predicate: fn(&Rejection) -> bool,
}

impl<S, F, Req> Service<Req> for Fallback<S, F>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    F: Service<Rejection, Response = S::Response> + Clone,
    F::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, F>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ResponseFuture::Inner {
            fut: self.inner.call(req),
            fallback: Some(self.fallback.clone()),
            predicate: self.predicate,
        }
    }
}

pin_project! {
    /// Future of [`Fallback`].
    #[project = Proj]
    #[allow(missing_docs)] // variant fields are private in spirit
    pub enum ResponseFuture<Fut, F: Service<Rejection>> {
        /// The inner call runs.
        Inner { #[pin] fut: Fut, fallback: Option<F>, predicate: fn(&Rejection) -> bool },
        /// Waiting for the fallback to be ready.
        Ready { fallback: Option<F>, rejection: Option<Rejection> },
        /// The fallback call runs.
        Fallback { #[pin] fut: F::Future },
    }
}

impl<Fut, F, T, E> Future for ResponseFuture<Fut, F>
where
    Fut: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    F: Service<Rejection, Response = T>,
    F::Error: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                Proj::Inner {
                    fut,
                    fallback,
                    predicate,
                } => {
                    let error: BoxError = match std::task::ready!(fut.poll(cx)) {
                        Ok(response) => return Poll::Ready(Ok(response)),
                        Err(e) => e.into(),
                    };
                    let rejection = Rejection { error };
                    if !predicate(&rejection) {
                        return Poll::Ready(Err(rejection.error));
                    }
                    metrics::counter!("meshwork_fallback_total").increment(1);
                    let fallback = fallback.take();
                    self.set(ResponseFuture::Ready {
                        fallback,
                        rejection: Some(rejection),
                    });
                }
                Proj::Ready {
                    fallback,
                    rejection,
                } => {
                    let Some(f) = fallback.as_mut() else {
                        return Poll::Ready(Err("fallback polled after completion".into()));
                    };
                    std::task::ready!(f.poll_ready(cx)).map_err(Into::into)?;
                    let Some(rejection) = rejection.take() else {
                        return Poll::Ready(Err("fallback polled after completion".into()));
                    };
                    let fut = f.call(rejection);
                    self.set(ResponseFuture::Fallback { fut });
                }
                Proj::Fallback { fut } => return fut.poll(cx).map_err(Into::into),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn only_rejections_fall_back() {
        let fallback =
            tower::service_fn(|_: Rejection| async { Ok::<_, std::convert::Infallible>(0u32) });
        let inner = tower::service_fn(|kind: u8| async move {
            match kind {
                0 => Ok(1u32),
                1 => Err::<u32, BoxError>(Box::new(RateLimited {
                    retry_after: Default::default(),
                })),
                _ => Err("boom".into()),
            }
        });
        let svc = FallbackLayer::new(fallback).layer(inner);
        assert_eq!(svc.clone().oneshot(0).await.unwrap(), 1);
        assert_eq!(svc.clone().oneshot(1).await.unwrap(), 0);
        assert_eq!(svc.oneshot(2).await.unwrap_err().to_string(), "boom");
    }
}
