//! Running a node: bind listeners, open the store, serve etcd gRPC and HTTP, and shut
//! down gracefully on SIGTERM or Ctrl-C (stop accepting, finish in-flight requests,
//! close the store cleanly, exit 0).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use meshwork_etcd::ServerInfo;
use meshwork_store::{Store, StoreConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http;

/// Everything a node needs to start.
pub(crate) struct NodeConfig {
    pub(crate) name: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) etcd_addr: SocketAddr,
    pub(crate) http_addr: SocketAddr,
    pub(crate) store: StoreConfig,
}

/// A node that is up: its bound addresses, and how to stop it.
pub(crate) struct Running {
    pub(crate) etcd_addr: SocketAddr,
    pub(crate) http_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    store: Store,
}

impl Running {
    /// Stops accepting, waits for in-flight requests, closes the store.
    pub(crate) async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.store.close().await;
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Binds, opens the store and starts serving.
pub(crate) async fn start(cfg: NodeConfig) -> Result<Running> {
    let etcd_listener = TcpListener::bind(cfg.etcd_addr)
        .await
        .with_context(|| format!("binding the etcd address {}", cfg.etcd_addr))?;
    let http_listener = TcpListener::bind(cfg.http_addr)
        .await
        .with_context(|| format!("binding the HTTP address {}", cfg.http_addr))?;
    let etcd_addr = etcd_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let store = Store::open(&cfg.data_dir, cfg.store.clone())
        .with_context(|| format!("opening the store in {}", cfg.data_dir.display()))?;
    let (stop, stop_rx) = watch::channel(false);
    let serving = Arc::new(AtomicBool::new(true));
    let info = ServerInfo::single(&cfg.name, format!("http://{etcd_addr}"));
    let grpc = {
        let store = store.clone();
        let rx = stop_rx.clone();
        let serving = serving.clone();
        tokio::spawn(async move {
            if let Err(e) = meshwork_etcd::serve(etcd_listener, store, info, stopped(rx)).await {
                tracing::error!(error = %e, "etcd gRPC server failed");
            }
            serving.store(false, Ordering::Release);
        })
    };
    let web = {
        let state = http::AppState {
            store: store.clone(),
            serving: serving.clone(),
            prometheus: crate::metrics_handle(),
        };
        let rx = stop_rx.clone();
        tokio::spawn(async move {
            if let Err(e) = http::serve(http_listener, state, stopped(rx)).await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        })
    };
    tracing::info!(%etcd_addr, %http_addr, data_dir = %cfg.data_dir.display(), "meshwork node started");
    Ok(Running {
        etcd_addr,
        http_addr,
        stop,
        tasks: vec![grpc, web],
        store,
    })
}

/// Resolves on SIGTERM or Ctrl-C.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
