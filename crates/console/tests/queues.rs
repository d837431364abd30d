//! The Queues pages over a real socket, on a real broker: the topics list with
//! each group's backlog and dead letters, a topic's page with its partitions,
//! groups and dead letters (bodies masked), and the redrive button's call, after
//! which the dead letters are gone; a node without the broker says so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshwork_console::ConsoleState;
use meshwork_coord::{Coord, CoordOptions};
use meshwork_mq::{Broker, BrokerConfig, GroupConfig, NewMessage, StartAt, TopicConfig};
use meshwork_testkit::http::{body_of, raw, status_of};

async fn serve(mq: Option<Broker>) -> (std::net::SocketAddr, Box<dyn std::any::Any + Send>) {
    let store = meshwork_testkit::store::embedded().await;
    let coord = Coord::start(
        std::slice::from_ref(&store.endpoint),
        CoordOptions::default(),
    )
    .await
    .unwrap();
    let mut app = meshwork_console::router(ConsoleState {
        mq: mq.clone(),
        ..ConsoleState::for_coord(coord.clone())
    });
    if let Some(b) = &mq {
        app = app.merge(meshwork_mq::api::router(b.clone()));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, Box::new((store, coord)))
}

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let r = raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: console\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&r), 200, "{path}: {r}");
    body_of(&r).to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_groups_and_dead_letters_and_the_redrive_button() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::open(dir.path(), BrokerConfig::default()).unwrap();
    b.create_topic(
        "orders",
        TopicConfig {
            partitions: 2,
            ..TopicConfig::default()
        },
    )
    .await
    .unwrap();
    b.create_group(
        "orders",
        "mailer",
        GroupConfig {
            start: StartAt::Earliest,
            max_deliveries: 1,
            ..GroupConfig::default()
        },
    )
    .await
    .unwrap();
    let msgs = vec![
        NewMessage {
            key: "o-1".into(),
            body: "<b>poison</b> password=hunter2".into(),
            ..NewMessage::default()
        },
        NewMessage {
            key: "o-2".into(),
            body: "fine".into(),
            ..NewMessage::default()
        },
    ];
    b.publish("orders", msgs).await.unwrap();
    // The first one fails its only delivery: a dead letter (moved there when the
    // group next looks at it); the other is acked.
    let settled = async {
        loop {
            let info = b.group_info("orders", "mailer").unwrap();
            if info.dead_letters == 1 && info.backlog == 0 {
                return;
            }
            let got = b
                .fetch("orders", "mailer", 10, Duration::from_millis(100))
                .await
                .unwrap();
            for d in &got {
                let item = [(d.partition, d.offset)];
                if d.message.body.as_ref() == b"fine" {
                    b.ack("orders", "mailer", &item).await.unwrap();
                } else {
                    b.nack("orders", "mailer", &item, Duration::ZERO)
                        .await
                        .unwrap();
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), settled)
        .await
        .expect("one dead letter, one acked");
    let (addr, _keep) = serve(Some(b.clone())).await;

    let list = get(addr, "/ui/queues").await;
    assert!(list.contains("href=\"/ui/queues/orders\""), "{list}");
    assert!(list.contains("data-poll="), "the list refreshes itself");
    assert!(
        list.contains("mailer: 0 / 0 / <span class=\"error\">1</span>"),
        "{list}"
    );
    assert!(
        !list.contains("__dlq"),
        "the broker's own topics are not listed"
    );

    let page = get(addr, "/ui/queues/orders").await;
    assert!(page.contains("2 messages in 2 partitions"), "{page}");
    assert!(page.contains("1 dead letters"), "{page}");
    assert!(
        page.contains("data-api=\"/v1/mq/topics/orders/groups/mailer/dlq/redrive\""),
        "{page}"
    );
    assert!(
        page.contains("&lt;b&gt;poison&lt;/b&gt;"),
        "escaped: {page}"
    );
    assert!(!page.contains("hunter2"), "masked: {page}");

    // What the button calls; then the page shows no dead letter.
    let r = raw(
        addr,
        b"POST /v1/mq/topics/orders/groups/mailer/dlq/redrive HTTP/1.1\r\nHost: console\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .await;
    assert_eq!(status_of(&r), 200, "{r}");
    let page = get(addr, "/ui/queues/orders?fragment=1").await;
    assert!(page.contains("No dead letters."), "{page}");
    assert!(!page.contains("<html"), "a fragment is the content alone");

    let missing = get(addr, "/ui/queues/nope").await;
    assert!(missing.contains("class=\"error\""), "{missing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_broker_says_so() {
    let (addr, _keep) = serve(None).await;
    let page = get(addr, "/ui/queues").await;
    assert!(page.contains("does not run the message broker"), "{page}");
    assert!(
        page.contains("href=\"/ui/queues\""),
        "in the navigation: {page}"
    );
}
