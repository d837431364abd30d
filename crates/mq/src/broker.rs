//! The broker: topics of partitioned logs, consumer groups over them, and the committer
//! that makes every change durable before it is acknowledged.
//!
//! On disk, under the broker's directory:
//! - `topics/{topic}/topic.json` (its settings) and `topics/{topic}/{partition}/` (segments);
//! - `groups/{topic}/{group}.json` (a group's settings and start offsets);
//! - `journal/` (segments of group-state changes) and `groups.snapshot` (every group's
//!   state as of a journal position; the journal before it is deleted).
//!
//! Invariants:
//! - one writer at a time, under the commit lock: the committer thread, which writes every
//!   batch of the queue and the journal, or (without fsync) a publish finding it idle and
//!   the queue empty, committed by its own task; a publish, ack, nack or
//!   delivery answers only after its batch is fsynced (group commit), and a failed write
//!   or fsync stops the broker (fail-stop: restart recovers from disk);
//! - a group's state changes in memory first, then its ops go to the journal and the call
//!   waits for them: a crash can forget a delivery (the message goes out again, counted
//!   once less) but never an acknowledged ack;
//! - a dead-lettered message is appended to the dead-letter topic in the same batch as the
//!   op that finishes it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::config::{BrokerConfig, GroupConfig, GroupMode, StartAt, TopicConfig, validate_name};
use crate::error::{MqError, Result};
use crate::group::{self, BLOCKED, Cursor, GroupState, Op, Slot};
use crate::log::{LogSettings, PartitionLog, sync_dir};
use crate::message::{Message, NewMessage};

mod half;
pub use half::{HalfCheck, HalfDecision, HalfInfo, HalfOutcome};

/// Most payload bytes one fetch returns (at least one message).
pub const MAX_FETCH_BYTES: usize = 16 * 1024 * 1024;
/// Most messages in one publish call.
pub const MAX_PUBLISH_BATCH: usize = 1000;
/// Most messages one fetch returns.
pub const MAX_FETCH: usize = 1000;
/// Name of the group every dead-letter topic has, whose cursor is the redrive position.
const REDRIVE_GROUP: &str = "__redrive";
const SNAPSHOT_MAGIC: &[u8; 8] = b"MWMQSNP1";
/// Prefix of a broadcast group's consumers' own groups: `__bc~{group}~{consumer}`.
const MEMBER_PREFIX: &str = "__bc~";

fn member_name(group: &str, consumer: &str) -> String {
    format!("{MEMBER_PREFIX}{group}~{consumer}")
}

/// Where a published message went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    /// The partition.
    pub partition: u32,
    /// Its offset there.
    pub offset: u64,
    /// The id was published before, within the dedup window: this is the first's place
    /// and nothing was written.
    pub duplicate: bool,
}

/// A message handed to a consumer of a group.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The partition.
    pub partition: u32,
    /// The offset (with the partition, what an ack names).
    pub offset: u64,
    /// Which delivery of this message this is (1 = first).
    pub delivery: u16,
    /// The message.
    pub message: Message,
}

/// A message read back without a group (peek, dead-letter browse).
#[derive(Clone, Debug)]
pub struct Stored {
    /// The partition.
    pub partition: u32,
    /// The offset.
    pub offset: u64,
    /// The message.
    pub message: Message,
}

/// One partition's extent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PartitionInfo {
    /// The first retained offset.
    pub start: u64,
    /// The offset the next message gets.
    pub end: u64,
    /// Bytes of log retained.
    pub bytes: u64,
}

/// A topic's settings and extent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TopicInfo {
    /// The name.
    pub name: String,
    /// Its settings.
    pub config: TopicConfig,
    /// Each partition's extent.
    pub partitions: Vec<PartitionInfo>,
    /// Its groups (the broker's own excluded).
    pub groups: Vec<String>,
    /// A topic of the broker's own (a dead-letter topic).
    pub internal: bool,
}

/// A group's position in one partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CursorInfo {
    /// Every offset below is finished.
    pub floor: u64,
    /// The next offset the group reads.
    pub next: u64,
    /// The partition's end.
    pub end: u64,
    /// Messages delivered and not yet acked.
    pub unacked: u32,
}

/// A group's settings and progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GroupInfo {
    /// The topic.
    pub topic: String,
    /// The group.
    pub group: String,
    /// Its settings.
    pub config: GroupConfig,
    /// Its position in each partition.
    pub partitions: Vec<CursorInfo>,
    /// Messages not yet finished (not acked, filtered or dead-lettered).
    pub backlog: u64,
    /// Messages delivered and not yet acked.
    pub unacked: u32,
    /// Publish time (ms since the epoch) of the oldest unfinished message.
    pub oldest_unfinished_ms: Option<u64>,
    /// The group's dead-letter topic.
    pub dead_letter_topic: String,
    /// Messages in the dead-letter topic not yet redriven.
    pub dead_letters: u64,
    /// A broadcast group's consumers (empty for other groups).
    pub consumers: Vec<String>,
}

/// Remembers recently published ids per topic (the dedup window).
#[derive(Default)]
struct Dedup {
    ids: HashMap<u64, (u32, u64)>,
    order: VecDeque<(u64, u64)>,
}

impl Dedup {
    fn expire(&mut self, now_ms: u64, window_ms: u64, max: usize) {
        while let Some(&(ms, id)) = self.order.front() {
            if now_ms.saturating_sub(ms) <= window_ms && self.order.len() <= max {
                break;
            }
            self.order.pop_front();
            self.ids.remove(&id);
        }
    }

    fn insert(&mut self, id: u64, ms: u64, partition: u32, offset: u64) {
        if self.ids.insert(id, (partition, offset)).is_none() {
            self.order.push_back((ms, id));
        }
    }
}

/// A consumer group on a topic.
struct Group {
    name: String,
    state: Mutex<GroupState>,
    /// Rung when messages become deliverable other than by a publish (a nack, an extension given back).
    wake: Notify,
    /// The dead-letter topic (`None` for the broker's own redrive groups).
    dlq: Option<Arc<Topic>>,
}

/// A topic: its logs and its groups.
struct Topic {
    name: String,
    config: TopicConfig,
    parts: Vec<Arc<PartitionLog>>,
    turn: AtomicU32,
    /// Rung after each commit that made new messages visible.
    published: Notify,
    dedup: Mutex<Dedup>,
    groups: RwLock<BTreeMap<String, Arc<Group>>>,
    internal: bool,
}

impl Topic {
    fn part(&self, partition: u32) -> Result<&Arc<PartitionLog>> {
        self.parts
            .get(partition as usize)
            .ok_or_else(|| MqError::NoPartition {
                topic: self.name.clone(),
                partition,
                partitions: self.parts.len() as u32,
            })
    }

    fn group(&self, name: &str) -> Result<Arc<Group>> {
        self.groups
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| MqError::NoGroup {
                topic: self.name.clone(),
                group: name.to_string(),
            })
    }

    fn info(&self) -> TopicInfo {
        TopicInfo {
            name: self.name.clone(),
            config: self.config.clone(),
            partitions: self
                .parts
                .iter()
                .map(|p| PartitionInfo {
                    start: p.start(),
                    end: p.end(),
                    bytes: p.bytes(),
                })
                .collect(),
            groups: self
                .groups
                .read()
                .keys()
                .filter(|g| !g.starts_with("__"))
                .cloned()
                .collect(),
            internal: self.internal,
        }
    }
}

/// One message to append.
struct Append {
    topic: Arc<Topic>,
    part: u32,
    msg: NewMessage,
}

/// A unit of work for the committer.
struct Cmd {
    appends: Vec<Append>,
    journal: Vec<u8>,
    reply: oneshot::Sender<Result<Vec<Published>>>,
}

/// Settings of a group as kept on disk.
#[derive(Serialize, Deserialize)]
struct GroupFile {
    config: GroupConfig,
    start: Vec<u64>,
}

