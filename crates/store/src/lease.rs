//! The lessor: leases granted, their deadlines and the keys attached to them.
//!
//! Grants and revokes are durable (written by the committer); deadlines are kept in
//! memory only and renewed to a full TTL on restart, as etcd does on leader change.
//! Deadlines use `tokio::time::Instant`, so expiry is testable with a paused clock.

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
}

impl Lessor {
    pub(crate) fn new(seed: i64) -> Self {
        Self {
            leases: HashMap::new(),
            expiring: HashSet::new(),
            next_id: seed.max(1),
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
    }

    /// Removes the lease; returns its keys.
    pub(crate) fn revoke(&mut self, id: i64) -> Option<BTreeSet<Vec<u8>>> {
        self.expiring.remove(&id);
        self.leases.remove(&id).map(|l| l.keys)
    }

    /// Renews the lease to a full TTL; returns the TTL, or `None` if unknown or expired.
    pub(crate) fn keep_alive(&mut self, id: i64, now: Instant) -> Option<i64> {
        let lease = self.leases.get_mut(&id)?;
        if lease.deadline <= now || self.expiring.contains(&id) {
            return None;
        }
        lease.deadline = now + secs(lease.ttl_secs);
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

    pub(crate) fn len(&self) -> usize {
        self.leases.len()
    }
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
    fn fresh_ids_skip_ids_in_use() {
        let mut l = Lessor::new(5);
        l.grant(5, 10, Instant::now());
        assert_eq!(l.fresh_id(), 6);
    }
}
