//! Meshwork's message broker engine: topics of partitioned, append-only logs (segments with
//! offset and time indexes, CRC per record, group-commit fsync, retention, torn-tail
//! recovery) and consumer groups over them (per-message ack with deadlines, nack with
//! delay, max deliveries then a dead-letter topic, tag filters, delayed messages, dedup by
//! message id). No networking: the node serves it, over its HTTP API (feature `api`)
//! and gRPC (feature `grpc`).

#[cfg(feature = "api")]
pub mod api;
mod broker;
#[cfg(feature = "api")]
pub mod check;
pub mod config;
pub mod error;
mod group;
#[cfg(feature = "grpc")]
pub mod grpc;
mod log;
pub mod message;
mod segment;

pub use broker::{
    Broker, CursorInfo, Delivery, GroupInfo, HalfCheck, HalfDecision, HalfInfo, HalfOutcome,
    MAX_FETCH, MAX_FETCH_BYTES, MAX_PUBLISH_BATCH, PartitionInfo, Published, Stored, TopicInfo,
};
pub use config::{BrokerConfig, Clock, GroupConfig, GroupMode, StartAt, TopicConfig};
pub use error::{MqError, Result};
pub use message::{Message, NewMessage};

/// The API's OpenAPI fragment (merged into the node's `/openapi.json`).
pub const OPENAPI: &str = include_str!("../openapi.json");
