//! The one error type of the coordination layer, with a stable machine-readable
//! code for every variant (the HTTP API puts it in its JSON error bodies).

use crate::config::format::FormatError;

/// What went wrong in a coordination call.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// The caller sent something invalid; the message says what to fix.
    #[error("{0}")]
    Invalid(String),
    /// A size limit was exceeded.
    #[error("{0}")]
    TooLarge(String),
    /// Content does not parse in its declared format.
    #[error("{0}")]
    Format(#[from] FormatError),
    /// The thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A compare-and-set lost: the state moved on since the caller read it.
    #[error("{0}")]
    Conflict(String),
    /// A lock wait ran out: someone else holds it.
    #[error("lock {name:?} is held by {holder:?}; gave up after {waited_ms} ms")]
    Held {
        /// The lock.
        name: String,
        /// Who holds it, as the holder described itself.
        holder: String,
        /// How long the caller waited.
        waited_ms: u64,
    },
    /// A wait (campaign, long-poll) ran out of time.
    #[error("{0}")]
    Timeout(String),
    /// The wall clock moved backwards further than the ID generator may wait.
    #[error("{0}")]
    ClockBackwards(String),
    /// No etcd endpoint answered within the retry window.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The etcd endpoint refused the request.
    #[error("store error: {0}")]
    Backend(String),
    /// Stored data could not be decoded (written by something else?).
    #[error("corrupt record at {key}: {reason}")]
    Corrupt {
        /// The key holding the record.
        key: String,
        /// Why it does not decode.
        reason: String,
    },
}

impl CoordError {
    /// The stable code for API clients (`invalid_argument`, `not_found`, ...).
    pub fn code(&self) -> &'static str {
        match self {
            CoordError::Invalid(_) => "invalid_argument",
            CoordError::TooLarge(_) => "too_large",
            CoordError::Format(_) => "invalid_format",
            CoordError::NotFound(_) => "not_found",
            CoordError::Conflict(_) => "conflict",
            CoordError::Held { .. } => "lock_held",
            CoordError::Timeout(_) => "timeout",
            CoordError::ClockBackwards(_) => "clock_moved_backwards",
            CoordError::Unavailable(_) => "store_unavailable",
            CoordError::Backend(_) => "store_error",
            CoordError::Corrupt { .. } => "corrupt_record",
        }
    }

    /// The HTTP status that goes with [`CoordError::code`].
    pub fn http_status(&self) -> u16 {
        match self {
            CoordError::Invalid(_) | CoordError::Format(_) => 400,
            CoordError::NotFound(_) => 404,
            CoordError::Timeout(_) => 408,
            CoordError::Conflict(_) | CoordError::Held { .. } => 409,
            CoordError::TooLarge(_) => 413,
            CoordError::Corrupt { .. } => 500,
            CoordError::Backend(_) => 502,
            CoordError::Unavailable(_) | CoordError::ClockBackwards(_) => 503,
        }
    }

    /// A shorthand for [`CoordError::Invalid`].
    pub fn invalid(msg: impl Into<String>) -> CoordError {
        CoordError::Invalid(msg.into())
    }
}

/// Result of a coordination call.
pub type Result<T, E = CoordError> = std::result::Result<T, E>;
