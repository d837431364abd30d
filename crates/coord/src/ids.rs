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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshwork_etcd::proto::etcdserverpb as pb;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, KeyValue, txn};
use crate::error::{CoordError, Result};

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

// ---------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------

/// How the 63 usable bits of an id are split: time (the rest), worker, sequence.
///
/// Every node of a cluster must use the same layout: worker ids are only unique
/// under one layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdLayout {
    /// Bits of the worker id (1..=16): at most 2^worker_bits generators run at once.
    pub worker_bits: u8,
    /// Bits of the sequence (8..=16): at most 2^sequence_bits ids per ms per worker.
    pub sequence_bits: u8,
    /// The epoch, in ms since the Unix epoch; id timestamps count from it.
    pub epoch_ms: u64,
}

impl Default for IdLayout {
    fn default() -> Self {
        IdLayout {
            worker_bits: 10,
            sequence_bits: 13,
            epoch_ms: IdLayout::DEFAULT_EPOCH_MS,
        }
    }
}

impl IdLayout {
    /// The default epoch: 2025-01-01T00:00:00Z.
    pub const DEFAULT_EPOCH_MS: u64 = 1_735_689_600_000;
    /// The fewest timestamp bits a layout may keep (2^38 ms is about 8.7 years).
    pub const MIN_TIME_BITS: u8 = 38;

    /// Bits of the timestamp: `63 - worker_bits - sequence_bits` (40 by default,
    /// about 34.8 years of milliseconds from the epoch).
    pub fn time_bits(&self) -> u8 {
        63u8.saturating_sub(self.worker_bits)
            .saturating_sub(self.sequence_bits)
    }

    /// How many worker ids exist (`2^worker_bits`).
    pub fn workers(&self) -> u32 {
        1u32.checked_shl(u32::from(self.worker_bits))
            .unwrap_or(u32::MAX)
    }

    /// How many ids one worker can issue per millisecond (`2^sequence_bits`).
    pub fn ids_per_ms(&self) -> u32 {
        1u32.checked_shl(u32::from(self.sequence_bits))
            .unwrap_or(u32::MAX)
    }

    /// The first Unix ms the layout cannot represent (`epoch + 2^time_bits`).
    pub fn end_ms(&self) -> u64 {
        self.epoch_ms
            .saturating_add(1u64.checked_shl(u32::from(self.time_bits())).unwrap_or(0))
    }

    /// Checks the bit widths (worker 1..=16, sequence 8..=16, time at least 38).
    pub fn validate(&self) -> Result<()> {
        if !(1..=16).contains(&self.worker_bits) {
            return Err(CoordError::invalid(format!(
                "id layout: worker_bits must be 1..=16, got {}",
                self.worker_bits
            )));
        }
        if !(8..=16).contains(&self.sequence_bits) {
            return Err(CoordError::invalid(format!(
                "id layout: sequence_bits must be 8..=16, got {}",
                self.sequence_bits
            )));
        }
        let time_bits = self.time_bits();
        if time_bits < Self::MIN_TIME_BITS {
            return Err(CoordError::invalid(format!(
                "id layout: worker_bits + sequence_bits = {} leaves {time_bits} timestamp bits; \
                 at least {} are needed (at most {} for worker + sequence)",
                self.worker_bits + self.sequence_bits,
                Self::MIN_TIME_BITS,
                63 - Self::MIN_TIME_BITS
            )));
        }
        if self.epoch_ms.checked_add(1u64 << time_bits).is_none() {
            return Err(CoordError::invalid(format!(
                "id layout: epoch_ms {} is too large",
                self.epoch_ms
            )));
        }
        Ok(())
    }

    /// Builds the id of (`timestamp_ms` in Unix ms, `worker`, `sequence`); fails when a
    /// part is out of the layout's range.
    pub fn compose(&self, timestamp_ms: u64, worker: u32, sequence: u32) -> Result<i64> {
        self.validate()?;
        if timestamp_ms < self.epoch_ms || timestamp_ms >= self.end_ms() {
            return Err(CoordError::invalid(format!(
                "timestamp {timestamp_ms} ms is outside the id layout's range [{}, {})",
                self.epoch_ms,
                self.end_ms()
            )));
        }
        if worker >= self.workers() {
            return Err(CoordError::invalid(format!(
                "worker {worker} does not fit in {} worker bits",
                self.worker_bits
            )));
        }
        if sequence >= self.ids_per_ms() {
            return Err(CoordError::invalid(format!(
                "sequence {sequence} does not fit in {} sequence bits",
                self.sequence_bits
            )));
        }
        let t = timestamp_ms - self.epoch_ms;
        let s = u32::from(self.sequence_bits);
        let w = u32::from(self.worker_bits);
        let id = (t << (s + w)) | (u64::from(worker) << s) | u64::from(sequence);
        i64::try_from(id).map_err(|_| CoordError::invalid("id does not fit in 63 bits"))
    }

    /// Splits an id into `(timestamp_ms, worker, sequence)`, the timestamp in Unix ms
    /// (the epoch added back). The layout must be valid; the sign bit is ignored
    /// (no issued id is negative): use [`IdLayout::try_decompose`] on untrusted input.
    pub fn decompose(&self, id: i64) -> (u64, u32, u32) {
        self.try_decompose(id & i64::MAX)
            .unwrap_or((self.epoch_ms, 0, 0))
    }

    /// [`IdLayout::decompose`] that fails clearly for a negative id or an invalid
    /// layout; any non-negative id decomposes, whether or not it was ever issued.
    pub fn try_decompose(&self, id: i64) -> Result<(u64, u32, u32)> {
        self.validate()?;
        let Ok(u) = u64::try_from(id) else {
            return Err(CoordError::invalid(format!(
                "id {id} is negative; ids are positive 63-bit integers"
            )));
        };
        let s = u32::from(self.sequence_bits);
        let w = u32::from(self.worker_bits);
        let sequence = u & ((1u64 << s) - 1);
        let worker = (u >> s) & ((1u64 << w) - 1);
        let t = u >> (s + w);
        // Both fit in 16 bits (validated).
        let worker = u32::try_from(worker).unwrap_or(u32::MAX);
        let sequence = u32::try_from(sequence).unwrap_or(u32::MAX);
        Ok((self.epoch_ms.saturating_add(t), worker, sequence))
    }
}

