//! Retry budget: retries may add at most `ratio` of recent requests plus
//! `min_per_sec` per second, so a failing dependency never sees a retry
//! storm (Finagle's / linkerd's budget).
//!
//! Requests deposit, retries withdraw, both counted in `buckets` buckets over
//! `ttl_ms`. A withdrawal succeeds only if, counting it, the retries in the
//! window stay within `min_per_sec * ttl + ratio * requests in window`.

use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::{ConfigError, check};

/// Buckets in the budget window.
const BUCKETS: u64 = 10;

/// Retry budget limits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryBudgetConfig {
    /// Retries allowed per request in the window (0..=1000; 0.2 = 20 %).
    pub ratio: f64,
    /// Retries allowed per second regardless of traffic.
    pub min_per_sec: u32,
    /// Window over which requests and retries are counted, milliseconds.
    pub ttl_ms: u64,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_sec: 10,
            ttl_ms: 10_000,
        }
    }
}

impl RetryBudgetConfig {
    /// Checks the fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            self.ratio.is_finite() && (0.0..=1000.0).contains(&self.ratio),
            "retry.budget.ratio",
            self.ratio,
            "a number in [0, 1000]",
        )?;
        check(
            (1_000..=3_600_000).contains(&self.ttl_ms),
            "retry.budget.ttl_ms",
            self.ttl_ms,
            "1000..=3600000 (1 s to 1 h)",
        )
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    epoch: u64,
    deposits: u64,
    withdrawals: u64,
}

/// The budget.
#[derive(Debug)]
pub struct RetryBudget {
    base: Instant,
    width_nanos: u64,
    floor: f64,
    ratio: f64,
    buckets: Mutex<[Bucket; BUCKETS as usize]>,
}

impl RetryBudget {
    /// An empty budget at `now`.
    pub fn new(cfg: RetryBudgetConfig, now: Instant) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Self {
            base: now,
            width_nanos: Duration::from_millis(cfg.ttl_ms).as_nanos() as u64 / BUCKETS,
            floor: f64::from(cfg.min_per_sec) * cfg.ttl_ms as f64 / 1000.0,
            ratio: cfg.ratio,
            buckets: Mutex::new([Bucket::default(); BUCKETS as usize]),
        })
    }

    fn epoch(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_nanos() as u64 / self.width_nanos + 1
    }

    fn slot(buckets: &mut [Bucket; BUCKETS as usize], epoch: u64) -> &mut Bucket {
        let b = &mut buckets[(epoch % BUCKETS) as usize];
        if b.epoch != epoch {
            *b = Bucket {
                epoch,
                ..Bucket::default()
            };
        }
        b
    }

    /// Counts one original request.
    pub fn deposit(&self, now: Instant) {
        let epoch = self.epoch(now);
        Self::slot(&mut self.buckets.lock(), epoch).deposits += 1;
    }

    /// Takes one retry from the budget, if there is one.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let epoch = self.epoch(now);
        let mut buckets = self.buckets.lock();
        let (mut deposits, mut withdrawals) = (0u64, 0u64);
        for b in buckets
            .iter()
            .filter(|b| b.epoch != 0 && b.epoch + BUCKETS > epoch)
        {
            deposits += b.deposits;
            withdrawals += b.withdrawals;
        }
        if (withdrawals + 1) as f64 > self.floor + self.ratio * deposits as f64 {
            return false;
        }
        Self::slot(&mut buckets, epoch).withdrawals += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ratio_and_floor() {
        let t0 = Instant::now();
        let b = RetryBudget::new(
            RetryBudgetConfig {
                ratio: 0.1,
                min_per_sec: 0,
                ttl_ms: 10_000,
            },
            t0,
        )
        .unwrap();
        for _ in 0..100 {
            b.deposit(t0);
        }
        let granted = (0..100).filter(|_| b.try_withdraw(t0)).count();
        assert_eq!(granted, 10);
        let b = RetryBudget::new(
            RetryBudgetConfig {
                ratio: 0.0,
                min_per_sec: 2,
                ttl_ms: 1_000,
            },
            t0,
        )
        .unwrap();
        assert_eq!((0..10).filter(|_| b.try_withdraw(t0)).count(), 2);
        assert!(b.try_withdraw(t0 + Duration::from_secs(1)), "floor refills");
    }

    proptest! {
        /// Over a whole run, retries never exceed ratio x requests plus the
        /// floor for every started window (run length + one ttl).
        #[test]
        fn retries_never_exceed_the_budget(
            ratio in 0.0f64..1.0,
            min_per_sec in 0u32..5,
            events in proptest::collection::vec((any::<bool>(), 0u64..300), 1..2000),
        ) {
            let t0 = Instant::now();
            let cfg = RetryBudgetConfig { ratio, min_per_sec, ttl_ms: 1_000 };
            let b = RetryBudget::new(cfg, t0).unwrap();
            let (mut now, mut deposits, mut retries) = (t0, 0u64, 0u64);
            for (is_request, dt_ms) in events {
                now += Duration::from_millis(dt_ms);
                if is_request { b.deposit(now); deposits += 1; }
                else if b.try_withdraw(now) { retries += 1; }
            }
            let secs = (now - t0).as_secs_f64() + 1.0;
            let bound = ratio * deposits as f64 + f64::from(min_per_sec) * (secs + 1.0);
            prop_assert!(retries as f64 <= bound, "{retries} > {bound}");
        }
    }
}
