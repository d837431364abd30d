//! The SQLite transaction barrier on a real database file: duplicates,
//! empty undo, suspension, out-of-order delivery, failed work, and the same
//! call racing on two connections.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshwork_sdk::txn::sqlite::rusqlite::{self, Connection};
use meshwork_sdk::txn::sqlite::{Barrier, BarrierError, Ran, TABLE};
use meshwork_sdk::txn::{BranchCall, Phase};

fn open(path: &std::path::Path) -> (Connection, Barrier) {
    let conn = Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    let b = Barrier::install(&conn).unwrap();
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, held INTEGER NOT NULL)",
    )
    .unwrap();
    conn.execute("INSERT OR IGNORE INTO stock VALUES ('a', 0)", [])
        .unwrap();
    (conn, b)
}

fn call(txn: &str, phase: Phase) -> BranchCall {
    BranchCall {
        txn: txn.into(),
        branch: "reserve".into(),
        phase,
    }
}

/// The participant's business: hold one more on try, one fewer on cancel.
fn step(b: Barrier, conn: &mut Connection, c: &BranchCall) -> Ran<i64> {
    let delta = match c.phase {
        Phase::Action => 1,
        Phase::Undo => -1,
        Phase::Confirm => 0,
    };
    b.run(conn, c, |tx| {
        tx.execute("UPDATE stock SET held = held + ?1 WHERE sku = 'a'", [delta])?;
        tx.query_row("SELECT held FROM stock WHERE sku = 'a'", [], |r| r.get(0))
    })
    .unwrap()
}

fn held(conn: &Connection) -> i64 {
    conn.query_row("SELECT held FROM stock WHERE sku = 'a'", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn try_confirm_and_their_duplicates_take_effect_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut conn, b) = open(&dir.path().join("p.db"));
    assert_eq!(step(b, &mut conn, &call("t1", Phase::Action)), Ran::Done(1));
    assert_eq!(
        step(b, &mut conn, &call("t1", Phase::Action)),
        Ran::Duplicate
    );
    assert_eq!(
        step(b, &mut conn, &call("t1", Phase::Confirm)),
        Ran::Done(1)
    );
    assert_eq!(
        step(b, &mut conn, &call("t1", Phase::Confirm)),
        Ran::Duplicate
    );
    assert_eq!(held(&conn), 1);
    // Another transaction's same branch is its own.
    assert_eq!(step(b, &mut conn, &call("t2", Phase::Action)), Ran::Done(2));
}

#[test]
fn an_undo_after_its_action_undoes_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut conn, b) = open(&dir.path().join("p.db"));
    step(b, &mut conn, &call("t1", Phase::Action));
    assert_eq!(step(b, &mut conn, &call("t1", Phase::Undo)), Ran::Done(0));
    assert_eq!(step(b, &mut conn, &call("t1", Phase::Undo)), Ran::Duplicate);
    assert_eq!(held(&conn), 0);
}

#[test]
fn an_undo_before_its_action_is_an_empty_undo_and_bars_the_late_action() {
    let dir = tempfile::tempdir().unwrap();
    let (mut conn, b) = open(&dir.path().join("p.db"));
    // Out of order: the coordinator gave up on the try and cancelled; the
    // try's request was still in the network.
    let undo = step(b, &mut conn, &call("t1", Phase::Undo));
    assert_eq!(undo, Ran::EmptyUndo);
    assert!(undo.succeeded());
    let late = step(b, &mut conn, &call("t1", Phase::Action));
    assert_eq!(late, Ran::Suspended);
    assert!(!late.succeeded());
    assert_eq!(step(b, &mut conn, &call("t1", Phase::Undo)), Ran::Duplicate);
    assert_eq!(held(&conn), 0, "nothing is left held");
    let reason: String = conn
        .query_row(
            &format!("SELECT reason FROM {TABLE} WHERE txn = 't1' AND phase = 'action'"),
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(reason, "undo");
}

#[test]
fn failed_work_rolls_back_with_its_barrier_row_so_a_retry_runs_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut conn, b) = open(&dir.path().join("p.db"));
    let c = call("t1", Phase::Action);
    let r: Result<Ran<()>, BarrierError<rusqlite::Error>> = b.run(&mut conn, &c, |tx| {
        tx.execute("UPDATE stock SET held = held + 1 WHERE sku = 'a'", [])?;
        Err(rusqlite::Error::QueryReturnedNoRows)
    });
    assert!(matches!(r, Err(BarrierError::Work(_))));
    assert_eq!(held(&conn), 0);
    let rows: i64 = conn
        .query_row(&format!("SELECT count(*) FROM {TABLE}"), [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0);
    assert_eq!(step(b, &mut conn, &c), Ran::Done(1));
}

#[test]
fn the_same_call_racing_on_two_connections_takes_effect_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.db");
    drop(open(&path));
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let (path, barrier) = (path.clone(), barrier.clone());
            std::thread::spawn(move || {
                let (mut conn, b) = open(&path);
                barrier.wait();
                // Half the threads deliver the try, half its cancel, all at once.
                let phase = if i % 2 == 0 {
                    Phase::Action
                } else {
                    Phase::Undo
                };
                step(b, &mut conn, &call("race", phase))
            })
        })
        .collect();
    let ran: Vec<Ran<i64>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let (conn, _) = open(&path);
    let done = ran.iter().filter(|r| matches!(r, Ran::Done(_))).count();
    // Whichever came first decides: try then cancel (both ran, net 0), or
    // cancel first (empty undo, the tries suspended, net 0).
    assert_eq!(held(&conn), 0, "{ran:?}");
    assert!(done == 2 || done == 0, "{ran:?}");
    if done == 0 {
        assert_eq!(ran.iter().filter(|r| **r == Ran::EmptyUndo).count(), 1);
        assert_eq!(ran.iter().filter(|r| **r == Ran::Suspended).count(), 4);
    }
}
