//! Half (transactional) messages in the engine, over real files with a manual clock:
//! invisible until committed, idempotent resolutions, check-backs due on time and rolled
//! back after the last one, the pending set rebuilt after a restart, limits refused.

use std::time::Duration;

use bytes::Bytes;
use meshwork_mq::{
    Broker, BrokerConfig, Clock, GroupConfig, HalfDecision, HalfOutcome, MqError, NewMessage,
    StartAt, TopicConfig,
};

const T0: u64 = 1_700_000_000_000;

fn cfg(clock: &Clock) -> BrokerConfig {
    BrokerConfig {
        clock: clock.clone(),
        half_check_after: Duration::from_secs(10),
        half_check_interval: Duration::from_secs(30),
        half_max_checks: 2,
        max_half_pending: 4,
        ..BrokerConfig::default()
    }
}

fn msg(id: u64, body: &str) -> NewMessage {
    NewMessage {
        id,
        key: Bytes::from_static(b"order-7"),
        tag: "confirmed".into(),
        headers: vec![("trace".into(), Bytes::from_static(b"abc"))],
        body: Bytes::from(body.to_string()),
        ..NewMessage::default()
    }
}

async fn setup(dir: &std::path::Path, clock: &Clock) -> Broker {
    let b = Broker::open(dir, cfg(clock)).expect("open");
    b.create_topic(
        "orders",
        TopicConfig {
            partitions: 2,
            ..TopicConfig::default()
        },
    )
    .await
    .expect("topic");
    b.create_group(
        "orders",
        "mail",
        GroupConfig {
            start: StartAt::Earliest,
            ..GroupConfig::default()
        },
    )
    .await
    .expect("group");
    b
}

async fn bodies(b: &Broker) -> Vec<String> {
    let d = b
        .fetch("orders", "mail", 100, Duration::ZERO)
        .await
        .expect("fetch");
    let items: Vec<(u32, u64)> = d.iter().map(|d| (d.partition, d.offset)).collect();
    if !items.is_empty() {
        b.ack("orders", "mail", &items).await.expect("ack");
    }
    d.iter()
        .map(|d| String::from_utf8_lossy(&d.message.body).into_owned())
        .collect()
}

#[tokio::test]
async fn a_half_message_is_invisible_until_committed_and_resolutions_are_idempotent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::manual(T0);
    let b = setup(dir.path(), &clock).await;

    let h = b
        .prepare_half("orders", "order-svc", msg(11, "paid"))
        .await
        .expect("prepare");
    assert_eq!(
        (h.id, h.topic.as_str(), h.producer.as_str()),
        (11, "orders", "order-svc")
    );
    assert_eq!(h.next_check_ms, T0 + 10_000);
    // Prepared again: the same half message, nothing new.
    assert_eq!(
        b.prepare_half("orders", "order-svc", msg(11, "paid"))
            .await
            .expect("again"),
        h
    );
    b.prepare_half("orders", "order-svc", msg(12, "cancelled"))
        .await
        .expect("prepare 12");
    assert!(
        bodies(&b).await.is_empty(),
        "a half message is not delivered"
    );
    assert_eq!(b.halves(10).len(), 2);
    // No group sees the broker's own topic as a topic to publish to.
    assert!(b.publish("__half", vec![msg(0, "x")]).await.is_err());

    let committed = b
        .resolve_half(11, HalfDecision::Commit)
        .await
        .expect("commit");
    let HalfOutcome::Committed { partition, offset } = committed else {
        panic!("committed: {committed:?}");
    };
    // Committing again (a producer retrying) answers the same place.
    assert_eq!(
        b.resolve_half(11, HalfDecision::Commit)
            .await
            .expect("again"),
        committed
    );
    assert!(matches!(
        b.resolve_half(11, HalfDecision::Rollback).await,
        Err(MqError::HalfResolved {
            id: 11,
            outcome: "committed"
        })
    ));
    assert!(matches!(
        b.prepare_half("orders", "order-svc", msg(11, "paid")).await,
        Err(MqError::HalfResolved { .. })
    ));
    let d = b
        .fetch("orders", "mail", 10, Duration::ZERO)
        .await
        .expect("fetch");
    assert_eq!(d.len(), 1);
    let m = &d[0].message;
    assert_eq!((d[0].partition, d[0].offset), (partition, offset));
    assert_eq!(
        (m.id, &m.body[..], m.tag.as_str(), &m.key[..]),
        (11, &b"paid"[..], "confirmed", &b"order-7"[..])
    );
    assert_eq!(
        m.headers,
        vec![("trace".to_string(), Bytes::from_static(b"abc"))]
    );
    b.ack("orders", "mail", &[(partition, offset)])
        .await
        .expect("ack");

    assert_eq!(
        b.resolve_half(12, HalfDecision::Rollback)
            .await
            .expect("rollback"),
        HalfOutcome::RolledBack
    );
    assert!(matches!(
        b.resolve_half(12, HalfDecision::Commit).await,
        Err(MqError::HalfResolved {
            id: 12,
            outcome: "rolled back"
        })
    ));
    assert!(
        bodies(&b).await.is_empty(),
        "a rolled back message never goes out"
    );
    assert!(matches!(
        b.resolve_half(99, HalfDecision::Commit).await,
        Err(MqError::NoHalf(99))
    ));
    assert!(b.halves(10).is_empty());
}

