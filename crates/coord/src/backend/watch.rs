//! Resuming watches: a watch follows its range from a revision on whichever endpoint
//! is current, resumes from the next revision after a failure, and ends with
//! [`WatchItem::Reset`] when that revision was compacted away.

use std::time::Duration;

use bytes::Bytes;
use meshwork_etcd::Client;
use meshwork_etcd::proto::etcdserverpb as pb;
use tokio::sync::mpsc;

use super::{Backend, Event, prefix_end};

impl Backend {
    /// Watches every key under `prefix` from `start_revision` (0 = now), resuming on
    /// another endpoint after failures. The stream ends when the receiver is dropped.
    pub fn watch_prefix(&self, prefix: impl Into<Bytes>, start_revision: i64) -> WatchStream {
        let prefix = prefix.into();
        let range_end = prefix_end(&prefix);
        self.watch_range(prefix, range_end, start_revision)
    }

    /// Watches `[key, range_end)` (an empty `range_end` = the one key).
    pub fn watch_range(&self, key: Bytes, range_end: Bytes, start_revision: i64) -> WatchStream {
        let (tx, rx) = mpsc::channel(256);
        let backend = self.clone();
        tokio::spawn(async move {
            let mut next = start_revision;
            let mut backoff = Duration::from_millis(20);
            loop {
                let cur = backend.current();
                let end = run_watch(&cur.client, &key, &range_end, &mut next, &tx).await;
                match end {
                    WatchEnd::ReceiverGone => return,
                    WatchEnd::Compacted(rev) => {
                        let _ = tx.send(WatchItem::Reset { compacted: rev }).await;
                        return;
                    }
                    WatchEnd::Failed(err) => {
                        if tx.is_closed() {
                            return;
                        }
                        tracing::debug!(error = %err, "watch broke; resuming");
                        backend.failover(cur.generation).await;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                    WatchEnd::Healthy => backoff = Duration::from_millis(20),
                }
            }
        });
        WatchStream { rx }
    }
}

/// Why one watch stream ended.
enum WatchEnd {
    ReceiverGone,
    Compacted(i64),
    Failed(String),
    /// The stream ended cleanly (server shutdown): reconnect promptly.
    Healthy,
}

/// Follows one watch stream on `client`, advancing `next` past every revision it
/// delivers or learns is settled, until the stream ends (and says how).
async fn run_watch(
    client: &Client,
    key: &Bytes,
    range_end: &Bytes,
    next: &mut i64,
    tx: &mpsc::Sender<WatchItem>,
) -> WatchEnd {
    // `_requests` keeps the request side open for the life of the watch.
    let (_requests, mut stream) = match open_watch(client, key, range_end, *next).await {
        Ok(opened) => opened,
        Err(end) => return end,
    };
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = tx.closed() => return WatchEnd::ReceiverGone,
        };
        match msg {
            Ok(Some(resp)) => {
                if resp.compact_revision > 0 {
                    return WatchEnd::Compacted(resp.compact_revision);
                }
                if resp.canceled {
                    return WatchEnd::Failed(format!("watch canceled: {}", resp.cancel_reason));
                }
                let revision = resp.header.map(|h| h.revision).unwrap_or(0);
                if resp.created && *next == 0 {
                    // A watch "from now": pin "now", so that a resume after a failover
                    // continues from here instead of from the new endpoint's "now".
                    *next = revision + 1;
                }
                if resp.events.is_empty() {
                    if !resp.created && revision >= *next {
                        // Progress notification: nothing below `revision` is pending.
                        *next = revision + 1;
                    }
                    continue;
                }
                let last = resp
                    .events
                    .last()
                    .and_then(|e| e.kv.as_ref())
                    .map(|kv| kv.mod_revision)
                    .unwrap_or(revision);
                *next = last + 1;
                if tx
                    .send(WatchItem::Events {
                        revision: last,
                        events: resp.events,
                    })
                    .await
                    .is_err()
                {
                    return WatchEnd::ReceiverGone;
                }
            }
            Ok(None) => return WatchEnd::Healthy,
            Err(s) => return WatchEnd::Failed(s.to_string()),
        }
    }
}

/// The request side of an open watch (held open while the watch runs) and its responses.
type OpenWatch = (
    mpsc::Sender<pb::WatchRequest>,
    tonic::Streaming<pb::WatchResponse>,
);

/// Opens a watch of `[key, range_end)` from `start_revision` on `client`.
async fn open_watch(
    client: &Client,
    key: &Bytes,
    range_end: &Bytes,
    start_revision: i64,
) -> Result<OpenWatch, WatchEnd> {
    let create = pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: key.clone(),
                range_end: range_end.clone(),
                start_revision,
                ..Default::default()
            },
        )),
    };
    // Keep the request side open for the life of the watch.
    let (req_tx, req_rx) = mpsc::channel::<pb::WatchRequest>(1);
    if req_tx.send(create).await.is_err() {
        return Err(WatchEnd::Failed("request channel closed".into()));
    }
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(req_rx));
    // etcd cancels a watch whose member lost its leader instead of stalling it.
    request.metadata_mut().insert(
        "hasleader",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let mut wc = client.watch.clone();
    match wc.watch(request).await {
        Ok(r) => Ok((req_tx, r.into_inner())),
        Err(s) => Err(WatchEnd::Failed(s.to_string())),
    }
}

/// What a watch delivers.
#[derive(Debug)]
pub enum WatchItem {
    /// Events of one or more revisions, up to and including `revision`.
    Events {
        /// The last revision in `events`.
        revision: i64,
        /// The events, in revision order.
        events: Vec<Event>,
    },
    /// The revision to resume from was compacted: reload the state and watch again.
    Reset {
        /// The compaction revision reported by the server.
        compacted: i64,
    },
}

/// A resuming watch; see [`Backend::watch_prefix`].
pub struct WatchStream {
    rx: mpsc::Receiver<WatchItem>,
}

impl WatchStream {
    /// The next item; `None` only once the watch task stopped (after a `Reset`).
    pub async fn next(&mut self) -> Option<WatchItem> {
        self.rx.recv().await
    }
}
