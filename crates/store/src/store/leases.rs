//! The lease API (grant, revoke, keep-alive, time-to-live, list) and the lease
//! deadlines the store writes down and resumes from. The lessor itself (TTLs,
//! deadlines, attached keys) is `crate::lease`; expiry ticks in `background`.
//!
//! Grants and revokes are durable; deadlines live in memory and are written down as
//! wall-clock times every `lease_checkpoint_interval` when one changed, and on
//! close. On open a lease resumes at its written deadline plus one interval, never
//! past a full TTL; one already past it is revoked by the first writes the committer
//! applies, and `Store::settled` awaits those revokes.

use std::path::Path;

use tokio::sync::oneshot;
use tokio::time::{Duration, Instant};

use super::{Cmd, Shared, Store, unexpected};
use crate::apply::{WriteReq, WriteResp};
use crate::config::StoreConfig;
use crate::error::{Result, StoreError};
use crate::lease::{LeaseInfo, Lessor};

impl Store {
    /// Grants a lease; `id == 0` lets the store choose. Returns (id, ttl, revision).
    ///
    /// As etcd 3.4's lessor: a TTL above the maximum is refused; a TTL below the
    /// minimum, zero or negative included, is raised to the minimum; any non-zero id,
    /// negative ones included, is the client's choice.
    pub async fn lease_grant(&self, id: i64, ttl_secs: i64) -> Result<(i64, i64, i64)> {
        if ttl_secs > self.shared.cfg.max_lease_ttl_secs {
            return Err(StoreError::LeaseTtlTooLarge);
        }
        let ttl = ttl_secs.max(self.shared.cfg.min_lease_ttl_secs);
        match self
            .submit(WriteReq::LeaseGrant { id, ttl_secs: ttl })
            .await?
        {
            WriteResp::LeaseGrant {
                id,
                ttl_secs,
                revision,
            } => Ok((id, ttl_secs, revision)),
            other => Err(unexpected(other)),
        }
    }

    /// Revokes a lease and deletes its keys in one revision; returns the revision.
    pub async fn lease_revoke(&self, id: i64) -> Result<i64> {
        match self.submit(WriteReq::LeaseRevoke { id }).await? {
            WriteResp::LeaseRevoke { revision } => Ok(revision),
            other => Err(unexpected(other)),
        }
    }

    /// Renews a lease to its full TTL; returns the TTL.
    pub fn lease_keep_alive(&self, id: i64) -> Result<i64> {
        self.shared
            .lessor
            .lock()
            .keep_alive(id, Instant::now())
            .ok_or(StoreError::LeaseNotFound)
    }

    /// Reports a lease's TTLs and, optionally, its keys.
    pub fn lease_time_to_live(&self, id: i64, keys: bool) -> Option<LeaseInfo> {
        self.shared.lessor.lock().info(id, keys, Instant::now())
    }

    /// IDs of all leases.
    pub fn lease_list(&self) -> Vec<i64> {
        self.shared.lessor.lock().ids()
    }

    /// Waits until the leases that expired while the store was closed are
    /// revoked, with their keys (queued at open ahead of every other write).
    /// Call it before serving clients, so none reads such a key.
    pub async fn settled(&self) {
        let pending = std::mem::take(&mut *self.shared.settling.lock());
        for (id, rx) in pending {
            match rx.await {
                Ok(Ok(_)) => {
                    metrics::counter!("meshwork_store_leases_expired_total").increment(1);
                    tracing::info!(
                        lease = id,
                        "lease expired while the store was closed; revoked"
                    );
                }
                Ok(Err(StoreError::LeaseNotFound)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(lease = id, error = %e, "revoking a lease that expired while closed failed; the lease loop retries");
                    self.shared.lessor.lock().unmark_expiring(id);
                }
                Err(_) => {}
            }
        }
    }
}

/// Queues the revokes of leases that expired while the store was closed, ahead of
/// every other write; `Store::settled` awaits them.
pub(super) fn queue_expired_revokes(shared: &Shared, expired: Vec<i64>) {
    if let Some(tx) = shared.tx.lock().as_ref() {
        let mut settling = shared.settling.lock();
        for id in expired {
            let (reply, rx) = oneshot::channel();
            if tx
                .try_send(Cmd::Write(WriteReq::LeaseRevoke { id }, reply))
                .is_ok()
            {
                settling.push((id, rx));
            }
        }
    }
}

/// Lease deadlines as Unix milliseconds.
pub(super) fn wall_deadlines(deadlines: &[(i64, Instant)]) -> Vec<(i64, u64)> {
    let now = Instant::now();
    let wall = unix_ms();
    deadlines
        .iter()
        .map(|(id, d)| {
            let left = d.saturating_duration_since(now).as_millis();
            (
                *id,
                wall.saturating_add(u64::try_from(left).unwrap_or(u64::MAX)),
            )
        })
        .collect()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(super) fn save_lease_deadlines(
    dir: &Path,
    deadlines: &[(i64, Instant)],
) -> std::io::Result<()> {
    crate::lease::save_deadlines(dir, &wall_deadlines(deadlines))
}

/// Resumes leases from the checkpointed deadlines (plus one checkpoint
/// interval: a renewal after the last checkpoint is not lost); returns those
/// whose time ran out while the store was closed, now marked expiring.
pub(super) fn resume_leases(
    lessor: &mut Lessor,
    dir: &Path,
    cfg: &StoreConfig,
    now: Instant,
) -> Vec<i64> {
    if cfg.lease_checkpoint_interval.is_zero() {
        let _ = std::fs::remove_file(dir.join(crate::lease::DEADLINES_FILE));
        return Vec::new();
    }
    let Some(saved) = crate::lease::load_deadlines(dir) else {
        return Vec::new();
    };
    let wall = unix_ms();
    let margin = u64::try_from(cfg.lease_checkpoint_interval.as_millis()).unwrap_or(u64::MAX);
    for id in lessor.ids() {
        let Some(at) = saved.get(&id) else { continue };
        let until = at.saturating_add(margin);
        let left = Duration::from_millis(until.saturating_sub(wall));
        lessor.resume(id, now + left, now);
    }
    lessor.take_expired(now)
}
