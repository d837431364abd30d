//! Messaging from a service: [`MqClient::publisher`] publishes to a topic,
//! [`MqClient::subscribe`] runs a handler for each message of a consumer group
//! (with bounded concurrency, retries through nack with backoff, ack-deadline
//! extension while a handler works, and graceful shutdown). The trace context
//! travels in the `traceparent` header: a handler runs in the publisher's trace.
//!
//! The backend is the broker of a node with the `mq` role, over its `/v1/mq/`
//! API: the one named by `MESHWORK_MQ` (`http://HOST:PORT`), else the first
//! (by name) live `mq` node in the control plane's membership, so every service
//! of a cluster uses the same broker.

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

/// The membership role of nodes that run the broker.
pub const MQ_ROLE: &str = "mq";
/// Deadline of one request to the broker (a long poll adds its wait).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one fetch waits for a message.
const FETCH_WAIT: Duration = Duration::from_secs(10);

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
        let mut headers = self.headers.clone();
        // The publisher's trace: a child of the request being handled, if any.
        if !headers.contains_key("traceparent") {
            let trace =
                RequestContext::current().map_or_else(TraceContext::new_root, |c| c.trace.child());
            headers.insert("traceparent".into(), trace.traceparent());
        }
        m["headers"] = json!(headers);
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
        MqClient {
            coord: Some(coord),
            fixed,
            http: Client::builder(TokioExecutor::new()).build_http(),
            auth: None,
            broker: Arc::default(),
        }
    }

    /// A client for the broker at `addr` (`HOST:PORT` or `http://HOST:PORT`).
    pub fn at(addr: &str) -> MqClient {
        MqClient {
            coord: None,
            fixed: Some(addr.to_owned()),
            http: Client::builder(TokioExecutor::new()).build_http(),
            auth: None,
            broker: Arc::default(),
        }
    }

    /// Sends these credentials (HTTP basic), for nodes with a console login.
    pub fn with_login(mut self, user: &str, password: &str) -> MqClient {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        self.auth = Some(format!("Basic {token}"));
        self
    }

    async fn broker(&self) -> Result<String, MqError> {
        if let Some(f) = &self.fixed {
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

    /// A publisher for `topic`.
    pub fn publisher(&self, topic: &str) -> Publisher {
        Publisher {
            client: self.clone(),
            path: format!("/v1/mq/topics/{}/messages", enc(topic)),
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
        let info = self.ensure_group(topic, group, &opts.group).await?;
        let ack_wait =
            Duration::from_millis(info["config"]["ack_wait_ms"].as_u64().unwrap_or(30_000));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let base = format!("/v1/mq/topics/{}/groups/{}", enc(topic), enc(group));
        let run = Runner {
            client: self.clone(),
            base,
            opts,
            ack_wait,
            handler: Arc::new(handler),
        };
        let task = tokio::spawn(run.run(stop_rx));
        Ok(Subscription { stop, task })
    }
}

/// Publishes to one topic. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Publisher {
    client: MqClient,
    path: String,
}

impl Publisher {
    /// Publishes one message; answers once it is durable on the broker.
    pub async fn publish(&self, msg: OutMessage) -> Result<Published, MqError> {
        let mut r = self.publish_all(vec![msg]).await?;
        r.pop()
            .ok_or_else(|| MqError::Unreachable("the broker answered no result".into()))
    }

    /// Publishes messages in one request (at most 1000); answers once all are durable.
    /// A transient failure is retried (three attempts) with the same ids, so nothing is
    /// written twice.
    pub async fn publish_all(&self, msgs: Vec<OutMessage>) -> Result<Vec<Published>, MqError> {
        let body = json!({
            "messages": msgs.iter().map(|m| m.to_json(m.id.unwrap_or_else(random_id))).collect::<Vec<_>>()
        });
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self
                .client
                .call(
                    http::Method::POST,
                    &self.path,
                    Some(body.clone()),
                    REQUEST_TIMEOUT,
                )
                .await
            {
                Ok((_, v)) => {
                    return Ok(v["results"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|r| Published {
                            partition: r["partition"].as_u64().unwrap_or(0) as u32,
                            offset: r["offset"].as_u64().unwrap_or(0),
                            duplicate: r["duplicate"].as_bool().unwrap_or(false),
                        })
                        .collect());
                }
                Err(e) if e.is_transient() && attempt < 3 => {
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                Err(e) => return Err(e),
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

struct Runner<F> {
    client: MqClient,
    base: String,
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
        let fetch_path = format!("{}/fetch", self.base);
        while !*stop.borrow() {
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
            let mut body =
                json!({ "max": free.min(1000), "wait_ms": FETCH_WAIT.as_millis() as u64 });
            if let Some(c) = &self.opts.consumer {
                body["consumer"] = json!(c);
            }
            let fetched = tokio::select! {
                r = self.client.call(http::Method::POST, &fetch_path, Some(body), REQUEST_TIMEOUT + FETCH_WAIT) => r,
                _ = stop.changed() => break,
            };
            let msgs = match fetched {
                Ok((_, v)) => {
                    backoff = Duration::from_millis(100);
                    v["messages"].as_array().cloned().unwrap_or_default()
                }
                Err(e) => {
                    tracing::warn!(subscription = %self.base, error = %e, "fetch failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            for m in msgs {
                let Some(msg) = Received::from_json(&m) else {
                    tracing::warn!(subscription = %self.base, "a delivery the SDK cannot read; it comes back after its ack deadline");
                    continue;
                };
                let Ok(permit) = sem.clone().acquire_owned().await else {
                    break;
                };
                let job = Job {
                    consumer: self.opts.consumer.clone(),
                    client: self.client.clone(),
                    base: self.base.clone(),
                    ack_wait: self.ack_wait,
                    retry_initial: self.opts.retry_initial,
                    retry_max: self.opts.retry_max,
                };
                let fut = (self.handler)(msg.clone());
                running.spawn(async move {
                    job.handle(msg, fut).await;
                    drop(permit);
                });
            }
            while running.try_join_next().is_some() {}
        }
        // Shutdown: running handlers get the grace period; the rest are given back.
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
    consumer: Option<String>,
    client: MqClient,
    base: String,
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
        let mut item =
            json!({ "messages": [{ "partition": msg.partition, "offset": msg.offset }] });
        if let Some(c) = &self.consumer {
            item["consumer"] = json!(c);
        }
        // Given back at once if this task is aborted (shutdown past its grace).
        let guard = GiveBack {
            client: Some(self.client.clone()),
            path: format!("{}/nack", self.base),
            item: item.clone(),
        };
        let ctx = RequestContext {
            trace: msg
                .headers
                .get("traceparent")
                .and_then(|t| TraceContext::parse(t))
                .map_or_else(TraceContext::new_root, |t| t.child()),
            deadline: None,
        };
        // Keep the message while the handler works: extend at half the ack wait.
        let every = (self.ack_wait / 2).max(Duration::from_millis(50));
        let extend_path = format!("{}/extend", self.base);
        let work = ctx.scope(fut);
        tokio::pin!(work);
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                _ = tokio::time::sleep(every) => {
                    if let Err(e) = self.client.call(http::Method::POST, &extend_path, Some(item.clone()), REQUEST_TIMEOUT).await {
                        tracing::debug!(error = %e, "extending a delivery failed");
                    }
                }
            }
        };
        let (path, body) = match result {
            Ok(()) => (format!("{}/ack", self.base), item),
            Err(e) => {
                let shift = msg.delivery.saturating_sub(1).min(20);
                let delay = self
                    .retry_initial
                    .saturating_mul(1u32 << shift)
                    .min(self.retry_max);
                tracing::warn!(subscription = %self.base, partition = msg.partition, offset = msg.offset, delivery = msg.delivery, error = %e, retry_in_ms = delay.as_millis() as u64, "handler failed; the message is given back");
                let mut b = item;
                b["delay_ms"] = json!(delay.as_millis() as u64);
                (format!("{}/nack", self.base), b)
            }
        };
        // Settle, retrying briefly: an ack that never arrives means a redelivery.
        for attempt in 0..3u32 {
            match self
                .client
                .call(
                    http::Method::POST,
                    &path,
                    Some(body.clone()),
                    REQUEST_TIMEOUT,
                )
                .await
            {
                Ok(_) => break,
                Err(e) if e.is_transient() && attempt < 2 => {
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                Err(e) => {
                    tracing::warn!(subscription = %self.base, error = %e, "settling a delivery failed; it is delivered again after its ack deadline");
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
    client: Option<MqClient>,
    path: String,
    item: Value,
}

impl GiveBack {
    fn disarm(mut self) {
        self.client = None;
    }
}

impl Drop for GiveBack {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let (path, item) = (std::mem::take(&mut self.path), self.item.take());
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = client
                        .call(http::Method::POST, &path, Some(item), REQUEST_TIMEOUT)
                        .await;
                });
            }
        }
    }
}
