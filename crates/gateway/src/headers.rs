//! Proxy header semantics: hop-by-hop removal, forwarding headers, request
//! ids and W3C trace context.

use std::net::{IpAddr, SocketAddr};

use http::Version;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that apply to one connection only (RFC 9110 §7.6.1 plus the
/// usual legacy ones).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// Removes hop-by-hop headers, including every header named in
/// `Connection`. `TE: trailers` is kept when `keep_te_trailers` (gRPC needs
/// it end to end); `Upgrade` is kept when `keep_upgrade`.
pub(crate) fn remove_hop_by_hop(
    headers: &mut HeaderMap,
    keep_te_trailers: bool,
    keep_upgrade: bool,
) {
    let mut named: Vec<HeaderName> = Vec::new();
    for v in headers.get_all(header::CONNECTION) {
        if let Ok(s) = v.to_str() {
            for token in s.split(',') {
                let token = token.trim();
                if token.eq_ignore_ascii_case("upgrade") && keep_upgrade {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    named.push(name);
                }
            }
        }
    }
    for name in named {
        headers.remove(name);
    }
    let te_trailers = keep_te_trailers
        && headers
            .get_all(header::TE)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether the request asks for a protocol upgrade (HTTP/1.1 WebSocket etc.).
pub(crate) fn is_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Protocol name for `Via`.
pub(crate) fn via_version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

fn forwarded_node(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    }
}

/// Whether `s` may appear unquoted as a `Forwarded` token.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:".contains(&b))
}

/// Sets `X-Forwarded-For/-Proto/-Host`, `Forwarded` and `Via` on a request
/// going upstream.
pub(crate) fn set_forwarding(
    headers: &mut HeaderMap,
    client: SocketAddr,
    proto: &'static str,
    host: Option<&str>,
    version: Version,
    via: &ViaValues,
    append: bool,
) {
    let ip = client.ip().to_canonical();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if append && !prev.is_empty() => format!("{prev}, {ip}"),
        _ => ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    match host.and_then(|h| HeaderValue::from_str(h).ok()) {
        Some(v) => {
            headers.insert("x-forwarded-host", v);
        }
        None => {
            headers.remove("x-forwarded-host");
        }
    }
    let mut fwd = format!("for={};proto={proto}", forwarded_node(ip));
    if let Some(h) = host {
        if is_token(h) {
            fwd.push_str(";host=");
            fwd.push_str(h);
        } else if !h.contains(['"', '\\']) {
            fwd.push_str(&format!(";host=\"{h}\""));
        }
    }
    let fwd = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(prev) if append && !prev.is_empty() => format!("{prev}, {fwd}"),
        _ => fwd,
    };
    if let Ok(v) = HeaderValue::from_str(&fwd) {
        headers.insert(header::FORWARDED, v);
    }
    via.append(headers, version);
}

/// Appends this hop to `Via`.
pub(crate) fn append_via(headers: &mut HeaderMap, version: Version, via_name: &str) {
    let hop = format!("{} {via_name}", via_version(version));
    let via = match headers.get(header::VIA).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev}, {hop}"),
        _ => hop,
    };
    if let Ok(v) = HeaderValue::from_str(&via) {
        headers.insert(header::VIA, v);
    }
}

/// Precomputed `Via` values for the common case (no earlier hop).
#[derive(Debug, Clone)]
pub(crate) struct ViaValues {
    name: String,
    h10: HeaderValue,
    h11: HeaderValue,
    h2: HeaderValue,
}

impl ViaValues {
    pub(crate) fn new(name: &str) -> Self {
        let v = |ver: &str| {
            HeaderValue::from_str(&format!("{ver} {name}"))
                .unwrap_or_else(|_| HeaderValue::from_static("1.1 meshwork"))
        };
        Self {
            name: name.to_owned(),
            h10: v("1.0"),
            h11: v("1.1"),
            h2: v("2"),
        }
    }

