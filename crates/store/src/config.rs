//! Store configuration: every limit is explicit, named with its unit, and validated once.

use std::time::Duration;

/// Limits and tuning of the store. `Default` holds the documented defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreConfig {
    /// Largest key accepted, in bytes (default 32 KiB).
    pub max_key_bytes: usize,
    /// Largest value accepted, in bytes (default 1.5 MiB, etcd's request limit).
    pub max_value_bytes: usize,
    /// Largest request accepted, in bytes (default 1.5 MiB, as etcd).
    pub max_request_bytes: usize,
    /// Most operations in each of a txn's compare, success and failure lists (default 128).
    pub max_txn_ops: usize,
    /// Database size quota in bytes; writes fail with "database space exceeded" past it
    /// (default 2 GiB, as etcd).
    pub quota_bytes: u64,
    /// redb page cache in bytes (default 64 MiB; the OS page cache serves the rest).
    pub cache_bytes: usize,
    /// Most write requests folded into one group commit (default 1024).
    pub max_batch_requests: usize,
    /// Most write requests queued for the committer before senders wait (default 65536).
    pub max_pending_writes: usize,
    /// Events buffered per watch stream before a watcher is moved to catch-up (default 1024).
    pub watch_buffer_events: usize,
    /// Most watchers on one watch stream (default 10000).
    pub max_watchers_per_stream: usize,
    /// Automatic compaction: keep this many revisions of history (0 = off).
    pub auto_compaction_retention_revisions: i64,
    /// Automatic compaction: keep this much time of history (`None` = off).
    pub auto_compaction_retention: Option<Duration>,
    /// Minimum lease TTL in seconds; shorter grants are raised to it (default 2).
    pub min_lease_ttl_secs: i64,
    /// Largest lease TTL in seconds (default 9,000,000,000, as etcd).
    pub max_lease_ttl_secs: i64,
    /// How often expired leases are looked for (default 500 ms).
    pub lease_check_interval: Duration,
    /// How often changed lease deadlines are written down (default 5 s), so a
    /// restart resumes each lease with at most this much extra time; zero
    /// turns it off (a restart then renews every lease to a full TTL, as etcd).
    pub lease_checkpoint_interval: Duration,
    /// Fsync every commit (default true). Turning it off loses acknowledged writes on a crash.
    pub fsync: bool,
    /// How often watchers that asked for `progress_notify` get a progress notification
    /// when idle (default 10 minutes, as etcd).
    pub watch_progress_interval: Duration,
    /// How often the engine's state is made durable so that the write-ahead log can be
    /// truncated (default 100 ms). Writes are durable through the log in between.
    pub checkpoint_interval: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_key_bytes: 32 * 1024,
            max_value_bytes: 1536 * 1024,
            max_request_bytes: 1536 * 1024,
            max_txn_ops: 128,
            quota_bytes: 2 * 1024 * 1024 * 1024,
            cache_bytes: 64 * 1024 * 1024,
            max_batch_requests: 1024,
            max_pending_writes: 65536,
            watch_buffer_events: 1024,
            max_watchers_per_stream: 10_000,
            auto_compaction_retention_revisions: 0,
            auto_compaction_retention: None,
            min_lease_ttl_secs: 2,
            max_lease_ttl_secs: 9_000_000_000,
            lease_check_interval: Duration::from_millis(500),
            lease_checkpoint_interval: Duration::from_secs(5),
            fsync: true,
            watch_progress_interval: Duration::from_secs(600),
            checkpoint_interval: Duration::from_millis(100),
        }
    }
}

/// A configuration value outside its accepted range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid store config: {field} = {value}: {expected}")]
pub struct ConfigError {
    /// The field's path, e.g. `store.max_txn_ops`.
    pub field: &'static str,
    /// The rejected value.
    pub value: String,
    /// What was expected instead.
    pub expected: &'static str,
}

impl StoreConfig {
    /// Checks every field and the rules between them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn check(
            ok: bool,
            field: &'static str,
            value: impl ToString,
            expected: &'static str,
        ) -> Result<(), ConfigError> {
            if ok {
                Ok(())
            } else {
                Err(ConfigError {
                    field,
                    value: value.to_string(),
                    expected,
                })
            }
        }
        check(
            self.max_key_bytes >= 1,
            "store.max_key_bytes",
            self.max_key_bytes,
            "at least 1",
        )?;
        check(
            self.max_request_bytes >= 1024,
            "store.max_request_bytes",
            self.max_request_bytes,
            "at least 1024",
        )?;
        check(
            self.max_value_bytes <= self.max_request_bytes,
            "store.max_value_bytes",
            self.max_value_bytes,
            "at most store.max_request_bytes",
        )?;
        check(
            self.max_txn_ops >= 1,
            "store.max_txn_ops",
            self.max_txn_ops,
            "at least 1",
        )?;
        check(
            self.quota_bytes >= 1 << 20,
            "store.quota_bytes",
            self.quota_bytes,
            "at least 1 MiB",
        )?;
        check(
            self.max_batch_requests >= 1,
            "store.max_batch_requests",
            self.max_batch_requests,
            "at least 1",
        )?;
        check(
            self.max_pending_writes >= 1,
            "store.max_pending_writes",
            self.max_pending_writes,
            "at least 1",
        )?;
        check(
            self.watch_buffer_events >= 16,
            "store.watch_buffer_events",
            self.watch_buffer_events,
            "at least 16",
        )?;
        check(
            self.max_watchers_per_stream >= 1,
            "store.max_watchers_per_stream",
            self.max_watchers_per_stream,
            "at least 1",
        )?;
        check(
            self.auto_compaction_retention_revisions >= 0,
            "store.auto_compaction_retention_revisions",
            self.auto_compaction_retention_revisions,
            "0 (off) or a positive number of revisions",
        )?;
        check(
            self.min_lease_ttl_secs >= 1,
            "store.min_lease_ttl_secs",
            self.min_lease_ttl_secs,
            "at least 1",
        )?;
        check(
            self.max_lease_ttl_secs >= self.min_lease_ttl_secs,
            "store.max_lease_ttl_secs",
            self.max_lease_ttl_secs,
            "at least store.min_lease_ttl_secs",
        )?;
        check(
            !self.lease_check_interval.is_zero(),
            "store.lease_check_interval",
            format!("{:?}", self.lease_check_interval),
            "more than zero",
        )?;
        check(
            !self.checkpoint_interval.is_zero(),
            "store.checkpoint_interval",
            format!("{:?}", self.checkpoint_interval),
            "more than zero",
        )?;
        check(
            !self.watch_progress_interval.is_zero(),
            "store.watch_progress_interval",
            format!("{:?}", self.watch_progress_interval),
            "more than zero",
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_errors_name_the_field() {
        assert_eq!(StoreConfig::default().validate(), Ok(()));
        let bad = StoreConfig {
            max_txn_ops: 0,
            ..StoreConfig::default()
        };
        let err = bad.validate().unwrap_err();
        assert_eq!(err.field, "store.max_txn_ops");
        assert!(err.to_string().contains("at least 1"));
    }
}
