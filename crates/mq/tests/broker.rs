//! The broker engine over real files: publish and read, recovery, retention, dedup and
//! consumer groups (acks, deadlines, nacks, dead letters, filters, delays), with a manual
//! clock for every deadline.

use std::time::Duration;

use bytes::Bytes;
use meshwork_mq::{
    Broker, BrokerConfig, Clock, GroupConfig, MqError, NewMessage, StartAt, TopicConfig,
};

const T0: u64 = 1_700_000_000_000;

fn cfg(clock: &Clock) -> BrokerConfig {
    BrokerConfig {
        clock: clock.clone(),
        ..BrokerConfig::default()
    }
}

fn msg(body: &str) -> NewMessage {
    NewMessage {
        body: Bytes::from(body.to_string()),
        ..NewMessage::default()
    }
}

fn bodies(d: &[meshwork_mq::Delivery]) -> Vec<String> {
    d.iter()
        .map(|d| String::from_utf8_lossy(&d.message.body).into_owned())
        .collect()
}

fn one_partition() -> TopicConfig {
    TopicConfig {
        partitions: 1,
        ..TopicConfig::default()
    }
}

#[tokio::test]
async fn publish_read_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::manual(T0);
    let b = Broker::open(dir.path(), cfg(&clock)).expect("open");
    b.create_topic(
        "orders",
        TopicConfig {
            partitions: 3,
            ..TopicConfig::default()
        },
    )
    .await
    .expect("create");
    // Same settings: a no-op; different: refused.
    b.create_topic(
        "orders",
        TopicConfig {
            partitions: 3,
            ..TopicConfig::default()
        },
    )
    .await
    .expect("again");
    assert!(matches!(
        b.create_topic("orders", one_partition()).await,
        Err(MqError::TopicExists(_))
    ));

    let mut keyed = Vec::new();
    for i in 0..30 {
        let m = NewMessage {
            key: Bytes::from(format!("k{}", i % 5)),
            headers: vec![("n".into(), Bytes::from(i.to_string()))],
            tag: "t".into(),
            ..msg(&format!("m{i}"))
        };
        keyed.push(b.publish("orders", vec![m]).await.expect("publish")[0]);
    }
    // One key, one partition; offsets dense per partition.
    for i in 0..30 {
        assert_eq!(keyed[i].partition, keyed[i % 5].partition);
    }
    let info = b.topic_info("orders").expect("info");
    assert_eq!(info.partitions.iter().map(|p| p.end).sum::<u64>(), 30);
    let p = keyed[0].partition;
    let got = b.read("orders", p, 0, 100).expect("read");
    assert_eq!(
        got.iter().map(|s| s.offset).collect::<Vec<_>>(),
        (0..got.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(got[0].message.body, "m0");
    assert_eq!(got[0].message.publish_ms, T0);
    assert_eq!(got[0].message.header("n").map(|v| &v[..]), Some(&b"0"[..]));
    b.close();

    let b = Broker::open(dir.path(), cfg(&clock)).expect("reopen");
    let again = b.read("orders", p, 0, 100).expect("read after reopen");
    assert_eq!(again.len(), got.len());
    let next = b
        .publish(
            "orders",
            vec![NewMessage {
                key: Bytes::from("k0"),
                ..msg("after")
            }],
        )
        .await
        .expect("publish");
    assert_eq!(next[0].offset, got.len() as u64);
    assert!(matches!(
        b.read("orders", 9, 0, 1),
        Err(MqError::NoPartition { .. })
    ));
    assert!(matches!(
        b.read("orders", p, 999, 1),
        Err(MqError::OffsetOutOfRange { .. })
    ));
}

#[tokio::test]
async fn torn_tail_is_cut_and_nothing_stale_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::manual(T0);
    let b = Broker::open(dir.path(), cfg(&clock)).expect("open");
    b.create_topic("t", one_partition()).await.expect("create");
    for i in 0..10 {
        b.publish("t", vec![msg(&format!("m{i}"))])
            .await
            .expect("publish");
    }
    b.close();
    // Damage the last record's payload: recovery keeps the nine before it.
    let seg = dir.path().join("topics/t/0/00000000000000000000.log");
    let bytes = std::fs::read(&seg).expect("read seg");
    let mut end = 0usize;
    let mut last = 0usize;
    while end + 16 <= bytes.len() {
        let len = u32::from_le_bytes([bytes[end], bytes[end + 1], bytes[end + 2], bytes[end + 3]])
            as usize;
        if len == 0 {
            break;
        }
        last = end;
        end += 16 + len;
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .expect("open seg");
    std::os::unix::fs::FileExt::write_all_at(&f, b"XX", (last + 20) as u64).expect("damage");
    drop(f);
    let b = Broker::open(dir.path(), cfg(&clock)).expect("reopen");
    assert_eq!(b.topic_info("t").expect("info").partitions[0].end, 9);
    // A shorter new record where the torn one was: the log reads back cleanly after
    // another reopen (nothing of the old tail follows it).
    b.publish("t", vec![msg("x")]).await.expect("publish");
    b.close();
    let b = Broker::open(dir.path(), cfg(&clock)).expect("reopen 2");
    let all = b.read("t", 0, 0, 100).expect("read");
    assert_eq!(all.len(), 10);
    assert_eq!(all[9].message.body, "x");
}

#[tokio::test]
async fn segments_roll_indexes_find_offsets_and_times_and_retention_drops_old_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::manual(T0);
    let config = BrokerConfig {
        segment_bytes: 128 * 1024,
        max_message_bytes: 16 * 1024,
        ..cfg(&clock)
    };
    let b = Broker::open(dir.path(), config.clone()).expect("open");
    b.create_topic(
        "big",
        TopicConfig {
            partitions: 1,
            retention_ms: 60_000,
            retention_bytes: 0,
        },
    )
    .await
    .expect("create");
    let body = "x".repeat(1000);
    for i in 0..600u64 {
        if i % 100 == 0 {
            clock.advance(Duration::from_secs(10));
        }
        b.publish(
            "big",
            vec![NewMessage {
                id: i + 1,
                ..msg(&body)
            }],
        )
        .await
        .expect("publish");
    }
    let segs = std::fs::read_dir(dir.path().join("topics/big/0"))
        .expect("dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "log"))
        })
        .count();
    assert!(segs >= 4, "expected several segments, got {segs}");
    // Reads across segment boundaries, from anywhere.
    for start in [0u64, 1, 127, 128, 129, 333, 599] {
        let got = b.read("big", 0, start, 1000).expect("read");
        assert_eq!(got.first().map(|s| s.offset), Some(start));
        assert!(got.windows(2).all(|w| w[1].offset == w[0].offset + 1));
    }
    // The 100 messages of each 10 s step: the time index finds the first of each.
    for step in 0..6u64 {
        let at = b
            .offset_for_time("big", 0, T0 + (step + 1) * 10_000)
            .expect("time");
        assert_eq!(at, step * 100);
    }
    assert_eq!(
        b.offset_for_time("big", 0, T0 + 999_000).expect("time"),
        600
    );
    b.close();
    // Sealed segments' index files load on reopen; the same answers.
    let b = Broker::open(dir.path(), config.clone()).expect("reopen");
    assert_eq!(b.offset_for_time("big", 0, T0 + 30_000).expect("time"), 200);
    // Past the retention age, old segments go (never the active one).
    clock.advance(Duration::from_secs(45));
    b.publish("big", vec![msg("tick")]).await.expect("publish");
    b.sync().await.expect("sync");
    clock.advance(Duration::from_secs(2));
    b.publish("big", vec![msg("tick")]).await.expect("publish");
    let start = b.topic_info("big").expect("info").partitions[0].start;
    assert!(start > 0, "retention removed nothing");
    assert!(matches!(
        b.read("big", 0, 0, 1),
        Err(MqError::OffsetOutOfRange { .. })
    ));
    assert_eq!(b.read("big", 0, start, 1).expect("read")[0].offset, start);
}

