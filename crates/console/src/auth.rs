//! Who may call the node's HTTP API. When a console password is configured,
//! every call a route's scope covers (`meshwork_api::scope::need`: writes, and
//! with `protect_reads` reads too) needs an API token whose scopes cover it
//! (`Authorization: Bearer mwt_...`), or the administrator's login: the session
//! cookie the console sets, or HTTP Basic credentials; or the login of a user
//! kept in the store (`meshwork_coord::users`: its own password and scopes).
//! Sessions are signed with HMAC-SHA256 under a key derived from one kept in
//! the store (made once, shared by every node) and the administrator's
//! password: sessions survive a restart, and a new password ends them all; a
//! store user's session also names the generation of its record, so changing
//! or removing the user ends its sessions.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hmac::{Hmac, Mac};
use http::{HeaderMap, StatusCode, header};
use sha2::{Digest, Sha256};

/// Name of the session cookie.
pub const COOKIE: &str = "mw_session";
/// How long a login lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// Who may write, and the key sessions are signed with.
#[derive(Clone)]
pub struct Auth {
    user: String,
    password_digest: [u8; 32],
    key: [u8; 32],
    /// Failed password logins per (address, user name).
    throttle: std::sync::Arc<meshwork_api::Throttle<(Option<std::net::IpAddr>, String)>>,
    /// The users kept in the store, on nodes running coordination.
    users: Option<meshwork_coord::users::Users>,
    /// Store users' Basic credentials already checked: (user, password
    /// digest) → the generation they were checked at (Argon2 once, not per call).
    checked: std::sync::Arc<parking_lot::Mutex<CheckedLogins>>,
}

/// Store users' Basic credentials already checked: (user, password digest)
/// → the generation they were checked at.
type CheckedLogins = std::collections::HashMap<(String, [u8; 32]), String>;

