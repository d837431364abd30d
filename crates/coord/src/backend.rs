//! The one seam between coordination and storage: an etcd v3 endpoint set, which is
//! Meshwork's own store or a real etcd cluster.
//!
//! [`Backend`] retries a call on another endpoint when the one in use is down
//! (`Unavailable`, a transport error, or no answer within the request timeout),
//! for at most [`BackendOptions::retry_for`]. A mutation retried after an unknown
//! outcome may have been applied once already; callers that compare-and-set must
//! treat a lost compare after a retry as "maybe mine" and re-read (see the config
//! center's publish). Watches resume from the next revision on any endpoint, and
//! report [`WatchItem::Reset`] when that revision was compacted away.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meshwork_etcd::Client;
use meshwork_etcd::proto::etcdserverpb as pb;
use meshwork_etcd::proto::mvccpb;
use parking_lot::RwLock;
use tokio::sync::{mpsc, watch};
use tonic::Code;

use crate::error::{CoordError, Result};

pub use mvccpb::{Event, KeyValue};

/// How the backend connects and retries.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// Deadline of one request to one endpoint.
    pub request_timeout: Duration,
    /// How long a call keeps retrying across endpoints before it fails.
    pub retry_for: Duration,
    /// Timeout of one connection attempt.
    pub connect_timeout: Duration,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            request_timeout: Duration::from_secs(5),
            retry_for: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

struct Current {
    index: usize,
    generation: u64,
    client: Client,
    /// The keep-alive multiplexers on this connection (started on first use), leases
    /// sharded over them by id.
    keepalive: parking_lot::Mutex<Vec<Option<mpsc::Sender<KeepAliveReq>>>>,
}

/// Keep-alive streams per connection. etcd forwards the renewals of one stream from a
/// follower to the leader one at a time; a few streams multiply what one node can renew.
const KEEPALIVE_STREAMS: usize = 8;

type KeepAliveReq = (i64, tokio::sync::oneshot::Sender<i64>);

impl Current {
    fn new(index: usize, generation: u64, client: Client) -> Current {
        Current {
            index,
            generation,
            client,
            keepalive: parking_lot::Mutex::new(vec![None; KEEPALIVE_STREAMS]),
        }
    }

    /// The sender of the keep-alive multiplexer for `lease`, (re)started if it is not
    /// running.
    fn keepalive(&self, lease: i64) -> mpsc::Sender<KeepAliveReq> {
        let mut g = self.keepalive.lock();
        let slot = &mut g[lease.rem_euclid(KEEPALIVE_STREAMS as i64) as usize];
        match slot.as_ref() {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let tx = spawn_keepalive_mux(self.client.clone());
                *slot = Some(tx.clone());
                tx
            }
        }
    }
}

/// One LeaseKeepAlive stream shared by every lease renewed through this connection
/// (as etcd's own client does): a request per renewal, answers matched by lease id
/// in order. The task ends when its stream breaks; waiting callers then see their
/// answer channel close and retry on a fresh stream (or another endpoint).
fn spawn_keepalive_mux(client: Client) -> mpsc::Sender<KeepAliveReq> {
    let (tx, mut rx) = mpsc::channel::<KeepAliveReq>(4096);
    tokio::spawn(async move {
        let (req_tx, req_rx) = mpsc::channel::<pb::LeaseKeepAliveRequest>(4096);
        let mut pending: HashMap<i64, VecDeque<tokio::sync::oneshot::Sender<i64>>> = HashMap::new();
        // etcd sends the response headers with its first answer: the first request must
        // already be queued when the call is opened, or opening waits forever.
        let Some((id, reply)) = rx.recv().await else {
            return;
        };
        pending.entry(id).or_default().push_back(reply);
        if req_tx.send(pb::LeaseKeepAliveRequest { id }).await.is_err() {
            return;
        }
        let mut lease = client.lease.clone();
        let mut stream = match lease
            .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(req_rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(e) => {
                tracing::debug!(error = %e, "keep-alive stream failed to open");
                return;
            }
        };
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    None => return,
                    Some((id, reply)) => {
                        pending.entry(id).or_default().push_back(reply);
                        if req_tx.send(pb::LeaseKeepAliveRequest { id }).await.is_err() {
                            return;
                        }
                    }
                },
                m = stream.message() => match m {
                    Ok(Some(resp)) => {
                        if let Some(q) = pending.get_mut(&resp.id) {
                            if let Some(reply) = q.pop_front() {
                                let _ = reply.send(resp.ttl);
                            }
                            if q.is_empty() {
                                pending.remove(&resp.id);
                            }
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(error = %e, "keep-alive stream broke");
                        return;
                    }
                },
            }
        }
    });
    tx
}