#[tokio::test]
async fn a_duplicate_id_inside_the_window_gets_the_first_offset_even_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::manual(T0);
    let b = Broker::open(dir.path(), cfg(&clock)).expect("open");
    b.create_topic(
        "t",
        TopicConfig {
            partitions: 4,
            ..TopicConfig::default()
        },
    )
    .await
    .expect("create");
    let first = b
        .publish("t", vec![NewMessage { id: 77, ..msg("a") }])
        .await
        .expect("publish")[0];
    assert!(!first.duplicate);
    // In one batch and in another: both the first's place.
    let again = b
        .publish(
            "t",
            vec![
                NewMessage { id: 77, ..msg("b") },
                NewMessage { id: 78, ..msg("c") },
                NewMessage { id: 78, ..msg("d") },
            ],
        )
        .await
        .expect("publish");
    assert_eq!(
        (again[0].partition, again[0].offset, again[0].duplicate),
        (first.partition, first.offset, true)
    );
    assert!(!again[1].duplicate && again[2].duplicate);
    b.close();
    let b = Broker::open(dir.path(), cfg(&clock)).expect("reopen");
    let after = b
        .publish("t", vec![NewMessage { id: 77, ..msg("e") }])
        .await
        .expect("publish")[0];
    assert_eq!(
        (after.partition, after.offset, after.duplicate),
        (first.partition, first.offset, true)
    );
    clock.advance(Duration::from_secs(121));
    let later = b
        .publish("t", vec![NewMessage { id: 77, ..msg("f") }])
        .await
        .expect("publish")[0];
    assert!(!later.duplicate);
    let total: u64 = b
        .topic_info("t")
        .expect("info")
        .partitions
        .iter()
        .map(|p| p.end)
        .sum();
    assert_eq!(total, 3);
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::manual(T0);
    let b = Broker::open(dir.path(), cfg(&clock)).expect("open");
    for bad in ["", "a/b", "..", "__x", "a b"] {
        let e = b
            .create_topic(bad, TopicConfig::default())
            .await
            .expect_err("bad name");
        assert!(matches!(e, MqError::InvalidName { .. }), "{bad}: {e}");
    }
    assert!(matches!(
        b.create_topic(
            "z",
            TopicConfig {
                partitions: 0,
                ..TopicConfig::default()
            }
        )
        .await,
        Err(MqError::Invalid(_))
    ));
    b.create_topic("t", one_partition()).await.expect("create");
    let e = b
        .publish("t", vec![msg(&"x".repeat(1024 * 1024 + 1))])
        .await
        .expect_err("oversize");
    assert!(e.to_string().contains("max_message_bytes"), "{e}");
    assert!(matches!(
        b.publish(
            "t",
            vec![NewMessage {
                priority: 10,
                ..msg("p")
            }]
        )
        .await,
        Err(MqError::Invalid(_))
    ));
    let e = b
        .publish(
            "t",
            vec![NewMessage {
                deliver_at_ms: T0 + 31 * 24 * 3600 * 1000,
                ..msg("late")
            }],
        )
        .await
        .expect_err("too far");
    assert!(e.to_string().contains("max_delay"), "{e}");
    assert!(matches!(
        b.publish("nope", vec![msg("x")]).await,
        Err(MqError::NoTopic(_))
    ));
    assert!(matches!(
        b.fetch("t", "nope", 1, Duration::ZERO).await,
        Err(MqError::NoGroup { .. })
    ));
    b.create_group("t", "g", GroupConfig::default())
        .await
        .expect("group");
    assert!(matches!(
        b.create_group(
            "t",
            "g",
            GroupConfig {
                max_deliveries: 2,
                ..GroupConfig::default()
            }
        )
        .await,
        Err(MqError::GroupExists { .. })
    ));
    let e = b
        .ack("t", "g", &[(0, 5)])
        .await
        .expect_err("unknown delivery");
    assert!(matches!(e, MqError::UnknownDelivery { .. }), "{e}");
    assert!(matches!(
        b.ack("t", "g", &[(3, 0)]).await,
        Err(MqError::NoPartition { .. })
    ));
    // The dead-letter topic is the broker's own.
    let dlq = b.group_info("t", "g").expect("info").dead_letter_topic;
    assert!(matches!(
        b.publish(&dlq, vec![msg("x")]).await,
        Err(MqError::Invalid(_))
    ));
    assert_eq!(b.topic_info("t").expect("info").partitions[0].end, 0);
}

