//! Health check definitions: HTTP, TCP and gRPC (`grpc.health.v1`) probes, as
//! stored next to an instance and validated at the edge. Running them is the
//! node's job (`prober`, feature `server`).
//!
//!
//! A probe opens a fresh connection to one instance, asks one question and
//! closes the connection. Every probe is bounded by the check's timeout and
//! never panics, whatever the peer sends: the result is always a
//! `ProbeOutcome` (module `prober`) with a short human-readable detail.
//!
//! The check definition is stored as JSON next to the instance. Its shape is
//! flat: a `type` tag, the fields of that kind, and the policy fields:
//!
//! ```json
//! {
//!   "type": "http",
//!   "path": "/healthz",
//!   "expected_status": 200,
//!   "headers": { "x-probe": "meshwork" },
//!   "interval_ms": 5000,
//!   "timeout_ms": 2000,
//!   "healthy_threshold": 1,
//!   "unhealthy_threshold": 2
//! }
//! ```
//!
//! `{"type": "tcp"}` and `{"type": "grpc", "service": "shop.Orders"}` are the
//! other kinds; every field except `type` has a default. Because the two
//! halves are flattened into one object, unknown fields are ignored rather
//! than rejected: [`HealthCheck::validate`] checks the values, not spelling.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use serde::{Deserialize, Serialize};

/// Shortest allowed probe interval, in milliseconds.
pub const MIN_INTERVAL_MS: u64 = 100;
/// Longest allowed probe interval, in milliseconds (one hour).
pub const MAX_INTERVAL_MS: u64 = 3_600_000;
/// Shortest allowed probe timeout, in milliseconds.
pub const MIN_TIMEOUT_MS: u64 = 10;
/// Largest allowed healthy/unhealthy threshold.
pub const MAX_THRESHOLD: u32 = 100;
/// Longest allowed HTTP probe path, in bytes.
pub const MAX_PATH_LEN: usize = 2048;
/// Most extra headers an HTTP probe may send.
pub const MAX_HEADERS: usize = 32;
/// Longest allowed extra header value, in bytes.
pub const MAX_HEADER_VALUE_LEN: usize = 4096;
/// Longest allowed gRPC service name, in bytes.
pub const MAX_GRPC_SERVICE_LEN: usize = 1024;
/// How much of an HTTP response body a probe reads before dropping it.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Headers the prober sets itself and that a check may not override.
const RESERVED_HEADERS: [&str; 5] = [
    "connection",
    "content-length",
    "transfer-encoding",
    "upgrade",
    "te",
];

/// What to ask an instance to decide whether it is healthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum CheckSpec {
    /// `GET path` over HTTP/1.1; healthy when the status matches.
    Http {
        /// Request path and optional query; must start with `/`.
        #[serde(default = "default_http_path")]
        path: String,
        /// Status that means healthy; `None` accepts any 2xx.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expected_status: Option<u16>,
        /// URL scheme: `http`, or `https` (the server verified against the
        /// system's roots and the node's identity authority, by the
        /// instance's service name when it serves with its identity, else
        /// its address).
        #[serde(default = "default_http_scheme")]
        scheme: String,
        /// Extra request headers (a `host` entry replaces the default Host).
        #[serde(default)]
        headers: BTreeMap<String, String>,
    },
    /// Healthy when a TCP connection can be opened.
    Tcp {},
    /// The standard gRPC health service (`grpc.health.v1.Health/Check`).
    Grpc {
        /// Service name to ask about; empty means the whole server.
        #[serde(default)]
        service: String,
    },
}

fn default_http_path() -> String {
    "/healthz".to_owned()
}

fn default_http_scheme() -> String {
    "http".to_owned()
}

impl Default for CheckSpec {
    fn default() -> Self {
        CheckSpec::Http {
            path: default_http_path(),
            expected_status: None,
            scheme: default_http_scheme(),
            headers: BTreeMap::new(),
        }
    }
}

