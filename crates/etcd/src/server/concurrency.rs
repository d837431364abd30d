//! Lock (v3lock) and Election (v3election), built on KV, leases and watch exactly as
//! etcd's own `concurrency` package builds them: a waiter puts `name/<lease hex>` on
//! its lease and owns the lock or leadership once every key under `name/` created
//! before it is gone. The fencing token is the key's create revision.

use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;
use meshwork_store::ops::*;
use meshwork_store::{KeyRange, KeyValue, Store, WatchMessage, WatchSpec};
use tonic::{Request, Response, Status};

use super::Ctx;
use crate::auth::Caller;
use crate::convert::{kv_out, status};
use crate::proto::v3electionpb as epb;
use crate::proto::v3lockpb as lpb;

pub(crate) struct LockService(pub(crate) Ctx);
pub(crate) struct ElectionService(pub(crate) Ctx);

fn waiter_key(name: &[u8], lease: i64) -> Bytes {
    let mut k = name.to_vec();
    k.push(b'/');
    k.extend_from_slice(format!("{lease:x}").as_bytes());
    Bytes::from(k)
}

fn prefix_of(name: &[u8]) -> KeyRange {
    let mut p = name.to_vec();
    p.push(b'/');
    KeyRange::prefix(Bytes::from(p))
}

/// May `c` wait on `name` with `lease`, as etcd's concurrency package would
/// through KV: write its own key `name/<lease>` (on that lease) and read
/// every key under `name/`.
fn check_waiter(ctx: &Ctx, c: &Caller, name: &[u8], lease: i64) -> Result<(), Status> {
    c.write(&waiter_key(name, lease), b"")?;
    let p = prefix_of(name);
    c.read(&p.key, &p.end)?;
    super::kv::check_lease_keys(ctx, c, lease)?;
    Ok(())
}

fn first_created(range: KeyRange, max_create_revision: i64, order: SortOrder) -> RangeRequest {
    RangeRequest {
        range: Some(range),
        limit: 1,
        sort_order: order,
        sort_target: SortTarget::Create,
        max_create_revision,
        ..RangeRequest::default()
    }
}

/// Puts `key` on `lease` unless it exists; returns its key-value (create revision = token).
async fn enqueue(
    store: &Store,
    key: &Bytes,
    value: Bytes,
    lease: i64,
) -> Result<(KeyValue, bool), Status> {
    let read = RequestOp::Range(RangeRequest {
        range: Some(KeyRange::single(key.clone())),
        ..RangeRequest::default()
    });
    // One txn: create the key if absent, and read it back either way.
    let t = TxnRequest {
        compare: vec![Compare {
            range: KeyRange::single(key.clone()),
            result: CompareResult::Equal,
            target: CompareTarget::Create(0),
        }],
        success: vec![
            RequestOp::Put(PutRequest {
                key: key.clone(),
                value,
                lease,
                ..PutRequest::default()
            }),
            read.clone(),
        ],
        failure: vec![read],
    };
    let resp = store.txn(t).await.map_err(status)?;
    let created = resp.succeeded;
    match resp.responses.into_iter().last() {
        Some(ResponseOp::Range(r)) => match r.kvs.into_iter().next() {
            Some(kv) => Ok((kv, created)),
            None => Err(Status::aborted("lock key vanished while enqueueing; retry")),
        },
        _ => Err(Status::internal("unexpected txn response")),
    }
}

/// Waits until `key` is deleted (watching from after `rev`).
async fn wait_delete(store: &Store, key: Bytes, rev: i64) -> Result<(), Status> {
    let (ws, mut rx) = store.watch_stream();
    let spec = WatchSpec {
        range: KeyRange::single(key),
        start_revision: rev + 1,
        prev_kv: false,
        no_put: true,
        no_delete: false,
        progress_notify: false,
        watch_id: 0,
    };
    ws.create(spec)
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
    while let Some(m) = rx.recv().await {
        match m {
            WatchMessage::Events { events, .. } if !events.is_empty() => return Ok(()),
            // Compacted past our revision: the caller re-reads the state.
            WatchMessage::Canceled { .. } => return Ok(()),
            _ => {}
        }
    }
    Err(Status::unavailable("etcdserver: server stopped"))
}

