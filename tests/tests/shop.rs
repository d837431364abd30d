//! The demo shop end to end: a real node started with `--demo` (its three services
//! are child processes), orders placed through the gateway over loopback, and the
//! books checked: every confirmed order has exactly one committed reservation and
//! one charge; every failed one lost no stock and no money. Along the way: an
//! idempotent retry, a declined card, a race for the last unit, the per-customer
//! rate limit, the payments flag flipped live, and payment killed with SIGKILL
//! (orders fail fast with `payment_unavailable`, reads keep working, and orders
//! recover once the node has restarted it). Then chaos: clients that give up
//! mid-order and retry with the same key while each service and a
//! transaction coordinator are SIGKILLed; afterwards every key is one order,
//! no order stays non-final, and the books reconcile — including the order
//! events: every settled order has exactly one notification of its outcome (the
//! event staged in the order service's outbox with the order's state, published
//! to the broker, recorded once by the notification consumer).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use meshwork_testkit::blocking::{eventually, until};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// One request with extra headers: (status, headers text, body JSON or string).
fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, Value) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let json = serde_json::from_str(body).unwrap_or(Value::String(body.to_string()));
    (status, head.to_ascii_lowercase(), json)
}

fn get(addr: &str, path: &str) -> (u16, Value) {
    let (s, _, v) = request(addr, "GET", path, &[], "");
    (s, v)
}

