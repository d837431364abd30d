//! The etcd v3 wire protocol for Meshwork: generated protos, the gRPC server over
//! `meshwork-store`, and a client.
//!
//! Only this crate knows the wire format: the store has its own types and
//! [`convert`] maps between them.

pub mod client;
pub mod codec;
pub mod convert;
pub mod server;
pub mod snapshot;
#[cfg(feature = "testing")]
pub mod testing;

/// Generated etcd v3 protobuf messages and gRPC stubs.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod proto {
    /// Storage data model (`mvccpb`).
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    /// The etcd v3 client API (`etcdserverpb`).
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    /// The lock service (`v3lockpb`).
    pub mod v3lockpb {
        tonic::include_proto!("v3lockpb");
    }
    /// The election service (`v3electionpb`).
    pub mod v3electionpb {
        tonic::include_proto!("v3electionpb");
    }
}

pub use client::Client;
pub use server::{ListenLimits, ServerInfo, serve, serve_limited};
