//! The durable transaction log: one key per transaction,
//! `/meshwork/txn/records/{id}`, whose value is the JSON [`Txn`] record.
//! Every write is a compare-and-swap on the key's revision, so two
//! coordinators can never both advance one transaction: the one whose write
//! loses has been superseded and stops. Runs on Meshwork's store and on a
//! real etcd cluster alike (coord's etcd backend).
//!
//! Two indexes are written in the same store transaction as the record, so
//! they never disagree with it:
//! - `/meshwork/txn/open/{id}` (value: the coordinator's name) while the
//!   transaction is unfinished — what takeover scans read, however many
//!   finished records there are;
//! - `/meshwork/txn/done/{finished_ms:016x}/{id}` once it is final — by
//!   time, so the newest are listed and the expired deleted without reading
//!   every record.

use bytes::Bytes;
use meshwork_coord::backend::{Backend, txn as t};
use meshwork_etcd::proto::etcdserverpb as pb;

use crate::machine::Txn;

/// Where the records live.
pub const PREFIX: &str = "/meshwork/txn/records/";
/// The index of unfinished transactions.
pub const OPEN_PREFIX: &str = "/meshwork/txn/open/";
/// The index of finished transactions, by finishing time.
pub const DONE_PREFIX: &str = "/meshwork/txn/done/";
/// Most transactions one store transaction of [`TxnLog::expire`] deletes
/// (two operations each) or of [`TxnLog::recent`] reads: under etcd's
/// default limit of 128 operations.
pub const EXPIRE_BATCH: usize = 60;

/// Why a log operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A transaction with this id exists already.
    #[error("transaction {0} already exists")]
    Exists(String),
    /// The record moved since it was read: another coordinator advanced it.
    #[error("transaction {0} was advanced by another coordinator")]
    Superseded(String),
    /// The store failed.
    #[error("transaction log: {0}")]
    Store(#[from] meshwork_coord::CoordError),
    /// A stored record does not parse (written by a newer version, or damaged).
    #[error("transaction record {key}: {message}")]
    Corrupt {
        /// Its key.
        key: String,
        /// The parse error.
        message: String,
    },
}

/// A record and the store revision it was read or written at.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The record.
    pub txn: Txn,
    /// Its key's mod revision (the compare of the next write).
    pub revision: i64,
}

/// The log, on a coordination backend.
#[derive(Clone)]
pub struct TxnLog {
    backend: Backend,
}

impl TxnLog {
    /// Follows record `id` from the write after `revision`: the stream yields
    /// when the record changes (read it again for its content).
    pub fn watch(&self, id: &str, revision: i64) -> meshwork_coord::backend::WatchStream {
        self.backend
            .watch_range(Bytes::from(key(id)), Bytes::new(), revision + 1)
    }
}

fn key(id: &str) -> String {
    format!("{PREFIX}{id}")
}

fn open_key(id: &str) -> String {
    format!("{OPEN_PREFIX}{id}")
}

fn done_key(finished: u64, id: &str) -> String {
    format!("{DONE_PREFIX}{finished:016x}/{id}")
}

/// The record's write and its index entries.
fn writes(txn: &Txn) -> Vec<pb::RequestOp> {
    let mut ops = vec![t::put(key(&txn.id), encode(txn), 0)];
    if txn.status.is_final() {
        let finished = txn.history.last().map_or(txn.created, |h| h.at);
        ops.push(t::delete(open_key(&txn.id)));
        ops.push(t::put(done_key(finished, &txn.id), Bytes::new(), 0));
    } else {
        ops.push(t::put(open_key(&txn.id), txn.coordinator.clone(), 0));
    }
    ops
}

fn encode(txn: &Txn) -> Bytes {
    // A Txn is plain data (strings, numbers, JSON values): encoding cannot fail.
    Bytes::from(serde_json::to_vec(txn).unwrap_or_default())
}

fn decode(key: &[u8], value: &[u8], revision: i64) -> Result<Stored, LogError> {
    serde_json::from_slice(value)
        .map(|txn| Stored { txn, revision })
        .map_err(|e| LogError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            message: e.to_string(),
        })
}

impl TxnLog {
    /// The log on `backend`.
    pub fn new(backend: Backend) -> TxnLog {
        TxnLog { backend }
    }

    /// Writes a new record; fails with [`LogError::Exists`] if the id is taken.
    pub async fn create(&self, txn: &Txn) -> Result<i64, LogError> {
        let k = key(&txn.id);
        let r = self
            .backend
            .txn(pb::TxnRequest {
                compare: vec![t::absent(k)],
                success: writes(txn),
                failure: vec![],
            })
            .await?;
        if !r.succeeded {
            return Err(LogError::Exists(txn.id.clone()));
        }
        Ok(t::revision(&r))
    }

