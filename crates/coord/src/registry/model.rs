//! What the registry stores: instances, their health, per-service settings; how
//! they are named and validated; and where they live in the key space.
//!
//! Every key of a service sits under one prefix, so one watch follows a service:
//!
//! ```text
//! /meshwork/registry/s/{service}/i/{instance}   Instance (JSON), on a lease if ephemeral
//! /meshwork/registry/s/{service}/h/{instance}   HealthStatus (JSON), written by the checker
//! /meshwork/registry/s/{service}/settings       ServiceSettings (JSON)
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::probe::HealthCheck;
use crate::error::{CoordError, Result};

/// Prefix of every registry key.
pub const REGISTRY_PREFIX: &str = "/meshwork/registry/s/";

/// Largest number of tags on an instance.
pub const MAX_TAGS: usize = 64;
/// Largest number of metadata entries on an instance.
pub const MAX_METADATA: usize = 64;
/// Largest encoded instance record, in bytes.
pub const MAX_RECORD: usize = 16 * 1024;

/// How clients talk to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Plain HTTP.
    #[default]
    Http,
    /// HTTP over TLS.
    Https,
    /// gRPC (HTTP/2).
    Grpc,
    /// Raw TCP.
    Tcp,
}

fn default_weight() -> u32 {
    100
}
fn default_true() -> bool {
    true
}
fn default_ttl() -> i64 {
    10
}

/// What a client sends to register an instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    /// Instance id, unique within the service (default `address:port`).
    #[serde(default)]
    pub id: String,
    /// IP address or host name clients connect to.
    pub address: String,
    /// Port clients connect to.
    pub port: u16,
    /// Protocol spoken on the port.
    #[serde(default)]
    pub protocol: Protocol,
    /// Load-balancing weight, 0..=10000 (0 = receive no traffic).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Availability zone.
    #[serde(default)]
    pub zone: String,
    /// Version of the software the instance runs.
    #[serde(default)]
    pub version: String,
    /// Free-form tags to filter on.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Free-form metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Ephemeral instances live on a lease renewed by heartbeats; persistent ones stay
    /// until deregistered and are only marked unhealthy.
    #[serde(default = "default_true")]
    pub ephemeral: bool,
    /// Lease TTL of an ephemeral instance, in seconds.
    #[serde(default = "default_ttl")]
    pub ttl_seconds: i64,
    /// Active health check run by Meshwork.
    #[serde(default)]
    pub check: Option<HealthCheck>,
    /// False takes the instance out of rotation without deregistering it.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

/// An instance as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Service name.
    pub service: String,
    /// What was registered.
    #[serde(flatten)]
    pub spec: InstanceSpec,
    /// Lease holding it (0 for persistent instances).
    pub lease: i64,
    /// Who registered it (client address or SDK identity).
    pub registered_by: String,
    /// When, in Unix milliseconds.
    pub registered_at_ms: u64,
}

/// Result of active checks, as last written by the node running them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthStatus {
    /// Passing or failing.
    pub healthy: bool,
    /// Why the last check failed (or "ok").
    pub detail: String,
    /// Node that runs the check.
    pub checker: String,
    /// When the status last changed, Unix milliseconds.
    pub since_ms: u64,
    /// When this record was written, Unix milliseconds.
    pub checked_at_ms: u64,
}

/// Settings of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ServiceSettings {
    /// Protection threshold in 0.0..=1.0: when the healthy share of instances falls
    /// below it, healthy-only discovery returns every instance instead.
    #[serde(default)]
    pub protect_threshold: f64,
    /// What the service is.
    #[serde(default)]
    pub description: String,
    /// Free-form metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// Checks a service name: 1..=128 of `[A-Za-z0-9._-]`, starting alphanumeric.
pub fn validate_service_name(name: &str) -> Result<()> {
    validate_name("service name", name, 128, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
    })
}

/// Checks an instance id: 1..=128 of `[A-Za-z0-9._:-]`, starting alphanumeric.
pub fn validate_instance_id(id: &str) -> Result<()> {
    validate_name("instance id", id, 128, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')
    })
}

/// Checks a name against a length and a character class.
pub(crate) fn validate_name(
    what: &str,
    name: &str,
    max: usize,
    ok: impl Fn(char) -> bool,
) -> Result<()> {
    if name.is_empty() {
        return Err(CoordError::invalid(format!("{what} is empty")));
    }
    if name.len() > max {
        return Err(CoordError::invalid(format!(
            "{what} {:?}... is {} bytes; the limit is {max}",
            &name[..name
                .char_indices()
                .nth(32)
                .map(|(i, _)| i)
                .unwrap_or(name.len())],
            name.len()
        )));
    }
    if let Some(c) = name.chars().find(|c| !ok(*c)) {
        return Err(CoordError::invalid(format!(
            "{what} {name:?} contains {c:?}; use letters, digits and the punctuation allowed for it"
        )));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(CoordError::invalid(format!(
            "{what} {name:?} must start with a letter or digit"
        )));
    }
    Ok(())
}

fn validate_address(a: &str) -> Result<()> {
    if a.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let ok = !a.is_empty()
        && a.len() <= 253
        && a.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(CoordError::invalid(format!(
            "address {a:?} is neither an IP address nor a valid host name"
        )))
    }
}

