//! The store: open/recover, the group-commit committer, the read path, leases,
//! watch streams, compaction, snapshots and status.
//!
//! Invariants:
//! - one committer thread owns every write; a batch of queued requests becomes one
//!   redb transaction and one fsync, and no request is answered before that fsync;
//! - `published` is the last durable revision; readers never read above it;
//! - a storage failure while committing stops the store (fail-stop): the state on
//!   disk is unknown, so only a restart, which recovers from disk, may continue.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Duration, Instant};

use crate::alarm::{Alarm, AlarmMember, Alarms};
use crate::apply::{Applier, TableFetch, WriteReq, WriteResp, rev_key};
use crate::codec;
use crate::config::StoreConfig;
use crate::error::{Result, StoreError};
use crate::index::{Entry, Index};
use crate::lease::{LeaseInfo, Lessor};
use crate::mvcc;
use crate::ops::*;
use crate::types::{Event, EventKind, KeyValue, Revision};
use crate::wal::{self, Wal};
use crate::watch::{Behind, Hub, SyncOutcome, WatchCreateError, WatchMessage, WatchSpec, Watcher};

pub(crate) const KV: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("kv");
pub(crate) const LEASES: TableDefinition<i64, i64> = TableDefinition::new("leases");
pub(crate) const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
pub(crate) const META_REV: &str = "revision";
pub(crate) const META_COMPACT: &str = "compact_revision";
/// LSN of the last write-ahead-log record whose changes a durable redb commit holds.
pub(crate) const META_CHECKPOINT_LSN: &str = "checkpoint_lsn";
const WAL_DIR: &str = "wal";
/// Log bytes after which the next batch is made durable in redb (a checkpoint).
const WAL_CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;
pub(crate) const DB_FILE: &str = "meshwork.redb";
/// Records read per catch-up step of a lagging watcher.
const CATCH_UP_RECORDS: usize = 1024;

