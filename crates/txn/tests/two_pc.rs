//! Two-phase commit through a real coordinator against a participant that
//! keeps its prepared work with the SDK's helper (`Barrier::prepare`,
//! `commit`, `rollback`): a participant whose commit calls fail is in doubt,
//! asks the coordinator (`TxnClient::verdict`) and commits on its own, and
//! the coordinator's later commit takes no second effect; a branch prepared
//! for a transaction with no record is rolled back (presumed abort); a
//! refused prepare aborts the transaction with nothing held.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use meshwork_sdk::txn::sqlite::rusqlite::{Connection, Transaction, params};
use meshwork_sdk::txn::sqlite::{Barrier, BarrierError, Ran};
use meshwork_sdk::txn::{BranchCall, Phase, TxnClient, Verdict};
use meshwork_sdk::{Meshwork, Options};
use meshwork_testkit::store::embedded;
use meshwork_testkit::until;
use parking_lot::Mutex;
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(20);

/// A bank account: prepare holds the amount, commit debits it, rollback
/// releases it.
#[derive(Clone)]
struct Bank {
    conn: Arc<Mutex<Connection>>,
    refuse_commits: Arc<AtomicBool>,
}

impl Bank {
    fn open(dir: &std::path::Path) -> Bank {
        let conn = Connection::open(dir.join("bank.db")).unwrap();
        Barrier::install(&conn).unwrap();
        conn.execute_batch(
            "CREATE TABLE account (balance INTEGER NOT NULL, held INTEGER NOT NULL);
             INSERT INTO account VALUES (100, 0);",
        )
        .unwrap();
        Bank {
            conn: Arc::new(Mutex::new(conn)),
            refuse_commits: Arc::default(),
        }
    }

    /// (balance, held, entries in the prepared table)
    fn books(&self) -> (i64, i64, i64) {
        let conn = self.conn.lock();
        let (balance, held) = conn
            .query_row("SELECT balance, held FROM account", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        let prepared = conn
            .query_row("SELECT count(*) FROM meshwork_txn_prepared", [], |r| {
                r.get(0)
            })
            .unwrap();
        (balance, held, prepared)
    }

    fn prepare(&self, call: &BranchCall, amount: i64) -> Result<Ran<()>, BarrierError<String>> {
        Barrier.prepare(&mut self.conn.lock(), call, &amount.to_string(), |tx| {
            let n = tx
                .execute(
                    "UPDATE account SET held = held + ?1 WHERE balance - held >= ?1",
                    params![amount],
                )
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("insufficient funds".to_owned());
            }
            Ok(())
        })
    }

    fn finish(&self, call: &BranchCall) -> Result<Ran<()>, BarrierError<String>> {
        let apply = |tx: &Transaction<'_>, payload: &str| {
            let amount: i64 = payload.parse().map_err(|_| "bad payload".to_owned())?;
            let sql = match call.phase {
                Phase::Confirm => "UPDATE account SET held = held - ?1, balance = balance - ?1",
                _ => "UPDATE account SET held = held - ?1",
            };
            tx.execute(sql, params![amount])
                .map_err(|e| e.to_string())?;
            Ok(())
        };
        let mut conn = self.conn.lock();
        match call.phase {
            Phase::Confirm => Barrier.commit(&mut conn, call, apply),
            _ => Barrier.rollback(&mut conn, call, apply),
        }
    }
}

