//! The message broker through the node: the CLI's quickstart (topic, publish, subscribe,
//! dead letters) against a real `meshwork server`, the API in the node's `/openapi.json`
//! and its metrics; and the node killed with SIGKILL while clients publish and consume
//! over HTTP: every acknowledged publish is there after the restart, nothing acked comes
//! back, and everything else (delayed messages included) is delivered; and the
//! gRPC service on the node's HTTP port; and half messages checked back with the
//! producer's instance the node finds in the registry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use meshwork_testkit::http::blocking as http;
use meshwork_tests::meshwork_http as run;
use serde_json::{Value, json};

const ROLES: &[&str] = &["--roles", "store,coord,mq"];

fn post(node: &str, path: &str, body: &Value) -> (u16, Value) {
    let (s, b) = http::post(node, path, &body.to_string()).unwrap();
    (s, serde_json::from_str(&b).unwrap_or(Value::Null))
}

#[test]
fn cli_quickstart_api_document_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let node = meshwork_tests::start(dir.path(), ROLES, &[]);
    let h = node.http.as_str();
    let (ok, out, err) = run(h, &["mq", "topic", "create", "orders", "--partitions", "2"]);
    assert!(ok, "{err}");
    assert!(out.contains("topic orders (2 partitions)"), "{out}");
    let (ok, out, err) = run(
        h,
        &[
            "mq", "pub", "orders", "hello", "--key", "o-1", "--tag", "paid", "--header", "a=b",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("false"), "{out}");
    let (ok, _, err) = run(h, &["mq", "pub", "orders", "world", "--id", "42"]);
    assert!(ok, "{err}");
    let (ok, out, _) = run(
        h,
        &[
            "mq",
            "pub",
            "orders",
            "world again",
            "--id",
            "42",
            "-o",
            "json",
        ],
    );
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["results"][0]["duplicate"],
        true
    );
    let (ok, out, err) = run(
        h,
        &[
            "mq", "sub", "orders", "--group", "mailer", "--from", "earliest", "--count", "2",
        ],
    );
    assert!(ok, "{err}");
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(lines, ["hello", "world"]);
    let (ok, out, _) = run(h, &["mq", "topic", "list"]);
    assert!(
        ok && out.contains("orders") && !out.contains("__dlq"),
        "{out}"
    );
    let (ok, out, _) = run(h, &["mq", "topic", "describe", "orders"]);
    assert!(
        ok && out.contains("group mailer: backlog 0, unacked 0"),
        "{out}"
    );
    let (ok, out, _) = run(
        h,
        &[
            "mq", "dlq", "list", "orders", "--group", "mailer", "-o", "json",
        ],
    );
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["messages"],
        json!([])
    );
    // Mistakes: a non-zero exit and the API's message.
    let (ok, _, err) = run(h, &["mq", "pub", "nope", "x"]);
    assert!(
        !ok && err.contains("topic \"nope\" does not exist"),
        "{err}"
    );
    let (ok, _, err) = run(
        h,
        &[
            "mq",
            "sub",
            "orders",
            "--group",
            "g2",
            "--from",
            "yesterday",
        ],
    );
    assert!(!ok && err.contains("RFC 3339"), "{err}");

    let (s, d) = http::get(h, "/openapi.json").unwrap();
    assert_eq!(s, 200);
    assert!(d.contains("/v1/mq/topics/{topic}/groups/{group}/fetch"));
    let (_, m) = http::get(h, "/metrics").unwrap();
    assert!(
        m.contains("meshwork_mq_published_total{topic=\"orders\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("meshwork_mq_duplicates_total{topic=\"orders\"} 1"),
        "{m}"
    );
    // The per-group gauges are refreshed every few seconds.
    meshwork_testkit::blocking::until("the backlog gauge", Duration::from_secs(20), || {
        http::get(h, "/metrics").is_ok_and(|(_, m)| {
            m.contains("meshwork_mq_backlog_messages{topic=\"orders\",group=\"mailer\"} 0")
                && m.contains("meshwork_mq_oldest_unfinished_age_seconds{topic=\"orders\",group=\"mailer\"} 0")
        })
    });
}

