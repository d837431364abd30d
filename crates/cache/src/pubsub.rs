//! Pub/sub: channels and patterns, `PUBLISH` delivering to every subscribed connection
//! (on any worker) through a bounded queue per subscriber. A subscriber whose queue is
//! full — one that does not read — is cut off (its connection closed), as Redis does
//! past `client-output-buffer-limit pubsub`: a slow reader never holds the publisher
//! or the others up, nor grows memory without bound.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use parking_lot::RwLock;
use tokio::sync::mpsc;

use crate::glob::glob_match;
use crate::resp::Reply;

/// Messages queued for one subscriber before it is cut off.
pub const QUEUE: usize = 64 * 1024;
/// Bytes queued for one subscriber before it is cut off (Redis' default
/// `client-output-buffer-limit pubsub` hard limit, 32 MiB).
pub const QUEUE_BYTES: usize = 32 * 1024 * 1024;

/// A message on its way to a subscriber.
#[derive(Clone, Debug)]
pub struct Message {
    /// The pattern that matched (`pmessage`), or none (`message`).
    pub pattern: Option<Bytes>,
    /// The channel.
    pub channel: Bytes,
    /// The payload.
    pub payload: Bytes,
}

impl Message {
    /// What it counts against its subscriber's queue.
    pub fn size(&self) -> usize {
        self.channel.len() + self.payload.len() + self.pattern.as_ref().map_or(0, Bytes::len) + 64
    }

    /// As Redis pushes it (an array in RESP2, a push in RESP3).
    pub fn reply(&self) -> Reply {
        match &self.pattern {
            None => Reply::Push(vec![
                Reply::bulk("message"),
                Reply::Bulk(self.channel.clone()),
                Reply::Bulk(self.payload.clone()),
            ]),
            Some(p) => Reply::Push(vec![
                Reply::bulk("pmessage"),
                Reply::Bulk(p.clone()),
                Reply::Bulk(self.channel.clone()),
                Reply::Bulk(self.payload.clone()),
            ]),
        }
    }
}

/// One connection's end of its subscriptions, held in the registry.
#[derive(Debug)]
pub struct Handle {
    id: u64,
    tx: mpsc::Sender<Message>,
    /// Set when its queue overflowed: the connection closes.
    pub cut: AtomicBool,
    /// Rung when it is cut (a write stuck on the unread socket gives up).
    pub cut_signal: tokio::sync::Notify,
    /// Bytes of messages queued and not yet taken by its connection.
    pub queued: std::sync::atomic::AtomicUsize,
}

/// A connection's subscriptions.
#[derive(Debug)]
pub struct Subscriber {
    /// Its handle in the registry.
    pub handle: Arc<Handle>,
    /// Where its messages arrive.
    pub rx: mpsc::Receiver<Message>,
    /// Channels subscribed.
    pub channels: BTreeSet<Bytes>,
    /// Patterns subscribed.
    pub patterns: BTreeSet<Bytes>,
}

impl Subscriber {
    /// A subscriber for connection `id`, subscribed to nothing yet.
    pub fn new(id: u64) -> Subscriber {
        let (tx, rx) = mpsc::channel(QUEUE);
        Subscriber {
            handle: Arc::new(Handle {
                id,
                tx,
                cut: AtomicBool::new(false),
                cut_signal: tokio::sync::Notify::new(),
                queued: std::sync::atomic::AtomicUsize::new(0),
            }),
            rx,
            channels: BTreeSet::new(),
            patterns: BTreeSet::new(),
        }
    }

    /// Subscriptions held (what Redis counts in its replies).
    pub fn count(&self) -> usize {
        self.channels.len() + self.patterns.len()
    }
}

/// Every subscription of the node.
#[derive(Default)]
pub struct PubSub {
    channels: RwLock<HashMap<Bytes, Vec<Arc<Handle>>>>,
    patterns: RwLock<Vec<(Bytes, Arc<Handle>)>>,
}

impl PubSub {
    /// Adds `s` to `channel`; false if it was there.
    pub fn subscribe(&self, s: &mut Subscriber, channel: &Bytes) -> bool {
        let channel = Bytes::copy_from_slice(channel);
        if !s.channels.insert(channel.clone()) {
            return false;
        }
        self.channels
            .write()
            .entry(channel)
            .or_default()
            .push(s.handle.clone());
        true
    }

