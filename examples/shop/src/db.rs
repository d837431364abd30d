//! Each service's own SQLite database (bundled SQLite: nothing to install),
//! opened in WAL mode with `synchronous=FULL`: a committed transaction is on
//! disk before the service answers. Calls run on the blocking pool.
//!
//! Writes start as writers (`BEGIN IMMEDIATE`), so a transaction that reads
//! then writes waits for another writer (up to the busy timeout) instead of
//! failing with "database is locked" at its first write. Transaction branches
//! run behind the SDK's barrier ([`Db::branch`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meshwork_sdk::txn::BranchCall;
use meshwork_sdk::txn::sqlite::{Barrier, BarrierError, Ran};
use parking_lot::Mutex;
use rusqlite::{Connection, Transaction, TransactionBehavior};

use crate::error::ApiError;

/// The transaction headers of a request, if any (400 when they are partial
/// or malformed).
pub(crate) fn branch_call(headers: &http::HeaderMap) -> Result<Option<BranchCall>, ApiError> {
    BranchCall::from_headers(headers).map_err(|e| ApiError::invalid(e.to_string()))
}

/// How long a statement waits for another writer before failing.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A service's database.
#[derive(Clone)]
pub(crate) struct Db(Arc<Mutex<Connection>>);

impl Db {
    /// Opens (creating) `path` and applies `schema` (idempotent DDL) and the
    /// transaction barrier's table.
    pub(crate) fn open(path: &Path, schema: &str) -> rusqlite::Result<Db> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(schema)?;
        Barrier::install(&conn)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        Ok(Db(Arc::new(Mutex::new(conn))))
    }

    /// Runs `f` in one write transaction (`BEGIN IMMEDIATE`; committed if it
    /// returns `Ok`).
    pub(crate) async fn tx<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, ApiError> + Send + 'static,
    {
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    /// Runs `f` in one read transaction.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, ApiError> + Send + 'static,
    {
        self.with(move |conn| {
            let tx = conn.transaction()?;
            f(&tx)
        })
        .await
    }

    /// Runs `work` as the `call` branch of a distributed transaction, behind
    /// the barrier: once per phase, an undo without its action a no-op, an
    /// action after its undo refused ([`Ran`]). `work`'s error rolls back
    /// its rows and the barrier's, so the coordinator's retry runs it again.
    /// Without a call (a request outside any transaction) `work` just runs.
    pub(crate) async fn branch<T, F>(
        &self,
        call: Option<BranchCall>,
        work: F,
    ) -> Result<Ran<T>, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, ApiError> + Send + 'static,
    {
        let Some(call) = call else {
            return self.tx(work).await.map(Ran::Done);
        };
        self.with(move |conn| match Barrier.run(conn, &call, work) {
            Ok(ran) => Ok(ran),
            Err(BarrierError::Work(e)) => Err(e),
            Err(BarrierError::Db(e)) => Err(e.into()),
        })
        .await
    }

    /// The connection itself (for the SDK's outbox drainer).
    pub(crate) fn conn(&self) -> Arc<Mutex<Connection>> {
        self.0.clone()
    }

    pub(crate) async fn with<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, ApiError> + Send + 'static,
    {
        let db = self.0.clone();
        tokio::task::spawn_blocking(move || f(&mut db.lock()))
            .await
            .map_err(|e| ApiError::internal(&format!("database task failed: {e}")))?
    }
}
