//! The route set as users write it (`routes.toml` / JSON): plain serde
//! structs, unknown keys rejected. [`RouteSet::validate`] checks everything
//! a compile would (regexes, addresses, keys on disk) and names the route
//! and field at fault.

use std::collections::BTreeMap;
use std::path::PathBuf;

use meshwork_resilience::breaker::BreakerConfig;
use meshwork_resilience::limit::concurrency::BulkheadConfig;
use meshwork_resilience::outlier::OutlierConfig;
use meshwork_resilience::retry::RetryConfig;
use serde::{Deserialize, Serialize};

use crate::resolver::InstanceFilter;

/// A whole set of routes, applied atomically.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteSet {
    /// The routes; matched by descending `priority`, then in this order.
    pub routes: Vec<RouteConfig>,
}

/// What a secret is shown as by [`RouteSet::redacted`].
pub const REDACTED: &str = "••••••";

/// One route: what it matches and what it does.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    /// Unique name (letters, digits, `-`, `_`, `.`; used in metrics).
    pub name: String,
    /// Higher is tried first; equal priorities keep file order. Default 0.
    pub priority: i32,
    /// Conditions, all of which must hold.
    #[serde(rename = "match")]
    pub matches: MatchConfig,
    /// Forward to upstreams (exactly one of forward, redirect, respond).
    pub forward: Option<ForwardConfig>,
    /// Answer with a redirect.
    pub redirect: Option<RedirectConfig>,
    /// Answer directly.
    pub respond: Option<RespondConfig>,
    /// Changes to the request headers before forwarding.
    pub request_headers: HeaderOps,
    /// Changes to the response headers.
    pub response_headers: HeaderOps,
    /// Authentication.
    pub auth: Option<AuthConfig>,
    /// Client IP allow/deny lists.
    pub ip: Option<IpAclConfig>,
    /// Rate limits, all of which must admit the request.
    pub rate_limits: Vec<RateLimitRule>,
}

/// Match conditions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MatchConfig {
    /// Hosts (`api.example.com`, or `*.example.com` for any subdomain);
    /// empty = any. The port is ignored.
    pub hosts: Vec<String>,
    /// Path condition; absent = any.
    pub path: Option<PathMatch>,
    /// Methods (upper case); empty = any.
    pub methods: Vec<String>,
    /// Header conditions.
    pub headers: Vec<ValueMatch>,
    /// Query parameter conditions.
    pub query: Vec<ValueMatch>,
}

/// A path condition: exactly one of the three.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PathMatch {
    /// The path equals this.
    pub exact: Option<String>,
    /// The path starts with this; `/api` matches `/api` and `/api/x`, not `/apix`
    /// (a prefix ending in `/` matches only below it).
    pub prefix: Option<String>,
    /// The whole path matches this regex (anchored); its captures can be
    /// used in `forward.rewrite.path` as `$1` or `${name}`.
    pub regex: Option<String>,
}

/// A header or query-parameter condition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValueMatch {
    /// Header or parameter name (headers: case-insensitive).
    pub name: String,
    /// The value equals this.
    pub exact: Option<String>,
    /// The whole value matches this regex.
    pub regex: Option<String>,
    /// Only presence (true) or absence (false) matters.
    pub present: Option<bool>,
}

/// Header changes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeaderOps {
    /// Set (replacing any value).
    pub set: BTreeMap<String, String>,
    /// Append (keeping existing values).
    pub add: BTreeMap<String, String>,
    /// Remove.
    pub remove: Vec<String>,
}

/// Forwarding to upstreams.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForwardConfig {
    /// Shorthand for one target: a registry service.
    pub service: Option<String>,
    /// Shorthand for one target: static `host:port` upstreams.
    pub upstreams: Vec<String>,
    /// Shorthand: instance filter for `service`.
    pub filter: InstanceFilter,
    /// Named targets for traffic splitting (instead of the shorthand).
    pub targets: Vec<TargetConfig>,
    /// Header/cookie rules choosing a target by name (A/B, blue-green);
    /// first match wins, else targets are chosen by weight.
    pub split: Vec<SplitRule>,
    /// Protocol to upstreams.
    pub protocol: UpstreamProtocol,
    /// Removes this prefix from the path.
    pub strip_prefix: Option<String>,
    /// Path rewrite (after strip_prefix).
    pub rewrite: Option<RewriteConfig>,
    /// Send the client's Host to the upstream (default true); false sends
    /// the endpoint's address.
    pub preserve_host: Option<bool>,
    /// Load balancing.
    pub lb: LbConfig,
    /// Time for the upstream to answer (all tries), ms; default: gateway's
    /// `default_timeout_ms`.
    pub timeout_ms: Option<u64>,
    /// Time for one try, ms; default: the overall timeout.
    pub per_try_timeout_ms: Option<u64>,
    /// Retries of failed tries: 502/503/504, resets and per-try timeouts
    /// (absent: only `failover`). A request with a body is retried only if
    /// its body fits in `retry_buffer_bytes`.
    pub retry: Option<RetryConfig>,
    /// Failover on connection failures, on by default (nginx's
    /// `proxy_next_upstream error`): a try that failed before anything was
    /// sent (connect refused or timed out, connection closed before the
    /// request was written) goes to another endpoint for every method, and
    /// an idempotent one also after a reset once sent, up to 3 tries in
    /// all, within the retry budget. `false` turns it off.
    pub failover: Option<bool>,
    /// Upstream statuses that count as the upstream's failure for outlier
    /// detection and the breaker (default 502, 503, 504; connection
    /// failures and timeouts always count). Any other answer shows the
    /// endpoint alive.
    pub failure_statuses: Option<Vec<u16>>,
    /// Retry non-idempotent methods too (POST, PATCH). Default false.
    pub retry_all_methods: bool,
    /// Request body bytes kept for replay on a retry; default: the
    /// gateway's `retry_buffer_bytes`. A larger body is streamed and not
    /// retried (connect failures, where nothing was sent, still are).
    pub retry_buffer_bytes: Option<u64>,
    /// Circuit breaker per target (absent: none).
    pub breaker: Option<BreakerConfig>,
    /// Concurrency limit for the route (absent: none).
    pub bulkhead: Option<BulkheadConfig>,
    /// Passive outlier detection per target (absent: the default settings;
    /// set `outlier_detection = false` to turn it off).
    pub outlier: Option<OutlierConfig>,
    /// Turns outlier detection off. Default true.
    pub outlier_detection: Option<bool>,
    /// Copy requests to a shadow upstream (responses discarded).
    pub mirror: Option<MirrorConfig>,
    /// Speak TLS to the upstreams (HTTP/1.1 inside), verifying them.
    pub tls: Option<UpstreamTlsConfig>,
}

