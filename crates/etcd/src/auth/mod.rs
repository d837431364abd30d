//! The store's users, roles and key permissions, as etcd keeps them: the
//! state behind the Auth service and the check every other service makes.
//!
//! Durable in one file of the data directory (`auth`: magic, protobuf,
//! CRC-32, replaced atomically on every change and fsynced before the
//! change is answered). Passwords are kept as Argon2id hashes; hashing and
//! checking run on the blocking pool, a few at a time, so a flood of logins
//! cannot take the async workers. Failed logins are throttled per user and
//! source address.
//!
//! Trust model: with auth off every caller may do everything (etcd's
//! default). With it on, a caller is the user its token names; without a
//! token it is nobody and may do nothing but authenticate and read the
//! member list, status and auth status. The `root` role may do everything;
//! other users what their roles' permissions cover. Code inside the node
//! reaches the store in-process and is trusted.

mod perms;
mod tokens;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use prost::Message;
use tokio::time::Instant;
use tonic::Status;

pub use perms::{Perms, valid_permission_range};
pub use tokens::TokenKind;
use tokens::Tokens;

use crate::proto::authpb::{self, Permission, permission::Type};

/// The name of the user and role that may do everything.
pub const ROOT: &str = "root";

/// File holding the auth state in the data directory.
const AUTH_FILE: &str = "auth";
const AUTH_MAGIC: &[u8; 8] = b"MWAUTH01";

/// Settings of store authentication (etcd's `--auth-token` and friends).
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// Which tokens `Authenticate` issues.
    pub token: TokenKind,
    /// How long a token stays valid (simple tokens: since last use).
    pub token_ttl: Duration,
    /// HS256 key for JWTs; `None` generates one on first start and keeps it
    /// in the auth file (never a built-in default).
    pub jwt_key: Option<Vec<u8>>,
    /// Most simple tokens held at once; past it `Authenticate` is refused.
    pub max_tokens: usize,
    /// Failed logins a user may make from one address before each next try
    /// must wait (1 s, doubling, up to 60 s).
    pub free_login_failures: u32,
    /// Password hashes computed at once (each takes ~19 MiB and tens of ms).
    pub max_concurrent_hashes: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            token: TokenKind::Simple,
            token_ttl: Duration::from_secs(300),
            jwt_key: None,
            max_tokens: 100_000,
            free_login_failures: 5,
            max_concurrent_hashes: 2,
        }
    }
}

/// The auth state as persisted.
#[derive(Clone, PartialEq, Message)]
struct AuthFile {
    #[prost(bool, tag = "1")]
    enabled: bool,
    #[prost(uint64, tag = "2")]
    revision: u64,
    #[prost(message, repeated, tag = "3")]
    users: Vec<authpb::User>,
    #[prost(message, repeated, tag = "4")]
    roles: Vec<authpb::Role>,
    #[prost(bytes = "vec", tag = "5")]
    jwt_key: Vec<u8>,
}

#[derive(Clone, Debug)]
struct User {
    /// Argon2 PHC string; empty for a user without a password.
    password: String,
    no_password: bool,
    roles: BTreeSet<String>,
}

#[derive(Clone, Debug)]
struct State {
    enabled: bool,
    revision: u64,
    users: BTreeMap<String, User>,
    /// Permissions sorted by key, as etcd lists them.
    roles: BTreeMap<String, Vec<Permission>>,
    jwt_key: Vec<u8>,
    /// Each user's merged permissions, rebuilt on every change.
    perms: HashMap<String, Arc<Perms>>,
}

impl State {
    fn rebuild_perms(&mut self) {
        self.perms = self
            .users
            .iter()
            .map(|(name, u)| {
                let perms = u.roles.iter().filter_map(|r| self.roles.get(r)).flatten();
                (name.clone(), Arc::new(Perms::merge(perms)))
            })
            .collect();
    }

