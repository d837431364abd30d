//! Moving a store's contents in and out, whole: a consistent read view for
//! export ([`Export`], from [`Store::export`](crate::Store::export)) and the
//! offline import that writes a fresh data directory ([`import`]).
//!
//! The store knows nothing of other formats: `meshwork-etcd` turns an export
//! into an etcd (bbolt) snapshot and an etcd snapshot into an import. What
//! moves is exactly what recovery rebuilds the store from: every change
//! record still held (revision, tombstone or key-value), the leases with
//! their TTLs, the revision and the compaction revision.
//!
//! Invariants: an export sees one committed revision and nothing after it
//! (one redb read transaction); an import only ever creates a data
//! directory, never writes into one that holds a store, and its result is
//! durable before it returns.

use std::path::Path;

use redb::{Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable};

use crate::codec;
use crate::error::{Result, StoreError};
use crate::store::{
    DB_FILE, KV, LEASES, META, META_CHECKPOINT_LSN, META_COMPACT, META_REV, create_tables,
    meta_revisions,
};
use crate::types::{KeyValue, Revision};

/// One change record: a key-value written at `revision`, or a tombstone
/// (`tombstone`, with only `kv.key` meaningful).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Where it happened (`kv.mod_revision == revision.main`).
    pub revision: Revision,
    /// A deletion.
    pub tombstone: bool,
    /// The key-value (for a tombstone: the key).
    pub kv: KeyValue,
}

/// A consistent view of a store's contents at one revision.
pub struct Export {
    rtx: ReadTransaction,
    revision: i64,
    compact_revision: i64,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("revision", &self.revision)
            .field("compact_revision", &self.compact_revision)
            .finish_non_exhaustive()
    }
}

impl Export {
    pub(crate) fn new(rtx: ReadTransaction) -> Result<Self> {
        let (revision, compact_revision) = meta_revisions(&rtx)?;
        Ok(Self {
            rtx,
            revision,
            compact_revision,
        })
    }

    /// The revision the view holds.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The compaction revision (0: never compacted).
    pub fn compact_revision(&self) -> i64 {
        self.compact_revision
    }

    /// Calls `f` with every change record, in revision order.
    pub fn for_each_change(&self, mut f: impl FnMut(Change) -> Result<()>) -> Result<()> {
        let kv = self.rtx.open_table(KV).map_err(StoreError::storage)?;
        for item in kv.iter().map_err(StoreError::storage)? {
            let (k, v) = item.map_err(StoreError::storage)?;
            let (main, sub) = k.value();
            let revision = Revision {
                main: i64::try_from(main).map_err(StoreError::storage)?,
                sub,
            };
            let rec = codec::decode(revision, v.value())?;
            f(Change {
                revision,
                tombstone: rec.tombstone,
                kv: rec.kv,
            })?;
        }
        Ok(())
    }

    /// The leases: `(id, ttl_secs)`, by id.
    pub fn leases(&self) -> Result<Vec<(i64, i64)>> {
        let t = self.rtx.open_table(LEASES).map_err(StoreError::storage)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(StoreError::storage)? {
            let (k, v) = item.map_err(StoreError::storage)?;
            out.push((k.value(), v.value()));
        }
        Ok(out)
    }
}

/// Change records written per storage transaction during an import.
const IMPORT_BATCH: usize = 10_000;

/// What an import wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    /// The store's revision.
    pub revision: i64,
    /// Its compaction revision.
    pub compact_revision: i64,
    /// Change records written.
    pub changes: u64,
    /// Leases written.
    pub leases: u64,
}

/// Writes a new store into a data directory, change by change (see
/// [`import`] for the one-call form). Memory is bounded by one batch.
pub struct Importer {
    db: Database,
    batch: Vec<((u64, u32), Vec<u8>)>,
    last: Option<Revision>,
    revision: i64,
    changes: u64,
}

impl std::fmt::Debug for Importer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Importer")
            .field("revision", &self.revision)
            .field("changes", &self.changes)
            .finish_non_exhaustive()
    }
}