#[tokio::test]
async fn ack_deadline_nack_and_dead_letters_then_redrive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::manual(T0);
    let b = Broker::open(dir.path(), cfg(&clock)).expect("open");
    b.create_topic("t", one_partition()).await.expect("create");
    let g = GroupConfig {
        start: StartAt::Earliest,
        ack_wait_ms: 1000,
        max_deliveries: 3,
        ..GroupConfig::default()
    };
    b.create_group("t", "g", g).await.expect("group");
    b.publish("t", vec![msg("a"), msg("b"), msg("c")])
        .await
        .expect("publish");

    let d = b.fetch("t", "g", 10, Duration::ZERO).await.expect("fetch");
    assert_eq!(bodies(&d), ["a", "b", "c"]);
    assert!(d.iter().all(|d| d.delivery == 1));
    // Out with a consumer: nothing for another.
    assert!(
        b.fetch("t", "g", 10, Duration::ZERO)
            .await
            .expect("fetch")
            .is_empty()
    );
    b.ack("t", "g", &[(0, 0)]).await.expect("ack a");
    b.ack("t", "g", &[(0, 0)])
        .await
        .expect("ack a twice is a no-op");
    b.nack("t", "g", &[(0, 1)], Duration::from_millis(500))
        .await
        .expect("nack b");
    clock.advance(Duration::from_millis(600));
    let d = b.fetch("t", "g", 10, Duration::ZERO).await.expect("fetch");
    assert_eq!((bodies(&d), d[0].delivery), (vec!["b".to_string()], 2));
    // c's deadline passes: delivered again. Extending b keeps it.
    clock.advance(Duration::from_millis(500));
    b.extend("t", "g", &[(0, 1)], None).await.expect("extend");
    let d = b.fetch("t", "g", 10, Duration::ZERO).await.expect("fetch");
    assert_eq!((bodies(&d), d[0].delivery), (vec!["c".to_string()], 2));
    let info = b.group_info("t", "g").expect("info");
    assert_eq!(
        (info.unacked, info.backlog, info.partitions[0].floor),
        (2, 2, 1)
    );
    // b and c run out of deliveries: third delivery, then the dead-letter topic.
    clock.advance(Duration::from_millis(1100));
    let d = b.fetch("t", "g", 10, Duration::ZERO).await.expect("fetch");
    assert_eq!(d.iter().map(|d| d.delivery).collect::<Vec<_>>(), [3, 3]);
    clock.advance(Duration::from_millis(1100));
    assert!(
        b.fetch("t", "g", 10, Duration::ZERO)
            .await
            .expect("fetch")
            .is_empty()
    );
    let info = b.group_info("t", "g").expect("info");
    assert_eq!((info.unacked, info.backlog, info.dead_letters), (0, 0, 2));
    let dead = b.dead_letters("t", "g", 10).expect("dlq");
    assert_eq!(
        dead.iter()
            .map(|s| s.message.body.clone())
            .collect::<Vec<_>>(),
        ["b", "c"]
    );
    assert_eq!(
        dead[0].message.header("mq-dead-offset").map(|v| &v[..]),
        Some(&b"1"[..])
    );
    assert_eq!(
        dead[0].message.header("mq-dead-deliveries").map(|v| &v[..]),
        Some(&b"3"[..])
    );

    // Redrive: back on the topic, fresh deliveries.
    assert_eq!(b.redrive("t", "g", 10).await.expect("redrive"), 2);
    assert_eq!(b.group_info("t", "g").expect("info").dead_letters, 0);
    assert!(b.dead_letters("t", "g", 10).expect("dlq").is_empty());
    let d = b.fetch("t", "g", 10, Duration::ZERO).await.expect("fetch");
    assert_eq!(bodies(&d), ["b", "c"]);
    assert!(
        d.iter()
            .all(|d| d.delivery == 1 && d.message.header("mq-redriven-from").is_some())
    );
}

