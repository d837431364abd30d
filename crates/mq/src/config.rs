//! Broker, topic and group settings: every limit explicit, with its unit, validated once.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{MqError, Result};

/// Limits and tuning of the broker. `Default` holds the documented defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct BrokerConfig {
    /// Largest message accepted (body, key, tag and headers), in bytes (default 1 MiB).
    pub max_message_bytes: usize,
    /// Most topics (default 1,000).
    pub max_topics: usize,
    /// Most partitions of one topic (default 64).
    pub max_partitions: u32,
    /// Most groups on one topic (default 100).
    pub max_groups_per_topic: usize,
    /// Most consumers of one broadcast group (default 1,000).
    pub max_consumers_per_group: usize,
    /// Size at which a segment is sealed and a new one started, in bytes (default 64 MiB).
    pub segment_bytes: u64,
    /// Bytes of log between two entries of a segment's offset and time indexes (default 4 KiB).
    pub index_interval_bytes: u64,
    /// Most write requests folded into one group commit (default 1,024).
    pub max_batch_requests: usize,
    /// Write requests queued for the committer before publishers wait (default 16,384).
    pub max_pending_writes: usize,
    /// Journal bytes after which the groups' state is snapshotted and the journal
    /// truncated (default 16 MiB).
    pub journal_checkpoint_bytes: u64,
    /// How long a message id is remembered to refuse a second publish of it (default 2 min).
    pub dedup_window: Duration,
    /// Most ids remembered per topic within the window (default 1,000,000); the oldest are
    /// forgotten first past it.
    pub max_dedup_ids: usize,
    /// Longest delay of a delayed message (default 30 days).
    pub max_delay: Duration,
    /// How long after its prepare an unresolved half message is first checked back with
    /// its producer (default 10 s).
    pub half_check_after: Duration,
    /// Time between two check-backs of one half message (default 30 s).
    pub half_check_interval: Duration,
    /// Check-backs after which a half message still unresolved is rolled back (default 15).
    pub half_max_checks: u32,
    /// Most half messages pending at once (default 100,000); also how many resolved ones
    /// are remembered to answer a repeated commit or rollback.
    pub max_half_pending: usize,
    /// Fsync every commit (default true). Turning it off loses acknowledged publishes and
    /// acks on a crash.
    pub fsync: bool,
    /// The wall clock publish times and delivery deadlines are read from.
    pub clock: Clock,
}

/// The broker's wall clock: the system's, or one a test moves by hand.
#[derive(Clone, Debug, Default)]
pub struct Clock(Option<std::sync::Arc<std::sync::atomic::AtomicU64>>);

impl PartialEq for Clock {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (None, None) => true,
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock(None)
    }

    /// A clock that stands at `ms` until [`Clock::advance`] moves it.
    pub fn manual(ms: u64) -> Clock {
        Clock(Some(std::sync::Arc::new(
            std::sync::atomic::AtomicU64::new(ms),
        )))
    }

    /// Moves a manual clock forward (no effect on the system clock).
    pub fn advance(&self, by: Duration) {
        if let Some(a) = &self.0 {
            a.fetch_add(by.as_millis() as u64, std::sync::atomic::Ordering::AcqRel);
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        match &self.0 {
            Some(a) => a.load(std::sync::atomic::Ordering::Acquire),
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }

    /// True for a manual clock (waits then never sleep on it).
    pub fn is_manual(&self) -> bool {
        self.0.is_some()
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 1024 * 1024,
            max_topics: 1000,
            max_partitions: 64,
            max_groups_per_topic: 100,
            max_consumers_per_group: 1000,
            segment_bytes: 64 * 1024 * 1024,
            index_interval_bytes: 4096,
            max_batch_requests: 1024,
            max_pending_writes: 16 * 1024,
            journal_checkpoint_bytes: 16 * 1024 * 1024,
            dedup_window: Duration::from_secs(120),
            max_dedup_ids: 1_000_000,
            max_delay: Duration::from_secs(30 * 24 * 3600),
            half_check_after: Duration::from_secs(10),
            half_check_interval: Duration::from_secs(30),
            half_max_checks: 15,
            max_half_pending: 100_000,
            fsync: true,
            clock: Clock::system(),
        }
    }
}

