//! The etcd v3 gRPC server over a [`Store`]: KV, Watch, Lease, Cluster, Maintenance,
//! Auth, Lock and Election. Every call is checked against [`Auth`] first.

mod auth;
mod cluster;
mod concurrency;
mod conn;
mod kv;
mod lease;
mod maintenance;
pub mod spans;
mod watch;

use std::future::Future;

use meshwork_store::Store;
use tokio::net::TcpListener;
use tonic::{Request, Status};

pub use conn::{Guarded, ListenLimits, PeerInfo, limited_incoming, limited_incoming_tls};

use crate::auth::{Auth, Caller};
use crate::convert::Header;
use crate::proto::etcdserverpb::auth_server::AuthServer;
use crate::proto::etcdserverpb::{
    cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use crate::proto::v3electionpb::election_server::ElectionServer;
use crate::proto::v3lockpb::lock_server::LockServer;
use spans::SpanLayer;

/// Room gRPC framing may add beyond the request limit before the transport rejects a
/// message outright (etcd allows the same 512 KiB).
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// Who this server is, as reported in headers, `Status` and `MemberList`.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    /// Cluster ID in every response header.
    pub cluster_id: u64,
    /// Member ID in every response header.
    pub member_id: u64,
    /// Member name.
    pub name: String,
    /// URLs clients reach this member on.
    pub client_urls: Vec<String>,
    /// Version reported by `Status` (etcd protocol version we are compatible with).
    pub version: String,
}

impl ServerInfo {
    /// Info for a single member named `name`, serving `client_url`.
    pub fn single(name: &str, client_url: String) -> Self {
        // Stable IDs derived from the name: FNV-1a, as good as random for a single member.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        ServerInfo {
            cluster_id: h ^ 0x6d65_7368_776f_726b,
            member_id: h,
            name: name.to_string(),
            client_urls: vec![client_url],
            version: "3.5.0".to_string(),
        }
    }

    pub(crate) fn header(&self) -> Header {
        Header {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            raft_term: 2,
        }
    }
}

/// State shared by the services.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) store: Store,
    pub(crate) info: ServerInfo,
    pub(crate) header: Header,
    pub(crate) auth: Auth,
    /// Callers are this process's own code (the in-process endpoint).
    pub(crate) trusted: bool,
}

impl Ctx {
    /// Who sent `req`: its `token` (or `authorization`) metadata checked
    /// against the auth state.
    pub(crate) fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        if self.trusted {
            return Ok(Caller::Trusted);
        }
        let md = req.metadata();
        let token = match md.get("token").or_else(|| md.get("authorization")) {
            // No token: a verified client certificate names the user.
            None => {
                if let Some(cn) = req
                    .extensions()
                    .get::<PeerInfo>()
                    .and_then(|p| p.common_name.as_deref())
                {
                    return Ok(self.auth.caller_named(cn)?);
                }
                None
            }
            // A token that is not text is no token of ours.
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| Status::from(crate::auth::AuthError::InvalidAuthToken))?,
            ),
        };
        Ok(self.auth.caller(token)?)
    }
}

/// Serves the etcd v3 API on `listener` until `shutdown` resolves, then finishes
/// in-flight requests and returns. Connections are bounded by the default
/// [`ListenLimits`].
pub async fn serve(
    listener: TcpListener,
    store: Store,
    auth: Auth,
    info: ServerInfo,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    serve_limited(
        listener,
        store,
        auth,
        info,
        ListenLimits::default(),
        None,
        None,
        shutdown,
    )
    .await
}

/// [`serve`] with explicit connection limits: at most `max_connections` open
/// at once (more are closed on accept and counted), silent clients closed,
/// and an accept error (such as running out of file descriptors) waited out
/// rather than ending the server. With `tls`, clients speak TLS (and, when
/// it verifies client certificates, a client with no token is the user its
/// certificate's common name names, as etcd's `--client-cert-auth` does).
/// With `tracer`, a unary call that carries a sampled `traceparent` is a
/// server span ([`spans`]).
#[allow(clippy::too_many_arguments)]
pub async fn serve_limited(
    listener: TcpListener,
    store: Store,
    auth: Auth,
    info: ServerInfo,
    limits: ListenLimits,
    tls: Option<std::sync::Arc<meshwork_tls::TlsReloader>>,
    tracer: Option<meshwork_telemetry::export::Tracer>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let keepalive = (limits.idle_timeout / 3).max(std::time::Duration::from_millis(100));
    type Incoming = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = std::io::Result<Guarded>> + Send + 'static>,
    >;
    let incoming: Incoming = match tls {
        Some(tls) => Box::pin(conn::limited_incoming_tls(
            listener,
            limits.clone(),
            "etcd",
            tls,
        )),
        None => Box::pin(conn::incoming(
            listener,
            conn::Slots::new(limits.clone(), "etcd"),
        )),
    };
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(limits.max_concurrent_streams))
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(keepalive));
    services(server, SpanLayer::new(tracer), store, auth, info, false)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Serves the etcd v3 API to this process's own clients at `listener`'s
/// `inproc://` endpoint (see [`crate::inproc`]) until `shutdown` resolves.
/// No connection limits and no auth checks: only code in this process can
/// connect, and it is trusted.
pub async fn serve_in_process(
    listener: crate::inproc::Listener,
    store: Store,
    auth: Auth,
    info: ServerInfo,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    services(
        tonic::transport::Server::builder(),
        SpanLayer::default(),
        store,
        auth,
        info,
        true,
    )
    .serve_with_incoming_shutdown(listener.incoming(), shutdown)
    .await
}

/// Every etcd service over `store`, on `server`, under `spans`.
fn services(
    server: tonic::transport::Server,
    spans: SpanLayer,
    store: Store,
    auth: Auth,
    info: ServerInfo,
    trusted: bool,
) -> tonic::transport::server::Router<tower_layer::Stack<SpanLayer, tower_layer::Identity>> {
    let mut server = server.layer(spans);
    let max_msg = store.config().max_request_bytes + GRPC_OVERHEAD_BYTES;
    store.set_member_id(info.member_id);
    let ctx = Ctx {
        header: info.header(),
        store,
        info,
        auth,
        trusted,
    };
    server
        .add_service(KvServer::new(kv::KvService(ctx.clone())).max_decoding_message_size(max_msg))
        .add_service(
            WatchServer::new(watch::WatchService(ctx.clone())).max_decoding_message_size(max_msg),
        )
        .add_service(LeaseServer::new(lease::LeaseService(ctx.clone())))
        .add_service(ClusterServer::new(cluster::ClusterService(ctx.clone())))
        .add_service(MaintenanceServer::new(maintenance::MaintenanceService(
            ctx.clone(),
        )))
        .add_service(AuthServer::new(auth::AuthService(ctx.clone())))
        .add_service(LockServer::new(concurrency::LockService(ctx.clone())))
        .add_service(
            ElectionServer::new(concurrency::ElectionService(ctx))
                .max_decoding_message_size(max_msg),
        )
}