fn order(gw: &str, customer: &str, key: Option<&str>, sku: &str, account: &str) -> (u16, Value) {
    let body = format!(r#"{{"sku":"{sku}","qty":1,"account":"{account}"}}"#);
    let mut h = vec![("x-customer", customer)];
    if let Some(k) = key {
        h.push(("idempotency-key", k));
    }
    let (s, _, v) = request(gw, "POST", "/api/orders", &h, &body);
    (s, v)
}

fn reason(v: &Value) -> String {
    v["error"]["code"].as_str().unwrap_or("").to_string()
}

/// `HOST:PORT` and metadata of the first instance of `service` in the registry.
fn instance(http: &str, service: &str) -> Option<(String, Value)> {
    let (status, v) = get(
        http,
        &format!("/v1/services/{service}/instances?healthy=true"),
    );
    if status != 200 {
        return None;
    }
    let i = v["instances"].as_array()?.first()?.clone();
    Some((
        format!("{}:{}", i["address"].as_str()?, i["port"].as_u64()?),
        i["metadata"].clone(),
    ))
}

/// `HOST:PORT` and metadata of an instance of `service` that accepts
/// connections.
fn live(http: &str, service: &str) -> (String, Value) {
    eventually(&format!("a live {service} instance"), WAIT, || {
        let (status, v) = get(
            http,
            &format!("/v1/services/{service}/instances?healthy=true"),
        );
        if status != 200 {
            return None;
        }
        v["instances"].as_array()?.iter().find_map(|i| {
            let addr = format!("{}:{}", i["address"].as_str()?, i["port"].as_u64()?);
            std::net::TcpStream::connect(&addr)
                .ok()
                .map(|_| (addr, i["metadata"].clone()))
        })
    })
}

fn kill9(pid: i32) {
    // SAFETY: kill(2) has no memory effects; the pid is a live child of the node
    // this test started.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

#[test]
fn the_shop_keeps_its_books_through_failures() {
    let dir = tempfile::tempdir().unwrap();
    let node = meshwork_tests::start(
        &dir.path().join("a"),
        &[
            "--roles",
            "store,coord,gateway,txn,mq",
            "--name",
            "a",
            "--gateway-addr",
            "127.0.0.1:0",
            "--demo",
        ],
        &[],
    );
    // A second transaction coordinator on the same store, with a 2 s session:
    // killed mid-chaos, its orders finish on the first.
    let store = format!("etcd://{}", node.etcd);
    let mut coordinator = meshwork_tests::start(
        &dir.path().join("b"),
        &[
            "--roles",
            "coord,txn",
            "--store",
            &store,
            "--name",
            "b",
            "--node-ttl",
            "2",
        ],
        &[],
    );
    let gw = node.gateway.clone().unwrap();
    let http = node.http.clone();
    wait_shop(&gw, &http);
    let initial_stock = stock_of(&gw);

    // A retried request with the same key is one order.
    let (s1, o1) = order(&gw, "alice", Some("k-1"), "sku-keyboard", "acct-1");
    let (s2, o2) = order(&gw, "alice", Some("k-1"), "sku-keyboard", "acct-1");
    assert_eq!((s1, s2), (201, 201), "{o1} {o2}");
    assert_eq!(o1["id"], o2["id"]);

    // A declined card: 402, no money moves, the stock comes back.
    let (s, v) = order(&gw, "bob", None, "sku-monitor", "acct-poor");
    assert_eq!(s, 402, "{v}");
    assert_eq!(reason(&v), "insufficient_funds");

    // Eight customers race for the last unit: exactly one gets it.
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let gw = gw.clone();
            std::thread::spawn(move || {
                order(
                    &gw,
                    &format!("racer-{i}"),
                    None,
                    "sku-last",
                    &format!("acct-{}", i + 10),
                )
            })
        })
        .collect();
    let results: Vec<(u16, Value)> = racers.into_iter().map(|t| t.join().unwrap()).collect();
    let won = results.iter().filter(|(s, _)| *s == 201).count();
    assert_eq!(won, 1, "{results:?}");
    assert!(
        results
            .iter()
            .filter(|(s, _)| *s != 201)
            .all(|(s, v)| *s == 409 && reason(v) == "out_of_stock"),
        "{results:?}"
    );

    // One customer over its limit (burst 40): some are refused with 429.
    let flood: Vec<_> = (0..80)
        .map(|i| {
            let gw = gw.clone();
            std::thread::spawn(move || {
                let (s, h, v) = request(
                    &gw,
                    "POST",
                    "/api/orders",
                    &[("x-customer", "flood")],
                    &format!(
                        r#"{{"sku":"sku-cable","qty":1,"account":"acct-{}"}}"#,
                        i % 50 + 1
                    ),
                );
                (s, h.contains("retry-after"), reason(&v))
            })
        })
        .collect();
    let flood: Vec<(u16, bool, String)> = flood.into_iter().map(|t| t.join().unwrap()).collect();
    let limited: Vec<_> = flood.iter().filter(|(s, _, _)| *s == 429).collect();
    assert!(
        !limited.is_empty(),
        "the per-customer limit refused nothing"
    );
    assert!(
        limited
            .iter()
            .all(|(_, retry_after, code)| *retry_after && code == "rate_limited")
    );
    assert!(flood.iter().any(|(s, _, _)| *s == 201));

    // Payments switched off live, then on again.
    let flag = |on: &str| {
        let (ok, out, err) = meshwork_tests::meshwork_http(
            &http,
            &[
                "config",
                "publish",
                "shop/features/payments-enabled",
                "--format",
                "json",
                "--content",
                on,
            ],
        );
        assert!(ok, "{out} {err}");
    };
    flag("false");
    until("payments to be switched off", WAIT, || {
        let (s, v) = order(&gw, "carol", None, "sku-mouse", "acct-3");
        s == 503 && reason(&v) == "payments_disabled"
    });
    // Under load, the order service's business 503 never takes it out of
    // rotation (it is the only instance): orders keep failing with its own
    // reason and reads of the same service keep answering.
    let load: Vec<_> = (0..8)
        .map(|c| {
            let gw = gw.clone();
            std::thread::spawn(move || {
                let customer = format!("load-{c}");
                let mut seen = Vec::new();
                for _ in 0..25 {
                    let (s, v) = order(&gw, &customer, None, "sku-mouse", "acct-3");
                    seen.push(("POST /api/orders", s, reason(&v)));
                    let (s, v) = get(&gw, "/api/orders");
                    seen.push(("GET /api/orders", s, reason(&v)));
                }
                seen
            })
        })
        .collect();
    let seen: Vec<_> = load.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert_eq!(seen.len(), 400);
    for (what, status, code) in &seen {
        assert_ne!(code, "no_healthy_upstream", "{what}");
        match *what {
            "POST /api/orders" => {
                assert_eq!((*status, code.as_str()), (503, "payments_disabled"))
            }
            _ => assert_eq!(*status, 200, "{what}: {code}"),
        }
    }
    flag("true");
    until("payments to be switched on", WAIT, || {
        order(&gw, "carol", None, "sku-mouse", "acct-3").0 == 201
    });

    // Kill payment: orders fail with payment_unavailable while reads still work;
    // the node restarts payment and orders recover.
    let (_, meta) = live(&http, "payment");
    let pid: i32 = meta["pid"].as_str().unwrap().parse().unwrap();
    kill9(pid);
    until("orders to fail with payment_unavailable", WAIT, || {
        let (s, v) = order(&gw, "dave", None, "sku-mouse", "acct-4");
        s == 503 && reason(&v) == "payment_unavailable"
    });
    assert_eq!(get(&gw, "/api/products").0, 200, "reads keep working");
    until("orders to recover after payment restarts", WAIT, || {
        order(&gw, "dave", None, "sku-mouse", "acct-4").0 == 201
    });

    // Chaos: clients that give up after a few milliseconds and retry with the
    // same key until they hold a final answer, while order, inventory and
    // payment and one coordinator are SIGKILLed mid-flight.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CHAOS_CLIENTS)
        .map(|c| {
            let (gw, stop) = (gw.clone(), stop.clone());
            std::thread::spawn(move || chaos_client(&gw, c, &stop))
        })
        .collect();
    for svc in ["order", "inventory", "payment"] {
        std::thread::sleep(Duration::from_millis(700));
        let (_, meta) = live(&http, svc);
        kill9(meta["pid"].as_str().unwrap().parse().unwrap());
    }
    std::thread::sleep(Duration::from_millis(700));
    coordinator.kill9();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Release);
    let answered: Vec<(String, String, u16, Value)> = clients
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for a in &answered {
        *by_status.entry(a.2).or_default() += 1;
    }
    eprintln!(
        "chaos: {} keys answered, by status {by_status:?}",
        answered.len()
    );
    assert!(answered.len() >= 2 * CHAOS_CLIENTS, "{}", answered.len());
    assert!(answered.iter().any(|(_, _, s, _)| *s == 201));

    // The books: every order final ("no order stays non-final"), reconciled.
    let orders = settled_orders(&gw, &http);
    // Every key the chaos clients used is exactly one order, in the state its
    // final answer said.
    for (customer, key, status, v) in &answered {
        let id = id_of(&v["id"]);
        let mine: Vec<&Value> = orders.iter().filter(|o| id_of(&o["id"]) == id).collect();
        assert_eq!(mine.len(), 1, "{customer} {key}: {v}");
        let want = if *status == 201 {
            "confirmed"
        } else {
            "failed"
        };
        assert_eq!(mine[0]["status"], want, "{customer} {key}: {v}");
    }
    for c in 0..CHAOS_CLIENTS {
        let customer = format!("chaos-{c}");
        let keys = answered.iter().filter(|a| a.0 == customer).count();
        let placed = orders.iter().filter(|o| o["customer"] == customer).count();
        assert_eq!(placed, keys, "{customer}: one order per key");
    }
    let confirmed = reconcile(&gw, &http, &orders, &initial_stock);
    assert!(confirmed >= 5, "{confirmed} confirmed");
    let (_, products) = get(&gw, "/api/products");
    assert_eq!(
        products
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["sku"] == "sku-last")
            .unwrap()["stock"],
        0
    );
    drop(node);
}

