//! Cluster membership of Meshwork nodes: each node keeps `/meshwork/nodes/{name}` on
//! a session lease. A node that dies stops renewing; its key goes when the lease
//! expires, and the others see it leave by watch. Work that must run on exactly one
//! node (health checks) is spread over the live members by rendezvous hashing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::backend::{Backend, Event, KeyValue, Mirror, MirrorHandler, is_delete, mirror, txn};
use crate::error::{CoordError, Result};
use crate::registry::model::{now_ms, validate_name};

/// The role of nodes that run active health checks.
pub const CHECKER_ROLE: &str = "checker";

/// Prefix of the membership keys.
pub const NODES_PREFIX: &str = "/meshwork/nodes/";

/// What a node says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Unique node name.
    pub name: String,
    /// Its HTTP API address.
    pub http_addr: String,
    /// Roles it runs.
    pub roles: Vec<String>,
    /// When it joined, Unix milliseconds.
    pub started_at_ms: u64,
    /// The addresses of its other listeners, by role (`cache` -> `HOST:PORT`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub endpoints: std::collections::BTreeMap<String, String>,
}

/// The live members, by name, with the create revision of their key.
#[derive(Default)]
struct Members {
    nodes: BTreeMap<String, (NodeInfo, i64)>,
    tx: Option<watch::Sender<u64>>,
    generation: u64,
    /// The store revision the view is at.
    revision: i64,
}

impl Members {
    fn changed(&mut self) {
        metrics::gauge!("meshwork_cluster_nodes").set(self.nodes.len() as f64);
        self.generation += 1;
        if let Some(tx) = &self.tx {
            tx.send_replace(self.generation);
        }
    }
}

impl MirrorHandler for Members {
    fn reset(&mut self, kvs: Vec<KeyValue>, revision: i64) {
        self.revision = revision;
        self.nodes.clear();
        for kv in kvs {
            if let Ok(n) = serde_json::from_slice::<NodeInfo>(&kv.value) {
                self.nodes.insert(n.name.clone(), (n, kv.create_revision));
            }
        }
        self.changed();
    }

    fn apply(&mut self, events: Vec<Event>, revision: i64) {
        self.revision = self.revision.max(revision);
        for e in events {
            let del = is_delete(&e);
            let Some(kv) = e.kv else { continue };
            let name = String::from_utf8_lossy(&kv.key)
                .trim_start_matches(NODES_PREFIX)
                .to_string();
            if del {
                self.nodes.remove(&name);
            } else if let Ok(n) = serde_json::from_slice::<NodeInfo>(&kv.value) {
                self.nodes.insert(n.name.clone(), (n, kv.create_revision));
            }
        }
        self.changed();
    }
}

/// This node's membership: its session lease, and the view of every live member.
pub struct Membership {
    info: NodeInfo,
    backend: Backend,
    members: Arc<Mutex<Members>>,
    _mirror: Mirror,
    changes: watch::Receiver<u64>,
    session: Arc<watch::Sender<Session>>,
    /// When the store last renewed the current session.
    renewed: Arc<Mutex<watch::Receiver<tokio::time::Instant>>>,
    ttl: i64,
    heal: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

/// The current session: lease id and the create revision of our member key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Session {
    /// Lease id (0 while rejoining).
    pub lease: i64,
    /// Create revision of our member key: a write guarded by it fails once we left.
    pub create_revision: i64,
}

