//! The lessor: leases granted, their deadlines and the keys attached to them.
//!
//! Grants and revokes are durable (written by the committer). Deadlines live in
//! memory and are checkpointed as wall-clock times every
//! `lease_checkpoint_interval` (only when one changed) to the `lease-deadlines`
//! file, so a restart resumes each lease with its remaining time plus at most
//! one interval — not a full new TTL as etcd does — and revokes at once a lease
//! that expired while the node was down. Deadlines use `tokio::time::Instant`,
//! so expiry is testable with a paused clock.

use std::collections::{BTreeSet, HashMap, HashSet};

use tokio::time::{Duration, Instant};

/// What a lease holds.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    pub(crate) ttl_secs: i64,
    pub(crate) deadline: Instant,
    pub(crate) keys: BTreeSet<Vec<u8>>,
}

/// A lease as reported to callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The lease ID.
    pub id: i64,
    /// TTL granted, in seconds.
    pub granted_ttl_secs: i64,
    /// Seconds left before expiry (rounded up).
    pub remaining_ttl_secs: i64,
    /// Attached keys, when requested.
    pub keys: Vec<Vec<u8>>,
}

/// All leases.
#[derive(Debug, Default)]
pub(crate) struct Lessor {
    leases: HashMap<i64, Lease>,
    /// Leases whose expiry was handed to the committer and not yet applied.
    expiring: HashSet<i64>,
    next_id: i64,
    /// A deadline changed since the last checkpoint.
    dirty: bool,
}

impl Lessor {
    pub(crate) fn new(seed: i64) -> Self {
        Self {
            leases: HashMap::new(),
            expiring: HashSet::new(),
            next_id: seed.max(1),
            dirty: true,
        }
    }

    pub(crate) fn exists(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    /// A fresh positive ID not in use.
    pub(crate) fn fresh_id(&mut self) -> i64 {
        loop {
            let id = self.next_id;
            self.next_id = if self.next_id >= i64::MAX - 1 {
                1
            } else {
                self.next_id + 1
            };
            if !self.leases.contains_key(&id) {
                return id;
            }
        }
    }

    pub(crate) fn grant(&mut self, id: i64, ttl_secs: i64, now: Instant) {
        let lease = Lease {
            ttl_secs,
            deadline: now + secs(ttl_secs),
            keys: BTreeSet::new(),
        };
        self.leases.insert(id, lease);
        self.dirty = true;
    }

    /// Removes the lease; returns its keys.
    pub(crate) fn revoke(&mut self, id: i64) -> Option<BTreeSet<Vec<u8>>> {
        self.expiring.remove(&id);
        self.dirty = true;
        self.leases.remove(&id).map(|l| l.keys)
    }

    /// Renews the lease to a full TTL; returns the TTL, or `None` if unknown or expired.
    pub(crate) fn keep_alive(&mut self, id: i64, now: Instant) -> Option<i64> {
        let lease = self.leases.get_mut(&id)?;
        if lease.deadline <= now || self.expiring.contains(&id) {
            return None;
        }
        lease.deadline = now + secs(lease.ttl_secs);
        self.dirty = true;
        Some(lease.ttl_secs)
    }

    pub(crate) fn attach(&mut self, id: i64, key: &[u8]) {
        if let Some(l) = self.leases.get_mut(&id) {
            l.keys.insert(key.to_vec());
        }
    }

    pub(crate) fn detach(&mut self, id: i64, key: &[u8]) {
        if let Some(l) = self.leases.get_mut(&id) {
            l.keys.remove(key);
        }
    }

    pub(crate) fn info(&self, id: i64, with_keys: bool, now: Instant) -> Option<LeaseInfo> {
        let l = self.leases.get(&id)?;
        let left = l.deadline.saturating_duration_since(now);
        let remaining = if left.is_zero() {
            -1
        } else {
            left.as_millis().div_ceil(1000) as i64
        };
        Some(LeaseInfo {
            id,
            granted_ttl_secs: l.ttl_secs,
            remaining_ttl_secs: remaining,
            keys: if with_keys {
                l.keys.iter().cloned().collect()
            } else {
                Vec::new()
            },
        })
    }

    pub(crate) fn ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.leases.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Leases past their deadline not yet handed out; marks them as expiring.
    pub(crate) fn take_expired(&mut self, now: Instant) -> Vec<i64> {
        let expired: Vec<i64> = self
            .leases
            .iter()
            .filter(|(id, l)| l.deadline <= now && !self.expiring.contains(id))
            .map(|(id, _)| *id)
            .collect();
        self.expiring.extend(&expired);
        expired
    }

    /// Gives an expiring lease back (its revoke failed and will be retried).
    pub(crate) fn unmark_expiring(&mut self, id: i64) {
        self.expiring.remove(&id);
    }

    /// Renews every lease to a full TTL (after restart).
    pub(crate) fn renew_all(&mut self, now: Instant) {
        for l in self.leases.values_mut() {
            l.deadline = now + secs(l.ttl_secs);
        }
    }

    /// Every deadline, if one changed since the last call (then clears the
    /// mark).
    pub(crate) fn take_deadlines(&mut self) -> Option<Vec<(i64, Instant)>> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        Some(self.deadlines())
    }

