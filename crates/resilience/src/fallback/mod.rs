//! Fallback / degradation: turn a rejection into the response of a fallback
//! service.
//!
//! [`Fallback`] calls the inner service; when it fails with an error the
//! predicate accepts (by default [`is_rejection`]: an open breaker, a rate
//! limit, shed load, a full bulkhead or a timeout), it calls the fallback
//! service with that error and returns its response instead. Other errors
//! pass through. The fallback gets the error, not the request (which the
//! inner service consumed): degrade to a cached or static answer.
//! Counted in `meshwork_fallback_total`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use meshwork_resilience::fallback::FallbackLayer;
//! use meshwork_resilience::{BoxError, CircuitOpen};
//! use tower::{Layer, ServiceExt};
//!
//! let failing = tower::service_fn(|_: ()| async {
//!     Err::<&str, BoxError>(Box::new(CircuitOpen { remaining: Default::default() }))
//! });
//! let degraded = tower::service_fn(|_e: BoxError| async { Ok::<_, BoxError>("cached answer") });
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

/// Layer for [`Fallback`].
#[derive(Debug, Clone)]
pub struct FallbackLayer<F> {
    fallback: F,
    predicate: fn(&BoxError) -> bool,
}

impl<F> FallbackLayer<F> {
    /// Falls back on [`is_rejection`] errors.
    pub fn new(fallback: F) -> Self {
        Self {
            fallback,
            predicate: is_rejection,
        }
    }
    /// Falls back on errors `predicate` accepts.
    pub fn when(fallback: F, predicate: fn(&BoxError) -> bool) -> Self {
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
    predicate: fn(&BoxError) -> bool,
}

impl<S, F, Req> Service<Req> for Fallback<S, F>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    F: Service<BoxError, Response = S::Response> + Clone,
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
    pub enum ResponseFuture<Fut, F: Service<BoxError>> {
        /// The inner call runs.
        Inner { #[pin] fut: Fut, fallback: Option<F>, predicate: fn(&BoxError) -> bool },
        /// Waiting for the fallback to be ready.
        Ready { fallback: Option<F>, error: Option<BoxError> },
        /// The fallback call runs.
        Fallback { #[pin] fut: F::Future },
    }
}

impl<Fut, F, T, E> Future for ResponseFuture<Fut, F>
where
    Fut: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    F: Service<BoxError, Response = T>,
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
                    if !predicate(&error) {
                        return Poll::Ready(Err(error));
                    }
                    metrics::counter!("meshwork_fallback_total").increment(1);
                    let fallback = fallback.take();
                    self.set(ResponseFuture::Ready {
                        fallback,
                        error: Some(error),
                    });
                }
                Proj::Ready { fallback, error } => {
                    let Some(f) = fallback.as_mut() else {
                        return Poll::Ready(Err("fallback polled after completion".into()));
                    };
                    std::task::ready!(f.poll_ready(cx)).map_err(Into::into)?;
                    let error = error.take().unwrap_or_else(|| "rejected".into());
                    let fut = f.call(error);
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
        let fallback = tower::service_fn(|_: BoxError| async { Ok::<_, BoxError>(0u32) });
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
