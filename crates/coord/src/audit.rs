//! The audit log: who changed what through the node's HTTP API — the caller
//! (an API token's id, the console's user, or `anonymous` when auth is off),
//! its address, the call, the scope it needed and the answer's status —
//! kept in the store under [`AUDIT_PREFIX`], newest found first, and dropped
//! after the retention by the store itself (each hour's entries share a
//! lease that lives as long as the retention).
//!
//! Recording never waits for the store: entries go to a bounded queue that
//! one writer drains in batches (one transaction each); when the queue is
//! full an entry is dropped and counted (`meshwork_audit_dropped_total`),
//! and a crash loses at most the queued entries.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::backend::{Backend, prefix_end};
use crate::error::{CoordError, Result};
use meshwork_etcd::proto::etcdserverpb as pb;

/// Where entries are kept: `AUDIT_PREFIX<20-digit Unix ms>-<node>-<sequence>`.
pub const AUDIT_PREFIX: &str = "/meshwork/audit/";
/// Entries waiting for the writer at most.
pub const QUEUE: usize = 4096;
/// Entries per write at most.
const BATCH: usize = 128;

/// One audited call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When, Unix ms.
    pub at_ms: u64,
    /// Who: `token:<id>`, `console:<user>` or `anonymous`.
    pub who: String,
    /// From which address.
    #[serde(default)]
    pub from: String,
    /// The HTTP method.
    pub method: String,
    /// The path (no query).
    pub path: String,
    /// The scope the call needed.
    #[serde(default)]
    pub scope: String,
    /// The answer's status.
    pub status: u16,
    /// The node that served it.
    #[serde(default)]
    pub node: String,
}

/// The audit log of this node. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<AuditEntry>,
    backend: Backend,
    node: String,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("node", &self.node)
            .finish()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl AuditLog {
    /// Starts the writer (on the current runtime; it ends with the last clone).
    pub fn start(backend: &Backend, node: &str, retention: Duration) -> AuditLog {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write(backend.clone(), node.to_string(), retention, rx));
        AuditLog {
            tx,
            backend: backend.clone(),
            node: node.to_string(),
        }
    }

    /// Queues `e` (stamped with this node); never waits.
    pub fn record(&self, mut e: AuditEntry) {
        e.node.clone_from(&self.node);
        if self.tx.try_send(e).is_err() {
            metrics::counter!("meshwork_audit_dropped_total").increment(1);
        }
    }

    /// Up to `limit` entries, newest first, at or after `since_ms`.
    pub async fn list(&self, limit: usize, since_ms: u64) -> Result<Vec<AuditEntry>> {
        let key = Bytes::from(format!("{AUDIT_PREFIX}{since_ms:020}"));
        let end = prefix_end(AUDIT_PREFIX.as_bytes());
        let r = self
            .backend
            .range(pb::RangeRequest {
                key,
                range_end: end,
                limit: i64::try_from(limit).unwrap_or(i64::MAX),
                sort_order: pb::range_request::SortOrder::Descend as i32,
                sort_target: pb::range_request::SortTarget::Key as i32,
                ..Default::default()
            })
            .await?;
        Ok(r.kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect())
    }
}

/// The writer: batches of queued entries, one transaction each, on the
/// current hour's lease.
async fn write(
    backend: Backend,
    node: String,
    retention: Duration,
    mut rx: mpsc::Receiver<AuditEntry>,
) {
    let ttl = i64::try_from(retention.as_secs())
        .unwrap_or(i64::MAX)
        .max(60);
    let mut lease: Option<(u64, i64)> = None;
    let mut seq: u64 = 0;
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let hour = now_ms() / 3_600_000;
        let id = match lease {
            Some((h, id)) if h == hour => id,
            _ => match backend.grant(ttl).await {
                Ok(id) => {
                    lease = Some((hour, id));
                    id
                }
                Err(e) => {
                    tracing::warn!(error = %e, dropped = batch.len(), "audit: no lease; entries dropped");
                    metrics::counter!("meshwork_audit_dropped_total").increment(batch.len() as u64);
                    batch.clear();
                    continue;
                }
            },
        };
        let ops = batch
            .drain(..)
            .map(|e| {
                seq += 1;
                let key = format!("{AUDIT_PREFIX}{:020}-{node}-{seq}", e.at_ms);
                pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                        key: Bytes::from(key),
                        value: Bytes::from(serde_json::to_vec(&e).unwrap_or_default()),
                        lease: id,
                        ..Default::default()
                    })),
                }
            })
            .collect::<Vec<_>>();
        let n = ops.len();
        let t = pb::TxnRequest {
            compare: vec![],
            success: ops,
            failure: vec![],
        };
        if let Err(e) = backend.txn(t).await {
            // The hour's lease may be gone (revoked, expired): a new one next time.
            if matches!(e, CoordError::NotFound(_) | CoordError::Invalid(_)) {
                lease = None;
            }
            tracing::warn!(error = %e, dropped = n, "audit: writing entries failed");
            metrics::counter!("meshwork_audit_dropped_total").increment(n as u64);
        } else {
            metrics::counter!("meshwork_audit_entries_total").increment(n as u64);
        }
    }
}