    /// Removes `s` from `channel`; false if it was not there.
    pub fn unsubscribe(&self, s: &mut Subscriber, channel: &[u8]) -> bool {
        if !s.channels.remove(channel) {
            return false;
        }
        let mut map = self.channels.write();
        if let Some(list) = map.get_mut(channel) {
            list.retain(|h| h.id != s.handle.id);
            if list.is_empty() {
                map.remove(channel);
            }
        }
        true
    }

    /// Adds `s` to `pattern`; false if it was there.
    pub fn psubscribe(&self, s: &mut Subscriber, pattern: &Bytes) -> bool {
        let pattern = Bytes::copy_from_slice(pattern);
        if !s.patterns.insert(pattern.clone()) {
            return false;
        }
        self.patterns.write().push((pattern, s.handle.clone()));
        true
    }

    /// Removes `s` from `pattern`; false if it was not there.
    pub fn punsubscribe(&self, s: &mut Subscriber, pattern: &[u8]) -> bool {
        if !s.patterns.remove(pattern) {
            return false;
        }
        self.patterns
            .write()
            .retain(|(p, h)| !(h.id == s.handle.id && &p[..] == pattern));
        true
    }

    /// Removes every subscription of `s` (its connection ended).
    pub fn forget(&self, s: &mut Subscriber) {
        for c in std::mem::take(&mut s.channels) {
            let mut map = self.channels.write();
            if let Some(list) = map.get_mut(&c) {
                list.retain(|h| h.id != s.handle.id);
                if list.is_empty() {
                    map.remove(&c);
                }
            }
        }
        if !s.patterns.is_empty() {
            s.patterns.clear();
            self.patterns.write().retain(|(_, h)| h.id != s.handle.id);
        }
    }

    /// Delivers `payload` on `channel`; returns how many subscriptions it reached.
    pub fn publish(&self, channel: &Bytes, payload: &Bytes) -> i64 {
        let (channel, payload) = (
            Bytes::copy_from_slice(channel),
            Bytes::copy_from_slice(payload),
        );
        let mut n = 0;
        let deliver = |h: &Arc<Handle>, m: Message| {
            let size = m.size();
            let over = h.queued.fetch_add(size, Ordering::AcqRel) + size > QUEUE_BYTES;
            if over || h.tx.try_send(m).is_err() {
                h.queued.fetch_sub(size, Ordering::AcqRel);
                if !h.cut.swap(true, Ordering::AcqRel) {
                    h.cut_signal.notify_one();
                    tracing::warn!(
                        client = h.id,
                        "cache: a subscriber does not read its messages; disconnected"
                    );
                    metrics::counter!("meshwork_cache_pubsub_cut_total").increment(1);
                }
            }
        };
        if let Some(list) = self.channels.read().get(&channel) {
            for h in list {
                deliver(
                    h,
                    Message {
                        pattern: None,
                        channel: channel.clone(),
                        payload: payload.clone(),
                    },
                );
                n += 1;
            }
        }
        for (p, h) in self.patterns.read().iter() {
            if glob_match(p, &channel) {
                deliver(
                    h,
                    Message {
                        pattern: Some(p.clone()),
                        channel: channel.clone(),
                        payload: payload.clone(),
                    },
                );
                n += 1;
            }
        }
        n
    }

    /// `PUBSUB CHANNELS [pattern]`: channels with a subscriber.
    pub fn channels(&self, pattern: Option<&[u8]>) -> Vec<Bytes> {
        self.channels
            .read()
            .keys()
            .filter(|c| pattern.is_none_or(|p| glob_match(p, c)))
            .cloned()
            .collect()
    }

    /// `PUBSUB NUMSUB`: subscribers of `channel`.
    pub fn numsub(&self, channel: &[u8]) -> usize {
        self.channels.read().get(channel).map_or(0, Vec::len)
    }

    /// `PUBSUB NUMPAT`: pattern subscriptions.
    pub fn numpat(&self) -> usize {
        self.patterns.read().len()
    }
}