#[tokio::test]
async fn group_state_survives_a_restart_and_a_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::manual(T0);
    // A tiny checkpoint threshold: every commit past it snapshots and drops the journal.
    let config = BrokerConfig {
        journal_checkpoint_bytes: 512,
        ..cfg(&clock)
    };
    let b = Broker::open(dir.path(), config.clone()).expect("open");
    b.create_topic(
        "t",
        TopicConfig {
            partitions: 2,
            ..TopicConfig::default()
        },
    )
    .await
    .expect("create");
    let g = GroupConfig {
        start: StartAt::Earliest,
        ack_wait_ms: 5000,
        max_deliveries: 4,
        ..GroupConfig::default()
    };
    b.create_group("t", "g", g.clone()).await.expect("group");
    let msgs: Vec<NewMessage> = (0..200).map(|i| msg(&format!("m{i}"))).collect();
    b.publish("t", msgs).await.expect("publish");
    let d = b.fetch("t", "g", 150, Duration::ZERO).await.expect("fetch");
    assert_eq!(d.len(), 150);
    // Ack the even ones, one at a time (many journal records, several snapshots).
    for x in d.iter().filter(|x| x.offset % 2 == 0) {
        b.ack("t", "g", &[(x.partition, x.offset)])
            .await
            .expect("ack");
    }
    let before = b.group_info("t", "g").expect("info");
    b.close();
    assert!(dir.path().join("groups.snapshot").exists());

    let b = Broker::open(dir.path(), config).expect("reopen");
    let after = b.group_info("t", "g").expect("info");
    assert_eq!(after.partitions, before.partitions);
    assert_eq!(
        (after.backlog, after.unacked),
        (before.backlog, before.unacked)
    );
    // The unacked odd ones come back after their deadline (second delivery), then the rest.
    clock.advance(Duration::from_secs(6));
    let mut seen = std::collections::BTreeMap::new();
    loop {
        let d = b
            .fetch("t", "g", 1000, Duration::ZERO)
            .await
            .expect("fetch");
        if d.is_empty() {
            break;
        }
        for x in &d {
            assert!(seen.insert((x.partition, x.offset), x.delivery).is_none());
        }
        let acks: Vec<(u32, u64)> = d.iter().map(|x| (x.partition, x.offset)).collect();
        b.ack("t", "g", &acks).await.expect("ack");
    }
    assert_eq!(seen.len(), 125);
    assert_eq!(seen.values().filter(|&&v| v == 2).count(), 75);
    let fin = b.group_info("t", "g").expect("info");
    assert_eq!((fin.backlog, fin.unacked), (0, 0));
}

