//! Leases: grant, revoke, renew once, and keep alive in the background
//! ([`LeaseKeeper`]). Renewals of every lease share a few LeaseKeepAlive streams per
//! connection, as etcd's own client does, instead of one stream per lease.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use meshwork_etcd::Client;
use meshwork_etcd::proto::etcdserverpb as pb;
use tokio::sync::{mpsc, watch};

use super::{Backend, Current};
use crate::error::{CoordError, Result};

/// Keep-alive streams per connection. etcd forwards the renewals of one stream from a
/// follower to the leader one at a time; a few streams multiply what one node can renew.
pub(super) const KEEPALIVE_STREAMS: usize = 8;

/// A renewal for the multiplexer: the lease id and where to send its TTL.
pub(super) type KeepAliveReq = (i64, tokio::sync::oneshot::Sender<i64>);

impl Current {
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

impl Backend {
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
