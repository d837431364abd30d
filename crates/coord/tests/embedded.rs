//! The coordination suite on Meshwork's own store: an embedded store served as an
//! etcd v3 endpoint over a real socket, in this process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod suite;

use meshwork_etcd::ServerInfo;
use meshwork_store::{Store, StoreConfig};

/// A store served on 127.0.0.1; stops when dropped.
struct Embedded {
    endpoint: String,
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

async fn embedded() -> Embedded {
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

macro_rules! on_embedded {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let e = embedded().await;
                suite::$name(vec![e.endpoint.clone()]).await;
            }
        )*
    };
}

on_embedded!(
    registry_ephemeral_and_persistent,
    health_checks_follow_the_instance,
    discovery_filters_protection_blocking_watch,
    config_versions_history_rollback,
    config_listen_subscribe_gray,
    locks_exclusive_fenced_freed,
    election_campaign_observe_resign,
    ids_unique_across_nodes,
    checks_move_when_their_node_dies,
    client_typed_config_session_and_guards,
);
