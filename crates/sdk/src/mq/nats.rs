//! The NATS JetStream backend of [`MqClient`](super::MqClient), chosen with
//! `MESHWORK_MQ=nats://HOST:PORT` (or [`MqClient::at`](super::MqClient::at)).
//!
//! How our model maps onto JetStream (server 2.9 and later):
//! - a topic is a stream `MW_{topic}` (file storage, one replica, a 2-minute
//!   duplicate window, 7 days' retention) over the subjects `mw.{topic}.{tag}`
//!   (`_` when untagged); it has one partition, whatever was asked, and a
//!   message's offset is its stream sequence minus one;
//! - a group is a durable pull consumer (explicit acks, the group's ack wait,
//!   `max_ack_pending` = `max_unacked`); its settings are kept in the consumer's
//!   description; a broadcast group's consumer `c` is the durable `{group}_7E{c}`;
//!   an ordered group hands out one message at a time for the whole topic
//!   (JetStream has no per-key concurrency); a group may filter on one tag;
//! - dead letters are built on JetStream's primitives: the server redelivers
//!   without limit and the SDK, on the delivery past `max_deliveries` (or the
//!   failure of the last one), republishes the message to the stream `MW_DLQ`
//!   (subject `mwdlq.{topic}.{group}`, with the embedded broker's `mq-dead-*`
//!   headers) and terminates it;
//! - the id deduplicates through `Nats-Msg-Id`; key, tag and publish id travel in
//!   the `Mw-Key`, `Mw-Tag` and `Mw-Id` headers;
//! - delayed and prioritized messages are refused ("unsupported on this backend"):
//!   JetStream 2.9 schedules and orders neither.
//!
//! Names (topics, tags, groups, consumers) are escaped into NATS tokens: every
//! byte outside `A-Z a-z 0-9 -` becomes `_XX` (hex), so distinct names stay distinct.

use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer, stream};
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::{FETCH_WAIT, MqError, OutMessage, Published, REQUEST_TIMEOUT, Received};

/// The duplicate window of a topic's stream (the embedded broker's default).
const DEDUP_WINDOW: Duration = Duration::from_secs(120);
/// How long a topic's stream keeps messages (the embedded broker's default).
const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The stream of every group's dead letters.
const DLQ_STREAM: &str = "MW_DLQ";
/// Its subjects' prefix.
const DLQ_SUBJECTS: &str = "mwdlq";
/// Marks the id of a redriven dead letter (`REDRIVE_ID_BIT | its MW_DLQ sequence`).
const REDRIVE_ID_BIT: u64 = 1 << 62;
/// Longest topic or group name in bytes (as on the embedded broker).
const MAX_NAME_BYTES: usize = 120;

/// True for addresses this backend serves.
pub(super) fn is_nats_url(addr: &str) -> bool {
    addr.starts_with("nats://") || addr.starts_with("tls://")
}

/// A lazily connected JetStream context. Cheap to clone.
#[derive(Clone)]
pub(super) struct Nats {
    url: String,
    login: Option<(String, String)>,
    js: Arc<tokio::sync::OnceCell<jetstream::Context>>,
}

impl Nats {
    pub(super) fn new(url: &str) -> Nats {
        Nats {
            url: url.to_owned(),
            login: None,
            js: Arc::default(),
        }
    }

    pub(super) fn with_login(mut self, user: &str, password: &str) -> Nats {
        self.login = Some((user.to_owned(), password.to_owned()));
        self.js = Arc::default();
        self
    }

    /// The JetStream context, connecting on first use (a failed connect is retried
    /// by the next call; once connected, the client reconnects by itself).
    async fn js(&self) -> Result<jetstream::Context, MqError> {
        self.js
            .get_or_try_init(|| async {
                let opts = match &self.login {
                    Some((u, p)) => {
                        async_nats::ConnectOptions::with_user_and_password(u.clone(), p.clone())
                    }
                    None => async_nats::ConnectOptions::new(),
                };
                let client = opts
                    .connection_timeout(REQUEST_TIMEOUT)
                    .connect(self.url.as_str())
                    .await
                    .map_err(|e| MqError::Unreachable(format!("{}: {e}", self.url)))?;
                let mut js = jetstream::new(client);
                js.set_timeout(REQUEST_TIMEOUT);
                Ok(js)
            })
            .await
            .cloned()
    }

