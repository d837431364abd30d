//! TCC through the real coordinator against a participant that guards its
//! SQLite database with the SDK's barrier (meshwork_sdk::txn::sqlite): a
//! commit whose confirm is delivered twice takes effect once, and a try
//! delayed past the transaction's deadline — cancelled before it arrived —
//! is recorded as an empty cancel and refused when it lands, so nothing
//! stays held.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use meshwork_coord::Backend;
use meshwork_coord::backend::BackendOptions;
use meshwork_sdk::txn::sqlite::rusqlite::Connection;
use meshwork_sdk::txn::sqlite::{Barrier, Ran};
use meshwork_sdk::txn::{BranchCall, Phase};
use meshwork_testkit::store::embedded;
use meshwork_testkit::until;
use meshwork_txn::log::TxnLog;
use meshwork_txn::runner::{HttpCaller, Runner, StaticEndpoints, now_ms};
use meshwork_txn::{Spec, Status, Txn};
use parking_lot::Mutex;

const WITHIN: Duration = Duration::from_secs(20);
/// How long a try of a transaction named `late-*` is held up in the network.
const LATE_BY: Duration = Duration::from_millis(800);

#[derive(Clone)]
struct Participant {
    conn: Arc<Mutex<Connection>>,
    barrier: Barrier,
    /// Every call's barrier outcome, in order: (txn, phase, outcome).
    ran: Arc<Mutex<Vec<(String, Phase, String)>>>,
    tries_arrived: Arc<std::sync::atomic::AtomicUsize>,
}

impl Participant {
    fn held(&self) -> i64 {
        self.conn
            .lock()
            .query_row("SELECT held FROM stock", [], |r| r.get(0))
            .unwrap()
    }
    fn outcomes(&self, txn: &str) -> Vec<(Phase, String)> {
        self.ran
            .lock()
            .iter()
            .filter(|(t, ..)| t == txn)
            .map(|(_, p, o)| (*p, o.clone()))
            .collect()
    }
}

/// Try holds one, confirm keeps it (counts it as sold), cancel gives it back.
/// The call runs in its own task: a request held up "in the network" still
/// lands after the coordinator stopped waiting and dropped the connection.
async fn branch(State(p): State<Participant>, call: BranchCall) -> StatusCode {
    tokio::spawn(land(p, call)).await.unwrap()
}

async fn land(p: Participant, call: BranchCall) -> StatusCode {
    if call.phase == Phase::Action && call.txn.starts_with("late") {
        tokio::time::sleep(LATE_BY).await;
        p.tries_arrived
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    let p2 = p.clone();
    let call2 = call.clone();
    let ran = tokio::task::spawn_blocking(move || {
        let mut conn = p2.conn.lock();
        p2.barrier.run(&mut conn, &call2, |tx| {
            let sql = match call2.phase {
                Phase::Action => "UPDATE stock SET held = held + 1",
                Phase::Confirm => "UPDATE stock SET held = held - 1, sold = sold + 1",
                Phase::Undo => "UPDATE stock SET held = held - 1",
            };
            tx.execute(sql, [])
        })
    })
    .await
    .unwrap()
    .unwrap();
    let kind = match &ran {
        Ran::Done(_) => "done",
        Ran::Duplicate => "duplicate",
        Ran::EmptyUndo => "empty_undo",
        Ran::Suspended => "suspended",
    };
    p.ran.lock().push((call.txn, call.phase, kind.to_owned()));
    if ran.succeeded() {
        StatusCode::OK
    } else {
        StatusCode::CONFLICT
    }
}

async fn start_participant(dir: &std::path::Path) -> (Participant, std::net::SocketAddr) {
    let conn = Connection::open(dir.join("inventory.db")).unwrap();
    let barrier = Barrier::install(&conn).unwrap();
    conn.execute_batch(
        "CREATE TABLE stock (held INTEGER NOT NULL, sold INTEGER NOT NULL);
         INSERT INTO stock VALUES (0, 0);",
    )
    .unwrap();
    let p = Participant {
        conn: Arc::new(Mutex::new(conn)),
        barrier,
        ran: Arc::default(),
        tries_arrived: Arc::default(),
    };
    let app = axum::Router::new()
        .route("/try", axum::routing::post(branch))
        .route("/confirm", axum::routing::post(branch))
        .route("/cancel", axum::routing::post(branch))
        .with_state(p.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (p, addr)
}

fn tcc(timeout_ms: u64) -> Spec {
    Spec::from_json(&format!(
        r#"{{"mode": "tcc", "timeout_ms": {timeout_ms},
            "retry": {{"initial_backoff_ms": 10, "max_backoff_ms": 20}},
            "branches": [
            {{"name": "reserve", "service": "inventory", "timeout_ms": 100,
              "action": {{"path": "/try"}}, "confirm": {{"path": "/confirm"}},
              "undo": {{"path": "/cancel"}}}}
        ]}}"#
    ))
    .unwrap()
}