/// Most remembered Basic credential checks (cleared when full).
const MAX_CHECKED: usize = 1024;

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Equal without an early exit (both are digests of the same length).
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Auth {
    /// Signs sessions with a key derived from `key` (the one kept in the
    /// store, so that they survive a restart and hold on every node) and the
    /// password: a new password ends every session, and the stored key alone
    /// forges none.
    pub fn with_session_key(mut self, key: [u8; 32]) -> Auth {
        let mut h = Sha256::new();
        h.update(b"meshwork console session key\0");
        h.update(key);
        h.update(self.password_digest);
        self.key = h.finalize().into();
        self
    }

    /// Writes need `user` / `password` (at least 8 characters).
    pub fn new(user: &str, password: &str) -> Result<Auth, String> {
        if user.is_empty() || user.len() > 64 || user.contains(['|', ':']) {
            return Err("console user must be 1..=64 characters without '|' or ':'".into());
        }
        if password.chars().count() < 8 {
            return Err("console password must be at least 8 characters".into());
        }
        Ok(Auth {
            user: user.to_string(),
            password_digest: digest(password),
            key: rand::random(),
            throttle: std::sync::Arc::new(meshwork_api::Throttle::new(FREE_LOGIN_FAILURES)),
            users: None,
            checked: Default::default(),
        })
    }

    /// Also signs in the users kept in the store.
    pub fn with_users(mut self, users: meshwork_coord::users::Users) -> Auth {
        self.users = Some(users);
        self
    }

    /// A store user whose `password` was checked already (at its current
    /// generation): no Argon2 here.
    fn cached_store_user(
        &self,
        user: &str,
        password: &str,
    ) -> Option<meshwork_coord::users::SignedIn> {
        let users = self.users.as_ref()?;
        let generation = self
            .checked
            .lock()
            .get(&(user.to_string(), digest(password)))
            .cloned()?;
        users.at_generation(user, &generation)
    }

    /// Who `user`/`password` are without running Argon2: the administrator,
    /// or a store user whose password was checked before.
    fn known_login(&self, user: &str, password: &str) -> Option<Principal> {
        // Both compared, always: no early answer on a wrong user.
        let user_ok = same(&digest(user), &digest(&self.user));
        let pass_ok = same(&digest(password), &self.password_digest);
        if user_ok {
            // The administrator's name is the administrator's only: a store
            // user of the same name never signs in as either.
            return pass_ok.then_some(Principal::Admin);
        }
        self.cached_store_user(user, password).map(Principal::User)
    }

    /// Checks a password login of `user` from `ip`: `Err(seconds)` while
    /// this address and user must wait after too many failures (the
    /// password is then not even checked; also while every Argon2 slot is
    /// busy), else who signed in, if the password is right. Argon2 runs on
    /// the blocking pool, at most [`ARGON2_AT_ONCE`] at a time.
    pub async fn login(
        &self,
        user: &str,
        password: &str,
        ip: Option<std::net::IpAddr>,
    ) -> Result<Option<Principal>, u64> {
        let key = (ip, user.to_string());
        self.throttle.check(&key)?;
        let mut who = self.known_login(user, password);
        if who.is_none()
            && user != self.user
            && let Some(users) = self.users.clone()
        {
            static SLOTS: tokio::sync::Semaphore =
                tokio::sync::Semaphore::const_new(ARGON2_AT_ONCE);
            let Ok(_slot) = SLOTS.try_acquire() else {
                return Err(1);
            };
            let (u, p) = (user.to_string(), password.to_string());
            let checked = tokio::task::spawn_blocking(move || users.verify(&u, &p))
                .await
                .ok()
                .flatten();
            if let Some(s) = &checked {
                let mut map = self.checked.lock();
                if map.len() >= MAX_CHECKED {
                    map.clear();
                }
                map.insert((user.to_string(), digest(password)), s.generation.clone());
            }
            who = checked.map(Principal::User);
        }
        if who.is_some() {
            self.throttle.succeeded(&key);
        } else {
            self.throttle.failed(key);
        }
        Ok(who)
    }

    /// The user and password of HTTP Basic credentials in `headers`.
    pub fn basic_of(headers: &HeaderMap) -> Option<(String, String)> {
        let basic = headers
            .get(header::AUTHORIZATION)?
            .to_str()
            .ok()?
            .strip_prefix("Basic ")?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(basic.trim())
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (u, p) = decoded.split_once(':')?;
        Some((u.to_string(), p.to_string()))
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Whether `user`/`password` are the administrator's, or a store user's
    /// checked before (no Argon2 here).
    pub fn check(&self, user: &str, password: &str) -> bool {
        self.known_login(user, password).is_some()
    }

    fn sign(&self, payload: &str) -> String {
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(m) => m,
            // HMAC takes keys of any length.
            Err(_) => return String::new(),
        };
        mac.update(payload.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// A session cookie value for the administrator, valid for [`SESSION_TTL`].
    pub fn session(&self) -> String {
        self.session_for(&Principal::Admin)
    }

    /// A session cookie value for `who` (what [`Auth::login`] answered),
    /// valid for [`SESSION_TTL`]: a store user's names its generation.
    pub fn session_for(&self, who: &Principal) -> String {
        let (user, generation) = match who {
            Principal::Admin => (self.user.as_str(), ""),
            Principal::User(s) => (s.name.as_str(), s.generation.as_str()),
        };
        let payload = format!(
            "{user}|{}|{generation}",
            now_ms() + SESSION_TTL.as_millis() as u64
        );
        let sig = self.sign(&payload);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{payload}|{sig}"))
    }

    /// Who a valid, unexpired session cookie value signs in.
    pub fn verify(&self, value: &str) -> Option<Principal> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(value)
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (payload, sig) = raw.rsplit_once('|')?;
        let expected = self.sign(payload);
        if expected.len() != sig.len() || !same(&digest(&expected), &digest(sig)) {
            return None;
        }
        let mut parts = payload.splitn(3, '|');
        let (user, expiry, generation) = (parts.next()?, parts.next()?, parts.next()?);
        if expiry.parse::<u64>().ok()? <= now_ms() {
            return None;
        }
        if generation.is_empty() {
            return (user == self.user).then_some(Principal::Admin);
        }
        // A store user: only while its record is the one it signed in with.
        self.users
            .as_ref()?
            .at_generation(user, generation)
            .map(Principal::User)
    }

    /// The logged-in user of a request (session cookie, or Basic
    /// credentials of the administrator or checked before).
    pub fn user_of(&self, headers: &HeaderMap) -> Option<String> {
        self.principal_of(headers).map(|p| p.name(self).to_string())
    }

    /// Who a request signs in as, without running Argon2 (see [`Auth::user_of`]).
    pub fn principal_of(&self, headers: &HeaderMap) -> Option<Principal> {
        if let Some(v) = meshwork_gateway::cookie(headers, COOKIE)
            && let Some(p) = self.verify(v)
        {
            return Some(p);
        }
        let (u, p) = Self::basic_of(headers)?;
        self.known_login(&u, &p)
    }
}

/// Most Argon2 password checks running at once (each takes a blocking
/// thread, ~19 MiB and tens of milliseconds): more logins wait a second.
pub const ARGON2_AT_ONCE: usize = 2;

/// Who signed in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// The configured administrator (every scope).
    Admin,
    /// A user kept in the store, with its record's scopes.
    User(meshwork_coord::users::SignedIn),
}

impl Principal {
    /// Its name.
    pub fn name<'a>(&'a self, auth: &'a Auth) -> &'a str {
        match self {
            Principal::Admin => &auth.user,
            Principal::User(s) => &s.name,
        }
    }

