//! Auth tokens, as etcd issues them: simple tokens (random, held in memory,
//! valid for a TTL that every use renews, gone on restart, dropped when
//! their user is deleted or changes password) or JWTs (HS256, stateless,
//! carrying the user and the auth revision they were issued at; any change
//! to users or roles makes them old, as in etcd).

use std::collections::HashMap;
use std::time::Duration;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Which tokens `Authenticate` hands out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// Random tokens held by this server (etcd's `--auth-token simple`).
    Simple,
    /// JWTs signed with HMAC-SHA256 (etcd's `--auth-token jwt,sign-method=HS256`).
    Jwt,
}

/// What a valid token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TokenInfo {
    pub(crate) user: String,
    /// Auth revision the token was issued at (JWT only).
    pub(crate) revision: Option<u64>,
}

/// Why a token was not issued.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IssueError {
    #[error("etcdserver: too many auth tokens in use ({0}); retry once some expire")]
    Full(usize),
    #[error("etcdserver: signing the auth token failed: {0}")]
    Sign(String),
}

#[derive(Serialize, Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

/// The token table (simple) or the signing keys (JWT).
pub(crate) struct Tokens {
    kind: TokenKind,
    ttl: Duration,
    max: usize,
    simple: HashMap<String, (String, Instant)>,
    next_index: u64,
    jwt: Option<(jsonwebtoken::EncodingKey, jsonwebtoken::DecodingKey)>,
}

impl Tokens {
    pub(crate) fn new(kind: TokenKind, ttl: Duration, max: usize, jwt_key: &[u8]) -> Tokens {
        Tokens {
            kind,
            ttl,
            max,
            simple: HashMap::new(),
            next_index: 1,
            jwt: (kind == TokenKind::Jwt).then(|| {
                (
                    jsonwebtoken::EncodingKey::from_secret(jwt_key),
                    jsonwebtoken::DecodingKey::from_secret(jwt_key),
                )
            }),
        }
    }

    /// A new token for `user` at auth revision `revision`.
    pub(crate) fn issue(&mut self, user: &str, revision: u64) -> Result<String, IssueError> {
        match &self.jwt {
            Some((key, _)) => {
                let exp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .saturating_add(self.ttl)
                    .as_secs();
                let claims = Claims {
                    username: user.to_string(),
                    revision,
                    exp,
                };
                jsonwebtoken::encode(
                    &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                    &claims,
                    key,
                )
                .map_err(|e| IssueError::Sign(e.to_string()))
            }
            None => {
                let now = Instant::now();
                if self.simple.len() >= self.max {
                    self.simple.retain(|_, (_, exp)| *exp > now);
                    if self.simple.len() >= self.max {
                        return Err(IssueError::Full(self.max));
                    }
                }
                let mut secret = [0u8; 16];
                rand::rng().fill_bytes(&mut secret);
                let mut token = String::with_capacity(48);
                for b in secret {
                    token.push_str(&format!("{b:02x}"));
                }
                token.push_str(&format!(".{}", self.next_index));
                self.next_index += 1;
                self.simple
                    .insert(token.clone(), (user.to_string(), now + self.ttl));
                Ok(token)
            }
        }
    }

    /// Who `token` belongs to, if it is valid now; a simple token's TTL
    /// starts again.
    pub(crate) fn check(&mut self, token: &str) -> Option<TokenInfo> {
        match &self.jwt {
            Some((_, key)) => {
                let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
                v.leeway = 0;
                v.set_required_spec_claims(&["exp"]);
                let data = jsonwebtoken::decode::<Claims>(token, key, &v).ok()?;
                Some(TokenInfo {
                    user: data.claims.username,
                    revision: Some(data.claims.revision),
                })
            }
            None => {
                let now = Instant::now();
                let (user, exp) = self.simple.get_mut(token)?;
                if *exp <= now {
                    self.simple.remove(token);
                    return None;
                }
                *exp = now + self.ttl;
                Some(TokenInfo {
                    user: user.clone(),
                    revision: None,
                })
            }
        }
    }

    /// Drops every simple token of `user`.
    pub(crate) fn revoke_user(&mut self, user: &str) {
        self.simple.retain(|_, (u, _)| u != user);
    }

    /// Drops every simple token (auth turned off).
    pub(crate) fn clear(&mut self) {
        self.simple.clear();
    }

    /// Simple tokens held now (expired ones included until next purge).
    pub(crate) fn len(&self) -> usize {
        self.simple.len()
    }

    pub(crate) fn kind(&self) -> TokenKind {
        self.kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn simple_tokens_expire_unless_used_and_are_bounded() {
        let mut t = Tokens::new(TokenKind::Simple, Duration::from_secs(300), 2, b"");
        let a = t.issue("alice", 1).unwrap();
        let b = t.issue("bob", 1).unwrap();
        assert_ne!(a, b);
        assert!(matches!(t.issue("carol", 1), Err(IssueError::Full(2))));
        tokio::time::advance(Duration::from_secs(200)).await;
        assert_eq!(t.check(&a).unwrap().user, "alice");
        tokio::time::advance(Duration::from_secs(200)).await;
        assert!(t.check(&b).is_none(), "bob's expired after 300 s unused");
        assert_eq!(t.check(&a).unwrap().user, "alice", "used at 200 s: renewed");
        let c = t.issue("alice", 1).unwrap();
        t.revoke_user("alice");
        assert!(t.check(&a).is_none() && t.check(&c).is_none());
        assert!(t.check("").is_none() && t.check("x.1").is_none());
    }

    #[test]
    fn jwts_verify_only_with_their_key_and_algorithm() {
        let mut t = Tokens::new(
            TokenKind::Jwt,
            Duration::from_secs(300),
            1,
            b"k1-0123456789abcdef",
        );
        let tok = t.issue("alice", 7).unwrap();
        assert_eq!(
            t.check(&tok),
            Some(TokenInfo {
                user: "alice".into(),
                revision: Some(7)
            })
        );
        let mut other = Tokens::new(
            TokenKind::Jwt,
            Duration::from_secs(300),
            1,
            b"k2-0123456789abcdef",
        );
        assert!(other.check(&tok).is_none(), "another key");
        // alg "none" with the same claims.
        let parts: Vec<&str> = tok.split('.').collect();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", parts[1]);
        assert!(t.check(&none).is_none());
        let past = Claims {
            username: "alice".into(),
            revision: 7,
            exp: 1_000_000,
        };
        let old = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &past,
            &jsonwebtoken::EncodingKey::from_secret(b"k1-0123456789abcdef"),
        )
        .unwrap();
        assert!(t.check(&old).is_none(), "expired");
    }
}
