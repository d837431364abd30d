//! Proxy header semantics: hop-by-hop removal, forwarding headers, request
//! ids and W3C trace context.

use std::net::{IpAddr, SocketAddr};

use crate::h1::head::{lower_case, strip_port};
use http::Version;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

// Header names used on every request, parsed once (a `&str` key is parsed
// again on every map operation).
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that apply to one connection only (RFC 9110 §7.6.1 plus the
/// usual legacy ones).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including every header named in
/// `Connection`. `TE: trailers` is kept when `keep_te_trailers` (gRPC needs
/// it end to end); `Upgrade` is kept when `keep_upgrade`.
pub(crate) fn remove_hop_by_hop(
    headers: &mut HeaderMap,
    keep_te_trailers: bool,
    keep_upgrade: bool,
) {
    // Most messages carry none of them: one pass over the (few) names
    // instead of a hashed removal per hop-by-hop name.
    if !headers
        .keys()
        .any(|k| HOP_BY_HOP.contains(k) || *k == header::UPGRADE)
    {
        return;
    }
    let mut named: Vec<HeaderName> = Vec::new();
    for v in headers.get_all(&header::CONNECTION) {
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
            .get_all(&header::TE)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(&header::UPGRADE);
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

/// Appends `ip` in text form (IPv4 without `core::fmt`, which costs more
/// than the rest of the forwarding headers together).
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if o >= 100 {
                    out.push(b'0' + o / 100);
                }
                if o >= 10 {
                    out.push(b'0' + (o / 10) % 10);
                }
                out.push(b'0' + o % 10);
            }
        }
        IpAddr::V6(v6) => out.extend_from_slice(v6.to_string().as_bytes()),
    }
}

/// Appends `ip` as a `Forwarded` node (IPv6 quoted and bracketed).
fn push_forwarded_node(out: &mut Vec<u8>, ip: IpAddr) {
    if ip.is_ipv6() {
        out.extend_from_slice(b"\"[");
        push_ip(out, ip);
        out.extend_from_slice(b"]\"");
    } else {
        push_ip(out, ip);
    }
}

/// `prev, new` when appending to an earlier hop's value, else `new`.
fn header_list(prev: Option<&HeaderValue>, append: bool, new: &[u8]) -> Option<HeaderValue> {
    match prev {
        Some(p) if append && !p.is_empty() && p.to_str().is_ok() => {
            let mut v = Vec::with_capacity(p.len() + 2 + new.len());
            v.extend_from_slice(p.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(new);
            HeaderValue::from_bytes(&v).ok()
        }
        _ => HeaderValue::from_bytes(new).ok(),
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
    let mut buf = Vec::with_capacity(64);
    push_ip(&mut buf, ip);
    if let Some(v) = header_list(headers.get(&X_FORWARDED_FOR), append, &buf) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    match host.and_then(|h| HeaderValue::from_str(h).ok()) {
        Some(v) => {
            headers.insert(X_FORWARDED_HOST, v);
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
    buf.clear();
    buf.extend_from_slice(b"for=");
    push_forwarded_node(&mut buf, ip);
    buf.extend_from_slice(b";proto=");
    buf.extend_from_slice(proto.as_bytes());
    if let Some(h) = host {
        if is_token(h) {
            buf.extend_from_slice(b";host=");
            buf.extend_from_slice(h.as_bytes());
        } else if !h.contains(['"', '\\']) {
            buf.extend_from_slice(b";host=\"");
            buf.extend_from_slice(h.as_bytes());
            buf.push(b'"');
        }
    }
    if let Some(v) = header_list(headers.get(&header::FORWARDED), append, &buf) {
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

pub(crate) use meshwork_telemetry::hex;

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

pub use meshwork_telemetry::TraceContext;

/// Host of a request without port, lower-cased: the URI authority
/// (HTTP/2, absolute-form) or the Host header.
pub(crate) fn request_host<B>(req: &http::Request<B>) -> Option<std::borrow::Cow<'_, str>> {
    let raw = req.uri().authority().map(|a| a.host()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(strip_port)
    })?;
    Some(lower_case(raw))
}

/// The Host header value as sent (with port), for forwarding.
pub(crate) fn request_authority<B>(req: &http::Request<B>) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()))
}

/// Value of cookie `name` in the request's Cookie headers (parsed by the
/// `cookie` crate; a quoted value is unquoted). The gateway's cookie matches
/// and the console's session both read cookies with this.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .and_then(|c| c.value_raw())
        .map(|v| v.trim_matches('"'))
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
    fn forwarding_headers_format_addresses_like_display() {
        for ip in [
            "0.0.0.0",
            "10.0.9.100",
            "127.0.0.1",
            "255.255.255.255",
            "1.20.199.3",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string().as_bytes());
        }
        let via = ViaValues::new("meshwork");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.insert("forwarded", HeaderValue::from_static("for=1.2.3.4"));
        let v6: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        set_forwarding(
            &mut h,
            v6,
            "https",
            Some("a.test:8443"),
            Version::HTTP_11,
            &via,
            true,
        );
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 2001:db8::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "a.test:8443");
        assert_eq!(
            h["forwarded"],
            "for=1.2.3.4, for=\"[2001:db8::1]\";proto=https;host=a.test:8443"
        );
        let v4: SocketAddr = "192.168.10.7:1".parse().unwrap();
        set_forwarding(
            &mut h,
            v4,
            "http",
            Some("b c"),
            Version::HTTP_11,
            &via,
            false,
        );
        assert_eq!(h["x-forwarded-for"], "192.168.10.7");
        assert_eq!(h["forwarded"], "for=192.168.10.7;proto=http;host=\"b c\"");
        assert_eq!(h["via"], "1.1 meshwork, 1.1 meshwork", "one hop per call");
    }

    #[test]
    fn messages_without_hop_by_hop_headers_are_left_alone() {
        let mut h = HeaderMap::new();
        h.insert("content-length", HeaderValue::from_static("3"));
        h.insert("x-a", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h, false, false);
        assert_eq!(h.len(), 2);
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        remove_hop_by_hop(&mut h, false, true);
        assert!(h.contains_key("upgrade"));
        remove_hop_by_hop(&mut h, false, false);
        assert!(!h.contains_key("upgrade"));
    }

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
    fn host_port_is_stripped() {
        assert_eq!(strip_port("a.com:80"), "a.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("a.com"), "a.com");
    }
}