    pub(super) async fn create_topic(&self, topic: &str, partitions: u32) -> Result<(), MqError> {
        check_name("topic", topic)?;
        if partitions == 0 {
            return Err(MqError::Invalid("partitions must be at least 1".into()));
        }
        let js = self.js().await?;
        js.get_or_create_stream(stream::Config {
            name: stream_name(topic),
            subjects: vec![format!("mw.{}.>", token(topic))],
            storage: stream::StorageType::File,
            num_replicas: 1,
            duplicate_window: DEDUP_WINDOW,
            max_age: RETENTION,
            ..Default::default()
        })
        .await
        .map_err(|e| refused(&e, "creating the topic's stream"))?;
        Ok(())
    }

    async fn topic_stream(&self, topic: &str) -> Result<stream::Stream, MqError> {
        check_name("topic", topic)?;
        let js = self.js().await?;
        js.get_stream(stream_name(topic)).await.map_err(|e| {
            if let jetstream::context::GetStreamErrorKind::JetStream(j) = e.kind()
                && j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            {
                return not_found(format!("topic {topic:?} does not exist"));
            }
            refused(&e, "reading the topic's stream")
        })
    }

    /// The durable consumer of `group` (and broadcast `member`), created with
    /// `settings` when it does not exist; with the settings in force.
    async fn consumer(
        &self,
        topic: &str,
        group: &str,
        member: Option<&str>,
        settings: &Value,
    ) -> Result<(consumer::PullConsumer, GroupSettings), MqError> {
        check_name("group", group)?;
        let wanted = GroupSettings::parse(settings)?;
        let name = match member {
            Some(m) if wanted.broadcast => {
                if m.is_empty() || m.len() > MAX_NAME_BYTES {
                    return Err(MqError::Invalid("consumer must be 1 to 120 bytes".into()));
                }
                format!("{}_7E{}", token(group), token(m))
            }
            Some(_) => {
                return Err(MqError::Invalid(
                    "a consumer name is for broadcast groups only".into(),
                ));
            }
            None if wanted.broadcast => {
                return Err(MqError::Invalid(
                    "a broadcast group needs the consumer's name (SubscribeOptions::consumer)"
                        .into(),
                ));
            }
            None => token(group),
        };
        let stream = self.topic_stream(topic).await?;
        // An existing consumer keeps its settings (kept in its description).
        let mut c = stream
            .get_or_create_consumer(&name, wanted.consumer_config(topic, name.clone()))
            .await
            .map_err(|e| refused(&e, "creating the group"))?;
        let info = c
            .info()
            .await
            .map_err(|e| refused(&e, "reading the group"))?;
        let kept = info
            .config
            .description
            .as_deref()
            .and_then(|d| serde_json::from_str::<Value>(d).ok())
            .map(|v| GroupSettings::parse(&v))
            .transpose()?
            .unwrap_or(wanted);
        Ok((c, kept))
    }

    pub(super) async fn ensure_group(
        &self,
        topic: &str,
        group: &str,
        settings: &Value,
    ) -> Result<Value, MqError> {
        let wanted = GroupSettings::parse(settings)?;
        if wanted.broadcast {
            // Each member's consumer is made by its first subscription.
            check_name("group", group)?;
            self.topic_stream(topic).await?;
            return Ok(json!({ "topic": topic, "group": group, "config": wanted.json() }));
        }
        let (mut c, kept) = self.consumer(topic, group, None, settings).await?;
        let info = c
            .info()
            .await
            .map_err(|e| refused(&e, "reading the group"))?;
        Ok(json!({
            "topic": topic,
            "group": group,
            "config": kept.json(),
            "backlog": info.num_pending + info.num_ack_pending as u64,
            "unacked": info.num_ack_pending,
            "redelivered": info.num_redelivered,
        }))
    }

