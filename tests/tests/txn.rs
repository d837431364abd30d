//! Distributed transactions through the node: a saga started over the HTTP
//! API runs against participants found in the registry; bad requests are
//! refused with the field to fix; and a coordinator killed with SIGKILL in
//! the middle of a call is replaced by another node, which resends the call
//! with the same idempotency key and finishes the transaction — at every
//! crash point of a committing and of a compensating saga; the console's
//! pages show a stuck transaction.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshwork_testkit::blocking::{eventually, until};
use meshwork_testkit::http::blocking as http;
use meshwork_testkit::upstream::{Seen, Upstream};
use meshwork_tests::meshwork_http as run;
use serde_json::{Value, json};

/// Participants: real HTTP servers on their own runtime.
struct Participants {
    inventory: Upstream,
    payment: Upstream,
    _rt: tokio::runtime::Runtime,
}

impl Participants {
    fn start() -> Participants {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (inventory, payment) = rt.block_on(async {
            (
                Upstream::start("inventory").await,
                Upstream::start("payment").await,
            )
        });
        Participants {
            inventory,
            payment,
            _rt: rt,
        }
    }

    /// Registers both with a node.
    fn register(&self, node: &str) {
        for (svc, up) in [("inventory", &self.inventory), ("payment", &self.payment)] {
            let body = json!({"address": "127.0.0.1", "port": up.addr.port(), "ephemeral": false});
            let (code, resp) = http::post(
                node,
                &format!("/v1/services/{svc}/instances"),
                &body.to_string(),
            )
            .unwrap();
            assert_eq!(code, 201, "{resp}");
        }
    }
}

/// reserve (inventory), then charge (payment, at `charge`), as a saga.
fn order(id: &str, charge: &str) -> String {
    json!({"id": id, "spec": {"mode": "saga", "branches": [
        {"name": "reserve", "service": "inventory", "action": {"path": "/reserve"}, "undo": {"path": "/release"}},
        {"name": "charge", "service": "payment", "stage": 1, "action": {"path": charge}, "undo": {"path": "/refund"}}
    ]}})
    .to_string()
}

