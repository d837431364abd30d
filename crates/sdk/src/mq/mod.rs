//! Messaging from a service: [`MqClient::publisher`] publishes to a topic,
//! [`MqClient::subscribe`] runs a handler for each message of a consumer group
//! (with bounded concurrency, retries through nack with backoff, ack-deadline
//! extension while a handler works, and graceful shutdown). The trace context
//! travels in the `traceparent` header: a handler runs in the publisher's trace.
//!
//! The backend is the broker of a node with the `mq` role, over its `/v1/mq/`
//! API: the one named by `MESHWORK_MQ` (`http://HOST:PORT`), else the first
//! (by name) live `mq` node in the control plane's membership, so every service
//! of a cluster uses the same broker. At scale, `MESHWORK_MQ=nats://HOST:PORT`
//! puts the same API on NATS JetStream (feature `nats`, on by default; see the
//! `nats` module for what maps to what and what that backend refuses).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use meshwork_coord::CoordClient;
use meshwork_coord::nodes::{NODES_PREFIX, NodeInfo};
use meshwork_telemetry::TraceContext;
use serde_json::{Value, json};

use crate::context::RequestContext;

#[cfg(feature = "nats")]
mod nats;

/// The broker's gRPC client (`crates/mq/proto/mq.proto`; checked in, see
/// `tests/generated_code.rs`).
#[allow(
    missing_docs,
    unreachable_pub,
    dead_code,
    clippy::all,
    clippy::pedantic
)]
mod proto {
    include!("../generated/meshwork.mq.v1.rs");
}
mod half;
#[cfg(feature = "sqlite")]
pub mod outbox;

pub use half::{CHECK_PATH, CheckDecision, HalfCheck, HalfMessage, half_check_router};

/// The membership role of nodes that run the broker.
pub const MQ_ROLE: &str = "mq";
/// Deadline of one request to the broker (a long poll adds its wait).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one fetch waits for a message.
const FETCH_WAIT: Duration = Duration::from_secs(10);
/// Largest delivery batch the gRPC stream takes (the broker sends at most 16 MiB
/// of messages in one, plus their metadata).
const MAX_DELIVERY_BATCH_BYTES: usize = 64 << 20;
/// Acks sent in one request, at most.
const SETTLE_BATCH: usize = 500;
/// Messages of concurrent `publish` calls coalesced into one request, at most
/// (the broker takes 1,000).
const PUBLISH_BATCH: usize = 1000;
/// Coalesced publish requests of one publisher out at once (as Kafka's
/// `max.in.flight.requests`): while they are out, the next batch fills up.
const PUBLISH_IN_FLIGHT: usize = 4;
/// Body bytes coalesced into one publish request, at most (well under a node's
/// default request limit; a bigger message goes alone).
const PUBLISH_BATCH_BYTES: usize = 1 << 20;

/// Why a messaging call failed.
#[derive(Debug, thiserror::Error)]
pub enum MqError {
    /// No live node runs the `mq` role and `MESHWORK_MQ` is not set.
    #[error("no live node runs the mq role (start one with --roles ...,mq, or set MESHWORK_MQ)")]
    NoBroker,
    /// The broker refused the request; its code and message say why.
    #[error("{status} {code}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The error envelope's stable code.
        code: String,
        /// The error envelope's message.
        message: String,
    },
    /// The broker did not answer.
    #[error("the broker did not answer: {0}")]
    Unreachable(String),
    /// An argument the SDK refuses before sending.
    #[error("{0}")]
    Invalid(String),
    /// The control plane failed.
    #[error(transparent)]
    Coord(#[from] meshwork_coord::CoordError),
}

impl MqError {
    /// The same error again (for each of several waiters).
    fn duplicate(&self) -> MqError {
        match self {
            MqError::NoBroker => MqError::NoBroker,
            MqError::Refused {
                status,
                code,
                message,
            } => MqError::Refused {
                status: *status,
                code: code.clone(),
                message: message.clone(),
            },
            MqError::Unreachable(m) => MqError::Unreachable(m.clone()),
            MqError::Invalid(m) => MqError::Invalid(m.clone()),
            MqError::Coord(e) => MqError::Unreachable(format!("the control plane: {e}")),
        }
    }

    /// Worth trying again: the broker was unreachable or briefly unavailable.
    pub fn is_transient(&self) -> bool {
        matches!(self, MqError::Unreachable(_))
            || matches!(self, MqError::Refused { status, .. } if *status == 503)
    }
}

/// A message to publish. Built with [`OutMessage::new`] and its setters.
#[derive(Debug, Clone, Default)]
pub struct OutMessage {
    body: Bytes,
    key: Option<String>,
    tag: Option<String>,
    headers: BTreeMap<String, String>,
    id: Option<u64>,
    delay: Option<Duration>,
    priority: u8,
}

impl OutMessage {
    /// A message with this body.
    pub fn new(body: impl Into<Bytes>) -> OutMessage {
        OutMessage {
            body: body.into(),
            ..OutMessage::default()
        }
    }

    /// A message whose body is `v` as JSON.
    pub fn json(v: &impl serde::Serialize) -> Result<OutMessage, MqError> {
        serde_json::to_vec(v)
            .map(OutMessage::new)
            .map_err(|e| MqError::Invalid(format!("the message does not serialize: {e}")))
    }

    /// Partitioning key: one key's messages keep their order (and ordered groups
    /// hand them out one at a time).
    pub fn key(mut self, key: impl Into<String>) -> OutMessage {
        self.key = Some(key.into());
        self
    }

    /// Tag consumer groups can filter on.
    pub fn tag(mut self, tag: impl Into<String>) -> OutMessage {
        self.tag = Some(tag.into());
        self
    }

    /// A header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> OutMessage {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// The id the broker deduplicates on (within its window, default 2 minutes).
    /// Without one, the publisher picks a random id per message, so its own
    /// retries of a publish are never written twice.
    pub fn id(mut self, id: u64) -> OutMessage {
        self.id = Some(id);
        self
    }

    /// Deliver no earlier than this long from now.
    pub fn delay(mut self, d: Duration) -> OutMessage {
        self.delay = Some(d);
        self
    }

    /// Priority 0 (lowest, the default) to 9.
    pub fn priority(mut self, p: u8) -> OutMessage {
        self.priority = p;
        self
    }

    /// The headers to send: the message's, with the publisher's trace added.
    fn headers_with_trace(&self) -> BTreeMap<String, String> {
        self.headers_with_trace_from(RequestContext::current().as_ref())
    }