struct Inner {
    dir: PathBuf,
    cfg: BrokerConfig,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Serializes topic and group creation (file writes), not the data path.
    admin: tokio::sync::Mutex<()>,
    journal: PartitionLog,
    tx: mpsc::Sender<Cmd>,
    failed: AtomicBool,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Pending and recently resolved half messages.
    halves: Mutex<half::Halves>,
    /// Rung when a half message's resolution ends.
    half_changed: Notify,
    /// Counts topic and group creations (what a metadata mirror follows).
    meta: tokio::sync::watch::Sender<u64>,
    /// Held by whoever writes the logs: the committer thread, or (without fsync) a
    /// publishing task that found it idle.
    commit_lock: Mutex<()>,
    /// When retention last ran (ms since the epoch).
    last_retention: std::sync::atomic::AtomicU64,
}

/// The message broker engine. Cloning shares it.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

fn log_settings(cfg: &BrokerConfig) -> LogSettings {
    LogSettings {
        segment_bytes: cfg.segment_bytes,
        index_interval_bytes: cfg.index_interval_bytes,
    }
}

fn dlq_name(topic: &str, group: &str) -> String {
    // `~` is in no topic or group name, so no two (topic, group) pairs share a name.
    format!("__dlq~{topic}~{group}")
}

/// Writes a file atomically and durably: temporary file, fsync, rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| MqError::Storage(format!("{} has no parent directory", path.display())))?;
    std::fs::create_dir_all(dir).map_err(MqError::storage)?;
    if let Some(parent) = dir.parent() {
        // The directory's own entry, when it was just created.
        sync_dir(parent)?;
    }
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(MqError::storage)?;
        f.write_all(bytes).map_err(MqError::storage)?;
        f.sync_all().map_err(MqError::storage)?;
    }
    std::fs::rename(&tmp, path).map_err(MqError::storage)?;
    sync_dir(dir)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(MqError::storage)?;
    serde_json::from_slice(&bytes).map_err(|e| MqError::Storage(format!("{}: {e}", path.display())))
}

impl Broker {
    /// Opens (or creates) the broker in `dir`: loads topics and groups, replays the
    /// journal over the last snapshot, rebuilds the dedup window and starts the committer.
    pub fn open(dir: impl AsRef<Path>, cfg: BrokerConfig) -> Result<Broker> {
        cfg.validate()?;
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(dir.join("topics")).map_err(MqError::storage)?;
        let settings = log_settings(&cfg);
        let now = cfg.clock.now_ms();

        // Topics.
        let mut topics = BTreeMap::new();
        let mut names: Vec<String> = Vec::new();
        for entry in std::fs::read_dir(dir.join("topics")).map_err(MqError::storage)? {
            let entry = entry.map_err(MqError::storage)?;
            if let Some(name) = entry.file_name().to_str()
                && entry.path().join("topic.json").exists()
            {
                names.push(name.to_string());
            }
        }
        for name in names {
            let tdir = dir.join("topics").join(&name);
            let config: TopicConfig = read_json(&tdir.join("topic.json"))?;
            let topic = Self::open_topic(&tdir, &name, config, settings, name.starts_with("__"))?;
            topics.insert(name, Arc::new(topic));
        }

        // Groups at their start offsets; the snapshot and the journal bring them forward.
        let gdir = dir.join("groups");
        if gdir.exists() {
            for t in std::fs::read_dir(&gdir).map_err(MqError::storage)? {
                let t = t.map_err(MqError::storage)?;
                let Some(tname) = t.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if !t.path().is_dir() {
                    continue;
                }
                let Some(topic) = topics.get(&tname) else {
                    tracing::warn!(topic = %tname, "group files of a topic that does not exist; ignored");
                    continue;
                };
                for g in std::fs::read_dir(t.path()).map_err(MqError::storage)? {
                    let g = g.map_err(MqError::storage)?;
                    let Some(gname) = g
                        .file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(".json"))
                        .map(str::to_string)
                    else {
                        continue;
                    };
                    let file: GroupFile = read_json(&g.path())?;
                    // A broadcast consumer shares its group's dead letters.
                    let owner = gname
                        .strip_prefix(MEMBER_PREFIX)
                        .and_then(|rest| rest.split('~').next())
                        .unwrap_or(&gname);
                    let dlq = if gname == REDRIVE_GROUP {
                        None
                    } else {
                        topics.get(&dlq_name(&tname, owner)).cloned()
                    };
                    let group = Self::new_group(topic, &gname, file.config, &file.start, dlq);
                    topic.groups.write().insert(gname, Arc::new(group));
                }
            }
        }

        // Snapshot, then the journal after it.
        let journal = PartitionLog::open(&dir.join("journal"), 0, settings)?;
        let mut from = journal.start();
        let snap_path = dir.join("groups.snapshot");
        if snap_path.exists() {
            from = Self::load_snapshot(&snap_path, &topics)?.max(from);
        }
        journal.for_each(from, |r| {
            let (t, g, ops) = group::decode_ops(&r.payload)?;
            if let Some(group) = topics
                .get(&t)
                .and_then(|t| t.groups.read().get(&g).cloned())
            {
                group.state.lock().replay(&ops);
            }
            Ok(())
        })?;

        // Bring cursors inside what the logs hold; rebuild the dedup window.
        for topic in topics.values() {
            for group in topic.groups.read().values() {
                let mut st = group.state.lock();
                let st_config = st.config.clone();
                for (c, part) in st.cursors.iter_mut().zip(&topic.parts) {
                    let lost = c.skip_to(part.start());
                    if lost > 0 {
                        tracing::warn!(topic = %topic.name, group = %group.name, partition = part.id, lost, "messages removed by retention before the group finished them");
                    }
                    Self::clamp(c, part.end());
                    let cfg = st_config.clone();
                    c.rebuild(|o| {
                        let rec = part.read(o, 1, 1).ok()?.into_iter().next()?;
                        let m = Message::decode(rec.payload).ok()?;
                        let filtered = !cfg.tags.is_empty() && !cfg.tags.contains(&m.tag);
                        Some((m.key.clone(), fresh_visible(&m, &cfg, now), filtered))
                    });
                }
            }
            let window = cfg.dedup_window.as_millis() as u64;
            let mut dedup = topic.dedup.lock();
            for part in &topic.parts {
                let from = part.offset_for_time(now.saturating_sub(window))?;
                part.for_each(from, |r| {
                    let m = Message::decode(r.payload)?;
                    if m.id != 0 {
                        dedup.insert(m.id, m.publish_ms, part.id, r.offset);
                    }
                    Ok(())
                })?;
            }
            dedup.expire(now, window, cfg.max_dedup_ids);
        }

        let halves = match topics.get(half::HALF_TOPIC) {
            Some(t) => half::load(
                t,
                cfg.half_check_after.as_millis() as u64,
                cfg.max_half_pending,
            )?,
            None => half::Halves::default(),
        };

        let (tx, rx) = mpsc::channel(cfg.max_pending_writes);
        let inner = Arc::new(Inner {
            dir,
            cfg,
            topics: RwLock::new(topics),
            admin: tokio::sync::Mutex::new(()),
            journal,
            tx,
            failed: AtomicBool::new(false),
            committer: Mutex::new(None),
            halves: Mutex::new(halves),
            half_changed: Notify::new(),
            meta: tokio::sync::watch::Sender::new(0),
            commit_lock: Mutex::new(()),
            last_retention: std::sync::atomic::AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&inner);
        let handle = std::thread::Builder::new()
            .name("meshwork-mq-committer".into())
            .spawn(move || committer(weak, rx))
            .map_err(|e| MqError::Storage(format!("starting the committer thread: {e}")))?;
        *inner.committer.lock() = Some(handle);
        Ok(Broker { inner })
    }

    /// Drops slots past a log's end (its tail was lost outside the broker).
    fn clamp(c: &mut Cursor, end: u64) {
        while c.next > end {
            if c.slots.is_empty() {
                c.next = end;
                c.floor = c.floor.min(end);
            } else {
                c.pop_back();
            }
        }
    }

    fn open_topic(
        tdir: &Path,
        name: &str,
        config: TopicConfig,
        settings: LogSettings,
        internal: bool,
    ) -> Result<Topic> {
        let mut parts = Vec::with_capacity(config.partitions as usize);
        for p in 0..config.partitions {
            parts.push(Arc::new(PartitionLog::open(
                &tdir.join(p.to_string()),
                p,
                settings,
            )?));
        }
        Ok(Topic {
            name: name.to_string(),
            config,
            parts,
            turn: AtomicU32::new(0),
            published: Notify::new(),
            dedup: Mutex::new(Dedup::default()),
            groups: RwLock::new(BTreeMap::new()),
            internal,
        })
    }