    pub(super) async fn publish_all(
        &self,
        topic: &str,
        msgs: &[(OutMessage, u64)],
    ) -> Result<Vec<Published>, MqError> {
        check_name("topic", topic)?;
        for (m, _) in msgs {
            if m.delay.is_some() {
                return Err(unsupported(
                    "delayed messages (JetStream 2.9 has no scheduled delivery)",
                ));
            }
            if m.priority > 0 {
                return Err(unsupported(
                    "message priority (JetStream delivers in stream order)",
                ));
            }
        }
        let js = self.js().await?;
        // Send them all, then collect the acks: one round trip for the batch.
        let mut pending = Vec::with_capacity(msgs.len());
        for (m, id) in msgs {
            let subject = format!(
                "mw.{}.{}",
                token(topic),
                m.tag.as_deref().map_or_else(|| "_".to_owned(), token)
            );
            let mut h = HeaderMap::new();
            let mut fields: Vec<(String, String)> = m.headers_with_trace().into_iter().collect();
            fields.push(("Nats-Msg-Id".into(), id.to_string()));
            fields.push(("Mw-Id".into(), id.to_string()));
            if let Some(k) = &m.key {
                fields.push(("Mw-Key".into(), k.clone()));
            }
            if let Some(t) = &m.tag {
                fields.push(("Mw-Tag".into(), t.clone()));
            }
            for (k, v) in fields {
                let name = async_nats::HeaderName::from_str(&k).map_err(|_| {
                    MqError::Invalid(format!("header name {k:?} is not a valid NATS header name"))
                })?;
                let value = async_nats::HeaderValue::from_str(&v).map_err(|_| {
                    MqError::Invalid(format!(
                        "header {k:?}: a value must not hold CR or LF on the NATS backend"
                    ))
                })?;
                h.insert(name, value);
            }
            let ack = js
                .publish_with_headers(subject, h, m.body.clone())
                .await
                .map_err(|e| publish_error(topic, &e))?;
            pending.push(ack);
        }
        let mut out = Vec::with_capacity(pending.len());
        for ack in pending {
            let a = ack.await.map_err(|e| publish_error(topic, &e))?;
            out.push(Published {
                partition: 0,
                offset: a.sequence.saturating_sub(1),
                duplicate: a.duplicate,
            });
        }
        Ok(out)
    }