    /// As [`OutMessage::headers_with_trace`], a child of `ctx` (a root without).
    fn headers_with_trace_from(&self, ctx: Option<&RequestContext>) -> BTreeMap<String, String> {
        let mut headers = self.headers.clone();
        // The publisher's trace: a child of the request being handled, if any.
        if !headers.contains_key("traceparent") {
            let trace = ctx.map_or_else(TraceContext::new_root, |c| c.trace.child());
            headers.insert("traceparent".into(), trace.traceparent());
        }
        headers
    }

    /// The message [`OutMessage::to_json`] wrote (the outbox keeps them so).
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    fn from_json(m: &Value) -> Option<OutMessage> {
        use base64::Engine as _;
        let body = match (m["body"].as_str(), m["body_base64"].as_str()) {
            (Some(s), _) => Bytes::from(s.to_owned()),
            (None, Some(b)) => {
                Bytes::from(base64::engine::general_purpose::STANDARD.decode(b).ok()?)
            }
            (None, None) => Bytes::new(),
        };
        Some(OutMessage {
            body,
            key: m["key"].as_str().map(str::to_owned),
            tag: m["tag"].as_str().map(str::to_owned),
            headers: serde_json::from_value(m["headers"].clone()).unwrap_or_default(),
            id: Some(m["id"].as_str()?.parse().ok()?),
            delay: m["delay_ms"].as_u64().map(Duration::from_millis),
            priority: u8::try_from(m["priority"].as_u64().unwrap_or(0)).ok()?,
        })
    }

    fn to_json(&self, id: u64) -> Value {
        use base64::Engine as _;
        let mut m = json!({ "id": id.to_string() });
        match std::str::from_utf8(&self.body) {
            Ok(s) => m["body"] = json!(s),
            Err(_) => {
                m["body_base64"] =
                    json!(base64::engine::general_purpose::STANDARD.encode(&self.body))
            }
        }
        if let Some(k) = &self.key {
            m["key"] = json!(k);
        }
        if let Some(t) = &self.tag {
            m["tag"] = json!(t);
        }
        m["headers"] = json!(self.headers_with_trace());
        if let Some(d) = self.delay {
            m["delay_ms"] = json!(d.as_millis() as u64);
        }
        if self.priority > 0 {
            m["priority"] = json!(self.priority);
        }
        m
    }
}

/// Where a published message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The partition.
    pub partition: u32,
    /// Its offset there.
    pub offset: u64,
    /// The id was published before within the dedup window; nothing was written.
    pub duplicate: bool,
}

/// A message handed to a handler.
#[derive(Debug, Clone)]
pub struct Received {
    /// The partition.
    pub partition: u32,
    /// The offset.
    pub offset: u64,
    /// Which delivery this is (1 = first; more after a failure or a consumer's death).
    pub delivery: u32,
    /// The publisher's id (0 = none).
    pub id: u64,
    /// The key (empty: none).
    pub key: String,
    /// The tag (empty: none).
    pub tag: String,
    /// The headers.
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub body: Bytes,
    /// When the broker wrote it (ms since the epoch).
    pub publish_ms: u64,
}

impl Received {
    fn from_json(m: &Value) -> Option<Received> {
        use base64::Engine as _;
        let body = match (m["body"].as_str(), m["body_base64"].as_str()) {
            (Some(s), _) => Bytes::from(s.to_owned()),
            (None, Some(b)) => {
                Bytes::from(base64::engine::general_purpose::STANDARD.decode(b).ok()?)
            }
            (None, None) => Bytes::new(),
        };
        Some(Received {
            partition: u32::try_from(m["partition"].as_u64()?).ok()?,
            offset: m["offset"].as_u64()?,
            delivery: u32::try_from(m["delivery"].as_u64().unwrap_or(1)).unwrap_or(u32::MAX),
            id: m["id"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0),
            key: m["key"].as_str().unwrap_or_default().to_owned(),
            tag: m["tag"].as_str().unwrap_or_default().to_owned(),
            headers: m["headers"]
                .as_object()
                .map(|h| {
                    h.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect()
                })
                .unwrap_or_default(),
            body,
            publish_ms: m["publish_ms"].as_u64().unwrap_or(0),
        })
    }

    /// A dead letter as stored: its deliveries from the `mq-dead-deliveries` header,
    /// the broker's `mq-dead-*` bookkeeping headers taken off.
    fn into_dead_letter(mut self) -> Received {
        if let Some(n) = self
            .headers
            .get("mq-dead-deliveries")
            .and_then(|v| v.parse().ok())
        {
            self.delivery = n;
        }
        self.headers.retain(|k, _| !k.starts_with("mq-dead-"));
        self
    }

    /// The body as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// How a subscription runs.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// Handlers running at once (default 16).
    pub concurrency: usize,
    /// The group's settings when the subscription creates it (the JSON of
    /// `PUT /v1/mq/topics/{topic}/groups/{group}`; default: start at the latest).
    /// An existing group keeps its own.
    pub group: Value,
    /// First retry delay after a handler failure; doubled per delivery (default 1 s).
    pub retry_initial: Duration,
    /// Longest retry delay (default 60 s).
    pub retry_max: Duration,
    /// This consumer's name, for a broadcast group (every consumer gets every message;
    /// use the instance's id); `None` for shared and ordered groups.
    pub consumer: Option<String>,
    /// How long [`Subscription::shutdown`] waits for running handlers (default 30 s);
    /// what is still running then is given back at once.
    pub shutdown_grace: Duration,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            concurrency: 16,
            group: json!({}),
            consumer: None,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Publishes and subscribes. Cheap to clone.
#[derive(Clone)]
pub struct MqClient {
    coord: Option<CoordClient>,
    fixed: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
    auth: Option<String>,
    /// The broker's address once found (forgotten when it stops answering).
    broker: Arc<parking_lot::Mutex<Option<String>>>,
    /// Acks and nacks waiting to be sent, batched per group.
    settler: Settler,
    /// The gRPC channel to the broker's address (publish and delivery streams).
    channel: Arc<parking_lot::Mutex<Option<(String, tonic::transport::Channel)>>>,
    /// The NATS JetStream backend, when the address is `nats://`.
    #[cfg(feature = "nats")]
    nats: Option<nats::Nats>,
}

impl std::fmt::Debug for MqClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqClient").finish_non_exhaustive()
    }
}

impl MqClient {
    /// A client finding the broker through `coord`'s membership (or `MESHWORK_MQ`).
    pub fn new(coord: CoordClient) -> MqClient {
        let fixed = std::env::var("MESHWORK_MQ").ok().filter(|s| !s.is_empty());
        MqClient::make(Some(coord), fixed)
    }

