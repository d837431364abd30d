//! Durability under SIGKILL: a real `meshwork server` child is killed while many
//! clients write; after each restart every acknowledged write is there with its
//! revision, revisions are gap-free and monotonic, and a watch replays them all.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use meshwork_etcd::Client;
use meshwork_etcd::proto::etcdserverpb as pb;
use parking_lot::Mutex;
use tokio_stream::StreamExt;

const ROUNDS: usize = 20;
const WRITERS: usize = 16;

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // (key, revision) of every acknowledged put, across rounds.
    let acked: Arc<Mutex<Vec<(String, i64)>>> = Arc::new(Mutex::new(Vec::new()));
    for round in 0..ROUNDS {
        let mut server = meshwork_tests::start(dir.path(), &[], &[]);
        let ep = server.etcd.clone();
        // Everything acknowledged so far is present, before new load starts.
        rt.block_on(verify(&ep, &acked.lock().clone()));
        // Kill after a random number of acknowledged writes, while writers are mid-flight.
        let kill_after = 20 + rand::Rng::random_range(&mut rng, 0..200u64);
        let acked2 = acked.clone();
        rt.block_on(async {
            let client = Client::connect(std::slice::from_ref(&ep)).await.unwrap();
            let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let mut tasks = Vec::new();
            for w in 0..WRITERS {
                let mut kv = client.kv.clone();
                let acked = acked2.clone();
                let count = count.clone();
                tasks.push(tokio::spawn(async move {
                    for seq in 0.. {
                        let key = format!("k/{round:02}/{w:02}/{seq:05}");
                        let put = pb::PutRequest {
                            key: key.clone().into(),
                            value: format!("v{seq}").into(),
                            ..Default::default()
                        };
                        match kv.put(put).await {
                            Ok(r) => {
                                acked
                                    .lock()
                                    .push((key, r.into_inner().header.unwrap().revision));
                                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Err(_) => return,
                        }
                    }
                }));
            }
            // Wait (bounded) for the load to reach the kill point, then kill mid-flight.
            let reached = tokio::time::timeout(Duration::from_secs(60), async {
                while count.load(std::sync::atomic::Ordering::Relaxed) < kill_after {
                    tokio::task::yield_now().await;
                }
            })
            .await;
            assert!(
                reached.is_ok(),
                "round {round}: writers stalled before {kill_after} acknowledged writes"
            );
            server.kill9();
            for t in tasks {
                let _ = t.await;
            }
        });
    }
    // Final restart: full verification including gap-free revisions and watch replay.
    let server = meshwork_tests::start(dir.path(), &[], &[]);
    let acked = acked.lock().clone();
    assert!(
        acked.len() >= ROUNDS * 20,
        "the load acknowledged writes in every round"
    );
    rt.block_on(async {
        verify(&server.etcd, &acked).await;
        let mut c = Client::connect(std::slice::from_ref(&server.etcd))
            .await
            .unwrap();
        let all =
            c.kv.range(pb::RangeRequest {
                key: "k/".into(),
                range_end: "k0".into(),
                keys_only: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let current = all.header.unwrap().revision;
        let mut revs: Vec<i64> = all.kvs.iter().map(|kv| kv.mod_revision).collect();
        revs.sort_unstable();
        // Every revision 2..=current is exactly one put of a distinct key: no gaps, no duplicates,
        // nothing half-written (a write may have committed without its ack arriving; that is fine).
        assert_eq!(
            revs,
            (2..=current).collect::<Vec<_>>(),
            "revisions are gap-free and monotonic"
        );
        // A watch from the first revision replays every write in revision order.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let create = pb::WatchCreateRequest {
            key: "k/".into(),
            range_end: "k0".into(),
            start_revision: 2,
            ..Default::default()
        };
        tx.send(pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)),
        })
        .await
        .unwrap();
        let mut s = c
            .watch
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut seen = Vec::new();
        while seen.len() < revs.len() {
            let r = tokio::time::timeout(Duration::from_secs(30), s.next())
                .await
                .expect("watch replay in time")
                .unwrap()
                .unwrap();
            assert!(!r.canceled, "watch cancelled: {}", r.cancel_reason);
            seen.extend(r.events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision));
        }
        assert_eq!(seen, revs, "watch replays every revision once, in order");
        drop(tx);
    });
    drop(server);
}