#[tokio::test]
async fn filters_delays_and_bounded_windows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::manual(T0);
    let b = Broker::open(dir.path(), cfg(&clock)).expect("open");
    b.create_topic("t", one_partition()).await.expect("create");
    b.create_group(
        "t",
        "paid",
        GroupConfig {
            start: StartAt::Earliest,
            tags: vec!["paid".into()],
            ..GroupConfig::default()
        },
    )
    .await
    .expect("group");
    b.create_group(
        "t",
        "all",
        GroupConfig {
            start: StartAt::Earliest,
            max_unacked: 10,
            max_window: 20,
            ..GroupConfig::default()
        },
    )
    .await
    .expect("group");
    let mut msgs = Vec::new();
    for i in 0..100 {
        msgs.push(NewMessage {
            tag: if i % 10 == 0 {
                "paid".into()
            } else {
                "other".into()
            },
            ..msg(&format!("m{i}"))
        });
    }
    msgs.push(NewMessage {
        deliver_at_ms: T0 + 60_000,
        tag: "paid".into(),
        ..msg("later")
    });
    b.publish("t", msgs).await.expect("publish");

    let d = b
        .fetch("t", "paid", 1000, Duration::ZERO)
        .await
        .expect("fetch");
    assert_eq!(d.len(), 10);
    assert!(d.iter().all(|x| x.message.tag == "paid"));
    b.ack(
        "t",
        "paid",
        &d.iter()
            .map(|x| (x.partition, x.offset))
            .collect::<Vec<_>>(),
    )
    .await
    .expect("ack");
    // The delayed one is not due yet, and holds no consumer slot.
    assert!(
        b.fetch("t", "paid", 1000, Duration::ZERO)
            .await
            .expect("fetch")
            .is_empty()
    );
    assert_eq!(b.group_info("t", "paid").expect("info").backlog, 1);
    b.close();
    let b = Broker::open(dir.path(), cfg(&clock)).expect("reopen");
    clock.advance(Duration::from_secs(61));
    let d = b
        .fetch("t", "paid", 1000, Duration::ZERO)
        .await
        .expect("fetch");
    assert_eq!(bodies(&d), ["later"]);

    // A group with 10 unacked at most: never more out at once.
    let d = b
        .fetch("t", "all", 1000, Duration::ZERO)
        .await
        .expect("fetch");
    assert_eq!(d.len(), 10);
    assert!(
        b.fetch("t", "all", 1000, Duration::ZERO)
            .await
            .expect("fetch")
            .is_empty()
    );
    // Ack all but the first: the window (20) bounds how far reading runs ahead of it.
    b.ack(
        "t",
        "all",
        &d[1..]
            .iter()
            .map(|x| (x.partition, x.offset))
            .collect::<Vec<_>>(),
    )
    .await
    .expect("ack");
    let d2 = b
        .fetch("t", "all", 1000, Duration::ZERO)
        .await
        .expect("fetch");
    b.ack(
        "t",
        "all",
        &d2.iter()
            .map(|x| (x.partition, x.offset))
            .collect::<Vec<_>>(),
    )
    .await
    .expect("ack");
    let d3 = b
        .fetch("t", "all", 1000, Duration::ZERO)
        .await
        .expect("fetch");
    let info = b.group_info("t", "all").expect("info");
    assert!(
        info.partitions[0].next - info.partitions[0].floor <= 20,
        "{info:?}"
    );
    assert_eq!(d.len() + d2.len() + d3.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_fetch_wakes_on_publish_and_many_publishers_commit_in_groups() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = Broker::open(dir.path(), BrokerConfig::default()).expect("open");
    b.create_topic(
        "t",
        TopicConfig {
            partitions: 4,
            ..TopicConfig::default()
        },
    )
    .await
    .expect("create");
    b.create_group("t", "g", GroupConfig::default())
        .await
        .expect("group");
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.fetch("t", "g", 1, Duration::from_secs(30)).await })
    };
    let mut pubs = Vec::new();
    for p in 0..32 {
        let b = b.clone();
        pubs.push(tokio::spawn(async move {
            for i in 0..20 {
                b.publish(
                    "t",
                    vec![NewMessage {
                        id: p * 1000 + i + 1,
                        ..msg("x")
                    }],
                )
                .await
                .expect("publish");
            }
        }));
    }
    for p in pubs {
        p.await.expect("publisher");
    }
    let got = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("woken")
        .expect("join")
        .expect("fetch");
    assert_eq!(got.len(), 1);
    let total: u64 = b
        .topic_info("t")
        .expect("info")
        .partitions
        .iter()
        .map(|p| p.end)
        .sum();
    assert_eq!(total, 640);
}

