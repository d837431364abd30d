//! SIGKILL durability (its own harness: `harness = false`): a child process publishes
//! (some messages delayed), prepares and resolves half messages, and consumes with acks on
//! a real broker directory, and reports each acknowledged publish, prepare, rollback, ack
//! about to be sent and ack answered on stdout; the test kills it with SIGKILL at a random
//! point, reopens the directory and checks that every acknowledged publish is there at its
//! offset, every prepared half message is still pending or resolved as the child meant,
//! offsets never go backwards, nothing the child acked is delivered again, and everything
//! else is delivered (delayed ones included) — over many rounds on the same directory.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use meshwork_mq::{
    Broker, BrokerConfig, GroupConfig, HalfDecision, HalfOutcome, NewMessage, StartAt, TopicConfig,
};

const ROUNDS: u64 = 20;

fn group() -> GroupConfig {
    GroupConfig {
        start: StartAt::Earliest,
        ack_wait_ms: 300,
        max_deliveries: 1000,
        ..GroupConfig::default()
    }
}

fn report(out: &parking_lot::Mutex<std::io::Stdout>, what: &str, items: &[(u32, u64)]) {
    let mut o = out.lock();
    for (p, off) in items {
        writeln!(o, "{what} {p} {off} -").expect("stdout");
    }
    o.flush().expect("flush");
}

/// Small segments and journal checkpoints, so the rounds cross both often.
fn config() -> BrokerConfig {
    BrokerConfig {
        segment_bytes: 256 * 1024,
        max_message_bytes: 64 * 1024,
        journal_checkpoint_bytes: 64 * 1024,
        ..BrokerConfig::default()
    }
}

/// This file is its own test harness (`harness = false`): the same binary is the test
/// and, started again with `MQ_CRASH_DIR` set, the child it kills.
fn main() {
    match (
        std::env::var("MQ_CRASH_DIR"),
        std::env::var("MQ_CRASH_ROUND"),
    ) {
        (Ok(dir), Ok(round)) => child(dir, round),
        _ => {
            sigkill_rounds();
            println!("test sigkill_rounds ... ok");
        }
    }
}