// ---------------------------------------------------------------------------
// Clocks
// ---------------------------------------------------------------------------

/// A source of Unix milliseconds for the generator; injectable for tests.
pub trait Clock: Send + Sync {
    /// The current time in ms since the Unix epoch.
    fn now_ms(&self) -> u64;

    /// Called while the generator waits for the clock to reach a later millisecond,
    /// `ms_to_go` (>= 1) ahead of the last reading. The default spins briefly when
    /// less than 2 ms remain (a sequence rollover: a sleep or a yield would overshoot
    /// by up to a scheduler slice) and sleeps `ms_to_go - 1` ms otherwise.
    fn wait(&self, ms_to_go: u64) {
        if ms_to_go <= 1 {
            for _ in 0..64 {
                std::hint::spin_loop();
            }
        } else {
            std::thread::sleep(Duration::from_millis(ms_to_go - 1));
        }
    }
}

/// Re-compare with the wall clock at most this often (ns of monotonic time).
const RECHECK_NS: u64 = 1_000_000;
/// Follow the wall clock forward when it is ahead by more than this.
const FORWARD_STEP_NS: u64 = 2_000_000;
/// Warn when the wall clock is behind by more than this.
const BACKWARD_WARN_NS: u64 = 1_000_000_000;
/// A comparison whose two monotonic readings are further apart is discarded.
const RECHECK_MAX_SKEW_NS: u64 = 200_000;

/// The production clock: wall time anchored to the monotonic clock.
///
/// Why not read [`SystemTime`] alone: the wall clock can step backwards (an NTP
/// step, an operator, a VM migration), and every step would make a running
/// generator wait or refuse. Why not [`Instant`] alone: it does not advance during
/// suspend and means nothing across processes, yet id timestamps must be
/// comparable with the high-water mark another process reads after a restart or a
/// takeover. So: `now = wall time at start + Instant elapsed`, which never goes
/// backwards within the process; and at most once per ms it is compared with
/// `SystemTime::now()`. A wall clock found *ahead* (resume from suspend, a forward
/// step) is followed, since moving forward can never duplicate an id. A wall clock
/// found *behind* is a backwards jump: it is logged and not followed, and the
/// timestamps keep coming from the monotonic clock; the high-water mark (written
/// from these same timestamps) is what protects a restart on the stepped-back
/// clock, which then waits or refuses.
pub struct SystemClock(Anchored<OsTime>);

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

/// Where an anchored clock reads time, in ns: the wall clock (Unix) and a
/// monotonic clock. The operating system's in production; a test's own to
/// step either of them at will.
trait TimeSource: Send + Sync {
    fn wall_ns(&self) -> u64;
    fn mono_ns(&self) -> u64;
}

/// The operating system's clocks: `SystemTime` and `Instant` since start.
struct OsTime {
    start: Instant,
}

impl TimeSource for OsTime {
    fn wall_ns(&self) -> u64 {
        wall_ns()
    }

    fn mono_ns(&self) -> u64 {
        nanos(self.start.elapsed())
    }
}

/// The anchoring logic of [`SystemClock`] over any [`TimeSource`].
struct Anchored<T> {
    src: T,
    /// Wall-clock ns at monotonic 0; only ever moves forward.
    base_ns: AtomicU64,
    /// Monotonic ns of the last comparison with the wall clock.
    checked_ns: AtomicU64,
    /// Whether the wall clock is known to be behind (warned once per episode).
    behind: AtomicBool,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(nanos)
        .unwrap_or(0)
}

/// Wall-clock Unix ms (for records, not for ids).
fn wall_ms() -> u64 {
    wall_ns() / 1_000_000
}

impl SystemClock {
    /// Anchors a new clock at the current wall time.
    pub fn new() -> SystemClock {
        SystemClock(Anchored::new(OsTime {
            start: Instant::now(),
        }))
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        self.0.now_ms()
    }
}

impl<T: TimeSource> Anchored<T> {
    fn new(src: T) -> Anchored<T> {
        let base = src.wall_ns().saturating_sub(src.mono_ns());
        Anchored {
            src,
            base_ns: AtomicU64::new(base),
            checked_ns: AtomicU64::new(0),
            behind: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        let mut base = self.base_ns.load(Ordering::Acquire);
        let el = self.src.mono_ns();
        if el.saturating_sub(self.checked_ns.load(Ordering::Relaxed)) >= RECHECK_NS {
            self.checked_ns.store(el, Ordering::Relaxed);
            base = self.recheck(base);
        }
        base.saturating_add(el) / 1_000_000
    }

    fn recheck(&self, base: u64) -> u64 {
        let el1 = self.src.mono_ns();
        let wall = self.src.wall_ns();
        let el2 = self.src.mono_ns();
        if el2.saturating_sub(el1) > RECHECK_MAX_SKEW_NS {
            return base; // preempted between the readings: the comparison means nothing
        }
        // `wall - el2` under-estimates the anchor, so reading order never ratchets it.
        let anchor = wall.saturating_sub(el2);
        if anchor > base.saturating_add(FORWARD_STEP_NS) {
            let prev = self.base_ns.fetch_max(anchor, Ordering::AcqRel);
            if anchor > prev {
                tracing::info!(
                    ahead_ms = (anchor - prev) / 1_000_000,
                    "wall clock is ahead of the monotonic clock (suspend or forward step); following it"
                );
            }
            self.behind.store(false, Ordering::Relaxed);
            return prev.max(anchor);
        }
        let behind = base.saturating_sub(anchor);
        if behind > BACKWARD_WARN_NS {
            if !self.behind.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    behind_ms = behind / 1_000_000,
                    "wall clock stepped backwards; id timestamps keep following the monotonic \
                     clock (a restart on this clock waits or refuses until it passes the high-water mark)"
                );
            }
        } else {
            self.behind.store(false, Ordering::Relaxed);
        }
        base
    }
}

/// A clock that moves only when told to (or by `step` ms on every reading), for
/// tests and simulations: [`Clock::wait`] advances it instead of sleeping, so
/// clock-trouble behaviour is deterministic and instant.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicU64,
    step: u64,
}

impl ManualClock {
    /// A clock standing at `now_ms`.
    pub fn new(now_ms: u64) -> ManualClock {
        ManualClock::with_step(now_ms, 0)
    }

