//! The HTTP API of the `txn` role under `/v1/txn/` (documented in this
//! crate's `openapi.json`): start a transaction, list and read them, abort or
//! retry one, and the verdict a 2PC participant in doubt asks for.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use meshwork_api::ApiError;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::log::LogError;
use crate::machine::{Event, Txn};
use crate::role::{RoleError, TxnRole};
use crate::runner::{ApplyError, RunError};
use crate::spec::{Spec, SpecError};

/// Most transactions one list answers.
pub const MAX_LIST: usize = 1000;
/// Longest `wait_ms` of `GET /v1/txn/{id}`.
pub const MAX_WAIT_MS: u64 = 60_000;

/// The role's routes.
pub fn router(role: TxnRole) -> Router {
    Router::new()
        .route("/v1/txn", axum::routing::get(list).post(create))
        .route("/v1/txn/{id}", axum::routing::get(show))
        .route("/v1/txn/{id}/abort", axum::routing::post(abort))
        .route("/v1/txn/{id}/retry", axum::routing::post(retry))
        .route("/v1/txn/{id}/wake", axum::routing::get(wake))
        .route("/v1/txn/{id}/verdict", axum::routing::get(verdict))
        .layer(axum::middleware::map_response(meshwork_api::json_errors))
        .with_state(role)
}

/// `POST /v1/txn`'s body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    /// Chosen by the caller to make the start idempotent; generated if absent.
    #[serde(default)]
    id: Option<String>,
    /// The definition.
    spec: Spec,
}

/// `POST /v1/txn/{id}/abort`'s optional body.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AbortBody {
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    status: Option<String>,
}

fn error(e: RoleError) -> ApiError {
    match e {
        RoleError::Spec(SpecError::Syntax(m)) => {
            ApiError::invalid(format!("not a transaction: {m}"))
        }
        RoleError::Spec(SpecError::Invalid { field, message }) => {
            ApiError::invalid(format!("{field}: {message}")).with_detail(json!({ "field": field }))
        }
        RoleError::BadId(_) => ApiError::invalid(e.to_string()),
        RoleError::Log(l) | RoleError::Apply(ApplyError::Run(RunError::Log(l))) => log_error(l),
        RoleError::Apply(ApplyError::Run(e @ RunError::NotFound(_))) => {
            ApiError::not_found(e.to_string())
        }
        RoleError::Apply(ApplyError::Run(e @ RunError::TakenOver { .. })) => {
            ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
        }
        RoleError::Apply(ApplyError::Refused(e)) => {
            ApiError::new(StatusCode::CONFLICT, "decided", e.to_string())
        }
    }
}

fn log_error(e: LogError) -> ApiError {
    match e {
        LogError::Exists(_) => ApiError::new(StatusCode::CONFLICT, "exists", e.to_string()),
        LogError::Superseded(_) => ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string()),
        LogError::Store(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
        LogError::Corrupt { .. } => ApiError::internal(e.to_string()),
    }
}

/// One line of a listing.
fn summary(t: &Txn) -> Value {
    json!({
        "id": t.id,
        "mode": t.spec.mode,
        "status": t.status,
        "reason": t.reason,
        "created_ms": t.created,
        "coordinator": t.coordinator,
        "branches": t.branches.len(),
        "stuck": t.branches.iter().any(|b| b.stuck),
    })
}

async fn create(State(role): State<TxnRole>, headers: http::HeaderMap, body: Bytes) -> Response {
    let body: CreateBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(RoleError::Spec(SpecError::Syntax(e.to_string()))).into_response(),
    };
    // The transaction is a span of the caller's trace (or starts one).
    let span = meshwork_telemetry::TraceContext::from_headers(&headers);
    let wall = std::time::SystemTime::now();
    let created = role
        .create(body.spec, body.id, Some(span.traceparent()))
        .await;
    // The server span the branch calls hang under.
    if role.tracer().enabled() {
        use meshwork_telemetry::export::{Kind, SpanRecord};
        let s = SpanRecord::new(&span, "POST /v1/txn/transactions", Kind::Server, wall)
            .attr("http.request.method", "POST")
            .attr("http.route", "/v1/txn/transactions");
        role.tracer().record(match &created {
            Ok(t) => s
                .attr("meshwork.txn.id", t.id.as_str())
                .attr("http.response.status_code", 201u16),
            Err(e) => s.failed(e.to_string()),
        });
    }
    match created {
        Ok(t) => (StatusCode::CREATED, axum::Json(t)).into_response(),
        Err(e) => error(e).into_response(),
    }
}

