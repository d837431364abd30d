//! Rate limits of a route: local ones on meshwork-resilience's GCRA cores,
//! and the [`SharedLimiter`] seam for limits counted across gateway nodes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderMap;
use http::header::HeaderName;
use meshwork_resilience::RateLimited;
use meshwork_resilience::limit::rate::{Gcra, GcraConfig, KeyedConfig, KeyedLimiter};
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::route::model::{LimitKey, RateLimitRule};

/// A rate limiter shared by every gateway node (backed by the store later).
///
/// `check` is called on the request path and must not block: a
/// store-backed implementation admits from a locally leased allowance and
/// refills it in the background.
pub trait SharedLimiter: Send + Sync + 'static {
    /// Admits one request for `key` in `bucket` (a route's limit) at `limit`,
    /// or says how long to wait.
    fn check(&self, bucket: &str, key: &str, limit: GcraConfig) -> Result<(), RateLimited>;
}

type Bucket = (GcraConfig, Arc<KeyedLimiter<String>>);

/// A [`SharedLimiter`] that counts on this node only (single-node
/// deployments and tests).
#[derive(Debug, Default)]
pub struct LocalSharedLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl LocalSharedLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        Self::default()
    }
}

impl SharedLimiter for LocalSharedLimiter {
    fn check(&self, bucket: &str, key: &str, limit: GcraConfig) -> Result<(), RateLimited> {
        let now = Instant::now();
        let limiter = {
            let mut buckets = self.buckets.lock();
            match buckets.get(bucket) {
                Some((cfg, l)) if *cfg == limit => l.clone(),
                Some((_, l)) => {
                    let l = l.clone();
                    if l.set_limit(limit.rate_per_sec, limit.burst).is_ok() {
                        buckets.insert(bucket.to_owned(), (limit, l.clone()));
                    }
                    l
                }
                None => {
                    let cfg = KeyedConfig {
                        rate_per_sec: limit.rate_per_sec,
                        burst: limit.burst,
                        max_keys: 100_000,
                        shards: 16,
                        hot_keys: None,
                    };
                    match KeyedLimiter::new(cfg, now) {
                        Ok(l) => {
                            let l = Arc::new(l);
                            buckets.insert(bucket.to_owned(), (limit, l.clone()));
                            l
                        }
                        // An invalid limit admits rather than failing requests.
                        Err(_) => return Ok(()),
                    }
                }
            }
        };
        limiter.check(&key.to_owned(), now)
    }
}

/// One compiled limit of a route.
pub(crate) enum Limiter {
    Route(Gcra),
    ClientIp(KeyedLimiter<IpAddr>),
    Header(HeaderName, KeyedLimiter<Vec<u8>>),
    Cluster {
        bucket: String,
        by: LimitKey,
        header: Option<HeaderName>,
        limit: GcraConfig,
    },
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limiter::Route(_) => f.write_str("Limiter::Route"),
            Limiter::ClientIp(_) => f.write_str("Limiter::ClientIp"),
            Limiter::Header(h, _) => write!(f, "Limiter::Header({h})"),
            Limiter::Cluster { bucket, .. } => write!(f, "Limiter::Cluster({bucket})"),
        }
    }
}

impl Limiter {
    /// Builds the limiter of `rule` (already validated).
    pub(crate) fn build(route: &str, index: usize, rule: &RateLimitRule) -> Result<Self, String> {
        let limit = GcraConfig {
            rate_per_sec: rule.rate_per_sec,
            burst: rule.burst.unwrap_or(1),
        };
        limit.validate().map_err(|e| e.to_string())?;
        let header = match (rule.by, &rule.header) {
            (LimitKey::Header, Some(h)) => Some(
                HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| format!("`{h}` is not a valid header name"))?,
            ),
            (LimitKey::Header, None) => {
                return Err("`header` is required when by = \"header\"".into());
            }
            (_, Some(_)) => return Err("`header` is only for by = \"header\"".into()),
            (_, None) => None,
        };
        let now = Instant::now();
        if rule.cluster {
            return Ok(Limiter::Cluster {
                bucket: format!("{route}#{index}"),
                by: rule.by,
                header,
                limit,
            });
        }
        let keyed = KeyedConfig {
            rate_per_sec: limit.rate_per_sec,
            burst: limit.burst,
            max_keys: rule.max_keys.unwrap_or(100_000),
            shards: 16,
            hot_keys: None,
        };
        Ok(match (rule.by, header) {
            (LimitKey::Route, _) => {
                Limiter::Route(Gcra::new(limit, now).map_err(|e| e.to_string())?)
            }
            (LimitKey::ClientIp, _) => {
                Limiter::ClientIp(KeyedLimiter::new(keyed, now).map_err(|e| e.to_string())?)
            }
            (LimitKey::Header, Some(h)) => {
                Limiter::Header(h, KeyedLimiter::new(keyed, now).map_err(|e| e.to_string())?)
            }
            (LimitKey::Header, None) => return Err("`header` is required".into()),
        })
    }

    /// Admits the request or says when to retry.
    pub(crate) fn check(
        &self,
        ip: IpAddr,
        headers: &HeaderMap,
        shared: &dyn SharedLimiter,
        now: Instant,
    ) -> Result<(), RateLimited> {
        match self {
            Limiter::Route(g) => g.check(now),
            Limiter::ClientIp(k) => k.check(&ip.to_canonical(), now),
            Limiter::Header(h, k) => match headers.get(h) {
                Some(v) => k.check(&v.as_bytes().to_vec(), now),
                None => Ok(()),
            },
            Limiter::Cluster {
                bucket,
                by,
                header,
                limit,
            } => {
                let key = match by {
                    LimitKey::Route => String::new(),
                    LimitKey::ClientIp => ip.to_canonical().to_string(),
                    LimitKey::Header => match header.as_ref().and_then(|h| headers.get(h)) {
                        Some(v) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        None => return Ok(()),
                    },
                };
                shared.check(bucket, &key, *limit)
            }
        }
    }
}