/// The child's work: publish and consume until killed.
fn child(dir: String, round: String) {
    let round: u64 = round.parse().expect("round");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let b = Broker::open(&dir, config()).expect("open");
        b.create_topic(
            "t",
            TopicConfig {
                partitions: 3,
                ..TopicConfig::default()
            },
        )
        .await
        .expect("topic");
        b.create_group("t", "g", group()).await.expect("group");
        let out = std::sync::Arc::new(parking_lot::Mutex::new(std::io::stdout()));
        let mut tasks = Vec::new();
        for p in 0..6u64 {
            let (b, out) = (b.clone(), out.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let id = (round << 40) | (p << 32) | (i + 1);
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .expect("clock")
                        .as_millis() as u64;
                    let m = NewMessage {
                        id,
                        key: if i % 2 == 0 {
                            Bytes::from(format!("k{p}"))
                        } else {
                            Bytes::new()
                        },
                        body: Bytes::from(format!("{id}")),
                        deliver_at_ms: if i % 7 == 3 { now + 400 } else { 0 },
                        ..NewMessage::default()
                    };
                    let r = b.publish("t", vec![m]).await.expect("publish")[0];
                    let mut o = out.lock();
                    writeln!(o, "P {} {} {id}", r.partition, r.offset).expect("stdout");
                    o.flush().expect("flush");
                }
            }));
        }
        // Half messages: "H" once prepared (durable), then "R" once rolled back or "P"
        // once committed (published, at its place).
        {
            let (b, out) = (b.clone(), out.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0u64.. {
                    let id = (round << 40) | (7 << 32) | (i + 1);
                    let m = NewMessage {
                        id,
                        body: Bytes::from(format!("{id}")),
                        ..NewMessage::default()
                    };
                    b.prepare_half("t", "producer", m).await.expect("prepare");
                    writeln!(out.lock(), "H 0 0 {id}").expect("stdout");
                    if i % 3 == 0 {
                        b.resolve_half(id, HalfDecision::Rollback)
                            .await
                            .expect("rollback");
                        writeln!(out.lock(), "R 0 0 {id}").expect("stdout");
                    } else {
                        let r = b
                            .resolve_half(id, HalfDecision::Commit)
                            .await
                            .expect("commit");
                        let HalfOutcome::Committed { partition, offset } = r else {
                            panic!("commit answered {r:?}");
                        };
                        writeln!(out.lock(), "P {partition} {offset} {id}").expect("stdout");
                    }
                    out.lock().flush().expect("flush");
                }
            }));
        }
        for _ in 0..2 {
            let (b, out) = (b.clone(), out.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let d = b
                        .fetch("t", "g", 16, Duration::from_millis(200))
                        .await
                        .expect("fetch");
                    let items: Vec<(u32, u64)> =
                        d.iter().map(|x| (x.partition, x.offset)).collect();
                    // "S": the ack is about to be sent; "A": it was answered (durable).
                    report(&out, "S", &items);
                    b.ack("t", "g", &items).await.expect("ack");
                    report(&out, "A", &items);
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

fn sigkill_rounds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut high: BTreeMap<u32, u64> = BTreeMap::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 1..=ROUNDS {
        let mut child = Command::new(&exe)
            .env("MQ_CRASH_DIR", dir.path())
            .env("MQ_CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let kill_after = 200 + (seed % 1500) as usize;
        let stdout = child.stdout.take().expect("stdout");
        let mut published: BTreeMap<u64, (u32, u64)> = BTreeMap::new();
        let mut sent: BTreeSet<(u32, u64)> = BTreeSet::new();
        let mut acked: BTreeSet<(u32, u64)> = BTreeSet::new();
        let mut halves: BTreeSet<u64> = BTreeSet::new();
        let mut lines = 0usize;
        let mut killed = false;
        let started = Instant::now();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() != 4 || !matches!(f[0], "P" | "S" | "A" | "H" | "R") {
                continue;
            }
            let (p, o): (u32, u64) = (f[1].parse().expect("p"), f[2].parse().expect("o"));
            match f[0] {
                "P" => {
                    published.insert(f[3].parse().expect("id"), (p, o));
                }
                "S" => {
                    sent.insert((p, o));
                }
                "A" => {
                    acked.insert((p, o));
                }
                "H" => {
                    halves.insert(f[3].parse().expect("id"));
                }
                "R" => {
                    let id: u64 = f[3].parse().expect("id");
                    assert!(halves.contains(&id), "rolled back before prepared: {id}");
                }
                _ => {}
            }
            lines += 1;
            if !killed && (lines >= kill_after || started.elapsed() > Duration::from_secs(60)) {
                #[allow(unsafe_code)]
                // SAFETY: plain syscall on a process we started and have not reaped.
                unsafe {
                    libc::kill(child.id() as i32, libc::SIGKILL);
                }
                // Read on to the end: the child ran on until the signal landed, and
                // what it reported meanwhile (an "S" for an ack it then sent, say) is
                // in the pipe. Stopping here would blame the broker for an ack the
                // test never read.
                killed = true;
            }
        }
        let _ = child.wait();
        assert!(
            !published.is_empty(),
            "round {round}: the child published nothing"
        );

        rt.block_on(async {
            let b = Broker::open(dir.path(), config()).expect("reopen");
            let info = b.topic_info("t").expect("topic");
            // Every acknowledged publish is there, at its offset.
            for (&id, &(p, o)) in &published {
                let got = b.read("t", p, o, 1).expect("read acked publish");
                assert_eq!(
                    got[0].message.id, id,
                    "round {round}: partition {p} offset {o}"
                );
                assert_eq!(got[0].message.body, id.to_string());
            }
            // Every prepared half message survived: a rolled back one stays so, a
            // committed one answers its place, and one the kill caught in between
            // commits now (deduplicated if its publish was written before the kill).
            for &id in &halves {
                // The child rolls back every third (one the kill caught before its "R"
                // may be either pending or rolled back: rolling back answers the same).
                if ((id & 0xffff_ffff) - 1) % 3 == 0 {
                    assert_eq!(
                        b.resolve_half(id, HalfDecision::Rollback).await,
                        Ok(HalfOutcome::RolledBack),
                        "round {round}: half {id}"
                    );
                    continue;
                }
                let r = b.resolve_half(id, HalfDecision::Commit).await;
                match (published.get(&id), r) {
                    (Some(&(partition, offset)), r) => assert_eq!(
                        r,
                        Ok(HalfOutcome::Committed { partition, offset }),
                        "round {round}: committed half {id}"
                    ),
                    (None, Ok(HalfOutcome::Committed { partition, offset })) => {
                        let got = b.read("t", partition, offset, 1).expect("read");
                        assert_eq!(got[0].message.id, id, "round {round}: half {id}");
                    }
                    (None, r) => panic!("round {round}: prepared half {id}: {r:?}"),
                }
            }
            // Offsets never go backwards.
            for (p, part) in info.partitions.iter().enumerate() {
                let h = high.entry(p as u32).or_insert(0);
                assert!(
                    part.end >= *h,
                    "round {round}: partition {p} end {} < {}",
                    part.end,
                    *h
                );
                *h = part.end;
            }
            // Drain the group: nothing acked comes back; every acknowledged publish the
            // child never sent an ack for arrives (delayed ones when due). One whose ack
            // was sent but not answered before the kill may go either way.
            let mut want: BTreeSet<(u32, u64)> = published
                .values()
                .copied()
                .filter(|x| !sent.contains(x))
                .collect();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let d = b
                    .fetch("t", "g", 1000, Duration::from_millis(300))
                    .await
                    .expect("fetch");
                for x in &d {
                    assert!(
                        !acked.contains(&(x.partition, x.offset)),
                        "round {round}: acked {}/{} delivered again",
                        x.partition,
                        x.offset
                    );
                    want.remove(&(x.partition, x.offset));
                }
                let items: Vec<(u32, u64)> = d.iter().map(|x| (x.partition, x.offset)).collect();
                b.ack("t", "g", &items).await.expect("ack");
                let g = b.group_info("t", "g").expect("group");
                if want.is_empty() && g.backlog == 0 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "round {round}: {} acknowledged publishes never delivered; group {g:?}",
                    want.len()
                );
            }
            b.close();
        });
    }
}