impl Importer {
    /// Starts a store in `dir`; refuses a directory that already holds one.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Storage(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(DB_FILE);
        if path.exists() || dir.join("wal").exists() {
            return Err(StoreError::InvalidArgument(format!(
                "{} already holds a store: restore into an empty directory",
                dir.display()
            )));
        }
        let db = Database::create(&path)
            .map_err(|e| StoreError::Storage(format!("creating {}: {e}", path.display())))?;
        create_tables(&db)?;
        Ok(Self {
            db,
            batch: Vec::with_capacity(IMPORT_BATCH),
            last: None,
            revision: 1,
            changes: 0,
        })
    }

    /// Adds one change; they must come in revision order, each once.
    pub fn change(&mut self, c: Change) -> Result<()> {
        check_change(&c, self.last)?;
        self.last = Some(c.revision);
        self.revision = self.revision.max(c.revision.main);
        let mut buf = Vec::new();
        codec::encode(&mut buf, c.tombstone, &c.kv);
        let main = u64::try_from(c.revision.main).map_err(StoreError::storage)?;
        self.batch.push(((main, c.revision.sub), buf));
        self.changes += 1;
        if self.batch.len() >= IMPORT_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let mut wtx = self.db.begin_write().map_err(StoreError::storage)?;
        wtx.set_durability(Durability::None)
            .map_err(StoreError::storage)?;
        {
            let mut kv = wtx.open_table(KV).map_err(StoreError::storage)?;
            for (k, v) in self.batch.drain(..) {
                kv.insert(k, v.as_slice()).map_err(StoreError::storage)?;
            }
        }
        wtx.commit().map_err(StoreError::storage)
    }

    /// Writes the leases (`(id, ttl_secs)`) and the compaction revision,
    /// and makes everything durable. The store's revision is the highest
    /// change's (at least 1).
    pub fn finish(mut self, leases: &[(i64, i64)], compact_revision: i64) -> Result<Imported> {
        self.flush()?;
        let revision = self.revision;
        if compact_revision < 0 || compact_revision > revision {
            return Err(StoreError::InvalidArgument(format!(
                "compaction revision {compact_revision} is outside 0..={revision}"
            )));
        }
        let mut wtx = self.db.begin_write().map_err(StoreError::storage)?;
        wtx.set_durability(Durability::Immediate)
            .map_err(StoreError::storage)?;
        {
            let mut t = wtx.open_table(LEASES).map_err(StoreError::storage)?;
            for (id, ttl) in leases {
                if *id <= 0 || *ttl <= 0 {
                    return Err(StoreError::InvalidArgument(format!(
                        "lease {id} with TTL {ttl}: ids and TTLs are positive"
                    )));
                }
                t.insert(*id, *ttl).map_err(StoreError::storage)?;
            }
            let mut meta = wtx.open_table(META).map_err(StoreError::storage)?;
            meta.insert(META_REV, revision)
                .map_err(StoreError::storage)?;
            meta.insert(META_COMPACT, compact_revision)
                .map_err(StoreError::storage)?;
            meta.insert(META_CHECKPOINT_LSN, 0)
                .map_err(StoreError::storage)?;
        }
        wtx.commit().map_err(StoreError::storage)?;
        Ok(Imported {
            revision,
            compact_revision,
            changes: self.changes,
            leases: leases.len() as u64,
        })
    }
}

/// Writes a new store into `dir` from `changes` (in revision order),
/// `leases` (`(id, ttl_secs)`) and the compaction revision; the store's
/// revision is the highest change's (at least 1). Refuses a directory that
/// already holds a store, a change out of order, and a key-value whose
/// revisions do not fit its place. Open the result with
/// [`Store::open`](crate::Store::open).
pub fn import(
    dir: &Path,
    changes: impl IntoIterator<Item = Change>,
    leases: &[(i64, i64)],
    compact_revision: i64,
) -> Result<Imported> {
    let mut im = Importer::create(dir)?;
    for c in changes {
        im.change(c)?;
    }
    im.finish(leases, compact_revision)
}

fn check_change(c: &Change, last: Option<Revision>) -> Result<()> {
    let bad = |why: &str| {
        Err(StoreError::InvalidArgument(format!(
            "change at revision {}.{}: {why}",
            c.revision.main, c.revision.sub
        )))
    };
    if c.revision.main < 2 {
        return bad("revisions start at 2");
    }
    if last.is_some_and(|l| (l.main, l.sub) >= (c.revision.main, c.revision.sub)) {
        return bad("changes must come in revision order, each once");
    }
    if c.kv.key.is_empty() {
        return bad("the key is empty");
    }
    if !c.tombstone
        && (c.kv.create_revision < 1
            || c.kv.create_revision > c.revision.main
            || c.kv.version < 1
            || c.kv.lease < 0)
    {
        return bad("its create revision, version or lease does not fit");
    }
    Ok(())
}

/// Writes a new store into `dir` from a Meshwork database file (a copy of a
/// data directory's `meshwork.redb`, or a snapshot Meshwork streamed before
/// it spoke etcd's format). Reads it whole, so a damaged file is refused.
pub fn import_redb(file: &Path, dir: &Path) -> Result<Imported> {
    let src = Database::open(file)
        .map_err(|e| StoreError::InvalidArgument(format!("{}: {e}", file.display())))?;
    let rtx = src.begin_read().map_err(StoreError::storage)?;
    let export = Export::new(rtx)?;
    let mut im = Importer::create(dir)?;
    export.for_each_change(|c| im.change(c))?;
    im.finish(&export.leases()?, export.compact_revision())
}
