//! The bbolt file format (the embedded B+tree database under etcd), as far
//! as a snapshot needs it: a writer that streams sorted buckets into a new
//! file, and a reader that walks the buckets of an existing one.
//!
//! Layout (little endian, page size 4096 here): every page starts with a
//! 16-byte header `id u64 | flags u16 | count u16 | overflow u32` (a page
//! and its `overflow` following pages are one extent). Pages 0 and 1 are
//! meta pages (`magic 0xED0CDAED | version 2 | page size | flags | root
//! bucket {root pgid, sequence} | freelist pgid | high-water pgid | txid |
//! FNV-1a 64 checksum of the preceding 56 bytes`); the valid one with the
//! higher txid is current. Leaf pages hold `count` 16-byte elements
//! `flags u32 | pos u32 | ksize u32 | vsize u32` (`pos` counted from the
//! element itself) then keys and values; branch pages hold `pos u32 |
//! ksize u32 | child pgid u64` elements then keys (each child's first key).
//! A nested bucket is a leaf element with flag 1 whose value is its header
//! `{root pgid, sequence}`, followed by an inline leaf page when root is 0.
//!
//! The writer lays pages out once, in order (freelist empty, meta pages
//! last), as a compacted bbolt file; readers of the file (bbolt, etcd,
//! etcdctl) see an ordinary database. The reader treats the file as
//! untrusted: every offset is bounds-checked, depth is limited, and damage
//! is an error, never a panic.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Page size written (and the usual one read).
pub(crate) const PAGE_SIZE: usize = 4096;
const PAGE_HEADER: usize = 16;
const ELEMENT: usize = 16;
const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
const BRANCH_PAGE: u16 = 0x01;
const LEAF_PAGE: u16 = 0x02;
const META_PAGE: u16 = 0x04;
const FREELIST_PAGE: u16 = 0x10;
/// Leaf element flag: the value is a nested bucket.
pub(crate) const BUCKET_LEAF: u32 = 0x01;
const FREELIST_PGID: u64 = 2;
/// The deepest tree the reader follows (bbolt trees of any real size are a
/// handful of levels; deeper means a cycle or damage).
const MAX_DEPTH: usize = 64;
/// The largest page size the reader accepts.
const MAX_PAGE_SIZE: u32 = 1 << 20;

/// A damaged or unsupported bbolt file.
#[derive(Debug, thiserror::Error)]
pub enum BoltError {
    /// Reading or writing the file failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The file is not a bbolt database we can read, or is damaged.
    #[error("not a valid bbolt database: {0}")]
    Format(String),
}

fn format(msg: impl Into<String>) -> BoltError {
    BoltError::Format(msg.into())
}

/// bbolt's meta checksum: FNV-1a 64 (the `fnv` crate's hasher, fed raw bytes).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut h, bytes);
    std::hash::Hasher::finish(&h)
}

fn page_header(id: u64, flags: u16, count: u16, overflow: u32) -> [u8; PAGE_HEADER] {
    let mut h = [0u8; PAGE_HEADER];
    h[0..8].copy_from_slice(&id.to_le_bytes());
    h[8..10].copy_from_slice(&flags.to_le_bytes());
    h[10..12].copy_from_slice(&count.to_le_bytes());
    h[12..16].copy_from_slice(&overflow.to_le_bytes());
    h
}

/// A bucket header as stored in its parent's leaf: `{root pgid, sequence}`.
fn bucket_header(root: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&root.to_le_bytes());
    b
}

/// Writes a bbolt file page by page.
#[derive(Debug)]
pub(crate) struct BoltWriter {
    file: File,
    next_pgid: u64,
}

/// Elements of the page being filled, and their encoded size.
#[derive(Debug, Default)]
struct Pending {
    items: Vec<(Vec<u8>, Vec<u8>, u32)>,
    bytes: usize,
}

/// A bucket being written: keys must come in strictly increasing order.
#[derive(Debug, Default)]
pub(crate) struct BucketWriter {
    leaf: Pending,
    /// First key and page id of every leaf written so far.
    leaves: Vec<(Vec<u8>, u64)>,
    last_key: Option<Vec<u8>>,
}

