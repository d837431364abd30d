//! The span store: append-only segment files written by one writer thread
//! with group commit, retention by bytes and by age (oldest segment first),
//! and the in-memory index queries read.
//!
//! A segment `NNNNNNNNNN.spans` is an 8-byte magic and then records
//! `[payload length u32 LE][crc32 of the payload u32 LE][payload]`, the
//! payload a `StoredSpan`. On open every segment is read back to rebuild the
//! index; a torn tail (a crash mid-append) ends the newest segment there.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use parking_lot::{Mutex, RwLock};

use crate::index::{Edge, Index, Loc, Query, TraceSummary};
use crate::model::{self, Prepared, StoredSpan};

const MAGIC: &[u8; 8] = b"MWSPANS1";
const HEADER: usize = 8;

/// The trace store's settings.
#[derive(Clone, Debug)]
pub struct TracesConfig {
    /// Directory of the segment files (created if missing).
    pub dir: PathBuf,
    /// Bytes kept on disk at most; the oldest segment goes first.
    pub max_bytes: u64,
    /// Age after which a segment goes (by its newest span's arrival).
    pub max_age: Duration,
    /// Size at which a segment is closed and a new one started.
    pub segment_bytes: u64,
    /// fsync each group of appended spans before acknowledging the export
    /// (false: acknowledged once written to the page cache).
    pub fsync: bool,
    /// Spans waiting to be written at most; exports past it are refused
    /// with "unavailable" (retryable) and counted.
    pub queue_spans: usize,
    /// Largest span accepted, encoded.
    pub max_span_bytes: usize,
    /// Largest export request body accepted (OTLP/HTTP and OTLP/gRPC).
    pub max_request_bytes: usize,
    /// Keep whole traces by their outcome (errors, slow ones, a share of the
    /// rest) instead of every span. With it, an export is answered once its
    /// spans wait in memory for their trace's decision; what is kept is then
    /// written as above.
    pub tail_sampling: Option<crate::sampling::TailSampling>,
}

impl Default for TracesConfig {
    fn default() -> Self {
        TracesConfig {
            dir: PathBuf::from("traces"),
            max_bytes: 512 << 20,
            max_age: Duration::from_secs(24 * 3600),
            segment_bytes: 32 << 20,
            fsync: true,
            queue_spans: 100_000,
            max_span_bytes: 256 << 10,
            max_request_bytes: 4 << 20,
            tail_sampling: None,
        }
    }
}

/// What can go wrong in the trace store.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// A file could not be read or written.
    #[error("trace store I/O on {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The settings are not usable.
    #[error("trace store settings: {0}")]
    Config(String),
    /// Too many spans are waiting to be written.
    #[error("the trace store's queue is full ({0} spans waiting); retry later")]
    Busy(usize),
    /// The store stopped taking spans (closed, or a write failed).
    #[error("the trace store is not taking spans: {0}")]
    Stopped(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TraceError + '_ {
    move |source| TraceError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What an export did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ingested {
    /// Spans stored.
    pub accepted: u64,
    /// Spans refused as invalid.
    pub rejected: u64,
    /// Why the first refused span was refused.
    pub message: Option<String>,
}

/// The store's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TraceStats {
    /// Spans indexed.
    pub spans: usize,
    /// Traces indexed.
    pub traces: usize,
    /// Segment files.
    pub segments: usize,
    /// Bytes on disk.
    pub bytes: u64,
    /// Spans accepted since start.
    pub received: u64,
    /// Spans refused as invalid since start.
    pub rejected: u64,
    /// Spans refused because the queue was full since start.
    pub refused_busy: u64,
    /// Spans removed by retention since start.
    pub expired: u64,
    /// Spans of traces tail sampling dropped since start.
    pub sampled_out: u64,
    /// Spans waiting for their trace's sampling decision.
    pub pending_decision: usize,
    /// The retention limits.
    pub max_bytes: u64,
    /// Retention by age, seconds.
    pub max_age_secs: u64,
}

struct Segment {
    file: Arc<File>,
    bytes: u64,
    /// Arrival time of its newest span (ns since the epoch).
    newest_ns: u64,
}

struct Shared {
    cfg: TracesConfig,
    index: RwLock<Index>,
    segments: RwLock<BTreeMap<u32, Segment>>,
    queued: AtomicUsize,
    received: AtomicU64,
    rejected: AtomicU64,
    refused: AtomicU64,
    expired: AtomicU64,
    sampled_out: AtomicU64,
    failed: Mutex<Option<String>>,
    sampler: Option<Mutex<crate::sampling::Sampler>>,
}