async fn verify(ep: &str, acked: &[(String, i64)]) {
    if acked.is_empty() {
        return;
    }
    let mut c = Client::connect(&[ep.to_string()]).await.unwrap();
    let all =
        c.kv.range(pb::RangeRequest {
            key: "k/".into(),
            range_end: "k0".into(),
            keys_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let have: std::collections::HashMap<&[u8], i64> = all
        .kvs
        .iter()
        .map(|kv| (kv.key.as_ref(), kv.mod_revision))
        .collect();
    for (k, rev) in acked {
        assert_eq!(
            have.get(k.as_bytes()),
            Some(rev),
            "acknowledged write {k} at revision {rev} lost"
        );
    }
}

/// Remaining seconds of `id` (`-1` once it is gone), and the keys `a`, `b`
/// present.
async fn lease_left(c: &mut Client, id: i64) -> i64 {
    c.lease
        .lease_time_to_live(pb::LeaseTimeToLiveRequest { id, keys: false })
        .await
        .unwrap()
        .into_inner()
        .ttl
}

async fn present(c: &mut Client, key: &str) -> bool {
    c.kv.range(pb::RangeRequest {
        key: key.as_bytes().to_vec().into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .count
        == 1
}

/// A lease keeps its remaining time across a SIGKILL (etcd 3.4 would give it
/// a full TTL again), and one whose time ran out while the node was down is
/// revoked, with its key, before the first client read.
#[test]
fn leases_keep_their_remaining_time_across_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("meshwork.toml");
    std::fs::write(&config, "[store]\nlease_checkpoint_interval_secs = 1\n").unwrap();
    let data = dir.path().join("data");
    let args = ["--config", config.to_str().unwrap()];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut server = meshwork_tests::start(&data, &args, &[]);
    let started = std::time::Instant::now();
    let (long, short) = rt.block_on(async {
        let mut c = Client::connect(std::slice::from_ref(&server.etcd))
            .await
            .unwrap();
        let grant = |ttl| {
            let mut c = c.clone();
            async move {
                c.lease
                    .lease_grant(pb::LeaseGrantRequest { ttl, id: 0 })
                    .await
                    .unwrap()
                    .into_inner()
                    .id
            }
        };
        let long = grant(60).await;
        let short = grant(3).await;
        for (key, lease) in [("a", long), ("b", short)] {
            c.kv.put(pb::PutRequest {
                key: key.as_bytes().to_vec().into(),
                value: b"v".to_vec().into(),
                lease,
                ..Default::default()
            })
            .await
            .unwrap();
        }
        (long, short)
    });
    // Once both leases are written down, the node dies; it stays down past
    // the short lease's deadline (3 s) plus the checkpoint margin (1 s):
    // lease time is wall-clock time, so this much real time must pass.
    let written = data.join("lease-deadlines");
    meshwork_testkit::blocking::until(
        "both lease deadlines to be written",
        Duration::from_secs(10),
        || std::fs::metadata(&written).map(|m| m.len()).unwrap_or(0) >= 16 + 2 * 16 + 4,
    );
    server.kill9();
    std::thread::sleep(
        (started + Duration::from_millis(5500))
            .saturating_duration_since(std::time::Instant::now()),
    );
    let server = meshwork_tests::start(&data, &args, &[]);
    let down_for = started.elapsed().as_secs() as i64;
    rt.block_on(async {
        let mut c = Client::connect(std::slice::from_ref(&server.etcd))
            .await
            .unwrap();
        assert!(
            !present(&mut c, "b").await,
            "the expired lease's key is gone at the first read"
        );
        assert_eq!(
            lease_left(&mut c, short).await,
            -1,
            "the expired lease is revoked"
        );
        assert!(present(&mut c, "a").await);
        let left = lease_left(&mut c, long).await;
        assert!(
            left <= 60 - down_for + 2 && left >= 60 - down_for - 5,
            "the long lease resumed with its remaining time: {left} s after {down_for} s"
        );
    });
}
