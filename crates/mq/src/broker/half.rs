//! Transactional (half) messages: prepared by a producer, invisible to every group until
//! the producer commits them (or dropped when it rolls them back), and checked back with
//! the producer service when left unresolved.
//!
//! On disk a half message is a record of the broker's own topic `__half` (one partition):
//! the message with, in `mq-half-*` headers, its id, its topic and its producer service. A
//! resolution is a record there too (`mq-half-resolve`). The pending set lives in memory,
//! bounded by `mq.max_half_pending`, and is rebuilt at open by reading `__half` from its
//! start; segments wholly before the oldest pending half message are deleted.
//!
//! Invariants:
//! - a half message answers only once its record is durable, a resolution only once its
//!   record is;
//! - a commit publishes the message to its topic, with the half message's id, before it
//!   writes the resolution: a crash between the two leaves it pending, and the commit
//!   repeated (by the producer or after a check-back) is deduplicated by the id within the
//!   dedup window;
//! - one resolution runs at a time per half message, in a task of its own: a caller that
//!   goes away does not leave it half done.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;

use super::{Append, Broker, Topic};
use crate::config::{TopicConfig, validate_name};
use crate::error::{MqError, Result};
use crate::message::{Message, NewMessage};

/// The broker's own topic holding half messages and their resolutions.
pub(crate) const HALF_TOPIC: &str = "__half";
const H_ID: &str = "mq-half-id";
const H_TOPIC: &str = "mq-half-topic";
const H_PRODUCER: &str = "mq-half-producer";
const H_RESOLVE: &str = "mq-half-resolve";
const H_STATE: &str = "mq-half-state";
const H_PLACE: &str = "mq-half-place";

/// What a producer decides for its half message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfDecision {
    /// Publish it to its topic.
    Commit,
    /// Drop it.
    Rollback,
}

/// How a half message ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum HalfOutcome {
    /// Published to its topic, there.
    Committed {
        /// The partition.
        partition: u32,
        /// The offset.
        offset: u64,
    },
    /// Dropped (by its producer, or after its checks ran out).
    RolledBack,
}

impl HalfOutcome {
    fn name(&self) -> &'static str {
        match self {
            HalfOutcome::Committed { .. } => "committed",
            HalfOutcome::RolledBack => "rolled back",
        }
    }
}

/// A pending half message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HalfInfo {
    /// The message id (what commit and rollback name).
    pub id: u64,
    /// The topic it goes to on commit.
    pub topic: String,
    /// The service asked when it is left unresolved.
    pub producer: String,
    /// When it was prepared (ms since the epoch).
    pub prepared_ms: u64,
    /// Check-backs made so far (since the broker started).
    pub checks: u32,
    /// When the next check-back is due (ms since the epoch).
    pub next_check_ms: u64,
}

/// A check-back to make: ask `info.producer` whether to commit `message`.
#[derive(Clone, Debug)]
pub struct HalfCheck {
    /// The half message.
    pub info: HalfInfo,
    /// The message, as it would be published.
    pub message: Message,
}

struct Pending {
    topic: String,
    producer: String,
    /// Its record's offset in `__half`.
    offset: u64,
    prepared_ms: u64,
    next_check_ms: u64,
    checks: u32,
    resolving: bool,
}

impl Pending {
    fn info(&self, id: u64) -> HalfInfo {
        HalfInfo {
            id,
            topic: self.topic.clone(),
            producer: self.producer.clone(),
            prepared_ms: self.prepared_ms,
            checks: self.checks,
            next_check_ms: self.next_check_ms,
        }
    }
}

/// The pending half messages and the recently resolved ones.
#[derive(Default)]
pub(crate) struct Halves {
    pending: HashMap<u64, Pending>,
    /// `(next_check_ms, id)` of every pending half message not being resolved.
    timers: BTreeSet<(u64, u64)>,
    resolved: HashMap<u64, HalfOutcome>,
    resolved_order: VecDeque<u64>,
}

impl Halves {
    fn add_pending(&mut self, id: u64, p: Pending) -> &Pending {
        let at = p.next_check_ms;
        let entry = self.pending.entry(id).or_insert(p);
        if !entry.resolving && entry.next_check_ms == at {
            self.timers.insert((at, id));
        }
        entry
    }

    fn finish(&mut self, id: u64, outcome: HalfOutcome, keep: usize) {
        if let Some(p) = self.pending.remove(&id) {
            self.timers.remove(&(p.next_check_ms, id));
        }
        if self.resolved.insert(id, outcome).is_none() {
            self.resolved_order.push_back(id);
        }
        while self.resolved_order.len() > keep {
            if let Some(old) = self.resolved_order.pop_front() {
                self.resolved.remove(&old);
            }
        }
    }