/// TLS to a forward's upstreams: their certificates are verified (chain and
/// name), and the gateway may present its own (mutual TLS).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// The name sent as SNI and checked against the upstream's certificate
    /// [default: the target's service name; for static upstreams their host
    /// name, or each endpoint's IP address].
    pub server_name: Option<String>,
    /// PEM CA certificates to trust [default: the system's roots].
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM certificate chain the gateway presents (mutual TLS), with `key_file`.
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<std::path::PathBuf>,
    /// Mutual TLS with service identity: trust the node's service authority
    /// and present the gateway's own certificate (service
    /// `meshwork-gateway`), verifying the target's service name. Needs a
    /// node issuing service certificates (`--identity-ca`); excludes
    /// `ca_file`, `cert_file` and `key_file`.
    pub identity: bool,
}

/// One named, weighted target of a forward.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TargetConfig {
    /// Name (used by split rules and metrics).
    pub name: String,
    /// Registry service.
    pub service: Option<String>,
    /// Static `host:port` upstreams.
    pub upstreams: Vec<String>,
    /// Instance filter for `service`.
    pub filter: InstanceFilter,
    /// Share of traffic relative to the other targets. Default 1.
    pub weight: Option<u32>,
}

/// A split rule: requests matching go to `target`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SplitRule {
    /// Header to look at.
    pub header: Option<String>,
    /// Cookie to look at.
    pub cookie: Option<String>,
    /// Required value (absent: presence is enough).
    pub value: Option<String>,
    /// Target name.
    pub target: String,
}

/// Protocol spoken to upstreams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/2 (cleartext, prior knowledge) for HTTP/2 gRPC requests,
    /// HTTP/1.1 otherwise.
    #[default]
    Auto,
    /// Always HTTP/1.1.
    Http1,
    /// Always HTTP/2 cleartext with prior knowledge.
    H2c,
}

/// Path rewrite.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewriteConfig {
    /// Replace the whole path with this template; `$1`/`${name}` expand
    /// captures of the route's path regex.
    pub path: Option<String>,
    /// Regex applied to the path (with `replace`).
    pub regex: Option<String>,
    /// Replacement for `regex` matches (`$1`, `${name}`).
    pub replace: Option<String>,
}

/// Load balancing settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LbConfig {
    /// Algorithm.
    pub policy: LbPolicy,
    /// Hash key for `ring_hash` / `maglev`.
    pub hash_on: Option<HashOn>,
}

/// Load-balancing algorithm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Power of two choices over peak-EWMA latency x in-flight.
    #[default]
    P2c,
    /// Smooth weighted round robin (nginx).
    Wrr,
    /// Uniform random.
    Random,
    /// Consistent hashing on a ring (ketama).
    RingHash,
    /// Maglev consistent hashing.
    Maglev,
}

/// What consistent hashing hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HashOn {
    /// A request header's value.
    Header(String),
    /// A cookie's value.
    Cookie(String),
    /// The client IP.
    ClientIp,
}

/// Shadow traffic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MirrorConfig {
    /// Registry service.
    pub service: Option<String>,
    /// Static upstreams.
    pub upstreams: Vec<String>,
    /// Instance filter for `service`.
    pub filter: InstanceFilter,
    /// Share of requests mirrored, percent (0..=100). Default 100.
    pub percent: Option<f64>,
}

