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

use std::time::Duration;

pub use rusqlite;
use rusqlite::{Connection, Transaction, TransactionBehavior, params};

use super::{BranchCall, Phase};

/// The barrier table.
pub const TABLE: &str = "meshwork_txn_barrier";

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
            ) WITHOUT ROWID;"
        ))?;
        Ok(Barrier)
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
