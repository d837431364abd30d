//! Telemetry shared by every Meshwork component that handles requests: the
//! W3C trace context ([`TraceContext`]) the gateway starts or continues and
//! the SDK carries from an inbound request to the calls it makes.

mod trace;

pub use trace::{TraceContext, hex};
