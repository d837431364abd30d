//! The error a timed-out call returns.

use std::time::Duration;

/// The call did not finish before its deadline (its own timeout or the
/// caller's propagated deadline, whichever came first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline exceeded after {} ms", after.as_millis())]
pub struct Elapsed {
    /// Time budget the call had.
    pub after: Duration,
}