#[test]
fn sigkill_the_node_while_clients_publish_and_consume() {
    let dir = tempfile::tempdir().unwrap();
    let mut high = BTreeMap::new();
    for round in 1..=5u64 {
        let mut node = meshwork_tests::start(dir.path(), ROLES, &[]);
        let h = node.http.clone();
        if round == 1 {
            assert_eq!(
                http::request(&h, "PUT", "/v1/mq/topics/t", r#"{"partitions":2}"#)
                    .unwrap()
                    .0,
                201
            );
            let g = json!({"start": "earliest", "ack_wait_ms": 500, "max_deliveries": 1000});
            assert_eq!(
                http::request(&h, "PUT", "/v1/mq/topics/t/groups/g", &g.to_string())
                    .unwrap()
                    .0,
                201
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let published = Arc::new(parking_lot::Mutex::new(
            BTreeMap::<String, (u64, u64)>::new(),
        ));
        let sent = Arc::new(parking_lot::Mutex::new(BTreeSet::<(u64, u64)>::new()));
        let acked = Arc::new(parking_lot::Mutex::new(BTreeSet::<(u64, u64)>::new()));
        let mut threads = Vec::new();
        for p in 0..4u64 {
            let (h, stop, published) = (h.clone(), stop.clone(), published.clone());
            threads.push(std::thread::spawn(move || {
                for i in 0.. {
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    let id = format!("{}", (round << 40) | (p << 32) | (i + 1));
                    let mut m = json!({"id": id, "body": id});
                    if i % 5 == 2 {
                        m["delay_ms"] = json!(300);
                    }
                    let Ok((200, b)) = http::post(
                        &h,
                        "/v1/mq/topics/t/messages",
                        &json!({"messages": [m]}).to_string(),
                    ) else {
                        return;
                    };
                    let v: Value = serde_json::from_str(&b).unwrap();
                    let r = &v["results"][0];
                    published.lock().insert(
                        id,
                        (
                            r["partition"].as_u64().unwrap(),
                            r["offset"].as_u64().unwrap(),
                        ),
                    );
                }
            }));
        }
        {
            let (h, stop, sent, acked) = (h.clone(), stop.clone(), sent.clone(), acked.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let Ok((200, b)) = http::post(&h, "/v1/mq/topics/t/groups/g/fetch", r#"{"max":20,"wait_ms":200}"#) else {
                        return;
                    };
                    let v: Value = serde_json::from_str(&b).unwrap();
                    let items: Vec<(u64, u64)> = v["messages"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|m| (m["partition"].as_u64().unwrap(), m["offset"].as_u64().unwrap()))
                        .collect();
                    if items.is_empty() {
                        continue;
                    }
                    sent.lock().extend(items.iter().copied());
                    let body = json!({"messages": items.iter().map(|(p, o)| json!({"partition": p, "offset": o})).collect::<Vec<_>>()});
                    let Ok((204, _)) = http::post(&h, "/v1/mq/topics/t/groups/g/ack", &body.to_string()) else {
                        return;
                    };
                    acked.lock().extend(items);
                }
            }));
        }
        // Kill at a different point each round.
        let target = 30 + (round as usize * 37) % 120;
        let deadline = Instant::now() + Duration::from_secs(30);
        while published.lock().len() < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        node.kill9();
        stop.store(true, Ordering::Release);
        for t in threads {
            t.join().unwrap();
        }
        let published = published.lock().clone();
        let (sent, acked) = (sent.lock().clone(), acked.lock().clone());
        assert!(!published.is_empty(), "round {round}: nothing published");

        let node = meshwork_tests::start(dir.path(), ROLES, &[]);
        let h = node.http.clone();
        for (id, (p, o)) in &published {
            let (s, b) = http::get(
                &h,
                &format!("/v1/mq/topics/t/messages?partition={p}&offset={o}&limit=1"),
            )
            .unwrap();
            assert_eq!(s, 200, "round {round}: {b}");
            let v: Value = serde_json::from_str(&b).unwrap();
            assert_eq!(
                v["messages"][0]["body"].as_str(),
                Some(id.as_str()),
                "round {round}: {p}/{o}"
            );
        }
        let (_, b) = http::get(&h, "/v1/mq/topics/t").unwrap();
        let v: Value = serde_json::from_str(&b).unwrap();
        for (p, part) in v["partitions"].as_array().unwrap().iter().enumerate() {
            let end = part["end"].as_u64().unwrap();
            let h = high.entry(p).or_insert(0u64);
            assert!(
                end >= *h,
                "round {round}: partition {p} went back from {h} to {end}"
            );
            *h = end;
        }
        let mut want: BTreeSet<(u64, u64)> = published
            .values()
            .copied()
            .filter(|x| !sent.contains(x))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (s, v) = post(
                &h,
                "/v1/mq/topics/t/groups/g/fetch",
                &json!({"max": 1000, "wait_ms": 300}),
            );
            assert_eq!(s, 200);
            let msgs = v["messages"].as_array().unwrap().clone();
            for m in &msgs {
                let x = (
                    m["partition"].as_u64().unwrap(),
                    m["offset"].as_u64().unwrap(),
                );
                assert!(
                    !acked.contains(&x),
                    "round {round}: acked {x:?} delivered again"
                );
                want.remove(&x);
            }
            if !msgs.is_empty() {
                let items: Vec<Value> = msgs
                    .iter()
                    .map(|m| json!({"partition": m["partition"], "offset": m["offset"]}))
                    .collect();
                assert_eq!(
                    post(
                        &h,
                        "/v1/mq/topics/t/groups/g/ack",
                        &json!({"messages": items})
                    )
                    .0,
                    204
                );
            }
            let (_, g) = http::get(&h, "/v1/mq/topics/t/groups/g").unwrap();
            let g: Value = serde_json::from_str(&g).unwrap();
            if want.is_empty() && g["backlog"] == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: {} acknowledged publishes never delivered: {g}",
                want.len()
            );
        }
    }
}