struct Inner {
    endpoints: Vec<String>,
    opts: BackendOptions,
    current: RwLock<Arc<Current>>,
    reconnect: tokio::sync::Mutex<()>,
}

/// An etcd v3 endpoint set with failover. Cheap to clone.
#[derive(Clone)]
pub struct Backend {
    inner: Arc<Inner>,
}

/// The key just after every key that starts with `prefix` (etcd's `range_end`).
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    Bytes::from_static(&[0])
}

fn retryable(s: &tonic::Status) -> bool {
    match s.code() {
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => true,
        // Transport failures surface as Unknown with an h2/hyper message.
        Code::Unknown => {
            let m = s.message();
            m.contains("transport") || m.contains("connection") || m.contains("h2")
        }
        _ => false,
    }
}

/// Time kept at the end of a call's deadline to find out why it failed.
const DIAGNOSIS_TIME: Duration = Duration::from_millis(500);

/// What a retryable failure means, in the words an operator acts on: the
/// cluster has no leader (no quorum), the endpoint cannot be reached, or it
/// sheds load; etcd's own message follows.
fn describe_failure(s: &tonic::Status) -> String {
    let m = s.message();
    let what = if m.contains("no leader")
        || m.contains("leader changed")
        || m.contains("request timed out")
        || m.contains("not capable")
    {
        "no quorum: the etcd cluster has no leader"
    } else if s.code() == Code::ResourceExhausted || m.contains("too many requests") {
        "overloaded: the etcd member sheds load"
    } else if s.code() == Code::Unavailable
        || s.code() == Code::Unknown
        || s.code() == Code::Cancelled
    {
        "unreachable: the etcd endpoint did not take the request"
    } else {
        "failed"
    };
    format!("{what} ({:?}: {m})", s.code())
}

fn backend_error(s: tonic::Status) -> CoordError {
    match s.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            CoordError::Invalid(s.message().to_string())
        }
        Code::NotFound => CoordError::NotFound(s.message().to_string()),
        _ => CoordError::Backend(format!("{:?}: {}", s.code(), s.message())),
    }
}