    /// Every lease's deadline.
    pub(crate) fn deadlines(&self) -> Vec<(i64, Instant)> {
        self.leases
            .iter()
            .map(|(id, l)| (*id, l.deadline))
            .collect()
    }

    /// Asks for the next checkpoint to write (the last one failed).
    pub(crate) fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Brings a lease's deadline forward to `deadline` (never later than a
    /// full TTL from `now`); after a restart, from the checkpointed time.
    pub(crate) fn resume(&mut self, id: i64, deadline: Instant, now: Instant) {
        if let Some(l) = self.leases.get_mut(&id) {
            l.deadline = deadline.min(now + secs(l.ttl_secs));
            self.dirty = true;
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.leases.len()
    }
}

/// File of checkpointed lease deadlines in the data directory.
pub(crate) const DEADLINES_FILE: &str = "lease-deadlines";
const DEADLINES_MAGIC: &[u8; 8] = b"MWLEASE1";

/// Writes `(lease id, deadline as Unix ms)` pairs to `dir`, atomically and
/// durably (temporary file, fsync, rename, directory fsync), with a CRC-32.
pub(crate) fn save_deadlines(
    dir: &std::path::Path,
    deadlines: &[(i64, u64)],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(16 + deadlines.len() * 16);
    buf.extend_from_slice(DEADLINES_MAGIC);
    buf.extend_from_slice(&(deadlines.len() as u64).to_le_bytes());
    for (id, at) in deadlines {
        buf.extend_from_slice(&id.to_le_bytes());
        buf.extend_from_slice(&at.to_le_bytes());
    }
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    crate::durable::write_file(&dir.join(DEADLINES_FILE), &buf)
}

/// The checkpointed deadlines, or `None` when there are none or the file is
/// damaged (then leases get a full TTL, as etcd gives them).
pub(crate) fn load_deadlines(dir: &std::path::Path) -> Option<HashMap<i64, u64>> {
    let data = std::fs::read(dir.join(DEADLINES_FILE)).ok()?;
    let (body, crc) = data.split_at_checked(data.len().checked_sub(4)?)?;
    if crc32fast::hash(body).to_le_bytes() != crc {
        return None;
    }
    let rest = body.strip_prefix(DEADLINES_MAGIC.as_slice())?;
    let (count, mut rest) = rest.split_at_checked(8)?;
    let count = u64::from_le_bytes(count.try_into().ok()?);
    if rest.len() as u64 != count.checked_mul(16)? {
        return None;
    }
    let mut out = HashMap::new();
    while let Some((entry, more)) = rest.split_at_checked(16) {
        let id = i64::from_le_bytes(entry[..8].try_into().ok()?);
        let at = u64::from_le_bytes(entry[8..].try_into().ok()?);
        out.insert(id, at);
        rest = more;
    }
    Some(out)
}

fn secs(s: i64) -> Duration {
    Duration::from_secs(u64::try_from(s).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn leases_expire_at_their_deadline_and_keep_alive_renews() {
        let mut l = Lessor::new(1);
        let now = Instant::now();
        l.grant(7, 10, now);
        assert!(l.take_expired(now + Duration::from_secs(9)).is_empty());
        assert_eq!(l.keep_alive(7, now + Duration::from_secs(9)), Some(10));
        assert!(l.take_expired(now + Duration::from_secs(18)).is_empty());
        assert_eq!(l.take_expired(now + Duration::from_secs(19)), vec![7]);
        // Handed out once only, and no longer renewable.
        assert!(l.take_expired(now + Duration::from_secs(20)).is_empty());
        assert_eq!(l.keep_alive(7, now + Duration::from_secs(20)), None);
    }

    #[test]
    fn deadlines_round_trip_and_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_deadlines(dir.path()), None);
        save_deadlines(dir.path(), &[(7, 1_000), (-3, 2_000)]).unwrap();
        let got = load_deadlines(dir.path()).unwrap();
        assert_eq!((got[&7], got[&-3], got.len()), (1_000, 2_000, 2));
        let path = dir.path().join(DEADLINES_FILE);
        let mut data = std::fs::read(&path).unwrap();
        data[20] ^= 1;
        std::fs::write(&path, &data).unwrap();
        assert_eq!(load_deadlines(dir.path()), None, "a flipped bit is caught");
        std::fs::write(&path, &data[..10]).unwrap();
        assert_eq!(load_deadlines(dir.path()), None, "a short file is caught");
    }

    #[test]
    fn fresh_ids_skip_ids_in_use() {
        let mut l = Lessor::new(5);
        l.grant(5, 10, Instant::now());
        assert_eq!(l.fresh_id(), 6);
    }
}
