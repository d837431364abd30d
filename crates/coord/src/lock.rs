//! Distributed locks and leader election, built exactly as etcd's `concurrency`
//! package builds them, so they interoperate with `etcdctl lock` / `etcdctl elect`
//! and the v3lock / v3election services on the same name:
//!
//! a contender puts `{name}/{lease hex}` on its lease and holds the lock (or the
//! leadership) once every key under `{name}/` created before its own is gone. The
//! fencing token is its key's create revision: it only grows, so a resource that
//! remembers the highest token it saw can refuse a stale holder. A holder that dies
//! stops renewing its lease; the key goes when the lease expires and the next in
//! line takes over.
//!
//! Locks are not reentrant: locking a name again with the same lease returns the same
//! key and token (it is one holder), and one unlock releases it.

use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use meshwork_etcd::proto::etcdserverpb as pb;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, KeyValue, WatchItem, is_delete, prefix_end, txn};
use crate::error::{CoordError, Result};
use crate::registry::model::{now_ms, validate_name};

/// Key prefix of locks.
pub const LOCKS_PREFIX: &str = "/meshwork/locks/";
/// Key prefix of elections.
pub const ELECTIONS_PREFIX: &str = "/meshwork/elections/";

/// Checks a lock or election name.
pub fn validate_lock_name(name: &str) -> Result<()> {
    validate_name("name", name, 256, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')
    })
}

/// A place in a queue (a held lock, or a leadership).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// Lock or election name.
    pub name: String,
    /// The contender's key.
    pub key: String,
    /// The key's create revision: the fencing token.
    pub fencing_token: i64,
    /// The lease the key lives on.
    pub lease: i64,
}

/// What a lock key holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockValue {
    /// Who holds or waits.
    pub holder: String,
    /// When it asked, Unix milliseconds.
    pub requested_at_ms: u64,
}

fn queue_key(prefix: &str, lease: i64) -> String {
    format!("{prefix}{lease:x}")
}

/// Enqueues `lease` under `prefix` (idempotent) and returns its key-value.
async fn enqueue(backend: &Backend, prefix: &str, lease: i64, value: Bytes) -> Result<KeyValue> {
    let key = queue_key(prefix, lease);
    let r = backend
        .txn(pb::TxnRequest {
            compare: vec![txn::absent(key.clone())],
            success: vec![txn::put(key.clone(), value, lease), txn::get(key.clone())],
            failure: vec![txn::get(key.clone())],
        })
        .await;
    let r = match r {
        Err(CoordError::NotFound(m)) => {
            return Err(CoordError::NotFound(format!(
                "lease {lease:x} not found ({m}): it expired or was revoked"
            )));
        }
        r => r?,
    };
    let i = if r.succeeded { 1 } else { 0 };
    txn::range_kvs(&r, i)
        .into_iter()
        .next()
        .ok_or_else(|| CoordError::Backend(format!("{key} vanished right after enqueueing")))
}

/// The first key under `prefix` in create order (`Descend`: the last), created before
/// `before` when given, and the read's revision.
async fn first_created(
    backend: &Backend,
    prefix: &str,
    before: Option<i64>,
    order: pb::range_request::SortOrder,
) -> Result<(Option<KeyValue>, i64)> {
    let key = Bytes::from(prefix.to_string());
    let end = prefix_end(&key);
    let r = backend
        .call(|mut c| {
            let (key, end) = (key.clone(), end.clone());
            async move {
                c.kv.range(pb::RangeRequest {
                    key,
                    range_end: end,
                    limit: 1,
                    max_create_revision: before.map(|b| b - 1).unwrap_or(0),
                    sort_order: order as i32,
                    sort_target: pb::range_request::SortTarget::Create as i32,
                    ..Default::default()
                })
                .await
            }
        })
        .await?;
    Ok((
        r.kvs.into_iter().next(),
        r.header.map(|h| h.revision).unwrap_or(0),
    ))
}

/// The last key created under `prefix` before `rev`, and the read's revision.
async fn predecessor(backend: &Backend, prefix: &str, rev: i64) -> Result<(Option<KeyValue>, i64)> {
    first_created(
        backend,
        prefix,
        Some(rev),
        pb::range_request::SortOrder::Descend,
    )
    .await
}

/// Waits until no key under `prefix` created before `rev` remains.
async fn wait_turn(backend: &Backend, prefix: &str, rev: i64) -> Result<()> {
    loop {
        let (pred, at) = predecessor(backend, prefix, rev).await?;
        let Some(pred) = pred else { return Ok(()) };
        // Wait for that key to go, then look again (an earlier one may remain).
        let mut w = backend.watch_range(pred.key.clone(), Bytes::new(), at + 1);
        while let Some(WatchItem::Events { events, .. }) = w.next().await {
            if events.iter().any(is_delete) {
                break;
            }
        }
    }
}

async fn dequeue(backend: &Backend, held: &Held) -> Result<bool> {
    let r = backend
        .txn(pb::TxnRequest {
            compare: vec![txn::create_rev_is(held.key.clone(), held.fencing_token)],
            success: vec![txn::delete(held.key.clone())],
            failure: vec![],
        })
        .await?;
    Ok(r.succeeded)
}