    fn to_file(&self) -> AuthFile {
        AuthFile {
            enabled: self.enabled,
            revision: self.revision,
            users: self
                .users
                .iter()
                .map(|(name, u)| authpb::User {
                    name: name.clone().into_bytes().into(),
                    password: u.password.clone().into_bytes().into(),
                    roles: u.roles.iter().cloned().collect(),
                    options: Some(authpb::UserAddOptions {
                        no_password: u.no_password,
                    }),
                })
                .collect(),
            roles: self
                .roles
                .iter()
                .map(|(name, perms)| authpb::Role {
                    name: name.clone().into_bytes().into(),
                    key_permission: perms.clone(),
                })
                .collect(),
            jwt_key: self.jwt_key.clone(),
        }
    }

    fn from_file(f: AuthFile) -> Result<State, String> {
        let text = |b: &[u8], what: &str| {
            String::from_utf8(b.to_vec()).map_err(|_| format!("a {what} that is not UTF-8"))
        };
        let mut users = BTreeMap::new();
        for u in f.users {
            users.insert(
                text(&u.name, "user name")?,
                User {
                    password: text(&u.password, "password hash")?,
                    no_password: u.options.is_some_and(|o| o.no_password),
                    roles: u.roles.into_iter().collect(),
                },
            );
        }
        let mut roles = BTreeMap::new();
        for r in f.roles {
            roles.insert(text(&r.name, "role name")?, r.key_permission);
        }
        let mut s = State {
            enabled: f.enabled,
            revision: f.revision,
            users,
            roles,
            jwt_key: f.jwt_key,
            perms: HashMap::new(),
        };
        s.rebuild_perms();
        Ok(s)
    }
}

/// Errors of the auth state, each answered with etcd's own gRPC code and text.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// `AuthEnable` without a `root` user.
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    /// `AuthEnable` while `root` lacks the `root` role.
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    /// The user exists already.
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    /// No user name given (or no token while auth is on).
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    /// No such user.
    #[error("etcdserver: user name not found")]
    UserNotFound,
    /// The role exists already.
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    /// No such role.
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    /// No role name given.
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    /// Wrong user or password (the same answer for both).
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    /// A grant without a permission.
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
    /// The caller may not do this.
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    /// Revoking a role the user does not hold.
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    /// Revoking a permission the role does not hold.
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    /// `Authenticate` while auth is off.
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    /// An unknown, expired or revoked token.
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    /// Removing root while auth is on, or an invalid permission range.
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    /// A JWT issued before the last change to users or roles.
    #[error("etcdserver: revision of auth store is old")]
    AuthOldRevision,
    /// Too many failed logins for this user from this address.
    #[error("etcdserver: too many failed authentication attempts for this user; retry in {0} s")]
    Throttled(u64),
    /// A password is required (or a client-side hash was sent).
    #[error("etcdserver: {0}")]
    BadPassword(&'static str),
    /// Too many tokens in use.
    #[error("{0}")]
    Token(String),
    /// The auth file could not be written or read.
    #[error("etcdserver: auth storage: {0}")]
    Storage(String),
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Status {
        use tonic::Code;
        let code = match e {
            AuthError::RootUserNotExist
            | AuthError::RootRoleNotExist
            | AuthError::UserAlreadyExist
            | AuthError::UserNotFound
            | AuthError::RoleAlreadyExist
            | AuthError::RoleNotFound
            | AuthError::RoleNotGranted
            | AuthError::PermissionNotGranted
            | AuthError::AuthNotEnabled => Code::FailedPrecondition,
            AuthError::UserEmpty
            | AuthError::RoleEmpty
            | AuthError::AuthFailed
            | AuthError::PermissionNotGiven
            | AuthError::InvalidAuthMgmt
            | AuthError::AuthOldRevision
            | AuthError::BadPassword(_) => Code::InvalidArgument,
            AuthError::PermissionDenied => Code::PermissionDenied,
            AuthError::InvalidAuthToken => Code::Unauthenticated,
            AuthError::Throttled(_) | AuthError::Token(_) => Code::ResourceExhausted,
            AuthError::Storage(_) => Code::Unavailable,
        };
        Status::new(code, e.to_string())
    }
}

