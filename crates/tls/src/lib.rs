//! TLS for every Meshwork listener (the gateway's downstream, the etcd port,
//! the HTTP port): rustls with ALPN, the certificate and key read from PEM
//! files and reloaded when they change (no restart), and optionally mutual
//! TLS — client certificates verified against a CA, the client's identity
//! (its certificate's common name) read with [`peer_common_name`]. For the
//! client side (the gateway's upstreams), [`client_config`] builds a rustls
//! client that verifies servers against a CA file or the system's roots and
//! can present its own certificate.

#[cfg(feature = "identity")]
pub mod identity;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio_rustls::TlsAcceptor;

/// Where the certificate and key live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain (leaf first).
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificates client certificates must chain to; when set,
    /// every client must present one (mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
}

/// TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn file_err(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// A certificate chain and its key from PEM files.
fn chain_and_key(
    cert_file: &Path,
    key_file: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| file_err(cert_file, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert_file, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err(cert_file, "no certificate found"));
    }
    let key =
        PrivateKeyDer::from_pem_file(key_file).map_err(|e| file_err(key_file, e.to_string()))?;
    Ok((certs, key))
}

/// The CA certificates in a PEM file (at least one).
fn roots_from(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| file_err(ca, e.to_string()))? {
        roots
            .add(c.map_err(|e| file_err(ca, e.to_string()))?)
            .map_err(|e| file_err(ca, e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(file_err(ca, "no CA certificate found"));
    }
    Ok(roots)
}

/// How a TLS client verifies servers and, optionally, proves who it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    /// PEM CA certificates to trust (absent: the system's roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain to present (mutual TLS), with `key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

/// The system's CA certificates, read once per process (every route set
/// the gateway compiles would read the whole directory again otherwise).
fn system_roots() -> Result<rustls::RootCertStore, TlsError> {
    static ROOTS: std::sync::OnceLock<rustls::RootCertStore> = std::sync::OnceLock::new();
    let roots = ROOTS.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        roots
    });
    if roots.is_empty() {
        return Err(file_err(
            Path::new("(system roots)"),
            "no CA certificate found on this system; give a ca_file",
        ));
    }
    Ok(roots.clone())
}

/// A rustls client trusting the system's roots and `extra_ca_pem` (PEM CA
/// certificates, such as a node's identity authority), offering `alpn`, with
/// no certificate of its own. Fails only if it would trust nothing.
pub fn client_config_trusting(
    extra_ca_pem: Option<&str>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = system_roots().unwrap_or_else(|_| rustls::RootCertStore::empty());
    if let Some(pem) = extra_ca_pem {
        for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let c = c.map_err(|e| file_err(Path::new("(identity authority)"), e.to_string()))?;
            roots
                .add(c)
                .map_err(|e| file_err(Path::new("(identity authority)"), e.to_string()))?;
        }
    }
    if roots.is_empty() {
        return Err(file_err(
            Path::new("(system roots)"),
            "no CA certificate to trust",
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// A rustls client for `cfg` offering the protocols `alpn`: servers are
/// verified (chain and name) against `ca_file` or the system's roots.
pub fn client_config(
    cfg: &ClientTlsConfig,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = match &cfg.ca_file {
        Some(ca) => roots_from(ca)?,
        None => system_roots()?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut client = match (&cfg.cert_file, &cfg.key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(c), Some(k)) => {
            let (certs, key) = chain_and_key(c, k)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| file_err(k, e.to_string()))?
        }
        (Some(c), None) | (None, Some(c)) => {
            return Err(file_err(
                c,
                "a client certificate needs both cert_file and key_file",
            ));
        }
    };
    client.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(client))
}

fn load(cfg: &TlsConfig) -> Result<CertifiedKey, TlsError> {
    let (certs, key) = chain_and_key(&cfg.cert_file, &cfg.key_file)?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| file_err(&cfg.key_file, e.to_string()))?;
    let ck = CertifiedKey::new(certs, signer);
    ck.keys_match().map_err(|e| {
        file_err(
            &cfg.key_file,
            format!("does not match the certificate: {e}"),
        )
    })?;
    Ok(ck)
}

