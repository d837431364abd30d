//! The node's `txn` role: creates transactions and drives them, and takes
//! over the ones whose coordinator is gone.
//!
//! The node that creates a transaction drives it (its name is in the
//! record's `coordinator`). Every [`SCAN_EVERY`], and whenever membership
//! changes, each `txn` node lists the unfinished records; one whose
//! coordinator is no longer a live `txn` member is claimed — by the member
//! that rendezvous hashing picks for its id, with a compare-and-swap write
//! of its name — and resumed. A coordinator dies at worst one session TTL
//! before its transactions move; calls it had in flight are sent again with
//! their idempotency keys.
//!
//! Metrics: `meshwork_txn_started_total{mode}`,
//! `meshwork_txn_finished_total{status}`, `meshwork_txn_duration_seconds{status}`,
//! `meshwork_txn_call_seconds{phase,outcome}`, `meshwork_txn_driving` (this
//! node's transactions in flight) and `meshwork_txn_takeovers_total`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use meshwork_coord::Coord;
use meshwork_coord::nodes::Membership;
use meshwork_coord::registry::Registry;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::log::{LogError, Stored, TxnLog};
use crate::machine::{Event, Txn};
use crate::runner::{ApplyError, HttpCaller, RunError, Runner, now_ms};
use crate::spec::Spec;

/// The role's name in membership.
pub const TXN_ROLE: &str = "txn";
/// How often unfinished transactions are checked for a dead coordinator.
pub const SCAN_EVERY: Duration = Duration::from_secs(2);
/// Longest [`TxnRole::wait_final`] goes without re-reading a transaction
/// driven elsewhere (it watches the record, and re-reads on each write).
pub const WAIT_POLL: Duration = Duration::from_secs(1);
/// How long finished transactions are kept by default.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most expired transactions one scan deletes.
pub const EXPIRE_PER_SCAN: i64 = 2_000;
/// The name whose rendezvous owner runs retention.
const RETENTION_OWNER: &str = "retention";

/// How the role runs.
#[derive(Debug, Clone)]
pub struct TxnOptions {
    /// How long a finished transaction's record is kept (then deleted).
    pub retention: Duration,
    /// Where the branch calls' client spans go (disabled: nowhere).
    pub tracer: meshwork_telemetry::export::Tracer,
}

impl Default for TxnOptions {
    fn default() -> Self {
        TxnOptions {
            retention: DEFAULT_RETENTION,
            tracer: meshwork_telemetry::export::Tracer::disabled(),
        }
    }
}

type NodeRunner = Runner<HttpCaller<Registry>>;

/// A transaction this node drives: its task, and where its final record
/// appears for the requests waiting on it.
struct Driving {
    task: AbortHandle,
    done: watch::Receiver<Option<Txn>>,
}

/// The running role.
#[derive(Clone)]
pub struct TxnRole {
    runner: NodeRunner,
    membership: Arc<Membership>,
    me: String,
    options: TxnOptions,
    driving: Arc<Mutex<HashMap<String, Driving>>>,
    scanner: Arc<Mutex<Option<AbortHandle>>>,
    /// The task following the rollouts for branch calls.
    follow: Arc<Mutex<Option<AbortHandle>>>,
}