    /// The oldest pending record's offset in `__half`.
    pub(crate) fn oldest_offset(&self) -> Option<u64> {
        self.pending.values().map(|p| p.offset).min()
    }

    /// Pending half messages.
    pub(crate) fn pending_count(&self) -> usize {
        self.pending.len()
    }
}

fn header_str<'a>(m: &'a Message, name: &str) -> Option<&'a str> {
    m.header(name).and_then(|v| std::str::from_utf8(v).ok())
}

/// Rebuilds the pending set from `__half` (at open).
pub(crate) fn load(topic: &Topic, check_after_ms: u64, keep: usize) -> Result<Halves> {
    let mut h = Halves::default();
    let part = &topic.parts[0];
    part.for_each(part.start(), |r| {
        let m = Message::decode(r.payload)?;
        if let Some(id) = header_str(&m, H_RESOLVE).and_then(|s| s.parse::<u64>().ok()) {
            let outcome = match header_str(&m, H_STATE) {
                Some("commit") => {
                    let place = header_str(&m, H_PLACE)
                        .and_then(|p| p.split_once('/'))
                        .and_then(|(p, o)| Some((p.parse().ok()?, o.parse().ok()?)));
                    let (partition, offset) = place.unwrap_or((0, 0));
                    HalfOutcome::Committed { partition, offset }
                }
                _ => HalfOutcome::RolledBack,
            };
            h.finish(id, outcome, keep);
            return Ok(());
        }
        let (Some(id), Some(t), Some(producer)) = (
            header_str(&m, H_ID).and_then(|s| s.parse::<u64>().ok()),
            header_str(&m, H_TOPIC),
            header_str(&m, H_PRODUCER),
        ) else {
            tracing::warn!(
                offset = r.offset,
                "a record of __half without its headers; ignored"
            );
            return Ok(());
        };
        if !h.resolved.contains_key(&id) {
            let pending = Pending {
                topic: t.to_string(),
                producer: producer.to_string(),
                offset: r.offset,
                prepared_ms: m.publish_ms,
                next_check_ms: m.publish_ms.saturating_add(check_after_ms),
                checks: 0,
                resolving: false,
            };
            h.add_pending(id, pending);
        }
        Ok(())
    })?;
    Ok(h)
}

/// Marks a half message's resolution done (or given up) when dropped.
struct Resolving {
    broker: Broker,
    id: u64,
    outcome: Option<HalfOutcome>,
}

impl Drop for Resolving {
    fn drop(&mut self) {
        let inner = &self.broker.inner;
        {
            let mut h = inner.halves.lock();
            match self.outcome {
                Some(o) => h.finish(self.id, o, inner.cfg.max_half_pending),
                None => {
                    if let Some(p) = h.pending.get_mut(&self.id) {
                        p.resolving = false;
                        let at = p.next_check_ms;
                        h.timers.insert((at, self.id));
                    }
                }
            }
        }
        inner.half_changed.notify_waiters();
    }
}

impl Broker {
    async fn half_topic(&self) -> Result<Arc<Topic>> {
        if let Ok(t) = self.topic(HALF_TOPIC) {
            return Ok(t);
        }
        let config = TopicConfig {
            partitions: 1,
            retention_ms: 0,
            retention_bytes: 0,
        };
        self.create_topic_inner(HALF_TOPIC, config, true).await
    }

    /// Appends a record to `__half`, durably; its offset.
    async fn append_half(&self, half: Arc<Topic>, rec: NewMessage) -> Result<u64> {
        let placed = self
            .submit(
                vec![Append {
                    topic: half,
                    part: 0,
                    msg: rec,
                }],
                Vec::new(),
            )
            .await?;
        Ok(placed.first().map_or(0, |p| p.offset))
    }

