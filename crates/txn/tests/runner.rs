//! The runner over real sockets: the log in Meshwork's store (served as an
//! etcd endpoint), participants as real HTTP servers that record what they
//! received, a coordinator killed mid-call and another taking over, an
//! operator abort racing the driver.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use meshwork_coord::Backend;
use meshwork_coord::backend::BackendOptions;
use meshwork_testkit::store::{Embedded, embedded};
use meshwork_testkit::until;
use meshwork_testkit::upstream::{Seen, Upstream};
use meshwork_txn::log::TxnLog;
use meshwork_txn::runner::{HttpCaller, Runner, StaticEndpoints, now_ms};
use meshwork_txn::{Event, Spec, Status, Txn};

const WITHIN: Duration = Duration::from_secs(20);
/// A trace id for the trace-context checks.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

struct Shop {
    _store: Embedded,
    endpoint: String,
    inventory: Upstream,
    payment: Upstream,
}

impl Shop {
    async fn start() -> Shop {
        let store = embedded().await;
        Shop {
            endpoint: store.endpoint.clone(),
            _store: store,
            inventory: Upstream::start("inventory").await,
            payment: Upstream::start("payment").await,
        }
    }

    /// A coordinator: its own store connection and HTTP client.
    async fn runner(&self) -> Runner<HttpCaller<StaticEndpoints>> {
        let backend = Backend::connect(
            std::slice::from_ref(&self.endpoint),
            BackendOptions::default(),
        )
        .await
        .unwrap();
        let endpoints = StaticEndpoints(HashMap::from([
            ("inventory".to_owned(), vec![self.inventory.addr]),
            ("payment".to_owned(), vec![self.payment.addr]),
            // The store's etcd gRPC API, as a gRPC participant.
            ("store".to_owned(), vec![self.endpoint.parse().unwrap()]),
        ]));
        Runner::new(TxnLog::new(backend), HttpCaller::new(endpoints))
    }
}

/// reserve (inventory) then charge (payment), as a saga; `charge` is the
/// payment action's path.
fn order_saga(charge: &str) -> Spec {
    Spec::from_json(&format!(
        r#"{{"mode": "saga", "retry": {{"initial_backoff_ms": 10, "max_backoff_ms": 20}},
            "branches": [
            {{"name": "reserve", "service": "inventory", "action": {{"path": "/reserve", "body": {{"sku": "A", "qty": 1}}}},
              "undo": {{"path": "/release"}}}},
            {{"name": "charge", "service": "payment", "stage": 1, "action": {{"path": "{charge}"}},
              "undo": {{"path": "/refund"}}}}
        ]}}"#
    ))
    .unwrap()
}

/// Waits for a driving task, failing the test instead of hanging it.
async fn finished(
    task: tokio::task::JoinHandle<Result<Status, meshwork_txn::runner::RunError>>,
) -> Status {
    tokio::time::timeout(WITHIN, task)
        .await
        .expect("the transaction did not finish")
        .unwrap()
        .unwrap()
}

