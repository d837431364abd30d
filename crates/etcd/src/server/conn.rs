//! Connection limits of the gRPC port: a bounded number of connections
//! (one over the limit is accepted and closed at once, and counted), and a
//! deadline on silence — a connection whose client sends nothing, not even
//! the HTTP/2 preface or an answer to the server's keep-alive ping, is
//! closed. A thousand idle sockets cost the server nothing but their slots.
//!
//! Writes are coalesced under load: when tasks are waiting in the runtime's
//! shared queue (where the committer thread's replies wake request tasks),
//! the first write after a flush waits one scheduler round
//! (`tokio::task::yield_now`: it resumes once the worker has run the tasks
//! already queued, or at its next maintenance tick, every 61 tasks, so the
//! wait is bounded under constant load). The responses of the other streams
//! completed by the same commit then join it in one `writev` instead of one
//! system call and TCP segment each — what gRPC-Go's writer does by flushing
//! only when its queue is empty. With nothing queued the write goes out at
//! once, so a lone client's latency is unchanged.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

/// Limits of the etcd gRPC listener.
#[derive(Debug, Clone)]
pub struct ListenLimits {
    /// Most connections open at once; one more is closed on accept and
    /// counted in `meshwork_listener_refused_connections_total{listener="etcd"}`.
    pub max_connections: usize,
    /// Most concurrent HTTP/2 streams (RPCs) per connection.
    pub max_concurrent_streams: u32,
    /// Time a new connection has to send its first bytes.
    pub handshake_timeout: Duration,
    /// Longest silence from a client (the server pings every third of it,
    /// and a live client answers) before its connection is closed.
    pub idle_timeout: Duration,
}

impl Default for ListenLimits {
    fn default() -> Self {
        ListenLimits {
            max_connections: 4096,
            max_concurrent_streams: 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
        }
    }
}

/// Hands out connection slots and counts refusals.
#[derive(Debug, Clone)]
pub(crate) struct Slots {
    slots: Arc<Semaphore>,
    limits: ListenLimits,
    /// The `listener` label of its metrics.
    name: &'static str,
}

impl Slots {
    pub(crate) fn new(limits: ListenLimits, name: &'static str) -> Self {
        Slots {
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            name,
        }
    }

    /// The connection with its slot and silence deadline, or `None` (the
    /// stream is dropped, so closed) when every slot is taken.
    pub(crate) fn admit(&self, stream: TcpStream) -> Option<Guarded> {
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => {
                metrics::gauge!("meshwork_listener_connections", "listener" => self.name)
                    .increment(1.0);
                Some(Guarded {
                    remote_addr: stream.peer_addr().ok(),
                    common_name: None,
                    inner: Stream::Plain(stream),
                    _slot: Slot(permit, self.name),
                    name: self.name,
                    silence: Box::pin(tokio::time::sleep(self.limits.handshake_timeout)),
                    idle: self.limits.idle_timeout,
                    round: Round::Open,
                    runtime: tokio::runtime::Handle::try_current()
                        .ok()
                        .map(|h| h.metrics()),
                })
            }
            Err(_) => {
                metrics::counter!("meshwork_listener_refused_connections_total", "listener" => self.name)
                    .increment(1);
                tracing::debug!(
                    listener = self.name,
                    limit = self.limits.max_connections,
                    "connection limit reached, closing a new connection"
                );
                None
            }
        }
    }
}

/// A taken slot; given back (and the gauge lowered) on drop.
#[derive(Debug)]
struct Slot(#[allow(dead_code)] OwnedSemaphorePermit, &'static str);

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::gauge!("meshwork_listener_connections", "listener" => self.1).decrement(1.0);
    }
}

/// An admitted connection: closed (read error `TimedOut`) once its client
/// has been silent past the deadline.
#[derive(Debug)]
pub struct Guarded {
    inner: Stream,
    remote_addr: Option<std::net::SocketAddr>,
    /// The verified client certificate's common name (mutual TLS).
    common_name: Option<String>,
    _slot: Slot,
    name: &'static str,
    silence: Pin<Box<Sleep>>,
    idle: Duration,
    round: Round,
    /// The runtime's queues, read to decide whether a write waits a round.
    runtime: Option<tokio::runtime::RuntimeMetrics>,
}

/// Where a connection is in coalescing its writes (see the module docs).
enum Round {
    /// The next write waits for one scheduler round first if tasks are queued.
    Open,
    /// Waiting for the round to end.
    Waiting(Pin<Box<dyn Future<Output = ()> + Send + Sync>>),
    /// The round is over: writes go to the socket until the next flush.
    Writing,
}

impl std::fmt::Debug for Round {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Round::Open => "Open",
            Round::Waiting(_) => "Waiting",
            Round::Writing => "Writing",
        })
    }
}

