//! The committer: the one thread that owns every write. It drains the queue into
//! batches of up to `max_batch_requests` and commits each batch as one redb
//! transaction (group commit), in named steps: refuse what cannot be committed,
//! apply the requests, make the batch durable (one write-ahead-log record and its
//! fsync, or a redb checkpoint), then publish the revision, hand the events to the
//! watch hub and answer.
//!
//! Invariants:
//! - no request is answered before its batch is durable;
//! - `published` moves only after the commit: index entries above it, added while a
//!   batch is applied, stay invisible to readers until then;
//! - what the log could need (its next segment, a descriptor) is acquired before
//!   anything is applied, so running out of it refuses one batch and loses nothing;
//! - a failed commit stops the store (fail-stop).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use redb::{Durability, Table};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{Cmd, KV, LEASES, META, META_CHECKPOINT_LSN, META_COMPACT, META_REV, Shared, Store};
use crate::apply::{Applier, KvTable, LeaseTable, WriteReq, WriteResp};
use crate::error::{Result, StoreError};
use crate::types::Event;
use crate::wal::{self, Wal};

/// Log bytes after which the next batch is made durable in redb (a checkpoint).
const WAL_CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;

/// Starts the committer thread on `rx`, appending to `wal`.
pub(super) fn start(shared: &Arc<Shared>, rx: mpsc::Receiver<Cmd>, wal: Wal) -> Result<()> {
    // The committer holds the store weakly: dropping every handle drops the sender, which
    // ends the committer and closes the database (as `close` does, minus the wait).
    let committer_shared = Arc::downgrade(shared);
    let committer_runtime = shared.runtime.clone();
    let handle = std::thread::Builder::new()
        .name("meshwork-committer".into())
        .spawn(move || committer(committer_shared, committer_runtime, rx, wal))
        .map_err(|e| StoreError::Storage(format!("starting the committer thread: {e}")))?;
    *shared.committer.lock() = Some(handle);
    Ok(())
}

/// What the committer thread owns besides the queue.
struct Committer {
    /// The write-ahead-log record being built (reused across batches).
    buf: Vec<u8>,
    /// Scratch for encoding one change record (reused across batches).
    record_buf: Vec<u8>,
    wal: Wal,
    last_checkpoint: std::time::Instant,
}

