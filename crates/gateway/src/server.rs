//! Accepting client connections: HTTP/1.1 and h2c on one port (hyper-util's
//! auto builder), TLS with ALPN, header read timeout, idle timeout,
//! connection limit, graceful shutdown, and the raw-byte framing check of
//! HTTP/1 requests ([`crate::framing`]).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::framing::{FramingTracker, FramingVerdict};
use crate::gateway::{Clients, Gateway, Shared};
use crate::proxy::{self, ConnInfo};

/// I/O and request activity of one connection, for the idle timeout.
#[derive(Debug, Default)]
struct Activity {
    io_ops: AtomicU64,
    active_requests: AtomicUsize,
    /// HTTP/1 requests handed over so far.
    h1_requests: AtomicU64,
}

pin_project_lite::pin_project! {
    /// Counts reads and writes so an idle connection can be told apart,
    /// and shows every byte read to the framing tracker.
    struct ActivityIo<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
        framing: FramingTracker,
    }
}

impl<T: AsyncRead> AsyncRead for ActivityIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if r.is_ready() {
            this.activity.io_ops.fetch_add(1, Ordering::Relaxed);
            if let Some(new) = buf.filled().get(before..) {
                this.framing.feed(new);
            }
        }
        r
    }
}

impl<T: AsyncWrite> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        if r.is_ready() {
            this.activity.io_ops.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if r.is_ready() {
            this.activity.io_ops.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Decrements the request count even if the handler is dropped.
struct RequestGuard(Arc<Activity>);
impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.active_requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts open connections; shutdown waits for zero.
#[derive(Default)]
struct Tracker {
    open: AtomicUsize,
    drained: Notify,
}

struct ConnGuard {
    tracker: Arc<Tracker>,
    shared: Arc<Shared>,
}
impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shared
            .stats
            .active_connections
            .fetch_sub(1, Ordering::Relaxed);
        self.shared.m_active_connections.decrement(1.0);
        if self.tracker.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.tracker.drained.notify_waiters();
        }
    }
}

/// hyper's default for the most headers in an HTTP/1 request head.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

fn builder(sh: &Shared) -> auto::Builder<TokioExecutor> {
    let cfg = &sh.cfg;
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(cfg.header_read_timeout_ms))
        .max_buf_size((cfg.max_header_bytes + 8192).max(8192))
        .keep_alive(true);
    // hyper's own limit is 100; setting it (even to 100) makes hyper
    // initialise a header array of that size for every request.
    if cfg.max_headers != HYPER_DEFAULT_MAX_HEADERS {
        b.http1().max_headers(cfg.max_headers);
    }
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX));
    b
}

/// Serves plain-text HTTP/1.1 and h2c on `listener` until `shutdown`
/// resolves, then stops accepting, lets connections finish their requests
/// (up to `shutdown_grace_ms`) and returns.
pub async fn serve(
    listener: TcpListener,
    gateway: Gateway,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, tls = false, "gateway listening");
    serve_inner(listener, gateway, None, shutdown).await
}

/// As [`serve`], over TLS (ALPN `h2` and `http/1.1`); build `acceptor`
/// with [`TlsReloader`](crate::TlsReloader).
pub async fn serve_tls(
    listener: TcpListener,
    gateway: Gateway,
    acceptor: TlsAcceptor,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, tls = true, "gateway listening");
    serve_inner(listener, gateway, Some(acceptor), shutdown).await
}