/// Why a request to the role failed.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// The definition is invalid.
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    /// The id is malformed.
    #[error("transaction id {0:?}: 1 to 128 letters, digits, '.', '_' or '-'")]
    BadId(String),
    /// The log.
    #[error(transparent)]
    Log(#[from] LogError),
    /// An operator's event was not applied.
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

impl TxnRole {
    /// Starts the role on a node's coordination: the runner, and the scan
    /// that takes over orphaned transactions.
    pub fn start(coord: &Coord) -> TxnRole {
        TxnRole::start_with(coord, TxnOptions::default())
    }

    /// Where the role's spans go.
    pub(crate) fn tracer(&self) -> &meshwork_telemetry::export::Tracer {
        &self.options.tracer
    }

    /// [`TxnRole::start`] with options.
    pub fn start_with(coord: &Coord, options: TxnOptions) -> TxnRole {
        // Branch calls follow the rollouts' splits and feed their analysis,
        // as the gateway's calls do (figures as NODE.txn).
        let splits = Arc::new(meshwork_coord::rollout::tally::Splits::default());
        let membership = coord.membership.clone();
        let follow = tokio::spawn(meshwork_coord::rollout::tally::follow(
            coord.rollouts.clone(),
            splits.clone(),
            format!("{}.txn", coord.options.node_name),
            move || membership.session().lease,
        ));
        let runner = Runner::new(
            TxnLog::new(coord.backend.clone()),
            HttpCaller::new(coord.registry.clone())
                .with_tracer(options.tracer.clone())
                .with_rollouts(splits),
        );
        let role = TxnRole {
            runner,
            me: coord.options.node_name.clone(),
            options,
            membership: coord.membership.clone(),
            driving: Arc::new(Mutex::new(HashMap::new())),
            scanner: Arc::new(Mutex::new(None)),
            follow: Arc::new(Mutex::new(None)),
        };
        let r = role.clone();
        let task = tokio::spawn(async move { r.scan_loop().await });
        *role.scanner.lock() = Some(task.abort_handle());
        *role.follow.lock() = Some(follow.abort_handle());
        role
    }

    /// The runner (log and calls).
    pub fn runner(&self) -> &NodeRunner {
        &self.runner
    }

    /// Creates a transaction (the id is generated when not given) and starts
    /// driving it; the record is durable when this returns. `traceparent`:
    /// the transaction's span (its calls are its children).
    pub async fn create(
        &self,
        spec: Spec,
        id: Option<String>,
        traceparent: Option<String>,
    ) -> Result<Txn, RoleError> {
        spec.validate()?;
        let id = match id {
            Some(id) => {
                check_id(&id)?;
                id
            }
            None => new_id(),
        };
        let mut txn = Txn::new(id, spec, now_ms());
        txn.coordinator = self.me.clone();
        txn.traceparent = traceparent;
        let stored = self.runner.start(&mut txn).await?;
        metrics::counter!("meshwork_txn_started_total", "mode" => txn.spec.mode.as_str())
            .increment(1);
        self.drive(&txn.id, Some(stored));
        Ok(txn)
    }

    /// Applies an operator's event (abort, retry now).
    pub async fn apply(&self, id: &str, event: Event) -> Result<Txn, RoleError> {
        Ok(self.runner.apply(id, event).await?)
    }

    /// The HTTP address of the live `txn` node driving unfinished `id`,
    /// when that is another node (an operator's event sent there wakes its
    /// driver at once).
    pub async fn driven_elsewhere(&self, id: &str) -> Result<Option<String>, LogError> {
        let Some(stored) = self.runner.log().load(id).await? else {
            return Ok(None);
        };
        let by = &stored.txn.coordinator;
        if *by == self.me || stored.txn.status.is_final() {
            return Ok(None);
        }
        Ok(self
            .membership
            .members()
            .into_iter()
            .find(|n| n.name == *by && n.roles.iter().any(|r| r == TXN_ROLE))
            .map(|n| n.http_addr))
    }

    /// Reads `id`, waiting up to `wait` for it to be final: answered from
    /// memory the moment this node finishes it; when another node drives it,
    /// re-read at each write of its record (and at least every
    /// [`WAIT_POLL`]). None if there is no such transaction.
    pub async fn wait_final(&self, id: &str, wait: Duration) -> Result<Option<Txn>, LogError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let done = self.driving.lock().get(id).map(|d| d.done.clone());
            if let Some(mut done) = done {
                // Driven here: the final record is published once written.
                let finished = tokio::time::timeout_at(deadline, done.wait_for(Option::is_some));
                if let Ok(Ok(txn)) = finished.await
                    && let Some(txn) = txn.clone()
                {
                    return Ok(Some(txn));
                }
                // Timed out, or the task stopped without finishing (taken
                // over, shut down): read the record.
            }
            let stored = self.runner.log().load(id).await?;
            let now = tokio::time::Instant::now();
            match stored {
                Some(s) if !s.txn.status.is_final() && now < deadline => {
                    if self.driving.lock().contains_key(id) {
                        continue;
                    }
                    // Driven elsewhere: wake at the record's next write (or
                    // after WAIT_POLL, should the watch be slow to start).
                    let mut changes = self.runner.log().watch(id, s.revision);
                    let wait = WAIT_POLL.min(deadline - now);
                    if let Ok(None) = tokio::time::timeout(wait, changes.next()).await {
                        // The watch stopped (history compacted): poll.
                        tokio::time::sleep(wait).await;
                    }
                }
                other => return Ok(other.map(|s| s.txn)),
            }
        }
    }

    /// Stops driving (the transactions stay in the log; another node, or this
    /// one restarted, resumes them).
    pub fn shutdown(&self) {
        if let Some(s) = self.scanner.lock().take() {
            s.abort();
        }
        if let Some(f) = self.follow.lock().take() {
            f.abort();
        }
        for (_, d) in self.driving.lock().drain() {
            d.task.abort();
        }
    }

    /// Drives `id` in a task unless one already does, from `stored` when
    /// given (just written), else from the log.
    fn drive(&self, id: &str, stored: Option<Stored>) {
        let mut driving = self.driving.lock();
        if driving.get(id).is_some_and(|d| !d.task.is_finished()) {
            return;
        }
        let (runner, me, id2, map) = (
            self.runner.clone(),
            self.me.clone(),
            id.to_owned(),
            self.driving.clone(),
        );
        let (publish, done) = watch::channel(None);
        let task = tokio::spawn(async move {
            let result = match stored {
                Some(s) => runner.drive_stored(s, &me).await,
                None => runner.drive_as_record(&id2, &me).await,
            };
            match result {
                Ok(txn) => {
                    publish.send_replace(Some(txn));
                }
                Err(RunError::TakenOver { by, .. }) => {
                    tracing::info!(txn = %id2, %by, "transaction taken over by another node");
                }
                Err(e) => tracing::warn!(txn = %id2, error = %e, "driving stopped"),
            }
            let mut map = map.lock();
            map.remove(&id2);
            metrics::gauge!("meshwork_txn_driving").set(map.len() as f64);
        });
        driving.insert(
            id.to_owned(),
            Driving {
                task: task.abort_handle(),
                done,
            },
        );
        metrics::gauge!("meshwork_txn_driving").set(driving.len() as f64);
    }

    async fn scan_loop(&self) {
        let mut changes = self.membership.changes();
        loop {
            if let Err(e) = self.scan().await {
                tracing::warn!(error = %e, "transaction scan failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(SCAN_EVERY) => {}
                _ = changes.changed() => {}
            }
        }
    }

    /// Claims and resumes unfinished transactions whose coordinator is gone
    /// (and this node's own, after a restart).
    async fn scan(&self) -> Result<(), LogError> {
        let live: Vec<String> = self
            .membership
            .members()
            .into_iter()
            .filter(|n| n.roles.iter().any(|r| r == TXN_ROLE))
            .map(|n| n.name)
            .collect();
        for (id, coordinator) in self.runner.log().open().await? {
            if self.driving.lock().contains_key(&id) {
                continue;
            }
            let mine = coordinator == self.me;
            let orphan = !live.contains(&coordinator);
            let owner = self.membership.owner_of(TXN_ROLE, &id);
            if !(mine || (orphan && owner.as_deref() == Some(self.me.as_str()))) {
                continue;
            }
            let Some(stored) = self.runner.log().load(&id).await? else {
                continue;
            };
            let txn = &stored.txn;
            if txn.status.is_final() {
                continue;
            }
            let mut claimed = txn.clone();
            claimed.coordinator = self.me.clone();
            match self.runner.log().save(&claimed, stored.revision).await {
                Ok(_) => {
                    if !mine {
                        tracing::info!(txn = %txn.id, from = %txn.coordinator, "taking over transaction");
                        metrics::counter!("meshwork_txn_takeovers_total").increment(1);
                    }
                    self.drive(&txn.id, None);
                }
                // Someone wrote it meanwhile: look again next scan.
                Err(LogError::Superseded(_)) => {}
                Err(e) => return Err(e),
            }
        }
        // Retention: one live member (the owner of a fixed name) deletes the
        // finished transactions that expired, a bounded batch per scan.
        if self
            .membership
            .owner_of(TXN_ROLE, RETENTION_OWNER)
            .as_deref()
            == Some(self.me.as_str())
        {
            let retention = u64::try_from(self.options.retention.as_millis()).unwrap_or(u64::MAX);
            let before = now_ms().saturating_sub(retention);
            let n = self.runner.log().expire(before, EXPIRE_PER_SCAN).await?;
            if n > 0 {
                tracing::debug!(expired = n, "finished transactions past retention deleted");
                metrics::counter!("meshwork_txn_expired_total").increment(n as u64);
            }
        }
        Ok(())
    }
}

/// Checks a caller-chosen transaction id.
fn check_id(id: &str) -> Result<(), RoleError> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if id.is_empty() || id.len() > 128 || !id.chars().all(ok) {
        return Err(RoleError::BadId(id.to_owned()));
    }
    Ok(())
}

/// A new id: the creation time and 64 random bits, so ids sort by age.
fn new_id() -> String {
    format!("{:012x}-{:016x}", now_ms(), rand::random::<u64>())
}
