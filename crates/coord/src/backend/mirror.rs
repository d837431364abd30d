//! Watched local copies: [`mirror`] loads every key under a prefix, applies the
//! watch's events to a [`MirrorHandler`], and reloads when the watch reports
//! compaction; [`Mirror`] tells a writer when its own write reached the copy.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use super::{Backend, Event, KeyValue, WatchItem};

/// Keeps a local copy of every key under a prefix current by watch: loads, then
/// applies events, and reloads when the watch reports compaction.
pub trait MirrorHandler: Send + 'static {
    /// Replace the whole state with `kvs`, read at `revision`.
    fn reset(&mut self, kvs: Vec<KeyValue>, revision: i64);
    /// Apply events up to `revision`.
    fn apply(&mut self, events: Vec<Event>, revision: i64);
}

/// Runs a mirror of `prefix` into `handler` until the returned handle is dropped.
/// `ready` turns to the first loaded revision once the initial load is done.
pub fn mirror<H: MirrorHandler>(
    backend: &Backend,
    prefix: impl Into<Bytes>,
    handler: Arc<parking_lot::Mutex<H>>,
) -> Mirror {
    let prefix = prefix.into();
    let (rev_tx, rev_rx) = watch::channel(0i64);
    let backend = backend.clone();
    let task = tokio::spawn(async move {
        loop {
            let (kvs, rev) = match backend.load_prefix(prefix.clone()).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "mirror load failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            handler.lock().reset(kvs, rev);
            let _ = rev_tx.send(rev);
            let mut w = backend.watch_prefix(prefix.clone(), rev + 1);
            while let Some(item) = w.next().await {
                match item {
                    WatchItem::Events { revision, events } => {
                        handler.lock().apply(events, revision);
                        let _ = rev_tx.send(revision);
                    }
                    WatchItem::Reset { .. } => break,
                }
            }
        }
    });
    Mirror {
        revision: rev_rx,
        task,
    }
}

/// Longest the first load of a watched copy may take before opening fails.
pub const LOAD_LIMIT: Duration = Duration::from_secs(120);

/// Longest a writer waits for its own write to reach the local copy.
pub const MIRROR_WAIT: Duration = Duration::from_secs(10);

/// A running mirror; see [`mirror`].
pub struct Mirror {
    revision: watch::Receiver<i64>,
    task: tokio::task::JoinHandle<()>,
}

impl Mirror {
    /// Waits (at most `limit`) for the first load; false if it did not finish.
    pub async fn loaded(&self, limit: Duration) -> bool {
        let mut rx = self.revision.clone();
        tokio::time::timeout(limit, async {
            while *rx.borrow_and_update() <= 0 {
                if rx.changed().await.is_err() {
                    return false;
                }
            }
            true
        })
        .await
        .unwrap_or(false)
    }

    /// The revision the local copy has reached (0 until loaded).
    pub fn revision(&self) -> i64 {
        *self.revision.borrow()
    }

    /// Waits (at most [`MIRROR_WAIT`]) until the local copy reached at least `rev`;
    /// false if it did not (the watch is behind or broken).
    pub async fn wait_for(&self, rev: i64) -> bool {
        let mut rx = self.revision.clone();
        tokio::time::timeout(MIRROR_WAIT, async {
            while *rx.borrow_and_update() < rev {
                if rx.changed().await.is_err() {
                    return false;
                }
            }
            true
        })
        .await
        .unwrap_or(false)
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}
