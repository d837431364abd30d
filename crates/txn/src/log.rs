//! The durable transaction log: one key per transaction,
//! `/meshwork/txn/records/{id}`, whose value is the JSON [`Txn`] record.
//! Every write is a compare-and-swap on the key's revision, so two
//! coordinators can never both advance one transaction: the one whose write
//! loses has been superseded and stops. Runs on Meshwork's store and on a
//! real etcd cluster alike (coord's etcd backend).

use bytes::Bytes;
use meshwork_coord::backend::{Backend, txn as t};
use meshwork_etcd::proto::etcdserverpb as pb;

use crate::machine::Txn;

/// Where the records live.
pub const PREFIX: &str = "/meshwork/txn/records/";

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

fn key(id: &str) -> String {
    format!("{PREFIX}{id}")
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
                compare: vec![t::absent(k.clone())],
                success: vec![t::put(k, encode(txn), 0)],
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
                compare: vec![t::mod_rev_is(k.clone(), revision)],
                success: vec![t::put(k, encode(txn), 0)],
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
}
