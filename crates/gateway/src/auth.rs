//! Authentication (JWT, API keys) and client IP allow/deny lists.

use std::collections::HashMap;
use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::error::{ErrorCode, GatewayError};
use crate::route::compile::Resolved;
use crate::route::model::{ApiKeyConfig, AuthConfig, IpAclConfig, JwtConfig};

/// A problem found while compiling auth settings: (field, message).
pub(crate) type FieldError = (String, String);

fn ferr(field: &str, msg: impl Into<String>) -> FieldError {
    (field.to_owned(), msg.into())
}

/// Compiled IP lists.
#[derive(Debug, Clone)]
pub(crate) struct IpAcl {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

impl IpAcl {
    pub(crate) fn compile(cfg: &IpAclConfig) -> Result<Self, FieldError> {
        let parse = |list: &[String], field: &str| -> Result<Vec<IpNet>, FieldError> {
            list.iter()
                .enumerate()
                .map(|(i, s)| {
                    parse_net(s.trim()).ok_or_else(|| {
                        ferr(
                            &format!("ip.{field}[{i}]"),
                            format!("`{s}` is not an IP address or CIDR"),
                        )
                    })
                })
                .collect()
        };
        Ok(Self {
            allow: parse(&cfg.allow, "allow")?,
            deny: parse(&cfg.deny, "deny")?,
        })
    }

    /// Whether `ip` may pass.
    pub(crate) fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }
}

#[derive(Clone)]
struct Jwt {
    validation: Validation,
    /// Key used when the token names no `kid` (or no JWKS).
    default_key: Option<DecodingKey>,
    /// JWKS keys by `kid`.
    by_kid: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    required: Vec<String>,
    forward: Vec<(String, HeaderName)>,
    strip: bool,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt")
            .field("algorithms", &self.validation.algorithms)
            .field("kids", &self.by_kid.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
struct ApiKeys {
    header: HeaderName,
    /// key -> consumer
    keys: Vec<(Vec<u8>, HeaderValue)>,
    consumer_header: HeaderName,
}

/// Compiled authentication of a route.
#[derive(Debug, Clone)]
pub(crate) struct Auth {
    jwt: Option<Jwt>,
    api_keys: Option<ApiKeys>,
}

/// A key file's contents, read beforehand by the resolve step.
fn read<'r>(
    res: &'r Resolved,
    path: &std::path::Path,
    field: &str,
) -> Result<&'r [u8], FieldError> {
    res.file(path).map_err(|m| ferr(field, m))
}

fn parse_alg(s: &str, field: &str) -> Result<Algorithm, FieldError> {
    match s {
        "HS256" => Ok(Algorithm::HS256),
        "RS256" => Ok(Algorithm::RS256),
        "ES256" => Ok(Algorithm::ES256),
        other => Err(ferr(
            field,
            format!("unsupported algorithm `{other}` (HS256, RS256, ES256)"),
        )),
    }
}

fn header_name(s: &str, field: &str) -> Result<HeaderName, FieldError> {
    HeaderName::from_bytes(s.as_bytes())
        .map_err(|_| ferr(field, format!("`{s}` is not a valid header name")))
}