    /// Reads one record.
    pub async fn load(&self, id: &str) -> Result<Option<Stored>, LogError> {
        let (kv, _) = self.backend.get(key(id)).await?;
        kv.map(|kv| decode(&kv.key, &kv.value, kv.mod_revision))
            .transpose()
    }

    /// Writes `txn` over the record read at `revision`; the new revision, or
    /// [`LogError::Superseded`] when someone else wrote it meanwhile.
    pub async fn save(&self, txn: &Txn, revision: i64) -> Result<i64, LogError> {
        let k = key(&txn.id);
        let r = self
            .backend
            .txn(pb::TxnRequest {
                compare: vec![t::mod_rev_is(k, revision)],
                success: writes(txn),
                failure: vec![],
            })
            .await?;
        if !r.succeeded {
            return Err(LogError::Superseded(txn.id.clone()));
        }
        Ok(t::revision(&r))
    }

    /// Every record (at most `limit`, 0 = all), by id.
    pub async fn list(&self, limit: i64) -> Result<Vec<Stored>, LogError> {
        let (kvs, _) = self.backend.get_prefix(PREFIX, limit).await?;
        kvs.iter()
            .map(|kv| decode(&kv.key, &kv.value, kv.mod_revision))
            .collect()
    }

    /// Every unfinished transaction: its id and coordinator (from the open
    /// index; one consistent read, in pages).
    pub async fn open(&self) -> Result<Vec<(String, String)>, LogError> {
        let (kvs, _) = self.backend.load_prefix(OPEN_PREFIX).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                let id = kv.key.strip_prefix(OPEN_PREFIX.as_bytes())?;
                Some((
                    String::from_utf8_lossy(id).into_owned(),
                    String::from_utf8_lossy(&kv.value).into_owned(),
                ))
            })
            .collect())
    }

    /// The ids of finished transactions, newest first (at most `limit`),
    /// or oldest first finished before `before_ms` (`before_ms` given).
    async fn done(
        &self,
        limit: i64,
        before_ms: Option<u64>,
    ) -> Result<Vec<(String, String)>, LogError> {
        let start = Bytes::from(DONE_PREFIX);
        let end = match before_ms {
            Some(ms) => Bytes::from(format!("{DONE_PREFIX}{ms:016x}")),
            None => meshwork_coord::backend::prefix_end(DONE_PREFIX.as_bytes()),
        };
        let order = if before_ms.is_none() {
            pb::range_request::SortOrder::Descend
        } else {
            pb::range_request::SortOrder::Ascend
        };
        let r = self
            .backend
            .range(pb::RangeRequest {
                key: start,
                range_end: end,
                limit,
                keys_only: true,
                sort_order: order as i32,
                sort_target: pb::range_request::SortTarget::Key as i32,
                ..Default::default()
            })
            .await?;
        Ok(r.kvs
            .iter()
            .filter_map(|kv| {
                let k = std::str::from_utf8(&kv.key).ok()?;
                let (_, id) = k.strip_prefix(DONE_PREFIX)?.split_once('/')?;
                Some((id.to_owned(), k.to_owned()))
            })
            .collect())
    }

    /// The unfinished transactions and the `finished` most recently
    /// finished ones, newest first.
    pub async fn recent(&self, finished: i64) -> Result<Vec<Stored>, LogError> {
        let mut ids: Vec<String> = self.open().await?.into_iter().map(|(id, _)| id).collect();
        if finished > 0 {
            ids.extend(
                self.done(finished, None)
                    .await?
                    .into_iter()
                    .map(|(id, _)| id),
            );
        }
        // Read in batches of one store transaction each, not a round trip
        // per record; a record gone meanwhile (expired) is skipped.
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(EXPIRE_BATCH) {
            let r = self
                .backend
                .txn(pb::TxnRequest {
                    compare: vec![],
                    success: batch.iter().map(|id| t::get(key(id))).collect(),
                    failure: vec![],
                })
                .await?;
            for i in 0..batch.len() {
                for kv in t::range_kvs(&r, i) {
                    out.push(decode(&kv.key, &kv.value, kv.mod_revision)?);
                }
            }
        }
        out.sort_by_key(|s| std::cmp::Reverse(s.txn.created));
        Ok(out)
    }

    /// Deletes up to `limit` transactions that finished before `before_ms`
    /// (record and index entry together); how many.
    pub async fn expire(&self, before_ms: u64, limit: i64) -> Result<usize, LogError> {
        let old = self.done(limit, Some(before_ms)).await?;
        for batch in old.chunks(EXPIRE_BATCH) {
            let success = batch
                .iter()
                .flat_map(|(id, done)| [t::delete(key(id)), t::delete(done.clone())])
                .collect();
            self.backend
                .txn(pb::TxnRequest {
                    compare: vec![],
                    success,
                    failure: vec![],
                })
                .await?;
        }
        Ok(old.len())
    }
}
