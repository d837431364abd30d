//! Applying write requests inside the committer's storage transaction.
//!
//! The applier runs on the committer thread only. It appends index entries for
//! revisions that are not durable yet; readers never see them because they read at
//! the last published (fsynced) revision.

use bytes::Bytes;
use redb::{ReadableTable, Table};
use tokio::time::Instant;

use crate::codec::{self, Record};
use crate::error::{Result, StoreError};
use crate::index::{Entry, Index};
use crate::lease::Lessor;
use crate::mvcc::{self, Fetch, Path};
use crate::ops::*;
use crate::types::{Event, EventKind, KeyValue, Revision};
use crate::wal;

/// A write handed to the committer.
#[derive(Debug, Clone)]
pub(crate) enum WriteReq {
    Put(PutRequest),
    Delete(DeleteRequest),
    Txn(TxnRequest),
    LeaseGrant { id: i64, ttl_secs: i64 },
    LeaseRevoke { id: i64 },
    Compact { revision: i64 },
}

/// The committer's answer.
#[derive(Debug, Clone)]
pub(crate) enum WriteResp {
    Put(PutResponse),
    Delete(DeleteResponse),
    Txn(TxnResponse),
    LeaseGrant {
        id: i64,
        ttl_secs: i64,
        revision: i64,
    },
    LeaseRevoke {
        revision: i64,
    },
    Compact {
        revision: i64,
    },
}

pub(crate) type KvTable<'t> = Table<'t, (u64, u32), &'static [u8]>;
pub(crate) type LeaseTable<'t> = Table<'t, i64, i64>;

pub(crate) fn rev_key(r: Revision) -> (u64, u32) {
    (r.main as u64, r.sub)
}

/// Reads records through any redb table handle.
pub(crate) struct TableFetch<'a, T>(pub(crate) &'a T);

impl<T: ReadableTable<(u64, u32), &'static [u8]>> Fetch for TableFetch<'_, T> {
    fn fetch(&self, rev: Revision) -> Result<Option<Record>> {
        match self.0.get(rev_key(rev)).map_err(StoreError::storage)? {
            Some(g) => Ok(Some(codec::decode(rev, g.value())?)),
            None => Ok(None),
        }
    }
}

pub(crate) struct Applier<'a, 't> {
    pub(crate) kv: &'a mut KvTable<'t>,
    pub(crate) leases: &'a mut LeaseTable<'t>,
    pub(crate) lessor: &'a mut Lessor,
    /// The last revision assigned (durable or staged in this batch).
    pub(crate) rev: i64,
    /// The last published (durable) revision when the batch started.
    pub(crate) published: i64,
    pub(crate) compact_rev: i64,
    pub(crate) events: Vec<Event>,
    pub(crate) want_prev: bool,
    pub(crate) no_space: bool,
    pub(crate) now: Instant,
    pub(crate) buf: Vec<u8>,
    /// The batch's physical changes, encoded for the write-ahead log.
    pub(crate) log: Vec<u8>,
    /// A compaction ran in this batch (its deletions are not logged).
    pub(crate) compacted: bool,
}

