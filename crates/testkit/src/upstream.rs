//! Real upstream servers on 127.0.0.1 for the code under test to call:
//! [`Upstream`] echoes what it received (as JSON) and answers on cue
//! (`/status/N`, `/hold`, `/close`, `/big`, `/stream-echo`, `/ws`, `/grpc`);
//! [`Flaky`] fails its first request (a 503 or a cut connection) and records
//! every body it received in full.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};

/// The head of a request an upstream received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path (without the query).
    pub path: String,
    /// Headers (names lower-case; the last value of a repeated one).
    pub headers: BTreeMap<String, String>,
}

impl Seen {
    fn of<B>(req: &Request<B>) -> Seen {
        Seen {
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
            headers: req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
        }
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// A real upstream HTTP server (h1 + h2c) that echoes what it received and
/// records every request's head.
#[derive(Debug)]
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests received.
    pub hits: Arc<AtomicU64>,
    /// Connections accepted.
    pub conns: Arc<AtomicU64>,
    /// Released by tests to let `/hold` requests finish.
    pub release: Arc<Notify>,
    /// Every request's head, in arrival order.
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Starts one on a free port; `name` is echoed in every answer.
    pub async fn start(name: &'static str) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), name).await
    }

    /// Starts one on `addr` (to bring one back where it was).
    pub async fn start_on(addr: SocketAddr, name: &'static str) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let conns = Arc::new(AtomicU64::new(0));
        let accepted = conns.clone();
        let release = Arc::new(Notify::new());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
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
                        let log = log.clone();
                        conns.spawn(async move {
                            let svc = service_fn(move |req| {
                                log.lock().push(Seen::of(&req));
                                echo(req, name, h.clone(), rel.clone())
                            });
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
            seen,
            stop: Some(stop_tx),
            task,
        }
    }

    /// Requests received so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// The heads of the requests received so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
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
    let headers = Seen::of(&req).headers;
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

/// How the upstream treats its first request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FirstHit {
    /// Reads the whole body, answers 503 (connection kept alive).
    Answer503,
    /// Reads the head and `n` body bytes, then closes the connection
    /// without answering.
    CloseAfter(usize),
}

/// An upstream that fails its first request, then echoes bodies and
/// records every body it received in full.
#[derive(Debug)]
pub struct Flaky {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests seen (whole or partial).
    hits: Arc<AtomicU64>,
    /// Complete bodies received, in order (the 503 one included).
    bodies: Arc<Mutex<Vec<Bytes>>>,
    /// Notified when the first hit has been failed.
    pub failed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Flaky {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Flaky {
    /// Starts one on a free port.
    pub async fn start(first: FirstHit) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Notify::new());
        let (h, b, f) = (hits.clone(), bodies.clone(), failed.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            let mut first_conn = true;
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if let (FirstHit::CloseAfter(n), true) = (first, first_conn) {
                    first_conn = false;
                    h.fetch_add(1, Ordering::SeqCst);
                    read_head_and(stream, n).await;
                    f.notify_one();
                    continue;
                }
                let (h, b, f) = (h.clone(), b.clone(), f.clone());
                conns.spawn(async move {
                    let svc =
                        service_fn(move |req| serve(req, first, h.clone(), b.clone(), f.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            hits,
            bodies,
            failed,
            task,
        }
    }

    /// Requests seen so far (whole or partial).
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// The complete bodies received, in order.
    pub fn bodies(&self) -> Vec<Bytes> {
        self.bodies.lock().clone()
    }
}

/// Reads a request head plus `n` more bytes, then drops the connection.
async fn read_head_and(mut s: TcpStream, n: usize) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let head_end = got.windows(4).position(|w| w == b"\r\n\r\n");
        if head_end.is_some_and(|e| got.len() >= e + 4 + n) {
            return;
        }
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(k) => got.extend_from_slice(&buf[..k]),
        }
    }
}

type RespBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn serve(
    req: Request<Incoming>,
    first: FirstHit,
    hits: Arc<AtomicU64>,
    bodies: Arc<Mutex<Vec<Bytes>>>,
    failed: Arc<Notify>,
) -> Result<Response<RespBody>, Infallible> {
    let n = hits.fetch_add(1, Ordering::SeqCst);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"bad body")).boxed());
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return Ok(r);
        }
    };
    bodies.lock().push(body.clone());
    let mut r = Response::new(Full::new(body).boxed());
    if n == 0 && first == FirstHit::Answer503 {
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        failed.notify_one();
    }
    Ok(r)
}
