//! Resilience middleware for tower stacks: circuit breaking, rate limiting,
//! concurrency limiting, retries with budgets, timeouts with deadline
//! propagation, fallback, load balancing and outlier detection.
//!
//! Every behaviour lives in its own module and is usable alone or composed:
//! each exposes a plain `serde` config struct with `validate()`, a core that
//! decides without I/O (taking `now: Instant` so it is testable with tokio's
//! paused clock), and a tower [`Layer`](tower::Layer) / `Service` wrapping it.
//!
//! Layers box their errors ([`BoxError`]) so that they stack; a caller tells
//! rejections apart with `err.is::<CircuitOpen>()`, `err.is::<RateLimited>()`
//! and so on.
//!
//! | module | what |
//! | --- | --- |
//! | [`breaker`] | circuit breaker (consecutive failures, failure/slow-call rate over count or time windows) |
//! | [`limit::rate`] | GCRA, sliding window, warm-up, pacing, per-key limits |
//! | [`limit::concurrency`] | bulkhead, adaptive limit (gradient/AIMD), system-load guard |
//! | [`retry`] | full-jitter backoff, retry budget, deadline-aware |
//! | [`timeout`] | per-call timeout, deadline propagation (`grpc-timeout`, `x-meshwork-deadline-ms`) |
//! | [`fallback`] | rejection -> fallback service |
//! | [`balance`] | P2C peak-EWMA, smooth WRR, random, ring hash, Maglev over a change stream |
//! | [`outlier`] | Envoy-style passive ejection |
//! | [`classify`] | what counts as failure |
//! | [`policy`] | a whole policy as one serde struct |
//!
//! ```
//! use meshwork_resilience::breaker::{BreakerConfig, BreakerLayer};
//! use meshwork_resilience::limit::rate::{GcraConfig, RateLimitLayer};
//! use tower::ServiceBuilder;
//!
//! let breaker = BreakerLayer::new(BreakerConfig::default()).expect("valid config");
//! let limiter = RateLimitLayer::gcra(GcraConfig { rate_per_sec: 1000.0, burst: 50 }).expect("valid config");
//! let _stack = ServiceBuilder::new()
//!     .layer(breaker)
//!     .layer(limiter)
//!     .service(tower::service_fn(|req: u32| async move { Ok::<_, std::io::Error>(req) }));
//! ```

pub mod balance;
pub mod breaker;
pub mod classify;
pub mod config;
pub mod fallback;
pub mod limit;
pub mod outlier;
pub mod policy;
pub mod retry;
pub mod timeout;

/// Nanoseconds from `base` to `now` (0 if `now` is earlier), in `u64`
/// arithmetic: cheaper on hot paths than `Duration::as_nanos`'s `u128`.
/// Saturates after ~584 years.
#[inline]
pub(crate) fn nanos_since(base: tokio::time::Instant, now: tokio::time::Instant) -> u64 {
    let d = now.saturating_duration_since(base);
    d.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(d.subsec_nanos()))
}

/// The error type every layer of this crate returns: the inner service's
/// error or one of this crate's rejections, boxed so layers stack.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub use breaker::CircuitOpen;
pub use config::ConfigError;
pub use limit::concurrency::{BulkheadFull, Overloaded};
pub use limit::rate::RateLimited;
pub use timeout::Elapsed;