fn mtimes(cfg: &TlsConfig) -> (Option<SystemTime>, Option<SystemTime>) {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (m(&cfg.cert_file), m(&cfg.key_file))
}

#[derive(Debug)]
struct Resolver {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The server certificate, reloadable from its files.
#[derive(Debug)]
pub struct TlsReloader {
    cfg: TlsConfig,
    resolver: Arc<Resolver>,
    seen: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
    server: Arc<rustls::ServerConfig>,
}

impl TlsReloader {
    /// Loads the certificate and key (errors name the file), offering HTTP/2
    /// and HTTP/1.1.
    pub fn load(cfg: TlsConfig) -> Result<Arc<Self>, TlsError> {
        Self::load_with_alpn(cfg, &[b"h2", b"http/1.1"])
    }

    /// [`load`](Self::load) offering the protocols `alpn` (gRPC: `h2` alone).
    pub fn load_with_alpn(cfg: TlsConfig, alpn: &[&[u8]]) -> Result<Arc<Self>, TlsError> {
        let seen = mtimes(&cfg);
        let ck = load(&cfg)?;
        let resolver = Arc::new(Resolver {
            current: ArcSwap::from_pointee(ck),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match &cfg.client_ca_file {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = roots_from(ca)?;
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| file_err(ca, e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut server = builder.with_cert_resolver(resolver.clone());
        server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(Self {
            cfg,
            resolver,
            seen: Mutex::new(seen),
            server: Arc::new(server),
        }))
    }

    /// An acceptor using the current (and future reloaded) certificate.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.server.clone())
    }

    /// Reloads if either file changed; the old certificate stays on error.
    /// Returns whether a new certificate is in use.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = mtimes(&self.cfg);
        let mut seen = self.seen.lock();
        if *seen == now {
            return Ok(false);
        }
        let ck = load(&self.cfg)?;
        self.resolver.current.store(Arc::new(ck));
        *seen = now;
        tracing::info!(cert = %self.cfg.cert_file.display(), "TLS certificate reloaded");
        Ok(true)
    }

    /// Reloads unconditionally.
    pub fn reload(&self) -> Result<(), TlsError> {
        let ck = load(&self.cfg)?;
        self.resolver.current.store(Arc::new(ck));
        *self.seen.lock() = mtimes(&self.cfg);
        Ok(())
    }

    /// Checks the files every `interval` until the reloader is dropped.
    pub fn spawn_watch(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let Some(this) = weak.upgrade() else { return };
                if let Err(e) = this.reload_if_changed() {
                    tracing::warn!(error = %e, "TLS reload failed; keeping the previous certificate");
                }
            }
        })
    }
}

/// The common name (CN) of the first certificate in `chain` (a verified
/// client's own certificate), if it has one.
pub fn peer_common_name(chain: &[CertificateDer<'_>]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(chain.first()?.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_common_name_is_read_from_a_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["orders.local".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "orders");
        let cert = params.self_signed(&key).unwrap();
        let der = CertificateDer::from(cert.der().to_vec());
        assert_eq!(peer_common_name(&[der]).as_deref(), Some("orders"));
        assert_eq!(peer_common_name(&[]), None);
        assert_eq!(
            peer_common_name(&[CertificateDer::from(vec![1, 2, 3])]),
            None
        );
    }

    #[test]
    fn mismatched_keys_and_missing_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let a = rcgen::generate_simple_self_signed(vec!["a".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b".into()]).unwrap();
        let cfg = TlsConfig {
            cert_file: write("a.pem", &a.cert.pem()),
            key_file: write("b.key", &b.key_pair.serialize_pem()),
            client_ca_file: None,
        };
        let e = TlsReloader::load(cfg).unwrap_err().to_string();
        assert!(e.contains("b.key") && e.contains("does not match"), "{e}");
        let cfg = TlsConfig {
            cert_file: dir.path().join("missing.pem"),
            key_file: write("a.key", &a.key_pair.serialize_pem()),
            client_ca_file: None,
        };
        let e = TlsReloader::load(cfg).unwrap_err().to_string();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
