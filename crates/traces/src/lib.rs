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

/// Serves OTLP/gRPC on `listener` until `shutdown` resolves (no connection
/// limits: the node serves [`serve_grpc_incoming`] with its listener's).
pub async fn serve_grpc(
    listener: tokio::net::TcpListener,
    store: TraceStore,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_grpc_incoming(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        store,
        GrpcLimits::default(),
        shutdown,
    )
    .await
}

/// Per-connection limits of the OTLP/gRPC server.
#[derive(Clone, Copy, Debug)]
pub struct GrpcLimits {
    /// Concurrent exports (HTTP/2 streams) per connection.
    pub max_concurrent_streams: u32,
    /// The server pings a quiet connection this often, and closes it when a
    /// ping goes unanswered this long.
    pub keepalive: std::time::Duration,
}

impl Default for GrpcLimits {
    fn default() -> Self {
        GrpcLimits {
            max_concurrent_streams: 1024,
            keepalive: std::time::Duration::from_secs(30),
        }
    }
}

/// Serves OTLP/gRPC on the connections `incoming` admits (the node passes
/// its connection-limited, deadline-guarded ones) until `shutdown` resolves.
pub async fn serve_grpc_incoming<I, IO, IE>(
    incoming: I,
    store: TraceStore,
    limits: GrpcLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error>
where
    I: tokio_stream::Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(limits.max_concurrent_streams))
        .http2_keepalive_interval(Some(limits.keepalive))
        .http2_keepalive_timeout(Some(limits.keepalive))
        .add_service(otlp::grpc_service(store))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
