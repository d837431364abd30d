//! [`IdGenerator`]: a [`SnowflakeCore`] running on a [`WorkerClaim`], allowed to issue
//! timestamps only below a reservation that a background task renews in the
//! worker's high-water mark (conditional on the claim key being still ours).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use meshwork_etcd::proto::etcdserverpb as pb;

use super::{
    Clock, DEFAULT_MAX_BACKWARDS_WAIT, DEFAULT_RESERVE, IdLayout, SnowflakeCore, SystemClock,
    WorkerClaim, check_batch, claim_worker, hwm_key, millis, worker_key,
};
use crate::backend::{Backend, txn};
use crate::error::{CoordError, Result};

/// Settings of an [`IdGenerator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdOptions {
    /// Largest backwards clock step waited out (default 5 s); larger ones are refused.
    pub max_backwards_wait: Duration,
    /// How far ahead of the clock a reservation reaches (default 2 s, 100 ms..=60 s);
    /// it is renewed every half of it.
    pub reserve: Duration,
}

impl Default for IdOptions {
    fn default() -> Self {
        IdOptions {
            max_backwards_wait: DEFAULT_MAX_BACKWARDS_WAIT,
            reserve: DEFAULT_RESERVE,
        }
    }
}

impl IdOptions {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&self.reserve) {
            return Err(CoordError::invalid(format!(
                "id reserve must be 100 ms..=60 s, got {} ms",
                self.reserve.as_millis()
            )));
        }
        if self.max_backwards_wait > Duration::from_secs(60) {
            return Err(CoordError::invalid(format!(
                "max_backwards_wait must be at most 60 s, got {} ms",
                self.max_backwards_wait.as_millis()
            )));
        }
        Ok(())
    }
}

const LIVE: u8 = 0;
const INVALIDATED: u8 = 1;
const CLAIM_LOST: u8 = 2;

struct Shared {
    core: SnowflakeCore,
    /// [`LIVE`], or why generation stopped for good.
    stopped: AtomicU8,
}

/// Ids for a claimed worker id, guarded by its high-water mark (see the module docs).
///
/// A background task renews the reservation (writes `hwm = now + reserve` every
/// `reserve / 2`, conditional on the claim key being still ours) and is aborted
/// when the generator is dropped. Dropping leaves the claim key to its lease; call
/// [`IdGenerator::release`] to free the worker id at once.
///
/// Lease loss: the caller calls [`IdGenerator::invalidate`] when its session lease
/// is lost, which stops generation at once. Uniqueness does not depend on that
/// call: a generator whose claim is gone cannot renew its reservation (and notices
/// at its next renewal), and a new holder only issues timestamps above it.
pub struct IdGenerator {
    shared: Arc<Shared>,
    backend: Backend,
    claim: WorkerClaim,
    task: tokio::task::JoinHandle<()>,
}

impl IdGenerator {
    /// Claims a worker id for `node` on `lease` ([`claim_worker`]) and starts
    /// generating with the default [`IdOptions`] and the [`SystemClock`].
    pub async fn start(
        backend: &Backend,
        layout: IdLayout,
        lease: i64,
        node: &str,
    ) -> Result<IdGenerator> {
        let claim = claim_worker(backend, &layout, lease, node).await?;
        IdGenerator::start_claimed(
            backend,
            claim,
            IdOptions::default(),
            Arc::new(SystemClock::new()),
        )
        .await
    }