impl BoltWriter {
    /// Creates `path` (which must not exist) for writing.
    pub(crate) fn create(path: &Path) -> Result<Self, BoltError> {
        let file = File::options().write(true).create_new(true).open(path)?;
        Ok(Self {
            file,
            // 0 and 1: meta; 2: the (empty) freelist.
            next_pgid: 3,
        })
    }

    /// Writes one page extent with `body` after its header; returns its id.
    fn write_page(&mut self, flags: u16, count: u16, body: &[u8]) -> Result<u64, BoltError> {
        let id = self.next_pgid;
        let total = PAGE_HEADER + body.len();
        let pages = total.div_ceil(PAGE_SIZE).max(1);
        let overflow = u32::try_from(pages - 1).map_err(|_| format("value too large"))?;
        let mut buf = Vec::with_capacity(pages * PAGE_SIZE);
        buf.extend_from_slice(&page_header(id, flags, count, overflow));
        buf.extend_from_slice(body);
        buf.resize(pages * PAGE_SIZE, 0);
        self.file.write_all_at(&buf, id * PAGE_SIZE as u64)?;
        self.next_pgid += pages as u64;
        Ok(id)
    }

    /// Encodes `items` as one leaf (`LEAF_PAGE`) or branch page body.
    fn encode(items: &[(Vec<u8>, Vec<u8>, u32)], branch: bool) -> Vec<u8> {
        let n = items.len();
        let mut elems = Vec::with_capacity(n * ELEMENT);
        let mut data = Vec::new();
        for (i, (k, v, flags)) in items.iter().enumerate() {
            // Distance from this element to its key, within the page.
            let pos = (n - i) * ELEMENT + data.len();
            if branch {
                elems.extend_from_slice(&(pos as u32).to_le_bytes());
                elems.extend_from_slice(&(k.len() as u32).to_le_bytes());
                elems.extend_from_slice(v);
            } else {
                elems.extend_from_slice(&flags.to_le_bytes());
                elems.extend_from_slice(&(pos as u32).to_le_bytes());
                elems.extend_from_slice(&(k.len() as u32).to_le_bytes());
                elems.extend_from_slice(&(v.len() as u32).to_le_bytes());
            }
            data.extend_from_slice(k);
            if !branch {
                data.extend_from_slice(v);
            }
        }
        elems.extend_from_slice(&data);
        elems
    }

    fn flush(
        &mut self,
        p: &mut Pending,
        branch: bool,
    ) -> Result<Option<(Vec<u8>, u64)>, BoltError> {
        if p.items.is_empty() {
            return Ok(None);
        }
        let body = Self::encode(&p.items, branch);
        let count = u16::try_from(p.items.len()).map_err(|_| format("too many elements"))?;
        let id = self.write_page(if branch { BRANCH_PAGE } else { LEAF_PAGE }, count, &body)?;
        let first = std::mem::take(&mut p.items[0].0);
        p.items.clear();
        p.bytes = 0;
        Ok(Some((first, id)))
    }

    /// Adds `key` → `value` (with leaf `flags`) to `bucket`.
    pub(crate) fn put(
        &mut self,
        bucket: &mut BucketWriter,
        key: &[u8],
        value: &[u8],
        flags: u32,
    ) -> Result<(), BoltError> {
        if bucket.last_key.as_deref().is_some_and(|l| l >= key) {
            return Err(format("keys must be written in increasing order"));
        }
        bucket.last_key = Some(key.to_vec());
        let size = ELEMENT + key.len() + value.len();
        if !bucket.leaf.items.is_empty()
            && PAGE_HEADER + bucket.leaf.bytes + size > PAGE_SIZE
            && let Some(l) = self.flush(&mut bucket.leaf, false)?
        {
            bucket.leaves.push(l);
        }
        bucket
            .leaf
            .items
            .push((key.to_vec(), value.to_vec(), flags));
        bucket.leaf.bytes += size;
        Ok(())
    }

