//! Test support shared by Meshwork's crates; a dev-dependency only, never in
//! a shipped build: [`schema`] (the one OpenAPI schema checker),
//! [`eventually`] (poll until a condition holds, with a deadline) and
//! [`proxy`] (a TCP proxy a test can cut, to take a peer away).

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod proxy;
pub mod schema;

use std::future::Future;
use std::time::Duration;

/// Polls `f` every 20 ms until it returns `Some`, and returns the value;
/// fails the test naming `what` once `within` has passed. For conditions
/// reached by other tasks or processes; a deadline, never a guess of how
/// long they take.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
