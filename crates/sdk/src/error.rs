//! The SDK's errors.

use meshwork_coord::CoordError;

/// Errors of the SDK's control-plane operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The control plane refused or failed the operation.
    #[error(transparent)]
    Coord(#[from] CoordError),
    /// An option or argument is invalid; the message says what to fix.
    #[error("{0}")]
    Invalid(String),
    /// A call to another service failed.
    #[error(transparent)]
    Call(#[from] CallError),
    /// Serving failed (bind, accept).
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a call to another service failed (after retries), each with a stable
/// [`code`](CallError::code).
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The registry lists no instance that takes traffic.
    #[error("{service} unavailable: no instance takes traffic")]
    NoInstance {
        /// Target service.
        service: String,
    },
    /// The circuit breaker of the target is open: failing fast.
    #[error("{service} unavailable: circuit open after repeated failures (failing fast)")]
    CircuitOpen {
        /// Target service.
        service: String,
    },
    /// The call (all tries) did not finish within the timeout or the caller's deadline.
    #[error("{service} timed out")]
    Timeout {
        /// Target service.
        service: String,
    },
    /// The answer was larger than the policy allows.
    #[error("{service} answered more than {limit} bytes")]
    TooLarge {
        /// Target service.
        service: String,
        /// The limit, bytes.
        limit: usize,
    },
    /// The request could not be built (bad path or header).
    #[error("invalid request to {service}: {reason}")]
    InvalidRequest {
        /// Target service.
        service: String,
        /// What is wrong.
        reason: String,
    },
    /// Connecting or talking to the instance failed.
    #[error("{service} unavailable: {reason}")]
    Transport {
        /// Target service.
        service: String,
        /// What failed.
        reason: String,
    },
    /// The control plane could not tell where the service is.
    #[error("{service}: discovery failed: {reason}")]
    Discovery {
        /// Target service.
        service: String,
        /// What failed.
        reason: String,
    },
}

impl CallError {
    /// A stable code: `no_instance`, `circuit_open`, `timeout`, `too_large`,
    /// `invalid_request`, `transport`, `discovery`.
    pub fn code(&self) -> &'static str {
        match self {
            CallError::NoInstance { .. } => "no_instance",
            CallError::CircuitOpen { .. } => "circuit_open",
            CallError::Timeout { .. } => "timeout",
            CallError::TooLarge { .. } => "too_large",
            CallError::InvalidRequest { .. } => "invalid_request",
            CallError::Transport { .. } => "transport",
            CallError::Discovery { .. } => "discovery",
        }
    }

    /// The target service.
    pub fn service(&self) -> &str {
        match self {
            CallError::NoInstance { service }
            | CallError::CircuitOpen { service }
            | CallError::Timeout { service }
            | CallError::TooLarge { service, .. }
            | CallError::InvalidRequest { service, .. }
            | CallError::Transport { service, .. }
            | CallError::Discovery { service, .. } => service,
        }
    }
}