    /// Prepares a half message for `topic`: durable, invisible to every group until
    /// [`Broker::resolve_half`] commits it; `producer` is the service asked when it is left
    /// unresolved. Preparing a pending id again answers the first.
    pub async fn prepare_half(
        &self,
        topic: &str,
        producer: &str,
        msg: NewMessage,
    ) -> Result<HalfInfo> {
        let t = self.topic(topic)?;
        if t.internal {
            return Err(MqError::Invalid(format!(
                "{topic:?} is the broker's own topic; publish to it is refused"
            )));
        }
        validate_name("producer", producer)?;
        if msg.id == 0 {
            return Err(MqError::Invalid(
                "a half message needs an id (non-zero): its commit is deduplicated by it".into(),
            ));
        }
        self.check_message(&msg)?;
        let id = msg.id;
        {
            let h = self.inner.halves.lock();
            if let Some(p) = h.pending.get(&id) {
                return if p.topic == topic {
                    Ok(p.info(id))
                } else {
                    Err(MqError::Invalid(format!(
                        "id {id} is already a half message of topic {:?}",
                        p.topic
                    )))
                };
            }
            if let Some(o) = h.resolved.get(&id) {
                return Err(MqError::HalfResolved {
                    id,
                    outcome: o.name(),
                });
            }
            if h.pending.len() >= self.inner.cfg.max_half_pending {
                return Err(MqError::Limit {
                    what: "pending half messages",
                    limit: self.inner.cfg.max_half_pending as u64,
                    setting: "max_half_pending",
                });
            }
        }
        let half = self.half_topic().await?;
        let mut rec = msg;
        rec.id = 0;
        rec.headers.push((H_ID.into(), Bytes::from(id.to_string())));
        rec.headers
            .push((H_TOPIC.into(), Bytes::from(topic.to_string())));
        rec.headers
            .push((H_PRODUCER.into(), Bytes::from(producer.to_string())));
        // The write and the pending entry in a task of their own: a caller that goes
        // away between them must not leave a durable half message that only a restart
        // would know about (its commit would be refused meanwhile).
        let (b, topic, producer) = (self.clone(), topic.to_string(), producer.to_string());
        let work = tokio::spawn(async move {
            let offset = b.append_half(half, rec).await?;
            let now = b.now_ms();
            let pending = Pending {
                topic: topic.clone(),
                producer,
                offset,
                prepared_ms: now,
                next_check_ms: now.saturating_add(b.inner.cfg.half_check_after.as_millis() as u64),
                checks: 0,
                resolving: false,
            };
            metrics::counter!("meshwork_mq_half_prepared_total", "topic" => topic).increment(1);
            Ok(b.inner.halves.lock().add_pending(id, pending).info(id))
        });
        work.await
            .map_err(|e| MqError::Storage(format!("preparing a half message: {e}")))?
    }

    /// Commits or rolls back a half message. Resolving it again the same way answers the
    /// first outcome; the other way is refused.
    pub async fn resolve_half(&self, id: u64, decision: HalfDecision) -> Result<HalfOutcome> {
        loop {
            let changed = self.inner.half_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let work = {
                let mut h = self.inner.halves.lock();
                if let Some(o) = h.resolved.get(&id).copied() {
                    return match (decision, o) {
                        (HalfDecision::Commit, HalfOutcome::Committed { .. })
                        | (HalfDecision::Rollback, HalfOutcome::RolledBack) => Ok(o),
                        _ => Err(MqError::HalfResolved {
                            id,
                            outcome: o.name(),
                        }),
                    };
                }
                let h = &mut *h;
                match h.pending.get_mut(&id) {
                    None => return Err(MqError::NoHalf(id)),
                    Some(p) if p.resolving => None,
                    Some(p) => {
                        p.resolving = true;
                        h.timers.remove(&(p.next_check_ms, id));
                        let (topic, offset) = (p.topic.clone(), p.offset);
                        let guard = Resolving {
                            broker: self.clone(),
                            id,
                            outcome: None,
                        };
                        // A task of its own: the caller going away does not stop it halfway.
                        Some(tokio::spawn(guard.run(decision, topic, offset)))
                    }
                }
            };
            if let Some(work) = work {
                return work
                    .await
                    .map_err(|e| MqError::Storage(format!("resolving a half message: {e}")))?;
            }
            changed.await;
        }
    }

    /// Pending half messages, oldest check first, at most `max`.
    pub fn halves(&self, max: usize) -> Vec<HalfInfo> {
        let h = self.inner.halves.lock();
        let mut out: Vec<HalfInfo> = h
            .timers
            .iter()
            .take(max)
            .filter_map(|&(_, id)| h.pending.get(&id).map(|p| p.info(id)))
            .collect();
        if out.len() < max {
            out.extend(
                h.pending
                    .iter()
                    .filter(|(_, p)| p.resolving)
                    .take(max - out.len())
                    .map(|(&id, p)| p.info(id)),
            );
        }
        out
    }

