//! The write-ahead log: what makes an acknowledged write durable.
//!
//! Each group commit appends one record — the physical changes of the batch — and
//! fsyncs it (`fdatasync` on a preallocated segment: one sequential write, no
//! metadata update in the common case). redb then commits the same changes without
//! fsync; every `checkpoint_interval` the committer makes a redb commit durable and
//! records the last log sequence number (LSN) it covers, after which older segments
//! are deleted. Recovery replays the records after the checkpoint's LSN.
//!
//! Record layout (little endian): `len u32 | crc32 u32 | lsn u64 | payload[len]`,
//! the CRC covering `lsn` and the payload. Invariants:
//! - LSNs increase by exactly one from record to record, across segments;
//! - reading stops at the first zero length, bad checksum or unexpected LSN: that is
//!   the torn or never-written tail, and nothing after it was acknowledged;
//! - appends never continue after a tail read on recovery: a new segment is started;
//! - a commit never needs a new file descriptor: the directory stays open, the
//!   next segment is created ahead of time ([`Wal::prepare`], before a batch
//!   touches anything, so running out of descriptors or space there refuses
//!   the batch and loses nothing), and records are written at explicit offsets
//!   so a failed write is overwritten by the next one, never followed by it.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Size of a freshly preallocated segment.
pub(crate) const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
const HEADER_BYTES: usize = 4 + 4 + 8;

/// One physical change, as logged and replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    /// Insert a record into the revision table.
    KvPut {
        main: u64,
        sub: u32,
        record: Vec<u8>,
    },
    /// Grant (or re-grant) a lease.
    LeasePut { id: i64, ttl_secs: i64 },
    /// Remove a lease.
    LeaseDel { id: i64 },
    /// The store revision after the batch.
    Revision { revision: i64 },
}

const OP_KV_PUT: u8 = 1;
const OP_LEASE_PUT: u8 = 2;
const OP_LEASE_DEL: u8 = 3;
const OP_REVISION: u8 = 4;

/// Appends the encoding of an op to `out`.
pub(crate) fn encode_kv_put(out: &mut Vec<u8>, main: u64, sub: u32, record: &[u8]) {
    out.push(OP_KV_PUT);
    out.extend_from_slice(&main.to_le_bytes());
    out.extend_from_slice(&sub.to_le_bytes());
    // Records are bounded by the request size limit, far below u32::MAX.
    out.extend_from_slice(&(record.len() as u32).to_le_bytes());
    out.extend_from_slice(record);
}

pub(crate) fn encode_lease_put(out: &mut Vec<u8>, id: i64, ttl_secs: i64) {
    out.push(OP_LEASE_PUT);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&ttl_secs.to_le_bytes());
}

pub(crate) fn encode_lease_del(out: &mut Vec<u8>, id: i64) {
    out.push(OP_LEASE_DEL);
    out.extend_from_slice(&id.to_le_bytes());
}

pub(crate) fn encode_revision(out: &mut Vec<u8>, revision: i64) {
    out.push(OP_REVISION);
    out.extend_from_slice(&revision.to_le_bytes());
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> io::Result<&'a [u8]> {
    if b.len() < n {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "truncated WAL op",
        ));
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Ok(head)
}

fn u64_of(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

fn u32_of(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a)
}

/// Decodes a record's payload into its ops.
pub(crate) fn decode_ops(mut b: &[u8]) -> io::Result<Vec<Op>> {
    let mut ops = Vec::new();
    while !b.is_empty() {
        let tag = take(&mut b, 1)?[0];
        let op = match tag {
            OP_KV_PUT => {
                let main = u64_of(take(&mut b, 8)?);
                let sub = u32_of(take(&mut b, 4)?);
                let len = u32_of(take(&mut b, 4)?) as usize;
                Op::KvPut {
                    main,
                    sub,
                    record: take(&mut b, len)?.to_vec(),
                }
            }
            OP_LEASE_PUT => {
                let id = u64_of(take(&mut b, 8)?) as i64;
                let ttl_secs = u64_of(take(&mut b, 8)?) as i64;
                Op::LeasePut { id, ttl_secs }
            }
            OP_LEASE_DEL => Op::LeaseDel {
                id: u64_of(take(&mut b, 8)?) as i64,
            },
            OP_REVISION => Op::Revision {
                revision: u64_of(take(&mut b, 8)?) as i64,
            },
            t => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown WAL op {t}"),
                ));
            }
        };
        ops.push(op);
    }
    Ok(ops)
}

fn segment_name(seq: u64) -> String {
    format!("wal-{seq:016x}.log")
}

fn segment_seq(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("wal-")?.strip_suffix(".log")?;
    u64::from_str_radix(hex, 16).ok()
}

/// Segments in the directory, oldest first.
fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(seq) = entry.file_name().to_str().and_then(segment_seq) {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Reserves `len` bytes of real disk blocks so that appends inside them need no
/// allocation and `fdatasync` no metadata update.
#[allow(unsafe_code)]
fn preallocate(file: &File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = i64::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment too large"))?;
    // SAFETY: plain syscall on a file descriptor we own for the duration of the call.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc == 0 {
        return Ok(());
    }
    // Filesystems without fallocate: fall back to a sparse file (correct, slower fsync).
    file.set_len(len as u64)
}