fn committer(
    weak: Weak<Shared>,
    runtime: tokio::runtime::Handle,
    mut rx: mpsc::Receiver<Cmd>,
    wal: Wal,
) {
    // Lease deadlines set here must come from the runtime's clock (the one the lease loop
    // reads), not the OS clock: they differ when the clock is paused or advanced in tests.
    let _clock = runtime.enter();
    let mut state = Committer {
        buf: Vec::new(),
        record_buf: Vec::new(),
        wal,
        last_checkpoint: std::time::Instant::now(),
    };
    while let Some(first) = rx.blocking_recv() {
        // Gone: the request's sender is dropped unanswered, which its caller sees as `Stopped`.
        let Some(shared) = weak.upgrade() else { return };
        let mut batch = vec![first];
        while batch.len() < shared.cfg.max_batch_requests {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        commit_batch(&shared, batch, &mut state);
    }
    // Queue closed (close, or every handle dropped): a final checkpoint, so that the next
    // open has nothing to replay.
    if let Some(shared) = weak.upgrade()
        && !shared.failed.load(Ordering::Acquire)
        && let Err(e) = checkpoint(&shared, &mut state)
    {
        tracing::warn!(error = %e, "final checkpoint failed; the write-ahead log will be replayed on open");
    }
}

/// Makes everything committed so far durable in redb and truncates the log.
fn checkpoint(shared: &Shared, state: &mut Committer) -> Result<()> {
    let db_guard = shared.db.read();
    let db = db_guard.as_ref().ok_or(StoreError::Stopped)?;
    let wtx = db.begin_write().map_err(StoreError::storage)?;
    {
        let mut meta = wtx.open_table(META).map_err(StoreError::storage)?;
        let lsn = i64::try_from(state.wal.last_lsn()).map_err(StoreError::storage)?;
        meta.insert(META_CHECKPOINT_LSN, lsn)
            .map_err(StoreError::storage)?;
    }
    wtx.commit().map_err(StoreError::storage)?;
    state.last_checkpoint = std::time::Instant::now();
    drop_old_segments(&mut state.wal);
    Ok(())
}

/// Deletes log segments a checkpoint made unnecessary; one that cannot be
/// deleted now (no descriptors, say) is retried at the next checkpoint.
fn drop_old_segments(wal: &mut Wal) {
    if let Err(e) = wal.checkpointed() {
        tracing::warn!(error = %e, "deleting old write-ahead log segments failed; retried at the next checkpoint");
    }
}

/// Per-request results, the last revision, the compaction revision and the events of a batch.
type BatchOutcome = (Vec<Result<WriteResp>>, i64, i64, Vec<Event>);

/// What applying a batch produced, before it is committed.
struct Applied {
    /// Per-request results, in the batch's order.
    results: Vec<Result<WriteResp>>,
    /// The batch's last revision (`published` when it changed nothing).
    rev: i64,
    /// The compaction revision after the batch.
    compact: i64,
    /// The batch's events, for the watch hub once it is published.
    events: Vec<Event>,
    /// A compaction ran: the batch is made durable in redb (a checkpoint).
    compacted: bool,
    /// The batch's physical changes: its write-ahead-log record.
    log: Vec<u8>,
}

/// Commits one batch: refused whole, committed whole, or (on a storage failure) the
/// store stops. Every request is answered.
fn commit_batch(shared: &Arc<Shared>, batch: Vec<Cmd>, state: &mut Committer) {
    let started = std::time::Instant::now();
    let n = batch.len();
    let (reqs, replies): (Vec<WriteReq>, Vec<oneshot::Sender<Result<WriteResp>>>) =
        batch.into_iter().map(|Cmd::Write(r, tx)| (r, tx)).unzip();
    if let Err(err) = admit(shared, state) {
        for tx in replies {
            let _ = tx.send(Err(err.clone()));
        }
        return;
    }
    let published = shared.published.load(Ordering::Acquire);
    match write_batch(shared, &reqs, published, state) {
        Ok(outcome) => publish(shared, published, outcome, replies, started, n),
        Err(e) => fail_stop(shared, e, replies),
    }
}

/// Refuses a batch before anything is applied: the store has failed (`Stopped`), or
/// the log cannot make what a commit could need (`Exhausted`, retryable).
fn admit(shared: &Shared, state: &mut Committer) -> Result<()> {
    if shared.failed.load(Ordering::Acquire) {
        return Err(StoreError::Stopped);
    }
    // Everything the log could need a descriptor or disk space for, before
    // anything is applied: a failure here refuses this batch and loses nothing.
    if let Err(e) = state.wal.prepare() {
        tracing::warn!(error = %e, "write-ahead log cannot make its next segment; refusing this batch, the next one retries");
        metrics::counter!("meshwork_store_refused_batches_total").increment(1);
        return Err(StoreError::Exhausted(format!("write-ahead log: {e}")));
    }
    Ok(())
}

/// Applies the batch in one redb transaction, makes it durable and commits it.
fn write_batch(
    shared: &Shared,
    reqs: &[WriteReq],
    published: i64,
    state: &mut Committer,
) -> Result<BatchOutcome> {
    let db_guard = shared.db.read();
    let db = db_guard.as_ref().ok_or(StoreError::Stopped)?;
    let mut wtx = db.begin_write().map_err(StoreError::storage)?;
    let mut applied;
    let durable;
    {
        let mut kv = wtx.open_table(KV).map_err(StoreError::storage)?;
        let mut leases = wtx.open_table(LEASES).map_err(StoreError::storage)?;
        applied = apply_requests(shared, &mut kv, &mut leases, reqs, published, state)?;
        let mut meta = wtx.open_table(META).map_err(StoreError::storage)?;
        durable = make_durable(shared, &mut meta, &mut applied, state)?;
        state.buf = std::mem::take(&mut applied.log);
    }
    if !durable {
        wtx.set_durability(Durability::None)
            .map_err(StoreError::storage)?;
    }
    wtx.commit().map_err(StoreError::storage)?;
    if durable {
        state.last_checkpoint = std::time::Instant::now();
        drop_old_segments(&mut state.wal);
    }
    Ok((
        applied.results,
        applied.rev,
        applied.compact,
        applied.events,
    ))
}

/// Applies each request in order to the tables, the lessor and the index. A storage
/// error ends the batch; any other error is that request's answer.
fn apply_requests<'t>(
    shared: &Shared,
    kv: &mut KvTable<'t>,
    leases: &mut LeaseTable<'t>,
    reqs: &[WriteReq],
    published: i64,
    state: &mut Committer,
) -> Result<Applied> {
    let mut log = std::mem::take(&mut state.buf);
    log.clear();
    let mut lessor = shared.lessor.lock();
    let mut applier = Applier {
        kv,
        leases,
        lessor: &mut lessor,
        rev: published,
        published,
        compact_rev: shared.compact_rev.load(Ordering::Acquire),
        events: Vec::new(),
        want_prev: shared.hub.wants_prev_kv(),
        no_space: shared.no_space.load(Ordering::Acquire),
        now: Instant::now(),
        buf: std::mem::take(&mut state.record_buf),
        log,
        compacted: false,
    };
    let mut out = Vec::with_capacity(reqs.len());
    for req in reqs {
        let mut index = shared.index.write();
        let before = applier.compact_rev;
        let r = applier.apply(&mut index, req);
        if applier.compact_rev != before {
            // Readers below the new compaction revision must fail from now on.
            shared
                .compact_rev
                .store(applier.compact_rev, Ordering::Release);
        }
        drop(index);
        match r {
            Err(StoreError::Storage(e)) => return Err(StoreError::Storage(e)),
            r => out.push(r),
        }
    }
    state.record_buf = std::mem::take(&mut applier.buf);
    Ok(Applied {
        results: out,
        rev: applier.rev,
        compact: applier.compact_rev,
        events: std::mem::take(&mut applier.events),
        compacted: applier.compacted,
        log: std::mem::take(&mut applier.log),
    })
}

