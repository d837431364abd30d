//! The broker's topic and group metadata in the store, through coord's etcd API (so
//! on a real etcd cluster too): `/meshwork/mq/topics/{topic}` holds a topic's settings,
//! `/meshwork/mq/groups/{topic}/{group}` a group's, as JSON (`TopicConfig`,
//! `GroupConfig`). The messages stay in the broker's logs.
//!
//! Both ways, kept by one task per node: a topic or group created on this node's broker
//! is written to the store (create-if-absent: the first writer's settings stand), and
//! one that appears in the store — written by another node's broker, or with `etcdctl
//! put` — is created on this broker. A key deleted from the store is written back from
//! the broker (topics are not deleted by deleting their key). Settings that differ
//! between the store and a broker that already has the topic or group are logged and
//! counted (`meshwork_mq_meta_conflicts_total`); the broker keeps its own, which its
//! logs were written with.

use std::collections::HashSet;
use std::time::Duration;

use meshwork_coord::backend::{Backend, KeyValue, WatchItem, is_delete, txn};
use meshwork_etcd::proto::etcdserverpb as pb;
use meshwork_mq::{Broker, GroupConfig, MqError, TopicConfig};
use tokio::sync::watch;

/// The prefix of every metadata key.
pub(crate) const PREFIX: &str = "/meshwork/mq/";
const TOPICS: &str = "/meshwork/mq/topics/";
const GROUPS: &str = "/meshwork/mq/groups/";
/// How often what the store lacks is written again (after a failed write).
const RESYNC: Duration = Duration::from_secs(30);

fn topic_key(topic: &str) -> String {
    format!("{TOPICS}{topic}")
}

fn group_key(topic: &str, group: &str) -> String {
    format!("{GROUPS}{topic}/{group}")
}

/// One metadata record read from the store.
enum Meta {
    Topic(String, TopicConfig),
    Group(String, String, GroupConfig),
}

fn parse(kv: &KeyValue) -> Option<Meta> {
    let key = std::str::from_utf8(&kv.key).ok()?;
    let bad = |why: String| {
        tracing::warn!(key, error = %why, "mq metadata in the store is not valid; ignored");
        metrics::counter!("meshwork_mq_meta_conflicts_total").increment(1);
        None
    };
    if let Some(topic) = key.strip_prefix(TOPICS) {
        return match serde_json::from_slice::<TopicConfig>(&kv.value) {
            Ok(c) => Some(Meta::Topic(topic.to_string(), c)),
            Err(e) => bad(e.to_string()),
        };
    }
    if let Some((topic, group)) = key.strip_prefix(GROUPS).and_then(|r| r.split_once('/')) {
        return match serde_json::from_slice::<GroupConfig>(&kv.value) {
            Ok(c) => Some(Meta::Group(topic.to_string(), group.to_string(), c)),
            Err(e) => bad(e.to_string()),
        };
    }
    None
}

/// Creates on the broker what the store has (topics first, then their groups).
async fn apply(broker: &Broker, kvs: &[KeyValue]) {
    let mut metas: Vec<Meta> = kvs.iter().filter_map(parse).collect();
    metas.sort_by_key(|m| matches!(m, Meta::Group(..)));
    for m in metas {
        let (what, result) = match m {
            Meta::Topic(t, c) => (t.clone(), broker.create_topic(&t, c).await.map(|_| ())),
            Meta::Group(t, g, c) => (
                format!("{t}/{g}"),
                broker.create_group(&t, &g, c).await.map(|_| ()),
            ),
        };
        match result {
            Ok(()) => {}
            Err(e @ (MqError::TopicExists(_) | MqError::GroupExists { .. })) => {
                tracing::warn!(name = %what, error = %e, "the store's settings differ from this broker's; the broker keeps its own");
                metrics::counter!("meshwork_mq_meta_conflicts_total").increment(1);
            }
            Err(e) => {
                tracing::warn!(name = %what, error = %e, "cannot create what the store describes on this broker");
                metrics::counter!("meshwork_mq_meta_conflicts_total").increment(1);
            }
        }
    }
}

/// Writes to the store each of the broker's topics and groups it lacks (create if
/// absent); returns false if a write failed.
async fn push(broker: &Broker, backend: &Backend, known: &mut HashSet<String>) -> bool {
    let mut records: Vec<(String, Vec<u8>)> = Vec::new();
    for t in broker.topics().into_iter().filter(|t| !t.internal) {
        let key = topic_key(&t.name);
        if !known.contains(&key)
            && let Ok(v) = serde_json::to_vec(&t.config)
        {
            records.push((key, v));
        }
        for g in &t.groups {
            let key = group_key(&t.name, g);
            if known.contains(&key) {
                continue;
            }
            if let Ok(info) = broker.group_info(&t.name, g)
                && let Ok(v) = serde_json::to_vec(&info.config)
            {
                records.push((key, v));
            }
        }
    }
    let mut ok = true;
    for (key, value) in records {
        let written = backend
            .txn(pb::TxnRequest {
                compare: vec![txn::absent(key.clone())],
                success: vec![txn::put(key.clone(), value, 0)],
                failure: vec![],
            })
            .await;
        match written {
            // Written, or another writer's was there first (its event brings it).
            Ok(_) => {
                known.insert(key);
            }
            Err(e) => {
                tracing::warn!(key, error = %e, "writing mq metadata to the store failed; retried");
                ok = false;
            }
        }
    }
    ok
}

/// Keeps the broker's metadata and the store's in step until `stop` changes.
pub(crate) async fn run(broker: Broker, backend: Backend, mut stop: watch::Receiver<bool>) {
    let mut local = broker.meta_changes();
    loop {
        let loaded = tokio::select! {
            r = backend.load_prefix(PREFIX) => r,
            _ = stop.changed() => return,
        };
        let (kvs, rev) = match loaded {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "loading mq metadata from the store failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        let mut known: HashSet<String> = kvs
            .iter()
            .filter_map(|kv| std::str::from_utf8(&kv.key).ok().map(str::to_string))
            .collect();
        apply(&broker, &kvs).await;
        local.mark_unchanged();
        let mut synced = push(&broker, &backend, &mut known).await;
        let mut w = backend.watch_prefix(PREFIX, rev + 1);
        let mut resync = tokio::time::interval(RESYNC);
        resync.tick().await;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                item = w.next() => match item {
                    Some(WatchItem::Events { events, .. }) => {
                        let mut puts = Vec::new();
                        let mut deleted = false;
                        for e in events {
                            let Some(kv) = e.kv.clone() else { continue };
                            let key = String::from_utf8_lossy(&kv.key).into_owned();
                            if is_delete(&e) {
                                known.remove(&key);
                                deleted = true;
                            } else {
                                known.insert(key);
                                puts.push(kv);
                            }
                        }
                        apply(&broker, &puts).await;
                        if deleted {
                            synced = push(&broker, &backend, &mut known).await;
                        }
                    }
                    // Compacted past our revision, or the watch ended: load again.
                    Some(WatchItem::Reset { .. }) | None => break,
                },
                changed = local.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    synced = push(&broker, &backend, &mut known).await;
                }
                _ = resync.tick(), if !synced => {
                    synced = push(&broker, &backend, &mut known).await;
                }
            }
        }
    }
}