/// A segment created ahead of time, empty.
struct Spare {
    file: File,
    seq: u64,
    capacity: u64,
}

/// The log, open for appending.
pub(crate) struct Wal {
    dir: PathBuf,
    /// The directory, kept open to fsync new entries without opening it.
    dir_file: File,
    file: File,
    seq: u64,
    offset: u64,
    capacity: u64,
    /// The next segment, created before it is needed.
    spare: Option<Spare>,
    /// Segments older than the current one, deleted at the next checkpoint.
    old: Vec<(u64, PathBuf)>,
    next_lsn: u64,
    fsync: bool,
    buf: Vec<u8>,
    /// Bytes appended since the last checkpoint.
    pub(crate) bytes_since_checkpoint: u64,
}

/// What recovery found in the log.
pub(crate) struct Recovered {
    /// `(lsn, payload)` of every intact record after `after_lsn`, in order.
    pub(crate) records: Vec<(u64, Vec<u8>)>,
    /// The highest LSN read (0 if none).
    pub(crate) last_lsn: u64,
}

impl Wal {
    /// Reads every intact record with an LSN above `after_lsn`, then opens a fresh
    /// segment for appending (the old ones are removed at the next checkpoint).
    pub(crate) fn open(dir: &Path, after_lsn: u64, fsync: bool) -> io::Result<(Wal, Recovered)> {
        std::fs::create_dir_all(dir)?;
        let segs = segments(dir)?;
        let mut records = Vec::new();
        let mut last_lsn = after_lsn;
        let mut expected: Option<u64> = None;
        'segments: for (_, path) in &segs {
            let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
            loop {
                let mut header = [0u8; HEADER_BYTES];
                if read_full(&mut r, &mut header)? < HEADER_BYTES {
                    continue 'segments;
                }
                let len = u32_of(&header[0..4]) as usize;
                let crc = u32_of(&header[4..8]);
                let lsn = u64_of(&header[8..16]);
                if len == 0 && crc == 0 && lsn == 0 {
                    // Preallocated space never written: the end of this segment.
                    continue 'segments;
                }
                if expected.is_some_and(|e| e != lsn) {
                    break 'segments;
                }
                let mut payload = vec![0u8; len];
                if read_full(&mut r, &mut payload)? < len {
                    break 'segments;
                }
                let mut h = crc32fast::Hasher::new();
                h.update(&header[8..16]);
                h.update(&payload);
                if h.finalize() != crc {
                    break 'segments;
                }
                expected = Some(lsn + 1);
                if lsn > after_lsn {
                    last_lsn = lsn;
                    records.push((lsn, payload));
                }
            }
        }
        let next_lsn = expected.unwrap_or(after_lsn + 1).max(last_lsn + 1);
        let seq = segs.last().map(|(s, _)| s + 1).unwrap_or(1);
        let dir_file = File::open(dir)?;
        let (file, capacity) = Self::create_segment(dir, &dir_file, seq, SEGMENT_BYTES)?;
        let mut wal = Wal {
            dir: dir.to_path_buf(),
            dir_file,
            file,
            seq,
            offset: 0,
            capacity,
            spare: None,
            old: segs,
            next_lsn,
            fsync,
            buf: Vec::new(),
            bytes_since_checkpoint: 0,
        };
        wal.prepare()?;
        Ok((wal, Recovered { records, last_lsn }))
    }

    fn create_segment(dir: &Path, dir_file: &File, seq: u64, size: u64) -> io::Result<(File, u64)> {
        let path = dir.join(segment_name(seq));
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)?;
        let made = preallocate(&file, size)
            .and_then(|()| file.sync_all())
            .and_then(|()| dir_file.sync_all());
        if let Err(e) = made {
            // Leave no half-made segment behind for the next attempt to trip on.
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok((file, size))
    }

    /// Makes sure the next segment exists, so that the coming appends need
    /// no new file descriptor and no disk allocation. Called before a batch
    /// is applied: an error here (no descriptors, no space) refuses the batch
    /// with nothing changed, and the next batch tries again.
    pub(crate) fn prepare(&mut self) -> io::Result<()> {
        if self.spare.is_none() {
            let seq = self.seq + 1;
            let (file, capacity) =
                Self::create_segment(&self.dir, &self.dir_file, seq, SEGMENT_BYTES)?;
            self.spare = Some(Spare {
                file,
                seq,
                capacity,
            });
        }
        Ok(())
    }

    /// The LSN of the last record appended.
    pub(crate) fn last_lsn(&self) -> u64 {
        self.next_lsn - 1
    }

    /// Appends one record and makes it durable; returns its LSN.
    pub(crate) fn append(&mut self, payload: &[u8]) -> io::Result<u64> {
        let lsn = self.next_lsn;
        let need = (HEADER_BYTES + payload.len()) as u64;
        if self.offset + need > self.capacity {
            let next = match self.spare.take() {
                Some(s) if s.capacity >= need => s,
                spare => {
                    // A record larger than a segment (or no spare): made here.
                    let seq = spare.as_ref().map_or(self.seq + 1, |s| s.seq);
                    drop(spare);
                    let _ = std::fs::remove_file(self.dir.join(segment_name(seq)));
                    let (file, capacity) = Self::create_segment(
                        &self.dir,
                        &self.dir_file,
                        seq,
                        SEGMENT_BYTES.max(need),
                    )?;
                    Spare {
                        file,
                        seq,
                        capacity,
                    }
                }
            };
            self.old
                .push((self.seq, self.dir.join(segment_name(self.seq))));
            self.file = next.file;
            self.seq = next.seq;
            self.capacity = next.capacity;
            self.offset = 0;
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&lsn.to_le_bytes());
        h.update(payload);
        self.buf.clear();
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "WAL record over 4 GiB"))?;
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(&h.finalize().to_le_bytes());
        self.buf.extend_from_slice(&lsn.to_le_bytes());
        self.buf.extend_from_slice(payload);
        // At an explicit offset: after a failed write the next record goes
        // to the same place, never after a torn one.
        self.file.write_all_at(&self.buf, self.offset)?;
        if self.fsync {
            self.file.sync_data()?;
        }
        self.offset += need;
        self.bytes_since_checkpoint += need;
        self.next_lsn += 1;
        Ok(lsn)
    }

    /// Everything up to the current LSN is durable elsewhere: delete older
    /// segments (by name: no descriptor needed). A segment that cannot be
    /// deleted now is kept for the next checkpoint; its records are all at or
    /// below the checkpoint's LSN, so recovery skips them.
    pub(crate) fn checkpointed(&mut self) -> io::Result<()> {
        self.bytes_since_checkpoint = 0;
        let mut first_err = None;
        self.old
            .retain(|(_, path)| match std::fs::remove_file(path) {
                Ok(()) => false,
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => {
                    first_err.get_or_insert(e);
                    true
                }
            });
        match first_err {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(i: u8) -> Vec<u8> {
        let mut b = Vec::new();
        encode_kv_put(&mut b, u64::from(i), 0, &[i; 10]);
        encode_revision(&mut b, i64::from(i));
        b
    }

    #[test]
    fn records_round_trip_and_only_those_after_the_checkpoint_replay() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut w, rec) = Wal::open(dir.path(), 0, true).unwrap();
            assert!(rec.records.is_empty());
            for i in 1..=5u8 {
                assert_eq!(w.append(&payload(i)).unwrap(), u64::from(i));
            }
        }
        let (w, rec) = Wal::open(dir.path(), 3, true).unwrap();
        assert_eq!(
            rec.records.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert_eq!(
            decode_ops(&rec.records[0].1).unwrap()[1],
            Op::Revision { revision: 4 }
        );
        assert_eq!(w.last_lsn(), 5);
    }

    #[test]
    fn a_torn_tail_ends_the_log_and_appends_continue_in_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut w, _) = Wal::open(dir.path(), 0, true).unwrap();
            w.append(&payload(1)).unwrap();
            w.append(&payload(2)).unwrap();
        }
        // Corrupt one byte of the second record's payload.
        let (_, path) = segments(dir.path()).unwrap().remove(0);
        let mut bytes = std::fs::read(&path).unwrap();
        let second = HEADER_BYTES + payload(1).len() + HEADER_BYTES + 3;
        bytes[second] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (mut w, rec) = Wal::open(dir.path(), 0, true).unwrap();
        assert_eq!(
            rec.records.len(),
            1,
            "the torn record and everything after it are dropped"
        );
        assert_eq!(w.append(&payload(9)).unwrap(), 2);
        w.checkpointed().unwrap();
        assert_eq!(
            segments(dir.path()).unwrap().len(),
            2,
            "older segments removed at checkpoint: the current one and the spare stay"
        );
        let (_, rec) = Wal::open(dir.path(), 0, true).unwrap();
        assert_eq!(
            rec.records.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            vec![2]
        );
    }

    #[test]
    fn appends_roll_into_the_spare_segment_and_recover_across_it() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![7u8; (SEGMENT_BYTES / 3) as usize];
        {
            let (mut w, _) = Wal::open(dir.path(), 0, true).unwrap();
            for _ in 0..4 {
                w.append(&big).unwrap();
                w.prepare().unwrap();
            }
            // Segment 1 filled, segment 2 in use, segment 3 the spare.
            assert_eq!(w.seq, 2);
            assert_eq!(w.spare.as_ref().map(|s| s.seq), Some(3));
        }
        let (w, rec) = Wal::open(dir.path(), 0, true).unwrap();
        assert_eq!(
            rec.records.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert!(rec.records.iter().all(|(_, p)| p == &big));
        assert_eq!(w.seq, 4, "appends after recovery start a new segment");
    }

    #[test]
    fn garbage_ops_are_rejected() {
        assert!(decode_ops(&[9, 1, 2]).is_err());
        assert!(decode_ops(&[OP_KV_PUT, 1]).is_err());
    }
}
