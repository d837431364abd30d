//! What every Meshwork HTTP API shares: one JSON error envelope.
//!
//! Every HTTP surface — the node's API, the gateway's own answers, the console,
//! services built on the SDK and the demo shop — answers a failure with
//!
//! ```json
//! {"error": {"code": "not_found", "message": "no service \"orders\"", "detail": {...}, "request_id": "..."}}
//! ```
//!
//! `code` is stable and machine-matched; `message` tells a person what to fix;
//! `detail` (structured, e.g. the line and column of a syntax error) and
//! `request_id` (the gateway's) appear only when there is something to say.
//! [`ApiError`] writes it and [`ErrorBody::parse`] reads it back, so no crate
//! spells the envelope by hand. [`openapi`] assembles the node's one OpenAPI
//! document from each crate's fragment.

pub mod openapi;
pub mod scope;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// The inside of the envelope: `{"error": <ErrorBody>}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable, machine-matched code (`not_found`, `invalid_argument`, ...).
    pub code: String,
    /// What went wrong, for a person: says what to fix.
    pub message: String,
    /// Structured detail, when there is some.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
    /// The request's id, when the answering hop assigned one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Envelope<B> {
    error: B,
}

impl ErrorBody {
    /// Reads the envelope from a response body; `None` when the body is not one
    /// (a proxy's HTML page, an empty body, another API's JSON).
    pub fn parse(body: &[u8]) -> Option<ErrorBody> {
        serde_json::from_slice::<Envelope<ErrorBody>>(body)
            .ok()
            .map(|e| e.error)
    }
}

/// An error answer: an HTTP status and the envelope's body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status it is answered with.
    pub status: StatusCode,
    /// The envelope's content.
    pub body: ErrorBody,
}