/// Waits until no key under `prefix` with create revision `<= max_create` remains.
async fn wait_deletes(store: &Store, prefix: &KeyRange, max_create: i64) -> Result<(), Status> {
    loop {
        let r = store
            .range(&first_created(
                prefix.clone(),
                max_create,
                SortOrder::Descend,
            ))
            .map_err(status)?;
        let Some(kv) = r.kvs.into_iter().next() else {
            return Ok(());
        };
        wait_delete(store, kv.key, r.revision).await?;
    }
}

/// Removes a waiter's key if the request is dropped (client gone) before it is disarmed.
struct Cleanup {
    store: Store,
    key: Option<Bytes>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let store = self.store.clone();
            tokio::spawn(async move {
                let _ = store
                    .delete(DeleteRequest {
                        range: KeyRange::single(key),
                        prev_kv: false,
                    })
                    .await;
            });
        }
    }
}

/// Enqueues and waits for ownership; returns the owned key-value.
async fn acquire(
    store: &Store,
    name: &[u8],
    lease: i64,
    value: Bytes,
    reproclaim: bool,
) -> Result<KeyValue, Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument(
            "etcdserver: name must not be empty",
        ));
    }
    if lease == 0 || store.lease_time_to_live(lease, false).is_none() {
        return Err(status(meshwork_store::StoreError::LeaseNotFound));
    }
    let key = waiter_key(name, lease);
    let (mut kv, created) = enqueue(store, &key, value.clone(), lease).await?;
    let mut guard = Cleanup {
        store: store.clone(),
        key: if created { Some(key.clone()) } else { None },
    };
    if !created && reproclaim && kv.value != value {
        let p = PutRequest {
            key: key.clone(),
            value: value.clone(),
            lease,
            ..PutRequest::default()
        };
        store.put(p).await.map_err(status)?;
        kv.value = value;
    }
    wait_deletes(store, &prefix_of(name), kv.create_revision - 1).await?;
    // The lease may have expired while waiting: then our key is gone and we own nothing.
    let now = store
        .range(&RangeRequest {
            range: Some(KeyRange::single(key.clone())),
            ..RangeRequest::default()
        })
        .map_err(status)?;
    match now.kvs.into_iter().next() {
        Some(cur) if cur.create_revision == kv.create_revision => {
            guard.key = None;
            Ok(cur)
        }
        _ => {
            guard.key = None;
            Err(status(meshwork_store::StoreError::LeaseNotFound))
        }
    }
}

#[tonic::async_trait]
impl lpb::lock_server::Lock for LockService {
    async fn lock(
        &self,
        req: Request<lpb::LockRequest>,
    ) -> Result<Response<lpb::LockResponse>, Status> {
        let c = self.0.caller(&req)?;
        let r = req.into_inner();
        check_waiter(&self.0, &c, &r.name, r.lease)?;
        let kv = acquire(&self.0.store, &r.name, r.lease, Bytes::new(), false).await?;
        Ok(Response::new(lpb::LockResponse {
            header: self.0.header.at(self.0.store.revision()),
            key: kv.key,
        }))
    }

