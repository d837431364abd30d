//! The gateway's own service identity (service `meshwork-gateway`), set by
//! the node that issues service certificates: routes with
//! `forward.tls.identity` call their upstreams over mutual TLS with it.

use std::sync::{Arc, OnceLock};

use meshwork_tls::identity::Identity;

/// The service name the gateway's certificate carries.
pub const SERVICE: &str = "meshwork-gateway";

static IDENTITY: OnceLock<Arc<Identity>> = OnceLock::new();

/// Sets the gateway's identity (one per process: the first call wins; a
/// renewal replaces the certificate inside it).
pub fn set(identity: Arc<Identity>) {
    let _ = IDENTITY.set(identity);
}

/// The gateway's identity, when the node gave it one.
pub fn get() -> Option<&'static Arc<Identity>> {
    IDENTITY.get()
}