/// Each product's stock.
fn stock_of(gw: &str) -> HashMap<String, i64> {
    let (_, products) = get(gw, "/api/products");
    products
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["sku"].as_str().unwrap().to_string(),
                p["stock"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// A participant SIGKILLed at each crash point of its transaction barrier:
/// with its work done but not committed (it rolls back; the coordinator's
/// resent call runs it again) and committed but not answered (the resent
/// call finds it done), in a try, a confirm and a cancel. Each order ends as
/// it should, its key answers it, and the books hold.
#[test]
fn a_participant_killed_at_its_crash_points_loses_nothing() {
    // (point, branch, phase, the service that runs that branch, account, the
    // outcomes allowed). A try cut short may end either way (the coordinator
    // gives up on a participant that stays down through its retries); once
    // decided, the outcome is fixed.
    let either: &[&str] = &["confirmed", "failed"];
    let cases = [
        (
            "barrier_before_commit",
            "payment",
            "action",
            "payment",
            "acct-5",
            either,
        ),
        (
            "barrier_after_commit",
            "payment",
            "action",
            "payment",
            "acct-5",
            either,
        ),
        (
            "barrier_after_commit",
            "stock",
            "confirm",
            "inventory",
            "acct-5",
            &["confirmed"],
        ),
        (
            "barrier_before_commit",
            "order",
            "confirm",
            "order",
            "acct-5",
            &["confirmed"],
        ),
        (
            "barrier_after_commit",
            "stock",
            "undo",
            "inventory",
            "acct-poor",
            &["failed"],
        ),
        (
            "barrier_before_commit",
            "order",
            "undo",
            "order",
            "acct-poor",
            &["failed"],
        ),
    ];
    for (point, branch, phase, victim, account, allowed) in cases {
        let case = format!("{point}/{branch}/{phase}");
        let dir = tempfile::tempdir().unwrap();
        let parked = dir.path().join("parked");
        let armed = format!("{case}:1:{}", parked.display());
        let node = meshwork_tests::start(
            &dir.path().join("node"),
            &[
                "--roles",
                "store,coord,gateway,txn,mq",
                "--gateway-addr",
                "127.0.0.1:0",
                "--demo",
            ],
            &[("MESHWORK_TXN_FAILPOINT", &armed)],
        );
        let (gw, http) = (node.gateway.clone().unwrap(), node.http.clone());
        until("the shop behind the gateway", WAIT, || {
            get(&gw, "/api/products").0 == 200
                && ["order", "inventory", "payment"]
                    .iter()
                    .all(|s| instance(&http, s).is_some())
        });
        let initial_stock = stock_of(&gw);
        let client = {
            let gw = gw.clone();
            std::thread::spawn(move || {
                try_order(&gw, "crash", "crash-1", "sku-monitor", account, WAIT)
            })
        };
        until(&format!("{case} to be reached"), WAIT, || parked.exists());
        let (_, meta) = live(&http, victim);
        kill9(meta["pid"].as_str().unwrap().parse().unwrap());
        // Whatever the first request was answered (a 502 if its own service
        // died), the order finishes without it.
        let first = client.join().unwrap();
        let orders = settled_orders(&gw, &http);
        assert_eq!(
            orders.len(),
            1,
            "{case}: {orders:?} (first answer {first:?})"
        );
        let outcome = orders[0]["status"].as_str().unwrap_or("");
        assert!(allowed.contains(&outcome), "{case}: {orders:?}");
        let (status, again) = order(&gw, "crash", Some("crash-1"), "sku-monitor", account);
        let id = if status == 201 {
            &again["id"]
        } else {
            &again["order"]["id"]
        };
        assert_eq!(id_of(id), id_of(&orders[0]["id"]), "{case}: {again}");
        assert_eq!(
            status == 201,
            outcome == "confirmed",
            "{case}: {status} {again}"
        );
        eprintln!("{case}: {outcome}");
        reconcile(&gw, &http, &orders, &initial_stock);
        drop(node);
    }
}

/// Waits until every order's transaction and every order is final; the
/// orders.
fn settled_orders(gw: &str, http: &str) -> Vec<Value> {
    // Every order's transaction finished (an order that failed before it was
    // recorded still had its stock to release), then every order is final.
    until("every transaction to finish", WAIT, || {
        ["running", "committing", "aborting"].iter().all(|s| {
            let (status, v) = get(http, &format!("/v1/txn?status={s}"));
            status == 200 && v["total"] == 0
        })
    });
    let orders = eventually("every order to settle", WAIT, || {
        let orders = get(gw, "/api/orders?limit=10000").1;
        orders
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["status"] == "confirmed" || o["status"] == "failed")
            .then_some(orders)
    });
    orders.as_array().unwrap().clone()
}

/// The books: every confirmed order has exactly one committed reservation
/// and one charge of its amount; a failed one holds neither; no money or
/// stock was created or lost. The number of confirmed orders.
fn reconcile(
    gw: &str,
    http: &str,
    orders: &[Value],
    initial_stock: &HashMap<String, i64>,
) -> usize {
    // The live instances (a killed one may still be listed healthy until its
    // next check).
    let (inv, _) = live(http, "inventory");
    let (pay, _) = live(http, "payment");
    let confirmed: HashMap<i64, &Value> = orders
        .iter()
        .filter(|o| o["status"] == "confirmed")
        .map(|o| (id_of(&o["id"]), o))
        .collect();
    let (_, reservations) = get(&inv, "/reservations");
    let (_, charges) = get(&pay, "/charges");
    let mut sold: HashMap<String, i64> = HashMap::new();
    for r in reservations.as_array().unwrap() {
        let id = id_of(&r["order_id"]);
        match r["state"].as_str().unwrap() {
            "committed" => {
                assert!(
                    confirmed.contains_key(&id),
                    "stock sold to a failed order: {r}"
                );
                *sold
                    .entry(r["sku"].as_str().unwrap().to_string())
                    .or_default() += r["qty"].as_i64().unwrap();
            }
            "released" => assert!(
                !confirmed.contains_key(&id),
                "confirmed order released: {r}"
            ),
            other => panic!("reservation left {other}: {r}"),
        }
    }
    let mut charged_total = 0;
    for c in charges.as_array().unwrap() {
        let id = id_of(&c["order_id"]);
        if c["state"] == "charged" {
            let o = confirmed
                .get(&id)
                .unwrap_or_else(|| panic!("money kept for a failed order: {c}"));
            assert_eq!(c["amount_cents"], o["amount_cents"]);
            charged_total += c["amount_cents"].as_i64().unwrap();
        } else {
            assert!(
                !confirmed.contains_key(&id),
                "confirmed order without money: {c}"
            );
        }
    }
    for id in confirmed.keys() {
        assert!(
            charges
                .as_array()
                .unwrap()
                .iter()
                .any(|c| id_of(&c["order_id"]) == *id && c["state"] == "charged"),
            "order {id} confirmed without a charge"
        );
        assert!(
            reservations
                .as_array()
                .unwrap()
                .iter()
                .any(|r| id_of(&r["order_id"]) == *id && r["state"] == "committed"),
            "order {id} confirmed without a committed reservation"
        );
    }
    let (_, accounts) = get(&pay, "/accounts");
    let balances: i64 = accounts
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["balance_cents"].as_i64().unwrap())
        .sum();
    assert_eq!(
        balances + charged_total,
        100 * meshwork_shop::payment::SEED_BALANCE_CENTS + 100,
        "no money created or lost"
    );
    let (_, products) = get(gw, "/api/products");
    for p in products.as_array().unwrap() {
        let sku = p["sku"].as_str().unwrap();
        assert_eq!(
            p["stock"].as_i64().unwrap() + sold.get(sku).copied().unwrap_or(0),
            initial_stock[sku],
            "stock of {sku}"
        );
    }
    notified(http, orders);
    confirmed.len()
}

