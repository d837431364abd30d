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

/// Most handshakes in flight at once: past it a new connection is closed
/// at once (a flood of silent clients holds at most this many sockets).
const MAX_HANDSHAKES: usize = 512;

/// A TLS listener for axum: each handshake in its own task within
/// [`HANDSHAKE`] (a caller that stalls delays nobody else), the connection
/// handed over with its caller's identity.
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
        let local = tcp
            .local_addr()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, rx) = tokio::sync::mpsc::channel(READY_BACKLOG);
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
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
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::debug!(%addr, limit = MAX_HANDSHAKES, "too many TLS handshakes in flight; closing a new connection");
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (tx, acceptor) = (tx.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let shaken = tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await;
                    drop(slot);
                    match shaken {
                        Ok(Ok(tls)) => {
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
                        Ok(Err(e)) => {
                            tracing::debug!(%addr, error = %e, "TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
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
