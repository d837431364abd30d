//! The runner: drives one transaction's record through the machine, with
//! the log in the store and the branch calls over HTTP.
//!
//! Per step: apply the event, persist the record (compare-and-swap) if it
//! changed, and only then run the actions — so every decision is durable
//! before any call that depends on it. A write that loses the compare means
//! someone else advanced the record (an operator's abort, another
//! coordinator): the runner continues from their version. A store that fails
//! is waited out, then the record is read back and resumed (the unsaved
//! step's calls were never sent; calls in flight are sent again with the same
//! idempotency key). One transaction should have one driver at a time (the
//! node partitions transactions over its coordinators); two are safe — every
//! write is a compare-and-swap and every call idempotent — only wasteful.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use meshwork_coord::registry::{Filter, Registry, traffic_endpoints_now};
use meshwork_coord::rollout::tally::{Live, Splits};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::log::{LogError, Stored, TxnLog};
use crate::machine::{Action, Event, Millis, Outcome, Phase, Status, Txn};
use crate::{HEADER_BRANCH, HEADER_IDEMPOTENCY_KEY, HEADER_PHASE, HEADER_TXN};

/// Longest wait before re-reading the record after a store failure.
const STORE_RETRY_MAX: Duration = Duration::from_secs(5);
/// Most bytes of a failed call's answer kept as its error detail.
const DETAIL_BYTES: usize = 200;

/// The wall clock, in ms since the Unix epoch.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One branch call, with everything needed to send it.
#[derive(Debug, Clone)]
pub struct CallRequest {
    /// The transaction.
    pub txn: String,
    /// The branch's name.
    pub branch: String,
    /// Which call.
    pub phase: Phase,
    /// Attempt number.
    pub attempt: u32,
    /// The service to call.
    pub service: String,
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// JSON body.
    pub body: Option<serde_json::Value>,
    /// For a gRPC call: the request message (and `path` is the method).
    pub grpc: Option<Bytes>,
    /// The same for every attempt of this call.
    pub idempotency_key: String,
    /// Deadline of this attempt.
    pub timeout: Duration,
    /// The call's `traceparent`: a new span, child of the transaction's.
    pub traceparent: Option<String>,
    /// That span (its id is the one in `traceparent`, its parent the
    /// transaction's).
    pub trace: Option<meshwork_telemetry::TraceContext>,
}

impl CallRequest {
    /// The request for `phase` of `branch`, or None if the spec has no such call.
    pub fn of(txn: &Txn, branch: usize, phase: Phase, attempt: u32) -> Option<CallRequest> {
        let b = txn.spec.branches.get(branch)?;
        let call = match phase {
            Phase::Action => Some(&b.action),
            Phase::Confirm => b.confirm.as_ref(),
            Phase::Undo => b.undo.as_ref(),
        }?;
        let trace = txn
            .traceparent
            .as_deref()
            .and_then(meshwork_telemetry::TraceContext::parse);
        Some(CallRequest {
            txn: txn.id.clone(),
            branch: b.name.clone(),
            phase,
            attempt,
            service: b.service.clone(),
            method: call.method.clone(),
            path: call.path.clone(),
            body: call.body.clone(),
            grpc: call.grpc_message().map(Bytes::from),
            idempotency_key: txn.idempotency_key(branch, phase),
            timeout: Duration::from_millis(b.timeout_ms),
            traceparent: trace.as_ref().map(|span| span.traceparent()),
            trace,
        })
    }
}

/// Sends branch calls and classifies their answers.
pub trait Caller: Send + Sync + 'static {
    /// Sends `req` and says how it ended (never fails: failures are outcomes).
    fn call(&self, req: CallRequest) -> impl Future<Output = Outcome> + Send;
}

/// Where a service's instances are.
pub trait Endpoints: Send + Sync + 'static {
    /// The addresses taking traffic for `service` now (healthy first choice).
    fn endpoints(&self, service: &str) -> Vec<SocketAddr>;

    /// The same with each instance's version (what rollouts split by).
    fn versioned(&self, service: &str) -> Vec<(SocketAddr, Option<String>)> {
        self.endpoints(service)
            .into_iter()
            .map(|a| (a, None))
            .collect()
    }
}

impl Endpoints for Registry {
    fn endpoints(&self, service: &str) -> Vec<SocketAddr> {
        self.versioned(service)
            .into_iter()
            .map(|(a, _)| a)
            .collect()
    }