impl Backend {
    /// Connects to the first reachable endpoint (`HOST:PORT` or a URL).
    pub async fn connect(endpoints: &[String], opts: BackendOptions) -> Result<Backend> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(CoordError::invalid(
                "no etcd endpoints given (expected HOST:PORT[,HOST:PORT...])",
            ));
        }
        let (index, client) = connect_from(&endpoints, 0, &opts).await?;
        Ok(Backend {
            inner: Arc::new(Inner {
                endpoints,
                opts,
                current: RwLock::new(Arc::new(Current::new(index, 0, client))),
                reconnect: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The endpoints this backend was given.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// The options in force.
    pub fn options(&self) -> &BackendOptions {
        &self.inner.opts
    }

    fn current(&self) -> Arc<Current> {
        self.inner.current.read().clone()
    }

    /// Moves to the next reachable endpoint unless someone already moved past `seen`.
    async fn failover(&self, seen: u64) {
        let _g = self.inner.reconnect.lock().await;
        let cur = self.current();
        if cur.generation != seen {
            return;
        }
        let n = self.inner.endpoints.len();
        match connect_from(&self.inner.endpoints, (cur.index + 1) % n, &self.inner.opts).await {
            Ok((index, client)) => {
                if index != cur.index {
                    tracing::warn!(from = %self.inner.endpoints[cur.index], to = %self.inner.endpoints[index], "etcd endpoint failover");
                }
                *self.inner.current.write() = Arc::new(Current::new(index, seen + 1, client));
            }
            Err(e) => tracing::warn!(error = %e, "no etcd endpoint reachable; retrying"),
        }
    }

    /// Why a request to `cur` got no answer: the member's own `Status` tells
    /// a member without a leader (no quorum) from a slow one; no status at
    /// all means it is unreachable.
    async fn diagnose(&self, cur: &Current, timed_out: String) -> String {
        let ep = &self.inner.endpoints[cur.index];
        let mut m = cur.client.maintenance.clone();
        match tokio::time::timeout(DIAGNOSIS_TIME, m.status(pb::StatusRequest {})).await {
            Ok(Ok(s)) if s.get_ref().leader == 0 => {
                format!("no quorum: etcd member {ep} answers but has no leader ({timed_out})")
            }
            Ok(Ok(s)) => format!(
                "{timed_out}; etcd member {ep} is up with leader {:x}: the cluster is slow to commit",
                s.get_ref().leader
            ),
            Ok(Err(e)) => format!("{timed_out}; etcd member {ep}: {}", describe_failure(&e)),
            Err(_) => format!("unreachable: etcd member {ep} does not answer ({timed_out})"),
        }
    }

    /// Runs `f` on the current endpoint, failing over and retrying on availability errors.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.inner.opts.retry_for;
        let mut backoff = Duration::from_millis(20);
        loop {
            let cur = self.current();
            // No attempt outlives the call's deadline (less a moment to say why).
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let limit = self
                .inner
                .opts
                .request_timeout
                .min(left - (left / 4).min(DIAGNOSIS_TIME))
                .max(Duration::from_millis(1));
            let (err, timed_out) = match tokio::time::timeout(limit, f(cur.client.clone())).await {
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                Ok(Err(s)) if !retryable(&s) => return Err(backend_error(s)),
                Ok(Err(s)) => (describe_failure(&s), false),
                Err(_) => (
                    format!("timed out: no answer within {} ms", limit.as_millis()),
                    true,
                ),
            };
            if tokio::time::Instant::now() + backoff >= deadline {
                let err = if timed_out {
                    self.diagnose(&cur, err).await
                } else {
                    err
                };
                return Err(CoordError::Unavailable(format!(
                    "{} (endpoints {:?})",
                    err, self.inner.endpoints
                )));
            }
            tracing::debug!(error = %err, "etcd call failed; failing over");
            self.failover(cur.generation).await;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Reads one key.
    pub async fn get(&self, key: impl Into<Bytes>) -> Result<(Option<KeyValue>, i64)> {
        let key = key.into();
        let r = self
            .call(|mut c| {
                let key = key.clone();
                async move {
                    c.kv.range(pb::RangeRequest {
                        key,
                        ..Default::default()
                    })
                    .await
                }
            })
            .await?;
        let rev = r.header.map(|h| h.revision).unwrap_or(0);
        Ok((r.kvs.into_iter().next(), rev))
    }

    /// Reads every key under `prefix` (at most `limit`, 0 = all), sorted by key, and
    /// the store revision of the read.
    pub async fn get_prefix(
        &self,
        prefix: impl Into<Bytes>,
        limit: i64,
    ) -> Result<(Vec<KeyValue>, i64)> {
        let key = prefix.into();
        let range_end = prefix_end(&key);
        let r = self
            .call(|mut c| {
                let (key, range_end) = (key.clone(), range_end.clone());
                async move {
                    c.kv.range(pb::RangeRequest {
                        key,
                        range_end,
                        limit,
                        ..Default::default()
                    })
                    .await
                }
            })
            .await?;
        let rev = r.header.map(|h| h.revision).unwrap_or(0);
        Ok((r.kvs, rev))
    }

    /// Reads every key under `prefix` in pages of [`LOAD_PAGE`] keys, all at the
    /// revision of the first page (so the result is one consistent snapshot, however
    /// large), and that revision.
    pub async fn load_prefix(&self, prefix: impl Into<Bytes>) -> Result<(Vec<KeyValue>, i64)> {
        let prefix = prefix.into();
        let end = prefix_end(&prefix);
        let mut from = prefix;
        let mut revision = 0i64;
        let mut out = Vec::new();
        loop {
            let r = self
                .call(|mut c| {
                    let (key, range_end) = (from.clone(), end.clone());
                    async move {
                        c.kv.range(pb::RangeRequest {
                            key,
                            range_end,
                            limit: LOAD_PAGE,
                            revision,
                            ..Default::default()
                        })
                        .await
                    }
                })
                .await?;
            if revision == 0 {
                revision = r.header.map(|h| h.revision).unwrap_or(0);
            }
            let more = r.more;
            let next = r.kvs.last().map(|kv| {
                let mut k = kv.key.to_vec();
                k.push(0);
                Bytes::from(k)
            });
            out.extend(r.kvs);
            match next {
                Some(k) if more => from = k,
                _ => return Ok((out, revision)),
            }
        }
    }

    /// Writes one key (on `lease` unless 0); returns the new revision.
    pub async fn put(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        lease: i64,
    ) -> Result<i64> {
        let (key, value) = (key.into(), value.into());
        let r = self
            .call(|mut c| {
                let (key, value) = (key.clone(), value.clone());
                async move {
                    c.kv.put(pb::PutRequest {
                        key,
                        value,
                        lease,
                        ..Default::default()
                    })
                    .await
                }
            })
            .await?;
        Ok(r.header.map(|h| h.revision).unwrap_or(0))
    }

    /// Deletes one key, or every key under it when `prefix`; returns how many went.
    pub async fn delete(&self, key: impl Into<Bytes>, prefix: bool) -> Result<i64> {
        let key = key.into();
        let range_end = if prefix {
            prefix_end(&key)
        } else {
            Bytes::new()
        };
        let r = self
            .call(|mut c| {
                let (key, range_end) = (key.clone(), range_end.clone());
                async move {
                    c.kv.delete_range(pb::DeleteRangeRequest {
                        key,
                        range_end,
                        ..Default::default()
                    })
                    .await
                }
            })
            .await?;
        Ok(r.deleted)
    }

    /// Runs a transaction.
    pub async fn txn(&self, t: pb::TxnRequest) -> Result<pb::TxnResponse> {
        self.call(|mut c| {
            let t = t.clone();
            async move { c.kv.txn(t).await }
        })
        .await
    }

    /// Grants a lease of `ttl` seconds; returns its id.
    pub async fn grant(&self, ttl: i64) -> Result<i64> {
        let r = self
            .call(|mut c| async move {
                c.lease
                    .lease_grant(pb::LeaseGrantRequest { ttl, id: 0 })
                    .await
            })
            .await?;
        if !r.error.is_empty() {
            return Err(CoordError::Backend(r.error));
        }
        Ok(r.id)
    }

    /// Revokes a lease (deleting its keys). A lease that is already gone is fine.
    pub async fn revoke(&self, id: i64) -> Result<()> {
        match self
            .call(|mut c| async move { c.lease.lease_revoke(pb::LeaseRevokeRequest { id }).await })
            .await
        {
            Ok(_) | Err(CoordError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Renews a lease once; returns its remaining TTL in seconds (`None`: expired).
    pub async fn keep_alive_once(&self, id: i64) -> Result<Option<i64>> {
        let deadline = tokio::time::Instant::now() + self.inner.opts.retry_for;
        let mut backoff = Duration::from_millis(20);
        loop {
            let cur = self.current();
            let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
            let mux = cur.keepalive(id);
            let sent = mux.send((id, reply_tx)).await.is_ok();
            let err = if !sent {
                "keep-alive stream closed".to_string()
            } else {
                match tokio::time::timeout(self.inner.opts.request_timeout, reply_rx).await {
                    Ok(Ok(ttl)) => return Ok((ttl > 0).then_some(ttl)),
                    Ok(Err(_)) => "keep-alive stream broke".to_string(),
                    Err(_) if !mux.is_closed() => {
                        // The stream is alive but silent: the member forwards renewals to a
                        // leader that does not answer (no quorum) or is overloaded. Moving
                        // to another endpoint would only add reconnects. Fail this renewal.
                        return Err(CoordError::Unavailable(format!(
                            "no keep-alive answer within {} ms on a live stream (the etcd cluster has no leader, or its leader is overloaded)",
                            self.inner.opts.request_timeout.as_millis()
                        )));
                    }
                    Err(_) => format!(
                        "no keep-alive answer within {} ms",
                        self.inner.opts.request_timeout.as_millis()
                    ),
                }
            };
            if tokio::time::Instant::now() + backoff >= deadline {
                return Err(CoordError::Unavailable(format!(
                    "{err} (endpoints {:?})",
                    self.inner.endpoints
                )));
            }
            self.failover(cur.generation).await;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Keeps a lease alive in the background until the returned keeper is dropped or
    /// the lease is found expired (then [`LeaseKeeper::lost`] turns true).
    pub fn keep_alive(&self, id: i64, ttl: i64) -> LeaseKeeper {
        let (lost_tx, lost_rx) = watch::channel(false);
        let (reach_tx, reach_rx) = watch::channel(true);
        let (renewed_tx, renewed_rx) = watch::channel(tokio::time::Instant::now());
        let backend = self.clone();
        let period = Duration::from_millis((ttl.max(1) as u64 * 1000) / 3);
        let task = tokio::spawn(async move {
            let ttl_d = Duration::from_secs(ttl.max(1) as u64);
            let mut last_ok = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(period).await;
                // Past last_ok + TTL the lease must be assumed gone, whatever a retrying
                // call would say later.
                let left = (last_ok + ttl_d).saturating_duration_since(tokio::time::Instant::now());
                match tokio::time::timeout(left, backend.keep_alive_once(id)).await {
                    Ok(Ok(Some(_))) => {
                        last_ok = tokio::time::Instant::now();
                        renewed_tx.send_replace(last_ok);
                        reach_tx.send_if_modified(|r| !std::mem::replace(r, true));
                    }
                    Ok(Ok(None)) => {
                        tracing::warn!(lease = id, "lease expired");
                        let _ = lost_tx.send(true);
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(lease = id, error = %e, "lease keep-alive failed");
                        reach_tx.send_if_modified(|r| std::mem::replace(r, false));
                        if last_ok.elapsed() >= ttl_d {
                            let _ = lost_tx.send(true);
                            return;
                        }
                    }
                    Err(_) => {
                        tracing::warn!(lease = id, "no keep-alive answer within the lease TTL");
                        let _ = lost_tx.send(true);
                        return;
                    }
                }
            }
        });
        LeaseKeeper {
            id,
            ttl,
            lost: lost_rx,
            reachable: reach_rx,
            renewed: renewed_rx,
            task,
        }
    }

    /// Watches every key under `prefix` from `start_revision` (0 = now), resuming on
    /// another endpoint after failures. The stream ends when the receiver is dropped.
    pub fn watch_prefix(&self, prefix: impl Into<Bytes>, start_revision: i64) -> WatchStream {
        let prefix = prefix.into();
        let range_end = prefix_end(&prefix);
        self.watch_range(prefix, range_end, start_revision)
    }

    /// Watches `[key, range_end)` (an empty `range_end` = the one key).
    pub fn watch_range(&self, key: Bytes, range_end: Bytes, start_revision: i64) -> WatchStream {
        let (tx, rx) = mpsc::channel(256);
        let backend = self.clone();
        tokio::spawn(async move {
            let mut next = start_revision;
            let mut backoff = Duration::from_millis(20);
            loop {
                let cur = backend.current();
                let end = run_watch(&cur.client, &key, &range_end, &mut next, &tx).await;
                match end {
                    WatchEnd::ReceiverGone => return,
                    WatchEnd::Compacted(rev) => {
                        let _ = tx.send(WatchItem::Reset { compacted: rev }).await;
                        return;
                    }
                    WatchEnd::Failed(err) => {
                        if tx.is_closed() {
                            return;
                        }
                        tracing::debug!(error = %err, "watch broke; resuming");
                        backend.failover(cur.generation).await;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                    WatchEnd::Healthy => backoff = Duration::from_millis(20),
                }
            }
        });
        WatchStream { rx }
    }
}

async fn connect_from(
    endpoints: &[String],
    start: usize,
    opts: &BackendOptions,
) -> Result<(usize, Client)> {
    let n = endpoints.len();
    let mut last = String::new();
    for i in 0..n {
        let index = (start + i) % n;
        let url = meshwork_etcd::client::endpoint_url(&endpoints[index]);
        let ep = tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|e| CoordError::invalid(format!("invalid etcd endpoint {url:?}: {e}")))?
            .connect_timeout(opts.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        match ep.connect().await {
            Ok(ch) => return Ok((index, Client::from_channel(ch))),
            Err(e) => last = format!("{url}: {e}"),
        }
    }
    Err(CoordError::Unavailable(format!(
        "cannot reach any etcd endpoint of {endpoints:?}: {last}"
    )))
}

enum WatchEnd {
    ReceiverGone,
    Compacted(i64),
    Failed(String),
    /// The stream ended cleanly (server shutdown): reconnect promptly.
    Healthy,
}

async fn run_watch(
    client: &Client,
    key: &Bytes,
    range_end: &Bytes,
    next: &mut i64,
    tx: &mpsc::Sender<WatchItem>,
) -> WatchEnd {
    let create = pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: key.clone(),
                range_end: range_end.clone(),
                start_revision: *next,
                ..Default::default()
            },
        )),
    };
    // Keep the request side open for the life of the watch.
    let (req_tx, req_rx) = mpsc::channel::<pb::WatchRequest>(1);
    if req_tx.send(create).await.is_err() {
        return WatchEnd::Failed("request channel closed".into());
    }
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(req_rx));
    // etcd cancels a watch whose member lost its leader instead of stalling it.
    request.metadata_mut().insert(
        "hasleader",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let mut wc = client.watch.clone();
    let mut stream = match wc.watch(request).await {
        Ok(r) => r.into_inner(),
        Err(s) => return WatchEnd::Failed(s.to_string()),
    };
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = tx.closed() => return WatchEnd::ReceiverGone,
        };
        match msg {
            Ok(Some(resp)) => {
                if resp.compact_revision > 0 {
                    return WatchEnd::Compacted(resp.compact_revision);
                }
                if resp.canceled {
                    return WatchEnd::Failed(format!("watch canceled: {}", resp.cancel_reason));
                }
                let revision = resp.header.map(|h| h.revision).unwrap_or(0);
                if resp.created && *next == 0 {
                    // A watch "from now": pin "now", so that a resume after a failover
                    // continues from here instead of from the new endpoint's "now".
                    *next = revision + 1;
                }
                if resp.events.is_empty() {
                    if !resp.created && revision >= *next {
                        // Progress notification: nothing below `revision` is pending.
                        *next = revision + 1;
                    }
                    continue;
                }
                let last = resp
                    .events
                    .last()
                    .and_then(|e| e.kv.as_ref())
                    .map(|kv| kv.mod_revision)
                    .unwrap_or(revision);
                *next = last + 1;
                if tx
                    .send(WatchItem::Events {
                        revision: last,
                        events: resp.events,
                    })
                    .await
                    .is_err()
                {
                    return WatchEnd::ReceiverGone;
                }
            }
            Ok(None) => return WatchEnd::Healthy,
            Err(s) => return WatchEnd::Failed(s.to_string()),
        }
    }
}

/// What a watch delivers.
#[derive(Debug)]
pub enum WatchItem {
    /// Events of one or more revisions, up to and including `revision`.
    Events {
        /// The last revision in `events`.
        revision: i64,
        /// The events, in revision order.
        events: Vec<Event>,
    },
    /// The revision to resume from was compacted: reload the state and watch again.
    Reset {
        /// The compaction revision reported by the server.
        compacted: i64,
    },
}

/// A resuming watch; see [`Backend::watch_prefix`].
pub struct WatchStream {
    rx: mpsc::Receiver<WatchItem>,
}

impl WatchStream {
    /// The next item; `None` only once the watch task stopped (after a `Reset`).
    pub async fn next(&mut self) -> Option<WatchItem> {
        self.rx.recv().await
    }
}

/// Keeps a lease alive; stops (without revoking) when dropped.
pub struct LeaseKeeper {
    /// The lease id.
    pub id: i64,
    /// Its TTL in seconds.
    pub ttl: i64,
    lost: watch::Receiver<bool>,
    reachable: watch::Receiver<bool>,
    renewed: watch::Receiver<tokio::time::Instant>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    /// A receiver that is false while renewals fail (the store is unreachable) and
    /// true again after the next successful renewal.
    pub fn reachable_receiver(&self) -> watch::Receiver<bool> {
        self.reachable.clone()
    }

    /// When the store last confirmed a renewal (the grant, at first).
    pub fn renewed_receiver(&self) -> watch::Receiver<tokio::time::Instant> {
        self.renewed.clone()
    }

    /// True once the lease is known (or must be assumed) expired.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// A receiver that turns true when the lease is lost.
    pub fn lost_receiver(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    /// Resolves when the lease is lost.
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                // Keeper task ended without reporting loss: it was aborted.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Small builders for transaction parts.
pub mod txn {
    use bytes::Bytes;
    use meshwork_etcd::proto::etcdserverpb as pb;
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};

    fn cmp(
        key: Bytes,
        result: CompareResult,
        target: CompareTarget,
        u: TargetUnion,
    ) -> pb::Compare {
        pb::Compare {
            result: result as i32,
            target: target as i32,
            key,
            range_end: Bytes::new(),
            target_union: Some(u),
        }
    }

    /// `key` does not exist.
    pub fn absent(key: impl Into<Bytes>) -> pb::Compare {
        cmp(
            key.into(),
            CompareResult::Equal,
            CompareTarget::Create,
            TargetUnion::CreateRevision(0),
        )
    }

    /// `key` exists.
    pub fn exists(key: impl Into<Bytes>) -> pb::Compare {
        cmp(
            key.into(),
            CompareResult::Greater,
            CompareTarget::Create,
            TargetUnion::CreateRevision(0),
        )
    }

    /// `key` was last modified at `rev` (0 = does not exist).
    pub fn mod_rev_is(key: impl Into<Bytes>, rev: i64) -> pb::Compare {
        cmp(
            key.into(),
            CompareResult::Equal,
            CompareTarget::Mod,
            TargetUnion::ModRevision(rev),
        )
    }

    /// `key` was created at `rev`.
    pub fn create_rev_is(key: impl Into<Bytes>, rev: i64) -> pb::Compare {
        cmp(
            key.into(),
            CompareResult::Equal,
            CompareTarget::Create,
            TargetUnion::CreateRevision(rev),
        )
    }

    /// Put `value` at `key` on `lease` (0 = none).
    pub fn put(key: impl Into<Bytes>, value: impl Into<Bytes>, lease: i64) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: key.into(),
                value: value.into(),
                lease,
                ..Default::default()
            })),
        }
    }

    /// Delete `key`.
    pub fn delete(key: impl Into<Bytes>) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(pb::request_op::Request::RequestDeleteRange(
                pb::DeleteRangeRequest {
                    key: key.into(),
                    ..Default::default()
                },
            )),
        }
    }

    /// Read `key`.
    pub fn get(key: impl Into<Bytes>) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
                key: key.into(),
                ..Default::default()
            })),
        }
    }

    /// The key-values of the `i`-th response if it is a range.
    pub fn range_kvs(r: &pb::TxnResponse, i: usize) -> Vec<super::KeyValue> {
        match r.responses.get(i).and_then(|o| o.response.as_ref()) {
            Some(pb::response_op::Response::ResponseRange(rr)) => rr.kvs.clone(),
            _ => Vec::new(),
        }
    }

    /// The revision the transaction committed at.
    pub fn revision(r: &pb::TxnResponse) -> i64 {
        r.header.map(|h| h.revision).unwrap_or(0)
    }
}

