//! The typed error every `validate()` in this crate returns.
//!
//! A config error names the field (its path inside the component's config),
//! the value it had and what was expected, so a gateway loading TOML/JSON can
//! point the user at the exact key to fix.

/// A configuration value was out of range or inconsistent with another.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid config `{field}` = {value}: expected {expected}")]
pub struct ConfigError {
    /// Path of the offending field, e.g. `breaker.failure_rate_threshold`.
    pub field: &'static str,
    /// The rejected value, rendered for humans.
    pub value: String,
    /// What would have been accepted.
    pub expected: &'static str,
}

impl ConfigError {
    /// Builds an error for `field` holding `value`.
    pub fn new(field: &'static str, value: impl std::fmt::Display, expected: &'static str) -> Self {
        Self {
            field,
            value: value.to_string(),
            expected,
        }
    }
}

/// Fails with a [`ConfigError`] unless `ok`.
pub(crate) fn check(
    ok: bool,
    field: &'static str,
    value: impl std::fmt::Display,
    expected: &'static str,
) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(field, value, expected))
    }
}
