//! Test support: Meshwork's embedded store served as an etcd v3 endpoint on
//! 127.0.0.1, in this process.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use meshwork_etcd::ServerInfo;
use meshwork_store::{Store, StoreConfig};

/// A store served on 127.0.0.1; stops when dropped.
pub struct Embedded {
    /// `HOST:PORT` of its etcd endpoint.
    pub endpoint: String,
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
pub async fn embedded() -> Embedded {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        min_lease_ttl_secs: 1,
        ..StoreConfig::default()
    };
    let store = Store::open(dir.path(), cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let info = ServerInfo::single("test", format!("http://{addr}"));
    tokio::spawn(async move {
        let _ = meshwork_etcd::serve(listener, store, info, async {
            let _ = rx.await;
        })
        .await;
    });
    Embedded {
        endpoint: addr.to_string(),
        _dir: dir,
        stop: Some(stop),
    }
}
