//! One config struct for everything a route or a client may set, so the
//! gateway and the SDK can load a whole resilience policy from one TOML/JSON
//! table and validate it once. Absent sections mean "layer not used".

use serde::{Deserialize, Serialize};

use crate::breaker::BreakerConfig;
use crate::config::ConfigError;
use crate::limit::concurrency::{AdaptiveConfig, BulkheadConfig, SystemGuardConfig};
use crate::limit::rate::{
    GcraConfig, KeyedConfig, PacingConfig, SlidingWindowConfig, WarmUpConfig,
};
use crate::outlier::OutlierConfig;
use crate::retry::RetryConfig;
use crate::timeout::TimeoutConfig;

/// Which rate limiter, with its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RateLimitConfig {
    /// Token bucket.
    Gcra(GcraConfig),
    /// Sliding-window counter.
    SlidingWindow(SlidingWindowConfig),
    /// Cold-start ramp.
    WarmUp(WarmUpConfig),
    /// Queueing leaky bucket.
    Pacing(PacingConfig),
    /// Per key (the key extractor is chosen in code).
    Keyed(KeyedConfig),
}

impl RateLimitConfig {
    /// Checks the chosen limiter's settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            RateLimitConfig::Gcra(c) => c.validate(),
            RateLimitConfig::SlidingWindow(c) => c.validate(),
            RateLimitConfig::WarmUp(c) => c.validate(),
            RateLimitConfig::Pacing(c) => c.validate(),
            RateLimitConfig::Keyed(c) => c.validate(),
        }
    }
}

/// A whole resilience policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Per-call timeout.
    pub timeout: Option<TimeoutConfig>,
    /// Retries.
    pub retry: Option<RetryConfig>,
    /// Circuit breaker.
    pub breaker: Option<BreakerConfig>,
    /// Rate limit.
    pub rate_limit: Option<RateLimitConfig>,
    /// Bulkhead.
    pub bulkhead: Option<BulkheadConfig>,
    /// Adaptive concurrency limit.
    pub adaptive: Option<AdaptiveConfig>,
    /// System-load guard.
    pub system_guard: Option<SystemGuardConfig>,
    /// Outlier detection (for balanced upstreams).
    pub outlier: Option<OutlierConfig>,
}

impl PolicyConfig {
    /// Validates every present section; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(c) = &self.timeout {
            c.validate()?;
        }
        if let Some(c) = &self.retry {
            c.validate()?;
        }
        if let Some(c) = &self.breaker {
            c.validate()?;
        }
        if let Some(c) = &self.rate_limit {
            c.validate()?;
        }
        if let Some(c) = &self.bulkhead {
            c.validate()?;
        }
        if let Some(c) = &self.adaptive {
            c.validate()?;
        }
        if let Some(c) = &self.system_guard {
            c.validate()?;
        }
        if let Some(c) = &self.outlier {
            c.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_policy_from_json() {
        let policy: PolicyConfig = serde_json::from_str(
            r#"{
                "timeout": { "timeout_ms": 2000 },
                "retry": { "max_attempts": 3, "budget": { "ratio": 0.1, "min_per_sec": 5, "ttl_ms": 10000 } },
                "breaker": { "name": "payments", "consecutive_failures": 3, "open_duration_ms": 30000 },
                "rate_limit": { "kind": "warm_up", "rate_per_sec": 100, "warm_up_period_ms": 10000, "cold_factor": 3 },
                "bulkhead": { "max_in_flight": 64 },
                "adaptive": { "algorithm": { "kind": "aimd", "backoff_ratio": 0.9, "timeout_ms": 500 } },
                "outlier": { "consecutive_failures": 5, "max_ejection_percent": 20 }
            }"#,
        )
        .unwrap();
        policy.validate().unwrap();
        assert!(matches!(
            policy.rate_limit,
            Some(RateLimitConfig::WarmUp(_))
        ));
        assert_eq!(
            policy.bulkhead.unwrap().max_queued,
            BulkheadConfig::default().max_queued
        );

        let bad: PolicyConfig = serde_json::from_str(
            r#"{ "rate_limit": { "kind": "gcra", "rate_per_sec": 0, "burst": 1 } }"#,
        )
        .unwrap();
        assert_eq!(bad.validate().unwrap_err().field, "rate.rate_per_sec");
        assert!(
            serde_json::from_str::<PolicyConfig>(r#"{ "breakr": {} }"#).is_err(),
            "typos are rejected"
        );
    }
}
