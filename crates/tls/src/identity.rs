//! Service identity (feature `identity`): an authority that signs
//! short-lived certificates for services ([`Authority`]), the request a
//! service makes for one without its key leaving the process
//! ([`new_request`]), and the rustls configurations of a service holding one
//! ([`Identity`]): a server that verifies the certificates callers present
//! and a client that presents its own and checks that the server is the
//! service it called.
//!
//! A service's certificate names it three ways: the common name, a DNS name
//! (so any TLS client verifying the server name `orders` accepts it) and the
//! URI `spiffe://meshwork/service/orders`, which [`peer_service`] reads.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The URI every service certificate carries, before the service's name.
pub const URI_PREFIX: &str = "spiffe://meshwork/service/";

/// What went wrong making, signing or loading a certificate.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The service name cannot be a certificate's name.
    #[error(
        "service name {0:?} cannot name a certificate: use 1 to 63 letters, digits, '-' and '.'"
    )]
    Name(String),
    /// A name kept for Meshwork's own components.
    #[error("service name {0:?} is reserved for Meshwork's own components (meshwork-*, localhost)")]
    Reserved(String),
    /// A signing request that is not one, or whose signature does not verify.
    #[error("certificate signing request: {0}")]
    Request(String),
    /// The authority's files.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
    /// PEM that holds no usable certificate or key.
    #[error("{0}")]
    Pem(String),
    /// rcgen or rustls refused.
    #[error("{0}")]
    Crypto(String),
}

/// Whether `service` can name a certificate: a DNS label-like name (letters,
/// digits, `-` and `.`, not starting or ending with `-` or `.`), at most 63.
pub fn valid_service(service: &str) -> bool {
    !service.is_empty()
        && service.len() <= 63
        && service
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !service.starts_with(['-', '.'])
        && !service.ends_with(['-', '.'])
        && !service.contains("..")
}

/// Names the authority signs no request for: `meshwork-*` (Meshwork's own
/// components, such as the gateway's `meshwork-gateway`, which the node
/// signs itself) and `localhost` (node certificates carry it).
pub fn reserved(service: &str) -> bool {
    service.starts_with("meshwork-") || service.eq_ignore_ascii_case("localhost")
}

/// The certificate's fields for `service`, valid from a minute ago (a peer
/// whose clock is a little behind accepts it at once) for `ttl`.
fn service_params(service: &str, ttl: Duration) -> Result<CertificateParams, IdentityError> {
    if !valid_service(service) {
        return Err(IdentityError::Name(service.to_owned()));
    }
    let crypto = |e: rcgen::Error| IdentityError::Crypto(e.to_string());
    let mut p = CertificateParams::default();
    // No common name: where a common name means a user (etcd's
    // --client-cert-auth), a service's certificate must name none.
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![
        SanType::DnsName(service.try_into().map_err(crypto)?),
        SanType::URI(
            format!("{URI_PREFIX}{service}")
                .try_into()
                .map_err(crypto)?,
        ),
    ];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // A service serves its callers and calls others.
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(1);
    p.not_after =
        now + time::Duration::try_from(ttl).map_err(|e| IdentityError::Crypto(e.to_string()))?;
    Ok(p)
}

/// A certificate authority: its certificate and key, from `ca.pem` and
/// `ca-key.pem` (what `meshwork cert init` writes).
pub struct Authority {
    ca: rcgen::Certificate,
    key: KeyPair,
    pem: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

impl Authority {
    /// Makes a new authority valid for `years` and writes it into `dir`
    /// (`ca.pem`, and `ca-key.pem` readable by its owner only), refusing to
    /// overwrite one.
    pub fn create(dir: &Path, years: u32) -> Result<Authority, IdentityError> {
        let file = |path: std::path::PathBuf, e: std::io::Error| IdentityError::File {
            path,
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| file(dir.to_owned(), e))?;
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
        if cert_path.exists() || key_path.exists() {
            return Err(IdentityError::File {
                path: dir.to_owned(),
                message: "already holds an authority (ca.pem / ca-key.pem); remove it first to make a new one".into(),
            });
        }
        let crypto = |e: rcgen::Error| IdentityError::Crypto(e.to_string());
        let key = KeyPair::generate().map_err(crypto)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // A name of its own: verifiers tell two authorities apart by name first.
        let tag = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
            ^ u128::from(std::process::id());
        dn.push(
            DnType::CommonName,
            format!(
                "Meshwork local CA {:08x}",
                (tag as u32) ^ ((tag >> 32) as u32)
            ),
        );
        dn.push(DnType::OrganizationName, "Meshwork");
        p.distinguished_name = dn;
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + time::Duration::days(365 * i64::from(years.clamp(1, 100)));
        let ca = p.self_signed(&key).map_err(crypto)?;
        write_private(&key_path, &key.serialize_pem()).map_err(|e| file(key_path.clone(), e))?;
        std::fs::write(&cert_path, ca.pem()).map_err(|e| file(cert_path.clone(), e))?;
        let pem = ca.pem();
        Ok(Authority { ca, key, pem })
    }