#[tokio::test]
async fn ordered_groups_keep_one_message_per_key_out_and_a_poison_message_does_not_block_its_key() {
    use meshwork_mq::GroupMode;
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::manual(T0);
    let b = Broker::open(dir.path(), cfg(&clock)).expect("open");
    b.create_topic(
        "t",
        TopicConfig {
            partitions: 2,
            ..TopicConfig::default()
        },
    )
    .await
    .expect("create");
    let g = GroupConfig {
        mode: GroupMode::Ordered,
        start: StartAt::Earliest,
        ack_wait_ms: 1000,
        max_deliveries: 2,
        ..GroupConfig::default()
    };
    b.create_group("t", "g", g).await.expect("group");
    let keyed = |k: &str, body: &str| NewMessage {
        key: Bytes::from(k.to_string()),
        ..msg(body)
    };
    b.publish(
        "t",
        vec![
            keyed("A", "a1"),
            keyed("B", "b1"),
            keyed("A", "a2"),
            msg("u1"),
            keyed("B", "b2"),
            keyed("A", "a3"),
        ],
    )
    .await
    .expect("publish");

    let take = |d: &[meshwork_mq::Delivery]| {
        let mut v = bodies(d);
        v.sort();
        v
    };
    let d = b.fetch("t", "g", 10, Duration::ZERO).await.expect("fetch");
    assert_eq!(take(&d), ["a1", "b1", "u1"]);
    let at = |name: &str, d: &[meshwork_mq::Delivery]| {
        let x = d
            .iter()
            .find(|x| x.message.body == name.as_bytes())
            .expect("delivered");
        (x.partition, x.offset)
    };
    let (a1, b1, u1) = (at("a1", &d), at("b1", &d), at("u1", &d));
    assert!(
        b.fetch("t", "g", 10, Duration::ZERO)
            .await
            .expect("fetch")
            .is_empty(),
        "a key's next waits"
    );
    b.ack("t", "g", &[a1, u1]).await.expect("ack a1 and u1");
    let d = b.fetch("t", "g", 10, Duration::ZERO).await.expect("fetch");
    assert_eq!(take(&d), ["a2"]);
    let a2 = at("a2", &d);

    // Restart with a2 out and a3 waiting: a3 still waits for a2.
    b.close();
    let b = Broker::open(dir.path(), cfg(&clock)).expect("reopen");
    assert!(
        b.fetch("t", "g", 10, Duration::ZERO)
            .await
            .expect("fetch")
            .is_empty()
    );
    clock.advance(Duration::from_millis(1100));
    let d = b.fetch("t", "g", 10, Duration::ZERO).await.expect("fetch");
    // a2 and b1 again (their deadlines passed); not a3, not b2.
    assert_eq!(take(&d), ["a2", "b1"]);
    assert!(d.iter().all(|x| x.delivery == 2));
    b.ack("t", "g", &[a2]).await.expect("ack a2");
    // b1 is poison: out of deliveries it goes to the dead letters, and b2 goes on.
    clock.advance(Duration::from_millis(1100));
    let d = b.fetch("t", "g", 10, Duration::ZERO).await.expect("fetch");
    assert_eq!(take(&d), ["a3", "b2"]);
    let dead = b.dead_letters("t", "g", 10).expect("dlq");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.body, "b1");
    assert_eq!(
        b1.1,
        dead[0]
            .message
            .header("mq-dead-offset")
            .map(|v| String::from_utf8_lossy(v).parse::<u64>().expect("offset"))
            .expect("header")
    );
    let items: Vec<(u32, u64)> = d.iter().map(|x| (x.partition, x.offset)).collect();
    b.ack("t", "g", &items).await.expect("ack");
    assert_eq!(b.group_info("t", "g").expect("info").backlog, 0);
}

#[tokio::test]
async fn higher_priority_goes_first_and_aging_keeps_low_priority_from_starving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::manual(T0);
    let b = Broker::open(dir.path(), cfg(&clock)).expect("open");
    b.create_topic("t", one_partition()).await.expect("create");
    b.create_group(
        "t",
        "g",
        GroupConfig {
            start: StartAt::Earliest,
            ..GroupConfig::default()
        },
    )
    .await
    .expect("group");
    let prio = |p: u8, body: &str| NewMessage {
        priority: p,
        ..msg(body)
    };
    b.publish(
        "t",
        vec![
            prio(0, "low1"),
            prio(9, "high"),
            prio(5, "mid"),
            prio(0, "low2"),
        ],
    )
    .await
    .expect("publish");
    let mut order = Vec::new();
    for _ in 0..2 {
        let d = b.fetch("t", "g", 1, Duration::ZERO).await.expect("fetch");
        order.extend(bodies(&d));
        b.ack("t", "g", &[(d[0].partition, d[0].offset)])
            .await
            .expect("ack");
    }
    // The rest after a restart: still in priority order.
    b.close();
    let b = Broker::open(dir.path(), cfg(&clock)).expect("reopen");
    for _ in 0..2 {
        let d = b.fetch("t", "g", 1, Duration::ZERO).await.expect("fetch");
        order.extend(bodies(&d));
        b.ack("t", "g", &[(d[0].partition, d[0].offset)])
            .await
            .expect("ack");
    }
    assert_eq!(order, ["high", "mid", "low1", "low2"]);

    // Aging: one priority level is worth a second of waiting (the default).
    b.publish("t", vec![prio(0, "old-low")])
        .await
        .expect("publish");
    clock.advance(Duration::from_secs(5));
    b.publish("t", vec![prio(9, "high-5s-later")])
        .await
        .expect("publish");
    clock.advance(Duration::from_secs(5));
    b.publish("t", vec![prio(9, "high-10s-later")])
        .await
        .expect("publish");
    let d = b.fetch("t", "g", 3, Duration::ZERO).await.expect("fetch");
    assert_eq!(bodies(&d), ["high-5s-later", "old-low", "high-10s-later"]);
}

