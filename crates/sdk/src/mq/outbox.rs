//! The transactional outbox on SQLite for messages: a service's local
//! transaction and the messages it publishes commit together.
//! [`MqOutbox::stage`] writes the message into [`TABLE`] inside the caller's
//! own transaction, with its id fixed there; [`MqOutbox::drain`] publishes the
//! staged messages in order and removes them. A drain repeated after a crash
//! between publishing and removing publishes the same ids again, which the
//! broker's dedup window (2 minutes by default, on both backends) writes once;
//! past the window a consumer sees the message again, so consumers stay
//! idempotent on a business key (at-least-once, as everywhere in messaging).
//!
//! Why an outbox and not a half message: the local database is the source of
//! truth, so the message must exist exactly when the business rows do. An
//! outbox row commits atomically with them; a half message needs a check-back
//! round trip to learn that, and a broker-side timeout to ask it.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{Connection, Transaction, params};
use serde_json::Value;

use super::{MqClient, MqError, OutMessage, random_id};

/// The outbox table.
pub const TABLE: &str = "meshwork_mq_outbox";
/// Where messages the broker refuses for good go (with the reason), so one bad
/// message cannot hold up the ones behind it.
pub const DEAD_TABLE: &str = "meshwork_mq_outbox_dead";
/// Most staged messages one drain publishes.
pub const DRAIN_BATCH: usize = 500;

/// Why a drain stopped.
#[derive(Debug, thiserror::Error)]
pub enum MqOutboxError {
    /// The service's database failed.
    #[error("mq outbox: {0}")]
    Db(#[from] rusqlite::Error),
    /// The broker could not be reached or is briefly unavailable (the messages stay).
    #[error(transparent)]
    Mq(#[from] MqError),
    /// The blocking task running a database call failed.
    #[error("mq outbox database task failed: {0}")]
    Task(String),
}

/// The message outbox of one database (a marker type: connections are passed in).
#[derive(Debug, Clone, Copy, Default)]
pub struct MqOutbox;

impl MqOutbox {
    /// Creates the outbox tables if missing; call once per database.
    pub fn install(conn: &Connection) -> rusqlite::Result<MqOutbox> {
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                topic TEXT NOT NULL,
                message TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS {DEAD_TABLE} (
                seq INTEGER PRIMARY KEY,
                topic TEXT NOT NULL,
                message TEXT NOT NULL,
                reason TEXT NOT NULL,
                at_ms INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
            );"
        ))?;
        Ok(MqOutbox)
    }

    /// Stages `msg` for `topic` in the caller's local transaction `tx`: it is
    /// published only if `tx` commits. Its id (the one given, else a random one)
    /// is fixed now and returned; the caller's trace travels with it.
    pub fn stage(
        &self,
        tx: &Transaction<'_>,
        topic: &str,
        msg: &OutMessage,
    ) -> Result<u64, MqOutboxError> {
        self.stage_in(tx, topic, msg, crate::RequestContext::current().as_ref())
    }

    /// [`MqOutbox::stage`] in the trace of `ctx`: for code that runs outside
    /// the request's task (a closure on a blocking database thread), where
    /// [`crate::RequestContext::current`] is empty — take it before.
    pub fn stage_in(
        &self,
        tx: &Transaction<'_>,
        topic: &str,
        msg: &OutMessage,
        ctx: Option<&crate::RequestContext>,
    ) -> Result<u64, MqOutboxError> {
        let id = msg.id.unwrap_or_else(random_id);
        let mut m = msg.clone();
        let traced = !m.headers.contains_key("traceparent");
        m.headers = m.headers_with_trace_from(ctx);
        // Staging is the message's producer span (created here, sent later by
        // the drain): the consumer's parent.
        if traced
            && let Some(t) = crate::telemetry::tracer()
            && let Some(sent) = m
                .headers
                .get("traceparent")
                .and_then(|tp| meshwork_telemetry::TraceContext::parse(tp))
        {
            use meshwork_telemetry::export::{Kind, SpanRecord};
            // `parse` made a new span; the staged one is its parent.
            let staged = meshwork_telemetry::TraceContext {
                span_id: sent.parent_id.clone().unwrap_or_default(),
                parent_id: ctx.map(|c| c.trace.span_id.clone()),
                ..sent
            };
            t.record(
                SpanRecord::new(
                    &staged,
                    format!("publish {topic}"),
                    Kind::Producer,
                    std::time::SystemTime::now(),
                )
                .attr("messaging.system", "meshwork")
                .attr("messaging.operation.type", "create")
                .attr("messaging.destination.name", topic)
                .attr("messaging.message.id", id.to_string())
                .attr("meshwork.mq.outbox", true),
            );
        }
        tx.execute(
            &format!("INSERT INTO {TABLE} (topic, message) VALUES (?1, ?2)"),
            params![topic, m.to_json(id).to_string()],
        )?;
        Ok(id)
    }

