//! Limits on work in flight: a fixed [`bulkhead`](BulkheadLayer), an
//! [`adaptive`](AdaptiveLayer) limit found from measured latency (gradient or
//! AIMD, as Netflix concurrency-limits), and a [`system-load
//! guard`](SystemGuardLayer) in the spirit of Sentinel's adaptive system
//! protection.

mod adaptive;
mod bulkhead;
mod error;
mod system;

pub use self::adaptive::{Adaptive, AdaptiveConfig, AdaptiveLayer, AdaptiveLimit, Algorithm};
pub use self::bulkhead::{Bulkhead, BulkheadConfig, BulkheadLayer};
pub use self::error::{BulkheadFull, Overloaded};
pub use self::system::{SystemGuard, SystemGuardConfig, SystemGuardLayer, SystemLoad};
