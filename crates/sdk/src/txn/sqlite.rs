//! The transaction barrier on a participant's SQLite database.
//!
//! Every branch call runs its work through [`Barrier::run`], in one local
//! transaction (`BEGIN IMMEDIATE`) with an insert into the barrier table
//! [`TABLE`] keyed by (transaction, branch, phase):
//!
//! - a phase that was already done here is not done again
//!   ([`Ran::Duplicate`]): retries and redeliveries are harmless;
//! - an undo (cancel, compensation, rollback) whose action never arrived
//!   records the action as cancelled and does nothing ([`Ran::EmptyUndo`]);
//! - an action that arrives after its undo finds that record and does
//!   nothing ([`Ran::Suspended`]: answer it with a refusal, the transaction
//!   is being undone and nothing may be left behind);
//! - work that fails rolls back with its barrier row, so the coordinator's
//!   retry runs it again.
//!
//! The barrier rows and the business rows commit or roll back together:
//! that is what makes the guarantee hold across crashes of the participant.
//!
//! A two-phase-commit participant uses [`Barrier::prepare`],
//! [`Barrier::commit`] and [`Barrier::rollback`]: prepare locks what the
//! commit needs and keeps the work to apply (a payload) in [`PREPARED_TABLE`],
//! in the same local transaction, so a participant that crashes after
//! answering "prepared" still holds it. [`Barrier::in_doubt`] lists the
//! branches prepared here whose outcome has not arrived; ask the coordinator
//! (`TxnClient::verdict`) and commit or roll each back — the barrier makes
//! that and the coordinator's own later call take effect once.

use std::time::Duration;

pub use rusqlite;
use rusqlite::{Connection, Transaction, TransactionBehavior, params};

use super::{BranchCall, Phase};

/// The barrier table.
pub const TABLE: &str = "meshwork_txn_barrier";
/// The prepared work of two-phase-commit branches.
pub const PREPARED_TABLE: &str = "meshwork_txn_prepared";