    /// A client for the broker at `addr`: `HOST:PORT` or `http://HOST:PORT` for a
    /// node's broker, `nats://HOST:PORT` for NATS JetStream.
    pub fn at(addr: &str) -> MqClient {
        MqClient::make(None, Some(addr.to_owned()))
    }

    fn make(coord: Option<CoordClient>, fixed: Option<String>) -> MqClient {
        MqClient {
            #[cfg(feature = "nats")]
            nats: fixed
                .as_deref()
                .filter(|a| nats::is_nats_url(a))
                .map(nats::Nats::new),
            coord,
            fixed,
            http: Client::builder(TokioExecutor::new()).build_http(),
            auth: None,
            broker: Arc::default(),
            settler: Settler::default(),
            channel: Arc::default(),
        }
    }

    /// A gRPC channel to the broker (h2c on its HTTP port), made lazily per address.
    async fn channel(&self) -> Result<tonic::transport::Channel, MqError> {
        let addr = self.broker().await?;
        if let Some((a, c)) = self.channel.lock().as_ref()
            && *a == addr
        {
            return Ok(c.clone());
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| MqError::Invalid(format!("broker address {addr:?}: {e}")))?
            .connect_timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        *self.channel.lock() = Some((addr, channel.clone()));
        Ok(channel)
    }

