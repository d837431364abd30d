//! Maintenance (etcd's Status, Snapshot, Defragment) and export: whole-database
//! operations beside the KV path. A snapshot or an export is one read transaction,
//! so it holds one revision and nothing after it.

use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::{DB_FILE, KV, LEASES, META, META_REV, Snapshot, Status, Store};
use crate::alarm::{Alarm, AlarmMember};
use crate::error::{Result, StoreError};

impl Store {
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
            // In use can never exceed the file: stats count pages, the file is the truth.
            db_size_in_use_bytes: in_use.min(db_size),
            keys,
            leases,
            watchers,
            alarms,
        }
    }

    /// A read transaction on the open database (`Stopped` once closed).
    fn begin_read(&self) -> Result<redb::ReadTransaction> {
        let db = self.shared.db.read();
        db.as_ref()
            .ok_or(StoreError::Stopped)?
            .begin_read()
            .map_err(StoreError::storage)
    }

    /// Writes a consistent copy of the database into the data directory.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let rtx = self.begin_read()?;
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
        copy_table(&rtx, &wtx, KV)?;
        copy_table(&rtx, &wtx, LEASES)?;
        copy_table(&rtx, &wtx, META)?;
        wtx.commit().map_err(StoreError::storage)?;
        drop(out);
        Ok(Snapshot { path, revision })
    }

    /// A consistent view of the whole store at its current revision, for
    /// export (`meshwork-etcd` writes etcd snapshots from it).
    pub fn export(&self) -> Result<crate::export::Export> {
        let rtx = self.begin_read()?;
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
}

/// Copies every row of `table` from a read transaction into a write
/// transaction of another database.
fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    rtx: &redb::ReadTransaction,
    wtx: &redb::WriteTransaction,
    table: redb::TableDefinition<K, V>,
) -> Result<()> {
    let from = rtx.open_table(table).map_err(StoreError::storage)?;
    let mut to = wtx.open_table(table).map_err(StoreError::storage)?;
    for item in from.iter().map_err(StoreError::storage)? {
        let (k, v) = item.map_err(StoreError::storage)?;
        to.insert(k.value(), v.value())
            .map_err(StoreError::storage)?;
    }
    Ok(())
}
