//! The HTTP API of the `mq` role under `/v1/mq/` (documented in this crate's
//! `openapi.json`): topics, publish, peek, consumer groups (fetch, ack, nack,
//! extend) and dead letters (browse, redrive).
//!
//! Bodies are JSON. A message body is `body` (UTF-8 text) or `body_base64` (any bytes);
//! deliveries carry `body` when the bytes are UTF-8, else `body_base64`.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use meshwork_api::ApiError;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    Broker, GroupConfig, HalfDecision, HalfInfo, HalfOutcome, Message, MqError, NewMessage,
    TopicConfig,
};

/// Longest `wait_ms` of a fetch (a long poll).
pub const MAX_WAIT_MS: u64 = 30_000;

/// Every route, as `(method, path)` (the OpenAPI test checks the document against it).
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/mq/topics"),
    ("get", "/v1/mq/topics/{topic}"),
    ("put", "/v1/mq/topics/{topic}"),
    ("get", "/v1/mq/topics/{topic}/messages"),
    ("post", "/v1/mq/topics/{topic}/messages"),
    ("get", "/v1/mq/topics/{topic}/groups/{group}"),
    ("put", "/v1/mq/topics/{topic}/groups/{group}"),
    ("post", "/v1/mq/topics/{topic}/groups/{group}/fetch"),
    ("post", "/v1/mq/topics/{topic}/groups/{group}/ack"),
    ("post", "/v1/mq/topics/{topic}/groups/{group}/nack"),
    ("post", "/v1/mq/topics/{topic}/groups/{group}/extend"),
    ("get", "/v1/mq/topics/{topic}/groups/{group}/dlq"),
    ("post", "/v1/mq/topics/{topic}/groups/{group}/dlq/redrive"),
    ("post", "/v1/mq/topics/{topic}/half"),
    ("get", "/v1/mq/half"),
    ("get", "/v1/mq/half/{id}"),
    ("post", "/v1/mq/half/{id}/commit"),
    ("post", "/v1/mq/half/{id}/rollback"),
];

/// The role's routes (with feature `grpc`, the gRPC service `meshwork.mq.v1.Broker`
/// too, at [`crate::grpc::ROUTE`]).
pub fn router(broker: Broker) -> Router {
    use axum::routing::{get, post};
    let routes = Router::new()
        .route("/v1/mq/topics", get(list_topics))
        .route("/v1/mq/topics/{topic}", get(show_topic).put(create_topic))
        .route("/v1/mq/topics/{topic}/messages", get(peek).post(publish))
        .route(
            "/v1/mq/topics/{topic}/groups/{group}",
            get(show_group).put(create_group),
        )
        .route("/v1/mq/topics/{topic}/groups/{group}/fetch", post(fetch))
        .route("/v1/mq/topics/{topic}/groups/{group}/ack", post(ack))
        .route("/v1/mq/topics/{topic}/groups/{group}/nack", post(nack))
        .route("/v1/mq/topics/{topic}/groups/{group}/extend", post(extend))
        .route(
            "/v1/mq/topics/{topic}/groups/{group}/dlq",
            get(dead_letters),
        )
        .route(
            "/v1/mq/topics/{topic}/groups/{group}/dlq/redrive",
            post(redrive),
        )
        .route("/v1/mq/topics/{topic}/half", post(prepare_half))
        .route("/v1/mq/half", get(list_halves))
        .route("/v1/mq/half/{id}", get(show_half))
        .route("/v1/mq/half/{id}/commit", post(commit_half))
        .route("/v1/mq/half/{id}/rollback", post(rollback_half))
        .layer(axum::middleware::map_response(meshwork_api::json_errors));
    #[cfg(feature = "grpc")]
    let routes = routes.route_service(crate::grpc::ROUTE, crate::grpc::service(broker.clone()));
    routes.with_state(broker)
}

/// The API error for a broker error.
pub fn error(e: MqError) -> ApiError {
    let msg = e.to_string();
    match e {
        MqError::InvalidName { .. } | MqError::Invalid(_) => ApiError::invalid(msg),
        MqError::TooLarge { .. } => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", msg),
        MqError::NoTopic(_)
        | MqError::NoGroup { .. }
        | MqError::NoPartition { .. }
        | MqError::NoHalf(_) => ApiError::not_found(msg),
        MqError::TopicExists(_) | MqError::GroupExists { .. } | MqError::HalfResolved { .. } => {
            ApiError::new(StatusCode::CONFLICT, "conflict", msg)
        }
        MqError::OffsetOutOfRange { start, end, .. } => ApiError::bad_request("out_of_range", msg)
            .with_detail(json!({"start": start, "end": end})),
        MqError::UnknownDelivery {
            partition, offset, ..
        } => ApiError::bad_request("unknown_delivery", msg)
            .with_detail(json!({"partition": partition, "offset": offset})),
        MqError::Limit { .. } => ApiError::new(StatusCode::CONFLICT, "limit_reached", msg),
        MqError::Storage(_) | MqError::Stopped => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable", msg)
        }
    }
}

