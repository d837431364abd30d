//! Optional persistence (a cache: off by default): the keyspace written to one file
//! when the node stops, read back when it starts.
//!
//! The file is `MWCACHE` and a version byte, then one record per key — database
//! (u8), key, expiry (u64 ms since the epoch, 0 for none), type (u8) and value —
//! then 0xFF and a CRC-32 of everything before. Lengths are u32 and numbers
//! little-endian. It is written to a temporary file, synced, renamed over the old
//! one and the directory synced: a crash while saving leaves the previous snapshot.
//! A file that does not check is moved aside (never deleted) and the node starts
//! empty.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::db::{Entry, Keyspace, Value};

const MAGIC: &[u8; 8] = b"MWCACHE\x01";
const END: u8 = 0xFF;

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing the file failed.
    #[error("cache snapshot {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a snapshot this version reads, or is damaged.
    #[error("cache snapshot {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What does not check.
        reason: String,
    },
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn encode(out: &mut Vec<u8>, db: u8, key: &[u8], e: &Entry) {
    out.push(db);
    put_bytes(out, key);
    out.extend_from_slice(&e.expire_at().unwrap_or(0).to_le_bytes());
    match &e.value {
        Value::Str(b) => {
            out.push(0);
            put_bytes(out, b);
        }
        Value::List(l) => {
            out.push(1);
            out.extend_from_slice(&(l.len() as u32).to_le_bytes());
            for b in l {
                put_bytes(out, b);
            }
        }
        Value::Hash(h) => {
            out.push(2);
            out.extend_from_slice(&(h.len() as u32).to_le_bytes());
            for (k, v) in h.iter() {
                put_bytes(out, k);
                put_bytes(out, v);
            }
        }
        Value::Set(s) => {
            out.push(3);
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            for b in s.iter() {
                put_bytes(out, b);
            }
        }
        Value::ZSet(z) => {
            out.push(4);
            out.extend_from_slice(&(z.len() as u32).to_le_bytes());
            for (m, s) in z.iter() {
                out.extend_from_slice(&s.to_bits().to_le_bytes());
                put_bytes(out, m);
            }
        }
    }
}

/// Writes every live key of `ks` to `path` (atomically: temporary file, fsync,
/// rename, fsync of the directory); the number of keys written.
pub fn save(ks: &Keyspace, path: &Path, now: u64) -> Result<usize, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    };
    let mut out = MAGIC.to_vec();
    let mut keys = 0;
    for (i, db) in ks.dbs().iter().enumerate() {
        for sh in db.lock_all() {
            for (k, e) in sh.entries() {
                if e.expire_at().is_none_or(|t| t > now) {
                    encode(&mut out, i as u8, k, e);
                    keys += 1;
                }
            }
        }
    }
    out.push(END);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&out).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(keys)
}

/// A cursor over the snapshot's bytes.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|s| s.try_into().ok())
            .map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
    }
    fn bytes(&mut self) -> Option<Bytes> {
        let n = self.u32()? as usize;
        self.take(n).map(Bytes::copy_from_slice)
    }
    /// A count of items each at least `min` bytes: refused when the rest of the
    /// file cannot hold them (a damaged count never reserves gigabytes).
    fn count(&mut self, min: usize) -> Option<usize> {
        let n = self.u32()? as usize;
        (n.checked_mul(min)? <= self.b.len() - self.at).then_some(n)
    }
}

fn decode(r: &mut Reader<'_>) -> Option<(u8, Bytes, Option<u64>, Value)> {
    let db = r.u8()?;
    let key = r.bytes()?;
    let exp = r.u64()?;
    let value = match r.u8()? {
        0 => Value::Str(r.bytes()?),
        1 => {
            let n = r.count(4)?;
            let mut l = std::collections::VecDeque::with_capacity(n);
            for _ in 0..n {
                l.push_back(r.bytes()?);
            }
            Value::List(l)
        }
        2 => {
            let n = r.count(8)?;
            let mut h = indexmap::IndexMap::with_capacity(n);
            for _ in 0..n {
                let k = r.bytes()?;
                h.insert(k, r.bytes()?);
            }
            Value::Hash(Box::new(h))
        }
        3 => {
            let n = r.count(4)?;
            let mut s = indexmap::IndexSet::with_capacity(n);
            for _ in 0..n {
                s.insert(r.bytes()?);
            }
            Value::Set(Box::new(s))
        }
        4 => {
            let n = r.count(12)?;
            let mut z = crate::zset::ZSet::default();
            for _ in 0..n {
                let s = f64::from_bits(r.u64()?);
                if s.is_nan() {
                    return None;
                }
                z.insert(r.bytes()?, s);
            }
            Value::ZSet(Box::new(z))
        }
        _ => return None,
    };
    Some((db, key, (exp != 0).then_some(exp), value))
}

