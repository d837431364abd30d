//! Catch-up: replaying a watcher's missed revisions from disk. A watcher whose
//! stream is full (or that starts in the past) is handed here by the hub; a task
//! reads its history in bounded chunks, sends it with back-pressure, then
//! re-registers it under the hub lock only if no revision was published meanwhile.
//! Nothing is lost or reordered; a watcher that falls below the compaction revision
//! is cancelled with `compact_revision`, as etcd does.

use super::Store;
use crate::apply::rev_key;
use crate::codec;
use crate::error::{Result, StoreError};
use crate::index::Entry;
use crate::types::{Event, EventKind, KeyValue, Revision};
use crate::watch::{Behind, SyncOutcome, WatchMessage, Watcher};

/// Records read per catch-up step of a lagging watcher.
const CATCH_UP_RECORDS: usize = 1024;

impl Store {
    pub(super) async fn catch_up(self, mut b: Behind) {
        loop {
            if !self.shared.hub.alive(b.key) {
                self.shared.hub.release_behind(&b.watcher);
                return;
            }
            let target = self.shared.hub.last_rev();
            while b.next_rev <= target {
                let compact = self.compact_revision();
                if b.next_rev < compact {
                    self.cancel_compacted(&b, compact).await;
                    return;
                }
                let read = {
                    let store = self.clone();
                    let w = b.watcher.clone();
                    let from = b.next_rev;
                    tokio::task::spawn_blocking(move || store.history(&w, from, target)).await
                };
                let (events, reached) = match read {
                    Ok(Ok(x)) => x,
                    Ok(Err(e)) => {
                        self.cancel_with(&b, 0, e.to_string()).await;
                        return;
                    }
                    Err(e) => {
                        self.cancel_with(&b, 0, e.to_string()).await;
                        return;
                    }
                };
                // History read while compaction removed part of it is not trustworthy.
                let compact = self.compact_revision();
                if b.next_rev < compact {
                    self.cancel_compacted(&b, compact).await;
                    return;
                }
                if !events.is_empty() {
                    let msg = WatchMessage::Events {
                        watch_id: b.key.1,
                        revision: reached,
                        events,
                    };
                    if b.watcher.tx.send(msg).await.is_err() {
                        self.shared.hub.cancel(b.key);
                        self.shared.hub.release_behind(&b.watcher);
                        return;
                    }
                }
                b.next_rev = reached + 1;
            }
            match self.shared.hub.try_sync(b) {
                SyncOutcome::Synced | SyncOutcome::Gone => return,
                SyncOutcome::Again(again) => b = again,
            }
        }
    }

    async fn cancel_compacted(&self, b: &Behind, compact: i64) {
        self.cancel_with(
            b,
            compact,
            "etcdserver: mvcc: required revision has been compacted".into(),
        )
        .await;
    }

    async fn cancel_with(&self, b: &Behind, compact: i64, reason: String) {
        self.shared.hub.cancel(b.key);
        self.shared.hub.release_behind(&b.watcher);
        let msg = WatchMessage::Canceled {
            watch_id: b.key.1,
            revision: self.revision(),
            compact_revision: compact,
            reason,
        };
        let _ = b.watcher.tx.send(msg).await;
    }

    /// Events for `w` in revisions `from..=to`, stopping at a revision boundary after
    /// about `CATCH_UP_RECORDS` records; returns them and the last revision covered.
    fn history(&self, w: &Watcher, from: i64, to: i64) -> Result<(Vec<Event>, i64)> {
        self.with_kv(|table| {
            let mut events = Vec::new();
            let mut last_main = from - 1;
            let range = table
                .range((from as u64, 0u32)..=(to as u64, u32::MAX))
                .map_err(StoreError::storage)?;
            for (seen, item) in range.enumerate() {
                let (k, v) = item.map_err(StoreError::storage)?;
                let (main, sub) = k.value();
                let main = main as i64;
                if seen >= CATCH_UP_RECORDS && main != last_main {
                    return Ok((events, last_main));
                }
                last_main = main;
                let rec = codec::decode(Revision { main, sub }, v.value())?;
                let kind = if rec.tombstone {
                    EventKind::Delete
                } else {
                    EventKind::Put
                };
                let mut ev = Event {
                    kind,
                    kv: rec.kv,
                    prev_kv: None,
                };
                if !w.wants(&ev) {
                    continue;
                }
                if w.spec.prev_kv {
                    ev.prev_kv = self.prev_of(table, &ev.kv.key, Revision { main, sub })?;
                }
                events.push(ev);
            }
            Ok((events, to))
        })
    }

    fn prev_of(
        &self,
        table: &redb::ReadOnlyTable<(u64, u32), &'static [u8]>,
        key: &[u8],
        rev: Revision,
    ) -> Result<Option<KeyValue>> {
        let prev: Option<Entry> = {
            let index = self.shared.index.read();
            index
                .history(key)
                .and_then(|h| h.iter().rev().find(|e| e.rev < rev).copied())
        };
        match prev {
            Some(e) if !e.is_tombstone() => Ok(table
                .get(rev_key(e.rev))
                .map_err(StoreError::storage)?
                .map(|g| codec::decode(e.rev, g.value()))
                .transpose()?
                .map(|r| r.kv)),
            _ => Ok(None),
        }
    }
}
