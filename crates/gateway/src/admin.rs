//! The admin API: routes, upstreams (health, ejection, load), counters and
//! explanations, as JSON.

use meshwork_api::ApiError;
use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, Method};

use crate::gateway::Gateway;

pub(crate) fn router(gw: Gateway) -> axum::Router {
    axum::Router::new()
        .route("/routes", get(routes))
        .route("/routes/source", get(source))
        .route("/upstreams", get(upstreams))
        .route("/stats", get(stats))
        .route("/explain", get(explain))
        .with_state(gw)
}

async fn routes(State(gw): State<Gateway>) -> Response {
    Json(serde_json::json!({
        "version": gw.routes_version(),
        "routes": gw.route_info(),
    }))
    .into_response()
}

/// The route set in force, secrets redacted.
async fn source(State(gw): State<Gateway>) -> Response {
    Json(gw.routes().redacted()).into_response()
}

async fn upstreams(State(gw): State<Gateway>) -> Response {
    Json(serde_json::json!({ "upstreams": gw.upstreams() })).into_response()
}

async fn stats(State(gw): State<Gateway>) -> Response {
    Json(serde_json::json!({
        "gateway": gw.counters(),
        "routes": gw.route_info().into_iter().map(|r| r.counters).collect::<Vec<_>>(),
    }))
    .into_response()
}

/// `GET /explain?url=http://host/path&method=GET` (other request headers
/// are taken from the admin request's own `x-explain-*` headers, e.g.
/// `x-explain-x-canary: 1`).
async fn explain(
    State(gw): State<Gateway>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let Some(url) = q.get("url") else {
        return ApiError::bad_request("bad_request", "missing url").into_response();
    };
    let method = match Method::from_bytes(q.get("method").map_or("GET", String::as_str).as_bytes())
    {
        Ok(m) => m,
        Err(_) => {
            return ApiError::bad_request("bad_request", "bad method").into_response();
        }
    };
    let mut h = HeaderMap::new();
    for (name, value) in &headers {
        if let Some(rest) = name.as_str().strip_prefix("x-explain-")
            && let Ok(n) = http::header::HeaderName::from_bytes(rest.as_bytes())
        {
            h.append(n, value.clone());
        }
    }
    match gw.explain(&method, url, &h) {
        Ok(e) => Json(e).into_response(),
        Err(e) => ApiError::bad_request("bad_request", e.to_string()).into_response(),
    }
}