    /// What it may do.
    pub fn scopes(&self) -> Vec<meshwork_api::scope::Scope> {
        match self {
            Principal::Admin => vec![meshwork_api::scope::Scope::Admin],
            Principal::User(s) => s.scopes.iter().filter_map(|x| x.parse().ok()).collect(),
        }
    }

    /// Whether it holds the `admin` scope.
    pub fn is_admin(&self) -> bool {
        self.scopes().contains(&meshwork_api::scope::Scope::Admin)
    }
}

/// An `Authorization` header value with HTTP Basic credentials.
pub fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Who may call the node's HTTP API: the console's administrator login and
/// the API tokens, against the scope each route needs
/// (`meshwork_api::scope::need`).
#[derive(Clone, Default)]
pub struct HttpAuth {
    /// The administrator login; `None` leaves the API open (loopback only,
    /// unless the node was started with `--insecure-allow-open`).
    pub console: Option<Auth>,
    /// The API tokens (on nodes running coordination).
    pub tokens: Option<meshwork_coord::tokens::Tokens>,
    /// Reads need a token or login too, not only writes.
    pub protect_reads: bool,
    /// Where calls that change something are recorded.
    pub audit: Option<meshwork_coord::audit::AuditLog>,
    /// Calls each token or login may make per second (`None`: no limit).
    pub rate: Option<std::sync::Arc<governor::DefaultKeyedRateLimiter<String>>>,
}

impl HttpAuth {
    /// The per-identity limiter for `per_second` calls (bursts of twice that).
    pub fn rate_limit(
        per_second: u32,
    ) -> Option<std::sync::Arc<governor::DefaultKeyedRateLimiter<String>>> {
        let rate = std::num::NonZeroU32::new(per_second)?;
        let burst = rate.saturating_mul(std::num::NonZeroU32::new(2)?);
        Some(std::sync::Arc::new(governor::RateLimiter::keyed(
            governor::Quota::per_second(rate).allow_burst(burst),
        )))
    }
}

/// Failed logins let through from one address before each next try waits.
pub const FREE_LOGIN_FAILURES: u32 = 5;

impl HttpAuth {
    /// Whether calls are checked at all.
    pub fn enabled(&self) -> bool {
        self.console.is_some()
    }
}

fn refuse(req_headers: &HeaderMap, status: StatusCode, code: &str, message: String) -> Response {
    let e = meshwork_api::ApiError::new(status, code, message);
    // A gRPC client reads a status, not a JSON body.
    if meshwork_api::is_grpc(req_headers) {
        return e.grpc_response();
    }
    e.into_response()
}

/// Middleware for the node's whole HTTP router: a call a route's scope
/// covers passes; one without credentials is refused with 401, one whose
/// token lacks the scope with 403, before any handler runs. Every call that
/// is not a read, passed or refused, goes to the audit log.
pub async fn guard(State(auth): State<HttpAuth>, req: Request, next: Next) -> Response {
    guarded(&auth, req, next).await
}

