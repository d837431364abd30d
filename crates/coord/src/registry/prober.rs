//! Runs health probes: HTTP (and HTTPS), TCP and gRPC (`grpc.health.v1`).
//!
//! A probe opens a fresh connection to one instance, asks one question and
//! closes the connection. Every probe is bounded by the check's timeout and
//! never panics, whatever the peer sends: the result is always a
//! [`ProbeOutcome`] with a short human-readable detail. What a check is and
//! how it is validated lives in [`super::probe`].

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::http::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use super::probe::{CheckSpec, HealthCheck, MAX_BODY_BYTES};

/// Largest gRPC health response a probe accepts.
const MAX_GRPC_MESSAGE_BYTES: usize = 64 * 1024;
/// Longest `detail` a probe reports, in bytes (peer-controlled text is cut).
const MAX_DETAIL_LEN: usize = 256;

/// The result of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// Whether the instance answered as healthy.
    pub healthy: bool,
    /// Short reason: why it failed, or what a success looked like.
    pub detail: String,
    /// Time from the start of the probe to its outcome.
    pub latency: Duration,
}

/// The client https checks verify servers with: the system's roots and,
/// once the node sets it, its identity authority ([`trust_for_https`]).
static HTTPS: std::sync::OnceLock<std::sync::Arc<rustls::ClientConfig>> =
    std::sync::OnceLock::new();

/// Makes https checks trust `ca_pem` (the node's identity authority) besides
/// the system's roots. Only the first call counts (one node per process).
pub fn trust_for_https(ca_pem: &str) -> Result<(), String> {
    let cfg = meshwork_tls::client_config_trusting(Some(ca_pem), &[b"http/1.1"])
        .map_err(|e| e.to_string())?;
    let _ = HTTPS.set(cfg);
    Ok(())
}

fn https_config() -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    if let Some(c) = HTTPS.get() {
        return Ok(c.clone());
    }
    meshwork_tls::client_config_trusting(None, &[b"http/1.1"]).map_err(|e| e.to_string())
}

/// Probes `addr` once as `check` says, within `check.policy.timeout_ms`.
///
/// `host` names the instance for the HTTP `Host` header and the gRPC
/// authority (`host:port`); when empty, the address itself is used.
pub async fn probe(check: &HealthCheck, addr: SocketAddr, host: &str) -> ProbeOutcome {
    probe_as(check, addr, host, None).await
}

/// [`probe`], an https check verifying `server_name` (an instance serving
/// with its service identity: the service's name) instead of the address.
pub async fn probe_as(
    check: &HealthCheck,
    addr: SocketAddr,
    host: &str,
    server_name: Option<&str>,
) -> ProbeOutcome {
    let timeout = check.policy.timeout();
    let started = Instant::now();
    let result = match &check.spec {
        CheckSpec::Http { scheme, .. } if scheme != "http" && scheme != "https" => Err(format!(
            "scheme {scheme:?} is not supported: use http or https"
        )),
        CheckSpec::Http {
            path,
            expected_status,
            headers,
            scheme,
        } => {
            let tls = (scheme == "https")
                .then(|| server_name.map_or_else(|| addr.ip().to_string(), str::to_owned));
            bounded(
                timeout,
                probe_http(addr, host, path, *expected_status, headers, tls),
            )
            .await
        }
        CheckSpec::Tcp {} => bounded(timeout, probe_tcp(addr)).await,
        CheckSpec::Grpc { service } => {
            bounded(timeout, probe_grpc(addr, host, service, timeout)).await
        }
    };
    let latency = started.elapsed();
    let (healthy, detail) = match result {
        Ok(detail) => (true, detail),
        Err(detail) => (false, detail),
    };
    ProbeOutcome {
        healthy,
        detail: truncate(detail),
        latency,
    }
}

/// Runs a probe, turning the timeout into a failure.
async fn bounded(
    timeout: Duration,
    fut: impl Future<Output = Result<String, String>>,
) -> Result<String, String> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {} ms", timeout.as_millis())),
    }
}

async fn probe_tcp(addr: SocketAddr) -> Result<String, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {}", describe_io(&e)))?;
    drop(stream);
    Ok("connected".to_owned())
}

/// The `host:port` authority for `host`, or the address when `host` is empty.
fn authority(addr: SocketAddr, host: &str) -> String {
    if host.is_empty() {
        addr.to_string()
    } else if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{}", addr.port())
    } else {
        format!("{host}:{}", addr.port())
    }
}