impl Membership {
    /// Joins the cluster under `info.name` with a session of `ttl` seconds, and keeps
    /// rejoining if the session is ever lost.
    pub async fn join(backend: &Backend, info: NodeInfo, ttl: i64) -> Result<Membership> {
        validate_name("node name", &info.name, 128, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
        })?;
        let (tx, changes) = watch::channel(0u64);
        let members = Arc::new(Mutex::new(Members {
            tx: Some(tx),
            ..Members::default()
        }));
        let mirror = mirror(backend, NODES_PREFIX, members.clone());
        let (lease, keeper) = join_once(backend, &info, ttl).await?;
        let session = Arc::new(watch::channel(lease).0);
        let heal = Arc::new(tokio::sync::Notify::new());
        let renewed = Arc::new(Mutex::new(keeper.renewed_receiver()));
        let task = {
            let renewed = renewed.clone();
            let backend = backend.clone();
            let info = info.clone();
            let session = session.clone();
            let members = members.clone();
            let changes = changes.clone();
            let heal = heal.clone();
            tokio::spawn(async move {
                let mut keeper = keeper;
                loop {
                    let create_revision = session.borrow().create_revision;
                    let healing = tokio::select! {
                        _ = keeper.lost() => {
                            tracing::warn!(node = %info.name, "membership session lost; rejoining");
                            false
                        }
                        _ = own_key_deleted(&members, changes.clone(), &info.name, create_revision) => {
                            tracing::warn!(node = %info.name, "membership key deleted by someone else; rejoining on a new session");
                            true
                        }
                        _ = heal.notified() => {
                            tracing::warn!(node = %info.name, "a key of this node's session was deleted; rejoining on a new session");
                            true
                        }
                    };
                    session.send_replace(Session::default());
                    if healing {
                        // Whatever is left on the old session goes with it, so
                        // every session-bound key is made again, consistently.
                        metrics::counter!("meshwork_coord_session_heals_total").increment(1);
                        let old = keeper.id;
                        drop(keeper);
                        if let Err(e) = backend.revoke(old).await {
                            tracing::warn!(error = %e, lease = old, "revoking the damaged session failed; it expires by itself");
                        }
                    }
                    loop {
                        match join_once(&backend, &info, ttl).await {
                            Ok((s, k)) => {
                                *renewed.lock() = k.renewed_receiver();
                                session.send_replace(s);
                                keeper = k;
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "rejoin failed; retrying");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
                }
            })
        };
        let m = Membership {
            info,
            backend: backend.clone(),
            members,
            _mirror: mirror,
            changes,
            session,
            renewed,
            ttl,
            heal,
            task,
        };
        m.wait_until_listed().await;
        Ok(m)
    }

    async fn wait_until_listed(&self) {
        let mut rx = self.changes.clone();
        loop {
            if self.members.lock().nodes.contains_key(&self.info.name) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// This node.
    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    /// The current session.
    pub fn session(&self) -> Session {
        *self.session.borrow()
    }

    /// Starts a new session: revokes the current one (and so every key on
    /// it) and joins again. For a component that found one of its session's
    /// keys deleted by someone else.
    pub fn rejoin(&self) {
        self.heal.notify_one();
    }

    /// How long since the store last renewed this node's session, when a
    /// renewal is overdue (one period plus half a period, at least a second:
    /// no quorum, or unreachable); `None` while renewals succeed.
    pub fn store_silent_for(&self) -> Option<Duration> {
        let since = self.renewed.lock().borrow().elapsed();
        let period = Duration::from_millis(u64::try_from(self.ttl.max(1)).unwrap_or(1) * 1000 / 3);
        (since > period + (period / 2).max(Duration::from_secs(1))).then_some(since)
    }

    /// Whether this node is a listed member on a live session, as far as
    /// its watched view shows.
    pub fn is_listed(&self) -> bool {
        let s = self.session();
        s.lease != 0
            && self
                .members
                .lock()
                .nodes
                .get(&self.info.name)
                .is_some_and(|(_, rev)| *rev == s.create_revision)
    }

    /// Moves whenever the session is lost (lease 0) or re-established.
    pub fn session_changes(&self) -> watch::Receiver<Session> {
        self.session.subscribe()
    }

    /// Live members.
    pub fn members(&self) -> Vec<NodeInfo> {
        self.members
            .lock()
            .nodes
            .values()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Moves whenever membership changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// The live member with `role` that owns `work` (rendezvous hashing), if any.
    pub fn owner_of(&self, role: &str, work: &str) -> Option<String> {
        let m = self.members.lock();
        owner(
            m.nodes
                .iter()
                .filter(|(_, (info, _))| info.roles.iter().any(|r| r == role))
                .map(|(name, _)| name.as_str()),
            work,
        )
        .map(str::to_string)
    }

    /// How many live members announce `role`.
    pub fn count_with_role(&self, role: &str) -> usize {
        self.members
            .lock()
            .nodes
            .values()
            .filter(|(info, _)| info.roles.iter().any(|r| r == role))
            .count()
    }

    /// A compare that holds only while our session (member key) is the one we hold.
    pub fn still_member(&self) -> Option<meshwork_etcd::proto::etcdserverpb::Compare> {
        let s = self.session();
        (s.create_revision > 0)
            .then(|| txn::create_rev_is(member_key(&self.info.name), s.create_revision))
    }

    /// Leaves the cluster: revokes the session so others take over at once.
    pub async fn leave(&self) {
        self.task.abort();
        let s = self.session();
        if s.lease != 0 {
            let _ = self.backend.revoke(s.lease).await;
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Resolves once the watched view, at or past `create_revision`, no longer
/// holds our member key as we created it (someone deleted it, or replaced it).
async fn own_key_deleted(
    members: &Mutex<Members>,
    mut changes: watch::Receiver<u64>,
    name: &str,
    create_revision: i64,
) {
    if create_revision <= 0 {
        return std::future::pending().await;
    }
    loop {
        {
            let m = members.lock();
            let ours = m
                .nodes
                .get(name)
                .is_some_and(|(_, rev)| *rev == create_revision);
            if m.revision >= create_revision && !ours {
                return;
            }
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Key of a node's membership record.
pub fn member_key(name: &str) -> String {
    format!("{NODES_PREFIX}{name}")
}

async fn join_once(
    backend: &Backend,
    info: &NodeInfo,
    ttl: i64,
) -> Result<(Session, crate::backend::LeaseKeeper)> {
    let lease = backend.grant(ttl).await?;
    let key = member_key(&info.name);
    let mut info = info.clone();
    info.started_at_ms = now_ms();
    let value = serde_json::to_vec(&info).map_err(|e| CoordError::invalid(e.to_string()))?;
    // Wait out a previous incarnation of the same name (a restart within its TTL).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(ttl.max(1) as u64 + 5);
    loop {
        let r = backend
            .txn(meshwork_etcd::proto::etcdserverpb::TxnRequest {
                compare: vec![txn::absent(key.clone())],
                success: vec![
                    txn::put(key.clone(), value.clone(), lease),
                    txn::get(key.clone()),
                ],
                failure: vec![txn::get(key.clone())],
            })
            .await?;
        if r.succeeded {
            let kv = txn::range_kvs(&r, 1);
            let create_revision = kv.first().map(|k| k.create_revision).unwrap_or(0);
            return Ok((
                Session {
                    lease,
                    create_revision,
                },
                backend.keep_alive(lease, ttl),
            ));
        }
        // A retried txn that had landed finds our own key: that is success.
        if let Some(kv) = txn::range_kvs(&r, 0).first()
            && kv.lease == lease
        {
            return Ok((
                Session {
                    lease,
                    create_revision: kv.create_revision,
                },
                backend.keep_alive(lease, ttl),
            ));
        }
        // Keep our fresh lease alive while the previous incarnation's runs out.
        let _ = backend.keep_alive_once(lease).await;
        if tokio::time::Instant::now() >= deadline {
            let _ = backend.revoke(lease).await;
            return Err(CoordError::Conflict(format!(
                "node name {:?} is in use by a live node; give each node a unique name",
                info.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Rendezvous (highest random weight) choice of a member for `work`.
pub fn owner<'a>(members: impl Iterator<Item = &'a str>, work: &str) -> Option<&'a str> {
    members.max_by_key(|m| mix(fnv(m.as_bytes()) ^ fnv(work.as_bytes()).rotate_left(17)))
}

/// FNV-1a (the `fnv` crate): stable across builds and machines, as rendezvous
/// hashing needs every node to compute the same weights.
fn fnv(b: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut h, b);
    std::hash::Hasher::finish(&h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rendezvous_is_stable_and_spreads() {
        let nodes = ["a", "b", "c"];
        let mut counts = BTreeMap::new();
        for i in 0..3000 {
            let w = format!("svc/{i}");
            let o = owner(nodes.iter().copied(), &w).unwrap();
            *counts.entry(o).or_insert(0) += 1;
            // Removing a node that does not own the work does not move it.
            let others: Vec<&str> = nodes.iter().copied().filter(|n| *n != o).collect();
            let without = others[0];
            let rest = nodes.iter().copied().filter(|n| *n != without);
            assert_eq!(owner(rest, &w), Some(o));
        }
        for (_, c) in counts {
            assert!(c > 700, "uneven spread");
        }
    }
}
