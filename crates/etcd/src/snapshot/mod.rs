//! etcd v3 snapshots, both ways: what `Maintenance.Snapshot` streams (and so
//! `etcdctl snapshot save` writes) is a bbolt file in etcd's own layout, which
//! `etcdctl snapshot status`/`restore` and a real etcd accept; and
//! [`restore`] turns an etcd snapshot (or a Meshwork database file) into a
//! new Meshwork data directory.
//!
//! etcd's layout (etcd 3.4, `mvcc/kvstore.go`, `lease/lessor.go`):
//!
//! | bucket | key | value |
//! | --- | --- | --- |
//! | `key` | revision: `main` (8 bytes BE) `_` `sub` (8 bytes BE), plus `t` for a tombstone | `mvccpb.KeyValue` (a tombstone holds only its key) |
//! | `lease` | lease id (8 bytes BE) | `leasepb.Lease {ID, TTL}` |
//! | `meta` | `consistent_index`, `finishedCompactRev`, `scheduledCompactRev` | index (8 bytes BE); revisions as above |
//! | `cluster` | `clusterVersion` | `3.4.0` |
//! | `alarm`, `auth`, `authRoles`, `authUsers`, `members`, `members_removed` | (empty) | |
//!
//! The stream etcd sends (and `etcdctl snapshot save` stores) is the
//! database followed by the SHA-256 of it; a file whose size is 32 bytes
//! past a multiple of 512 carries that trailer, and [`restore`] checks it
//! (as `etcdctl snapshot restore` does). A file without it (a copied
//! database) is accepted as `--skip-hash-check` would.

pub(crate) mod bolt;

use std::io::Read;
use std::path::Path;

use meshwork_store::{Change, Export, Imported, Importer, KeyValue, Revision, StoreError};
use prost::Message;
use sha2::{Digest, Sha256};

use crate::proto::mvccpb;
use bolt::{BoltError, BoltReader, BoltWriter, BucketWriter};

pub use bolt::BoltError as BoltFormatError;

/// The cluster version a snapshot says it was written by.
const CLUSTER_VERSION: &[u8] = b"3.4.0";

/// Why a snapshot could not be written or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing a file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The bbolt database is damaged or unsupported.
    #[error(transparent)]
    Bolt(#[from] BoltError),
    /// The store refused the data (or failed).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The trailing SHA-256 does not match the database.
    #[error(
        "snapshot file integrity check failed: its SHA-256 does not match (a damaged or truncated file)"
    )]
    HashMismatch,
    /// The database holds something etcd would not write.
    #[error("invalid etcd snapshot: {0}")]
    Invalid(String),
}

/// etcd's `leasepb.Lease`.
#[derive(Clone, PartialEq, prost::Message)]
struct LeasePb {
    #[prost(int64, tag = "1")]
    id: i64,
    #[prost(int64, tag = "2")]
    ttl: i64,
    #[prost(int64, tag = "3")]
    remaining_ttl: i64,
}

/// etcd's revision key: `main` BE, `_`, `sub` BE (and `t` for a tombstone).
fn revision_key(rev: Revision, tombstone: bool) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.extend_from_slice(&(rev.main as u64).to_be_bytes());
    k.push(b'_');
    k.extend_from_slice(&u64::from(rev.sub).to_be_bytes());
    if tombstone {
        k.push(b't');
    }
    k
}

fn parse_revision_key(k: &[u8]) -> Result<(Revision, bool), SnapshotError> {
    let bad = || SnapshotError::Invalid(format!("a revision key of {} bytes", k.len()));
    let tombstone = match k.len() {
        17 => false,
        18 if k[17] == b't' => true,
        _ => return Err(bad()),
    };
    if k[8] != b'_' {
        return Err(bad());
    }
    let word = |r: std::ops::Range<usize>| -> Result<u64, SnapshotError> {
        Ok(u64::from_be_bytes(k[r].try_into().map_err(|_| bad())?))
    };
    let main = i64::try_from(word(0..8)?).map_err(|_| bad())?;
    let sub = u32::try_from(word(9..17)?).map_err(|_| bad())?;
    Ok((Revision { main, sub }, tombstone))
}

/// What [`write`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// The revision the snapshot holds.
    pub revision: i64,
    /// Change records (revisions of keys) written.
    pub changes: u64,
    /// Size of the database file, bytes.
    pub size_bytes: u64,
}