async fn probe_http(
    addr: SocketAddr,
    host: &str,
    path: &str,
    expected_status: Option<u16>,
    headers: &BTreeMap<String, String>,
    tls: Option<String>,
) -> Result<String, String> {
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(path)
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("invalid request: {e}"))?;
    let host_value = HeaderValue::from_str(&authority(addr, host))
        .map_err(|_| format!("invalid host {host:?}"))?;
    let request_headers = request.headers_mut();
    request_headers.insert(header::HOST, host_value);
    request_headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    request_headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static("meshwork-health-probe"),
    );
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        let value =
            HeaderValue::from_str(value).map_err(|_| format!("invalid value for header {name}"))?;
        request_headers.insert(name, value);
    }

    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {}", describe_io(&e)))?;
    // Probes are tiny request/response exchanges: do not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let Some(name) = tls else {
        return exchange(stream, request, expected_status).await;
    };
    let name = rustls_pki_types::ServerName::try_from(name.clone())
        .map_err(|_| format!("{name:?} is not a server name"))?;
    let stream = tokio_rustls::TlsConnector::from(https_config()?)
        .connect(name, stream)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    exchange(stream, request, expected_status).await
}

/// One request and its answer over `stream`.
async fn exchange(
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    request: Request<Empty<Bytes>>,
    expected_status: Option<u16>,
) -> Result<String, String> {
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {}", describe(&e)))?;

    let exchange = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("HTTP: {}", describe(&e)))?;
        let status = response.status();
        // Read (a bounded part of) the body so the server sees a completed
        // exchange, then drop it with the connection.
        let mut body = response.into_body();
        let mut read = 0usize;
        while read < MAX_BODY_BYTES {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        read = read.saturating_add(data.len());
                    }
                }
                Some(Err(e)) => {
                    return Err(format!(
                        "HTTP {}: reading body: {}",
                        status.as_u16(),
                        describe(&e)
                    ));
                }
            }
        }
        Ok(status)
    };

    let mut exchange = pin!(exchange);
    let mut connection = pin!(connection);
    let status = tokio::select! {
        biased;
        result = &mut exchange => result?,
        // The connection ended first (with `Connection: close` it may, once
        // the response is in): the exchange still holds the outcome.
        _ = &mut connection => exchange.await?,
    };
    judge_status(status, expected_status)
}

fn judge_status(status: StatusCode, expected: Option<u16>) -> Result<String, String> {
    let code = status.as_u16();
    match expected {
        None if status.is_success() => Ok(format!("HTTP {code}")),
        None => Err(format!("HTTP {code} (expected 2xx)")),
        Some(want) if want == code => Ok(format!("HTTP {code}")),
        Some(want) => Err(format!("HTTP {code} (expected {want})")),
    }
}

async fn probe_grpc(
    addr: SocketAddr,
    host: &str,
    service: &str,
    timeout: Duration,
) -> Result<String, String> {
    let mut endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("gRPC endpoint: {}", describe(&e)))?
        // The whole probe is bounded by `timeout` (see `bounded`); no
        // per-request deadline here, so the outer bound reports it.
        .connect_timeout(timeout);
    if !host.is_empty()
        && let Ok(origin) = format!("http://{}", authority(addr, host)).parse()
    {
        endpoint = endpoint.origin(origin);
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {}", describe(&e)))?;
    let mut client = HealthClient::new(channel).max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let response = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|status| describe_grpc_status(&status, service))?;
    let raw = response.into_inner().status;
    match ServingStatus::try_from(raw) {
        Ok(ServingStatus::Serving) => Ok("gRPC health: SERVING".to_owned()),
        Ok(other) => Err(format!("gRPC health: {}", other.as_str_name())),
        Err(_) => Err(format!("gRPC health: unknown status {raw}")),
    }
}

fn describe_grpc_status(status: &tonic::Status, service: &str) -> String {
    match status.code() {
        tonic::Code::NotFound => format!("gRPC health: service {service:?} unknown (NOT_FOUND)"),
        tonic::Code::Unimplemented => {
            "gRPC health: server does not implement grpc.health.v1.Health".to_owned()
        }
        code => match status.source() {
            Some(source) => format!("gRPC health: {code:?}: {}", describe(source)),
            None if status.message().is_empty() => format!("gRPC health: {code:?}"),
            None => format!("gRPC health: {code:?}: {}", status.message()),
        },
    }
}

/// Describes an I/O error by its kind when that says it all.
fn describe_io(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused
        | K::ConnectionReset
        | K::ConnectionAborted
        | K::NotConnected
        | K::AddrNotAvailable
        | K::TimedOut
        | K::BrokenPipe
        | K::UnexpectedEof
        | K::HostUnreachable
        | K::NetworkUnreachable
        | K::NetworkDown
        | K::PermissionDenied => e.kind().to_string(),
        _ => e.to_string(),
    }
}

/// Describes an error by its innermost I/O cause if there is one, otherwise
/// by its message chain.
fn describe(e: &(dyn StdError + 'static)) -> String {
    let mut current: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return describe_io(io);
        }
        current = err.source();
    }
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        let part = err.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = err.source();
    }
    text
}