    /// The authority in `dir` (`ca.pem`, `ca-key.pem`).
    pub fn load(dir: &Path) -> Result<Authority, IdentityError> {
        let read = |f: &str| {
            let path = dir.join(f);
            std::fs::read_to_string(&path).map_err(|e| IdentityError::File {
                message: format!(
                    "{e} (make an authority with: meshwork cert init --dir {})",
                    dir.display()
                ),
                path,
            })
        };
        let pem = read("ca.pem")?;
        let bad = |f: &str, e: rcgen::Error| IdentityError::File {
            path: dir.join(f),
            message: e.to_string(),
        };
        let key = KeyPair::from_pem(&read("ca-key.pem")?).map_err(|e| bad("ca-key.pem", e))?;
        let ca = CertificateParams::from_ca_cert_pem(&pem)
            .map_err(|e| bad("ca.pem", e))?
            .self_signed(&key)
            .map_err(|e| bad("ca.pem", e))?;
        Ok(Authority { ca, key, pem })
    }

    /// The authority's certificate (PEM), which peers trust.
    pub fn ca_pem(&self) -> &str {
        &self.pem
    }

    /// Signs `service`'s certificate for the key of the request `csr_pem`
    /// (whose signature proves the requester holds it), valid for `ttl`.
    /// Only the key is taken from the request: names, usages and lifetime
    /// are the authority's. Returns the PEM chain (leaf, then authority).
    pub fn sign_request(
        &self,
        service: &str,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<String, IdentityError> {
        if reserved(service) {
            return Err(IdentityError::Reserved(service.to_owned()));
        }
        let der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
                .map_err(|e| IdentityError::Request(format!("not a PEM request: {e}")))?;
        self.sign_der(service, &der, ttl)
    }

    fn sign_der(
        &self,
        service: &str,
        der: &rustls_pki_types::CertificateSigningRequestDer<'_>,
        ttl: Duration,
    ) -> Result<String, IdentityError> {
        // Parsing verifies the request's signature: proof its maker holds the key.
        let mut csr = CertificateSigningRequestParams::from_der(der).map_err(|e| {
            IdentityError::Request(match e {
                rcgen::Error::RingUnspecified => "its signature does not verify".into(),
                e => e.to_string(),
            })
        })?;
        csr.params = service_params(service, ttl)?;
        let cert = csr
            .signed_by(&self.ca, &self.key)
            .map_err(|e| IdentityError::Crypto(e.to_string()))?;
        Ok(format!("{}{}", cert.pem(), self.pem))
    }

    /// A new key and `name`'s certificate for it, valid for `ttl`: for the
    /// node's own clients (the gateway calling services). Returns the PEM
    /// chain and the PEM key.
    pub fn issue(&self, name: &str, ttl: Duration) -> Result<(String, String), IdentityError> {
        let key = KeyPair::generate().map_err(|e| IdentityError::Crypto(e.to_string()))?;
        let cert = service_params(name, ttl)?
            .signed_by(&key, &self.ca, &self.key)
            .map_err(|e| IdentityError::Crypto(e.to_string()))?;
        Ok((format!("{}{}", cert.pem(), self.pem), key.serialize_pem()))
    }
}

/// Writes `text` to `path` readable by its owner only, synced to disk.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// A new key and a request for `service`'s certificate: `(key_pem,
/// csr_pem)`. The key stays with the caller; the request goes to the
/// authority.
pub fn new_request(service: &str) -> Result<(String, String), IdentityError> {
    if !valid_service(service) {
        return Err(IdentityError::Name(service.to_owned()));
    }
    let crypto = |e: rcgen::Error| IdentityError::Crypto(e.to_string());
    let key = KeyPair::generate().map_err(crypto)?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, service);
    p.distinguished_name = dn;
    let csr = p.serialize_request(&key).map_err(crypto)?;
    Ok((key.serialize_pem(), csr.pem().map_err(crypto)?))
}

/// The service a peer's certificate names (its `spiffe://meshwork/service/`
/// URI), if it is a service certificate.
pub fn peer_service(chain: &[CertificateDer<'_>]) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(chain.first()?.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => u
            .strip_prefix(URI_PREFIX)
            .filter(|s| valid_service(s))
            .map(str::to_owned),
        _ => None,
    })
}

