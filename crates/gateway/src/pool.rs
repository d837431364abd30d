//! The HTTP/1.1 upstream pool: keep-alive connections per endpoint (and per
//! TLS client, for upstreams spoken to over TLS), owned by one listener loop (with `spawn_workers`, one thread), on hyper's
//! connection-level client. A connection goes back to the pool when its
//! response body has been read to the end; a pooled connection found closed
//! when a request is sent on it is replaced transparently (the request was
//! not written). An endpoint seen dead (connect failure, or a fresh
//! connection closed before the request went out) loses its idle
//! connections at once, and the failure is reported as "nothing sent".

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::body::Body;

/// Why an upstream call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PoolError {
    /// No connection could be made (nothing was sent).
    #[error("connect to {addr}: {message}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        message: String,
    },
    /// The exchange failed.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl PoolError {
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, PoolError::Connect { .. })
    }
}

type Idle = Vec<(SendRequest<Body>, Instant)>;

/// A multiply-rotate hasher for endpoint addresses (std's SipHash costs
/// more than the rest of a pool checkout; the keys are upstream addresses
/// from the route set or the registry, not client input).
#[derive(Default, Clone, Copy)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Connections are kept per endpoint and per TLS client (0: cleartext).
type ByAddr<V> = HashMap<(SocketAddr, u64), V, BuildHasherDefault<AddrHasher>>;

/// TLS to one target's endpoints: the client, and the name their
/// certificates must carry (`None`: each endpoint's IP address).
pub(crate) struct UpstreamTls {
    id: u64,
    connector: tokio_rustls::TlsConnector,
    name: Option<rustls_pki_types::ServerName<'static>>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("id", &self.id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// TLS with `cfg`, verifying `name` (checked when the route compiled).
    pub(crate) fn new(cfg: Arc<rustls::ClientConfig>, name: Option<&str>) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            connector: tokio_rustls::TlsConnector::from(cfg),
            name: name.and_then(|n| rustls_pki_types::ServerName::try_from(n.to_string()).ok()),
        }
    }
}

/// Keep-alive HTTP/1.1 connections by endpoint.
pub(crate) struct H1Pool {
    idle: Mutex<ByAddr<Idle>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
}

impl std::fmt::Debug for H1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Pool").finish_non_exhaustive()
    }
}

impl H1Pool {
    pub(crate) fn new(connect_timeout: Duration, idle_timeout: Duration, max_idle: usize) -> Self {
        Self {
            idle: Mutex::new(ByAddr::default()),
            connect_timeout,
            idle_timeout,
            max_idle,
        }
    }

    fn checkout(&self, key: (SocketAddr, u64)) -> Option<SendRequest<Body>> {
        let now = Instant::now();
        let mut idle = self.idle.lock();
        let list = idle.get_mut(&key)?;
        while let Some((s, since)) = list.pop() {
            if s.is_closed() || now.saturating_duration_since(since) > self.idle_timeout {
                continue;
            }
            return Some(s);
        }
        None
    }

    fn checkin(&self, key: (SocketAddr, u64), s: SendRequest<Body>) {
        if s.is_closed() {
            return;
        }
        let mut idle = self.idle.lock();
        let list = idle.entry(key).or_default();
        if list.len() < self.max_idle {
            list.push((s, Instant::now()));
        }
    }

    /// Drops every idle connection to `key` (it was seen dead).
    fn evict(&self, key: (SocketAddr, u64)) {
        self.idle.lock().remove(&key);
    }

    /// A new connection (TCP, and the TLS handshake when `tls`), both within
    /// the connect timeout.
    async fn connect(
        &self,
        addr: SocketAddr,
        tls: Option<&UpstreamTls>,
    ) -> Result<SendRequest<Body>, PoolError> {
        let err = |message: String| PoolError::Connect { addr, message };
        let timed_out = || {
            err(format!(
                "timed out after {} ms",
                self.connect_timeout.as_millis()
            ))
        };
        let deadline = Instant::now() + self.connect_timeout;
        let stream = tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| err(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let Some(tls) = tls else {
            return handshake(addr, TokioIo::new(stream)).await;
        };
        let name = tls
            .name
            .clone()
            .unwrap_or_else(|| rustls_pki_types::ServerName::IpAddress(addr.ip().into()));
        let shown = name.to_str().into_owned();
        let stream = tokio::time::timeout_at(deadline, tls.connector.connect(name, stream))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| err(format!("TLS handshake (verifying {shown}): {e}")))?;
        handshake(addr, TokioIo::new(stream)).await
    }

    /// Sends `req` (origin-form URI, Host set) to `addr`, over TLS when `tls`.
    pub(crate) async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        tls: Option<&UpstreamTls>,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, PoolError> {
        let key = (addr, tls.map_or(0, |t| t.id));
        loop {
            let (mut sender, pooled) = match self.checkout(key) {
                Some(s) => (s, true),
                None => match self.connect(addr, tls).await {
                    Ok(s) => (s, false),
                    Err(e) => {
                        // Seen dead: its kept-alive connections go too.
                        self.evict(key);
                        return Err(e);
                    }
                },
            };
            if !sender.is_ready() && sender.ready().await.is_err() {
                if pooled {
                    continue;
                }
                self.evict(key);
                return Err(PoolError::Connect {
                    addr,
                    message: "connection closed before use".into(),
                });
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let upgrade = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
                    let pool = (!upgrade).then(|| (self.clone(), sender));
                    return Ok(resp.map(|b| {
                        crate::body::boxed(PooledBody {
                            inner: b,
                            back: pool,
                            key,
                        })
                    }));
                }
                Err(mut e) => match e.take_message() {
                    // Not sent (a kept-alive connection closed meanwhile): try a fresh one.
                    Some(r) if pooled => req = r,
                    // Not sent on a fresh connection: the endpoint is closing
                    // connections; nothing reached it.
                    Some(_) => {
                        self.evict(key);
                        return Err(PoolError::Connect {
                            addr,
                            message: format!(
                                "connection closed before the request was sent: {}",
                                e.error()
                            ),
                        });
                    }
                    None => return Err(PoolError::Http(e.into_error())),
                },
            }
        }
    }
}

/// HTTP/1.1 over a connected stream; the connection runs on its own task.
async fn handshake<T>(addr: SocketAddr, io: TokioIo<T>) -> Result<SendRequest<Body>, PoolError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) =
        http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| PoolError::Connect {
                addr,
                message: e.to_string(),
            })?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(upstream = %addr, error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}

/// A response body that returns its connection to the pool at its end.
struct PooledBody {
    inner: Incoming,
    back: Option<(Arc<H1Pool>, SendRequest<Body>)>,
    key: (SocketAddr, u64),
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((pool, s)) = self.back.take() {
            pool.checkin(self.key, s);
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Only a fully read body leaves the connection reusable.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}
