//! The breaker state machine: no I/O, no clock of its own.
//!
//! States and the only transitions allowed:
//!
//! ```text
//! Closed --trip--> Open --open time over, next call--> HalfOpen
//! HalfOpen --a probe fails--> Open (longer, with backoff)
//! HalfOpen --all probes succeed--> Closed
//! ```
//!
//! The closed-state fast path is one atomic load to admit a call and, in
//! consecutive-failure mode, one load (plus a store only after a failure
//! streak) to record a success. Windows, transitions and half-open
//! bookkeeping take a `parking_lot` mutex. Every state change bumps a
//! generation number; results of calls admitted under an older generation are
//! ignored, so a slow call from before a trip cannot close a fresh half-open
//! circuit.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::config::BreakerConfig;
use super::error::CircuitOpen;
use super::window::Window;
use crate::classify::Outcome;
use crate::config::ConfigError;

/// Where the breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum State {
    /// Calls flow; outcomes are counted.
    Closed,
    /// Calls are rejected until the open time is over.
    Open,
    /// A limited number of probe calls decide whether to close or re-open.
    HalfOpen,
}

impl State {
    fn tag(self) -> u64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }
    fn from_tag(t: u64) -> State {
        match t & 3 {
            0 => State::Closed,
            1 => State::Open,
            _ => State::HalfOpen,
        }
    }
    /// Metric value: 0 closed, 1 open, 2 half-open.
    pub fn as_gauge(self) -> f64 {
        self.tag() as f64
    }
    /// Lower-case name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

/// A state change, reported to metrics and subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// State before.
    pub from: State,
    /// State after.
    pub to: State,
    /// When it happened.
    pub at: Instant,
}

/// Admission of one call; hand it back to [`BreakerCore::record`].
#[derive(Debug)]
#[must_use = "a permit must be handed back to record()"]
pub struct Permit {
    generation: u64,
    probe: bool,
    /// The transition this admission caused (Open -> HalfOpen), if any.
    pub transition: Option<Transition>,
}

#[derive(Debug)]
struct Slow {
    window: Option<Window>,
    probes_admitted: u32,
    probe_successes: u32,
    opens_in_a_row: u32,
}

/// The breaker's decision core. Thread-safe; share it behind an `Arc`.
#[derive(Debug)]
pub struct BreakerCore {
    cfg: BreakerConfig,
    base: Instant,
    /// `generation << 2 | state tag`.
    word: AtomicU64,
    consecutive: AtomicU32,
    /// Nanoseconds since `base` when the open state ends.
    open_until: AtomicU64,
    slow: Mutex<Slow>,
    uses_window: bool,
    slow_nanos: u64,
}