async fn coordinator(
    endpoint: &str,
    participant: std::net::SocketAddr,
) -> Runner<HttpCaller<StaticEndpoints>> {
    let backend = Backend::connect(&[endpoint.to_owned()], BackendOptions::default())
        .await
        .unwrap();
    let endpoints = StaticEndpoints(HashMap::from([("inventory".to_owned(), vec![participant])]));
    Runner::new(TxnLog::new(backend), HttpCaller::new(endpoints))
}

async fn run(runner: &Runner<HttpCaller<StaticEndpoints>>, mut txn: Txn) -> Status {
    let stored = runner.start(&mut txn).await.unwrap();
    tokio::time::timeout(WITHIN, runner.drive_stored(stored, ""))
        .await
        .expect("the transaction did not finish")
        .unwrap()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_confirmed_twice_takes_effect_once() {
    let store = embedded().await;
    let dir = tempfile::tempdir().unwrap();
    let (p, addr) = start_participant(dir.path()).await;
    let runner = coordinator(&store.endpoint, addr).await;
    let status = run(&runner, Txn::new("ok-1", tcc(10_000), now_ms())).await;
    assert_eq!(status, Status::Committed);
    // The confirm delivered again (a retry whose first answer was lost).
    let again = reqwest_like_post(addr, "/confirm", "ok-1", "confirm").await;
    assert_eq!(again, 200);
    assert_eq!(
        p.outcomes("ok-1"),
        [
            (Phase::Action, "done".to_owned()),
            (Phase::Confirm, "done".to_owned()),
            (Phase::Confirm, "duplicate".to_owned()),
        ]
    );
    let (held, sold): (i64, i64) = p
        .conn
        .lock()
        .query_row("SELECT held, sold FROM stock", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((held, sold), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_that_lands_after_its_cancel_is_refused_and_leaves_nothing_held() {
    let store = embedded().await;
    let dir = tempfile::tempdir().unwrap();
    let (p, addr) = start_participant(dir.path()).await;
    let runner = coordinator(&store.endpoint, addr).await;
    // Each try times out at the coordinator (100 ms) while it is held up
    // (800 ms); the transaction's 300 ms deadline passes and it cancels.
    let status = run(&runner, Txn::new("late-1", tcc(300), now_ms())).await;
    assert_eq!(status, Status::Aborted);
    let record = runner.log().load("late-1").await.unwrap().unwrap().txn;
    let sent = record
        .history
        .iter()
        .filter(|h| h.phase == Some(Phase::Action) && h.what == "sent")
        .count();
    assert!(sent >= 1, "{:?}", record.history);
    // Every try that was sent lands eventually; wait for all of them.
    until("the held-up tries land", WITHIN, async || {
        p.tries_arrived.load(std::sync::atomic::Ordering::SeqCst) >= sent
            && p.outcomes("late-1").len() > sent
    })
    .await;
    let outcomes = p.outcomes("late-1");
    assert_eq!(
        outcomes[0],
        (Phase::Undo, "empty_undo".to_owned()),
        "{outcomes:?}"
    );
    assert!(
        outcomes[1..]
            .iter()
            .all(|o| *o == (Phase::Action, "suspended".to_owned())),
        "{outcomes:?}"
    );
    assert_eq!(p.held(), 0, "nothing stays held");
}

/// One branch call as the coordinator sends it, over a fresh connection.
async fn reqwest_like_post(addr: std::net::SocketAddr, path: &str, txn: &str, phase: &str) -> u16 {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nx-meshwork-txn: {txn}\r\nx-meshwork-branch: reserve\r\nx-meshwork-phase: {phase}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    let head = meshwork_testkit::http::raw(addr, req.as_bytes()).await;
    meshwork_testkit::http::status_of(&head)
}
