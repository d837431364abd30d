//! Half messages over the HTTP API and the check-back over real sockets: a producer
//! prepares two half messages and dies before resolving them; the broker's check-backs
//! fail while it is gone, and once it is back (on another port, as a restarted instance
//! is) its answers commit one and roll the other back. Every answer is as documented.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::routing::post;
use meshwork_mq::{Broker, BrokerConfig};
use meshwork_testkit::http::{body_of, raw, status_of};
use meshwork_testkit::schema::Spec;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::watch;

fn doc() -> Spec {
    let merged = meshwork_api::openapi::merge(&[meshwork_mq::OPENAPI]).expect("merge");
    Spec { doc: merged }
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

/// A producer instance: answers check-backs from what its "database" says, and keeps
/// what it was asked.
async fn producer(
    decisions: Value,
    asked: Arc<Mutex<Vec<Value>>>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new().route(
        meshwork_mq::check::CHECK_PATH,
        post(move |Json(check): Json<Value>| {
            let asked = asked.clone();
            let decisions = decisions.clone();
            async move {
                let id = check["id"].as_str().unwrap_or_default().to_string();
                asked.lock().push(check);
                Json(json!({ "decision": decisions[&id].as_str().unwrap_or("unknown") }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, task)
}

/// Polls `f` until it is true, for at most 10 s.
async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_dies_holding_half_messages_resolves_them_when_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = BrokerConfig {
        half_check_after: Duration::from_millis(100),
        half_check_interval: Duration::from_millis(200),
        half_max_checks: 1000,
        ..BrokerConfig::default()
    };
    let broker = Broker::open(dir.path(), cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = listener.local_addr().unwrap();
    let app = meshwork_mq::api::router(broker.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    // The registry: where the producer's instances are now.
    let instances: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
    let resolve: meshwork_mq::check::Resolver = {
        let instances = instances.clone();
        Arc::new(move |service: &str| {
            if service == "order-svc" {
                instances.lock().clone()
            } else {
                Vec::new()
            }
        })
    };
    let (stop, stop_rx) = watch::channel(false);
    let checker = tokio::spawn(meshwork_mq::check::run_checker(
        broker.clone(),
        resolve,
        stop_rx,
    ));

    let d = doc();
    assert_eq!(call(a, "PUT", "/v1/mq/topics/orders", "").await.0, 201);
    let g = "/v1/mq/topics/orders/groups/mail";
    assert_eq!(call(a, "PUT", g, r#"{"start":"earliest"}"#).await.0, 201);

    // The first instance: it prepares two half messages, then dies (asked, it would
    // not know yet).
    let asked = Arc::new(Mutex::new(Vec::new()));
    let (p1, p1_task) = producer(json!({}), asked.clone()).await;
    *instances.lock() = vec![p1];
    let prep = |id: &str, body: &str| {
        format!(
            r#"{{"producer":"order-svc","message":{{"id":"{id}","key":"o-{id}","body":"{body}"}}}}"#
        )
    };
    for (id, body) in [("101", "confirmed"), ("102", "cancelled")] {
        let (s, v) = call(a, "POST", "/v1/mq/topics/orders/half", &prep(id, body)).await;
        d.check_response("/v1/mq/topics/{topic}/half", "post", s, &v);
        assert_eq!(
            (s, v["id"].as_str(), v["producer"].as_str()),
            (200, Some(id), Some("order-svc"))
        );
    }
    p1_task.abort();
    let _ = p1_task.await;
    let (s, v) = call(a, "GET", "/v1/mq/half", "").await;
    d.check_response("/v1/mq/half", "get", s, &v);
    assert_eq!(v["half"].as_array().map(Vec::len), Some(2));
    // Nothing reaches the group while they are half messages.
    let (s, v) = call(a, "POST", &format!("{g}/fetch"), r#"{"max":10}"#).await;
    assert_eq!((s, v["messages"].as_array().map(Vec::len)), (200, Some(0)));

    // Checked back while the instance is gone: no answer, still pending.
    until("two failed check-backs of 101", async || {
        let (s, v) = call(a, "GET", "/v1/mq/half/101", "").await;
        d.check_response("/v1/mq/half/{id}", "get", s, &v);
        s == 200 && v["checks"].as_u64().unwrap_or(0) >= 2
    })
    .await;

    // Back on another port; its database says 101 committed and 102 rolled back.
    let (p2, _p2_task) = producer(json!({"101": "commit", "102": "rollback"}), asked.clone()).await;
    *instances.lock() = vec![p2];
    until("both resolved", async || {
        let (s, v) = call(a, "GET", "/v1/mq/half", "").await;
        s == 200 && v["half"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    let (s, v) = call(
        a,
        "POST",
        &format!("{g}/fetch"),
        r#"{"max":10,"wait_ms":2000}"#,
    )
    .await;
    assert_eq!(s, 200);
    let got: Vec<(&str, &str)> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap(), m["body"].as_str().unwrap()))
        .collect();
    assert_eq!(got, [("101", "confirmed")]);
    // What the producer was shown: the message as it would be published.
    let shown = asked.lock().clone();
    let first = shown.iter().find(|c| c["id"] == "101").expect("101 asked");
    assert_eq!(
        (
            first["topic"].as_str(),
            first["key"].as_str(),
            first["body"].as_str()
        ),
        (Some("orders"), Some("o-101"), Some("confirmed"))
    );
    assert!(
        first.get("headers").is_none(),
        "no mq-half-* header shown: {first}"
    );

    // The producer resolving late, as its own retry would: the same outcome, or a clear refusal.
    let (s, v) = call(a, "POST", "/v1/mq/half/101/commit", "").await;
    d.check_response("/v1/mq/half/{id}/commit", "post", s, &v);
    assert_eq!((s, v["state"].as_str()), (200, Some("committed")));
    let (s, v) = call(a, "POST", "/v1/mq/half/102/commit", "").await;
    d.check_response("/v1/mq/half/{id}/commit", "post", s, &v);
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("conflict")));
    let (s, v) = call(a, "POST", "/v1/mq/half/102/rollback", "").await;
    d.check_response("/v1/mq/half/{id}/rollback", "post", s, &v);
    assert_eq!((s, v["state"].as_str()), (200, Some("rolled_back")));

    let _ = stop.send(true);
    checker.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_half_requests_get_clear_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), BrokerConfig::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = listener.local_addr().unwrap();
    let app = meshwork_mq::api::router(broker.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let d = doc();
    assert_eq!(call(a, "PUT", "/v1/mq/topics/t", "").await.0, 201);
    let cases: &[(&str, &str, &str, u16, &str)] = &[
        ("POST", "/v1/mq/topics/t/half", "{", 400, "body"),
        (
            "POST",
            "/v1/mq/topics/t/half",
            r#"{"message":{"id":"1"}}"#,
            400,
            "producer",
        ),
        (
            "POST",
            "/v1/mq/topics/t/half",
            r#"{"producer":"p","message":{"body":"x"}}"#,
            400,
            "needs an id",
        ),
        (
            "POST",
            "/v1/mq/topics/t/half",
            r#"{"producer":"p q","message":{"id":"1"}}"#,
            400,
            "producer name",
        ),
        (
            "POST",
            "/v1/mq/topics/t/half",
            r#"{"producer":"p","message":{"id":"x"}}"#,
            400,
            "message: id",
        ),
        (
            "POST",
            "/v1/mq/topics/nope/half",
            r#"{"producer":"p","message":{"id":"1"}}"#,
            404,
            "does not exist",
        ),
        (
            "POST",
            "/v1/mq/topics/__half/half",
            r#"{"producer":"p","message":{"id":"1"}}"#,
            404,
            "does not exist",
        ),
        ("GET", "/v1/mq/half/abc", "", 400, "positive"),
        ("GET", "/v1/mq/half/7", "", 404, "no half message 7"),
        ("POST", "/v1/mq/half/7/commit", "", 404, "no half message 7"),
        ("POST", "/v1/mq/half/0/rollback", "", 400, "positive"),
    ];
    for (method, path, body, status, needle) in cases {
        let (s, v) = call(a, method, path, body).await;
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert_eq!(s, *status, "{method} {path} {body}: {v}");
        assert!(
            msg.contains(needle),
            "{method} {path} {body}: {msg:?} lacks {needle:?}"
        );
        let route = path
            .replace("/v1/mq/topics/t/", "/v1/mq/topics/{topic}/")
            .replace("/v1/mq/topics/nope/", "/v1/mq/topics/{topic}/")
            .replace("/v1/mq/topics/__half/", "/v1/mq/topics/{topic}/");
        let route = ["abc", "7", "0"].iter().fold(route, |r, id| {
            r.replace(&format!("/half/{id}"), "/half/{id}")
        });
        d.check_response(&route, &method.to_lowercase(), s, &v);
    }
    assert!(broker.halves(10).is_empty());
    assert_eq!(broker.topic_info("t").unwrap().partitions[0].end, 0);
}
