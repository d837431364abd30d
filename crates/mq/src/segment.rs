//! One segment of a partition's log: a file of records, its offset index and its time index.
//!
//! Record layout (little endian): `len u32 | crc32 u32 | offset u64 | payload[len]`, the CRC
//! covering the offset and the payload. Invariants:
//! - offsets increase by exactly one from record to record, across a partition's segments;
//!   a segment's file is named by its first offset (`{base:020}.log`);
//! - the active (last) segment is preallocated, so reading stops at the first zero length,
//!   bad checksum or unexpected offset: that is the torn or never-written tail, and nothing
//!   after it was acknowledged; recovery cuts the file there and refills it with zeros, so
//!   no stale record can ever follow a new one;
//! - a sealed segment's file is cut to its records and fsynced, and its indexes are written
//!   next to it (`.idx`: `rel_offset u32 | position u32` per entry; `.tim`: `time_ms u64 |
//!   rel_offset u32`; each file ends with the CRC of its entries). A missing or damaged
//!   index is rebuilt from the log; the active segment's indexes live in memory only.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::RwLock;

/// Bytes of a record's header.
pub(crate) const HEADER: usize = 16;
/// Bytes read at a time when scanning.
const CHUNK: usize = 64 * 1024;

/// A record read back: its offset and payload.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) offset: u64,
    pub(crate) payload: Bytes,
}

#[derive(Default)]
struct Index {
    /// `(offset - base, position)`, one entry per `index_interval_bytes` of log.
    offsets: Vec<(u32, u32)>,
    /// `(publish time, offset - base)` of the entries' records.
    times: Vec<(u64, u32)>,
    /// Position of the last indexed record.
    last_indexed: u64,
    /// Newest publish time in the segment (0 if empty).
    max_ms: u64,
}

/// One segment file.
pub(crate) struct Segment {
    /// Offset of the segment's first record.
    pub(crate) base: u64,
    path: PathBuf,
    file: File,
    /// Bytes of records written.
    len: AtomicU64,
    /// Offset after the segment's last record.
    next: AtomicU64,
    index: RwLock<Index>,
}

pub(crate) fn log_name(base: u64) -> String {
    format!("{base:020}.log")
}

pub(crate) fn base_of(name: &str) -> Option<u64> {
    name.strip_suffix(".log")?.parse().ok()
}