impl Guarded {
    /// Ready once this flush cycle's scheduler round is over.
    fn poll_round(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match &mut self.round {
                Round::Writing => return Poll::Ready(()),
                Round::Open => {
                    let queued = self
                        .runtime
                        .as_ref()
                        .is_some_and(|m| m.global_queue_depth() > 0);
                    self.round = if queued {
                        Round::Waiting(Box::pin(tokio::task::yield_now()))
                    } else {
                        Round::Writing
                    };
                }
                Round::Waiting(round) => {
                    std::task::ready!(round.as_mut().poll(cx));
                    self.round = Round::Writing;
                }
            }
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + self.idle;
                    self.silence.as_mut().reset(next);
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.silence.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    metrics::counter!("meshwork_listener_timeouts_total", "listener" => self.name)
                        .increment(1);
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client silent past the idle timeout",
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_round(cx));
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_round(cx));
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.round = Round::Open;
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Who is on the other end of a connection, in each request's extensions.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    /// The client's address.
    pub remote_addr: Option<std::net::SocketAddr>,
    /// The common name of the client's verified certificate (mutual TLS).
    pub common_name: Option<String>,
}

impl Connected for Guarded {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        PeerInfo {
            remote_addr: self.remote_addr,
            common_name: self.common_name.clone(),
        }
    }
}

/// A connection's byte stream: plain TCP, or TLS over it.
#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

macro_rules! both {
    ($s:expr, $x:ident => $e:expr) => {
        match $s {
            Stream::Plain($x) => $e,
            Stream::Tls($x) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        both!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        both!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        both!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        both!(self, s => s.is_write_vectored())
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

impl Guarded {
    /// The TLS handshake on an admitted connection, within `limit`; the
    /// client's certificate (mutual TLS) names it.
    async fn tls(
        self,
        acceptor: tokio_rustls::TlsAcceptor,
        limit: Duration,
    ) -> io::Result<Guarded> {
        let tcp = match self.inner {
            Stream::Plain(tcp) => tcp,
            tls @ Stream::Tls(_) => return Ok(Guarded { inner: tls, ..self }),
        };
        let tls = tokio::time::timeout(limit, acceptor.accept(tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let common_name = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(meshwork_tls::peer_common_name);
        Ok(Guarded {
            inner: Stream::Tls(Box::new(tls)),
            common_name,
            ..self
        })
    }
}

/// The connections of `listener` admitted under `limits` (a slot each,
/// first bytes within the handshake timeout, closed past the idle timeout),
/// for any tonic server; `name` labels the `meshwork_listener_*` metrics.
pub fn limited_incoming(
    listener: tokio::net::TcpListener,
    limits: ListenLimits,
    name: &'static str,
) -> impl futures_util::Stream<Item = io::Result<Guarded>> + Send + 'static {
    incoming(listener, Slots::new(limits, name))
}

/// [`limited_incoming`] over TLS: each admitted connection's handshake runs
/// in its own task (a slow or silent client delays nobody else) within the
/// handshake timeout; failed handshakes are logged, counted and closed.
pub fn limited_incoming_tls(
    listener: tokio::net::TcpListener,
    limits: ListenLimits,
    name: &'static str,
    tls: std::sync::Arc<meshwork_tls::TlsReloader>,
) -> impl futures_util::Stream<Item = io::Result<Guarded>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Guarded>>(64);
    let limit = limits.handshake_timeout;
    let plain = Box::pin(incoming(listener, Slots::new(limits, name)));
    tokio::spawn(async move {
        use futures_util::StreamExt;
        let mut plain = plain;
        loop {
            let next = tokio::select! {
                c = plain.next() => c,
                () = tx.closed() => return,
            };
            let Some(Ok(conn)) = next else { return };
            let (tx, acceptor) = (tx.clone(), tls.acceptor());
            tokio::spawn(async move {
                match conn.tls(acceptor, limit).await {
                    Ok(c) => {
                        let _ = tx.send(Ok(c)).await;
                    }
                    Err(e) => {
                        metrics::counter!("meshwork_listener_tls_failures_total", "listener" => name)
                            .increment(1);
                        tracing::debug!(listener = name, error = %e, "TLS handshake failed");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The admitted connections of `listener`, for tonic. An accept error (out of
/// file descriptors, say) is logged and waited out for a moment instead of
/// ending the stream or spinning on it.
pub(crate) fn incoming(
    listener: tokio::net::TcpListener,
    slots: Slots,
) -> impl futures_util::Stream<Item = io::Result<Guarded>> + Send + 'static {
    futures_util::stream::unfold((listener, slots), |(listener, slots)| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    // tonic applies TCP_NODELAY only to listeners it binds itself; without
                    // it, Nagle's algorithm holds small responses behind the delayed ACK.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "setting TCP_NODELAY failed");
                    }
                    if let Some(conn) = slots.admit(stream) {
                        return Some((Ok(conn), (listener, slots)));
                    }
                }
                Err(e) => {
                    metrics::counter!("meshwork_listener_accept_errors_total", "listener" => slots.name)
                        .increment(1);
                    tracing::warn!(error = %e, "etcd port: accept failed; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}