    pub(super) async fn dead_letters(
        &self,
        topic: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<Received>, MqError> {
        check_name("topic", topic)?;
        check_name("group", group)?;
        let js = self.js().await?;
        let stream = match js.get_stream(DLQ_STREAM).await {
            Ok(s) => s,
            Err(e) => {
                if let jetstream::context::GetStreamErrorKind::JetStream(j) = e.kind()
                    && j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                {
                    // Nothing was ever dead-lettered.
                    return Ok(Vec::new());
                }
                return Err(refused(&e, "reading the dead letters"));
            }
        };
        // A short-lived reader: no acks, gone by itself a minute after its last use.
        let reader = stream
            .create_consumer(consumer::pull::Config {
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::None,
                filter_subject: format!("{DLQ_SUBJECTS}.{}.{}", token(topic), token(group)),
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .map_err(|e| refused(&e, "reading the dead letters"))?;
        let name = reader.cached_info().name.clone();
        let out = if limit > 0 {
            read_dead(&js, &reader, topic, group, limit).await
        } else {
            Ok(Vec::new())
        };
        // Gone now rather than after its inactivity threshold (best effort).
        let _ = stream.delete_consumer(&name).await;
        out
    }

    /// Publishes up to `max` dead letters of `group` on `topic` to the topic again (a
    /// fresh delivery count, an `mq-redriven-from` header naming the dead letter) and
    /// deletes them from `MW_DLQ`; returns how many moved. Each goes out with an id
    /// made from its place in `MW_DLQ`, so a redrive repeated after a failure between
    /// the publish and the delete is dropped by the stream's duplicate window.
    pub(super) async fn redrive(
        &self,
        topic: &str,
        group: &str,
        max: usize,
    ) -> Result<usize, MqError> {
        let dead = self.dead_letters(topic, group, max).await?;
        if dead.is_empty() {
            return Ok(0);
        }
        let js = self.js().await?;
        let stream = js
            .get_stream(DLQ_STREAM)
            .await
            .map_err(|e| refused(&e, "redriving the dead letters"))?;
        let mut moved = 0;
        for d in dead {
            let seq = d.offset + 1;
            let mut m = OutMessage::new(d.body.clone());
            m.key = (!d.key.is_empty()).then(|| d.key.clone());
            m.tag = (!d.tag.is_empty()).then(|| d.tag.clone());
            m.headers = d.headers.clone();
            m.headers.remove("mq-redriven-from");
            m.headers
                .insert("mq-redriven-from".into(), format!("{DLQ_STREAM}/{seq}"));
            let id = REDRIVE_ID_BIT | seq;
            self.publish_all(topic, &[(m, id)]).await?;
            stream
                .delete_message(seq)
                .await
                .map_err(|e| refused(&e, "deleting a redriven dead letter"))?;
            moved += 1;
        }
        Ok(moved)
    }

    /// A source of deliveries for a subscription.
    pub(super) async fn source(
        &self,
        topic: &str,
        group: &str,
        member: Option<&str>,
        settings: &Value,
    ) -> Result<(Source, Duration), MqError> {
        let (consumer, kept) = self.consumer(topic, group, member, settings).await?;
        let ack_wait = Duration::from_millis(kept.ack_wait_ms);
        Ok((
            Source {
                js: self.js().await?,
                consumer,
                topic: topic.to_owned(),
                group: group.to_owned(),
                max_deliveries: kept.max_deliveries,
            },
            ack_wait,
        ))
    }
}

/// Up to `limit` dead letters through the short-lived `reader`.
async fn read_dead(
    js: &jetstream::Context,
    reader: &consumer::PullConsumer,
    topic: &str,
    group: &str,
    limit: usize,
) -> Result<Vec<Received>, MqError> {
    let mut out = Vec::new();
    let mut batch = reader
        .fetch()
        .max_messages(limit.min(10_000))
        .messages()
        .await
        .map_err(|e| MqError::Unreachable(format!("reading the dead letters: {e}")))?;
    while let Some(m) = batch.next().await {
        let m = m.map_err(|e| MqError::Unreachable(format!("reading the dead letters: {e}")))?;
        let d = Delivery {
            js: js.clone(),
            message: m,
            dlq_subject: String::new(),
            max_deliveries: 0,
            topic: topic.to_owned(),
            group: group.to_owned(),
        };
        if let Some(r) = d.received() {
            out.push(r.into_dead_letter());
        }
    }
    Ok(out)
}

/// A subscription's pull consumer.
pub(super) struct Source {
    js: jetstream::Context,
    consumer: consumer::PullConsumer,
    topic: String,
    group: String,
    max_deliveries: u32,
}

impl Source {
    /// A pull request for up to `max` messages, open up to the fetch wait.
    pub(super) async fn batch(&self, max: usize) -> Result<Batch, MqError> {
        let batch = self
            .consumer
            .batch()
            .max_messages(max)
            .expires(FETCH_WAIT)
            .messages()
            .await
            .map_err(|e| MqError::Unreachable(format!("pulling from JetStream: {e}")))?;
        Ok(Batch { inner: batch })
    }

    /// What to run a handler on: `None` for a message dead-lettered here (its
    /// deliveries exhausted, its consumer gone) or one the SDK cannot read.
    pub(super) async fn take(&self, m: jetstream::Message) -> Option<(Received, Delivery)> {
        let d = Delivery {
            js: self.js.clone(),
            message: m,
            dlq_subject: format!(
                "{DLQ_SUBJECTS}.{}.{}",
                token(&self.topic),
                token(&self.group)
            ),
            max_deliveries: self.max_deliveries,
            topic: self.topic.clone(),
            group: self.group.clone(),
        };
        let Some(r) = d.received() else {
            tracing::warn!(topic = %self.topic, group = %self.group, "a JetStream message the SDK cannot read is dead-lettered");
            d.dead_letter("unreadable").await;
            return None;
        };
        if r.delivery > self.max_deliveries {
            d.dead_letter("max_deliveries").await;
            return None;
        }
        Some((r, d))
    }
}

/// One open pull request.
pub(super) struct Batch {
    inner: jetstream::consumer::pull::Batch,
}

impl Batch {
    /// The next message, `None` when the request is over.
    pub(super) async fn next(&mut self) -> Option<Result<jetstream::Message, MqError>> {
        self.inner
            .next()
            .await
            .map(|r| r.map_err(|e| MqError::Unreachable(format!("pulling from JetStream: {e}"))))
    }
}

/// A message handed out, with what settling it needs.
#[derive(Clone)]
pub(super) struct Delivery {
    js: jetstream::Context,
    message: jetstream::Message,
    dlq_subject: String,
    max_deliveries: u32,
    topic: String,
    group: String,
}

impl Delivery {
    fn received(&self) -> Option<Received> {
        let info = self.message.info().ok()?;
        let mut headers = std::collections::BTreeMap::new();
        let (mut id, mut key, mut tag) = (0, String::new(), String::new());
        if let Some(h) = &self.message.headers {
            for (name, values) in h.iter() {
                let Some(v) = values.last() else { continue };
                match AsRef::<str>::as_ref(name) {
                    "Mw-Id" => id = v.as_str().parse().unwrap_or(0),
                    "Mw-Key" => key = v.as_str().to_owned(),
                    "Mw-Tag" => tag = v.as_str().to_owned(),
                    n if n.starts_with("Nats-") => {}
                    n => {
                        headers.insert(n.to_owned(), v.as_str().to_owned());
                    }
                }
            }
        }
        let publish_ms = u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).ok()?;
        Some(Received {
            partition: 0,
            offset: info.stream_sequence.saturating_sub(1),
            delivery: u32::try_from(info.delivered).unwrap_or(u32::MAX),
            id,
            key,
            tag,
            headers,
            body: self.message.payload.clone(),
            publish_ms,
        })
    }

    /// True when a failure of this delivery sends the message to the dead letters.
    pub(super) fn last_chance(&self, delivery: u32) -> bool {
        delivery >= self.max_deliveries
    }

    pub(super) async fn extend(&self) -> Result<(), MqError> {
        self.send(AckKind::Progress).await
    }

    /// Acks and waits for the server's confirmation (so an ack answered is settled).
    pub(super) async fn ack(&self) -> Result<(), MqError> {
        self.confirmed(AckKind::Ack).await
    }

    pub(super) async fn nack(&self, delay: Option<Duration>) -> Result<(), MqError> {
        self.confirmed(AckKind::Nak(delay)).await
    }

    async fn send(&self, kind: AckKind) -> Result<(), MqError> {
        self.message
            .ack_with(kind)
            .await
            .map_err(|e| MqError::Unreachable(format!("settling a JetStream message: {e}")))
    }

    async fn confirmed(&self, kind: AckKind) -> Result<(), MqError> {
        self.message
            .double_ack_with(kind)
            .await
            .map_err(|e| MqError::Unreachable(format!("settling a JetStream message: {e}")))
    }

    /// Copies the message to the dead-letter stream, then terminates it (if the copy
    /// fails, the message stays and comes back after its ack wait).
    pub(super) async fn dead_letter(&self, why: &str) {
        match self.copy_to_dlq(why).await {
            Ok(()) => {
                tracing::warn!(topic = %self.topic, group = %self.group, why, "a message went to the dead letters");
                if let Err(e) = self.confirmed(AckKind::Term).await {
                    tracing::warn!(error = %e, "terminating a dead-lettered message failed; the DLQ may hold it twice");
                }
            }
            Err(e) => {
                tracing::warn!(topic = %self.topic, group = %self.group, error = %e, "dead-lettering failed; the message comes back after its ack wait");
            }
        }
    }

    async fn copy_to_dlq(&self, why: &str) -> Result<(), MqError> {
        self.js
            .get_or_create_stream(stream::Config {
                name: DLQ_STREAM.into(),
                subjects: vec![format!("{DLQ_SUBJECTS}.>")],
                storage: stream::StorageType::File,
                num_replicas: 1,
                duplicate_window: DEDUP_WINDOW,
                max_age: RETENTION,
                ..Default::default()
            })
            .await
            .map_err(|e| refused(&e, "creating the dead-letter stream"))?;
        let mut h = self.message.headers.clone().unwrap_or_default();
        let (seq, delivered) = self
            .message
            .info()
            .map(|i| (i.stream_sequence, i.delivered))
            .unwrap_or((0, 0));
        // The same dead letter written twice (a retry after a lost ack) is stored once;
        // each broadcast member's copy is its own (the durable names the member).
        let consumer = self
            .message
            .info()
            .map(|i| i.consumer.to_owned())
            .unwrap_or_default();
        h.insert(
            "Nats-Msg-Id",
            format!("{}.{consumer}.{seq}", self.topic).as_str(),
        );
        // The embedded broker's dead-letter headers.
        h.insert("mq-dead-topic", self.topic.as_str());
        h.insert("mq-dead-group", self.group.as_str());
        h.insert("mq-dead-partition", "0");
        h.insert("mq-dead-offset", seq.saturating_sub(1).to_string().as_str());
        h.insert("mq-dead-deliveries", delivered.to_string().as_str());
        h.insert("mq-dead-reason", why);
        let ack = self
            .js
            .publish_with_headers(self.dlq_subject.clone(), h, self.message.payload.clone())
            .await
            .map_err(|e| publish_error(DLQ_STREAM, &e))?;
        ack.await.map_err(|e| publish_error(DLQ_STREAM, &e))?;
        Ok(())
    }
}

/// A group's settings (the JSON of the embedded broker's group config).
#[derive(Clone, Debug, PartialEq)]
struct GroupSettings {
    broadcast: bool,
    ordered: bool,
    start: consumer::DeliverPolicy,
    start_json: Value,
    ack_wait_ms: u64,
    max_deliveries: u32,
    tag: Option<String>,
    max_unacked: u32,
}

impl GroupSettings {
    fn parse(v: &Value) -> Result<GroupSettings, MqError> {
        let invalid = |m: &str| MqError::Invalid(m.to_owned());
        let Some(obj) = v.as_object() else {
            return Err(invalid("group settings must be a JSON object"));
        };
        for k in obj.keys() {
            if !matches!(
                k.as_str(),
                "mode"
                    | "start"
                    | "ack_wait_ms"
                    | "max_deliveries"
                    | "tags"
                    | "priority_aging_ms"
                    | "max_unacked"
                    | "max_window"
            ) {
                return Err(MqError::Invalid(format!(
                    "unknown group setting {k:?} (see PUT /v1/mq/topics/{{topic}}/groups/{{group}})"
                )));
            }
        }
        let (broadcast, ordered) = match obj.get("mode").and_then(Value::as_str) {
            None | Some("shared") => (false, false),
            Some("ordered") => (false, true),
            Some("broadcast") => (true, false),
            Some(m) => {
                return Err(MqError::Invalid(format!(
                    "mode {m:?}: use shared, ordered or broadcast"
                )));
            }
        };
        let start_json = obj.get("start").cloned().unwrap_or(json!("latest"));
        let start = match &start_json {
            Value::String(s) if s == "earliest" => consumer::DeliverPolicy::All,
            Value::String(s) if s == "latest" => consumer::DeliverPolicy::New,
            Value::Object(o) if o.contains_key("offset") => {
                consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: o["offset"]
                        .as_u64()
                        .ok_or_else(|| invalid("start.offset must be a number"))?
                        .saturating_add(1),
                }
            }
            Value::Object(o) if o.contains_key("time") => {
                let ms = o["time"]
                    .as_u64()
                    .ok_or_else(|| invalid("start.time must be milliseconds since the epoch"))?;
                let t = time_from_ms(ms).ok_or_else(|| invalid("start.time is out of range"))?;
                consumer::DeliverPolicy::ByStartTime { start_time: t }
            }
            _ => {
                return Err(invalid(
                    "start must be \"earliest\", \"latest\", {\"offset\": N} or {\"time\": MS}",
                ));
            }
        };
        let num = |k: &str, default: u64| obj.get(k).map_or(Some(default), Value::as_u64);
        let ack_wait_ms = num("ack_wait_ms", 30_000)
            .filter(|n| (1..=12 * 3600 * 1000).contains(n))
            .ok_or_else(|| invalid("ack_wait_ms must be between 1 and 43200000 (12 hours)"))?;
        let max_deliveries = num("max_deliveries", 5)
            .filter(|n| (1..=u64::from(u16::MAX)).contains(n))
            .ok_or_else(|| invalid("max_deliveries must be between 1 and 65535"))?
            as u32;
        let max_unacked = num("max_unacked", 1000)
            .filter(|n| (1..=1_000_000).contains(n))
            .ok_or_else(|| invalid("max_unacked must be between 1 and 1000000"))?
            as u32;
        let tags: Vec<String> = match obj.get("tags") {
            None => Vec::new(),
            Some(t) => serde_json::from_value(t.clone())
                .map_err(|_| invalid("tags must be a list of strings"))?,
        };
        if tags.len() > 1 {
            return Err(unsupported(
                "more than one tag per group (JetStream 2.9 filters on one subject)",
            ));
        }
        if tags.iter().any(|t| t.is_empty() || t.len() > 255) {
            return Err(invalid("tags: each 1 to 255 bytes"));
        }
        Ok(GroupSettings {
            broadcast,
            ordered,
            start,
            start_json,
            ack_wait_ms,
            max_deliveries,
            tag: tags.into_iter().next(),
            max_unacked,
        })
    }

    fn json(&self) -> Value {
        json!({
            "mode": if self.broadcast { "broadcast" } else if self.ordered { "ordered" } else { "shared" },
            "start": self.start_json,
            "ack_wait_ms": self.ack_wait_ms,
            "max_deliveries": self.max_deliveries,
            "tags": self.tag.iter().collect::<Vec<_>>(),
            "max_unacked": self.max_unacked,
        })
    }

    fn consumer_config(&self, topic: &str, name: String) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(name),
            description: Some(self.json().to_string()),
            deliver_policy: self.start,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_millis(self.ack_wait_ms),
            // Unlimited: the SDK dead-letters past max_deliveries (JetStream would drop).
            max_deliver: -1,
            filter_subject: format!(
                "mw.{}.{}",
                token(topic),
                self.tag.as_deref().map_or_else(|| ">".to_owned(), token)
            ),
            max_ack_pending: if self.ordered {
                1
            } else {
                i64::from(self.max_unacked)
            },
            ..Default::default()
        }
    }
}

