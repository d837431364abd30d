//! Listener-wide limits and defaults: every one explicit, with its unit in
//! its name and a documented default.

use serde::{Deserialize, Serialize};

/// A configuration value was out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid gateway config `{field}` = {value}: expected {expected}")]
pub struct GatewayConfigError {
    /// The field.
    pub field: &'static str,
    /// Its value.
    pub value: String,
    /// What is accepted.
    pub expected: &'static str,
}

/// Limits and defaults of one gateway (all listeners share them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Largest request head (request line + headers) accepted, bytes.
    /// Default 32 KiB; larger gets 431.
    pub max_header_bytes: usize,
    /// Most request headers accepted. Default 100; more gets 431.
    pub max_headers: usize,
    /// Largest request body, bytes. Default 10 MiB; larger gets 413.
    pub max_body_bytes: u64,
    /// Time a client has to send a complete request head, ms (slowloris).
    /// Default 10 000. Also bounds how long an idle HTTP/1 keep-alive
    /// connection waits for its next request.
    pub header_read_timeout_ms: u64,
    /// Longest gap between two chunks of a request body, ms. Default 30 000;
    /// exceeded gets 408.
    pub body_read_timeout_ms: u64,
    /// A connection with no request in flight and no bytes moving for this
    /// long is closed, ms. Default 60 000.
    pub idle_timeout_ms: u64,
    /// Upstream TCP connect timeout, ms. Default 2 000.
    pub upstream_connect_timeout_ms: u64,
    /// Idle pooled upstream connections are closed after this, ms. Default 90 000.
    pub upstream_pool_idle_timeout_ms: u64,
    /// Idle pooled connections kept per upstream endpoint. Default 512.
    pub upstream_pool_max_idle_per_host: usize,
    /// Overall time for an upstream to answer (response head) when the route
    /// sets none, ms. Default 30 000.
    pub default_timeout_ms: u64,
    /// Client connections served at once; the listener stops accepting
    /// above it. Default 10 000.
    pub max_connections: usize,
    /// HTTP/2 streams per client connection. Default 256.
    pub h2_max_concurrent_streams: u32,
    /// Mirrored (shadow) requests in flight at once; more are skipped.
    /// Default 64.
    pub mirror_max_in_flight: usize,
    /// Body chunks buffered for a mirror before it is cut off. Default 16.
    pub mirror_buffer_chunks: usize,
    /// Request body bytes kept while streaming upstream so that a retry can
    /// send the body again (routes can override it with
    /// `forward.retry_buffer_bytes`). Default 64 KiB; a larger body is
    /// still streamed but not retried; 0 keeps nothing.
    pub retry_buffer_bytes: u64,
    /// Request id header: kept if the client sent a valid one, else
    /// generated; echoed on the response. Default `x-request-id`.
    pub request_id_header: String,
    /// Pseudonym in the `Via` header. Default `meshwork`.
    pub via_name: String,
    /// Append to a client's `X-Forwarded-For`/`Forwarded` instead of
    /// replacing them (only behind a trusted proxy). Default false.
    pub trust_forwarded_headers: bool,
    /// Emit one structured access-log event per request (target
    /// `meshwork_gateway::access`, level INFO). Default true.
    pub access_log: bool,
    /// Longest wait for in-flight requests at shutdown, ms. Default 30 000.
    pub shutdown_grace_ms: u64,
    /// How often TLS certificate files are checked for changes, ms. Default 2 000.
    pub tls_reload_interval_ms: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_body_bytes: 10 * 1024 * 1024,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            upstream_connect_timeout_ms: 2_000,
            upstream_pool_idle_timeout_ms: 90_000,
            upstream_pool_max_idle_per_host: 512,
            default_timeout_ms: 30_000,
            max_connections: 10_000,
            h2_max_concurrent_streams: 256,
            mirror_max_in_flight: 64,
            mirror_buffer_chunks: 16,
            retry_buffer_bytes: 64 * 1024,
            request_id_header: "x-request-id".into(),
            via_name: "meshwork".into(),
            trust_forwarded_headers: false,
            access_log: true,
            shutdown_grace_ms: 30_000,
            tls_reload_interval_ms: 2_000,
        }
    }
}

fn check(
    ok: bool,
    field: &'static str,
    value: impl std::fmt::Display,
    expected: &'static str,
) -> Result<(), GatewayConfigError> {
    if ok {
        Ok(())
    } else {
        Err(GatewayConfigError {
            field,
            value: value.to_string(),
            expected,
        })
    }
}

const DAY_MS: u64 = 86_400_000;

impl GatewayConfig {
    /// Checks every field; the error names it.
    pub fn validate(&self) -> Result<(), GatewayConfigError> {
        check(
            (1024..=1024 * 1024).contains(&self.max_header_bytes),
            "max_header_bytes",
            self.max_header_bytes,
            "1024..=1048576",
        )?;
        check(
            (1..=10_000).contains(&self.max_headers),
            "max_headers",
            self.max_headers,
            "1..=10000",
        )?;
        check(
            self.max_body_bytes >= 1,
            "max_body_bytes",
            self.max_body_bytes,
            ">= 1",
        )?;
        for (field, v) in [
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            (
                "upstream_connect_timeout_ms",
                self.upstream_connect_timeout_ms,
            ),
            (
                "upstream_pool_idle_timeout_ms",
                self.upstream_pool_idle_timeout_ms,
            ),
            ("default_timeout_ms", self.default_timeout_ms),
            ("shutdown_grace_ms", self.shutdown_grace_ms),
            ("tls_reload_interval_ms", self.tls_reload_interval_ms),
        ] {
            check(
                (1..=DAY_MS).contains(&v),
                field,
                v,
                "1..=86400000 (1 ms to one day)",
            )?;
        }
        check(
            (1..=10_000_000).contains(&self.max_connections),
            "max_connections",
            self.max_connections,
            "1..=10000000",
        )?;
        check(
            self.h2_max_concurrent_streams >= 1,
            "h2_max_concurrent_streams",
            self.h2_max_concurrent_streams,
            ">= 1",
        )?;
        check(
            self.mirror_buffer_chunks >= 1,
            "mirror_buffer_chunks",
            self.mirror_buffer_chunks,
            ">= 1",
        )?;
        check(
            http::HeaderName::from_bytes(self.request_id_header.as_bytes()).is_ok(),
            "request_id_header",
            &self.request_id_header,
            "a valid header name",
        )?;
        check(
            !self.via_name.is_empty()
                && self
                    .via_name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)),
            "via_name",
            &self.via_name,
            "a token of letters, digits, '-', '.', '_'",
        )
    }
}
