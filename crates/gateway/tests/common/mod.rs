//! Test fixtures: real upstream servers, a gateway on a real socket, clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshwork_gateway::{Gateway, GatewayConfig, RouteSet, StaticResolver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};

/// A real upstream HTTP server (h1 + h2c) that echoes what it received.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    /// Connections accepted.
    pub conns: Arc<AtomicU64>,
    /// Released by tests to let `/hold` requests finish.
    pub release: Arc<Notify>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start(name: &'static str) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), name).await
    }

    pub async fn start_on(addr: SocketAddr, name: &'static str) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let conns = Arc::new(AtomicU64::new(0));
        let accepted = conns.clone();
        let release = Arc::new(Notify::new());
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let h = hits.clone();
        let rel = release.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    r = listener.accept() => {
                        let Ok((stream, _)) = r else { continue };
                        accepted.fetch_add(1, Ordering::SeqCst);
                        let h = h.clone();
                        let rel = rel.clone();
                        conns.spawn(async move {
                            let svc = service_fn(move |req| echo(req, name, h.clone(), rel.clone()));
                            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                }
            }
            conns.abort_all();
        });
        Self {
            addr,
            hits,
            conns,
            release,
            stop: Some(stop_tx),
            task,
        }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// Stops accepting and drops every connection.
    pub async fn kill(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|n| match n {}).boxed()
}

async fn echo(
    mut req: Request<Incoming>,
    name: &'static str,
    hits: Arc<AtomicU64>,
    release: Arc<Notify>,
) -> Result<Response<Body>, Infallible> {
    hits.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    if let Some(code) = path.strip_prefix("/status/") {
        let code: u16 = code.parse().unwrap_or(500);
        let mut r = Response::new(full(format!("status {code} from {name}")));
        *r.status_mut() = StatusCode::from_u16(code).unwrap();
        return Ok(r);
    }
    if path == "/hold" || path.strip_prefix("/hold-if/") == Some(name) {
        release.notified().await;
    }
    if path == "/close" {
        let mut r = Response::new(full("bye"));
        r.headers_mut()
            .insert("connection", "close".parse().unwrap());
        return Ok(r);
    }
    if path == "/big" {
        return Ok(Response::new(full(vec![b'x'; 64 * 1024])));
    }
    if path == "/stream-echo" {
        // Streams the request body back as it arrives.
        let body = req.into_body();
        return Ok(Response::new(body.boxed()));
    }
    if path == "/ws" {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = upgrade.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let mut out = b"echo:".to_vec();
                            out.extend_from_slice(&buf[..n]);
                            if io.write_all(&out).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        });
        let mut r = Response::new(full(""));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("upgrade", "websocket".parse().unwrap());
        r.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        return Ok(r);
    }
    if path == "/grpc" {
        // A gRPC-style response: data frame then trailers.
        let frames = futures_util::stream::iter(vec![
            Ok::<_, hyper::Error>(hyper::body::Frame::data(Bytes::from_static(
                b"\0\0\0\0\x02hi",
            ))),
            Ok(hyper::body::Frame::trailers({
                let mut t = http::HeaderMap::new();
                t.insert("grpc-status", "0".parse().unwrap());
                t.insert("grpc-message", "ok".parse().unwrap());
                t
            })),
        ]);
        let mut r = Response::new(http_body_util::StreamBody::new(frames).boxed());
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        return Ok(r);
    }
    let method = req.method().to_string();
    let query = req.uri().query().map(str::to_owned);
    let version = format!("{:?}", req.version());
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let json = serde_json::json!({
        "upstream": name,
        "method": method,
        "path": path,
        "query": query,
        "version": version,
        "headers": headers,
        "body_len": body.len(),
    });
    let mut r = Response::new(full(serde_json::to_vec(&json).unwrap()));
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r.headers_mut().insert("x-upstream", name.parse().unwrap());
    r.headers_mut()
        .insert("connection", "keep-alive, x-hop".parse().unwrap());
    r.headers_mut().insert("x-hop", "secret".parse().unwrap());
    Ok(r)
}

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

/// Sends raw bytes and reads until the server closes or a full response
/// head plus `Content-Length` body has arrived.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if response_complete(&out) {
                        break;
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("raw read timed out");
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends raw bytes and reads until the gateway closes the connection
/// (fails the test if it does not within 20 s).
pub async fn raw_until_close(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .expect("the gateway did not close the connection")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

fn response_complete(b: &[u8]) -> bool {
    let s = String::from_utf8_lossy(b);
    let Some(head_end) = s.find("\r\n\r\n") else {
        return false;
    };
    let head = s[..head_end].to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match len {
        Some(n) => b.len() >= head_end + 4 + n,
        None => false,
    }
}

/// Polls `f` until it returns true or the deadline passes.
pub async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if f().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