/// Joins the queue under `prefix` and waits for the head (at most `timeout`; on
/// timeout the place is given up).
async fn acquire(
    backend: &Backend,
    name: &str,
    prefix: &str,
    lease: i64,
    value: Bytes,
    timeout: Option<Duration>,
) -> Result<Held> {
    let kv = enqueue(backend, prefix, lease, value).await?;
    let held = Held {
        name: name.to_string(),
        key: String::from_utf8_lossy(&kv.key).into_owned(),
        fencing_token: kv.create_revision,
        lease,
    };
    // Look once before any timeout applies: a free lock is taken even with a zero
    // timeout (try-lock).
    let first = predecessor(backend, prefix, kv.create_revision).await;
    let waited = match first {
        Err(e) => Err(e),
        Ok((None, _)) => Ok(()),
        Ok((Some(_), _)) => match timeout {
            None => wait_turn(backend, prefix, kv.create_revision).await,
            Some(t) => {
                match tokio::time::timeout(t, wait_turn(backend, prefix, kv.create_revision)).await
                {
                    Ok(r) => r,
                    Err(_) => {
                        let _ = dequeue(backend, &held).await;
                        return Err(CoordError::Timeout(format!(
                            "{name:?} is held by another holder; gave up after {} ms",
                            t.as_millis()
                        )));
                    }
                }
            }
        },
    };
    if let Err(e) = waited {
        let _ = dequeue(backend, &held).await;
        return Err(e);
    }
    // Our turn came, but our own key may have gone with our lease while we waited:
    // then someone behind us holds it now (etcd's Mutex checks the same).
    let (mine, _) = backend.get(held.key.clone()).await?;
    if mine.is_none_or(|kv| kv.create_revision != held.fencing_token) {
        return Err(CoordError::NotFound(format!(
            "lease {lease:x} ended while waiting for {name:?}; nothing is held"
        )));
    }
    Ok(held)
}

/// Checks that `held` names a contender key of lock (or election) `name` — the API
/// must not let a caller delete or overwrite an arbitrary key.
pub fn check_held(held: &Held, name: &str, election: bool) -> Result<()> {
    let prefix = if election {
        election_prefix(name)
    } else {
        format!("{LOCKS_PREFIX}{name}/")
    };
    let expected = queue_key(&prefix, held.lease);
    if held.name != name || held.key != expected {
        return Err(CoordError::invalid(format!(
            "held.key {:?} is not the key of lease {:x} in {:?} (expected {expected:?})",
            held.key, held.lease, name
        )));
    }
    Ok(())
}

/// Acquires lock `name` for `lease`, waiting at most `timeout` (None = forever;
/// zero = try once). The lock is freed by [`unlock`] or when the lease ends.
pub async fn lock(
    backend: &Backend,
    name: &str,
    lease: i64,
    holder: &str,
    timeout: Option<Duration>,
) -> Result<Held> {
    validate_lock_name(name)?;
    let value = serde_json::to_vec(&LockValue {
        holder: holder.chars().take(256).collect(),
        requested_at_ms: now_ms(),
    })
    .map_err(|e| CoordError::invalid(e.to_string()))?;
    let prefix = format!("{LOCKS_PREFIX}{name}/");
    match acquire(backend, name, &prefix, lease, value.into(), timeout).await {
        // The wait ran out: the lock is held, and the caller is told by whom.
        Err(CoordError::Timeout(_)) => Err(CoordError::Held {
            name: name.to_string(),
            holder: current_holder(backend, &prefix).await,
            waited_ms: timeout.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        }),
        other => other,
    }
}

/// Who holds the lock under `prefix`, as the holder described itself; a
/// placeholder when it cannot be read (or was released a moment ago).
async fn current_holder(backend: &Backend, prefix: &str) -> String {
    match first_created(backend, prefix, None, pb::range_request::SortOrder::Ascend).await {
        Ok((Some(kv), _)) => serde_json::from_slice::<LockValue>(&kv.value)
            .map(|v| v.holder)
            .unwrap_or_else(|_| String::from_utf8_lossy(&kv.key).into_owned()),
        _ => "another holder".to_string(),
    }
}

/// Releases a lock; false if it was no longer held (its lease ended).
pub async fn unlock(backend: &Backend, held: &Held) -> Result<bool> {
    dequeue(backend, held).await
}

/// Who holds a lock now, and how many wait.
#[derive(Debug, Clone, Serialize)]
pub struct LockState {
    /// Lock name.
    pub name: String,
    /// The holder's key, token and lease.
    pub held: Held,
    /// Who (as the holder said).
    pub holder: String,
    /// Since when it waited or held, Unix milliseconds.
    pub requested_at_ms: u64,
    /// Contenders waiting behind it.
    pub waiters: usize,
}

