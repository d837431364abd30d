//! What may be retried, and how to copy a request for another attempt.

use tokio::time::Instant;

use crate::timeout::DeadlineCarrier;

/// Retry policy.
pub trait RetryPolicy<Req, Res, E>: Clone + Send + Sync + 'static {
    /// Whether this result should be retried (if attempts and budget allow).
    fn retryable(&self, result: Result<&Res, &E>) -> bool;
    /// A copy of the request for another attempt (`None`: cannot retry it).
    fn clone_request(&self, req: &Req) -> Option<Req>;
    /// The caller's deadline: no retry is started that would end past it.
    fn deadline(&self, _req: &Req, _now: Instant) -> Option<Instant> {
        None
    }
}

/// Retries every `Err` of a cloneable request; `Ok` is final.
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryErrors;

impl<Req: Clone, Res, E> RetryPolicy<Req, Res, E> for RetryErrors {
    fn retryable(&self, result: Result<&Res, &E>) -> bool {
        result.is_err()
    }
    fn clone_request(&self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

/// HTTP: retries transport errors and 502/503/504 of idempotent requests
/// (GET, HEAD, OPTIONS, PUT, DELETE, TRACE) unless `all_methods`, honouring
/// the request's deadline (see [`crate::timeout`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryHttp {
    /// Also retry POST/PATCH (only if the callee is known to be idempotent).
    pub all_methods: bool,
}

impl<B: Clone, Res, E> RetryPolicy<http::Request<B>, http::Response<Res>, E> for RetryHttp {
    fn retryable(&self, result: Result<&http::Response<Res>, &E>) -> bool {
        match result {
            Err(_) => true,
            Ok(r) => matches!(r.status().as_u16(), 502..=504),
        }
    }
    fn clone_request(&self, req: &http::Request<B>) -> Option<http::Request<B>> {
        use http::Method;
        let idempotent = matches!(
            *req.method(),
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::PUT
                | Method::DELETE
                | Method::TRACE
        );
        (idempotent || self.all_methods).then(|| req.clone())
    }
    fn deadline(&self, req: &http::Request<B>, now: Instant) -> Option<Instant> {
        req.deadline(now)
    }
}
