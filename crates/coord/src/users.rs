//! The console's users: a name, a password kept only as an Argon2id hash,
//! and the scopes (see `meshwork_api::scope`) the user signs in with —
//! `admin` for an administrator, `config:write:public` for someone who may
//! only publish that namespace. Stored under [`USERS_PREFIX`], one key per
//! user; every node keeps a watched copy, so a user added, changed or removed
//! on one node holds on every node within a watch round trip.
//!
//! Each record carries a `generation` that changes with its password and
//! scopes: a session signed for one generation stops working when the user
//! is changed or removed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Event, KeyValue, Mirror, MirrorHandler, is_delete, mirror, txn};
use crate::error::{CoordError, Result};

/// Where users are kept, one key per user name.
pub const USERS_PREFIX: &str = "/meshwork/auth/users/";
/// Most users kept at once.
pub const MAX_USERS: usize = 1_000;
/// Shortest password.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest password (bytes): Argon2 takes any, a bound keeps hashing cheap.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Most scopes on one user.
pub const MAX_SCOPES: usize = 64;

/// What is shown of a user (never the hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// The name it signs in with.
    pub name: String,
    /// What it may do.
    pub scopes: Vec<String>,
    /// When it was made, Unix ms.
    pub created_ms: u64,
    /// When its password or scopes last changed, Unix ms.
    pub updated_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    info: UserInfo,
    /// The Argon2id PHC string.
    password_hash: String,
    /// Changes with every change of the user: sessions name it.
    generation: String,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Whether `name` can be a user name: 1 to 64 letters, digits, `.`, `_`, `-`, `@`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

fn check_password(password: &str) -> Result<()> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(CoordError::invalid(format!(
            "a password needs at least {MIN_PASSWORD_CHARS} characters"
        )));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(CoordError::invalid(format!(
            "a password is at most {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    Ok(())
}

fn hash(password: &str) -> Result<String> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| CoordError::Backend(format!("password salt: {e}")))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| CoordError::Backend(format!("hashing the password: {e}")))
}

fn new_generation() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[derive(Default)]
struct UserCopy {
    by_name: HashMap<String, Stored>,
}

impl UserCopy {
    fn put(&mut self, kv: &KeyValue) {
        let Some(name) = std::str::from_utf8(&kv.key)
            .ok()
            .and_then(|k| k.strip_prefix(USERS_PREFIX))
        else {
            return;
        };
        match serde_json::from_slice::<Stored>(&kv.value) {
            Ok(s) => {
                self.by_name.insert(name.to_string(), s);
            }
            Err(e) => tracing::warn!(user = name, error = %e, "unreadable console user; ignored"),
        }
    }
}

impl MirrorHandler for UserCopy {
    fn reset(&mut self, kvs: Vec<KeyValue>, _revision: i64) {
        self.by_name.clear();
        for kv in &kvs {
            self.put(kv);
        }
    }

    fn apply(&mut self, events: Vec<Event>, _revision: i64) {
        for e in events {
            let delete = is_delete(&e);
            let Some(kv) = e.kv else { continue };
            if delete {
                if let Some(name) = std::str::from_utf8(&kv.key)
                    .ok()
                    .and_then(|k| k.strip_prefix(USERS_PREFIX))
                {
                    self.by_name.remove(name);
                }
            } else {
                self.put(&kv);
            }
        }
    }
}

/// The console's users. Cheap to clone.
#[derive(Clone)]
pub struct Users {
    backend: Backend,
    copy: Arc<parking_lot::Mutex<UserCopy>>,
    mirror: Arc<Mirror>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("count", &self.copy.lock().by_name.len())
            .finish()
    }
}

/// A user a password check let in: who, with what, at which generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedIn {
    /// The user's name.
    pub name: String,
    /// Its scopes.
    pub scopes: Vec<String>,
    /// Its record's generation (sessions carry it).
    pub generation: String,
}

impl Users {
    /// Starts the watched copy; waits (briefly) for its first load.
    pub async fn open(backend: &Backend) -> Result<Users> {
        let copy = Arc::new(parking_lot::Mutex::new(UserCopy::default()));
        let m = mirror(backend, USERS_PREFIX, copy.clone());
        if !m.loaded(Duration::from_secs(10)).await {
            return Err(CoordError::Unavailable(
                "loading the console users from the store timed out".into(),
            ));
        }
        Ok(Users {
            backend: backend.clone(),
            copy,
            mirror: Arc::new(m),
        })
    }

