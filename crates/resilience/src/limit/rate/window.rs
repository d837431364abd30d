//! Sliding-window counter: at most `limit` calls per `window_ms`, counted
//! over `buckets` sub-windows (Sentinel's "leap array").
//!
//! A call is admitted when the calls in the last `buckets` buckets (the
//! current one included) are fewer than `limit`. Bucket granularity means an
//! arbitrary interval of one window may hold up to `2 * limit` calls in the
//! worst case. As a rate limiter it honours `rate * d + burst` with
//! `rate = limit / window` and `burst = limit * (1 + 1 / buckets)`: any `N`
//! consecutive buckets hold at most `limit` calls and an interval `d` spans
//! at most `d / bucket + 2` buckets (property-tested).

use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::RateLimited;
use crate::config::{ConfigError, check};

/// Sliding-window limits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlidingWindowConfig {
    /// Calls admitted per window (>= 1).
    pub limit: u64,
    /// Window length in milliseconds (>= buckets).
    pub window_ms: u64,
    /// Sub-windows (1..=1000); more buckets, smoother sliding.
    pub buckets: u32,
}

impl Default for SlidingWindowConfig {
    fn default() -> Self {
        Self {
            limit: 100,
            window_ms: 1_000,
            buckets: 10,
        }
    }
}

impl SlidingWindowConfig {
    /// Checks the fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            self.limit >= 1,
            "sliding_window.limit",
            self.limit,
            "at least 1",
        )?;
        check(
            (1..=1000).contains(&self.buckets),
            "sliding_window.buckets",
            self.buckets,
            "1..=1000",
        )?;
        check(
            self.window_ms >= u64::from(self.buckets),
            "sliding_window.window_ms",
            self.window_ms,
            "at least 1 ms per bucket",
        )
    }
}

#[derive(Debug)]
struct Inner {
    limit: u64,
    width_nanos: u64,
    /// (epoch, count); epoch 0 never current.
    buckets: Vec<(u64, u64)>,
}

/// A sliding-window counter limiter.
#[derive(Debug)]
pub struct SlidingWindow {
    base: Instant,
    inner: Mutex<Inner>,
}

impl SlidingWindow {
    /// An empty window at `now`.
    pub fn new(cfg: SlidingWindowConfig, now: Instant) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Self {
            base: now,
            inner: Mutex::new(Inner {
                limit: cfg.limit,
                width_nanos: (Duration::from_millis(cfg.window_ms) / cfg.buckets).as_nanos() as u64,
                buckets: vec![(0, 0); cfg.buckets as usize],
            }),
        })
    }

    /// Changes the limit at run time (window shape stays).
    pub fn set_limit(&self, limit: u64) -> Result<(), ConfigError> {
        check(limit >= 1, "sliding_window.limit", limit, "at least 1")?;
        self.inner.lock().limit = limit;
        Ok(())
    }

    /// Admits one call at `now`.
    pub fn check(&self, now: Instant) -> Result<(), RateLimited> {
        let now_n = crate::nanos_since(self.base, now);
        let mut inner = self.inner.lock();
        let width = inner.width_nanos;
        let epoch = now_n / width + 1;
        let n = inner.buckets.len() as u64;
        let mut total = 0;
        let mut oldest = epoch;
        for &(e, c) in &inner.buckets {
            if e + n > epoch && e <= epoch && c > 0 {
                total += c;
                oldest = oldest.min(e);
            }
        }
        if total >= inner.limit {
            // The oldest counted bucket leaves the window at (oldest + n) * width.
            let leaves = (oldest + n - 1) * width;
            return Err(RateLimited {
                retry_after: Duration::from_nanos(leaves.saturating_sub(now_n)),
            });
        }
        let slot = &mut inner.buckets[(epoch % n) as usize];
        if slot.0 != epoch {
            *slot = (epoch, 0);
        }
        slot.1 += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn limit_per_window_and_retry_after() {
        let t0 = Instant::now();
        let w = SlidingWindow::new(
            SlidingWindowConfig {
                limit: 2,
                window_ms: 1000,
                buckets: 10,
            },
            t0,
        )
        .unwrap();
        w.check(t0).unwrap();
        w.check(t0 + Duration::from_millis(550)).unwrap();
        let e = w.check(t0 + Duration::from_millis(600)).unwrap_err();
        assert_eq!(e.retry_after, Duration::from_millis(400));
        w.check(t0 + Duration::from_millis(1000)).unwrap();
    }

    proptest! {
        #[test]
        fn admits_at_most_rate_times_window_plus_limit(
            limit in 1u64..20,
            buckets in 1u32..10,
            gaps in proptest::collection::vec(0u64..50_000_000, 1..300),
        ) {
            let t0 = Instant::now();
            let cfg = SlidingWindowConfig { limit, window_ms: 1000, buckets };
            let w = SlidingWindow::new(cfg, t0).unwrap();
            let mut now = t0;
            let mut admitted = Vec::new();
            for gap in gaps {
                now += Duration::from_nanos(gap);
                if w.check(now).is_ok() { admitted.push(now); }
            }
            let rate = limit as f64; // per 1 s window
            for i in 0..admitted.len() {
                for j in i..admitted.len() {
                    let d = (admitted[j] - admitted[i]).as_secs_f64();
                    let burst = limit as f64 * (1.0 + 1.0 / f64::from(buckets));
                    prop_assert!(((j - i + 1) as f64) <= rate * d + burst + 1e-6);
                }
            }
        }
    }
}
