//! The embedded store harness (feature `store`): Meshwork's store in a
//! temporary directory, served as an etcd v3 endpoint on 127.0.0.1 in the
//! test's own process.

use meshwork_etcd::auth::{Auth, AuthConfig};
use meshwork_etcd::{ServerInfo, serve};
use meshwork_store::{Store, StoreConfig};

/// A served store; stops serving and removes its directory when dropped.
pub struct Embedded {
    /// `HOST:PORT` of its etcd endpoint.
    pub endpoint: String,
    /// Its auth state (off until a test turns it on).
    pub auth: Auth,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Embedded {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Opens a store in a temporary directory and serves it (lease TTLs down to 1 s).
///
/// # Panics
/// When the directory, the store or the listener cannot be set up (tests only).
pub async fn embedded() -> Embedded {
    embedded_with_auth(AuthConfig::default()).await
}

/// [`embedded`] with these auth settings.
///
/// # Panics
/// When the directory, the store or the listener cannot be set up (tests only).
pub async fn embedded_with_auth(auth: AuthConfig) -> Embedded {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let cfg = StoreConfig {
        min_lease_ttl_secs: 1,
        ..StoreConfig::default()
    };
    let store = Store::open(dir.path(), cfg).expect("the store opens");
    let auth = Auth::open(dir.path(), auth).expect("the auth state opens");
    let served_auth = auth.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("a bound address");
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let info = ServerInfo::single("test", format!("http://{addr}"));
    tokio::spawn(async move {
        let _ = serve(listener, store, served_auth, info, async {
            let _ = rx.await;
        })
        .await;
    });
    Embedded {
        endpoint: addr.to_string(),
        auth,
        _dir: dir,
        stop: Some(stop),
    }
}
