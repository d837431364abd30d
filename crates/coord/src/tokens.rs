//! Bearer tokens for the node's HTTP API: created by an administrator with
//! scopes (see `meshwork_api::scope`) and an optional lifetime, stored in the
//! store under [`TOKENS_PREFIX`] as a SHA-256 of their secret (never the
//! secret), listed and revoked. Every node keeps a watched copy, so a token
//! created or revoked on one node holds on every node within a watch round
//! trip, and checking one costs a map lookup and a hash.
//!
//! A token reads `mwt_<id>_<secret>`: a 16-hex-digit id (the key) and a
//! 256-bit random secret in hex. The secret is high-entropy, so a fast hash
//! is as safe as a slow one and keeps every request cheap.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::backend::{Backend, Event, KeyValue, Mirror, MirrorHandler, is_delete, mirror};
use crate::error::{CoordError, Result};

/// Where tokens are kept, one key per token id.
pub const TOKENS_PREFIX: &str = "/meshwork/auth/tokens/";
/// How every token starts.
pub const TOKEN_PREFIX: &str = "mwt_";
/// Most tokens kept at once.
pub const MAX_TOKENS: usize = 10_000;

/// What is known of a token (never its secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Its id (the part after `mwt_`).
    pub id: String,
    /// What it may do.
    pub scopes: Vec<String>,
    /// Who or what it is for.
    #[serde(default)]
    pub description: String,
    /// When it was made, Unix ms.
    pub created_ms: u64,
    /// When it stops working, Unix ms (none: until revoked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    info: TokenInfo,
    secret_sha256: String,
}

/// Why a presented token was refused (all answered 401 alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Not of the form `mwt_<id>_<secret>`.
    #[error("the bearer token is not a Meshwork token (mwt_...)")]
    Malformed,
    /// No such token, a wrong secret, or revoked.
    #[error("the bearer token is unknown or revoked")]
    Unknown,
    /// Past its lifetime.
    #[error("the bearer token has expired")]
    Expired,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes()))
}

/// Equal without an early exit.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Default)]
struct TokenCopy {
    by_id: HashMap<String, Stored>,
}

impl TokenCopy {
    fn put(&mut self, kv: &KeyValue) {
        match serde_json::from_slice::<Stored>(&kv.value) {
            Ok(s) => {
                self.by_id.insert(s.info.id.clone(), s);
            }
            Err(e) => tracing::warn!(
                key = %String::from_utf8_lossy(&kv.key),
                error = %e,
                "ignoring an unreadable token record"
            ),
        }
    }
}

impl MirrorHandler for TokenCopy {
    fn reset(&mut self, kvs: Vec<KeyValue>, _revision: i64) {
        self.by_id.clear();
        for kv in &kvs {
            self.put(kv);
        }
    }

    fn apply(&mut self, events: Vec<Event>, _revision: i64) {
        for e in events {
            let delete = is_delete(&e);
            let Some(kv) = e.kv else { continue };
            if delete {
                let key = String::from_utf8_lossy(&kv.key);
                if let Some(id) = key.strip_prefix(TOKENS_PREFIX) {
                    self.by_id.remove(id);
                }
            } else {
                self.put(&kv);
            }
        }
    }
}

/// The tokens of this deployment. Cheap to clone.
#[derive(Clone)]
pub struct Tokens {
    backend: Backend,
    copy: Arc<parking_lot::Mutex<TokenCopy>>,
    mirror: Arc<Mirror>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("count", &self.copy.lock().by_id.len())
            .finish()
    }
}

impl Tokens {
    /// Starts the watched copy; waits (briefly) for its first load.
    pub async fn open(backend: &Backend) -> Result<Tokens> {
        let copy = Arc::new(parking_lot::Mutex::new(TokenCopy::default()));
        let m = mirror(backend, TOKENS_PREFIX, copy.clone());
        if !m.loaded(Duration::from_secs(10)).await {
            return Err(CoordError::Unavailable(
                "loading the API tokens from the store timed out".into(),
            ));
        }
        Ok(Tokens {
            backend: backend.clone(),
            copy,
            mirror: Arc::new(m),
        })
    }

