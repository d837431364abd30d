//! The query API under `/v1/traces` (documented in `openapi.json`): search,
//! one trace with all its spans, the services and operations seen, the
//! service dependency graph, and the store's figures.

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use meshwork_api::ApiError;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use serde_json::{Map, Value, json};

use crate::index::Query;
use crate::model::StoredSpan;
use crate::store::TraceStore;

/// Traces a search returns by default, and at most.
pub const DEFAULT_LIMIT: usize = 20;
/// The most traces one search may ask for.
pub const MAX_LIMIT: usize = 1000;
/// Traces the dependency graph looks at, at most (the newest in the window).
pub const MAX_GRAPH_TRACES: usize = 10_000;

/// The routes [`router`] serves, as (method, path) pairs.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/traces"),
    ("get", "/v1/traces/{trace_id}"),
    ("get", "/v1/traces/services"),
    ("get", "/v1/traces/dependencies"),
    ("get", "/v1/traces/stats"),
];

/// The query API's routes.
pub fn router(store: TraceStore) -> Router {
    Router::new()
        .route("/v1/traces", get(search))
        .route("/v1/traces/services", get(services))
        .route("/v1/traces/dependencies", get(dependencies))
        .route("/v1/traces/stats", get(stats))
        .route("/v1/traces/{trace_id}", get(trace))
        .with_state(store)
}

fn pairs(raw: Option<String>) -> Vec<(String, String)> {
    form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn ms_param(name: &str, v: &str) -> Result<f64, ApiError> {
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(ApiError::invalid(format!(
            "{name} must be a non-negative number of milliseconds, not {v:?}"
        ))),
    }
}

fn ms_to_ns(ms: f64) -> u64 {
    (ms * 1e6).min(u64::MAX as f64) as u64
}

/// Parses a search's query string.
pub fn parse_query(raw: Option<String>) -> Result<Query, ApiError> {
    let mut q = Query {
        limit: DEFAULT_LIMIT,
        ..Query::default()
    };
    for (k, v) in pairs(raw) {
        match k.as_str() {
            "service" if !v.is_empty() => q.service = Some(v),
            "operation" if !v.is_empty() => q.operation = Some(v),
            "service" | "operation" => {}
            "min_duration_ms" => q.min_duration_ns = Some(ms_to_ns(ms_param(&k, &v)?)),
            "max_duration_ms" => q.max_duration_ns = Some(ms_to_ns(ms_param(&k, &v)?)),
            "start_ms" => q.start_ns = Some(ms_to_ns(ms_param(&k, &v)?)),
            "end_ms" => q.end_ns = Some(ms_to_ns(ms_param(&k, &v)?)),
            "error" => {
                q.error = match v.as_str() {
                    "true" => Some(true),
                    "false" => Some(false),
                    "" | "any" => None,
                    _ => {
                        return Err(ApiError::invalid(format!(
                            "error must be true, false or any, not {v:?}"
                        )));
                    }
                }
            }
            "attr" => {
                let Some((key, value)) = v.split_once('=') else {
                    return Err(ApiError::invalid(format!(
                        "attr must be key=value (as attr=http.response.status_code=500), not {v:?}"
                    )));
                };
                if key.is_empty() {
                    return Err(ApiError::invalid("attr: the key is empty"));
                }
                q.attributes.push((key.to_string(), value.to_string()));
            }
            "sort" => {
                q.slowest_first = match v.as_str() {
                    "" | "newest" => false,
                    "duration" => true,
                    _ => {
                        return Err(ApiError::invalid(format!(
                            "sort must be newest or duration, not {v:?}"
                        )));
                    }
                }
            }
            "limit" => {
                q.limit = match v.parse::<usize>() {
                    Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                    _ => {
                        return Err(ApiError::invalid(format!(
                            "limit must be between 1 and {MAX_LIMIT}, not {v:?}"
                        )));
                    }
                }
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown parameter {other:?}; the search takes service, operation, min_duration_ms, max_duration_ms, error, attr, start_ms, end_ms, sort and limit"
                )));
            }
        }
    }
    if q.operation.is_some() && q.service.is_none() {
        return Err(ApiError::invalid(
            "operation needs service (span names are per service)",
        ));
    }
    if let (Some(a), Some(b)) = (q.min_duration_ns, q.max_duration_ns)
        && a > b
    {
        return Err(ApiError::invalid(
            "min_duration_ms is larger than max_duration_ms",
        ));
    }
    Ok(q)
}

fn internal(e: crate::TraceError) -> Response {
    ApiError::internal(e.to_string()).into_response()
}

async fn search(State(store): State<TraceStore>, RawQuery(raw): RawQuery) -> Response {
    let q = match parse_query(raw) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let store2 = store.clone();
    match tokio::task::spawn_blocking(move || store2.search(&q)).await {
        Ok(Ok(traces)) => Json(json!({ "traces": traces })).into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => ApiError::internal(format!("search failed: {e}")).into_response(),
    }
}

/// Parses 32 hex digits.
pub fn parse_trace_id(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    (out != [0; 16]).then_some(out)
}

