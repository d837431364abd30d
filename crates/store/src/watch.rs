//! The watch hub: which watchers want which keys, and delivery of committed events.
//!
//! A watcher is either *synced* (it has seen every revision up to the hub's last
//! revision and receives new events as they are committed) or *catching up* (a task
//! owned by the store replays history from storage, then hands it back here).
//! Invariants:
//! - the committer never blocks on a watcher: delivery is `try_send` into the stream's
//!   bounded channel; a full channel moves the watcher to catch-up at the first
//!   revision it missed, so memory stays bounded and no event is lost or reordered;
//! - a watcher is synced only when the revision it needs next is above `last_rev`,
//!   checked under the hub lock that the committer also holds while publishing.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::types::{Event, EventKind, KeyRange};

/// What a watch stream receives, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMessage {
    /// A watcher was created.
    Created {
        /// The watcher's ID on its stream.
        watch_id: i64,
        /// The store revision at creation.
        revision: i64,
    },
    /// Events for one watcher, in revision order.
    Events {
        /// The watcher's ID.
        watch_id: i64,
        /// The newest revision covered.
        revision: i64,
        /// The events.
        events: Vec<Event>,
    },
    /// The watcher has seen every change up to `revision`.
    Progress {
        /// The watcher's ID.
        watch_id: i64,
        /// The revision reached.
        revision: i64,
    },
    /// The watcher ended (cancelled by the client, or its revision was compacted).
    Canceled {
        /// The watcher's ID.
        watch_id: i64,
        /// The store revision when cancelled.
        revision: i64,
        /// The compaction revision, when the watcher fell below it (else 0).
        compact_revision: i64,
        /// Why, for humans.
        reason: String,
    },
}

/// What a client asks to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchSpec {
    /// Keys watched.
    pub range: KeyRange,
    /// First revision wanted (0 = the next one).
    pub start_revision: i64,
    /// Attach the previous key-value to each event.
    pub prev_kv: bool,
    /// Drop put events.
    pub no_put: bool,
    /// Drop delete events.
    pub no_delete: bool,
    /// Send periodic progress notifications.
    pub progress_notify: bool,
    /// Requested watcher ID (0 = let the store choose).
    pub watch_id: i64,
}

/// Identifies a watcher: its stream and its ID on that stream.
pub(crate) type WatcherKey = (u64, i64);

/// A registered watcher.
#[derive(Debug, Clone)]
pub(crate) struct Watcher {
    pub(crate) spec: WatchSpec,
    /// Events below this revision are not delivered (start revision in the future).
    pub(crate) min_rev: i64,
    pub(crate) tx: mpsc::Sender<WatchMessage>,
}

impl Watcher {
    /// Whether this watcher wants `event`.
    pub(crate) fn wants(&self, event: &Event) -> bool {
        if event.kv.mod_revision < self.min_rev || !self.spec.range.contains(&event.kv.key) {
            return false;
        }
        match event.kind {
            EventKind::Put => !self.spec.no_put,
            EventKind::Delete => !self.spec.no_delete,
        }
    }
}

#[derive(Debug, Default)]
struct StreamState {
    ids: HashSet<i64>,
    next_id: i64,
}

#[derive(Debug, Default)]
struct HubInner {
    synced: HashMap<WatcherKey, Watcher>,
    by_key: HashMap<Bytes, Vec<WatcherKey>>,
    ranged: HashSet<WatcherKey>,
    streams: HashMap<u64, StreamState>,
    last_rev: i64,
    prev_kv_watchers: usize,
    next_stream: u64,
}

/// A watcher that fell behind and must be caught up from storage, starting at `next_rev`.
#[derive(Debug)]
pub(crate) struct Behind {
    pub(crate) key: WatcherKey,
    pub(crate) watcher: Watcher,
    pub(crate) next_rev: i64,
}

/// What became of a caught-up watcher handed back to the hub.
#[derive(Debug)]
pub(crate) enum SyncOutcome {
    /// It receives live events from now on.
    Synced,
    /// Revisions were committed meanwhile: catch up further.
    Again(Behind),
    /// It was cancelled meanwhile.
    Gone,
}

/// The hub.
#[derive(Debug, Default)]
pub(crate) struct Hub {
    inner: Mutex<HubInner>,
}

