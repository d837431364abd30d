//! Distributed transactions: saga, TCC and two-phase commit as one pure
//! state machine ([`machine::Txn`]: events in, actions out, no I/O), the
//! definition users write ([`spec::Spec`]), and (feature `server`, on by
//! default) what the node runs: the log of records in the store (`log`), the
//! runner that drives records through the machine with branch calls over
//! HTTP (`runner`), the `txn` role that creates transactions and takes over
//! those of dead coordinators (`role`), and its HTTP API (`api`).
//!
//! The runner's contract (the node's `txn` role):
//! 1. create the record ([`machine::Txn::new`]) and persist it before
//!    answering the initiator, then step it with [`machine::Event::Resume`];
//! 2. after every [`machine::Txn::step`], persist the record (compare-and-swap
//!    on its revision) *before* running the returned actions — so the commit
//!    or abort decision is durable before any phase-two call;
//! 3. send each [`machine::Action::Call`] with the headers below and the
//!    call's idempotency key ([`machine::Txn::idempotency_key`], the same for
//!    every attempt), classify the answer into an [`machine::Outcome`] and
//!    step the record with it;
//! 4. a coordinator that takes a transaction over (its owner's session is
//!    gone) steps it with `Resume`: calls that were in flight are sent again
//!    with the same key, so a participant applies each at most once.

#[cfg(feature = "server")]
pub mod api;
pub mod failpoint;
#[cfg(feature = "server")]
pub mod log;
pub mod machine;
#[cfg(feature = "server")]
pub mod role;
#[cfg(feature = "server")]
pub mod runner;
pub mod spec;

/// This crate's OpenAPI fragment (`/v1/txn/`), merged into the node's
/// document by `meshwork_api::openapi::merge`.
pub const OPENAPI: &str = include_str!("../openapi.json");

pub use machine::{Action, Event, Millis, Outcome, Phase, Status, StepError, Txn};
pub use spec::{Mode, Recovery, Spec, SpecError};

/// Header carrying the global transaction id on every branch call.
pub const HEADER_TXN: &str = "x-meshwork-txn";
/// Header carrying the branch name.
pub const HEADER_BRANCH: &str = "x-meshwork-branch";
/// Header carrying the phase (`action`, `confirm`, `undo`).
pub const HEADER_PHASE: &str = "x-meshwork-phase";
/// Header carrying the idempotency key (the IETF draft's name).
pub const HEADER_IDEMPOTENCY_KEY: &str = "idempotency-key";

/// A transaction id (or any text) as one URL path segment: unreserved bytes
/// as they are, every other byte percent-encoded.
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