struct Batch {
    spans: Vec<Prepared>,
    done: tokio::sync::oneshot::Sender<Result<(), TraceError>>,
}

/// The trace store (cheap to clone; every clone is the same store).
#[derive(Clone)]
pub struct TraceStore {
    shared: Arc<Shared>,
    tx: Arc<Mutex<Option<mpsc::Sender<Batch>>>>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn seg_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:010}.spans"))
}

impl TraceStore {
    /// Opens (or creates) the store in `cfg.dir`, reading every segment back
    /// into the index.
    pub fn open(cfg: TracesConfig) -> Result<TraceStore, TraceError> {
        if cfg.max_bytes < 1 << 20 || cfg.segment_bytes < 64 << 10 {
            return Err(TraceError::Config(
                "max_bytes must be at least 1 MiB and segment_bytes at least 64 KiB".into(),
            ));
        }
        if cfg.queue_spans == 0 || cfg.max_span_bytes == 0 || cfg.max_request_bytes == 0 {
            return Err(TraceError::Config(
                "queue_spans, max_span_bytes and max_request_bytes must be positive".into(),
            ));
        }
        let mut cfg = cfg;
        // At least four segments fit in the budget, so retention drops a
        // quarter of the data at most, and no segment outgrows the u32 offsets.
        cfg.segment_bytes = cfg.segment_bytes.min(cfg.max_bytes / 4).min(1 << 30);
        fs::create_dir_all(&cfg.dir).map_err(io(&cfg.dir))?;
        let mut ids: Vec<u32> = fs::read_dir(&cfg.dir)
            .map_err(io(&cfg.dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".spans")?.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        let mut index = Index::default();
        let mut segments = BTreeMap::new();
        let last = ids.last().copied();
        for id in ids {
            let path = seg_path(&cfg.dir, id);
            let (file, bytes, newest) = recover(&path, id, &mut index, Some(id) == last)?;
            segments.insert(
                id,
                Segment {
                    file: Arc::new(file),
                    bytes,
                    newest_ns: newest,
                },
            );
        }
        let cfg_sampling = cfg.tail_sampling.clone();
        let shared = Arc::new(Shared {
            cfg,
            index: RwLock::new(index),
            segments: RwLock::new(segments),
            queued: AtomicUsize::new(0),
            received: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            sampled_out: AtomicU64::new(0),
            failed: Mutex::new(None),
            sampler: cfg_sampling.map(|t| Mutex::new(crate::sampling::Sampler::new(t))),
        });
        let (tx, rx) = mpsc::channel();
        let s2 = shared.clone();
        let writer = std::thread::Builder::new()
            .name("trace-writer".into())
            .spawn(move || writer_loop(s2, rx))
            .map_err(|e| TraceError::Io {
                path: "trace writer thread".into(),
                source: e,
            })?;
        let store = TraceStore {
            shared,
            tx: Arc::new(Mutex::new(Some(tx))),
            writer: Arc::new(Mutex::new(Some(writer))),
        };
        store.publish_gauges();
        Ok(store)
    }

    /// The settings in force.
    pub fn config(&self) -> &TracesConfig {
        &self.shared.cfg
    }

    /// Stores the valid spans of an export request once they are written (and
    /// fsynced, unless configured otherwise); invalid spans are counted and
    /// reported, not stored.
    pub async fn ingest(&self, req: ExportTraceServiceRequest) -> Result<Ingested, TraceError> {
        let mut split = model::split(req, self.shared.cfg.max_span_bytes);
        let received = split.spans.len();
        if let Some(sampler) = &self.shared.sampler {
            let d = sampler
                .lock()
                .add(std::mem::take(&mut split.spans), std::time::Instant::now());
            self.sampled_out(d.dropped);
            split.spans = d.keep;
        }
        let n = split.spans.len();
        self.shared
            .rejected
            .fetch_add(split.rejected, Ordering::Relaxed);
        metrics::counter!("meshwork_traces_spans_rejected_total", "reason" => "invalid")
            .increment(split.rejected);
        if n > 0 {
            if let Some(why) = self.shared.failed.lock().clone() {
                return Err(TraceError::Stopped(why));
            }
            let cap = self.shared.cfg.queue_spans;
            let before = self.shared.queued.fetch_add(n, Ordering::AcqRel);
            if before + n > cap && before > 0 {
                self.shared.queued.fetch_sub(n, Ordering::AcqRel);
                self.shared.refused.fetch_add(n as u64, Ordering::Relaxed);
                metrics::counter!("meshwork_traces_spans_rejected_total", "reason" => "busy")
                    .increment(n as u64);
                return Err(TraceError::Busy(before));
            }
            let (done, wait) = tokio::sync::oneshot::channel();
            let sent = self.tx.lock().as_ref().map(|tx| {
                tx.send(Batch {
                    spans: split.spans,
                    done,
                })
            });
            if !matches!(sent, Some(Ok(()))) {
                self.shared.queued.fetch_sub(n, Ordering::AcqRel);
                return Err(TraceError::Stopped("the store is closed".into()));
            }
            match wait.await {
                Ok(r) => r?,
                Err(_) => return Err(TraceError::Stopped("the writer stopped".into())),
            }
        }
        self.shared
            .received
            .fetch_add(received as u64, Ordering::Relaxed);
        metrics::counter!("meshwork_traces_spans_received_total").increment(received as u64);
        Ok(Ingested {
            accepted: received as u64,
            rejected: split.rejected,
            message: split.first_error,
        })
    }

    fn sampled_out(&self, n: usize) {
        if n > 0 {
            self.shared
                .sampled_out
                .fetch_add(n as u64, Ordering::Relaxed);
            metrics::counter!("meshwork_traces_spans_sampled_out_total").increment(n as u64);
        }
    }

    /// Traces matching `q`, newest first.
    pub fn search(&self, q: &Query) -> Result<Vec<TraceSummary>, TraceError> {
        let limit = q.limit.max(1);
        let index = self.shared.index.read();
        if q.slowest_first {
            // The `limit` longest among the matching traces: a min-heap of
            // (duration, id) holding the best so far.
            use std::cmp::Reverse;
            let mut heap: std::collections::BinaryHeap<Reverse<(u64, [u8; 16])>> =
                std::collections::BinaryHeap::with_capacity(limit + 1);
            for (id, t, on_disk) in index
                .candidates(q)
                .take(crate::index::MAX_SORTED_CANDIDATES)
            {
                let dur = t.end_ns.saturating_sub(t.start_ns);
                if heap.len() >= limit && heap.peek().is_some_and(|Reverse((d, _))| *d >= dur) {
                    continue;
                }
                if on_disk && !self.verify(&index, t, q)? {
                    continue;
                }
                heap.push(Reverse((dur, id)));
                if heap.len() > limit {
                    heap.pop();
                }
            }
            let mut top: Vec<(u64, [u8; 16])> = heap.into_iter().map(|Reverse(x)| x).collect();
            top.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            return Ok(top
                .into_iter()
                .filter_map(|(_, id)| index.trace(&id).map(|t| index.summary(&id, t)))
                .collect());
        }
        let mut out = Vec::new();
        for (id, t, on_disk) in index.candidates(q) {
            if out.len() >= limit {
                break;
            }
            if on_disk && !self.verify(&index, t, q)? {
                continue;
            }
            out.push(index.summary(&id, t));
        }
        Ok(out)
    }

    /// Checks a candidate's operation name and attributes on disk: some span
    /// must match the span filters and every attribute must be on some span.
    fn verify(
        &self,
        index: &Index,
        t: &crate::index::TraceEntry,
        q: &Query,
    ) -> Result<bool, TraceError> {
        let mut found = vec![false; q.attributes.len()];
        let mut span_match = false;
        for s in &t.spans {
            let Some(stored) = self.read(s.loc)? else {
                continue;
            };
            let Some(span) = stored.span else { continue };
            for (i, (k, v)) in q.attributes.iter().enumerate() {
                if !found[i]
                    && span.attributes.iter().any(|kv| {
                        kv.key == *k
                            && kv
                                .value
                                .as_ref()
                                .and_then(model::scalar_text)
                                .is_some_and(|t| t == *v)
                    })
                {
                    found[i] = true;
                }
            }
            if !span_match
                && q.service
                    .as_deref()
                    .is_none_or(|sv| sv == index.service_name(s.service))
                && q.operation.as_deref().is_none_or(|o| o == span.name)
                && q.min_duration_ns.is_none_or(|m| s.dur_ns >= m)
                && q.max_duration_ns.is_none_or(|m| s.dur_ns <= m)
            {
                span_match = true;
            }
        }
        Ok(span_match && found.iter().all(|f| *f))
    }

    /// Reads one record.
    fn read(&self, loc: Loc) -> Result<Option<StoredSpan>, TraceError> {
        let file = match self.shared.segments.read().get(&loc.seg) {
            Some(s) => s.file.clone(),
            None => return Ok(None),
        };
        let mut buf = vec![0; loc.len as usize];
        file.read_exact_at(&mut buf, u64::from(loc.off))
            .map_err(|source| TraceError::Io {
                path: seg_path(&self.shared.cfg.dir, loc.seg)
                    .display()
                    .to_string(),
                source,
            })?;
        Ok(model::decode(&buf))
    }

    /// Every stored span of a trace, ordered by start time (`None`: unknown trace).
    pub fn trace(&self, id: &[u8; 16]) -> Result<Option<Vec<StoredSpan>>, TraceError> {
        let locs: Vec<Loc> = match self.shared.index.read().trace(id) {
            Some(t) => t.spans.iter().map(|s| s.loc).collect(),
            None => return Ok(None),
        };
        let mut spans = Vec::with_capacity(locs.len());
        for loc in locs {
            if let Some(s) = self.read(loc)? {
                spans.push(s);
            }
        }
        spans.sort_by_key(|s| s.span.as_ref().map_or(0, |s| s.start_time_unix_nano));
        Ok(Some(spans))
    }

    /// The service dependency graph over traces that started in `[lo, hi]`
    /// (ns), from at most `max_traces` of the newest; also how many traces
    /// were looked at.
    pub fn dependencies(&self, lo: u64, hi: u64, max_traces: usize) -> (Vec<Edge>, usize) {
        self.shared.index.read().dependencies(lo, hi, max_traces)
    }

    /// Services with their operation names.
    pub fn services(&self) -> Vec<(String, Vec<String>)> {
        self.shared.index.read().services()
    }

    /// The store's figures.
    pub fn stats(&self) -> TraceStats {
        let (spans, traces) = {
            let i = self.shared.index.read();
            (i.span_count(), i.trace_count())
        };
        let segs = self.shared.segments.read();
        TraceStats {
            spans,
            traces,
            segments: segs.len(),
            bytes: segs.values().map(|s| s.bytes).sum(),
            received: self.shared.received.load(Ordering::Relaxed),
            rejected: self.shared.rejected.load(Ordering::Relaxed),
            refused_busy: self.shared.refused.load(Ordering::Relaxed),
            expired: self.shared.expired.load(Ordering::Relaxed),
            sampled_out: self.shared.sampled_out.load(Ordering::Relaxed),
            pending_decision: self
                .shared
                .sampler
                .as_ref()
                .map_or(0, |s| s.lock().pending_spans()),
            max_bytes: self.shared.cfg.max_bytes,
            max_age_secs: self.shared.cfg.max_age.as_secs(),
        }
    }

    fn publish_gauges(&self) {
        publish(&self.shared);
    }

    /// Stops the writer after it has written what is queued.
    pub fn close(&self) {
        drop(self.tx.lock().take());
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
    }
}

fn publish(shared: &Shared) {
    let (spans, traces) = {
        let i = shared.index.read();
        (i.span_count(), i.trace_count())
    };
    let segs = shared.segments.read();
    metrics::gauge!("meshwork_traces_spans").set(spans as f64);
    metrics::gauge!("meshwork_traces_traces").set(traces as f64);
    metrics::gauge!("meshwork_traces_disk_bytes")
        .set(segs.values().map(|s| s.bytes).sum::<u64>() as f64);
}

/// Reads a segment back into the index; a torn or corrupt tail of the newest
/// segment is cut off (older segments are only read up to it).
fn recover(
    path: &Path,
    id: u32,
    index: &mut Index,
    newest: bool,
) -> Result<(File, u64, u64), TraceError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io(path))?;
    let mut data = Vec::new();
    file.read_to_end(&mut data).map_err(io(path))?;
    let mtime = file
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    if data.len() < HEADER || &data[..HEADER] != MAGIC {
        if data.len() < HEADER && MAGIC.starts_with(&data) {
            // Created but the header never made it: start it again.
            file.set_len(0).map_err(io(path))?;
            file.write_all_at(MAGIC, 0).map_err(io(path))?;
            return Ok((file, HEADER as u64, mtime));
        }
        return Err(TraceError::Config(format!(
            "{} is not a Meshwork span segment (remove it, or point the store at another directory)",
            path.display()
        )));
    }
    let mut off = HEADER;
    while off + 8 <= data.len() {
        let len =
            u32::from_le_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]]) as usize;
        let crc = u32::from_le_bytes([data[off + 4], data[off + 5], data[off + 6], data[off + 7]]);
        let start = off + 8;
        let Some(payload) = data.get(start..start + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        if let Some(meta) = model::decode(payload).as_ref().and_then(model::meta_of) {
            index.insert(
                &meta,
                Loc {
                    seg: id,
                    off: start as u32,
                    len: len as u32,
                },
            );
        }
        off = start + len;
    }
    if off < data.len() {
        if newest {
            tracing::warn!(segment = %path.display(), kept = off, dropped = data.len() - off,
                "trace segment ends in a torn or corrupt record; cutting it off");
            file.set_len(off as u64).map_err(io(path))?;
        } else {
            tracing::warn!(segment = %path.display(), kept = off,
                "trace segment has a corrupt record; the spans after it are not indexed");
        }
    }
    Ok((file, off as u64, mtime))
}

