//! Coordination for Meshwork, written against the etcd v3 API only: a service
//! registry with active health checks, a configuration center, distributed locks,
//! leader election and a unique ID generator.
//!
//! Everything here talks to "an etcd v3 endpoint" through [`backend::Backend`]:
//! Meshwork's embedded store or a real etcd cluster, with the same code.
//!
//! The default `server` feature adds what only a node runs: the HTTP API, node
//! membership, the health checker and its probes, config diffs and the
//! [`Coord`] runtime. Applications (through `meshwork-sdk`) build without it.

#[cfg(feature = "server")]
pub mod api;
#[cfg(feature = "server")]
pub mod audit;
pub mod backend;
pub mod client;
pub mod config;
pub mod error;
pub mod identity;
pub mod ids;
pub mod lock;
pub mod nodes;
pub mod registry;
pub mod rollout;
#[cfg(feature = "server")]
pub mod runtime;
#[cfg(feature = "server")]
pub mod tokens;
#[cfg(feature = "server")]
pub mod users;

pub use backend::Backend;
pub use client::{ClientOptions, CoordClient};
pub use error::CoordError;
#[cfg(feature = "server")]
pub use runtime::{Coord, CoordOptions};
