//! Rate limiters and the service that applies them.
//!
//! | limiter | algorithm | guarantee over any interval `d` |
//! | --- | --- | --- |
//! | [`Gcra`] | token bucket as one atomic TAT | `rate * d + burst` |
//! | [`SlidingWindow`] | bucketed sliding counter | `limit/window * d + limit * (1 + 1/buckets)` |
//! | [`WarmUp`] | Guava/Sentinel warm-up | `rate * d + 1`, ramping from `rate / cold_factor` |
//! | [`KeyedLimiter`] | GCRA per key, bounded memory | per key: `rate * d + burst` |
//! | [`Pacer`] / [`Pacing`] | leaky bucket that queues | one call per `1 / rate` |
//!
//! [`RateLimit`] rejects calls over the limit with [`RateLimited`] (it never
//! waits; [`Pacing`] does). Every limiter can change its limits at run time
//! (`set_limit`) through the `Arc` the layer hands out, without rebuilding the
//! stack. Rejections are counted in `meshwork_rate_limited_total{name}`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use meshwork_resilience::limit::rate::{GcraConfig, RateLimitLayer};
//! use meshwork_resilience::RateLimited;
//! use tower::{Layer, Service, ServiceExt};
//!
//! let layer = RateLimitLayer::gcra(GcraConfig { rate_per_sec: 1.0, burst: 2 }).unwrap();
//! let mut svc = layer.layer(tower::service_fn(|x: u8| async move { Ok::<_, std::io::Error>(x) }));
//! svc.ready().await.unwrap().call(1).await.unwrap();
//! svc.ready().await.unwrap().call(2).await.unwrap();
//! let err = svc.ready().await.unwrap().call(3).await.unwrap_err();
//! assert!(err.is::<RateLimited>());
//! layer.policy().set_limit(GcraConfig { rate_per_sec: 1000.0, burst: 100 }).unwrap();
//! # }
//! ```

mod error;
mod gcra;
mod keyed;
mod pacing;
mod warmup;
mod window;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};

pub use self::error::RateLimited;
pub use self::gcra::{Gcra, GcraConfig};
pub use self::keyed::{HotKeys, KeyedConfig, KeyedLimiter};
pub use self::pacing::{Pacer, Pacing, PacingConfig, PacingLayer};
pub use self::warmup::{WarmUp, WarmUpConfig};
pub use self::window::{SlidingWindow, SlidingWindowConfig};
use crate::BoxError;
use crate::config::ConfigError;

/// Decides whether a request may go now.
pub trait RateLimitPolicy<Req>: Send + Sync + 'static {
    /// `Ok` to admit `req` at `now`.
    fn check(&self, req: &Req, now: Instant) -> Result<(), RateLimited>;
}

impl<Req> RateLimitPolicy<Req> for Gcra {
    #[inline]
    fn check(&self, _: &Req, now: Instant) -> Result<(), RateLimited> {
        Gcra::check(self, now)
    }
}
impl<Req> RateLimitPolicy<Req> for SlidingWindow {
    fn check(&self, _: &Req, now: Instant) -> Result<(), RateLimited> {
        SlidingWindow::check(self, now)
    }
}
impl<Req> RateLimitPolicy<Req> for WarmUp {
    fn check(&self, _: &Req, now: Instant) -> Result<(), RateLimited> {
        WarmUp::check(self, now)
    }
}

/// A [`KeyedLimiter`] with the function that extracts the key of a request
/// (`None`: the request is not limited).
pub struct Keyed<K, F> {
    /// The limiter.
    pub limiter: KeyedLimiter<K>,
    /// Key extractor.
    pub key: F,
}

impl<K: std::fmt::Debug, F> std::fmt::Debug for Keyed<K, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyed")
            .field("limiter", &self.limiter)
            .finish_non_exhaustive()
    }
}

impl<Req, K, F> RateLimitPolicy<Req> for Keyed<K, F>
where
    K: std::hash::Hash + Eq + Clone + Send + 'static,
    F: Fn(&Req) -> Option<K> + Send + Sync + 'static,
{
    fn check(&self, req: &Req, now: Instant) -> Result<(), RateLimited> {
        match (self.key)(req) {
            Some(k) => self.limiter.check(&k, now),
            None => Ok(()),
        }
    }
}

/// Key extractor: the value of HTTP header `name` (e.g. `x-api-key`, or
/// `x-forwarded-for` for the client IP behind a proxy).
pub fn header_key<B>(name: &'static str) -> impl Fn(&http::Request<B>) -> Option<String> + Clone {
    move |req| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

/// Key extractor: the client IP: the first address of `x-forwarded-for`
/// (set by a trusted proxy in front), else the peer address put in the
/// request extensions by the server (a `SocketAddr`, as axum's `ConnectInfo`
/// or a hyper accept loop can provide).
pub fn client_ip_key<B>(req: &http::Request<B>) -> Option<std::net::IpAddr> {
    let forwarded = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|ip| ip.trim().parse().ok());
    forwarded.or_else(|| {
        req.extensions()
            .get::<std::net::SocketAddr>()
            .map(|a| a.ip())
    })
}

/// Key extractor: the request path (per-route limiting).
pub fn path_key<B>(req: &http::Request<B>) -> Option<String> {
    Some(req.uri().path().to_owned())
}

/// Layer for [`RateLimit`].
#[derive(Debug)]
pub struct RateLimitLayer<P> {
    policy: Arc<P>,
    rejected: metrics::Counter,
}

