//! The load-generator kit every `meshwork bench` and `meshwork demo load`
//! is built from, so each measures the same way:
//!
//! - [`http`]: keep-alive HTTP/1.1 connections that reconnect when broken,
//!   with a per-call timeout;
//! - [`latency`]: a microsecond histogram with percentiles as a line of text
//!   or as JSON;
//! - [`procs`]: CPU (with the kernel's real clock tick) and memory of named
//!   processes per phase, from `/proc`;
//! - [`progress`]: a once-a-second progress line, only on a terminal;
//! - [`Errors`]: counts failures and prints the first few.

pub mod http;
pub mod latency;
pub mod procs;
pub mod progress;

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a load-generator call failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The TCP connection could not be opened.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// `HOST:PORT`.
        addr: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("{what}: {source}")]
    Http {
        /// The request (`GET /path`) or step.
        what: String,
        /// hyper's error.
        source: hyper::Error,
    },
    /// No answer in time.
    #[error("{what}: no answer within {ms} ms")]
    Timeout {
        /// The request.
        what: String,
        /// The timeout.
        ms: u128,
    },
    /// An answer that is not what the caller expected.
    #[error("{what}: HTTP {status}: {body}")]
    Unexpected {
        /// What was being done.
        what: String,
        /// The status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// A bad argument (a request that cannot be built, a `--pids` entry).
    #[error("{0}")]
    Invalid(String),
}

/// Counts errors and prints the first five, so a failing run explains itself.
#[derive(Debug, Default)]
pub struct Errors {
    n: AtomicU64,
}

impl Errors {
    /// Counts one error; prints it (alternate form: with its causes) if it is
    /// among the first five.
    pub fn add(&self, what: &str, e: &dyn std::fmt::Display) {
        if self.n.fetch_add(1, Ordering::Relaxed) < 5 {
            eprintln!("\n{what}: {e:#}");
        }
    }

    /// Errors counted so far.
    pub fn get(&self) -> u64 {
        self.n.load(Ordering::Relaxed)
    }
}
