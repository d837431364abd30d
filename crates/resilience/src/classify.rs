//! Pluggable classification of call outcomes.
//!
//! The breaker, outlier detection and the adaptive limiter need to know
//! whether a call *failed*; retries need to know whether it may be
//! *retried*. Both are decided by a [`Classify`] implementation so the same
//! layer works for plain services, HTTP (5xx) and gRPC (`grpc-status`).
//! Latency-based "slow call" classification is done by the breaker itself
//! from its `slow_call_duration_ms` bound.
//!
//! ```
//! use meshwork_resilience::classify::{Classify, GrpcStatus, HttpServerErrors, Outcome};
//!
//! let unavailable = http::Response::builder().header("grpc-status", "14").body(()).unwrap();
//! assert_eq!(Classify::<_, ()>::classify(&GrpcStatus::default(), Ok(&unavailable)), Outcome::Failure);
//! let not_found = http::Response::builder().status(404).body(()).unwrap();
//! assert_eq!(Classify::<_, ()>::classify(&HttpServerErrors, Ok(&not_found)), Outcome::Ignored);
//! ```

use std::marker::PhantomData;

/// What a finished call means for the health of the callee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The callee did its job.
    Success,
    /// The callee failed (counts against it).
    Failure,
    /// Neither: e.g. a client error (4xx) or a cancelled call.
    Ignored,
}

/// Decides the [`Outcome`] of a call from its result.
pub trait Classify<Res, E>: Clone + Send + Sync + 'static {
    /// Classifies one result.
    fn classify(&self, result: Result<&Res, &E>) -> Outcome;
}

/// Every `Err` is a failure, every `Ok` a success. The default.
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorsAsFailures;

impl<Res, E> Classify<Res, E> for ErrorsAsFailures {
    #[inline]
    fn classify(&self, result: Result<&Res, &E>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }
    }
}

/// HTTP: errors and 5xx responses are failures; 4xx are ignored (the
/// client's fault, not the server's); everything else is a success.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpServerErrors;

impl<B, E> Classify<http::Response<B>, E> for HttpServerErrors {
    fn classify(&self, result: Result<&http::Response<B>, &E>) -> Outcome {
        match result {
            Err(_) => Outcome::Failure,
            Ok(r) if r.status().is_server_error() => Outcome::Failure,
            Ok(r) if r.status().is_client_error() => Outcome::Ignored,
            Ok(_) => Outcome::Success,
        }
    }
}

/// A set of HTTP status codes (100..=599), copied cheaply.
///
/// ```
/// use meshwork_resilience::classify::StatusSet;
///
/// let set = StatusSet::from_codes([502, 503, 504]).unwrap();
/// assert!(set.contains(503) && !set.contains(500));
/// assert_eq!(set.codes(), vec![502, 503, 504]);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatusSet([u64; 10]);

impl StatusSet {
    /// No status.
    pub const EMPTY: StatusSet = StatusSet([0; 10]);

    /// The statuses that say an upstream failed, not the request: 502, 503
    /// and 504 (the gateway-failure set, as Envoy's `gateway-error`).
    pub const UPSTREAM_FAILURES: StatusSet = {
        let mut bits = [0u64; 10];
        bits[502 / 64] |= 1 << (502 % 64);
        bits[503 / 64] |= 1 << (503 % 64);
        bits[504 / 64] |= 1 << (504 % 64);
        StatusSet(bits)
    };

    /// The set of `codes`; `Err` names the first code outside 100..=599.
    pub fn from_codes(codes: impl IntoIterator<Item = u16>) -> Result<Self, u16> {
        let mut set = Self::EMPTY;
        for c in codes {
            if !(100..=599).contains(&c) {
                return Err(c);
            }
            set.0[usize::from(c / 64)] |= 1 << (c % 64);
        }
        Ok(set)
    }

    /// Whether `code` is in the set.
    #[inline]
    pub fn contains(&self, code: u16) -> bool {
        self.0
            .get(usize::from(code / 64))
            .is_some_and(|w| w & (1 << (code % 64)) != 0)
    }

    /// The codes, ascending.
    pub fn codes(&self) -> Vec<u16> {
        (100..=599).filter(|c| self.contains(*c)).collect()
    }
}

impl Default for StatusSet {
    fn default() -> Self {
        Self::UPSTREAM_FAILURES
    }
}

impl std::fmt::Debug for StatusSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.codes()).finish()
    }
}