impl CheckSpec {
    /// The kind's name as it appears in the `type` tag (`http`, `tcp`, `grpc`).
    pub fn kind(&self) -> &'static str {
        match self {
            CheckSpec::Http { .. } => "http",
            CheckSpec::Tcp {} => "tcp",
            CheckSpec::Grpc { .. } => "grpc",
        }
    }

    /// Checks every field, answering with a message that names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            CheckSpec::Http {
                path,
                expected_status,
                scheme,
                headers,
            } => {
                validate_http_path(path)?;
                if let Some(status) = expected_status
                    && !(100..=599).contains(status)
                {
                    return Err(format!(
                        "expected_status {status} is not an HTTP status (100..=599)"
                    ));
                }
                match scheme.as_str() {
                    "http" | "https" => {}
                    other => {
                        return Err(format!(
                            "scheme {other:?} is not supported: use \"http\" or \"https\""
                        ));
                    }
                }
                validate_headers(headers)
            }
            CheckSpec::Tcp {} => Ok(()),
            CheckSpec::Grpc { service } => {
                if service.len() > MAX_GRPC_SERVICE_LEN {
                    return Err(format!(
                        "service name is {} bytes long, the limit is {MAX_GRPC_SERVICE_LEN}",
                        service.len()
                    ));
                }
                Ok(())
            }
        }
    }
}

fn validate_http_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("path {path:?} must start with '/'"));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(format!(
            "path is {} bytes long, the limit is {MAX_PATH_LEN}",
            path.len()
        ));
    }
    if path.contains('#') {
        return Err(format!("path {path:?} must not contain a fragment ('#')"));
    }
    PathAndQuery::from_str(path)
        .map(|_| ())
        .map_err(|e| format!("path {path:?} is not a valid request target: {e}"))
}

fn validate_headers(headers: &BTreeMap<String, String>) -> Result<(), String> {
    if headers.len() > MAX_HEADERS {
        return Err(format!(
            "{} headers given, the limit is {MAX_HEADERS}",
            headers.len()
        ));
    }
    for (name, value) in headers {
        let parsed = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("header name {name:?} is not a valid HTTP header name"))?;
        if RESERVED_HEADERS.contains(&parsed.as_str()) {
            return Err(format!(
                "header {name:?} is set by the prober and cannot be overridden"
            ));
        }
        if value.len() > MAX_HEADER_VALUE_LEN {
            return Err(format!(
                "header {name:?} value is {} bytes long, the limit is {MAX_HEADER_VALUE_LEN}",
                value.len()
            ));
        }
        HeaderValue::from_str(value).map_err(|_| {
            format!("header {name:?} value {value:?} is not a valid HTTP header value")
        })?;
    }
    Ok(())
}

/// How often to probe and how many results in a row flip the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckPolicy {
    /// Time between two probes of one instance, in milliseconds.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Time one probe may take, in milliseconds; must be below the interval.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Successes in a row that mark an unhealthy instance healthy.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// Failures in a row that mark a healthy instance unhealthy.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
}

fn default_interval_ms() -> u64 {
    5000
}

fn default_timeout_ms() -> u64 {
    2000
}

fn default_healthy_threshold() -> u32 {
    1
}

fn default_unhealthy_threshold() -> u32 {
    2
}

impl Default for CheckPolicy {
    fn default() -> Self {
        CheckPolicy {
            interval_ms: default_interval_ms(),
            timeout_ms: default_timeout_ms(),
            healthy_threshold: default_healthy_threshold(),
            unhealthy_threshold: default_unhealthy_threshold(),
        }
    }
}

