//! A partition's log: its segments, oldest first, with one writer (the committer) and
//! any number of readers.
//!
//! Invariants:
//! - readers see records below `end` only, and `end` moves only after the records below
//!   it are durable (fsynced), so nothing unacknowledged is ever delivered;
//! - `start` is the first retained offset; retention deletes whole sealed segments, never
//!   the active one;
//! - publish times never go backwards inside a partition (a clock stepping back is clamped).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::error::{MqError, Result};
use crate::segment::{self, HEADER, Record, Segment};

/// Segment settings a log needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LogSettings {
    pub(crate) segment_bytes: u64,
    pub(crate) index_interval_bytes: u64,
}

/// What the committer has staged and not yet written.
#[derive(Default)]
struct Writer {
    /// The offset the next staged record gets.
    next: u64,
    /// Publish time of the last record.
    last_ms: u64,
    /// Frames staged for the active segment.
    frames: Vec<u8>,
    /// Each staged record's position in `frames` and publish time.
    positions: Vec<(u32, u64)>,
    /// The first staged offset.
    first: u64,
    /// Records were written since the last sync.
    dirty: bool,
}

/// One partition's log.
pub(crate) struct PartitionLog {
    /// The partition number.
    pub(crate) id: u32,
    dir: PathBuf,
    settings: LogSettings,
    segments: RwLock<Vec<Arc<Segment>>>,
    start: AtomicU64,
    end: AtomicU64,
    writer: Mutex<Writer>,
}