/// Why a watcher could not be created.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WatchCreateError {
    /// The requested ID is in use on this stream.
    #[error("mvcc: duplicate watch ID provided on the WatchStream")]
    DuplicateId,
    /// The stream already has the configured maximum of watchers.
    #[error(
        "mvcc: too many watchers on this stream (limit {0}; raise store.max_watchers_per_stream)"
    )]
    TooMany(usize),
    /// The stream was closed.
    #[error("watch stream closed")]
    Closed,
}

impl HubInner {
    fn index(&mut self, key: WatcherKey, w: &Watcher) {
        if w.spec.range.is_single() {
            self.by_key
                .entry(w.spec.range.key.clone())
                .or_default()
                .push(key);
        } else {
            self.ranged.insert(key);
        }
    }

    fn unindex(&mut self, key: WatcherKey, w: &Watcher) {
        if w.spec.range.is_single() {
            if let Some(v) = self.by_key.get_mut(&w.spec.range.key) {
                v.retain(|k| *k != key);
                if v.is_empty() {
                    self.by_key.remove(&w.spec.range.key);
                }
            }
        } else {
            self.ranged.remove(&key);
        }
    }

    fn remove_synced(&mut self, key: WatcherKey) -> Option<Watcher> {
        let w = self.synced.remove(&key)?;
        self.unindex(key, &w);
        Some(w)
    }

    fn forget(&mut self, key: WatcherKey, prev_kv: bool) {
        if prev_kv {
            self.prev_kv_watchers = self.prev_kv_watchers.saturating_sub(1);
        }
        if let Some(s) = self.streams.get_mut(&key.0) {
            s.ids.remove(&key.1);
        }
    }
}

impl Hub {
    pub(crate) fn new(last_rev: i64) -> Self {
        let hub = Hub::default();
        hub.inner.lock().last_rev = last_rev;
        hub
    }

    pub(crate) fn last_rev(&self) -> i64 {
        self.inner.lock().last_rev
    }

    /// Whether any watcher wants previous key-values (the committer then reads them).
    pub(crate) fn wants_prev_kv(&self) -> bool {
        self.inner.lock().prev_kv_watchers > 0
    }

    pub(crate) fn open_stream(&self) -> u64 {
        let mut g = self.inner.lock();
        g.next_stream += 1;
        let id = g.next_stream;
        g.streams.insert(id, StreamState::default());
        id
    }

    pub(crate) fn close_stream(&self, stream: u64) {
        let mut g = self.inner.lock();
        if let Some(s) = g.streams.remove(&stream) {
            for id in s.ids {
                if let Some(w) = g.remove_synced((stream, id))
                    && w.spec.prev_kv
                {
                    g.prev_kv_watchers = g.prev_kv_watchers.saturating_sub(1);
                }
            }
        }
    }

    /// Reserves a watcher ID on `stream`.
    pub(crate) fn reserve(
        &self,
        stream: u64,
        requested: i64,
        limit: usize,
        prev_kv: bool,
    ) -> Result<i64, WatchCreateError> {
        let mut g = self.inner.lock();
        let s = g.streams.get_mut(&stream).ok_or(WatchCreateError::Closed)?;
        if s.ids.len() >= limit {
            return Err(WatchCreateError::TooMany(limit));
        }
        let id = if requested != 0 {
            if s.ids.contains(&requested) {
                return Err(WatchCreateError::DuplicateId);
            }
            requested
        } else {
            while s.ids.contains(&s.next_id) {
                s.next_id += 1;
            }
            s.next_id
        };
        s.ids.insert(id);
        if prev_kv {
            g.prev_kv_watchers += 1;
        }
        Ok(id)
    }

    /// Registers a reserved watcher: synced if it needs nothing older than the next
    /// revision, else returned for catch-up from `start`.
    pub(crate) fn register(&self, key: WatcherKey, watcher: Watcher) -> Option<Behind> {
        let mut g = self.inner.lock();
        if !g
            .streams
            .get(&key.0)
            .is_some_and(|s| s.ids.contains(&key.1))
        {
            return None;
        }
        let start = watcher.spec.start_revision;
        if start > 0 && start <= g.last_rev {
            return Some(Behind {
                key,
                watcher,
                next_rev: start,
            });
        }
        g.index(key, &watcher);
        g.synced.insert(key, watcher);
        None
    }