impl CheckPolicy {
    /// The probe interval as a [`Duration`].
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    /// The probe timeout as a [`Duration`].
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Checks the ranges, answering with a message that names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&self.interval_ms) {
            return Err(format!(
                "interval_ms {} is out of range: must be between {MIN_INTERVAL_MS} ms and \
                 {MAX_INTERVAL_MS} ms (1 hour)",
                self.interval_ms
            ));
        }
        if self.timeout_ms < MIN_TIMEOUT_MS {
            return Err(format!(
                "timeout_ms {} is too short: must be at least {MIN_TIMEOUT_MS} ms",
                self.timeout_ms
            ));
        }
        if self.timeout_ms >= self.interval_ms {
            return Err(format!(
                "timeout_ms {} must be shorter than interval_ms {}",
                self.timeout_ms, self.interval_ms
            ));
        }
        for (name, value) in [
            ("healthy_threshold", self.healthy_threshold),
            ("unhealthy_threshold", self.unhealthy_threshold),
        ] {
            if !(1..=MAX_THRESHOLD).contains(&value) {
                return Err(format!(
                    "{name} {value} is out of range: must be between 1 and {MAX_THRESHOLD}"
                ));
            }
        }
        Ok(())
    }
}

/// A complete health check: what to ask ([`CheckSpec`]) and how often
/// ([`CheckPolicy`]), serialized flat (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// The kind of probe and its parameters.
    #[serde(flatten)]
    pub spec: CheckSpec,
    /// Interval, timeout and thresholds.
    #[serde(flatten)]
    pub policy: CheckPolicy,
}

