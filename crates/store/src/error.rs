//! The store's typed errors. Their messages are etcd's own strings where etcd clients
//! match on them, so the gRPC layer can pass them through unchanged.

/// Everything a store call can fail with.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The requested revision was removed by compaction.
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted {
        /// The current compaction revision.
        compact_revision: i64,
    },
    /// The requested revision is newer than the store's current revision.
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    /// A compaction was requested at or below the current compaction revision.
    #[error("etcdserver: mvcc: required revision has been compacted")]
    AlreadyCompacted,
    /// The lease does not exist (never granted, revoked or expired).
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    /// A grant named an ID that is already in use.
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    /// A lease TTL outside the accepted range.
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    /// `ignore_value`/`ignore_lease` on a key that does not exist.
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// A txn with more operations than the configured maximum.
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    /// A txn that writes the same key twice.
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    /// An empty key where one is required.
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// `ignore_value` together with a value, or `ignore_lease` together with a lease.
    #[error("etcdserver: value is provided")]
    ValueProvided,
    /// `ignore_lease` together with a lease.
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    /// A key longer than the configured maximum.
    #[error(
        "etcdserver: key is too large ({size} bytes, limit {limit}; raise store.max_key_bytes)"
    )]
    KeyTooLarge {
        /// Size of the key in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A value larger than the configured maximum.
    #[error(
        "etcdserver: value is too large ({size} bytes, limit {limit}; raise store.max_value_bytes)"
    )]
    ValueTooLarge {
        /// Size of the value in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A request larger than the configured maximum.
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    /// The database reached its size quota; writes fail until compaction and defragmentation.
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    /// An invalid sort, filter or other argument; the message says which.
    #[error("etcdserver: {0}")]
    InvalidArgument(String),
    /// The storage engine failed (I/O error, corruption). The write was not applied.
    #[error("storage error: {0}")]
    Storage(String),
    /// A resource ran out for a moment (file descriptors, disk space): the
    /// write was refused with nothing changed, and a retry may succeed.
    #[error("etcdserver: resources exhausted, retry: {0}")]
    Exhausted(String),
    /// The store is shutting down or failed and takes no more requests.
    #[error("etcdserver: server stopped")]
    Stopped,
    /// A `CORRUPT` alarm is raised: every write is refused until it is cleared.
    #[error("etcdserver: corrupt cluster")]
    Corrupt,
}

impl StoreError {
    pub(crate) fn storage(e: impl std::fmt::Display) -> Self {
        StoreError::Storage(e.to_string())
    }
}

/// Shorthand for results of store calls.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