    /// Hands a caught-up watcher back: synced if nothing was committed past `next_rev - 1`
    /// meanwhile, else returned to keep catching up. `None` when it was cancelled.
    pub(crate) fn try_sync(&self, behind: Behind) -> SyncOutcome {
        let mut g = self.inner.lock();
        if !self.alive_locked(&g, behind.key) {
            // Cancelled while catching up: its prev-kv count is released here, once.
            if behind.watcher.spec.prev_kv {
                g.prev_kv_watchers = g.prev_kv_watchers.saturating_sub(1);
            }
            return SyncOutcome::Gone;
        }
        if behind.next_rev <= g.last_rev {
            return SyncOutcome::Again(behind);
        }
        g.index(behind.key, &behind.watcher);
        g.synced.insert(behind.key, behind.watcher);
        SyncOutcome::Synced
    }

    fn alive_locked(&self, g: &HubInner, key: WatcherKey) -> bool {
        g.streams
            .get(&key.0)
            .is_some_and(|s| s.ids.contains(&key.1))
    }

    pub(crate) fn alive(&self, key: WatcherKey) -> bool {
        let g = self.inner.lock();
        self.alive_locked(&g, key)
    }

    /// Removes a watcher (client cancel or compaction); true if it existed.
    pub(crate) fn cancel(&self, key: WatcherKey) -> bool {
        let mut g = self.inner.lock();
        if !self.alive_locked(&g, key) {
            return false;
        }
        let prev_kv = match g.remove_synced(key) {
            Some(w) => w.spec.prev_kv,
            None => false,
        };
        g.forget(key, prev_kv);
        // A catching-up watcher's prev_kv count is released here too: the task sees it dead.
        true
    }

    /// Releases the prev-kv count of a watcher that died while catching up.
    pub(crate) fn release_behind(&self, w: &Watcher) {
        if w.spec.prev_kv {
            let mut g = self.inner.lock();
            g.prev_kv_watchers = g.prev_kv_watchers.saturating_sub(1);
        }
    }

    /// Delivers the events of committed revisions `first..=last` (ordered by revision).
    /// Returns watchers whose buffer was full; they continue from storage.
    pub(crate) fn publish(&self, first: i64, last: i64, events: &[Event]) -> Vec<Behind> {
        let mut g = self.inner.lock();
        debug_assert!(first > g.last_rev, "revisions are published once, in order");
        g.last_rev = last;
        if events.is_empty() || g.synced.is_empty() {
            return Vec::new();
        }
        let mut per: HashMap<WatcherKey, Vec<Event>> = HashMap::new();
        for ev in events {
            if let Some(keys) = g.by_key.get(&ev.kv.key) {
                for k in keys {
                    if let Some(w) = g.synced.get(k)
                        && w.wants(ev)
                    {
                        per.entry(*k)
                            .or_default()
                            .push(strip_prev(ev, w.spec.prev_kv));
                    }
                }
            }
            for k in &g.ranged {
                if let Some(w) = g.synced.get(k)
                    && w.wants(ev)
                {
                    per.entry(*k)
                        .or_default()
                        .push(strip_prev(ev, w.spec.prev_kv));
                }
            }
        }
        let mut behind = Vec::new();
        for (key, evs) in per {
            let Some(w) = g.synced.get(&key) else {
                continue;
            };
            let msg = WatchMessage::Events {
                watch_id: key.1,
                revision: last,
                events: evs,
            };
            match w.tx.try_send(msg) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if let Some(w) = g.remove_synced(key) {
                        metrics::counter!("meshwork_store_watch_slow_total").increment(1);
                        behind.push(Behind {
                            key,
                            watcher: w,
                            next_rev: first,
                        });
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    if let Some(w) = g.remove_synced(key) {
                        g.forget(key, w.spec.prev_kv);
                    }
                }
            }
        }
        behind
    }

    /// Sends a progress notification to synced watchers: all of them with `progress_notify`
    /// (periodic), or all of one stream (on request). Full buffers skip the notification.
    pub(crate) fn progress(&self, stream: Option<u64>) {
        let g = self.inner.lock();
        for (key, w) in &g.synced {
            let wanted = match stream {
                Some(s) => key.0 == s,
                None => w.spec.progress_notify,
            };
            if wanted {
                let _ = w.tx.try_send(WatchMessage::Progress {
                    watch_id: key.1,
                    revision: g.last_rev,
                });
            }
        }
    }

    pub(crate) fn synced_count(&self) -> usize {
        self.inner.lock().synced.len()
    }
}

fn strip_prev(ev: &Event, keep: bool) -> Event {
    if keep || ev.prev_kv.is_none() {
        ev.clone()
    } else {
        Event {
            kind: ev.kind,
            kv: ev.kv.clone(),
            prev_kv: None,
        }
    }
}
