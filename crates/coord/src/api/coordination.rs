//! `/v1/leases`, `/v1/locks`, `/v1/elections`, `/v1/ids`.

use std::collections::HashMap;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use futures_util::StreamExt;
use serde::Deserialize;

use super::{ApiError, ApiResult, Caller, json, parse_body, parse_body_or_default};
use crate::error::CoordError;
use crate::lock::{self, Held};
use crate::runtime::Coord;

/// Longest a lock or campaign request may wait.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Marks a lease granted through this API: only those may be renewed, revoked or
/// used for locks by id here (sessions of nodes, instances and SDK clients may not).
const API_LEASES: &str = "/meshwork/api/leases/";

fn api_lease_key(id: i64) -> String {
    format!("{API_LEASES}{id:x}")
}

async fn check_api_lease(c: &Coord, id: i64) -> ApiResult<()> {
    let (kv, _) = c.backend.get(api_lease_key(id)).await?;
    if kv.is_some_and(|kv| kv.lease == id) {
        Ok(())
    } else {
        Err(CoordError::NotFound(format!(
            "lease {id} was not granted through POST /v1/leases (or it expired)"
        ))
        .into())
    }
}

/// Grants a lease through the API and marks it as such.
async fn grant_api_lease(c: &Coord, ttl: i64) -> ApiResult<i64> {
    let id = c.backend.grant(ttl).await?;
    if let Err(e) = c.backend.put(api_lease_key(id), "", id).await {
        let _ = c.backend.revoke(id).await;
        return Err(e.into());
    }
    Ok(id)
}

/// Bounds of a lease TTL granted over HTTP, seconds.
const TTL_RANGE: std::ops::RangeInclusive<i64> = 2..=3600;

pub(super) fn routes() -> Router<Coord> {
    Router::new()
        .route("/v1/leases", post(grant))
        .route("/v1/leases/{id}/keepalive", post(keepalive))
        .route("/v1/leases/{id}", delete(revoke))
        .route("/v1/locks", get(locks))
        .route("/v1/locks/{name}", post(acquire).delete(release))
        .route("/v1/elections/{name}", get(leader))
        .route("/v1/elections/{name}/campaign", post(campaign))
        .route("/v1/elections/{name}/proclaim", post(proclaim))
        .route("/v1/elections/{name}/resign", post(resign))
        .route("/v1/elections/{name}/observe", get(observe))
        .route("/v1/ids", post(ids))
        .route("/v1/ids/{id}", get(explain_id))
}

fn check_ttl(ttl: i64) -> ApiResult<i64> {
    if TTL_RANGE.contains(&ttl) {
        Ok(ttl)
    } else {
        Err(ApiError::bad_request(
            "invalid_argument",
            format!("ttl_seconds {ttl} is out of range 2..=3600"),
        ))
    }
}

