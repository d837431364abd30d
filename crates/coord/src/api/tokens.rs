//! `/v1/auth/tokens` and `/v1/auth/users`: the HTTP API's bearer tokens and
//! the console's users, for administrators (the routes need the `admin`
//! scope; see `meshwork_api::scope`).

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use serde::Deserialize;

use super::{ApiError, ApiResult, json, parse_body};
use crate::runtime::Coord;

/// Most scopes on one token.
const MAX_SCOPES: usize = 64;
/// Longest description.
const MAX_DESCRIPTION: usize = 256;
/// Longest lifetime: ten years.
const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

pub(super) fn routes() -> Router<Coord> {
    Router::new()
        .route("/v1/auth/tokens", get(list).post(create))
        .route("/v1/auth/tokens/{id}", delete(revoke))
        .route("/v1/auth/users", get(list_users).post(create_user))
        .route(
            "/v1/auth/users/{name}",
            axum::routing::put(update_user).delete(remove_user),
        )
        .route("/v1/audit", get(audit))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    since_ms: Option<u64>,
}

/// Most audit entries one call returns.
const MAX_AUDIT: usize = 1000;

async fn audit(
    State(c): State<Coord>,
    axum::extract::Query(q): axum::extract::Query<AuditQuery>,
) -> ApiResult<Response> {
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_AUDIT {
        return Err(ApiError::bad_request(
            "invalid_argument",
            format!("limit {limit} is out of range 1..={MAX_AUDIT}"),
        ));
    }
    let entries = c.audit.list(limit, q.since_ms.unwrap_or(0)).await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "entries": entries }),
    ))
}

/// Parses a lifetime such as `30d`, `12h`, `15m` or `90s`.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("ttl {s:?}: expected a number and a unit (30d, 12h, 15m, 90s)"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("ttl {s:?}: unit must be s, m, h or d")),
    };
    let d = Duration::from_secs(secs);
    if d.is_zero() || d > MAX_TTL {
        return Err(format!("ttl {s:?}: must be between 1s and 3650d"));
    }
    Ok(d)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    scopes: Vec<String>,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    description: String,
}

async fn create(State(c): State<Coord>, body: Bytes) -> ApiResult<Response> {
    let r: Create = parse_body(&body)?;
    check_scopes(&r.scopes)?;
    if r.description.len() > MAX_DESCRIPTION {
        return Err(ApiError::bad_request(
            "invalid_argument",
            format!("description is longer than {MAX_DESCRIPTION} bytes"),
        ));
    }
    let ttl = r
        .ttl
        .as_deref()
        .map(parse_ttl)
        .transpose()
        .map_err(|e| ApiError::bad_request("invalid_argument", e))?;
    let (info, token) = c.tokens.create(r.scopes, ttl, r.description).await?;
    tracing::info!(id = %info.id, scopes = ?info.scopes, "API token created");
    Ok(json(
        StatusCode::CREATED,
        &serde_json::json!({"token": token, "info": info}),
    ))
}

async fn list(State(c): State<Coord>) -> Response {
    json(
        StatusCode::OK,
        &serde_json::json!({"tokens": c.tokens.list()}),
    )
}

async fn revoke(State(c): State<Coord>, Path(id): Path<String>) -> ApiResult<Response> {
    if c.tokens.revoke(&id).await? {
        tracing::info!(id = %id, "API token revoked");
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found(format!("no token {id:?}")))
    }
}

fn check_scopes(scopes: &[String]) -> ApiResult<()> {
    if scopes.is_empty() || scopes.len() > MAX_SCOPES {
        return Err(ApiError::bad_request(
            "invalid_argument",
            format!("1 to {MAX_SCOPES} scopes"),
        ));
    }
    for s in scopes {
        s.parse::<meshwork_api::scope::Scope>()
            .map_err(|e| ApiError::bad_request("invalid_argument", e))?;
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    name: String,
    password: String,
    scopes: Vec<String>,
}

async fn create_user(State(c): State<Coord>, body: Bytes) -> ApiResult<Response> {
    let r: NewUser = parse_body(&body)?;
    check_scopes(&r.scopes)?;
    let info = c.users.create(&r.name, &r.password, r.scopes).await?;
    tracing::info!(user = %info.name, scopes = ?info.scopes, "console user added");
    Ok(json(StatusCode::CREATED, &info))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserChange {
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
}

async fn update_user(
    State(c): State<Coord>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let r: UserChange = parse_body(&body)?;
    if r.password.is_none() && r.scopes.is_none() {
        return Err(ApiError::bad_request(
            "invalid_argument",
            "give a password, scopes or both",
        ));
    }
    if let Some(s) = &r.scopes {
        check_scopes(s)?;
    }
    match c
        .users
        .update(&name, r.password.as_deref(), r.scopes)
        .await?
    {
        Some(info) => {
            tracing::info!(user = %info.name, "console user changed; its sessions end");
            Ok(json(StatusCode::OK, &info))
        }
        None => Err(ApiError::not_found(format!("no user {name:?}"))),
    }
}

async fn list_users(State(c): State<Coord>) -> Response {
    json(
        StatusCode::OK,
        &serde_json::json!({"users": c.users.list()}),
    )
}

async fn remove_user(State(c): State<Coord>, Path(name): Path<String>) -> ApiResult<Response> {
    if c.users.remove(&name).await? {
        tracing::info!(user = %name, "console user removed");
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found(format!("no user {name:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_parse_with_units_and_bounds() {
        assert_eq!(parse_ttl("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "0s", "30", "1y", "d", "9999d", "-1d"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}
