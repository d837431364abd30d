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
        if !valid {
            return None;
        }
        // The head sampler may keep the caller's decision or make its own.
        let flags = u8::from_str_radix(parts[3], 16).ok()?;
        let sampled = sampler().decide(parts[1], Some(flags & 1 == 1));
        Some(Self {
            trace_id: parts[1].to_owned(),
            parent_id: Some(parts[2].to_owned()),
            span_id: new_span_id(),
            flags: hex_string::<2>(u128::from((flags & !1) | u8::from(sampled))),
        })
    }

    /// A new trace, sampled as the head sampler decides.
    pub fn new_root() -> Self {
        let trace_id = hex_string::<32>(rand::random::<u128>() | 1);
        let sampled = sampler().decide(&trace_id, None);
        Self {
            trace_id,
            parent_id: None,
            span_id: new_span_id(),
            flags: if sampled { "01" } else { "00" }.to_owned(),
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

/// The head sampler (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`):
/// which traces this process records and marks sampled for the next hop.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampler {
    /// Every trace (`always_on`).
    AlwaysOn,
    /// No trace (`always_off`).
    AlwaysOff,
    /// A share of traces by trace id, whatever the caller decided (`traceidratio`).
    Ratio(f64),
    /// The caller's decision; new traces by the inner sampler
    /// (`parentbased_always_on`, the default; `parentbased_always_off`;
    /// `parentbased_traceidratio`).
    ParentBased(Root),
}

/// How a parent-based sampler decides a new trace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Root {
    /// Sampled.
    On,
    /// Not sampled.
    Off,
    /// A share by trace id.
    Ratio(f64),
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler::ParentBased(Root::On)
    }
}

/// Whether `trace_id` (32 hex) falls in `ratio` of all trace ids: its low 64
/// bits below `ratio` x 2^64 (every process decides the same for one trace).
fn in_ratio(trace_id: &str, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 || ratio.is_nan() {
        return false;
    }
    let low = trace_id
        .get(16..32)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or(u64::MAX);
    // Exact for the ratios people use; 2^64 * ratio < 2^64 here.
    (low as f64) < ratio * 18_446_744_073_709_551_616.0
}

impl Sampler {
    /// The sampler the standard variables name. An unknown name or a bad
    /// ratio is an error (the caller logs it and keeps the default, as the
    /// specification asks).
    pub fn from_env() -> Result<Sampler, String> {
        let name = std::env::var("OTEL_TRACES_SAMPLER").unwrap_or_default();
        let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG").ok();
        Sampler::parse(name.trim(), arg.as_deref())
    }

    /// The sampler `name` with `arg` (a ratio in 0..=1, default 1).
    pub fn parse(name: &str, arg: Option<&str>) -> Result<Sampler, String> {
        let ratio = || -> Result<f64, String> {
            match arg.map(str::trim).filter(|a| !a.is_empty()) {
                None => Ok(1.0),
                Some(a) => a
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        format!("OTEL_TRACES_SAMPLER_ARG {a:?}: expected a ratio from 0 to 1")
                    }),
            }
        };
        Ok(match name {
            "" | "parentbased_always_on" => Sampler::ParentBased(Root::On),
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::Ratio(ratio()?),
            "parentbased_always_off" => Sampler::ParentBased(Root::Off),
            "parentbased_traceidratio" => Sampler::ParentBased(Root::Ratio(ratio()?)),
            other => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER {other:?}: expected always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
                ));
            }
        })
    }

    /// Whether a span of `trace_id` is sampled, given the caller's decision
    /// (`None` for a new trace).
    pub fn decide(self, trace_id: &str, parent: Option<bool>) -> bool {
        match (self, parent) {
            (Sampler::AlwaysOn, _) => true,
            (Sampler::AlwaysOff, _) => false,
            (Sampler::Ratio(r), _) => in_ratio(trace_id, r),
            (Sampler::ParentBased(_), Some(p)) => p,
            (Sampler::ParentBased(Root::On), None) => true,
            (Sampler::ParentBased(Root::Off), None) => false,
            (Sampler::ParentBased(Root::Ratio(r)), None) => in_ratio(trace_id, r),
        }
    }
}

static SAMPLER: parking_lot::RwLock<Sampler> =
    parking_lot::RwLock::new(Sampler::ParentBased(Root::On));

/// Sets this process's head sampler (at start-up).
pub fn set_sampler(s: Sampler) {
    *SAMPLER.write() = s;
}

/// This process's head sampler.
pub fn sampler() -> Sampler {
    *SAMPLER.read()
}

/// Sets the sampler the standard variables name; a bad value is logged and
/// the default kept. Returns the sampler in force.
pub fn sampler_from_env() -> Sampler {
    match Sampler::from_env() {
        Ok(s) => {
            set_sampler(s);
            s
        }
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the trace sampler setting; sampling every trace a caller did not decide against");
            sampler()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn samplers_decide_as_the_specification_says() {
        let id = |low: u64| format!("{:016x}{low:016x}", 7u64);
        let p = |n: &str, a: Option<&str>| Sampler::parse(n, a).unwrap();
        assert_eq!(p("", None), Sampler::default());
        assert!(p("always_on", None).decide(&id(1), Some(false)));
        assert!(!p("always_off", None).decide(&id(1), Some(true)));
        // Parent-based: the caller's decision; new traces by the root rule.
        let pb = p("parentbased_always_off", None);
        assert!(pb.decide(&id(1), Some(true)));
        assert!(!pb.decide(&id(1), None));
        assert!(p("parentbased_always_on", None).decide(&id(u64::MAX), None));
        // A ratio: by the trace id's low 64 bits, the same in every process.
        let half = p("traceidratio", Some("0.5"));
        assert!(half.decide(&id(1), Some(false)), "ignores the caller");
        assert!(!half.decide(&id(u64::MAX), Some(true)));
        let pr = p("parentbased_traceidratio", Some("0.25"));
        assert!(pr.decide(&id(u64::MAX), Some(true)));
        assert!(pr.decide(&id(u64::MAX / 5), None));
        assert!(!pr.decide(&id(u64::MAX / 3), None));
        let n = 20_000;
        let kept = (0..n)
            .filter(|_| {
                let t = hex_string::<32>(rand::random::<u128>() | 1);
                half.decide(&t, None)
            })
            .count();
        assert!((9_000..11_000).contains(&kept), "{kept} of {n} kept at 0.5");
        for (n, a) in [
            ("sometimes", None),
            ("traceidratio", Some("2")),
            ("traceidratio", Some("x")),
        ] {
            assert!(Sampler::parse(n, a).is_err(), "{n} {a:?}");
        }
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
