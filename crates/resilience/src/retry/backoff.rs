//! Exponential backoff with full jitter: attempt `n` (1-based) waits a
//! uniformly random time in `[0, min(max, initial * multiplier^(n-1))]`
//! (AWS's "full jitter", which spreads retries of many clients best).

use std::time::Duration;

use rand::Rng;

/// The upper bound of the wait before retry number `retry` (1-based).
pub fn ceiling(initial: Duration, max: Duration, multiplier: f64, retry: u32) -> Duration {
    let exp = multiplier.powi(retry.saturating_sub(1).min(64) as i32);
    Duration::from_secs_f64((initial.as_secs_f64() * exp).min(max.as_secs_f64()))
}

/// A fully jittered wait before retry number `retry`.
pub fn full_jitter(initial: Duration, max: Duration, multiplier: f64, retry: u32) -> Duration {
    let cap = ceiling(initial, max, multiplier, retry).as_nanos() as u64;
    Duration::from_nanos(rand::rng().random_range(0..=cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps_and_stays_below_ceiling() {
        let (i, m) = (Duration::from_millis(10), Duration::from_millis(100));
        assert_eq!(ceiling(i, m, 2.0, 1), Duration::from_millis(10));
        assert_eq!(ceiling(i, m, 2.0, 3), Duration::from_millis(40));
        assert_eq!(ceiling(i, m, 2.0, 30), Duration::from_millis(100));
        for n in 1..10 {
            assert!(full_jitter(i, m, 2.0, n) <= ceiling(i, m, 2.0, n));
        }
    }
}