impl Jwt {
    fn compile(cfg: &JwtConfig, res: &Resolved) -> Result<Self, FieldError> {
        let sources = [
            cfg.secret.is_some(),
            cfg.secret_file.is_some(),
            cfg.public_key_file.is_some(),
            cfg.jwks_file.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if sources != 1 {
            return Err(ferr(
                "auth.jwt",
                "set exactly one of secret, secret_file, public_key_file, jwks_file",
            ));
        }
        let mut algs: Vec<Algorithm> = cfg
            .algorithms
            .iter()
            .enumerate()
            .map(|(i, a)| parse_alg(a, &format!("auth.jwt.algorithms[{i}]")))
            .collect::<Result<_, _>>()?;
        let mut default_key = None;
        let mut by_kid = HashMap::new();
        if let Some(secret) = &cfg.secret {
            if secret.is_empty() {
                return Err(ferr("auth.jwt.secret", "must not be empty"));
            }
            default_key = Some(DecodingKey::from_secret(secret.as_bytes()));
            if algs.is_empty() {
                algs.push(Algorithm::HS256);
            }
        } else if let Some(path) = &cfg.secret_file {
            let raw = read(res, path, "auth.jwt.secret_file")?;
            let trimmed = raw.trim_ascii_end();
            if trimmed.is_empty() {
                return Err(ferr("auth.jwt.secret_file", "the file is empty"));
            }
            default_key = Some(DecodingKey::from_secret(trimmed));
            if algs.is_empty() {
                algs.push(Algorithm::HS256);
            }
        } else if let Some(path) = &cfg.public_key_file {
            let pem = read(res, path, "auth.jwt.public_key_file")?;
            let text = String::from_utf8_lossy(pem);
            let (key, alg) =
                if text.contains("BEGIN EC PUBLIC KEY") || algs.contains(&Algorithm::ES256) {
                    (DecodingKey::from_ec_pem(pem), Algorithm::ES256)
                } else {
                    (DecodingKey::from_rsa_pem(pem), Algorithm::RS256)
                };
            let key = key.or_else(|_| {
                // Try the other family before giving up.
                if alg == Algorithm::ES256 {
                    DecodingKey::from_rsa_pem(pem)
                } else {
                    DecodingKey::from_ec_pem(pem)
                }
            });
            let key = key.map_err(|e| {
                ferr(
                    "auth.jwt.public_key_file",
                    format!("not a PEM RSA or EC public key: {e}"),
                )
            })?;
            default_key = Some(key);
            if algs.is_empty() {
                algs.push(alg);
            }
        } else if let Some(path) = &cfg.jwks_file {
            let raw = read(res, path, "auth.jwt.jwks_file")?;
            let set: JwkSet = serde_json::from_slice(raw)
                .map_err(|e| ferr("auth.jwt.jwks_file", format!("not a JWKS document: {e}")))?;
            for (i, jwk) in set.keys.iter().enumerate() {
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| ferr(&format!("auth.jwt.jwks_file.keys[{i}]"), e.to_string()))?;
                let alg = jwk
                    .common
                    .key_algorithm
                    .and_then(|a| a.to_string().parse::<Algorithm>().ok());
                match &jwk.common.key_id {
                    Some(kid) => {
                        by_kid.insert(kid.clone(), (key, alg));
                    }
                    None if default_key.is_none() => default_key = Some(key),
                    None => {}
                }
                if algs.is_empty()
                    && let Some(a) = alg
                    && !algs.contains(&a)
                {
                    algs.push(a);
                }
            }
            if by_kid.is_empty() && default_key.is_none() {
                return Err(ferr("auth.jwt.jwks_file", "the document has no keys"));
            }
            if algs.is_empty() {
                algs = vec![Algorithm::RS256, Algorithm::ES256];
            }
        }
        let mut validation = Validation::new(algs[0]);
        validation.algorithms = algs;
        validation.leeway = cfg.leeway_secs.unwrap_or(30);
        if let Some(iss) = &cfg.issuer {
            validation.set_issuer(&[iss]);
        }
        if cfg.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&cfg.audience);
        }
        let mut spec: Vec<&str> = vec!["exp"];
        if cfg.issuer.is_some() {
            spec.push("iss");
        }
        if !cfg.audience.is_empty() {
            spec.push("aud");
        }
        validation.set_required_spec_claims(&spec);
        let forward = cfg
            .forward_claims
            .iter()
            .map(|(claim, h)| {
                Ok((
                    claim.clone(),
                    header_name(h, &format!("auth.jwt.forward_claims.{claim}"))?,
                ))
            })
            .collect::<Result<_, FieldError>>()?;
        Ok(Self {
            validation,
            default_key,
            by_kid,
            required: cfg.required_claims.clone(),
            forward,
            strip: cfg.strip_token,
        })
    }

    fn verify(&self, token: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| format!("malformed token: {e}"))?;
        let key = match header.kid.as_ref().and_then(|k| self.by_kid.get(k)) {
            Some((key, alg)) => {
                if alg.is_some_and(|a| a != header.alg) {
                    return Err("token algorithm does not match its key".into());
                }
                key
            }
            None if header.kid.is_some()
                && !self.by_kid.is_empty()
                && self.default_key.is_none() =>
            {
                return Err("unknown key id".into());
            }
            None => self.default_key.as_ref().ok_or("no key for this token")?,
        };
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            key,
            &self.validation,
        )
        .map_err(|e| format!("invalid token: {e}"))?;
        for c in &self.required {
            if !data.claims.contains_key(c) {
                return Err(format!("token lacks required claim `{c}`"));
            }
        }
        Ok(data.claims)
    }
}