fn reply(e: MqError) -> Response {
    error(e).into_response()
}

/// Parses a JSON body; an empty body is `T::default()` when `empty_ok`.
fn parse<T: serde::de::DeserializeOwned + Default>(
    body: &Bytes,
    empty_ok: bool,
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return if empty_ok {
            Ok(T::default())
        } else {
            Err(ApiError::invalid("a JSON body is required"))
        };
    }
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("body: {e}")))
}

/// A message as JSON.
pub fn message_json(m: &Message) -> Value {
    let mut v = json!({
        "id": m.id.to_string(),
        "publish_ms": m.publish_ms,
        "priority": m.priority,
    });
    if !m.key.is_empty() {
        v["key"] = Value::String(String::from_utf8_lossy(&m.key).into_owned());
    }
    if !m.tag.is_empty() {
        v["tag"] = Value::String(m.tag.clone());
    }
    if m.deliver_at_ms != 0 {
        v["deliver_at_ms"] = json!(m.deliver_at_ms);
    }
    if !m.headers.is_empty() {
        let h: BTreeMap<&str, String> = m
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        v["headers"] = json!(h);
    }
    match std::str::from_utf8(&m.body) {
        Ok(s) => v["body"] = Value::String(s.to_string()),
        Err(_) => {
            v["body_base64"] =
                Value::String(base64::engine::general_purpose::STANDARD.encode(&m.body))
        }
    }
    v
}

async fn list_topics(State(b): State<Broker>) -> Response {
    let topics = b.topics();
    axum::Json(json!({ "topics": topics })).into_response()
}

async fn show_topic(State(b): State<Broker>, Path(topic): Path<String>) -> Response {
    match b.topic_info(&topic) {
        Ok(t) => axum::Json(json!(t)).into_response(),
        Err(e) => reply(e),
    }
}

async fn create_topic(State(b): State<Broker>, Path(topic): Path<String>, body: Bytes) -> Response {
    let config: TopicConfig = match parse(&body, true) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let existed = b.topic_info(&topic).is_ok();
    match b.create_topic(&topic, config).await {
        Ok(t) => {
            let status = if existed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            (status, axum::Json(json!(t))).into_response()
        }
        Err(e) => reply(e),
    }
}

/// A message in a publish body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PubMessage {
    /// A decimal id (as text, 64 bits do not fit a JSON number everywhere) for dedup.
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    body_base64: Option<String>,
    #[serde(default)]
    deliver_at_ms: Option<u64>,
    #[serde(default)]
    delay_ms: Option<u64>,
    #[serde(default)]
    priority: Option<u8>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    messages: Vec<PubMessage>,
}

fn to_new(m: PubMessage, field: &str, now_ms: u64) -> Result<NewMessage, ApiError> {
    let at = |what: String| ApiError::invalid(format!("{field}: {what}"));
    let id = match m.id.as_deref() {
        None | Some("") => 0,
        Some(s) => s
            .parse::<u64>()
            .ok()
            .filter(|&v| v != 0)
            .ok_or_else(|| at(format!("id {s:?} is not a positive 64-bit decimal number")))?,
    };
    let body = match (m.body, m.body_base64) {
        (Some(_), Some(_)) => return Err(at("give body or body_base64, not both".into())),
        (Some(s), None) => Bytes::from(s),
        (None, Some(b)) => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(b.as_bytes())
                .map_err(|e| at(format!("body_base64: {e}")))?,
        ),
        (None, None) => Bytes::new(),
    };
    let deliver_at_ms = match (m.deliver_at_ms, m.delay_ms) {
        (Some(_), Some(_)) => return Err(at("give deliver_at_ms or delay_ms, not both".into())),
        (Some(t), None) => t,
        (None, Some(d)) => now_ms.saturating_add(d),
        (None, None) => 0,
    };
    Ok(NewMessage {
        id,
        key: m.key.map(Bytes::from).unwrap_or_default(),
        tag: m.tag.unwrap_or_default(),
        headers: m
            .headers
            .into_iter()
            .map(|(k, v)| (k, Bytes::from(v)))
            .collect(),
        body,
        deliver_at_ms,
        priority: m.priority.unwrap_or(0),
    })
}