    async fn unlock(
        &self,
        req: Request<lpb::UnlockRequest>,
    ) -> Result<Response<lpb::UnlockResponse>, Status> {
        let c = self.0.caller(&req)?;
        let r = req.into_inner();
        c.write(&r.key, b"")?;
        let d = self
            .0
            .store
            .delete(DeleteRequest {
                range: KeyRange::single(r.key),
                prev_kv: false,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(lpb::UnlockResponse {
            header: self.0.header.at(d.revision),
        }))
    }
}

fn leader_key(name: Bytes, kv: &KeyValue) -> epb::LeaderKey {
    epb::LeaderKey {
        name,
        key: kv.key.clone(),
        rev: kv.create_revision,
        lease: kv.lease,
    }
}

fn not_leader() -> Status {
    Status::failed_precondition("etcdserver: election: not leader")
}

fn guarded(leader: &epb::LeaderKey, op: RequestOp) -> TxnRequest {
    TxnRequest {
        compare: vec![Compare {
            range: KeyRange::single(leader.key.clone()),
            result: CompareResult::Equal,
            target: CompareTarget::Create(leader.rev),
        }],
        success: vec![op],
        failure: vec![],
    }
}

fn current_leader(store: &Store, name: &[u8]) -> Result<(Option<KeyValue>, i64), Status> {
    let r = store
        .range(&first_created(prefix_of(name), 0, SortOrder::Ascend))
        .map_err(status)?;
    Ok((r.kvs.into_iter().next(), r.revision))
}

type ObserveStream = Pin<Box<dyn Stream<Item = Result<epb::LeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl epb::election_server::Election for ElectionService {
    async fn campaign(
        &self,
        req: Request<epb::CampaignRequest>,
    ) -> Result<Response<epb::CampaignResponse>, Status> {
        let c = self.0.caller(&req)?;
        let r = req.into_inner();
        check_waiter(&self.0, &c, &r.name, r.lease)?;
        let kv = acquire(&self.0.store, &r.name, r.lease, r.value, true).await?;
        Ok(Response::new(epb::CampaignResponse {
            header: self.0.header.at(self.0.store.revision()),
            leader: Some(leader_key(r.name, &kv)),
        }))
    }

    async fn proclaim(
        &self,
        req: Request<epb::ProclaimRequest>,
    ) -> Result<Response<epb::ProclaimResponse>, Status> {
        let c = self.0.caller(&req)?;
        let r = req.into_inner();
        let leader = r.leader.ok_or_else(not_leader)?;
        c.write(&leader.key, b"")?;
        let put = RequestOp::Put(PutRequest {
            key: leader.key.clone(),
            value: r.value,
            lease: leader.lease,
            ..PutRequest::default()
        });
        let resp = self
            .0
            .store
            .txn(guarded(&leader, put))
            .await
            .map_err(status)?;
        if !resp.succeeded {
            return Err(not_leader());
        }
        Ok(Response::new(epb::ProclaimResponse {
            header: self.0.header.at(resp.revision),
        }))
    }

    async fn leader(
        &self,
        req: Request<epb::LeaderRequest>,
    ) -> Result<Response<epb::LeaderResponse>, Status> {
        let c = self.0.caller(&req)?;
        let name = req.into_inner().name;
        c.read(&prefix_of(&name).key, &prefix_of(&name).end)?;
        let (kv, rev) = current_leader(&self.0.store, &name)?;
        let kv =
            kv.ok_or_else(|| Status::failed_precondition("etcdserver: election: no leader"))?;
        Ok(Response::new(epb::LeaderResponse {
            header: self.0.header.at(rev),
            kv: Some(kv_out(kv)),
        }))
    }

    type ObserveStream = ObserveStream;

    async fn observe(
        &self,
        req: Request<epb::LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let c = self.0.caller(&req)?;
        let name = req.into_inner().name;
        c.read(&prefix_of(&name).key, &prefix_of(&name).end)?;
        let store = self.0.store.clone();
        let header = self.0.header;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let (_, start) = current_leader(&store, &name)?;
        let (ws, mut events) = store.watch_stream();
        let spec = WatchSpec {
            range: prefix_of(&name),
            start_revision: start + 1,
            prev_kv: false,
            no_put: false,
            no_delete: false,
            progress_notify: false,
            watch_id: 0,
        };
        ws.create(spec)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        tokio::spawn(async move {
            let _ws = ws;
            let mut last: Option<(Bytes, i64)> = None;
            loop {
                let (kv, rev) = match current_leader(&store, &name) {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                if let Some(kv) = kv {
                    let id = (kv.key.clone(), kv.mod_revision);
                    if last.as_ref() != Some(&id) {
                        last = Some(id);
                        if tx
                            .send(Ok(epb::LeaderResponse {
                                header: header.at(rev),
                                kv: Some(kv_out(kv)),
                            }))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
                // Wait for any change under the election prefix, then look again.
                loop {
                    match events.recv().await {
                        Some(WatchMessage::Events { .. }) => break,
                        Some(WatchMessage::Canceled { .. }) | None => return,
                        Some(_) => {}
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn resign(
        &self,
        req: Request<epb::ResignRequest>,
    ) -> Result<Response<epb::ResignResponse>, Status> {
        let c = self.0.caller(&req)?;
        let leader = req.into_inner().leader.ok_or_else(not_leader)?;
        c.write(&leader.key, b"")?;
        let del = RequestOp::Delete(DeleteRequest {
            range: KeyRange::single(leader.key.clone()),
            prev_kv: false,
        });
        let resp = self
            .0
            .store
            .txn(guarded(&leader, del))
            .await
            .map_err(status)?;
        Ok(Response::new(epb::ResignResponse {
            header: self.0.header.at(resp.revision),
        }))
    }
}