impl<P> Clone for RateLimitLayer<P> {
    fn clone(&self) -> Self {
        Self {
            policy: self.policy.clone(),
            rejected: self.rejected.clone(),
        }
    }
}

impl<P> RateLimitLayer<P> {
    /// A layer applying `policy`, shared by every service it builds.
    pub fn new(name: &str, policy: P) -> Self {
        Self {
            policy: Arc::new(policy),
            rejected: metrics::counter!("meshwork_rate_limited_total", "name" => name.to_owned()),
        }
    }

    /// The shared policy, e.g. to call `set_limit` at run time.
    pub fn policy(&self) -> &Arc<P> {
        &self.policy
    }
}

impl RateLimitLayer<Gcra> {
    /// A GCRA token bucket shared by every service of the layer.
    pub fn gcra(cfg: GcraConfig) -> Result<Self, ConfigError> {
        Ok(Self::new("gcra", Gcra::new(cfg, Instant::now())?))
    }
}

impl RateLimitLayer<SlidingWindow> {
    /// A sliding-window counter shared by every service of the layer.
    pub fn sliding_window(cfg: SlidingWindowConfig) -> Result<Self, ConfigError> {
        Ok(Self::new(
            "sliding_window",
            SlidingWindow::new(cfg, Instant::now())?,
        ))
    }
}

impl RateLimitLayer<WarmUp> {
    /// A warm-up limiter shared by every service of the layer.
    pub fn warm_up(cfg: WarmUpConfig) -> Result<Self, ConfigError> {
        Ok(Self::new("warm_up", WarmUp::new(cfg, Instant::now())?))
    }
}

impl<K: std::hash::Hash + Eq + Clone, F> RateLimitLayer<Keyed<K, F>> {
    /// A per-key limiter; `key` extracts the key of a request.
    pub fn keyed(cfg: KeyedConfig, key: F) -> Result<Self, ConfigError> {
        Ok(Self::new(
            "keyed",
            Keyed {
                limiter: KeyedLimiter::new(cfg, Instant::now())?,
                key,
            },
        ))
    }
}

impl<S, P> Layer<S> for RateLimitLayer<P> {
    type Service = RateLimit<S, P>;
    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            policy: self.policy.clone(),
            rejected: self.rejected.clone(),
        }
    }
}

/// Rejects calls over the limit with [`RateLimited`].
#[derive(Debug)]
pub struct RateLimit<S, P> {
    inner: S,
    policy: Arc<P>,
    rejected: metrics::Counter,
}

impl<S: Clone, P> Clone for RateLimit<S, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            policy: self.policy.clone(),
            rejected: self.rejected.clone(),
        }
    }
}

impl<S, P> RateLimit<S, P> {
    /// Wraps `inner`.
    pub fn new(inner: S, policy: Arc<P>) -> Self {
        Self {
            inner,
            policy,
            rejected: metrics::Counter::noop(),
        }
    }
}

impl<S, P, Req> Service<Req> for RateLimit<S, P>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    P: RateLimitPolicy<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        match self.policy.check(&req, Instant::now()) {
            Ok(()) => ResponseFuture::Called {
                inner: self.inner.call(req),
            },
            Err(e) => {
                self.rejected.increment(1);
                ResponseFuture::Rejected { error: Some(e) }
            }
        }
    }
}

pin_project! {
    /// Future of [`RateLimit`].
    #[project = Proj]
    #[allow(missing_docs)] // variant fields are private in spirit
    #[derive(Debug)]
    pub enum ResponseFuture<F> {
        /// Admitted.
        Called { #[pin] inner: F },
        /// Rejected.
        Rejected { error: Option<RateLimited> },
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;
    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Called { inner } => inner.poll(cx).map_err(Into::into),
            Proj::Rejected { error } => Poll::Ready(Err(error
                .take()
                .map_or_else(|| "polled after completion".into(), Into::into))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn per_header_limit_in_a_stack() {
        let limiter = KeyedLimiter::new(
            KeyedConfig {
                rate_per_sec: 1.0,
                burst: 1,
                ..Default::default()
            },
            Instant::now(),
        )
        .unwrap();
        let layer = RateLimitLayer::new(
            "per-client",
            Keyed {
                limiter,
                key: header_key("x-client"),
            },
        );
        let svc = layer.layer(tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, BoxError>(())
        }));
        let req = |c: &str| {
            http::Request::builder()
                .header("x-client", c)
                .body(())
                .unwrap()
        };
        svc.clone().oneshot(req("a")).await.unwrap();
        assert!(
            svc.clone()
                .oneshot(req("a"))
                .await
                .unwrap_err()
                .is::<RateLimited>()
        );
        svc.clone().oneshot(req("b")).await.unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        svc.clone().oneshot(req("a")).await.unwrap();
    }

    #[test]
    fn client_ip_from_forwarded_for_or_peer() {
        let req = http::Request::builder()
            .header("x-forwarded-for", "203.0.113.7, 10.0.0.1")
            .body(())
            .unwrap();
        assert_eq!(client_ip_key(&req), Some("203.0.113.7".parse().unwrap()));
        let mut req = http::Request::new(());
        req.extensions_mut()
            .insert(std::net::SocketAddr::from(([192, 0, 2, 1], 5555)));
        assert_eq!(client_ip_key(&req), Some("192.0.2.1".parse().unwrap()));
    }
}