    fn new_group(
        topic: &Topic,
        name: &str,
        config: GroupConfig,
        start: &[u64],
        dlq: Option<Arc<Topic>>,
    ) -> Group {
        let cursors = (0..topic.parts.len())
            .map(|i| {
                Cursor::at(
                    start.get(i).copied().unwrap_or(0),
                    config.mode == GroupMode::Ordered,
                )
            })
            .collect();
        Group {
            name: name.to_string(),
            state: Mutex::new(GroupState {
                config,
                cursors,
                turn: 0,
            }),
            wake: Notify::new(),
            dlq,
        }
    }

    /// Loads the groups' snapshot; returns the journal offset it covers up to.
    fn load_snapshot(path: &Path, topics: &BTreeMap<String, Arc<Topic>>) -> Result<u64> {
        let b = std::fs::read(path).map_err(MqError::storage)?;
        let bad = |why: &str| MqError::Storage(format!("{}: {why}", path.display()));
        if b.len() < 8 + 8 + 4 + 4 || &b[..8] != SNAPSHOT_MAGIC {
            return Err(bad("not a group snapshot"));
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
            return Err(bad("checksum mismatch"));
        }
        let mut at = 8;
        let u64_at = |at: usize| -> Result<u64> {
            body.get(at..at + 8)
                .map(|s| u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]))
                .ok_or_else(|| bad("truncated"))
        };
        let u32_at = |at: usize| -> Result<u32> {
            body.get(at..at + 4)
                .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
                .ok_or_else(|| bad("truncated"))
        };
        let seq = u64_at(at)?;
        at += 8;
        let count = u32_at(at)?;
        at += 4;
        for _ in 0..count {
            let name = |at: &mut usize| -> Result<String> {
                let n = *body.get(*at).ok_or_else(|| bad("truncated"))? as usize;
                let s = body
                    .get(*at + 1..*at + 1 + n)
                    .ok_or_else(|| bad("truncated"))?;
                *at += 1 + n;
                String::from_utf8(s.to_vec()).map_err(|_| bad("a name is not UTF-8"))
            };
            let t = name(&mut at)?;
            let g = name(&mut at)?;
            let len = u32_at(at)? as usize;
            at += 4;
            let state = body.get(at..at + len).ok_or_else(|| bad("truncated"))?;
            at += len;
            if let Some(group) = topics
                .get(&t)
                .and_then(|t| t.groups.read().get(&g).cloned())
            {
                group.state.lock().decode_snapshot(state)?;
            }
        }
        Ok(seq)
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        self.inner
            .topics
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| MqError::NoTopic(name.chars().take(256).collect()))
    }

    fn now_ms(&self) -> u64 {
        self.inner.cfg.clock.now_ms()
    }

    /// The broker's settings.
    pub fn config(&self) -> &BrokerConfig {
        &self.inner.cfg
    }

    /// Creates a topic; creating it again with the same settings is a no-op.
    pub async fn create_topic(&self, name: &str, config: TopicConfig) -> Result<TopicInfo> {
        validate_name("topic", name)?;
        let t = self.create_topic_inner(name, config, false).await?;
        self.inner.meta.send_modify(|n| *n += 1);
        Ok(t.info())
    }

    /// Changes each time a topic or group is created (or created again): what keeps a
    /// copy of the metadata elsewhere (the store) current.
    pub fn meta_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.meta.subscribe()
    }

    async fn create_topic_inner(
        &self,
        name: &str,
        config: TopicConfig,
        internal: bool,
    ) -> Result<Arc<Topic>> {
        let cfg = &self.inner.cfg;
        if config.partitions == 0 || config.partitions > cfg.max_partitions {
            return Err(MqError::Invalid(format!(
                "partitions must be between 1 and {} (mq.max_partitions)",
                cfg.max_partitions
            )));
        }
        let _admin = self.inner.admin.lock().await;
        if let Ok(t) = self.topic(name) {
            return if t.config == config {
                Ok(t)
            } else {
                Err(MqError::TopicExists(name.to_string()))
            };
        }
        let user_topics = self
            .inner
            .topics
            .read()
            .values()
            .filter(|t| !t.internal)
            .count();
        if !internal && user_topics >= cfg.max_topics {
            return Err(MqError::Limit {
                what: "topics",
                limit: cfg.max_topics as u64,
                setting: "max_topics",
            });
        }
        let tdir = self.inner.dir.join("topics").join(name);
        let topic = Arc::new(Self::open_topic(
            &tdir,
            name,
            config.clone(),
            log_settings(cfg),
            internal,
        )?);
        // The settings file last: a topic without it is not a topic on the next open.
        let json = serde_json::to_vec_pretty(&config).map_err(MqError::storage)?;
        write_atomic(&tdir.join("topic.json"), &json)?;
        self.inner
            .topics
            .write()
            .insert(name.to_string(), topic.clone());
        tracing::info!(
            topic = name,
            partitions = config.partitions,
            "topic created"
        );
        Ok(topic)
    }

    /// Every topic, the broker's own included (flagged `internal`).
    pub fn topics(&self) -> Vec<TopicInfo> {
        self.inner
            .topics
            .read()
            .values()
            .map(|t| t.info())
            .collect()
    }

    /// One topic's settings and extent.
    pub fn topic_info(&self, name: &str) -> Result<TopicInfo> {
        Ok(self.topic(name)?.info())
    }

    /// Publishes messages to a topic; answers once they are durable. A message with a key
    /// goes to the key's partition, one without to the partitions in turn.
    pub async fn publish(&self, topic: &str, msgs: Vec<NewMessage>) -> Result<Vec<Published>> {
        let t = self.topic(topic)?;
        if t.internal {
            return Err(MqError::Invalid(format!(
                "{topic:?} is the broker's own topic; publish to it is refused"
            )));
        }
        if msgs.len() > MAX_PUBLISH_BATCH {
            return Err(MqError::Invalid(format!(
                "at most {MAX_PUBLISH_BATCH} messages per publish ({} given)",
                msgs.len()
            )));
        }
        let n = t.parts.len() as u32;
        let mut appends = Vec::with_capacity(msgs.len());
        for msg in msgs {
            self.check_message(&msg)?;
            let part = if msg.key.is_empty() {
                t.turn.fetch_add(1, Ordering::Relaxed) % n
            } else {
                crc32fast::hash(&msg.key) % n
            };
            appends.push(Append {
                topic: t.clone(),
                part,
                msg,
            });
        }
        self.submit(appends, Vec::new()).await
    }

    /// Checks a message against the size limits and the longest delay.
    fn check_message(&self, msg: &NewMessage) -> Result<()> {
        let cfg = &self.inner.cfg;
        msg.validate(cfg.max_message_bytes)?;
        let latest = self
            .now_ms()
            .saturating_add(cfg.max_delay.as_millis() as u64);
        if msg.deliver_at_ms > latest {
            return Err(MqError::Invalid(format!(
                "deliver_at_ms is more than mq.max_delay ({} s) ahead",
                cfg.max_delay.as_secs()
            )));
        }
        Ok(())
    }

    /// Hands work to the committer and waits for it to be durable.
    async fn submit(&self, appends: Vec<Append>, journal: Vec<u8>) -> Result<Vec<Published>> {
        if self.inner.failed.load(Ordering::Acquire) {
            return Err(MqError::Stopped);
        }
        let (reply, rx) = oneshot::channel();
        let inner = &self.inner;
        // Without fsync a commit is a write(): when the committer is idle and nothing is
        // queued, this task commits its own publish under the commit lock instead of
        // waking the committer thread and being woken back (two thread handoffs, most
        // of a lone publisher's latency). Group changes always go through the queue,
        // whose order the journal keeps.
        if !inner.cfg.fsync
            && journal.is_empty()
            && inner.tx.capacity() == inner.cfg.max_pending_writes
            && let Some(_writer) = inner.commit_lock.try_lock()
        {
            commit(
                inner,
                vec![Cmd {
                    appends,
                    journal,
                    reply,
                }],
            );
            let now = inner.cfg.clock.now_ms();
            if now.saturating_sub(inner.last_retention.load(Ordering::Relaxed)) >= 1000 {
                inner.last_retention.store(now, Ordering::Relaxed);
                retention(inner, now);
            }
        } else {
            inner
                .tx
                .send(Cmd {
                    appends,
                    journal,
                    reply,
                })
                .await
                .map_err(|_| MqError::Stopped)?;
        }
        rx.await.map_err(|_| MqError::Stopped)?
    }

    /// Reads up to `max` messages of one partition from `offset`, without a group.
    pub fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<Stored>> {
        let t = self.topic(topic)?;
        let part = t.part(partition)?;
        let recs = part.read(offset, max.clamp(1, MAX_FETCH), 16 * 1024 * 1024)?;
        recs.into_iter()
            .map(|r| {
                Ok(Stored {
                    partition,
                    offset: r.offset,
                    message: Message::decode(r.payload)?,
                })
            })
            .collect()
    }

    /// The first offset of a partition published at or after `ms` (its end if none).
    pub fn offset_for_time(&self, topic: &str, partition: u32, ms: u64) -> Result<u64> {
        self.topic(topic)?.part(partition)?.offset_for_time(ms)
    }

    /// Creates a consumer group (and its dead-letter topic); creating it again with the
    /// same settings is a no-op.
    pub async fn create_group(
        &self,
        topic: &str,
        group: &str,
        config: GroupConfig,
    ) -> Result<GroupInfo> {
        validate_name("group", group)?;
        config.validate()?;
        let t = self.topic(topic)?;
        if t.internal {
            return Err(MqError::Invalid(format!(
                "{topic:?} is the broker's own topic; use the dead-letter endpoints"
            )));
        }
        if let Ok(g) = t.group(group) {
            let same = g.state.lock().config == config;
            return if same {
                self.group_info(topic, group)
            } else {
                Err(MqError::GroupExists {
                    topic: topic.to_string(),
                    group: group.to_string(),
                })
            };
        }
        let groups = t
            .groups
            .read()
            .keys()
            .filter(|g| !g.starts_with("__"))
            .count();
        if groups >= self.inner.cfg.max_groups_per_topic {
            return Err(MqError::Limit {
                what: "groups on this topic",
                limit: self.inner.cfg.max_groups_per_topic as u64,
                setting: "max_groups_per_topic",
            });
        }
        let dlq = self
            .create_topic_inner(
                &dlq_name(topic, group),
                TopicConfig {
                    partitions: 1,
                    ..t.config.clone()
                },
                true,
            )
            .await?;
        self.add_group(
            &dlq,
            REDRIVE_GROUP,
            GroupConfig {
                start: StartAt::Earliest,
                ack_wait_ms: 60_000,
                max_deliveries: u16::MAX as u32,
                ..GroupConfig::default()
            },
            None,
        )
        .await?;
        self.add_group(&t, group, config, Some(dlq)).await?;
        self.inner.meta.send_modify(|n| *n += 1);
        self.group_info(topic, group)
    }

    async fn add_group(
        &self,
        t: &Arc<Topic>,
        group: &str,
        config: GroupConfig,
        dlq: Option<Arc<Topic>>,
    ) -> Result<()> {
        let _admin = self.inner.admin.lock().await;
        if t.groups.read().contains_key(group) {
            return Ok(());
        }
        let mut start = Vec::with_capacity(t.parts.len());
        for part in &t.parts {
            let (s, e) = (part.start(), part.end());
            start.push(match config.start {
                StartAt::Earliest => s,
                StartAt::Latest => e,
                StartAt::Offset(o) => o.clamp(s, e),
                StartAt::Time(ms) => part.offset_for_time(ms)?,
            });
        }
        let file = GroupFile {
            config: config.clone(),
            start: start.clone(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(MqError::storage)?;
        write_atomic(
            &self
                .inner
                .dir
                .join("groups")
                .join(&t.name)
                .join(format!("{group}.json")),
            &json,
        )?;
        let g = Self::new_group(t, group, config, &start, dlq);
        t.groups.write().insert(group.to_string(), Arc::new(g));
        tracing::info!(topic = %t.name, group, "group created");
        Ok(())
    }

    /// A group's settings and progress.
    /// `group/consumer` is one consumer of a broadcast group; a broadcast group itself
    /// reports its furthest-behind consumer's position and backlog and the sum of unacked.
    pub fn group_info(&self, topic: &str, group: &str) -> Result<GroupInfo> {
        if let Some((g, c)) = group.split_once('/') {
            validate_name("consumer", c)?;
            let mut info = self.group_info_of(topic, &member_name(g, c))?;
            info.group = group.to_string();
            return Ok(info);
        }
        let mut info = self.group_info_of(topic, group)?;
        if info.config.mode == GroupMode::Broadcast {
            let prefix = member_name(group, "");
            let members: Vec<String> = self
                .topic(topic)?
                .groups
                .read()
                .keys()
                .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
                .collect();
            let (mut backlog, mut unacked, mut oldest, mut parts) = (0, 0, None, Vec::new());
            for m in &members {
                let i = self.group_info_of(topic, &member_name(group, m))?;
                if parts.is_empty() || i.backlog > backlog {
                    backlog = i.backlog;
                    parts = i.partitions;
                }
                unacked += i.unacked;
                oldest = match (oldest, i.oldest_unfinished_ms) {
                    (Some(a), Some(b)) => Some(std::cmp::min(a, b)),
                    (a, b) => a.or(b),
                };
            }
            info.partitions = parts;
            info.backlog = backlog;
            info.unacked = unacked;
            info.oldest_unfinished_ms = oldest;
            info.consumers = members;
        }
        Ok(info)
    }

    fn group_info_of(&self, topic: &str, group: &str) -> Result<GroupInfo> {
        let t = self.topic(topic)?;
        let g = t.group(group)?;
        let (config, partitions, backlog, unacked, oldest) = {
            let st = g.state.lock();
            let mut backlog = 0u64;
            let mut oldest: Vec<(u32, u64)> = Vec::new();
            let partitions: Vec<CursorInfo> = st
                .cursors
                .iter()
                .zip(&t.parts)
                .map(|(c, p)| {
                    let end = p.end();
                    let open = c.slots.iter().filter(|s| !s.done).count() as u64;
                    backlog += open + end.saturating_sub(c.next);
                    if c.floor < end && (open > 0 || c.next < end) {
                        oldest.push((p.id, c.floor.max(p.start())));
                    }
                    CursorInfo {
                        floor: c.floor,
                        next: c.next,
                        end,
                        unacked: c.unacked,
                    }
                })
                .collect();
            (st.config.clone(), partitions, backlog, st.unacked(), oldest)
        };
        // The oldest over the partitions' first unfinished messages.
        let oldest_unfinished_ms = oldest
            .iter()
            .filter_map(|&(p, o)| {
                t.parts[p as usize]
                    .read(o, 1, 1)
                    .ok()
                    .and_then(|r| r.first().map(|r| crate::segment::publish_ms(&r.payload)))
            })
            .min();
        let (dead_letter_topic, dead_letters) = match &g.dlq {
            Some(d) => {
                let left = d
                    .group(REDRIVE_GROUP)
                    .map(|r| {
                        let st = r.state.lock();
                        let c = &st.cursors[0];
                        d.parts[0].end().saturating_sub(c.floor)
                    })
                    .unwrap_or(0);
                (d.name.clone(), left)
            }
            None => (String::new(), 0),
        };
        Ok(GroupInfo {
            topic: topic.to_string(),
            group: group.to_string(),
            config,
            partitions,
            backlog,
            unacked,
            oldest_unfinished_ms,
            dead_letter_topic,
            dead_letters,
            consumers: Vec::new(),
        })
    }

    /// Takes up to `max` messages for a consumer of the group, waiting up to `wait` for one.
    /// Each stays invisible to the group's other consumers until acked, nacked or past its
    /// ack deadline.
    pub async fn fetch(
        &self,
        topic: &str,
        group: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>> {
        self.fetch_inner(topic, group, max, wait, false).await
    }

    async fn fetch_inner(
        &self,
        topic: &str,
        group: &str,
        max: usize,
        wait: Duration,
        internal: bool,
    ) -> Result<Vec<Delivery>> {
        let (group, member) = self.member(topic, group, true).await?;
        let (t, g) = self.group_of(topic, &group, internal || member)?;
        if g.state.lock().config.mode == GroupMode::Broadcast {
            return Err(MqError::Invalid(format!(
                "{group:?} is a broadcast group: each consumer fetches as \"{group}/CONSUMER\""
            )));
        }
        let max = max.clamp(1, MAX_FETCH);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let published = t.published.notified();
            let woken = g.wake.notified();
            tokio::pin!(published, woken);
            published.as_mut().enable();
            woken.as_mut().enable();
            let permit = self.queue_slot().await?;
            let now = self.now_ms();
            let (polled, durable) = poll(&t, &g, max, now, permit)?;
            if let Some(rx) = durable {
                rx.await.map_err(|_| MqError::Stopped)??;
            }
            let n = polled.out.len() as u64;
            if n > 0 {
                metrics::counter!("meshwork_mq_delivered_total", "topic" => t.name.clone(), "group" => g.name.clone()).increment(n);
                if polled.redelivered > 0 {
                    metrics::counter!("meshwork_mq_redelivered_total", "topic" => t.name.clone(), "group" => g.name.clone())
                        .increment(polled.redelivered);
                }
            }
            if !polled.out.is_empty() || polled.more {
                if polled.out.is_empty() {
                    continue;
                }
                return Ok(polled.out);
            }
            let now_i = tokio::time::Instant::now();
            if now_i >= deadline || self.inner.cfg.clock.is_manual() {
                return Ok(Vec::new());
            }
            let mut until = deadline;
            if let Some(at) = polled.next_timer {
                let d = Duration::from_millis(at.saturating_sub(now).max(1));
                until = until.min(now_i + d);
            }
            tokio::select! {
                _ = published => {}
                _ = woken => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    fn settle(
        &self,
        topic: &str,
        group: &str,
        items: &[(u32, u64)],
        internal: bool,
    ) -> Result<(Arc<Topic>, Arc<Group>)> {
        let (t, g) = self.group_of(topic, group, internal)?;
        if items.len() > MAX_FETCH {
            return Err(MqError::Invalid(format!(
                "at most {MAX_FETCH} messages per ack, nack or extension"
            )));
        }
        let st = g.state.lock();
        for &(p, o) in items {
            t.part(p)?;
            // Finished, or handed to a consumer: a message only read ahead is not.
            let known = st.cursors[p as usize]
                .delivered(o)
                .is_some_and(|s| s.done || s.deliveries > 0);
            if !known {
                return Err(MqError::UnknownDelivery {
                    group: group.to_string(),
                    partition: p,
                    offset: o,
                });
            }
        }
        drop(st);
        Ok((t, g))
    }

    /// The group a name stands for: itself, or for `group/consumer` (a broadcast group's
    /// consumer) that consumer's own group, made on first use when `create`; and whether
    /// that is one of the broker's own.
    async fn member(&self, topic: &str, group: &str, create: bool) -> Result<(String, bool)> {
        let Some((g, consumer)) = group.split_once('/') else {
            return Ok((group.to_string(), false));
        };
        validate_name("consumer", consumer)?;
        let (t, parent) = self.group_of(topic, g, false)?;
        let cfg = parent.state.lock().config.clone();
        if cfg.mode != GroupMode::Broadcast {
            return Err(MqError::Invalid(format!(
                "group {g:?} is not a broadcast group; use it without a consumer"
            )));
        }
        let name = member_name(g, consumer);
        if create && t.group(&name).is_err() {
            let prefix = member_name(g, "");
            let n = t
                .groups
                .read()
                .keys()
                .filter(|k| k.starts_with(&prefix))
                .count();
            if n >= self.inner.cfg.max_consumers_per_group {
                return Err(MqError::Limit {
                    what: "consumers of this broadcast group",
                    limit: self.inner.cfg.max_consumers_per_group as u64,
                    setting: "max_consumers_per_group",
                });
            }
            let own = GroupConfig {
                mode: GroupMode::Shared,
                ..cfg
            };
            self.add_group(&t, &name, own, parent.dlq.clone()).await?;
        }
        Ok((name, true))
    }

    /// A topic and group; the broker's own (`__`) groups only for `internal` callers.
    fn group_of(
        &self,
        topic: &str,
        group: &str,
        internal: bool,
    ) -> Result<(Arc<Topic>, Arc<Group>)> {
        let t = self.topic(topic)?;
        if !internal && (t.internal || group.starts_with("__")) {
            return Err(MqError::Invalid(format!(
                "{topic:?}/{group:?} is the broker's own; use the dead-letter endpoints"
            )));
        }
        let g = t.group(group)?;
        Ok((t, g))
    }

    /// A reserved place in the committer's queue (waits while it is full).
    async fn queue_slot(&self) -> Result<mpsc::Permit<'_, Cmd>> {
        if self.inner.failed.load(Ordering::Acquire) {
            return Err(MqError::Stopped);
        }
        self.inner.tx.reserve().await.map_err(|_| MqError::Stopped)
    }

    /// Changes a group's state with `f` and waits for the ops it returns to be durable.
    /// The journal record is queued while the group is locked (a queue slot is reserved
    /// first), so records reach the journal in the order the changes were made, and a
    /// call that changed nothing still waits for the changes before it (a repeated ack
    /// is answered only once the first is durable).
    async fn journaled(
        &self,
        t: &Topic,
        g: &Group,
        f: impl FnOnce(&mut GroupState) -> Vec<Op>,
    ) -> Result<usize> {
        let permit = self.queue_slot().await?;
        let (reply, rx) = oneshot::channel();
        let n = {
            let mut st = g.state.lock();
            let ops = f(&mut st);
            let mut journal = Vec::new();
            if !ops.is_empty() {
                group::encode_ops(&t.name, &g.name, &ops, &mut journal);
            }
            permit.send(Cmd {
                appends: Vec::new(),
                journal,
                reply,
            });
            ops.len()
        };
        rx.await.map_err(|_| MqError::Stopped)??;
        Ok(n)
    }

    /// Acknowledges delivered messages: finished for the group. Acking one already
    /// finished is a no-op; one the group never delivered is an error and nothing changes.
    pub async fn ack(&self, topic: &str, group: &str, items: &[(u32, u64)]) -> Result<()> {
        let (group, member) = self.member(topic, group, false).await?;
        self.ack_inner(topic, &group, items, member).await
    }

    async fn ack_inner(
        &self,
        topic: &str,
        group: &str,
        items: &[(u32, u64)],
        internal: bool,
    ) -> Result<()> {
        let (t, g) = self.settle(topic, group, items, internal)?;
        let n = self
            .journaled(&t, &g, |st| {
                let mut ops = Vec::new();
                for &(p, o) in items {
                    if st.cursors[p as usize].finish(o) {
                        ops.push(Op::Finish {
                            part: p,
                            from: o,
                            to: o + 1,
                        });
                    }
                }
                ops
            })
            .await?;
        metrics::counter!("meshwork_mq_acked_total", "topic" => t.name.clone(), "group" => g.name.clone()).increment(n as u64);
        if n > 0 {
            // An ordered key's next message may go now.
            g.wake.notify_waiters();
        }
        Ok(())
    }

    /// Gives delivered messages back: deliverable again after `delay` (counts as a
    /// delivery; at most `mq.max_delay`).
    pub async fn nack(
        &self,
        topic: &str,
        group: &str,
        items: &[(u32, u64)],
        delay: Duration,
    ) -> Result<()> {
        if delay > self.inner.cfg.max_delay {
            return Err(MqError::Invalid(format!(
                "a nack's delay is at most mq.max_delay ({} s)",
                self.inner.cfg.max_delay.as_secs()
            )));
        }
        let at = self.now_ms().saturating_add(delay.as_millis() as u64);
        let n = self.set_visible(topic, group, items, at).await?;
        metrics::counter!("meshwork_mq_nacked_total", "topic" => topic.to_string(), "group" => group.to_string()).increment(n);
        Ok(())
    }

    /// Extends delivered messages' ack deadlines by the group's ack wait (or `by`, at
    /// most 12 hours), for a consumer still working on them.
    pub async fn extend(
        &self,
        topic: &str,
        group: &str,
        items: &[(u32, u64)],
        by: Option<Duration>,
    ) -> Result<()> {
        let (name, member) = self.member(topic, group, false).await?;
        let (_, g) = self.group_of(topic, &name, member)?;
        let wait = match by {
            Some(d) if d > Duration::from_secs(12 * 3600) => {
                return Err(MqError::Invalid("an extension is at most 12 hours".into()));
            }
            Some(d) => d.as_millis() as u64,
            None => g.state.lock().config.ack_wait_ms,
        };
        let at = self.now_ms().saturating_add(wait);
        self.set_visible(topic, group, items, at).await.map(|_| ())
    }

    async fn set_visible(
        &self,
        topic: &str,
        group: &str,
        items: &[(u32, u64)],
        at: u64,
    ) -> Result<u64> {
        let (group, member) = self.member(topic, group, false).await?;
        let (t, g) = self.settle(topic, &group, items, member)?;
        let n = self
            .journaled(&t, &g, |st| {
                let mut ops = Vec::new();
                for &(p, o) in items {
                    let c = &mut st.cursors[p as usize];
                    let Some(slot) = c.delivered(o) else { continue };
                    if slot.done || slot.deliveries == 0 {
                        continue;
                    }
                    c.set(o, slot.deliveries, at);
                    ops.push(Op::Set {
                        part: p,
                        offset: o,
                        deliveries: slot.deliveries,
                        visible_at: at,
                    });
                }
                ops
            })
            .await?;
        g.wake.notify_waiters();
        Ok(n as u64)
    }

    /// Dead letters of a group not yet redriven, oldest first.
    pub fn dead_letters(&self, topic: &str, group: &str, max: usize) -> Result<Vec<Stored>> {
        let t = self.topic(topic)?;
        let g = t.group(group)?;
        let Some(d) = &g.dlq else {
            return Ok(Vec::new());
        };
        let from = d.group(REDRIVE_GROUP)?.state.lock().cursors[0]
            .floor
            .max(d.parts[0].start());
        self.read(&d.name, 0, from, max)
    }

    /// Publishes up to `max` of a group's dead letters to the topic again (with a fresh
    /// delivery count) and marks them redriven; returns how many moved.
    pub async fn redrive(&self, topic: &str, group: &str, max: usize) -> Result<usize> {
        let t = self.topic(topic)?;
        let g = t.group(group)?;
        let Some(d) = g.dlq.clone() else { return Ok(0) };
        let batch = self
            .fetch_inner(&d.name, REDRIVE_GROUP, max, Duration::ZERO, true)
            .await?;
        if batch.is_empty() {
            return Ok(0);
        }
        let max_bytes = self.inner.cfg.max_message_bytes;
        let mut msgs = Vec::with_capacity(batch.len());
        let mut items = Vec::with_capacity(batch.len());
        for b in &batch {
            let mut m = b.message.to_new();
            // A fresh id: the original's is still inside the dedup window.
            m.id = 0;
            m.headers
                .retain(|(k, _)| !k.starts_with("mq-dead-") && k != "mq-redriven-from");
            m.headers.push((
                "mq-redriven-from".into(),
                Bytes::from(format!("{}/{}", b.partition, b.offset)),
            ));
            // One that no longer fits the limits (lowered since) stays a dead letter
            // (offered again after the redrive group's ack wait) and holds up nothing.
            if let Err(e) = m.validate(max_bytes) {
                tracing::warn!(topic, group, dead_letter_offset = b.offset, error = %e, "a dead letter cannot be republished; left in place");
                continue;
            }
            msgs.push(m);
            items.push((b.partition, b.offset));
        }
        if msgs.is_empty() {
            return Ok(0);
        }
        let moved = msgs.len();
        self.publish(topic, msgs).await?;
        self.ack_inner(&d.name, REDRIVE_GROUP, &items, true).await?;
        Ok(moved)
    }

    /// Sets the per-group gauges (backlog, unacked, age of the oldest unfinished message,
    /// dead letters) and per-partition log sizes; the node calls it every few seconds.
    pub fn export_gauges(&self) {
        let now = self.now_ms();
        let halves = self.inner.halves.lock().pending_count();
        metrics::gauge!("meshwork_mq_half_pending").set(halves as f64);
        let topics: Vec<Arc<Topic>> = self.inner.topics.read().values().cloned().collect();
        for t in topics.iter().filter(|t| !t.internal) {
            let bytes: u64 = t.parts.iter().map(|p| p.bytes()).sum();
            metrics::gauge!("meshwork_mq_log_bytes", "topic" => t.name.clone()).set(bytes as f64);
            let groups: Vec<String> = t
                .groups
                .read()
                .keys()
                .filter(|g| !g.starts_with("__"))
                .cloned()
                .collect();
            for g in groups {
                let Ok(info) = self.group_info(&t.name, &g) else {
                    continue;
                };
                let labels = [("topic", t.name.clone()), ("group", g.clone())];
                metrics::gauge!("meshwork_mq_backlog_messages", &labels).set(info.backlog as f64);
                metrics::gauge!("meshwork_mq_unacked_messages", &labels).set(info.unacked as f64);
                metrics::gauge!("meshwork_mq_dead_letters", &labels).set(info.dead_letters as f64);
                let age = info
                    .oldest_unfinished_ms
                    .map_or(0.0, |ms| now.saturating_sub(ms) as f64 / 1000.0);
                metrics::gauge!("meshwork_mq_oldest_unfinished_age_seconds", &labels).set(age);
            }
        }
    }

    /// Waits until everything submitted so far is durable.
    pub async fn sync(&self) -> Result<()> {
        self.submit(Vec::new(), Vec::new()).await.map(|_| ())
    }

    /// Stops the committer after the work queued before this call, and waits for it.
    /// Only the last handle waits: other clones keep the broker running.
    pub fn close(self) {
        if Arc::strong_count(&self.inner) != 1 {
            return;
        }
        let handle = self.inner.committer.lock().take();
        // The committer ends when the queue's sender, held by `Inner`, is dropped.
        drop(self);
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// What one poll of a group produced.
struct Polled {
    out: Vec<Delivery>,
    ops: Vec<Op>,
    dead: Vec<Append>,
    redelivered: u64,
    /// Payload bytes in `out`.
    bytes: usize,
    /// The earliest time a pending message becomes deliverable.
    next_timer: Option<u64>,
    /// Work was done (filtered or dead-lettered) that may have made room: poll again.
    more: bool,
}

/// Most messages a partition reads ahead of what is asked for, so that priorities and
/// (in ordered groups) other keys can be found behind what waits.
const LOOKAHEAD: usize = 64;

/// When a fresh (never delivered) message may go, and so the order of fresh messages:
/// delayed ones at their time; the others at their publish time moved earlier by their
/// priority times the group's `priority_aging_ms`, so higher priorities go first and a
/// low one waits at most 9 × that behind newer high ones (never starved).
fn fresh_visible(m: &Message, cfg: &GroupConfig, now: u64) -> u64 {
    if m.deliver_at_ms > now {
        return m.deliver_at_ms;
    }
    m.publish_ms
        .min(now)
        .saturating_sub(u64::from(m.priority) * cfg.priority_aging_ms)
        .max(1)
}

/// Picks deliveries for a group under its lock: per partition, reads new messages into
/// the window (fill), then hands out the due ones in the order of their times (deliver).
/// The reply a queued command answers on.
type Durable = oneshot::Receiver<Result<Vec<Published>>>;

fn poll(
    t: &Topic,
    g: &Group,
    max: usize,
    now: u64,
    permit: mpsc::Permit<'_, Cmd>,
) -> Result<(Polled, Option<Durable>)> {
    let mut st = g.state.lock();
    let mut p = Polled {
        out: Vec::new(),
        ops: Vec::new(),
        dead: Vec::new(),
        redelivered: 0,
        bytes: 0,
        next_timer: None,
        more: false,
    };
    let r = poll_locked(t, g, &mut st, max, now, &mut p);
    // Queue what changed while the group is locked, even when a read failed part way:
    // the journal then holds the changes in the order they were made.
    let durable = if p.ops.is_empty() && p.dead.is_empty() {
        drop(permit);
        None
    } else {
        let mut journal = Vec::new();
        group::encode_ops(&t.name, &g.name, &p.ops, &mut journal);
        let (reply, rx) = oneshot::channel();
        permit.send(Cmd {
            appends: std::mem::take(&mut p.dead),
            journal,
            reply,
        });
        Some(rx)
    };
    drop(st);
    r?;
    Ok((p, durable))
}

fn poll_locked(
    t: &Topic,
    g: &Group,
    st: &mut GroupState,
    max: usize,
    now: u64,
    p: &mut Polled,
) -> Result<()> {
    let n = st.cursors.len();
    let first = st.turn % n.max(1);
    st.turn = st.turn.wrapping_add(1);
    let cfg = st.config.clone();
    let mut unacked = st.unacked();
    let lookahead = max.max(LOOKAHEAD);
    for i in 0..n {
        let pi = (first + i) % n;
        let part = &t.parts[pi];
        let c = &mut st.cursors[pi];
        let lost = c.skip_to(part.start());
        if lost > 0 {
            tracing::warn!(topic = %t.name, group = %g.name, partition = pi, lost, "messages removed by retention before the group finished them");
        }
        let mut cache = HashMap::new();
        // Bounded: each round reads new messages or hands some out.
        const ROUNDS: usize = 16;
        for round in 0..ROUNDS {
            let read = fill(c, part, &cfg, now, lookahead, &mut p.ops, &mut cache)?;
            let before = p.out.len();
            deliver(t, g, c, part, &cfg, now, max, &mut unacked, p, &mut cache)?;
            if p.out.len() >= max
                || p.bytes >= MAX_FETCH_BYTES
                || (read == 0 && p.out.len() == before)
            {
                break;
            }
            if round == ROUNDS - 1 && read > 0 {
                // More may be readable (all filtered, say): the caller polls again.
                p.more = true;
            }
        }
    }
    let fresh = unacked < cfg.max_unacked;
    p.next_timer = st
        .cursors
        .iter()
        .filter_map(|c| c.next_due(fresh).map(|t| t.0))
        .min();
    Ok(())
}

/// Reads new messages into a cursor's window as fresh slots (filtered ones finished at
/// once, an ordered key's later ones held back); returns how many were read.
fn fill(
    c: &mut Cursor,
    part: &PartitionLog,
    cfg: &GroupConfig,
    now: u64,
    lookahead: usize,
    ops: &mut Vec<Op>,
    cache: &mut HashMap<u64, Message>,
) -> Result<usize> {
    let end = part.end();
    let room = (cfg.max_window as usize).saturating_sub(c.slots.len());
    let want = lookahead
        .saturating_sub(c.due_fresh(now, lookahead))
        .min(room);
    if want == 0 || c.next >= end {
        return Ok(0);
    }
    let recs = match part.read(c.next, want, 4 * 1024 * 1024) {
        Ok(r) => r,
        // Retention ran meanwhile: the next poll skips to the new start.
        Err(MqError::OffsetOutOfRange { .. }) => return Ok(0),
        Err(e) => return Err(e),
    };
    let pi = part.id;
    for r in &recs {
        let off = r.offset;
        // Offsets missing from the log (a gap left by damage outside the broker): finished.
        while c.next < off {
            finish_op(c, ops, pi, c.next);
        }
        let tag = Message::peek_tag(&r.payload)?;
        if !cfg.tags.is_empty() && !cfg.tags.iter().any(|t| t.as_bytes() == tag) {
            finish_op(c, ops, pi, off);
            continue;
        }
        let msg = Message::decode(r.payload.clone())?;
        // Ordered groups: a key's later messages wait for its first.
        let keyed = c.keys.is_some() && !msg.key.is_empty();
        let visible_at = if keyed && c.key_busy(&msg.key) {
            BLOCKED
        } else {
            fresh_visible(&msg, cfg, now)
        };
        c.push(Slot {
            done: false,
            deliveries: 0,
            visible_at,
        });
        if keyed {
            c.track_key(off, msg.key.clone());
        }
        cache.insert(off, msg);
    }
    c.advance();
    Ok(recs.len())
}

/// Finishes `off` and records it, joined to the last op when it continues its range.
fn finish_op(c: &mut Cursor, ops: &mut Vec<Op>, pi: u32, off: u64) {
    c.finish(off);
    match ops.last_mut() {
        Some(Op::Finish { part, to, .. }) if *part == pi && *to == off => *to = off + 1,
        _ => ops.push(Op::Finish {
            part: pi,
            from: off,
            to: off + 1,
        }),
    }
}

/// Hands out a cursor's due messages in the order of their times: fresh ones, nacked
/// ones and those past their ack deadline (redeliveries); a message out of deliveries
/// goes to the dead letters instead.
#[allow(clippy::too_many_arguments)]
fn deliver(
    t: &Topic,
    g: &Group,
    c: &mut Cursor,
    part: &PartitionLog,
    cfg: &GroupConfig,
    now: u64,
    max: usize,
    unacked: &mut u32,
    p: &mut Polled,
    cache: &mut HashMap<u64, Message>,
) -> Result<()> {
    let pi = part.id;
    let tag_ok = |tag: &[u8]| cfg.tags.is_empty() || cfg.tags.iter().any(|t| t.as_bytes() == tag);
    while p.out.len() < max && p.bytes < MAX_FETCH_BYTES {
        // At `max_unacked` only redeliveries may go.
        let Some((vis, off)) = c.next_due(*unacked < cfg.max_unacked) else {
            break;
        };
        if vis > now {
            break;
        }
        let Some(slot) = c.delivered(off) else { break };
        let msg = match cache.remove(&off) {
            Some(m) => m,
            None => match part.read(off, 1, 1) {
                Ok(mut r) if r.first().is_some_and(|r| r.offset == off) => {
                    Message::decode(r.swap_remove(0).payload)?
                }
                Ok(_) | Err(MqError::OffsetOutOfRange { .. }) => {
                    finish_op(c, &mut p.ops, pi, off);
                    continue;
                }
                Err(e) => return Err(e),
            },
        };
        if slot.deliveries == 0 {
            if !tag_ok(msg.tag.as_bytes()) {
                finish_op(c, &mut p.ops, pi, off);
                continue;
            }
            if msg.deliver_at_ms > now {
                c.set(off, 0, msg.deliver_at_ms);
                continue;
            }
        }
        if slot.deliveries as u32 >= cfg.max_deliveries {
            if let Some(dlq) = &g.dlq {
                let mut m = msg.to_new();
                m.headers
                    .push(("mq-dead-topic".into(), Bytes::from(t.name.clone())));
                m.headers
                    .push(("mq-dead-group".into(), Bytes::from(g.name.clone())));
                m.headers
                    .push(("mq-dead-partition".into(), Bytes::from(pi.to_string())));
                m.headers
                    .push(("mq-dead-offset".into(), Bytes::from(off.to_string())));
                m.headers.push((
                    "mq-dead-deliveries".into(),
                    Bytes::from(slot.deliveries.to_string()),
                ));
                p.dead.push(Append {
                    topic: dlq.clone(),
                    part: 0,
                    msg: m,
                });
                metrics::counter!("meshwork_mq_dead_lettered_total", "topic" => t.name.clone(), "group" => g.name.clone()).increment(1);
            }
            finish_op(c, &mut p.ops, pi, off);
            *unacked = unacked.saturating_sub(1);
            p.more = true;
            continue;
        }
        let deliveries = slot.deliveries.saturating_add(1);
        if slot.deliveries == 0 {
            *unacked += 1;
        } else {
            p.redelivered += 1;
        }
        let visible_at = now.saturating_add(cfg.ack_wait_ms);
        c.set(off, deliveries, visible_at);
        p.ops.push(Op::Set {
            part: pi,
            offset: off,
            deliveries,
            visible_at,
        });
        p.bytes += msg.body.len() + msg.key.len();
        p.out.push(Delivery {
            partition: pi,
            offset: off,
            delivery: deliveries,
            message: msg,
        });
    }
    Ok(())
}

/// The committer thread: drains the queue into batches and commits each.
fn committer(weak: Weak<Inner>, mut rx: mpsc::Receiver<Cmd>) {
    while let Some(first) = rx.blocking_recv() {
        let Some(inner) = weak.upgrade() else { return };
        let _writer = inner.commit_lock.lock();
        let mut batch = vec![first];
        while batch.len() < inner.cfg.max_batch_requests {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        commit(&inner, batch);
        let now = inner.cfg.clock.now_ms();
        if now.saturating_sub(inner.last_retention.load(Ordering::Relaxed)) >= 1000 {
            inner.last_retention.store(now, Ordering::Relaxed);
            retention(&inner, now);
        }
        if !inner.failed.load(Ordering::Acquire)
            && inner.journal.bytes() >= inner.cfg.journal_checkpoint_bytes
            && let Err(e) = checkpoint(&inner, &mut rx)
        {
            tracing::warn!(error = %e, "group snapshot failed; the journal keeps growing until one succeeds");
        }
    }
}

/// Writes the touched partitions, then the journal, each durable on return. The
/// partitions come first: a journal op can finish a message whose dead-letter copy
/// is in a partition of the same batch, and must never be durable without it. With
/// fsync on and more than one partition, their fdatasyncs run at once (one thread
/// each; inline when a thread cannot be made): the device flushes them together,
/// so a batch spread over N partitions waits about two flushes, not N + 1.
fn write_and_sync_all(
    inner: &Inner,
    touched: &[(Arc<Topic>, Arc<PartitionLog>, u64)],
) -> Result<()> {
    let fsync = inner.cfg.fsync;
    if !fsync || touched.len() <= 1 {
        for (_, part, _) in touched {
            part.write_and_sync(fsync)?;
        }
    } else {
        std::thread::scope(|s| {
            let mut inline = Vec::new();
            let mut syncs = Vec::new();
            for (_, part, _) in touched {
                match std::thread::Builder::new()
                    .name("mq-sync".into())
                    .spawn_scoped(s, move || part.write_and_sync(true))
                {
                    Ok(h) => syncs.push(h),
                    Err(_) => inline.push(part),
                }
            }
            let mut result = Ok(());
            for part in inline {
                let r = part.write_and_sync(true);
                if result.is_ok() {
                    result = r;
                }
            }
            for h in syncs {
                let r = h.join().unwrap_or_else(|_| {
                    Err(MqError::storage("a partition's sync thread panicked"))
                });
                if result.is_ok() {
                    result = r;
                }
            }
            result
        })?;
    }
    inner.journal.write_and_sync(fsync)
}

/// Commits one batch: every request answered, after its writes are durable.
fn commit(inner: &Inner, batch: Vec<Cmd>) {
    if inner.failed.load(Ordering::Acquire) {
        for cmd in batch {
            let _ = cmd.reply.send(Err(MqError::Stopped));
        }
        return;
    }
    let started = std::time::Instant::now();
    let now = inner.cfg.clock.now_ms();
    let window = inner.cfg.dedup_window.as_millis() as u64;
    // Each partition written, with its topic and how many messages.
    let mut touched: Vec<(Arc<Topic>, Arc<PartitionLog>, u64)> = Vec::new();
    let mut results: Vec<Vec<Published>> = Vec::with_capacity(batch.len());
    let mut failure: Option<MqError> = None;
    'cmds: for cmd in &batch {
        let mut pubs = Vec::with_capacity(cmd.appends.len());
        for a in &cmd.appends {
            if a.msg.id != 0 {
                let mut d = a.topic.dedup.lock();
                d.expire(now, window, inner.cfg.max_dedup_ids);
                if let Some(&(partition, offset)) = d.ids.get(&a.msg.id) {
                    pubs.push(Published {
                        partition,
                        offset,
                        duplicate: true,
                    });
                    metrics::counter!("meshwork_mq_duplicates_total", "topic" => a.topic.name.clone()).increment(1);
                    continue;
                }
            }
            let part = &a.topic.parts[a.part as usize];
            let staged = part.stage(now, a.msg.encoded_len(), |ms, out| a.msg.encode(ms, out));
            match staged {
                Ok((offset, ms)) => {
                    if a.msg.id != 0 {
                        a.topic.dedup.lock().insert(a.msg.id, ms, a.part, offset);
                    }
                    pubs.push(Published {
                        partition: a.part,
                        offset,
                        duplicate: false,
                    });
                    match touched.iter_mut().find(|(_, p, _)| Arc::ptr_eq(p, part)) {
                        Some(entry) => entry.2 += 1,
                        None => touched.push((a.topic.clone(), part.clone(), 1)),
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break 'cmds;
                }
            }
        }
        if !cmd.journal.is_empty()
            && let Err(e) = inner.journal.stage(now, cmd.journal.len(), |_, out| {
                out.extend_from_slice(&cmd.journal)
            })
        {
            failure = Some(e);
            break;
        }
        results.push(pubs);
    }
    if failure.is_none() {
        failure = write_and_sync_all(inner, &touched).err();
    }
    if let Some(e) = failure {
        tracing::error!(error = %e, "broker commit failed; the broker stops taking writes (restart to recover from disk)");
        inner.failed.store(true, Ordering::Release);
        for cmd in batch {
            let _ = cmd.reply.send(Err(e.clone()));
        }
        return;
    }
    inner.journal.publish();
    for (topic, part, n) in &touched {
        part.publish();
        metrics::counter!("meshwork_mq_published_total", "topic" => topic.name.clone())
            .increment(*n);
    }
    for (i, (topic, _, _)) in touched.iter().enumerate() {
        if !touched[..i].iter().any(|(t, _, _)| Arc::ptr_eq(t, topic)) {
            topic.published.notify_waiters();
        }
    }
    metrics::histogram!("meshwork_mq_commit_seconds").record(started.elapsed().as_secs_f64());
    for (cmd, pubs) in batch.into_iter().zip(results) {
        let _ = cmd.reply.send(Ok(pubs));
    }
}

/// Applies each topic's retention.
fn retention(inner: &Inner, now: u64) {
    let topics: Vec<Arc<Topic>> = inner.topics.read().values().cloned().collect();
    for t in topics {
        if t.name == half::HALF_TOPIC {
            // Kept from the oldest pending half message on.
            let part = &t.parts[0];
            let keep = inner.halves.lock().oldest_offset().unwrap_or(part.end());
            part.drop_before(keep);
            continue;
        }
        for part in &t.parts {
            part.enforce_retention(now, t.config.retention_ms, t.config.retention_bytes);
        }
    }
}

/// Snapshots every group's state and drops the journal before it.
fn checkpoint(inner: &Inner, rx: &mut mpsc::Receiver<Cmd>) -> Result<()> {
    inner.journal.roll_now()?;
    let seq = inner.journal.end();
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&seq.to_le_bytes());
    let count_at = out.len();
    out.extend_from_slice(&0u32.to_le_bytes());
    let mut count = 0u32;
    let topics: Vec<Arc<Topic>> = inner.topics.read().values().cloned().collect();
    for t in topics {
        let groups: Vec<Arc<Group>> = t.groups.read().values().cloned().collect();
        for g in groups {
            out.push(t.name.len() as u8);
            out.extend_from_slice(t.name.as_bytes());
            out.push(g.name.len() as u8);
            out.extend_from_slice(g.name.as_bytes());
            let len_at = out.len();
            out.extend_from_slice(&0u32.to_le_bytes());
            g.state.lock().encode_snapshot(&mut out);
            let len = (out.len() - len_at - 4) as u32;
            out[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
            count += 1;
        }
    }
    out[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
    // Every change the snapshot holds had its command queued before the snapshot saw it
    // (commands are queued under the group's lock): commit those first, so that nothing
    // the snapshot says is done — a dead letter's append above all — is still only queued.
    let mut pending = Vec::new();
    while let Ok(c) = rx.try_recv() {
        pending.push(c);
    }
    if !pending.is_empty() {
        commit(inner, pending);
    }
    if inner.failed.load(Ordering::Acquire) {
        return Err(MqError::Stopped);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    write_atomic(&inner.dir.join("groups.snapshot"), &out)?;
    inner.journal.drop_before(seq);
    tracing::debug!(seq, bytes = out.len(), "group snapshot written");
    Ok(())
}