    fn versioned(&self, service: &str) -> Vec<(SocketAddr, Option<String>)> {
        let d = self.discover(
            service,
            &Filter {
                healthy: true,
                ..Filter::default()
            },
        );
        traffic_endpoints_now(&d)
            .into_iter()
            .map(|e| (e.addr, e.version))
            .collect()
    }
}

/// Fixed addresses per service (for services outside the registry).
#[derive(Debug, Clone, Default)]
pub struct StaticEndpoints(pub std::collections::HashMap<String, Vec<SocketAddr>>);

impl Endpoints for StaticEndpoints {
    fn endpoints(&self, service: &str) -> Vec<SocketAddr> {
        self.0.get(service).cloned().unwrap_or_default()
    }
}

/// Branch calls over HTTP/1.1 to the service's instances, round-robin, with
/// the transaction headers. Answers: 2xx done; 408, 429, 5xx and any answer
/// with `Retry-After` unknown (retried); other 4xx rejected; no answer
/// (refused, reset, timed out) unknown.
pub struct HttpCaller<E> {
    endpoints: E,
    client: Client<HttpConnector, Full<Bytes>>,
    /// HTTP/2 with prior knowledge, for gRPC calls.
    grpc: Client<HttpConnector, Full<Bytes>>,
    next: AtomicUsize,
    tracer: meshwork_telemetry::export::Tracer,
    /// The rollouts' splits branch calls follow and are counted in.
    splits: Option<Arc<Splits>>,
}

impl<E: Endpoints> HttpCaller<E> {
    /// A caller resolving services with `endpoints`.
    pub fn new(endpoints: E) -> HttpCaller<E> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        HttpCaller {
            endpoints,
            client: Client::builder(TokioExecutor::new()).build(connector.clone()),
            grpc: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
            next: AtomicUsize::new(0),
            tracer: meshwork_telemetry::export::Tracer::disabled(),
            splits: None,
        }
    }

    /// Sends each call to the version its service's rollout chooses (a
    /// retried call prefers the stable one), and counts it there.
    pub fn with_rollouts(mut self, splits: Arc<Splits>) -> Self {
        self.splits = Some(splits);
        self
    }

    /// Records a client span per branch call with `tracer`.
    pub fn with_tracer(mut self, tracer: meshwork_telemetry::export::Tracer) -> Self {
        self.tracer = tracer;
        self
    }

    async fn send(&self, req: &CallRequest) -> Outcome {
        let live = self
            .splits
            .as_ref()
            .and_then(|s| s.slot(&req.service).current());
        let start = tokio::time::Instant::now();
        let (out, version) = self.send_to_lane(req, live.as_deref()).await;
        if let (Some(live), Some(version)) = (&live, version) {
            let failed = matches!(out, Outcome::Unknown(_));
            live.record(live.is_new(version.as_deref()), failed, start.elapsed());
        }
        out
    }

    /// Sends `req` to an instance of the lane `live` chooses (any instance
    /// without a rollout or when the lane has none); the outcome and, when
    /// an instance was called, its version.
    async fn send_to_lane(
        &self,
        req: &CallRequest,
        live: Option<&Live>,
    ) -> (Outcome, Option<Option<String>>) {
        let all = self.endpoints.versioned(&req.service);
        if all.is_empty() {
            let out = Outcome::Unknown(format!("no instance of {} takes traffic", req.service));
            return (out, None);
        }
        let lane: Vec<&(SocketAddr, Option<String>)> = match live {
            Some(l) => {
                let new = l.wants_new(&http::HeaderMap::new(), req.attempt > 1);
                let v: Vec<_> = all
                    .iter()
                    .filter(|(_, ver)| l.is_new(ver.as_deref()) == new)
                    .collect();
                if v.is_empty() {
                    all.iter().collect()
                } else {
                    v
                }
            }
            None => all.iter().collect(),
        };
        let (addr, version) = lane[self.next.fetch_add(1, Ordering::Relaxed) % lane.len()].clone();
        (self.send_to(req, addr).await, Some(version))
    }

    async fn send_to(&self, req: &CallRequest, addr: SocketAddr) -> Outcome {
        let (body, content_type) = match &req.grpc {
            // One length-prefixed, uncompressed message.
            Some(message) => {
                let mut framed = Vec::with_capacity(5 + message.len());
                framed.push(0);
                framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
                framed.extend_from_slice(message);
                (Bytes::from(framed), "application/grpc")
            }
            None => (
                req.body
                    .as_ref()
                    .map(|b| Bytes::from(b.to_string()))
                    .unwrap_or_default(),
                "application/json",
            ),
        };
        let built = http::Request::builder()
            .method(req.method.as_str())
            .uri(format!("http://{addr}{}", req.path))
            .header(http::header::CONTENT_TYPE, content_type)
            .header(HEADER_TXN, &req.txn)
            .header(HEADER_BRANCH, &req.branch)
            .header(HEADER_PHASE, req.phase.as_str())
            .header(HEADER_IDEMPOTENCY_KEY, &req.idempotency_key);
        let built = match &req.traceparent {
            Some(tp) => built.header("traceparent", tp),
            None => built,
        };
        let built = if req.grpc.is_some() {
            built
                .header(http::header::TE, "trailers")
                .header("grpc-timeout", grpc_timeout(req.timeout))
        } else {
            built
        }
        .body(Full::new(body));
        let request = match built {
            Ok(r) => r,
            // Validated specs build valid requests; a bad one can never succeed.
            Err(e) => return Outcome::Rejected(format!("invalid request: {e}")),
        };
        let client = if req.grpc.is_some() {
            &self.grpc
        } else {
            &self.client
        };
        let exchange = async {
            let resp = client.request(request).await?;
            let (parts, body) = resp.into_parts();
            let collected = body.collect().await?;
            let trailers = collected.trailers().cloned();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((
                parts,
                trailers,
                collected.to_bytes(),
            ))
        };
        match tokio::time::timeout(req.timeout, exchange).await {
            Err(_) => Outcome::Unknown(format!("{addr}: no answer within {:?}", req.timeout)),
            Ok(Err(e)) => Outcome::Unknown(format!("{addr}: {e}")),
            Ok(Ok((parts, trailers, _))) if req.grpc.is_some() => {
                classify_grpc(parts.status, &parts.headers, trailers.as_ref())
            }
            Ok(Ok((parts, _, body))) => classify(parts.status, &parts.headers, &body),
        }
    }
}

