//! Serving the node's HTTP port (API, console, health, metrics) with every
//! limit a hostile or broken client could otherwise turn into an outage: a
//! bounded number of connections (one more is accepted, closed and counted),
//! a deadline on reading a request head, on each wait for request-body bytes,
//! and on a connection with no request in flight; a bounded request body; and
//! accept errors (out of descriptors) waited out instead of ending the server.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;
use tower::ServiceExt;

/// The `[listen]` table: limits of the HTTP port and the etcd port.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ListenConfig {
    /// Most connections open at once on the HTTP port.
    pub(crate) http_max_connections: usize,
    /// Most connections open at once on the etcd port.
    pub(crate) etcd_max_connections: usize,
    /// Most concurrent gRPC calls (HTTP/2 streams) per etcd connection.
    pub(crate) etcd_max_concurrent_streams: u32,
    /// Time a client has to send a whole request head (HTTP), or its first
    /// bytes after connecting (etcd).
    pub(crate) header_read_timeout_ms: u64,
    /// Longest wait for the next bytes of a request body.
    pub(crate) body_read_timeout_ms: u64,
    /// A connection with no request in flight (HTTP), or a silent one (etcd,
    /// where the server pings and a live client answers), is closed after this.
    pub(crate) idle_timeout_ms: u64,
    /// Largest request body the HTTP port reads.
    pub(crate) max_body_bytes: usize,
    /// On shutdown, how long requests in flight have to finish.
    pub(crate) shutdown_grace_ms: u64,
    /// Host names (besides loopback names and IP addresses) the HTTP port
    /// answers to, and whose pages may write through it; `"*"` allows any.
    pub(crate) allowed_hosts: Vec<String>,
    /// A data-ingest port (OTLP/HTTP), not the API: any Host is answered and
    /// bodies are not required to be JSON (the handler checks its own media
    /// types). Set by the node, never by the file.
    #[serde(skip)]
    pub(crate) ingest: bool,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            http_max_connections: 4096,
            etcd_max_connections: 4096,
            etcd_max_concurrent_streams: 1024,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            idle_timeout_ms: 90_000,
            max_body_bytes: 2 * 1024 * 1024,
            shutdown_grace_ms: 10_000,
            allowed_hosts: Vec::new(),
            ingest: false,
        }
    }
}

impl ListenConfig {
    /// Refuses values that cannot work.
    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        if self.http_max_connections == 0 || self.etcd_max_connections == 0 {
            anyhow::bail!(
                "[listen] http_max_connections and etcd_max_connections must be at least 1"
            );
        }
        if self.etcd_max_concurrent_streams == 0 {
            anyhow::bail!("[listen] etcd_max_concurrent_streams must be at least 1");
        }
        for (name, v) in [
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
        ] {
            if !(100..=3_600_000).contains(&v) {
                anyhow::bail!("[listen] {name} = {v} is out of range 100..=3600000 (ms)");
            }
        }
        if self.max_body_bytes == 0 {
            anyhow::bail!("[listen] max_body_bytes must be at least 1");
        }
        Ok(())
    }

    /// The etcd port's limits.
    pub(crate) fn etcd(&self) -> meshwork_etcd::ListenLimits {
        meshwork_etcd::ListenLimits {
            max_connections: self.etcd_max_connections,
            max_concurrent_streams: self.etcd_max_concurrent_streams,
            handshake_timeout: Duration::from_millis(self.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
        }
    }
}

/// Open connections; shutdown waits for none.
#[derive(Default)]
struct Open {
    count: AtomicUsize,
    drained: Notify,
}

/// A connection's slot: given back, and the gauge lowered, on drop.
struct ConnGuard {
    open: Arc<Open>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        metrics::gauge!("meshwork_listener_connections", "listener" => "http").decrement(1.0);
        if self.open.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.open.drained.notify_waiters();
        }
    }
}

/// Requests in flight on one connection and when the last one ended.
struct Activity {
    active: AtomicUsize,
    since: Mutex<Instant>,
}

/// Lowers the in-flight count even when the request's future is dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.since.lock() = Instant::now();
        }
    }
}