    /// A clock at `now_ms` that advances `step_ms` after every reading.
    pub fn with_step(now_ms: u64, step_ms: u64) -> ManualClock {
        ManualClock {
            now: AtomicU64::new(now_ms),
            step: step_ms,
        }
    }

    /// Sets the time (backwards too).
    pub fn set(&self, now_ms: u64) {
        self.now.store(now_ms, Ordering::SeqCst);
    }

    /// Moves the time forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.now.fetch_add(ms, Ordering::SeqCst);
    }

    /// The time, without advancing it.
    pub fn peek(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now.fetch_add(self.step, Ordering::SeqCst)
    }

    fn wait(&self, ms_to_go: u64) {
        self.advance(ms_to_go.max(1));
    }
}

// ---------------------------------------------------------------------------
// The in-process core
// ---------------------------------------------------------------------------

struct State {
    /// The timestamp (Unix ms) of the last ids issued (or the floor).
    last_ms: u64,
    /// The next sequence to hand out at `last_ms` (`> max_seq`: exhausted).
    next_seq: u64,
}

/// The pure Snowflake generator for one worker id: no store, no background task.
///
/// Ids strictly increase across all callers (one mutex holds `(last_ms,
/// sequence)`). Running two cores with the same worker id at once is the caller's
/// bug; [`IdGenerator`] is the store-backed way to prevent it.
pub struct SnowflakeCore {
    layout: IdLayout,
    worker: u32,
    clock: Arc<dyn Clock>,
    max_wait_ms: u64,
    epoch_ms: u64,
    end_ms: u64,
    time_shift: u32,
    worker_part: u64,
    max_seq: u64,
    /// Timestamps must stay strictly below this (the reservation; `u64::MAX` = none).
    until_ms: AtomicU64,
    state: Mutex<State>,
}

impl SnowflakeCore {
    /// A core for `worker` of `layout`, reading `clock`; waits out backwards steps of
    /// up to [`DEFAULT_MAX_BACKWARDS_WAIT`].
    pub fn new(layout: IdLayout, worker: u32, clock: Arc<dyn Clock>) -> Result<SnowflakeCore> {
        layout.validate()?;
        if worker >= layout.workers() {
            return Err(CoordError::invalid(format!(
                "worker {worker} does not fit in {} worker bits (0..={})",
                layout.worker_bits,
                layout.workers() - 1
            )));
        }
        let s = u32::from(layout.sequence_bits);
        let w = u32::from(layout.worker_bits);
        Ok(SnowflakeCore {
            epoch_ms: layout.epoch_ms,
            end_ms: layout.end_ms(),
            layout,
            worker,
            clock,
            max_wait_ms: millis(DEFAULT_MAX_BACKWARDS_WAIT),
            time_shift: s + w,
            worker_part: u64::from(worker) << s,
            max_seq: (1u64 << s) - 1,
            until_ms: AtomicU64::new(u64::MAX),
            state: Mutex::new(State {
                last_ms: 0,
                next_seq: 0,
            }),
        })
    }

    /// Sets the largest backwards clock step that is waited out (larger: refused).
    pub fn with_max_backwards_wait(mut self, wait: Duration) -> SnowflakeCore {
        self.max_wait_ms = millis(wait);
        self
    }

    /// Forbids timestamps `<= hwm_ms` (ids this worker id may already have issued).
    pub fn with_high_water_mark(self, hwm_ms: u64) -> SnowflakeCore {
        {
            let mut st = self.state.lock();
            if hwm_ms >= st.last_ms {
                st.last_ms = hwm_ms;
                st.next_seq = self.max_seq + 1;
            }
        }
        self
    }

    /// The layout.
    pub fn layout(&self) -> &IdLayout {
        &self.layout
    }

    /// The worker id.
    pub fn worker(&self) -> u32 {
        self.worker
    }

    /// The timestamp (Unix ms) of the last id issued, or the high-water mark.
    pub fn last_timestamp_ms(&self) -> u64 {
        self.state.lock().last_ms
    }

    /// The next id.
    pub fn next(&self) -> Result<i64> {
        let mut id = 0;
        self.issue(1, |x| id = x)?;
        Ok(id)
    }

    /// `n` (1..=[`MAX_BATCH`]) strictly increasing ids. On an error none are returned
    /// (the ones skipped are never issued later either).
    pub fn next_batch(&self, n: usize) -> Result<Vec<i64>> {
        check_batch(n)?;
        let mut out = Vec::with_capacity(n);
        self.issue(n as u64, |x| out.push(x))?;
        Ok(out)
    }

    /// Raises the reservation: timestamps must stay below `until_ms`.
    fn extend_until(&self, until_ms: u64) {
        self.until_ms.fetch_max(until_ms, Ordering::AcqRel);
    }

    fn issue(&self, n: u64, mut emit: impl FnMut(i64)) -> Result<()> {
        let mut st = self.state.lock();
        let mut left = n;
        let mut wait_started: Option<Instant> = None;
        while left > 0 {
            let now = self.clock.now_ms();
            let target = if st.next_seq > self.max_seq {
                st.last_ms.saturating_add(1)
            } else {
                st.last_ms
            };
            if now < target {
                self.wait(&mut wait_started, now, target, st.last_ms)?;
                continue;
            }
            self.check_range(now)?;
            if now > st.last_ms {
                st.last_ms = now;
                st.next_seq = 0;
            }
            let take = left.min(self.max_seq + 1 - st.next_seq);
            let base = ((now - self.epoch_ms) << self.time_shift) | self.worker_part;
            for seq in st.next_seq..st.next_seq + take {
                // Below 2^63: validated layout, and `now < end_ms`.
                emit((base | seq) as i64);
            }
            st.next_seq += take;
            left -= take;
        }
        Ok(())
    }

    fn check_range(&self, now: u64) -> Result<()> {
        let until = self.until_ms.load(Ordering::Acquire);
        if now >= until {
            return Err(CoordError::Unavailable(format!(
                "worker reservation could not be renewed: worker {} may only issue ids with \
                 timestamps below {until} ms and the clock reads {now} ms; generation resumes \
                 once the store accepts a new reservation",
                self.worker
            )));
        }
        if now < self.epoch_ms {
            return Err(CoordError::invalid(format!(
                "the clock reads {now} ms, before the id layout's epoch ({} ms)",
                self.epoch_ms
            )));
        }
        if now >= self.end_ms {
            return Err(CoordError::invalid(format!(
                "the clock reads {now} ms, past the end of the id layout's time range ({} ms); \
                 a layout with a later epoch or more time bits is needed",
                self.end_ms
            )));
        }
        Ok(())
    }

