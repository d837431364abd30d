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

/// How one HTTP try ended, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpTryEnd {
    /// Nothing reached the callee (no connection, or it closed before the
    /// request was written).
    NotSent,
    /// The exchange broke after the request (or part of it) was sent, or the
    /// try timed out.
    Failed,
    /// The callee answered with this status.
    Answered(u16),
}

/// Methods that may be sent twice (RFC 9110 §9.2.2).
pub fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The one HTTP retry rule, shared by the SDK's [`RetryHttp`] and the
/// gateway: a try that sent nothing may always go again; a broken or
/// timed-out one, or a 502/503/504, only when the method may be sent twice
/// (`all_methods` says the callee is idempotent whatever the method).
/// Attempts, budgets, deadlines and body replay are the caller's to check.
pub fn should_retry(method: &http::Method, end: HttpTryEnd, all_methods: bool) -> bool {
    let twice = all_methods || idempotent(method);
    match end {
        HttpTryEnd::NotSent => true,
        HttpTryEnd::Failed => twice,
        HttpTryEnd::Answered(status) => twice && matches!(status, 502..=504),
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
    // The method half of `should_retry` is applied by `clone_request` (a
    // request that may not be sent twice is not copied); here the outcome half,
    // with every transport error counted as `Failed`.
    fn retryable(&self, result: Result<&http::Response<Res>, &E>) -> bool {
        let end = match result {
            Err(_) => HttpTryEnd::Failed,
            Ok(r) => HttpTryEnd::Answered(r.status().as_u16()),
        };
        should_retry(&http::Method::GET, end, true)
    }
    fn clone_request(&self, req: &http::Request<B>) -> Option<http::Request<B>> {
        should_retry(req.method(), HttpTryEnd::Failed, self.all_methods).then(|| req.clone())
    }
    fn deadline(&self, req: &http::Request<B>, now: Instant) -> Option<Instant> {
        req.deadline(now)
    }
}

#[cfg(test)]
mod rule_tests {
    use super::*;
    use http::Method;

    #[test]
    fn one_rule_for_gateway_and_sdk() {
        // Nothing sent: any method may go again.
        assert!(should_retry(&Method::POST, HttpTryEnd::NotSent, false));
        // Sent: only what may be sent twice.
        assert!(should_retry(&Method::GET, HttpTryEnd::Failed, false));
        assert!(!should_retry(&Method::POST, HttpTryEnd::Failed, false));
        assert!(should_retry(&Method::POST, HttpTryEnd::Failed, true));
        for status in [502, 503, 504] {
            assert!(should_retry(
                &Method::PUT,
                HttpTryEnd::Answered(status),
                false
            ));
            assert!(!should_retry(
                &Method::PATCH,
                HttpTryEnd::Answered(status),
                false
            ));
        }
        for status in [200, 404, 500, 501, 505] {
            assert!(!should_retry(
                &Method::GET,
                HttpTryEnd::Answered(status),
                true
            ));
        }
        assert!(idempotent(&Method::DELETE) && !idempotent(&Method::POST));
    }
}
