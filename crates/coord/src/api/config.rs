//! `/v1/config/...`.

use std::collections::HashMap;
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use meshwork_api::scope::{Granted, secret_read};
use serde::Deserialize;

use super::{ApiError, ApiResult, Caller, json, parse_body, parse_body_or_default, parse_labels};
use crate::config::{BetaRequest, ClientIdentity, ConfigKey, Listening, Publish};
use crate::error::CoordError;
use crate::runtime::Coord;

pub(super) fn routes() -> Router<Coord> {
    Router::new()
        .route("/v1/config", get(list))
        .route("/v1/config/namespaces", get(namespaces))
        .route("/v1/config/listener", post(listener))
        .route("/v1/config/secrets", get(secrets_status))
        .route("/v1/config/secrets/rotate", post(rotate_secrets))
        .route(
            "/v1/config/{namespace}/{group}/{data_id}",
            get(get_entry).put(publish).delete(delete),
        )
        .route(
            "/v1/config/{namespace}/{group}/{data_id}/history",
            get(history),
        )
        .route(
            "/v1/config/{namespace}/{group}/{data_id}/history/{version}",
            get(version),
        )
        .route("/v1/config/{namespace}/{group}/{data_id}/diff", get(diff))
        .route(
            "/v1/config/{namespace}/{group}/{data_id}/rollback",
            post(rollback),
        )
        .route("/v1/config/{namespace}/{group}/{data_id}/watch", get(watch))
        .route(
            "/v1/config/{namespace}/{group}/{data_id}/beta",
            get(get_beta).put(put_beta).delete(withdraw_beta),
        )
        .route(
            "/v1/config/{namespace}/{group}/{data_id}/beta/promote",
            post(promote_beta),
        )
}

type P3 = Path<(String, String, String)>;

/// What the guard let the request in with (absent: the router runs without
/// the node's guard, and secrets stay shut).
type Grant = Option<Extension<Granted>>;

/// Refuses the content of secret entry `k` to a caller without `secrets:read` on its namespace.
fn may_read_secret(grant: &Grant, k: &ConfigKey) -> ApiResult<()> {
    let need = secret_read(&k.namespace);
    match grant {
        None => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{k} is a secret entry and this API runs without the node's auth guard"),
        )),
        Some(Extension(g)) if g.allows(&need) => Ok(()),
        Some(Extension(g)) => {
            let (status, code, to) = if g.anonymous() {
                (
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    "send a token that has it (Authorization: Bearer mwt_...)",
                )
            } else {
                (
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "the token does not have it",
                )
            };
            Err(ApiError::new(
                status,
                code,
                format!("{k} is a secret entry: its content needs the scope {need}; {to}"),
            ))
        }
    }
}

fn key(Path((ns, g, id)): P3) -> ApiResult<ConfigKey> {
    ConfigKey::new(&ns, &g, &id).map_err(ApiError::from)
}

fn client(
    q: &HashMap<String, String>,
    addr: Option<std::net::SocketAddr>,
) -> ApiResult<ClientIdentity> {
    Ok(ClientIdentity {
        address: q
            .get("client_ip")
            .cloned()
            .unwrap_or_else(|| super::caller(addr)),
        labels: parse_labels(q.get("labels").map(String::as_str))?,
    })
}

fn num<T: std::str::FromStr>(q: &HashMap<String, String>, name: &str) -> ApiResult<Option<T>> {
    match q.get(name) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            ApiError::bad_request(
                "invalid_argument",
                format!("{name} must be a non-negative integer, not {v:?}"),
            )
        }),
    }
}

async fn list(State(c): State<Coord>, Query(q): Query<HashMap<String, String>>) -> Response {
    let entries = c.config.list(
        q.get("namespace")
            .map(String::as_str)
            .filter(|s| !s.is_empty()),
        q.get("group").map(String::as_str).filter(|s| !s.is_empty()),
    );
    json(StatusCode::OK, &serde_json::json!({ "entries": entries }))
}

