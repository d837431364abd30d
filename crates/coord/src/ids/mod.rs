//! Unique 63-bit ids with a Snowflake layout: `[0 | time | worker | sequence]`.
//!
//! An id is a positive `i64`: the top bit is always 0, then the milliseconds since
//! the layout's epoch, then the worker id, then a per-millisecond sequence (see
//! [`IdLayout`]). Ids of one worker strictly increase; ids of different workers
//! never collide because no two live generators share a worker id.
//!
//! Three pieces, from the inside out:
//!
//! - [`SnowflakeCore`] is the pure in-process generator (layout + worker + clock +
//!   state under a mutex), usable without any store; the throughput benchmark runs
//!   it alone.
//! - [`claim_worker`] takes a worker id for a node: the key
//!   `/meshwork/ids/workers/{worker:05}` on the node's session lease, created with
//!   an `absent(key)` transaction, so at most one session holds a worker id.
//! - [`IdGenerator`] runs a core for a claimed worker, guarded by the worker's
//!   *high-water mark*.
//!
//! # Invariant: a worker id is never reused for a timestamp already used
//!
//! The persistent key `/meshwork/ids/hwm/{worker:05}` (no lease) holds the highest
//! timestamp (Unix ms) up to which the worker's holder may have issued ids. A
//! generator only issues ids with a timestamp strictly below its *reservation*,
//! and it extends the reservation only after writing it to the high-water mark in
//! a transaction that also checks that its claim key is still the one it created
//! (same create revision). A new holder reads the high-water mark in the very
//! transaction that creates its claim, and issues only timestamps strictly above
//! it. So whatever the timing of a lease expiry, a takeover, a clock step or a
//! store outage, the old holder's timestamps are `< hwm` and the new holder's are
//! `> hwm`: no duplicate. When the reservation cannot be renewed the generator
//! stops ([`CoordError::Unavailable`]) instead of guessing.
//!
//! Clock trouble is never answered with a duplicate: a backwards step of at most
//! `max_backwards_wait` (default 5 s) is waited out, a larger one is refused with
//! [`CoordError::ClockBackwards`].
//!
//! Files, one concern each:
//!
//! - `layout` — [`IdLayout`]: the bit split, composing and decomposing ids;
//! - `clock` — the [`Clock`] the generator reads: [`SystemClock`] (wall time anchored
//!   to the monotonic clock) and [`ManualClock`] for tests;
//! - `snowflake` — [`SnowflakeCore`], the in-process generator;
//! - `claim` — [`claim_worker`] and [`WorkerClaim`];
//! - `generator` — [`IdGenerator`]: a core on a claim, with its reservation renewed
//!   in the store.

use std::time::Duration;

use crate::error::{CoordError, Result};

mod claim;
mod clock;
mod generator;
mod layout;
mod snowflake;

pub use claim::{WorkerClaim, claim_worker};
pub use clock::{Clock, ManualClock, SystemClock};
pub use generator::{IdGenerator, IdOptions};
pub use layout::IdLayout;
pub use snowflake::SnowflakeCore;

/// Key prefix of the worker claims (`{prefix}{worker:05}`, on a session lease).
pub const WORKERS_PREFIX: &str = "/meshwork/ids/workers/";
/// Key prefix of the per-worker high-water marks (`{prefix}{worker:05}`, no lease).
pub const HWM_PREFIX: &str = "/meshwork/ids/hwm/";
/// The most ids one [`IdGenerator::next_batch`] call may ask for.
pub const MAX_BATCH: usize = 10_000;
/// Default largest backwards clock step that is waited out rather than refused.
pub const DEFAULT_MAX_BACKWARDS_WAIT: Duration = Duration::from_secs(5);
/// Default length of a worker's reservation (renewed every half of it).
pub const DEFAULT_RESERVE: Duration = Duration::from_secs(2);

/// The key of worker `worker`'s claim.
pub fn worker_key(worker: u32) -> String {
    format!("{WORKERS_PREFIX}{worker:05}")
}

/// The key of worker `worker`'s high-water mark.
pub fn hwm_key(worker: u32) -> String {
    format!("{HWM_PREFIX}{worker:05}")
}

/// `d` in whole milliseconds (saturating).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Refuses a batch size outside `1..=MAX_BATCH`.
fn check_batch(n: usize) -> Result<()> {
    if !(1..=MAX_BATCH).contains(&n) {
        return Err(CoordError::invalid(format!(
            "batch size must be 1..={MAX_BATCH}, got {n}"
        )));
    }
    Ok(())
}