async fn publish(State(b): State<Broker>, Path(topic): Path<String>, body: Bytes) -> Response {
    let req: PublishBody = match parse(&body, false) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if req.messages.is_empty() {
        return ApiError::invalid("messages: at least one message is required").into_response();
    }
    let now = b.config().clock.now_ms();
    let mut msgs = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        match to_new(m, &format!("messages[{i}]"), now) {
            Ok(m) => msgs.push(m),
            Err(e) => return e.into_response(),
        }
    }
    match b.publish(&topic, msgs).await {
        Ok(r) => {
            let results: Vec<Value> = r
                .iter()
                .map(|p| json!({"partition": p.partition, "offset": p.offset, "duplicate": p.duplicate}))
                .collect();
            axum::Json(json!({ "results": results })).into_response()
        }
        Err(e) => reply(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeekQuery {
    #[serde(default)]
    partition: u32,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    time_ms: Option<u64>,
    #[serde(default)]
    limit: Option<usize>,
}

async fn peek(
    State(b): State<Broker>,
    Path(topic): Path<String>,
    Query(q): Query<PeekQuery>,
) -> Response {
    let offset = match (q.offset, q.time_ms) {
        (Some(_), Some(_)) => {
            return ApiError::invalid("give offset or time_ms, not both").into_response();
        }
        (Some(o), None) => o,
        (None, Some(t)) => match b.offset_for_time(&topic, q.partition, t) {
            Ok(o) => o,
            Err(e) => return reply(e),
        },
        (None, None) => match b.topic_info(&topic) {
            Ok(t) => t
                .partitions
                .get(q.partition as usize)
                .map_or(0, |p| p.start),
            Err(e) => return reply(e),
        },
    };
    match b.read(&topic, q.partition, offset, q.limit.unwrap_or(100)) {
        Ok(msgs) => axum::Json(json!({ "messages": msgs.iter().map(|s| stored_json(s.partition, s.offset, &s.message)).collect::<Vec<_>>() }))
            .into_response(),
        Err(e) => reply(e),
    }
}

fn stored_json(partition: u32, offset: u64, m: &Message) -> Value {
    let mut v = message_json(m);
    v["partition"] = json!(partition);
    v["offset"] = json!(offset);
    v
}

async fn show_group(
    State(b): State<Broker>,
    Path((topic, group)): Path<(String, String)>,
) -> Response {
    match b.group_info(&topic, &group) {
        Ok(g) => axum::Json(json!(g)).into_response(),
        Err(e) => reply(e),
    }
}

async fn create_group(
    State(b): State<Broker>,
    Path((topic, group)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let config: GroupConfig = match parse(&body, true) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let existed = b.group_info(&topic, &group).is_ok();
    match b.create_group(&topic, &group, config).await {
        Ok(g) => {
            let status = if existed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            (status, axum::Json(json!(g))).into_response()
        }
        Err(e) => reply(e),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FetchBody {
    #[serde(default)]
    max: Option<usize>,
    /// A broadcast group's consumer.
    #[serde(default)]
    consumer: Option<String>,
    #[serde(default)]
    wait_ms: Option<u64>,
}

async fn fetch(
    State(b): State<Broker>,
    Path((topic, group)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let req: FetchBody = match parse(&body, true) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let wait = req.wait_ms.unwrap_or(0);
    if wait > MAX_WAIT_MS {
        return ApiError::invalid(format!("wait_ms must be at most {MAX_WAIT_MS}")).into_response();
    }
    let max = req.max.unwrap_or(1);
    if max == 0 || max > crate::MAX_FETCH {
        return ApiError::invalid(format!("max must be between 1 and {}", crate::MAX_FETCH))
            .into_response();
    }
    let group = with_consumer(group, req.consumer.as_deref());
    match b
        .fetch(&topic, &group, max, Duration::from_millis(wait))
        .await
    {
        Ok(d) => {
            let msgs: Vec<Value> = d
                .iter()
                .map(|d| {
                    let mut v = stored_json(d.partition, d.offset, &d.message);
                    v["delivery"] = json!(d.delivery);
                    v
                })
                .collect();
            axum::Json(json!({ "messages": msgs })).into_response()
        }
        Err(e) => reply(e),
    }
}

#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct Item {
    partition: u32,
    offset: u64,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SettleBody {
    messages: Vec<Item>,
    #[serde(default)]
    delay_ms: Option<u64>,
    #[serde(default)]
    by_ms: Option<u64>,
    /// A broadcast group's consumer.
    #[serde(default)]
    consumer: Option<String>,
}

/// `group/consumer` for a broadcast group's consumer (names cannot hold `/`).
fn with_consumer(group: String, consumer: Option<&str>) -> String {
    match consumer {
        Some(c) => format!("{group}/{c}"),
        None => group,
    }
}

fn items(req: &SettleBody) -> Result<Vec<(u32, u64)>, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages: at least one {partition, offset} is required",
        ));
    }
    Ok(req
        .messages
        .iter()
        .map(|i| (i.partition, i.offset))
        .collect())
}

#[derive(Clone, Copy)]
enum Settle {
    Ack,
    Nack,
    Extend,
}

async fn settle(b: Broker, topic: String, group: String, body: Bytes, how: Settle) -> Response {
    let req: SettleBody = match parse(&body, false) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let list = match items(&req) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    let group = with_consumer(group, req.consumer.as_deref());
    let done = match how {
        Settle::Ack if req.delay_ms.is_some() || req.by_ms.is_some() => {
            return ApiError::invalid("ack takes messages only").into_response();
        }
        Settle::Ack => b.ack(&topic, &group, &list).await,
        Settle::Nack => {
            b.nack(
                &topic,
                &group,
                &list,
                Duration::from_millis(req.delay_ms.unwrap_or(0)),
            )
            .await
        }
        Settle::Extend => {
            b.extend(&topic, &group, &list, req.by_ms.map(Duration::from_millis))
                .await
        }
    };
    match done {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => reply(e),
    }
}

async fn ack(
    State(b): State<Broker>,
    Path((t, g)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    settle(b, t, g, body, Settle::Ack).await
}

async fn nack(
    State(b): State<Broker>,
    Path((t, g)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    settle(b, t, g, body, Settle::Nack).await
}

async fn extend(
    State(b): State<Broker>,
    Path((t, g)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    settle(b, t, g, body, Settle::Extend).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitQuery {
    #[serde(default)]
    limit: Option<usize>,
}

async fn dead_letters(
    State(b): State<Broker>,
    Path((topic, group)): Path<(String, String)>,
    Query(q): Query<LimitQuery>,
) -> Response {
    match b.dead_letters(&topic, &group, q.limit.unwrap_or(100)) {
        Ok(msgs) => axum::Json(json!({ "messages": msgs.iter().map(|s| stored_json(s.partition, s.offset, &s.message)).collect::<Vec<_>>() }))
            .into_response(),
        Err(e) => reply(e),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RedriveBody {
    #[serde(default)]
    max: Option<usize>,
}

async fn redrive(
    State(b): State<Broker>,
    Path((topic, group)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let req: RedriveBody = match parse(&body, true) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match b.redrive(&topic, &group, req.max.unwrap_or(100)).await {
        Ok(n) => axum::Json(json!({ "moved": n })).into_response(),
        Err(e) => reply(e),
    }
}

/// A half message as JSON (its id as decimal text, as message ids are).
pub fn half_json(h: &HalfInfo) -> Value {
    json!({
        "id": h.id.to_string(),
        "topic": h.topic,
        "producer": h.producer,
        "prepared_ms": h.prepared_ms,
        "checks": h.checks,
        "next_check_ms": h.next_check_ms,
    })
}

fn outcome_json(id: u64, o: HalfOutcome) -> Value {
    let mut v = json!(o);
    v["id"] = json!(id.to_string());
    v
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrepareBody {
    /// The service asked whether to commit when the half message is left unresolved.
    producer: String,
    message: PubMessage,
}

async fn prepare_half(State(b): State<Broker>, Path(topic): Path<String>, body: Bytes) -> Response {
    let req: PrepareBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return ApiError::invalid(format!("body: {e}")).into_response(),
    };
    let msg = match to_new(req.message, "message", b.config().clock.now_ms()) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    match b.prepare_half(&topic, &req.producer, msg).await {
        Ok(h) => axum::Json(half_json(&h)).into_response(),
        Err(e) => reply(e),
    }
}

async fn list_halves(State(b): State<Broker>, Query(q): Query<LimitQuery>) -> Response {
    let list: Vec<Value> = b
        .halves(q.limit.unwrap_or(100).min(10_000))
        .iter()
        .map(half_json)
        .collect();
    axum::Json(json!({ "half": list })).into_response()
}

fn half_id(id: &str) -> Result<u64, ApiError> {
    id.parse::<u64>().ok().filter(|&v| v != 0).ok_or_else(|| {
        ApiError::invalid(format!("id {id:?} is not a positive 64-bit decimal number"))
    })
}

async fn show_half(State(b): State<Broker>, Path(id): Path<String>) -> Response {
    match half_id(&id).map(|id| b.half(id).map_err(error)) {
        Ok(Ok(h)) => axum::Json(half_json(&h)).into_response(),
        Ok(Err(e)) | Err(e) => e.into_response(),
    }
}

async fn resolve(b: Broker, id: String, decision: HalfDecision) -> Response {
    let id = match half_id(&id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    match b.resolve_half(id, decision).await {
        Ok(o) => axum::Json(outcome_json(id, o)).into_response(),
        Err(e) => reply(e),
    }
}

async fn commit_half(State(b): State<Broker>, Path(id): Path<String>) -> Response {
    resolve(b, id, HalfDecision::Commit).await
}

async fn rollback_half(State(b): State<Broker>, Path(id): Path<String>) -> Response {
    resolve(b, id, HalfDecision::Rollback).await
}