fn get(node: &str, path: &str) -> Value {
    let (code, body) = http::get(node, path).unwrap();
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Node `a`: the store (and coordination), in a temporary directory.
fn store_node() -> (tempfile::TempDir, meshwork_tests::Server) {
    let dir = tempfile::tempdir().unwrap();
    let a = meshwork_tests::start(
        &dir.path().join("a"),
        &["--roles", "store,coord", "--name", "a"],
        &[],
    );
    (dir, a)
}

/// A coordinator `name` on `a`'s store, its session TTL 2 s (a dead one's
/// transactions move within seconds).
fn coordinator(
    dir: &tempfile::TempDir,
    a: &meshwork_tests::Server,
    name: &str,
    env: &[(&str, &str)],
) -> meshwork_tests::Server {
    let store = format!("etcd://{}", a.etcd);
    meshwork_tests::start(
        &dir.path().join(name),
        &[
            "--roles",
            "coord,txn",
            "--store",
            &store,
            "--name",
            name,
            "--node-ttl",
            "2",
        ],
        env,
    )
}

fn paths(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .map(|s| format!("{} {}", s.method, s.path))
        .collect()
}

#[test]
fn a_saga_started_over_http_commits_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = meshwork_tests::start(dir.path(), &["--roles", "store,coord,txn"], &[]);
    let h = node.http.as_str();
    let p = Participants::start();
    p.register(h);

    // Started inside a caller's trace: the transaction continues it.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (code, body) = http::raw(
        h,
        &format!("POST /v1/txn HTTP/1.1\r\nHost: {h}\r\nContent-Type: application/json\r\ntraceparent: 00-{trace}-00f067aa0ba902b7-01"),
        &order("order-1", "/charge"),
    )
    .unwrap();
    assert_eq!(code, 201, "{body}");
    let status = eventually("order-1 to commit", Duration::from_secs(20), || {
        let v = get(h, "/v1/txn/order-1");
        v["status"]
            .as_str()
            .filter(|s| *s == "committed")
            .map(str::to_owned)
    });
    assert_eq!(status, "committed");
    assert_eq!(paths(&p.inventory.seen()), ["POST /reserve"]);
    assert_eq!(
        p.payment.seen()[0].header("idempotency-key"),
        Some("order-1/charge/action")
    );
    let tp = p.inventory.seen()[0]
        .header("traceparent")
        .unwrap()
        .to_owned();
    assert!(tp.starts_with(&format!("00-{trace}-")), "{tp}");
    assert!(!tp.contains("00f067aa0ba902b7"), "a span of its own: {tp}");

    // The same id again: 409, nothing runs twice.
    let (code, body) = http::post(h, "/v1/txn", &order("order-1", "/charge")).unwrap();
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("\"exists\""), "{body}");
    // A definition with a mistake names the field.
    let bad = json!({"spec": {"mode": "tcc", "branches": [
        {"name": "a", "service": "s", "action": {"path": "/t"}, "undo": {"path": "/c"}}]}});
    let (code, body) = http::post(h, "/v1/txn", &bad.to_string()).unwrap();
    assert_eq!(code, 400, "{body}");
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["detail"]["field"], "branches[0].confirm");
    let (code, body) = http::post(h, "/v1/txn", r#"{"spec": 1}"#).unwrap();
    assert_eq!(code, 400, "{body}");
    // Presumed abort: an unknown transaction's verdict is abort.
    assert_eq!(get(h, "/v1/txn/nobody/verdict")["verdict"], "abort");
    assert_eq!(get(h, "/v1/txn/order-1/verdict")["verdict"], "commit");
    // Over: abort is refused.
    let (code, body) = http::post(h, "/v1/txn/order-1/abort", "").unwrap();
    assert_eq!(code, 409, "{body}");

    // The command line.
    let (ok, out, err) = run(h, &["txn", "list"]);
    assert!(ok, "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("order-1") && l.contains("committed")),
        "{out}"
    );
    let (ok, out, err) = run(h, &["txn", "show", "order-1", "-o", "json"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], "committed");
    let (ok, _, err) = run(h, &["txn", "abort", "order-1"]);
    assert!(!ok);
    assert!(err.contains("already committed"), "{err}");
}

/// An operator's abort sent to a node that does not drive the transaction
/// is forwarded to the one that does, whose driver compensates at once —
/// not when its call (held here, with a 60 s deadline) ends.
#[test]
fn an_abort_sent_to_another_node_reaches_the_driver_at_once() {
    let (dir, a) = store_node();
    let b = coordinator(&dir, &a, "b", &[]);
    let c = coordinator(&dir, &a, "c", &[]);
    let p = Participants::start();
    p.register(&a.http);
    let saga = json!({"id": "order-9", "spec": {"mode": "saga", "branches": [
        {"name": "reserve", "service": "inventory", "action": {"path": "/reserve"}, "undo": {"path": "/release"}},
        {"name": "charge", "service": "payment", "stage": 1, "action": {"path": "/hold"},
         "undo": {"path": "/refund"}, "timeout_ms": 60000}
    ]}});
    let (code, body) = http::post(&b.http, "/v1/txn", &saga.to_string()).unwrap();
    assert_eq!(code, 201, "{body}");
    until(
        "the charge to be in flight",
        Duration::from_secs(20),
        || p.payment.hits() == 1,
    );
    // A client waiting on the other node is answered when the driver ends.
    let waiter = {
        let c = c.http.clone();
        std::thread::spawn(move || get(&c, "/v1/txn/order-9?wait_ms=20000"))
    };
    let (code, body) = http::post(
        &c.http,
        "/v1/txn/order-9/abort",
        r#"{"reason": "the customer cancelled"}"#,
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let answered: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answered["status"], "aborting", "{body}");
    assert_eq!(answered["coordinator"], "b", "{body}");
    eventually("order-9 to be compensated", Duration::from_secs(20), || {
        let v = get(&c.http, "/v1/txn/order-9");
        (v["status"] == "aborted").then_some(())
    });
    assert_eq!(waiter.join().unwrap()["status"], "aborted");
    assert_eq!(paths(&p.payment.seen()), ["POST /hold", "POST /refund"]);
    assert_eq!(
        paths(&p.inventory.seen()),
        ["POST /reserve", "POST /release"]
    );
    p.payment.release.notify_waiters();
}