impl Applier<'_, '_> {
    pub(crate) fn apply(&mut self, index: &mut Index, req: &WriteReq) -> Result<WriteResp> {
        match req {
            WriteReq::Put(p) => {
                mvcc::precheck_put(index, p, self.rev, &|id| self.lessor.exists(id))?;
                if self.no_space {
                    return Err(StoreError::NoSpace);
                }
                let next = self.rev + 1;
                let mut sub = 0;
                let prev_kv = self.put(index, p, next, &mut sub)?;
                self.rev = next;
                Ok(WriteResp::Put(PutResponse {
                    revision: next,
                    prev_kv,
                }))
            }
            WriteReq::Delete(d) => {
                let next = self.rev + 1;
                let mut sub = 0;
                let (deleted, prev_kvs) = self.delete(index, d, next, &mut sub)?;
                if sub > 0 {
                    self.rev = next;
                }
                Ok(WriteResp::Delete(DeleteResponse {
                    revision: self.rev,
                    deleted,
                    prev_kvs,
                }))
            }
            WriteReq::Txn(t) => self.txn(index, t).map(WriteResp::Txn),
            WriteReq::LeaseGrant { id, ttl_secs } => {
                if self.no_space {
                    return Err(StoreError::NoSpace);
                }
                let id = if *id == 0 {
                    self.lessor.fresh_id()
                } else {
                    *id
                };
                if self.lessor.exists(id) {
                    return Err(StoreError::LeaseExists);
                }
                self.leases
                    .insert(id, *ttl_secs)
                    .map_err(StoreError::storage)?;
                wal::encode_lease_put(&mut self.log, id, *ttl_secs);
                self.lessor.grant(id, *ttl_secs, self.now);
                Ok(WriteResp::LeaseGrant {
                    id,
                    ttl_secs: *ttl_secs,
                    revision: self.rev,
                })
            }
            WriteReq::LeaseRevoke { id } => {
                let keys = self.lessor.revoke(*id).ok_or(StoreError::LeaseNotFound)?;
                self.leases.remove(*id).map_err(StoreError::storage)?;
                wal::encode_lease_del(&mut self.log, *id);
                let next = self.rev + 1;
                let mut sub = 0;
                for key in keys {
                    if let Some(e) = index.get(&key, next).copied()
                        && e.lease == *id
                    {
                        self.tombstone(index, Bytes::from(key), e, next, &mut sub)?;
                    }
                }
                if sub > 0 {
                    self.rev = next;
                }
                Ok(WriteResp::LeaseRevoke { revision: self.rev })
            }
            WriteReq::Compact { revision } => {
                if *revision <= self.compact_rev {
                    return Err(StoreError::AlreadyCompacted);
                }
                // Only a published (durable) revision may be compacted: compacting to one staged
                // earlier in this batch would fail readers at the still-current revision.
                if *revision > self.published {
                    return Err(StoreError::FutureRevision);
                }
                for r in index.compact(*revision) {
                    self.kv.remove(rev_key(r)).map_err(StoreError::storage)?;
                }
                self.compact_rev = *revision;
                // Deletions are not logged: a compaction makes its batch durable in redb.
                self.compacted = true;
                Ok(WriteResp::Compact { revision: self.rev })
            }
        }
    }

    fn txn(&mut self, index: &mut Index, t: &TxnRequest) -> Result<TxnResponse> {
        let read_rev = self.rev;
        let path = mvcc::plan(index, t, read_rev, &TableFetch(&*self.kv))?;
        let branch = if path.succeeded {
            &t.success
        } else {
            &t.failure
        };
        mvcc::precheck(index, branch, &path, read_rev, self.compact_rev, &|id| {
            self.lessor.exists(id)
        })?;
        if self.no_space && branch.iter().any(writes_data) {
            return Err(StoreError::NoSpace);
        }
        let next = self.rev + 1;
        let mut sub = 0;
        let mut responses = self.exec(index, branch, &path, next, &mut sub)?;
        if sub > 0 {
            self.rev = next;
        }
        set_revisions(&mut responses, self.rev);
        Ok(TxnResponse {
            revision: self.rev,
            succeeded: path.succeeded,
            responses,
        })
    }