    /// Writes the rest of `bucket` and its branch levels; returns its root page.
    pub(crate) fn finish_bucket(&mut self, mut bucket: BucketWriter) -> Result<u64, BoltError> {
        if let Some(l) = self.flush(&mut bucket.leaf, false)? {
            bucket.leaves.push(l);
        }
        let mut level = bucket.leaves;
        if level.is_empty() {
            return self.write_page(LEAF_PAGE, 0, &[]);
        }
        while level.len() > 1 {
            let mut next = Vec::new();
            let mut p = Pending::default();
            for (key, id) in level {
                let size = ELEMENT + key.len();
                if !p.items.is_empty()
                    && PAGE_HEADER + p.bytes + size > PAGE_SIZE
                    && let Some(b) = self.flush(&mut p, true)?
                {
                    next.push(b);
                }
                p.items.push((key, id.to_le_bytes().to_vec(), 0));
                p.bytes += size;
            }
            if let Some(b) = self.flush(&mut p, true)? {
                next.push(b);
            }
            level = next;
        }
        Ok(level[0].1)
    }

    /// Writes the top level (`buckets`: name → root page, in increasing
    /// name order), the empty freelist and both meta pages, and syncs.
    pub(crate) fn finish(mut self, buckets: &[(&[u8], u64)]) -> Result<u64, BoltError> {
        let mut root = BucketWriter::default();
        for (name, page) in buckets {
            let header = bucket_header(*page);
            self.put(&mut root, name, &header, BUCKET_LEAF)?;
        }
        let root_page = self.finish_bucket(root)?;
        let high_water = self.next_pgid;
        let mut freelist = page_header(FREELIST_PGID, FREELIST_PAGE, 0, 0).to_vec();
        freelist.resize(PAGE_SIZE, 0);
        self.file
            .write_all_at(&freelist, FREELIST_PGID * PAGE_SIZE as u64)?;
        for txid in 0..2u64 {
            let mut meta = Vec::with_capacity(64);
            meta.extend_from_slice(&MAGIC.to_le_bytes());
            meta.extend_from_slice(&VERSION.to_le_bytes());
            meta.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
            meta.extend_from_slice(&0u32.to_le_bytes());
            meta.extend_from_slice(&bucket_header(root_page));
            meta.extend_from_slice(&FREELIST_PGID.to_le_bytes());
            meta.extend_from_slice(&high_water.to_le_bytes());
            meta.extend_from_slice(&txid.to_le_bytes());
            let sum = fnv1a64(&meta);
            meta.extend_from_slice(&sum.to_le_bytes());
            let mut page = page_header(txid, META_PAGE, 0, 0).to_vec();
            page.extend_from_slice(&meta);
            page.resize(PAGE_SIZE, 0);
            self.file.write_all_at(&page, txid * PAGE_SIZE as u64)?;
        }
        self.file.set_len(high_water * PAGE_SIZE as u64)?;
        self.file.sync_all()?;
        Ok(high_water * PAGE_SIZE as u64)
    }
}

/// Called with `(key, value, leaf flags)` for each element of a bucket.
pub(crate) type Visit<'a> = dyn FnMut(&[u8], &[u8], u32) -> Result<(), BoltError> + 'a;

/// Where a bucket's tree lives.
#[derive(Debug, Clone)]
pub(crate) enum BucketRoot {
    /// A tree of pages from this root page.
    Page(u64),
    /// An inline bucket: its one leaf page, stored in the parent's value.
    Inline(Vec<u8>),
}

/// Reads a bbolt file (the first `len` bytes of `file`).
#[derive(Debug)]
pub(crate) struct BoltReader {
    file: File,
    len: u64,
    page_size: u64,
    high_water: u64,
    root: u64,
}

fn le_u16(b: &[u8], at: usize) -> Result<u16, BoltError> {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_le_bytes)
        .ok_or_else(|| format("truncated page"))
}

fn le_u32(b: &[u8], at: usize) -> Result<u32, BoltError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| format("truncated page"))
}

fn le_u64(b: &[u8], at: usize) -> Result<u64, BoltError> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| format("truncated page"))
}

/// A valid meta page's `(txid, page size, root, high water)`.
fn parse_meta(page: &[u8]) -> Option<(u64, u32, u64, u64)> {
    let m = page.get(PAGE_HEADER..PAGE_HEADER + 64)?;
    let flags = u16::from_le_bytes(page.get(8..10)?.try_into().ok()?);
    let word = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(m.get(at..at + 8)?.try_into().ok()?))
    };
    let magic = u32::from_le_bytes(m.get(0..4)?.try_into().ok()?);
    let version = u32::from_le_bytes(m.get(4..8)?.try_into().ok()?);
    let page_size = u32::from_le_bytes(m.get(8..12)?.try_into().ok()?);
    if flags & META_PAGE == 0
        || magic != MAGIC
        || version != VERSION
        || fnv1a64(&m[..56]) != word(56)?
        || !(512..=MAX_PAGE_SIZE).contains(&page_size)
    {
        return None;
    }
    Some((word(48)?, page_size, word(16)?, word(40)?))
}