/// Node `a` serves the store; `b` and `c` coordinate transactions on it. `b`
/// starts a saga and is SIGKILLed while the charge is in flight; `c` claims
/// the transaction once `b`'s session expires and resends the charge with
/// the same idempotency key.
#[test]
fn a_killed_coordinator_is_replaced_and_its_call_resent_with_its_key() {
    let (dir, a) = store_node();
    let coordinator = |name: &str| coordinator(&dir, &a, name, &[]);
    let mut b = coordinator("b");
    let c = coordinator("c");
    let p = Participants::start();
    p.register(&a.http);

    let (code, body) = http::post(&b.http, "/v1/txn", &order("order-2", "/hold")).unwrap();
    assert_eq!(code, 201, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["coordinator"],
        "b"
    );
    until(
        "the charge to be in flight",
        Duration::from_secs(20),
        || p.payment.hits() == 1,
    );
    b.kill9();
    until(
        "c to take the transaction over and resend the charge",
        Duration::from_secs(20),
        || p.payment.hits() == 2,
    );
    assert_eq!(get(&c.http, "/v1/txn/order-2")["coordinator"], "c");
    p.payment.release.notify_waiters();
    eventually("order-2 to commit", Duration::from_secs(20), || {
        let v = get(&c.http, "/v1/txn/order-2");
        (v["status"] == "committed").then_some(())
    });
    let charges = p.payment.seen();
    assert_eq!(paths(&charges), ["POST /hold", "POST /hold"]);
    assert_eq!(
        charges[0].header("idempotency-key"),
        Some("order-2/charge/action")
    );
    assert_eq!(
        charges[1].header("idempotency-key"),
        charges[0].header("idempotency-key"),
        "the resent call keeps its key"
    );
    assert_eq!(paths(&p.inventory.seen()), ["POST /reserve"]);
}

/// A TCC whose confirm keeps failing is stuck: the console's Transactions
/// pages list it highlighted with a retry button and show its timeline.
#[test]
fn the_console_shows_a_stuck_transaction_and_its_timeline() {
    let dir = tempfile::tempdir().unwrap();
    let node = meshwork_tests::start(dir.path(), &["--roles", "store,coord,txn"], &[]);
    let h = node.http.as_str();
    let p = Participants::start();
    p.register(h);
    let tcc = json!({"id": "hold-stuck", "spec": {"mode": "tcc",
        "retry": {"initial_backoff_ms": 10, "max_backoff_ms": 50, "stuck_after": 2},
        "branches": [
        {"name": "reserve", "service": "inventory", "action": {"path": "/reserve"},
         "confirm": {"path": "/confirm"}, "undo": {"path": "/release"}},
        {"name": "charge", "service": "payment", "action": {"path": "/charge"},
         "confirm": {"path": "/status/503"}, "undo": {"path": "/refund"}}
    ]}});
    let (code, body) = http::post(h, "/v1/txn", &tcc.to_string()).unwrap();
    assert_eq!(code, 201, "{body}");
    until("the confirm to be stuck", Duration::from_secs(20), || {
        get(h, "/v1/txn/hold-stuck")["branches"][1]["stuck"] == true
    });

    let (code, page) = http::get(h, "/ui/transactions").unwrap();
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("<h1>Transactions</h1>"), "{page}");
    assert!(page.contains("1 unfinished"), "{page}");
    assert!(
        page.contains("stuck: branch charge keeps failing"),
        "{page}"
    );
    assert!(page.contains("<tr class=\"warn\">"), "{page}");
    assert!(
        page.contains("data-api=\"/v1/txn/hold-stuck/retry\""),
        "{page}"
    );
    // Committing: too late to abort, so no abort button.
    assert!(!page.contains("/v1/txn/hold-stuck/abort"), "{page}");

    let (code, page) = http::get(h, "/ui/transactions/hold-stuck?fragment=1").unwrap();
    assert_eq!(code, 200, "{page}");
    assert!(!page.contains("<html"), "a fragment is the content alone");
    for want in [
        "committing",
        "Stuck: branch charge keeps failing",
        "confirm #2",
        "unknown: 503 Service Unavailable",
        "&quot;mode&quot;: &quot;tcc&quot;",
    ] {
        assert!(page.contains(want), "{want}: {page}");
    }
    // The button's call does what it says.
    let (code, body) = http::post(h, "/v1/txn/hold-stuck/retry", "{}").unwrap();
    assert_eq!(code, 200, "{body}");

    let (code, page) = http::get(h, "/ui/transactions/nobody").unwrap();
    assert_eq!(code, 200);
    assert!(page.contains("No transaction nobody"), "{page}");
}