    fn exec(
        &mut self,
        index: &mut Index,
        ops: &[RequestOp],
        path: &Path,
        next: i64,
        sub: &mut u32,
    ) -> Result<Vec<ResponseOp>> {
        let mut nested = path.nested.iter();
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            let resp = match op {
                RequestOp::Range(r) => {
                    // Reading at `next` sees this txn's own earlier writes.
                    let sel = mvcc::select(index, r, mvcc::txn_read_rev(r, next));
                    ResponseOp::Range(mvcc::materialize(
                        sel,
                        r,
                        &TableFetch(&*self.kv),
                        next,
                        self.compact_rev,
                    )?)
                }
                RequestOp::Put(p) => {
                    let prev_kv = self.put(index, p, next, sub)?;
                    ResponseOp::Put(PutResponse {
                        revision: next,
                        prev_kv,
                    })
                }
                RequestOp::Delete(d) => {
                    let (deleted, prev_kvs) = self.delete(index, d, next, sub)?;
                    ResponseOp::Delete(DeleteResponse {
                        revision: next,
                        deleted,
                        prev_kvs,
                    })
                }
                RequestOp::Txn(t) => {
                    let Some(np) = nested.next() else {
                        return Err(StoreError::Storage(
                            "txn plan does not match the request".into(),
                        ));
                    };
                    let branch = if np.succeeded { &t.success } else { &t.failure };
                    let responses = self.exec(index, branch, np, next, sub)?;
                    ResponseOp::Txn(TxnResponse {
                        revision: next,
                        succeeded: np.succeeded,
                        responses,
                    })
                }
            };
            out.push(resp);
        }
        Ok(out)
    }

    fn fetch_kv(&self, rev: Revision) -> Result<Option<KeyValue>> {
        Ok(TableFetch(&*self.kv)
            .fetch(rev)?
            .filter(|r| !r.tombstone)
            .map(|r| r.kv))
    }

    fn put(
        &mut self,
        index: &mut Index,
        p: &PutRequest,
        next: i64,
        sub: &mut u32,
    ) -> Result<Option<KeyValue>> {
        let prev = index.get(&p.key, next).copied();
        let prev_kv = match prev {
            Some(e) if p.prev_kv || p.ignore_value || self.want_prev => self.fetch_kv(e.rev)?,
            _ => None,
        };
        let value = if p.ignore_value {
            prev_kv
                .as_ref()
                .map(|kv| kv.value.clone())
                .unwrap_or_default()
        } else {
            p.value.clone()
        };
        let lease = if p.ignore_lease {
            prev.map(|e| e.lease).unwrap_or(0)
        } else {
            p.lease
        };
        let rev = Revision {
            main: next,
            sub: *sub,
        };
        *sub += 1;
        let (create, version) = match prev {
            Some(e) => (e.create, e.version + 1),
            None => (next, 1),
        };
        let kv = KeyValue {
            key: p.key.clone(),
            create_revision: create,
            mod_revision: next,
            version,
            value,
            lease,
        };
        codec::encode(&mut self.buf, false, &kv);
        self.kv
            .insert(rev_key(rev), self.buf.as_slice())
            .map_err(StoreError::storage)?;
        wal::encode_kv_put(&mut self.log, rev.main as u64, rev.sub, &self.buf);
        index.push(
            &p.key,
            Entry {
                rev,
                create,
                version,
                lease,
            },
        );
        if let Some(e) = prev
            && e.lease != 0
            && e.lease != lease
        {
            self.lessor.detach(e.lease, &p.key);
        }
        if lease != 0 {
            self.lessor.attach(lease, &p.key);
        }
        let event_prev = if self.want_prev {
            prev_kv.clone()
        } else {
            None
        };
        self.events.push(Event {
            kind: EventKind::Put,
            kv,
            prev_kv: event_prev,
        });
        Ok(if p.prev_kv { prev_kv } else { None })
    }

    fn delete(
        &mut self,
        index: &mut Index,
        d: &DeleteRequest,
        next: i64,
        sub: &mut u32,
    ) -> Result<(i64, Vec<KeyValue>)> {
        let mut victims: Vec<(Bytes, Entry)> = Vec::new();
        index.for_each_live(&d.range, next, |k, e| {
            victims.push((Bytes::copy_from_slice(k), *e));
            true
        });
        let mut prev_kvs = Vec::new();
        let deleted = victims.len() as i64;
        for (key, e) in victims {
            if let Some(kv) = self.tombstone(index, key, e, next, sub)?
                && d.prev_kv
            {
                prev_kvs.push(kv);
            }
        }
        Ok((deleted, prev_kvs))
    }

    /// Deletes one live key; returns its last key-value when it was read.
    fn tombstone(
        &mut self,
        index: &mut Index,
        key: Bytes,
        e: Entry,
        next: i64,
        sub: &mut u32,
    ) -> Result<Option<KeyValue>> {
        let prev_kv = self.fetch_kv(e.rev)?;
        let rev = Revision {
            main: next,
            sub: *sub,
        };
        *sub += 1;
        let kv = KeyValue {
            key: key.clone(),
            mod_revision: next,
            ..KeyValue::default()
        };
        codec::encode(&mut self.buf, true, &kv);
        self.kv
            .insert(rev_key(rev), self.buf.as_slice())
            .map_err(StoreError::storage)?;
        wal::encode_kv_put(&mut self.log, rev.main as u64, rev.sub, &self.buf);
        index.push(
            &key,
            Entry {
                rev,
                create: 0,
                version: 0,
                lease: 0,
            },
        );
        if e.lease != 0 {
            self.lessor.detach(e.lease, &key);
        }
        let event_prev = if self.want_prev {
            prev_kv.clone()
        } else {
            None
        };
        self.events.push(Event {
            kind: EventKind::Delete,
            kv,
            prev_kv: event_prev,
        });
        Ok(prev_kv)
    }
}

fn writes_data(op: &RequestOp) -> bool {
    match op {
        RequestOp::Put(_) => true,
        RequestOp::Txn(t) => t.success.iter().chain(&t.failure).any(writes_data),
        RequestOp::Range(_) | RequestOp::Delete(_) => false,
    }
}

/// etcd reports the txn's final revision in every nested response header.
fn set_revisions(responses: &mut [ResponseOp], rev: i64) {
    for r in responses {
        match r {
            ResponseOp::Range(x) => x.revision = rev,
            ResponseOp::Put(x) => x.revision = rev,
            ResponseOp::Delete(x) => x.revision = rev,
            ResponseOp::Txn(x) => {
                x.revision = rev;
                set_revisions(&mut x.responses, rev);
            }
        }
    }
}