impl Auth {
    pub(crate) fn compile(cfg: &AuthConfig, res: &Resolved) -> Result<Self, FieldError> {
        if cfg.jwt.is_none() && cfg.api_keys.is_none() {
            return Err(ferr("auth", "set jwt and/or api_keys"));
        }
        let jwt = cfg.jwt.as_ref().map(|j| Jwt::compile(j, res)).transpose()?;
        let api_keys = cfg.api_keys.as_ref().map(compile_keys).transpose()?;
        Ok(Self { jwt, api_keys })
    }

    /// Checks the request's credentials; on success adjusts the headers
    /// going upstream (claims, consumer, stripped secrets).
    pub(crate) fn check(&self, headers: &mut HeaderMap) -> Result<(), GatewayError> {
        // A client must not be able to forge what authentication asserts.
        let forged: Vec<HeaderName> = self.forwarded_headers().cloned().collect();
        for h in forged {
            headers.remove(h);
        }
        let mut reason = String::from("missing credentials");
        if let Some(keys) = &self.api_keys
            && let Some(given) = headers.get(&keys.header)
        {
            let given = given.as_bytes().to_vec();
            match keys.keys.iter().find(|(k, _)| constant_time_eq(k, &given)) {
                Some((_, consumer)) => {
                    headers.remove(&keys.header);
                    headers.insert(keys.consumer_header.clone(), consumer.clone());
                    return Ok(());
                }
                None => reason = "invalid API key".into(),
            }
        }
        if let Some(jwt) = &self.jwt {
            let token = headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| {
                    s.strip_prefix("Bearer ")
                        .or_else(|| s.strip_prefix("bearer "))
                })
                .map(|s| s.trim().to_owned());
            if let Some(token) = token {
                match jwt.verify(&token) {
                    Ok(claims) => {
                        for (claim, header) in &jwt.forward {
                            headers.remove(header);
                            let value = match claims.get(claim) {
                                Some(serde_json::Value::String(s)) => s.clone(),
                                Some(serde_json::Value::Null) | None => continue,
                                Some(v) => v.to_string(),
                            };
                            if let Ok(v) = HeaderValue::from_str(&value) {
                                headers.insert(header.clone(), v);
                            }
                        }
                        if jwt.strip {
                            headers.remove(http::header::AUTHORIZATION);
                        }
                        return Ok(());
                    }
                    Err(e) => reason = e,
                }
            }
        }
        Err(GatewayError::new(ErrorCode::Unauthorized, reason))
    }

    /// Headers a client could use to forge forwarded claims.
    pub(crate) fn forwarded_headers(&self) -> impl Iterator<Item = &HeaderName> {
        self.jwt
            .iter()
            .flat_map(|j| j.forward.iter().map(|(_, h)| h))
            .chain(self.api_keys.iter().map(|k| &k.consumer_header))
    }
}

fn compile_keys(cfg: &ApiKeyConfig) -> Result<ApiKeys, FieldError> {
    if cfg.keys.is_empty() {
        return Err(ferr("auth.api_keys.keys", "no keys configured"));
    }
    let header = header_name(
        cfg.header.as_deref().unwrap_or("x-api-key"),
        "auth.api_keys.header",
    )?;
    let consumer_header = header_name(
        cfg.consumer_header.as_deref().unwrap_or("x-consumer"),
        "auth.api_keys.consumer_header",
    )?;
    let keys = cfg
        .keys
        .iter()
        .map(|(consumer, key)| {
            if key.len() < 8 {
                return Err(ferr(
                    &format!("auth.api_keys.keys.{consumer}"),
                    "keys must be at least 8 characters",
                ));
            }
            let v = HeaderValue::from_str(consumer).map_err(|_| {
                ferr(
                    &format!("auth.api_keys.keys.{consumer}"),
                    "consumer name is not a valid header value",
                )
            })?;
            Ok((key.as_bytes().to_vec(), v))
        })
        .collect::<Result<_, _>>()?;
    Ok(ApiKeys {
        header,
        keys,
        consumer_header,
    })
}

/// Equal in time that does not depend on where the bytes differ (`subtle`);
/// the length is not secret.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}