#[tokio::test]
async fn review_regressions_stall_at_max_unacked_read_ahead_acks_dead_letter_names_and_bounds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::manual(T0);
    let b = Broker::open(dir.path(), cfg(&clock)).expect("open");
    b.create_topic("t", one_partition()).await.expect("create");
    let g = GroupConfig {
        start: StartAt::Earliest,
        ack_wait_ms: 1000,
        max_unacked: 3,
        ..GroupConfig::default()
    };
    b.create_group("t", "g", g).await.expect("group");
    let msgs: Vec<NewMessage> = (0..100).map(|i| msg(&format!("m{i}"))).collect();
    b.publish("t", msgs).await.expect("publish");
    // A consumer takes the group's 3 and dies; with a backlog of fresh messages due
    // ahead of them, small fetches must still find the expired ones.
    assert_eq!(
        b.fetch("t", "g", 3, Duration::ZERO)
            .await
            .expect("fetch")
            .len(),
        3
    );
    assert!(
        b.fetch("t", "g", 1, Duration::ZERO)
            .await
            .expect("fetch")
            .is_empty()
    );
    clock.advance(Duration::from_millis(1100));
    let d = b.fetch("t", "g", 1, Duration::ZERO).await.expect("fetch");
    assert_eq!(
        (d.len(), d[0].delivery),
        (1, 2),
        "an expired delivery goes again"
    );
    // Read ahead but never handed out: not ackable.
    let e = b
        .ack("t", "g", &[(0, 50)])
        .await
        .expect_err("never delivered");
    assert!(matches!(e, MqError::UnknownDelivery { .. }), "{e}");
    // Bounds on nack delays and extensions.
    assert!(matches!(
        b.nack("t", "g", &[(0, 0)], Duration::from_secs(31 * 24 * 3600))
            .await,
        Err(MqError::Invalid(_))
    ));
    assert!(matches!(
        b.extend("t", "g", &[(0, 0)], Some(Duration::from_secs(13 * 3600)))
            .await,
        Err(MqError::Invalid(_))
    ));
    // The broker's own groups are not reachable through the public calls.
    let e = b
        .fetch("t", "__redrive", 1, Duration::ZERO)
        .await
        .expect_err("internal");
    assert!(matches!(e, MqError::Invalid(_)), "{e}");

    // (topic "a.b", group "c") and (topic "a", group "b.c") get different dead letters.
    b.create_topic("a.b", one_partition())
        .await
        .expect("create");
    b.create_topic(
        "a",
        TopicConfig {
            retention_ms: 1000,
            ..one_partition()
        },
    )
    .await
    .expect("create");
    b.create_group("a.b", "c", GroupConfig::default())
        .await
        .expect("group");
    b.create_group("a", "b.c", GroupConfig::default())
        .await
        .expect("group");
    let (x, y) = (
        b.group_info("a.b", "c").expect("info"),
        b.group_info("a", "b.c").expect("info"),
    );
    assert_ne!(x.dead_letter_topic, y.dead_letter_topic);
}

