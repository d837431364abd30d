//! Two-phase messages: a participant's local transaction stages a
//! distributed transaction in its outbox (the SDK's `txn::outbox`); only a
//! committed one is started, the drain starts each once even when repeated
//! after a crash, and the consumer is called once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use meshwork_sdk::txn::outbox::{DEAD_TABLE, Outbox, TABLE};
use meshwork_sdk::txn::sqlite::rusqlite::Connection;
use meshwork_sdk::{Meshwork, Options};
use meshwork_testkit::store::embedded;
use meshwork_testkit::upstream::Upstream;
use parking_lot::Mutex;
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(20);

fn message(order: i64) -> Value {
    json!({"mode": "saga", "recovery": "forward", "branches": [
        {"name": "record", "service": "ledger",
         "action": {"path": "/entries", "body": {"order": order}}}
    ]})
}

fn staged(conn: &Arc<Mutex<Connection>>) -> i64 {
    conn.lock()
        .query_row(&format!("SELECT count(*) FROM {TABLE}"), [], |r| r.get(0))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_sent_once_exactly_when_its_local_transaction_commits() {
    let store = embedded().await;
    let coord = common::txn_node(&store.endpoint).await;
    let ledger = Upstream::start("ledger").await;
    common::register(&coord, "ledger", ledger.addr.port()).await;
    let mw = Meshwork::connect(Options::new("orders", vec![store.endpoint.clone()]).unwrap())
        .await
        .unwrap();
    let txns = mw.transactions();

    let dir = tempfile::tempdir().unwrap();
    let conn = Connection::open(dir.path().join("orders.db")).unwrap();
    Outbox::install(&conn).unwrap();
    conn.execute_batch("CREATE TABLE orders (id INTEGER PRIMARY KEY);")
        .unwrap();
    let conn = Arc::new(Mutex::new(conn));

    // Committed: the order and its message.
    {
        let mut c = conn.lock();
        let tx = c.transaction().unwrap();
        tx.execute("INSERT INTO orders (id) VALUES (1)", [])
            .unwrap();
        Outbox.stage(&tx, "msg-1", &message(1)).unwrap();
        tx.commit().unwrap();
    }
    // Rolled back: neither.
    {
        let mut c = conn.lock();
        let tx = c.transaction().unwrap();
        tx.execute("INSERT INTO orders (id) VALUES (2)", [])
            .unwrap();
        Outbox.stage(&tx, "msg-2", &message(2)).unwrap();
        drop(tx);
    }
    assert_eq!(staged(&conn), 1);
    assert_eq!(Outbox.drain(&conn, &txns).await.unwrap(), 1);
    assert_eq!(staged(&conn), 0);
    let done = txns.wait("msg-1", WITHIN).await.unwrap();
    assert_eq!(done["status"], "committed");
    assert_eq!(ledger.hits(), 1);
    assert!(matches!(
        txns.wait("msg-2", Duration::ZERO).await,
        Err(meshwork_sdk::txn::TxnError::NotFound(_))
    ));

    // A drain that started a message and crashed before removing it: the
    // next drain finds it started (Exists), removes it, starts nothing twice.
    {
        let mut c = conn.lock();
        let tx = c.transaction().unwrap();
        Outbox.stage(&tx, "msg-3", &message(3)).unwrap();
        tx.commit().unwrap();
    }
    txns.start(Some("msg-3"), message(3)).await.unwrap();
    assert_eq!(Outbox.drain(&conn, &txns).await.unwrap(), 1);
    assert_eq!(staged(&conn), 0);
    assert_eq!(
        txns.wait("msg-3", WITHIN).await.unwrap()["status"],
        "committed"
    );
    assert_eq!(ledger.hits(), 2);

    // An invalid definition is refused when staged.
    {
        let mut c = conn.lock();
        let tx = c.transaction().unwrap();
        let bad = json!({"mode": "saga", "branches": []});
        assert!(Outbox.stage(&tx, "msg-x", &bad).is_err());
    }
    // One the coordinator refuses for good (its id) is set aside with the
    // reason; the one behind it still starts.
    {
        let mut c = conn.lock();
        let tx = c.transaction().unwrap();
        Outbox.stage(&tx, "bad id!", &message(5)).unwrap();
        Outbox.stage(&tx, "msg-5", &message(5)).unwrap();
        tx.commit().unwrap();
    }
    assert_eq!(Outbox.drain(&conn, &txns).await.unwrap(), 2);
    assert_eq!(staged(&conn), 0);
    let reason: String = conn
        .lock()
        .query_row(
            &format!("SELECT reason FROM {DEAD_TABLE} WHERE id = 'bad id!'"),
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(reason.starts_with("400"), "{reason}");
    assert_eq!(
        txns.wait("msg-5", WITHIN).await.unwrap()["status"],
        "committed"
    );
    assert_eq!(ledger.hits(), 3);

    // The background drainer.
    let drainer = Outbox.spawn_drainer(conn.clone(), txns.clone(), Duration::from_millis(20));
    {
        let mut c = conn.lock();
        let tx = c.transaction().unwrap();
        Outbox.stage(&tx, "msg-4", &message(4)).unwrap();
        tx.commit().unwrap();
    }
    meshwork_testkit::until("the drainer to start msg-4", WITHIN, async || {
        txns.wait("msg-4", Duration::ZERO).await.is_ok()
    })
    .await;
    assert_eq!(
        txns.wait("msg-4", WITHIN).await.unwrap()["status"],
        "committed"
    );
    assert_eq!(ledger.hits(), 4);
    drainer.abort();
}