    /// One step of waiting for the clock to reach `target`; refuses a backwards gap
    /// (relative to `last`) above the limit, and a clock that will not advance.
    fn wait(&self, started: &mut Option<Instant>, now: u64, target: u64, last: u64) -> Result<()> {
        let behind = last.saturating_sub(now);
        if behind > self.max_wait_ms {
            return Err(CoordError::ClockBackwards(format!(
                "clock moved backwards: it reads {now} ms, {behind} ms behind the last timestamp \
                 worker {} may have used ({last} ms); that is more than the {} ms the generator \
                 waits, so it refuses rather than risk duplicate ids",
                self.worker, self.max_wait_ms
            )));
        }
        let started = *started.get_or_insert_with(Instant::now);
        if started.elapsed() > Duration::from_millis(self.max_wait_ms.saturating_add(1000)) {
            return Err(CoordError::ClockBackwards(format!(
                "the clock did not reach {target} ms within {} ms (it reads {now} ms); \
                 worker {} refuses rather than risk duplicate ids",
                self.max_wait_ms.saturating_add(1000),
                self.worker
            )));
        }
        self.clock.wait(target - now);
        Ok(())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn check_batch(n: usize) -> Result<()> {
    if !(1..=MAX_BATCH).contains(&n) {
        return Err(CoordError::invalid(format!(
            "batch size must be 1..={MAX_BATCH}, got {n}"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Worker claims
// ---------------------------------------------------------------------------

/// The value of a claim key.
#[derive(Debug, Serialize, Deserialize)]
struct ClaimRecord {
    node: String,
    claimed_at_ms: u64,
    /// Random per claim attempt: recognises our own claim after a retried txn.
    #[serde(default)]
    token: String,
}

/// A worker id held by a session lease; turn it into a generator with
/// [`IdGenerator::start_claimed`]. Not `Clone`: one claim, one generator.
#[derive(Debug)]
pub struct WorkerClaim {
    layout: IdLayout,
    worker: u32,
    node: String,
    lease: i64,
    create_revision: i64,
    hwm_ms: u64,
}

impl WorkerClaim {
    /// The layout the worker id was claimed under.
    pub fn layout(&self) -> &IdLayout {
        &self.layout
    }

    /// The worker id.
    pub fn worker(&self) -> u32 {
        self.worker
    }

    /// The node name recorded in the claim.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The lease the claim key is on.
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// The create revision of the claim key (what renewals compare against).
    pub fn create_revision(&self) -> i64 {
        self.create_revision
    }

    /// The high-water mark read when claiming: ids must have timestamps above it.
    pub fn high_water_mark_ms(&self) -> u64 {
        self.hwm_ms
    }
}

/// FNV-1a: a hash that is stable across builds, so a node tends to get its worker back.
fn fnv1a(s: &str) -> u64 {
    let mut h = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut h, s.as_bytes());
    std::hash::Hasher::finish(&h)
}

fn parse_hwm(kvs: &[KeyValue]) -> Result<u64> {
    let Some(kv) = kvs.first() else {
        return Ok(0);
    };
    std::str::from_utf8(&kv.value)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(|| CoordError::Corrupt {
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            reason: "expected a decimal number of Unix milliseconds".into(),
        })
}

/// Claims a free worker id for `node` on `lease` (the node's session lease, kept
/// alive by the caller), and reads its high-water mark in the same transaction.
///
/// The scan starts at `hash(node) mod 2^worker_bits` and moves forward over the ids
/// that one read of the claims shows free, taking the first whose `absent(key)`
/// transaction wins. Fails with [`CoordError::Conflict`] when every worker id is
/// held by a live session.
pub async fn claim_worker(
    backend: &Backend,
    layout: &IdLayout,
    lease: i64,
    node: &str,
) -> Result<WorkerClaim> {
    layout.validate()?;
    if lease <= 0 {
        return Err(CoordError::invalid(format!(
            "a worker claim must be on the node's session lease; got lease {lease}"
        )));
    }
    if node.is_empty() || node.len() > 256 {
        return Err(CoordError::invalid(format!(
            "node name must be 1..=256 bytes, got {} bytes",
            node.len()
        )));
    }
    let workers = layout.workers();
    let (kvs, _) = backend.get_prefix(WORKERS_PREFIX, 0).await?;
    let mut taken = vec![false; workers as usize];
    for kv in &kvs {
        let suffix = kv
            .key
            .strip_prefix(WORKERS_PREFIX.as_bytes())
            .unwrap_or(&[]);
        if let Some(w) = std::str::from_utf8(suffix)
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            && let Some(t) = taken.get_mut(w as usize)
        {
            *t = true;
        }
    }
    let token = format!("{:016x}", rand::random::<u64>());
    let record = ClaimRecord {
        node: node.to_string(),
        claimed_at_ms: wall_ms(),
        token: token.clone(),
    };
    let value = serde_json::to_vec(&record).map_err(|e| CoordError::invalid(e.to_string()))?;
    let start = u32::try_from(fnv1a(node) % u64::from(workers)).unwrap_or(0);
    let mut lost_races = 0u32;
    for i in 0..workers {
        let worker = (start + i) % workers;
        if taken[worker as usize] {
            continue;
        }
        let (key, hkey) = (worker_key(worker), hwm_key(worker));
        let r = backend
            .txn(pb::TxnRequest {
                compare: vec![txn::absent(key.clone())],
                success: vec![
                    txn::put(key.clone(), value.clone(), lease),
                    txn::get(hkey.clone()),
                ],
                failure: vec![txn::get(key.clone()), txn::get(hkey)],
            })
            .await?;
        let create_revision = if r.succeeded {
            txn::revision(&r)
        } else {
            // Ours after all? (A retried txn whose first attempt landed.)
            let cur = txn::range_kvs(&r, 0);
            match cur.first() {
                Some(kv)
                    if kv.lease == lease
                        && serde_json::from_slice::<ClaimRecord>(&kv.value)
                            .is_ok_and(|c| c.token == token) =>
                {
                    kv.create_revision
                }
                _ => {
                    lost_races += 1;
                    continue;
                }
            }
        };
        let hwm_ms = parse_hwm(&txn::range_kvs(&r, 1))?;
        tracing::info!(worker, node, lease, hwm_ms, "claimed id worker");
        return Ok(WorkerClaim {
            layout: layout.clone(),
            worker,
            node: node.to_string(),
            lease,
            create_revision,
            hwm_ms,
        });
    }
    Err(CoordError::Conflict(format!(
        "all {workers} worker ids ({} worker bits) are taken by live sessions \
         ({} claims under {WORKERS_PREFIX}, {lost_races} lost to concurrent claimers); \
         wait for a node to stop or use a layout with more worker bits",
        layout.worker_bits,
        kvs.len()
    )))
}

// ---------------------------------------------------------------------------
// The store-backed generator
// ---------------------------------------------------------------------------

/// Settings of an [`IdGenerator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdOptions {
    /// Largest backwards clock step waited out (default 5 s); larger ones are refused.
    pub max_backwards_wait: Duration,
    /// How far ahead of the clock a reservation reaches (default 2 s, 100 ms..=60 s);
    /// it is renewed every half of it.
    pub reserve: Duration,
}

impl Default for IdOptions {
    fn default() -> Self {
        IdOptions {
            max_backwards_wait: DEFAULT_MAX_BACKWARDS_WAIT,
            reserve: DEFAULT_RESERVE,
        }
    }
}

impl IdOptions {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&self.reserve) {
            return Err(CoordError::invalid(format!(
                "id reserve must be 100 ms..=60 s, got {} ms",
                self.reserve.as_millis()
            )));
        }
        if self.max_backwards_wait > Duration::from_secs(60) {
            return Err(CoordError::invalid(format!(
                "max_backwards_wait must be at most 60 s, got {} ms",
                self.max_backwards_wait.as_millis()
            )));
        }
        Ok(())
    }
}

const LIVE: u8 = 0;
const INVALIDATED: u8 = 1;
const CLAIM_LOST: u8 = 2;

struct Shared {
    core: SnowflakeCore,
    /// [`LIVE`], or why generation stopped for good.
    stopped: AtomicU8,
}

/// Ids for a claimed worker id, guarded by its high-water mark (see the module docs).
///
/// A background task renews the reservation (writes `hwm = now + reserve` every
/// `reserve / 2`, conditional on the claim key being still ours) and is aborted
/// when the generator is dropped. Dropping leaves the claim key to its lease; call
/// [`IdGenerator::release`] to free the worker id at once.
///
/// Lease loss: the caller calls [`IdGenerator::invalidate`] when its session lease
/// is lost, which stops generation at once. Uniqueness does not depend on that
/// call: a generator whose claim is gone cannot renew its reservation (and notices
/// at its next renewal), and a new holder only issues timestamps above it.
pub struct IdGenerator {
    shared: Arc<Shared>,
    backend: Backend,
    claim: WorkerClaim,
    task: tokio::task::JoinHandle<()>,
}

impl IdGenerator {
    /// Claims a worker id for `node` on `lease` ([`claim_worker`]) and starts
    /// generating with the default [`IdOptions`] and the [`SystemClock`].
    pub async fn start(
        backend: &Backend,
        layout: IdLayout,
        lease: i64,
        node: &str,
    ) -> Result<IdGenerator> {
        let claim = claim_worker(backend, &layout, lease, node).await?;
        IdGenerator::start_claimed(
            backend,
            claim,
            IdOptions::default(),
            Arc::new(SystemClock::new()),
        )
        .await
    }

    /// Starts generating for an existing `claim`.
    ///
    /// Waits (asynchronously) until `clock` is past the claim's high-water mark when
    /// it is at most `max_backwards_wait` behind it, else fails with
    /// [`CoordError::ClockBackwards`]; then stores the first reservation. On failure
    /// the claim key is deleted (best effort), freeing the worker id.
    pub async fn start_claimed(
        backend: &Backend,
        claim: WorkerClaim,
        opts: IdOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<IdGenerator> {
        match Self::try_start(backend, &claim, opts, clock).await {
            Ok((shared, task)) => Ok(IdGenerator {
                shared,
                backend: backend.clone(),
                claim,
                task,
            }),
            Err(e) => {
                if let Err(de) = delete_claim(backend, &claim).await {
                    tracing::warn!(worker = claim.worker, error = %de, "could not release the id worker claim");
                }
                Err(e)
            }
        }
    }

    async fn try_start(
        backend: &Backend,
        claim: &WorkerClaim,
        opts: IdOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<(Arc<Shared>, tokio::task::JoinHandle<()>)> {
        opts.validate()?;
        let max_wait = millis(opts.max_backwards_wait);
        let reserve = millis(opts.reserve);
        let hwm = claim.hwm_ms;
        let now = clock.now_ms();
        if now <= hwm {
            let gap = hwm + 1 - now;
            if gap > max_wait {
                return Err(CoordError::ClockBackwards(format!(
                    "the clock is {gap} ms behind the high-water mark of id worker {} ({hwm} ms: \
                     its previous holder may have issued ids up to then); that is more than the \
                     {max_wait} ms the generator waits — fix the clock (or wait) and retry",
                    claim.worker
                )));
            }
            tokio::time::sleep(Duration::from_millis(gap)).await;
        }
        let core = SnowflakeCore::new(claim.layout.clone(), claim.worker, clock.clone())?
            .with_max_backwards_wait(opts.max_backwards_wait)
            .with_high_water_mark(hwm);
        // Nothing may be issued until the first reservation is stored.
        core.until_ms.store(0, Ordering::Release);
        let first = clock.now_ms().max(hwm).saturating_add(reserve);
        if !renew(backend, claim.worker, claim.create_revision, first).await? {
            return Err(CoordError::Conflict(format!(
                "the claim on id worker {} was lost before the generator started (lease {} expired?)",
                claim.worker, claim.lease
            )));
        }
        core.extend_until(first);
        let shared = Arc::new(Shared {
            core,
            stopped: AtomicU8::new(LIVE),
        });
        let task = tokio::spawn(renew_loop(
            backend.clone(),
            shared.clone(),
            clock,
            claim.worker,
            claim.create_revision,
            first,
            reserve,
        ));
        Ok((shared, task))
    }

    /// The next id.
    pub fn next(&self) -> Result<i64> {
        self.check_live()?;
        self.shared.core.next()
    }

    /// `n` (1..=[`MAX_BATCH`]) strictly increasing ids; all or none.
    pub fn next_batch(&self, n: usize) -> Result<Vec<i64>> {
        check_batch(n)?;
        self.check_live()?;
        self.shared.core.next_batch(n)
    }

    /// The worker id.
    pub fn worker(&self) -> u32 {
        self.claim.worker
    }

    /// The layout.
    pub fn layout(&self) -> &IdLayout {
        &self.claim.layout
    }

    /// The claim this generator runs on.
    pub fn claim(&self) -> &WorkerClaim {
        &self.claim
    }

    /// Timestamps must stay below this (Unix ms): the last stored reservation.
    pub fn reserved_until_ms(&self) -> u64 {
        self.shared.core.until_ms.load(Ordering::Acquire)
    }

    /// Stops generation for good: call it when the session lease is lost.
    pub fn invalidate(&self) {
        let _ = self.shared.stopped.compare_exchange(
            LIVE,
            INVALIDATED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// False once invalidated or once the claim was found lost.
    pub fn is_live(&self) -> bool {
        self.shared.stopped.load(Ordering::Acquire) == LIVE
    }

    /// Stops generating and deletes the claim key (if still ours), freeing the
    /// worker id; the high-water mark stays for the next holder.
    pub async fn release(self) -> Result<()> {
        self.invalidate();
        self.task.abort();
        delete_claim(&self.backend, &self.claim).await
    }

    fn check_live(&self) -> Result<()> {
        match self.shared.stopped.load(Ordering::Acquire) {
            LIVE => Ok(()),
            INVALIDATED => Err(CoordError::Unavailable(format!(
                "id worker {} was invalidated (session lease lost); claim a worker again",
                self.claim.worker
            ))),
            _ => Err(CoordError::Unavailable(format!(
                "the claim on id worker {} is gone (lease {} expired or revoked); claim a worker again",
                self.claim.worker, self.claim.lease
            ))),
        }
    }
}

impl Drop for IdGenerator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes `hwm = until` if the claim key is still ours; false when it is not.
async fn renew(backend: &Backend, worker: u32, create_revision: i64, until: u64) -> Result<bool> {
    let r = backend
        .txn(pb::TxnRequest {
            compare: vec![txn::create_rev_is(worker_key(worker), create_revision)],
            success: vec![txn::put(hwm_key(worker), until.to_string(), 0)],
            failure: vec![],
        })
        .await?;
    Ok(r.succeeded)
}

async fn delete_claim(backend: &Backend, claim: &WorkerClaim) -> Result<()> {
    let key = worker_key(claim.worker);
    backend
        .txn(pb::TxnRequest {
            compare: vec![txn::create_rev_is(key.clone(), claim.create_revision)],
            success: vec![txn::delete(key)],
            failure: vec![],
        })
        .await?;
    Ok(())
}

async fn renew_loop(
    backend: Backend,
    shared: Arc<Shared>,
    clock: Arc<dyn Clock>,
    worker: u32,
    create_revision: i64,
    mut written: u64,
    reserve: u64,
) {
    let mut tick = tokio::time::interval(Duration::from_millis((reserve / 2).max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; the first reservation is written
    loop {
        tick.tick().await;
        if shared.stopped.load(Ordering::Acquire) != LIVE {
            return;
        }
        let until = clock.now_ms().saturating_add(reserve).max(written);
        match renew(&backend, worker, create_revision, until).await {
            Ok(true) => {
                written = until;
                shared.core.extend_until(until);
            }
            Ok(false) => {
                tracing::error!(
                    worker,
                    "id worker claim is gone (lease expired or revoked); generation stopped"
                );
                let _ = shared.stopped.compare_exchange(
                    LIVE,
                    CLAIM_LOST,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                return;
            }
            Err(e) => {
                tracing::warn!(worker, error = %e, "id worker reservation not renewed; retrying");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    const T0: u64 = IdLayout::DEFAULT_EPOCH_MS + 1_000_000;

    fn manual(now: u64) -> (Arc<ManualClock>, SnowflakeCore) {
        let clock = Arc::new(ManualClock::new(now));
        let core = SnowflakeCore::new(IdLayout::default(), 7, clock.clone()).unwrap();
        (clock, core)
    }

    #[test]
    fn default_layout_is_40_10_13_from_2025() {
        let l = IdLayout::default();
        l.validate().unwrap();
        assert_eq!(l.time_bits(), 40);
        assert_eq!(l.workers(), 1024);
        assert_eq!(l.ids_per_ms(), 8192);
        assert_eq!(l.epoch_ms, 1_735_689_600_000);
        // ~34.8 years of ms.
        let years = (l.end_ms() - l.epoch_ms) as f64 / (365.25 * 86_400_000.0);
        assert!((34.0..35.0).contains(&years), "{years}");
        let id = l.compose(l.epoch_ms + 5, 3, 9).unwrap();
        assert_eq!(id, (5 << 23) | (3 << 13) | 9);
        assert_eq!(l.decompose(id), (l.epoch_ms + 5, 3, 9));
        // The largest id is positive.
        let max = l.compose(l.end_ms() - 1, 1023, 8191).unwrap();
        assert_eq!(max, i64::MAX);
    }

    #[test]
    fn invalid_layouts_and_parts_are_refused_clearly() {
        let bad = |w, s| IdLayout {
            worker_bits: w,
            sequence_bits: s,
            ..IdLayout::default()
        };
        for (l, needle) in [
            (bad(0, 13), "worker_bits must be 1..=16"),
            (bad(17, 13), "worker_bits must be 1..=16"),
            (bad(10, 7), "sequence_bits must be 8..=16"),
            (bad(10, 17), "sequence_bits must be 8..=16"),
            (bad(16, 16), "leaves 31 timestamp bits"),
            (
                IdLayout {
                    epoch_ms: u64::MAX - 5,
                    ..IdLayout::default()
                },
                "too large",
            ),
        ] {
            let e = l.validate().unwrap_err();
            assert!(matches!(e, CoordError::Invalid(_)));
            assert!(e.to_string().contains(needle), "{e}");
        }
        bad(12, 13).validate().unwrap(); // 38 time bits: the minimum
        let l = IdLayout::default();
        assert!(
            l.try_decompose(-1)
                .unwrap_err()
                .to_string()
                .contains("negative")
        );
        assert!(l.compose(l.epoch_ms - 1, 0, 0).is_err());
        assert!(l.compose(l.end_ms(), 0, 0).is_err());
        assert!(l.compose(l.epoch_ms, 1024, 0).is_err());
        assert!(l.compose(l.epoch_ms, 0, 8192).is_err());
        assert!(SnowflakeCore::new(l, 1024, Arc::new(ManualClock::new(T0))).is_err());
    }

    fn layout_and_parts() -> impl Strategy<Value = (IdLayout, u64, u32, u32)> {
        (1u8..=16, 8u8..=16, 0u64..=IdLayout::DEFAULT_EPOCH_MS * 2)
            .prop_filter("time bits >= 38", |(w, s, _)| 63 - w - s >= 38)
            .prop_flat_map(|(w, s, epoch)| {
                let l = IdLayout {
                    worker_bits: w,
                    sequence_bits: s,
                    epoch_ms: epoch,
                };
                let (t, w, s) = (l.time_bits(), l.workers(), l.ids_per_ms());
                (Just(l), 0u64..(1u64 << t), 0u32..w, 0u32..s)
            })
    }

    proptest! {
        #[test]
        fn compose_decompose_round_trip((l, t, w, s) in layout_and_parts()) {
            let id = l.compose(l.epoch_ms + t, w, s).unwrap();
            prop_assert!(id >= 0);
            prop_assert_eq!(l.decompose(id), (l.epoch_ms + t, w, s));
        }

        #[test]
        fn ids_order_by_time_then_sequence(
            (l, t, w, s) in layout_and_parts(),
            dt in 0u64..1000,
            ds in 1u32..100,
        ) {
            let a = l.compose(l.epoch_ms + t, w, s).unwrap();
            if s + ds < l.ids_per_ms() {
                prop_assert!(l.compose(l.epoch_ms + t, w, s + ds).unwrap() > a);
            }
            if t + dt + 1 < (1u64 << l.time_bits()) {
                prop_assert!(l.compose(l.epoch_ms + t + dt + 1, w, 0).unwrap() > a);
            }
        }

        #[test]
        fn any_positive_id_decomposes_back((l, _t, _w, _s) in layout_and_parts(), id in 0i64..=i64::MAX) {
            let (ts, w, s) = l.decompose(id);
            prop_assert_eq!(l.try_decompose(id).unwrap(), (ts, w, s));
            prop_assert_eq!(l.compose(ts, w, s).unwrap(), id);
        }
    }

    #[test]
    fn ids_are_unique_and_monotonic_across_8_threads() {
        let core = Arc::new(
            SnowflakeCore::new(IdLayout::default(), 5, Arc::new(SystemClock::new())).unwrap(),
        );
        let per_thread = 200_000;
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let core = core.clone();
                std::thread::spawn(move || {
                    let mut ids = Vec::with_capacity(per_thread);
                    while ids.len() < per_thread {
                        if t % 2 == 0 {
                            ids.push(core.next().unwrap());
                        } else {
                            let n = (per_thread - ids.len()).min(777);
                            ids.extend(core.next_batch(n).unwrap());
                        }
                    }
                    ids
                })
            })
            .collect();
        let mut all = HashSet::with_capacity(8 * per_thread);
        for h in handles {
            let ids = h.join().unwrap();
            assert!(
                ids.windows(2).all(|w| w[0] < w[1]),
                "ids of one thread increase"
            );
            for id in ids {
                assert!(id > 0);
                assert_eq!(core.layout().decompose(id).1, 5);
                assert!(all.insert(id), "duplicate id {id}");
            }
        }
        assert_eq!(all.len(), 8 * per_thread);
    }

    #[test]
    fn sequence_overflow_moves_to_the_next_ms() {
        let layout = IdLayout {
            sequence_bits: 8,
            ..IdLayout::default()
        };
        let clock = Arc::new(ManualClock::new(T0));
        let core = SnowflakeCore::new(layout.clone(), 1, clock.clone()).unwrap();
        let first = core.next_batch(256).unwrap();
        assert!(first.iter().all(|&id| layout.decompose(id).0 == T0));
        assert_eq!(layout.decompose(first[255]).2, 255);
        // The 257th id of the ms waits for the next one (the manual clock advances when waited on).
        let next = core.next().unwrap();
        assert_eq!(layout.decompose(next), (T0 + 1, 1, 0));
        assert_eq!(clock.peek(), T0 + 1);
        // A batch larger than a ms worth of sequences spans several ms, still increasing.
        let big = core.next_batch(1000).unwrap();
        assert!(big.windows(2).all(|w| w[0] < w[1]));
        assert!(big[0] > next);
        let (last_ts, _, last_seq) = layout.decompose(*big.last().unwrap());
        assert_eq!((last_ts, last_seq), (T0 + 4, 1000 - 255 - 2 * 256 - 1));
    }

    #[test]
    fn small_backwards_step_is_waited_out_without_duplicates() {
        // A clock that moves 1 ms per reading: the wait ends by polling, not by sleeping.
        let clock = Arc::new(ManualClock::with_step(T0, 1));
        let core = SnowflakeCore::new(IdLayout::default(), 2, clock.clone())
            .unwrap()
            .with_max_backwards_wait(Duration::from_millis(5000));
        let a = core.next().unwrap();
        clock.set(T0 - 3_000); // 3 s back: within the 5 s limit
        let started = Instant::now();
        let b = core.next().unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "no real sleep"
        );
        assert!(b > a);
        let (ts_a, ..) = core.layout().decompose(a);
        let (ts_b, ..) = core.layout().decompose(b);
        assert!(ts_b >= ts_a);
        assert!(
            clock.peek() >= ts_a,
            "the core waited until the clock caught up"
        );
    }

    #[test]
    fn large_backwards_step_is_refused_then_recovers() {
        let (clock, core) = manual(T0);
        let a = core.next().unwrap();
        clock.set(T0 - 10_000);
        let e = core.next().unwrap_err();
        assert!(matches!(e, CoordError::ClockBackwards(_)), "{e:?}");
        assert_eq!(e.code(), "clock_moved_backwards");
        assert!(e.to_string().contains("10000 ms behind"), "{e}");
        assert!(core.next_batch(10).is_err());
        assert_eq!(clock.peek(), T0 - 10_000, "a refusal does not wait");
        clock.set(T0);
        let b = core.next().unwrap();
        assert!(b > a);
    }

    #[test]
    fn high_water_mark_ahead_waits_or_refuses() {
        // Within the limit: the first id is stamped after the mark.
        let clock = Arc::new(ManualClock::new(T0));
        let core = SnowflakeCore::new(IdLayout::default(), 3, clock.clone())
            .unwrap()
            .with_high_water_mark(T0 + 2_000);
        let id = core.next().unwrap();
        assert_eq!(core.layout().decompose(id), (T0 + 2_001, 3, 0));
        // Beyond it: refused.
        let core = SnowflakeCore::new(IdLayout::default(), 3, Arc::new(ManualClock::new(T0)))
            .unwrap()
            .with_high_water_mark(T0 + 60_000);
        let e = core.next().unwrap_err();
        assert!(matches!(e, CoordError::ClockBackwards(_)), "{e:?}");
        assert!(e.to_string().contains("60000 ms behind"), "{e}");
        // A mark equal to the clock: strictly after it as well.
        let core = SnowflakeCore::new(IdLayout::default(), 3, Arc::new(ManualClock::new(T0)))
            .unwrap()
            .with_high_water_mark(T0);
        assert_eq!(core.layout().decompose(core.next().unwrap()).0, T0 + 1);
    }

    #[test]
    fn reservation_bounds_timestamps() {
        let (clock, core) = manual(T0);
        core.until_ms.store(T0 + 2, Ordering::Release);
        core.next().unwrap();
        clock.set(T0 + 2);
        let e = core.next().unwrap_err();
        assert!(matches!(e, CoordError::Unavailable(_)), "{e:?}");
        assert!(
            e.to_string()
                .contains("worker reservation could not be renewed"),
            "{e}"
        );
        core.extend_until(T0 + 100);
        core.next().unwrap();
        core.extend_until(T0 + 50); // never lowered
        assert_eq!(core.until_ms.load(Ordering::Acquire), T0 + 100);
    }

    #[test]
    fn batch_size_and_clock_range_are_checked() {
        let (clock, core) = manual(T0);
        for n in [0, MAX_BATCH + 1] {
            let e = core.next_batch(n).unwrap_err();
            assert!(
                e.to_string().contains("batch size must be 1..=10000"),
                "{e}"
            );
        }
        assert_eq!(core.next_batch(MAX_BATCH).unwrap().len(), MAX_BATCH);
        let (_, early) = manual(IdLayout::DEFAULT_EPOCH_MS - 1);
        assert!(
            early
                .next()
                .unwrap_err()
                .to_string()
                .contains("before the id layout's epoch")
        );
        clock.set(IdLayout::default().end_ms());
        assert!(
            core.next()
                .unwrap_err()
                .to_string()
                .contains("past the end")
        );
    }

    /// Clocks a test steps by hand: no sleeps, no wall-clock tolerance.
    #[derive(Default)]
    struct FakeTime {
        wall: AtomicU64,
        mono: AtomicU64,
    }

    impl TimeSource for &FakeTime {
        fn wall_ns(&self) -> u64 {
            self.wall.load(Ordering::SeqCst)
        }
        fn mono_ns(&self) -> u64 {
            self.mono.load(Ordering::SeqCst)
        }
    }

    const MS: u64 = 1_000_000;

    impl FakeTime {
        /// Both clocks move `ms` forward, as they do when nothing odd happens.
        fn tick(&self, ms: u64) {
            self.wall.fetch_add(ms * MS, Ordering::SeqCst);
            self.mono.fetch_add(ms * MS, Ordering::SeqCst);
        }
    }

    #[test]
    fn anchored_clock_follows_forward_jumps_and_ignores_backward_ones() {
        let t = FakeTime::default();
        t.wall.store(1_000_000 * MS, Ordering::SeqCst);
        t.mono.store(5 * MS, Ordering::SeqCst);
        let c = Anchored::new(&t);
        assert_eq!(c.now_ms(), 1_000_000, "anchored at the wall time");
        t.tick(7);
        assert_eq!(c.now_ms(), 1_000_007, "advances with the monotonic clock");
        // The wall clock jumps 10 s ahead (resume from suspend): followed at the
        // next comparison, which happens once a millisecond has passed.
        t.wall.fetch_add(10_000 * MS, Ordering::SeqCst);
        t.tick(1);
        assert_eq!(c.now_ms(), 1_010_008, "re-anchored forward");
        // The wall clock steps 10 s back (NTP step): not followed, ids keep
        // their order.
        t.wall.fetch_sub(10_000 * MS, Ordering::SeqCst);
        t.tick(1);
        assert_eq!(c.now_ms(), 1_010_009, "a backward step is not followed");
        assert!(c.behind.load(Ordering::SeqCst), "and is noticed");
        // A small forward drift (under 2 ms) is not a jump.
        t.wall.fetch_add(MS, Ordering::SeqCst);
        t.tick(1);
        assert_eq!(c.now_ms(), 1_010_010);
    }

    #[test]
    fn anchored_clock_compares_at_most_once_a_millisecond() {
        let t = FakeTime::default();
        t.wall.store(500 * MS, Ordering::SeqCst);
        let c = Anchored::new(&t);
        t.tick(2);
        assert_eq!(c.now_ms(), 502);
        // A jump within the same millisecond of the last comparison waits for
        // the next one.
        t.wall.fetch_add(3_000 * MS, Ordering::SeqCst);
        t.mono.fetch_add(MS / 2, Ordering::SeqCst);
        assert_eq!(c.now_ms(), 502);
        t.mono.fetch_add(MS / 2, Ordering::SeqCst);
        assert_eq!(c.now_ms(), 3_502, "the wall clock's reading, now followed");
    }

    #[test]
    fn system_clock_never_goes_backwards() {
        let c = SystemClock::new();
        let mut last = c.now_ms();
        for _ in 0..10_000 {
            let now = c.now_ms();
            assert!(now >= last);
            last = now;
        }
    }

    #[test]
    fn node_hash_is_stable() {
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(worker_key(7), "/meshwork/ids/workers/00007");
        assert_eq!(hwm_key(1023), "/meshwork/ids/hwm/01023");
    }
}