async fn serve_inner(
    listener: TcpListener,
    gateway: Gateway,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let sh = gateway.shared.clone();
    let builder = Arc::new(builder(&sh));
    let clients = Arc::new(Clients::new(&sh.cfg));
    let slots = Arc::new(Semaphore::new(sh.cfg.max_connections));
    let tracker = Arc::new(Tracker::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let local = listener.local_addr()?;
    // One line per accept loop; `serve`, `serve_tls` and `spawn_workers`
    // (several loops on one address) say "gateway listening" once, at info.
    tracing::debug!(addr = %local, tls = tls.is_some(), "gateway accept loop started");
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and similar: back off briefly, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        sh.stats.active_connections.fetch_add(1, Ordering::Relaxed);
        sh.stats.connections_total.fetch_add(1, Ordering::Relaxed);
        sh.m_active_connections.increment(1.0);
        tracker.open.fetch_add(1, Ordering::AcqRel);
        let guard = ConnGuard {
            tracker: tracker.clone(),
            shared: sh.clone(),
        };
        let sh = sh.clone();
        let builder = builder.clone();
        let stop = stop_rx.clone();
        let tls = tls.clone();
        let clients = clients.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let _permit = permit;
            let info = ConnInfo {
                peer,
                tls: tls.is_some(),
                clients,
            };
            match tls {
                None => serve_conn(stream, sh, builder, info, stop).await,
                Some(acc) => {
                    let limit = Duration::from_millis(sh.cfg.header_read_timeout_ms);
                    match tokio::time::timeout(limit, acc.accept(stream)).await {
                        Ok(Ok(s)) => serve_conn(s, sh, builder, info, stop).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let grace = Duration::from_millis(sh.cfg.shutdown_grace_ms);
    let drained = async {
        loop {
            let n = tracker.drained.notified();
            if tracker.open.load(Ordering::Acquire) == 0 {
                return;
            }
            n.await;
        }
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            open = tracker.open.load(Ordering::Acquire),
            "shutdown grace period over; closing connections"
        );
    }
    Ok(())
}

async fn serve_conn<T>(
    io: T,
    sh: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    info: ConnInfo,
    mut stop: watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = info.peer;
    let activity = Arc::new(Activity::default());
    let verdict = Arc::new(FramingVerdict::default());
    let io = TokioIo::new(ActivityIo {
        inner: io,
        activity: activity.clone(),
        framing: FramingTracker::new(
            sh.cfg.max_header_bytes + 8192,
            sh.cfg.max_headers,
            verdict.clone(),
        ),
    });
    let svc = {
        let activity = activity.clone();
        let sh = sh.clone();
        service_fn(move |req: http::Request<hyper::body::Incoming>| {
            activity.active_requests.fetch_add(1, Ordering::Relaxed);
            let guard = RequestGuard(activity.clone());
            let sh = sh.clone();
            let info = info.clone();
            // HTTP/1 requests are numbered as the tracker numbers their
            // heads (hyper hands them over in order).
            let fault = if req.version() == http::Version::HTTP_2 {
                None
            } else {
                let index = activity.h1_requests.fetch_add(1, Ordering::Relaxed);
                verdict.fault(index)
            };
            async move {
                // Boxed: hyper moves the service's future into place for
                // every request, and the request path's future is ~8 KiB; a
                // box makes that move a few hundred bytes whatever the
                // optimiser does (measured: 8k instructions of memcpy per
                // request otherwise).
                let resp = Box::pin(proxy::handle(sh, req, info, fault)).await;
                drop(guard);
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let conn = builder.serve_connection_with_upgrades(io, svc);
    let mut conn = std::pin::pin!(conn);
    let idle = Duration::from_millis(sh.cfg.idle_timeout_ms);
    let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last_ops = u64::MAX;
    let mut quiet_ticks = 0u32;
    let mut closing = *stop.borrow();
    if closing {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                break;
            }
            _ = stop.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tick.tick(), if !closing => {
                let ops = activity.io_ops.load(Ordering::Relaxed);
                if ops == last_ops && activity.active_requests.load(Ordering::Relaxed) == 0 {
                    quiet_ticks += 1;
                    if quiet_ticks >= 4 {
                        tracing::debug!("closing idle connection");
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                } else {
                    quiet_ticks = 0;
                    last_ops = ops;
                }
            }
        }
    }
}

/// Listener threads started by [`spawn_workers`].
#[derive(Debug)]
pub struct Workers {
    addr: std::net::SocketAddr,
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<io::Result<()>>>,
}

impl Workers {
    /// The address every worker listens on.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Stops accepting, drains connections (up to `shutdown_grace_ms`)
    /// and joins the threads.
    pub fn shutdown(self) -> io::Result<()> {
        let _ = self.stop.send(true);
        for t in self.threads {
            match t.join() {
                Ok(r) => r?,
                Err(_) => return Err(io::Error::other("a gateway worker thread panicked")),
            }
        }
        Ok(())
    }
}

fn reuseport_listener(addr: std::net::SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_tcp_nodelay(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    Ok(sock.into())
}

/// Serves on `addr` with `workers` threads, each running its own
/// single-threaded runtime, its own `SO_REUSEPORT` listener (the kernel
/// spreads connections) and its own upstream pools: a request never
/// crosses threads (nginx's worker model). Port 0 picks one free port for
/// all. Pass a TLS acceptor to serve HTTPS. Must be called from outside any
/// async context or from a multi-threaded runtime.
pub fn spawn_workers(
    addr: std::net::SocketAddr,
    gateway: Gateway,
    workers: usize,
    tls: Option<TlsAcceptor>,
) -> io::Result<Workers> {
    let workers = workers.max(1);
    let first = reuseport_listener(addr)?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..workers {
        listeners.push(reuseport_listener(addr)?);
    }
    let (stop, stop_rx) = watch::channel(false);
    let mut threads = Vec::with_capacity(workers);
    for (i, l) in listeners.into_iter().enumerate() {
        let gw = gateway.clone();
        let tls = tls.clone();
        let mut stop_rx = stop_rx.clone();
        let t = std::thread::Builder::new()
            .name(format!("gateway-{i}"))
            .spawn(move || -> io::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    l.set_nonblocking(true)?;
                    let listener = TcpListener::from_std(l)?;
                    let shutdown = async move {
                        let _ = stop_rx.wait_for(|s| *s).await;
                    };
                    serve_inner(listener, gw, tls, shutdown).await
                })
            })?;
        threads.push(t);
    }
    tracing::info!(%addr, tls = tls.is_some(), workers, "gateway listening");
    Ok(Workers {
        addr,
        stop,
        threads,
    })
}