    /// Makes a token with `scopes` (already validated by the caller) living
    /// `ttl` (none: until revoked); returns what is stored and the token,
    /// which is shown this once.
    pub async fn create(
        &self,
        scopes: Vec<String>,
        ttl: Option<Duration>,
        description: String,
    ) -> Result<(TokenInfo, String)> {
        if scopes.is_empty() {
            return Err(CoordError::invalid("a token needs at least one scope"));
        }
        if self.copy.lock().by_id.len() >= MAX_TOKENS {
            return Err(CoordError::invalid(format!(
                "{MAX_TOKENS} tokens exist already; revoke some first"
            )));
        }
        let mut id = [0u8; 8];
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut id);
        rand::rng().fill_bytes(&mut secret);
        let (id, secret) = (hex(&id), hex(&secret));
        let now = now_ms();
        let info = TokenInfo {
            id: id.clone(),
            scopes,
            description,
            created_ms: now,
            expires_ms: ttl
                .map(|t| now.saturating_add(u64::try_from(t.as_millis()).unwrap_or(u64::MAX))),
        };
        let stored = Stored {
            info: info.clone(),
            secret_sha256: sha256_hex(&secret),
        };
        let value = serde_json::to_vec(&stored).map_err(|e| CoordError::Backend(e.to_string()))?;
        let rev = self
            .backend
            .put(format!("{TOKENS_PREFIX}{id}"), value, 0)
            .await?;
        self.mirror.wait_for(rev).await;
        Ok((info, format!("{TOKEN_PREFIX}{id}_{secret}")))
    }

    /// Every token, oldest first.
    pub fn list(&self) -> Vec<TokenInfo> {
        let mut v: Vec<TokenInfo> = self
            .copy
            .lock()
            .by_id
            .values()
            .map(|s| s.info.clone())
            .collect();
        v.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        v
    }

    /// Revokes token `id`; false when there was none.
    pub async fn revoke(&self, id: &str) -> Result<bool> {
        let key = format!("{TOKENS_PREFIX}{id}");
        let gone = self.backend.delete(key.clone(), false).await? > 0;
        let (_, rev) = self.backend.get(key).await?;
        self.mirror.wait_for(rev).await;
        Ok(gone)
    }

    /// Who a presented bearer token is, if it is valid now.
    pub fn check(&self, token: &str) -> std::result::Result<TokenInfo, Refused> {
        let rest = token.strip_prefix(TOKEN_PREFIX).ok_or(Refused::Malformed)?;
        let (id, secret) = rest.split_once('_').ok_or(Refused::Malformed)?;
        let copy = self.copy.lock();
        let stored = copy.by_id.get(id).ok_or(Refused::Unknown)?;
        if !same(
            sha256_hex(secret).as_bytes(),
            stored.secret_sha256.as_bytes(),
        ) {
            return Err(Refused::Unknown);
        }
        if stored.info.expires_ms.is_some_and(|e| e <= now_ms()) {
            return Err(Refused::Expired);
        }
        Ok(stored.info.clone())
    }
}

/// Where the console's session signing key lives.
const SESSION_KEY: &str = "/meshwork/auth/console/session-key";

/// The key console sessions are signed with, shared by every node and kept
/// across restarts: made (256 random bits) by the first node that asks, read
/// by the others. Readable by whoever may read `/meshwork/auth/` in the store.
pub async fn session_key(backend: &Backend) -> Result<[u8; 32]> {
    let parse = |v: &[u8]| -> Result<[u8; 32]> {
        v.try_into().map_err(|_| CoordError::Corrupt {
            key: SESSION_KEY.into(),
            reason: format!("a session key is 32 bytes, not {}", v.len()),
        })
    };
    if let (Some(kv), _) = backend.get(SESSION_KEY).await? {
        return parse(&kv.value);
    }
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    let r = backend
        .txn(meshwork_etcd::proto::etcdserverpb::TxnRequest {
            compare: vec![crate::backend::txn::absent(SESSION_KEY.to_string())],
            success: vec![crate::backend::txn::put(
                SESSION_KEY.to_string(),
                key.to_vec(),
                0,
            )],
            failure: vec![],
        })
        .await?;
    if r.succeeded {
        return Ok(key);
    }
    // Another node made it first: use that one.
    match backend.get(SESSION_KEY).await? {
        (Some(kv), _) => parse(&kv.value),
        (None, _) => Err(CoordError::Conflict(
            "the session key was deleted while being made; try again".into(),
        )),
    }
}