/// The check itself: needs, identity, scope, rate, then the audit log.
async fn guarded(auth: &HttpAuth, req: Request, next: Next) -> Response {
    use meshwork_api::scope::{Access, need};
    let Some(need) = need(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let reading = need.access == Access::Read;
    let method = req.method().clone();
    let audited = !matches!(
        method,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    );
    let path = req.uri().path().to_string();
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    let from = peer.map(|p| p.to_string()).unwrap_or_default();
    use meshwork_api::scope::{Granted, allowed};
    let ip = peer.map(|p| p.ip());
    let open_read = reading && need.area != "admin" && !auth.protect_reads;
    let checked = match &auth.console {
        None => Ok(("anonymous".to_string(), Granted::Open)),
        // An open read: anyone may, but credentials that check out still count
        // (what the route does not need, a handler may: a secret's content).
        Some(console) if open_read => {
            let shown = req.headers().contains_key(header::AUTHORIZATION)
                || meshwork_gateway::cookie(req.headers(), COOKIE).is_some();
            let who = if shown {
                Some(authenticate(auth, console, req.headers(), ip, &need).await)
            } else {
                None
            };
            match who {
                Some(Ok((who, scopes))) => Ok((who, Granted::Scopes(scopes))),
                _ => Ok(("-".to_string(), Granted::Scopes(Vec::new()))),
            }
        }
        Some(console) => match authenticate(auth, console, req.headers(), ip, &need).await {
            Ok((who, scopes)) if allowed(&scopes, &need) => Ok((who, Granted::Scopes(scopes))),
            Ok((who, _)) => {
                let r = refuse(
                    req.headers(),
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!("this call needs the scope {need}, which the token does not have"),
                );
                Err(Box::new((who, r)))
            }
            Err(refused) => Err(refused),
        },
    };
    // Each token or login calls at most its rate.
    let checked = match (checked, &auth.rate) {
        // Open reads are not counted: anyone may make them without a token.
        (Ok((who, _)), Some(rate))
            if !open_read && who.contains(':') && rate.check_key(&who).is_err() =>
        {
            metrics::counter!("meshwork_api_rate_limited_total").increment(1);
            let r = refuse(
                req.headers(),
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "this token calls faster than the node allows ([console] token_rate_per_sec); slow down".into(),
            );
            Err(Box::new((who, r)))
        }
        (c, _) => c,
    };
    let (who, resp) = match checked {
        Ok((who, granted)) => {
            let mut req = req;
            req.extensions_mut().insert(granted);
            req.extensions_mut()
                .insert(meshwork_api::scope::Who(who.clone()));
            (who, next.run(req).await)
        }
        Err(refused) => *refused,
    };
    if audited && let Some(log) = &auth.audit {
        log.record(meshwork_coord::audit::AuditEntry {
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            who,
            from,
            method: method.to_string(),
            path,
            scope: need.to_string(),
            status: resp.status().as_u16(),
            node: String::new(),
        });
    }
    resp
}

/// The administrator a call signs in as: its session cookie, or HTTP Basic
/// credentials (throttled per address and user after failures).
async fn login_of(
    console: &Auth,
    headers: &HeaderMap,
    ip: Option<std::net::IpAddr>,
) -> Result<Option<Principal>, u64> {
    if let Some(v) = meshwork_gateway::cookie(headers, COOKIE)
        && let Some(p) = console.verify(v)
    {
        return Ok(Some(p));
    }
    match Auth::basic_of(headers) {
        Some((u, p)) => console.login(&u, &p, ip).await,
        None => Ok(None),
    }
}

/// A 429 with Retry-After for a throttled login.
pub fn throttled(headers: &HeaderMap, wait: u64) -> Response {
    let mut r = refuse(
        headers,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("too many failed logins for this user from this address; retry in {wait} s"),
    );
    if let Ok(v) = http::HeaderValue::from_str(&wait.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// Who sent a call (for a call that needs `need`) and the scopes they hold:
/// `token:<id>` or `console:<user>`; else who it claimed to be and the refusal.
#[allow(clippy::type_complexity)]
async fn authenticate(
    auth: &HttpAuth,
    console: &Auth,
    headers: &HeaderMap,
    ip: Option<std::net::IpAddr>,
    need: &meshwork_api::scope::Need,
) -> Result<(String, Vec<meshwork_api::scope::Scope>), Box<(String, Response)>> {
    use meshwork_api::scope::Scope;
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let (who, scopes): (String, Vec<Scope>) = match bearer {
        Some(token) => {
            let checked = match &auth.tokens {
                Some(t) => t.check(token).map_err(|r| r.to_string()),
                None => Err("this node runs no coordination, so it has no API tokens".into()),
            };
            match checked {
                // Stored scopes were validated when the token was made.
                Ok(info) => (
                    format!("token:{}", info.id),
                    info.scopes.iter().filter_map(|s| s.parse().ok()).collect(),
                ),
                Err(why) => {
                    return Err(Box::new((
                        "invalid-token".into(),
                        refuse(headers, StatusCode::UNAUTHORIZED, "unauthenticated", why),
                    )));
                }
            }
        }
        None => match login_of(console, headers, ip).await {
            Ok(Some(who)) => (format!("console:{}", who.name(console)), who.scopes()),
            Err(wait) => {
                return Err(Box::new(("throttled".into(), throttled(headers, wait))));
            }
            // No WWW-Authenticate challenge: browsers would answer the console's
            // fetch() calls with their own password prompt.
            Ok(None) => {
                return Err(Box::new((
                    "anonymous".into(),
                    refuse(
                        headers,
                        StatusCode::UNAUTHORIZED,
                        "unauthenticated",
                        format!(
                            "this call needs {need}: send a token (Authorization: Bearer mwt_...; `meshwork token create`), \
                             sign in on the console (/ui/login) or send HTTP Basic credentials"
                        ),
                    ),
                )));
            }
        },
    };
    Ok((who, scopes))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sessions_verify_and_forgeries_do_not() {
        let a = Auth::new("admin", "correct horse").unwrap();
        let s = a.session();
        assert_eq!(a.verify(&s), Some(super::Principal::Admin));
        let other = Auth::new("admin", "correct horse").unwrap();
        assert_eq!(other.verify(&s), None, "another key does not verify it");
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("admin|{}|AAAA", now_ms() + 1_000_000));
        assert_eq!(a.verify(&forged), None);
        assert!(a.check("admin", "correct horse"));
        assert!(!a.check("admin", "wrong horse"));
        assert!(!a.check("root", "correct horse"));
        assert!(Auth::new("admin", "short").is_err());
    }
}
