//! TLS for client connections: rustls with ALPN (`h2`, `http/1.1`), the
//! certificate and key read from PEM files and reloaded when they change.

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

fn load(cfg: &TlsConfig) -> Result<CertifiedKey, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_file)
        .map_err(|e| file_err(&cfg.cert_file, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(&cfg.cert_file, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err(&cfg.cert_file, "no certificate found"));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .map_err(|e| file_err(&cfg.key_file, e.to_string()))?;
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
    /// Loads the certificate and key (errors name the file).
    pub fn load(cfg: TlsConfig) -> Result<Arc<Self>, TlsError> {
        let seen = mtimes(&cfg);
        let ck = load(&cfg)?;
        let resolver = Arc::new(Resolver {
            current: ArcSwap::from_pointee(ck),
        });
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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
