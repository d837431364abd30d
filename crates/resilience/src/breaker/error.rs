//! The error a breaker returns when it rejects a call.

use std::time::Duration;

/// The circuit is open (or half-open with every probe slot taken): the call
/// was rejected without reaching the inner service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit open: calls are rejected for another {} ms", remaining.as_millis())]
pub struct CircuitOpen {
    /// How long the breaker stays open; zero while half-open probes run.
    pub remaining: Duration,
}