/// How long a call waits for another writer of the database before failing
/// (set on the connection by [`Barrier::install`]).
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`Barrier::run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ran<T> {
    /// The work ran and committed, with this result.
    Done(T),
    /// This phase of this branch was done here before: nothing ran. Answer
    /// as the first time did (success).
    Duplicate,
    /// An undo whose action never arrived: recorded, nothing ran. Answer
    /// success.
    EmptyUndo,
    /// An action that arrived after its undo: refused, nothing ran. Answer
    /// with a refusal (409): the transaction is being undone.
    Suspended,
}

impl<T> Ran<T> {
    /// Whether the participant should answer success (everything but
    /// [`Ran::Suspended`]).
    pub fn succeeded(&self) -> bool {
        !matches!(self, Ran::Suspended)
    }
}

/// Why a barrier call failed; nothing was committed.
#[derive(Debug, thiserror::Error)]
pub enum BarrierError<E> {
    /// The database failed (busy past [`BUSY_TIMEOUT`], disk, ...): retry.
    #[error("transaction barrier: {0}")]
    Db(#[from] rusqlite::Error),
    /// The work failed; its changes and the barrier row were rolled back.
    #[error("branch work failed: {0}")]
    Work(E),
}

/// The barrier on one database (a marker type: the connection is passed to
/// each call, so it works with any pool).
#[derive(Debug, Clone, Copy, Default)]
pub struct Barrier;

impl Barrier {
    /// Creates the barrier table if missing and sets the connection's busy
    /// timeout; call once per connection.
    pub fn install(conn: &Connection) -> rusqlite::Result<Barrier> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (
                txn TEXT NOT NULL,
                branch TEXT NOT NULL,
                phase TEXT NOT NULL,
                reason TEXT NOT NULL,
                at_ms INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
                PRIMARY KEY (txn, branch, phase)
            ) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS {PREPARED_TABLE} (
                txn TEXT NOT NULL,
                branch TEXT NOT NULL,
                payload TEXT NOT NULL,
                at_ms INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
                PRIMARY KEY (txn, branch)
            ) WITHOUT ROWID;"
        ))?;
        Ok(Barrier)
    }

    /// Two-phase commit's prepare (the branch's action): `work` checks and
    /// locks what the commit will need, and `payload` (what the commit
    /// applies) is kept in [`PREPARED_TABLE`] — one local transaction behind
    /// the barrier.
    pub fn prepare<E>(
        &self,
        conn: &mut Connection,
        call: &BranchCall,
        payload: &str,
        work: impl FnOnce(&Transaction<'_>) -> Result<(), E>,
    ) -> Result<Ran<()>, BarrierError<E>> {
        let ran = self.run(conn, call, |tx| {
            work(tx).map_err(Staged::Work)?;
            tx.execute(
                &format!("INSERT INTO {PREPARED_TABLE} (txn, branch, payload) VALUES (?1, ?2, ?3)"),
                params![call.txn, call.branch, payload],
            )
            .map_err(Staged::Db)?;
            Ok(())
        });
        unstage(ran)
    }

    /// Two-phase commit's commit (the branch's confirm): `apply` runs with
    /// the payload its prepare kept, and the entry goes.
    pub fn commit<E>(
        &self,
        conn: &mut Connection,
        call: &BranchCall,
        apply: impl FnOnce(&Transaction<'_>, &str) -> Result<(), E>,
    ) -> Result<Ran<()>, BarrierError<E>> {
        let ran = self.run(conn, call, |tx| {
            let payload = take_prepared(tx, call).map_err(Staged::Db)?;
            apply(tx, &payload).map_err(Staged::Work)
        });
        unstage(ran)
    }

    /// Two-phase commit's rollback (the branch's undo): `release` runs with
    /// the payload its prepare kept (to unlock what it locked), and the entry
    /// goes. A rollback whose prepare never arrived is an empty undo, and
    /// bars that prepare.
    pub fn rollback<E>(
        &self,
        conn: &mut Connection,
        call: &BranchCall,
        release: impl FnOnce(&Transaction<'_>, &str) -> Result<(), E>,
    ) -> Result<Ran<()>, BarrierError<E>> {
        self.commit(conn, call, release)
    }

    /// The branches prepared here at least `older_than` ago whose commit or
    /// rollback has not arrived, oldest first: the ones to ask the
    /// coordinator about.
    pub fn in_doubt(
        &self,
        conn: &Connection,
        older_than: Duration,
    ) -> rusqlite::Result<Vec<InDoubt>> {
        let cutoff = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(older_than)
            .as_millis() as i64;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT txn, branch, payload, at_ms FROM {PREPARED_TABLE} WHERE at_ms <= ?1 ORDER BY at_ms"
        ))?;
        let rows = stmt.query_map(params![cutoff], |r| {
            Ok(InDoubt {
                txn: r.get(0)?,
                branch: r.get(1)?,
                payload: r.get(2)?,
                prepared_at_ms: r.get(3)?,
            })
        })?;
        rows.collect()
    }

    /// Runs `work` for `call` behind the barrier, in one `BEGIN IMMEDIATE`
    /// transaction on `conn` that `work` writes its own rows into.
    pub fn run<T, E>(
        &self,
        conn: &mut Connection,
        call: &BranchCall,
        work: impl FnOnce(&Transaction<'_>) -> Result<T, E>,
    ) -> Result<Ran<T>, BarrierError<E>> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let phase = call.phase.as_str();
        let first = mark(&tx, call, phase, phase)?;
        let ran = match call.phase {
            // Our own action row is there: either this action ran before, or
            // an undo got here first and barred it.
            Phase::Action if !first => {
                if reason(&tx, call, Phase::Action.as_str())?.as_deref() == Some("undo") {
                    Ran::Suspended
                } else {
                    Ran::Duplicate
                }
            }
            Phase::Confirm | Phase::Undo if !first => Ran::Duplicate,
            // An undo bars its action; if the action had not arrived, the undo
            // has nothing to undo.
            Phase::Undo if mark(&tx, call, Phase::Action.as_str(), "undo")? => Ran::EmptyUndo,
            _ => Ran::Done(work(&tx).map_err(BarrierError::Work)?),
        };
        meshwork_txn::failpoint::hit_branch_blocking("barrier_before_commit", &call.branch, phase);
        tx.commit()?;
        meshwork_txn::failpoint::hit_branch_blocking("barrier_after_commit", &call.branch, phase);
        if !matches!(ran, Ran::Done(_)) {
            tracing::debug!(txn = %call.txn, branch = %call.branch, phase, outcome = ?Outcome::of(&ran), "transaction barrier");
        }
        Ok(ran)
    }
}

/// A two-phase-commit branch prepared here, its outcome not known here yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InDoubt {
    /// The global transaction.
    pub txn: String,
    /// The branch.
    pub branch: String,
    /// What its commit applies.
    pub payload: String,
    /// When it was prepared, Unix milliseconds.
    pub prepared_at_ms: i64,
}

impl InDoubt {
    /// The call that finishes it: commit (`Phase::Confirm`) or rollback
    /// (`Phase::Undo`), as the coordinator's verdict says.
    pub fn call(&self, phase: Phase) -> BranchCall {
        BranchCall {
            txn: self.txn.clone(),
            branch: self.branch.clone(),
            phase,
        }
    }
}

/// A two-phase-commit step's failure inside the barrier's transaction.
enum Staged<E> {
    Work(E),
    Db(rusqlite::Error),
}

fn unstage<T, E>(ran: Result<Ran<T>, BarrierError<Staged<E>>>) -> Result<Ran<T>, BarrierError<E>> {
    ran.map_err(|e| match e {
        BarrierError::Db(e) | BarrierError::Work(Staged::Db(e)) => BarrierError::Db(e),
        BarrierError::Work(Staged::Work(e)) => BarrierError::Work(e),
    })
}

/// Removes and returns the payload `call`'s prepare kept.
fn take_prepared(tx: &Transaction<'_>, call: &BranchCall) -> rusqlite::Result<String> {
    let payload: String = tx.query_row(
        &format!("SELECT payload FROM {PREPARED_TABLE} WHERE txn = ?1 AND branch = ?2"),
        params![call.txn, call.branch],
        |r| r.get(0),
    )?;
    tx.execute(
        &format!("DELETE FROM {PREPARED_TABLE} WHERE txn = ?1 AND branch = ?2"),
        params![call.txn, call.branch],
    )?;
    Ok(payload)
}

/// `Ran` without its value, for logs.
#[derive(Debug)]
enum Outcome {
    Done,
    Duplicate,
    EmptyUndo,
    Suspended,
}

impl Outcome {
    fn of<T>(ran: &Ran<T>) -> Outcome {
        match ran {
            Ran::Done(_) => Outcome::Done,
            Ran::Duplicate => Outcome::Duplicate,
            Ran::EmptyUndo => Outcome::EmptyUndo,
            Ran::Suspended => Outcome::Suspended,
        }
    }
}

/// Inserts the (txn, branch, phase) row unless present; whether it was new.
fn mark(tx: &Transaction<'_>, call: &BranchCall, phase: &str, why: &str) -> rusqlite::Result<bool> {
    let n = tx.execute(
        &format!(
            "INSERT OR IGNORE INTO {TABLE} (txn, branch, phase, reason) VALUES (?1, ?2, ?3, ?4)"
        ),
        params![call.txn, call.branch, phase, why],
    )?;
    Ok(n == 1)
}

fn reason(
    tx: &Transaction<'_>,
    call: &BranchCall,
    phase: &str,
) -> rusqlite::Result<Option<String>> {
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT reason FROM {TABLE} WHERE txn = ?1 AND branch = ?2 AND phase = ?3"
    ))?;
    let mut rows = stmt.query(params![call.txn, call.branch, phase])?;
    match rows.next()? {
        Some(r) => r.get(0).map(Some),
        None => Ok(None),
    }
}

/// Runs `f` on a shared connection on tokio's blocking pool: its database
/// result, or why the task failed (the outboxes' database calls).
pub(crate) async fn on_blocking_pool<T: Send + 'static>(
    conn: &std::sync::Arc<parking_lot::Mutex<Connection>>,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
) -> Result<rusqlite::Result<T>, String> {
    let conn = conn.clone();
    tokio::task::spawn_blocking(move || f(&conn.lock()))
        .await
        .map_err(|e| e.to_string())
}