/// A redirect.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedirectConfig {
    /// Status: 301, 302, 303, 307 or 308. Default 302.
    pub status: Option<u16>,
    /// Absolute URL or path; `$1`/`${name}` expand path-regex captures.
    /// Absent: same path on `scheme`/`host`.
    pub location: Option<String>,
    /// Scheme for a generated location (e.g. `https`).
    pub scheme: Option<String>,
    /// Host for a generated location.
    pub host: Option<String>,
    /// Keep the query string when `location` is a path. Default true.
    pub keep_query: Option<bool>,
}

/// A direct response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RespondConfig {
    /// Status. Default 200.
    pub status: Option<u16>,
    /// Body.
    pub body: String,
    /// Content type. Default `text/plain; charset=utf-8`.
    pub content_type: Option<String>,
}

/// Authentication: a request passes with a valid JWT or a valid API key
/// (whichever are configured).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// JWT validation.
    pub jwt: Option<JwtConfig>,
    /// API keys.
    pub api_keys: Option<ApiKeyConfig>,
}

/// JWT validation settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// Accepted algorithms: `HS256`, `RS256`, `ES256`. Default: the one the key implies.
    pub algorithms: Vec<String>,
    /// HMAC secret (HS256), inline.
    pub secret: Option<String>,
    /// HMAC secret (HS256), from a file (trailing newline trimmed).
    pub secret_file: Option<PathBuf>,
    /// PEM public key (RS256 / ES256).
    pub public_key_file: Option<PathBuf>,
    /// JWKS document (keys chosen by `kid`).
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Accepted `aud` values (any one).
    pub audience: Vec<String>,
    /// Claims that must be present (`exp` always is).
    pub required_claims: Vec<String>,
    /// Clock skew allowed, seconds. Default 30.
    pub leeway_secs: Option<u64>,
    /// Claims copied to request headers: claim name -> header name.
    pub forward_claims: BTreeMap<String, String>,
    /// Remove the Authorization header before forwarding. Default false.
    pub strip_token: bool,
}

/// API key settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Header carrying the key. Default `x-api-key`.
    pub header: Option<String>,
    /// Consumer name -> key.
    pub keys: BTreeMap<String, String>,
    /// Header that receives the consumer name. Default `x-consumer`.
    pub consumer_header: Option<String>,
}

/// Client IP lists, as CIDRs (`10.0.0.0/8`, `::1/128`) or addresses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IpAclConfig {
    /// If non-empty, only these may pass.
    pub allow: Vec<String>,
    /// These never pass (checked first).
    pub deny: Vec<String>,
}

/// A rate limit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitRule {
    /// What is counted.
    pub by: LimitKey,
    /// Header whose value is the key (for `by = "header"`).
    pub header: Option<String>,
    /// Sustained rate per key, requests per second.
    pub rate_per_sec: f64,
    /// Burst per key. Default 1.
    pub burst: Option<u32>,
    /// Most keys remembered (per-IP/header limits). Default 100 000.
    pub max_keys: Option<usize>,
    /// Counted across all gateway nodes through the shared limiter.
    pub cluster: bool,
}

/// Key of a rate limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKey {
    /// The whole route.
    #[default]
    Route,
    /// Each client IP.
    ClientIp,
    /// Each value of `header` (requests without it are not limited).
    Header,
}

/// Why a route set was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RouteError {
    /// The document did not parse.
    #[error("route set does not parse: {0}")]
    Parse(String),
    /// A field of a route is invalid.
    #[error("route `{route}`: `{field}`: {message}")]
    Invalid {
        /// The route's name (or `#index` if unnamed).
        route: String,
        /// The field path, e.g. `match.path.regex`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

impl RouteSet {
    /// Parses TOML (`[[routes]]` tables).
    pub fn from_toml(s: &str) -> Result<Self, RouteError> {
        toml::from_str(s).map_err(|e| RouteError::Parse(e.to_string()))
    }

    /// Parses JSON (`{"routes": [...]}`).
    pub fn from_json(s: &str) -> Result<Self, RouteError> {
        serde_json::from_str(s).map_err(|e| RouteError::Parse(e.to_string()))
    }

    /// The set with its secrets (inline JWT secrets, API keys) replaced by
    /// [`REDACTED`], for showing it (admin API, console, `meshwork gateway routes`).
    pub fn redacted(&self) -> RouteSet {
        let mut set = self.clone();
        for r in &mut set.routes {
            if let Some(auth) = &mut r.auth {
                if let Some(jwt) = &mut auth.jwt
                    && jwt.secret.is_some()
                {
                    jwt.secret = Some(REDACTED.to_owned());
                }
                if let Some(keys) = &mut auth.api_keys {
                    for v in keys.keys.values_mut() {
                        *v = REDACTED.to_owned();
                    }
                }
            }
        }
        set
    }

    /// Renders as TOML.
    pub fn to_toml(&self) -> Result<String, RouteError> {
        toml::to_string(self).map_err(|e| RouteError::Parse(e.to_string()))
    }

    /// Checks the whole set (everything short of resolving services); the
    /// first error names the route and field. Blocking: resolves static
    /// upstreams' host names and reads key files (from async code, use it
    /// on the blocking pool).
    pub fn validate(&self) -> Result<(), RouteError> {
        super::compile::validate(self)
    }
}
