//! The KV API (etcd's Range, Put, DeleteRange, Txn, Compact). Requests are
//! validated before they reach the committer; reads, read-only txns included, are
//! served from the index at `published` without it, so they never see a write a
//! crash could still lose.

use std::sync::atomic::Ordering;

use redb::ReadableDatabase;

use super::{KV, Store, unexpected};
use crate::apply::{TableFetch, WriteReq, WriteResp};
use crate::codec;
use crate::error::{Result, StoreError};
use crate::index::Index;
use crate::mvcc;
use crate::ops::*;
use crate::types::Revision;

impl Store {
    /// Reads a key or range (etcd `Range`).
    pub fn range(&self, r: &RangeRequest) -> Result<RangeResponse> {
        mvcc::validate_range(r, &self.shared.cfg)?;
        if !self.is_healthy() {
            return Err(StoreError::Stopped);
        }
        let (sel, cur, compact) = {
            let index = self.shared.index.read();
            let (rev, cur, compact) = self.read_rev(r.revision)?;
            (mvcc::select(&index, r, rev), cur, compact)
        };
        metrics::counter!("meshwork_store_ranges_total").increment(1);
        if sel.hits.is_empty() || (r.keys_only && r.sort_target != SortTarget::Value) {
            return mvcc::materialize(sel, r, &NoFetch, cur, compact);
        }
        self.with_kv(|t| mvcc::materialize(sel, r, &TableFetch(t), cur, compact))
    }

    fn read_rev(&self, requested: i64) -> Result<(i64, i64, i64)> {
        let cur = self.shared.published.load(Ordering::Acquire);
        let compact = self.shared.compact_rev.load(Ordering::Acquire);
        let rev = if requested <= 0 { cur } else { requested };
        if rev > cur {
            return Err(StoreError::FutureRevision);
        }
        if rev < compact {
            return Err(StoreError::Compacted {
                compact_revision: compact,
            });
        }
        Ok((rev, cur, compact))
    }

    pub(super) fn with_kv<T>(
        &self,
        f: impl FnOnce(&redb::ReadOnlyTable<(u64, u32), &'static [u8]>) -> Result<T>,
    ) -> Result<T> {
        let rtx = {
            // Recursive: callers may hold the index lock, which the committer takes while
            // it holds this lock; a fair `read` would queue behind a waiting `defragment`
            // (a writer) and deadlock all three.
            let db = self.shared.db.read_recursive();
            let db = db.as_ref().ok_or(StoreError::Stopped)?;
            db.begin_read().map_err(StoreError::storage)?
        };
        let table = rtx.open_table(KV).map_err(StoreError::storage)?;
        f(&table)
    }

    /// Writes a key (etcd `Put`); returns after the write is durable.
    pub async fn put(&self, p: PutRequest) -> Result<PutResponse> {
        mvcc::check_put(&p, &self.shared.cfg)?;
        metrics::counter!("meshwork_store_puts_total").increment(1);
        match self.submit(WriteReq::Put(p)).await? {
            WriteResp::Put(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes a key or range (etcd `DeleteRange`).
    pub async fn delete(&self, d: DeleteRequest) -> Result<DeleteResponse> {
        mvcc::check_range(&d.range, &self.shared.cfg)?;
        match self.submit(WriteReq::Delete(d)).await? {
            WriteResp::Delete(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Runs a transaction (etcd `Txn`). Read-only txns are served without the committer.
    pub async fn txn(&self, t: TxnRequest) -> Result<TxnResponse> {
        mvcc::check_txn(&t, &self.shared.cfg)?;
        metrics::counter!("meshwork_store_txns_total").increment(1);
        if !t.is_write() {
            return self.read_txn(&t);
        }
        match self.submit(WriteReq::Txn(t)).await? {
            WriteResp::Txn(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    fn read_txn(&self, t: &TxnRequest) -> Result<TxnResponse> {
        if !self.is_healthy() {
            return Err(StoreError::Stopped);
        }
        let index = self.shared.index.read();
        let (rev, cur, compact) = self.read_rev(0)?;
        self.with_kv(|table| {
            let f = TableFetch(table);
            let path = mvcc::plan(&index, t, rev, &f)?;
            mvcc::precheck(
                &index,
                if path.succeeded {
                    &t.success
                } else {
                    &t.failure
                },
                &path,
                rev,
                compact,
                &|_| true,
            )?;
            let responses = read_branch(&index, t, &path, rev, cur, compact, &f)?;
            Ok(TxnResponse {
                revision: cur,
                succeeded: path.succeeded,
                responses,
            })
        })
    }

    /// Compacts history below `revision` (etcd `Compact`).
    pub async fn compact(&self, revision: i64) -> Result<i64> {
        match self.submit(WriteReq::Compact { revision }).await? {
            WriteResp::Compact { revision } => Ok(revision),
            other => Err(unexpected(other)),
        }
    }
}

struct NoFetch;

impl mvcc::Fetch for NoFetch {
    fn fetch(&self, _rev: Revision) -> Result<Option<codec::Record>> {
        Ok(None)
    }
}

fn read_branch(
    index: &Index,
    t: &TxnRequest,
    path: &mvcc::Path,
    rev: i64,
    cur: i64,
    compact: i64,
    f: &dyn mvcc::Fetch,
) -> Result<Vec<ResponseOp>> {
    let ops = if path.succeeded {
        &t.success
    } else {
        &t.failure
    };
    let mut nested = path.nested.iter();
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            RequestOp::Range(r) => {
                let sel = mvcc::select(index, r, mvcc::txn_read_rev(r, rev));
                out.push(ResponseOp::Range(mvcc::materialize(
                    sel, r, f, cur, compact,
                )?));
            }
            RequestOp::Txn(inner) => {
                let Some(np) = nested.next() else { break };
                let responses = read_branch(index, inner, np, rev, cur, compact, f)?;
                out.push(ResponseOp::Txn(TxnResponse {
                    revision: cur,
                    succeeded: np.succeeded,
                    responses,
                }));
            }
            RequestOp::Put(_) | RequestOp::Delete(_) => {
                return Err(StoreError::Storage("read-only txn holds a write".into()));
            }
        }
    }
    Ok(out)
}
