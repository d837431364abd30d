//! Coordination for Meshwork, written against the etcd v3 API only: a service
//! registry with active health checks, a configuration center, distributed locks,
//! leader election and a unique ID generator.
//!
//! Everything here talks to "an etcd v3 endpoint" through [`backend::Backend`]:
//! Meshwork's embedded store or a real etcd cluster, with the same code.

pub mod api;
pub mod backend;
pub mod client;
pub mod config;
pub mod error;
pub mod ids;
pub mod lock;
pub mod nodes;
pub mod registry;
pub mod runtime;

pub use backend::Backend;
pub use client::{ClientOptions, CoordClient};
pub use error::CoordError;
pub use runtime::{Coord, CoordOptions};

/// Generated gRPC health-checking protocol (`grpc.health.v1`).
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod health_proto {
    tonic::include_proto!("grpc.health.v1");
}
