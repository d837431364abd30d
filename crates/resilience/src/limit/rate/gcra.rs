//! GCRA ("generic cell rate algorithm"): a token bucket kept as a single
//! theoretical arrival time (TAT) in one `AtomicU64`.
//!
//! Each admitted call pushes the TAT one emission interval `T = 1/rate`
//! further; a call is admitted while `max(TAT, now) + T - now <= T * burst`.
//! Hence over any interval of length `d` at most `rate * d + burst` calls are
//! admitted (property-tested). Admission is a load and one CAS; rate and
//! burst can be changed at run time with [`Gcra::set_limit`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::RateLimited;
use crate::config::{ConfigError, check};

/// Rate and burst of a token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcraConfig {
    /// Sustained rate, calls per second (> 0, <= 1e9).
    pub rate_per_sec: f64,
    /// Calls admitted at once after idling (>= 1).
    pub burst: u32,
}

impl Default for GcraConfig {
    fn default() -> Self {
        Self {
            rate_per_sec: 100.0,
            burst: 10,
        }
    }
}

impl GcraConfig {
    /// Checks the fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            self.rate_per_sec.is_finite() && self.rate_per_sec > 0.0 && self.rate_per_sec <= 1e9,
            "rate.rate_per_sec",
            self.rate_per_sec,
            "a number in (0, 1e9]",
        )?;
        check(self.burst >= 1, "rate.burst", self.burst, "at least 1")
    }

    /// (emission interval, tolerance) in nanoseconds.
    pub(crate) fn nanos(&self) -> (u64, u64) {
        let interval = ((1e9 / self.rate_per_sec) as u64).max(1);
        (interval, interval.saturating_mul(u64::from(self.burst)))
    }
}

/// A lock-free GCRA limiter.
#[derive(Debug)]
pub struct Gcra {
    base: Instant,
    tat: AtomicU64,
    interval: AtomicU64,
    tolerance: AtomicU64,
}

impl Gcra {
    /// A full bucket at `now`.
    pub fn new(cfg: GcraConfig, now: Instant) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let (interval, tolerance) = cfg.nanos();
        Ok(Self {
            base: now,
            tat: AtomicU64::new(0),
            interval: AtomicU64::new(interval),
            tolerance: AtomicU64::new(tolerance),
        })
    }

    /// Changes rate and burst; takes effect for the next call. Calls racing
    /// with the change may see the old interval with the new burst, once.
    pub fn set_limit(&self, cfg: GcraConfig) -> Result<(), ConfigError> {
        cfg.validate()?;
        let (interval, tolerance) = cfg.nanos();
        self.interval.store(interval, Ordering::Relaxed);
        self.tolerance.store(tolerance, Ordering::Relaxed);
        Ok(())
    }

    /// Admits one call at `now`, or says how long to wait.
    #[inline]
    pub fn check(&self, now: Instant) -> Result<(), RateLimited> {
        self.check_n(1, now)
    }

    /// Admits `n` calls at once (all or none). More than `burst` at once is
    /// never admitted.
    #[inline]
    pub fn check_n(&self, n: u32, now: Instant) -> Result<(), RateLimited> {
        let now_n = crate::nanos_since(self.base, now);
        let interval = self.interval.load(Ordering::Relaxed);
        let tolerance = self.tolerance.load(Ordering::Relaxed);
        let increment = interval.saturating_mul(u64::from(n));
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            // Saturating: `n` beyond the burst can never pass and must not overflow.
            let new_tat = tat.max(now_n).saturating_add(increment);
            if new_tat - now_n > tolerance {
                let wait = (new_tat - now_n - tolerance).min(u64::MAX / 2);
                return Err(RateLimited {
                    retry_after: Duration::from_nanos(wait),
                });
            }
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let g = Gcra::new(
            GcraConfig {
                rate_per_sec: 10.0,
                burst: 3,
            },
            t0,
        )
        .unwrap();
        for _ in 0..3 {
            g.check(t0).unwrap();
        }
        let e = g.check(t0).unwrap_err();
        assert_eq!(e.retry_after, Duration::from_millis(100));
        g.check(t0 + Duration::from_millis(100)).unwrap();
        assert!(g.check(t0 + Duration::from_millis(100)).is_err());
        g.set_limit(GcraConfig {
            rate_per_sec: 1000.0,
            burst: 3,
        })
        .unwrap();
        // TAT was pushed with the old interval; it drains at wall time.
        assert!(g.check(t0 + Duration::from_millis(300)).is_err());
        g.check(t0 + Duration::from_millis(400)).unwrap();
        g.check(t0 + Duration::from_millis(401)).unwrap();
    }

    proptest! {
        /// Over any interval of length d, admitted <= rate * d + burst.
        #[test]
        fn never_admits_more_than_rate_times_window_plus_burst(
            rate in 1.0f64..1000.0,
            burst in 1u32..20,
            gaps in proptest::collection::vec(0u64..20_000_000, 1..400),
        ) {
            let t0 = Instant::now();
            let g = Gcra::new(GcraConfig { rate_per_sec: rate, burst }, t0).unwrap();
            let mut now = t0;
            let mut admitted = Vec::new();
            for gap in gaps {
                now += Duration::from_nanos(gap);
                if g.check(now).is_ok() {
                    admitted.push(now);
                }
            }
            // For a sorted list it suffices to check every pair of admissions.
            for i in 0..admitted.len() {
                for j in i..admitted.len() {
                    let d = (admitted[j] - admitted[i]).as_secs_f64();
                    let count = (j - i + 1) as f64;
                    prop_assert!(count <= rate * d + f64::from(burst) + 1e-6,
                        "{count} calls in {d}s at rate {rate} burst {burst}");
                }
            }
        }
    }
}