/// Appends a record's frame to `out`.
pub(crate) fn frame(
    out: &mut Vec<u8>,
    offset: u64,
    payload_len: usize,
    write_payload: impl FnOnce(&mut Vec<u8>),
) {
    let at = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    out[at + 8..at + 16].copy_from_slice(&offset.to_le_bytes());
    write_payload(out);
    debug_assert_eq!(out.len() - at - HEADER, payload_len);
    let len = (out.len() - at - HEADER) as u32;
    let crc = crc32fast::hash(&out[at + 8..]);
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    out[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Reserves real disk blocks so appends need no allocation and `fdatasync` no
/// metadata update.
#[allow(unsafe_code)]
fn preallocate(file: &File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = i64::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment too large"))?;
    // SAFETY: a plain syscall on a descriptor we own for the duration of the call.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc == 0 {
        return Ok(());
    }
    // Filesystems without fallocate: a sparse file (correct, slower fsync).
    file.set_len(len as u64)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The publish time inside a payload (see `message.rs`).
pub(crate) fn publish_ms(payload: &[u8]) -> u64 {
    if payload.len() >= 16 {
        u64_at(payload, 8)
    } else {
        0
    }
}

impl Segment {
    /// Creates an empty active segment starting at `base`, preallocated to `capacity`.
    pub(crate) fn create(dir: &Path, base: u64, capacity: u64) -> io::Result<Segment> {
        let path = dir.join(log_name(base));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        preallocate(&file, capacity)?;
        file.sync_all()?;
        Ok(Segment {
            base,
            path,
            file,
            len: AtomicU64::new(0),
            next: AtomicU64::new(base),
            index: RwLock::new(Index::default()),
        })
    }

    /// Opens an existing segment. The active one is scanned (its torn tail cut and
    /// refilled with zeros up to `capacity`); a sealed one loads its indexes, or
    /// rebuilds them from the log when they are missing or damaged.
    pub(crate) fn open(
        path: PathBuf,
        base: u64,
        active: bool,
        capacity: u64,
        interval: u64,
    ) -> io::Result<Segment> {
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let seg = Segment {
            base,
            path,
            file,
            len: AtomicU64::new(0),
            next: AtomicU64::new(base),
            index: RwLock::new(Index::default()),
        };
        if !active && seg.load_indexes()? {
            return Ok(seg);
        }
        let file_len = seg.file.metadata()?.len();
        let (end, next) = seg.scan_rebuild(file_len, interval)?;
        seg.len.store(end, Ordering::Release);
        seg.next.store(next, Ordering::Release);
        if active {
            if end < file_len {
                // Cut the torn or unwritten tail and refill with zeros: nothing stale may
                // follow the next record written.
                seg.file.set_len(end)?;
                preallocate(&seg.file, capacity.max(end))?;
                seg.file.sync_all()?;
            }
        } else {
            if end < file_len {
                tracing::warn!(path = %seg.path.display(), end, file_len, "sealed segment has a damaged tail; cut");
                seg.file.set_len(end)?;
                seg.file.sync_all()?;
            }
            seg.write_indexes()?;
        }
        Ok(seg)
    }

    /// Scans records from the start, rebuilding the in-memory indexes; returns the end
    /// position and the next offset.
    fn scan_rebuild(&self, file_len: u64, interval: u64) -> io::Result<(u64, u64)> {
        let mut idx = Index::default();
        let mut pos = 0u64;
        let mut expect = self.base;
        let mut buf = Vec::new();
        while let Some((len, offset, payload_ok, ms)) = self.peek_record(pos, file_len, &mut buf)? {
            if offset != expect || !payload_ok {
                break;
            }
            if idx.offsets.is_empty() || pos - idx.last_indexed >= interval {
                idx.offsets.push(((offset - self.base) as u32, pos as u32));
                idx.times
                    .push((ms.max(idx.max_ms), (offset - self.base) as u32));
                idx.last_indexed = pos;
            }
            idx.max_ms = idx.max_ms.max(ms);
            pos += HEADER as u64 + len as u64;
            expect += 1;
        }
        *self.index.write() = idx;
        Ok((pos, expect))
    }

    /// Reads and checks the record at `pos`: `(len, offset, crc ok, publish ms)`, or `None`
    /// at a zero length or a record running past `file_len`.
    fn peek_record(
        &self,
        pos: u64,
        file_len: u64,
        buf: &mut Vec<u8>,
    ) -> io::Result<Option<(u32, u64, bool, u64)>> {
        if pos + HEADER as u64 > file_len {
            return Ok(None);
        }
        let mut head = [0u8; HEADER];
        self.file.read_exact_at(&mut head, pos)?;
        let len = u32_at(&head, 0);
        if len == 0 || pos + HEADER as u64 + len as u64 > file_len {
            return Ok(None);
        }
        buf.resize(len as usize, 0);
        self.file.read_exact_at(buf, pos + HEADER as u64)?;
        let mut h = crc32fast::Hasher::new();
        h.update(&head[8..]);
        h.update(buf);
        let ok = h.finalize() == u32_at(&head, 4);
        Ok(Some((len, u64_at(&head, 8), ok, publish_ms(buf))))
    }

    fn idx_path(&self) -> PathBuf {
        self.path.with_extension("idx")
    }

    fn tim_path(&self) -> PathBuf {
        self.path.with_extension("tim")
    }

    /// Loads a sealed segment's index files; false when missing or damaged.
    fn load_indexes(&self) -> io::Result<bool> {
        let (Ok(idx), Ok(tim)) = (
            std::fs::read(self.idx_path()),
            std::fs::read(self.tim_path()),
        ) else {
            return Ok(false);
        };
        let valid = |b: &[u8], entry: usize| {
            b.len() >= 4 + 16
                && (b.len() - 4 - 16).is_multiple_of(entry)
                && crc32fast::hash(&b[..b.len() - 4]) == u32_at(b, b.len() - 4)
        };
        // Each file: entries, then `len u64 | next u64` (idx) or `max_ms u64 | 0 u64` (tim), then the CRC.
        if !valid(&idx, 8) || !valid(&tim, 12) {
            return Ok(false);
        }
        let file_len = self.file.metadata()?.len();
        let n = idx.len() - 20;
        let len = u64_at(&idx, n);
        let next = u64_at(&idx, n + 8);
        if len != file_len || next < self.base {
            return Ok(false);
        }
        let mut index = Index::default();
        for e in idx[..n].chunks_exact(8) {
            index.offsets.push((u32_at(e, 0), u32_at(e, 4)));
        }
        let m = tim.len() - 20;
        for e in tim[..m].chunks_exact(12) {
            index.times.push((u64_at(e, 0), u32_at(e, 8)));
        }
        index.max_ms = u64_at(&tim, m);
        *self.index.write() = index;
        self.len.store(len, Ordering::Release);
        self.next.store(next, Ordering::Release);
        Ok(true)
    }

    /// Writes a sealed segment's index files (fsynced).
    fn write_indexes(&self) -> io::Result<()> {
        let index = self.index.read();
        let mut idx = Vec::with_capacity(index.offsets.len() * 8 + 20);
        for (rel, pos) in &index.offsets {
            idx.extend_from_slice(&rel.to_le_bytes());
            idx.extend_from_slice(&pos.to_le_bytes());
        }
        idx.extend_from_slice(&self.len().to_le_bytes());
        idx.extend_from_slice(&self.next().to_le_bytes());
        let crc = crc32fast::hash(&idx);
        idx.extend_from_slice(&crc.to_le_bytes());
        let mut tim = Vec::with_capacity(index.times.len() * 12 + 20);
        for (ms, rel) in &index.times {
            tim.extend_from_slice(&ms.to_le_bytes());
            tim.extend_from_slice(&rel.to_le_bytes());
        }
        tim.extend_from_slice(&index.max_ms.to_le_bytes());
        tim.extend_from_slice(&0u64.to_le_bytes());
        let crc = crc32fast::hash(&tim);
        tim.extend_from_slice(&crc.to_le_bytes());
        drop(index);
        for (path, bytes) in [(self.idx_path(), idx), (self.tim_path(), tim)] {
            let f = File::create(&path)?;
            f.write_all_at(&bytes, 0)?;
            f.sync_all()?;
        }
        Ok(())
    }

    /// Bytes of records written.
    pub(crate) fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// Offset after the last record written.
    pub(crate) fn next(&self) -> u64 {
        self.next.load(Ordering::Acquire)
    }

    /// Newest publish time in the segment.
    pub(crate) fn max_ms(&self) -> u64 {
        self.index.read().max_ms
    }

    /// Appends frames holding the records `first..first + times.len()` (committer only);
    /// `positions` are each record's position inside `frames`.
    pub(crate) fn append(
        &self,
        frames: &[u8],
        first: u64,
        positions: &[(u32, u64)],
        interval: u64,
    ) -> io::Result<()> {
        let at = self.len();
        self.file.write_all_at(frames, at)?;
        let mut index = self.index.write();
        for (i, (rel_pos, ms)) in positions.iter().enumerate() {
            let pos = at + *rel_pos as u64;
            let rel = (first + i as u64 - self.base) as u32;
            if index.offsets.is_empty() || pos - index.last_indexed >= interval {
                index.offsets.push((rel, pos as u32));
                let t = (*ms).max(index.max_ms);
                index.times.push((t, rel));
                index.last_indexed = pos;
            }
            index.max_ms = index.max_ms.max(*ms);
        }
        drop(index);
        self.len.store(at + frames.len() as u64, Ordering::Release);
        self.next
            .store(first + positions.len() as u64, Ordering::Release);
        Ok(())
    }

    /// Makes the appended records durable.
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Seals the segment: cut to its records, fsynced, indexes written.
    pub(crate) fn seal(&self) -> io::Result<()> {
        self.file.set_len(self.len())?;
        self.file.sync_all()?;
        self.write_indexes()
    }

    /// Deletes the segment's files (retention).
    pub(crate) fn remove_files(&self) {
        for p in [self.path.clone(), self.idx_path(), self.tim_path()] {
            if let Err(e) = std::fs::remove_file(&p)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(path = %p.display(), error = %e, "deleting an expired segment file failed");
            }
        }
    }

    /// Position to start scanning at for `offset` (from the offset index).
    fn position_for(&self, offset: u64) -> u64 {
        let rel = (offset - self.base) as u32;
        let index = self.index.read();
        let i = index.offsets.partition_point(|(r, _)| *r <= rel);
        if i == 0 {
            0
        } else {
            index.offsets[i - 1].1 as u64
        }
    }

    /// Offset to start scanning at for the first record at or after `ms` (from the time index).
    pub(crate) fn offset_for_time(&self, ms: u64) -> u64 {
        let index = self.index.read();
        let i = index.times.partition_point(|(t, _)| *t < ms);
        if i == 0 {
            self.base
        } else {
            self.base + index.times[i - 1].1 as u64
        }
    }

    /// Reads records from `offset` (inside this segment) until `end` (exclusive), at most
    /// `max_count` of them and about `max_bytes` of payload (always at least one).
    pub(crate) fn read(
        &self,
        offset: u64,
        end: u64,
        max_count: usize,
        max_bytes: usize,
        out: &mut Vec<Record>,
    ) -> io::Result<()> {
        let offset = offset.max(self.base);
        let limit_pos = self.len();
        let mut pos = self.position_for(offset);
        let mut chunk = Bytes::new();
        let mut chunk_pos = pos;
        let mut bytes = 0usize;
        let corrupt = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("segment {}: {what}", self.path.display()),
            )
        };
        while pos < limit_pos && out.len() < max_count {
            // Make sure the header is in the chunk.
            let need_head = (pos - chunk_pos) as usize + HEADER;
            if chunk.len() < need_head {
                let want = CHUNK.max(HEADER).min((limit_pos - pos) as usize);
                chunk = read_at(&self.file, pos, want)?;
                chunk_pos = pos;
                if chunk.len() < HEADER {
                    return Err(corrupt("record header past the end"));
                }
            }
            let at = (pos - chunk_pos) as usize;
            let len = u32_at(&chunk, at) as usize;
            let crc = u32_at(&chunk, at + 4);
            let off = u64_at(&chunk, at + 8);
            if off >= end {
                break;
            }
            let total = HEADER + len;
            if pos + total as u64 > limit_pos || len == 0 {
                return Err(corrupt("record past the written end"));
            }
            if off < offset {
                pos += total as u64;
                continue;
            }
            if chunk.len() < at + total {
                chunk = read_at(
                    &self.file,
                    pos,
                    CHUNK.max(total).min((limit_pos - pos) as usize),
                )?;
                chunk_pos = pos;
            }
            let at = (pos - chunk_pos) as usize;
            let rec = &chunk[at..at + total];
            if crc32fast::hash(&rec[8..]) != crc {
                return Err(corrupt(&format!("checksum mismatch at offset {off}")));
            }
            let payload = chunk.slice(at + HEADER..at + total);
            out.push(Record {
                offset: off,
                payload,
            });
            bytes += len;
            pos += total as u64;
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(())
    }
}

fn read_at(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, pos)?;
    Ok(Bytes::from(buf))
}
