//! The service's identity (with [`Options::identity`](crate::Options)): a
//! certificate from the node's authority naming this service, obtained at
//! connect (the key never leaves the process) and renewed in the background
//! at half its remaining life, retried sooner when a renewal fails. The
//! [`Server`](crate::server::Server) serves TLS with it and verifies callers'
//! certificates; the [`HttpClient`](crate::HttpClient) presents it to
//! services that serve with theirs and checks they are who it called.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshwork_coord::CoordClient;
use meshwork_tls::identity::{Identity, new_request, not_after};

use crate::Error;

/// The instance metadata key a service serving with its identity registers
/// (value [`TLS_IDENTITY`]): callers dial it with TLS.
pub const TLS_METADATA: &str = "tls";
/// The value of [`TLS_METADATA`] for a service serving with its identity.
pub const TLS_IDENTITY: &str = "identity";

fn crypto(e: meshwork_tls::identity::IdentityError) -> Error {
    Error::Invalid(format!("service identity: {e}"))
}

/// One certificate: `(chain, key, authority)` PEMs.
async fn obtain(
    coord: &CoordClient,
    service: &str,
    wait: Duration,
    pinned: Option<&str>,
) -> Result<(String, String, String), Error> {
    let (key, csr) = new_request(service).map_err(crypto)?;
    // Unique per attempt: the session's lease is the process's, the count
    // this process's.
    static ATTEMPTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = ATTEMPTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = format!("{:x}-{n}", coord.lease());
    let got =
        meshwork_coord::identity::obtain(coord.backend(), service, &id, &csr, coord.lease(), wait)
            .await?;
    // Whoever wrote the answer, it must be for our key and name, from the
    // (pinned) authority.
    meshwork_tls::identity::check_issued(service, &got.chain, &key, &got.ca, pinned)
        .map_err(crypto)?;
    Ok((got.chain, key, got.ca))
}

/// Obtains `service`'s identity (waiting up to `wait` for a node to issue
/// it) and starts renewing it.
pub(crate) async fn start(
    coord: &CoordClient,
    service: &str,
    wait: Duration,
    pinned_ca: Option<std::path::PathBuf>,
) -> Result<(Arc<Identity>, tokio::task::JoinHandle<()>), Error> {
    let pinned =
        match &pinned_ca {
            Some(p) => Some(std::fs::read_to_string(p).map_err(|e| {
                Error::Invalid(format!("the identity authority {}: {e}", p.display()))
            })?),
            None => None,
        };
    let (chain, key, ca) = obtain(coord, service, wait, pinned.as_deref()).await?;
    let until = not_after(&chain).map_err(crypto)?;
    let identity = Identity::new(service, &chain, &key, &ca).map_err(crypto)?;
    tracing::info!(service, "service identity obtained");
    // Renewals must come from the authority the first answer named.
    let renewing = tokio::spawn(renew(coord.clone(), identity.clone(), until, wait, ca));
    Ok((identity, renewing))
}

/// What is left of a certificate valid until `until`.
fn left(until: SystemTime) -> Duration {
    until
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

async fn renew(
    coord: CoordClient,
    identity: Arc<Identity>,
    mut until: SystemTime,
    wait: Duration,
    ca: String,
) {
    let mut delay = left(until) / 2;
    loop {
        tokio::time::sleep(delay.max(Duration::from_secs(1))).await;
        match obtain(&coord, identity.service(), wait, Some(&ca)).await {
            Ok((chain, key, _)) => match (not_after(&chain), identity.renew(&chain, &key)) {
                (Ok(t), Ok(())) => {
                    until = t;
                    delay = left(until) / 2;
                    tracing::info!(service = identity.service(), "service identity renewed");
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "service identity: the renewed certificate is unusable");
                    delay = (left(until) / 10).min(Duration::from_secs(30));
                }
            },
            Err(e) => {
                // Keep the one we have; try again well before it runs out.
                tracing::warn!(error = %e, "service identity: renewal failed; retrying");
                delay = (left(until) / 10).min(Duration::from_secs(30));
            }
        }
    }
}

