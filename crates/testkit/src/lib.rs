//! Test support shared by Meshwork's crates; a dev-dependency only, never in
//! a shipped build:
//! - [`eventually`] and [`until`] (poll until a condition holds, with a
//!   deadline), and their [`blocking`] twins for synchronous tests;
//! - [`http`]: raw HTTP/1.1 over a socket, for what a well-behaved client
//!   library would never send;
//! - [`upstream`]: real upstream servers that echo, fail on cue and record
//!   what they received;
//! - [`proxy`]: a TCP proxy a test can cut, to take a peer away;
//! - [`schema`]: the one OpenAPI schema checker;
//! - [`peer`]: finding the real peers (etcd, etcdctl, chromium), skipping or
//!   failing under `MESHWORK_REQUIRE_PEERS=1`;
//! - `codegen` (feature `codegen`): checked-in gRPC code kept equal to its protos;
//! - `etcd_cluster` (feature `etcd`): a real etcd cluster of child processes;
//! - `nats_server` (feature `etcd`): a real NATS JetStream server, a child process;
//! - `store` (feature `store`): Meshwork's store served as an etcd endpoint
//!   in the test's process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod blocking;
#[cfg(feature = "codegen")]
pub mod codegen;
#[cfg(feature = "etcd")]
pub mod etcd_cluster;
pub mod http;
#[cfg(feature = "etcd")]
pub mod nats_server;
pub mod peer;
pub mod proxy;
pub mod schema;
#[cfg(feature = "store")]
pub mod store;
pub mod upstream;

use std::time::Duration;

/// How often the `eventually` family polls.
pub const POLL_EVERY: Duration = Duration::from_millis(10);

/// Polls `f` every [`POLL_EVERY`] until it returns `Some`, and returns the
/// value; fails the test naming `what` once `within` has passed. For
/// conditions reached by other tasks or processes; a deadline, never a guess
/// of how long they take.
pub async fn eventually<T>(
    what: &str,
    within: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// [`eventually`] for a condition without a value: polls until `f` is true.
pub async fn until(what: &str, within: Duration, mut f: impl AsyncFnMut() -> bool) {
    eventually(what, within, async || f().await.then_some(())).await
}
