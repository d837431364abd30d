//! Worker-id claims: [`claim_worker`] takes a free worker id for a node with an
//! `absent(key)` transaction on the node's session lease, and reads the worker's
//! high-water mark in that same transaction ([`WorkerClaim`]).

use meshwork_etcd::proto::etcdserverpb as pb;
use serde::{Deserialize, Serialize};

use super::clock::wall_ms;
use super::{IdLayout, WORKERS_PREFIX, hwm_key, worker_key};
use crate::backend::{Backend, KeyValue, txn};
use crate::error::{CoordError, Result};

/// The value of a claim key.
#[derive(Debug, Serialize, Deserialize)]
struct ClaimRecord {
    node: String,
    claimed_at_ms: u64,
    /// Random per claim attempt: recognises our own claim after a retried txn.
    #[serde(default)]
    token: String,
}

/// A worker id held by a session lease; turn it into a generator with
/// [`IdGenerator::start_claimed`](super::IdGenerator::start_claimed). Not `Clone`: one
/// claim, one generator.
#[derive(Debug)]
pub struct WorkerClaim {
    pub(super) layout: IdLayout,
    pub(super) worker: u32,
    node: String,
    pub(super) lease: i64,
    pub(super) create_revision: i64,
    pub(super) hwm_ms: u64,
}

impl WorkerClaim {
    /// The layout the worker id was claimed under.
    pub fn layout(&self) -> &IdLayout {
        &self.layout
    }

    /// The worker id.
    pub fn worker(&self) -> u32 {
        self.worker
    }

    /// The node name recorded in the claim.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The lease the claim key is on.
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// The create revision of the claim key (what renewals compare against).
    pub fn create_revision(&self) -> i64 {
        self.create_revision
    }

    /// The high-water mark read when claiming: ids must have timestamps above it.
    pub fn high_water_mark_ms(&self) -> u64 {
        self.hwm_ms
    }
}

/// FNV-1a: a hash that is stable across builds, so a node tends to get its worker back.
fn fnv1a(s: &str) -> u64 {
    let mut h = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut h, s.as_bytes());
    std::hash::Hasher::finish(&h)
}

fn parse_hwm(kvs: &[KeyValue]) -> Result<u64> {
    let Some(kv) = kvs.first() else {
        return Ok(0);
    };
    std::str::from_utf8(&kv.value)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(|| CoordError::Corrupt {
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            reason: "expected a decimal number of Unix milliseconds".into(),
        })
}

/// Claims a free worker id for `node` on `lease` (the node's session lease, kept
/// alive by the caller), and reads its high-water mark in the same transaction.
///
/// The scan starts at `hash(node) mod 2^worker_bits` and moves forward over the ids
/// that one read of the claims shows free, taking the first whose `absent(key)`
/// transaction wins. Fails with [`CoordError::Conflict`] when every worker id is
/// held by a live session.
pub async fn claim_worker(
    backend: &Backend,
    layout: &IdLayout,
    lease: i64,
    node: &str,
) -> Result<WorkerClaim> {
    check_claim_request(layout, lease, node)?;
    let workers = layout.workers();
    let (kvs, _) = backend.get_prefix(WORKERS_PREFIX, 0).await?;
    let taken = taken_workers(&kvs, workers);
    let token = format!("{:016x}", rand::random::<u64>());
    let record = ClaimRecord {
        node: node.to_string(),
        claimed_at_ms: wall_ms(),
        token: token.clone(),
    };
    let value = serde_json::to_vec(&record).map_err(|e| CoordError::invalid(e.to_string()))?;
    let start = u32::try_from(fnv1a(node) % u64::from(workers)).unwrap_or(0);
    let mut lost_races = 0u32;
    for i in 0..workers {
        let worker = (start + i) % workers;
        if taken[worker as usize] {
            continue;
        }
        let Some((create_revision, hwm_ms)) =
            try_claim(backend, worker, &value, lease, &token).await?
        else {
            lost_races += 1;
            continue;
        };
        tracing::info!(worker, %node, lease, hwm_ms, "claimed id worker");
        return Ok(WorkerClaim {
            layout: layout.clone(),
            worker,
            node: node.to_string(),
            lease,
            create_revision,
            hwm_ms,
        });
    }
    Err(CoordError::Conflict(format!(
        "all {workers} worker ids ({} worker bits) are taken by live sessions \
         ({} claims under {WORKERS_PREFIX}, {lost_races} lost to concurrent claimers); \
         wait for a node to stop or use a layout with more worker bits",
        layout.worker_bits,
        kvs.len()
    )))
}

/// Refuses an invalid layout, a claim without a session lease and a bad node name.
fn check_claim_request(layout: &IdLayout, lease: i64, node: &str) -> Result<()> {
    layout.validate()?;
    if lease <= 0 {
        return Err(CoordError::invalid(format!(
            "a worker claim must be on the node's session lease; got lease {lease}"
        )));
    }
    if node.is_empty() || node.len() > 256 {
        return Err(CoordError::invalid(format!(
            "node name must be 1..=256 bytes, got {} bytes",
            node.len()
        )));
    }
    Ok(())
}

/// Which of the `workers` ids the claim keys `kvs` show held.
fn taken_workers(kvs: &[KeyValue], workers: u32) -> Vec<bool> {
    let mut taken = vec![false; workers as usize];
    for kv in kvs {
        let suffix = kv
            .key
            .strip_prefix(WORKERS_PREFIX.as_bytes())
            .unwrap_or(&[]);
        if let Some(w) = std::str::from_utf8(suffix)
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            && let Some(t) = taken.get_mut(w as usize)
        {
            *t = true;
        }
    }
    taken
}

/// One claim attempt on `worker`: its claim key created with `value` on `lease` if
/// absent, read back with the high-water mark in the same transaction. The claim's
/// create revision and the mark, or `None` when another session holds the worker.
async fn try_claim(
    backend: &Backend,
    worker: u32,
    value: &[u8],
    lease: i64,
    token: &str,
) -> Result<Option<(i64, u64)>> {
    let (key, hkey) = (worker_key(worker), hwm_key(worker));
    let r = backend
        .txn(pb::TxnRequest {
            compare: vec![txn::absent(key.clone())],
            success: vec![
                txn::put(key.clone(), value.to_vec(), lease),
                txn::get(hkey.clone()),
            ],
            failure: vec![txn::get(key.clone()), txn::get(hkey)],
        })
        .await?;
    let create_revision = if r.succeeded {
        txn::revision(&r)
    } else {
        // Ours after all? (A retried txn whose first attempt landed.)
        let cur = txn::range_kvs(&r, 0);
        match cur.first() {
            Some(kv)
                if kv.lease == lease
                    && serde_json::from_slice::<ClaimRecord>(&kv.value)
                        .is_ok_and(|c| c.token == token) =>
            {
                kv.create_revision
            }
            _ => return Ok(None),
        }
    };
    let hwm_ms = parse_hwm(&txn::range_kvs(&r, 1))?;
    Ok(Some((create_revision, hwm_ms)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn node_hash_is_stable() {
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(worker_key(7), "/meshwork/ids/workers/00007");
        assert_eq!(hwm_key(1023), "/meshwork/ids/hwm/01023");
    }
}