impl InstanceSpec {
    /// Validates every field and fills the default id.
    pub fn normalize(&mut self, min_ttl: i64, max_ttl: i64) -> Result<()> {
        validate_address(&self.address)?;
        if self.port == 0 {
            return Err(CoordError::invalid("port must be 1..=65535"));
        }
        if self.id.is_empty() {
            self.id = format!("{}:{}", self.address, self.port);
        }
        validate_instance_id(&self.id)?;
        if self.weight > 10_000 {
            return Err(CoordError::invalid(format!(
                "weight {} is out of range 0..=10000",
                self.weight
            )));
        }
        for (what, v) in [("zone", &self.zone), ("version", &self.version)] {
            if v.len() > 128 || v.chars().any(|c| c.is_control()) {
                return Err(CoordError::invalid(format!(
                    "{what} must be at most 128 printable characters"
                )));
            }
        }
        if self.tags.len() > MAX_TAGS {
            return Err(CoordError::invalid(format!(
                "{} tags; the limit is {MAX_TAGS}",
                self.tags.len()
            )));
        }
        for t in &self.tags {
            if t.is_empty() || t.len() > 128 || t.chars().any(|c| c.is_control() || c == ',') {
                return Err(CoordError::invalid(format!(
                    "tag {t:?} must be 1..=128 printable characters without commas"
                )));
            }
        }
        if self.metadata.len() > MAX_METADATA {
            return Err(CoordError::invalid(format!(
                "{} metadata entries; the limit is {MAX_METADATA}",
                self.metadata.len()
            )));
        }
        for (k, v) in &self.metadata {
            if k.is_empty() || k.len() > 128 || v.len() > 1024 {
                return Err(CoordError::invalid(format!(
                    "metadata key {k:?} must be 1..=128 bytes and its value at most 1024"
                )));
            }
        }
        if self.ephemeral && !(min_ttl..=max_ttl).contains(&self.ttl_seconds) {
            return Err(CoordError::invalid(format!(
                "ttl_seconds {} is out of range {min_ttl}..={max_ttl}",
                self.ttl_seconds
            )));
        }
        if let Some(c) = &self.check {
            c.validate()
                .map_err(|e| CoordError::invalid(format!("check: {e}")))?;
        }
        Ok(())
    }
}

impl ServiceSettings {
    /// Validates the settings.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.protect_threshold) {
            return Err(CoordError::invalid(format!(
                "protect_threshold {} must be within 0.0..=1.0",
                self.protect_threshold
            )));
        }
        if self.description.len() > 4096 || self.metadata.len() > MAX_METADATA {
            return Err(CoordError::invalid(
                "description is limited to 4096 bytes and metadata to 64 entries",
            ));
        }
        Ok(())
    }
}

/// Key of an instance record.
pub fn instance_key(service: &str, id: &str) -> String {
    format!("{REGISTRY_PREFIX}{service}/i/{id}")
}

/// Key of an instance's health record.
pub fn health_key(service: &str, id: &str) -> String {
    format!("{REGISTRY_PREFIX}{service}/h/{id}")
}

/// Key of a service's settings.
pub fn settings_key(service: &str) -> String {
    format!("{REGISTRY_PREFIX}{service}/settings")
}

/// Prefix of every key of one service.
pub fn service_prefix(service: &str) -> String {
    format!("{REGISTRY_PREFIX}{service}/")
}

/// What a registry key names.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyKind<'a> {
    /// An instance record.
    Instance(&'a str, &'a str),
    /// A health record.
    Health(&'a str, &'a str),
    /// Service settings.
    Settings(&'a str),
}

/// Parses a registry key; `None` for keys this version does not know.
pub fn parse_key(key: &[u8]) -> Option<KeyKind<'_>> {
    let rest = std::str::from_utf8(key)
        .ok()?
        .strip_prefix(REGISTRY_PREFIX)?;
    let (service, rest) = rest.split_once('/')?;
    if rest == "settings" {
        return Some(KeyKind::Settings(service));
    }
    let (kind, id) = rest.split_once('/')?;
    match kind {
        "i" => Some(KeyKind::Instance(service, id)),
        "h" => Some(KeyKind::Health(service, id)),
        _ => None,
    }
}

/// Wall-clock Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> InstanceSpec {
        serde_json::from_str(r#"{"address":"127.0.0.1","port":8080}"#).unwrap()
    }

    #[test]
    fn defaults_and_id() {
        let mut s = spec();
        s.normalize(2, 3600).unwrap();
        assert_eq!(s.id, "127.0.0.1:8080");
        assert!(s.ephemeral && s.enabled);
        assert_eq!(s.weight, 100);
    }

    #[test]
    fn rejects_bad_fields_with_clear_messages() {
        let mut s = spec();
        s.address = "bad host!".into();
        assert!(
            s.normalize(2, 3600)
                .unwrap_err()
                .to_string()
                .contains("host name")
        );
        let mut s = spec();
        s.ttl_seconds = 1;
        assert!(
            s.normalize(2, 3600)
                .unwrap_err()
                .to_string()
                .contains("ttl_seconds")
        );
        let mut s = spec();
        s.tags = vec!["a,b".into()];
        assert!(s.normalize(2, 3600).is_err());
        assert!(validate_service_name("a/b").is_err());
        assert!(validate_service_name("-x").is_err());
        assert!(validate_service_name(&"x".repeat(129)).is_err());
        assert!(validate_service_name("order-svc.v2").is_ok());
        assert!(
            serde_json::from_str::<InstanceSpec>(r#"{"address":"a","port":1,"bogus":1}"#).is_err()
        );
    }

    #[test]
    fn keys_round_trip() {
        assert_eq!(
            parse_key(instance_key("svc", "a:1").as_bytes()),
            Some(KeyKind::Instance("svc", "a:1"))
        );
        assert_eq!(
            parse_key(health_key("svc", "a:1").as_bytes()),
            Some(KeyKind::Health("svc", "a:1"))
        );
        assert_eq!(
            parse_key(settings_key("svc").as_bytes()),
            Some(KeyKind::Settings("svc"))
        );
        assert_eq!(parse_key(b"/other"), None);
    }
}
