//! W3C Trace Context (`traceparent`, <https://www.w3.org/TR/trace-context/>).

use http::{HeaderMap, HeaderName, HeaderValue};

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Lower-case hex of `v`, `N` digits (N = 16 for u64, 32 for u128).
pub fn hex<const N: usize>(v: u128) -> [u8; N] {
    let mut out = [b'0'; N];
    for (i, b) in out.iter_mut().enumerate() {
        let shift = 4 * (N - 1 - i);
        *b = HEX[((v >> shift) & 0xf) as usize];
    }
    out
}

fn hex_string<const N: usize>(v: u128) -> String {
    // Hex digits are ASCII: never empty in practice.
    std::str::from_utf8(&hex::<N>(v))
        .map(str::to_owned)
        .unwrap_or_default()
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn new_span_id() -> String {
    hex_string::<16>(u128::from(rand::random::<u64>() | 1))
}

/// W3C trace context of one request: the trace it belongs to, the caller's
/// span and the span of the component handling it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// Trace id, 32 lower-case hex digits.
    pub trace_id: String,
    /// The caller's span id (16 hex), if the request carried one.
    pub parent_id: Option<String>,
    /// This hop's span id (16 hex).
    pub span_id: String,
    /// Trace flags (2 hex).
    pub flags: String,
}

impl TraceContext {
    /// Continues the request's `traceparent` (if valid) with a new child
    /// span, or starts a new trace.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        headers
            .get(&TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(Self::parse)
            .unwrap_or_else(Self::new_root)
    }

    /// A child span of a valid `traceparent` value, `None` if it is not one.
    pub fn parse(traceparent: &str) -> Option<Self> {
        let parts: Vec<&str> = traceparent.trim().split('-').collect();
        let valid = parts.len() >= 4
            && is_hex(parts[0], 2)
            && parts[0] != "ff"
            && (parts[0] != "00" || parts.len() == 4)
            && is_hex(parts[1], 32)
            && parts[1].bytes().any(|b| b != b'0')
            && is_hex(parts[2], 16)
            && parts[2].bytes().any(|b| b != b'0')
            && is_hex(parts[3], 2);
        valid.then(|| Self {
            trace_id: parts[1].to_owned(),
            parent_id: Some(parts[2].to_owned()),
            span_id: new_span_id(),
            flags: parts[3].to_owned(),
        })
    }

    /// A new trace (sampled).
    pub fn new_root() -> Self {
        Self {
            trace_id: hex_string::<32>(rand::random::<u128>() | 1),
            parent_id: None,
            span_id: new_span_id(),
            flags: "01".to_owned(),
        }
    }

    /// A child span of this one (for an outgoing call).
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id.clone(),
            parent_id: Some(self.span_id.clone()),
            span_id: new_span_id(),
            flags: self.flags.clone(),
        }
    }

    /// Whether the trace is sampled (the `traceparent` flags' low bit).
    pub fn sampled(&self) -> bool {
        u8::from_str_radix(&self.flags, 16).is_ok_and(|f| f & 1 == 1)
    }

    /// The `traceparent` value to send on (this span as the parent).
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags)
    }

    /// Writes `traceparent` (and drops `tracestate` for a fresh trace).
    pub fn apply(&self, headers: &mut HeaderMap) {
        if self.trace_id.len() != 32 || self.span_id.len() != 16 || self.flags.len() != 2 {
            // Built by hand with odd lengths: the slow, safe way.
            if let Ok(v) = HeaderValue::from_str(&self.traceparent()) {
                headers.insert(TRACEPARENT, v);
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
            headers.insert(TRACEPARENT, v);
        }
        if self.parent_id.is_none() {
            headers.remove(&TRACESTATE);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
    fn a_child_keeps_the_trace_and_points_at_its_parent() {
        let root = TraceContext::new_root();
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_eq!(child.parent_id.as_deref(), Some(root.span_id.as_str()));
        let mut h = HeaderMap::new();
        child.apply(&mut h);
        let again = TraceContext::from_headers(&h);
        assert_eq!(again.trace_id, root.trace_id);
        assert_eq!(again.parent_id.as_deref(), Some(child.span_id.as_str()));
    }
}
