//! What is stored per span, and how an OTLP export request becomes it:
//! validation at the edge (ids, sizes) and the figures the index keeps.

use std::hash::{Hash, Hasher};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, status::StatusCode};
use prost::Message;

/// One span as written to a segment: the OTLP span, the service that sent it
/// (its resource's `service.name`) and the instrumentation scope's name.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredSpan {
    /// The resource's `service.name` (`unknown_service` when it has none).
    #[prost(string, tag = "1")]
    pub service: String,
    /// The instrumentation scope's name.
    #[prost(string, tag = "2")]
    pub scope: String,
    /// The span as received.
    #[prost(message, optional, tag = "3")]
    pub span: Option<Span>,
}

/// The service name of a resource that has none, as OpenTelemetry SDKs say.
pub const UNKNOWN_SERVICE: &str = "unknown_service";

/// Longest span name, service name or attribute key the store accepts.
pub const MAX_NAME_BYTES: usize = 1024;

/// What the index keeps of a span (everything a search filters on but
/// attribute values, which are checked on disk after a hash match).
#[derive(Clone, Debug)]
pub(crate) struct SpanMeta {
    pub(crate) trace_id: [u8; 16],
    pub(crate) span_id: u64,
    /// 0 for a root span.
    pub(crate) parent: u64,
    pub(crate) service: String,
    pub(crate) name: String,
    pub(crate) start_ns: u64,
    pub(crate) end_ns: u64,
    pub(crate) error: bool,
    /// Hashes of the span's `key=value` attributes (scalar values only).
    pub(crate) attrs: Vec<u32>,
}

/// A span ready to be appended: its encoded record and its index figures.
pub(crate) struct Prepared {
    pub(crate) bytes: Vec<u8>,
    pub(crate) meta: SpanMeta,
}

/// The outcome of validating an export request.
pub(crate) struct Split {
    pub(crate) spans: Vec<Prepared>,
    pub(crate) rejected: u64,
    /// Why the first rejected span was refused.
    pub(crate) first_error: Option<String>,
}

/// Splits an export request into stored spans, refusing (and counting) the
/// spans that are not valid OTLP or larger than `max_span_bytes`.
pub(crate) fn split(req: ExportTraceServiceRequest, max_span_bytes: usize) -> Split {
    let mut out = Split {
        spans: Vec::new(),
        rejected: 0,
        first_error: None,
    };
    for rs in req.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| match &v.value {
                Some(any_value::Value::StringValue(s)) if !s.is_empty() => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_else(|| UNKNOWN_SERVICE.to_string());
        for ss in rs.scope_spans {
            let scope = ss.scope.map(|s| s.name).unwrap_or_default();
            for span in ss.spans {
                match prepare(&service, &scope, span, max_span_bytes) {
                    Ok(p) => out.spans.push(p),
                    Err(why) => {
                        out.rejected += 1;
                        if out.first_error.is_none() {
                            out.first_error = Some(why);
                        }
                    }
                }
            }
        }
    }
    out
}

/// Reads an 8-byte id; `None` for a wrong length or all zeros.
pub(crate) fn id64(b: &[u8]) -> Option<u64> {
    let a: [u8; 8] = b.try_into().ok()?;
    let v = u64::from_be_bytes(a);
    (v != 0).then_some(v)
}

/// Reads a 16-byte trace id; `None` for a wrong length or all zeros.
pub(crate) fn id128(b: &[u8]) -> Option<[u8; 16]> {
    let a: [u8; 16] = b.try_into().ok()?;
    (a != [0; 16]).then_some(a)
}

fn prepare(service: &str, scope: &str, span: Span, max: usize) -> Result<Prepared, String> {
    let trace_id = id128(&span.trace_id).ok_or_else(|| {
        format!(
            "span {:?}: trace_id must be 16 bytes, not all zero (got {} bytes)",
            span.name,
            span.trace_id.len()
        )
    })?;
    let span_id = id64(&span.span_id).ok_or_else(|| {
        format!(
            "span {:?}: span_id must be 8 bytes, not all zero (got {} bytes)",
            span.name,
            span.span_id.len()
        )
    })?;
    let parent = if span.parent_span_id.is_empty() {
        0
    } else {
        id64(&span.parent_span_id).ok_or_else(|| {
            format!(
                "span {:?}: parent_span_id must be empty or 8 bytes, not all zero",
                span.name
            )
        })?
    };
    if span.name.len() > MAX_NAME_BYTES || service.len() > MAX_NAME_BYTES {
        return Err(format!(
            "span {:?}: span and service names are limited to {MAX_NAME_BYTES} bytes",
            truncate(&span.name, 64)
        ));
    }
    if span.end_time_unix_nano < span.start_time_unix_nano {
        return Err(format!(
            "span {:?}: end_time_unix_nano is before start_time_unix_nano",
            span.name
        ));
    }
    let error = span
        .status
        .as_ref()
        .is_some_and(|s| s.code == StatusCode::Error as i32);
    let mut attrs: Vec<u32> = span.attributes.iter().filter_map(attr_hash).collect();
    attrs.sort_unstable();
    attrs.dedup();
    let meta = SpanMeta {
        trace_id,
        span_id,
        parent,
        service: service.to_string(),
        name: span.name.clone(),
        start_ns: span.start_time_unix_nano,
        end_ns: span.end_time_unix_nano,
        error,
        attrs,
    };
    let stored = StoredSpan {
        service: service.to_string(),
        scope: scope.to_string(),
        span: Some(span),
    };
    let bytes = stored.encode_to_vec();
    if bytes.len() > max {
        return Err(format!(
            "span {:?}: {} bytes encoded, more than the store's limit of {max} per span",
            truncate(&meta.name, 64),
            bytes.len()
        ));
    }
    Ok(Prepared { bytes, meta })
}

fn truncate(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A scalar attribute value as text (what `attr=key=value` filters compare with).
pub(crate) fn scalar_text(v: &AnyValue) -> Option<String> {
    match v.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

/// The hash of `key=value` for a scalar attribute.
pub(crate) fn attr_hash(kv: &KeyValue) -> Option<u32> {
    let text = scalar_text(kv.value.as_ref()?)?;
    Some(pair_hash(&kv.key, &text))
}

/// The hash the index keeps for an attribute `key` with value `text`.
pub(crate) fn pair_hash(key: &str, text: &str) -> u32 {
    // SipHash with fixed keys: the index is rebuilt at every start, so only
    // this process needs to agree with itself.
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    text.hash(&mut h);
    h.finish() as u32
}

/// Decodes a stored record.
pub(crate) fn decode(bytes: &[u8]) -> Option<StoredSpan> {
    StoredSpan::decode(bytes).ok()
}

/// The index figures of a decoded record (when the store is reopened).
pub(crate) fn meta_of(stored: &StoredSpan) -> Option<SpanMeta> {
    let span = stored.span.as_ref()?;
    let mut attrs: Vec<u32> = span.attributes.iter().filter_map(attr_hash).collect();
    attrs.sort_unstable();
    attrs.dedup();
    Some(SpanMeta {
        trace_id: id128(&span.trace_id)?,
        span_id: id64(&span.span_id)?,
        parent: id64(&span.parent_span_id).unwrap_or(0),
        service: stored.service.clone(),
        name: span.name.clone(),
        start_ns: span.start_time_unix_nano,
        end_ns: span.end_time_unix_nano,
        error: span
            .status
            .as_ref()
            .is_some_and(|s| s.code == StatusCode::Error as i32),
        attrs,
    })
}
