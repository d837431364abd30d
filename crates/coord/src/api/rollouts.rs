//! `/v1/rollouts`: progressive delivery (see `crate::rollout`). Start a
//! canary or blue-green rollout of a service's new version, read its steps,
//! live comparison and decisions, promote, abort, pause or resume it, and
//! remove it once finished.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use serde::Deserialize;

use super::{ApiError, ApiResult, json, parse_body};
use crate::registry::Filter;
use crate::rollout::machine::Command;
use crate::rollout::{
    Analysis, DEFAULT_DEADLINE_MS, DEFAULT_INTERVAL_MS, DEFAULT_STEPS, Phase, Pin, Spec, Strategy,
};
use crate::runtime::Coord;

pub(super) fn routes() -> Router<Coord> {
    Router::new()
        .route("/v1/rollouts", get(list).post(start))
        .route("/v1/rollouts/{service}", get(show).delete(remove))
        .route("/v1/rollouts/{service}/promote", post(promote))
        .route("/v1/rollouts/{service}/abort", post(abort))
        .route("/v1/rollouts/{service}/pause", post(pause))
        .route("/v1/rollouts/{service}/resume", post(resume))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    service: String,
    to_version: String,
    #[serde(default)]
    strategy: Strategy,
    #[serde(default)]
    steps: Option<Vec<u8>>,
    #[serde(default)]
    interval_ms: Option<u64>,
    #[serde(default)]
    analysis: Option<Analysis>,
    #[serde(default)]
    auto_rollback: Option<bool>,
    #[serde(default)]
    min_healthy: Option<u32>,
    #[serde(default)]
    deadline_ms: Option<u64>,
    #[serde(default)]
    pin: Option<Pin>,
}

async fn list(State(c): State<Coord>) -> ApiResult<Response> {
    let all: Vec<_> = c.rollouts.list().iter().map(|r| (**r).clone()).collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "rollouts": all }),
    ))
}

async fn start(State(c): State<Coord>, body: Bytes) -> ApiResult<Response> {
    let q: StartRequest = parse_body(&body)?;
    // Blue-green waits for as many healthy instances of the new version as
    // the stable versions have now (at least one).
    let min_healthy = q.min_healthy.unwrap_or_else(|| match q.strategy {
        Strategy::Canary => 1,
        Strategy::BlueGreen => {
            let d = c.registry.discover(
                &q.service,
                &Filter {
                    healthy: true,
                    ..Filter::default()
                },
            );
            let stable = d
                .instances
                .iter()
                .filter(|v| v.healthy && v.instance.spec.version != q.to_version)
                .count();
            u32::try_from(stable).unwrap_or(u32::MAX).clamp(1, 10_000)
        }
    });
    let spec = Spec {
        steps: match (q.strategy, q.steps) {
            (_, Some(s)) => s,
            (Strategy::Canary, None) => DEFAULT_STEPS.to_vec(),
            (Strategy::BlueGreen, None) => Vec::new(),
        },
        service: q.service,
        to_version: q.to_version,
        strategy: q.strategy,
        interval_ms: q.interval_ms.unwrap_or(DEFAULT_INTERVAL_MS),
        analysis: q.analysis.unwrap_or_default(),
        auto_rollback: q.auto_rollback.unwrap_or(true),
        min_healthy,
        deadline_ms: q.deadline_ms.unwrap_or(DEFAULT_DEADLINE_MS),
        pin: q.pin,
    };
    let r = c.rollouts.start(spec).await?;
    tracing::info!(service = %r.spec.service, to_version = %r.spec.to_version,
        strategy = ?r.spec.strategy, steps = ?r.spec.steps, "rollout started");
    Ok(json(StatusCode::CREATED, &r))
}

async fn show(State(c): State<Coord>, Path(service): Path<String>) -> ApiResult<Response> {
    match c.rollouts.get(&service) {
        Some((r, _)) => Ok(json(StatusCode::OK, &*r)),
        None => Err(ApiError::not_found(format!("{service} has no rollout"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

async fn remove(
    State(c): State<Coord>,
    Path(service): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> ApiResult<Response> {
    // A finished rollout keeps the losing version out of traffic; removing
    // it while that version still runs would send it requests again.
    if !q.force
        && let Some((r, _)) = c.rollouts.get(&service)
    {
        let d = c.registry.discover(&service, &Filter::default());
        let to = &r.spec.to_version;
        let losing = |v: &str| match r.status.phase {
            Phase::RolledBack => v == to,
            Phase::Promoted => v != to,
            _ => false,
        };
        let left = d
            .instances
            .iter()
            .filter(|v| losing(&v.instance.spec.version))
            .count();
        if left > 0 {
            return Err(crate::CoordError::Conflict(format!(
                "{left} instance(s) of {service} that the {} rollout took out of traffic are still registered: removing it would send them requests again; retire them first (or force=true)",
                r.status.phase.as_str()
            ))
            .into());
        }
    }
    if c.rollouts.remove(&service, q.force).await? {
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "removed": service }),
        ))
    } else {
        Err(ApiError::not_found(format!("{service} has no rollout")))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PromoteBody {
    #[serde(default)]
    full: bool,
}

type WhoExt = Option<axum::Extension<meshwork_api::scope::Who>>;

async fn promote(
    State(c): State<Coord>,
    Path(service): Path<String>,
    who: WhoExt,
    body: Bytes,
) -> ApiResult<Response> {
    let full = if body.is_empty() {
        false
    } else {
        parse_body::<PromoteBody>(&body)?.full
    };
    run(&c, &service, Command::Promote { full }, who).await
}

async fn abort(
    State(c): State<Coord>,
    Path(service): Path<String>,
    who: WhoExt,
) -> ApiResult<Response> {
    run(&c, &service, Command::Abort, who).await
}

async fn pause(
    State(c): State<Coord>,
    Path(service): Path<String>,
    who: WhoExt,
) -> ApiResult<Response> {
    run(&c, &service, Command::Pause, who).await
}

async fn resume(
    State(c): State<Coord>,
    Path(service): Path<String>,
    who: WhoExt,
) -> ApiResult<Response> {
    run(&c, &service, Command::Resume, who).await
}

/// Applies `cmd` as the caller the guard let in (`anonymous` without auth).
async fn run(c: &Coord, service: &str, cmd: Command, who: WhoExt) -> ApiResult<Response> {
    let by = who.map_or_else(|| "anonymous".to_string(), |w| w.0.0.clone());
    let (r, d) = c.rollouts.command(service, cmd, &by).await?;
    tracing::info!(service, command = cmd.name(), by = %by, weight = d.weight, "rollout command");
    Ok(json(StatusCode::OK, &r))
}
