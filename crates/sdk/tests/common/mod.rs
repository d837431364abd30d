//! Test support: a control plane (Meshwork's embedded store served as an etcd v3
//! endpoint on 127.0.0.1, in this process) reached through a TCP proxy the test
//! can cut, to take the control plane away from the services under test.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// An embedded store served on 127.0.0.1 behind a cuttable proxy.
pub struct ControlPlane {
    /// The store's own endpoint.
    pub direct: String,
    /// The proxy's endpoint (what services use).
    pub endpoint: String,
    proxy: Proxy,
    _store: meshwork_etcd::testing::Embedded,
}

impl ControlPlane {
    /// Starts one (lease TTLs down to 1 s).
    pub async fn start() -> ControlPlane {
        let store = meshwork_etcd::testing::embedded().await;
        let addr: SocketAddr = store.endpoint.parse().unwrap();
        let proxy = Proxy::start(addr).await;
        ControlPlane {
            direct: store.endpoint.clone(),
            endpoint: proxy.addr.to_string(),
            proxy,
            _store: store,
        }
    }

    /// Cuts every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.proxy.cut();
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.proxy.restore();
    }
}

/// A TCP proxy that can drop every connection.
pub struct Proxy {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (o, c) = (open.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !o.load(Ordering::Acquire) {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                c.lock().push(task);
            }
        });
        Proxy {
            addr,
            open,
            conns,
            accept,
        }
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::Release);
        for t in self.conns.lock().drain(..) {
            t.abort();
        }
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::Release);
    }
}