/// The writer: takes every batch waiting, appends them in one write, fsyncs
/// once (group commit), indexes, acknowledges; enforces retention.
fn writer_loop(shared: Arc<Shared>, rx: mpsc::Receiver<Batch>) {
    let mut last_gauges = std::time::Instant::now();
    let mut last_sweep = std::time::Instant::now();
    let tick = if shared.sampler.is_some() {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(1)
    };
    loop {
        let first = match rx.recv_timeout(tick) {
            Ok(b) => Some(b),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Closing: every pending trace is decided and what is kept written.
                sweep(&shared, true);
                break;
            }
        };
        if last_sweep.elapsed() >= tick {
            sweep(&shared, false);
            last_sweep = std::time::Instant::now();
        }
        let mut batches: Vec<Batch> = first.into_iter().collect();
        while batches.len() < 1024 {
            match rx.try_recv() {
                Ok(b) => batches.push(b),
                Err(_) => break,
            }
        }
        if !batches.is_empty() {
            let n: usize = batches.iter().map(|b| b.spans.len()).sum();
            let result = append(&shared, &mut batches);
            shared.queued.fetch_sub(n, Ordering::AcqRel);
            for b in batches {
                let _ = b.done.send(match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(TraceError::Stopped(e.to_string())),
                });
            }
            if let Err(e) = result {
                tracing::error!(error = %e, "trace store write failed; it stops taking spans");
                *shared.failed.lock() = Some(e.to_string());
            }
        }
        if let Err(e) = retain(&shared) {
            tracing::warn!(error = %e, "trace retention could not remove a segment");
        }
        if last_gauges.elapsed() >= Duration::from_secs(1) {
            publish(&shared);
            last_gauges = std::time::Instant::now();
        }
    }
    publish(&shared);
}