#[test]
fn a_service_finds_the_broker_in_the_membership_and_consumes_with_the_sdk() {
    use meshwork_sdk::mq::{OutMessage, SubscribeOptions};
    let dir = tempfile::tempdir().unwrap();
    let node = meshwork_tests::start(dir.path(), ROLES, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let opts = meshwork_sdk::Options::new("mailer", vec![node.etcd.clone()]).unwrap();
        let mw = meshwork_sdk::Meshwork::connect(opts).await.unwrap();
        // No MESHWORK_MQ in this test's environment: the node is found by its `mq` role.
        let mq = mw.mq();
        mq.create_topic("events", 2).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sub = mq
            .subscribe(
                "events",
                "mailer",
                SubscribeOptions {
                    group: json!({"start": "earliest"}),
                    ..SubscribeOptions::default()
                },
                move |m| {
                    let tx = tx.clone();
                    async move {
                        tx.send(m.text()).unwrap();
                        Ok::<(), String>(())
                    }
                },
            )
            .await
            .unwrap();
        let publisher = mq.publisher("events");
        for i in 0..10 {
            publisher
                .publish(OutMessage::new(format!("e{i}")).key(format!("k{}", i % 3)))
                .await
                .unwrap();
        }
        let mut got = BTreeSet::new();
        while got.len() < 10 {
            let t = tokio::time::timeout(Duration::from_secs(20), rx.recv())
                .await
                .unwrap()
                .unwrap();
            got.insert(t);
        }
        sub.shutdown().await;
        mw.shutdown().await;
    });
    let (_, g) = http::get(&node.http, "/v1/mq/topics/events/groups/mailer").unwrap();
    let g: Value = serde_json::from_str(&g).unwrap();
    assert_eq!(
        (g["backlog"].as_u64(), g["unacked"].as_u64()),
        (Some(0), Some(0)),
        "{g}"
    );
}

