//! Service certificates through the store, so that the same code works on
//! the embedded store and on an etcd cluster, under the store's own auth.
//!
//! A service instance makes its own key (it never leaves the process) and a
//! signing request, and puts the request at
//! `/meshwork/identity/requests/{service}/{id}` under its session lease
//! ([`obtain`]). A node holding the authority's key ([`Issuer`], feature
//! `server`) signs a short-lived certificate naming the service whose key
//! the request sits under and puts it, with the authority's certificate, at
//! `/meshwork/identity/issued/{service}/{id}` under the same lease; the
//! instance takes it and deletes both. Who may get a service's certificate
//! is who may write under its request prefix: with store auth on, a role
//! with write on `/meshwork/identity/requests/NAME/`, granted with the one
//! that lets it register as NAME.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, WatchItem, is_delete};
use crate::error::{CoordError, Result};

/// Where requests wait.
pub const REQUESTS: &str = "/meshwork/identity/requests/";
/// The authority's certificate (public), put by the issuers, read by nodes
/// that check services' health over https without holding the authority.
pub const CA_KEY: &str = "/meshwork/identity/ca";
/// Where certificates are answered.
pub const ISSUED: &str = "/meshwork/identity/issued/";
/// The largest request the issuer reads.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// A request as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertRequest {
    /// The PEM certificate signing request.
    pub csr: String,
}

/// The answer as stored: a certificate, or why none was made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertAnswer {
    /// The PEM chain (leaf, then authority).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
    /// The authority's PEM certificate, which peers' certificates chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// Why the request was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A certificate obtained: the PEM chain and the authority's PEM.
#[derive(Debug, Clone)]
pub struct Obtained {
    /// Leaf, then authority.
    pub chain: String,
    /// The authority.
    pub ca: String,
}

fn key_end(key: &str) -> Bytes {
    let mut end = key.as_bytes().to_vec();
    end.push(0);
    Bytes::from(end)
}