async fn prepare(
    State(bank): State<Bank>,
    call: BranchCall,
    body: axum::body::Bytes,
) -> StatusCode {
    let amount = serde_json::from_slice::<Value>(&body).unwrap()["amount"]
        .as_i64()
        .unwrap();
    match tokio::task::spawn_blocking(move || bank.prepare(&call, amount))
        .await
        .unwrap()
    {
        Ok(ran) if ran.succeeded() => StatusCode::OK,
        Ok(_) | Err(BarrierError::Work(_)) => StatusCode::CONFLICT,
        Err(BarrierError::Db(_)) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

async fn finish(State(bank): State<Bank>, call: BranchCall) -> StatusCode {
    if call.phase == Phase::Confirm && bank.refuse_commits.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    match tokio::task::spawn_blocking(move || bank.finish(&call))
        .await
        .unwrap()
    {
        Ok(_) => StatusCode::OK,
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// A node with the txn role and its API, the bank registered as `bank`, and
/// a client.
async fn setup(bank: &Bank) -> (TxnClient, impl Sized) {
    let store = embedded().await;
    let coord = common::txn_node(&store.endpoint).await;
    let app = axum::Router::new()
        .route("/prepare", axum::routing::post(prepare))
        .route("/commit", axum::routing::post(finish))
        .route("/rollback", axum::routing::post(finish))
        .with_state(bank.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    common::register(&coord, "bank", port).await;
    let mw = Meshwork::connect(Options::new("shop", vec![store.endpoint.clone()]).unwrap())
        .await
        .unwrap();
    (mw.transactions(), (store, coord, mw))
}

fn debit(amount: i64) -> Value {
    json!({"mode": "two_pc", "retry": {"initial_backoff_ms": 20, "max_backoff_ms": 100},
        "branches": [{"name": "debit", "service": "bank",
            "action": {"path": "/prepare", "body": {"amount": amount}},
            "confirm": {"path": "/commit"}, "undo": {"path": "/rollback"}}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_in_doubt_asks_the_coordinator_and_nothing_happens_twice() {
    let dir = tempfile::tempdir().unwrap();
    let bank = Bank::open(dir.path());
    let (txns, _node) = setup(&bank).await;

    // Commits fail: the participant is left prepared, in doubt.
    bank.refuse_commits.store(true, Ordering::SeqCst);
    txns.start(Some("pay-1"), debit(30)).await.unwrap();
    until("the commit decision", WITHIN, async || {
        txns.verdict("pay-1").await.ok() == Some(Verdict::Commit)
    })
    .await;
    assert_eq!(bank.books(), (100, 30, 1));
    let doubts = Barrier.in_doubt(&bank.conn.lock(), Duration::ZERO).unwrap();
    assert_eq!(doubts.len(), 1);
    assert_eq!(
        (doubts[0].txn.as_str(), doubts[0].payload.as_str()),
        ("pay-1", "30")
    );
    // It asks, and commits on its own.
    assert_eq!(txns.verdict(&doubts[0].txn).await.unwrap(), Verdict::Commit);
    let ran = bank.finish(&doubts[0].call(Phase::Confirm)).unwrap();
    assert_eq!(ran, Ran::Done(()));
    assert_eq!(bank.books(), (70, 0, 0));
    // The coordinator's own commit lands later: no second debit.
    bank.refuse_commits.store(false, Ordering::SeqCst);
    let done = txns.wait("pay-1", WITHIN).await.unwrap();
    assert_eq!(done["status"], "committed");
    assert_eq!(bank.books(), (70, 0, 0));

    // Prepared for a transaction that has no record: presumed abort.
    let ghost = BranchCall {
        txn: "ghost-1".into(),
        branch: "debit".into(),
        phase: Phase::Action,
    };
    assert_eq!(bank.prepare(&ghost, 20).unwrap(), Ran::Done(()));
    assert_eq!(bank.books(), (70, 20, 1));
    let doubts = Barrier.in_doubt(&bank.conn.lock(), Duration::ZERO).unwrap();
    assert_eq!(txns.verdict(&doubts[0].txn).await.unwrap(), Verdict::Abort);
    bank.finish(&doubts[0].call(Phase::Undo)).unwrap();
    assert_eq!(bank.books(), (70, 0, 0));
    // The prepare delivered again: done before, nothing held again.
    assert_eq!(bank.prepare(&ghost, 20).unwrap(), Ran::Duplicate);
    assert_eq!(bank.books(), (70, 0, 0));
    // A rollback before its prepare is recorded; the late prepare is refused.
    let late = BranchCall {
        txn: "ghost-2".into(),
        ..ghost.clone()
    };
    assert_eq!(
        bank.finish(&BranchCall {
            phase: Phase::Undo,
            ..late.clone()
        })
        .unwrap(),
        Ran::EmptyUndo
    );
    assert_eq!(bank.prepare(&late, 20).unwrap(), Ran::Suspended);
    assert_eq!(bank.books(), (70, 0, 0));

    // A prepare refused (not enough money): the transaction aborts, nothing held.
    txns.start(Some("pay-2"), debit(500)).await.unwrap();
    let done = txns.wait("pay-2", WITHIN).await.unwrap();
    assert_eq!(done["status"], "aborted");
    assert_eq!(bank.books(), (70, 0, 0));
}