    /// Appends this hop to `Via` (no allocation when there is no earlier hop).
    pub(crate) fn append(&self, headers: &mut HeaderMap, version: Version) {
        if headers.contains_key(header::VIA) {
            append_via(headers, version, &self.name);
            return;
        }
        let v = match version {
            Version::HTTP_10 => &self.h10,
            Version::HTTP_2 => &self.h2,
            Version::HTTP_11 => &self.h11,
            _ => {
                append_via(headers, version, &self.name);
                return;
            }
        };
        headers.insert(header::VIA, v.clone());
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Lower-case hex of `v`, `N` digits (N = 16 for u64, 32 for u128).
pub(crate) fn hex<const N: usize>(v: u128) -> [u8; N] {
    let mut out = [b'0'; N];
    for (i, b) in out.iter_mut().enumerate() {
        let shift = 4 * (N - 1 - i);
        *b = HEX[((v >> shift) & 0xf) as usize];
    }
    out
}

fn hex_string<const N: usize>(v: u128) -> String {
    hex::<N>(v).iter().map(|&b| char::from(b)).collect()
}

/// The client's request id if acceptable (1..=128 visible ASCII), else a
/// fresh one (32 hex digits).
pub(crate) fn request_id(headers: &HeaderMap, name: &HeaderName) -> HeaderValue {
    if let Some(v) = headers.get(name) {
        let b = v.as_bytes();
        if (1..=128).contains(&b.len()) && b.iter().all(|c| c.is_ascii_graphic()) {
            return v.clone();
        }
    }
    HeaderValue::from_bytes(&hex::<32>(rand::random::<u128>()))
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// W3C trace context of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// Trace id, 32 lower-case hex digits.
    pub trace_id: String,
    /// The caller's span id (16 hex), if the request carried one.
    pub parent_id: Option<String>,
    /// The gateway's span id for this request (16 hex).
    pub span_id: String,
    /// Trace flags (2 hex).
    pub flags: String,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl TraceContext {
    /// Continues the request's `traceparent` (if valid) with a new child
    /// span, or starts a new trace.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let span_id = hex_string::<16>(u128::from(rand::random::<u64>() | 1));
        if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
            let parts: Vec<&str> = tp.trim().split('-').collect();
            if parts.len() >= 4
                && is_hex(parts[0], 2)
                && parts[0] != "ff"
                && (parts[0] != "00" || parts.len() == 4)
                && is_hex(parts[1], 32)
                && parts[1].bytes().any(|b| b != b'0')
                && is_hex(parts[2], 16)
                && parts[2].bytes().any(|b| b != b'0')
                && is_hex(parts[3], 2)
            {
                return Self {
                    trace_id: parts[1].to_owned(),
                    parent_id: Some(parts[2].to_owned()),
                    span_id,
                    flags: parts[3].to_owned(),
                };
            }
        }
        Self {
            trace_id: hex_string::<32>(rand::random::<u128>() | 1),
            parent_id: None,
            span_id,
            flags: "01".to_owned(),
        }
    }

    /// The `traceparent` value to send upstream (our span as the parent).
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags)
    }

    /// Writes `traceparent` (and drops `tracestate` for a fresh trace).
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        if self.trace_id.len() != 32 || self.span_id.len() != 16 || self.flags.len() != 2 {
            // Built by hand with odd lengths: the slow, safe way.
            if let Ok(v) = HeaderValue::from_str(&self.traceparent()) {
                headers.insert("traceparent", v);
            }
            return;
        }
        let mut buf = [0u8; 55];
        buf[..3].copy_from_slice(b"00-");
        buf[3..35].copy_from_slice(self.trace_id.as_bytes());
        buf[35] = b'-';
        buf[36..52].copy_from_slice(self.span_id.as_bytes());
        buf[52] = b'-';
        buf[53..55].copy_from_slice(self.flags.as_bytes());
        if let Ok(v) = HeaderValue::from_bytes(&buf) {
            headers.insert("traceparent", v);
        }
        if self.parent_id.is_none() {
            headers.remove("tracestate");
        }
    }
}

/// Host of a request without port, lower-cased: the URI authority
/// (HTTP/2, absolute-form) or the Host header.
pub(crate) fn request_host<B>(req: &http::Request<B>) -> Option<std::borrow::Cow<'_, str>> {
    let raw = req.uri().authority().map(|a| a.host()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(strip_port)
    })?;
    Some(if raw.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(raw.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(raw)
    })
}

/// The Host header value as sent (with port), for forwarding.
pub(crate) fn request_authority<B>(req: &http::Request<B>) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()))
}

fn strip_port(h: &str) -> &str {
    if h.starts_with('[') {
        return h.split_once(']').map_or(h, |(a, _)| &a[1..]);
    }
    h.rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        .map_or(h, |(a, _)| a)
}

/// Value of cookie `name` in the request's Cookie headers.
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// Total size of a header map as it would appear on the wire (name + `: ` +
/// value + CRLF).
pub(crate) fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-other", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h, true, false);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("connection").is_none());
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert!(h.get("x-other").is_some());
    }

    #[test]
    fn traceparent_continues_or_starts() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let t = TraceContext::from_headers(&h);
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_ne!(t.span_id, "00f067aa0ba902b7");
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            h.insert("traceparent", HeaderValue::from_static(bad));
            assert!(TraceContext::from_headers(&h).parent_id.is_none(), "{bad}");
        }
    }

    #[test]
    fn host_port_is_stripped() {
        assert_eq!(strip_port("a.com:80"), "a.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("a.com"), "a.com");
    }
}
