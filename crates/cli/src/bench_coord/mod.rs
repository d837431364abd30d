//! `meshwork bench registry` and `meshwork bench config`: load generators for a node's
//! coordination HTTP API (registration throughput, sustained heartbeats, change-to-watcher
//! delivery over blocking queries, config publish-to-listener delivery over long-polls),
//! on keep-alive HTTP/1.1 connections, each used by one task at a time.
//!
//! Latencies are measured in this process with the monotonic clock: the generator records
//! t0 just before the call that makes a change, each watcher records when its answer
//! arrived, and the latency is the difference. [`Slot`] and [`drive_changes`] are that
//! measurement, shared by both benches; `registry` and `config` are the scenarios.

mod config;
mod registry;
mod watch;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use meshwork_loadgen::Errors;
use meshwork_loadgen::latency::Latency;
use parking_lot::Mutex;

pub(crate) use config::{ConfigBench, config};
pub(crate) use registry::{RegistryBench, registry};

/// Deadline of an ordinary request.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a blocking query or long-poll waits on the server.
const WAIT_SECS: u64 = 60;
/// Deadline of a blocking query or long-poll (server wait plus slack).
const WAIT_TIMEOUT: Duration = Duration::from_secs(WAIT_SECS + 30);
/// How long the generator waits for one change to reach every watcher.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the generator waits for its watchers to start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The change currently being delivered to one target (service or config entry).
#[derive(Default)]
struct Slot {
    /// t0 of the change in flight (None between changes).
    t0: Mutex<Option<Instant>>,
    /// Deliveries of the change in flight.
    delivered: AtomicU64,
    /// Answers that moved but arrived while no change was in flight.
    stray: AtomicU64,
}

impl Slot {
    /// Records one delivery arriving at `at` into `h`.
    fn deliver(&self, at: Instant, h: &Mutex<Latency>) {
        let t0 = *self.t0.lock();
        match t0 {
            Some(t0) => {
                h.lock().record(at.saturating_duration_since(t0));
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                self.stray.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Arms the slot for a new change; returns its t0.
    fn arm(&self) -> Instant {
        self.delivered.store(0, Ordering::Relaxed);
        let t0 = Instant::now();
        *self.t0.lock() = Some(t0);
        t0
    }

    /// Waits until `expected` deliveries arrived (or the timeout); disarms; returns the
    /// number delivered.
    async fn wait(&self, expected: u64) -> u64 {
        let deadline = Instant::now() + DELIVERY_TIMEOUT;
        while self.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        *self.t0.lock() = None;
        self.delivered.load(Ordering::Relaxed)
    }
}

/// What a run of changes delivered.
struct Tally {
    /// Deliveries that arrived in time.
    delivered: u64,
    /// Deliveries expected but not seen within [`DELIVERY_TIMEOUT`].
    missed: u64,
    /// Changes whose call failed.
    change_errors: u64,
    /// Latency of the calls that made the changes.
    call: Latency,
    /// Wall time of the run.
    elapsed: Duration,
}

/// Makes `count` changes round-robin over `slots`: arms the target's slot, makes change
/// `k` on target `t` with `change(k, t)`, waits for the target's `expected[t]` deliveries,
/// pauses `gap`; a failed change is counted and recorded in `errors` under "change".
async fn drive_changes(
    label: &str,
    slots: &[Slot],
    expected: &[u64],
    count: u64,
    gap: Duration,
    errors: &Errors,
    mut change: impl AsyncFnMut(u64, usize) -> Result<()>,
) -> Tally {
    let mut tally = Tally {
        delivered: 0,
        missed: 0,
        change_errors: 0,
        call: Latency::new(),
        elapsed: Duration::ZERO,
    };
    let started = Instant::now();
    for k in 0..count {
        let t = (k as usize) % slots.len();
        let t0 = slots[t].arm();
        let r = change(k, t).await;
        tally.call.record(t0.elapsed());
        if let Err(e) = r {
            tally.change_errors += 1;
            errors.add("change", &e);
            slots[t].wait(0).await;
            continue;
        }
        let got = slots[t].wait(expected[t]).await;
        tally.delivered += got;
        tally.missed += expected[t].saturating_sub(got);
        progress!(
            "\r{label}: change {}/{count}  delivered {}  missed {}   ",
            k + 1,
            tally.delivered,
            tally.missed
        );
        tokio::time::sleep(gap).await;
    }
    progress_end!();
    tally.elapsed = started.elapsed();
    tally
}

/// Waits (up to [`START_TIMEOUT`]) until `want` watchers counted themselves in `ready`,
/// then one more second for their requests to reach the server and park; returns how
/// many started.
async fn await_parked(label: &str, ready: &AtomicU64, want: usize) -> u64 {
    let deadline = Instant::now() + START_TIMEOUT;
    while ready.load(Ordering::Relaxed) < want as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let parked = ready.load(Ordering::Relaxed);
    if parked < want as u64 {
        eprintln!("{label}: only {parked}/{want} started");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    parked
}

/// `count` watchers spread over `targets` round-robin: how many watch each target.
fn spread(count: usize, targets: usize) -> Vec<u64> {
    (0..targets)
        .map(|t| (count / targets + usize::from(t < count % targets)) as u64)
        .collect()
}

/// The delivery bookkeeping a run's watchers share: one slot per target, the latency
/// histogram they record into, the error counts.
#[derive(Clone)]
struct Deliveries {
    slots: Arc<Vec<Slot>>,
    hist: Arc<Mutex<Latency>>,
    errors: Arc<Errors>,
}

impl Deliveries {
    /// Bookkeeping for `targets` targets.
    fn new(targets: usize) -> Deliveries {
        Deliveries {
            slots: Arc::new((0..targets).map(|_| Slot::default()).collect()),
            hist: Arc::new(Mutex::new(Latency::new())),
            errors: Arc::new(Errors::default()),
        }
    }

    /// Records a delivery to `target` that arrived at `at`.
    fn record(&self, target: usize, at: Instant) {
        self.slots[target].deliver(at, &self.hist);
    }

    /// Answers that moved while no change was in flight.
    fn stray(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| s.stray.load(Ordering::Relaxed))
            .sum()
    }

    /// The change-to-delivery latencies so far.
    fn latency(&self) -> Latency {
        self.hist.lock().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchers_spread_evenly_and_all_are_placed() {
        assert_eq!(spread(10, 3), vec![4, 3, 3]);
        assert_eq!(spread(2, 3), vec![1, 1, 0]);
        assert_eq!(spread(1000, 1), vec![1000]);
    }
}