enum Cmd {
    Write(WriteReq, oneshot::Sender<Result<WriteResp>>),
}

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
        let started = std::time::Instant::now();
        let db = Database::builder()
            .set_cache_size(cfg.cache_bytes)
            .create(dir.join(DB_FILE))
            .map_err(|e| {
                StoreError::Storage(format!("opening {}: {e}", dir.join(DB_FILE).display()))
            })?;
        create_tables(&db)?;
        let alarms = Alarms::load(&dir)?;
        let wal = recover(&db, &dir, &cfg)?;
        let (index, lessor_rows, rev, compact) = load(&db)?;
        let now = Instant::now();
        let mut lessor = Lessor::new(lease_seed());
        for (id, ttl) in &lessor_rows {
            lessor.grant(*id, *ttl, now);
        }
        // Re-attach keys to their leases from the index.
        let attach = attachments(&index, rev);
        for (lease, key) in attach {
            lessor.attach(lease, &key);
        }
        lessor.renew_all(now);
        let expired_while_closed = resume_leases(&mut lessor, &dir, &cfg, now);
        tracing::info!(
            revision = rev,
            compact_revision = compact,
            keys = index.len(),
            leases = lessor.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "store recovered"
        );
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
        // The committer holds the store weakly: dropping every handle drops the sender, which
        // ends the committer and closes the database (as `close` does, minus the wait).
        let committer_shared = Arc::downgrade(&shared);
        let committer_runtime = shared.runtime.clone();
        let handle = std::thread::Builder::new()
            .name("meshwork-committer".into())
            .spawn(move || committer(committer_shared, committer_runtime, rx, wal))
            .map_err(|e| StoreError::Storage(format!("starting the committer thread: {e}")))?;
        *shared.committer.lock() = Some(handle);
        if let Some(tx) = shared.tx.lock().as_ref() {
            let mut settling = shared.settling.lock();
            for id in expired_while_closed {
                let (reply, rx) = oneshot::channel();
                if tx
                    .try_send(Cmd::Write(WriteReq::LeaseRevoke { id }, reply))
                    .is_ok()
                {
                    settling.push((id, rx));
                }
            }
        }
        let store = Store { shared };
        store.refresh_alarms();
        store.check_quota();
        store.spawn_background();
        Ok(store)
    }

    fn spawn_background(&self) {
        let weak = Arc::downgrade(&self.shared);
        let interval = self.shared.cfg.lease_check_interval;
        self.shared
            .runtime
            .spawn(lease_loop(weak.clone(), interval));
        self.shared.runtime.spawn(progress_loop(
            weak.clone(),
            self.shared.cfg.watch_progress_interval,
        ));
        if self.shared.cfg.auto_compaction_retention_revisions > 0
            || self.shared.cfg.auto_compaction_retention.is_some()
        {
            self.shared.runtime.spawn(auto_compact_loop(weak));
        }
    }

    /// Waits until the leases that expired while the store was closed are
    /// revoked, with their keys (queued at open ahead of every other write).
    /// Call it before serving clients, so none reads such a key.
    pub async fn settled(&self) {
        let pending = std::mem::take(&mut *self.shared.settling.lock());
        for (id, rx) in pending {
            match rx.await {
                Ok(Ok(_)) => {
                    metrics::counter!("meshwork_store_leases_expired_total").increment(1);
                    tracing::info!(
                        lease = id,
                        "lease expired while the store was closed; revoked"
                    );
                }
                Ok(Err(StoreError::LeaseNotFound)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(lease = id, error = %e, "revoking a lease that expired while closed failed; the lease loop retries");
                    self.shared.lessor.lock().unmark_expiring(id);
                }
                Err(_) => {}
            }
        }
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

    /// Reads a key or range (etcd `Range`).
    pub fn range(&self, r: &RangeRequest) -> Result<RangeResponse> {
        mvcc::validate_range(r, &self.shared.cfg)?;
        if !self.is_healthy() {
            return Err(StoreError::Stopped);
        }
        let (sel, cur, compact) = {
            let index = self.shared.index.read();
            let (rev, cur, compact) = self.read_rev(r.revision)?;
            (mvcc::select(&index, r, rev), cur, compact)
        };
        metrics::counter!("meshwork_store_ranges_total").increment(1);
        if sel.hits.is_empty() || (r.keys_only && r.sort_target != SortTarget::Value) {
            return mvcc::materialize(sel, r, &NoFetch, cur, compact);
        }
        self.with_kv(|t| mvcc::materialize(sel, r, &TableFetch(t), cur, compact))
    }

    fn read_rev(&self, requested: i64) -> Result<(i64, i64, i64)> {
        let cur = self.shared.published.load(Ordering::Acquire);
        let compact = self.shared.compact_rev.load(Ordering::Acquire);
        let rev = if requested <= 0 { cur } else { requested };
        if rev > cur {
            return Err(StoreError::FutureRevision);
        }
        if rev < compact {
            return Err(StoreError::Compacted {
                compact_revision: compact,
            });
        }
        Ok((rev, cur, compact))
    }

    fn with_kv<T>(
        &self,
        f: impl FnOnce(&redb::ReadOnlyTable<(u64, u32), &'static [u8]>) -> Result<T>,
    ) -> Result<T> {
        let rtx = {
            // Recursive: callers may hold the index lock, which the committer takes while
            // it holds this lock; a fair `read` would queue behind a waiting `defragment`
            // (a writer) and deadlock all three.
            let db = self.shared.db.read_recursive();
            let db = db.as_ref().ok_or(StoreError::Stopped)?;
            db.begin_read().map_err(StoreError::storage)?
        };
        let table = rtx.open_table(KV).map_err(StoreError::storage)?;
        f(&table)
    }

    /// Writes a key (etcd `Put`); returns after the write is durable.
    pub async fn put(&self, p: PutRequest) -> Result<PutResponse> {
        mvcc::check_put(&p, &self.shared.cfg)?;
        metrics::counter!("meshwork_store_puts_total").increment(1);
        match self.submit(WriteReq::Put(p)).await? {
            WriteResp::Put(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes a key or range (etcd `DeleteRange`).
    pub async fn delete(&self, d: DeleteRequest) -> Result<DeleteResponse> {
        mvcc::check_range(&d.range, &self.shared.cfg)?;
        match self.submit(WriteReq::Delete(d)).await? {
            WriteResp::Delete(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Runs a transaction (etcd `Txn`). Read-only txns are served without the committer.
    pub async fn txn(&self, t: TxnRequest) -> Result<TxnResponse> {
        mvcc::check_txn(&t, &self.shared.cfg)?;
        metrics::counter!("meshwork_store_txns_total").increment(1);
        if !t.is_write() {
            return self.read_txn(&t);
        }
        match self.submit(WriteReq::Txn(t)).await? {
            WriteResp::Txn(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    fn read_txn(&self, t: &TxnRequest) -> Result<TxnResponse> {
        if !self.is_healthy() {
            return Err(StoreError::Stopped);
        }
        let index = self.shared.index.read();
        let (rev, cur, compact) = self.read_rev(0)?;
        self.with_kv(|table| {
            let f = TableFetch(table);
            let path = mvcc::plan(&index, t, rev, &f)?;
            mvcc::precheck(
                &index,
                if path.succeeded {
                    &t.success
                } else {
                    &t.failure
                },
                &path,
                rev,
                compact,
                &|_| true,
            )?;
            let responses = read_branch(&index, t, &path, rev, cur, compact, &f)?;
            Ok(TxnResponse {
                revision: cur,
                succeeded: path.succeeded,
                responses,
            })
        })
    }

    /// Compacts history below `revision` (etcd `Compact`).
    pub async fn compact(&self, revision: i64) -> Result<i64> {
        match self.submit(WriteReq::Compact { revision }).await? {
            WriteResp::Compact { revision } => Ok(revision),
            other => Err(unexpected(other)),
        }
    }

    /// Grants a lease; `id == 0` lets the store choose. Returns (id, ttl, revision).
    ///
    /// As etcd 3.4's lessor: a TTL above the maximum is refused; a TTL below the
    /// minimum, zero or negative included, is raised to the minimum; any non-zero id,
    /// negative ones included, is the client's choice.
    pub async fn lease_grant(&self, id: i64, ttl_secs: i64) -> Result<(i64, i64, i64)> {
        if ttl_secs > self.shared.cfg.max_lease_ttl_secs {
            return Err(StoreError::LeaseTtlTooLarge);
        }
        let ttl = ttl_secs.max(self.shared.cfg.min_lease_ttl_secs);
        match self
            .submit(WriteReq::LeaseGrant { id, ttl_secs: ttl })
            .await?
        {
            WriteResp::LeaseGrant {
                id,
                ttl_secs,
                revision,
            } => Ok((id, ttl_secs, revision)),
            other => Err(unexpected(other)),
        }
    }

    /// Revokes a lease and deletes its keys in one revision; returns the revision.
    pub async fn lease_revoke(&self, id: i64) -> Result<i64> {
        match self.submit(WriteReq::LeaseRevoke { id }).await? {
            WriteResp::LeaseRevoke { revision } => Ok(revision),
            other => Err(unexpected(other)),
        }
    }

    /// Renews a lease to its full TTL; returns the TTL.
    pub fn lease_keep_alive(&self, id: i64) -> Result<i64> {
        self.shared
            .lessor
            .lock()
            .keep_alive(id, Instant::now())
            .ok_or(StoreError::LeaseNotFound)
    }

    /// Reports a lease's TTLs and, optionally, its keys.
    pub fn lease_time_to_live(&self, id: i64, keys: bool) -> Option<LeaseInfo> {
        self.shared.lessor.lock().info(id, keys, Instant::now())
    }

    /// IDs of all leases.
    pub fn lease_list(&self) -> Vec<i64> {
        self.shared.lessor.lock().ids()
    }

    /// Opens a watch stream: watchers created on it deliver into the returned receiver.
    pub fn watch_stream(&self) -> (WatchStream, mpsc::Receiver<WatchMessage>) {
        let (tx, rx) = mpsc::channel(self.shared.cfg.watch_buffer_events);
        let id = self.shared.hub.open_stream();
        (
            WatchStream {
                store: self.clone(),
                id,
                tx,
            },
            rx,
        )
    }

    /// Sends a progress notification to every synced watcher that asked for them.
    pub fn notify_progress(&self) {
        self.shared.hub.progress(None);
    }

    /// Current status.
    pub fn status(&self) -> Status {
        let db_size = std::fs::metadata(self.shared.dir.join(DB_FILE))
            .map(|m| m.len())
            .unwrap_or(0);
        let in_use = self
            .shared
            .db
            .read()
            .as_ref()
            .and_then(|db| db.begin_read().ok())
            .and_then(|r| r.open_table(KV).ok().and_then(|t| t.stats().ok()))
            .map(|s| s.stored_bytes() + s.metadata_bytes() + s.fragmented_bytes())
            .unwrap_or(db_size);
        let mut alarms = self.shared.alarms.lock().list();
        let own = AlarmMember {
            member_id: self.shared.member_id.load(Ordering::Relaxed),
            alarm: Alarm::NoSpace,
        };
        if self.shared.over_quota.load(Ordering::Acquire) && !alarms.contains(&own) {
            alarms.push(own);
        }
        // One lock at a time: the committer takes the index lock while it holds the lessor.
        let keys = self.shared.index.read().len();
        let leases = self.shared.lessor.lock().len();
        let watchers = self.shared.hub.synced_count();
        Status {
            revision: self.revision(),
            compact_revision: self.compact_revision(),
            db_size_bytes: db_size,
            db_size_in_use_bytes: in_use.min(db_size.max(in_use)),
            keys,
            leases,
            watchers,
            alarms,
        }
    }

    /// Sets this member's id (the quota's `NOSPACE` alarm carries it).
    pub fn set_member_id(&self, id: u64) {
        self.shared.member_id.store(id, Ordering::Relaxed);
    }

    /// Raises `alarm` about `member_id` (etcd `Alarm ACTIVATE`); durable
    /// when it returns. `NOSPACE` refuses writes that add data, `CORRUPT`
    /// every write (reads still answer, as in etcd), until it is cleared.
    pub fn activate_alarm(&self, member_id: u64, alarm: Alarm) -> Result<()> {
        self.shared
            .alarms
            .lock()
            .activate(AlarmMember { member_id, alarm })?;
        tracing::warn!(member_id, alarm = alarm.as_str(), "alarm raised");
        self.refresh_alarms();
        Ok(())
    }

    /// Clears `alarm` about `member_id` (etcd `Alarm DEACTIVATE`); the
    /// quota's `NOSPACE` is raised again at once if the database is still
    /// over its quota.
    pub fn deactivate_alarm(&self, member_id: u64, alarm: Alarm) -> Result<()> {
        self.shared
            .alarms
            .lock()
            .deactivate(AlarmMember { member_id, alarm })?;
        if alarm == Alarm::NoSpace {
            self.shared.over_quota.store(false, Ordering::Release);
        }
        self.refresh_alarms();
        self.check_quota();
        Ok(())
    }

    /// Clears the quota's `NOSPACE` alarm; it is raised again if the
    /// database is still over its quota.
    pub fn disarm(&self, alarm: Alarm) {
        if alarm == Alarm::NoSpace {
            self.shared.over_quota.store(false, Ordering::Release);
        }
        self.refresh_alarms();
        self.check_quota();
    }

    /// Brings the refusal flags in line with the quota and the alarms.
    fn refresh_alarms(&self) {
        let (no_space, corrupt) = {
            let a = self.shared.alarms.lock();
            (a.any(Alarm::NoSpace), a.any(Alarm::Corrupt))
        };
        let over = self.shared.over_quota.load(Ordering::Acquire);
        self.shared
            .no_space
            .store(no_space || over, Ordering::Release);
        self.shared.corrupt.store(corrupt, Ordering::Release);
    }

    fn check_corrupt(&self) -> Result<()> {
        if self.shared.corrupt.load(Ordering::Acquire) {
            return Err(StoreError::Corrupt);
        }
        Ok(())
    }

    fn check_quota(&self) {
        let size = std::fs::metadata(self.shared.dir.join(DB_FILE))
            .map(|m| m.len())
            .unwrap_or(0);
        metrics::gauge!("meshwork_store_db_size_bytes").set(size as f64);
        if size > self.shared.cfg.quota_bytes
            && !self.shared.over_quota.swap(true, Ordering::AcqRel)
        {
            self.shared.no_space.store(true, Ordering::Release);
            tracing::warn!(
                size,
                quota = self.shared.cfg.quota_bytes,
                "database space exceeded: writes refused until compaction, defragmentation and alarm disarm"
            );
        }
    }

    /// Writes a consistent copy of the database into the data directory.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let rtx = {
            let db = self.shared.db.read();
            db.as_ref()
                .ok_or(StoreError::Stopped)?
                .begin_read()
                .map_err(StoreError::storage)?
        };
        // The revision the read transaction holds (a commit may land between `begin_read`
        // and reading `published`, so that would not match the copy).
        let revision = rtx
            .open_table(META)
            .map_err(StoreError::storage)?
            .get(META_REV)
            .map_err(StoreError::storage)?
            .map(|g| g.value())
            .unwrap_or(0)
            .max(1);
        // Unique per call: concurrent snapshots at one revision must not share a file.
        static SNAPSHOTS: AtomicU64 = AtomicU64::new(0);
        let path = self.shared.dir.join(format!(
            "snapshot-{revision}-{}-{}.redb.tmp",
            std::process::id(),
            SNAPSHOTS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let out = Database::create(&path).map_err(StoreError::storage)?;
        let wtx = out.begin_write().map_err(StoreError::storage)?;
        {
            let kv = rtx.open_table(KV).map_err(StoreError::storage)?;
            let mut okv = wtx.open_table(KV).map_err(StoreError::storage)?;
            for item in kv.iter().map_err(StoreError::storage)? {
                let (k, v) = item.map_err(StoreError::storage)?;
                okv.insert(k.value(), v.value())
                    .map_err(StoreError::storage)?;
            }
            let leases = rtx.open_table(LEASES).map_err(StoreError::storage)?;
            let mut ol = wtx.open_table(LEASES).map_err(StoreError::storage)?;
            for item in leases.iter().map_err(StoreError::storage)? {
                let (k, v) = item.map_err(StoreError::storage)?;
                ol.insert(k.value(), v.value())
                    .map_err(StoreError::storage)?;
            }
            let meta = rtx.open_table(META).map_err(StoreError::storage)?;
            let mut om = wtx.open_table(META).map_err(StoreError::storage)?;
            for item in meta.iter().map_err(StoreError::storage)? {
                let (k, v) = item.map_err(StoreError::storage)?;
                om.insert(k.value(), v.value())
                    .map_err(StoreError::storage)?;
            }
        }
        wtx.commit().map_err(StoreError::storage)?;
        drop(out);
        Ok(Snapshot { path, revision })
    }

    /// A consistent view of the whole store at its current revision, for
    /// export (`meshwork-etcd` writes etcd snapshots from it).
    pub fn export(&self) -> Result<crate::export::Export> {
        let rtx = {
            let db = self.shared.db.read();
            db.as_ref()
                .ok_or(StoreError::Stopped)?
                .begin_read()
                .map_err(StoreError::storage)?
        };
        crate::export::Export::new(rtx)
    }

    /// Rewrites the database file to give free pages back (etcd `Defragment`).
    /// Fails while other transactions (a snapshot, a long read) are open.
    pub fn defragment(&self) -> Result<()> {
        let mut guard = self.shared.db.write();
        let db = guard.as_mut().ok_or(StoreError::Stopped)?;
        // Persist any non-durable commits first: compaction works on the durable state.
        let wtx = db.begin_write().map_err(StoreError::storage)?;
        wtx.commit().map_err(StoreError::storage)?;
        db.compact()
            .map_err(|e| StoreError::Storage(format!("defragment: {e}")))?;
        drop(guard);
        self.check_quota();
        Ok(())
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
            if let Err(e) = save_lease_deadlines(&self.shared.dir, &deadlines) {
                tracing::warn!(error = %e, "writing lease deadlines on close failed");
            }
        }
        tracing::info!("store closed");
    }

    async fn catch_up(self, mut b: Behind) {
        loop {
            if !self.shared.hub.alive(b.key) {
                self.shared.hub.release_behind(&b.watcher);
                return;
            }
            let target = self.shared.hub.last_rev();
            while b.next_rev <= target {
                let compact = self.compact_revision();
                if b.next_rev < compact {
                    self.cancel_compacted(&b, compact).await;
                    return;
                }
                let read = {
                    let store = self.clone();
                    let w = b.watcher.clone();
                    let from = b.next_rev;
                    tokio::task::spawn_blocking(move || store.history(&w, from, target)).await
                };
                let (events, reached) = match read {
                    Ok(Ok(x)) => x,
                    Ok(Err(e)) => {
                        self.cancel_with(&b, 0, e.to_string()).await;
                        return;
                    }
                    Err(e) => {
                        self.cancel_with(&b, 0, e.to_string()).await;
                        return;
                    }
                };
                // History read while compaction removed part of it is not trustworthy.
                let compact = self.compact_revision();
                if b.next_rev < compact {
                    self.cancel_compacted(&b, compact).await;
                    return;
                }
                if !events.is_empty() {
                    let msg = WatchMessage::Events {
                        watch_id: b.key.1,
                        revision: reached,
                        events,
                    };
                    if b.watcher.tx.send(msg).await.is_err() {
                        self.shared.hub.cancel(b.key);
                        self.shared.hub.release_behind(&b.watcher);
                        return;
                    }
                }
                b.next_rev = reached + 1;
            }
            match self.shared.hub.try_sync(b) {
                SyncOutcome::Synced | SyncOutcome::Gone => return,
                SyncOutcome::Again(again) => b = again,
            }
        }
    }

    async fn cancel_compacted(&self, b: &Behind, compact: i64) {
        self.cancel_with(
            b,
            compact,
            "etcdserver: mvcc: required revision has been compacted".into(),
        )
        .await;
    }

    async fn cancel_with(&self, b: &Behind, compact: i64, reason: String) {
        self.shared.hub.cancel(b.key);
        self.shared.hub.release_behind(&b.watcher);
        let msg = WatchMessage::Canceled {
            watch_id: b.key.1,
            revision: self.revision(),
            compact_revision: compact,
            reason,
        };
        let _ = b.watcher.tx.send(msg).await;
    }

    /// Events for `w` in revisions `from..=to`, stopping at a revision boundary after
    /// about `CATCH_UP_RECORDS` records; returns them and the last revision covered.
    fn history(&self, w: &Watcher, from: i64, to: i64) -> Result<(Vec<Event>, i64)> {
        self.with_kv(|table| {
            let mut events = Vec::new();
            let mut last_main = from - 1;
            let range = table
                .range((from as u64, 0u32)..=(to as u64, u32::MAX))
                .map_err(StoreError::storage)?;
            for (seen, item) in range.enumerate() {
                let (k, v) = item.map_err(StoreError::storage)?;
                let (main, sub) = k.value();
                let main = main as i64;
                if seen >= CATCH_UP_RECORDS && main != last_main {
                    return Ok((events, last_main));
                }
                last_main = main;
                let rec = codec::decode(Revision { main, sub }, v.value())?;
                let kind = if rec.tombstone {
                    EventKind::Delete
                } else {
                    EventKind::Put
                };
                let mut ev = Event {
                    kind,
                    kv: rec.kv,
                    prev_kv: None,
                };
                if !w.wants(&ev) {
                    continue;
                }
                if w.spec.prev_kv {
                    ev.prev_kv = self.prev_of(table, &ev.kv.key, Revision { main, sub })?;
                }
                events.push(ev);
            }
            Ok((events, to))
        })
    }

    fn prev_of(
        &self,
        table: &redb::ReadOnlyTable<(u64, u32), &'static [u8]>,
        key: &[u8],
        rev: Revision,
    ) -> Result<Option<KeyValue>> {
        let prev: Option<Entry> = {
            let index = self.shared.index.read();
            index
                .history(key)
                .and_then(|h| h.iter().rev().find(|e| e.rev < rev).copied())
        };
        match prev {
            Some(e) if !e.is_tombstone() => Ok(table
                .get(rev_key(e.rev))
                .map_err(StoreError::storage)?
                .map(|g| codec::decode(e.rev, g.value()))
                .transpose()?
                .map(|r| r.kv)),
            _ => Ok(None),
        }
    }
}

/// A watch stream: create and cancel watchers; dropping it removes them all.
pub struct WatchStream {
    store: Store,
    id: u64,
    tx: mpsc::Sender<WatchMessage>,
}

impl WatchStream {
    /// Creates a watcher: sends `Created`, then its events. A start revision below the
    /// compaction revision gets `Created` then `Canceled` with the compaction revision.
    pub async fn create(&self, spec: WatchSpec) -> Result<i64, WatchCreateError> {
        let shared = &self.store.shared;
        let id = shared.hub.reserve(
            self.id,
            spec.watch_id,
            shared.cfg.max_watchers_per_stream,
            spec.prev_kv,
        )?;
        let revision = self.store.revision();
        self.tx
            .send(WatchMessage::Created {
                watch_id: id,
                revision,
            })
            .await
            .map_err(|_| WatchCreateError::Closed)?;
        let compact = self.store.compact_revision();
        let key = (self.id, id);
        if spec.start_revision > 0 && spec.start_revision < compact {
            shared.hub.cancel(key);
            // Never registered: release what `reserve` counted.
            shared.hub.release_behind(&Watcher {
                min_rev: 0,
                spec,
                tx: self.tx.clone(),
            });
            let reason = "etcdserver: mvcc: required revision has been compacted".to_string();
            let msg = WatchMessage::Canceled {
                watch_id: id,
                revision,
                compact_revision: compact,
                reason,
            };
            self.tx
                .send(msg)
                .await
                .map_err(|_| WatchCreateError::Closed)?;
            return Ok(id);
        }
        let mut spec = spec;
        if spec.start_revision <= 0 {
            // "From now" means right after the revision `Created` reported: commits published
            // meanwhile are caught up, and ones published at or below it are not repeated.
            spec.start_revision = revision + 1;
        }
        let watcher = Watcher {
            min_rev: spec.start_revision,
            spec,
            tx: self.tx.clone(),
        };
        if let Some(behind) = shared.hub.register(key, watcher) {
            shared.runtime.spawn(self.store.clone().catch_up(behind));
        }
        Ok(id)
    }

    /// Cancels a watcher; sends `Canceled` if it existed.
    pub async fn cancel(&self, watch_id: i64) -> bool {
        if !self.store.shared.hub.cancel((self.id, watch_id)) {
            return false;
        }
        let msg = WatchMessage::Canceled {
            watch_id,
            revision: self.store.revision(),
            compact_revision: 0,
            reason: String::new(),
        };
        let _ = self.tx.send(msg).await;
        true
    }

    /// Sends a progress notification to every synced watcher of this stream.
    pub fn request_progress(&self) {
        self.store.shared.hub.progress(Some(self.id));
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.store.shared.hub.close_stream(self.id);
    }
}

struct NoFetch;

impl mvcc::Fetch for NoFetch {
    fn fetch(&self, _rev: Revision) -> Result<Option<codec::Record>> {
        Ok(None)
    }
}

fn unexpected(r: WriteResp) -> StoreError {
    StoreError::Storage(format!(
        "committer answered with the wrong response kind: {r:?}"
    ))
}

fn read_branch(
    index: &Index,
    t: &TxnRequest,
    path: &mvcc::Path,
    rev: i64,
    cur: i64,
    compact: i64,
    f: &dyn mvcc::Fetch,
) -> Result<Vec<ResponseOp>> {
    let ops = if path.succeeded {
        &t.success
    } else {
        &t.failure
    };
    let mut nested = path.nested.iter();
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            RequestOp::Range(r) => {
                let sel = mvcc::select(index, r, mvcc::txn_read_rev(r, rev));
                out.push(ResponseOp::Range(mvcc::materialize(
                    sel, r, f, cur, compact,
                )?));
            }
            RequestOp::Txn(inner) => {
                let Some(np) = nested.next() else { break };
                let responses = read_branch(index, inner, np, rev, cur, compact, f)?;
                out.push(ResponseOp::Txn(TxnResponse {
                    revision: cur,
                    succeeded: np.succeeded,
                    responses,
                }));
            }
            RequestOp::Put(_) | RequestOp::Delete(_) => {
                return Err(StoreError::Storage("read-only txn holds a write".into()));
            }
        }
    }
    Ok(out)
}

type Loaded = (Index, Vec<(i64, i64)>, i64, i64);

pub(crate) fn create_tables(db: &Database) -> Result<()> {
    let wtx = db.begin_write().map_err(StoreError::storage)?;
    {
        wtx.open_table(KV).map_err(StoreError::storage)?;
        wtx.open_table(LEASES).map_err(StoreError::storage)?;
        wtx.open_table(META).map_err(StoreError::storage)?;
    }
    wtx.commit().map_err(StoreError::storage)
}

/// Replays the write-ahead log records after the last checkpoint into redb, makes the
/// result durable, and returns the log open for appending.
fn recover(db: &Database, dir: &Path, cfg: &StoreConfig) -> Result<Wal> {
    let checkpoint_lsn = {
        let rtx = db.begin_read().map_err(StoreError::storage)?;
        let meta = rtx.open_table(META).map_err(StoreError::storage)?;
        let lsn = meta
            .get(META_CHECKPOINT_LSN)
            .map_err(StoreError::storage)?
            .map(|g| g.value())
            .unwrap_or(0);
        u64::try_from(lsn).unwrap_or(0)
    };
    let wal_dir = dir.join(WAL_DIR);
    let (mut wal, recovered) = Wal::open(&wal_dir, checkpoint_lsn, cfg.fsync).map_err(|e| {
        StoreError::Storage(format!(
            "opening the write-ahead log in {}: {e}",
            wal_dir.display()
        ))
    })?;
    let replayed = recovered.records.len();
    let wtx = db.begin_write().map_err(StoreError::storage)?;
    {
        let mut kv = wtx.open_table(KV).map_err(StoreError::storage)?;
        let mut leases = wtx.open_table(LEASES).map_err(StoreError::storage)?;
        let mut meta = wtx.open_table(META).map_err(StoreError::storage)?;
        for (lsn, payload) in &recovered.records {
            let ops = wal::decode_ops(payload)
                .map_err(|e| StoreError::Storage(format!("write-ahead log record {lsn}: {e}")))?;
            for op in ops {
                match op {
                    wal::Op::KvPut { main, sub, record } => {
                        kv.insert((main, sub), record.as_slice())
                            .map_err(StoreError::storage)?;
                    }
                    wal::Op::LeasePut { id, ttl_secs } => {
                        leases.insert(id, ttl_secs).map_err(StoreError::storage)?;
                    }
                    wal::Op::LeaseDel { id } => {
                        leases.remove(id).map_err(StoreError::storage)?;
                    }
                    wal::Op::Revision { revision } => {
                        let cur = meta
                            .get(META_REV)
                            .map_err(StoreError::storage)?
                            .map(|g| g.value())
                            .unwrap_or(0);
                        meta.insert(META_REV, cur.max(revision))
                            .map_err(StoreError::storage)?;
                    }
                }
            }
        }
        let lsn = i64::try_from(wal.last_lsn()).map_err(StoreError::storage)?;
        meta.insert(META_CHECKPOINT_LSN, lsn)
            .map_err(StoreError::storage)?;
    }
    wtx.commit().map_err(StoreError::storage)?;
    wal.checkpointed()
        .map_err(|e| StoreError::Storage(format!("truncating the write-ahead log: {e}")))?;
    if replayed > 0 {
        tracing::info!(
            records = replayed,
            last_lsn = recovered.last_lsn,
            "replayed the write-ahead log"
        );
    }
    Ok(wal)
}

/// Rebuilds the index and the lease rows from redb (tables exist: `create_tables` ran).
fn load(db: &Database) -> Result<Loaded> {
    let rtx = db.begin_read().map_err(StoreError::storage)?;
    let meta = rtx.open_table(META).map_err(StoreError::storage)?;
    let get = |k: &str| -> Result<i64> {
        Ok(meta
            .get(k)
            .map_err(StoreError::storage)?
            .map(|g| g.value())
            .unwrap_or(0))
    };
    // A fresh store is at revision 1 and its first write is revision 2, as in etcd:
    // clients rely on 0 meaning "no revision" (e.g. `max_create_revision = my_rev - 1`).
    let mut rev = get(META_REV)?.max(1);
    let compact = get(META_COMPACT)?;
    let kv = rtx.open_table(KV).map_err(StoreError::storage)?;
    let mut index = Index::default();
    for item in kv.iter().map_err(StoreError::storage)? {
        let (k, v) = item.map_err(StoreError::storage)?;
        let (main, sub) = k.value();
        let r = Revision {
            main: main as i64,
            sub,
        };
        let rec = codec::decode(r, v.value())?;
        let entry = if rec.tombstone {
            Entry {
                rev: r,
                create: 0,
                version: 0,
                lease: 0,
            }
        } else {
            Entry {
                rev: r,
                create: rec.kv.create_revision,
                version: rec.kv.version,
                lease: rec.kv.lease,
            }
        };
        index.push(&rec.kv.key, entry);
        rev = rev.max(r.main);
    }
    let leases = rtx.open_table(LEASES).map_err(StoreError::storage)?;
    let mut rows = Vec::new();
    for item in leases.iter().map_err(StoreError::storage)? {
        let (k, v) = item.map_err(StoreError::storage)?;
        rows.push((k.value(), v.value()));
    }
    Ok((index, rows, rev, compact))
}

fn attachments(index: &Index, rev: i64) -> Vec<(i64, Bytes)> {
    let mut out = Vec::new();
    // Every key: the empty key is never stored, so starting at \0 misses nothing.
    let all = crate::types::KeyRange::new(Bytes::from_static(&[0]), Bytes::from_static(&[0]));
    index.for_each_live(&all, rev, |k, e| {
        if e.lease != 0 {
            out.push((e.lease, Bytes::copy_from_slice(k)));
        }
        true
    });
    out
}

fn lease_seed() -> i64 {
    // Time-based seed so that IDs differ across restarts, as etcd's do.
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(1);
    (ms & 0x0000_ffff_ffff_ffff) << 12 | 1
}

/// What the committer thread owns besides the queue.
struct Committer {
    /// The write-ahead-log record being built (reused across batches).
    buf: Vec<u8>,
    /// Scratch for encoding one change record (reused across batches).
    record_buf: Vec<u8>,
    wal: Wal,
    last_checkpoint: std::time::Instant,
}

fn committer(
    weak: Weak<Shared>,
    runtime: tokio::runtime::Handle,
    mut rx: mpsc::Receiver<Cmd>,
    wal: Wal,
) {
    // Lease deadlines set here must come from the runtime's clock (the one the lease loop
    // reads), not the OS clock: they differ when the clock is paused or advanced in tests.
    let _clock = runtime.enter();
    let mut state = Committer {
        buf: Vec::new(),
        record_buf: Vec::new(),
        wal,
        last_checkpoint: std::time::Instant::now(),
    };
    while let Some(first) = rx.blocking_recv() {
        // Gone: the request's sender is dropped unanswered, which its caller sees as `Stopped`.
        let Some(shared) = weak.upgrade() else { return };
        let mut batch = vec![first];
        while batch.len() < shared.cfg.max_batch_requests {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        commit_batch(&shared, batch, &mut state);
    }
    // Queue closed (close, or every handle dropped): a final checkpoint, so that the next
    // open has nothing to replay.
    if let Some(shared) = weak.upgrade()
        && !shared.failed.load(Ordering::Acquire)
        && let Err(e) = checkpoint(&shared, &mut state)
    {
        tracing::warn!(error = %e, "final checkpoint failed; the write-ahead log will be replayed on open");
    }
}

/// Makes everything committed so far durable in redb and truncates the log.
fn checkpoint(shared: &Shared, state: &mut Committer) -> Result<()> {
    let db_guard = shared.db.read();
    let db = db_guard.as_ref().ok_or(StoreError::Stopped)?;
    let wtx = db.begin_write().map_err(StoreError::storage)?;
    {
        let mut meta = wtx.open_table(META).map_err(StoreError::storage)?;
        let lsn = i64::try_from(state.wal.last_lsn()).map_err(StoreError::storage)?;
        meta.insert(META_CHECKPOINT_LSN, lsn)
            .map_err(StoreError::storage)?;
    }
    wtx.commit().map_err(StoreError::storage)?;
    state.last_checkpoint = std::time::Instant::now();
    drop_old_segments(&mut state.wal);
    Ok(())
}

/// Deletes log segments a checkpoint made unnecessary; one that cannot be
/// deleted now (no descriptors, say) is retried at the next checkpoint.
fn drop_old_segments(wal: &mut Wal) {
    if let Err(e) = wal.checkpointed() {
        tracing::warn!(error = %e, "deleting old write-ahead log segments failed; retried at the next checkpoint");
    }
}

/// Per-request results, the last revision, the compaction revision and the events of a batch.
type BatchOutcome = (Vec<Result<WriteResp>>, i64, i64, Vec<Event>);

fn commit_batch(shared: &Arc<Shared>, batch: Vec<Cmd>, state: &mut Committer) {
    let started = std::time::Instant::now();
    let n = batch.len();
    let (reqs, replies): (Vec<WriteReq>, Vec<oneshot::Sender<Result<WriteResp>>>) =
        batch.into_iter().map(|Cmd::Write(r, tx)| (r, tx)).unzip();
    if shared.failed.load(Ordering::Acquire) {
        for tx in replies {
            let _ = tx.send(Err(StoreError::Stopped));
        }
        return;
    }
    // Everything the log could need a descriptor or disk space for, before
    // anything is applied: a failure here refuses this batch and loses nothing.
    if let Err(e) = state.wal.prepare() {
        tracing::warn!(error = %e, "write-ahead log cannot make its next segment; refusing this batch, the next one retries");
        metrics::counter!("meshwork_store_refused_batches_total").increment(1);
        let err = StoreError::Exhausted(format!("write-ahead log: {e}"));
        for tx in replies {
            let _ = tx.send(Err(err.clone()));
        }
        return;
    }
    let published = shared.published.load(Ordering::Acquire);
    let outcome = (|| -> Result<BatchOutcome> {
        let db_guard = shared.db.read();
        let db = db_guard.as_ref().ok_or(StoreError::Stopped)?;
        let mut wtx = db.begin_write().map_err(StoreError::storage)?;
        let mut log = std::mem::take(&mut state.buf);
        log.clear();
        let results;
        let rev;
        let compact;
        let events;
        let durable;
        {
            let mut kv = wtx.open_table(KV).map_err(StoreError::storage)?;
            let mut leases = wtx.open_table(LEASES).map_err(StoreError::storage)?;
            let mut lessor = shared.lessor.lock();
            let mut applier = Applier {
                kv: &mut kv,
                leases: &mut leases,
                lessor: &mut lessor,
                rev: published,
                published,
                compact_rev: shared.compact_rev.load(Ordering::Acquire),
                events: Vec::new(),
                want_prev: shared.hub.wants_prev_kv(),
                no_space: shared.no_space.load(Ordering::Acquire),
                now: Instant::now(),
                buf: std::mem::take(&mut state.record_buf),
                log,
                compacted: false,
            };
            let mut out = Vec::with_capacity(reqs.len());
            for req in &reqs {
                let mut index = shared.index.write();
                let before = applier.compact_rev;
                let r = applier.apply(&mut index, req);
                if applier.compact_rev != before {
                    // Readers below the new compaction revision must fail from now on.
                    shared
                        .compact_rev
                        .store(applier.compact_rev, Ordering::Release);
                }
                drop(index);
                match r {
                    Err(StoreError::Storage(e)) => return Err(StoreError::Storage(e)),
                    r => out.push(r),
                }
            }
            rev = applier.rev;
            compact = applier.compact_rev;
            events = std::mem::take(&mut applier.events);
            log = std::mem::take(&mut applier.log);
            state.record_buf = std::mem::take(&mut applier.buf);
            let compacted = applier.compacted;
            results = out;
            drop(lessor);
            let mut meta = wtx.open_table(META).map_err(StoreError::storage)?;
            meta.insert(META_REV, rev).map_err(StoreError::storage)?;
            meta.insert(META_COMPACT, compact)
                .map_err(StoreError::storage)?;
            // Durable in redb now (a checkpoint), or durable through the log and cheap in redb.
            durable = compacted
                || state.last_checkpoint.elapsed() >= shared.cfg.checkpoint_interval
                || state.wal.bytes_since_checkpoint >= WAL_CHECKPOINT_BYTES;
            if durable {
                let lsn = i64::try_from(state.wal.last_lsn()).map_err(StoreError::storage)?;
                meta.insert(META_CHECKPOINT_LSN, lsn)
                    .map_err(StoreError::storage)?;
            } else if !log.is_empty() {
                wal::encode_revision(&mut log, rev);
                state
                    .wal
                    .append(&log)
                    .map_err(|e| StoreError::Storage(format!("write-ahead log: {e}")))?;
            }
            state.buf = log;
        }
        if !durable {
            wtx.set_durability(Durability::None)
                .map_err(StoreError::storage)?;
        }
        wtx.commit().map_err(StoreError::storage)?;
        if durable {
            state.last_checkpoint = std::time::Instant::now();
            drop_old_segments(&mut state.wal);
        }
        Ok((results, rev, compact, events))
    })();
    match outcome {
        Ok((results, rev, _compact, events)) => {
            shared.published.store(rev, Ordering::Release);
            let elapsed = started.elapsed();
            metrics::histogram!("meshwork_store_commit_seconds").record(elapsed.as_secs_f64());
            metrics::histogram!("meshwork_store_commit_batch_requests").record(n as f64);
            metrics::gauge!("meshwork_store_revision").set(rev as f64);
            if rev > published || !events.is_empty() {
                let behind = shared.hub.publish(published + 1, rev, &events);
                for b in behind {
                    let store = Store {
                        shared: shared.clone(),
                    };
                    shared.runtime.spawn(store.catch_up(b));
                }
            }
            for (tx, r) in replies.into_iter().zip(results) {
                let _ = tx.send(r);
            }
            Store {
                shared: shared.clone(),
            }
            .check_quota();
        }
        Err(e) => {
            tracing::error!(error = %e, "commit failed; the store stops taking writes (restart to recover from disk)");
            shared.failed.store(true, Ordering::Release);
            for tx in replies {
                let _ = tx.send(Err(e.clone()));
            }
        }
    }
}

/// Lease deadlines as Unix milliseconds.
fn wall_deadlines(deadlines: &[(i64, Instant)]) -> Vec<(i64, u64)> {
    let now = Instant::now();
    let wall = unix_ms();
    deadlines
        .iter()
        .map(|(id, d)| {
            let left = d.saturating_duration_since(now).as_millis();
            (
                *id,
                wall.saturating_add(u64::try_from(left).unwrap_or(u64::MAX)),
            )
        })
        .collect()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn save_lease_deadlines(dir: &Path, deadlines: &[(i64, Instant)]) -> std::io::Result<()> {
    crate::lease::save_deadlines(dir, &wall_deadlines(deadlines))
}

/// Resumes leases from the checkpointed deadlines (plus one checkpoint
/// interval: a renewal after the last checkpoint is not lost); returns those
/// whose time ran out while the store was closed, now marked expiring.
fn resume_leases(lessor: &mut Lessor, dir: &Path, cfg: &StoreConfig, now: Instant) -> Vec<i64> {
    if cfg.lease_checkpoint_interval.is_zero() {
        let _ = std::fs::remove_file(dir.join(crate::lease::DEADLINES_FILE));
        return Vec::new();
    }
    let Some(saved) = crate::lease::load_deadlines(dir) else {
        return Vec::new();
    };
    let wall = unix_ms();
    let margin = u64::try_from(cfg.lease_checkpoint_interval.as_millis()).unwrap_or(u64::MAX);
    for id in lessor.ids() {
        let Some(at) = saved.get(&id) else { continue };
        let until = at.saturating_add(margin);
        let left = Duration::from_millis(until.saturating_sub(wall));
        lessor.resume(id, now + left, now);
    }
    lessor.take_expired(now)
}

async fn lease_loop(weak: Weak<Shared>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_checkpoint = Instant::now();
    loop {
        tick.tick().await;
        let Some(shared) = weak.upgrade() else { return };
        if shared.stopped.load(Ordering::Acquire) {
            return;
        }
        let every = shared.cfg.lease_checkpoint_interval;
        if !every.is_zero() && last_checkpoint.elapsed() >= every {
            last_checkpoint = Instant::now();
            let changed = shared.lessor.lock().take_deadlines();
            if let Some(deadlines) = changed {
                let dir = shared.dir.clone();
                let wall = wall_deadlines(&deadlines);
                let written =
                    tokio::task::spawn_blocking(move || crate::lease::save_deadlines(&dir, &wall))
                        .await;
                if let Ok(Err(e)) = written {
                    tracing::warn!(error = %e, "writing lease deadlines failed; retried at the next interval");
                    shared.lessor.lock().mark_dirty();
                }
            }
        }
        let expired = shared.lessor.lock().take_expired(Instant::now());
        let store = Store { shared };
        for id in expired {
            let s = store.clone();
            tokio::spawn(async move {
                match s.submit(WriteReq::LeaseRevoke { id }).await {
                    Ok(_) => {
                        metrics::counter!("meshwork_store_leases_expired_total").increment(1);
                        tracing::debug!(lease = id, "lease expired");
                    }
                    Err(StoreError::LeaseNotFound) => {}
                    Err(e) => {
                        tracing::warn!(lease = id, error = %e, "revoking an expired lease failed; will retry");
                        s.shared.lessor.lock().unmark_expiring(id);
                    }
                }
            });
        }
    }
}

async fn progress_loop(weak: Weak<Shared>, every: Duration) {
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    loop {
        tick.tick().await;
        let Some(shared) = weak.upgrade() else { return };
        if shared.stopped.load(Ordering::Acquire) {
            return;
        }
        shared.hub.progress(None);
    }
}

async fn auto_compact_loop(weak: Weak<Shared>) {
    let mut samples: VecDeque<(Instant, i64)> = VecDeque::new();
    let period = {
        let Some(s) = weak.upgrade() else { return };
        match s.cfg.auto_compaction_retention {
            Some(d) => (d / 10).clamp(Duration::from_secs(1), Duration::from_secs(300)),
            None => Duration::from_secs(300),
        }
    };
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let Some(shared) = weak.upgrade() else { return };
        if shared.stopped.load(Ordering::Acquire) {
            return;
        }
        let store = Store { shared };
        let now = Instant::now();
        let cur = store.revision();
        samples.push_back((now, cur));
        let mut target = 0;
        if store.shared.cfg.auto_compaction_retention_revisions > 0 {
            target = cur - store.shared.cfg.auto_compaction_retention_revisions;
        }
        if let Some(keep) = store.shared.cfg.auto_compaction_retention {
            while samples.len() > 1
                && samples
                    .get(1)
                    .is_some_and(|(t, _)| now.duration_since(*t) >= keep)
            {
                samples.pop_front();
            }
            if let Some((t, r)) = samples.front()
                && now.duration_since(*t) >= keep
            {
                target = target.max(*r);
            }
        }
        if target > store.compact_revision() {
            match store.compact(target).await {
                Ok(_) => tracing::info!(revision = target, "auto-compacted"),
                Err(e) => tracing::warn!(revision = target, error = %e, "auto-compaction failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::KeyRange;

    #[tokio::test]
    async fn a_watch_refused_as_compacted_releases_its_prev_kv_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = StoreConfig {
            fsync: false,
            ..StoreConfig::default()
        };
        let store = Store::open(dir.path(), cfg).expect("open");
        for value in ["1", "2", "3"] {
            let put = PutRequest {
                key: Bytes::from_static(b"a"),
                value: Bytes::from_static(value.as_bytes()),
                ..PutRequest::default()
            };
            store.put(put).await.expect("put");
        }
        store.compact(3).await.expect("compact");
        let (stream, mut rx) = store.watch_stream();
        let spec = WatchSpec {
            range: KeyRange::single("a"),
            start_revision: 2,
            prev_kv: true,
            no_put: false,
            no_delete: false,
            progress_notify: false,
            watch_id: 0,
        };
        stream.create(spec).await.expect("create");
        assert!(matches!(
            rx.recv().await,
            Some(WatchMessage::Created { .. })
        ));
        assert!(matches!(
            rx.recv().await,
            Some(WatchMessage::Canceled { .. })
        ));
        // Otherwise every later write would read its previous value for nobody.
        assert!(!store.shared.hub.wants_prev_kv());
        store.close().await;
    }
}
