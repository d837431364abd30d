//! An HTTPS connector for hyper-util's pooled client and tonic's channel
//! (the exporter's OTLP clients, the SDK's calls to services serving with
//! their identity): TCP, then TLS with the URI's host — or a fixed name, the
//! called service's — as SNI and the name the server's certificate must
//! carry.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Connects to `https://HOST:PORT` URIs over TLS.
#[derive(Clone)]
pub struct HttpsConnector {
    tls: tokio_rustls::TlsConnector,
    name: Option<ServerName<'static>>,
    connect_timeout: Option<std::time::Duration>,
}

impl HttpsConnector {
    /// A connector with `cfg` that verifies the URI's host.
    pub fn new(cfg: Arc<rustls::ClientConfig>) -> Self {
        Self {
            tls: tokio_rustls::TlsConnector::from(cfg),
            name: None,
            connect_timeout: None,
        }
    }

    /// Verifies (and sends as SNI) `name` instead of the URI's host: a
    /// service's name when dialling its instances by address.
    pub fn with_server_name(mut self, name: &str) -> Result<Self, String> {
        self.name = Some(
            ServerName::try_from(name.to_owned())
                .map_err(|_| format!("{name:?} is not a DNS name"))?,
        );
        Ok(self)
    }

    /// Gives up a TCP connect after `timeout`.
    pub fn with_connect_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }
}

/// A TLS connection as hyper sees it.
pub struct TlsIo(TokioIo<TlsStream<TcpStream>>);

impl Connection for TlsIo {
    fn connected(&self) -> Connected {
        let h2 = self.0.inner().get_ref().1.alpn_protocol() == Some(b"h2");
        if h2 {
            Connected::new().negotiated_h2()
        } else {
            Connected::new()
        }
    }
}

impl hyper::rt::Read for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<http::Uri> for HttpsConnector {
    type Response = TlsIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (tls, fixed, limit) = (self.tls.clone(), self.name.clone(), self.connect_timeout);
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or("the collector URL has no host")?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let name = match fixed {
                Some(n) => n,
                None => ServerName::try_from(host.clone())
                    .map_err(|_| format!("{host:?} is neither a DNS name nor an IP address"))?,
            };
            let connect = TcpStream::connect((host.as_str(), port));
            let tcp = match limit {
                Some(t) => tokio::time::timeout(t, connect)
                    .await
                    .map_err(|_| format!("connect to {host}:{port} timed out"))??,
                None => connect.await?,
            };
            let _ = tcp.set_nodelay(true);
            let stream = tls.connect(name, tcp).await?;
            Ok(TlsIo(TokioIo::new(stream)))
        })
    }
}
