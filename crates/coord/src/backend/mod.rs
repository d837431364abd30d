//! The one seam between coordination and storage: an etcd v3 endpoint set, which is
//! Meshwork's own store or a real etcd cluster.
//!
//! [`Backend`] retries a call on another endpoint when the one in use is down
//! (`Unavailable`, a transport error, or no answer within the request timeout),
//! for at most [`BackendOptions::retry_for`]. A mutation retried after an unknown
//! outcome may have been applied once already; callers that compare-and-set must
//! treat a lost compare after a retry as "maybe mine" and re-read (see the config
//! center's publish). Watches resume from the next revision on any endpoint, and
//! report [`WatchItem::Reset`] when that revision was compacted away.
//!
//! The handle and its connection live here; each concern has its own file:
//!
//! - `failover` — running a call on the current endpoint, moving to the next one on
//!   availability errors, and telling an operator why a call failed;
//! - `kv` — reads, writes, paged prefix loads and transactions;
//! - `lease` — grants, revokes, renewals over shared keep-alive streams, and the
//!   background [`LeaseKeeper`];
//! - `watch` — resuming watches ([`WatchStream`], [`WatchItem`]);
//! - `mirror` — a watched local copy of a prefix ([`mirror`], [`MirrorHandler`]);
//! - [`txn`] — builders for transaction compares and operations.

use std::sync::Arc;
use std::time::Duration;

use meshwork_etcd::Client;
use meshwork_etcd::proto::mvccpb;
use parking_lot::RwLock;
use tokio::sync::mpsc;

use crate::error::{CoordError, Result};

mod failover;
mod kv;
mod lease;
mod mirror;
pub mod txn;
mod watch;

use failover::connect_from;
use lease::{KEEPALIVE_STREAMS, KeepAliveReq};

pub use kv::{LOAD_PAGE, is_delete, prefix_end};
pub use lease::LeaseKeeper;
pub use meshwork_etcd::client::{ClientTls, Credentials};
pub use mirror::{LOAD_LIMIT, MIRROR_WAIT, Mirror, MirrorHandler, mirror};
pub use mvccpb::{Event, KeyValue};
pub use watch::{WatchItem, WatchStream};

/// How the backend connects and retries.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// Deadline of one request to one endpoint.
    pub request_timeout: Duration,
    /// How long a call keeps retrying across endpoints before it fails.
    pub retry_for: Duration,
    /// Timeout of one connection attempt.
    pub connect_timeout: Duration,
    /// Who to log in as when the store has auth on (`None`: no login). The
    /// token is renewed every [`TOKEN_REFRESH`] and whenever the store calls
    /// it invalid or old, so calls keep working across token expiry.
    pub credentials: Option<meshwork_etcd::client::Credentials>,
    /// TLS to the endpoints (`None`: plaintext, unless an endpoint says `https://`).
    pub tls: Option<meshwork_etcd::client::ClientTls>,
}

/// How often a backend with credentials logs in again, well inside etcd's
/// default token TTL (5 minutes) for simple and JWT tokens.
pub const TOKEN_REFRESH: Duration = Duration::from_secs(60);

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            request_timeout: Duration::from_secs(5),
            retry_for: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(2),
            credentials: None,
            tls: None,
        }
    }
}

/// The connection in use: which endpoint, how many failovers ago, and its client.
struct Current {
    index: usize,
    generation: u64,
    client: Client,
    /// The keep-alive multiplexers on this connection (started on first use), leases
    /// sharded over them by id.
    keepalive: parking_lot::Mutex<Vec<Option<mpsc::Sender<KeepAliveReq>>>>,
}

impl Current {
    fn new(index: usize, generation: u64, client: Client) -> Current {
        Current {
            index,
            generation,
            client,
            keepalive: parking_lot::Mutex::new(vec![None; KEEPALIVE_STREAMS]),
        }
    }
}

struct Inner {
    endpoints: Vec<String>,
    opts: BackendOptions,
    current: RwLock<Arc<Current>>,
    reconnect: tokio::sync::Mutex<()>,
}

/// An etcd v3 endpoint set with failover. Cheap to clone.
#[derive(Clone)]
pub struct Backend {
    inner: Arc<Inner>,
}

impl Backend {
    /// Connects to the first reachable endpoint (`HOST:PORT` or a URL).
    pub async fn connect(endpoints: &[String], opts: BackendOptions) -> Result<Backend> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(CoordError::invalid(
                "no etcd endpoints given (expected HOST:PORT[,HOST:PORT...])",
            ));
        }
        let (index, client) = connect_from(&endpoints, 0, &opts).await?;
        let backend = Backend {
            inner: Arc::new(Inner {
                endpoints,
                opts,
                current: RwLock::new(Arc::new(Current::new(index, 0, client))),
                reconnect: tokio::sync::Mutex::new(()),
            }),
        };
        if backend.inner.opts.credentials.is_some() {
            tokio::spawn(refresh_token(Arc::downgrade(&backend.inner)));
        }
        Ok(backend)
    }

    /// The endpoints this backend was given.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// The options in force.
    pub fn options(&self) -> &BackendOptions {
        &self.inner.opts
    }

    fn current(&self) -> Arc<Current> {
        self.inner.current.read().clone()
    }
}

/// Logs in again every [`TOKEN_REFRESH`] while the backend lives, so that
/// a token never expires under a client that is idle between calls.
async fn refresh_token(inner: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(TOKEN_REFRESH).await;
        let Some(inner) = inner.upgrade() else { return };
        let Some(creds) = inner.opts.credentials.clone() else {
            return;
        };
        let cur = inner.current.read().clone();
        drop(inner);
        if let Err(e) = cur.client.authenticate(&creds).await {
            tracing::warn!(user = %creds.user, error = %e, "renewing the etcd auth token failed; retrying on the next call or in a minute");
        }
    }
}
