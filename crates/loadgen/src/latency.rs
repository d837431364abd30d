//! Latency histograms: microseconds from 1 µs to 10 minutes, three
//! significant digits, reported as percentiles in milliseconds.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Largest latency recorded, µs (larger ones are clamped to it).
const MAX_US: u64 = 600_000_000;

/// A latency histogram.
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    /// An empty histogram.
    pub fn new() -> Self {
        // Constant bounds (1..=MAX_US, 3 digits) that hdrhistogram accepts.
        Latency(Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds"))
    }

    /// Records `d` (at least 1 µs; clamped to the range).
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros())
            .unwrap_or(MAX_US)
            .clamp(1, MAX_US);
        let _ = self.0.record(us);
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &Latency) {
        let _ = self.0.add(&other.0);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The latency at quantile `q` (0..=1), in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    /// The largest sample, in milliseconds.
    pub fn max_ms(&self) -> f64 {
        self.0.max() as f64 / 1000.0
    }

    /// `{"count", "p50_ms", "p90_ms", "p99_ms", "max_ms"}` (`{"count": 0}` when empty).
    pub fn json(&self) -> Value {
        if self.0.is_empty() {
            return json!({"count": 0});
        }
        json!({
            "count": self.count(),
            "p50_ms": self.quantile_ms(0.5),
            "p90_ms": self.quantile_ms(0.9),
            "p99_ms": self.quantile_ms(0.99),
            "max_ms": self.max_ms(),
        })
    }

    /// `p50 a ms  p90 b ms  p99 c ms  max d ms  (n=N)`, or `no samples`.
    pub fn line(&self) -> String {
        if self.0.is_empty() {
            return "no samples".into();
        }
        format!(
            "p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n={})",
            self.quantile_ms(0.5),
            self.quantile_ms(0.9),
            self.quantile_ms(0.99),
            self.max_ms(),
            self.count()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_in_milliseconds_and_clamping() {
        let mut l = Latency::new();
        assert_eq!(l.line(), "no samples");
        assert_eq!(l.json(), json!({"count": 0}));
        for ms in 1..=100u64 {
            l.record(Duration::from_millis(ms));
        }
        l.record(Duration::ZERO);
        l.record(Duration::from_secs(3600));
        assert_eq!(l.count(), 102);
        assert!((l.quantile_ms(0.5) - 50.0).abs() < 0.1, "{}", l.line());
        assert!((l.max_ms() - 600_000.0).abs() < 600.0);
        let mut m = Latency::new();
        m.merge(&l);
        assert_eq!(m.json()["count"], 102);
    }
}
