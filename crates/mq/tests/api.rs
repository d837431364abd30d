//! The `/v1/mq/` HTTP API over a real socket: every operation answers as
//! `openapi.json` documents it (the node's merged document), the document lists
//! exactly the routes, and bad requests get clear errors and change nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;

use meshwork_mq::{Broker, BrokerConfig};
use meshwork_testkit::http::{body_of, raw, status_of};
use meshwork_testkit::schema::Spec;
use serde_json::Value;

fn doc() -> Spec {
    let merged = meshwork_api::openapi::merge(&[meshwork_mq::OPENAPI]).expect("merge");
    Spec { doc: merged }
}

async fn start() -> (SocketAddr, Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), BrokerConfig::default()).unwrap();
    let app = meshwork_mq::api::router(broker.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, broker, dir)
}

async fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let resp = raw(addr, req.as_bytes()).await;
    let b = body_of(&resp);
    let v = if b.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(b).unwrap_or(Value::String(b.to_string()))
    };
    (status_of(&resp), v)
}

/// The answer is documented (see `Spec::check_response`).
fn check(d: &Spec, path: &str, method: &str, status: u16, body: &Value) {
    d.check_response(path, method, status, body);
}

#[test]
fn the_document_lists_exactly_the_routes() {
    doc().assert_routes("mq", meshwork_mq::api::ROUTES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_as_documented() {
    let (a, _b, _dir) = start().await;
    let d = doc();
    let t = "/v1/mq/topics/orders";
    let (s, v) = call(a, "PUT", t, r#"{"partitions":2}"#).await;
    check(&d, "/v1/mq/topics/{topic}", "put", s, &v);
    assert_eq!(s, 201);
    let (s, v) = call(a, "PUT", t, r#"{"partitions":2}"#).await;
    check(&d, "/v1/mq/topics/{topic}", "put", s, &v);
    assert_eq!(s, 200);
    let (s, v) = call(a, "PUT", t, r#"{"partitions":3}"#).await;
    check(&d, "/v1/mq/topics/{topic}", "put", s, &v);
    assert_eq!(s, 409);
    let (s, v) = call(a, "PUT", "/v1/mq/topics/bad%20name", "").await;
    check(&d, "/v1/mq/topics/{topic}", "put", s, &v);
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("invalid_argument"))
    );

    let g = format!("{t}/groups/mailer");
    let (s, v) = call(
        a,
        "PUT",
        &g,
        r#"{"start":"earliest","ack_wait_ms":60000,"max_deliveries":2}"#,
    )
    .await;
    check(&d, "/v1/mq/topics/{topic}/groups/{group}", "put", s, &v);
    assert_eq!(s, 201, "{v}");

    let (s, v) = call(
        a,
        "POST",
        &format!("{t}/messages"),
        r#"{"messages":[{"id":"17","key":"o-1","tag":"paid","headers":{"traceparent":"00-x"},"body":"hello"},{"body_base64":"/wA=","priority":9},{"id":"17","body":"again"}]}"#,
    )
    .await;
    check(&d, "/v1/mq/topics/{topic}/messages", "post", s, &v);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["results"][2]["duplicate"], true);
    assert_eq!(v["results"][2]["offset"], v["results"][0]["offset"]);

    let (s, v) = call(
        a,
        "GET",
        &format!(
            "{t}/messages?partition={}&limit=10",
            v["results"][0]["partition"]
        ),
        "",
    )
    .await;
    check(&d, "/v1/mq/topics/{topic}/messages", "get", s, &v);
    assert_eq!(v["messages"][0]["body"], "hello");
    assert_eq!(v["messages"][0]["headers"]["traceparent"], "00-x");

    let (s, v) = call(a, "GET", "/v1/mq/topics", "").await;
    check(&d, "/v1/mq/topics", "get", s, &v);
    assert_eq!(
        v["topics"].as_array().unwrap().len(),
        2,
        "the topic and its group's dead-letter topic"
    );
    let (s, v) = call(a, "GET", t, "").await;
    check(&d, "/v1/mq/topics/{topic}", "get", s, &v);
    assert_eq!(v["groups"][0], "mailer");

    let (s, v) = call(
        a,
        "POST",
        &format!("{g}/fetch"),
        r#"{"max":10,"wait_ms":1000}"#,
    )
    .await;
    check(
        &d,
        "/v1/mq/topics/{topic}/groups/{group}/fetch",
        "post",
        s,
        &v,
    );
    let msgs = v["messages"].as_array().unwrap().clone();
    assert_eq!(msgs.len(), 2, "{v}");
    let binary = msgs.iter().find(|m| m["body_base64"].is_string()).unwrap();
    assert_eq!(binary["body_base64"], "/wA=");
    let item = |m: &Value| {
        format!(
            r#"{{"partition":{},"offset":{}}}"#,
            m["partition"], m["offset"]
        )
    };

    let (s, v) = call(
        a,
        "POST",
        &format!("{g}/extend"),
        &format!(r#"{{"messages":[{}],"by_ms":5000}}"#, item(&msgs[0])),
    )
    .await;
    check(
        &d,
        "/v1/mq/topics/{topic}/groups/{group}/extend",
        "post",
        s,
        &v,
    );
    assert_eq!(s, 204);
    let (s, v) = call(
        a,
        "POST",
        &format!("{g}/ack"),
        &format!(r#"{{"messages":[{}]}}"#, item(&msgs[0])),
    )
    .await;
    check(
        &d,
        "/v1/mq/topics/{topic}/groups/{group}/ack",
        "post",
        s,
        &v,
    );
    assert_eq!(s, 204);
    // The other: nacked twice, it runs out of deliveries and lands in the dead letters.
    for _ in 0..2 {
        let (s, v) = call(
            a,
            "POST",
            &format!("{g}/nack"),
            &format!(r#"{{"messages":[{}]}}"#, item(&msgs[1])),
        )
        .await;
        check(
            &d,
            "/v1/mq/topics/{topic}/groups/{group}/nack",
            "post",
            s,
            &v,
        );
        assert_eq!(s, 204);
        let (_, v) = call(a, "POST", &format!("{g}/fetch"), r#"{"max":10}"#).await;
        assert!(v["messages"].as_array().unwrap().len() <= 1);
    }
    let (s, v) = call(a, "GET", &g, "").await;
    check(&d, "/v1/mq/topics/{topic}/groups/{group}", "get", s, &v);
    assert_eq!(
        (v["backlog"].as_u64(), v["dead_letters"].as_u64()),
        (Some(0), Some(1)),
        "{v}"
    );
    let (s, v) = call(a, "GET", &format!("{g}/dlq?limit=5"), "").await;
    check(&d, "/v1/mq/topics/{topic}/groups/{group}/dlq", "get", s, &v);
    assert_eq!(v["messages"][0]["headers"]["mq-dead-deliveries"], "2");
    let (s, v) = call(a, "POST", &format!("{g}/dlq/redrive"), "").await;
    check(
        &d,
        "/v1/mq/topics/{topic}/groups/{group}/dlq/redrive",
        "post",
        s,
        &v,
    );
    assert_eq!(v["moved"], 1);

    // A broadcast group: each consumer names itself.
    let bg = format!("{t}/groups/cache");
    let (s, v) = call(a, "PUT", &bg, r#"{"mode":"broadcast","start":"earliest"}"#).await;
    check(&d, "/v1/mq/topics/{topic}/groups/{group}", "put", s, &v);
    assert_eq!(s, 201, "{v}");
    for c in ["n1", "n2"] {
        let (s, v) = call(
            a,
            "POST",
            &format!("{bg}/fetch"),
            &format!(r#"{{"max":10,"consumer":"{c}"}}"#),
        )
        .await;
        check(
            &d,
            "/v1/mq/topics/{topic}/groups/{group}/fetch",
            "post",
            s,
            &v,
        );
        let msgs = v["messages"].as_array().unwrap().clone();
        assert!(msgs.len() >= 2, "{v}");
        let items: Vec<String> = msgs.iter().map(item).collect();
        let (s, v) = call(
            a,
            "POST",
            &format!("{bg}/ack"),
            &format!(r#"{{"messages":[{}],"consumer":"{c}"}}"#, items.join(",")),
        )
        .await;
        check(
            &d,
            "/v1/mq/topics/{topic}/groups/{group}/ack",
            "post",
            s,
            &v,
        );
        assert_eq!(s, 204);
    }
    let (s, v) = call(a, "GET", &bg, "").await;
    check(&d, "/v1/mq/topics/{topic}/groups/{group}", "get", s, &v);
    assert_eq!(v["consumers"], serde_json::json!(["n1", "n2"]));
    assert_eq!(v["backlog"], 0);

    // Errors, as documented.
    let (s, v) = call(
        a,
        "POST",
        &format!("{g}/ack"),
        r#"{"messages":[{"partition":0,"offset":999}]}"#,
    )
    .await;
    check(
        &d,
        "/v1/mq/topics/{topic}/groups/{group}/ack",
        "post",
        s,
        &v,
    );
    assert_eq!(v["error"]["code"], "unknown_delivery");
    let (s, v) = call(
        a,
        "GET",
        &format!("{t}/messages?partition=0&offset=999"),
        "",
    )
    .await;
    check(&d, "/v1/mq/topics/{topic}/messages", "get", s, &v);
    assert_eq!(v["error"]["code"], "out_of_range");
    let (s, v) = call(a, "GET", "/v1/mq/topics/nope/groups/x", "").await;
    check(&d, "/v1/mq/topics/{topic}/groups/{group}", "get", s, &v);
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let (a, b, _dir) = start().await;
    let t = "/v1/mq/topics/t";
    assert_eq!(call(a, "PUT", t, "").await.0, 201);
    let cases: &[(&str, &str, &str, u16, &str)] = &[
        ("POST", "/messages", "", 400, "required"),
        ("POST", "/messages", "{", 400, "body"),
        (
            "POST",
            "/messages",
            r#"{"messages":[]}"#,
            400,
            "at least one",
        ),
        (
            "POST",
            "/messages",
            r#"{"messages":[{"body":"a","body_base64":"YQ=="}]}"#,
            400,
            "not both",
        ),
        (
            "POST",
            "/messages",
            r#"{"messages":[{"id":"-1"}]}"#,
            400,
            "positive",
        ),
        (
            "POST",
            "/messages",
            r#"{"messages":[{"id":"0"}]}"#,
            400,
            "positive",
        ),
        (
            "POST",
            "/messages",
            r#"{"messages":[{"body_base64":"***"}]}"#,
            400,
            "base64",
        ),
        (
            "POST",
            "/messages",
            r#"{"messages":[{"priority":10}]}"#,
            400,
            "priority",
        ),
        (
            "POST",
            "/messages",
            r#"{"messages":[{"delay_ms":99999999999}]}"#,
            400,
            "max_delay",
        ),
        (
            "POST",
            "/messages",
            r#"{"messages":[{"bogus":1}]}"#,
            400,
            "bogus",
        ),
        (
            "PUT",
            "/groups/g",
            r#"{"ack_wait_ms":0}"#,
            400,
            "ack_wait_ms",
        ),
        ("PUT", "/groups/__x", "", 400, "reserved"),
        ("POST", "/groups/none/fetch", "", 404, "does not exist"),
    ];
    for (m, p, body, status, needle) in cases {
        let (s, v) = call(a, m, &format!("{t}{p}"), body).await;
        assert_eq!(s, *status, "{m} {p} {body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{m} {p} {body}: {msg:?} lacks {needle:?}"
        );
    }
    assert_eq!(call(a, "PUT", &format!("{t}/groups/g"), "").await.0, 201);
    for (body, needle) in [
        (r#"{"wait_ms":30001}"#, "wait_ms"),
        (r#"{"max":0}"#, "max"),
        (r#"{"max":1001}"#, "max"),
    ] {
        let (s, v) = call(a, "POST", &format!("{t}/groups/g/fetch"), body).await;
        assert_eq!(s, 400, "{body}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{v}"
        );
    }
    let (s, v) = call(
        a,
        "POST",
        &format!("{t}/groups/g/ack"),
        r#"{"messages":[]}"#,
    )
    .await;
    assert_eq!(s, 400, "{v}");
    // Nothing was written by any of it.
    assert_eq!(b.topic_info("t").unwrap().partitions[0].end, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_on_a_long_poll_loses_nothing() {
    let (a, b, _dir) = start().await;
    assert_eq!(call(a, "PUT", "/v1/mq/topics/t", "").await.0, 201);
    assert_eq!(
        call(
            a,
            "PUT",
            "/v1/mq/topics/t/groups/g",
            r#"{"ack_wait_ms":200}"#
        )
        .await
        .0,
        201
    );
    // Long polls whose clients hang up at once.
    for _ in 0..20 {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(a).await.unwrap();
        let body = r#"{"max":5,"wait_ms":30000}"#;
        let req = format!(
            "POST /v1/mq/topics/t/groups/g/fetch HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        drop(s);
    }
    let (s, _) = call(
        a,
        "POST",
        "/v1/mq/topics/t/messages",
        r#"{"messages":[{"body":"one"},{"body":"two"}]}"#,
    )
    .await;
    assert_eq!(s, 200);
    // Whatever the abandoned polls took comes back after its ack deadline.
    let mut got = BTreeSet::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while got.len() < 2 {
        assert!(std::time::Instant::now() < deadline, "lost: got {got:?}");
        let (_, v) = call(
            a,
            "POST",
            "/v1/mq/topics/t/groups/g/fetch",
            r#"{"max":5,"wait_ms":500}"#,
        )
        .await;
        for m in v["messages"].as_array().unwrap() {
            got.insert(m["body"].as_str().unwrap().to_string());
            let item = format!(
                r#"{{"messages":[{{"partition":{},"offset":{}}}]}}"#,
                m["partition"], m["offset"]
            );
            assert_eq!(
                call(a, "POST", "/v1/mq/topics/t/groups/g/ack", &item)
                    .await
                    .0,
                204
            );
        }
    }
    assert_eq!(b.group_info("t", "g").unwrap().backlog, 0);
}