/// Writes the traces tail sampling decided to keep (all pending ones when
/// `all`).
fn sweep(shared: &Shared, all: bool) {
    let Some(sampler) = &shared.sampler else {
        return;
    };
    let now = std::time::Instant::now();
    let d = {
        let mut s = sampler.lock();
        if all { s.all(now) } else { s.due(now) }
    };
    if d.dropped > 0 {
        shared
            .sampled_out
            .fetch_add(d.dropped as u64, Ordering::Relaxed);
        metrics::counter!("meshwork_traces_spans_sampled_out_total").increment(d.dropped as u64);
    }
    if d.keep.is_empty() {
        return;
    }
    let (done, _) = tokio::sync::oneshot::channel();
    if let Err(e) = append(
        shared,
        &mut [Batch {
            spans: d.keep,
            done,
        }],
    ) {
        tracing::error!(error = %e, "trace store write failed; it stops taking spans");
        *shared.failed.lock() = Some(e.to_string());
    }
}

/// Appends the batches' spans to the newest segment (rotating when it is
/// full), then indexes them.
fn append(shared: &Shared, batches: &mut [Batch]) -> Result<(), TraceError> {
    if let Some(why) = shared.failed.lock().clone() {
        return Err(TraceError::Stopped(why));
    }
    let cfg = &shared.cfg;
    let mut placed: Vec<(usize, usize, Loc)> = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let (mut seg, mut base) = current(shared)?;
    let mut touched = Vec::new();
    for (bi, b) in batches.iter().enumerate() {
        for (si, p) in b.spans.iter().enumerate() {
            if base + buf.len() as u64 + 8 + p.bytes.len() as u64 > cfg.segment_bytes
                && base + (buf.len() as u64) > HEADER as u64
            {
                write_out(shared, seg, &buf)?;
                touched.push(seg);
                buf.clear();
                seg = rotate(shared, seg)?;
                base = HEADER as u64;
            }
            let off = base + buf.len() as u64 + 8;
            buf.extend_from_slice(&(p.bytes.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(&p.bytes).to_le_bytes());
            buf.extend_from_slice(&p.bytes);
            placed.push((
                bi,
                si,
                Loc {
                    seg,
                    off: off as u32,
                    len: p.bytes.len() as u32,
                },
            ));
        }
    }
    write_out(shared, seg, &buf)?;
    touched.push(seg);
    if cfg.fsync {
        let files: Vec<Arc<File>> = {
            let segs = shared.segments.read();
            touched
                .iter()
                .filter_map(|id| segs.get(id).map(|s| s.file.clone()))
                .collect()
        };
        for f in files {
            f.sync_data().map_err(io(&cfg.dir))?;
        }
    }
    let mut index = shared.index.write();
    for (bi, si, loc) in placed {
        index.insert(&batches[bi].spans[si].meta, loc);
    }
    Ok(())
}

/// The newest segment and its length, creating the first one.
fn current(shared: &Shared) -> Result<(u32, u64), TraceError> {
    if let Some((id, s)) = shared.segments.read().iter().next_back() {
        return Ok((*id, s.bytes));
    }
    create(shared, 1).map(|id| (id, HEADER as u64))
}

fn create(shared: &Shared, id: u32) -> Result<u32, TraceError> {
    let path = seg_path(&shared.cfg.dir, id);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io(&path))?;
    f.write_all(MAGIC).map_err(io(&path))?;
    if shared.cfg.fsync {
        f.sync_all().map_err(io(&path))?;
        if let Ok(d) = File::open(&shared.cfg.dir) {
            let _ = d.sync_all();
        }
    }
    shared.segments.write().insert(
        id,
        Segment {
            file: Arc::new(f),
            bytes: HEADER as u64,
            newest_ns: now_ns(),
        },
    );
    Ok(id)
}

