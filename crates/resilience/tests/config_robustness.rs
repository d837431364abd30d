//! Any config that passes `validate()` builds a core that never panics, and
//! any config that fails names a field: extreme values included (u64::MAX,
//! zero, NaN, infinities). Mirrors DESIGN.md's "bad input gets a clear
//! error, never panics".

#![allow(clippy::unwrap_used)] // test code

use std::time::Duration;

use meshwork_resilience::breaker::{BreakerConfig, BreakerCore, SlidingWindow};
use meshwork_resilience::classify::Outcome;
use meshwork_resilience::limit::concurrency::{
    AdaptiveConfig, AdaptiveLimit, Algorithm, SystemGuardConfig, SystemLoad,
};
use meshwork_resilience::limit::rate::{
    Gcra, GcraConfig, KeyedConfig, KeyedLimiter, Pacer, PacingConfig, SlidingWindowConfig, WarmUp,
    WarmUpConfig,
};
use meshwork_resilience::outlier::{OutlierConfig, OutlierDetector};
use meshwork_resilience::retry::{RetryBudget, RetryBudgetConfig};
use proptest::prelude::*;
use tokio::time::Instant;

fn int() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..4,
        1u64..100_000,
        Just(u64::MAX),
        Just(u64::MAX / 2),
        any::<u64>()
    ]
}

fn small() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..4, 1u32..1000, Just(u32::MAX), any::<u32>()]
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        0.0f64..2.0,
        0.0f64..1e6,
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(-1.0),
        Just(1e300),
        Just(0.0)
    ]
}

/// A few instants spread from now to far in the future.
fn times() -> Vec<Instant> {
    let t0 = Instant::now();
    [0u64, 1, 1_000, 3_600_000, 86_400_000 * 365]
        .iter()
        .map(|&ms| t0 + Duration::from_millis(ms))
        .collect()
}

proptest! {
    #[test]
    fn rate_limiters(rate in float(), burst in small(), a in int(), b in small(), f in float(), keys in int()) {
        let now = Instant::now();
        if let Ok(g) = Gcra::new(GcraConfig { rate_per_sec: rate, burst }, now) {
            for t in times() { let _ = g.check(t); let _ = g.check_n(burst, t); }
        }
        if let Ok(w) = meshwork_resilience::limit::rate::SlidingWindow::new(
            SlidingWindowConfig { limit: a, window_ms: a, buckets: b }, now)
        {
            for t in times() { let _ = w.check(t); }
        }
        if let Ok(w) = WarmUp::new(WarmUpConfig { rate_per_sec: rate, warm_up_period_ms: a, cold_factor: f }, now) {
            for t in times() { let _ = w.check(t); }
        }
        if let Ok(p) = Pacer::new(PacingConfig { rate_per_sec: rate, max_wait_ms: a }, now) {
            for t in times() { let _ = p.reserve(t); }
        }
        let shards = (keys % 2000) as usize;
        let cfg = KeyedConfig { rate_per_sec: rate, burst, max_keys: a as usize, shards, hot_keys: Some(b as usize) };
        match KeyedLimiter::new(cfg, now) {
            Ok(k) => for t in times() { let _ = k.check(&keys, t); },
            Err(e) => prop_assert!(!e.field.is_empty()),
        }
    }

    #[test]
    fn breaker_and_outlier(a in int(), b in int(), n in small(), f in float(), g in float(), time_window in any::<bool>()) {
        let window = if time_window {
            SlidingWindow::Time { duration_ms: a, buckets: n }
        } else {
            SlidingWindow::Count { size: n }
        };
        let cfg = BreakerConfig {
            consecutive_failures: Some(n),
            failure_rate_threshold: Some(f),
            slow_call_rate_threshold: Some(g),
            slow_call_duration_ms: b,
            window,
            minimum_calls: n,
            open_duration_ms: a,
            open_backoff_multiplier: g,
            max_open_duration_ms: b,
            half_open_max_probes: n,
            ..Default::default()
        };
        match BreakerCore::new(cfg, Instant::now()) {
            Ok(core) => {
                for t in times() {
                    for outcome in [Outcome::Failure, Outcome::Success, Outcome::Ignored] {
                        if let Ok(p) = core.try_acquire(t) {
                            core.record(p, outcome, Duration::from_millis(b.min(1 << 40)), t);
                        }
                    }
                    let _ = core.remaining_open(t);
                }
            }
            Err(e) => prop_assert!(e.field.starts_with("breaker.")),
        }
        let cfg = OutlierConfig {
            consecutive_failures: Some(n),
            interval_ms: a,
            base_ejection_ms: b,
            max_ejection_ms: a,
            max_ejection_percent: n,
            ..Default::default()
        };
        if let Ok(mut d) = OutlierDetector::new(cfg) {
            d.add(1u8);
            for t in times() { d.record(&1, false, t); d.tick(t); let _ = d.is_ejected(&1, t); }
        }
    }

    #[test]
    fn budgets_and_concurrency(a in int(), b in int(), n in small(), f in float(), g in float()) {
        if let Ok(budget) = RetryBudget::new(RetryBudgetConfig { ratio: f, min_per_sec: n, ttl_ms: a }, Instant::now()) {
            for t in times() { budget.deposit(t); let _ = budget.try_withdraw(t); }
        }
        let cfg = SystemGuardConfig {
            window_ms: a,
            buckets: n,
            min_in_flight: b,
            max_in_flight: a,
            headroom: f,
            min_rtt_window_ms: b,
            probe_ms: a,
        };
        if let Ok(s) = SystemLoad::new(cfg, Instant::now()) {
            for t in times() { if s.try_acquire(t).is_ok() { s.release(Duration::from_millis(5), t); } }
        }
        for algorithm in [
            Algorithm::Aimd { backoff_ratio: f, timeout_ms: a },
            Algorithm::Gradient { tolerance: f, smoothing: g, probe_interval: n },
        ] {
            let cfg = AdaptiveConfig { initial_limit: a, min_limit: b, max_limit: a, algorithm };
            if let Ok(l) = AdaptiveLimit::new(cfg) {
                for ms in [0, 1, 10_000] {
                    if let Ok(k) = l.try_acquire() { l.release(Duration::from_millis(ms), k, ms == 1); }
                }
            }
        }
    }
}
