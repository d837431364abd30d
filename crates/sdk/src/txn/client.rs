//! Starting and following transactions from a service: [`TxnClient`]
//! finds the live nodes that run the `txn` role in the control plane's
//! membership (`/meshwork/nodes/`), and calls their `/v1/txn/` API, trying the
//! next node when one does not answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use meshwork_coord::CoordClient;
use meshwork_coord::nodes::{NODES_PREFIX, NodeInfo};
use serde_json::{Value, json};

/// The membership role of transaction coordinators.
pub const TXN_ROLE: &str = "txn";
/// Deadline of one request to a node (a wait adds its own time).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time left for a wait's answer to arrive after the node stops waiting.
const ANSWER_SLACK: Duration = Duration::from_secs(1);
/// Longest wait one [`TxnClient::wait`] asks a node for (the API's limit).
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// Why a transaction request failed.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// No live node runs the `txn` role.
    #[error("no live node runs the txn role (start one with --roles ...,txn)")]
    NoCoordinator,
    /// A transaction with this id exists already (starting is idempotent:
    /// the existing one goes on).
    #[error("transaction {0} already exists")]
    Exists(String),
    /// No transaction has this id.
    #[error("no transaction {0}")]
    NotFound(String),
    /// The node refused the request; its error message says why.
    #[error("{status}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The error envelope's message.
        message: String,
    },
    /// No node answered.
    #[error("no txn node answered: {0}")]
    Unreachable(String),
    /// The control plane failed.
    #[error(transparent)]
    Coord(#[from] meshwork_coord::CoordError),
}

/// Starts and follows transactions. Cheap to clone.
#[derive(Clone)]
pub struct TxnClient {
    coord: CoordClient,
    http: Client<HttpConnector, Full<Bytes>>,
    next: Arc<AtomicUsize>,
    auth: Option<String>,
    /// The `txn` nodes' addresses and when they were read (re-read after
    /// [`MEMBERSHIP_TTL`], or at once after a request found no node).
    members: Arc<parking_lot::Mutex<Option<Members>>>,
}

/// The `txn` nodes' HTTP addresses, and when they were read.
type Members = (tokio::time::Instant, Vec<String>);

/// How long the membership read is reused: a node that died is tried at
/// most this long after (and skipped as soon as it does not answer).
pub const MEMBERSHIP_TTL: Duration = Duration::from_secs(1);

impl std::fmt::Debug for TxnClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxnClient").finish_non_exhaustive()
    }
}

impl TxnClient {
    /// A client over `coord`'s membership.
    pub fn new(coord: CoordClient) -> TxnClient {
        TxnClient {
            coord,
            http: Client::builder(TokioExecutor::new()).build_http(),
            next: Arc::new(AtomicUsize::new(0)),
            auth: None,
            members: Arc::default(),
        }
    }

    /// Sends these credentials (HTTP basic) — needed when the nodes have a
    /// console login configured.
    pub fn with_login(mut self, user: &str, password: &str) -> TxnClient {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        self.auth = Some(format!("Basic {token}"));
        self
    }

    /// The HTTP addresses of the live `txn` nodes, rotated so calls spread,
    /// with `first` (when it is one of them) in front.
    async fn nodes(&self, first: Option<&str>) -> Result<Vec<String>, TxnError> {
        let cached = self
            .members
            .lock()
            .as_ref()
            .filter(|(at, _)| at.elapsed() < MEMBERSHIP_TTL)
            .map(|(_, addrs)| addrs.clone());
        let mut addrs = match cached {
            Some(a) => a,
            None => {
                let (kvs, _) = self.coord.backend().get_prefix(NODES_PREFIX, 0).await?;
                let addrs: Vec<String> = kvs
                    .iter()
                    .filter_map(|kv| serde_json::from_slice::<NodeInfo>(&kv.value).ok())
                    .filter(|n| n.roles.iter().any(|r| r == TXN_ROLE))
                    .map(|n| n.http_addr)
                    .collect();
                *self.members.lock() = Some((tokio::time::Instant::now(), addrs.clone()));
                addrs
            }
        };
        if addrs.is_empty() {
            return Err(TxnError::NoCoordinator);
        }
        let n = addrs.len();
        addrs.rotate_left(self.next.fetch_add(1, Ordering::Relaxed) % n);
        if let Some(i) = first.and_then(|f| addrs.iter().position(|a| a == f)) {
            addrs[..=i].rotate_right(1);
        }
        Ok(addrs)
    }