async fn namespaces(State(c): State<Coord>) -> Response {
    json(
        StatusCode::OK,
        &serde_json::json!({ "namespaces": c.config.namespaces() }),
    )
}

async fn get_entry(
    State(c): State<Coord>,
    p: P3,
    Caller(addr): Caller,
    grant: Grant,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let k = key(p)?;
    let who = client(&q, addr)?;
    let served = c
        .config
        .get_for(&k, &who)
        .ok_or_else(|| CoordError::NotFound(format!("no config entry {k}")))?;
    if served.entry.secret {
        may_read_secret(&grant, &k)?;
    }
    if let Some(why) = &served.locked {
        return Err(CoordError::Unavailable(format!(
            "{k} is a secret entry that cannot be opened: {why}"
        ))
        .into());
    }
    if q.get("raw").is_some_and(|v| v == "true" || v == "1") {
        let mut r = served.entry.content.clone().into_response();
        if let Ok(v) = HeaderValue::from_str(served.entry.format.media_type()) {
            r.headers_mut().insert(header::CONTENT_TYPE, v);
        }
        if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", served.entry.checksum)) {
            r.headers_mut().insert(header::ETAG, v);
        }
        return Ok(r);
    }
    let mut r = json(StatusCode::OK, &served);
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", served.entry.checksum)) {
        r.headers_mut().insert(header::ETAG, v);
    }
    Ok(r)
}

async fn publish(State(c): State<Coord>, p: P3, body: Bytes) -> ApiResult<Response> {
    let k = key(p)?;
    let req: Publish = parse_body(&body)?;
    let r = c.config.publish(&k, req).await?;
    let status = if r.changed && r.entry.version == 1 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(status, &r))
}

async fn delete(
    State(c): State<Coord>,
    p: P3,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let k = key(p)?;
    let author = q.get("author").cloned().unwrap_or_default();
    let v = c.config.delete(&k, &author, num(&q, "if_version")?).await?;
    Ok(json(StatusCode::OK, &serde_json::json!({ "version": v })))
}

async fn history(
    State(c): State<Coord>,
    p: P3,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let k = key(p)?;
    let limit = num::<usize>(&q, "limit")?.unwrap_or(100).min(10_000);
    let h = c.config.history(&k, limit).await?;
    Ok(json(StatusCode::OK, &serde_json::json!({ "versions": h })))
}

async fn version(
    State(c): State<Coord>,
    grant: Grant,
    Path((ns, g, id, v)): Path<(String, String, String, String)>,
) -> ApiResult<Response> {
    let k = ConfigKey::new(&ns, &g, &id)?;
    let v: u64 = v.parse().map_err(|_| {
        ApiError::bad_request("invalid_argument", format!("version {v:?} is not a number"))
    })?;
    // Refuse before opening anything when the entry is or was secret.
    if c.config.get(&k).is_some_and(|e| e.secret) {
        may_read_secret(&grant, &k)?;
    }
    let rec = c.config.version(&k, v).await?;
    if rec.entry.secret {
        may_read_secret(&grant, &k)?;
    }
    Ok(json(StatusCode::OK, &rec))
}

