//! The HTTP/JSON API of coordination (`/v1/...`), described by this crate's
//! OpenAPI fragment ([`OPENAPI`]), which the node merges with the other
//! crates' into the document served at `/openapi.json`. Errors are the
//! shared envelope (`meshwork_api`) with the status of
//! [`CoordError::http_status`].

mod config;
mod coordination;
mod registry;
mod rollouts;
mod tokens;

pub use tokens::parse_ttl;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::CoordError;
use crate::runtime::Coord;

/// This API's part of the node's OpenAPI 3.1 document (paths, tags,
/// schemas, parameters; see `meshwork_api::openapi`).
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// The OpenAPI document of coordination alone: the shared base with
/// [`OPENAPI`] merged in.
pub fn document() -> Result<serde_json::Value, meshwork_api::openapi::OpenApiError> {
    meshwork_api::openapi::merge(&[OPENAPI])
}

/// Every route as (method, OpenAPI path); the OpenAPI document must describe exactly
/// these (a test checks it).
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/nodes"),
    ("get", "/v1/services"),
    ("get", "/v1/services/{service}"),
    ("put", "/v1/services/{service}"),
    ("get", "/v1/services/{service}/instances"),
    ("post", "/v1/services/{service}/instances"),
    ("get", "/v1/services/{service}/instances/{id}"),
    ("delete", "/v1/services/{service}/instances/{id}"),
    ("put", "/v1/services/{service}/instances/{id}/heartbeat"),
    ("put", "/v1/services/{service}/instances/{id}/enabled"),
    ("get", "/v1/services/{service}/watch"),
    ("get", "/v1/registry/events"),
    ("get", "/v1/config"),
    ("get", "/v1/config/namespaces"),
    ("post", "/v1/config/listener"),
    ("get", "/v1/config/secrets"),
    ("post", "/v1/config/secrets/rotate"),
    ("get", "/v1/config/{namespace}/{group}/{data_id}"),
    ("put", "/v1/config/{namespace}/{group}/{data_id}"),
    ("delete", "/v1/config/{namespace}/{group}/{data_id}"),
    ("get", "/v1/config/{namespace}/{group}/{data_id}/history"),
    (
        "get",
        "/v1/config/{namespace}/{group}/{data_id}/history/{version}",
    ),
    ("get", "/v1/config/{namespace}/{group}/{data_id}/diff"),
    ("post", "/v1/config/{namespace}/{group}/{data_id}/rollback"),
    ("get", "/v1/config/{namespace}/{group}/{data_id}/watch"),
    ("get", "/v1/config/{namespace}/{group}/{data_id}/beta"),
    ("put", "/v1/config/{namespace}/{group}/{data_id}/beta"),
    ("delete", "/v1/config/{namespace}/{group}/{data_id}/beta"),
    (
        "post",
        "/v1/config/{namespace}/{group}/{data_id}/beta/promote",
    ),
    ("post", "/v1/leases"),
    ("post", "/v1/leases/{id}/keepalive"),
    ("delete", "/v1/leases/{id}"),
    ("get", "/v1/locks"),
    ("post", "/v1/locks/{name}"),
    ("delete", "/v1/locks/{name}"),
    ("get", "/v1/elections/{name}"),
    ("post", "/v1/elections/{name}/campaign"),
    ("post", "/v1/elections/{name}/proclaim"),
    ("post", "/v1/elections/{name}/resign"),
    ("get", "/v1/elections/{name}/observe"),
    ("post", "/v1/ids"),
    ("get", "/v1/ids/{id}"),
    ("get", "/v1/auth/tokens"),
    ("post", "/v1/auth/tokens"),
    ("delete", "/v1/auth/tokens/{id}"),
    ("get", "/v1/auth/users"),
    ("post", "/v1/auth/users"),
    ("put", "/v1/auth/users/{name}"),
    ("delete", "/v1/auth/users/{name}"),
    ("get", "/v1/audit"),
    ("get", "/v1/rollouts"),
    ("post", "/v1/rollouts"),
    ("get", "/v1/rollouts/{service}"),
    ("delete", "/v1/rollouts/{service}"),
    ("post", "/v1/rollouts/{service}/promote"),
    ("post", "/v1/rollouts/{service}/abort"),
    ("post", "/v1/rollouts/{service}/pause"),
    ("post", "/v1/rollouts/{service}/resume"),
];

pub use meshwork_api::ApiError;