    /// One pending half message.
    pub fn half(&self, id: u64) -> Result<HalfInfo> {
        let h = self.inner.halves.lock();
        h.pending
            .get(&id)
            .map(|p| p.info(id))
            .ok_or(MqError::NoHalf(id))
    }

    /// The half messages whose check-back is due (at most `max`), each's next check
    /// scheduled a `mq.half_check_interval` later; those checked `mq.half_max_checks`
    /// times already are rolled back instead.
    pub async fn take_due_checks(&self, max: usize) -> Result<Vec<HalfCheck>> {
        let now = self.now_ms();
        let cfg = &self.inner.cfg;
        let interval = cfg.half_check_interval.as_millis() as u64;
        let mut due = Vec::new();
        let mut exhausted = Vec::new();
        {
            let mut h = self.inner.halves.lock();
            let h = &mut *h;
            while due.len() + exhausted.len() < max {
                let Some(&(at, id)) = h.timers.first() else {
                    break;
                };
                if at > now {
                    break;
                }
                h.timers.remove(&(at, id));
                let Some(p) = h.pending.get_mut(&id) else {
                    continue;
                };
                if p.checks >= cfg.half_max_checks {
                    // Resolved below; until then it keeps no timer.
                    exhausted.push((id, p.topic.clone(), p.checks));
                    continue;
                }
                p.checks += 1;
                p.next_check_ms = now.saturating_add(interval);
                h.timers.insert((p.next_check_ms, id));
                due.push((p.info(id), p.offset));
            }
        }
        for (id, topic, checks) in exhausted {
            tracing::warn!(id, topic = %topic, checks, "half message still unresolved after its last check-back; rolled back");
            metrics::counter!("meshwork_mq_half_expired_total", "topic" => topic).increment(1);
            match self.resolve_half(id, HalfDecision::Rollback).await {
                Ok(_) | Err(MqError::NoHalf(_) | MqError::HalfResolved { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let half = self.half_topic().await?;
        let mut checks = Vec::with_capacity(due.len());
        for (info, offset) in due {
            checks.push(HalfCheck {
                message: read_half(&half, offset, info.id)?,
                info,
            });
        }
        Ok(checks)
    }
}

/// Reads a half message back as it would be published.
fn read_half(half: &Topic, offset: u64, id: u64) -> Result<Message> {
    let rec = half.parts[0]
        .read(offset, 1, 1)?
        .into_iter()
        .next()
        .filter(|r| r.offset == offset)
        .ok_or_else(|| {
            MqError::Storage(format!("half message {id}: its record at {offset} is gone"))
        })?;
    let mut m = Message::decode(rec.payload)?;
    m.id = id;
    m.headers.retain(|(k, _)| !k.starts_with("mq-half-"));
    Ok(m)
}

impl Resolving {
    async fn run(
        mut self,
        decision: HalfDecision,
        topic: String,
        offset: u64,
    ) -> Result<HalfOutcome> {
        let b = self.broker.clone();
        let half = b.half_topic().await?;
        let outcome = match decision {
            HalfDecision::Commit => {
                let m = read_half(&half, offset, self.id)?;
                let mut new = m.to_new();
                new.deliver_at_ms = m.deliver_at_ms;
                let placed = b.publish(&topic, vec![new]).await?;
                let p = placed
                    .first()
                    .ok_or_else(|| MqError::Storage("a publish answered no placement".into()))?;
                HalfOutcome::Committed {
                    partition: p.partition,
                    offset: p.offset,
                }
            }
            HalfDecision::Rollback => HalfOutcome::RolledBack,
        };
        let mut headers = vec![(H_RESOLVE.to_string(), Bytes::from(self.id.to_string()))];
        match outcome {
            HalfOutcome::Committed { partition, offset } => {
                headers.push((H_STATE.into(), Bytes::from_static(b"commit")));
                headers.push((H_PLACE.into(), Bytes::from(format!("{partition}/{offset}"))));
            }
            HalfOutcome::RolledBack => {
                headers.push((H_STATE.into(), Bytes::from_static(b"rollback")));
            }
        }
        let rec = NewMessage {
            headers,
            ..NewMessage::default()
        };
        b.append_half(half, rec).await?;
        let label = match outcome {
            HalfOutcome::Committed { .. } => "committed",
            HalfOutcome::RolledBack => "rolled_back",
        };
        metrics::counter!("meshwork_mq_half_resolved_total", "topic" => topic, "outcome" => label)
            .increment(1);
        self.outcome = Some(outcome);
        Ok(outcome)
    }
}
