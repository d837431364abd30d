//! Errors of the concurrency limiters.

use std::time::Duration;

/// The bulkhead had no free slot and its queue was full, or the call waited
/// the maximum time in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bulkhead full ({}); waited {} ms", if *.queue_full { "queue full" } else { "max wait reached" }, waited.as_millis())]
pub struct BulkheadFull {
    /// True if rejected because the queue was full, false if it timed out waiting.
    pub queue_full: bool,
    /// How long the call waited before being rejected.
    pub waited: Duration,
}

/// Load was shed: the adaptive limit or the system-load guard says the
/// service cannot take more work right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("overloaded: {in_flight} calls in flight, limit {limit}")]
pub struct Overloaded {
    /// Calls in flight when rejected.
    pub in_flight: u64,
    /// The limit in force.
    pub limit: u64,
}