/// HTTP, judging the upstream rather than the request: errors (connect
/// failures, resets, malformed responses) and responses whose status is in
/// `statuses` (default 502, 503, 504) are failures; every other response is
/// a success, since the upstream answered. A 500 from a handler or a 4xx
/// about the request says nothing about whether the instance is healthy.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpUpstreamFailures {
    /// Statuses that count as failures.
    pub statuses: StatusSet,
}

impl<B, E> Classify<http::Response<B>, E> for HttpUpstreamFailures {
    fn classify(&self, result: Result<&http::Response<B>, &E>) -> Outcome {
        match result {
            Err(_) => Outcome::Failure,
            Ok(r) if self.statuses.contains(r.status().as_u16()) => Outcome::Failure,
            Ok(_) => Outcome::Success,
        }
    }
}

/// gRPC status code `DEADLINE_EXCEEDED`.
pub const GRPC_DEADLINE_EXCEEDED: u16 = 4;
/// gRPC status code `UNAVAILABLE`.
pub const GRPC_UNAVAILABLE: u16 = 14;

/// gRPC: errors and responses whose `grpc-status` header is one of
/// `failure_codes` (by default UNAVAILABLE and DEADLINE_EXCEEDED) are
/// failures; HTTP 5xx too.
///
/// Only the response *headers* are inspected, which covers trailers-only
/// responses (how servers report errors before any message); a status sent in
/// trailers after a streamed body is not seen here.
#[derive(Debug, Clone)]
pub struct GrpcStatus {
    /// Status codes that count as failures.
    pub failure_codes: Vec<u16>,
}

impl Default for GrpcStatus {
    fn default() -> Self {
        Self {
            failure_codes: vec![GRPC_UNAVAILABLE, GRPC_DEADLINE_EXCEEDED],
        }
    }
}

impl<B, E> Classify<http::Response<B>, E> for GrpcStatus {
    fn classify(&self, result: Result<&http::Response<B>, &E>) -> Outcome {
        let resp = match result {
            Err(_) => return Outcome::Failure,
            Ok(r) => r,
        };
        if resp.status().is_server_error() {
            return Outcome::Failure;
        }
        let code = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<u16>().ok());
        match code {
            Some(c) if self.failure_codes.contains(&c) => Outcome::Failure,
            _ => Outcome::Success,
        }
    }
}

/// A classifier from a closure.
pub struct FnClassify<F, Res, E> {
    f: F,
    _marker: PhantomData<fn(&Res, &E)>,
}

impl<F: Clone, Res, E> Clone for FnClassify<F, Res, E> {
    fn clone(&self) -> Self {
        Self {
            f: self.f.clone(),
            _marker: PhantomData,
        }
    }
}

impl<F, Res, E> FnClassify<F, Res, E> {
    /// Wraps `f`.
    pub fn new(f: F) -> Self {
        Self {
            f,
            _marker: PhantomData,
        }
    }
}

impl<F, Res: 'static, E: 'static> Classify<Res, E> for FnClassify<F, Res, E>
where
    F: Fn(Result<&Res, &E>) -> Outcome + Clone + Send + Sync + 'static,
{
    fn classify(&self, result: Result<&Res, &E>) -> Outcome {
        (self.f)(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_and_grpc() {
        let ok = http::Response::builder().status(200).body(()).unwrap();
        let e500 = http::Response::builder().status(503).body(()).unwrap();
        let e404 = http::Response::builder().status(404).body(()).unwrap();
        let c = HttpServerErrors;
        assert_eq!(Classify::<_, ()>::classify(&c, Ok(&ok)), Outcome::Success);
        assert_eq!(Classify::<_, ()>::classify(&c, Ok(&e500)), Outcome::Failure);
        assert_eq!(Classify::<_, ()>::classify(&c, Ok(&e404)), Outcome::Ignored);
        let g = GrpcStatus::default();
        let unavailable = http::Response::builder()
            .status(200)
            .header("grpc-status", "14")
            .body(())
            .unwrap();
        let not_found = http::Response::builder()
            .status(200)
            .header("grpc-status", "5")
            .body(())
            .unwrap();
        assert_eq!(
            Classify::<_, ()>::classify(&g, Ok(&unavailable)),
            Outcome::Failure
        );
        assert_eq!(
            Classify::<_, ()>::classify(&g, Ok(&not_found)),
            Outcome::Success
        );
        assert_eq!(
            Classify::<http::Response<()>, _>::classify(&g, Err(&())),
            Outcome::Failure
        );
    }
}