/// Keeps a local copy of every key under a prefix current by watch: loads, then
/// applies events, and reloads when the watch reports compaction.
pub trait MirrorHandler: Send + 'static {
    /// Replace the whole state with `kvs`, read at `revision`.
    fn reset(&mut self, kvs: Vec<KeyValue>, revision: i64);
    /// Apply events up to `revision`.
    fn apply(&mut self, events: Vec<Event>, revision: i64);
}

/// Runs a mirror of `prefix` into `handler` until the returned handle is dropped.
/// `ready` turns to the first loaded revision once the initial load is done.
pub fn mirror<H: MirrorHandler>(
    backend: &Backend,
    prefix: impl Into<Bytes>,
    handler: Arc<parking_lot::Mutex<H>>,
) -> Mirror {
    let prefix = prefix.into();
    let (rev_tx, rev_rx) = watch::channel(0i64);
    let backend = backend.clone();
    let task = tokio::spawn(async move {
        loop {
            let (kvs, rev) = match backend.load_prefix(prefix.clone()).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "mirror load failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            handler.lock().reset(kvs, rev);
            let _ = rev_tx.send(rev);
            let mut w = backend.watch_prefix(prefix.clone(), rev + 1);
            while let Some(item) = w.next().await {
                match item {
                    WatchItem::Events { revision, events } => {
                        handler.lock().apply(events, revision);
                        let _ = rev_tx.send(revision);
                    }
                    WatchItem::Reset { .. } => break,
                }
            }
        }
    });
    Mirror {
        revision: rev_rx,
        task,
    }
}

