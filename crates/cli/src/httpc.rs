//! A minimal HTTP/1.1 client for the CLI's calls to a node's JSON API (one
//! connection per call; hyper does the protocol).

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

/// A response: status and body.
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: Bytes,
}

impl Reply {
    /// The body as JSON, or the API's error message as an error.
    pub(crate) fn json(self) -> Result<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&self.body).into_owned())
        });
        if self.status >= 400 {
            match meshwork_api::ErrorBody::parse(&self.body) {
                Some(e) => bail!("{} {}: {}", self.status, e.code, e.message),
                None => bail!("{} error: {v}", self.status),
            }
        }
        Ok(v)
    }
}

/// Sends one request to `http://{addr}{path}`.
pub(crate) async fn call(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<Bytes>,
) -> Result<Reply> {
    call_with_headers(addr, method, path, body, &[]).await
}

/// Like [`call`], with extra request headers. An `https://` address speaks
/// TLS, trusting the CA in `MESHWORK_CACERT` (with `MESHWORK_CERT` and
/// `MESHWORK_KEY` for mutual TLS).
pub(crate) async fn call_with_headers(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<Bytes>,
    headers: &[(String, String)],
) -> Result<Reply> {
    let tls = addr.starts_with("https://");
    let addr = addr
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| {
            format!("connecting to the Meshwork HTTP API at {addr} (is the node up? see --http)")
        })?;
    let _ = stream.set_nodelay(true);
    if !tls {
        return exchange(stream, addr, method, path, body, headers).await;
    }
    let connector = tokio_rustls::TlsConnector::from(client_config()?);
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = rustls_pki_types::ServerName::try_from(host.to_string())
        .with_context(|| format!("{host:?} is not a host name or address"))?;
    let stream = connector.connect(name, stream).await.with_context(|| {
        format!("TLS with {addr} (is MESHWORK_CACERT the CA that signed its certificate?)")
    })?;
    exchange(stream, addr, method, path, body, headers).await
}

/// The TLS client settings from `MESHWORK_CACERT`, `MESHWORK_CERT`, `MESHWORK_KEY`.
fn client_config() -> Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let tls = meshwork_etcd::client::ClientTls::from_env()
        .context("an https:// address needs MESHWORK_CACERT: the CA certificate to trust")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&tls.ca_file)
        .with_context(|| format!("reading {}", tls.ca_file.display()))?
    {
        roots
            .add(c.with_context(|| format!("reading {}", tls.ca_file.display()))?)
            .with_context(|| format!("{}: not a CA certificate", tls.ca_file.display()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let cfg = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("reading {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("reading {}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading {}", key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(std::sync::Arc::new(cfg))
}

/// One HTTP/1.1 exchange on a connected stream.
async fn exchange(
    io: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    addr: &str,
    method: &str,
    path: &str,
    body: Option<Bytes>,
    headers: &[(String, String)],
) -> Result<Reply> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .context("HTTP handshake")?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr);
    if body.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    for (name, value) in headers {
        req = req.header(name.as_str(), value.as_str());
    }
    // An API token from the environment, or else the console login the node
    // was configured with.
    if let Ok(token) = std::env::var("MESHWORK_TOKEN") {
        req = req.header(
            hyper::header::AUTHORIZATION,
            format!("Bearer {}", token.trim()),
        );
    } else if let Ok(password) = std::env::var("MESHWORK_CONSOLE_PASSWORD") {
        let user = std::env::var("MESHWORK_CONSOLE_USER").unwrap_or_else(|_| "admin".into());
        req = req.header(
            hyper::header::AUTHORIZATION,
            meshwork_console::auth::basic(&user, &password),
        );
    }
    let req = req
        .body(Full::new(body.unwrap_or_default()))
        .context("building the request")?;
    let resp = sender
        .send_request(req)
        .await
        .context("sending the request")?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("reading the response")?
        .to_bytes();
    driver.abort();
    Ok(Reply { status, body })
}

/// Percent-encodes a query or path component.
pub(crate) fn enc(s: &str) -> String {
    meshwork_api::percent_encode(s)
}
