//! The store: the `Store` handle, its shared state, opening and closing.
//! Each concern of the engine lives in a child module:
//! - `recover` — opening a data directory: write-ahead-log replay, index and lessor rebuilt;
//! - `committer` — the group-commit thread that owns every write;
//! - `kv` — the KV API: reads at `published`, writes through the committer;
//! - `leases` — the lease API and the lease deadlines written down and resumed;
//! - `watch_stream` — watch streams; `catch_up` — replaying a lagging watcher from disk;
//! - `alarms` — alarms, the quota and the refusals they cause;
//! - `maintenance` — status, snapshot, export, defragment;
//! - `background` — the tasks that tick: lease expiry, progress notifications, auto-compaction.
//!
//! Invariants:
//! - one committer thread owns every write; a batch of queued requests becomes one
//!   redb transaction and one fsync, and no request is answered before that fsync;
//! - `published` is the last durable revision; readers never read above it;
//! - a storage failure while committing stops the store (fail-stop): the state on
//!   disk is unknown, so only a restart, which recovers from disk, may continue.

mod alarms;
mod background;
mod catch_up;
mod committer;
mod kv;
mod leases;
mod maintenance;
mod recover;
mod watch_stream;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use redb::{Database, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::alarm::{AlarmMember, Alarms};
use crate::apply::{WriteReq, WriteResp};
use crate::config::StoreConfig;
use crate::error::{Result, StoreError};
use crate::index::Index;
use crate::lease::Lessor;
use crate::watch::Hub;

pub(crate) use recover::create_tables;
pub use watch_stream::WatchStream;

pub(crate) const KV: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("kv");
pub(crate) const LEASES: TableDefinition<i64, i64> = TableDefinition::new("leases");
pub(crate) const META: TableDefinition<&str, i64> = TableDefinition::new("meta");

/// The store's revision and compaction revision as `META` records them. A
/// fresh store is at revision 1 and its first write is revision 2, as in
/// etcd: clients rely on 0 meaning "no revision" (e.g.
/// `max_create_revision = my_rev - 1`).
pub(crate) fn meta_revisions(rtx: &redb::ReadTransaction) -> Result<(i64, i64)> {
    let meta = rtx.open_table(META).map_err(StoreError::storage)?;
    let get = |k: &str| -> Result<i64> {
        Ok(meta
            .get(k)
            .map_err(StoreError::storage)?
            .map(|g| g.value())
            .unwrap_or(0))
    };
    Ok((get(META_REV)?.max(1), get(META_COMPACT)?))
}
pub(crate) const META_REV: &str = "revision";
pub(crate) const META_COMPACT: &str = "compact_revision";
/// LSN of the last write-ahead-log record whose changes a durable redb commit holds.
pub(crate) const META_CHECKPOINT_LSN: &str = "checkpoint_lsn";
pub(crate) const DB_FILE: &str = "meshwork.redb";

/// A request to the committer, with where its answer goes.
enum Cmd {
    Write(WriteReq, oneshot::Sender<Result<WriteResp>>),
}

/// What every handle, the committer and the background tasks share.
struct Shared {
    cfg: StoreConfig,
    dir: PathBuf,
    db: RwLock<Option<Database>>,
    index: RwLock<Index>,
    lessor: Mutex<Lessor>,
    hub: Hub,
    published: AtomicI64,
    compact_rev: AtomicI64,
    /// Writes that add data are refused (the quota, or a `NOSPACE` alarm).
    no_space: AtomicBool,
    /// The database is over its quota (what the quota check saw).
    over_quota: AtomicBool,
    /// Every write is refused (a `CORRUPT` alarm).
    corrupt: AtomicBool,
    /// Raised alarms, persisted in the data directory.
    alarms: Mutex<Alarms>,
    /// This member's id, for the quota's alarm.
    member_id: AtomicU64,
    failed: AtomicBool,
    stopped: AtomicBool,
    tx: Mutex<Option<mpsc::Sender<Cmd>>>,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    runtime: tokio::runtime::Handle,
    /// Revokes of leases that expired while the store was closed, queued at
    /// open ahead of every other write.
    settling: Mutex<Vec<(i64, oneshot::Receiver<Result<WriteResp>>)>>,
}

/// Handle to an open store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

/// What `status` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Current (durable) revision.
    pub revision: i64,
    /// Compaction revision.
    pub compact_revision: i64,
    /// Size of the database file in bytes.
    pub db_size_bytes: u64,
    /// Bytes of the database file holding live data.
    pub db_size_in_use_bytes: u64,
    /// Keys with retained history.
    pub keys: usize,
    /// Leases alive.
    pub leases: usize,
    /// Synced watchers.
    pub watchers: usize,
    /// Raised alarms: the quota's `NOSPACE` (with this member's id) and
    /// every alarm raised with [`Store::activate_alarm`].
    pub alarms: Vec<AlarmMember>,
}

