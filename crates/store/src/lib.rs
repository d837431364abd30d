//! Meshwork's MVCC key-value engine: etcd v3 semantics (revisions, txn, leases, watch,
//! compaction) on redb, with group commit. No networking: `meshwork-etcd` serves it.

mod alarm;
mod apply;
mod codec;
pub mod config;
pub mod durable;
pub mod error;
pub mod export;
mod index;
mod lease;
mod mvcc;
pub mod ops;
mod store;
pub mod types;
mod wal;
pub mod watch;

pub use alarm::{Alarm, AlarmMember};
pub use config::StoreConfig;
pub use error::{Result, StoreError};
pub use export::{Change, Export, Imported, Importer, import, import_redb};
pub use lease::LeaseInfo;
pub use store::{Snapshot, Status, Store, WatchStream};
pub use types::{Event, EventKind, KeyRange, KeyValue, Revision, prefix_range_end};
pub use watch::{WatchCreateError, WatchMessage, WatchSpec};