    /// One request to the first node that answers: (status, JSON body).
    /// `path_for(remaining)` is the path to ask with `remaining` of `budget`
    /// left (a wait asks a node for no more than that).
    async fn call(
        &self,
        method: http::Method,
        path_for: impl Fn(Duration) -> String,
        body: Option<Value>,
        budget: Duration,
        first: Option<&str>,
    ) -> Result<(String, u16, Value), TxnError> {
        let deadline = tokio::time::Instant::now() + budget;
        let mut last = String::new();
        for addr in self.nodes(first).await? {
            let timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
            if timeout.is_zero() {
                last = format!("{last}; no time left to ask {addr}");
                break;
            }
            let path = path_for(timeout);
            let mut req = http::Request::builder()
                .method(method.clone())
                .uri(format!("http://{addr}{path}"))
                .header(http::header::CONTENT_TYPE, "application/json");
            if let Some(a) = &self.auth {
                req = req.header(http::header::AUTHORIZATION, a);
            }
            let bytes = body
                .as_ref()
                .map(|b| Bytes::from(b.to_string()))
                .unwrap_or_default();
            let Ok(mut req) = req.body(Full::new(bytes)) else {
                return Err(TxnError::Refused {
                    status: 400,
                    message: format!("invalid request path {path:?}"),
                });
            };
            // The transaction continues the caller's trace: its branch calls
            // are children of this request.
            let span = crate::context::stamp(&mut req);
            let wall = std::time::SystemTime::now();
            let exchange = async {
                let resp = self.http.request(req).await?;
                let status = resp.status().as_u16();
                let body = resp.into_body().collect().await?.to_bytes();
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
            };
            let result = tokio::time::timeout(timeout, exchange).await;
            if let Some(t) = crate::telemetry::tracer() {
                use meshwork_telemetry::export::{Kind, SpanRecord};
                let s =
                    SpanRecord::new(&span, format!("{method} meshwork-txn"), Kind::Client, wall)
                        .attr("http.request.method", method.as_str())
                        .attr("server.address", addr.as_str())
                        .attr("url.path", path.as_str());
                t.record(match &result {
                    Ok(Ok((status, _))) if *status >= 400 => s
                        .attr("http.response.status_code", *status)
                        .failed(format!("HTTP {status}")),
                    Ok(Ok((status, _))) => s.attr("http.response.status_code", *status),
                    Ok(Err(e)) => s.failed(e.to_string()),
                    Err(_) => s.failed("no answer in time"),
                });
            }
            match result {
                Ok(Ok((status, body))) => {
                    let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    return Ok((addr, status, v));
                }
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: no answer within {timeout:?}"),
            }
        }
        // Re-read the membership next time: the nodes read may be gone.
        *self.members.lock() = None;
        Err(TxnError::Unreachable(last))
    }

    /// Starts a transaction from its definition (`spec`: a [`super::Spec`],
    /// or its JSON as in `POST /v1/txn`); `id` is generated when `None`. Durable when this returns:
    /// the transaction finishes whatever happens to the caller. The record.
    pub async fn start(
        &self,
        id: Option<&str>,
        spec: impl serde::Serialize,
    ) -> Result<Value, TxnError> {
        let id = id.map_or_else(new_id, str::to_owned);
        self.start_on(&id, spec).await.map(|(_, v)| v)
    }