fn time_from_ms(ms: u64) -> Option<async_nats::datetime::DateTime> {
    let nanos = i128::from(ms).checked_mul(1_000_000)?;
    async_nats::datetime::DateTime::from_unix_timestamp_nanos(nanos).ok()
}

/// The stream of a topic.
fn stream_name(topic: &str) -> String {
    format!("MW_{}", token(topic))
}

/// `s` as one NATS token: bytes outside `A-Z a-z 0-9 -` become `_XX`.
fn token(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(b as char);
        } else {
            let _ = write!(out, "_{b:02X}");
        }
    }
    out
}

/// The embedded broker's name rules, so a name works on both backends.
fn check_name(what: &str, name: &str) -> Result<(), MqError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && name != "."
        && name != ".."
        && !name.starts_with("__");
    if ok {
        Ok(())
    } else {
        Err(MqError::Refused {
            status: 400,
            code: "invalid_argument".into(),
            message: format!(
                "{what} name {name:?}: 1 to 120 bytes of A-Z, a-z, 0-9, '.', '_' and '-', not '.' or '..', not starting with '__'"
            ),
        })
    }
}

pub(super) fn unsupported(what: &str) -> MqError {
    MqError::Refused {
        status: 501,
        code: "unsupported".into(),
        message: format!("{what}: unsupported on the NATS JetStream backend"),
    }
}