    /// A gRPC request with this client's credentials.
    fn grpc_request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(v) = self
            .auth
            .as_deref()
            .and_then(|a| tonic::metadata::MetadataValue::try_from(a).ok())
        {
            req.metadata_mut().insert("authorization", v);
        }
        req
    }

    /// The error of a gRPC status, in the HTTP API's terms; a broker that did not
    /// answer is forgotten (found again on the next call).
    fn grpc_error(&self, s: tonic::Status) -> MqError {
        use tonic::Code;
        let refused = |status: u16, code: &str| MqError::Refused {
            status,
            code: code.into(),
            message: s.message().to_owned(),
        };
        match s.code() {
            Code::InvalidArgument => refused(400, "invalid_argument"),
            Code::NotFound => refused(404, "not_found"),
            Code::AlreadyExists => refused(409, "conflict"),
            Code::FailedPrecondition => refused(409, "limit_reached"),
            Code::ResourceExhausted => refused(413, "too_large"),
            Code::Unauthenticated => refused(401, "unauthenticated"),
            Code::PermissionDenied => refused(403, "forbidden"),
            // UNAVAILABLE (the broker stopping, or no connection) and the rest: not
            // answered; the address is looked up again on the next call.
            _ => {
                *self.broker.lock() = None;
                *self.channel.lock() = None;
                MqError::Unreachable(format!("gRPC {:?}: {}", s.code(), s.message()))
            }
        }
    }

    /// Sends these credentials (HTTP basic to a node with a console login; user and
    /// password to a NATS server).
    pub fn with_login(mut self, user: &str, password: &str) -> MqClient {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        self.auth = Some(format!("Basic {token}"));
        #[cfg(feature = "nats")]
        {
            self.nats = self.nats.map(|n| n.with_login(user, password));
        }
        self
    }

    /// Which backend this client talks to: `"nats"` or `"http"`.
    pub fn backend(&self) -> &'static str {
        #[cfg(feature = "nats")]
        if self.nats.is_some() {
            return "nats";
        }
        "http"
    }

    async fn broker(&self) -> Result<String, MqError> {
        if let Some(f) = &self.fixed {
            if f.starts_with("nats://") || f.starts_with("tls://") {
                return Err(MqError::Invalid(format!(
                    "{f}: this build has no NATS backend (meshwork-sdk's feature `nats`)"
                )));
            }
            return Ok(f
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_owned());
        }
        if let Some(b) = self.broker.lock().clone() {
            return Ok(b);
        }
        let coord = self.coord.as_ref().ok_or(MqError::NoBroker)?;
        let (kvs, _) = coord.backend().get_prefix(NODES_PREFIX, 0).await?;
        let mut nodes: Vec<NodeInfo> = kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<NodeInfo>(&kv.value).ok())
            .filter(|n| n.roles.iter().any(|r| r == MQ_ROLE))
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let addr = nodes
            .first()
            .map(|n| n.http_addr.clone())
            .ok_or(MqError::NoBroker)?;
        *self.broker.lock() = Some(addr.clone());
        Ok(addr)
    }

    /// One request: (status, JSON body).
    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<(u16, Value), MqError> {
        let addr = self.broker().await?;
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(a) = &self.auth {
            req = req.header(http::header::AUTHORIZATION, a);
        }
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req = req
            .body(Full::new(bytes))
            .map_err(|e| MqError::Invalid(format!("invalid request {path:?}: {e}")))?;
        let exchange = async {
            let resp = self.http.request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
        };
        let forget = || *self.broker.lock() = None;
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok((status, body))) => {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                if status >= 400 {
                    let e = meshwork_api::ErrorBody::parse(&body);
                    return Err(MqError::Refused {
                        status,
                        code: e.as_ref().map(|e| e.code.clone()).unwrap_or_default(),
                        message: e.map_or_else(|| v.to_string(), |e| e.message),
                    });
                }
                Ok((status, v))
            }
            Ok(Err(e)) => {
                forget();
                Err(MqError::Unreachable(format!("{addr}: {e}")))
            }
            Err(_) => {
                forget();
                Err(MqError::Unreachable(format!(
                    "{addr}: no answer within {timeout:?}"
                )))
            }
        }
    }

    /// Creates a topic with `partitions` (a no-op when it exists with them).
    pub async fn create_topic(&self, topic: &str, partitions: u32) -> Result<(), MqError> {
        #[cfg(feature = "nats")]
        if let Some(n) = &self.nats {
            return n.create_topic(topic, partitions).await;
        }
        let path = format!("/v1/mq/topics/{}", enc(topic));
        self.call(
            http::Method::PUT,
            &path,
            Some(json!({ "partitions": partitions })),
            REQUEST_TIMEOUT,
        )
        .await
        .map(|_| ())
    }

    /// Creates a group with `settings` (see `PUT /v1/mq/topics/{topic}/groups/{group}`);
    /// one that exists keeps its settings.
    pub async fn ensure_group(
        &self,
        topic: &str,
        group: &str,
        settings: &Value,
    ) -> Result<Value, MqError> {
        #[cfg(feature = "nats")]
        if let Some(n) = &self.nats {
            return n.ensure_group(topic, group, settings).await;
        }
        let path = format!("/v1/mq/topics/{}/groups/{}", enc(topic), enc(group));
        match self
            .call(http::Method::GET, &path, None, REQUEST_TIMEOUT)
            .await
        {
            Ok((_, v)) => Ok(v),
            Err(MqError::Refused {
                status: 404, code, ..
            }) if code == "not_found" => {
                match self
                    .call(
                        http::Method::PUT,
                        &path,
                        Some(settings.clone()),
                        REQUEST_TIMEOUT,
                    )
                    .await
                {
                    Ok((_, v)) => Ok(v),
                    // Created meanwhile by another instance with other settings: use it.
                    Err(MqError::Refused { status: 409, .. }) => self
                        .call(http::Method::GET, &path, None, REQUEST_TIMEOUT)
                        .await
                        .map(|(_, v)| v),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Up to `limit` of the dead letters of `group` on `topic`, oldest first: the
    /// messages that failed every delivery (their offset is where they sit in the
    /// dead-letter topic; `delivery` counts the deliveries they had).
    pub async fn dead_letters(
        &self,
        topic: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<Received>, MqError> {
        #[cfg(feature = "nats")]
        if let Some(n) = &self.nats {
            return n.dead_letters(topic, group, limit).await;
        }
        let path = format!(
            "/v1/mq/topics/{}/groups/{}/dlq?limit={limit}",
            enc(topic),
            enc(group)
        );
        let (_, v) = self
            .call(http::Method::GET, &path, None, REQUEST_TIMEOUT)
            .await?;
        Ok(v["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Received::from_json)
            .map(Received::into_dead_letter)
            .collect())
    }

    /// Publishes up to `max` of `group`'s dead letters on `topic` to the topic again,
    /// with a fresh delivery count (after the cause is fixed); returns how many moved.
    pub async fn redrive(&self, topic: &str, group: &str, max: usize) -> Result<usize, MqError> {
        #[cfg(feature = "nats")]
        if let Some(n) = &self.nats {
            return n.redrive(topic, group, max).await;
        }
        let path = format!(
            "/v1/mq/topics/{}/groups/{}/dlq/redrive",
            enc(topic),
            enc(group)
        );
        let (_, v) = self
            .call(
                http::Method::POST,
                &path,
                Some(json!({ "max": max })),
                REQUEST_TIMEOUT,
            )
            .await?;
        Ok(v["moved"].as_u64().unwrap_or(0) as usize)
    }

    /// A publisher for `topic`.
    pub fn publisher(&self, topic: &str) -> Publisher {
        Publisher {
            client: self.clone(),
            topic: topic.to_owned(),
            queue: Arc::default(),
            active: Arc::default(),
        }
    }

    /// Runs `handler` for each message of `group` on `topic` until [`Subscription::shutdown`]:
    /// `Ok` acks the message, `Err` gives it back to be delivered again after a backoff
    /// (after the group's `max_deliveries` it goes to the dead letters). Creates the group
    /// (with `opts.group`) when it does not exist.
    pub async fn subscribe<H, F, E>(
        &self,
        topic: &str,
        group: &str,
        opts: SubscribeOptions,
        handler: H,
    ) -> Result<Subscription, MqError>
    where
        H: Fn(Received) -> F + Send + Sync + 'static,
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        if opts.concurrency == 0 || opts.concurrency > 1000 {
            return Err(MqError::Invalid(
                "concurrency must be between 1 and 1000".into(),
            ));
        }
        let (source, ack_wait) = self.source(topic, group, &opts).await?;
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let run = Runner {
            name: format!("{topic}/{group}"),
            source,
            opts,
            ack_wait,
            handler: Arc::new(handler),
        };
        let task = tokio::spawn(run.run(stop_rx));
        Ok(Subscription { stop, task })
    }

    /// Where a subscription's messages come from, and the group's ack wait.
    async fn source(
        &self,
        topic: &str,
        group: &str,
        opts: &SubscribeOptions,
    ) -> Result<(Source, Duration), MqError> {
        #[cfg(feature = "nats")]
        if let Some(n) = &self.nats {
            let (s, ack_wait) = n
                .source(topic, group, opts.consumer.as_deref(), &opts.group)
                .await?;
            return Ok((Source::Nats(Box::new(s)), ack_wait));
        }
        let info = self.ensure_group(topic, group, &opts.group).await?;
        let ack_wait =
            Duration::from_millis(info["config"]["ack_wait_ms"].as_u64().unwrap_or(30_000));
        Ok((
            Source::Stream(Box::new(StreamSource {
                client: self.clone(),
                topic: topic.to_owned(),
                group: group.to_owned(),
                base: format!("/v1/mq/topics/{}/groups/{}", enc(topic), enc(group)),
                consumer: opts.consumer.clone(),
                state: tokio::sync::Mutex::default(),
            })),
            ack_wait,
        ))
    }
}

/// Publishes to one topic. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Publisher {
    client: MqClient,
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    topic: String,
    /// Concurrent publishes waiting to go in one request (HTTP backend).
    queue: Arc<parking_lot::Mutex<Option<PublishQueue>>>,
    /// Publishes of this publisher (and its clones) not yet answered.
    active: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts one publish as active until dropped.
struct Active(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

type PublishQueue = tokio::sync::mpsc::UnboundedSender<(
    OutMessage,
    tokio::sync::oneshot::Sender<Result<Published, MqError>>,
)>;

impl Publisher {
    /// Publishes one message; answers once it is durable on the broker. Concurrent
    /// calls on one publisher (or its clones) share requests: while one request is
    /// out, the messages published meanwhile queue up and go together in the next
    /// (each still answered only once it is durable), as Kafka's producers batch.
    pub async fn publish(&self, msg: OutMessage) -> Result<Published, MqError> {
        // With span export on, the publish is a producer span (the consumer's parent).
        let Some(tracer) = crate::telemetry::tracer() else {
            return self.publish_inner(msg).await;
        };
        if msg.headers.contains_key("traceparent") {
            return self.publish_inner(msg).await;
        }
        let ctx =
            RequestContext::current().map_or_else(TraceContext::new_root, |c| c.trace.child());
        let mut msg = msg.header("traceparent", ctx.traceparent());
        msg.id = Some(msg.id.unwrap_or_else(random_id));
        let id = msg.id.unwrap_or_default();
        let wall = std::time::SystemTime::now();
        let result = self.publish_inner(msg).await;
        use meshwork_telemetry::export::{Kind, SpanRecord};
        let s = SpanRecord::new(
            &ctx,
            format!("publish {}", self.topic),
            Kind::Producer,
            wall,
        )
        .attr("messaging.system", "meshwork")
        .attr("messaging.operation.type", "send")
        .attr("messaging.destination.name", self.topic.as_str())
        .attr("messaging.message.id", id.to_string());
        tracer.record(match &result {
            Ok(p) => s
                .attr(
                    "messaging.destination.partition.id",
                    p.partition.to_string(),
                )
                .attr("meshwork.mq.offset", p.offset as i64)
                .attr("meshwork.mq.duplicate", p.duplicate),
            Err(e) => s.failed(e.to_string()),
        });
        result
    }

    async fn publish_inner(&self, msg: OutMessage) -> Result<Published, MqError> {
        #[cfg(feature = "nats")]
        if self.client.nats.is_some() {
            // The NATS client pipelines publishes on its one connection already.
            let mut r = self.publish_all(vec![msg]).await?;
            return r
                .pop()
                .ok_or_else(|| MqError::Unreachable("the broker answered no result".into()));
        }
        let before = self
            .active
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let _active = Active(self.active.clone());
        if before == 0 {
            // Nothing else of this publisher's is out: send it from this task (no
            // handoff to the queue's task and back), as one request.
            let mut r = self.publish_all(vec![msg]).await?;
            return r
                .pop()
                .ok_or_else(|| MqError::Unreachable("the broker answered no result".into()));
        }
        let queue = self
            .queue
            .lock()
            .get_or_insert_with(|| {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                tokio::spawn(publish_loop(self.unqueued(), rx));
                tx
            })
            .clone();
        // The caller's trace, taken here: the queue's task runs outside it.
        let mut msg = msg;
        msg.headers = msg.headers_with_trace();
        let (done, wait) = tokio::sync::oneshot::channel();
        if let Err(back) = queue.send((msg, done)) {
            // The queue's task just ended (idle): publish this one alone.
            *self.queue.lock() = None;
            let (msg, _) = back.0;
            let mut r = self.publish_all(vec![msg]).await?;
            return r
                .pop()
                .ok_or_else(|| MqError::Unreachable("the broker answered no result".into()));
        }
        wait.await
            .unwrap_or_else(|_| Err(MqError::Unreachable("the publish was not sent".into())))
    }

    /// This publisher without its queue (what the queue's task sends with).
    fn unqueued(&self) -> Publisher {
        Publisher {
            client: self.client.clone(),
            topic: self.topic.clone(),
            queue: Arc::default(),
            active: Arc::default(),
        }
    }

    /// Publishes messages in one request (at most 1000); answers once all are durable.
    /// A transient failure is retried (three attempts) with the same ids, so nothing is
    /// written twice.
    pub async fn publish_all(&self, msgs: Vec<OutMessage>) -> Result<Vec<Published>, MqError> {
        let msgs: Vec<(OutMessage, u64)> = msgs
            .into_iter()
            .map(|m| {
                let id = m.id.unwrap_or_else(random_id);
                (m, id)
            })
            .collect();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let sent = self.send(&msgs).await;
            match sent {
                Ok(published) => return Ok(published),
                Err(e) if e.is_transient() && attempt < 3 => {
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt.
    async fn send(&self, msgs: &[(OutMessage, u64)]) -> Result<Vec<Published>, MqError> {
        #[cfg(feature = "nats")]
        if let Some(n) = &self.client.nats {
            return n.publish_all(&self.topic, msgs).await;
        }
        // The node's broker over `/v1/mq/`: for a unary call, HTTP/1.1 with a JSON
        // body measured faster here than gRPC (0.16 vs 0.20 ms per publish alone;
        // BENCHMARKS.md), so the stream is kept for deliveries.
        let body = json!({
            "messages": msgs.iter().map(|(m, id)| m.to_json(*id)).collect::<Vec<_>>()
        });
        let path = format!("/v1/mq/topics/{}/messages", enc(&self.topic));
        let (_, v) = self
            .client
            .call(http::Method::POST, &path, Some(body), REQUEST_TIMEOUT)
            .await?;
        Ok(v["results"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| Published {
                partition: r["partition"].as_u64().unwrap_or(0) as u32,
                offset: r["offset"].as_u64().unwrap_or(0),
                duplicate: r["duplicate"].as_bool().unwrap_or(false),
            })
            .collect())
    }
}

/// Sends the queued publishes of one publisher in batches; ends after a minute
/// without any.
async fn publish_loop(
    publisher: Publisher,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(
        OutMessage,
        tokio::sync::oneshot::Sender<Result<Published, MqError>>,
    )>,
) {
    let mut held = None;
    let in_flight = Arc::new(tokio::sync::Semaphore::new(PUBLISH_IN_FLIGHT));
    loop {
        let first = match held.take() {
            Some(m) => m,
            None => match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
                Ok(Some(first)) => first,
                _ => return,
            },
        };
        // Wait for a free request slot with the first message in hand: what arrives
        // meanwhile joins its batch.
        let Ok(slot) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.0.body.len();
        let mut batch = vec![first];
        while batch.len() < PUBLISH_BATCH {
            match rx.try_recv() {
                Ok(next) if bytes + next.0.body.len() > PUBLISH_BATCH_BYTES => {
                    held = Some(next);
                    break;
                }
                Ok(next) => {
                    bytes += next.0.body.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        // Ids fixed now: the fallback below resends the same messages.
        let (msgs, waiters): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|(m, done)| {
                let id = m.id.unwrap_or_else(random_id);
                (m.id(id), done)
            })
            .unzip();
        tokio::spawn(send_batch(publisher.clone(), msgs, waiters, slot));
    }
}

/// Sends one coalesced batch and answers each of its publishers.
async fn send_batch(
    publisher: Publisher,
    msgs: Vec<OutMessage>,
    waiters: Vec<tokio::sync::oneshot::Sender<Result<Published, MqError>>>,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let n = msgs.len();
    match publisher.publish_all(msgs.clone()).await {
        Ok(results) if results.len() == n => {
            for (r, done) in results.into_iter().zip(waiters) {
                let _ = done.send(Ok(r));
            }
        }
        // One bad message refuses the whole request: publish each alone for its
        // own answer (same ids: nothing is written twice).
        Err(e) if n > 1 && !e.is_transient() => {
            for (m, done) in msgs.into_iter().zip(waiters) {
                let one = publisher.publish_all(vec![m]).await.and_then(|mut r| {
                    r.pop()
                        .ok_or_else(|| MqError::Unreachable("the broker answered no result".into()))
                });
                let _ = done.send(one);
            }
        }
        other => {
            let e = match other {
                Err(e) => e,
                Ok(r) => MqError::Unreachable(format!(
                    "the broker answered {} results for {n} messages",
                    r.len()
                )),
            };
            for done in waiters {
                let _ = done.send(Err(e.duplicate()));
            }
        }
    }
}

fn random_id() -> u64 {
    // 63 bits, never 0 (0 means "no id").
    (rand_u64() >> 1).max(1)
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS per process; mixing a counter and the time
    // gives distinct values per call without another dependency.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

fn enc(s: &str) -> String {
    meshwork_api::percent_encode(s)
}

/// A running subscription.
#[derive(Debug)]
pub struct Subscription {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscription {
    /// Stops taking messages, lets running handlers finish (up to the grace period)
    /// and gives back what is still running then.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

type Handler<F> = dyn Fn(Received) -> F + Send + Sync;

/// Where a subscription's messages come from.
enum Source {
    /// A node's broker: deliveries on a gRPC `Consume` stream, settled over `/v1/mq/`.
    Stream(Box<StreamSource>),
    /// A JetStream pull consumer.
    #[cfg(feature = "nats")]
    Nats(Box<nats::Source>),
}

/// One fetch's deliveries, handed out one at a time.
enum Fetched {
    /// From the subscription's stream, until it is quiet for the fetch wait.
    Stream,
    #[cfg(feature = "nats")]
    Nats(Box<nats::Batch>),
}

impl Source {
    /// Asks for up to `max` messages (waiting up to the fetch wait for the first).
    async fn fetch(&self, max: usize) -> Result<Fetched, MqError> {
        match self {
            Source::Stream(s) => {
                s.grant(max).await?;
                Ok(Fetched::Stream)
            }
            #[cfg(feature = "nats")]
            Source::Nats(s) => Ok(Fetched::Nats(Box::new(s.batch(max).await?))),
        }
    }

    /// Takes no more deliveries: the stream, if any, is closed.
    async fn close(&self) {
        if let Source::Stream(s) = self {
            s.close().await;
        }
    }

    /// The next delivery of `fetched` to run a handler on; `None` when it is over.
    async fn next(
        &self,
        fetched: &mut Fetched,
    ) -> Option<Result<Option<(Received, Settle)>, MqError>> {
        match (self, fetched) {
            (Source::Stream(s), Fetched::Stream) => s.next().await,
            #[cfg(feature = "nats")]
            (Source::Nats(s), Fetched::Nats(b)) => match b.next().await? {
                Err(e) => Some(Err(e)),
                Ok(m) => Some(Ok(s.take(m).await.map(|(r, d)| (r, Settle::Nats(d))))),
            },
            #[cfg(feature = "nats")]
            _ => None,
        }
    }
}

/// A subscription to a node's broker: one gRPC `Consume` stream (reopened when it
/// breaks) with credit for no more deliveries than there are free handlers; acks,
/// nacks and extensions go over `/v1/mq/` (acks batched per group, each answered).
struct StreamSource {
    client: MqClient,
    topic: String,
    group: String,
    base: String,
    consumer: Option<String>,
    state: tokio::sync::Mutex<StreamState>,
}

#[derive(Default)]
struct StreamState {
    /// The open stream: where requests go, and the deliveries.
    open: Option<(
        tokio::sync::mpsc::Sender<proto::ConsumeRequest>,
        tonic::Streaming<proto::ConsumeResponse>,
    )>,
    /// Credit granted and not yet used by a delivery.
    credit: u64,
    /// Deliveries received and not yet handed to a handler.
    pending: std::collections::VecDeque<proto::Delivery>,
}

impl StreamSource {
    /// Closes the stream and gives back at once what it delivered that no handler
    /// took (what was still on the wire comes back after its ack deadline).
    async fn close(&self) {
        let pending: Vec<proto::Delivery> = {
            let mut st = self.state.lock().await;
            st.open = None;
            st.pending.drain(..).collect()
        };
        if pending.is_empty() {
            return;
        }
        let positions: Vec<Value> = pending
            .iter()
            .map(|d| json!({ "partition": d.partition, "offset": d.offset }))
            .collect();
        let mut body = json!({ "messages": positions });
        if let Some(c) = &self.consumer {
            body["consumer"] = json!(c);
        }
        let path = format!("{}/nack", self.base);
        if let Err(e) = self
            .client
            .call(http::Method::POST, &path, Some(body), REQUEST_TIMEOUT)
            .await
        {
            tracing::debug!(error = %e, "giving back unstarted deliveries failed; they come back after their ack deadline");
        }
    }

    /// Opens the stream if it is not, and raises the credit so that what is
    /// granted or waiting covers `free` handlers.
    async fn grant(&self, free: usize) -> Result<(), MqError> {
        use proto::consume_request::Kind;
        let mut st = self.state.lock().await;
        if st.open.is_none() {
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            let subscribe = proto::Subscribe {
                topic: self.topic.clone(),
                group: self.group.clone(),
                consumer: self.consumer.clone().unwrap_or_default(),
                credit: 0,
            };
            let _ = tx
                .send(proto::ConsumeRequest {
                    kind: Some(Kind::Subscribe(subscribe)),
                })
                .await;
            let channel = self.client.channel().await?;
            let req = self
                .client
                .grpc_request(tokio_stream::wrappers::ReceiverStream::new(rx));
            let stream = tokio::time::timeout(
                REQUEST_TIMEOUT,
                proto::broker_client::BrokerClient::new(channel)
                    // A response holds up to 16 MiB of deliveries (the broker's fetch
                    // limit) plus framing: room for the largest.
                    .max_decoding_message_size(MAX_DELIVERY_BATCH_BYTES)
                    .consume(req),
            )
            .await
            .map_err(|_| MqError::Unreachable("no answer to Consume in time".into()))?
            .map_err(|s| self.client.grpc_error(s))?
            .into_inner();
            *st = StreamState {
                open: Some((tx, stream)),
                ..StreamState::default()
            };
        }
        let held = st.credit + st.pending.len() as u64;
        let more = (free as u64).saturating_sub(held);
        if more > 0 {
            let sent = match &st.open {
                Some((tx, _)) => tx
                    .send(proto::ConsumeRequest {
                        kind: Some(Kind::Credit(u32::try_from(more).unwrap_or(u32::MAX))),
                    })
                    .await
                    .is_ok(),
                None => false,
            };
            if !sent {
                st.open = None;
                return Err(MqError::Unreachable("the delivery stream closed".into()));
            }
            st.credit += more;
        }
        Ok(())
    }

    /// The next delivery: one received already, else the stream's next within the
    /// fetch wait (`None` when none came, or the stream ended).
    async fn next(&self) -> Option<Result<Option<(Received, Settle)>, MqError>> {
        let mut st = self.state.lock().await;
        if st.pending.is_empty() {
            // Nothing can come without credit: over, so the caller grants more as
            // its handlers free up.
            if st.credit == 0 {
                return None;
            }
            let (_, stream) = st.open.as_mut()?;
            match tokio::time::timeout(FETCH_WAIT, stream.message()).await {
                Err(_) => return None,
                Ok(Ok(Some(r))) => {
                    st.credit = st.credit.saturating_sub(r.deliveries.len() as u64);
                    st.pending.extend(r.deliveries);
                }
                Ok(Ok(None)) => {
                    st.open = None;
                    return None;
                }
                Ok(Err(s)) => {
                    st.open = None;
                    return Some(Err(self.client.grpc_error(s)));
                }
            }
        }
        let d = st.pending.pop_front()?;
        drop(st);
        let mut item = json!({ "messages": [{ "partition": d.partition, "offset": d.offset }] });
        if let Some(c) = &self.consumer {
            item["consumer"] = json!(c);
        }
        let settle = Settle::Http {
            client: self.client.clone(),
            base: self.base.clone(),
            item,
        };
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let msg = Received {
            partition: d.partition,
            offset: d.offset,
            delivery: d.delivery,
            id: d.id,
            key: text(&d.key),
            tag: d.tag,
            headers: d
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), text(v)))
                .collect(),
            body: d.body,
            publish_ms: d.publish_ms,
        };
        Some(Ok(Some((msg, settle))))
    }
}

/// How one delivery is settled.
#[derive(Clone)]
enum Settle {
    /// Over the node's `/v1/mq/` API; `item` is the settle request's body.
    Http {
        client: MqClient,
        base: String,
        item: Value,
    },
    /// On the JetStream message itself.
    #[cfg(feature = "nats")]
    Nats(nats::Delivery),
}

impl Settle {
    async fn extend(&self) -> Result<(), MqError> {
        match self {
            Settle::Http { client, base, item } => client
                .call(
                    http::Method::POST,
                    &format!("{base}/extend"),
                    Some(item.clone()),
                    REQUEST_TIMEOUT,
                )
                .await
                .map(|_| ()),
            #[cfg(feature = "nats")]
            Settle::Nats(d) => d.extend().await,
        }
    }

    async fn ack(&self) -> Result<(), MqError> {
        match self {
            Settle::Http { client, base, item } => {
                client.settler.ack(client, base, item.clone()).await
            }
            #[cfg(feature = "nats")]
            Settle::Nats(d) => d.ack().await,
        }
    }

    /// Gives the message back, deliverable again after `delay`; a failure of its last
    /// delivery sends it to the dead letters (the broker does this itself; on
    /// JetStream the SDK does).
    async fn nack(&self, delivery: u32, delay: Option<Duration>) -> Result<(), MqError> {
        match self {
            Settle::Http { client, base, item } => {
                let _ = delivery;
                let mut b = item.clone();
                if let Some(d) = delay {
                    b["delay_ms"] = json!(d.as_millis() as u64);
                }
                client
                    .call(
                        http::Method::POST,
                        &format!("{base}/nack"),
                        Some(b),
                        REQUEST_TIMEOUT,
                    )
                    .await
                    .map(|_| ())
            }
            #[cfg(feature = "nats")]
            Settle::Nats(d) => {
                if d.last_chance(delivery) {
                    d.dead_letter("max_deliveries").await;
                    Ok(())
                } else {
                    d.nack(delay).await
                }
            }
        }
    }
}

/// Acks over HTTP, batched per group: while one ack request is out, the acks that
/// arrive meanwhile queue up and go together in the next (at most [`SETTLE_BATCH`]).
#[derive(Clone, Default)]
struct Settler {
    queues: Arc<parking_lot::Mutex<std::collections::HashMap<String, AckQueue>>>,
}

type AckQueue =
    tokio::sync::mpsc::UnboundedSender<(Value, tokio::sync::oneshot::Sender<Result<(), MqError>>)>;

impl Settler {
    async fn ack(&self, client: &MqClient, base: &str, item: Value) -> Result<(), MqError> {
        let key = format!("{base}\n{}", item["consumer"].as_str().unwrap_or_default());
        let queue = self
            .queues
            .lock()
            .entry(key.clone())
            .or_insert_with(|| {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                tokio::spawn(ack_loop(
                    client.clone(),
                    format!("{base}/ack"),
                    item.get("consumer").cloned(),
                    rx,
                ));
                tx
            })
            .clone();
        let (done, wait) = tokio::sync::oneshot::channel();
        if let Err(back) = queue.send((item, done)) {
            // The queue's task just ended (idle): send this one alone.
            self.queues.lock().remove(&key);
            let (item, _) = back.0;
            return client
                .call(
                    http::Method::POST,
                    &format!("{base}/ack"),
                    Some(item),
                    REQUEST_TIMEOUT,
                )
                .await
                .map(|_| ());
        }
        wait.await
            .unwrap_or_else(|_| Err(MqError::Unreachable("the ack was not sent".into())))
    }
}

/// Sends the queued acks of one group in batches; ends after a minute without any.
async fn ack_loop(
    client: MqClient,
    path: String,
    consumer: Option<Value>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(
        Value,
        tokio::sync::oneshot::Sender<Result<(), MqError>>,
    )>,
) {
    loop {
        let first = match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(first)) => first,
            // Idle or closed: new acks make a new queue (or go alone).
            _ => return,
        };
        let mut batch = vec![first];
        while batch.len() < SETTLE_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let items: Vec<Value> = batch
            .iter()
            .flat_map(|(item, _)| item["messages"].as_array().cloned().unwrap_or_default())
            .collect();
        let mut body = json!({ "messages": items });
        if let Some(c) = &consumer {
            body["consumer"] = c.clone();
        }
        let r = client
            .call(http::Method::POST, &path, Some(body), REQUEST_TIMEOUT)
            .await;
        match r {
            Ok(_) => {
                for (_, done) in batch {
                    let _ = done.send(Ok(()));
                }
            }
            // One bad item refuses the whole request: settle each alone for its own answer.
            Err(e) if batch.len() > 1 && !e.is_transient() => {
                for (item, done) in batch {
                    let one = client
                        .call(http::Method::POST, &path, Some(item), REQUEST_TIMEOUT)
                        .await
                        .map(|_| ());
                    let _ = done.send(one);
                }
            }
            Err(e) => {
                for (_, done) in batch {
                    let _ = done.send(Err(e.duplicate()));
                }
            }
        }
    }
}

/// A subscription's fetch loop.
struct Runner<F> {
    name: String,
    source: Source,
    opts: SubscribeOptions,
    ack_wait: Duration,
    handler: Arc<Handler<F>>,
}

impl<F, E> Runner<F>
where
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let sem = Arc::new(tokio::sync::Semaphore::new(self.opts.concurrency));
        let mut running = tokio::task::JoinSet::new();
        let mut backoff = Duration::from_millis(100);
        'fetching: while !*stop.borrow() {
            // Take no more than there are free handlers.
            let free = sem.available_permits();
            if free == 0 {
                tokio::select! {
                    p = sem.clone().acquire_owned() => drop(p),
                    _ = stop.changed() => {}
                    Some(_) = running.join_next() => {}
                }
                continue;
            }
            let fetched = tokio::select! {
                r = self.source.fetch(free) => r,
                _ = stop.changed() => break,
            };
            let mut fetched = match fetched {
                Ok(f) => {
                    backoff = Duration::from_millis(100);
                    f
                }
                Err(e) => {
                    tracing::warn!(subscription = %self.name, error = %e, "fetch failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    n = self.source.next(&mut fetched) => n,
                    _ = stop.changed() => break 'fetching,
                };
                let (msg, settle) = match next {
                    None => break,
                    Some(Ok(Some(d))) => d,
                    Some(Ok(None)) => continue,
                    Some(Err(e)) => {
                        tracing::warn!(subscription = %self.name, error = %e, "a fetch broke off");
                        break;
                    }
                };
                let Ok(permit) = sem.clone().acquire_owned().await else {
                    break 'fetching;
                };
                let job = Job {
                    name: self.name.clone(),
                    settle,
                    ack_wait: self.ack_wait,
                    retry_initial: self.opts.retry_initial,
                    retry_max: self.opts.retry_max,
                };
                let fut = (self.handler)(msg.clone());
                running.spawn(async move {
                    job.handle(msg, fut).await;
                    drop(permit);
                });
                while running.try_join_next().is_some() {}
            }
        }
        // Shutdown: no more deliveries (so none given back below goes out on this
        // subscription's stream again); running handlers get the grace period; the
        // rest are given back.
        self.source.close().await;
        let grace = tokio::time::sleep(self.opts.shutdown_grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                next = running.join_next() => if next.is_none() { return },
                _ = &mut grace => break,
            }
        }
        running.abort_all();
        while running.join_next().await.is_some() {}
    }
}

/// What one handler task needs to settle its message.
struct Job {
    name: String,
    settle: Settle,
    ack_wait: Duration,
    retry_initial: Duration,
    retry_max: Duration,
}

impl Job {
    async fn handle<E: std::fmt::Display>(
        self,
        msg: Received,
        fut: impl Future<Output = Result<(), E>>,
    ) {
        // Given back at once if this task is aborted (shutdown past its grace).
        let guard = GiveBack {
            settle: Some(self.settle.clone()),
            delivery: msg.delivery,
        };
        let ctx = RequestContext {
            trace: msg
                .headers
                .get("traceparent")
                // `parse` continues the publisher's trace with a new span: the
                // consumer's, whose parent is the producer's span.
                .and_then(|t| TraceContext::parse(t))
                .unwrap_or_else(TraceContext::new_root),
            deadline: None,
        };
        let span = crate::telemetry::tracer()
            .map(|t| (t, ctx.trace.clone(), std::time::SystemTime::now()));
        // Keep the message while the handler works: extend at half the ack wait.
        let every = (self.ack_wait / 2).max(Duration::from_millis(50));
        let work = ctx.scope(fut);
        tokio::pin!(work);
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                _ = tokio::time::sleep(every) => {
                    if let Err(e) = self.settle.extend().await {
                        tracing::debug!(error = %e, "extending a delivery failed");
                    }
                }
            }
        };
        if let Some((t, trace, wall)) = span {
            use meshwork_telemetry::export::{Kind, SpanRecord};
            let s = SpanRecord::new(
                &trace,
                format!("process {}", self.name),
                Kind::Consumer,
                wall,
            )
            .attr("messaging.system", "meshwork")
            .attr("messaging.operation.type", "process")
            .attr("messaging.consumer.group.name", self.name.as_str())
            .attr(
                "messaging.destination.partition.id",
                msg.partition.to_string(),
            )
            .attr("messaging.message.id", msg.id.to_string())
            .attr("meshwork.mq.offset", msg.offset as i64)
            .attr("meshwork.mq.delivery", msg.delivery);
            t.record(match &result {
                Ok(()) => s,
                Err(e) => s.failed(e.to_string()),
            });
        }
        let delay = match result {
            Ok(()) => None,
            Err(e) => {
                let shift = msg.delivery.saturating_sub(1).min(20);
                let delay = self
                    .retry_initial
                    .saturating_mul(1u32 << shift)
                    .min(self.retry_max);
                tracing::warn!(subscription = %self.name, partition = msg.partition, offset = msg.offset, delivery = msg.delivery, error = %e, retry_in_ms = delay.as_millis() as u64, "handler failed; the message is given back");
                Some(delay)
            }
        };
        // Settle, retrying briefly: an ack that never arrives means a redelivery.
        for attempt in 0..3u32 {
            let r = match delay {
                None => self.settle.ack().await,
                Some(d) => self.settle.nack(msg.delivery, Some(d)).await,
            };
            match r {
                Ok(()) => break,
                Err(e) if e.is_transient() && attempt < 2 => {
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                Err(e) => {
                    tracing::warn!(subscription = %self.name, error = %e, "settling a delivery failed; it is delivered again after its ack deadline");
                    break;
                }
            }
        }
        guard.disarm();
    }
}

/// Gives a message back (nack, no delay) when dropped armed: a handler aborted at
/// shutdown does not hold its message until the ack deadline.
struct GiveBack {
    settle: Option<Settle>,
    delivery: u32,
}

impl GiveBack {
    fn disarm(mut self) {
        self.settle = None;
    }
}

impl Drop for GiveBack {
    fn drop(&mut self) {
        if let Some(settle) = self.settle.take() {
            let delivery = self.delivery;
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    // Not the handler's failure: never a dead letter for this.
                    let _ = match &settle {
                        Settle::Http { .. } => settle.nack(delivery, None).await,
                        #[cfg(feature = "nats")]
                        Settle::Nats(d) => d.nack(None).await,
                    };
                });
            }
        }
    }
}
