//! Count-based and time-based sliding windows of call outcomes.
//!
//! Both keep totals incrementally so that recording a call is O(1) for the
//! count window and O(1) amortised for the time window; memory is bounded by
//! the configured size / bucket count.

use std::time::Duration;

use super::config::SlidingWindow;

/// Totals over the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Bucket {
    epoch: u64,
    totals: Totals,
}

/// A sliding window of outcomes.
#[derive(Debug)]
pub(crate) enum Window {
    Count {
        ring: Vec<u8>,
        next: usize,
        len: usize,
        totals: Totals,
    },
    Time {
        buckets: Vec<Bucket>,
        width_nanos: u64,
    },
}

const FAILED: u8 = 1;
const SLOW: u8 = 2;

impl Window {
    pub(crate) fn new(cfg: SlidingWindow) -> Self {
        match cfg {
            SlidingWindow::Count { size } => Window::Count {
                ring: vec![0; size as usize],
                next: 0,
                len: 0,
                totals: Totals::default(),
            },
            SlidingWindow::Time {
                duration_ms,
                buckets,
            } => {
                let width = Duration::from_millis(duration_ms) / buckets;
                Window::Time {
                    buckets: vec![Bucket::default(); buckets as usize],
                    width_nanos: (width.as_nanos() as u64).max(1),
                }
            }
        }
    }

    /// Whether this window needs the time (a count window does not).
    pub(crate) fn is_time(&self) -> bool {
        matches!(self, Window::Time { .. })
    }

    /// Records one call at `now_nanos` (time since an arbitrary base).
    pub(crate) fn record(&mut self, now_nanos: u64, failed: bool, slow: bool) {
        let flags = (failed as u8 * FAILED) | (slow as u8 * SLOW);
        match self {
            Window::Count {
                ring,
                next,
                len,
                totals,
            } => {
                if *len == ring.len() {
                    let old = ring[*next];
                    totals.calls -= 1;
                    totals.failures -= u64::from(old & FAILED != 0);
                    totals.slow -= u64::from(old & SLOW != 0);
                } else {
                    *len += 1;
                }
                ring[*next] = flags;
                *next = (*next + 1) % ring.len();
                totals.calls += 1;
                totals.failures += u64::from(failed);
                totals.slow += u64::from(slow);
            }
            Window::Time {
                buckets,
                width_nanos,
            } => {
                // Epochs start at 1 so that a zeroed bucket is never current.
                let epoch = now_nanos / *width_nanos + 1;
                let n = buckets.len() as u64;
                let b = &mut buckets[(epoch % n) as usize];
                if b.epoch != epoch {
                    *b = Bucket {
                        epoch,
                        totals: Totals::default(),
                    };
                }
                b.totals.calls += 1;
                b.totals.failures += u64::from(failed);
                b.totals.slow += u64::from(slow);
            }
        }
    }

    /// Totals of the calls still inside the window at `now_nanos`.
    pub(crate) fn totals(&self, now_nanos: u64) -> Totals {
        match self {
            Window::Count { totals, .. } => *totals,
            Window::Time {
                buckets,
                width_nanos,
            } => {
                let epoch = now_nanos / *width_nanos + 1;
                let n = buckets.len() as u64;
                let mut t = Totals::default();
                for b in buckets
                    .iter()
                    .filter(|b| b.epoch + n > epoch && b.epoch <= epoch)
                {
                    t.calls += b.totals.calls;
                    t.failures += b.totals.failures;
                    t.slow += b.totals.slow;
                }
                t
            }
        }
    }

    pub(crate) fn reset(&mut self) {
        match self {
            Window::Count {
                ring,
                next,
                len,
                totals,
            } => {
                ring.iter_mut().for_each(|x| *x = 0);
                *next = 0;
                *len = 0;
                *totals = Totals::default();
            }
            Window::Time { buckets, .. } => buckets.iter_mut().for_each(|b| *b = Bucket::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_window_evicts_oldest() {
        let mut w = Window::new(SlidingWindow::Count { size: 3 });
        w.record(0, true, false);
        w.record(0, false, true);
        w.record(0, false, false);
        assert_eq!(
            w.totals(0),
            Totals {
                calls: 3,
                failures: 1,
                slow: 1
            }
        );
        w.record(0, false, false);
        assert_eq!(
            w.totals(0),
            Totals {
                calls: 3,
                failures: 0,
                slow: 1
            }
        );
    }

    #[test]
    fn time_window_forgets_old_buckets() {
        let ms = 1_000_000;
        let mut w = Window::new(SlidingWindow::Time {
            duration_ms: 10,
            buckets: 10,
        });
        w.record(0, true, false);
        w.record(5 * ms, false, false);
        assert_eq!(w.totals(9 * ms).calls, 2);
        assert_eq!(w.totals(10 * ms).calls, 1);
        assert_eq!(w.totals(15 * ms).calls, 0);
    }
}
