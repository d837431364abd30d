//! HTTP/1.1 messages parsed in place: the first layer of the gateway's own
//! HTTP/1 engine (issue 20; `bench/gateway/ANALYSIS.md` has the plan).
//!
//! * [`head`] parses a request head into byte ranges of the read buffer
//!   (no header map) and applies every RFC 9112 framing and Host rule, so
//!   an ambiguous request is refused by construction, not by a check added
//!   beside a parser that accepts it.
//! * [`chunked`] follows a chunked body strictly, handing back which bytes
//!   are framing and which are data, so a proxy can copy it verbatim.
//! * [`body`] copies a body between two connections by its framing through
//!   the reader's buffer, the head and the first body bytes in one write,
//!   and says which side failed.
//! * [`server`] serves a connection: heads parsed in place, requests handed
//!   to a [`server::Handler`] in order, and the hostile cases (refused
//!   heads, slow heads, idle connections, stalled or cut bodies) settled
//!   once for every handler.
//!
//! The gateway's framing tracker takes its framing rules from [`head`], and
//! its route matchers read [`head::RequestView`] as they read hyper's header
//! map; the gateway's accept loop does not use [`server`] yet (the floor
//! benchmark does).

pub mod body;
pub mod chunked;
pub mod head;
pub mod server;