/// The authority's certificate the issuers published, if any.
pub async fn published_ca(backend: &Backend) -> Result<Option<String>> {
    Ok(backend
        .get(CA_KEY)
        .await?
        .0
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
}

/// Asks for `service`'s certificate for the request `csr_pem`, as request
/// `id` (unique per attempt) under `lease`, and waits up to `wait` for a
/// node to answer.
pub async fn obtain(
    backend: &Backend,
    service: &str,
    id: &str,
    csr_pem: &str,
    lease: i64,
    wait: Duration,
) -> Result<Obtained> {
    let req_key = format!("{REQUESTS}{service}/{id}");
    let ans_key = format!("{ISSUED}{service}/{id}");
    let body = serde_json::to_vec(&CertRequest {
        csr: csr_pem.to_owned(),
    })
    .map_err(|e| CoordError::Invalid(e.to_string()))?;
    let rev = backend.put(req_key.clone(), body, lease).await?;
    let mut watch = backend.watch_range(Bytes::from(ans_key.clone()), key_end(&ans_key), rev + 1);
    let answer = tokio::time::timeout(wait, async {
        // Answered between the put and the watch's start: read once.
        if let (Some(kv), _) = backend.get(ans_key.clone()).await? {
            return Ok(kv.value);
        }
        while let Some(item) = watch.next().await {
            if let WatchItem::Events { events, .. } = item {
                for e in events {
                    if let Some(kv) = e.kv.as_ref().filter(|_| !is_delete(&e)) {
                        return Ok(kv.value.clone());
                    }
                }
            }
        }
        Err(CoordError::Unavailable(
            "the watch for the certificate ended".into(),
        ))
    })
    .await;
    // The request and its answer are done with, whatever happened.
    let _ = backend.delete(req_key, false).await;
    let _ = backend.delete(ans_key, false).await;
    let value = match answer {
        Ok(v) => v?,
        Err(_) => {
            return Err(CoordError::Timeout(format!(
                "no node issued a certificate for {service} within {} ms: start a node with --identity-ca DIR (or `meshwork up --tls`)",
                wait.as_millis()
            )));
        }
    };
    let a: CertAnswer = serde_json::from_slice(&value).map_err(|e| CoordError::Corrupt {
        key: format!("{ISSUED}{service}/{id}"),
        reason: e.to_string(),
    })?;
    match (a.chain, a.ca, a.error) {
        (Some(chain), Some(ca), None) => Ok(Obtained { chain, ca }),
        (_, _, Some(why)) => Err(CoordError::Invalid(format!(
            "the certificate for {service} was refused: {why}"
        ))),
        _ => Err(CoordError::Corrupt {
            key: format!("{ISSUED}{service}/{id}"),
            reason: "an answer with neither a certificate nor an error".into(),
        }),
    }
}

#[cfg(feature = "server")]
pub use issuer::Issuer;

#[cfg(feature = "server")]
mod issuer {
    use std::sync::Arc;
    use std::time::Duration;

    use meshwork_tls::identity::Authority;

    use super::{CertAnswer, CertRequest, ISSUED, MAX_REQUEST_BYTES, REQUESTS};
    use crate::backend::{Backend, KeyValue, WatchItem, is_delete, txn};
    use crate::error::Result;

    /// Answers certificate requests with `authority`, certificates valid for
    /// `ttl`. Every node holding the authority may run one: the first answer
    /// to a request stands (the others' are refused by a compare).
    #[derive(Clone)]
    pub struct Issuer {
        backend: Backend,
        authority: Arc<Authority>,
        ttl: Duration,
    }

    impl Issuer {
        /// An issuer over `backend`.
        pub fn new(backend: Backend, authority: Arc<Authority>, ttl: Duration) -> Issuer {
            Issuer {
                backend,
                authority,
                ttl,
            }
        }

        /// The authority.
        pub fn authority(&self) -> &Arc<Authority> {
            &self.authority
        }

        /// Publishes the authority's certificate, then answers the requests
        /// waiting now and each new one, until the task is dropped.
        pub async fn run(self) {
            let pem = self.authority.ca_pem().to_owned();
            while let Err(e) = self.backend.put(super::CA_KEY, pem.clone(), 0).await {
                tracing::warn!(error = %e, "identity issuer: publishing the authority failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            loop {
                let rev = match self.backend.load_prefix(REQUESTS).await {
                    Ok((kvs, rev)) => {
                        for kv in kvs {
                            self.answer(&kv).await;
                        }
                        rev
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "identity issuer: reading requests failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let mut watch = self.backend.watch_prefix(REQUESTS, rev + 1);
                while let Some(item) = watch.next().await {
                    match item {
                        WatchItem::Events { events, .. } => {
                            for e in events.iter().filter(|e| !is_delete(e)) {
                                if let Some(kv) = &e.kv {
                                    self.answer(kv).await;
                                }
                            }
                        }
                        // Compacted past us: read everything again.
                        WatchItem::Reset { .. } => break,
                    }
                }
            }
        }

        /// Answers one request (or its refusal), unless answered already.
        async fn answer(&self, kv: &KeyValue) {
            let key = String::from_utf8_lossy(&kv.key);
            let Some((service, id)) = key
                .strip_prefix(REQUESTS)
                .and_then(|rest| rest.split_once('/'))
            else {
                return;
            };
            let answer = self.sign(service, &kv.value);
            if let Some(why) = &answer.error {
                tracing::warn!(service, id, error = %why, "identity issuer: request refused");
            } else {
                metrics::counter!("meshwork_identity_issued_total").increment(1);
                tracing::info!(service, id, "identity issuer: certificate issued");
            }
            let Ok(value) = serde_json::to_vec(&answer) else {
                return;
            };
            let ans_key = format!("{ISSUED}{service}/{id}");
            // Only while the request stands, and only once.
            let r: Result<_> = self
                .backend
                .txn(meshwork_etcd::proto::etcdserverpb::TxnRequest {
                    compare: vec![
                        txn::mod_rev_is(kv.key.clone(), kv.mod_revision),
                        txn::absent(ans_key.clone()),
                    ],
                    success: vec![txn::put(ans_key, value, kv.lease)],
                    failure: vec![],
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(service, id, error = %e, "identity issuer: writing the answer failed");
            }
        }

        fn sign(&self, service: &str, value: &[u8]) -> CertAnswer {
            let refused = |why: String| CertAnswer {
                chain: None,
                ca: None,
                error: Some(why),
            };
            if value.len() > MAX_REQUEST_BYTES {
                return refused(format!(
                    "the request is {} bytes; at most {MAX_REQUEST_BYTES}",
                    value.len()
                ));
            }
            let req: CertRequest = match serde_json::from_slice(value) {
                Ok(r) => r,
                Err(e) => return refused(format!("not a certificate request: {e}")),
            };
            match self.authority.sign_request(service, &req.csr, self.ttl) {
                Ok(chain) => CertAnswer {
                    chain: Some(chain),
                    ca: Some(self.authority.ca_pem().to_owned()),
                    error: None,
                },
                Err(e) => refused(e.to_string()),
            }
        }
    }
}