/// Who is making a request, and so what it may do.
#[derive(Clone, Debug)]
pub enum Caller {
    /// Auth is off, or the caller is this process: everything is allowed.
    Trusted,
    /// Auth is on and no token came: only the open calls are allowed.
    Nobody,
    /// An authenticated user.
    User {
        /// The user's name.
        name: String,
        /// Holds the `root` role.
        root: bool,
        /// Its merged permissions when the request came.
        perms: Arc<Perms>,
    },
}

impl Caller {
    /// The user's name, if the caller is one.
    pub fn user(&self) -> Option<&str> {
        match self {
            Caller::User { name, .. } => Some(name),
            _ => None,
        }
    }

    /// Allowed to read every key of `(key, range_end)`.
    pub fn read(&self, key: &[u8], range_end: &[u8]) -> Result<(), AuthError> {
        self.check(|p| p.can_read(key, range_end))
    }

    /// Allowed to write every key of `(key, range_end)`.
    pub fn write(&self, key: &[u8], range_end: &[u8]) -> Result<(), AuthError> {
        self.check(|p| p.can_write(key, range_end))
    }

    /// Allowed to administer the store (holds the `root` role).
    pub fn admin(&self) -> Result<(), AuthError> {
        self.check(|_| false)
    }

    /// Authenticated at all (auth off counts).
    pub fn authenticated(&self) -> Result<(), AuthError> {
        self.check(|_| true)
    }

    fn check(&self, allowed: impl FnOnce(&Perms) -> bool) -> Result<(), AuthError> {
        match self {
            Caller::Trusted => Ok(()),
            Caller::Nobody => Err(AuthError::UserEmpty),
            Caller::User { root: true, .. } => Ok(()),
            Caller::User { perms, .. } => {
                if allowed(perms) {
                    Ok(())
                } else {
                    Err(AuthError::PermissionDenied)
                }
            }
        }
    }
}

/// Failed logins of one user from one address.
#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    last: Instant,
}

/// Most (user, address) pairs whose failures are remembered.
const MAX_FAILURE_ENTRIES: usize = 10_000;
/// Longest wait between tries once throttled.
const MAX_LOGIN_WAIT: Duration = Duration::from_secs(60);

/// A role and its permissions, as listed.
pub type RoleInfo = (String, Vec<Permission>);

struct Inner {
    path: PathBuf,
    cfg: AuthConfig,
    state: RwLock<State>,
    /// Serialises changes (each rewrites the file).
    change: Mutex<()>,
    tokens: Mutex<Tokens>,
    hashing: tokio::sync::Semaphore,
    failures: Mutex<HashMap<(String, Option<IpAddr>), Failures>>,
    /// A hash checked against when the user does not exist, so a login for a
    /// missing user costs as much as one with a wrong password.
    decoy: String,
}

/// The auth state of one store; cheap to clone.
#[derive(Clone)]
pub struct Auth(Arc<Inner>);

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("path", &self.0.path)
            .field("enabled", &self.enabled())
            .finish()
    }
}

fn hash_password(password: &str) -> Result<String, AuthError> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut salt = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Storage(e.to_string()))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Storage(format!("hashing the password: {e}")))
}