/// A caller of a service serving with its identity: its address and the
/// service its certificate names (`None`: it presented none).
#[derive(Debug, Clone)]
pub struct Peer {
    /// The caller's address.
    pub addr: std::net::SocketAddr,
    /// The service its certificate names.
    pub service: Option<String>,
}

/// How long a caller has to finish the TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Most handshaken connections waiting for the server to take them.
const READY_BACKLOG: usize = 128;

/// Most connections not yet handed over (waiting for their first bytes or
/// mid-handshake). Past it the oldest is closed to make room, not the new
/// one: a real caller's handshake takes milliseconds, so a flood of silent
/// or stalled clients pushes itself out instead of locking callers out (it
/// would take this many newer connections within one caller's handshake to
/// close it). Bounds the sockets a flood holds, under the usual 1,024
/// descriptor limit with room to serve.
const MAX_PENDING: usize = 512;

/// The connections not yet handed over, oldest first. Dropping an entry's
/// sender closes that connection (its task sees the channel close).
#[derive(Default)]
struct Pending {
    order: std::collections::VecDeque<u64>,
    live: std::collections::HashMap<u64, tokio::sync::oneshot::Sender<()>>,
    next: u64,
}

impl Pending {
    /// Registers a new connection, closing the oldest pending one if full.
    /// Returns its id and what tells it to close.
    fn admit(&mut self, max: usize) -> (u64, tokio::sync::oneshot::Receiver<()>) {
        while self.live.len() >= max.max(1) {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            // Ids already done are skipped (removed from `live` only).
            if self.live.remove(&oldest).is_some() {
                tracing::debug!(
                    limit = max,
                    "pending TLS connections at their limit; closed the oldest"
                );
            }
        }
        let id = self.next;
        self.next += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.live.insert(id, tx);
        self.order.push_back(id);
        // Done ids linger in `order` until they reach its front; keep it
        // from growing past a few times the live set.
        if self.order.len() > 4 * max.max(1) {
            let live = &self.live;
            self.order.retain(|i| live.contains_key(i));
        }
        (id, rx)
    }

    /// The connection is done (handed over, failed or timed out).
    fn done(&mut self, id: u64) {
        self.live.remove(&id);
    }
}