fn rotate(shared: &Shared, seg: u32) -> Result<u32, TraceError> {
    if shared.cfg.fsync {
        let f = shared.segments.read().get(&seg).map(|s| s.file.clone());
        if let Some(f) = f {
            f.sync_data().map_err(io(&shared.cfg.dir))?;
        }
    }
    create(shared, seg + 1)
}

fn write_out(shared: &Shared, seg: u32, buf: &[u8]) -> Result<(), TraceError> {
    if buf.is_empty() {
        return Ok(());
    }
    let (file, at) = {
        let segs = shared.segments.read();
        let s = segs
            .get(&seg)
            .ok_or_else(|| TraceError::Stopped(format!("segment {seg} vanished")))?;
        (s.file.clone(), s.bytes)
    };
    file.write_all_at(buf, at)
        .map_err(io(&seg_path(&shared.cfg.dir, seg)))?;
    let mut segs = shared.segments.write();
    if let Some(s) = segs.get_mut(&seg) {
        s.bytes += buf.len() as u64;
        s.newest_ns = now_ns();
    }
    Ok(())
}

/// Removes the oldest segments while the store is over its byte budget or
/// they are older than the age limit (the newest segment is rotated first
/// when it alone is too old, so that it can go too).
fn retain(shared: &Shared) -> Result<(), TraceError> {
    let cfg = &shared.cfg;
    let now = now_ns();
    let max_age = cfg.max_age.as_nanos() as u64;
    loop {
        let victim = {
            let segs = shared.segments.read();
            let total: u64 = segs.values().map(|s| s.bytes).sum();
            let Some((&oldest, s)) = segs.iter().next() else {
                return Ok(());
            };
            let newest = segs.keys().next_back().copied();
            let too_old = now.saturating_sub(s.newest_ns) > max_age && s.bytes > HEADER as u64;
            if total > cfg.max_bytes || too_old {
                if Some(oldest) == newest {
                    if too_old {
                        drop(segs);
                        // The only segment is too old: start a fresh one so it can go.
                        rotate(shared, oldest)?;
                        continue;
                    }
                    return Ok(());
                }
                oldest
            } else {
                return Ok(());
            }
        };
        let dropped = shared.index.write().drop_segment(victim);
        shared.segments.write().remove(&victim);
        shared.expired.fetch_add(dropped as u64, Ordering::Relaxed);
        metrics::counter!("meshwork_traces_spans_expired_total").increment(dropped as u64);
        let path = seg_path(&cfg.dir, victim);
        fs::remove_file(&path).map_err(io(&path))?;
        tracing::debug!(
            segment = victim,
            spans = dropped,
            "trace segment removed by retention"
        );
    }
}