/// Receives etcd's buckets in name order, each bucket's keys in order.
trait Sink {
    fn bucket(&mut self, name: &'static [u8]) -> Result<(), SnapshotError>;
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), SnapshotError>;
}

/// The `key` bucket record of a change: etcd's revision key and its
/// `mvccpb.KeyValue` (a tombstone holds only its key).
fn key_record(c: &Change, value: &mut Vec<u8>) -> Result<Vec<u8>, SnapshotError> {
    let kv = if c.tombstone {
        mvccpb::KeyValue {
            key: c.kv.key.clone(),
            ..Default::default()
        }
    } else {
        mvccpb::KeyValue {
            key: c.kv.key.clone(),
            create_revision: c.kv.create_revision,
            mod_revision: c.revision.main,
            version: c.kv.version,
            value: c.kv.value.clone(),
            lease: c.kv.lease,
        }
    };
    value.clear();
    kv.encode(value)
        .map_err(|e| SnapshotError::Invalid(e.to_string()))?;
    Ok(revision_key(c.revision, c.tombstone))
}

/// Walks `export` as etcd's buckets into `sink`; returns the change count.
fn emit(export: &Export, sink: &mut dyn Sink) -> Result<u64, SnapshotError> {
    for name in [&b"alarm"[..], b"auth", b"authRoles", b"authUsers"] {
        sink.bucket(name)?;
    }
    sink.bucket(b"cluster")?;
    sink.put(b"clusterVersion", CLUSTER_VERSION)?;
    sink.bucket(b"key")?;
    let mut changes = 0u64;
    let mut failed: Option<SnapshotError> = None;
    let mut value = Vec::new();
    let walked = export.for_each_change(|c| {
        let step = key_record(&c, &mut value).and_then(|k| sink.put(&k, &value));
        if let Err(e) = step {
            failed = Some(e);
            return Err(StoreError::Storage("writing the snapshot failed".into()));
        }
        changes += 1;
        Ok(())
    });
    if let Err(e) = walked {
        return Err(failed.take().unwrap_or(SnapshotError::Store(e)));
    }
    sink.bucket(b"lease")?;
    let mut rows = export.leases()?;
    rows.sort_by_key(|(id, _)| *id as u64);
    for (id, ttl) in rows {
        let v = LeasePb {
            id,
            ttl,
            remaining_ttl: 0,
        }
        .encode_to_vec();
        sink.put(&(id as u64).to_be_bytes(), &v)?;
    }
    sink.bucket(b"members")?;
    sink.bucket(b"members_removed")?;
    sink.bucket(b"meta")?;
    sink.put(CONSISTENT_INDEX, &(export.revision() as u64).to_be_bytes())?;
    let compact = export.compact_revision();
    if compact > 0 {
        let rev = revision_key(
            Revision {
                main: compact,
                sub: 0,
            },
            false,
        );
        sink.put(b"finishedCompactRev", &rev)?;
        sink.put(b"scheduledCompactRev", &rev)?;
    }
    Ok(changes)
}

/// The meta key etcd leaves out of `Hash` (it differs between members).
const CONSISTENT_INDEX: &[u8] = b"consistent_index";

