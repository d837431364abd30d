//! The SDK's publisher and subscriber against a real broker served over a socket:
//! delivery with headers and the publisher's trace, retries through nack with backoff,
//! bounded concurrency, deadline extension for a slow handler, graceful shutdown that
//! finishes running handlers, and one that gives back what it could not finish.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use meshwork_sdk::RequestContext;
use meshwork_sdk::mq::{MqClient, OutMessage, Received, SubscribeOptions};
use serde_json::json;

struct Broker {
    client: MqClient,
    _broker: meshwork_mq::Broker,
    _dir: tempfile::TempDir,
}

async fn broker() -> Broker {
    let dir = tempfile::tempdir().unwrap();
    let broker =
        meshwork_mq::Broker::open(dir.path(), meshwork_mq::BrokerConfig::default()).unwrap();
    let app = meshwork_mq::api::router(broker.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let client = MqClient::at(&addr.to_string());
    client.create_topic("t", 2).await.unwrap();
    Broker {
        client,
        _broker: broker,
        _dir: dir,
    }
}

fn opts(group: serde_json::Value) -> SubscribeOptions {
    SubscribeOptions {
        group,
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        shutdown_grace: Duration::from_secs(10),
        ..SubscribeOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_with_headers_and_the_publishers_trace_then_acked() {
    let b = broker().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Received, Option<RequestContext>)>();
    let sub = b
        .client
        .subscribe("t", "g", opts(json!({"start": "earliest"})), move |m| {
            let tx = tx.clone();
            async move {
                tx.send((m, RequestContext::current())).unwrap();
                Ok::<(), String>(())
            }
        })
        .await
        .unwrap();
    let ctx = RequestContext {
        trace: meshwork_telemetry::TraceContext::new_root(),
        deadline: None,
    };
    let trace_id = ctx.trace.traceparent()[3..35].to_string();
    let publisher = b.client.publisher("t");
    let p = ctx
        .scope(
            publisher.publish(
                OutMessage::new("hello")
                    .key("o-1")
                    .tag("paid")
                    .header("x-kind", "order"),
            ),
        )
        .await
        .unwrap();
    assert!(!p.duplicate);
    let (m, hctx) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            m.text().as_str(),
            m.key.as_str(),
            m.tag.as_str(),
            m.delivery
        ),
        ("hello", "o-1", "paid", 1)
    );
    assert_eq!(m.headers["x-kind"], "order");
    assert!(
        m.headers["traceparent"].contains(&trace_id),
        "the publisher's trace travels"
    );
    assert!(
        hctx.unwrap().trace.traceparent().contains(&trace_id),
        "the handler runs in it"
    );
    sub.shutdown().await;
    let info = b.client.ensure_group("t", "g", &json!({})).await.unwrap();
    assert_eq!(
        (info["backlog"].as_u64(), info["unacked"].as_u64()),
        (Some(0), Some(0)),
        "{info}"
    );

    // An id published twice is written once.
    let first = publisher.publish(OutMessage::new("x").id(7)).await.unwrap();
    let again = publisher.publish(OutMessage::new("x").id(7)).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(
        (first.partition, first.offset),
        (again.partition, again.offset)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_handler_gets_the_message_again_with_backoff_and_concurrency_is_bounded() {
    let b = broker().await;
    let publisher = b.client.publisher("t");
    let msgs: Vec<OutMessage> = (0..20).map(|i| OutMessage::new(format!("m{i}"))).collect();
    publisher.publish_all(msgs).await.unwrap();
    let (running, peak, done) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let deliveries = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let sub = {
        let (running, peak, done, deliveries) = (
            running.clone(),
            peak.clone(),
            done.clone(),
            deliveries.clone(),
        );
        b.client
            .subscribe(
                "t",
                "g",
                SubscribeOptions {
                    concurrency: 4,
                    ..opts(json!({"start": "earliest", "max_deliveries": 5}))
                },
                move |m| {
                    let (running, peak, done, deliveries) = (
                        running.clone(),
                        peak.clone(),
                        done.clone(),
                        deliveries.clone(),
                    );
                    async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        running.fetch_sub(1, Ordering::SeqCst);
                        deliveries.lock().push((m.text(), m.delivery));
                        // m0 fails twice, then succeeds.
                        if m.text() == "m0" && m.delivery < 3 {
                            return Err("not yet");
                        }
                        done.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    }
                },
            )
            .await
            .unwrap()
    };
    meshwork_testkit::eventually("all 20 handled", Duration::from_secs(30), || {
        let done = done.clone();
        async move { (done.load(Ordering::SeqCst) == 20).then_some(()) }
    })
    .await;
    sub.shutdown().await;
    assert!(
        peak.load(Ordering::SeqCst) <= 4,
        "peak {}",
        peak.load(Ordering::SeqCst)
    );
    let m0: Vec<u32> = deliveries
        .lock()
        .iter()
        .filter(|(t, _)| t == "m0")
        .map(|(_, d)| *d)
        .collect();
    assert_eq!(m0, [1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_keeps_its_message_and_shutdown_finishes_or_gives_back() {
    let b = broker().await;
    let publisher = b.client.publisher("t");
    let seen = Arc::new(parking_lot::Mutex::new(Vec::<(String, u32)>::new()));
    let slow = {
        let seen = seen.clone();
        move |m: Received| {
            let seen = seen.clone();
            async move {
                seen.lock().push((m.text(), m.delivery));
                let ms = if m.text() == "stuck" { 60_000 } else { 3000 };
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<(), String>(())
            }
        }
    };
    // An ack wait of 1 s and a 3 s handler: extended (every 500 ms), never delivered twice.
    let group = json!({"start": "earliest", "ack_wait_ms": 1000});
    let sub = b
        .client
        .subscribe("t", "g", opts(group.clone()), slow.clone())
        .await
        .unwrap();
    let other = b
        .client
        .subscribe("t", "g", opts(group.clone()), slow.clone())
        .await
        .unwrap();
    publisher.publish(OutMessage::new("slow")).await.unwrap();
    meshwork_testkit::eventually("the slow one taken", Duration::from_secs(20), || {
        let seen = seen.clone();
        async move { (!seen.lock().is_empty()).then_some(()) }
    })
    .await;
    // Shutdown waits for it to finish (and ack).
    sub.shutdown().await;
    other.shutdown().await;
    assert_eq!(seen.lock().clone(), [("slow".to_string(), 1)]);
    let info = b.client.ensure_group("t", "g", &json!({})).await.unwrap();
    assert_eq!(info["backlog"], 0, "{info}");

    // A handler still running past the grace period is aborted and its message given
    // back at once (not held until its deadline): another subscriber gets it.
    let group2 = json!({"start": "earliest", "ack_wait_ms": 60000});
    let quick = SubscribeOptions {
        shutdown_grace: Duration::from_millis(200),
        ..opts(group2.clone())
    };
    let sub = b
        .client
        .subscribe("t", "g2", quick, slow.clone())
        .await
        .unwrap();
    publisher.publish(OutMessage::new("stuck")).await.unwrap();
    meshwork_testkit::eventually("the stuck one taken", Duration::from_secs(20), || {
        let seen = seen.clone();
        async move { seen.lock().iter().any(|(t, _)| t == "stuck").then_some(()) }
    })
    .await;
    sub.shutdown().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let next = b
        .client
        .subscribe("t", "g2", opts(group2), move |m: Received| {
            let tx = tx.clone();
            async move {
                tx.send((m.text(), m.delivery)).unwrap();
                Ok::<(), String>(())
            }
        })
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let (t, d) = rx.recv().await.unwrap();
            if t == "stuck" {
                return d;
            }
        }
    })
    .await
    .expect("given back well before its 60 s deadline");
    assert_eq!(got, 2);
    next.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_group_gives_each_instance_every_message() {
    let b = broker().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut subs = Vec::new();
    for instance in ["i1", "i2"] {
        let tx = tx.clone();
        let o = SubscribeOptions {
            consumer: Some(instance.to_string()),
            ..opts(json!({"mode": "broadcast", "start": "earliest"}))
        };
        subs.push(
            b.client
                .subscribe("t", "cache", o, move |m: Received| {
                    let tx = tx.clone();
                    async move {
                        tx.send((instance, m.text())).unwrap();
                        Ok::<(), String>(())
                    }
                })
                .await
                .unwrap(),
        );
    }
    b.client
        .publisher("t")
        .publish(OutMessage::new("invalidate k1"))
        .await
        .unwrap();
    let mut got = std::collections::BTreeSet::new();
    while got.len() < 2 {
        got.insert(
            tokio::time::timeout(Duration::from_secs(20), rx.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(
        got.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        ["i1", "i2"]
    );
    for s in subs {
        s.shutdown().await;
    }
}
