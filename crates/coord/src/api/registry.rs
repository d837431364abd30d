//! `/v1/services`, `/v1/registry/events`, `/v1/nodes`.

use std::collections::HashMap;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use futures_util::StreamExt;
use serde::Deserialize;

use super::{ApiError, ApiResult, Caller, json, parse_body, parse_wait};
use crate::registry::model::{validate_instance_id, validate_service_name};
use crate::registry::{Filter, InstanceSpec, ServiceSettings};
use crate::runtime::Coord;

pub(super) fn routes() -> Router<Coord> {
    Router::new()
        .route("/v1/nodes", get(nodes))
        .route("/v1/services", get(services))
        .route("/v1/services/{service}", get(service).put(put_settings))
        .route(
            "/v1/services/{service}/instances",
            get(instances).post(register),
        )
        .route(
            "/v1/services/{service}/instances/{id}",
            get(instance).delete(deregister),
        )
        .route(
            "/v1/services/{service}/instances/{id}/heartbeat",
            put(heartbeat),
        )
        .route(
            "/v1/services/{service}/instances/{id}/enabled",
            put(enabled),
        )
        .route("/v1/services/{service}/watch", get(watch))
        .route("/v1/registry/events", get(events))
}

async fn nodes(State(c): State<Coord>) -> Response {
    json(
        StatusCode::OK,
        &serde_json::json!({"self": c.membership.info().name, "nodes": c.membership.members()}),
    )
}

async fn services(State(c): State<Coord>) -> Response {
    json(
        StatusCode::OK,
        &serde_json::json!({"services": c.registry.services()}),
    )
}

fn service_name(s: &str) -> ApiResult<()> {
    validate_service_name(s).map_err(ApiError::from)
}

async fn service(State(c): State<Coord>, Path(svc): Path<String>) -> ApiResult<Response> {
    service_name(&svc)?;
    let d = c.registry.discover(&svc, &Filter::default());
    let settings = c.registry.settings(&svc);
    if d.instances.is_empty() && settings.is_none() {
        return Err(crate::error::CoordError::NotFound(format!("no service {svc:?}")).into());
    }
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"name": svc, "settings": settings.unwrap_or_default(), "discovery": d}),
    ))
}

async fn put_settings(
    State(c): State<Coord>,
    Path(svc): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let s: ServiceSettings = parse_body(&body)?;
    c.registry.put_settings(&svc, &s).await?;
    Ok(json(StatusCode::OK, &s))
}

/// Query of discovery calls.
#[derive(Debug, Default, Deserialize)]
struct DiscoverQuery {
    healthy: Option<bool>,
    tags: Option<String>,
    zone: Option<String>,
    version: Option<String>,
    index: Option<i64>,
    wait: Option<String>,
}

impl DiscoverQuery {
    fn filter(&self) -> Filter {
        Filter {
            healthy: self.healthy.unwrap_or(false),
            tags: self
                .tags
                .as_deref()
                .unwrap_or("")
                .split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect(),
            zone: self.zone.clone().filter(|z| !z.is_empty()),
            version: self.version.clone().filter(|v| !v.is_empty()),
        }
    }
}

fn query<T: Default + serde::de::DeserializeOwned>(
    q: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<T> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request("invalid_argument", e.body_text()))
}

async fn instances(
    State(c): State<Coord>,
    Path(svc): Path<String>,
    q: Result<Query<DiscoverQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    service_name(&svc)?;
    let q = query(q)?;
    let f = q.filter();
    let d = match q.index {
        Some(index) => {
            let wait = match &q.wait {
                Some(w) => parse_wait(w)?,
                None => Duration::from_secs(60),
            };
            c.registry.discover_blocking(&svc, &f, index, wait).await
        }
        None => c.registry.discover(&svc, &f),
    };
    let mut r = json(StatusCode::OK, &d);
    if let Ok(v) = HeaderValue::from_str(&d.index.to_string()) {
        r.headers_mut().insert("x-meshwork-index", v);
    }
    Ok(r)
}

async fn register(
    State(c): State<Coord>,
    Path(svc): Path<String>,
    Caller(addr): Caller,
    body: Bytes,
) -> ApiResult<Response> {
    let spec: InstanceSpec = parse_body(&body)?;
    let by = format!("http {}", super::caller(addr));
    let r = c.registry.register(&svc, spec, &by, None).await?;
    Ok(json(StatusCode::CREATED, &r))
}

async fn instance(
    State(c): State<Coord>,
    Path((svc, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    service_name(&svc)?;
    validate_instance_id(&id)?;
    let v = c
        .registry
        .cache()
        .lock()
        .views(&svc)
        .into_iter()
        .find(|v| v.instance.spec.id == id);
    match v {
        Some(v) => Ok(json(StatusCode::OK, &v)),
        None => Err(crate::error::CoordError::NotFound(format!(
            "service {svc:?} has no instance {id:?}"
        ))
        .into()),
    }
}

async fn deregister(
    State(c): State<Coord>,
    Path((svc, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    c.registry.deregister(&svc, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn heartbeat(
    State(c): State<Coord>,
    Path((svc, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let ttl = c.registry.heartbeat(&svc, &id).await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"ttl_seconds": ttl}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Enabled {
    enabled: bool,
}

async fn enabled(
    State(c): State<Coord>,
    Path((svc, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let e: Enabled = parse_body(&body)?;
    let i = c.registry.set_enabled(&svc, &id, e.enabled).await?;
    Ok(json(StatusCode::OK, &i))
}

async fn watch(
    State(c): State<Coord>,
    Path(svc): Path<String>,
    q: Result<Query<DiscoverQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    service_name(&svc)?;
    let f = query(q)?.filter();
    Ok(super::sse(c.registry.watch(&svc, f).map(|d| {
        super::SseItem {
            event: "instances",
            id: Some(d.index.to_string()),
            data: super::to_json(&d),
        }
    })))
}

async fn events(
    State(c): State<Coord>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let limit = match q.get("limit") {
        Some(l) => l.parse::<usize>().ok().filter(|l| *l > 0).ok_or_else(|| {
            ApiError::bad_request("invalid_argument", "limit must be a positive integer")
        })?,
        None => 100,
    };
    let svc = q
        .get("service")
        .map(String::as_str)
        .filter(|s| !s.is_empty());
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"events": c.registry.events(svc, limit.min(1000))}),
    ))
}
