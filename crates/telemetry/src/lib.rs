//! Telemetry shared by every Meshwork component that handles requests: the
//! W3C trace context ([`TraceContext`]) the gateway starts or continues and
//! the SDK carries from an inbound request to the calls it makes, and the
//! span exporter ([`export::Tracer`]) that sends finished spans over OTLP or
//! into the node's trace store, and the ring of log lines written inside
//! traced spans ([`logs`]), and the exemplars that link latency
//! histograms to traces ([`exemplar`]).

pub mod exemplar;
pub mod export;
pub mod https;
pub mod logs;
pub mod metrics;
pub mod rpc;
mod trace;

pub use trace::{Root, Sampler, TraceContext, hex, sampler, sampler_from_env, set_sampler};