impl BrokerConfig {
    /// Refuses settings the broker cannot run with.
    pub fn validate(&self) -> Result<()> {
        if self.segment_bytes < 64 * 1024 {
            return Err(MqError::Invalid(
                "mq.segment_bytes must be at least 65536".into(),
            ));
        }
        if (self.max_message_bytes as u64).saturating_add(64 * 1024) > self.segment_bytes {
            return Err(MqError::Invalid(
                "mq.max_message_bytes must be at least 64 KiB below mq.segment_bytes".into(),
            ));
        }
        if self.segment_bytes > u32::MAX as u64 {
            return Err(MqError::Invalid(
                "mq.segment_bytes must be below 4 GiB".into(),
            ));
        }
        if self.index_interval_bytes == 0
            || self.max_batch_requests == 0
            || self.max_pending_writes == 0
        {
            return Err(MqError::Invalid(
                "mq.index_interval_bytes, mq.max_batch_requests and mq.max_pending_writes must be positive".into(),
            ));
        }
        if self.max_partitions == 0 {
            return Err(MqError::Invalid(
                "mq.max_partitions must be positive".into(),
            ));
        }
        if self.half_check_interval.is_zero() || self.max_half_pending == 0 {
            return Err(MqError::Invalid(
                "mq.half_check_interval and mq.max_half_pending must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// A topic's settings, fixed at creation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// Number of partitions (default 1); messages with the same key go to the same one.
    #[serde(default = "one")]
    pub partitions: u32,
    /// Messages older than this are deleted, a whole segment at a time (default 7 days; 0 = keep).
    #[serde(default = "week_ms")]
    pub retention_ms: u64,
    /// A partition's log is kept below this many bytes, oldest segments deleted first
    /// (default 0 = no size limit).
    #[serde(default)]
    pub retention_bytes: u64,
}

fn one() -> u32 {
    1
}

fn week_ms() -> u64 {
    7 * 24 * 3600 * 1000
}

impl Default for TopicConfig {
    fn default() -> Self {
        Self {
            partitions: one(),
            retention_ms: week_ms(),
            retention_bytes: 0,
        }
    }
}

/// Where a new group starts reading.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    /// The oldest retained message.
    Earliest,
    /// Only messages published after the group is created (the default).
    #[default]
    Latest,
    /// This offset in every partition (clamped to the retained range).
    Offset(u64),
    /// The first message published at or after this time (milliseconds since the epoch).
    Time(u64),
}

/// How a group hands out messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GroupMode {
    /// Any message to any consumer, in parallel (the default).
    #[default]
    Shared,
    /// At most one message per key out at a time, in the key's order; parallel across keys.
    /// A message that exhausts its deliveries goes to the dead letters and the key goes on.
    Ordered,
    /// Every consumer gets every message: each consumer (`group/consumer`) has its own
    /// position, made on its first fetch at the group's `start`, and its own acks.
    Broadcast,
}

/// A consumer group's settings, fixed at creation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Shared (default) or ordered by key.
    #[serde(default)]
    pub mode: GroupMode,
    /// Where the group starts reading (default latest).
    #[serde(default)]
    pub start: StartAt,
    /// How long a delivered message stays invisible to the group's other consumers
    /// before it is delivered again unless acked or extended (default 30 s).
    #[serde(default = "thirty_s")]
    pub ack_wait_ms: u64,
    /// Deliveries after which a message goes to the group's dead-letter topic (default 5).
    #[serde(default = "five")]
    pub max_deliveries: u32,
    /// Deliver only messages with one of these tags (default: every message).
    #[serde(default)]
    pub tags: Vec<String>,
    /// What one priority level is worth in waiting time, in ms (default 1000): a message
    /// of priority p goes as if published p × this earlier, so higher priorities go first
    /// and a low one is never starved (0 = priorities ignored).
    #[serde(default = "thousand_ms")]
    pub priority_aging_ms: u64,
    /// Most messages delivered and not yet acked, across the group's consumers (default 1,000).
    #[serde(default = "thousand")]
    pub max_unacked: u32,
    /// Most offsets a partition's cursor keeps between its oldest unfinished message and
    /// the newest read (default 100,000): what bounds the group's memory whatever the backlog.
    #[serde(default = "hundred_thousand")]
    pub max_window: u32,
}

fn thirty_s() -> u64 {
    30_000
}
fn five() -> u32 {
    5
}
fn thousand_ms() -> u64 {
    1000
}
fn thousand() -> u32 {
    1000
}
fn hundred_thousand() -> u32 {
    100_000
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            mode: GroupMode::default(),
            start: StartAt::default(),
            ack_wait_ms: thirty_s(),
            max_deliveries: five(),
            tags: Vec::new(),
            priority_aging_ms: thousand_ms(),
            max_unacked: thousand(),
            max_window: hundred_thousand(),
        }
    }
}

