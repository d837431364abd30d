//! Opening a data directory: the redb file and its tables, the alarms, the
//! write-ahead log replayed into redb past the last checkpoint, then the index and
//! the lessor rebuilt from redb. Nothing here runs once the store is open.
//!
//! Recovery rebuilds the index by scanning the revision table in order, so the
//! index and the disk cannot disagree.

use std::path::Path;

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable};
use tokio::time::Instant;

use super::leases::resume_leases;
use super::{DB_FILE, KV, LEASES, META, META_CHECKPOINT_LSN, META_REV, meta_revisions};
use crate::alarm::Alarms;
use crate::codec;
use crate::config::StoreConfig;
use crate::error::{Result, StoreError};
use crate::index::{Entry, Index};
use crate::lease::Lessor;
use crate::types::Revision;
use crate::wal::{self, Wal};

const WAL_DIR: &str = "wal";

/// What a data directory holds, recovered and ready to serve.
pub(super) struct Recovered {
    pub(super) db: Database,
    pub(super) alarms: Alarms,
    /// The write-ahead log, replayed and open for appending.
    pub(super) wal: Wal,
    pub(super) index: Index,
    pub(super) lessor: Lessor,
    /// The last durable revision.
    pub(super) revision: i64,
    pub(super) compact_revision: i64,
    /// Leases whose time ran out while the store was closed, marked expiring.
    pub(super) expired_while_closed: Vec<i64>,
}

/// Opens (or creates) the database in `dir` and recovers the store's state from it.
pub(super) fn from_disk(dir: &Path, cfg: &StoreConfig) -> Result<Recovered> {
    let started = std::time::Instant::now();
    let db = Database::builder()
        .set_cache_size(cfg.cache_bytes)
        .create(dir.join(DB_FILE))
        .map_err(|e| {
            StoreError::Storage(format!("opening {}: {e}", dir.join(DB_FILE).display()))
        })?;
    create_tables(&db)?;
    let alarms = Alarms::load(dir)?;
    let wal = replay_wal(&db, dir, cfg)?;
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
    let expired_while_closed = resume_leases(&mut lessor, dir, cfg, now);
    tracing::info!(
        revision = rev,
        compact_revision = compact,
        keys = index.len(),
        leases = lessor.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "store recovered"
    );
    Ok(Recovered {
        db,
        alarms,
        wal,
        index,
        lessor,
        revision: rev,
        compact_revision: compact,
        expired_while_closed,
    })
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
fn replay_wal(db: &Database, dir: &Path, cfg: &StoreConfig) -> Result<Wal> {
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
    let (mut rev, compact) = meta_revisions(&rtx)?;
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
