//! Reads, writes and transactions on the backend, each one [`Backend::call`] (so each
//! fails over), and the key helpers callers share: [`prefix_end`] and [`is_delete`].

use bytes::Bytes;
use meshwork_etcd::proto::etcdserverpb as pb;
use meshwork_etcd::proto::mvccpb;

use super::{Backend, Event, KeyValue};
use crate::error::Result;

/// Keys per page when loading a prefix.
pub const LOAD_PAGE: i64 = 5000;

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

/// True when `e` is a deletion.
pub fn is_delete(e: &Event) -> bool {
    e.r#type == mvccpb::event::EventType::Delete as i32
}

impl Backend {
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
            .range(pb::RangeRequest {
                key,
                range_end,
                limit,
                ..Default::default()
            })
            .await?;
        let rev = r.header.map(|h| h.revision).unwrap_or(0);
        Ok((r.kvs, rev))
    }

    /// One range read as given (sort order, keys only, a revision...), with
    /// failover.
    pub async fn range(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse> {
        self.call(|mut c| {
            let req = req.clone();
            async move { c.kv.range(req).await }
        })
        .await
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
}
