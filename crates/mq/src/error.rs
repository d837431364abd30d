//! The broker's typed errors: each message says what was wrong and what to change.

/// Everything a broker call can fail with.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MqError {
    /// A topic or group name outside the accepted alphabet or length.
    #[error("invalid {what} name {name:?}: {why}")]
    InvalidName {
        /// "topic" or "group".
        what: &'static str,
        /// The name as given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A request outside a documented limit.
    #[error("{what} is too large ({size}, limit {limit}; raise mq.{setting})")]
    TooLarge {
        /// What was measured.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The configured limit.
        limit: u64,
        /// The setting that raises the limit.
        setting: &'static str,
    },
    /// An argument that is not valid on its own (zero partitions, a priority above 9...).
    #[error("{0}")]
    Invalid(String),
    /// No topic by that name.
    #[error("topic {0:?} does not exist")]
    NoTopic(String),
    /// The topic exists with a different configuration.
    #[error("topic {0:?} already exists with a different configuration")]
    TopicExists(String),
    /// No group by that name on the topic.
    #[error("group {group:?} does not exist on topic {topic:?}")]
    NoGroup {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
    },
    /// The group exists with a different configuration.
    #[error("group {group:?} already exists on topic {topic:?} with a different configuration")]
    GroupExists {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
    },
    /// A partition number the topic does not have.
    #[error("topic {topic:?} has no partition {partition} (it has {partitions})")]
    NoPartition {
        /// The topic.
        topic: String,
        /// The partition asked for.
        partition: u32,
        /// How many the topic has.
        partitions: u32,
    },
    /// An offset outside the partition's retained range.
    #[error("offset {offset} is outside partition {partition}'s retained range [{start}, {end})")]
    OffsetOutOfRange {
        /// The partition.
        partition: u32,
        /// The offset asked for.
        offset: u64,
        /// The oldest retained offset.
        start: u64,
        /// The next offset to be written.
        end: u64,
    },
    /// An ack, nack or extension for a message the group never delivered.
    #[error("partition {partition} offset {offset} was never delivered to group {group:?}")]
    UnknownDelivery {
        /// The group.
        group: String,
        /// The partition.
        partition: u32,
        /// The offset.
        offset: u64,
    },
    /// A configured maximum count was reached (topics, groups, partitions).
    #[error("too many {what} (limit {limit}; raise mq.{setting})")]
    Limit {
        /// What there are too many of.
        what: &'static str,
        /// The configured limit.
        limit: u64,
        /// The setting that raises it.
        setting: &'static str,
    },
    /// No pending half message has that id (never prepared, or resolved long ago).
    #[error("no half message {0} is pending (never prepared, or resolved long ago)")]
    NoHalf(u64),
    /// The half message was already resolved the other way.
    #[error("half message {id} is already {outcome}")]
    HalfResolved {
        /// The id.
        id: u64,
        /// How it ended ("committed" or "rolled back").
        outcome: &'static str,
    },
    /// Reading or writing the broker's files failed.
    #[error("broker storage: {0}")]
    Storage(String),
    /// The broker stopped (closed, or fail-stopped after a storage failure).
    #[error("the broker is stopped (restart to recover from disk)")]
    Stopped,
}

impl MqError {
    /// A storage error from anything displayable.
    pub(crate) fn storage(e: impl std::fmt::Display) -> Self {
        MqError::Storage(e.to_string())
    }
}

/// The broker's result type.
pub type Result<T> = std::result::Result<T, MqError>;
