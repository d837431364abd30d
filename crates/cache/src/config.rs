//! The cache node's settings: every limit explicit, with Redis' defaults where Redis
//! has one.

use crate::resp::Limits;

/// Settings of a cache node. `Default` holds the documented defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// The password `AUTH` and `HELLO AUTH` check (`None`: no authentication, as Redis
    /// without `requirepass`).
    pub password: Option<String>,
    /// Most connected clients (Redis' `maxclients`, default 10,000); one more is answered
    /// `ERR max number of clients reached` and closed.
    pub max_clients: usize,
    /// Request limits (bulk size, arguments, inline length).
    pub limits: Limits,
    /// Most unparsed request bytes held for one client (Redis' `client-query-buffer-limit`,
    /// default 1 GiB); past it the connection is closed.
    pub max_query_buffer_bytes: usize,
    /// Shards per database (default: 4 per CPU).
    pub shards: Option<usize>,
    /// Worker threads serving connections (default: one per CPU).
    pub workers: Option<usize>,
    /// Keys the active expiry removes per shard per pass (default 200).
    pub active_expire_budget: usize,
    /// Bytes of data past which writes evict (or are refused, with `noeviction`);
    /// 0 = no limit (Redis' `maxmemory`).
    pub maxmemory: usize,
    /// What to evict past `maxmemory` (Redis' `maxmemory-policy`, default noeviction).
    pub policy: crate::db::Policy,
    /// Keys sampled per eviction (Redis' `maxmemory-samples`, default 5).
    pub samples: usize,
    /// Where the keyspace is written on stop and read on start (`None`, the
    /// default: a cache starts empty).
    pub snapshot: Option<std::path::PathBuf>,
    /// Commands that take at least this many µs go to the slow log (Redis'
    /// `slowlog-log-slower-than`, default 10,000; negative: none; 0: every one).
    pub slowlog_slower_than_us: i64,
    /// Slow-log entries kept (Redis' `slowlog-max-len`, default 128).
    pub slowlog_max_len: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            password: None,
            max_clients: 10_000,
            limits: Limits::default(),
            max_query_buffer_bytes: 1024 * 1024 * 1024,
            shards: None,
            workers: None,
            active_expire_budget: 200,
            maxmemory: 0,
            policy: crate::db::Policy::NoEviction,
            samples: 5,
            snapshot: None,
            slowlog_slower_than_us: 10_000,
            slowlog_max_len: 128,
        }
    }
}