/// A TLS listener for axum: each handshake in its own task within
/// [`HANDSHAKE`] (a caller that stalls delays nobody else), at most
/// [`MAX_PENDING`] of them (the oldest closed for a new one), the
/// connection handed over with its caller's identity.
pub(crate) struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, Peer)>,
    local: std::net::SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl TlsListener {
    pub(crate) fn new(tcp: tokio::net::TcpListener, cfg: Arc<rustls::ServerConfig>) -> TlsListener {
        Self::with_limits(tcp, cfg, MAX_PENDING, HANDSHAKE)
    }

    /// As [`TlsListener::new`], with at most `max_pending` connections not
    /// yet handed over, each given `handshake` to finish its handshake.
    fn with_limits(
        tcp: tokio::net::TcpListener,
        cfg: Arc<rustls::ServerConfig>,
        max_pending: usize,
        handshake: Duration,
    ) -> TlsListener {
        let local = tcp
            .local_addr()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, rx) = tokio::sync::mpsc::channel(READY_BACKLOG);
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let pending = Arc::new(parking_lot::Mutex::new(Pending::default()));
        let accepting = tokio::spawn(async move {
            loop {
                let (stream, addr) = match tcp.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors and the like: try again shortly.
                        tracing::warn!(error = %e, "accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (id, closed) = pending.lock().admit(max_pending);
                let _ = stream.set_nodelay(true);
                let (tx, acceptor, pending) = (tx.clone(), acceptor.clone(), pending.clone());
                tokio::spawn(async move {
                    let shaken = tokio::select! {
                        r = tokio::time::timeout(handshake, acceptor.accept(stream)) => Some(r),
                        _ = closed => None,
                    };
                    pending.lock().done(id);
                    match shaken {
                        Some(Ok(Ok(tls))) => {
                            let service = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(meshwork_tls::identity::peer_service);
                            // A server that takes no connections (shutting
                            // down) does not hold this one for ever.
                            let _ = tx
                                .send_timeout((tls, Peer { addr, service }), HANDSHAKE)
                                .await;
                        }
                        Some(Ok(Err(e))) => {
                            tracing::debug!(%addr, error = %e, "TLS handshake failed");
                        }
                        Some(Err(_)) => tracing::debug!(%addr, "TLS handshake timed out"),
                        None => tracing::debug!(%addr, "closed for a newer connection"),
                    }
                });
            }
        });
        TlsListener {
            rx,
            local,
            accepting,
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            // The accepting task ended (aborted with us): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.local,
            service: None,
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Peer {
        stream.remote_addr().clone()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use axum::serve::Listener as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An identity for `service` from `ca`.
    fn identity(ca: &meshwork_tls::identity::Authority, service: &str) -> Arc<Identity> {
        let (chain, key) = ca.issue(service, Duration::from_secs(3600)).unwrap();
        Identity::new(service, &chain, &key, ca.ca_pem()).unwrap()
    }

    /// A caller's full handshake with the listener at `addr`.
    async fn handshake(
        client: &Arc<rustls::ClientConfig>,
        addr: std::net::SocketAddr,
    ) -> std::io::Result<()> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from("svc").unwrap();
        tokio_rustls::TlsConnector::from(client.clone())
            .connect(name, tcp)
            .await
            .map(|_| ())
    }

    /// Clients that connect and send nothing, or stall mid-handshake, many
    /// more than the listener keeps pending: a caller that comes after them
    /// is still served (the oldest of them are closed for it), and the
    /// flood holds no more sockets than the limit.
    #[tokio::test]
    async fn silent_and_stalled_clients_do_not_lock_callers_out() {
        let dir = tempfile::tempdir().unwrap();
        let ca = meshwork_tls::identity::Authority::create(dir.path(), 1).unwrap();
        let server = identity(&ca, "svc").server_config(&[b"http/1.1"]).unwrap();
        let client = identity(&ca, "caller")
            .client_config(&[b"http/1.1"])
            .unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        // A handshake time far past the test's bounds: only being closed
        // for newer connections can end a flood connection within them.
        let mut listener = TlsListener::with_limits(tcp, server, 16, Duration::from_secs(600));
        let (served_tx, mut served) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (io, peer) = listener.accept().await;
                served_tx.send(peer.service).unwrap();
                drop(io);
            }
        });
        let bound = Duration::from_secs(10);
        for stall in [&b""[..], b"\x16\x03\x01\x02\x00\x01"] {
            let mut flood = Vec::new();
            for _ in 0..64 {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(stall).await.unwrap();
                flood.push(s);
            }
            tokio::time::timeout(bound, handshake(&client, addr))
                .await
                .expect("a caller after the flood waited")
                .expect("a caller after the flood was refused");
            let who = tokio::time::timeout(bound, served.recv()).await.unwrap();
            assert_eq!(who, Some(Some("caller".to_string())));
            // The oldest were closed for the newer connections: of the 65
            // (the flood and the caller) at most the limit were kept, so
            // the flood's first 49 see the server close.
            for (i, s) in flood.iter_mut().take(64 + 1 - 16).enumerate() {
                let mut b = [0u8; 1];
                let r = tokio::time::timeout(bound, s.read(&mut b))
                    .await
                    .unwrap_or_else(|_| panic!("flood connection {i} still held"));
                assert!(matches!(r, Ok(0) | Err(_)), "flood connection {i}: {r:?}");
            }
        }
    }
}