/// Serves `app` on `listener` under `cfg`'s limits until `shutdown`
/// resolves; then stops accepting, lets requests in flight finish (for up to
/// `shutdown_grace_ms`) and returns.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    cfg: ListenConfig,
    tls: Option<Arc<meshwork_tls::TlsReloader>>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let cfg = Arc::new(cfg);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(cfg.header_read_timeout_ms));
    let ping = Duration::from_millis(cfg.idle_timeout_ms / 3).max(Duration::from_millis(100));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(ping)
        .keep_alive_timeout(ping);
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(cfg.http_max_connections));
    let open = Arc::new(Open::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: the connections we
                    // have keep being served; try again in a moment.
                    metrics::counter!("meshwork_listener_accept_errors_total", "listener" => "http")
                        .increment(1);
                    tracing::warn!(error = %e, "HTTP port: accept failed; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("meshwork_listener_refused_connections_total", "listener" => "http")
                .increment(1);
            tracing::debug!(%peer, limit = cfg.http_max_connections, "HTTP port: connection limit reached, closing a new connection");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        metrics::gauge!("meshwork_listener_connections", "listener" => "http").increment(1.0);
        open.count.fetch_add(1, Ordering::AcqRel);
        let guard = ConnGuard {
            open: open.clone(),
            _slot: slot,
        };
        let (app, cfg2, builder, stop) =
            (app.clone(), cfg.clone(), builder.clone(), stop_rx.clone());
        let tls = tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            let _guard = guard;
            match tls {
                None => serve_conn(stream, peer, app, cfg2, builder, stop).await,
                // The handshake in the connection's own task, within the
                // header deadline: a slow client delays nobody else.
                Some(acceptor) => {
                    let limit = Duration::from_millis(cfg2.header_read_timeout_ms);
                    match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => serve_conn(tls, peer, app, cfg2, builder, stop).await,
                        Ok(Err(e)) => {
                            metrics::counter!("meshwork_listener_tls_failures_total", "listener" => "http")
                                .increment(1);
                            tracing::debug!(%peer, error = %e, "HTTP port: TLS handshake failed");
                        }
                        Err(_) => {
                            metrics::counter!("meshwork_listener_timeouts_total", "listener" => "http")
                                .increment(1);
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = async {
        loop {
            let n = open.drained.notified();
            if open.count.load(Ordering::Acquire) == 0 {
                return;
            }
            n.await;
        }
    };
    let grace = Duration::from_millis(cfg.shutdown_grace_ms);
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            open = open.count.load(Ordering::Acquire),
            "HTTP port: shutdown grace period over; closing connections"
        );
    }
    Ok(())
}

async fn serve_conn(
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    peer: SocketAddr,
    app: Router,
    cfg: Arc<ListenConfig>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    mut stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity {
        active: AtomicUsize::new(0),
        since: Mutex::new(Instant::now()),
    });
    let svc = {
        let activity = activity.clone();
        let cfg = cfg.clone();
        service_fn(move |req: Request<Incoming>| {
            activity.active.fetch_add(1, Ordering::AcqRel);
            let in_flight = InFlight(activity.clone());
            let app = app.clone();
            let cfg = cfg.clone();
            async move {
                let resp = handle(req, peer, app, &cfg).await;
                drop(in_flight);
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    let mut conn = std::pin::pin!(conn);
    let idle = Duration::from_millis(cfg.idle_timeout_ms);
    let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(25)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = *stop.borrow();
    if closing {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            _ = stop.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tick.tick(), if !closing => {
                let quiet = activity.active.load(Ordering::Acquire) == 0
                    && activity.since.lock().elapsed() >= idle;
                if quiet {
                    metrics::counter!("meshwork_listener_timeouts_total", "listener" => "http")
                        .increment(1);
                    tracing::debug!(%peer, "closing an idle HTTP connection");
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Reads the request body under the size and time limits, then hands the
/// request, with the caller's address, to the router.
async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    app: Router,
    cfg: &ListenConfig,
) -> Response<Body> {
    let grpc = meshwork_api::is_grpc(req.headers());
    if let Err(refusal) = check_request(&req, cfg) {
        return refusal.response(cfg, grpc);
    }
    let (mut parts, body) = req.into_parts();
    parts.extensions.insert(ConnectInfo(peer));
    if is_grpc_stream(&parts) {
        // A gRPC call over HTTP/2 streams its body (a Consume stream lives as long
        // as its consumer): the service bounds each message, not the whole body.
        let req = Request::from_parts(parts, Body::new(body));
        return match app.oneshot(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        };
    }
    let body = match read_body(body, cfg).await {
        Ok(b) => b,
        Err(refusal) => return refusal.response(cfg, grpc),
    };
    let req = Request::from_parts(parts, Body::from(body));
    match app.oneshot(req).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    }
}

/// The gRPC methods whose request is a long-lived stream; every other request,
/// a unary gRPC call included, is read whole under the body limits first.
const GRPC_STREAMS: [&str; 1] = ["/meshwork.mq.v1.Broker/Consume"];

/// An HTTP/2 request to a streaming gRPC method (`content-type: application/grpc...`).
fn is_grpc_stream(parts: &axum::http::request::Parts) -> bool {
    parts.version == axum::http::Version::HTTP_2
        && GRPC_STREAMS.contains(&parts.uri.path())
        && parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("application/grpc"))
}

/// Why a request was not served.
enum Refusal {
    TooLarge,
    Timeout,
    /// The client broke the body off (nobody is left to answer).
    Broken,
    /// A Host that is not ours (DNS rebinding).
    Host(String),
    /// More than one Host header (RFC 9112 §3.2).
    TwoHosts,
    /// A write from another site's page.
    Origin(String),
    /// A write whose body is not declared JSON.
    MediaType,
}

impl Refusal {
    /// The refusal as JSON, or as a gRPC status for a gRPC call (`grpc`).
    fn response(self, cfg: &ListenConfig, grpc: bool) -> Response<Body> {
        let (status, code, message) = match self {
            Refusal::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "request body is larger than the limit of {} bytes ([listen] max_body_bytes)",
                    cfg.max_body_bytes
                ),
            ),
            Refusal::Timeout => {
                metrics::counter!("meshwork_listener_timeouts_total", "listener" => "http")
                    .increment(1);
                (
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!(
                        "no request body bytes for {} ms ([listen] body_read_timeout_ms)",
                        cfg.body_read_timeout_ms
                    ),
                )
            }
            Refusal::Broken => (
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                "the request body could not be read".to_string(),
            ),
            Refusal::Host(host) => (
                StatusCode::MISDIRECTED_REQUEST,
                "unknown_host",
                format!(
                    "this node does not answer to host {host:?}; use an IP address or localhost, or add the name to [listen] allowed_hosts"
                ),
            ),
            Refusal::TwoHosts => (
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                "a request carries exactly one Host header".to_string(),
            ),
            Refusal::Origin(origin) => (
                StatusCode::FORBIDDEN,
                "cross_origin",
                format!(
                    "writes from pages of {origin:?} are refused; only the node's own pages (or [listen] allowed_hosts) may write"
                ),
            ),
            Refusal::MediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "a write to the API needs Content-Type: application/json".to_string(),
            ),
        };
        let error = meshwork_api::ApiError::new(status, code, message);
        let mut resp = if grpc {
            error.grpc_response()
        } else {
            let mut r = Response::new(Body::from(error.to_json()));
            *r.status_mut() = status;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        };
        // The rest of the body is not read: the connection cannot carry
        // another request.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        resp
    }
}

/// The host part of an authority (`host`, `host:port`, `[v6]:port`),
/// lower-cased.
fn host_of(authority: &str) -> String {
    let a = authority.trim();
    let host = if let Some(rest) = a.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        a.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(a, |(h, _)| h)
    };
    host.to_ascii_lowercase()
}

/// Loopback names, IP addresses (no DNS name to rebind) and configured names.
fn host_allowed(host: &str, cfg: &ListenConfig) -> bool {
    host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<std::net::IpAddr>().is_ok()
        || cfg
            .allowed_hosts
            .iter()
            .any(|h| h == "*" || h.eq_ignore_ascii_case(host))
}

/// Refuses, before the body is read: a Host that is not ours (all paths but
/// the health probes, which load balancers send with any Host), a write
/// from another site's page (its `Origin` is neither this Host nor an
/// allowed one), and an API write whose body is not declared JSON (what an
/// HTML form can send without asking).
fn check_request(req: &Request<Incoming>, cfg: &ListenConfig) -> Result<(), Refusal> {
    let path = req.uri().path();
    if path == "/healthz" || path == "/readyz" {
        return Ok(());
    }
    if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
        return Err(Refusal::TwoHosts);
    }
    if cfg.ingest {
        return Ok(());
    }
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        });
    if let Some(authority) = &authority {
        let host = host_of(authority);
        if !host_allowed(&host, cfg) {
            return Err(Refusal::Host(host));
        }
    }
    let method = req.method();
    let write = !(method == axum::http::Method::GET
        || method == axum::http::Method::HEAD
        || method == axum::http::Method::OPTIONS);
    if !write {
        return Ok(());
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("null");
        let origin_authority = origin
            .split_once("://")
            .map(|(_, rest)| rest.trim_end_matches('/'))
            .unwrap_or("");
        let same_site = authority.as_deref().is_some_and(|a| {
            !origin_authority.is_empty() && a.eq_ignore_ascii_case(origin_authority)
        });
        let allowed = !origin_authority.is_empty()
            && cfg
                .allowed_hosts
                .iter()
                .any(|h| h == "*" || h.eq_ignore_ascii_case(&host_of(origin_authority)));
        if !(same_site || allowed) {
            return Err(Refusal::Origin(origin.to_string()));
        }
    }
    if path.starts_with("/v1/") || path.starts_with("/gateway/") {
        let json = match req.headers().get(header::CONTENT_TYPE) {
            None => req.body().is_end_stream(),
            Some(v) => {
                let t = v.to_str().unwrap_or("");
                let essence = t
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                essence == "application/json" || essence.ends_with("+json")
            }
        };
        if !json {
            return Err(Refusal::MediaType);
        }
    }
    Ok(())
}

