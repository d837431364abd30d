//! Breaker configuration, loadable from TOML/JSON.

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, check};

/// The sliding window over which failure and slow-call rates are computed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SlidingWindow {
    /// The last `size` calls.
    Count {
        /// Number of calls kept (1..=100_000).
        size: u32,
    },
    /// The calls of the last `duration_ms`, kept in `buckets` buckets.
    Time {
        /// Window length in milliseconds.
        duration_ms: u64,
        /// Number of buckets the window is split into (1..=600).
        buckets: u32,
    },
}

/// Configuration of a [`CircuitBreaker`](super::CircuitBreaker).
///
/// Every trigger is optional; a breaker with none never opens. The classic
/// "open after 3 consecutive failures, try again after 30 s" is
/// `BreakerConfig { consecutive_failures: Some(3), failure_rate_threshold: None,
/// open_duration_ms: 30_000, ..Default::default() }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Name used as the `name` label of the breaker's metrics.
    pub name: String,
    /// Open after this many failures in a row (`None`: trigger off).
    pub consecutive_failures: Option<u32>,
    /// Open when the failure rate over the window reaches this fraction
    /// (0 < x <= 1; `None`: trigger off).
    pub failure_rate_threshold: Option<f64>,
    /// Open when the fraction of slow calls over the window reaches this
    /// (0 < x <= 1; `None`: trigger off).
    pub slow_call_rate_threshold: Option<f64>,
    /// A call taking at least this long (milliseconds) is slow.
    pub slow_call_duration_ms: u64,
    /// Window for the rate triggers.
    pub window: SlidingWindow,
    /// Rate triggers fire only once the window holds this many calls.
    pub minimum_calls: u32,
    /// How long the breaker stays open the first time (milliseconds).
    pub open_duration_ms: u64,
    /// Each re-open straight from half-open multiplies the open duration by
    /// this (>= 1; 1 = constant).
    pub open_backoff_multiplier: f64,
    /// Upper bound of the open duration (milliseconds).
    pub max_open_duration_ms: u64,
    /// Calls let through while half-open; all must succeed to close.
    pub half_open_max_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            name: "default".into(),
            consecutive_failures: Some(5),
            failure_rate_threshold: Some(0.5),
            slow_call_rate_threshold: None,
            slow_call_duration_ms: 1_000,
            window: SlidingWindow::Count { size: 100 },
            minimum_calls: 20,
            open_duration_ms: 30_000,
            open_backoff_multiplier: 1.0,
            max_open_duration_ms: 300_000,
            half_open_max_probes: 3,
        }
    }
}

impl BreakerConfig {
    /// Checks every field and cross-field rule.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(n) = self.consecutive_failures {
            check(n >= 1, "breaker.consecutive_failures", n, "at least 1")?;
        }
        for (field, v) in [
            (
                "breaker.failure_rate_threshold",
                self.failure_rate_threshold,
            ),
            (
                "breaker.slow_call_rate_threshold",
                self.slow_call_rate_threshold,
            ),
        ] {
            if let Some(x) = v {
                check(x > 0.0 && x <= 1.0, field, x, "a fraction in (0, 1]")?;
            }
        }
        match self.window {
            SlidingWindow::Count { size } => check(
                (1..=100_000).contains(&size),
                "breaker.window.size",
                size,
                "1..=100000",
            )?,
            SlidingWindow::Time {
                duration_ms,
                buckets,
            } => {
                check(
                    (1..=600).contains(&buckets),
                    "breaker.window.buckets",
                    buckets,
                    "1..=600",
                )?;
                check(
                    duration_ms >= u64::from(buckets),
                    "breaker.window.duration_ms",
                    duration_ms,
                    "at least 1 ms per bucket",
                )?;
            }
        }
        check(
            self.open_duration_ms >= 1,
            "breaker.open_duration_ms",
            self.open_duration_ms,
            "at least 1",
        )?;
        check(
            self.open_backoff_multiplier.is_finite() && self.open_backoff_multiplier >= 1.0,
            "breaker.open_backoff_multiplier",
            self.open_backoff_multiplier,
            "a finite number >= 1",
        )?;
        check(
            self.max_open_duration_ms >= self.open_duration_ms,
            "breaker.max_open_duration_ms",
            self.max_open_duration_ms,
            "at least open_duration_ms",
        )?;
        check(
            self.max_open_duration_ms <= 86_400_000,
            "breaker.max_open_duration_ms",
            self.max_open_duration_ms,
            "at most one day",
        )?;
        check(
            (1..=10_000).contains(&self.half_open_max_probes),
            "breaker.half_open_max_probes",
            self.half_open_max_probes,
            "1..=10000",
        )?;
        Ok(())
    }

    pub(crate) fn uses_window(&self) -> bool {
        self.failure_rate_threshold.is_some() || self.slow_call_rate_threshold.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_field() {
        assert!(BreakerConfig::default().validate().is_ok());
        let bad = BreakerConfig {
            failure_rate_threshold: Some(1.5),
            ..Default::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().field,
            "breaker.failure_rate_threshold"
        );
        let bad = BreakerConfig {
            half_open_max_probes: 0,
            ..Default::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().field,
            "breaker.half_open_max_probes"
        );
    }

    #[test]
    fn loads_from_json() {
        let cfg: BreakerConfig = serde_json::from_str(
            r#"{"consecutive_failures":3,"open_duration_ms":30000,"window":{"kind":"time","duration_ms":10000,"buckets":10}}"#,
        )
        .unwrap();
        assert_eq!(cfg.consecutive_failures, Some(3));
        assert_eq!(
            cfg.window,
            SlidingWindow::Time {
                duration_ms: 10_000,
                buckets: 10
            }
        );
        cfg.validate().unwrap();
    }
}
