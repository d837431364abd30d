//! Console login. When a password is configured, every write to the node's HTTP
//! API (any method but GET/HEAD/OPTIONS under `/v1/` and `/gateway/`, except
//! the config long-poll, which only reads) needs either the session cookie the
//! login sets or HTTP Basic credentials; reads stay open. Sessions are signed
//! with HMAC-SHA256 under a key drawn at start, so a restart logs everyone out.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hmac::{Hmac, Mac};
use http::{HeaderMap, Method, StatusCode, header};
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
}

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
        })
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Whether `user`/`password` are the configured ones.
    pub fn check(&self, user: &str, password: &str) -> bool {
        // Both compared, always: no early answer on a wrong user.
        let user_ok = same(&digest(user), &digest(&self.user));
        let pass_ok = same(&digest(password), &self.password_digest);
        user_ok & pass_ok
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

    /// A session cookie value for the user, valid for [`SESSION_TTL`].
    pub fn session(&self) -> String {
        let payload = format!(
            "{}|{}",
            self.user,
            now_ms() + SESSION_TTL.as_millis() as u64
        );
        let sig = self.sign(&payload);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{payload}|{sig}"))
    }

    /// The user of a valid, unexpired session cookie value.
    pub fn verify(&self, value: &str) -> Option<String> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(value)
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (payload, sig) = raw.rsplit_once('|')?;
        let expected = self.sign(payload);
        if expected.len() != sig.len() || !same(&digest(&expected), &digest(sig)) {
            return None;
        }
        let (user, expiry) = payload.split_once('|')?;
        (expiry.parse::<u64>().ok()? > now_ms() && user == self.user).then(|| user.to_string())
    }

    /// The logged-in user of a request (session cookie or Basic credentials).
    pub fn user_of(&self, headers: &HeaderMap) -> Option<String> {
        if let Some(v) = meshwork_gateway::cookie(headers, COOKIE)
            && let Some(u) = self.verify(v)
        {
            return Some(u);
        }
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
        self.check(u, p).then(|| u.to_string())
    }
}

/// An `Authorization` header value with HTTP Basic credentials.
pub fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Whether a request writes (and so needs a login when auth is on).
pub fn is_write(method: &Method, path: &str) -> bool {
    let reads = [Method::GET, Method::HEAD, Method::OPTIONS];
    if reads.contains(method) {
        return false;
    }
    if path == "/v1/config/listener"
        || path == "/v1/console/login"
        || path == "/v1/console/validate"
    {
        return false;
    }
    // gRPC services (`/meshwork.mq.v1.Broker/...`): every call publishes or consumes.
    path.starts_with("/v1/") || path.starts_with("/gateway/") || path.starts_with("/meshwork.")
}

/// Middleware for the node's whole HTTP router: refuses writes without a login.
pub async fn guard(State(auth): State<Option<Auth>>, req: Request, next: Next) -> Response {
    if let Some(auth) = &auth
        && is_write(req.method(), req.uri().path())
        && auth.user_of(req.headers()).is_none()
    {
        // No WWW-Authenticate challenge: browsers would answer the console's
        // fetch() calls with their own password prompt. API clients send Basic
        // credentials up front (`curl -u`).
        let e = meshwork_api::ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "writes need a login: sign in on the console (/ui/login) or send HTTP Basic credentials",
        );
        // A gRPC client reads a status, not a JSON body.
        if meshwork_api::is_grpc(req.headers()) {
            return e.grpc_response();
        }
        return e.into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sessions_verify_and_forgeries_do_not() {
        let a = Auth::new("admin", "correct horse").unwrap();
        let s = a.session();
        assert_eq!(a.verify(&s).as_deref(), Some("admin"));
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

    #[test]
    fn writes_are_told_from_reads() {
        assert!(is_write(&Method::PUT, "/v1/config/a/b/c"));
        assert!(is_write(&Method::DELETE, "/v1/services/x/instances/y"));
        assert!(!is_write(&Method::GET, "/v1/config/a/b/c"));
        assert!(!is_write(&Method::POST, "/v1/config/listener"));
        assert!(!is_write(&Method::POST, "/ui/login"));
        assert!(is_write(&Method::POST, "/meshwork.mq.v1.Broker/Publish"));
        assert!(is_write(&Method::POST, "/meshwork.mq.v1.Broker/Consume"));
    }
}