impl<E: Endpoints> Caller for HttpCaller<E> {
    async fn call(&self, req: CallRequest) -> Outcome {
        let wall = std::time::SystemTime::now();
        let out = self.send(&req).await;
        if self.tracer.enabled()
            && let Some(ctx) = &req.trace
        {
            use meshwork_telemetry::export::{Kind, SpanRecord};
            let s = SpanRecord::new(
                ctx,
                format!("{} {}", req.phase.as_str(), req.branch),
                Kind::Client,
                wall,
            )
            .attr("meshwork.txn.id", req.txn.as_str())
            .attr("meshwork.txn.branch", req.branch.as_str())
            .attr("meshwork.txn.phase", req.phase.as_str())
            .attr("meshwork.attempt", req.attempt)
            .attr("server.address", req.service.as_str())
            .attr("http.request.method", req.method.as_str());
            self.tracer.record(match &out {
                Outcome::Done => s,
                Outcome::Rejected(d) => {
                    s.attr("meshwork.txn.outcome", "rejected").failed(d.clone())
                }
                Outcome::Unknown(d) => s.attr("meshwork.txn.outcome", "unknown").failed(d.clone()),
            });
        }
        out
    }
}

/// A `grpc-timeout` value: at most 8 digits, so milliseconds up to ~27
/// hours and seconds beyond.
fn grpc_timeout(d: Duration) -> String {
    match d.as_millis() {
        ms @ 0..=99_999_999 => format!("{ms}m"),
        _ => format!("{}S", d.as_secs().min(99_999_999)),
    }
}

/// How a gRPC answer counts: `grpc-status` from the trailers (or the
/// headers, for a trailers-only answer); 0 done, the codes in
/// [`crate::spec::GRPC_REJECTED`] rejected, anything else unknown.
fn classify_grpc(
    status: http::StatusCode,
    headers: &http::HeaderMap,
    trailers: Option<&http::HeaderMap>,
) -> Outcome {
    let field = |name: &str| {
        trailers
            .and_then(|t| t.get(name))
            .or_else(|| headers.get(name))
            .and_then(|v| v.to_str().ok())
    };
    let Some(code) = field("grpc-status").and_then(|c| c.parse::<u8>().ok()) else {
        return Outcome::Unknown(format!("{status} without a grpc-status"));
    };
    if code == 0 {
        return Outcome::Done;
    }
    let message = field("grpc-message").unwrap_or("");
    let message = message.get(..DETAIL_BYTES).unwrap_or(message);
    let detail = format!("grpc-status {code}: {message}");
    if crate::spec::GRPC_REJECTED.contains(&code) {
        Outcome::Rejected(detail)
    } else {
        Outcome::Unknown(detail)
    }
}