    /// Adds user `name` with `password` and `scopes` (validated by the
    /// caller); a name taken already is a conflict.
    pub async fn create(
        &self,
        name: &str,
        password: &str,
        scopes: Vec<String>,
    ) -> Result<UserInfo> {
        if !valid_name(name) {
            return Err(CoordError::invalid(format!(
                "user name {name:?}: use 1 to 64 letters, digits, '.', '_', '-' and '@'"
            )));
        }
        check_password(password)?;
        if scopes.is_empty() || scopes.len() > MAX_SCOPES {
            return Err(CoordError::invalid(format!(
                "a user needs 1 to {MAX_SCOPES} scopes"
            )));
        }
        if self.copy.lock().by_name.len() >= MAX_USERS {
            return Err(CoordError::invalid(format!(
                "{MAX_USERS} users exist already; remove some first"
            )));
        }
        let now = now_ms();
        let info = UserInfo {
            name: name.to_string(),
            scopes,
            created_ms: now,
            updated_ms: now,
        };
        let password = password.to_owned();
        let password_hash = tokio::task::spawn_blocking(move || hash(&password))
            .await
            .map_err(|e| CoordError::Backend(e.to_string()))??;
        let stored = Stored {
            info: info.clone(),
            password_hash,
            generation: new_generation(),
        };
        let key = format!("{USERS_PREFIX}{name}");
        let value = serde_json::to_vec(&stored).map_err(|e| CoordError::Backend(e.to_string()))?;
        let r = self
            .backend
            .txn(meshwork_etcd::proto::etcdserverpb::TxnRequest {
                compare: vec![txn::absent(key.clone())],
                success: vec![txn::put(key, value, 0)],
                failure: vec![],
            })
            .await?;
        if !r.succeeded {
            return Err(CoordError::Conflict(format!(
                "user {name:?} exists already"
            )));
        }
        self.mirror.wait_for(txn::revision(&r)).await;
        Ok(info)
    }

    /// Changes user `name`'s password and/or scopes; every session it has
    /// ends. `Ok(None)` when there is no such user.
    pub async fn update(
        &self,
        name: &str,
        password: Option<&str>,
        scopes: Option<Vec<String>>,
    ) -> Result<Option<UserInfo>> {
        if let Some(p) = password {
            check_password(p)?;
        }
        if let Some(s) = &scopes
            && (s.is_empty() || s.len() > MAX_SCOPES)
        {
            return Err(CoordError::invalid(format!(
                "a user needs 1 to {MAX_SCOPES} scopes"
            )));
        }
        let key = format!("{USERS_PREFIX}{name}");
        let (Some(kv), _) = self.backend.get(key.clone()).await? else {
            return Ok(None);
        };
        let mut stored: Stored =
            serde_json::from_slice(&kv.value).map_err(|e| CoordError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            })?;
        if let Some(p) = password {
            let p = p.to_owned();
            stored.password_hash = tokio::task::spawn_blocking(move || hash(&p))
                .await
                .map_err(|e| CoordError::Backend(e.to_string()))??;
        }
        if let Some(s) = scopes {
            stored.info.scopes = s;
        }
        stored.info.updated_ms = now_ms();
        stored.generation = new_generation();
        let value = serde_json::to_vec(&stored).map_err(|e| CoordError::Backend(e.to_string()))?;
        let r = self
            .backend
            .txn(meshwork_etcd::proto::etcdserverpb::TxnRequest {
                compare: vec![txn::mod_rev_is(key.clone(), kv.mod_revision)],
                success: vec![txn::put(key, value, 0)],
                failure: vec![],
            })
            .await?;
        if !r.succeeded {
            return Err(CoordError::Conflict(format!(
                "user {name:?} changed meanwhile; try again"
            )));
        }
        self.mirror.wait_for(txn::revision(&r)).await;
        Ok(Some(stored.info))
    }

    /// Removes user `name`; false when there was none.
    pub async fn remove(&self, name: &str) -> Result<bool> {
        let key = format!("{USERS_PREFIX}{name}");
        let gone = self.backend.delete(key.clone(), false).await? > 0;
        let (_, rev) = self.backend.get(key).await?;
        self.mirror.wait_for(rev).await;
        Ok(gone)
    }

    /// Every user, by name.
    pub fn list(&self) -> Vec<UserInfo> {
        let mut v: Vec<UserInfo> = self
            .copy
            .lock()
            .by_name
            .values()
            .map(|s| s.info.clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The user `name` at `generation`, if it still is (a session's check).
    pub fn at_generation(&self, name: &str, generation: &str) -> Option<SignedIn> {
        let copy = self.copy.lock();
        let s = copy.by_name.get(name)?;
        (s.generation == generation).then(|| SignedIn {
            name: name.to_string(),
            scopes: s.info.scopes.clone(),
            generation: s.generation.clone(),
        })
    }

    /// Checks `name`'s password (Argon2id: slow on purpose; call it off the
    /// async threads). `None` for a wrong password or an unknown user.
    pub fn verify(&self, name: &str, password: &str) -> Option<SignedIn> {
        let stored = self.copy.lock().by_name.get(name).cloned();
        if password.len() > MAX_PASSWORD_BYTES {
            return None;
        }
        // An unknown user costs the same Argon2 run as a known one: the
        // answer's time does not tell which names exist.
        static DUMMY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let phc = match &stored {
            Some(s) => s.password_hash.clone(),
            None => DUMMY
                .get_or_init(|| hash("not a password of anyone").ok())
                .clone()?,
        };
        let parsed = PasswordHash::new(&phc).ok()?;
        let ok = argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        let stored = stored.filter(|_| ok)?;
        Some(SignedIn {
            name: name.to_string(),
            scopes: stored.info.scopes,
            generation: stored.generation,
        })
    }
}