/// The API's answer for a [`CoordError`]: its status and stable code, and the
/// line and column of a format error, or a held lock's holder, as `detail`.
impl From<CoordError> for ApiError {
    fn from(e: CoordError) -> ApiError {
        let status =
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let err = ApiError::new(status, e.code(), e.to_string());
        match &e {
            CoordError::Format(f) => {
                err.with_detail(serde_json::json!({"line": f.line, "column": f.column}))
            }
            CoordError::Held { holder, .. } => {
                err.with_detail(serde_json::json!({ "holder": holder }))
            }
            _ => err,
        }
    }
}

/// Handler result.
pub type ApiResult<T> = Result<T, ApiError>;

/// Parses a JSON body, naming the line and column of a syntax error.
pub(crate) fn parse_body<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_body",
            "the request needs a JSON body",
        ));
    }
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request(
            "invalid_body",
            "the request body must be a JSON object ({...})",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!(
                "request body is not valid JSON for this call at line {}, column {}: {e}",
                e.line(),
                e.column()
            ),
        )
    })
}

/// Parses an optional JSON body (empty = default).
pub(crate) fn parse_body_or_default<T: DeserializeOwned + Default>(body: &Bytes) -> ApiResult<T> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(T::default());
    }
    parse_body(body)
}

/// A JSON response with a status.
pub(crate) fn json<T: Serialize>(status: StatusCode, v: &T) -> Response {
    (status, axum::Json(v)).into_response()
}

/// Parses a wait such as `30s`, `500ms`, `2m` or plain milliseconds.
pub(crate) fn parse_wait(s: &str) -> ApiResult<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "ms"),
    };
    let n: u64 = num.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_argument",
            format!("wait {s:?} must look like 30s, 500ms or 2m"),
        )
    })?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_argument",
                format!("wait {s:?} has unknown unit {unit:?}; use ms, s or m"),
            ));
        }
    };
    Ok(d)
}

/// Parses `k=v,k2=v2` labels.
pub(crate) fn parse_labels(s: Option<&str>) -> ApiResult<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    for part in s.unwrap_or("").split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            ApiError::bad_request(
                "invalid_argument",
                format!("label {part:?} must be key=value"),
            )
        })?;
        m.insert(k.to_string(), v.to_string());
    }
    Ok(m)
}

/// One server-sent event: its name, optional id, and JSON data.
pub struct SseItem {
    /// Event name.
    pub event: &'static str,
    /// Event id (resume point), if any.
    pub id: Option<String>,
    /// The payload, sent as JSON.
    pub data: serde_json::Value,
}

/// A server-sent-events response from a stream of items, with keep-alive comments.
pub fn sse<S>(stream: S) -> Response
where
    S: futures_util::Stream<Item = SseItem> + Send + 'static,
{
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures_util::StreamExt;
    let events = stream.map(|item| {
        let mut ev = Event::default().event(item.event);
        if let Some(id) = item.id {
            ev = ev.id(id);
        }
        Ok::<_, Infallible>(
            ev.json_data(&item.data)
                .unwrap_or_else(|_| Event::default().comment("encoding failed")),
        )
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// JSON of a serializable value (`null` if it cannot be encoded).
pub(crate) fn to_json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// The caller's address, for `registered_by` and gray-release matching.
pub(crate) fn caller(addr: Option<SocketAddr>) -> String {
    addr.map(|a| a.ip().to_string()).unwrap_or_default()
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_such_route",
        "no such API route; see /openapi.json",
    )
}

/// The API router (mount it on the node's HTTP port; serve it with connect
/// info), with `/openapi.json` documenting coordination alone.
pub fn router(coord: Coord) -> Router {
    // The fragment is this crate's own constant; its tests merge it.
    let doc = document().unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }));
    router_documented(coord, &doc)
}

/// As [`router`], with `/openapi.json` answering `openapi` (the node's
/// document, merged from every crate it serves).
pub fn router_documented(coord: Coord, openapi: &serde_json::Value) -> Router {
    Router::new()
        .merge(registry::routes())
        .merge(config::routes())
        .merge(coordination::routes())
        .merge(tokens::routes())
        .merge(rollouts::routes())
        .merge(meshwork_api::openapi::router(openapi))
        .fallback(not_found)
        .layer(axum::middleware::map_response(meshwork_api::json_errors))
        .with_state(coord)
}

/// The connecting client's address, when the server was started with connect info.
pub struct Caller(pub Option<SocketAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Caller(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}