/// Writes pages: one bucket at a time.
struct BoltSink {
    w: BoltWriter,
    current: Option<(&'static [u8], BucketWriter)>,
    roots: Vec<(&'static [u8], u64)>,
}

impl BoltSink {
    fn close_bucket(&mut self) -> Result<(), SnapshotError> {
        if let Some((name, b)) = self.current.take() {
            let root = self.w.finish_bucket(b)?;
            self.roots.push((name, root));
        }
        Ok(())
    }
}

impl Sink for BoltSink {
    fn bucket(&mut self, name: &'static [u8]) -> Result<(), SnapshotError> {
        self.close_bucket()?;
        self.current = Some((name, BucketWriter::default()));
        Ok(())
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), SnapshotError> {
        let Some((_, b)) = self.current.as_mut() else {
            return Err(SnapshotError::Invalid("a key outside any bucket".into()));
        };
        Ok(self.w.put(b, key, value, 0)?)
    }
}

/// Writes `export` to `path` (which must not exist) as an etcd snapshot
/// database (without the SHA-256 trailer: the stream adds it).
pub fn write(export: &Export, path: &Path) -> Result<Written, SnapshotError> {
    let mut sink = BoltSink {
        w: BoltWriter::create(path)?,
        current: None,
        roots: Vec::new(),
    };
    let changes = emit(export, &mut sink)?;
    sink.close_bucket()?;
    let size_bytes = sink.w.finish(&sink.roots)?;
    Ok(Written {
        revision: export.revision(),
        changes,
        size_bytes,
    })
}

/// The CRC-32C (Castagnoli) etcd's hashes use.
struct Crc32c(u32);

impl Crc32c {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };

    fn new() -> Self {
        Self(!0)
    }

    fn update(&mut self, bytes: &[u8]) {
        let mut c = self.0;
        for b in bytes {
            c = Self::TABLE[((c ^ u32::from(*b)) & 0xff) as usize] ^ (c >> 8);
        }
        self.0 = c;
    }

    fn sum(&self) -> u32 {
        !self.0
    }
}

/// Feeds every bucket name and key-value to a CRC-32C, as etcd's backend
/// `Hash` does, leaving out `meta/consistent_index`.
struct HashSink {
    crc: Crc32c,
    bucket: &'static [u8],
}

impl Sink for HashSink {
    fn bucket(&mut self, name: &'static [u8]) -> Result<(), SnapshotError> {
        self.bucket = name;
        self.crc.update(name);
        Ok(())
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), SnapshotError> {
        if !(self.bucket == b"meta" && key == CONSISTENT_INDEX) {
            self.crc.update(key);
            self.crc.update(value);
        }
        Ok(())
    }
}

/// etcd's `Hash`: a CRC-32C over every bucket of the database as the
/// snapshot lays it out (so it changes with any change to the store). It
/// compares members of one store implementation; across implementations
/// compare [`hash_kv`].
pub fn hash(export: &Export) -> Result<u32, SnapshotError> {
    let mut sink = HashSink {
        crc: Crc32c::new(),
        bucket: b"",
    };
    emit(export, &mut sink)?;
    Ok(sink.crc.sum())
}

/// etcd's `HashKV` at `revision` (at most the export's revision, above its
/// compaction revision): a CRC-32C of the name `key` and then every change
/// record up to `revision` as etcd stores it (revision key, then
/// `mvccpb.KeyValue`), which is what etcd hashes (`mvcc.HashByRev`). A
/// record at or below the compaction revision counts only if a compaction
/// at `revision` would keep it (it is its key's newest record up to
/// `revision`, and not a tombstone), so that members which compacted at
/// different times agree. Two stores with the same history agree,
/// whichever implementation they run.
pub fn hash_kv(export: &Export, revision: i64) -> Result<u32, SnapshotError> {
    let compact = export.compact_revision();
    // etcd's `kvindex.Keep(revision)`: per key, the newest revision up to
    // `revision` unless it is a tombstone. Only needed below the compaction.
    let mut newest: std::collections::HashMap<bytes::Bytes, (Revision, bool)> =
        std::collections::HashMap::new();
    if compact > 0 {
        export.for_each_change(|c| {
            if c.revision.main <= revision {
                newest.insert(c.kv.key.clone(), (c.revision, c.tombstone));
            }
            Ok(())
        })?;
    }
    let keep_any = newest.values().any(|(_, tomb)| !tomb);
    let kept = |c: &Change| {
        newest
            .get(&c.kv.key)
            .is_some_and(|(r, tomb)| !tomb && *r == c.revision)
    };
    let mut crc = Crc32c::new();
    crc.update(b"key");
    let mut value = Vec::new();
    let mut failed: Option<SnapshotError> = None;
    let walked = export.for_each_change(|c| {
        if c.revision.main > revision || (c.revision.main <= compact && keep_any && !kept(&c)) {
            return Ok(());
        }
        match key_record(&c, &mut value) {
            Ok(k) => {
                crc.update(&k);
                crc.update(&value);
                Ok(())
            }
            Err(e) => {
                failed = Some(e);
                Err(StoreError::Storage("hashing failed".into()))
            }
        }
    });
    if let Err(e) = walked {
        return Err(failed.take().unwrap_or(SnapshotError::Store(e)));
    }
    Ok(crc.sum())
}

/// The database length of a snapshot file and whether a SHA-256 trailer
/// was found (and checked).
fn check_trailer(file: &Path) -> Result<(u64, bool), SnapshotError> {
    let size = std::fs::metadata(file)?.len();
    if size % 512 != 32 {
        return Ok((size, false));
    }
    let db_len = size - 32;
    let mut f = std::fs::File::open(file)?;
    let mut hasher = Sha256::new();
    let mut left = db_len;
    let mut buf = vec![0u8; 1 << 16];
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        f.read_exact(&mut buf[..n])?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    let mut want = [0u8; 32];
    f.read_exact(&mut want)?;
    if hasher.finalize().as_slice() != want {
        return Err(SnapshotError::HashMismatch);
    }
    Ok((db_len, true))
}

/// Which kind of snapshot [`restore`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// An etcd (bbolt) snapshot, from etcd or from Meshwork.
    Etcd,
    /// A Meshwork (redb) database file.
    Meshwork,
}