#[tokio::test]
async fn broadcast_groups_give_every_consumer_every_message_with_its_own_acks() {
    use meshwork_mq::GroupMode;
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::manual(T0);
    let b = Broker::open(dir.path(), cfg(&clock)).expect("open");
    b.create_topic(
        "t",
        TopicConfig {
            partitions: 2,
            ..TopicConfig::default()
        },
    )
    .await
    .expect("create");
    let g = GroupConfig {
        mode: GroupMode::Broadcast,
        ack_wait_ms: 1000,
        ..GroupConfig::default()
    };
    b.create_group("t", "cache", g).await.expect("group");
    // Fetching the group itself, or a consumer of a group that is not broadcast: refused.
    assert!(matches!(
        b.fetch("t", "cache", 10, Duration::ZERO).await,
        Err(MqError::Invalid(_))
    ));
    b.create_group("t", "plain", GroupConfig::default())
        .await
        .expect("group");
    assert!(matches!(
        b.fetch("t", "plain/x", 10, Duration::ZERO).await,
        Err(MqError::Invalid(_))
    ));
    assert!(matches!(
        b.fetch("t", "cache/bad name", 10, Duration::ZERO).await,
        Err(MqError::InvalidName { .. })
    ));

    // Two consumers join (start: latest, at their first fetch), then messages come.
    assert!(
        b.fetch("t", "cache/a", 10, Duration::ZERO)
            .await
            .expect("fetch")
            .is_empty()
    );
    assert!(
        b.fetch("t", "cache/b", 10, Duration::ZERO)
            .await
            .expect("fetch")
            .is_empty()
    );
    b.publish("t", (0..6).map(|i| msg(&format!("m{i}"))).collect())
        .await
        .expect("publish");
    let mut da = bodies(
        &b.fetch("t", "cache/a", 10, Duration::ZERO)
            .await
            .expect("fetch"),
    );
    da.sort();
    assert_eq!(da, ["m0", "m1", "m2", "m3", "m4", "m5"]);
    let dbb = b
        .fetch("t", "cache/b", 10, Duration::ZERO)
        .await
        .expect("fetch");
    assert_eq!(dbb.len(), 6);
    // b acks; a does not: only a's come back after the deadline.
    let items: Vec<(u32, u64)> = dbb.iter().map(|x| (x.partition, x.offset)).collect();
    b.ack("t", "cache/b", &items).await.expect("ack");
    let info = b.group_info("t", "cache").expect("info");
    assert_eq!(
        (info.consumers.len(), info.unacked, info.backlog),
        (2, 6, 6),
        "{info:?}"
    );
    b.close();
    let b = Broker::open(dir.path(), cfg(&clock)).expect("reopen");
    clock.advance(Duration::from_millis(1100));
    assert!(
        b.fetch("t", "cache/b", 10, Duration::ZERO)
            .await
            .expect("fetch")
            .is_empty()
    );
    let again = b
        .fetch("t", "cache/a", 10, Duration::ZERO)
        .await
        .expect("fetch");
    assert_eq!(again.len(), 6);
    assert!(again.iter().all(|x| x.delivery == 2));
    assert_eq!(b.group_info("t", "cache/b").expect("info").backlog, 0);
    // A consumer that joins later starts at that point.
    b.publish("t", vec![msg("late")]).await.expect("publish");
    assert!(
        b.fetch("t", "cache/c", 10, Duration::ZERO)
            .await
            .expect("fetch")
            .is_empty()
    );
}

/// Without fsync a lone publish is written by its own task (the committer idle), many at
/// once go through the committer's queue: either way every publish gets its own dense
/// offset, groups see them, and a reopen finds them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fsync_lone_and_concurrent_publishes_all_land() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = BrokerConfig {
        fsync: false,
        ..BrokerConfig::default()
    };
    let b = Broker::open(dir.path(), cfg.clone()).expect("open");
    b.create_topic("t", one_partition()).await.expect("create");
    let g = GroupConfig {
        start: StartAt::Earliest,
        ..GroupConfig::default()
    };
    b.create_group("t", "g", g).await.expect("group");
    for i in 0..50 {
        let p = b
            .publish("t", vec![msg(&format!("lone{i}"))])
            .await
            .expect("publish");
        assert_eq!(p[0].offset, i);
    }
    let mut tasks = Vec::new();
    for w in 0..8 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let mut offsets = Vec::new();
            for i in 0..100 {
                let p = b
                    .publish("t", vec![msg(&format!("w{w}-{i}"))])
                    .await
                    .expect("publish");
                offsets.push(p[0].offset);
            }
            offsets
        }));
    }
    let mut all: Vec<u64> = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all.sort_unstable();
    assert_eq!(all, (50..850).collect::<Vec<u64>>());
    let mut got = 0;
    loop {
        let d = b
            .fetch("t", "g", 1000, Duration::ZERO)
            .await
            .expect("fetch");
        if d.is_empty() {
            break;
        }
        got += d.len();
        let items: Vec<(u32, u64)> = d.iter().map(|d| (d.partition, d.offset)).collect();
        b.ack("t", "g", &items).await.expect("ack");
    }
    assert_eq!(got, 850);
    b.close();
    let b = Broker::open(dir.path(), cfg).expect("reopen");
    let info = b.topic_info("t").expect("topic");
    assert_eq!(info.partitions[0].end, 850);
    let last = b.read("t", 0, 849, 1).expect("read");
    assert!(String::from_utf8_lossy(&last[0].message.body).starts_with('w'));
    assert_eq!(b.group_info("t", "g").expect("group").backlog, 0);
}