/// Longest the first load of a watched copy may take before opening fails.
pub const LOAD_LIMIT: Duration = Duration::from_secs(120);

/// Keys per page when loading a prefix.
pub const LOAD_PAGE: i64 = 5000;

/// Longest a writer waits for its own write to reach the local copy.
pub const MIRROR_WAIT: Duration = Duration::from_secs(10);

/// A running mirror; see [`mirror`].
pub struct Mirror {
    revision: watch::Receiver<i64>,
    task: tokio::task::JoinHandle<()>,
}

impl Mirror {
    /// Waits (at most `limit`) for the first load; false if it did not finish.
    pub async fn loaded(&self, limit: Duration) -> bool {
        let mut rx = self.revision.clone();
        tokio::time::timeout(limit, async {
            while *rx.borrow_and_update() <= 0 {
                if rx.changed().await.is_err() {
                    return false;
                }
            }
            true
        })
        .await
        .unwrap_or(false)
    }

    /// The revision the local copy has reached (0 until loaded).
    pub fn revision(&self) -> i64 {
        *self.revision.borrow()
    }

    /// Waits (at most [`MIRROR_WAIT`]) until the local copy reached at least `rev`;
    /// false if it did not (the watch is behind or broken).
    pub async fn wait_for(&self, rev: i64) -> bool {
        let mut rx = self.revision.clone();
        tokio::time::timeout(MIRROR_WAIT, async {
            while *rx.borrow_and_update() < rev {
                if rx.changed().await.is_err() {
                    return false;
                }
            }
            true
        })
        .await
        .unwrap_or(false)
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// True when `e` is a deletion.
pub fn is_delete(e: &Event) -> bool {
    e.r#type == mvccpb::event::EventType::Delete as i32
}