    /// Starts a transaction, then waits up to `max` for it to be final, on
    /// the node that started it when it can (that node drives it and
    /// answers the moment it finishes). The record, final or not.
    pub async fn start_and_wait(
        &self,
        id: Option<&str>,
        spec: impl serde::Serialize,
        max: Duration,
    ) -> Result<Value, TxnError> {
        let id = id.map_or_else(new_id, str::to_owned);
        match self.start_on(&id, spec).await {
            Ok((addr, _)) => self.wait_on(&id, max, Some(&addr)).await,
            // Our own start, resent to another node after the first stored it
            // without answering (or an earlier start of this id): follow it.
            Err(TxnError::Exists(_)) => self.wait_on(&id, max, None).await,
            Err(e) => Err(e),
        }
    }

    async fn start_on(
        &self,
        id: &str,
        spec: impl serde::Serialize,
    ) -> Result<(String, Value), TxnError> {
        let spec = serde_json::to_value(spec).map_err(|e| TxnError::Refused {
            status: 400,
            message: format!("the definition does not serialize: {e}"),
        })?;
        // The id is chosen here, not by the node: a start resent to another
        // node after no answer (the first may have stored it) is then
        // refused as `Exists` instead of creating a second transaction.
        let body = json!({ "spec": spec, "id": id });
        let (addr, status, v) = self
            .call(
                http::Method::POST,
                |_| "/v1/txn".to_owned(),
                Some(body),
                REQUEST_TIMEOUT,
                None,
            )
            .await?;
        match status {
            201 => Ok((addr, v)),
            409 => Err(TxnError::Exists(id.to_owned())),
            _ => Err(refused(status, &v)),
        }
    }

    /// The transaction's record, once final or after `max` (at most
    /// [`MAX_WAIT`]), whichever comes first.
    pub async fn wait(&self, id: &str, max: Duration) -> Result<Value, TxnError> {
        self.wait_on(id, max, None).await
    }

    async fn wait_on(
        &self,
        id: &str,
        max: Duration,
        first: Option<&str>,
    ) -> Result<Value, TxnError> {
        let max = max.min(MAX_WAIT);
        let segment = meshwork_txn::path_segment(id);
        // One deadline over every node tried: each is asked to wait only for
        // what is left, less a second for its answer to arrive.
        let path_for = |left: Duration| {
            let wait = left.saturating_sub(ANSWER_SLACK).min(max);
            format!("/v1/txn/{segment}?wait_ms={}", wait.as_millis())
        };
        let (_, status, v) = self
            .call(http::Method::GET, path_for, None, max + ANSWER_SLACK, first)
            .await?;
        match status {
            200 => Ok(v),
            404 => Err(TxnError::NotFound(id.to_owned())),
            _ => Err(refused(status, &v)),
        }
    }
}

/// What a two-phase-commit participant in doubt should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The transaction decided to commit.
    Commit,
    /// It decided to abort, or has no record (presumed abort).
    Abort,
    /// It is still in its first phase: ask again later.
    Pending,
}

impl TxnClient {
    /// The verdict on transaction `id` for a participant in doubt.
    pub async fn verdict(&self, id: &str) -> Result<Verdict, TxnError> {
        let path = format!("/v1/txn/{}/verdict", meshwork_txn::path_segment(id));
        let (_, status, v) = self
            .call(
                http::Method::GET,
                |_| path.clone(),
                None,
                REQUEST_TIMEOUT,
                None,
            )
            .await?;
        match (status, v["verdict"].as_str()) {
            (200, Some("commit")) => Ok(Verdict::Commit),
            (200, Some("abort")) => Ok(Verdict::Abort),
            (200, Some("pending")) => Ok(Verdict::Pending),
            _ => Err(refused(status, &v)),
        }
    }
}

/// A new transaction id: the creation time and 64 random bits (ids sort by
/// age), as the nodes make them.
fn new_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(ms);
    format!("{ms:012x}-{:016x}", h.finish())
}

fn refused(status: u16, v: &Value) -> TxnError {
    TxnError::Refused {
        status,
        message: v["error"]["message"]
            .as_str()
            .unwrap_or("no error message")
            .to_owned(),
    }
}
