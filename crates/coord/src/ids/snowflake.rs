//! [`SnowflakeCore`]: the in-process generator for one worker id (layout, worker,
//! clock and `(last_ms, sequence)` under one mutex), usable without any store. It
//! waits out small backwards clock steps, refuses larger ones, and never issues a
//! timestamp at or past its reservation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{Clock, DEFAULT_MAX_BACKWARDS_WAIT, IdLayout, check_batch, millis};
use crate::error::{CoordError, Result};

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
/// bug; [`IdGenerator`](super::IdGenerator) is the store-backed way to prevent it.
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
    pub(super) until_ms: AtomicU64,
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

    /// `n` (1..=[`MAX_BATCH`](super::MAX_BATCH)) strictly increasing ids. On an error none are returned
    /// (the ones skipped are never issued later either).
    pub fn next_batch(&self, n: usize) -> Result<Vec<i64>> {
        check_batch(n)?;
        let mut out = Vec::with_capacity(n);
        self.issue(n as u64, |x| out.push(x))?;
        Ok(out)
    }

    /// Raises the reservation: timestamps must stay below `until_ms`.
    pub(super) fn extend_until(&self, until_ms: u64) {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::HashSet;

    use super::*;
    use crate::ids::{MAX_BATCH, ManualClock, SystemClock};

    const T0: u64 = IdLayout::DEFAULT_EPOCH_MS + 1_000_000;

    fn manual(now: u64) -> (Arc<ManualClock>, SnowflakeCore) {
        let clock = Arc::new(ManualClock::new(now));
        let core = SnowflakeCore::new(IdLayout::default(), 7, clock.clone()).unwrap();
        (clock, core)
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

    #[test]
    fn worker_outside_the_layout_is_refused() {
        let l = IdLayout::default();
        assert!(SnowflakeCore::new(l, 1024, Arc::new(ManualClock::new(T0))).is_err());
    }
}