impl BoltReader {
    /// Opens the bbolt database held in the first `len` bytes of `path`.
    pub(crate) fn open(path: &Path, len: u64) -> Result<Self, BoltError> {
        let file = File::open(path)?;
        let mut first = vec![0u8; PAGE_SIZE.min(len as usize)];
        file.read_exact_at(&mut first, 0)?;
        let m0 = parse_meta(&first);
        // Meta page 1 sits one page in, at the page size meta 0 gives (or
        // the usual one if meta 0 is damaged).
        let ps1 = m0.map_or(PAGE_SIZE as u64, |m| u64::from(m.1));
        let mut second = vec![0u8; PAGE_HEADER + 64];
        let m1 = if ps1 + second.len() as u64 <= len {
            file.read_exact_at(&mut second, ps1)?;
            parse_meta(&second)
        } else {
            None
        };
        let (_, page_size, root, high_water) = match (m0, m1) {
            (Some(a), Some(b)) => {
                if b.0 > a.0 {
                    b
                } else {
                    a
                }
            }
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return Err(format("no valid meta page (not a bbolt file?)")),
        };
        let page_size = u64::from(page_size);
        if high_water.saturating_mul(page_size) > len {
            return Err(format(format!(
                "the file is truncated: {len} bytes, {high_water} pages of {page_size} expected"
            )));
        }
        Ok(Self {
            file,
            len,
            page_size,
            high_water,
            root,
        })
    }

    /// Reads page `id` and its overflow pages.
    fn page(&self, id: u64) -> Result<Vec<u8>, BoltError> {
        if id < 2 || id >= self.high_water {
            return Err(format(format!("page {id} is out of range")));
        }
        let at = id * self.page_size;
        let mut head = vec![0u8; self.page_size as usize];
        if at + self.page_size > self.len {
            return Err(format(format!("page {id} is past the end of the file")));
        }
        self.file.read_exact_at(&mut head, at)?;
        let overflow = u64::from(le_u32(&head, 12)?);
        if overflow == 0 {
            return Ok(head);
        }
        let end = id
            .checked_add(overflow)
            .filter(|e| *e < self.high_water)
            .ok_or_else(|| format(format!("page {id} overflows past the end")))?;
        let mut full = vec![0u8; ((end - id + 1) * self.page_size) as usize];
        self.file.read_exact_at(&mut full, at)?;
        Ok(full)
    }

    /// The top-level bucket named `name`, if present.
    pub(crate) fn bucket(&self, name: &[u8]) -> Result<Option<BucketRoot>, BoltError> {
        let mut found = None;
        let mut budget = self.high_water;
        self.walk(
            &BucketRoot::Page(self.root),
            0,
            &mut budget,
            &mut |k, v, flags| {
                if k == name {
                    if flags & BUCKET_LEAF == 0 {
                        return Err(format("a top-level key that is not a bucket"));
                    }
                    let root = le_u64(v, 0)?;
                    found = Some(if root == 0 {
                        BucketRoot::Inline(v.get(16..).unwrap_or_default().to_vec())
                    } else {
                        BucketRoot::Page(root)
                    });
                }
                Ok(())
            },
        )?;
        Ok(found)
    }

    /// Calls `f(key, value, flags)` for every element of the bucket, in key
    /// order.
    pub(crate) fn for_each(&self, bucket: &BucketRoot, f: &mut Visit<'_>) -> Result<(), BoltError> {
        let mut budget = self.high_water;
        self.walk(bucket, 0, &mut budget, f)
    }