async fn read_body(mut body: Incoming, cfg: &ListenConfig) -> Result<Bytes, Refusal> {
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    let declared = body.size_hint().lower();
    if declared > cfg.max_body_bytes as u64 {
        return Err(Refusal::TooLarge);
    }
    let wait = Duration::from_millis(cfg.body_read_timeout_ms);
    let mut buf = BytesMut::with_capacity(usize::try_from(declared).unwrap_or(0));
    loop {
        let frame = match tokio::time::timeout(wait, body.frame()).await {
            Err(_) => return Err(Refusal::Timeout),
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(_))) => return Err(Refusal::Broken),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > cfg.max_body_bytes {
                return Err(Refusal::TooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
}

/// Descriptors kept for everything but client connections: the store's
/// files, outgoing connections, the gateway's upstreams, child processes.
const RESERVED_FDS: u64 = 512;

impl ListenConfig {
    /// Lowers the connection limits so that every port full — HTTP, etcd, and the
    /// cache's `max_clients` when that role runs — still leaves [`RESERVED_FDS`]
    /// descriptors under the process's `nofile` limit: a connection flood is refused
    /// at the port instead of starving the store of descriptors.
    pub(crate) fn fit_to(&mut self, nofile: u64, cache_clients: Option<&mut usize>) {
        let cache = cache_clients.as_deref().copied().unwrap_or(0);
        let ports = if cache_clients.is_some() { 3 } else { 2 };
        let wanted = (self.http_max_connections + self.etcd_max_connections + cache) as u64;
        let room = nofile.saturating_sub(RESERVED_FDS).max(ports);
        if wanted <= room {
            return;
        }
        let each = usize::try_from(room / ports).unwrap_or(usize::MAX).max(1);
        tracing::warn!(
            nofile,
            http_max_connections = self.http_max_connections.min(each),
            etcd_max_connections = self.etcd_max_connections.min(each),
            cache_max_clients = cache.min(each),
            "the open-files limit is too low for the configured connection limits; lowering them (raise `ulimit -n` to keep them)"
        );
        self.http_max_connections = self.http_max_connections.min(each);
        self.etcd_max_connections = self.etcd_max_connections.min(each);
        if let Some(c) = cache_clients {
            *c = (*c).min(each);
        }
    }
}

/// Raises the soft open-files limit to the hard one (as the Go runtime does
/// for etcd) and returns the limit now in force.
#[cfg(unix)]
#[allow(unsafe_code)]
#[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every unix
pub(crate) fn raise_nofile_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    let (soft_before, now, hard) = (before as u64, lim.rlim_cur as u64, lim.rlim_max as u64);
    tracing::info!(soft_before, soft = now, hard, "open-files limit");
    Some(now)
}

/// Other platforms: the limit is left as it is.
#[cfg(not(unix))]
pub(crate) fn raise_nofile_limit() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limits_fit_under_the_open_files_limit() {
        let mut c = ListenConfig::default();
        c.fit_to(1_048_576, None);
        assert_eq!(c.http_max_connections, 4096);
        c.fit_to(1024, None);
        assert_eq!(c.http_max_connections, 256);
        assert_eq!(c.etcd_max_connections, 256);
        // With the cache role, its clients share the room too.
        let mut c = ListenConfig::default();
        let mut cache = 10_000;
        c.fit_to(1024, Some(&mut cache));
        assert_eq!(
            (c.http_max_connections, c.etcd_max_connections, cache),
            (170, 170, 170)
        );
        let bad = ListenConfig {
            idle_timeout_ms: 0,
            ..ListenConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("idle_timeout_ms")
        );
    }

    #[test]
    fn hosts_are_loopback_names_ip_addresses_or_configured() {
        assert_eq!(host_of("Example.COM:8080"), "example.com");
        assert_eq!(host_of("[::1]:7070"), "::1");
        assert_eq!(host_of("127.0.0.1"), "127.0.0.1");
        let mut cfg = ListenConfig::default();
        for ok in ["localhost", "app.localhost", "127.0.0.1", "::1", "10.1.2.3"] {
            assert!(host_allowed(ok, &cfg), "{ok}");
        }
        assert!(!host_allowed("attacker.example", &cfg));
        cfg.allowed_hosts = vec!["Meshwork.Internal".into()];
        assert!(host_allowed("meshwork.internal", &cfg));
    }
}
