//! The etcd v3 wire protocol for Meshwork: generated protos, a client, and (with
//! the default `server` feature) the gRPC server over `meshwork-store` and
//! snapshots in etcd's format. Clients build with `default-features = false`
//! and compile no database.
//!
//! Only this crate knows the wire format: the store has its own types and
//! [`convert`] maps between them.

#[cfg(feature = "server")]
pub mod auth;
pub mod client;
pub mod codec;
#[cfg(feature = "server")]
pub mod convert;
pub mod inproc;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod snapshot;

/// Generated etcd v3 protobuf messages and gRPC stubs, checked in under
/// `src/generated/` (tests/generated_code.rs keeps them equal to what protox
/// and tonic-prost-build make from `proto/`), so no build compiles protos.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod proto {
    /// Storage data model (`mvccpb`).
    pub mod mvccpb {
        include!("generated/mvccpb.rs");
    }
    /// Users, roles and permissions (`authpb`).
    pub mod authpb {
        include!("generated/authpb.rs");
    }
    /// The etcd v3 client API (`etcdserverpb`).
    pub mod etcdserverpb {
        include!("generated/etcdserverpb.rs");
    }
    /// The lock service (`v3lockpb`).
    pub mod v3lockpb {
        include!("generated/v3lockpb.rs");
    }
    /// The election service (`v3electionpb`).
    pub mod v3electionpb {
        include!("generated/v3electionpb.rs");
    }
}

pub use client::Client;
#[cfg(feature = "server")]
pub use server::{ListenLimits, ServerInfo, serve, serve_in_process, serve_limited};
