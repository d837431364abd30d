//! Limits on work in flight: a fixed [`bulkhead`](BulkheadLayer), an
//! [`adaptive`](AdaptiveLayer) limit found from measured latency (gradient or
//! AIMD, as Netflix concurrency-limits), and a [`system-load
//! guard`](SystemGuardLayer) in the spirit of Sentinel's adaptive system
//! protection. All three reject rather than wait forever: [`BulkheadFull`]
//! or [`Overloaded`].
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use meshwork_resilience::limit::concurrency::{
//!     AdaptiveConfig, AdaptiveLayer, BulkheadConfig, BulkheadLayer, SystemGuardConfig, SystemGuardLayer,
//! };
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! let svc = ServiceBuilder::new()
//!     .layer(SystemGuardLayer::new(SystemGuardConfig::default()).unwrap())
//!     .layer(AdaptiveLayer::new(AdaptiveConfig::default()).unwrap())
//!     .layer(BulkheadLayer::new(BulkheadConfig { max_in_flight: 10, max_queued: 5, max_wait_ms: 50 }).unwrap())
//!     .service_fn(|x: u32| async move { Ok::<_, std::io::Error>(x * 2) });
//! assert_eq!(svc.oneshot(21).await.unwrap(), 42);
//! # }
//! ```

mod adaptive;
mod bulkhead;
mod error;
mod system;

pub use self::adaptive::{Adaptive, AdaptiveConfig, AdaptiveLayer, AdaptiveLimit, Algorithm};
pub use self::bulkhead::{Bulkhead, BulkheadConfig, BulkheadLayer, BulkheadSlot};
pub use self::error::{BulkheadFull, Overloaded};
pub use self::system::{SystemGuard, SystemGuardConfig, SystemGuardLayer, SystemLoad};