async fn trace(State(store): State<TraceStore>, Path(id): Path<String>) -> Response {
    let Some(tid) = parse_trace_id(&id) else {
        return ApiError::invalid(format!(
            "trace id must be 32 hex digits, not all zero (got {:?})",
            id.chars().take(64).collect::<String>()
        ))
        .into_response();
    };
    match tokio::task::spawn_blocking(move || store.trace(&tid)).await {
        Ok(Ok(Some(spans))) => {
            let id = id.to_ascii_lowercase();
            // This node's own log lines written inside the trace's spans.
            let logs = meshwork_telemetry::logs::global()
                .map(|l| l.for_trace(&id))
                .unwrap_or_default();
            Json(json!({
                "trace_id": id,
                "spans": spans.iter().map(span_json).collect::<Vec<_>>(),
                "logs": logs,
            }))
            .into_response()
        }
        Ok(Ok(None)) => ApiError::not_found(format!(
            "no trace {id} in the store (never received, or removed by retention)"
        ))
        .into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => ApiError::internal(format!("reading the trace failed: {e}")).into_response(),
    }
}

async fn services(State(store): State<TraceStore>) -> Response {
    let list: Vec<Value> = store
        .services()
        .into_iter()
        .map(|(name, ops)| json!({ "name": name, "operations": ops }))
        .collect();
    Json(json!({ "services": list })).into_response()
}

async fn dependencies(State(store): State<TraceStore>, RawQuery(raw): RawQuery) -> Response {
    let (mut lo, mut hi) = (0, u64::MAX);
    for (k, v) in pairs(raw) {
        let parsed = match k.as_str() {
            "start_ms" => ms_param(&k, &v).map(|x| lo = ms_to_ns(x)),
            "end_ms" => ms_param(&k, &v).map(|x| hi = ms_to_ns(x)),
            other => Err(ApiError::invalid(format!(
                "unknown parameter {other:?}; the dependency graph takes start_ms and end_ms"
            ))),
        };
        if let Err(e) = parsed {
            return e.into_response();
        }
    }
    let (edges, traces) = store.dependencies(lo, hi, MAX_GRAPH_TRACES);
    Json(json!({ "edges": edges, "traces": traces, "max_traces": MAX_GRAPH_TRACES }))
        .into_response()
}

async fn stats(State(store): State<TraceStore>) -> Response {
    Json(store.stats()).into_response()
}

fn any_json(v: &AnyValue) -> Value {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => json!(s),
        Some(any_value::Value::BoolValue(b)) => json!(b),
        Some(any_value::Value::IntValue(i)) => json!(i),
        Some(any_value::Value::DoubleValue(d)) => json!(d),
        Some(any_value::Value::ArrayValue(a)) => {
            Value::Array(a.values.iter().map(any_json).collect())
        }
        Some(any_value::Value::KvlistValue(l)) => attrs_json(&l.values),
        Some(any_value::Value::BytesValue(b)) => json!(crate::hex(b)),
        Some(any_value::Value::StringValueStrindex(_)) | None => Value::Null,
    }
}

fn attrs_json(kvs: &[KeyValue]) -> Value {
    let mut m = Map::new();
    for kv in kvs {
        m.insert(
            kv.key.clone(),
            kv.value.as_ref().map_or(Value::Null, any_json),
        );
    }
    Value::Object(m)
}

fn kind_name(k: i32) -> &'static str {
    match SpanKind::try_from(k) {
        Ok(SpanKind::Internal) => "internal",
        Ok(SpanKind::Server) => "server",
        Ok(SpanKind::Client) => "client",
        Ok(SpanKind::Producer) => "producer",
        Ok(SpanKind::Consumer) => "consumer",
        _ => "unspecified",
    }
}

/// A stored span as the API shows it.
pub fn span_json(s: &StoredSpan) -> Value {
    let Some(span) = &s.span else {
        return Value::Null;
    };
    let status = span.status.as_ref();
    json!({
        "trace_id": crate::hex(&span.trace_id),
        "span_id": crate::hex(&span.span_id),
        "parent_span_id": (!span.parent_span_id.is_empty()).then(|| crate::hex(&span.parent_span_id)),
        "service": s.service,
        "scope": s.scope,
        "name": span.name,
        "kind": kind_name(span.kind),
        "start_unix_nano": span.start_time_unix_nano.to_string(),
        "start_ms": span.start_time_unix_nano as f64 / 1e6,
        "duration_ms": span.end_time_unix_nano.saturating_sub(span.start_time_unix_nano) as f64 / 1e6,
        "status": {
            "code": match status.map_or(0, |s| s.code) { 1 => "ok", 2 => "error", _ => "unset" },
            "message": status.map(|s| s.message.as_str()).unwrap_or(""),
        },
        "attributes": attrs_json(&span.attributes),
        "events": span.events.iter().map(|e| json!({
            "name": e.name,
            "time_unix_nano": e.time_unix_nano.to_string(),
            "attributes": attrs_json(&e.attributes),
        })).collect::<Vec<_>>(),
        "links": span.links.iter().map(|l| json!({
            "trace_id": crate::hex(&l.trace_id),
            "span_id": crate::hex(&l.span_id),
        })).collect::<Vec<_>>(),
    })
}
