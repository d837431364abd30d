//! The message outbox on a real SQLite file, draining to a real broker over a
//! socket (the embedded broker, and a real nats-server when installed): only
//! committed messages are published, in order, each once even when a drain is
//! repeated after a crash between publishing and removing; a message the broker
//! refuses for good is set aside and does not hold up the rest.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use meshwork_sdk::mq::outbox::{DEAD_TABLE, MqOutbox, TABLE};
use meshwork_sdk::mq::{MqClient, OutMessage, Received, SubscribeOptions};
use meshwork_sdk::txn::sqlite::rusqlite::Connection;
use parking_lot::Mutex;
use serde_json::json;

async fn embedded() -> (MqClient, Box<dyn std::any::Any + Send>) {
    let dir = tempfile::tempdir().unwrap();
    let broker =
        meshwork_mq::Broker::open(dir.path(), meshwork_mq::BrokerConfig::default()).unwrap();
    let app = meshwork_mq::api::router(broker.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (MqClient::at(&addr.to_string()), Box::new((broker, dir)))
}

fn count(conn: &Arc<Mutex<Connection>>, table: &str) -> i64 {
    conn.lock()
        .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

async fn staged_messages_go_out_once_in_order_and_a_bad_one_is_set_aside(client: MqClient) {
    client.create_topic("orders", 1).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut conn = Connection::open(dir.path().join("svc.db")).unwrap();
    let outbox = MqOutbox::install(&conn).unwrap();
    conn.execute_batch("CREATE TABLE orders (id INTEGER PRIMARY KEY, status TEXT NOT NULL)")
        .unwrap();
    // Committed: three events with their rows.
    for i in 1..=3 {
        let tx = conn.transaction().unwrap();
        tx.execute("INSERT INTO orders VALUES (?1, 'confirmed')", [i])
            .unwrap();
        outbox
            .stage(
                &tx,
                "orders",
                &OutMessage::new(format!("confirmed {i}")).key("o"),
            )
            .unwrap();
        tx.commit().unwrap();
    }
    // Rolled back: neither the row nor the message.
    {
        let tx = conn.transaction().unwrap();
        tx.execute("INSERT INTO orders VALUES (9, 'confirmed')", [])
            .unwrap();
        outbox
            .stage(&tx, "orders", &OutMessage::new("confirmed 9"))
            .unwrap();
        tx.rollback().unwrap();
    }
    // One the broker refuses for good (over the 1 MiB limit), between good ones.
    {
        let tx = conn.transaction().unwrap();
        outbox
            .stage(&tx, "orders", &OutMessage::new(vec![b'x'; 1_100_000]))
            .unwrap();
        outbox
            .stage(&tx, "orders", &OutMessage::new("confirmed 4").key("o"))
            .unwrap();
        tx.commit().unwrap();
    }
    // A crash after publishing, before removing: the row is still there.
    let replay: (String, String) = conn
        .query_row(
            &format!("SELECT topic, message FROM {TABLE} ORDER BY seq LIMIT 1"),
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let conn = Arc::new(Mutex::new(conn));
    assert_eq!(outbox.drain(&conn, &client).await.unwrap(), 5);
    assert_eq!(count(&conn, TABLE), 0);
    assert_eq!(count(&conn, DEAD_TABLE), 1, "the oversize one is set aside");
    conn.lock()
        .execute(
            &format!("INSERT INTO {TABLE} (topic, message) VALUES (?1, ?2)"),
            [&replay.0, &replay.1],
        )
        .unwrap();
    assert_eq!(outbox.drain(&conn, &client).await.unwrap(), 1);
    assert_eq!(outbox.drain(&conn, &client).await.unwrap(), 0);

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sub = client
        .subscribe(
            "orders",
            "mailer",
            SubscribeOptions {
                concurrency: 1,
                group: json!({"start": "earliest"}),
                ..SubscribeOptions::default()
            },
            move |m: Received| {
                let tx = tx.clone();
                async move {
                    tx.send(m.text()).unwrap();
                    Ok::<(), String>(())
                }
            },
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 4 {
        got.push(
            tokio::time::timeout(Duration::from_secs(20), rx.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(
        got,
        ["confirmed 1", "confirmed 2", "confirmed 3", "confirmed 4"]
    );
    // Nothing more: the replayed one was a duplicate.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err()
    );
    sub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_embedded_broker() {
    let (client, _keep) = embedded().await;
    staged_messages_go_out_once_in_order_and_a_bad_one_is_set_aside(client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_nats_jetstream() {
    if !cfg!(feature = "nats") {
        return;
    }
    let Some(server) = meshwork_testkit::nats_server::NatsServer::start() else {
        return;
    };
    staged_messages_go_out_once_in_order_and_a_bad_one_is_set_aside(MqClient::at(&server.url()))
        .await;
}