/// Checks a certificate an authority answered before trusting it: the leaf
/// carries our key (`key_pem`), names `service`, and chains to `ca_pem`
/// (signature, validity, usage); and, when the caller pinned an authority
/// (`pinned_ca_pem`), `ca_pem` is that one. An answer that fails any of
/// these is not ours, whoever wrote it into the store.
pub fn check_issued(
    service: &str,
    chain_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    pinned_ca_pem: Option<&str>,
) -> Result<(), IdentityError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let pem_err = |e: rustls_pki_types::pem::Error| IdentityError::Pem(e.to_string());
    let ders = |pem: &str| -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err)
    };
    let chain = ders(chain_pem)?;
    let leaf = chain
        .first()
        .ok_or_else(|| IdentityError::Pem("no certificate in the answer".into()))?;
    let cas = ders(ca_pem)?;
    if let Some(pinned) = pinned_ca_pem
        && ders(pinned)? != cas
    {
        return Err(IdentityError::Request(
            "the answer's authority is not the pinned one (MESHWORK_IDENTITY_CA)".into(),
        ));
    }
    let key = KeyPair::from_pem(key_pem).map_err(|e| IdentityError::Crypto(e.to_string()))?;
    let (_, cert) =
        X509Certificate::from_der(leaf.as_ref()).map_err(|e| IdentityError::Pem(e.to_string()))?;
    if cert.public_key().raw != key.public_key_der().as_slice() {
        return Err(IdentityError::Request(
            "the answer's certificate is not for our key".into(),
        ));
    }
    if peer_service(std::slice::from_ref(leaf)).as_deref() != Some(service) {
        return Err(IdentityError::Request(format!(
            "the answer's certificate does not name {service}"
        )));
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in cas {
        roots
            .add(c)
            .map_err(|e| IdentityError::Crypto(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| IdentityError::Crypto(e.to_string()))?;
    verifier
        .verify_client_cert(leaf, &chain[1..], rustls_pki_types::UnixTime::now())
        .map_err(|e| IdentityError::Request(format!("the answer's certificate: {e}")))?;
    Ok(())
}

/// When a PEM certificate (the first in `chain_pem`) stops being valid.
pub fn not_after(chain_pem: &str) -> Result<SystemTime, IdentityError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let der = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .ok_or_else(|| IdentityError::Pem("no certificate in the chain".into()))?
        .map_err(|e| IdentityError::Pem(e.to_string()))?;
    let (_, cert) =
        X509Certificate::from_der(der.as_ref()).map_err(|e| IdentityError::Pem(e.to_string()))?;
    let secs = cert.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

fn certified(chain_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, IdentityError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| IdentityError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(IdentityError::Pem("no certificate in the chain".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| IdentityError::Pem(e.to_string()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| IdentityError::Crypto(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(certs, signer)))
}

/// A service's identity: its current certificate (replaced in place when
/// renewed: connections made after see the new one) and the authority it
/// trusts.
pub struct Identity {
    service: String,
    current: ArcSwap<CertifiedKey>,
    roots: Arc<rustls::RootCertStore>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// `service`'s identity from its PEM chain and key, trusting `ca_pem`.
    pub fn new(
        service: &str,
        chain_pem: &str,
        key_pem: &str,
        ca_pem: &str,
    ) -> Result<Arc<Identity>, IdentityError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots
                .add(c.map_err(|e| IdentityError::Pem(e.to_string()))?)
                .map_err(|e| IdentityError::Crypto(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(IdentityError::Pem("no authority certificate".into()));
        }
        Ok(Arc::new(Identity {
            service: service.to_owned(),
            current: ArcSwap::new(certified(chain_pem, key_pem)?),
            roots: Arc::new(roots),
        }))
    }

    /// The service it names.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Replaces the certificate (a renewal).
    pub fn renew(&self, chain_pem: &str, key_pem: &str) -> Result<(), IdentityError> {
        self.current.store(certified(chain_pem, key_pem)?);
        Ok(())
    }

    /// A server that presents this identity and verifies the certificate a
    /// caller presents against the authority. A caller without one still
    /// connects (health checks, metrics scrapers): whoever serves decides
    /// what it may do ([`peer_service`] on the connection's chain).
    pub fn server_config(
        self: &Arc<Self>,
        alpn: &[&[u8]],
    ) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| IdentityError::Crypto(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| IdentityError::Crypto(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }

    /// A client that presents this identity and accepts a server only with
    /// a certificate from the authority naming the server name it dials
    /// (the called service's name).
    pub fn client_config(
        self: &Arc<Self>,
        alpn: &[&[u8]],
    ) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| IdentityError::Crypto(e.to_string()))?
            .with_root_certificates(self.roots.clone())
            .with_client_cert_resolver(self.clone());
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }
}

impl ResolvesServerCert for Identity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ResolvesClientCert for Identity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn authority(dir: &Path) -> Authority {
        Authority::create(dir, 1).unwrap();
        // Made once, loaded as a node does; a second one is refused.
        assert!(Authority::create(dir, 1).is_err());
        Authority::load(dir).unwrap()
    }

    #[test]
    fn a_signed_request_names_the_service_and_only_it() {
        let dir = tempfile::tempdir().unwrap();
        let ca = authority(dir.path());
        let (key, csr) = new_request("orders").unwrap();
        // The authority names the service whose request it is, whatever
        // the request says.
        let chain = ca
            .sign_request("orders", &csr, Duration::from_secs(3600))
            .unwrap();
        let certs: Vec<_> = CertificateDer::pem_slice_iter(chain.as_bytes())
            .map(Result::unwrap)
            .collect();
        assert_eq!(certs.len(), 2, "leaf and authority");
        assert_eq!(peer_service(&certs).as_deref(), Some("orders"));
        let left = not_after(&chain)
            .unwrap()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(left <= Duration::from_secs(3600) && left > Duration::from_secs(3500));
        Identity::new("orders", &chain, &key, ca.ca_pem()).unwrap();
        check_issued("orders", &chain, &key, ca.ca_pem(), Some(ca.ca_pem())).unwrap();
        // Not ours: another key, another service, another (pinned) authority.
        let (other_key, _) = new_request("orders").unwrap();
        assert!(check_issued("orders", &chain, &other_key, ca.ca_pem(), None).is_err());
        assert!(check_issued("billing", &chain, &key, ca.ca_pem(), None).is_err());
        let dir2 = tempfile::tempdir().unwrap();
        let other = Authority::create(dir2.path(), 1).unwrap();
        assert!(check_issued("orders", &chain, &key, ca.ca_pem(), Some(other.ca_pem())).is_err());
        assert!(check_issued("orders", &chain, &key, other.ca_pem(), None).is_err());
        // Garbage and bad names are refused with what is wrong.
        assert!(matches!(
            ca.sign_request("orders", "not a request", Duration::from_secs(60)),
            Err(IdentityError::Request(_))
        ));
        assert!(matches!(
            ca.sign_request("../x", &csr, Duration::from_secs(60)),
            Err(IdentityError::Name(_))
        ));
        // Names of Meshwork's own components are not for requests.
        for name in ["meshwork-gateway", "localhost"] {
            assert!(matches!(
                ca.sign_request(name, &csr, Duration::from_secs(60)),
                Err(IdentityError::Reserved(_))
            ));
        }
        // A request whose signature does not verify (its last byte changed).
        let mut tampered = pem_body(&csr);
        if let Some(b) = tampered.last_mut() {
            *b ^= 0x55;
        }
        let tampered = rustls_pki_types::CertificateSigningRequestDer::from(tampered);
        assert!(matches!(
            ca.sign_der("orders", &tampered, Duration::from_secs(60)),
            Err(IdentityError::Request(_))
        ));
    }

    fn pem_body(pem: &str) -> Vec<u8> {
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    #[test]
    fn names() {
        for ok in ["orders", "order-v2", "a.b", "x1"] {
            assert!(valid_service(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", ".a", "a..b", "a/b", "a_b", &"x".repeat(64)] {
            assert!(!valid_service(bad), "{bad}");
        }
    }
}