fn paths(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .map(|s| format!("{} {}", s.method, s.path))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_commits_and_every_call_carries_the_transaction_headers() {
    let shop = Shop::start().await;
    let runner = shop.runner().await;
    let mut txn = Txn::new("order-1", order_saga("/charge"), now_ms());
    txn.traceparent = Some(format!("00-{TRACE}-00f067aa0ba902b7-01"));
    runner.create(&txn).await.unwrap();
    assert!(runner.create(&txn).await.is_err(), "an id is created once");
    let r = runner.clone();
    assert_eq!(
        finished(tokio::spawn(async move { r.drive("order-1").await })).await,
        Status::Committed
    );

    let reserve = &shop.inventory.seen()[0];
    assert_eq!(paths(&shop.inventory.seen()), ["POST /reserve"]);
    assert_eq!(reserve.header("x-meshwork-txn"), Some("order-1"));
    assert_eq!(reserve.header("x-meshwork-branch"), Some("reserve"));
    assert_eq!(reserve.header("x-meshwork-phase"), Some("action"));
    assert_eq!(
        reserve.header("idempotency-key"),
        Some("order-1/reserve/action")
    );
    assert_eq!(paths(&shop.payment.seen()), ["POST /charge"]);
    // Each call is a new span of the transaction's trace.
    let spans: Vec<String> = [&shop.inventory.seen()[0], &shop.payment.seen()[0]]
        .iter()
        .map(|s| {
            let tp = s.header("traceparent").unwrap().to_owned();
            let parts: Vec<&str> = tp.split('-').collect();
            assert_eq!(parts[1], TRACE, "{tp}");
            assert_ne!(parts[2], "00f067aa0ba902b7", "{tp}");
            parts[2].to_owned()
        })
        .collect();
    assert_ne!(spans[0], spans[1]);
    let stored = runner.log().load("order-1").await.unwrap().unwrap();
    assert_eq!(stored.txn.status, Status::Committed);
    assert_eq!(runner.log().list(0).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_charge_compensates_both_steps_in_reverse_order() {
    let shop = Shop::start().await;
    let runner = shop.runner().await;
    let txn = Txn::new("order-2", order_saga("/status/402"), now_ms());
    runner.create(&txn).await.unwrap();
    let r = runner.clone();
    assert_eq!(
        finished(tokio::spawn(async move { r.drive("order-2").await })).await,
        Status::Aborted
    );
    assert_eq!(
        paths(&shop.inventory.seen()),
        ["POST /reserve", "POST /release"]
    );
    // The declined charge was sent, so its compensation is too (a
    // participant's barrier turns it into a recorded no-op).
    assert_eq!(
        paths(&shop.payment.seen()),
        ["POST /status/402", "POST /refund"]
    );
    let stored = runner.log().load("order-2").await.unwrap().unwrap().txn;
    assert!(
        stored
            .reason
            .as_deref()
            .unwrap()
            .starts_with("charge rejected: 402"),
        "{:?}",
        stored.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_call_is_replaced_and_the_call_resent_with_its_key() {
    let shop = Shop::start().await;
    let spec = Spec::from_json(
        r#"{"mode": "tcc", "branches": [
            {"name": "stock", "service": "inventory", "action": {"path": "/try"},
             "confirm": {"path": "/confirm"}, "undo": {"path": "/cancel"}},
            {"name": "money", "service": "payment", "action": {"path": "/hold"},
             "confirm": {"path": "/confirm"}, "undo": {"path": "/cancel"}}
        ]}"#,
    )
    .unwrap();
    let first = shop.runner().await;
    first
        .create(&Txn::new("order-3", spec, now_ms()))
        .await
        .unwrap();
    let dying = tokio::spawn(async move { first.drive("order-3").await });
    until("the payment try is in flight", WITHIN, async || {
        shop.payment.hits() == 1
    })
    .await;
    // The coordinator dies with the call in flight.
    dying.abort();
    assert!(dying.await.unwrap_err().is_cancelled());

    let second = shop.runner().await;
    let driving = tokio::spawn(async move { second.drive("order-3").await });
    until("the payment try is sent again", WITHIN, async || {
        shop.payment.hits() == 2
    })
    .await;
    shop.payment.release.notify_waiters();
    assert_eq!(finished(driving).await, Status::Committed);

    let money = shop.payment.seen();
    assert_eq!(paths(&money), ["POST /hold", "POST /hold", "POST /confirm"]);
    let key = |s: &Seen| s.header("idempotency-key").unwrap().to_owned();
    assert_eq!(key(&money[0]), "order-3/money/action");
    assert_eq!(
        key(&money[1]),
        key(&money[0]),
        "a resent call keeps its key"
    );
    assert_eq!(
        paths(&shop.inventory.seen()),
        ["POST /try", "POST /confirm"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_abort_wins_over_a_driver_with_an_older_record() {
    let shop = Shop::start().await;
    let runner = shop.runner().await;
    runner
        .create(&Txn::new("order-4", order_saga("/hold"), now_ms()))
        .await
        .unwrap();
    let r = runner.clone();
    let driving = tokio::spawn(async move { r.drive("order-4").await });
    until("the charge is in flight", WITHIN, async || {
        shop.payment.hits() == 1
    })
    .await;
    let aborted = runner
        .apply(
            "order-4",
            Event::Abort {
                reason: "the client cancelled".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(aborted.status, Status::Aborting);
    // The held charge now succeeds: the driver's own record would commit,
    // but its write loses to the abort, and it finishes the abort instead.
    shop.payment.release.notify_waiters();
    assert_eq!(finished(driving).await, Status::Aborted);
    assert_eq!(paths(&shop.payment.seen()), ["POST /hold", "POST /refund"]);
    assert_eq!(
        paths(&shop.inventory.seen()),
        ["POST /reserve", "POST /release"]
    );
    // And once final, an abort is refused with the reason.
    let err = runner
        .apply(
            "order-4",
            Event::Abort {
                reason: "again".into(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "transaction order-4 is already aborted");
}

/// The log's indexes follow the records: an unfinished transaction is in
/// the open index (with its coordinator), a finished one in the done index;
/// `recent` lists both, newest first; `expire` deletes finished records past
/// retention, and nothing unfinished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_indexes_follow_the_records_and_retention_deletes_only_finished_ones() {
    let shop = Shop::start().await;
    let runner = shop.runner().await;
    let log = runner.log();
    let mut open = Txn::new("open-1", order_saga("/hold"), now_ms());
    open.coordinator = "node-a".into();
    log.create(&open).await.unwrap();
    let mut done = Txn::new("done-1", order_saga("/charge"), now_ms() + 1);
    let stored = runner.start(&mut done).await.unwrap();
    assert_eq!(
        runner.drive_stored(stored, "").await.unwrap().status,
        Status::Committed
    );
    assert_eq!(
        log.open().await.unwrap(),
        [("open-1".to_owned(), "node-a".to_owned())]
    );
    assert_eq!(recent(log).await, ["done-1", "open-1"]);

    // Nothing finished before the transaction did: nothing expires.
    assert_eq!(
        log.expire(done.created.saturating_sub(1), 100)
            .await
            .unwrap(),
        0
    );
    assert_eq!(log.expire(now_ms() + 1, 100).await.unwrap(), 1);
    assert!(log.load("done-1").await.unwrap().is_none());
    assert!(log.load("open-1").await.unwrap().is_some());
    assert_eq!(recent(log).await, ["open-1"]);
    assert_eq!(log.expire(now_ms() + 1, 100).await.unwrap(), 0);
}

/// The ids `recent` lists, in its order.
async fn recent(log: &TxnLog) -> Vec<String> {
    let all = log.recent(10).await.unwrap();
    all.into_iter().map(|s| s.txn.id).collect()
}

/// An operator's abort reaches a driver that is waiting on a long call at
/// once: it compensates without waiting for the call (held for good here,
/// with a 60 s deadline) to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_abort_wakes_a_driver_waiting_on_a_call() {
    let shop = Shop::start().await;
    let runner = shop.runner().await;
    let mut spec = order_saga("/hold");
    spec.branches[1].timeout_ms = 60_000;
    runner
        .create(&Txn::new("order-5", spec, now_ms()))
        .await
        .unwrap();
    let r = runner.clone();
    let driving = tokio::spawn(async move { r.drive("order-5").await });
    until("the charge is in flight", WITHIN, async || {
        shop.payment.hits() == 1
    })
    .await;
    runner
        .apply(
            "order-5",
            Event::Abort {
                reason: "the client cancelled".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(finished(driving).await, Status::Aborted);
    assert_eq!(paths(&shop.payment.seen()), ["POST /hold", "POST /refund"]);
    assert_eq!(
        paths(&shop.inventory.seen()),
        ["POST /reserve", "POST /release"]
    );
    shop.payment.release.notify_waiters();
}

/// Protobuf bytes of a message whose fields are all short byte strings.
fn pb(fields: &[(u8, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (number, bytes) in fields {
        out.push((number << 3) | 2);
        out.push(u8::try_from(bytes.len()).unwrap());
        out.extend_from_slice(bytes);
    }
    out
}

/// gRPC branch calls: the store's etcd KV API is the participant (`Put`,
/// compensated by `DeleteRange`). A committed saga leaves the key; one whose
/// next step is refused deletes it again; a call the server refuses
/// (`InvalidArgument`: an empty key) is rejected, not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_take_part_in_a_saga() {
    use meshwork_txn::spec::{BranchSpec, Call};
    let shop = Shop::start().await;
    let runner = shop.runner().await;
    // `put` writes `key`; its compensation deletes `undo_key` (the same key
    // but in the last case, whose put is refused).
    let saga = |key: &[u8], undo_key: &[u8], charge: &str| {
        Spec::saga()
            .branch(
                BranchSpec::new(
                    "put",
                    "store",
                    Call::grpc("/etcdserverpb.KV/Put", &pb(&[(1, key), (2, b"v")])),
                )
                .undo(Call::grpc(
                    "/etcdserverpb.KV/DeleteRange",
                    &pb(&[(1, undo_key)]),
                )),
            )
            .branch(BranchSpec::new("charge", "payment", Call::post(charge)).stage(1))
            .build()
            .unwrap()
    };
    let backend = Backend::connect(
        std::slice::from_ref(&shop.endpoint),
        BackendOptions::default(),
    )
    .await
    .unwrap();
    let run = async |id: &str, spec: Spec| {
        runner.create(&Txn::new(id, spec, now_ms())).await.unwrap();
        let r = runner.clone();
        let id = id.to_owned();
        finished(tokio::spawn(async move { r.drive(&id).await })).await
    };

    assert_eq!(
        run("grpc-1", saga(b"/g/1", b"/g/1", "/charge")).await,
        Status::Committed
    );
    let (kv, _) = backend.get("/g/1").await.unwrap();
    assert_eq!(kv.map(|kv| kv.value.to_vec()), Some(b"v".to_vec()));

    assert_eq!(
        run("grpc-2", saga(b"/g/2", b"/g/2", "/status/402")).await,
        Status::Aborted
    );
    assert!(
        backend.get("/g/2").await.unwrap().0.is_none(),
        "compensated"
    );

    assert_eq!(
        run("grpc-3", saga(b"", b"/g/3", "/charge")).await,
        Status::Aborted
    );
    let record = runner.log().load("grpc-3").await.unwrap().unwrap().txn;
    let reason = record.reason.unwrap_or_default();
    assert!(
        reason.starts_with("put rejected: grpc-status 3"),
        "{reason}"
    );
}

/// An operator's abort applied after the record is written but before its
/// driver starts still wakes that driver at once (its bell is hung up with
/// the record), instead of when its first call (held here, 60 s deadline)
/// ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_before_the_driver_starts_still_wakes_it() {
    use meshwork_txn::spec::{BranchSpec, Call};
    let shop = Shop::start().await;
    let runner = shop.runner().await;
    let spec = Spec::saga()
        .branch(
            BranchSpec::new("charge", "payment", Call::post("/hold"))
                .undo(Call::post("/refund"))
                .timeout(Duration::from_secs(60)),
        )
        .build()
        .unwrap();
    let mut txn = Txn::new("order-7", spec, now_ms());
    let stale = runner.start(&mut txn).await.unwrap();
    runner
        .apply(
            "order-7",
            Event::Abort {
                reason: "cancelled at once".into(),
            },
        )
        .await
        .unwrap();
    let r = runner.clone();
    let driving = tokio::spawn(async move { r.drive_stored(stale, "").await.map(|t| t.status) });
    assert_eq!(finished(driving).await, Status::Aborted);
    // Each sent once. The two are concurrent calls: the refund can reach the
    // participant first (its barrier makes the late hold a refused no-op).
    let mut sent = paths(&shop.payment.seen());
    sent.sort();
    assert_eq!(sent, ["POST /hold", "POST /refund"]);
    shop.payment.release.notify_waiters();
}
