//! The `eventually` family for synchronous tests (ones that drive child
//! processes with blocking sockets): same contract, a thread sleep between
//! polls.

use std::time::{Duration, Instant};

use crate::POLL_EVERY;

/// Polls `f` until it returns `Some`, and returns the value; fails the test
/// naming `what` once `within` has passed.
pub fn eventually<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(POLL_EVERY);
    }
}

/// [`eventually`] for a condition without a value: polls until `f` is true.
pub fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    eventually(what, within, || f().then_some(()))
}
