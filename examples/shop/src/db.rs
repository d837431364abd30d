//! Each service's own SQLite database (bundled SQLite: nothing to install),
//! opened in WAL mode with `synchronous=FULL`: a committed transaction is on
//! disk before the service answers. Calls run on the blocking pool.

use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;

use rusqlite::Connection;

use crate::error::ApiError;

/// A service's database.
#[derive(Clone)]
pub(crate) struct Db(Arc<Mutex<Connection>>);

impl Db {
    /// Opens (creating) `path` and applies `schema` (idempotent DDL).
    pub(crate) fn open(path: &Path, schema: &str) -> rusqlite::Result<Db> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(schema)?;
        Ok(Db(Arc::new(Mutex::new(conn))))
    }

    /// Runs `f` in one transaction (committed if it returns `Ok`).
    pub(crate) async fn tx<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<T, ApiError> + Send + 'static,
    {
        let db = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = db.lock();
            let tx = conn.transaction()?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
        .await
        .map_err(|e| ApiError::internal(&format!("database task failed: {e}")))?
    }
}