fn not_found(message: String) -> MqError {
    MqError::Refused {
        status: 404,
        code: "not_found".into(),
        message,
    }
}

/// A JetStream API error: the server's refusal, or unreachable when it timed out.
fn refused(e: &dyn std::error::Error, doing: &str) -> MqError {
    let text = e.to_string();
    // async-nats's kinds that mean "no answer" (timeouts, a request that could not
    // be sent, no JetStream listening), as its Display words them.
    let away = [
        "timed out",
        "request error",
        "request failed",
        "no responders",
        "broken pipe",
        "disconnected",
    ];
    if away.iter().any(|w| text.contains(w)) {
        MqError::Unreachable(format!("{doing}: {text}"))
    } else {
        MqError::Refused {
            status: 400,
            code: "nats".into(),
            message: format!("{doing}: {text}"),
        }
    }
}

fn publish_error(topic: &str, e: &jetstream::context::PublishError) -> MqError {
    use jetstream::context::PublishErrorKind as K;
    match e.kind() {
        K::StreamNotFound => not_found(format!("topic {topic:?} does not exist")),
        K::MaxPayloadExceeded => MqError::Refused {
            status: 413,
            code: "too_large".into(),
            message: e.to_string(),
        },
        // The rest (a closed connection, JetStream's own errors such as "temporarily
        // unavailable" or "insufficient storage") may pass: tried again, never dropped.
        _ => MqError::Unreachable(format!("publishing to {topic:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_keep_distinct_names_distinct_and_are_valid_nats_tokens() {
        assert_eq!(token("orders"), "orders");
        assert_eq!(token("a.b"), "a_2Eb");
        assert_eq!(token("a_2Eb"), "a_5F2Eb");
        assert_ne!(token("a.b"), token("a_2Eb"));
        assert!(
            token("x y.*>")
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
    }

    #[test]
    fn group_settings_map_and_refuse_what_jetstream_cannot_do() {
        let g = GroupSettings::parse(
            &json!({"start": {"offset": 9}, "ack_wait_ms": 500, "tags": ["paid"]}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            g.start,
            consumer::DeliverPolicy::ByStartSequence { start_sequence: 10 }
        );
        let c = g.consumer_config("t", "g".into());
        assert_eq!(
            (c.filter_subject.as_str(), c.max_deliver),
            ("mw.t.paid", -1)
        );
        assert_eq!(
            GroupSettings::parse(&g.json()).unwrap_or_else(|e| panic!("{e}")),
            g,
            "the settings survive the consumer's description"
        );
        for bad in [
            json!({"tags": ["a", "b"]}),
            json!({"nope": 1}),
            json!({"mode": "fanout"}),
            json!({"ack_wait_ms": 0}),
            json!([]),
        ] {
            assert!(GroupSettings::parse(&bad).is_err(), "{bad}");
        }
    }
}
