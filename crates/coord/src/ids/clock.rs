//! The time an id generator reads: the [`Clock`] trait, the production
//! [`SystemClock`] (wall time anchored to the monotonic clock, following forward
//! jumps and refusing to follow backward ones) and [`ManualClock`] for tests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
pub(super) fn wall_ms() -> u64 {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

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
}