/// Cuts a detail to [`MAX_DETAIL_LEN`] bytes on a character boundary.
fn truncate(mut detail: String) -> String {
    if detail.len() > MAX_DETAIL_LEN {
        let mut end = MAX_DETAIL_LEN;
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        detail.truncate(end);
        detail.push('…');
    }
    detail
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::registry::probe::tests::{check, grpc, http};
    use axum::Router;
    use axum::routing::get;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic_health::pb::HealthCheckResponse;
    use tonic_health::pb::health_server::{Health, HealthServer};

    async fn http_server() -> SocketAddr {
        let app = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/down",
                get(|| async { (axum::http::StatusCode::SERVICE_UNAVAILABLE, "down") }),
            )
            .route("/big", get(|| async { vec![b'x'; 1024 * 1024] }))
            .route(
                "/echo-host",
                get(|headers: axum::http::HeaderMap| async move {
                    let host = headers
                        .get("host")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let probe = headers
                        .get("x-probe")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    if host == format!("orders.internal:{probe}") {
                        axum::http::StatusCode::OK
                    } else {
                        axum::http::StatusCode::BAD_REQUEST
                    }
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        addr
    }

    /// A server that accepts connections and never answers.
    async fn silent_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        addr
    }

    /// A server that answers every connection with `reply` and closes it.
    async fn raw_server(reply: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = socket.read(&mut buf).await;
                    let _ = tokio::io::AsyncWriteExt::write_all(&mut socket, reply).await;
                });
            }
        });
        addr
    }

    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        addr
    }

    struct FakeHealth;

    #[tonic::async_trait]
    impl Health for FakeHealth {
        async fn check(
            &self,
            request: tonic::Request<HealthCheckRequest>,
        ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
            let status = match request.into_inner().service.as_str() {
                "" | "shop.Orders" => ServingStatus::Serving,
                "shop.Payments" => ServingStatus::NotServing,
                "shop.Weird" => {
                    return Ok(tonic::Response::new(HealthCheckResponse { status: 42 }));
                }
                _ => return Err(tonic::Status::not_found("unknown service")),
            };
            Ok(tonic::Response::new(HealthCheckResponse {
                status: status as i32,
            }))
        }

        type WatchStream = tokio_stream::Once<Result<HealthCheckResponse, tonic::Status>>;

        async fn watch(
            &self,
            _request: tonic::Request<HealthCheckRequest>,
        ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
            Ok(tonic::Response::new(tokio_stream::once(Ok(
                HealthCheckResponse {
                    status: ServingStatus::Serving as i32,
                },
            ))))
        }
    }

    async fn grpc_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(HealthServer::new(FakeHealth))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn http_2xx_is_healthy() {
        let addr = http_server().await;
        let out = probe(&check(http("/healthz", None), 2000), addr, "localhost").await;
        assert!(out.healthy, "{out:?}");
        assert_eq!(out.detail, "HTTP 200");
    }

    #[tokio::test]
    async fn http_503_is_unhealthy() {
        let addr = http_server().await;
        let out = probe(&check(http("/down", None), 2000), addr, "").await;
        assert!(!out.healthy);
        assert_eq!(out.detail, "HTTP 503 (expected 2xx)");
    }

    #[tokio::test]
    async fn http_expected_status_is_exact() {
        let addr = http_server().await;
        let out = probe(&check(http("/down", Some(503)), 2000), addr, "").await;
        assert!(out.healthy, "{out:?}");
        let out = probe(&check(http("/healthz", Some(204)), 2000), addr, "").await;
        assert!(!out.healthy);
        assert_eq!(out.detail, "HTTP 200 (expected 204)");
        let out = probe(&check(http("/missing", None), 2000), addr, "").await;
        assert_eq!(out.detail, "HTTP 404 (expected 2xx)");
    }

    #[tokio::test]
    async fn http_large_body_is_cut_short() {
        let addr = http_server().await;
        let out = probe(&check(http("/big", None), 2000), addr, "").await;
        assert!(out.healthy, "{out:?}");
    }

    #[tokio::test]
    async fn http_sends_host_and_custom_headers() {
        let addr = http_server().await;
        let port = addr.port().to_string();
        let spec = CheckSpec::Http {
            path: "/echo-host".to_owned(),
            expected_status: None,
            scheme: "http".to_owned(),
            headers: BTreeMap::from([("X-Probe".to_owned(), port)]),
        };
        let out = probe(&check(spec, 2000), addr, "orders.internal").await;
        assert!(out.healthy, "{out:?}");
    }

    #[tokio::test]
    async fn http_connection_refused() {
        let addr = closed_port().await;
        let out = probe(&check(http("/healthz", None), 2000), addr, "").await;
        assert!(!out.healthy);
        assert_eq!(out.detail, "connect: connection refused");
    }

    #[tokio::test]
    async fn http_silent_server_times_out() {
        let addr = silent_server().await;
        let out = probe(&check(http("/healthz", None), 200), addr, "").await;
        assert!(!out.healthy);
        assert_eq!(out.detail, "timed out after 200 ms");
        assert!(out.latency >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn http_garbage_reply_is_unhealthy() {
        let addr = raw_server(b"\x00\xffnot http at all\r\n\r\n").await;
        let out = probe(&check(http("/healthz", None), 2000), addr, "").await;
        assert!(!out.healthy);
        assert!(out.detail.starts_with("HTTP"), "{out:?}");
    }

    #[tokio::test]
    async fn http_truncated_body_is_unhealthy() {
        let addr =
            raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly a few bytes").await;
        let out = probe(&check(http("/healthz", None), 2000), addr, "").await;
        assert!(!out.healthy);
        assert!(out.detail.starts_with("HTTP 200: reading body"), "{out:?}");
    }

    #[tokio::test]
    async fn http_reply_then_close_is_read() {
        let addr = raw_server(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n").await;
        let out = probe(&check(http("/healthz", None), 2000), addr, "").await;
        assert!(out.healthy, "{out:?}");
        assert_eq!(out.detail, "HTTP 204");
    }

    #[tokio::test]
    async fn http_unsupported_scheme_fails_without_connecting() {
        let addr = closed_port().await;
        let spec = CheckSpec::Http {
            path: "/".to_owned(),
            expected_status: None,
            scheme: "gopher".to_owned(),
            headers: BTreeMap::new(),
        };
        let out = probe(&check(spec, 2000), addr, "").await;
        assert!(!out.healthy);
        assert!(out.detail.contains("not supported"), "{out:?}");
    }

    #[tokio::test]
    async fn tcp_accepting_is_healthy() {
        let addr = silent_server().await;
        let out = probe(&check(CheckSpec::Tcp {}, 2000), addr, "").await;
        assert!(out.healthy, "{out:?}");
        assert_eq!(out.detail, "connected");
    }

    #[tokio::test]
    async fn tcp_closed_port_is_unhealthy() {
        let addr = closed_port().await;
        let out = probe(&check(CheckSpec::Tcp {}, 2000), addr, "").await;
        assert!(!out.healthy);
        assert_eq!(out.detail, "connect: connection refused");
    }

    #[tokio::test]
    async fn grpc_serving_and_not_serving() {
        let addr = grpc_server().await;
        let out = probe(&check(grpc("shop.Orders"), 2000), addr, "").await;
        assert!(out.healthy, "{out:?}");
        assert_eq!(out.detail, "gRPC health: SERVING");
        let out = probe(&check(grpc(""), 2000), addr, "orders.internal").await;
        assert!(out.healthy, "{out:?}");
        let out = probe(&check(grpc("shop.Payments"), 2000), addr, "").await;
        assert!(!out.healthy);
        assert_eq!(out.detail, "gRPC health: NOT_SERVING");
        let out = probe(&check(grpc("shop.Nope"), 2000), addr, "").await;
        assert!(!out.healthy);
        assert_eq!(
            out.detail,
            "gRPC health: service \"shop.Nope\" unknown (NOT_FOUND)"
        );
        let out = probe(&check(grpc("shop.Weird"), 2000), addr, "").await;
        assert!(!out.healthy);
        assert_eq!(out.detail, "gRPC health: unknown status 42");
    }

    #[tokio::test]
    async fn grpc_against_plain_http_is_unhealthy() {
        let addr = http_server().await;
        let out = probe(&check(grpc(""), 2000), addr, "").await;
        assert!(!out.healthy, "{out:?}");
    }

    #[tokio::test]
    async fn grpc_closed_port_is_unhealthy() {
        let addr = closed_port().await;
        let out = probe(&check(grpc(""), 2000), addr, "").await;
        assert!(!out.healthy);
        assert_eq!(out.detail, "connect: connection refused");
    }

    #[tokio::test]
    async fn grpc_silent_server_times_out() {
        let addr = silent_server().await;
        let out = probe(&check(grpc(""), 200), addr, "").await;
        assert!(!out.healthy);
        assert_eq!(out.detail, "timed out after 200 ms");
    }

    #[test]
    fn detail_is_truncated_on_char_boundary() {
        let long = "é".repeat(300);
        let cut = truncate(long);
        assert!(cut.len() <= MAX_DETAIL_LEN + '…'.len_utf8());
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("short".to_owned()), "short");
    }

    #[test]
    fn authority_brackets_ipv6() {
        let addr: SocketAddr = "[::1]:8080".parse().unwrap();
        assert_eq!(authority(addr, ""), "[::1]:8080");
        assert_eq!(authority(addr, "::1"), "[::1]:8080");
        assert_eq!(authority(addr, "orders"), "orders:8080");
    }
}
