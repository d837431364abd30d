//! Watch streams: a client's stream of watchers over the watch hub (`crate::watch`).
//! A watcher starting at or below the current revision is registered behind and
//! caught up from disk (`catch_up`); one starting below the compaction revision is
//! cancelled with it, as etcd does.

use tokio::sync::mpsc;

use super::Store;
use crate::error::Result;
use crate::watch::{WatchCreateError, WatchMessage, WatchSpec, Watcher};

impl Store {
    /// Opens a watch stream: watchers created on it deliver into the returned receiver.
    pub fn watch_stream(&self) -> (WatchStream, mpsc::Receiver<WatchMessage>) {
        let (tx, rx) = mpsc::channel(self.shared.cfg.watch_buffer_events);
        let id = self.shared.hub.open_stream();
        (
            WatchStream {
                store: self.clone(),
                id,
                tx,
            },
            rx,
        )
    }

    /// Sends a progress notification to every synced watcher that asked for them.
    pub fn notify_progress(&self) {
        self.shared.hub.progress(None);
    }
}

/// A watch stream: create and cancel watchers; dropping it removes them all.
pub struct WatchStream {
    store: Store,
    id: u64,
    tx: mpsc::Sender<WatchMessage>,
}

impl WatchStream {
    /// Creates a watcher: sends `Created`, then its events. A start revision below the
    /// compaction revision gets `Created` then `Canceled` with the compaction revision.
    pub async fn create(&self, spec: WatchSpec) -> Result<i64, WatchCreateError> {
        let shared = &self.store.shared;
        let id = shared.hub.reserve(
            self.id,
            spec.watch_id,
            shared.cfg.max_watchers_per_stream,
            spec.prev_kv,
        )?;
        let revision = self.store.revision();
        self.tx
            .send(WatchMessage::Created {
                watch_id: id,
                revision,
            })
            .await
            .map_err(|_| WatchCreateError::Closed)?;
        let compact = self.store.compact_revision();
        let key = (self.id, id);
        if spec.start_revision > 0 && spec.start_revision < compact {
            shared.hub.cancel(key);
            // Never registered: release what `reserve` counted.
            shared.hub.release_behind(&Watcher {
                min_rev: 0,
                spec,
                tx: self.tx.clone(),
            });
            let reason = "etcdserver: mvcc: required revision has been compacted".to_string();
            let msg = WatchMessage::Canceled {
                watch_id: id,
                revision,
                compact_revision: compact,
                reason,
            };
            self.tx
                .send(msg)
                .await
                .map_err(|_| WatchCreateError::Closed)?;
            return Ok(id);
        }
        let mut spec = spec;
        if spec.start_revision <= 0 {
            // "From now" means right after the revision `Created` reported: commits published
            // meanwhile are caught up, and ones published at or below it are not repeated.
            spec.start_revision = revision + 1;
        }
        let watcher = Watcher {
            min_rev: spec.start_revision,
            spec,
            tx: self.tx.clone(),
        };
        if let Some(behind) = shared.hub.register(key, watcher) {
            shared.runtime.spawn(self.store.clone().catch_up(behind));
        }
        Ok(id)
    }

    /// Cancels a watcher; sends `Canceled` if it existed.
    pub async fn cancel(&self, watch_id: i64) -> bool {
        if !self.store.shared.hub.cancel((self.id, watch_id)) {
            return false;
        }
        let msg = WatchMessage::Canceled {
            watch_id,
            revision: self.store.revision(),
            compact_revision: 0,
            reason: String::new(),
        };
        let _ = self.tx.send(msg).await;
        true
    }

    /// Sends a progress notification to every synced watcher of this stream.
    pub fn request_progress(&self) {
        self.store.shared.hub.progress(Some(self.id));
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.store.shared.hub.close_stream(self.id);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::Store;
    use crate::config::StoreConfig;
    use crate::ops::PutRequest;
    use crate::types::KeyRange;
    use crate::watch::{WatchMessage, WatchSpec};

    #[tokio::test]
    async fn a_watch_refused_as_compacted_releases_its_prev_kv_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = StoreConfig {
            fsync: false,
            ..StoreConfig::default()
        };
        let store = Store::open(dir.path(), cfg).expect("open");
        for value in ["1", "2", "3"] {
            let put = PutRequest {
                key: Bytes::from_static(b"a"),
                value: Bytes::from_static(value.as_bytes()),
                ..PutRequest::default()
            };
            store.put(put).await.expect("put");
        }
        store.compact(3).await.expect("compact");
        let (stream, mut rx) = store.watch_stream();
        let spec = WatchSpec {
            range: KeyRange::single("a"),
            start_revision: 2,
            prev_kv: true,
            no_put: false,
            no_delete: false,
            progress_notify: false,
            watch_id: 0,
        };
        stream.create(spec).await.expect("create");
        assert!(matches!(
            rx.recv().await,
            Some(WatchMessage::Created { .. })
        ));
        assert!(matches!(
            rx.recv().await,
            Some(WatchMessage::Canceled { .. })
        ));
        // Otherwise every later write would read its previous value for nobody.
        assert!(!store.shared.hub.wants_prev_kv());
        store.close().await;
    }
}