impl HealthCheck {
    /// Checks the spec and the policy.
    pub fn validate(&self) -> Result<(), String> {
        self.spec.validate()?;
        self.policy.validate()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A check of `spec` with `timeout_ms` and default policy otherwise.
    pub(crate) fn check(spec: CheckSpec, timeout_ms: u64) -> HealthCheck {
        HealthCheck {
            spec,
            policy: CheckPolicy {
                timeout_ms,
                ..CheckPolicy::default()
            },
        }
    }

    /// An HTTP check of `path`.
    pub(crate) fn http(path: &str, expected_status: Option<u16>) -> CheckSpec {
        CheckSpec::Http {
            path: path.to_owned(),
            expected_status,
            scheme: "http".to_owned(),
            headers: BTreeMap::new(),
        }
    }

    /// A gRPC health check of `service`.
    pub(crate) fn grpc(service: &str) -> CheckSpec {
        CheckSpec::Grpc {
            service: service.to_owned(),
        }
    }

    #[test]
    fn json_shape_is_flat_with_defaults() {
        let parsed: HealthCheck = serde_json::from_str(r#"{"type":"http"}"#).unwrap();
        assert_eq!(parsed, HealthCheck::default());
        let parsed: HealthCheck = serde_json::from_str(
            r#"{"type":"http","path":"/ready","expected_status":204,
                "headers":{"x-a":"b"},"interval_ms":1000,"timeout_ms":300,
                "healthy_threshold":2,"unhealthy_threshold":3}"#,
        )
        .unwrap();
        assert_eq!(
            parsed,
            HealthCheck {
                spec: CheckSpec::Http {
                    path: "/ready".to_owned(),
                    expected_status: Some(204),
                    scheme: "http".to_owned(),
                    headers: BTreeMap::from([("x-a".to_owned(), "b".to_owned())]),
                },
                policy: CheckPolicy {
                    interval_ms: 1000,
                    timeout_ms: 300,
                    healthy_threshold: 2,
                    unhealthy_threshold: 3,
                },
            }
        );
        let tcp: HealthCheck = serde_json::from_str(r#"{"type":"tcp","timeout_ms":50}"#).unwrap();
        assert_eq!(tcp.spec, CheckSpec::Tcp {});
        assert_eq!(tcp.policy.timeout_ms, 50);
        let grpc: HealthCheck =
            serde_json::from_str(r#"{"type":"grpc","service":"shop.Orders"}"#).unwrap();
        assert_eq!(grpc.spec, super::tests::grpc("shop.Orders"));

        // Round trip keeps the flat shape.
        let json = serde_json::to_value(HealthCheck::default()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "http", "path": "/healthz", "scheme": "http",
                "headers": {}, "interval_ms": 5000, "timeout_ms": 2000,
                "healthy_threshold": 1, "unhealthy_threshold": 2})
        );
        let json = serde_json::to_value(&parsed).unwrap();
        assert_eq!(json["type"], "http");
        assert_eq!(json["interval_ms"], 1000);
        assert_eq!(serde_json::from_value::<HealthCheck>(json).unwrap(), parsed);

        assert!(serde_json::from_str::<HealthCheck>(r#"{"type":"udp"}"#).is_err());
        assert!(serde_json::from_str::<HealthCheck>(r#"{"path":"/x"}"#).is_err());
        assert!(serde_json::from_str::<HealthCheck>(r#"{"type":"tcp","interval_ms":-1}"#).is_err());
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(HealthCheck::default().validate(), Ok(()));
        assert_eq!(check(CheckSpec::Tcp {}, 2000).validate(), Ok(()));
        assert_eq!(check(grpc("x"), 2000).validate(), Ok(()));
    }

    #[test]
    fn policy_validation() {
        let base = CheckPolicy::default();
        let bad = |p: CheckPolicy| p.validate().unwrap_err();
        assert!(
            bad(CheckPolicy {
                interval_ms: 99,
                timeout_ms: 10,
                ..base
            })
            .contains("interval_ms 99 is out of range")
        );
        assert!(
            bad(CheckPolicy {
                interval_ms: MAX_INTERVAL_MS + 1,
                ..base
            })
            .contains("1 hour")
        );
        assert!(
            CheckPolicy {
                interval_ms: MAX_INTERVAL_MS,
                ..base
            }
            .validate()
            .is_ok()
        );
        assert!(
            bad(CheckPolicy {
                timeout_ms: 9,
                ..base
            })
            .contains("at least 10 ms")
        );
        assert!(
            bad(CheckPolicy {
                interval_ms: 1000,
                timeout_ms: 1000,
                ..base
            })
            .contains("shorter than interval_ms")
        );
        assert!(
            bad(CheckPolicy {
                healthy_threshold: 0,
                ..base
            })
            .starts_with("healthy_threshold 0")
        );
        assert!(
            bad(CheckPolicy {
                unhealthy_threshold: 101,
                ..base
            })
            .starts_with("unhealthy_threshold 101")
        );
    }

    #[test]
    fn spec_validation() {
        let err = |s: CheckSpec| s.validate().unwrap_err();
        assert!(err(http("healthz", None)).contains("must start with '/'"));
        assert!(err(http("/a b", None)).contains("not a valid request target"));
        assert!(err(http("/a#frag", None)).contains("fragment"));
        assert!(err(http(&format!("/{}", "a".repeat(MAX_PATH_LEN)), None)).contains("limit"));
        assert!(http("/ready?full=1", None).validate().is_ok());
        assert!(err(http("/", Some(99))).contains("expected_status 99"));
        assert!(err(http("/", Some(600))).contains("expected_status 600"));
        assert!(http("/", Some(599)).validate().is_ok());

        let with = |scheme: &str, headers: &[(&str, &str)]| CheckSpec::Http {
            path: "/".to_owned(),
            expected_status: None,
            scheme: scheme.to_owned(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        assert!(with("https", &[]).validate().is_ok());
        assert!(err(with("ftp", &[])).contains("use \"http\" or \"https\""));
        assert!(err(with("http", &[("bad name", "x")])).contains("not a valid HTTP header name"));
        assert!(
            err(with("http", &[("x-a", "line\nbreak")])).contains("not a valid HTTP header value")
        );
        assert!(err(with("http", &[("Connection", "keep-alive")])).contains("set by the prober"));
        assert!(
            with("http", &[("host", "orders"), ("X-A", "b")])
                .validate()
                .is_ok()
        );
        let many: Vec<(String, String)> = (0..=MAX_HEADERS)
            .map(|i| (format!("x-{i}"), "v".to_owned()))
            .collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert!(err(with("http", &many)).contains("headers given"));

        assert!(err(grpc(&"s".repeat(MAX_GRPC_SERVICE_LEN + 1))).contains("service name"));
    }
}