/// How an HTTP answer counts.
fn classify(status: http::StatusCode, headers: &http::HeaderMap, body: &[u8]) -> Outcome {
    if status.is_success() {
        return Outcome::Done;
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(DETAIL_BYTES)]);
    let detail = match text.trim() {
        "" => status.to_string(),
        text => format!("{status}: {text}"),
    };
    let retry_later = headers.contains_key(http::header::RETRY_AFTER)
        || status.is_server_error()
        || matches!(status.as_u16(), 408 | 429);
    if retry_later || !status.is_client_error() {
        Outcome::Unknown(detail)
    } else {
        Outcome::Rejected(detail)
    }
}

/// Why driving a transaction stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No such transaction.
    #[error("no transaction {0}")]
    NotFound(String),
    /// Another coordinator claimed the transaction.
    #[error("transaction {id} is driven by {by} now")]
    TakenOver {
        /// The transaction.
        id: String,
        /// Its coordinator.
        by: String,
    },
    /// The log refused or failed in a way waiting cannot fix.
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Drives transactions: creates their records and runs them to the end.
pub struct Runner<C> {
    log: TxnLog,
    caller: Arc<C>,
    drivers: Drivers,
}

/// The transactions driven in this process, each with the bell that tells
/// its driver the record changed under it (an operator's abort or retry):
/// it reloads at once instead of at its next write, which may be a long
/// call or backoff away.
type Drivers = Arc<parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Notify>>>>;

/// A driver's entry in [`Drivers`], removed when the driver stops.
struct Registered<'a> {
    drivers: &'a Drivers,
    id: &'a str,
    bell: Arc<tokio::sync::Notify>,
}

impl<'a> Registered<'a> {
    /// The bell of `id`: the one hung up before the record was read (by
    /// [`Runner::start`]), so an event applied in between still rings it.
    fn new(drivers: &'a Drivers, id: &'a str) -> Registered<'a> {
        let bell = drivers
            .lock()
            .entry(id.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Notify::new()))
            .clone();
        Registered { drivers, id, bell }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut drivers = self.drivers.lock();
        if drivers
            .get(self.id)
            .is_some_and(|b| Arc::ptr_eq(b, &self.bell))
        {
            drivers.remove(self.id);
        }
    }
}

impl<C> Clone for Runner<C> {
    fn clone(&self) -> Self {
        Runner {
            log: self.log.clone(),
            caller: self.caller.clone(),
            drivers: self.drivers.clone(),
        }
    }
}

impl<C: Caller> Runner<C> {
    /// A runner writing to `log` and calling branches with `caller`.
    pub fn new(log: TxnLog, caller: C) -> Runner<C> {
        Runner {
            log,
            caller: Arc::new(caller),
            drivers: Drivers::default(),
        }
    }

    /// The log it writes.
    pub fn log(&self) -> &TxnLog {
        &self.log
    }

    /// Persists a new transaction (validate its spec first); once this
    /// returns, the transaction will finish whatever happens to this process
    /// (another coordinator resumes it). Drive it with [`Runner::drive`].
    pub async fn create(&self, txn: &Txn) -> Result<(), LogError> {
        self.log.create(txn).await.map(drop)
    }

    /// Creates `txn` with its first calls already marked in flight (one log
    /// write instead of two), and returns the stored record for
    /// [`Runner::drive_stored`], which sends those calls. A crash between
    /// the write and the sends loses nothing: whoever resumes the record
    /// sends the calls it has in flight.
    pub async fn start(&self, txn: &mut Txn) -> Result<Stored, LogError> {
        // The actions are derived again by the driver's first `Resume`; a
        // fresh transaction cannot refuse it.
        let _ = txn.step(now_ms(), Event::Resume);
        // Hang up its driver's bell first: an operator's event applied before
        // the driver starts still wakes it.
        let hung = {
            let mut drivers = self.drivers.lock();
            let absent = !drivers.contains_key(&txn.id);
            if absent {
                drivers.insert(txn.id.clone(), Arc::new(tokio::sync::Notify::new()));
            }
            absent
        };
        match self.log.create(txn).await {
            Ok(revision) => Ok(Stored {
                txn: txn.clone(),
                revision,
            }),
            Err(e) => {
                if hung {
                    self.drivers.lock().remove(&txn.id);
                }
                Err(e)
            }
        }
    }