/// Every settled order has exactly one notification, of its outcome: its event went
/// out through the order service's outbox with its state, and the notification
/// consumer recorded it once whatever the redeliveries. Waits for the last ones.
fn notified(http: &str, orders: &[Value]) {
    let want: HashMap<i64, String> = orders
        .iter()
        .map(|o| {
            let event = if o["status"] == "confirmed" {
                "confirmed"
            } else {
                "cancelled"
            };
            (id_of(&o["id"]), event.to_string())
        })
        .collect();
    let got = eventually("a notification for every settled order", WAIT, || {
        let (ord, _) = live(http, "order");
        let (status, v) = get(&ord, "/notifications");
        if status != 200 {
            return None;
        }
        let got: HashMap<i64, String> = v
            .as_array()?
            .iter()
            .map(|n| {
                (
                    id_of(&n["order"]),
                    n["event"].as_str().unwrap_or("?").to_string(),
                )
            })
            .collect();
        (got.len() >= want.len()).then_some(got)
    });
    assert_eq!(
        got, want,
        "one notification per settled order, of its outcome"
    );
}

/// Clients of the chaos phase.
const CHAOS_CLIENTS: usize = 8;

/// One order with a read deadline: `None` when the client gave up (it closes
/// the connection mid-request) or the connection failed.
fn try_order(
    gw: &str,
    customer: &str,
    key: &str,
    sku: &str,
    account: &str,
    patience: Duration,
) -> Option<(u16, Value)> {
    let body = format!(r#"{{"sku":"{sku}","qty":1,"account":"{account}"}}"#);
    let mut s = std::net::TcpStream::connect(gw).ok()?;
    s.set_read_timeout(Some(patience)).ok()?;
    write!(
        s,
        "POST /api/orders HTTP/1.1\r\nHost: {gw}\r\nConnection: close\r\nContent-Type: application/json\r\nx-customer: {customer}\r\nidempotency-key: {key}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let (_, body) = buf.split_once("\r\n\r\n")?;
    Some((status, serde_json::from_str(body).ok()?))
}

/// Places orders, each under its own key, until `stop`: every try but the
/// last of a key gives up after a few milliseconds or less; a key is retried
/// until its answer is final (201, or an error that carries the failed
/// order). Returns (customer, key, status, order) per key.
fn chaos_client(gw: &str, c: usize, stop: &AtomicBool) -> Vec<(String, String, u16, Value)> {
    let customer = format!("chaos-{c}");
    let account = format!("acct-{}", 20 + c);
    let mut answered = Vec::new();
    for n in 0..60 {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let key = format!("ck-{c}-{n}");
        let sku = ["sku-keyboard", "sku-mouse", "sku-cable"][n % 3];
        for attempt in 0.. {
            assert!(attempt < 600, "{customer} {key}: no final answer");
            let patience = match (attempt + c + n) % 4 {
                0 => Duration::from_millis(2),
                1 => Duration::from_millis(15),
                2 => Duration::from_millis(60),
                _ => Duration::from_secs(20),
            };
            match try_order(gw, &customer, &key, sku, &account, patience) {
                Some((201, v)) => {
                    answered.push((customer.clone(), key, 201, v));
                    break;
                }
                Some((s, v)) if v["order"]["status"] == "failed" => {
                    answered.push((customer.clone(), key, s, v["order"].clone()));
                    break;
                }
                // Gave up, 202 (still running), 429, a gateway error while a
                // service restarts, or refused before any order existed.
                _ => std::thread::sleep(Duration::from_millis(30)),
            }
        }
    }
    answered
}

/// An order id as the shop writes it: a decimal string (ids pass 2^53).
fn id_of(v: &Value) -> i64 {
    v.as_str()
        .unwrap_or_else(|| panic!("order id {v} is not a JSON string"))
        .parse()
        .unwrap_or_else(|_| panic!("order id {v} is not decimal"))
}

/// Prices are read through the shared price cache (the node's cache role, found
/// in the registry): a price change at inventory invalidates it, and the next
/// orders are priced anew; an unknown SKU is refused (and remembered as absent).
#[test]
fn a_price_change_reaches_the_next_orders_through_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (node, gw, http) = shop_node(dir.path());
    let cache = node.cache.clone().unwrap();
    let (_, p) = get(&gw, "/api/products/sku-cable");
    let old = p["price_cents"].as_i64().unwrap();
    let (s, o) = order(&gw, "carol", None, "sku-cable", "acct-1");
    assert_eq!(s, 201, "{o}");
    assert_eq!(o["amount_cents"].as_i64(), Some(old), "{o}");
    // The price sits in the node's cache.
    let cached = resp_get(&cache, "shop-prices:sku-cable");
    assert_eq!(cached, old.to_string());

    let (inventory, _) = live(&http, "inventory");
    let new = old + 100;
    let (s, _, v) = request(
        &inventory,
        "PUT",
        "/products/sku-cable/price",
        &[],
        &format!(r#"{{"price_cents":{new}}}"#),
    );
    assert_eq!(s, 200, "{v}");
    let (s, _, v) = request(
        &inventory,
        "PUT",
        "/products/sku-cable/price",
        &[],
        r#"{"price_cents":-1}"#,
    );
    assert_eq!(s, 400, "{v}");
    // The next orders are priced anew (an order priced from a copy dropped a
    // moment late is refused with price_changed, never charged the old price).
    eventually("an order at the new price", WAIT, || {
        let (s, o) = order(&gw, "carol", None, "sku-cable", "acct-1");
        match s {
            201 => {
                assert_eq!(o["amount_cents"].as_i64(), Some(new), "{o}");
                Some(())
            }
            409 => {
                assert_eq!(reason(&o), "price_changed", "{o}");
                None
            }
            _ => panic!("{s} {o}"),
        }
    });
    for _ in 0..2 {
        let (s, o) = order(&gw, "carol", None, "sku-nothing", "acct-1");
        assert_eq!((s, reason(&o).as_str()), (404, "unknown_product"), "{o}");
    }
    assert_eq!(resp_get(&cache, "shop-prices:sku-nothing"), "");
}

/// Waits until the shop answers behind the gateway and its services are registered.
fn wait_shop(gw: &str, http: &str) {
    until("the shop behind the gateway", WAIT, || {
        get(gw, "/api/products").0 == 200
            && instance(http, "order").is_some()
            && instance(http, "payment").is_some()
    });
}

/// A node with every role the shop uses and `--demo`, once the shop answers
/// behind its gateway: the node, the gateway's and the HTTP API's addresses.
fn shop_node(dir: &std::path::Path) -> (meshwork_tests::Server, String, String) {
    let node = meshwork_tests::start_demo(dir, &[]);
    let gw = node.gateway.clone().unwrap();
    let http = node.http.clone();
    wait_shop(&gw, &http);
    (node, gw, http)
}

/// `GET key` over RESP: the value as text ("" for an empty or missing value).
fn resp_get(addr: &str, key: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
    reply
        .split_once("\r\n")
        .map(|(_, rest)| rest.trim_end_matches("\r\n").to_string())
        .unwrap_or_default()
}

/// The spans of trace `id` once every span named in `last` is in the node's
/// trace store (and every span has its parent there, but the caller's).
fn trace_spans(http: &str, id: &str, last: &[&str], caller: &str) -> Vec<Value> {
    let mut spans = Vec::new();
    until("the order's spans in the trace store", WAIT, || {
        let (s, v) = get(http, &format!("/v1/traces/{id}"));
        spans = v["spans"].as_array().cloned().unwrap_or_default();
        let ids: std::collections::HashSet<&str> =
            spans.iter().filter_map(|s| s["span_id"].as_str()).collect();
        s == 200
            && last.iter().all(|n| spans.iter().any(|s| s["name"] == *n))
            && spans.iter().all(|s| {
                s["parent_span_id"]
                    .as_str()
                    .is_some_and(|p| p == caller || ids.contains(p))
            })
    });
    spans
}

/// One order is one trace: from the gateway through the order service, the
/// transaction coordinator and its calls to inventory and payment, every
/// span's parent in the trace; a declined card shows as the failed call to
/// payment.
#[test]
fn an_order_is_one_trace_from_the_gateway_to_payment() {
    let dir = tempfile::tempdir().unwrap();
    let node = meshwork_tests::start(
        dir.path(),
        &[
            "--roles",
            "store,coord,gateway,txn,mq,traces",
            "--gateway-addr",
            "127.0.0.1:0",
            "--otlp-http-addr",
            "127.0.0.1:0",
            "--demo",
        ],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    let gw = node.gateway.clone().unwrap();
    let http = node.http.clone();
    wait_shop(&gw, &http);
    let caller = "00f067aa0ba902b7";
    for (trace, account, want) in [
        ("4bf92f3577b34da6a3ce929d0e0e4736", "acct-1", 201),
        ("5bf92f3577b34da6a3ce929d0e0e4737", "acct-poor", 402),
    ] {
        let tp = format!("00-{trace}-{caller}-01");
        let (s, _, v) = request(
            &gw,
            "POST",
            "/api/orders",
            &[("x-customer", "tracy"), ("traceparent", &tp)],
            r#"{"sku":"sku-cable","qty":1,"account":"ACCOUNT"}"#
                .replace("ACCOUNT", account)
                .as_str(),
        );
        assert_eq!(s, want, "{v}");
        // gateway (server, client), order (server, price call, txn calls),
        // coordinator (server, branch calls), inventory and payment (servers).
        let last: &[&str] = if want == 201 {
            &[
                "POST /charges/{order_id}/capture",
                "POST /reservations/{order_id}/commit",
                "publish shop.orders",
                "process shop.orders/notifications",
            ]
        } else {
            &[
                "POST /reservations/{order_id}/release",
                "POST /charges",
                "publish shop.orders",
                "process shop.orders/notifications",
            ]
        };
        let spans = trace_spans(&http, trace, last, caller);
        let ids: std::collections::HashSet<&str> = spans
            .iter()
            .map(|s| s["span_id"].as_str().unwrap())
            .collect();
        for s in &spans {
            let parent = s["parent_span_id"].as_str().unwrap();
            assert!(
                parent == caller || ids.contains(parent),
                "{} {} has a parent outside the trace: {spans:#?}",
                s["service"],
                s["name"]
            );
        }
        let find = |service: &str, kind: &str, name: &str| {
            spans
                .iter()
                .find(|s| s["service"] == service && s["kind"] == kind && s["name"] == name)
                .unwrap_or_else(|| panic!("no {service} {kind} span {name:?}: {spans:#?}"))
        };
        let root = find("gateway", "server", "POST shop-orders-create");
        assert_eq!(root["parent_span_id"], caller);
        let order = find("order", "server", "POST /orders");
        let hop = find("gateway", "client", "POST");
        assert_eq!(order["parent_span_id"], hop["span_id"]);
        assert_eq!(hop["parent_span_id"], root["span_id"]);
        find("txn-coordinator", "server", "POST /v1/txn/transactions");
        // The order's event: staged in the outbox with the order's state (a
        // producer span), processed by the notifications group (its child).
        let published = find("order", "producer", "publish shop.orders");
        let processed = find("order", "consumer", "process shop.orders/notifications");
        assert_eq!(processed["parent_span_id"], published["span_id"]);
        assert_eq!(
            published["attributes"]["messaging.destination.name"],
            "shop.orders"
        );
        find("inventory", "server", "POST /reservations");
        let charge = find("txn-coordinator", "client", "action payment");
        let charged = find("payment", "server", "POST /charges");
        assert_eq!(charged["parent_span_id"], charge["span_id"]);
        if want == 201 {
            assert!(
                spans.iter().all(|s| s["status"]["code"] != "error"),
                "{spans:#?}"
            );
            find("payment", "server", "POST /charges/{order_id}/capture");
        } else {
            // Refused for good by payment: the coordinator's call to it failed.
            assert_eq!(charge["status"]["code"], "error", "{charge}");
            assert_eq!(charge["attributes"]["meshwork.txn.outcome"], "rejected");
            assert_eq!(charged["attributes"]["http.response.status_code"], 402);
            find(
                "inventory",
                "server",
                "POST /reservations/{order_id}/release",
            );
        }
    }
    // The dependency graph has the shop's edges.
    let (_, g) = get(&http, "/v1/traces/dependencies");
    let edges: Vec<(String, String)> = g["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["parent"].as_str().unwrap().into(),
                e["child"].as_str().unwrap().into(),
            )
        })
        .collect();
    for (p, c) in [
        ("gateway", "order"),
        ("order", "txn-coordinator"),
        ("txn-coordinator", "payment"),
        ("txn-coordinator", "inventory"),
    ] {
        assert!(
            edges.contains(&(p.into(), c.into())),
            "{p} -> {c} in {edges:?}"
        );
    }
}

/// `meshwork demo serve inventory` as one more instance of the shop's
/// inventory (sharing its database), registering `version`, with faults.
fn inventory_instance(
    node: &meshwork_tests::Server,
    dir: &std::path::Path,
    version: &str,
    error_rate: &str,
) -> std::process::Child {
    std::process::Command::new(meshwork_tests::bin())
        .args(["demo", "serve", "inventory", "--endpoints", &node.etcd])
        .arg("--data-dir")
        .arg(dir.join("shop"))
        .args(["--instance-version", version, "--error-rate", error_rate])
        // A failed test does not leave it running against a dead store.
        .arg("--exit-with-parent")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Orders through the gateway with `meshwork demo load`: its JSON summary.
fn demo_load(gw: &str, orders: usize) -> Value {
    let out = std::process::Command::new(meshwork_tests::bin())
        .args(["demo", "load", "--gateway", &format!("http://{gw}")])
        .args([
            "--orders",
            &orders.to_string(),
            "--concurrency",
            "8",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn rollout_of(http: &str, service: &str) -> Value {
    let (ok, out, err) =
        meshwork_tests::meshwork_http(http, &["rollout", "status", service, "-o", "json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// Inventory's rollout once `done` holds for it, it reaches a final phase
/// (promoted, rolled back or paused), or `within` passes: the caller
/// asserts on it, so a failure shows the decisions and their figures. Polls
/// every 200 ms (each poll is a CLI process: at the usual 10 ms the polling
/// alone would take a core of this machine from the shop under test).
fn rollout_until(http: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let r = rollout_of(http, "inventory");
        let phase = &r["status"]["phase"];
        let last = phase == "promoted" || phase == "rolled_back" || phase == "paused";
        if done(&r) || last || Instant::now() >= deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The shop shows progressive delivery: under `meshwork demo load`, a v2 of
/// inventory that fails 40 % of its calls is rolled back by the analysis of
/// the transaction coordinator's and the gateway's figures while it has its
/// first 10 % (retries on the stable version keep the orders whole), and a
/// healthy v3 is then promoted step by step.
#[test]
fn the_shop_rolls_back_a_bad_inventory_and_promotes_a_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let (node, gw, http) = shop_node(dir.path());
    let meshwork = |args: &[&str]| {
        let (ok, out, err) = meshwork_tests::meshwork_http(&http, args);
        assert!(ok, "{args:?}: {err}");
        out
    };
    // The rollout first, then the new version's instance: no request
    // reaches it before the first step.
    meshwork(&[
        "rollout",
        "start",
        "inventory",
        "--to-version",
        "2",
        "--steps",
        "10,50,100",
        "--interval",
        "5s",
        "--min-requests",
        "20",
    ]);
    let mut bad = inventory_instance(&node, dir.path(), "2", "0.4");
    let r = rollout_until(&http, WAIT, |r| r["status"]["weight"] == 10);
    assert_eq!(r["status"]["weight"], 10, "no first step: {r:#}");
    let summary = demo_load(&gw, 400);
    let r = rollout_of(&http, "inventory");
    assert_eq!(r["status"]["phase"], "rolled_back", "{r:#}");
    let d = r["status"]["decisions"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert!(
        d["reason"].as_str().unwrap().starts_with("error rate"),
        "{d}"
    );
    assert!(d["canary"]["failures"].as_u64().unwrap() >= 1, "{d}");
    // The bad version never cost an order: its failures were retried on v1.
    let failed: u64 = summary["failures"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| !k.contains("out_of_stock") && !k.contains("rate_limited"))
        .map(|(_, v)| v.as_u64().unwrap())
        .sum();
    assert!(failed * 100 <= 2 * 400, "orders failed: {summary}");
    term(&bad);
    let _ = bad.wait();

    // A healthy v3: promoted step by step while orders keep coming.
    // (retired, but the node's copy of the registry may not show it yet)
    meshwork(&["rollout", "rm", "inventory", "--force"]);
    meshwork(&[
        "rollout",
        "start",
        "inventory",
        "--to-version",
        "3",
        "--steps",
        "25,100",
        "--interval",
        "3s",
        "--min-requests",
        "20",
    ]);
    let mut good = inventory_instance(&node, dir.path(), "3", "0");
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (gw, stop) = (gw.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                demo_load(&gw, 100);
            }
        })
    };
    let last = rollout_until(&http, Duration::from_secs(90), |r| {
        r["status"]["phase"] == "promoted"
    });
    assert_eq!(
        last["status"]["phase"], "promoted",
        "v3 was not promoted within 90 s: {last:#}"
    );
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let r = rollout_of(&http, "inventory");
    let actions: Vec<&str> = r["status"]["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["advance", "advance", "promote"], "{r:#}");
    term(&good);
    let _ = good.wait();
}

/// SIGTERM to a child: it deregisters and drains.
fn term(c: &std::process::Child) {
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(c.id() as i32, libc::SIGTERM);
    }
}