#[tokio::test]
async fn check_backs_come_due_on_time_and_the_last_one_rolls_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::manual(T0);
    let b = setup(dir.path(), &clock).await;
    b.prepare_half("orders", "order-svc", msg(21, "a"))
        .await
        .expect("prepare");
    clock.advance(Duration::from_secs(5));
    b.prepare_half("orders", "order-svc", msg(22, "b"))
        .await
        .expect("prepare");

    assert!(b.take_due_checks(10).await.expect("due").is_empty());
    clock.advance(Duration::from_secs(5));
    let due = b.take_due_checks(10).await.expect("due");
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].info.id, due[0].info.checks), (21, 1));
    // What the producer is shown is the message as it would be published.
    assert_eq!(
        (due[0].message.id, &due[0].message.body[..]),
        (21, &b"a"[..])
    );
    assert!(
        due[0]
            .message
            .headers
            .iter()
            .all(|(k, _)| !k.starts_with("mq-half-"))
    );
    // Not again before the interval.
    clock.advance(Duration::from_secs(5));
    let due = b.take_due_checks(10).await.expect("due");
    assert_eq!(due.iter().map(|c| c.info.id).collect::<Vec<_>>(), [22]);
    clock.advance(Duration::from_secs(30));
    let due = b.take_due_checks(10).await.expect("due");
    assert_eq!(
        due.iter()
            .map(|c| (c.info.id, c.info.checks))
            .collect::<Vec<_>>(),
        [(21, 2), (22, 2)]
    );
    // The producer settles 22 meanwhile; 21 has had its last check: rolled back.
    b.resolve_half(22, HalfDecision::Commit)
        .await
        .expect("commit");
    clock.advance(Duration::from_secs(30));
    assert!(b.take_due_checks(10).await.expect("due").is_empty());
    assert!(matches!(
        b.resolve_half(21, HalfDecision::Commit).await,
        Err(MqError::HalfResolved {
            id: 21,
            outcome: "rolled back"
        })
    ));
    assert_eq!(bodies(&b).await, ["b"]);
}

#[tokio::test]
async fn pending_and_resolved_half_messages_survive_a_restart_and_limits_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::manual(T0);
    {
        let b = setup(dir.path(), &clock).await;
        for id in 31..=34 {
            b.prepare_half("orders", "order-svc", msg(id, &format!("m{id}")))
                .await
                .expect("prepare");
        }
        // At mq.max_half_pending: refused, with the setting to raise.
        let full = b.prepare_half("orders", "order-svc", msg(35, "x")).await;
        assert!(
            matches!(
                full,
                Err(MqError::Limit {
                    setting: "max_half_pending",
                    ..
                })
            ),
            "{full:?}"
        );
        b.resolve_half(31, HalfDecision::Commit)
            .await
            .expect("commit");
        b.resolve_half(32, HalfDecision::Rollback)
            .await
            .expect("rollback");
        // Bad input changes nothing.
        assert!(matches!(
            b.prepare_half("orders", "order-svc", msg(0, "no id")).await,
            Err(MqError::Invalid(_))
        ));
        assert!(matches!(
            b.prepare_half("nope", "order-svc", msg(36, "x")).await,
            Err(MqError::NoTopic(_))
        ));
        assert!(matches!(
            b.prepare_half("orders", "bad name!", msg(36, "x")).await,
            Err(MqError::InvalidName { .. })
        ));
        assert!(matches!(
            b.prepare_half("orders", "order-svc", msg(33, "x")).await,
            Ok(h) if h.id == 33
        ));
        b.close();
    }
    let b = Broker::open(dir.path(), cfg(&clock)).expect("reopen");
    let mut pending: Vec<u64> = b.halves(10).iter().map(|h| h.id).collect();
    pending.sort_unstable();
    assert_eq!(pending, [33, 34]);
    assert!(matches!(
        b.resolve_half(31, HalfDecision::Commit).await,
        Ok(HalfOutcome::Committed { .. })
    ));
    assert!(matches!(
        b.resolve_half(32, HalfDecision::Commit).await,
        Err(MqError::HalfResolved { .. })
    ));
    b.resolve_half(34, HalfDecision::Commit)
        .await
        .expect("commit after restart");
    assert_eq!(bodies(&b).await.len(), 2, "31 once, 34 once");
    // Their first check is still due at prepare + check_after.
    clock.advance(Duration::from_secs(10));
    let due = b.take_due_checks(10).await.expect("due");
    assert_eq!(due.iter().map(|c| c.info.id).collect::<Vec<_>>(), [33]);
}

/// A caller that goes away mid-prepare (an HTTP client disconnecting) leaves either
/// nothing or a pending half message that can be committed — never a durable record
/// the broker does not know about until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_abandoned_by_its_caller_still_ends_pending() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::manual(T0);
    let b = setup(dir.path(), &clock).await;
    b.prepare_half("orders", "order-svc", msg(40, "first"))
        .await
        .expect("prepare");
    for id in 41..44 {
        let f = b.prepare_half("orders", "order-svc", msg(id, "abandoned"));
        tokio::select! {
            _ = f => {}
            _ = tokio::task::yield_now() => {}
        }
    }
    b.sync().await.expect("sync");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for id in 41..44 {
        // Its record reached the log (sync), so it must become pending and committable.
        let on_disk = b.read("__half", 0, 0, 100).expect("read").iter().any(|s| {
            s.message
                .header("mq-half-id")
                .is_some_and(|v| v == id.to_string().as_bytes())
        });
        if !on_disk {
            continue;
        }
        while b.half(id).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "half {id} durable but not pending"
            );
            tokio::task::yield_now().await;
        }
        assert!(matches!(
            b.resolve_half(id, HalfDecision::Commit).await,
            Ok(HalfOutcome::Committed { .. })
        ));
    }
}