    /// Drives transaction `id` until it is final; its final status.
    pub async fn drive(&self, id: &str) -> Result<Status, RunError> {
        self.drive_as(id, "").await
    }

    /// [`Runner::drive`] as coordinator `me`: stops with
    /// [`RunError::TakenOver`] when the record names another coordinator
    /// (`me` empty: no such check).
    pub async fn drive_as(&self, id: &str, me: &str) -> Result<Status, RunError> {
        self.drive_as_record(id, me).await.map(|t| t.status)
    }

    /// [`Runner::drive_as`], answering the final record.
    pub async fn drive_as_record(&self, id: &str, me: &str) -> Result<Txn, RunError> {
        // The bell before the read: an event applied after it rings.
        let registered = Registered::new(&self.drivers, id);
        let stored = self.load(id).await?;
        self.drive_registered(stored, me, registered).await
    }

    /// [`Runner::drive_as`] from a record already read (or just written):
    /// the final record.
    pub async fn drive_stored(&self, stored: Stored, me: &str) -> Result<Txn, RunError> {
        let id = stored.txn.id.clone();
        let registered = Registered::new(&self.drivers, &id);
        self.drive_registered(stored, me, registered).await
    }

    async fn drive_registered(
        &self,
        mut stored: Stored,
        me: &str,
        registered: Registered<'_>,
    ) -> Result<Txn, RunError> {
        let id = stored.txn.id.clone();
        let id = id.as_str();
        let mut calls = JoinSet::new();
        let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
        crate::failpoint::hit("drive_start").await;
        let mut event = Event::Resume;
        let mut wake: Option<Millis> = None;
        let mut store_failures = 0u32;
        loop {
            let before = stored.txn.clone();
            let actions = match stored.txn.step(now_ms(), event) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(txn = %id, error = %e, "event refused");
                    Vec::new()
                }
            };
            if stored.txn != before {
                match self.log.save(&stored.txn, stored.revision).await {
                    Ok(rev) => {
                        stored.revision = rev;
                        store_failures = 0;
                        crate::failpoint::hit("after_save").await;
                    }
                    Err(LogError::Store(e)) => {
                        // Not persisted: run none of this step's actions; read
                        // the record back once the store answers, and resume.
                        store_failures += 1;
                        let wait = meshwork_resilience::retry::ceiling(
                            Duration::from_millis(50),
                            STORE_RETRY_MAX,
                            2.0,
                            store_failures,
                        );
                        tracing::warn!(txn = %id, error = %e, retry_in_ms = wait.as_millis() as u64, "transaction log write failed");
                        tokio::time::sleep(wait).await;
                        stored = match self.load(id).await {
                            Ok(s) => s,
                            Err(RunError::Log(LogError::Store(_))) => stored,
                            Err(e) => return Err(e),
                        };
                        calls.abort_all();
                        event = Event::Resume;
                        continue;
                    }
                    Err(LogError::Superseded(_)) => {
                        // Someone else wrote the record (an operator's abort or
                        // retry, or another coordinator): continue from theirs,
                        // sending the calls it has in flight (their writer may
                        // not have sent them; a duplicate carries the same
                        // idempotency key and its late answer is ignored).
                        stored = self.reload(id, me).await?;
                        event = Event::Resume;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            for a in actions {
                match a {
                    Action::Call {
                        branch,
                        phase,
                        attempt,
                    } => {
                        let Some(req) = CallRequest::of(&stored.txn, branch, phase, attempt) else {
                            continue;
                        };
                        let (caller, tx) = (self.caller.clone(), tx.clone());
                        calls.spawn(async move {
                            let started = std::time::Instant::now();
                            let outcome = caller.call(req).await;
                            let kind = match &outcome {
                                Outcome::Done => "done",
                                Outcome::Rejected(_) => "rejected",
                                Outcome::Unknown(_) => "unknown",
                            };
                            metrics::histogram!("meshwork_txn_call_seconds", "phase" => phase.as_str(), "outcome" => kind)
                                .record(started.elapsed().as_secs_f64());
                            crate::failpoint::hit("after_call").await;
                            let _ = tx.send(Event::Result {
                                branch,
                                phase,
                                attempt,
                                outcome,
                            });
                        });
                    }
                    Action::WakeAt(at) => wake = Some(at),
                    Action::Finished(status) => {
                        tracing::info!(txn = %id, status = status.as_str(), "transaction finished");
                        metrics::counter!("meshwork_txn_finished_total", "status" => status.as_str())
                            .increment(1);
                        metrics::histogram!("meshwork_txn_duration_seconds", "status" => status.as_str())
                            .record(now_ms().saturating_sub(stored.txn.created) as f64 / 1000.0);
                        return Ok(stored.txn);
                    }
                }
            }
            event = loop {
                let sleep = wake.map(|at| Duration::from_millis(at.saturating_sub(now_ms())));
                let next = tokio::select! {
                    Some(ev) = rx.recv() => Some(ev),
                    _ = tokio::time::sleep(sleep.unwrap_or(Duration::MAX)), if sleep.is_some() => {
                        wake = None;
                        Some(Event::Tick)
                    }
                    () = registered.bell.notified() => None,
                };
                match next {
                    Some(ev) => break ev,
                    // The record changed under us: continue from it, as after a
                    // lost write — unless this task has already taken that change
                    // in (its lost write reloaded it before the bell rang): then
                    // what it has in flight was sent, and resuming again would
                    // send it twice.
                    None => {
                        let fresh = self.reload(id, me).await?;
                        if fresh.revision == stored.revision {
                            continue;
                        }
                        stored = fresh;
                        break Event::Resume;
                    }
                }
            };
            // Reap finished call tasks.
            while calls.try_join_next().is_some() {}
        }
    }

    /// Applies an operator's event (abort, retry now) to a transaction that
    /// another task may be driving: a compare-and-swap write, retried on a
    /// conflict. It sends no call itself: a driving task in this process is
    /// woken at once, reloads and resumes, sending the calls the new record
    /// has in flight; a driver in another process sees the change when its
    /// next write loses.
    pub async fn apply(&self, id: &str, event: Event) -> Result<Txn, ApplyError> {
        loop {
            let mut stored = self.load(id).await?;
            stored.txn.step(now_ms(), event.clone())?;
            match self.log.save(&stored.txn, stored.revision).await {
                Ok(_) => {
                    self.wake(id);
                    return Ok(stored.txn);
                }
                Err(LogError::Superseded(_)) => continue,
                Err(e) => return Err(RunError::Log(e).into()),
            }
        }
    }

    /// Rings the bell of this process's driver of `id`, if there is one: it
    /// re-reads the record now. Whether there was one.
    pub fn wake(&self, id: &str) -> bool {
        match self.drivers.lock().get(id) {
            Some(bell) => {
                bell.notify_one();
                true
            }
            None => false,
        }
    }

    /// The record as stored, unless another coordinator (not `me`) drives it
    /// now.
    async fn reload(&self, id: &str, me: &str) -> Result<Stored, RunError> {
        let stored = self.load(id).await?;
        let by = &stored.txn.coordinator;
        if !me.is_empty() && by != me {
            return Err(RunError::TakenOver {
                id: id.to_owned(),
                by: by.clone(),
            });
        }
        Ok(stored)
    }

    async fn load(&self, id: &str) -> Result<Stored, RunError> {
        self.log
            .load(id)
            .await?
            .ok_or_else(|| RunError::NotFound(id.to_owned()))
    }
}

/// Why an operator's event was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The transaction or the log.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The machine refused it (e.g. abort after the commit decision).
    #[error(transparent)]
    Refused(#[from] crate::machine::StepError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_as_their_status_says() {
        let h = http::HeaderMap::new();
        let s = |c: u16| http::StatusCode::from_u16(c).unwrap_or(http::StatusCode::OK);
        assert_eq!(classify(s(201), &h, b""), Outcome::Done);
        assert_eq!(
            classify(s(402), &h, b" declined\n"),
            Outcome::Rejected("402 Payment Required: declined".into())
        );
        assert_eq!(
            classify(s(503), &h, b""),
            Outcome::Unknown("503 Service Unavailable".into())
        );
        assert!(matches!(classify(s(429), &h, b""), Outcome::Unknown(_)));
        assert!(matches!(classify(s(408), &h, b""), Outcome::Unknown(_)));
        assert!(matches!(classify(s(302), &h, b""), Outcome::Unknown(_)));
        let mut later = http::HeaderMap::new();
        later.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("1"),
        );
        assert!(matches!(classify(s(409), &later, b""), Outcome::Unknown(_)));
        let long = vec![b'x'; 1000];
        let Outcome::Rejected(d) = classify(s(400), &h, &long) else {
            panic!("400 is a rejection");
        };
        assert!(d.len() < 250);
    }
}