/// Records the batch's revisions in `meta` and decides how it becomes durable: in
/// redb at this commit (a checkpoint; returns true), or through its log record,
/// appended and fsynced here, with a cheap redb commit.
fn make_durable(
    shared: &Shared,
    meta: &mut Table<'_, &'static str, i64>,
    applied: &mut Applied,
    state: &mut Committer,
) -> Result<bool> {
    meta.insert(META_REV, applied.rev)
        .map_err(StoreError::storage)?;
    meta.insert(META_COMPACT, applied.compact)
        .map_err(StoreError::storage)?;
    // Durable in redb now (a checkpoint), or durable through the log and cheap in redb.
    let durable = applied.compacted
        || state.last_checkpoint.elapsed() >= shared.cfg.checkpoint_interval
        || state.wal.bytes_since_checkpoint >= WAL_CHECKPOINT_BYTES;
    if durable {
        let lsn = i64::try_from(state.wal.last_lsn()).map_err(StoreError::storage)?;
        meta.insert(META_CHECKPOINT_LSN, lsn)
            .map_err(StoreError::storage)?;
    } else if !applied.log.is_empty() {
        wal::encode_revision(&mut applied.log, applied.rev);
        state
            .wal
            .append(&applied.log)
            .map_err(|e| StoreError::Storage(format!("write-ahead log: {e}")))?;
    }
    Ok(durable)
}

/// After the commit (`started` at the batch's start, `n` requests): publishes the
/// revision and the commit's metrics, hands the events to the watch hub
/// (watchers that fell behind are caught up from disk), answers every request and
/// checks the quota.
fn publish(
    shared: &Arc<Shared>,
    published: i64,
    outcome: BatchOutcome,
    replies: Vec<oneshot::Sender<Result<WriteResp>>>,
    started: std::time::Instant,
    n: usize,
) {
    let (results, rev, _compact, events) = outcome;
    shared.published.store(rev, Ordering::Release);
    let elapsed = started.elapsed();
    metrics::histogram!("meshwork_store_commit_seconds").record(elapsed.as_secs_f64());
    metrics::histogram!("meshwork_store_commit_batch_requests").record(n as f64);
    metrics::gauge!("meshwork_store_revision").set(rev as f64);
    if rev > published || !events.is_empty() {
        let behind = shared.hub.publish(published + 1, rev, &events);
        for b in behind {
            let store = Store {
                shared: shared.clone(),
            };
            shared.runtime.spawn(store.catch_up(b));
        }
    }
    for (tx, r) in replies.into_iter().zip(results) {
        let _ = tx.send(r);
    }
    Store {
        shared: shared.clone(),
    }
    .check_quota();
}

/// A commit failed: the state on disk is unknown, so the store stops taking
/// requests (fail-stop) and every request of the batch gets the error.
fn fail_stop(shared: &Shared, e: StoreError, replies: Vec<oneshot::Sender<Result<WriteResp>>>) {
    tracing::error!(error = %e, "commit failed; the store stops taking writes (restart to recover from disk)");
    shared.failed.store(true, Ordering::Release);
    for tx in replies {
        let _ = tx.send(Err(e.clone()));
    }
}