    /// Visits the tree under `at`; `budget` is the number of pages a walk
    /// may still read (a sound tree reads each page once), so a damaged
    /// file with cycles ends in an error, not a loop.
    fn walk(
        &self,
        at: &BucketRoot,
        depth: usize,
        budget: &mut u64,
        f: &mut Visit<'_>,
    ) -> Result<(), BoltError> {
        if depth > MAX_DEPTH || *budget == 0 {
            return Err(format("the tree is too deep or revisits pages"));
        }
        *budget -= 1;
        let page = match at {
            BucketRoot::Page(id) => self.page(*id)?,
            BucketRoot::Inline(p) => p.clone(),
        };
        let flags = le_u16(&page, 8)?;
        let count = usize::from(le_u16(&page, 10)?);
        for i in 0..count {
            let e = PAGE_HEADER + i * ELEMENT;
            if flags & LEAF_PAGE != 0 {
                let eflags = le_u32(&page, e)?;
                let pos = le_u32(&page, e + 4)? as usize;
                let ksize = le_u32(&page, e + 8)? as usize;
                let vsize = le_u32(&page, e + 12)? as usize;
                let k0 = e + pos;
                let key = page
                    .get(k0..k0 + ksize)
                    .ok_or_else(|| format("a leaf key past its page"))?;
                let value = page
                    .get(k0 + ksize..k0 + ksize + vsize)
                    .ok_or_else(|| format("a leaf value past its page"))?;
                f(key, value, eflags)?;
            } else if flags & BRANCH_PAGE != 0 {
                let child = le_u64(&page, e + 8)?;
                self.walk(&BucketRoot::Page(child), depth + 1, budget, f)?;
            } else {
                return Err(format(format!("unexpected page flags {flags:#x}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Items = Vec<(Vec<u8>, Vec<u8>)>;

    fn write(path: &Path, buckets: &[(&str, Items)]) {
        let mut w = BoltWriter::create(path).unwrap();
        let mut roots = Vec::new();
        for (name, items) in buckets {
            let mut b = BucketWriter::default();
            for (k, v) in items {
                w.put(&mut b, k, v, 0).unwrap();
            }
            roots.push((name.as_bytes(), w.finish_bucket(b).unwrap()));
        }
        w.finish(&roots).unwrap();
    }

    fn read_all(path: &Path, name: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        let len = std::fs::metadata(path).unwrap().len();
        let r = BoltReader::open(path, len).unwrap();
        let b = r.bucket(name.as_bytes()).unwrap().unwrap();
        let mut out = Vec::new();
        r.for_each(&b, &mut |k, v, _| {
            out.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn round_trips_deep_trees_big_values_and_empty_buckets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let many: Vec<_> = (0..20_000u32)
            .map(|i| (i.to_be_bytes().to_vec(), vec![b'v'; (i % 300) as usize]))
            .collect();
        let big = vec![(b"big".to_vec(), vec![7u8; 3 * PAGE_SIZE + 5])];
        write(
            &path,
            &[("empty", vec![]), ("key", many.clone()), ("z", big.clone())],
        );
        assert_eq!(read_all(&path, "key"), many);
        assert_eq!(read_all(&path, "z"), big);
        assert!(read_all(&path, "empty").is_empty());
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(len % PAGE_SIZE as u64, 0);
        let r = BoltReader::open(&path, len).unwrap();
        assert!(r.bucket(b"nope").unwrap().is_none());
    }

    #[test]
    fn keys_out_of_order_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = BoltWriter::create(&dir.path().join("db")).unwrap();
        let mut b = BucketWriter::default();
        w.put(&mut b, b"b", b"", 0).unwrap();
        assert!(w.put(&mut b, b"a", b"", 0).is_err());
        assert!(w.put(&mut b, b"b", b"", 0).is_err());
    }

    #[test]
    fn damage_is_an_error_never_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let items: Vec<_> = (0..3_000u32)
            .map(|i| (i.to_be_bytes().to_vec(), b"value".to_vec()))
            .collect();
        write(&path, &[("key", items)]);
        let good = std::fs::read(&path).unwrap();
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x2545_f491_4f6c_dd1d);
        for round in 0..300 {
            let mut bad = good.clone();
            for _ in 0..1 + round % 8 {
                let at = rng.random_range(0..bad.len());
                bad[at] = rng.random();
            }
            if round % 10 == 0 {
                let len = rng.random_range(0..bad.len());
                bad.truncate(len);
            }
            let p = dir.path().join(format!("bad{round}"));
            std::fs::write(&p, &bad).unwrap();
            if let Ok(r) = BoltReader::open(&p, bad.len() as u64)
                && let Ok(Some(b)) = r.bucket(b"key")
            {
                let _ = r.for_each(&b, &mut |_, _, _| Ok(()));
            }
        }
    }
}