/// Loads `path` into `ks` (keys already past their expiry skipped); the number of
/// keys loaded, 0 when there is no file. A file that does not check is renamed
/// `<path>.corrupt-<ms>` and reported; nothing is loaded from it.
pub fn load(ks: &Keyspace, path: &Path, now: u64) -> Result<usize, SnapshotError> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(SnapshotError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let corrupt = |reason: &str| {
        let aside = PathBuf::from(format!("{}.corrupt-{now}", path.display()));
        let _ = std::fs::rename(path, &aside);
        SnapshotError::Corrupt {
            path: path.to_owned(),
            reason: format!("{reason} (moved to {})", aside.display()),
        }
    };
    if data.len() < MAGIC.len() + 5 || !data.starts_with(MAGIC) {
        return Err(corrupt("not a cache snapshot of this version"));
    }
    let (body, crc) = data.split_at(data.len() - 4);
    let crc = u32::from_le_bytes(crc.try_into().unwrap_or_default());
    if crc32fast::hash(body) != crc || body.last() != Some(&END) {
        return Err(corrupt("checksum mismatch (truncated or damaged)"));
    }
    let records = &body[MAGIC.len()..body.len() - 1];
    let mut r = Reader { b: records, at: 0 };
    let mut parsed = Vec::new();
    while r.at < records.len() {
        match decode(&mut r) {
            Some(rec) if (rec.0 as usize) < ks.dbs().len() => parsed.push(rec),
            _ => return Err(corrupt(&format!("bad record at byte {}", r.at))),
        }
    }
    let mut loaded = 0;
    for (db, key, exp, value) in parsed {
        if exp.is_some_and(|t| t <= now) {
            continue;
        }
        if let Some(d) = ks.db(db as usize) {
            d.lock(&key).insert(key.clone(), Entry::new(value, exp));
            loaded += 1;
        }
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_type_round_trips_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        let ks = Keyspace::new(4);
        let now = 1_000_000;
        let d0 = ks.db(0).unwrap();
        d0.lock(b"s").insert(
            Bytes::from_static(b"s"),
            Entry::new(Value::Str(Bytes::from_static(b"v")), Some(now + 60_000)),
        );
        d0.lock(b"gone").insert(
            Bytes::from_static(b"gone"),
            Entry::new(Value::Str(Bytes::from_static(b"x")), Some(now - 1)),
        );
        let mut z = crate::zset::ZSet::default();
        z.insert(Bytes::from_static(b"m"), 1.5);
        let d3 = ks.db(3).unwrap();
        d3.lock(b"z").insert(
            Bytes::from_static(b"z"),
            Entry::new(Value::ZSet(Box::new(z)), None),
        );
        let l: std::collections::VecDeque<Bytes> =
            [Bytes::from_static(b"a"), Bytes::from_static(b"b")].into();
        d3.lock(b"l")
            .insert(Bytes::from_static(b"l"), Entry::new(Value::List(l), None));
        assert_eq!(save(&ks, &path, now).unwrap(), 3);

        let back = Keyspace::new(2);
        assert_eq!(load(&back, &path, now).unwrap(), 3);
        let mut sh = back.db(0).unwrap().lock(b"s");
        let e = sh.get(b"s", now).unwrap();
        assert_eq!(e.value, Value::Str(Bytes::from_static(b"v")));
        assert_eq!(e.expire_at(), Some(now + 60_000));
        drop(sh);
        let mut sh = back.db(3).unwrap().lock(b"z");
        assert_eq!(sh.get(b"z", now).unwrap().value.type_name(), "zset");
        drop(sh);
        // Expired by the time it loads: skipped.
        assert_eq!(load(&Keyspace::new(1), &path, now + 120_000).unwrap(), 2);

        // One flipped byte: refused, the file kept aside, nothing loaded.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[12] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let fresh = Keyspace::new(1);
        assert!(matches!(
            load(&fresh, &path, now),
            Err(SnapshotError::Corrupt { .. })
        ));
        assert_eq!(fresh.db(0).unwrap().len(), 0);
        assert!(!path.exists());
        let aside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(aside.len(), 1);
        // No file: nothing to load.
        assert_eq!(load(&fresh, &path, now).unwrap(), 0);
    }
}