impl GroupConfig {
    /// Refuses settings a group cannot run with.
    pub fn validate(&self) -> Result<()> {
        if self.ack_wait_ms == 0 || self.ack_wait_ms > 12 * 3600 * 1000 {
            return Err(MqError::Invalid(
                "ack_wait_ms must be between 1 and 43200000 (12 hours)".into(),
            ));
        }
        if self.max_deliveries == 0 || self.max_deliveries > u16::MAX as u32 {
            return Err(MqError::Invalid(
                "max_deliveries must be between 1 and 65535".into(),
            ));
        }
        if self.max_unacked == 0 || self.max_window == 0 || self.max_unacked > self.max_window {
            return Err(MqError::Invalid(
                "max_unacked must be positive and at most max_window".into(),
            ));
        }
        if self.priority_aging_ms > 3_600_000 {
            return Err(MqError::Invalid(
                "priority_aging_ms must be at most 3600000 (one hour per priority level)".into(),
            ));
        }
        if self.tags.len() > 64 || self.tags.iter().any(|t| t.is_empty() || t.len() > 255) {
            return Err(MqError::Invalid(
                "tags: at most 64, each 1 to 255 bytes".into(),
            ));
        }
        Ok(())
    }
}

/// Longest topic or group name, in bytes: a dead-letter topic's name (`__dlq.` + topic + `.`
/// + group) must stay a valid file name.
pub const MAX_NAME_BYTES: usize = 120;

/// Checks a topic or group name: 1 to 120 bytes of `A-Z a-z 0-9 . _ -`, not `.` or `..`,
/// not starting with `__` (reserved for the broker's own topics).
pub fn validate_name(what: &'static str, name: &str) -> Result<()> {
    let bad = |why| {
        Err(MqError::InvalidName {
            what,
            name: name.chars().take(256).collect(),
            why,
        })
    };
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return bad("must be 1 to 120 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("may contain only A-Z, a-z, 0-9, '.', '_' and '-'");
    }
    if name == "." || name == ".." {
        return bad("must not be '.' or '..'");
    }
    if name.starts_with("__") {
        return bad("must not start with '__' (reserved for the broker's own topics)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("topic", "orders.v1_x-y").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "__dlq", "é"] {
            assert!(validate_name("topic", bad).is_err(), "{bad}");
        }
        assert!(validate_name("topic", &"a".repeat(121)).is_err());
    }

    #[test]
    fn defaults_are_valid() {
        BrokerConfig::default().validate().expect("broker defaults");
        GroupConfig::default().validate().expect("group defaults");
    }
}
