//! Two-phase messages on SQLite: a participant's local transaction and the
//! distributed transaction it sets off commit together. [`Outbox::stage`]
//! writes the transaction's definition into the outbox table [`TABLE`]
//! inside the caller's own local transaction (so it exists exactly when the
//! business rows do); [`Outbox::drain`] starts every staged one on the
//! coordinator with its own id — a second start of an id is refused as
//! `Exists`, so a drain repeated after a crash starts nothing twice — and
//! removes it. [`Outbox::spawn_drainer`] drains in the background.
//!
//! The consumers are the transaction's branches (HTTP calls to registered
//! services with the transaction's headers and idempotency keys), called
//! until they succeed when the definition says `"recovery": "forward"`.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{Connection, Transaction, params};
use serde_json::Value;

use super::{TxnClient, TxnError};

/// The outbox table.
pub const TABLE: &str = "meshwork_txn_outbox";
/// Where entries the coordinator refuses for good go (with the reason), so
/// one bad entry cannot hold up the ones behind it.
pub const DEAD_TABLE: &str = "meshwork_txn_outbox_dead";
/// Most staged transactions one drain starts.
pub const DRAIN_BATCH: usize = 100;

/// Why a drain stopped.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The participant's database failed.
    #[error("outbox: {0}")]
    Db(#[from] rusqlite::Error),
    /// The coordinator refused or could not be reached (the entry stays).
    #[error(transparent)]
    Txn(#[from] TxnError),
    /// The blocking task running a database call failed.
    #[error("outbox database task failed: {0}")]
    Task(String),
    /// A staged definition is not JSON (it stays, for an operator).
    #[error("outbox entry {id}: {message}")]
    Corrupt {
        /// The transaction id.
        id: String,
        /// What is wrong.
        message: String,
    },
}

/// The outbox of one database (a marker type: connections are passed in).
#[derive(Debug, Clone, Copy, Default)]
pub struct Outbox;

impl Outbox {
    /// Creates the outbox table if missing; call once per database.
    pub fn install(conn: &Connection) -> rusqlite::Result<Outbox> {
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (
                id TEXT PRIMARY KEY,
                spec TEXT NOT NULL,
                at_ms INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
            ) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS {DEAD_TABLE} (
                id TEXT PRIMARY KEY,
                spec TEXT NOT NULL,
                reason TEXT NOT NULL,
                at_ms INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
            ) WITHOUT ROWID;"
        ))?;
        Ok(Outbox)
    }

    /// Stages transaction `id` (its definition `spec`, as `TxnClient::start`
    /// takes it) in the caller's local transaction `tx`: it is started only
    /// if `tx` commits. An invalid definition is refused here.
    pub fn stage(&self, tx: &Transaction<'_>, id: &str, spec: &Value) -> Result<(), OutboxError> {
        super::Spec::from_json(&spec.to_string()).map_err(|e| OutboxError::Corrupt {
            id: id.to_owned(),
            message: e.to_string(),
        })?;
        tx.execute(
            &format!("INSERT INTO {TABLE} (id, spec) VALUES (?1, ?2)"),
            params![id, spec.to_string()],
        )?;
        Ok(())
    }

    /// Starts the staged transactions (oldest first, at most
    /// [`DRAIN_BATCH`]) and removes each once the coordinator has it (or has
    /// refused it for good: then it moves to [`DEAD_TABLE`]); how many it
    /// removed. Stops when the coordinator cannot be reached.
    pub async fn drain(
        &self,
        conn: &Arc<Mutex<Connection>>,
        client: &TxnClient,
    ) -> Result<usize, OutboxError> {
        let staged = blocking(conn, |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT id, spec FROM {TABLE} ORDER BY at_ms, id LIMIT ?1"
            ))?;
            let rows = stmt.query_map(params![DRAIN_BATCH as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })
        .await?;
        let mut done = 0;
        for (id, text) in staged {
            let refused = match serde_json::from_str::<Value>(&text) {
                Err(e) => Some(format!("not JSON: {e}")),
                Ok(spec) => match client.start(Some(&id), spec).await {
                    Ok(_) | Err(TxnError::Exists(_)) => None,
                    // Refused for good (a 4xx): set aside, go on.
                    Err(TxnError::Refused { status, message }) if (400..500).contains(&status) => {
                        Some(format!("{status}: {message}"))
                    }
                    // The coordinator is away: stop, keep the order.
                    Err(e) => return Err(e.into()),
                },
            };
            if let Some(reason) = &refused {
                tracing::warn!(txn = %id, %reason, "outbox entry refused; moved to {DEAD_TABLE}");
            }
            blocking(conn, move |c| {
                let tx = c.unchecked_transaction()?;
                if let Some(reason) = refused {
                    tx.execute(
                        &format!("INSERT OR REPLACE INTO {DEAD_TABLE} (id, spec, reason) VALUES (?1, ?2, ?3)"),
                        params![id, text, reason],
                    )?;
                }
                tx.execute(&format!("DELETE FROM {TABLE} WHERE id = ?1"), params![id])?;
                tx.commit()
            })
            .await?;
            done += 1;
        }
        Ok(done)
    }

    /// Drains every `every` in a background task (until it is aborted);
    /// failures are logged and retried on the next round.
    pub fn spawn_drainer(
        &self,
        conn: Arc<Mutex<Connection>>,
        client: TxnClient,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match Outbox.drain(&conn, &client).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(started = n, "outbox drained"),
                    Err(e) => tracing::warn!(error = %e, "outbox drain failed; retrying"),
                }
            }
        })
    }
}

/// Runs `f` on the connection on the blocking pool.
async fn blocking<T: Send + 'static>(
    conn: &Arc<Mutex<Connection>>,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
) -> Result<T, OutboxError> {
    super::sqlite::on_blocking_pool(conn, f)
        .await
        .map_err(OutboxError::Task)?
        .map_err(OutboxError::Db)
}
