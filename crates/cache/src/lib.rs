//! Meshwork's cache node: a Redis-compatible server (RESP2 and RESP3, inline and
//! multibulk requests, pipelining) over a sharded in-memory keyspace with lazy and
//! active expiry. The node serves it as its `cache` role.
//!
//! This is the first part of issue 17: strings, keys, expiry, connection and server
//! commands. Lists, hashes, sets and sorted sets, pub/sub, transactions, eviction
//! under `maxmemory`, snapshots and the SDK's two-level cache are still to come.

pub mod clients;
pub mod cmd;
pub mod config;
pub mod db;
pub mod glob;
pub mod pubsub;
pub mod resp;
pub mod server;
pub mod snapshot;
pub mod types;
pub mod zset;

pub use config::CacheConfig;
pub use server::{Cache, DbStats, SdkStats, Stats, Workers, spawn_workers};