async fn diff(
    State(c): State<Coord>,
    p: P3,
    grant: Grant,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let k = key(p)?;
    let (Some(from), Some(to)) = (num::<u64>(&q, "from")?, num::<u64>(&q, "to")?) else {
        return Err(ApiError::bad_request(
            "invalid_argument",
            "diff needs ?from=VERSION&to=VERSION",
        ));
    };
    if c.config.get(&k).is_some_and(|e| e.secret) {
        may_read_secret(&grant, &k)?;
    }
    let d = c.config.diff(&k, from, to).await?;
    if d.secret {
        may_read_secret(&grant, &k)?;
    }
    Ok(json(StatusCode::OK, &d))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rollback {
    version: u64,
    #[serde(default)]
    author: String,
}

async fn rollback(State(c): State<Coord>, p: P3, body: Bytes) -> ApiResult<Response> {
    let k = key(p)?;
    let r: Rollback = parse_body(&body)?;
    Ok(json(
        StatusCode::OK,
        &c.config.rollback(&k, r.version, &r.author).await?,
    ))
}

async fn watch(
    State(c): State<Coord>,
    p: P3,
    Caller(addr): Caller,
    grant: Grant,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let k = key(p)?;
    let who = client(&q, addr)?;
    if c.config.get(&k).is_some_and(|e| e.secret) {
        may_read_secret(&grant, &k)?;
    }
    let key = k.clone();
    Ok(super::sse(c.config.subscribe(k, who).map(move |s| match s {
        // An entry that became secret while watched is not shown to a caller
        // without the scope: the stream says so instead.
        Some(s) if s.entry.secret && may_read_secret(&grant, &key).is_err() => super::SseItem {
            event: "forbidden",
            id: None,
            data: serde_json::json!({
                "message": format!("{key} is now a secret entry; its content needs the scope {}", secret_read(&key.namespace))
            }),
        },
        Some(s) => super::SseItem {
            event: "config",
            id: None,
            data: super::to_json(&s),
        },
        None => super::SseItem {
            event: "deleted",
            id: None,
            data: serde_json::json!({}),
        },
    })))
}

async fn get_beta(State(c): State<Coord>, p: P3, grant: Grant) -> ApiResult<Response> {
    let k = key(p)?;
    // Secrets have no gray release; should one be left from before, it stays shut too.
    if c.config.get(&k).is_some_and(|e| e.secret) {
        may_read_secret(&grant, &k)?;
    }
    let b = c
        .config
        .beta(&k)
        .ok_or_else(|| CoordError::NotFound(format!("{k} has no gray release")))?;
    Ok(json(StatusCode::OK, &b))
}

async fn put_beta(State(c): State<Coord>, p: P3, body: Bytes) -> ApiResult<Response> {
    let k = key(p)?;
    let req: BetaRequest = parse_body(&body)?;
    Ok(json(StatusCode::OK, &c.config.start_beta(&k, req).await?))
}

async fn withdraw_beta(
    State(c): State<Coord>,
    p: P3,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let k = key(p)?;
    let author = q.get("author").cloned().unwrap_or_default();
    c.config.end_beta(&k, false, &author).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Author {
    #[serde(default)]
    author: String,
}

async fn promote_beta(State(c): State<Coord>, p: P3, body: Bytes) -> ApiResult<Response> {
    let k = key(p)?;
    let a: Author = parse_body_or_default(&body)?;
    let r = c.config.end_beta(&k, true, &a.author).await?;
    Ok(json(StatusCode::OK, &r))
}

async fn secrets_status(State(c): State<Coord>) -> Response {
    json(StatusCode::OK, &c.config.secrets_status())
}

async fn rotate_secrets(State(c): State<Coord>) -> ApiResult<Response> {
    Ok(json(StatusCode::OK, &c.config.rotate_secrets().await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenRequest {
    items: Vec<Listening>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    client: Option<ClientIdentity>,
}

async fn listener(
    State(c): State<Coord>,
    Caller(addr): Caller,
    body: Bytes,
) -> ApiResult<Response> {
    let req: ListenRequest = parse_body(&body)?;
    if req.items.is_empty() || req.items.len() > 1000 {
        return Err(ApiError::bad_request(
            "invalid_argument",
            "a listener watches 1..=1000 entries",
        ));
    }
    for l in &req.items {
        ConfigKey::new(&l.key.namespace, &l.key.group, &l.key.data_id)?;
    }
    let mut who = req.client.unwrap_or_default();
    if who.address.is_empty() {
        who.address = super::caller(addr);
    }
    let wait = Duration::from_millis(req.timeout_ms.unwrap_or(30_000));
    let changed = c.config.listen(&req.items, &who, wait).await;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "changed": changed }),
    ))
}
