//! The SDK's `TxnClient` against a real coordinator: it finds the `txn` node
//! in membership, starts a transaction (a second start of the same id is
//! `Exists`), waits for its end, and reports unknown ids and bad definitions
//! as the node does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use meshwork_sdk::txn::TxnError;
use meshwork_sdk::{Meshwork, Options};
use meshwork_testkit::store::embedded;
use meshwork_testkit::upstream::Upstream;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_starts_a_transaction_and_waits_for_its_end() {
    let store = embedded().await;
    let coord = common::txn_node(&store.endpoint).await;
    let inventory = Upstream::start("inventory").await;
    common::register(&coord, "inventory", inventory.addr.port()).await;

    let mw = Meshwork::connect(Options::new("order", vec![store.endpoint.clone()]).unwrap())
        .await
        .unwrap();
    let txns = mw.transactions();
    let saga = json!({"mode": "saga", "branches": [
        {"name": "reserve", "service": "inventory", "action": {"path": "/reserve"}, "undo": {"path": "/release"}}
    ]});
    let started = txns.start(Some("order-7"), saga.clone()).await.unwrap();
    assert_eq!(started["id"], "order-7");
    assert_eq!(started["coordinator"], "n1");
    // Starting is idempotent: the second start of an id is refused, nothing runs twice.
    assert!(matches!(
        txns.start(Some("order-7"), saga.clone()).await,
        Err(TxnError::Exists(id)) if id == "order-7"
    ));
    let done = txns.wait("order-7", Duration::from_secs(20)).await.unwrap();
    assert_eq!(done["status"], "committed");
    assert_eq!(inventory.hits(), 1);
    // Start and wait in one: the final record, from the node that drove it.
    let done = txns
        .start_and_wait(Some("order-8"), saga.clone(), Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(
        (done["id"].as_str(), done["status"].as_str()),
        (Some("order-8"), Some("committed"))
    );
    assert_eq!(inventory.hits(), 2);

    assert!(matches!(
        txns.wait("nobody", Duration::from_millis(10)).await,
        Err(TxnError::NotFound(_))
    ));
    let err = txns
        .start(None, json!({"mode": "saga", "branches": []}))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, TxnError::Refused { status: 400, message } if message.contains("branches")),
        "{err}"
    );
}