/// What [`restore`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// The kind of file read.
    pub kind: SnapshotKind,
    /// Whether a SHA-256 trailer was present and matched.
    pub hash_checked: bool,
    /// What the new store holds.
    pub imported: Imported,
}

/// Writes a new Meshwork data directory `dir` (which must not hold a store)
/// from `file`: an etcd snapshot (from `etcdctl snapshot save` against etcd
/// or Meshwork) or a Meshwork database file. Start a node on `dir`
/// afterwards.
pub fn restore(file: &Path, dir: &Path) -> Result<Restored, SnapshotError> {
    let (db_len, hash_checked) = check_trailer(file)?;
    match BoltReader::open(file, db_len) {
        Ok(reader) => {
            let imported = restore_etcd(&reader, dir)?;
            Ok(Restored {
                kind: SnapshotKind::Etcd,
                hash_checked,
                imported,
            })
        }
        Err(BoltError::Format(bolt_err)) => match meshwork_store::import_redb(file, dir) {
            Ok(imported) => Ok(Restored {
                kind: SnapshotKind::Meshwork,
                hash_checked,
                imported,
            }),
            Err(StoreError::InvalidArgument(m)) if m.contains("already holds a store") => {
                Err(StoreError::InvalidArgument(m).into())
            }
            Err(e) => Err(SnapshotError::Invalid(format!(
                "{} is neither an etcd snapshot ({bolt_err}) nor a Meshwork database ({e})",
                file.display()
            ))),
        },
        Err(e) => Err(e.into()),
    }
}

fn restore_etcd(reader: &BoltReader, dir: &Path) -> Result<Imported, SnapshotError> {
    let mut compact = 0i64;
    if let Some(meta) = reader.bucket(b"meta")? {
        reader.for_each(&meta, &mut |k, v, _| {
            if k == b"finishedCompactRev" {
                compact = parse_revision_key(v)
                    .map_err(|e| BoltError::Format(e.to_string()))?
                    .0
                    .main;
            }
            Ok(())
        })?;
    }
    let mut leases = Vec::new();
    if let Some(lb) = reader.bucket(b"lease")? {
        reader.for_each(&lb, &mut |_, v, _| {
            let l = LeasePb::decode(v)
                .map_err(|e| BoltError::Format(format!("a lease record: {e}")))?;
            leases.push((l.id, l.ttl));
            Ok(())
        })?;
    }
    let mut importer = Importer::create(dir)?;
    let mut failed: Option<SnapshotError> = None;
    if let Some(kb) = reader.bucket(b"key")? {
        let walked = reader.for_each(&kb, &mut |k, v, _| {
            let mut step = || -> Result<(), SnapshotError> {
                let (revision, tombstone) = parse_revision_key(k)?;
                let kv = mvccpb::KeyValue::decode(v).map_err(|e| {
                    SnapshotError::Invalid(format!(
                        "the key-value at revision {}: {e}",
                        revision.main
                    ))
                })?;
                let kv = if tombstone {
                    KeyValue {
                        key: kv.key,
                        mod_revision: revision.main,
                        ..Default::default()
                    }
                } else {
                    KeyValue {
                        key: kv.key,
                        create_revision: kv.create_revision,
                        mod_revision: revision.main,
                        version: kv.version,
                        value: kv.value,
                        lease: kv.lease,
                    }
                };
                importer.change(Change {
                    revision,
                    tombstone,
                    kv,
                })?;
                Ok(())
            };
            step().map_err(|e| {
                let msg = e.to_string();
                failed = Some(e);
                BoltError::Format(msg)
            })
        });
        if let Err(e) = walked {
            return Err(failed.take().unwrap_or(SnapshotError::Bolt(e)));
        }
    }
    // A lease that expired in the snapshot's world but is still listed
    // keeps its keys until the restored store's lessor revokes it, as etcd
    // does after a restore.
    Ok(importer.finish(&leases, compact)?)
}

#[cfg(test)]
mod tests;