async fn list(State(role): State<TxnRole>, Query(q): Query<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(100).min(MAX_LIST);
    // Every unfinished transaction and the most recently finished ones (from
    // the log's indexes: no scan of every record).
    match role.runner().log().recent(limit as i64).await {
        Ok(all) => {
            // Newest first, on the record's own time.
            let mut txns: Vec<&Txn> = all
                .iter()
                .map(|s| &s.txn)
                .filter(|t| q.status.as_deref().is_none_or(|s| t.status.as_str() == s))
                .collect();
            txns.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| a.id.cmp(&b.id)));
            let total = txns.len();
            let items: Vec<Value> = txns.into_iter().take(limit).map(summary).collect();
            axum::Json(json!({ "transactions": items, "total": total })).into_response()
        }
        Err(e) => log_error(e).into_response(),
    }
}

#[derive(Deserialize)]
struct ShowQuery {
    #[serde(default)]
    wait_ms: u64,
}

async fn show(
    State(role): State<TxnRole>,
    Path(id): Path<String>,
    Query(q): Query<ShowQuery>,
) -> Response {
    if q.wait_ms > MAX_WAIT_MS {
        return ApiError::invalid(format!("wait_ms: at most {MAX_WAIT_MS}")).into_response();
    }
    let wait = std::time::Duration::from_millis(q.wait_ms);
    match role.wait_final(&id, wait).await {
        Ok(Some(t)) => axum::Json(t).into_response(),
        Ok(None) => ApiError::not_found(format!("no transaction {id}")).into_response(),
        Err(e) => log_error(e).into_response(),
    }
}

/// Deadline of a wake-up sent to the node driving a transaction.
const WAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// After an operator's event was applied here (a compare-and-swap on the
/// shared record), tells the node that drives the transaction to re-read it
/// now: `GET /v1/txn/{id}/wake` there (a read for the API's guard: it only
/// makes the driver reload). Best effort: a driver not woken still sees the
/// change at its next write.
async fn wake_driver(role: &TxnRole, id: &str) {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;
    static CLIENT: std::sync::OnceLock<Client<HttpConnector, Empty<Bytes>>> =
        std::sync::OnceLock::new();
    let Ok(Some(addr)) = role.driven_elsewhere(id).await else {
        return;
    };
    let uri = format!("http://{addr}/v1/txn/{}/wake", crate::path_segment(id));
    let Ok(req) = http::Request::get(uri).body(Empty::new()) else {
        return;
    };
    let client = CLIENT.get_or_init(|| Client::builder(TokioExecutor::new()).build_http());
    let exchange = async {
        let resp = client.request(req).await.ok()?;
        let status = resp.status();
        resp.into_body().collect().await.ok()?;
        Some(status)
    };
    match tokio::time::timeout(WAKE_TIMEOUT, exchange).await {
        Ok(Some(status)) if status.is_success() => {}
        other => {
            tracing::debug!(txn = %id, driver = %addr, answer = ?other, "could not wake the driving node; it sees the change at its next write");
        }
    }
}

/// Wakes this node's driver of `id`, if any, to re-read the record.
async fn wake(State(role): State<TxnRole>, Path(id): Path<String>) -> Response {
    let woken = role.runner().wake(&id);
    axum::Json(json!({ "id": id, "woken": woken })).into_response()
}

async fn abort(State(role): State<TxnRole>, Path(id): Path<String>, body: Bytes) -> Response {
    let body: AbortBody = if body.is_empty() {
        AbortBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => return ApiError::invalid(format!("abort body: {e}")).into_response(),
        }
    };
    let reason = body
        .reason
        .unwrap_or_else(|| "aborted by an operator".to_owned());
    if reason.len() > 1024 || reason.chars().any(char::is_control) {
        return ApiError::invalid("reason: at most 1024 characters, no control characters")
            .into_response();
    }
    match role.apply(&id, Event::Abort { reason }).await {
        Ok(t) => {
            wake_driver(&role, &id).await;
            axum::Json(t).into_response()
        }
        Err(e) => error(e).into_response(),
    }
}

async fn retry(State(role): State<TxnRole>, Path(id): Path<String>) -> Response {
    match role.apply(&id, Event::RetryNow).await {
        Ok(t) => {
            wake_driver(&role, &id).await;
            axum::Json(t).into_response()
        }
        Err(e) => error(e).into_response(),
    }
}

/// Presumed abort: a transaction with no record is aborted.
async fn verdict(State(role): State<TxnRole>, Path(id): Path<String>) -> Response {
    match role.runner().log().load(&id).await {
        Ok(s) => {
            let v = match s.map(|s| s.txn.verdict()) {
                Some(Some(true)) => "commit",
                Some(None) => "pending",
                Some(Some(false)) | None => "abort",
            };
            axum::Json(json!({ "id": id, "verdict": v })).into_response()
        }
        Err(e) => log_error(e).into_response(),
    }
}
