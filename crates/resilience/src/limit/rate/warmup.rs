//! Warm-up limiter: after idling, the admitted rate starts at
//! `rate / cold_factor` and ramps up to `rate` over `warm_up_period_ms`, so a
//! cold service (empty caches, cold JIT/connection pools) is not flooded. This
//! is what Sentinel's `WarmUpController` does, computed with Guava's
//! `SmoothWarmingUp` model: idle time fills a store of permits, and permits
//! above a threshold cost more (up to `cold_factor` times the stable
//! interval). Every admitted call costs at least one stable interval, so over
//! any interval `d` at most `rate * d + 1` calls are admitted.

use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::RateLimited;
use crate::config::{ConfigError, check};

/// Warm-up limits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmUpConfig {
    /// Rate once warm, calls per second (> 0).
    pub rate_per_sec: f64,
    /// Time to ramp from cold to full rate, milliseconds (>= 1).
    pub warm_up_period_ms: u64,
    /// Cold rate is `rate / cold_factor` (> 1; Sentinel's default is 3).
    pub cold_factor: f64,
}

impl Default for WarmUpConfig {
    fn default() -> Self {
        Self {
            rate_per_sec: 100.0,
            warm_up_period_ms: 10_000,
            cold_factor: 3.0,
        }
    }
}

impl WarmUpConfig {
    /// Checks the fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            self.rate_per_sec.is_finite() && self.rate_per_sec > 0.0 && self.rate_per_sec <= 1e9,
            "warm_up.rate_per_sec",
            self.rate_per_sec,
            "a number in (0, 1e9]",
        )?;
        check(
            self.warm_up_period_ms >= 1,
            "warm_up.warm_up_period_ms",
            self.warm_up_period_ms,
            "at least 1",
        )?;
        check(
            self.cold_factor.is_finite() && self.cold_factor > 1.0 && self.cold_factor <= 1000.0,
            "warm_up.cold_factor",
            self.cold_factor,
            "a number in (1, 1000]",
        )
    }
}

#[derive(Debug)]
struct State {
    stable: f64,
    threshold: f64,
    max_permits: f64,
    slope: f64,
    cool_down: f64,
    stored: f64,
    /// Seconds since base when the next call may be admitted.
    next_free: f64,
}

impl State {
    fn new(cfg: &WarmUpConfig, stored: Option<f64>) -> Self {
        let stable = 1.0 / cfg.rate_per_sec;
        let cold = stable * cfg.cold_factor;
        let period = cfg.warm_up_period_ms as f64 / 1000.0;
        let threshold = 0.5 * period / stable;
        let max_permits = threshold + 2.0 * period / (stable + cold);
        let slope = (cold - stable) / (max_permits - threshold);
        Self {
            stable,
            threshold,
            max_permits,
            slope,
            cool_down: period / max_permits,
            stored: stored.unwrap_or(max_permits).min(max_permits),
            next_free: 0.0,
        }
    }

    fn permits_to_time(&self, permits: f64) -> f64 {
        self.stable + permits * self.slope
    }

    /// Cost of taking one permit: from the store (priced by the warm-up
    /// curve above the threshold) or fresh (stable interval).
    fn cost_of_one(&self) -> f64 {
        let take = self.stored.min(1.0);
        let above = (self.stored - self.threshold).max(0.0).min(take);
        let mut cost = 0.0;
        if above > 0.0 {
            let available = self.stored - self.threshold;
            cost += above
                * (self.permits_to_time(available) + self.permits_to_time(available - above))
                / 2.0;
        }
        cost + self.stable * (1.0 - above)
    }
}

/// A warm-up rate limiter.
#[derive(Debug)]
pub struct WarmUp {
    base: Instant,
    state: Mutex<State>,
}

impl WarmUp {
    /// A cold limiter at `now`.
    pub fn new(cfg: WarmUpConfig, now: Instant) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Self {
            base: now,
            state: Mutex::new(State::new(&cfg, None)),
        })
    }

    /// Changes the limits at run time, keeping the stored permits.
    pub fn set_limit(&self, cfg: WarmUpConfig) -> Result<(), ConfigError> {
        cfg.validate()?;
        let mut s = self.state.lock();
        let next_free = s.next_free;
        *s = State::new(&cfg, Some(s.stored));
        s.next_free = next_free;
        Ok(())
    }

    /// Admits one call at `now`.
    pub fn check(&self, now: Instant) -> Result<(), RateLimited> {
        let t = now.saturating_duration_since(self.base).as_secs_f64();
        let mut s = self.state.lock();
        if t > s.next_free {
            s.stored = (s.stored + (t - s.next_free) / s.cool_down).min(s.max_permits);
            s.next_free = t;
        }
        if s.next_free > t + 1e-12 {
            return Err(RateLimited {
                retry_after: Duration::from_secs_f64(s.next_free - t),
            });
        }
        let cost = s.cost_of_one();
        s.next_free += cost;
        s.stored = (s.stored - 1.0).max(0.0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted_in(w: &WarmUp, from: Instant, secs: u64) -> usize {
        let mut n = 0;
        let mut now = from;
        let end = from + Duration::from_secs(secs);
        while now < end {
            if w.check(now).is_ok() {
                n += 1;
            }
            now += Duration::from_micros(100);
        }
        n
    }

    #[test]
    fn cold_start_ramps_from_rate_over_cold_factor_to_rate() {
        let t0 = Instant::now();
        let cfg = WarmUpConfig {
            rate_per_sec: 300.0,
            warm_up_period_ms: 10_000,
            cold_factor: 3.0,
        };
        let w = WarmUp::new(cfg, t0).unwrap();
        let first = admitted_in(&w, t0, 1);
        assert!(
            (95..=115).contains(&first),
            "cold second admitted {first}, expected ~100"
        );
        let _ = admitted_in(&w, t0 + Duration::from_secs(1), 14);
        let warm = admitted_in(&w, t0 + Duration::from_secs(15), 1);
        assert!(
            (290..=301).contains(&warm),
            "warm second admitted {warm}, expected 300"
        );
        // Idle long enough and it is cold again.
        let later = t0 + Duration::from_secs(60);
        let cold_again = admitted_in(&w, later, 1);
        assert!(cold_again < 130, "{cold_again}");
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every admitted call costs at least one stable interval, so over
        /// any interval d at most rate * d + 1 calls pass, warm or cold.
        #[test]
        fn admits_at_most_rate_times_window_plus_one(
            rate in 1.0f64..500.0,
            cold_factor in 1.5f64..5.0,
            period_ms in 1u64..5_000,
            gaps in proptest::collection::vec(0u64..30_000_000, 1..300),
        ) {
            let t0 = Instant::now();
            let cfg = WarmUpConfig { rate_per_sec: rate, warm_up_period_ms: period_ms, cold_factor };
            let w = WarmUp::new(cfg, t0).unwrap();
            let mut now = t0;
            let mut admitted = Vec::new();
            for gap in gaps {
                now += Duration::from_nanos(gap);
                if w.check(now).is_ok() { admitted.push(now); }
            }
            for i in 0..admitted.len() {
                for j in i..admitted.len() {
                    let d = (admitted[j] - admitted[i]).as_secs_f64();
                    prop_assert!(((j - i + 1) as f64) <= rate * d + 1.0 + 1e-6);
                }
            }
        }
    }
}