/// Every lock with a holder.
pub async fn list_locks(backend: &Backend) -> Result<Vec<LockState>> {
    let (kvs, _) = backend.get_prefix(LOCKS_PREFIX, 0).await?;
    let mut by_name: std::collections::BTreeMap<String, Vec<KeyValue>> = Default::default();
    for kv in kvs {
        let k = String::from_utf8_lossy(&kv.key).into_owned();
        if let Some((name, _)) = k.trim_start_matches(LOCKS_PREFIX).rsplit_once('/') {
            by_name.entry(name.to_string()).or_default().push(kv);
        }
    }
    Ok(by_name
        .into_iter()
        .filter_map(|(name, mut kvs)| {
            kvs.sort_by_key(|kv| kv.create_revision);
            let head = kvs.first()?;
            let v: Option<LockValue> = serde_json::from_slice(&head.value).ok();
            Some(LockState {
                held: Held {
                    name: name.clone(),
                    key: String::from_utf8_lossy(&head.key).into_owned(),
                    fencing_token: head.create_revision,
                    lease: head.lease,
                },
                name,
                holder: v.as_ref().map(|v| v.holder.clone()).unwrap_or_default(),
                requested_at_ms: v.map(|v| v.requested_at_ms).unwrap_or(0),
                waiters: kvs.len() - 1,
            })
        })
        .collect())
}

/// An election's leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Leader {
    /// Election name.
    pub name: String,
    /// The leader's key, token and lease.
    pub held: Held,
    /// What the leader proclaims.
    pub value: String,
}

fn election_prefix(name: &str) -> String {
    format!("{ELECTIONS_PREFIX}{name}/")
}

/// Campaigns in election `name` with `value`; returns once leader (or fails after
/// `timeout`, giving up the candidacy).
pub async fn campaign(
    backend: &Backend,
    name: &str,
    lease: i64,
    value: &str,
    timeout: Option<Duration>,
) -> Result<Held> {
    validate_lock_name(name)?;
    let prefix = election_prefix(name);
    let held = acquire(
        backend,
        name,
        &prefix,
        lease,
        Bytes::from(value.to_string()),
        timeout,
    )
    .await?;
    // Re-campaigning with the same lease keeps the key: make the value current.
    proclaim(backend, &held, value).await?;
    Ok(held)
}

/// Changes the leader's value without an election.
pub async fn proclaim(backend: &Backend, held: &Held, value: &str) -> Result<()> {
    let r = backend
        .txn(pb::TxnRequest {
            compare: vec![txn::create_rev_is(held.key.clone(), held.fencing_token)],
            success: vec![txn::put(held.key.clone(), value.to_string(), held.lease)],
            failure: vec![],
        })
        .await?;
    if r.succeeded {
        Ok(())
    } else {
        Err(CoordError::Conflict(format!(
            "not the leader of {:?} any more (its lease ended or it resigned)",
            held.name
        )))
    }
}

/// Gives up leadership (or candidacy).
pub async fn resign(backend: &Backend, held: &Held) -> Result<bool> {
    dequeue(backend, held).await
}

/// The current leader of election `name`.
pub async fn leader(backend: &Backend, name: &str) -> Result<Option<Leader>> {
    validate_lock_name(name)?;
    let (first, _) = first_created(
        backend,
        &election_prefix(name),
        None,
        pb::range_request::SortOrder::Ascend,
    )
    .await?;
    Ok(first.map(|kv| to_leader(name, &kv)))
}

fn to_leader(name: &str, kv: &KeyValue) -> Leader {
    Leader {
        name: name.to_string(),
        held: Held {
            name: name.to_string(),
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            fencing_token: kv.create_revision,
            lease: kv.lease,
        },
        value: String::from_utf8_lossy(&kv.value).into_owned(),
    }
}

/// Follows election `name`: yields the leader (None when there is none) now and
/// after every change of leader or of its value.
pub fn observe(
    backend: &Backend,
    name: &str,
) -> Result<impl Stream<Item = Option<Leader>> + Send + 'static> {
    validate_lock_name(name)?;
    let backend = backend.clone();
    let name = name.to_string();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut last: Option<Option<Leader>> = None;
        loop {
            let prefix = election_prefix(&name);
            let (kvs, rev) = match backend.get_prefix(prefix.clone(), 0).await {
                Ok(r) => r,
                Err(_) => {
                    if tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let mut keys: std::collections::BTreeMap<Bytes, KeyValue> =
                kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
            let mut w = backend.watch_prefix(prefix, rev + 1);
            loop {
                let cur = keys
                    .values()
                    .min_by_key(|kv| kv.create_revision)
                    .map(|kv| to_leader(&name, kv));
                if last.as_ref() != Some(&cur) {
                    if tx.send(cur.clone()).await.is_err() {
                        return;
                    }
                    last = Some(cur);
                }
                let next = tokio::select! {
                    n = w.next() => n,
                    // The observer went away: stop watching.
                    _ = tx.closed() => return,
                };
                match next {
                    Some(WatchItem::Events { events, .. }) => {
                        for e in events {
                            let Some(kv) = e.kv.clone() else { continue };
                            if is_delete(&e) {
                                keys.remove(&kv.key);
                            } else {
                                keys.insert(kv.key.clone(), kv);
                            }
                        }
                    }
                    Some(WatchItem::Reset { .. }) | None => break,
                }
            }
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}