impl BreakerCore {
    /// A closed breaker; `now` is the time base for its internal clock.
    pub fn new(cfg: BreakerConfig, now: Instant) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let uses_window = cfg.uses_window();
        Ok(Self {
            base: now,
            word: AtomicU64::new(State::Closed.tag()),
            consecutive: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            slow: Mutex::new(Slow {
                window: uses_window.then(|| Window::new(cfg.window)),
                probes_admitted: 0,
                probe_successes: 0,
                opens_in_a_row: 0,
            }),
            uses_window,
            slow_nanos: cfg.slow_call_duration_ms.saturating_mul(1_000_000),
            cfg,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &BreakerConfig {
        &self.cfg
    }

    /// Current state (an `Open` whose time is over still reads `Open` until
    /// the next call moves it to `HalfOpen`).
    pub fn state(&self) -> State {
        State::from_tag(self.word.load(Ordering::Acquire))
    }

    /// Whether outcomes need the call's latency (slow-call trigger set).
    pub fn needs_latency(&self) -> bool {
        self.cfg.slow_call_rate_threshold.is_some()
    }

    fn nanos(&self, now: Instant) -> u64 {
        crate::nanos_since(self.base, now)
    }

    /// Asks to make a call at `now`.
    #[inline]
    pub fn try_acquire(&self, now: Instant) -> Result<Permit, CircuitOpen> {
        self.try_acquire_with(|| now)
    }

    /// As [`try_acquire`](Self::try_acquire), reading the clock only when needed.
    #[inline]
    pub(crate) fn try_acquire_with(
        &self,
        now: impl FnOnce() -> Instant,
    ) -> Result<Permit, CircuitOpen> {
        let w = self.word.load(Ordering::Acquire);
        if w & 3 == 0 {
            return Ok(Permit {
                generation: w >> 2,
                probe: false,
                transition: None,
            });
        }
        self.acquire_slow(now())
    }

    #[cold]
    fn acquire_slow(&self, now: Instant) -> Result<Permit, CircuitOpen> {
        let now_n = self.nanos(now);
        let mut slow = self.slow.lock();
        let w = self.word.load(Ordering::Acquire);
        let mut transition = None;
        match State::from_tag(w) {
            State::Closed => {
                return Ok(Permit {
                    generation: w >> 2,
                    probe: false,
                    transition: None,
                });
            }
            State::Open => {
                let until = self.open_until.load(Ordering::Acquire);
                if now_n < until {
                    return Err(CircuitOpen {
                        remaining: Duration::from_nanos(until - now_n),
                    });
                }
                slow.probes_admitted = 0;
                slow.probe_successes = 0;
                self.word.store(
                    ((w >> 2) + 1) << 2 | State::HalfOpen.tag(),
                    Ordering::Release,
                );
                transition = Some(Transition {
                    from: State::Open,
                    to: State::HalfOpen,
                    at: now,
                });
            }
            State::HalfOpen => {}
        }
        if slow.probes_admitted >= self.cfg.half_open_max_probes {
            return Err(CircuitOpen {
                remaining: Duration::ZERO,
            });
        }
        slow.probes_admitted += 1;
        let generation = self.word.load(Ordering::Acquire) >> 2;
        Ok(Permit {
            generation,
            probe: true,
            transition,
        })
    }

    /// Records the outcome of a call admitted with `permit`. `latency` is
    /// needed only when [`needs_latency`](Self::needs_latency).
    pub fn record(
        &self,
        permit: Permit,
        outcome: Outcome,
        latency: Duration,
        now: Instant,
    ) -> Option<Transition> {
        self.record_with(permit, outcome, latency, || now)
    }

    #[inline]
    pub(crate) fn record_with(
        &self,
        permit: Permit,
        outcome: Outcome,
        latency: Duration,
        now: impl FnOnce() -> Instant,
    ) -> Option<Transition> {
        if !permit.probe && !self.uses_window {
            // Fast path: consecutive-failure mode only.
            match outcome {
                Outcome::Ignored => return None,
                Outcome::Success => {
                    if self.consecutive.load(Ordering::Relaxed) != 0 {
                        self.consecutive.store(0, Ordering::Relaxed);
                    }
                    return None;
                }
                Outcome::Failure => {
                    let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
                    match self.cfg.consecutive_failures {
                        Some(limit) if n >= limit => {}
                        _ => return None,
                    }
                }
            }
        }
        self.record_slow(permit, outcome, latency, now)
    }

    fn record_slow(
        &self,
        permit: Permit,
        outcome: Outcome,
        latency: Duration,
        now: impl FnOnce() -> Instant,
    ) -> Option<Transition> {
        // The clock is read only if needed (time window, transition): a
        // count-window success costs no clock read.
        let mut clock = LazyNow::new(now);
        let mut slow = self.slow.lock();
        let w = self.word.load(Ordering::Acquire);
        if w >> 2 != permit.generation {
            return None; // admitted under a previous state: stale
        }
        let is_slow = self.cfg.slow_call_rate_threshold.is_some()
            && latency.as_nanos() as u64 >= self.slow_nanos;
        match State::from_tag(w) {
            State::Closed => {
                if outcome == Outcome::Ignored {
                    return None;
                }
                let failed = outcome == Outcome::Failure;
                let mut trip = false;
                if self.uses_window && self.cfg.consecutive_failures.is_some() {
                    // In window mode the fast path did not count consecutive failures.
                    if failed {
                        let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
                        trip |= self.cfg.consecutive_failures.is_some_and(|l| n >= l);
                    } else {
                        self.consecutive.store(0, Ordering::Relaxed);
                    }
                } else if failed {
                    let n = self.consecutive.load(Ordering::Relaxed);
                    trip |= self.cfg.consecutive_failures.is_some_and(|l| n >= l);
                }
                if let Some(window) = slow.window.as_mut() {
                    let now_n = if window.is_time() {
                        self.nanos(clock.get())
                    } else {
                        0
                    };
                    window.record(now_n, failed, is_slow);
                    let t = window.totals(now_n);
                    if t.calls >= u64::from(self.cfg.minimum_calls) && t.calls > 0 {
                        let calls = t.calls as f64;
                        trip |= self
                            .cfg
                            .failure_rate_threshold
                            .is_some_and(|th| t.failures as f64 / calls >= th);
                        trip |= self
                            .cfg
                            .slow_call_rate_threshold
                            .is_some_and(|th| t.slow as f64 / calls >= th);
                    }
                }
                if trip {
                    slow.opens_in_a_row = 1;
                    return Some(self.open(&mut slow, w, State::Closed, clock.get()));
                }
                None
            }
            State::HalfOpen if permit.probe => match outcome {
                Outcome::Ignored => {
                    slow.probes_admitted = slow.probes_admitted.saturating_sub(1);
                    None
                }
                Outcome::Failure => {
                    slow.opens_in_a_row = slow.opens_in_a_row.saturating_add(1);
                    Some(self.open(&mut slow, w, State::HalfOpen, clock.get()))
                }
                Outcome::Success if is_slow => {
                    slow.opens_in_a_row = slow.opens_in_a_row.saturating_add(1);
                    Some(self.open(&mut slow, w, State::HalfOpen, clock.get()))
                }
                Outcome::Success => {
                    slow.probe_successes += 1;
                    if slow.probe_successes < self.cfg.half_open_max_probes {
                        return None;
                    }
                    slow.opens_in_a_row = 0;
                    if let Some(window) = slow.window.as_mut() {
                        window.reset();
                    }
                    self.consecutive.store(0, Ordering::Relaxed);
                    self.word
                        .store(((w >> 2) + 1) << 2 | State::Closed.tag(), Ordering::Release);
                    Some(Transition {
                        from: State::HalfOpen,
                        to: State::Closed,
                        at: clock.get(),
                    })
                }
            },
            _ => None,
        }
    }

    fn open(&self, slow: &mut Slow, w: u64, from: State, now: Instant) -> Transition {
        let now_n = self.nanos(now);
        let exp = slow.opens_in_a_row.saturating_sub(1).min(64) as i32;
        let ms = (self.cfg.open_duration_ms as f64 * self.cfg.open_backoff_multiplier.powi(exp))
            .min(self.cfg.max_open_duration_ms as f64);
        let until = now_n.saturating_add((ms * 1_000_000.0) as u64);
        self.open_until.store(until, Ordering::Release);
        self.consecutive.store(0, Ordering::Relaxed);
        if let Some(window) = slow.window.as_mut() {
            window.reset();
        }
        self.word
            .store(((w >> 2) + 1) << 2 | State::Open.tag(), Ordering::Release);
        Transition {
            from,
            to: State::Open,
            at: now,
        }
    }

    /// Operator override: opens the breaker for `duration` from `now`,
    /// whatever its state (the transition is reported; from `Open` it only
    /// sets the new end time and reports nothing).
    pub fn force_open(&self, duration: Duration, now: Instant) -> Option<Transition> {
        let _slow = self.slow.lock();
        let w = self.word.load(Ordering::Acquire);
        let until = self
            .nanos(now)
            .saturating_add(duration.as_nanos().min(u128::from(u64::MAX)) as u64);
        self.open_until.store(until, Ordering::Release);
        let from = State::from_tag(w);
        self.word
            .store(((w >> 2) + 1) << 2 | State::Open.tag(), Ordering::Release);
        (from != State::Open).then_some(Transition {
            from,
            to: State::Open,
            at: now,
        })
    }

    /// Operator override: closes the breaker and clears its counts.
    pub fn reset(&self, now: Instant) -> Option<Transition> {
        let mut slow = self.slow.lock();
        let w = self.word.load(Ordering::Acquire);
        if let Some(window) = slow.window.as_mut() {
            window.reset();
        }
        slow.opens_in_a_row = 0;
        self.consecutive.store(0, Ordering::Relaxed);
        let from = State::from_tag(w);
        self.word
            .store(((w >> 2) + 1) << 2 | State::Closed.tag(), Ordering::Release);
        (from != State::Closed).then_some(Transition {
            from,
            to: State::Closed,
            at: now,
        })
    }

    /// How long the breaker stays open from `now` (zero unless open).
    pub fn remaining_open(&self, now: Instant) -> Duration {
        if self.state() != State::Open {
            return Duration::ZERO;
        }
        let until = self.open_until.load(Ordering::Acquire);
        Duration::from_nanos(until.saturating_sub(self.nanos(now)))
    }
}

/// Reads the clock at most once, and only if asked.
struct LazyNow<F> {
    read: Option<F>,
    value: Option<Instant>,
}

impl<F: FnOnce() -> Instant> LazyNow<F> {
    fn new(read: F) -> Self {
        Self {
            read: Some(read),
            value: None,
        }
    }

    fn get(&mut self) -> Instant {
        if let Some(v) = self.value {
            return v;
        }
        let v = self.read.take().map_or_else(Instant::now, |f| f());
        self.value = Some(v);
        v
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