fn lease_id(s: &str) -> ApiResult<i64> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => i64::from_str_radix(hex, 16),
        None => s.parse::<i64>(),
    };
    parsed.map_err(|_| {
        ApiError::bad_request(
            "invalid_argument",
            format!("lease id {s:?} must be a decimal number (or hex with 0x)"),
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Grant {
    ttl_seconds: i64,
}

async fn grant(State(c): State<Coord>, body: Bytes) -> ApiResult<Response> {
    let g: Grant = parse_body(&body)?;
    let ttl = check_ttl(g.ttl_seconds)?;
    let id = grant_api_lease(&c, ttl).await?;
    Ok(json(
        StatusCode::CREATED,
        &serde_json::json!({"id": id, "ttl_seconds": ttl}),
    ))
}

async fn keepalive(State(c): State<Coord>, Path(id): Path<String>) -> ApiResult<Response> {
    let id = lease_id(&id)?;
    check_api_lease(&c, id).await?;
    match c.backend.keep_alive_once(id).await? {
        Some(ttl) => Ok(json(
            StatusCode::OK,
            &serde_json::json!({"id": id, "ttl_seconds": ttl}),
        )),
        None => Err(CoordError::NotFound(format!("lease {id} expired or does not exist")).into()),
    }
}

async fn revoke(State(c): State<Coord>, Path(id): Path<String>) -> ApiResult<Response> {
    let id = lease_id(&id)?;
    check_api_lease(&c, id).await?;
    c.backend.revoke(id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn locks(State(c): State<Coord>) -> ApiResult<Response> {
    let l = lock::list_locks(&c.backend).await?;
    Ok(json(StatusCode::OK, &serde_json::json!({ "locks": l })))
}

/// Body of lock and campaign calls.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Contend {
    /// Use this lease (kept alive by the caller); else one is granted.
    #[serde(default)]
    lease: Option<i64>,
    /// TTL of the granted lease.
    #[serde(default)]
    ttl_seconds: Option<i64>,
    /// Wait at most this long (absent = up to the server maximum; 0 = try once).
    #[serde(default)]
    timeout_ms: Option<u64>,
    /// Who (locks) or the proclaimed value (elections).
    #[serde(default)]
    holder: String,
    #[serde(default)]
    value: String,
}

async fn lease_for(c: &Coord, body: &Contend) -> ApiResult<(i64, bool)> {
    match body.lease {
        Some(l) => {
            check_api_lease(c, l).await?;
            Ok((l, false))
        }
        None => {
            let ttl = check_ttl(body.ttl_seconds.unwrap_or(30))?;
            Ok((grant_api_lease(c, ttl).await?, true))
        }
    }
}

fn wait_of(body: &Contend) -> Duration {
    body.timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(MAX_WAIT)
        .min(MAX_WAIT)
}

async fn acquire(
    State(c): State<Coord>,
    Path(name): Path<String>,
    Caller(addr): Caller,
    body: Bytes,
) -> ApiResult<Response> {
    let b: Contend = parse_body_or_default(&body)?;
    lock::validate_lock_name(&name)?;
    let (lease, granted) = lease_for(&c, &b).await?;
    let holder = if b.holder.is_empty() {
        format!("http {}", super::caller(addr))
    } else {
        b.holder.clone()
    };
    match lock::lock(&c.backend, &name, lease, &holder, Some(wait_of(&b))).await {
        Ok(h) => Ok(json(StatusCode::OK, &h)),
        Err(e) => {
            if granted {
                let _ = c.backend.revoke(lease).await;
            }
            Err(e.into())
        }
    }
}

async fn release(
    State(c): State<Coord>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let h: Held = parse_body(&body)?;
    lock::check_held(&h, &name, false)?;
    if lock::unlock(&c.backend, &h).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(CoordError::NotFound(format!(
            "lock {name:?} is not held with token {} (released, or its lease ended)",
            h.fencing_token
        ))
        .into())
    }
}

async fn leader(State(c): State<Coord>, Path(name): Path<String>) -> ApiResult<Response> {
    match lock::leader(&c.backend, &name).await? {
        Some(l) => Ok(json(StatusCode::OK, &l)),
        None => Err(CoordError::NotFound(format!("election {name:?} has no leader")).into()),
    }
}

async fn campaign(
    State(c): State<Coord>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let b: Contend = parse_body_or_default(&body)?;
    lock::validate_lock_name(&name)?;
    let (lease, granted) = lease_for(&c, &b).await?;
    match lock::campaign(&c.backend, &name, lease, &b.value, Some(wait_of(&b))).await {
        Ok(h) => Ok(json(StatusCode::OK, &h)),
        Err(e) => {
            if granted {
                let _ = c.backend.revoke(lease).await;
            }
            Err(e.into())
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProclaimBody {
    held: Held,
    value: String,
}

async fn proclaim(
    State(c): State<Coord>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let p: ProclaimBody = parse_body(&body)?;
    lock::check_held(&p.held, &name, true)?;
    lock::proclaim(&c.backend, &p.held, &p.value).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn resign(
    State(c): State<Coord>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let h: Held = parse_body(&body)?;
    lock::check_held(&h, &name, true)?;
    if lock::resign(&c.backend, &h).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(CoordError::NotFound(format!("not a candidate in {name:?} any more")).into())
    }
}

async fn observe(State(c): State<Coord>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(super::sse(lock::observe(&c.backend, &name)?.map(
        |l| match l {
            Some(l) => super::SseItem {
                event: "leader",
                id: None,
                data: super::to_json(&l),
            },
            None => super::SseItem {
                event: "none",
                id: None,
                data: serde_json::json!({}),
            },
        },
    )))
}

async fn ids(
    State(c): State<Coord>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let count = match q.get("count") {
        None => 1,
        Some(n) => n
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request("invalid_argument", "count must be 1..=10000"))?,
    };
    let gen_ = c.ids()?;
    // Generation may wait for the next millisecond (or out a small clock step): keep
    // that off the async workers.
    let g = gen_.clone();
    let ids = tokio::task::spawn_blocking(move || g.next_batch(count))
        .await
        .map_err(|e| CoordError::Unavailable(format!("id generation failed: {e}")))??;
    let strings: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"ids": strings, "worker": gen_.worker()}),
    ))
}

async fn explain_id(State(c): State<Coord>, Path(id): Path<String>) -> ApiResult<Response> {
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::bad_request("invalid_argument", format!("{id:?} is not an id")))?;
    let (ts, worker, seq) = c.options.ids.try_decompose(id)?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"id": id.to_string(), "timestamp_ms": ts, "worker": worker, "sequence": seq}),
    ))
}