fn password_matches(hash: &str, password: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(hash).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

impl Auth {
    /// Opens (or creates) the auth state kept in `dir`.
    pub fn open(dir: &Path, cfg: AuthConfig) -> Result<Auth, AuthError> {
        let path = dir.join(AUTH_FILE);
        let mut state = match std::fs::read(&path) {
            Ok(data) => {
                let bad = |why: &str| AuthError::Storage(format!("{}: {why}", path.display()));
                let body = data
                    .strip_prefix(AUTH_MAGIC.as_slice())
                    .ok_or_else(|| bad("not an auth file"))?;
                let (body, crc) = body
                    .split_at_checked(body.len().saturating_sub(4))
                    .ok_or_else(|| bad("truncated"))?;
                if crc.len() != 4 || crc32fast::hash(body).to_le_bytes() != crc {
                    return Err(bad("checksum mismatch (damaged)"));
                }
                let f = AuthFile::decode(body).map_err(|e| bad(&e.to_string()))?;
                State::from_file(f).map_err(|e| bad(&e))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State {
                enabled: false,
                revision: 1,
                users: BTreeMap::new(),
                roles: BTreeMap::new(),
                jwt_key: Vec::new(),
                perms: HashMap::new(),
            },
            Err(e) => {
                return Err(AuthError::Storage(format!(
                    "reading {}: {e}",
                    path.display()
                )));
            }
        };
        let fresh_key = state.jwt_key.is_empty() && cfg.jwt_key.is_none();
        if fresh_key {
            let mut key = vec![0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
            state.jwt_key = key;
        }
        let key = cfg.jwt_key.clone().unwrap_or_else(|| state.jwt_key.clone());
        let tokens = Tokens::new(cfg.token, cfg.token_ttl, cfg.max_tokens, &key);
        let decoy = hash_password("meshwork decoy password")?;
        let auth = Auth(Arc::new(Inner {
            path,
            hashing: tokio::sync::Semaphore::new(cfg.max_concurrent_hashes.max(1)),
            cfg,
            state: RwLock::new(state.clone()),
            change: Mutex::new(()),
            tokens: Mutex::new(tokens),
            failures: Mutex::new(HashMap::new()),
            decoy,
        }));
        if fresh_key {
            auth.save(&state)?;
        }
        Ok(auth)
    }

    fn save(&self, s: &State) -> Result<(), AuthError> {
        let mut buf = AUTH_MAGIC.to_vec();
        s.to_file()
            .encode(&mut buf)
            .map_err(|e| AuthError::Storage(e.to_string()))?;
        let body_crc = crc32fast::hash(&buf[AUTH_MAGIC.len()..]);
        buf.extend_from_slice(&body_crc.to_le_bytes());
        meshwork_store::durable::write_file(&self.0.path, &buf)
            .map_err(|e| AuthError::Storage(format!("writing {}: {e}", self.0.path.display())))
    }

    /// Applies `f` to a copy of the state; when it succeeds and changed
    /// something, the copy gets the next revision, is written durably and
    /// becomes the state.
    fn change<T>(
        &self,
        f: impl FnOnce(&mut State) -> Result<(T, bool), AuthError>,
    ) -> Result<T, AuthError> {
        let _serial = self.0.change.lock();
        let mut next = self.0.state.read().clone();
        let (out, changed) = f(&mut next)?;
        if changed {
            next.revision += 1;
            next.rebuild_perms();
            self.save(&next)?;
            *self.0.state.write() = next;
        }
        Ok(out)
    }

    /// Whether auth is on.
    pub fn enabled(&self) -> bool {
        self.0.state.read().enabled
    }

    /// The auth revision: one more on every change to users, roles or the switch.
    pub fn revision(&self) -> u64 {
        self.0.state.read().revision
    }

    /// Which tokens this store issues.
    pub fn token_kind(&self) -> TokenKind {
        self.0.tokens.lock().kind()
    }

    /// Simple tokens held now.
    pub fn tokens_held(&self) -> usize {
        self.0.tokens.lock().len()
    }

    /// Who a request carrying `token` (the `token` or `authorization`
    /// metadata, `None` if absent) is.
    pub fn caller(&self, token: Option<&str>) -> Result<Caller, AuthError> {
        if !self.enabled() {
            return Ok(Caller::Trusted);
        }
        let Some(token) = token else {
            return Ok(Caller::Nobody);
        };
        let token = token.strip_prefix("Bearer ").unwrap_or(token);
        let info = self
            .0
            .tokens
            .lock()
            .check(token)
            .ok_or(AuthError::InvalidAuthToken)?;
        let s = self.0.state.read();
        if info.revision.is_some_and(|r| r < s.revision) {
            return Err(AuthError::AuthOldRevision);
        }
        let (Some(user), Some(perms)) = (s.users.get(&info.user), s.perms.get(&info.user)) else {
            return Err(AuthError::InvalidAuthToken);
        };
        Ok(Caller::User {
            root: user.roles.contains(ROOT),
            name: info.user,
            perms: perms.clone(),
        })
    }

    /// The caller a verified client certificate names (etcd's
    /// `--client-cert-auth`): that user, if it exists.
    pub fn caller_named(&self, user: &str) -> Result<Caller, AuthError> {
        let s = self.0.state.read();
        if !s.enabled {
            return Ok(Caller::Trusted);
        }
        match (s.users.get(user), s.perms.get(user)) {
            (Some(u), Some(perms)) => Ok(Caller::User {
                root: u.roles.contains(ROOT),
                name: user.to_string(),
                perms: perms.clone(),
            }),
            _ => Err(AuthError::PermissionDenied),
        }
    }

    async fn hashed(&self, password: String) -> Result<String, AuthError> {
        let _permit = self
            .0
            .hashing
            .acquire()
            .await
            .map_err(|_| AuthError::Storage("shutting down".into()))?;
        tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .map_err(|e| AuthError::Storage(e.to_string()))?
    }

    /// Checks `name`'s password (from `from`) and issues a token.
    pub async fn authenticate(
        &self,
        name: &str,
        password: &str,
        from: Option<IpAddr>,
    ) -> Result<String, AuthError> {
        if !self.enabled() {
            return Err(AuthError::AuthNotEnabled);
        }
        let key = (name.to_string(), from);
        let failed = self.0.failures.lock().get(&key).copied();
        if let Some(f) = failed
            && let Some(extra) = f.count.checked_sub(self.0.cfg.free_login_failures)
        {
            let wait = Duration::from_secs(1u64 << extra.min(6)).min(MAX_LOGIN_WAIT);
            let since = f.last.elapsed();
            if since < wait {
                let left = (wait - since).as_millis().div_ceil(1000);
                return Err(AuthError::Throttled(
                    u64::try_from(left).unwrap_or(60).max(1),
                ));
            }
        }
        let stored = {
            let s = self.0.state.read();
            s.users
                .get(name)
                .map(|u| (u.password.clone(), u.no_password))
        };
        let (hash, usable) = match stored {
            Some((hash, false)) => (hash, true),
            _ => (self.0.decoy.clone(), false),
        };
        let ok = {
            let _permit = self
                .0
                .hashing
                .acquire()
                .await
                .map_err(|_| AuthError::Storage("shutting down".into()))?;
            let password = password.to_string();
            tokio::task::spawn_blocking(move || password_matches(&hash, &password))
                .await
                .map_err(|e| AuthError::Storage(e.to_string()))?
        } && usable;
        let mut failures = self.0.failures.lock();
        if !ok {
            if failures.len() >= MAX_FAILURE_ENTRIES && !failures.contains_key(&key) {
                failures.retain(|_, f| f.last.elapsed() < MAX_LOGIN_WAIT);
                if failures.len() >= MAX_FAILURE_ENTRIES {
                    failures.clear();
                }
            }
            let f = failures.entry(key).or_insert(Failures {
                count: 0,
                last: Instant::now(),
            });
            f.count = f.count.saturating_add(1);
            f.last = Instant::now();
            return Err(AuthError::AuthFailed);
        }
        failures.remove(&key);
        drop(failures);
        let revision = self.revision();
        self.0
            .tokens
            .lock()
            .issue(name, revision)
            .map_err(|e| AuthError::Token(e.to_string()))
    }

    /// Turns auth on; needs a `root` user holding the `root` role.
    pub fn enable(&self) -> Result<(), AuthError> {
        self.change(|s| {
            if s.enabled {
                return Ok(((), false));
            }
            let root = s.users.get(ROOT).ok_or(AuthError::RootUserNotExist)?;
            if !root.roles.contains(ROOT) {
                return Err(AuthError::RootRoleNotExist);
            }
            s.enabled = true;
            Ok(((), true))
        })
    }

    /// Turns auth off and forgets every token.
    pub fn disable(&self) -> Result<(), AuthError> {
        self.change(|s| {
            let was = std::mem::replace(&mut s.enabled, false);
            Ok(((), was))
        })?;
        self.0.tokens.lock().clear();
        Ok(())
    }

    /// Adds a user with `password` (hashed here), or without one.
    pub async fn user_add(
        &self,
        name: &str,
        password: &str,
        no_password: bool,
    ) -> Result<(), AuthError> {
        if name.is_empty() {
            return Err(AuthError::UserEmpty);
        }
        if self.0.state.read().users.contains_key(name) {
            return Err(AuthError::UserAlreadyExist);
        }
        let hash = if no_password {
            String::new()
        } else if password.is_empty() {
            return Err(AuthError::BadPassword(
                "password is empty (add the user with --no-password to have none)",
            ));
        } else {
            self.hashed(password.to_string()).await?
        };
        self.change(|s| {
            if s.users.contains_key(name) {
                return Err(AuthError::UserAlreadyExist);
            }
            s.users.insert(
                name.to_string(),
                User {
                    password: hash,
                    no_password,
                    roles: BTreeSet::new(),
                },
            );
            Ok(((), true))
        })
    }

    /// Deletes a user (not `root` while auth is on) and its tokens.
    pub fn user_delete(&self, name: &str) -> Result<(), AuthError> {
        self.change(|s| {
            if s.enabled && name == ROOT {
                return Err(AuthError::InvalidAuthMgmt);
            }
            s.users.remove(name).ok_or(AuthError::UserNotFound)?;
            Ok(((), true))
        })?;
        self.0.tokens.lock().revoke_user(name);
        Ok(())
    }

    /// Sets a user's password; its tokens stop working.
    pub async fn user_change_password(&self, name: &str, password: &str) -> Result<(), AuthError> {
        if !self.0.state.read().users.contains_key(name) {
            return Err(AuthError::UserNotFound);
        }
        if password.is_empty() {
            return Err(AuthError::BadPassword("password is empty"));
        }
        let hash = self.hashed(password.to_string()).await?;
        self.change(|s| {
            let u = s.users.get_mut(name).ok_or(AuthError::UserNotFound)?;
            u.password = hash;
            u.no_password = false;
            Ok(((), true))
        })?;
        self.0.tokens.lock().revoke_user(name);
        Ok(())
    }

    /// A user's roles, sorted.
    pub fn user_get(&self, name: &str) -> Result<Vec<String>, AuthError> {
        let s = self.0.state.read();
        let u = s.users.get(name).ok_or(AuthError::UserNotFound)?;
        Ok(u.roles.iter().cloned().collect())
    }

    /// Every user's name, sorted.
    pub fn user_list(&self) -> Vec<String> {
        self.0.state.read().users.keys().cloned().collect()
    }

    /// Grants `role` (which must exist, unless it is `root`) to `user`.
    pub fn user_grant_role(&self, user: &str, role: &str) -> Result<(), AuthError> {
        self.change(|s| {
            if role != ROOT && !s.roles.contains_key(role) {
                if !s.users.contains_key(user) {
                    return Err(AuthError::UserNotFound);
                }
                return Err(AuthError::RoleNotFound);
            }
            let u = s.users.get_mut(user).ok_or(AuthError::UserNotFound)?;
            let added = u.roles.insert(role.to_string());
            Ok(((), added))
        })
    }

    /// Takes `role` from `user` (not `root` from `root` while auth is on).
    pub fn user_revoke_role(&self, user: &str, role: &str) -> Result<(), AuthError> {
        self.change(|s| {
            if s.enabled && user == ROOT && role == ROOT {
                return Err(AuthError::InvalidAuthMgmt);
            }
            let u = s.users.get_mut(user).ok_or(AuthError::UserNotFound)?;
            if !u.roles.remove(role) {
                return Err(AuthError::RoleNotGranted);
            }
            Ok(((), true))
        })
    }

    /// Adds an empty role.
    pub fn role_add(&self, name: &str) -> Result<(), AuthError> {
        if name.is_empty() {
            return Err(AuthError::RoleEmpty);
        }
        self.change(|s| {
            if s.roles.contains_key(name) {
                return Err(AuthError::RoleAlreadyExist);
            }
            s.roles.insert(name.to_string(), Vec::new());
            Ok(((), true))
        })
    }

    /// A role's permissions as granted (`root` lists none, as in etcd 3.4,
    /// though it may do everything).
    pub fn role_get(&self, name: &str) -> Result<Vec<Permission>, AuthError> {
        let s = self.0.state.read();
        s.roles.get(name).cloned().ok_or(AuthError::RoleNotFound)
    }

    /// Every role's name, sorted.
    pub fn role_list(&self) -> Vec<String> {
        self.0.state.read().roles.keys().cloned().collect()
    }

    /// Every role with its permissions (for snapshots and the console).
    pub fn roles(&self) -> Vec<RoleInfo> {
        let s = self.0.state.read();
        s.roles
            .iter()
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect()
    }

    /// Deletes a role (not `root` while auth is on) and takes it from every user.
    pub fn role_delete(&self, name: &str) -> Result<(), AuthError> {
        self.change(|s| {
            if s.enabled && name == ROOT {
                return Err(AuthError::InvalidAuthMgmt);
            }
            s.roles.remove(name).ok_or(AuthError::RoleNotFound)?;
            for u in s.users.values_mut() {
                u.roles.remove(name);
            }
            Ok(((), true))
        })
    }

    /// Grants `perm` to `role`, replacing the type of a grant on the same range.
    pub fn role_grant_permission(
        &self,
        role: &str,
        perm: Option<Permission>,
    ) -> Result<(), AuthError> {
        let perm = perm.ok_or(AuthError::PermissionNotGiven)?;
        if !valid_permission_range(&perm.key, &perm.range_end)
            || Type::try_from(perm.perm_type).is_err()
        {
            return Err(AuthError::InvalidAuthMgmt);
        }
        self.change(|s| {
            let perms = s.roles.get_mut(role).ok_or(AuthError::RoleNotFound)?;
            match perms
                .iter_mut()
                .find(|p| p.key == perm.key && p.range_end == perm.range_end)
            {
                Some(p) => p.perm_type = perm.perm_type,
                None => {
                    perms.push(perm);
                    perms.sort_by(|a, b| a.key.cmp(&b.key));
                }
            }
            Ok(((), true))
        })
    }

    /// Takes the grant on exactly `(key, range_end)` from `role`.
    pub fn role_revoke_permission(
        &self,
        role: &str,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), AuthError> {
        self.change(|s| {
            let perms = s.roles.get_mut(role).ok_or(AuthError::RoleNotFound)?;
            let before = perms.len();
            perms.retain(|p| !(p.key == key && p.range_end == range_end));
            if perms.len() == before {
                return Err(AuthError::PermissionNotGranted);
            }
            Ok(((), true))
        })
    }

    /// Whether `user` holds `role`.
    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.0
            .state
            .read()
            .users
            .get(user)
            .is_some_and(|u| u.roles.contains(role))
    }
}

#[cfg(test)]
mod tests;