    /// Publishes the staged messages (oldest first, at most [`DRAIN_BATCH`]; one
    /// request per run of a topic, so a key's messages keep their order) and
    /// removes each once the broker has it — or has refused it for good: then it
    /// moves to [`DEAD_TABLE`]. Returns how many it removed; stops, keeping the
    /// rest in order, when the broker cannot be reached, is busy, has no such
    /// topic or none is found.
    pub async fn drain(
        &self,
        conn: &Arc<Mutex<Connection>>,
        client: &MqClient,
    ) -> Result<usize, MqOutboxError> {
        let staged = blocking(conn, |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT seq, topic, message FROM {TABLE} ORDER BY seq LIMIT ?1"
            ))?;
            let rows = stmt.query_map(params![DRAIN_BATCH as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })
        .await?;
        let mut done = 0;
        let mut rest = staged.as_slice();
        while let Some((_, topic, _)) = rest.first() {
            let run = rest.iter().take_while(|(_, t, _)| t == topic).count();
            let (chunk, after) = rest.split_at(run);
            rest = after;
            let mut sent = Vec::new(); // seq
            let mut dead = Vec::new(); // (seq, topic, message, reason)
            let mut msgs = Vec::new(); // (seq, message)
            for (seq, topic, text) in chunk {
                match serde_json::from_str::<Value>(text)
                    .ok()
                    .and_then(|v| OutMessage::from_json(&v))
                {
                    Some(m) => msgs.push((*seq, m)),
                    None => dead.push((*seq, topic.clone(), text.clone(), "not a message".into())),
                }
            }
            let publisher = client.publisher(topic);
            let all: Vec<OutMessage> = msgs.iter().map(|(_, m)| m.clone()).collect();
            match publisher.publish_all(all).await {
                Ok(_) => sent.extend(msgs.iter().map(|(s, _)| *s)),
                Err(e) if !refused_for_good(&e) => {
                    settle(conn, sent, dead).await?;
                    return Err(e.into());
                }
                // One refused message refuses the request: each alone, for its own answer.
                Err(_) => {
                    for (seq, m) in &msgs {
                        match publisher.publish_all(vec![m.clone()]).await {
                            Ok(_) => sent.push(*seq),
                            Err(e) if !refused_for_good(&e) => {
                                settle(conn, sent, dead).await?;
                                return Err(e.into());
                            }
                            Err(e) => {
                                tracing::warn!(topic = %topic, error = %e, "outbox message refused; moved to {DEAD_TABLE}");
                                let text = chunk
                                    .iter()
                                    .find(|(s, _, _)| s == seq)
                                    .map(|(_, _, t)| t.clone())
                                    .unwrap_or_default();
                                dead.push((*seq, topic.clone(), text, e.to_string()));
                            }
                        }
                    }
                }
            }
            done += settle(conn, sent, dead).await?;
        }
        Ok(done)
    }

    /// Drains every `every` in a background task (until it is aborted);
    /// failures are logged and retried on the next round.
    pub fn spawn_drainer(
        &self,
        conn: Arc<Mutex<Connection>>,
        client: MqClient,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // A full batch: go again at once.
                loop {
                    match MqOutbox.drain(&conn, &client).await {
                        Ok(n) if n >= DRAIN_BATCH => continue,
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(published = n, "mq outbox drained"),
                        Err(e) => tracing::warn!(error = %e, "mq outbox drain failed; retrying"),
                    }
                    break;
                }
            }
        })
    }
}

/// The broker refused the message itself (bad input, too large, a feature its
/// backend lacks): retrying cannot help. Anything else — a missing topic, a login
/// missing or refused, a limit reached, a broker away, busy or not found — keeps
/// the message for the next drain.
fn refused_for_good(e: &MqError) -> bool {
    matches!(e, MqError::Refused { status, .. } if matches!(status, 400 | 413 | 415 | 422 | 501))
        || matches!(e, MqError::Invalid(_))
}

/// Removes what was published and moves what was refused; how many rows left the outbox.
async fn settle(
    conn: &Arc<Mutex<Connection>>,
    sent: Vec<i64>,
    dead: Vec<(i64, String, String, String)>,
) -> Result<usize, MqOutboxError> {
    let n = sent.len() + dead.len();
    if n == 0 {
        return Ok(0);
    }
    blocking(conn, move |c| {
        let tx = c.unchecked_transaction()?;
        for (seq, topic, text, reason) in &dead {
            tx.execute(
                &format!("INSERT OR REPLACE INTO {DEAD_TABLE} (seq, topic, message, reason) VALUES (?1, ?2, ?3, ?4)"),
                params![seq, topic, text, reason],
            )?;
        }
        for seq in sent.iter().chain(dead.iter().map(|(s, ..)| s)) {
            tx.execute(&format!("DELETE FROM {TABLE} WHERE seq = ?1"), params![seq])?;
        }
        tx.commit()
    })
    .await?;
    Ok(n)
}

/// Runs `f` on the connection on the blocking pool.
async fn blocking<T: Send + 'static>(
    conn: &Arc<Mutex<Connection>>,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
) -> Result<T, MqOutboxError> {
    crate::txn::sqlite::on_blocking_pool(conn, f)
        .await
        .map_err(MqOutboxError::Task)?
        .map_err(MqOutboxError::Db)
}