    /// Starts generating for an existing `claim`.
    ///
    /// Waits (asynchronously) until `clock` is past the claim's high-water mark when
    /// it is at most `max_backwards_wait` behind it, else fails with
    /// [`CoordError::ClockBackwards`]; then stores the first reservation. On failure
    /// the claim key is deleted (best effort), freeing the worker id.
    pub async fn start_claimed(
        backend: &Backend,
        claim: WorkerClaim,
        opts: IdOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<IdGenerator> {
        match Self::try_start(backend, &claim, opts, clock).await {
            Ok((shared, task)) => Ok(IdGenerator {
                shared,
                backend: backend.clone(),
                claim,
                task,
            }),
            Err(e) => {
                if let Err(de) = delete_claim(backend, &claim).await {
                    tracing::warn!(worker = claim.worker, error = %de, "could not release the id worker claim");
                }
                Err(e)
            }
        }
    }

    async fn try_start(
        backend: &Backend,
        claim: &WorkerClaim,
        opts: IdOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<(Arc<Shared>, tokio::task::JoinHandle<()>)> {
        opts.validate()?;
        let max_wait = millis(opts.max_backwards_wait);
        let reserve = millis(opts.reserve);
        let hwm = claim.hwm_ms;
        let now = clock.now_ms();
        if now <= hwm {
            let gap = hwm + 1 - now;
            if gap > max_wait {
                return Err(CoordError::ClockBackwards(format!(
                    "the clock is {gap} ms behind the high-water mark of id worker {} ({hwm} ms: \
                     its previous holder may have issued ids up to then); that is more than the \
                     {max_wait} ms the generator waits — fix the clock (or wait) and retry",
                    claim.worker
                )));
            }
            tokio::time::sleep(Duration::from_millis(gap)).await;
        }
        let core = SnowflakeCore::new(claim.layout.clone(), claim.worker, clock.clone())?
            .with_max_backwards_wait(opts.max_backwards_wait)
            .with_high_water_mark(hwm);
        // Nothing may be issued until the first reservation is stored.
        core.until_ms.store(0, Ordering::Release);
        let first = clock.now_ms().max(hwm).saturating_add(reserve);
        if !renew(backend, claim.worker, claim.create_revision, first).await? {
            return Err(CoordError::Conflict(format!(
                "the claim on id worker {} was lost before the generator started (lease {} expired?)",
                claim.worker, claim.lease
            )));
        }
        core.extend_until(first);
        let shared = Arc::new(Shared {
            core,
            stopped: AtomicU8::new(LIVE),
        });
        let task = tokio::spawn(renew_loop(
            backend.clone(),
            shared.clone(),
            clock,
            claim.worker,
            claim.create_revision,
            first,
            reserve,
        ));
        Ok((shared, task))
    }

    /// The next id.
    pub fn next(&self) -> Result<i64> {
        self.check_live()?;
        self.shared.core.next()
    }

    /// `n` (1..=[`MAX_BATCH`](super::MAX_BATCH)) strictly increasing ids; all or none.
    pub fn next_batch(&self, n: usize) -> Result<Vec<i64>> {
        check_batch(n)?;
        self.check_live()?;
        self.shared.core.next_batch(n)
    }

    /// The worker id.
    pub fn worker(&self) -> u32 {
        self.claim.worker
    }

    /// The layout.
    pub fn layout(&self) -> &IdLayout {
        &self.claim.layout
    }

    /// The claim this generator runs on.
    pub fn claim(&self) -> &WorkerClaim {
        &self.claim
    }

    /// Timestamps must stay below this (Unix ms): the last stored reservation.
    pub fn reserved_until_ms(&self) -> u64 {
        self.shared.core.until_ms.load(Ordering::Acquire)
    }

    /// Stops generation for good: call it when the session lease is lost.
    pub fn invalidate(&self) {
        let _ = self.shared.stopped.compare_exchange(
            LIVE,
            INVALIDATED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// False once invalidated or once the claim was found lost.
    pub fn is_live(&self) -> bool {
        self.shared.stopped.load(Ordering::Acquire) == LIVE
    }

    /// Stops generating and deletes the claim key (if still ours), freeing the
    /// worker id; the high-water mark stays for the next holder.
    pub async fn release(self) -> Result<()> {
        self.invalidate();
        self.task.abort();
        delete_claim(&self.backend, &self.claim).await
    }

    fn check_live(&self) -> Result<()> {
        match self.shared.stopped.load(Ordering::Acquire) {
            LIVE => Ok(()),
            INVALIDATED => Err(CoordError::Unavailable(format!(
                "id worker {} was invalidated (session lease lost); claim a worker again",
                self.claim.worker
            ))),
            _ => Err(CoordError::Unavailable(format!(
                "the claim on id worker {} is gone (lease {} expired or revoked); claim a worker again",
                self.claim.worker, self.claim.lease
            ))),
        }
    }
}

impl Drop for IdGenerator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes `hwm = until` if the claim key is still ours; false when it is not.
async fn renew(backend: &Backend, worker: u32, create_revision: i64, until: u64) -> Result<bool> {
    let r = backend
        .txn(pb::TxnRequest {
            compare: vec![txn::create_rev_is(worker_key(worker), create_revision)],
            success: vec![txn::put(hwm_key(worker), until.to_string(), 0)],
            failure: vec![],
        })
        .await?;
    Ok(r.succeeded)
}

async fn delete_claim(backend: &Backend, claim: &WorkerClaim) -> Result<()> {
    let key = worker_key(claim.worker);
    backend
        .txn(pb::TxnRequest {
            compare: vec![txn::create_rev_is(key.clone(), claim.create_revision)],
            success: vec![txn::delete(key)],
            failure: vec![],
        })
        .await?;
    Ok(())
}

async fn renew_loop(
    backend: Backend,
    shared: Arc<Shared>,
    clock: Arc<dyn Clock>,
    worker: u32,
    create_revision: i64,
    mut written: u64,
    reserve: u64,
) {
    let mut tick = tokio::time::interval(Duration::from_millis((reserve / 2).max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; the first reservation is written
    loop {
        tick.tick().await;
        if shared.stopped.load(Ordering::Acquire) != LIVE {
            return;
        }
        let until = clock.now_ms().saturating_add(reserve).max(written);
        match renew(&backend, worker, create_revision, until).await {
            Ok(true) => {
                written = until;
                shared.core.extend_until(until);
            }
            Ok(false) => {
                tracing::error!(
                    worker,
                    "id worker claim is gone (lease expired or revoked); generation stopped"
                );
                let _ = shared.stopped.compare_exchange(
                    LIVE,
                    CLAIM_LOST,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                return;
            }
            Err(e) => {
                tracing::warn!(worker, error = %e, "id worker reservation not renewed; retrying");
            }
        }
    }
}
