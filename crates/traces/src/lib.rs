//! Meshwork's built-in trace store (role `traces`): OTLP receivers over gRPC
//! and HTTP ([`otlp`]), an append-only span store bounded by bytes and age
//! with in-memory indexes ([`TraceStore`]), and the `/v1/traces` query API
//! ([`api`]) the console's Traces page reads.

pub mod api;
mod index;
mod model;
pub mod otlp;
mod sampling;
mod store;

pub use index::{Edge, MAX_SORTED_CANDIDATES, Query, TraceSummary};
pub use model::{MAX_NAME_BYTES, StoredSpan, UNKNOWN_SERVICE};
pub use sampling::TailSampling;
pub use store::{Ingested, TraceError, TraceStats, TraceStore, TracesConfig};

/// The OpenAPI fragment of the query API.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Serves OTLP/gRPC on `listener` until `shutdown` resolves.
pub async fn serve_grpc(
    listener: tokio::net::TcpListener,
    store: TraceStore,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(otlp::grpc_service(store))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
}