/// A consistent copy of the database, written to a file.
#[derive(Debug)]
pub struct Snapshot {
    /// Path of the copy (a redb file); the caller removes it when done.
    pub path: PathBuf,
    /// Revision the copy holds.
    pub revision: i64,
}

impl Store {
    /// Opens (or creates) the store in `dir`, recovering its state from disk, and starts
    /// the committer and the background tasks on the current tokio runtime.
    pub fn open(dir: impl AsRef<Path>, cfg: StoreConfig) -> Result<Store> {
        cfg.validate()
            .map_err(|e| StoreError::InvalidArgument(e.to_string()))?;
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)
            .map_err(|e| StoreError::Storage(format!("creating {}: {e}", dir.display())))?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            StoreError::Storage("Store::open must run inside a tokio runtime".into())
        })?;
        let recover::Recovered {
            db,
            alarms,
            wal,
            index,
            lessor,
            revision: rev,
            compact_revision: compact,
            expired_while_closed,
        } = recover::from_disk(&dir, &cfg)?;
        let (tx, rx) = mpsc::channel(cfg.max_pending_writes);
        let shared = Arc::new(Shared {
            hub: Hub::new(rev),
            cfg,
            dir,
            db: RwLock::new(Some(db)),
            index: RwLock::new(index),
            lessor: Mutex::new(lessor),
            published: AtomicI64::new(rev),
            compact_rev: AtomicI64::new(compact),
            no_space: AtomicBool::new(false),
            over_quota: AtomicBool::new(false),
            corrupt: AtomicBool::new(false),
            alarms: Mutex::new(alarms),
            member_id: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            tx: Mutex::new(Some(tx)),
            committer: Mutex::new(None),
            runtime,
            settling: Mutex::new(Vec::new()),
        });
        committer::start(&shared, rx, wal)?;
        leases::queue_expired_revokes(&shared, expired_while_closed);
        let store = Store { shared };
        store.refresh_alarms();
        store.check_quota();
        store.spawn_background();
        Ok(store)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The store's configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.shared.cfg
    }

    /// The last durable revision.
    pub fn revision(&self) -> i64 {
        self.shared.published.load(Ordering::Acquire)
    }

    /// The compaction revision.
    pub fn compact_revision(&self) -> i64 {
        self.shared.compact_rev.load(Ordering::Acquire)
    }

    /// True while the store accepts requests (not stopped, no storage failure).
    pub fn is_healthy(&self) -> bool {
        !self.shared.failed.load(Ordering::Acquire) && !self.shared.stopped.load(Ordering::Acquire)
    }

    async fn submit(&self, req: WriteReq) -> Result<WriteResp> {
        if !self.is_healthy() {
            return Err(StoreError::Stopped);
        }
        self.check_corrupt()?;
        let tx = self.shared.tx.lock().clone().ok_or(StoreError::Stopped)?;
        let (reply, rx) = oneshot::channel();
        tx.send(Cmd::Write(req, reply))
            .await
            .map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Stops the store: waits for queued writes to commit, then closes the database
    /// cleanly. Later calls fail with `Stopped`.
    pub async fn close(&self) {
        if self.shared.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        // Dropping the sender ends the committer once the queue is drained.
        self.shared.tx.lock().take();
        let handle = self.shared.committer.lock().take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        self.shared.db.write().take();
        if !self.shared.cfg.lease_checkpoint_interval.is_zero() {
            let deadlines = self.shared.lessor.lock().deadlines();
            if let Err(e) = leases::save_lease_deadlines(&self.shared.dir, &deadlines) {
                tracing::warn!(error = %e, "writing lease deadlines on close failed");
            }
        }
        tracing::info!("store closed");
    }
}

fn unexpected(r: WriteResp) -> StoreError {
    StoreError::Storage(format!(
        "committer answered with the wrong response kind: {r:?}"
    ))
}