/// The broker's gRPC service on the node's HTTP port (h2c), with the generated
/// client: a publish, then a Consume stream that receives it and acks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_service_answers_on_the_http_port() {
    use meshwork_mq::grpc::proto::broker_client::BrokerClient;
    use meshwork_mq::grpc::proto::consume_request::Kind;
    use meshwork_mq::grpc::proto::{
        ConsumeRequest, OutMessage, Position, PublishRequest, Settle, Subscribe,
    };

    let dir = tempfile::tempdir().unwrap();
    let node = meshwork_tests::start(dir.path(), ROLES, &[]);
    let h = node.http.clone();
    tokio::task::spawn_blocking({
        let h = h.clone();
        move || {
            for (path, body) in [
                ("/v1/mq/topics/events", r#"{"partitions": 1}"#),
                ("/v1/mq/topics/events/groups/g", r#"{"start": "earliest"}"#),
            ] {
                let (s, v) = http::request(&h, "PUT", path, body).unwrap();
                assert!(s == 200 || s == 201, "{path}: {s} {v}");
            }
        }
    })
    .await
    .unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{h}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = BrokerClient::new(channel);
    let r = client
        .publish(PublishRequest {
            topic: "events".into(),
            messages: vec![OutMessage {
                body: b"over grpc".to_vec().into(),
                ..OutMessage::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.results[0].partition, r.results[0].offset), (0, 0));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let sub = Subscribe {
        topic: "events".into(),
        group: "g".into(),
        consumer: String::new(),
        credit: 10,
    };
    tx.send(ConsumeRequest {
        kind: Some(Kind::Subscribe(sub)),
    })
    .await
    .unwrap();
    let mut stream = client
        .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let got = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.deliveries[0].body.as_ref(), b"over grpc");
    let settle = Settle {
        positions: vec![Position {
            partition: 0,
            offset: 0,
        }],
        delay_ms: 0,
    };
    tx.send(ConsumeRequest {
        kind: Some(Kind::Ack(settle)),
    })
    .await
    .unwrap();
    let h2 = h.clone();
    tokio::task::spawn_blocking(move || {
        meshwork_testkit::blocking::until("the ack applied", Duration::from_secs(20), || {
            let (_, v) = http::get(&h2, "/v1/mq/topics/events/groups/g").unwrap();
            let v: Value = serde_json::from_str(&v).unwrap();
            v["unacked"] == 0 && v["backlog"] == 0
        });
    })
    .await
    .unwrap();
}

/// With a console login, a gRPC call needs it like any write: refused without
/// credentials (`UNAUTHENTICATED`, nothing written), served with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_need_the_console_login() {
    use meshwork_mq::grpc::proto::broker_client::BrokerClient;
    use meshwork_mq::grpc::proto::{OutMessage, PublishRequest};

    let dir = tempfile::tempdir().unwrap();
    let node = meshwork_tests::start(
        dir.path(),
        ROLES,
        &[("MESHWORK_CONSOLE_PASSWORD", "s3cret-pass")],
    );
    let h = node.http.clone();
    let (s, v) = tokio::task::spawn_blocking({
        let h = h.clone();
        move || {
            http::raw(
                &h,
                "PUT /v1/mq/topics/t HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAuthorization: Basic YWRtaW46czNjcmV0LXBhc3M=",
                "{}",
            )
            .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(s == 200 || s == 201, "{s} {v}");
    let channel = tonic::transport::Channel::from_shared(format!("http://{h}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let publish = || PublishRequest {
        topic: "t".into(),
        messages: vec![OutMessage {
            body: b"x".to_vec().into(),
            ..OutMessage::default()
        }],
    };
    let e = BrokerClient::new(channel.clone())
        .publish(publish())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    let mut req = tonic::Request::new(publish());
    req.metadata_mut().insert(
        "authorization",
        "Basic YWRtaW46czNjcmV0LXBhc3M=".parse().unwrap(),
    );
    let r = BrokerClient::new(channel).publish(req).await.unwrap();
    assert_eq!(
        r.into_inner().results[0].offset,
        0,
        "the refused one wrote nothing"
    );
}

/// A producer service prepares half messages with the SDK and dies before resolving
/// them; the node's check-backs find its new instance in the registry (the old one's
/// address refuses), whose `half_check_router` commits one and rolls back the other.
#[test]
fn the_node_checks_half_messages_back_with_the_producers_instance_in_the_registry() {
    use meshwork_sdk::mq::{CheckDecision, HalfCheck, OutMessage, half_check_router};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mq.toml");
    std::fs::write(
        &config,
        "[mq]\nhalf_check_after_ms = 300\nhalf_check_interval_ms = 300\n",
    )
    .unwrap();
    let mut args = ROLES.to_vec();
    args.extend(["--config", config.to_str().unwrap()]);
    let node = meshwork_tests::start(&dir.path().join("node"), &args, &[]);
    let h = node.http.as_str();
    let register = |port: u16| {
        let body = json!({"address": "127.0.0.1", "port": port, "ephemeral": false});
        let (s, v) = post(h, "/v1/services/order-svc/instances", &body);
        assert_eq!(s, 201, "{v}");
        v["instance"]["id"].as_str().unwrap_or_default().to_string()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (confirmed, cancelled) = rt.block_on(async {
        // The first instance: registered, prepares, then dies without resolving.
        let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let first = register(gone.local_addr().unwrap().port());
        drop(gone);
        let opts = meshwork_sdk::Options::new("order-svc", vec![node.etcd.clone()]).unwrap();
        let mw = meshwork_sdk::Meshwork::connect(opts).await.unwrap();
        let mq = mw.mq();
        mq.create_topic("orders", 1).await.unwrap();
        let p = mq.publisher("orders");
        let a = p
            .prepare("order-svc", OutMessage::new("o-1 confirmed").key("o-1"))
            .await
            .unwrap();
        let b = p
            .prepare("order-svc", OutMessage::new("o-2 cancelled").key("o-2"))
            .await
            .unwrap();
        mw.shutdown().await;
        // Checked back while only the dead address is registered: still pending.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, v) = http::get(h, &format!("/v1/mq/half/{}", a.id())).unwrap();
            let v: Value = serde_json::from_str(&v).unwrap();
            if v["checks"].as_u64().unwrap_or(0) >= 1 {
                break;
            }
            assert!(Instant::now() < deadline, "no check-back: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Back as a new instance, on a new port; the old one deregistered.
        let route = half_check_router(|c: HalfCheck| async move {
            match c.message.key.as_str() {
                "o-1" => CheckDecision::Commit,
                "o-2" => CheckDecision::Rollback,
                _ => CheckDecision::Unknown,
            }
        });
        let back = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = back.local_addr().unwrap().port();
        tokio::spawn(async move {
            let _ = axum::serve(back, route).await;
        });
        let (s, _) = http::request(
            h,
            "DELETE",
            &format!("/v1/services/order-svc/instances/{first}"),
            "",
        )
        .unwrap();
        assert!(s == 200 || s == 204, "deregister: {s}");
        register(port);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, v) = http::get(h, "/v1/mq/half").unwrap();
            let v: Value = serde_json::from_str(&v).unwrap();
            if v["half"].as_array().is_some_and(Vec::is_empty) {
                break;
            }
            assert!(Instant::now() < deadline, "still pending: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (a.id(), b.id())
    });
    let (s, v) = http::get(h, "/v1/mq/topics/orders/messages").unwrap();
    assert_eq!(s, 200, "{v}");
    let v: Value = serde_json::from_str(&v).unwrap();
    let got: Vec<(&str, &str)> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap(), m["body"].as_str().unwrap()))
        .collect();
    assert_eq!(got, [(confirmed.to_string().as_str(), "o-1 confirmed")]);
    let (s, v) = post(h, &format!("/v1/mq/half/{cancelled}/commit"), &json!({}));
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{v}"
    );
}

fn kv(etcd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(meshwork_tests::bin())
        .arg("kv")
        .args(args)
        .args(["--endpoints", etcd])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kv {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls a node's API until `f` holds, for at most 20 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Topic and group metadata lives in the store: a topic and group created on one node's
/// broker appear in the store and on a second node's broker sharing that store; one
/// written to the store with a plain etcd client appears on both; a deleted key is
/// written back; settings that conflict are kept by the broker and counted.
#[test]
fn topics_and_groups_live_in_the_store_and_follow_to_every_broker() {
    let dir = tempfile::tempdir().unwrap();
    let a = meshwork_tests::start(
        &dir.path().join("a"),
        &["--roles", "store,coord,mq", "--name", "a"],
        &[],
    );
    let store = format!("etcd://{}", a.etcd);
    let b = meshwork_tests::start(
        &dir.path().join("b"),
        &["--roles", "coord,mq", "--store", &store, "--name", "b"],
        &[],
    );
    let has = |node: &str, path: &str| {
        http::get(node, path)
            .map(|(s, _)| s == 200)
            .unwrap_or(false)
    };

    // Made on a: in the store, and on b.
    let (s, v) = http::request(
        &a.http,
        "PUT",
        "/v1/mq/topics/orders",
        r#"{"partitions":3}"#,
    )
    .unwrap();
    assert_eq!(s, 201, "{v}");
    let (s, v) = http::request(
        &a.http,
        "PUT",
        "/v1/mq/topics/orders/groups/mail",
        r#"{"start":"earliest","max_deliveries":4}"#,
    )
    .unwrap();
    assert_eq!(s, 201, "{v}");
    eventually("orders/mail on b", || {
        has(&b.http, "/v1/mq/topics/orders/groups/mail")
    });
    let (_, t) = http::get(&b.http, "/v1/mq/topics/orders").unwrap();
    let t: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(t["config"]["partitions"], 3, "{t}");
    let (_, g) = http::get(&b.http, "/v1/mq/topics/orders/groups/mail").unwrap();
    let g: Value = serde_json::from_str(&g).unwrap();
    assert_eq!(g["config"]["max_deliveries"], 4, "{g}");
    let stored = kv(&a.etcd, &["get", "/meshwork/mq/topics/orders"]);
    assert!(stored.contains("\"partitions\":3"), "{stored}");

    // Written to the store by a plain client: on both brokers.
    kv(
        &a.etcd,
        &["put", "/meshwork/mq/topics/audit", r#"{"partitions":2}"#],
    );
    kv(
        &a.etcd,
        &[
            "put",
            "/meshwork/mq/groups/audit/archive",
            r#"{"start":"earliest"}"#,
        ],
    );
    for n in [&a, &b] {
        eventually("audit/archive", || {
            has(&n.http, "/v1/mq/topics/audit/groups/archive")
        });
    }

    // A key deleted from the store is written back by the brokers that have it.
    kv(&a.etcd, &["del", "/meshwork/mq/topics/orders"]);
    eventually("orders written back", || {
        kv(&a.etcd, &["get", "/meshwork/mq/topics/orders"]).contains("partitions")
    });

    // Conflicting or broken settings: the brokers keep theirs, and count it.
    kv(
        &a.etcd,
        &["put", "/meshwork/mq/topics/audit", r#"{"partitions":5}"#],
    );
    kv(&a.etcd, &["put", "/meshwork/mq/topics/junk", "not json"]);
    eventually("conflicts counted", || {
        http::get(&b.http, "/metrics")
            .map(|(_, m)| {
                m.lines().any(|l| {
                    l.starts_with("meshwork_mq_meta_conflicts_total")
                        && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) >= Some(2.0)
                })
            })
            .unwrap_or(false)
    });
    let (_, t) = http::get(&b.http, "/v1/mq/topics/audit").unwrap();
    let t: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(t["config"]["partitions"], 2, "{t}");
    assert!(!has(&b.http, "/v1/mq/topics/junk"));
}