/// Fault injection: a coordinator SIGKILLed at each crash point of a saga
/// that commits and of one that compensates (MESHWORK_TXN_FAILPOINT parks it
/// exactly there; the test kills it). Each time another coordinator
/// finishes the transaction with the outcome it would have had, every call
/// it resends carries the first one's idempotency key, every call the
/// outcome needs was made and none it does not (no undo of a committed
/// saga; an undo for every action of an aborted one).
#[test]
fn a_coordinator_killed_at_every_crash_point_loses_nothing() {
    let (dir, a) = store_node();
    let coordinator = |name: &str, env: &[(&str, &str)]| coordinator(&dir, &a, name, env);
    let c = coordinator("c", &[]);
    let p = Participants::start();
    p.register(&a.http);

    // (charge path, final status, crash point, hit).
    let cases = [
        ("/charge", "committed", "drive_start", 1),
        ("/charge", "committed", "after_call", 1),
        ("/charge", "committed", "after_save", 1),
        ("/charge", "committed", "after_call", 2),
        ("/status/402", "aborted", "after_call", 2),
        ("/status/402", "aborted", "after_save", 2),
        ("/status/402", "aborted", "after_call", 3),
        ("/status/402", "aborted", "after_save", 3),
        ("/status/402", "aborted", "after_call", 4),
    ];
    for (i, (charge, outcome, point, nth)) in cases.into_iter().enumerate() {
        let id = format!("fp-{i}");
        let marker = dir.path().join(format!("failpoint-{i}"));
        let armed = format!("{point}:{nth}:{}", marker.display());
        let mut b = coordinator(&format!("b{i}"), &[("MESHWORK_TXN_FAILPOINT", &armed)]);
        let (code, body) = http::post(&b.http, "/v1/txn", &order(&id, charge)).unwrap();
        assert_eq!(code, 201, "{id}: {body}");
        until(
            &format!("{id}: b{i} to reach {point} #{nth}"),
            Duration::from_secs(20),
            || marker.exists(),
        );
        b.kill9();
        let status = eventually(
            &format!("{id} ({point} #{nth}) to finish on c"),
            Duration::from_secs(30),
            || {
                let v = get(&c.http, &format!("/v1/txn/{id}"));
                v["status"]
                    .as_str()
                    .filter(|s| *s == "committed" || *s == "aborted")
                    .map(str::to_owned)
            },
        );
        assert_eq!(status, outcome, "{id} crashed at {point} #{nth}");

        // Every call of this transaction, in arrival order, by its key.
        let mut calls: Vec<(String, String)> = Vec::new();
        for up in [&p.inventory, &p.payment] {
            for s in up.seen() {
                if s.header("x-meshwork-txn") == Some(id.as_str()) {
                    let key = s.header("idempotency-key").unwrap_or("").to_owned();
                    let want = format!(
                        "{id}/{}/{}",
                        s.header("x-meshwork-branch").unwrap_or(""),
                        s.header("x-meshwork-phase").unwrap_or("")
                    );
                    assert_eq!(key, want, "{id}: a call's key names its branch and phase");
                    calls.push((key, s.path.clone()));
                }
            }
        }
        let mut keys: Vec<&str> = calls.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        let expected: &[&str] = if outcome == "committed" {
            &["action"; 2]
        } else {
            &["action", "undo"]
        };
        let mut want: Vec<String> = Vec::new();
        for b in ["charge", "reserve"] {
            for ph in expected {
                want.push(format!("{id}/{b}/{ph}"));
            }
        }
        want.sort_unstable();
        want.dedup();
        assert_eq!(keys, want, "{id} crashed at {point} #{nth}: {calls:?}");
    }
}
