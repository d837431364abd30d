//! Test support: a control plane (Meshwork's embedded store served as an etcd v3
//! endpoint on 127.0.0.1, in this process) reached through a TCP proxy the test
//! can cut, to take the control plane away from the services under test.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use meshwork_testkit::proxy::CutProxy;

/// An embedded store served on 127.0.0.1 behind a cuttable proxy.
pub struct ControlPlane {
    /// The store's own endpoint.
    pub direct: String,
    /// The proxy's endpoint (what services use).
    pub endpoint: String,
    proxy: CutProxy,
    _store: meshwork_testkit::store::Embedded,
}

impl ControlPlane {
    /// Starts one (lease TTLs down to 1 s).
    pub async fn start() -> ControlPlane {
        let store = meshwork_testkit::store::embedded().await;
        let addr: SocketAddr = store.endpoint.parse().unwrap();
        let proxy = CutProxy::start(addr).await;
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
