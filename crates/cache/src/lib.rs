//! Meshwork's cache node: a Redis-compatible server (RESP2 and RESP3, inline and
//! multibulk requests, pipelining) over a sharded in-memory keyspace with lazy and
//! active expiry. The node serves it as its `cache` role: strings, keys, hashes,
//! lists (blocking pops included), sets, sorted sets, pub/sub, transactions,
//! eviction under `maxmemory`, the slow log, `CLIENT LIST`, and an optional
//! snapshot written on stop and loaded on start. The SDK's two-level cache
//! (`meshwork_sdk::cache`) uses it, or a real Redis, as its L2.

pub mod clients;
pub mod cmd;
pub mod config;
pub mod db;
pub mod glob;
pub mod key;
pub mod pubsub;
pub mod resp;
pub mod server;
pub mod snapshot;
pub mod stripe;
pub mod types;
pub mod zset;

pub use config::CacheConfig;
pub use server::{
    Cache, DbStats, SdkStats, Stats, TLS_HANDSHAKE, Workers, spawn_workers, spawn_workers_tls,
};
