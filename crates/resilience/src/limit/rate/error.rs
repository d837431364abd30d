//! The error a rate limiter returns when it rejects a call.

use std::time::Duration;

/// The call was over the configured rate and was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limited: retry in {} ms", retry_after.as_millis())]
pub struct RateLimited {
    /// Earliest time from now at which the same call could be admitted
    /// (a hint: other callers may take the slot first).
    pub retry_after: Duration,
}