impl PartitionLog {
    /// Opens (or creates) the log in `dir`, recovering the active segment's tail.
    pub(crate) fn open(dir: &Path, id: u32, settings: LogSettings) -> Result<PartitionLog> {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(MqError::storage)?;
            // The new entries up the tree (`topics/{t}/{p}`, `journal`) survive a crash.
            let mut d = dir.parent();
            for _ in 0..2 {
                let Some(p) = d else { break };
                sync_dir(p)?;
                d = p.parent();
            }
        }
        let mut bases = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(MqError::storage)? {
            let entry = entry.map_err(MqError::storage)?;
            if let Some(base) = entry.file_name().to_str().and_then(segment::base_of) {
                bases.push((base, entry.path()));
            }
        }
        bases.sort();
        let mut segments = Vec::with_capacity(bases.len().max(1));
        let n = bases.len();
        for (i, (base, path)) in bases.into_iter().enumerate() {
            let seg = Segment::open(
                path,
                base,
                i + 1 == n,
                settings.segment_bytes,
                settings.index_interval_bytes,
            )
            .map_err(MqError::storage)?;
            segments.push(Arc::new(seg));
        }
        if segments.is_empty() {
            let seg = Segment::create(dir, 0, settings.segment_bytes).map_err(MqError::storage)?;
            sync_dir(dir)?;
            segments.push(Arc::new(seg));
        }
        for pair in segments.windows(2) {
            if pair[0].next() != pair[1].base {
                tracing::warn!(dir = %dir.display(), from = pair[0].next(), to = pair[1].base, "gap between segments (records lost outside the broker)");
            }
        }
        let start = segments.first().map_or(0, |s| s.base);
        let end = segments.last().map_or(0, |s| s.next());
        let last_ms = segments.last().map_or(0, |s| s.max_ms());
        Ok(PartitionLog {
            id,
            dir: dir.to_path_buf(),
            settings,
            segments: RwLock::new(segments),
            start: AtomicU64::new(start),
            end: AtomicU64::new(end),
            writer: Mutex::new(Writer {
                next: end,
                last_ms,
                first: end,
                ..Writer::default()
            }),
        })
    }

    /// The first retained offset.
    pub(crate) fn start(&self) -> u64 {
        self.start.load(Ordering::Acquire)
    }

    /// The offset after the last durable record.
    pub(crate) fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// Bytes of records retained.
    pub(crate) fn bytes(&self) -> u64 {
        self.segments.read().iter().map(|s| s.len()).sum()
    }

    fn active(&self) -> Arc<Segment> {
        // A log always has at least one segment.
        self.segments
            .read()
            .last()
            .cloned()
            .expect("a log has an active segment")
    }

    /// Stages one record (committer only); returns its offset. Rolls to a new segment
    /// when the active one would overflow.
    pub(crate) fn stage(
        &self,
        now_ms: u64,
        len: usize,
        write: impl FnOnce(u64, &mut Vec<u8>),
    ) -> Result<(u64, u64)> {
        let mut w = self.writer.lock();
        let ms = now_ms.max(w.last_ms);
        let frame_len = (HEADER + len) as u64;
        let active = self.active();
        if active.len() + w.frames.len() as u64 + frame_len > self.settings.segment_bytes
            && active.len() + w.frames.len() as u64 > 0
        {
            self.flush(&mut w)?;
            self.roll(&mut w)?;
        }
        if w.positions.is_empty() {
            w.first = w.next;
        }
        let offset = w.next;
        let pos = w.frames.len() as u32;
        let mut frames = std::mem::take(&mut w.frames);
        segment::frame(&mut frames, offset, len, |out| write(ms, out));
        w.frames = frames;
        w.positions.push((pos, ms));
        w.next += 1;
        w.last_ms = ms;
        Ok((offset, ms))
    }

    /// Writes staged frames to the active segment.
    fn flush(&self, w: &mut Writer) -> Result<()> {
        if w.positions.is_empty() {
            return Ok(());
        }
        let active = self.active();
        active
            .append(
                &w.frames,
                w.first,
                &w.positions,
                self.settings.index_interval_bytes,
            )
            .map_err(MqError::storage)?;
        w.frames.clear();
        w.positions.clear();
        w.dirty = true;
        Ok(())
    }

    /// Seals the active segment and starts the next.
    fn roll(&self, w: &mut Writer) -> Result<()> {
        let active = self.active();
        active.seal().map_err(MqError::storage)?;
        w.dirty = false;
        let seg = Segment::create(&self.dir, w.next, self.settings.segment_bytes)
            .map_err(MqError::storage)?;
        sync_dir(&self.dir)?;
        self.segments.write().push(Arc::new(seg));
        Ok(())
    }

    /// Starts a new segment now (the journal, before a checkpoint drops the old ones).
    pub(crate) fn roll_now(&self) -> Result<()> {
        let mut w = self.writer.lock();
        self.flush(&mut w)?;
        if self.active().len() == 0 {
            return Ok(());
        }
        self.roll(&mut w)
    }

    /// Writes what is staged and makes it durable (committer only).
    pub(crate) fn write_and_sync(&self, fsync: bool) -> Result<()> {
        let mut w = self.writer.lock();
        self.flush(&mut w)?;
        if w.dirty {
            if fsync {
                self.active().sync().map_err(MqError::storage)?;
            }
            w.dirty = false;
        }
        Ok(())
    }

    /// Makes what was synced visible to readers; returns the new end.
    pub(crate) fn publish(&self) -> u64 {
        let next = self.writer.lock().next;
        self.end.store(next, Ordering::Release);
        next
    }

    /// Deletes sealed segments past the retention limits (committer only); returns the new start.
    pub(crate) fn enforce_retention(
        &self,
        now_ms: u64,
        retention_ms: u64,
        retention_bytes: u64,
    ) -> u64 {
        let mut removed = Vec::new();
        {
            let mut segs = self.segments.write();
            let mut total: u64 = segs.iter().map(|s| s.len()).sum();
            while segs.len() > 1 {
                let first = &segs[0];
                let old = retention_ms > 0 && now_ms.saturating_sub(first.max_ms()) > retention_ms;
                let big = retention_bytes > 0 && total > retention_bytes;
                if !(old || big) {
                    break;
                }
                total -= first.len();
                removed.push(segs.remove(0));
            }
            if let Some(first) = segs.first() {
                self.start.store(first.base, Ordering::Release);
            }
        }
        for seg in &removed {
            seg.remove_files();
        }
        self.start()
    }

    /// Deletes sealed segments wholly below `offset` (the journal after a checkpoint).
    pub(crate) fn drop_before(&self, offset: u64) {
        let mut removed = Vec::new();
        {
            let mut segs = self.segments.write();
            while segs.len() > 1 && segs[0].next() <= offset {
                removed.push(segs.remove(0));
            }
            if let Some(first) = segs.first() {
                self.start.store(first.base, Ordering::Release);
            }
        }
        for seg in &removed {
            seg.remove_files();
        }
    }

    /// Calls `f` for every record from `offset` to the end as it is now, in order, in
    /// chunks of bounded size (recovery's scans).
    pub(crate) fn for_each(
        &self,
        offset: u64,
        mut f: impl FnMut(Record) -> Result<()>,
    ) -> Result<()> {
        let mut at = offset;
        let end = self.end();
        while at < end {
            let recs = self.read(at, 1024, 4 * 1024 * 1024)?;
            let Some(last) = recs.last() else { break };
            at = last.offset + 1;
            for r in recs {
                f(r)?;
            }
        }
        Ok(())
    }

    /// Reads up to `max_count` records from `offset` (about `max_bytes` of payload, at least
    /// one record when there is one).
    pub(crate) fn read(
        &self,
        offset: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>> {
        let (start, end) = (self.start(), self.end());
        if offset < start || offset > end {
            return Err(MqError::OffsetOutOfRange {
                partition: self.id,
                offset,
                start,
                end,
            });
        }
        let mut out = Vec::new();
        let segs: Vec<Arc<Segment>> = {
            let all = self.segments.read();
            // Retention may have removed segments since `start` was read.
            let first = all.first().map_or(0, |s| s.base);
            if offset < first {
                return Err(MqError::OffsetOutOfRange {
                    partition: self.id,
                    offset,
                    start: first,
                    end,
                });
            }
            let i = all.partition_point(|s| s.base <= offset).saturating_sub(1);
            all[i..].to_vec()
        };
        let mut at = offset;
        for seg in segs {
            if at >= end || out.len() >= max_count {
                break;
            }
            if seg.next() <= at {
                continue;
            }
            // A gap between segments (records lost outside the broker): skip to this one.
            at = at.max(seg.base);
            let before = out.len();
            let bytes_before: usize = out.iter().map(|r: &Record| r.payload.len()).sum();
            seg.read(
                at,
                end,
                max_count,
                max_bytes.saturating_sub(bytes_before).max(1),
                &mut out,
            )
            .map_err(MqError::storage)?;
            match out.last() {
                Some(r) if out.len() > before => at = r.offset + 1,
                _ => at = seg.next(),
            }
            if out.iter().map(|r| r.payload.len()).sum::<usize>() >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// The first offset whose publish time is at or after `ms` (the end if none).
    pub(crate) fn offset_for_time(&self, ms: u64) -> Result<u64> {
        let seg = {
            let segs = self.segments.read();
            segs.iter().find(|s| s.max_ms() >= ms).cloned()
        };
        let Some(seg) = seg else {
            return Ok(self.end());
        };
        let mut at = seg.offset_for_time(ms).max(self.start());
        let end = self.end();
        while at < end {
            let recs = self.read(at, 256, 1024 * 1024)?;
            let Some(last) = recs.last() else { break };
            for r in &recs {
                if crate::segment::publish_ms(&r.payload) >= ms {
                    return Ok(r.offset);
                }
            }
            at = last.offset + 1;
        }
        Ok(end)
    }
}

/// Fsyncs a directory so entries created in it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(MqError::storage)
}
