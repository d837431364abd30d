//! Test fixtures: a gateway on a real socket and clients; the upstreams, raw
//! HTTP and `until` come from meshwork-testkit.
#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    unreachable_pub
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use meshwork_gateway::{Gateway, GatewayConfig, RouteSet, StaticResolver};
pub use meshwork_testkit::http::{raw, raw_until_close};
pub use meshwork_testkit::until;
pub use meshwork_testkit::upstream::Upstream;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A gateway serving on a real socket.
pub struct Gw {
    pub addr: SocketAddr,
    pub gateway: Gateway,
    pub resolver: Arc<StaticResolver>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Gw {
    pub async fn start(routes: &str) -> Self {
        Self::start_with(GatewayConfig::default(), routes).await
    }

    pub async fn start_with(cfg: GatewayConfig, routes: &str) -> Self {
        let resolver = Arc::new(StaticResolver::new());
        let gateway = Gateway::new(cfg, resolver.clone()).unwrap();
        gateway
            .apply(RouteSet::from_toml(routes).unwrap())
            .await
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let g = gateway.clone();
        let task = tokio::spawn(meshwork_gateway::serve(listener, g, async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            gateway,
            resolver,
            stop: Some(tx),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }
}

pub type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<Bytes>,
>;

pub fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub struct Got {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The error code of a gateway JSON error.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

pub async fn send(c: &Client, req: Request<Full<Bytes>>) -> Got {
    let resp = tokio::time::timeout(Duration::from_secs(20), c.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(c: &Client, url: &str) -> Got {
    send(c, Request::get(url).body(Full::new(Bytes::new())).unwrap()).await
}

pub fn req(method: &str, url: &str) -> http::request::Builder {
    Request::builder().method(method).uri(url)
}

pub fn empty() -> Full<Bytes> {
    Full::new(Bytes::new())
}

/// How long a test waits for a condition other tasks bring about.
pub const WITHIN: Duration = Duration::from_secs(20);