impl ApiError {
    /// An error with `status`, a stable `code` and a `message`.
    pub fn new(status: StatusCode, code: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                code: code.into(),
                message: message.into(),
                detail: None,
                request_id: None,
            },
        }
    }

    /// 400 with `code`.
    pub fn bad_request(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 400 `invalid_argument`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 500 `internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// Adds structured detail.
    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.body.detail = Some(detail);
        self
    }

    /// Adds the request's id.
    pub fn with_request_id(mut self, id: impl Into<String>) -> Self {
        self.body.request_id = Some(id.into());
        self
    }

    /// The stable code.
    pub fn code(&self) -> &str {
        &self.body.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.body.message
    }

    /// The envelope as a JSON value, for an answer that carries more next to
    /// `error` (the shop returns the failed order beside it).
    pub fn envelope(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.body })
    }

    /// The envelope's JSON bytes, for servers that build responses themselves.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings and a JSON value always serializes.
        serde_json::to_vec(&Envelope { error: &self.body }).unwrap_or_default()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.body.code, self.body.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, self.to_json()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}

/// Whether a request is a gRPC call (`content-type: application/grpc...`): its
/// refusals must be gRPC statuses, not JSON, for its client to read them.
pub fn is_grpc(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

impl ApiError {
    /// The error as a gRPC "trailers-only" answer: HTTP 200 with `grpc-status`
    /// (the code closest to the HTTP status) and `grpc-message`.
    pub fn grpc_response(&self) -> Response {
        let code: u16 = match self.status.as_u16() {
            400 | 415 | 422 => 3, // INVALID_ARGUMENT
            401 => 16,            // UNAUTHENTICATED
            403 | 421 => 7,       // PERMISSION_DENIED
            404 => 5,             // NOT_FOUND
            408 | 504 => 4,       // DEADLINE_EXCEEDED
            409 => 6,             // ALREADY_EXISTS
            413 | 429 => 8,       // RESOURCE_EXHAUSTED
            501 => 12,            // UNIMPLEMENTED
            503 => 14,            // UNAVAILABLE
            _ => 13,              // INTERNAL
        };
        let mut resp = Response::new(axum::body::Body::empty());
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(code));
        // grpc-message is percent-encoded (gRPC over HTTP/2, "Responses").
        if let Ok(v) = HeaderValue::from_str(&percent_encode(&self.body.message)) {
            h.insert("grpc-message", v);
        }
        resp
    }
}

/// Largest framework error text [`json_errors`] reads into a message.
const MAX_FRAMEWORK_TEXT: usize = 16 * 1024;

/// Turns the framework's plain-text errors (413 body too large, 405, a path or
/// query that does not decode, an unknown route) into the envelope, keeping the
/// status and an `Allow` header. Use as `axum::middleware::map_response(json_errors)`.
pub async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let code = match status.as_u16() {
        413 => "too_large",
        405 => "method_not_allowed",
        404 => "no_such_route",
        s if s < 500 => "invalid_argument",
        _ => "internal",
    };
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, MAX_FRAMEWORK_TEXT)
        .await
        .unwrap_or_default();
    let mut message = String::from_utf8_lossy(&text).trim().to_string();
    if message.is_empty() {
        message = status.canonical_reason().unwrap_or("error").to_string();
    }
    let mut out = ApiError::new(status, code, message).into_response();
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}

/// Percent-encodes a path segment or query value (everything but `A-Z a-z 0-9 - _ . ~`):
/// what every client of the HTTP APIs (CLI, SDK, console links) puts in a URL.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn envelope_shape_and_round_trip() {
        let e = ApiError::new(StatusCode::CONFLICT, "held", "lock a is held by n1");
        let json: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {"code": "held", "message": "lock a is held by n1"}})
        );
        assert_eq!(ErrorBody::parse(&e.to_json()), Some(e.body.clone()));
        assert_eq!(e.envelope(), json);

        let e = e
            .with_detail(serde_json::json!({"line": 3}))
            .with_request_id("r1");
        let back = ErrorBody::parse(&e.to_json()).unwrap();
        assert_eq!(back.detail, Some(serde_json::json!({"line": 3})));
        assert_eq!(back.request_id.as_deref(), Some("r1"));
    }

    #[test]
    fn other_bodies_are_not_envelopes() {
        assert_eq!(ErrorBody::parse(b""), None);
        assert_eq!(ErrorBody::parse(b"<html>502</html>"), None);
        assert_eq!(ErrorBody::parse(br#"{"error":"text"}"#), None);
        assert_eq!(ErrorBody::parse(br#"{"ok":true}"#), None);
    }

    #[test]
    fn response_has_status_and_json_type() {
        let resp = ApiError::not_found("no key").into_response();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    }
}

/// Failed logins remembered per key (a user, an address): after `free`
/// failures each next try must wait 1 s, doubling up to 60 s, until one
/// succeeds. Bounded: past [`Throttle::MAX_KEYS`] keys the quiet ones go.
#[derive(Debug)]
pub struct Throttle<K> {
    free: u32,
    seen: parking_lot::Mutex<std::collections::HashMap<K, (u32, std::time::Instant)>>,
}

impl<K> Default for Throttle<K> {
    /// Five free failures.
    fn default() -> Self {
        Throttle {
            free: 5,
            seen: parking_lot::Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Throttle<K> {
    /// Keys remembered at most.
    pub const MAX_KEYS: usize = 10_000;
    /// Longest wait.
    pub const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

    /// A throttle letting `free` failures through before it slows a key down.
    pub fn new(free: u32) -> Self {
        Throttle {
            free,
            seen: parking_lot::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn seen(
        &self,
    ) -> parking_lot::MutexGuard<'_, std::collections::HashMap<K, (u32, std::time::Instant)>> {
        self.seen.lock()
    }

    /// `Err(seconds to wait)` when `key` must wait before trying again.
    pub fn check(&self, key: &K) -> Result<(), u64> {
        let Some((count, last)) = self.seen().get(key).copied() else {
            return Ok(());
        };
        let Some(extra) = count.checked_sub(self.free) else {
            return Ok(());
        };
        let wait = std::time::Duration::from_secs(1u64 << extra.min(6)).min(Self::MAX_WAIT);
        let since = last.elapsed();
        if since >= wait {
            return Ok(());
        }
        let left = (wait - since).as_millis().div_ceil(1000);
        Err(u64::try_from(left).unwrap_or(60).max(1))
    }

    /// Counts a failure of `key`.
    pub fn failed(&self, key: K) {
        let mut seen = self.seen();
        if seen.len() >= Self::MAX_KEYS && !seen.contains_key(&key) {
            seen.retain(|_, (_, last)| last.elapsed() < Self::MAX_WAIT);
            if seen.len() >= Self::MAX_KEYS {
                seen.clear();
            }
        }
        let e = seen.entry(key).or_insert((0, std::time::Instant::now()));
        e.0 = e.0.saturating_add(1);
        e.1 = std::time::Instant::now();
    }

    /// Forgets `key`'s failures.
    pub fn succeeded(&self, key: &K) {
        self.seen().remove(key);
    }
}
