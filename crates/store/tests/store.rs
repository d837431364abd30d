#![allow(clippy::unwrap_used)]
//! Integration tests of the store's public API: validation, leases, watch, group commit,
//! snapshots and the space quota.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use meshwork_store::ops::*;
use meshwork_store::{
    Alarm, Event, EventKind, KeyRange, KeyValue, Store, StoreConfig, StoreError, WatchCreateError,
    WatchMessage, WatchSpec,
};
use tokio::sync::mpsc;

/// Hang guard only: no test relies on it for timing.
const HANG_GUARD: Duration = Duration::from_secs(60);

fn fast() -> StoreConfig {
    StoreConfig {
        fsync: false,
        ..StoreConfig::default()
    }
}

fn everything() -> KeyRange {
    KeyRange::new(&b"\0"[..], &b"\0"[..])
}

fn put_req(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
        ..PutRequest::default()
    }
}

async fn put(store: &Store, key: &str, value: &str) -> i64 {
    store.put(put_req(key, value)).await.unwrap().revision
}

async fn put_leased(store: &Store, key: &str, value: &str, lease: i64) -> i64 {
    store
        .put(PutRequest {
            lease,
            ..put_req(key, value)
        })
        .await
        .unwrap()
        .revision
}

fn get_all(store: &Store) -> Vec<KeyValue> {
    store
        .range(&RangeRequest {
            range: Some(everything()),
            ..RangeRequest::default()
        })
        .unwrap()
        .kvs
}

fn keys(kvs: &[KeyValue]) -> Vec<String> {
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect()
}

fn watch_all(start_revision: i64) -> WatchSpec {
    WatchSpec {
        range: everything(),
        start_revision,
        prev_kv: false,
        no_put: false,
        no_delete: false,
        progress_notify: false,
        watch_id: 0,
    }
}

async fn next(rx: &mut mpsc::Receiver<WatchMessage>) -> WatchMessage {
    tokio::time::timeout(HANG_GUARD, rx.recv())
        .await
        .expect("no watch message within the hang guard")
        .expect("watch stream closed")
}

/// Receives exactly `n` events (across `Events` messages), failing on any other message.
async fn events(rx: &mut mpsc::Receiver<WatchMessage>, n: usize) -> Vec<Event> {
    let mut out = Vec::new();
    while out.len() < n {
        match next(rx).await {
            WatchMessage::Events {
                events, revision, ..
            } => {
                assert!(
                    events.iter().all(|e| e.kv.mod_revision <= revision),
                    "events above the message revision"
                );
                out.extend(events);
            }
            other => panic!("expected events, got {other:?}"),
        }
    }
    assert_eq!(out.len(), n, "more events than expected");
    out
}

fn assert_nothing_pending(rx: &mut mpsc::Receiver<WatchMessage>) {
    assert_eq!(rx.try_recv(), Err(mpsc::error::TryRecvError::Empty));
}

/// Keeps tokio's paused clock from auto-advancing while the store's committer (a plain
/// thread) works: a pending blocking task inhibits auto-advance. Time then moves only by
/// `tokio::time::advance`. Released on drop, or after 60 s as a hang guard.
struct ClockHold(#[allow(dead_code)] std::sync::mpsc::Sender<()>);

fn hold_clock() -> ClockHold {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    tokio::task::spawn_blocking(move || {
        let _ = rx.recv_timeout(HANG_GUARD);
    });
    ClockHold(tx)
}

// ---------------------------------------------------------------------------------------
// Validation and limits.

#[tokio::test]
async fn invalid_requests_fail_and_leave_state_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        max_key_bytes: 16,
        max_value_bytes: 1024,
        ..fast()
    };
    let store = Store::open(dir.path(), cfg).unwrap();
    put(&store, "a", "1").await;
    put(&store, "ab", "2").await;
    put(&store, "b", "3").await;
    let (lease, _, _) = store.lease_grant(5, 60).await.unwrap();
    let before = (store.revision(), get_all(&store), store.lease_list());
    let unchanged = |what: &str| {
        assert_eq!(
            (store.revision(), get_all(&store), store.lease_list()),
            before,
            "state changed by {what}"
        );
    };

    // Puts.
    let long_key = "k".repeat(17);
    let cases: Vec<(&str, PutRequest, StoreError)> = vec![
        ("empty key", put_req("", "v"), StoreError::EmptyKey),
        (
            "long key",
            put_req(&long_key, "v"),
            StoreError::KeyTooLarge {
                size: 17,
                limit: 16,
            },
        ),
        (
            "big value",
            put_req("a", &"v".repeat(1025)),
            StoreError::ValueTooLarge {
                size: 1025,
                limit: 1024,
            },
        ),
        (
            "ignore_value with value",
            PutRequest {
                ignore_value: true,
                ..put_req("a", "v")
            },
            StoreError::ValueProvided,
        ),
        (
            "ignore_lease with lease",
            PutRequest {
                ignore_lease: true,
                lease,
                ..put_req("a", "v")
            },
            StoreError::LeaseProvided,
        ),
        (
            "ignore_value on a missing key",
            PutRequest {
                ignore_value: true,
                ..put_req("zz", "")
            },
            StoreError::KeyNotFound,
        ),
        (
            "ignore_lease on a missing key",
            PutRequest {
                ignore_lease: true,
                ..put_req("zz", "v")
            },
            StoreError::KeyNotFound,
        ),
        (
            "unknown lease",
            PutRequest {
                lease: 999,
                ..put_req("a", "v")
            },
            StoreError::LeaseNotFound,
        ),
    ];
    for (what, req, err) in cases {
        assert_eq!(store.put(req).await, Err(err), "{what}");
        unchanged(what);
    }
    // The limits themselves are accepted.
    let at_limit = store
        .put(put_req(&"k".repeat(16), &"v".repeat(1024)))
        .await
        .unwrap();
    assert_eq!(at_limit.revision, before.0 + 1);
    store
        .delete(DeleteRequest {
            range: KeyRange::single("k".repeat(16)),
            prev_kv: false,
        })
        .await
        .unwrap();
    let before = (store.revision(), get_all(&store), store.lease_list());
    let unchanged = |what: &str| {
        assert_eq!(
            (store.revision(), get_all(&store), store.lease_list()),
            before,
            "state changed by {what}"
        );
    };

    // Ranges and deletes. An empty key is refused with or without a range end (etcd
    // 3.4's `checkRangeRequest`/`checkDeleteRequest`): `del "" x` must not delete every
    // key below `x`.
    for (what, range) in [
        ("empty key", KeyRange::single("")),
        ("empty key with an end", KeyRange::new("", "x")),
        (
            "empty key to the end of the keyspace",
            KeyRange::new("", "\0"),
        ),
        (
            "empty key with an end of 0xff",
            KeyRange::new("", vec![0xffu8]),
        ),
    ] {
        assert_eq!(
            store
                .delete(DeleteRequest {
                    range: range.clone(),
                    prev_kv: true
                })
                .await,
            Err(StoreError::EmptyKey),
            "{what}"
        );
        unchanged(what);
        let r = RangeRequest {
            range: Some(range),
            ..RangeRequest::default()
        };
        assert_eq!(store.range(&r), Err(StoreError::EmptyKey), "{what}");
    }
    assert_eq!(
        store.range(&RangeRequest::default()),
        Err(StoreError::EmptyKey)
    );
    // An end at or before the key selects nothing, as in etcd: an empty range result
    // and a delete of nothing (no new revision).
    for (what, range) in [
        ("end before key", KeyRange::new("b", "a")),
        ("end equal to key", KeyRange::new("b", "b")),
    ] {
        let d = store
            .delete(DeleteRequest {
                range: range.clone(),
                prev_kv: true,
            })
            .await
            .unwrap();
        assert_eq!((d.deleted, d.prev_kvs.len()), (0, 0), "{what}");
        unchanged(what);
        let r = store
            .range(&RangeRequest {
                range: Some(range),
                ..RangeRequest::default()
            })
            .unwrap();
        assert_eq!((r.count, r.kvs.len(), r.more), (0, 0, false), "{what}");
    }
    // A negative limit reads everything, as in etcd.
    let negative = RangeRequest {
        range: Some(everything()),
        limit: -1,
        ..RangeRequest::default()
    };
    let all = store.range(&negative).unwrap();
    assert_eq!(all.kvs.len() as i64, all.count);
    assert!(!all.more);
    let future = RangeRequest {
        range: Some(everything()),
        revision: store.revision() + 1,
        ..RangeRequest::default()
    };
    assert_eq!(store.range(&future), Err(StoreError::FutureRevision));

    // Txns.
    let puts = |n: usize| -> Vec<RequestOp> {
        (0..n)
            .map(|i| RequestOp::Put(put_req(&format!("t{i}"), "v")))
            .collect()
    };
    let cmp = |range: KeyRange| Compare {
        range,
        result: CompareResult::Equal,
        target: CompareTarget::Version(1),
    };
    let del = |range: KeyRange| {
        RequestOp::Delete(DeleteRequest {
            range,
            prev_kv: false,
        })
    };
    let with_lease = |key: &str, lease: i64| {
        RequestOp::Put(PutRequest {
            lease,
            ..put_req(key, "v")
        })
    };
    let cases: Vec<(&str, TxnRequest, StoreError)> = vec![
        (
            "129 success ops",
            TxnRequest {
                success: puts(129),
                ..TxnRequest::default()
            },
            StoreError::TooManyOps,
        ),
        (
            "129 failure ops",
            TxnRequest {
                failure: puts(129),
                ..TxnRequest::default()
            },
            StoreError::TooManyOps,
        ),
        (
            "129 compares",
            TxnRequest {
                compare: vec![cmp(KeyRange::single("a")); 129],
                success: puts(1),
                ..TxnRequest::default()
            },
            StoreError::TooManyOps,
        ),
        (
            "129 ops in a nested txn",
            TxnRequest {
                success: vec![RequestOp::Txn(TxnRequest {
                    success: puts(129),
                    ..TxnRequest::default()
                })],
                ..TxnRequest::default()
            },
            StoreError::TooManyOps,
        ),
        (
            "compare with an empty key",
            TxnRequest {
                compare: vec![cmp(KeyRange::new("", "x"))],
                success: puts(1),
                ..TxnRequest::default()
            },
            StoreError::EmptyKey,
        ),
        (
            "a delete of an empty key with an end",
            TxnRequest {
                success: vec![del(KeyRange::new("", "x"))],
                ..TxnRequest::default()
            },
            StoreError::EmptyKey,
        ),
        (
            "a range of an empty key with an end in the branch not taken",
            TxnRequest {
                compare: vec![cmp(KeyRange::single("nope"))],
                success: puts(1),
                failure: vec![RequestOp::Range(RangeRequest {
                    range: Some(KeyRange::new("", "x")),
                    ..RangeRequest::default()
                })],
            },
            StoreError::EmptyKey,
        ),
        (
            "a delete of an empty key with an end in a nested txn",
            TxnRequest {
                success: vec![RequestOp::Txn(TxnRequest {
                    success: vec![del(KeyRange::new("", "\0"))],
                    ..TxnRequest::default()
                })],
                ..TxnRequest::default()
            },
            StoreError::EmptyKey,
        ),
        (
            "the same key put twice",
            TxnRequest {
                success: vec![
                    RequestOp::Put(put_req("a", "x")),
                    RequestOp::Put(put_req("a", "y")),
                ],
                ..TxnRequest::default()
            },
            StoreError::DuplicateKey,
        ),
        (
            "a put inside a deleted range",
            TxnRequest {
                success: vec![
                    del(KeyRange::prefix("a")),
                    RequestOp::Put(put_req("ab", "x")),
                ],
                ..TxnRequest::default()
            },
            StoreError::DuplicateKey,
        ),
        (
            "a put before a delete of its key",
            TxnRequest {
                success: vec![
                    RequestOp::Put(put_req("b", "x")),
                    del(KeyRange::single("b")),
                ],
                ..TxnRequest::default()
            },
            StoreError::DuplicateKey,
        ),
        (
            "a duplicate in the branch not taken",
            TxnRequest {
                success: puts(1),
                failure: vec![
                    RequestOp::Put(put_req("a", "x")),
                    RequestOp::Put(put_req("a", "y")),
                ],
                ..TxnRequest::default()
            },
            StoreError::DuplicateKey,
        ),
        (
            "a key put by the txn and by a nested txn",
            TxnRequest {
                success: vec![
                    RequestOp::Put(put_req("a", "x")),
                    RequestOp::Txn(TxnRequest {
                        success: vec![RequestOp::Put(put_req("a", "y"))],
                        ..TxnRequest::default()
                    }),
                ],
                ..TxnRequest::default()
            },
            StoreError::DuplicateKey,
        ),
        (
            "ignore_value on a missing key",
            TxnRequest {
                success: vec![
                    RequestOp::Put(put_req("new", "x")),
                    RequestOp::Put(PutRequest {
                        ignore_value: true,
                        ..put_req("zz", "")
                    }),
                ],
                ..TxnRequest::default()
            },
            StoreError::KeyNotFound,
        ),
        (
            "an unknown lease after a valid put",
            TxnRequest {
                success: vec![
                    RequestOp::Put(put_req("new", "x")),
                    with_lease("other", 999),
                ],
                ..TxnRequest::default()
            },
            StoreError::LeaseNotFound,
        ),
        (
            "an unknown lease in the branch taken by a nested txn",
            TxnRequest {
                success: vec![
                    del(KeyRange::single("a")),
                    RequestOp::Txn(TxnRequest {
                        success: vec![with_lease("n", 999)],
                        ..TxnRequest::default()
                    }),
                ],
                ..TxnRequest::default()
            },
            StoreError::LeaseNotFound,
        ),
        (
            "a range at a future revision",
            TxnRequest {
                success: vec![
                    del(KeyRange::single("a")),
                    RequestOp::Range(RangeRequest {
                        range: Some(everything()),
                        revision: before.0 + 1,
                        ..RangeRequest::default()
                    }),
                ],
                ..TxnRequest::default()
            },
            StoreError::FutureRevision,
        ),
    ];
    for (what, req, err) in cases {
        assert_eq!(store.txn(req).await, Err(err), "{what}");
        unchanged(what);
    }

    // Leases.
    assert_eq!(
        store.lease_grant(1, 9_000_000_001).await,
        Err(StoreError::LeaseTtlTooLarge)
    );
    assert_eq!(
        store.lease_grant(lease, 10).await,
        Err(StoreError::LeaseExists)
    );
    assert_eq!(
        store.lease_revoke(999).await,
        Err(StoreError::LeaseNotFound)
    );
    assert_eq!(store.lease_keep_alive(999), Err(StoreError::LeaseNotFound));
    unchanged("lease errors");

    // Compaction.
    assert_eq!(
        store.compact(store.revision() + 1).await,
        Err(StoreError::FutureRevision)
    );
    assert_eq!(store.compact(0).await, Err(StoreError::AlreadyCompacted));
    unchanged("compaction errors");

    // 128 ops is the limit, not past it.
    let r = store
        .txn(TxnRequest {
            success: puts(128),
            ..TxnRequest::default()
        })
        .await
        .unwrap();
    assert!(r.succeeded);
    assert_eq!(r.revision, before.0 + 1);
    assert_eq!(get_all(&store).len(), before.1.len() + 128);
    // As etcd's lessor: a negative or zero TTL gets the minimum; a negative id is a
    // valid client-chosen id.
    let (id, ttl, _) = store.lease_grant(-7, -1).await.unwrap();
    assert_eq!((id, ttl), (-7, 2));
    let (_, ttl, _) = store.lease_grant(0, 0).await.unwrap();
    assert_eq!(ttl, 2);
    store.close().await;
}

#[tokio::test]
async fn nested_branches_may_share_keys() {
    // etcd's checkIntervals: the success and failure branches of a nested txn are
    // exclusive, so they may write the same key.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), fast()).unwrap();
    let nested = TxnRequest {
        compare: vec![Compare {
            range: KeyRange::single("a"),
            result: CompareResult::Equal,
            target: CompareTarget::Version(0),
        }],
        success: vec![RequestOp::Put(put_req("a", "then"))],
        failure: vec![RequestOp::Put(put_req("a", "else"))],
    };
    let r = store
        .txn(TxnRequest {
            success: vec![RequestOp::Txn(nested)],
            ..TxnRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(r.revision, 2);
    assert_eq!(get_all(&store)[0].value, Bytes::from_static(b"then"));

    // A put in one branch and a delete of the same key in the other is fine too.
    let del_a = || {
        RequestOp::Delete(DeleteRequest {
            range: KeyRange::prefix("a"),
            prev_kv: true,
        })
    };
    let put_or_delete = TxnRequest {
        compare: vec![Compare {
            range: KeyRange::single("a"),
            result: CompareResult::Equal,
            target: CompareTarget::Version(0),
        }],
        success: vec![RequestOp::Put(put_req("a", "x"))],
        failure: vec![del_a()],
    };
    let r = store
        .txn(TxnRequest {
            success: vec![RequestOp::Txn(put_or_delete.clone())],
            ..TxnRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(r.revision, 3);
    assert!(get_all(&store).is_empty());

    // Not so across sibling txns or with the parent: both may run.
    let put_in = |t: &TxnRequest| RequestOp::Txn(t.clone());
    let deleting = TxnRequest {
        success: vec![del_a()],
        ..TxnRequest::default()
    };
    for ops in [
        vec![put_in(&put_or_delete), put_in(&deleting)],
        vec![put_in(&deleting), put_in(&put_or_delete)],
        vec![del_a(), put_in(&put_or_delete)],
        vec![put_in(&put_or_delete), RequestOp::Put(put_req("a", "y"))],
    ] {
        let txn = TxnRequest {
            success: ops,
            ..TxnRequest::default()
        };
        assert_eq!(store.txn(txn).await, Err(StoreError::DuplicateKey));
    }
    assert_eq!(store.revision(), 3);
    store.close().await;
}

// ---------------------------------------------------------------------------------------
// Leases.

#[tokio::test(start_paused = true)]
async fn lease_expiry_deletes_attached_keys_in_one_revision() {
    let _hold = hold_clock();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), fast()).unwrap();
    let (id, ttl, _) = store.lease_grant(0, 10).await.unwrap();
    assert_eq!(ttl, 10);
    put_leased(&store, "a", "1", id).await;
    put_leased(&store, "b", "2", id).await;
    let rev = put(&store, "c", "3").await;
    let (stream, mut rx) = store.watch_stream();
    stream.create(watch_all(0)).await.unwrap();
    assert!(
        matches!(next(&mut rx).await, WatchMessage::Created { revision, .. } if revision == rev)
    );

    tokio::time::advance(Duration::from_secs(9)).await;
    assert_eq!(
        store
            .lease_time_to_live(id, false)
            .unwrap()
            .remaining_ttl_secs,
        1
    );
    assert_eq!(keys(&get_all(&store)), ["a", "b", "c"]);
    assert_eq!(store.revision(), rev);

    tokio::time::advance(Duration::from_secs(1)).await;
    let evs = events(&mut rx, 2).await;
    assert!(
        evs.iter()
            .all(|e| e.kind == EventKind::Delete && e.kv.mod_revision == rev + 1),
        "{evs:?}"
    );
    assert_eq!(
        evs.iter()
            .map(|e| e.kv.key.clone())
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([Bytes::from("a"), Bytes::from("b")])
    );
    assert_eq!(store.revision(), rev + 1);
    assert_eq!(keys(&get_all(&store)), ["c"]);
    assert_eq!(store.lease_time_to_live(id, false), None);
    assert_eq!(store.lease_list(), Vec::<i64>::new());
    assert_eq!(store.lease_keep_alive(id), Err(StoreError::LeaseNotFound));
    assert_nothing_pending(&mut rx);
    store.close().await;
}

#[tokio::test(start_paused = true)]
async fn keep_alive_postpones_expiry() {
    let _hold = hold_clock();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), fast()).unwrap();
    let (id, _, _) = store.lease_grant(3, 10).await.unwrap();
    let rev = put_leased(&store, "a", "1", id).await;
    tokio::time::advance(Duration::from_secs(8)).await;
    assert_eq!(store.lease_keep_alive(id), Ok(10));
    tokio::time::advance(Duration::from_secs(8)).await;
    assert_eq!(store.revision(), rev);
    assert_eq!(
        store.lease_time_to_live(id, true).unwrap().keys,
        vec![b"a".to_vec()]
    );
    store.close().await;
}

#[tokio::test]
async fn leases_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    store.lease_grant(7, 100).await.unwrap();
    store.lease_grant(8, 100).await.unwrap();
    let (chosen, _, _) = store.lease_grant(0, 100).await.unwrap();
    put_leased(&store, "k1", "v", 7).await;
    put_leased(&store, "k2", "v", 7).await;
    put_leased(&store, "k3", "v", 8).await;
    // Moved off lease 8 by a later put.
    put(&store, "k3", "w").await;
    store.lease_revoke(8).await.unwrap();
    store.close().await;

    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let mut want = vec![7, chosen];
    want.sort_unstable();
    assert_eq!(store.lease_list(), want);
    let info = store.lease_time_to_live(7, true).unwrap();
    assert_eq!(info.granted_ttl_secs, 100);
    assert_eq!(info.keys, vec![b"k1".to_vec(), b"k2".to_vec()]);
    assert_eq!(
        store.lease_grant(7, 100).await,
        Err(StoreError::LeaseExists)
    );
    let (fresh, _, _) = store.lease_grant(0, 100).await.unwrap();
    assert!(fresh != chosen && fresh != 7);

    let rev = store.revision();
    assert_eq!(store.lease_revoke(7).await, Ok(rev + 1));
    assert_eq!(keys(&get_all(&store)), ["k3"]);
    store.close().await;

    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let mut want = vec![chosen, fresh];
    want.sort_unstable();
    assert_eq!(store.lease_list(), want);
    assert_eq!(keys(&get_all(&store)), ["k3"]);
    store.close().await;
}

// ---------------------------------------------------------------------------------------
// Watch.

#[tokio::test]
async fn watch_from_a_past_revision_replays_then_goes_live() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), fast()).unwrap();
    put(&store, "a", "1").await;
    put(&store, "a", "2").await;
    put(&store, "b", "1").await;
    store
        .delete(DeleteRequest {
            range: KeyRange::single("a"),
            prev_kv: false,
        })
        .await
        .unwrap();
    let (stream, mut rx) = store.watch_stream();
    let id = stream
        .create(WatchSpec {
            range: KeyRange::prefix("a"),
            ..watch_all(3)
        })
        .await
        .unwrap();
    assert_eq!(
        next(&mut rx).await,
        WatchMessage::Created {
            watch_id: id,
            revision: 5
        }
    );
    let replay = events(&mut rx, 2).await;
    assert_eq!(
        (
            replay[0].kind,
            replay[0].kv.mod_revision,
            replay[0].kv.version
        ),
        (EventKind::Put, 3, 2)
    );
    assert_eq!(replay[0].kv.value, Bytes::from("2"));
    assert_eq!(
        (replay[1].kind, replay[1].kv.mod_revision),
        (EventKind::Delete, 5)
    );
    assert_eq!(
        replay[1].kv,
        KeyValue {
            key: Bytes::from("a"),
            mod_revision: 5,
            ..KeyValue::default()
        }
    );

    put(&store, "b", "2").await; // not watched
    put(&store, "ab", "1").await;
    let live = events(&mut rx, 1).await;
    assert_eq!(
        (
            live[0].kind,
            live[0].kv.mod_revision,
            live[0].kv.create_revision
        ),
        (EventKind::Put, 7, 7)
    );
    assert_eq!(live[0].kv.key, Bytes::from("ab"));
    assert_eq!(live[0].prev_kv, None);

    assert!(stream.cancel(id).await);
    assert!(
        matches!(next(&mut rx).await, WatchMessage::Canceled { watch_id, compact_revision: 0, .. } if watch_id == id)
    );
    put(&store, "a", "3").await;
    assert!(!stream.cancel(id).await);
    assert_nothing_pending(&mut rx);
    store.close().await;
}

#[tokio::test]
async fn watch_prev_kv_live_and_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), fast()).unwrap();
    put(&store, "a", "1").await;
    let (stream, mut rx) = store.watch_stream();
    stream
        .create(WatchSpec {
            prev_kv: true,
            ..watch_all(0)
        })
        .await
        .unwrap();
    next(&mut rx).await;
    put(&store, "a", "2").await;
    store
        .delete(DeleteRequest {
            range: KeyRange::single("a"),
            prev_kv: false,
        })
        .await
        .unwrap();
    put(&store, "a", "3").await;
    let live = events(&mut rx, 3).await;
    let prev = |e: &Event| {
        e.prev_kv
            .as_ref()
            .map(|kv| (kv.value.clone(), kv.mod_revision, kv.version))
    };
    assert_eq!(prev(&live[0]), Some((Bytes::from("1"), 2, 1)));
    assert_eq!(prev(&live[1]), Some((Bytes::from("2"), 3, 2)));
    assert_eq!(live[1].kind, EventKind::Delete);
    assert_eq!(prev(&live[2]), None);
    assert_eq!((live[2].kv.version, live[2].kv.create_revision), (1, 5));

    // The same events replayed from storage carry the same previous key-values.
    let (replaying, mut rx2) = store.watch_stream();
    replaying
        .create(WatchSpec {
            prev_kv: true,
            ..watch_all(2)
        })
        .await
        .unwrap();
    next(&mut rx2).await;
    let replay = events(&mut rx2, 4).await;
    assert_eq!(prev(&replay[0]), None);
    assert_eq!(replay[1..], live[..]);
    // A watcher without prev_kv gets none.
    let (plain, mut rx3) = store.watch_stream();
    plain.create(watch_all(3)).await.unwrap();
    next(&mut rx3).await;
    assert!(
        events(&mut rx3, 3)
            .await
            .iter()
            .all(|e| e.prev_kv.is_none())
    );
    store.close().await;
}

#[tokio::test]
async fn watch_filters_drop_puts_or_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), fast()).unwrap();
    let (stream, mut rx) = store.watch_stream();
    let no_put = stream
        .create(WatchSpec {
            no_put: true,
            ..watch_all(0)
        })
        .await
        .unwrap();
    next(&mut rx).await;
    let no_delete = stream
        .create(WatchSpec {
            no_delete: true,
            ..watch_all(0)
        })
        .await
        .unwrap();
    next(&mut rx).await;
    put(&store, "a", "1").await;
    put(&store, "b", "1").await;
    store
        .delete(DeleteRequest {
            range: everything(),
            prev_kv: false,
        })
        .await
        .unwrap();
    let mut puts = Vec::new();
    let mut deletes = Vec::new();
    while puts.len() + deletes.len() < 4 {
        match next(&mut rx).await {
            WatchMessage::Events {
                watch_id, events, ..
            } if watch_id == no_put => deletes.extend(events),
            WatchMessage::Events {
                watch_id, events, ..
            } if watch_id == no_delete => puts.extend(events),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        puts.iter()
            .map(|e| (e.kind, e.kv.mod_revision))
            .collect::<Vec<_>>(),
        [(EventKind::Put, 2), (EventKind::Put, 3)]
    );
    assert_eq!(
        deletes
            .iter()
            .map(|e| (e.kind, e.kv.mod_revision))
            .collect::<Vec<_>>(),
        [(EventKind::Delete, 4), (EventKind::Delete, 4)]
    );
    assert_nothing_pending(&mut rx);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_does_not_block_writers_and_misses_nothing() {
    const WRITES: i64 = 5000;
    const WRITERS: i64 = 10;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        StoreConfig {
            watch_buffer_events: 16,
            ..fast()
        },
    )
    .unwrap();
    let (stream, mut rx) = store.watch_stream();
    stream.create(watch_all(0)).await.unwrap();
    // The receiver is not read while every write completes.
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..WRITES / WRITERS {
                put(&store, &format!("k{w}-{i}"), "v").await;
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(HANG_GUARD, t)
            .await
            .expect("writers blocked by a slow watcher")
            .unwrap();
    }
    assert_eq!(store.revision(), WRITES + 1);
    assert!(matches!(next(&mut rx).await, WatchMessage::Created { .. }));
    let evs = events(&mut rx, WRITES as usize).await;
    let revisions: Vec<i64> = evs.iter().map(|e| e.kv.mod_revision).collect();
    assert_eq!(
        revisions,
        (2..=WRITES + 1).collect::<Vec<_>>(),
        "every event once, in order"
    );
    assert_eq!(
        evs.iter()
            .map(|e| e.kv.key.clone())
            .collect::<BTreeSet<_>>()
            .len(),
        WRITES as usize
    );
    // Caught up: live again, with nothing repeated in between.
    put(&store, "last", "v").await;
    assert_eq!(events(&mut rx, 1).await[0].kv.mod_revision, WRITES + 2);
    assert_nothing_pending(&mut rx);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_now_sees_every_later_revision() {
    // Watchers created while writes run must start right after the revision their
    // `Created` reports: no gap, no repeat.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), fast()).unwrap();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..3000 {
                put(&store, "k", &i.to_string()).await;
            }
        })
    };
    let mut checked = 0;
    while !writer.is_finished() {
        let (stream, mut rx) = store.watch_stream();
        stream
            .create(WatchSpec {
                range: KeyRange::single("k"),
                ..watch_all(0)
            })
            .await
            .unwrap();
        let WatchMessage::Created { revision, .. } = next(&mut rx).await else {
            panic!("expected Created")
        };
        if revision >= 2900 {
            break;
        }
        let WatchMessage::Events { events, .. } = next(&mut rx).await else {
            panic!("expected events")
        };
        let first = events[0].kv.mod_revision;
        assert!(
            events
                .windows(2)
                .all(|w| w[0].kv.mod_revision + 1 == w[1].kv.mod_revision)
        );
        assert_eq!(first, revision + 1, "watch created at revision {revision}");
        checked += 1;
    }
    writer.await.unwrap();
    assert!(checked > 0);
    store.close().await;
}

#[tokio::test]
async fn watch_from_a_compacted_revision_is_canceled() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), fast()).unwrap();
    for i in 0..5 {
        put(&store, "a", &i.to_string()).await;
    }
    store.compact(5).await.unwrap();
    let (stream, mut rx) = store.watch_stream();
    let id = stream.create(watch_all(3)).await.unwrap();
    assert_eq!(
        next(&mut rx).await,
        WatchMessage::Created {
            watch_id: id,
            revision: 6
        }
    );
    match next(&mut rx).await {
        WatchMessage::Canceled {
            watch_id,
            compact_revision,
            revision,
            ..
        } => {
            assert_eq!((watch_id, compact_revision, revision), (id, 5, 6));
        }
        other => panic!("expected Canceled, got {other:?}"),
    }
    // At the compaction revision itself history is still there.
    let id = stream.create(watch_all(5)).await.unwrap();
    assert_eq!(
        next(&mut rx).await,
        WatchMessage::Created {
            watch_id: id,
            revision: 6
        }
    );
    assert_eq!(
        events(&mut rx, 2)
            .await
            .iter()
            .map(|e| e.kv.mod_revision)
            .collect::<Vec<_>>(),
        [5, 6]
    );
    assert_nothing_pending(&mut rx);
    store.close().await;
}

#[tokio::test]
async fn progress_reports_the_current_revision() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), fast()).unwrap();
    put(&store, "a", "1").await;
    let (asking, mut rx) = store.watch_stream();
    let id = asking
        .create(WatchSpec {
            range: KeyRange::single("zzz"),
            ..watch_all(0)
        })
        .await
        .unwrap();
    next(&mut rx).await;
    let (periodic, mut rx2) = store.watch_stream();
    let id2 = periodic
        .create(WatchSpec {
            progress_notify: true,
            range: KeyRange::single("zzz"),
            ..watch_all(0)
        })
        .await
        .unwrap();
    next(&mut rx2).await;
    put(&store, "b", "1").await;

    asking.request_progress();
    assert_eq!(
        next(&mut rx).await,
        WatchMessage::Progress {
            watch_id: id,
            revision: 3
        }
    );
    assert_nothing_pending(&mut rx2);
    store.notify_progress();
    assert_eq!(
        next(&mut rx2).await,
        WatchMessage::Progress {
            watch_id: id2,
            revision: 3
        }
    );
    assert_nothing_pending(&mut rx);
    store.close().await;
}

// ---------------------------------------------------------------------------------------
// Group commit, snapshots, quota.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_get_unique_gap_free_revisions() {
    const WRITERS: usize = 16;
    const EACH: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..EACH {
                let key = format!("w{w:02}-{i:03}");
                revs.push((key.clone(), put(&store, &key, &key).await));
            }
            revs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let revs = tokio::time::timeout(HANG_GUARD, t).await.unwrap().unwrap();
        assert!(
            revs.windows(2).all(|w| w[0].1 < w[1].1),
            "one writer's revisions increase"
        );
        all.extend(revs);
    }
    let mut revisions: Vec<i64> = all.iter().map(|(_, r)| *r).collect();
    revisions.sort_unstable();
    // A fresh store is at revision 1, as etcd: the first write is revision 2.
    assert_eq!(
        revisions,
        (2..=(WRITERS * EACH) as i64 + 1).collect::<Vec<_>>()
    );
    store.close().await;

    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(store.revision(), (WRITERS * EACH) as i64 + 1);
    let kvs = get_all(&store);
    assert_eq!(kvs.len(), WRITERS * EACH);
    all.sort();
    for (kv, (key, rev)) in kvs.iter().zip(&all) {
        assert_eq!(
            (
                kv.key.as_ref(),
                kv.value.as_ref(),
                kv.mod_revision,
                kv.create_revision
            ),
            (key.as_bytes(), key.as_bytes(), *rev, *rev)
        );
    }
    store.close().await;
}

#[tokio::test]
async fn snapshot_is_a_restorable_copy() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), fast()).unwrap();
    put(&store, "a", "1").await;
    put(&store, "b", "2").await;
    store.lease_grant(9, 100).await.unwrap();
    put_leased(&store, "c", "3", 9).await;
    store.compact(3).await.unwrap();
    let snap = store.snapshot().unwrap();
    assert_eq!(snap.revision, 4);
    assert!(std::fs::metadata(&snap.path).unwrap().len() > 0);
    // Writes after the snapshot are not in it.
    put(&store, "d", "4").await;
    let want = get_all(&store)[..3].to_vec();

    // Restoring: the copy opens as a store with the same state.
    let restored = tempfile::tempdir().unwrap();
    std::fs::copy(&snap.path, restored.path().join("meshwork.redb")).unwrap();
    std::fs::remove_file(&snap.path).unwrap();
    let copy = Store::open(restored.path(), fast()).unwrap();
    assert_eq!(copy.revision(), 4);
    assert_eq!(copy.compact_revision(), 3);
    assert_eq!(get_all(&copy), want);
    assert_eq!(copy.lease_list(), vec![9]);
    copy.close().await;
    store.close().await;
}

#[tokio::test]
async fn over_quota_writes_fail_but_deletes_and_compaction_work() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        StoreConfig {
            quota_bytes: 1 << 20,
            ..fast()
        },
    )
    .unwrap();
    let value = "v".repeat(64 * 1024);
    let mut written = 0;
    let full = loop {
        assert!(written < 200, "the quota was never reached");
        match store
            .put(put_req(&format!("big{written:03}"), &value))
            .await
        {
            Ok(_) => written += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(full, StoreError::NoSpace);
    assert!(written > 0, "the first write already failed");
    let kinds = |s: &Store| {
        s.status()
            .alarms
            .iter()
            .map(|a| a.alarm)
            .collect::<Vec<_>>()
    };
    assert_eq!(kinds(&store), vec![Alarm::NoSpace]);
    let rev = store.revision();
    let txn_put = TxnRequest {
        success: vec![RequestOp::Put(put_req("t", "v"))],
        ..TxnRequest::default()
    };
    assert_eq!(store.txn(txn_put).await, Err(StoreError::NoSpace));
    assert_eq!(store.lease_grant(1, 100).await, Err(StoreError::NoSpace));
    assert_eq!(store.revision(), rev);
    assert_eq!(get_all(&store).len(), written);

    // Reads, deletes and compaction still work.
    let deleted = store
        .delete(DeleteRequest {
            range: KeyRange::single("big000"),
            prev_kv: false,
        })
        .await
        .unwrap();
    assert_eq!((deleted.revision, deleted.deleted), (rev + 1, 1));
    let txn_delete = TxnRequest {
        success: vec![RequestOp::Delete(DeleteRequest {
            range: KeyRange::prefix("big"),
            prev_kv: false,
        })],
        ..TxnRequest::default()
    };
    let r = store.txn(txn_delete).await.unwrap();
    assert_eq!((r.revision, get_all(&store).len()), (rev + 2, 0));
    assert_eq!(store.compact(rev + 2).await, Ok(rev + 2));
    assert_eq!(
        store.put(put_req("x", "v")).await,
        Err(StoreError::NoSpace),
        "the alarm stays until disarmed"
    );
    // etcd's recovery: compact, defragment, disarm.
    store.defragment().unwrap();
    let status = store.status();
    assert!(status.db_size_bytes <= 1 << 20, "{status:?}");
    store.disarm(Alarm::NoSpace);
    assert_eq!(kinds(&store), vec![]);
    assert_eq!(
        store.put(put_req("x", "v")).await.unwrap().revision,
        rev + 3
    );
    store.close().await;
}

#[tokio::test]
async fn dropping_every_handle_releases_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    put(&store, "a", "1").await;
    drop(store);
    // The committer thread lets go of the store right after its last batch; wait for that.
    let mut attempts = 0;
    let store = loop {
        match Store::open(dir.path(), StoreConfig::default()) {
            Ok(store) => break store,
            Err(e) => {
                attempts += 1;
                assert!(attempts < 100_000, "the database was never released: {e}");
                tokio::task::yield_now().await;
            }
        }
    };
    assert_eq!(keys(&get_all(&store)), ["a"]);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_taken_during_writes_hold_the_revision_they_report() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), fast()).unwrap();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..2000 {
                put(&store, &format!("k{}", i % 50), &i.to_string()).await;
            }
        })
    };
    let mut snaps = Vec::new();
    while !writer.is_finished() && snaps.len() < 20 {
        // Two at once: each gets its own file.
        let (a, b) = tokio::join!(
            tokio::task::spawn_blocking({
                let store = store.clone();
                move || store.snapshot().unwrap()
            }),
            tokio::task::spawn_blocking({
                let store = store.clone();
                move || store.snapshot().unwrap()
            }),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_ne!(a.path, b.path);
        snaps.push(a);
        snaps.push(b);
    }
    writer.await.unwrap();
    for snap in snaps {
        let restored = tempfile::tempdir().unwrap();
        std::fs::rename(&snap.path, restored.path().join("meshwork.redb")).unwrap();
        let copy = Store::open(restored.path(), fast()).unwrap();
        assert_eq!(
            copy.revision(),
            snap.revision,
            "the copy holds the revision it reports"
        );
        // Its contents are the original's at that revision.
        let at = RangeRequest {
            range: Some(everything()),
            revision: snap.revision,
            ..RangeRequest::default()
        };
        assert_eq!(copy.range(&at).unwrap().kvs, store.range(&at).unwrap().kvs);
        copy.close().await;
    }
    store.close().await;
}

#[tokio::test(start_paused = true)]
async fn auto_compaction_keeps_the_configured_revisions() {
    let _hold = hold_clock();
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        auto_compaction_retention_revisions: 3,
        ..fast()
    };
    let store = Store::open(dir.path(), cfg).unwrap();
    for i in 0..10 {
        put(&store, "a", &i.to_string()).await;
    }
    assert_eq!(store.revision(), 11);
    assert_eq!(store.compact_revision(), 0);
    // Revision-based retention is checked every 5 minutes.
    tokio::time::advance(Duration::from_secs(300)).await;
    // The compaction goes through the committer like a write: writes until it has landed.
    let mut writes = 0;
    while store.compact_revision() == 0 {
        assert!(writes < 100, "no auto-compaction");
        put(&store, "b", "1").await;
        writes += 1;
    }
    // Compacted to 3 revisions below the revision at the check, and only once.
    let compacted = store.compact_revision();
    assert!(
        (8..=8 + writes).contains(&compacted),
        "compacted to {compacted}"
    );
    let old = RangeRequest {
        range: Some(everything()),
        revision: compacted - 1,
        ..RangeRequest::default()
    };
    assert_eq!(
        store.range(&old),
        Err(StoreError::Compacted {
            compact_revision: compacted
        })
    );
    store.close().await;
}

#[tokio::test]
async fn lease_ttl_is_raised_to_the_minimum() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), fast()).unwrap();
    let (_, ttl, revision) = store.lease_grant(0, 0).await.unwrap();
    assert_eq!((ttl, revision), (2, 1));
    let (_, ttl, _) = store.lease_grant(0, 1).await.unwrap();
    assert_eq!(ttl, 2);
    store.close().await;
}

#[tokio::test]
async fn watch_ids_streams_and_future_start_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        max_watchers_per_stream: 2,
        ..fast()
    };
    let store = Store::open(dir.path(), cfg).unwrap();
    let (stream, mut rx) = store.watch_stream();
    // From a future revision: nothing before it.
    let future = stream
        .create(WatchSpec {
            watch_id: 7,
            ..watch_all(3)
        })
        .await
        .unwrap();
    assert_eq!(future, 7);
    next(&mut rx).await;
    assert_eq!(
        stream
            .create(WatchSpec {
                watch_id: 7,
                ..watch_all(0)
            })
            .await,
        Err(WatchCreateError::DuplicateId)
    );
    let other = stream.create(watch_all(0)).await.unwrap();
    next(&mut rx).await;
    assert_ne!(other, future);
    assert_eq!(
        stream.create(watch_all(0)).await,
        Err(WatchCreateError::TooMany(2))
    );
    assert_eq!(store.status().watchers, 2);
    put(&store, "a", "1").await; // revision 2: only `other`
    put(&store, "a", "2").await; // revision 3: both
    let mut seen: Vec<(i64, i64)> = Vec::new();
    while seen.len() < 3 {
        match next(&mut rx).await {
            WatchMessage::Events {
                watch_id, events, ..
            } => seen.extend(events.iter().map(|e| (watch_id, e.kv.mod_revision))),
            other => panic!("unexpected {other:?}"),
        }
    }
    seen.sort_unstable();
    let mut want = vec![(other, 2), (other, 3), (future, 3)];
    want.sort_unstable();
    assert_eq!(seen, want);
    // Dropping the stream removes its watchers.
    drop(stream);
    assert_eq!(store.status().watchers, 0);
    put(&store, "a", "3").await;
    assert_eq!(rx.recv().await, None, "the stream's channel closes");
    store.close().await;
}

#[test]
fn defragment_during_reads_and_writes_does_not_deadlock() {
    // Lock order hazard: the committer holds the database lock while it takes the index
    // lock; a read-only txn holds the index lock while it begins a read; a waiting
    // defragmentation (a writer of the database lock) must not block that read.
    const WRITERS: usize = 4;
    const READERS: usize = 4;
    const OPS: usize = 500;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = {
        let _runtime = rt.enter();
        Store::open(dir.path(), fast()).unwrap()
    };
    let (done_tx, done_rx) = std::sync::mpsc::channel::<&'static str>();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..WRITERS {
        let (store, handle, done) = (store.clone(), rt.handle().clone(), done_tx.clone());
        threads.push(std::thread::spawn(move || {
            for i in 0..OPS {
                handle.block_on(put(&store, &format!("k{}", i % 20), "v"));
            }
            done.send("writer").unwrap();
        }));
    }
    for _ in 0..READERS {
        let (store, handle, done) = (store.clone(), rt.handle().clone(), done_tx.clone());
        threads.push(std::thread::spawn(move || {
            let read = TxnRequest {
                compare: vec![Compare {
                    range: KeyRange::single("k1"),
                    result: CompareResult::Equal,
                    target: CompareTarget::Value(Bytes::from_static(b"v")),
                }],
                success: vec![RequestOp::Range(RangeRequest {
                    range: Some(everything()),
                    ..RangeRequest::default()
                })],
                ..TxnRequest::default()
            };
            for _ in 0..OPS {
                handle.block_on(store.txn(read.clone())).unwrap();
            }
            done.send("reader").unwrap();
        }));
    }
    {
        let (store, stop) = (store.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Fails while reads are open; only the locking matters here.
                let _ = store.defragment();
            }
        }));
    }
    for _ in 0..WRITERS + READERS {
        if let Err(e) = done_rx.recv_timeout(HANG_GUARD) {
            // Deadlocked threads never finish: leave them (and the runtime) behind.
            std::mem::forget(rt);
            panic!("reads, writes and defragmentation deadlocked: {e}");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    rt.block_on(store.close());
}

#[test]
fn status_during_writes_does_not_deadlock() {
    // Lock order hazard: the committer holds the lessor while it takes the index lock
    // for each request; `status` must not hold the index lock while it takes the lessor.
    const WRITERS: usize = 4;
    const OPS: usize = 500;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = {
        let _runtime = rt.enter();
        Store::open(dir.path(), fast()).unwrap()
    };
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut threads = Vec::new();
    for w in 0..WRITERS {
        let (store, handle, done) = (store.clone(), rt.handle().clone(), done_tx.clone());
        threads.push(std::thread::spawn(move || {
            for i in 0..OPS {
                handle.block_on(put(&store, &format!("w{w}-{i}"), "v"));
            }
            done.send(()).unwrap();
        }));
    }
    for _ in 0..2 {
        let (store, stop) = (store.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::black_box(store.status());
            }
        }));
    }
    for _ in 0..WRITERS {
        if let Err(e) = done_rx.recv_timeout(HANG_GUARD) {
            std::mem::forget(rt);
            panic!("status and writes deadlocked: {e}");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(store.status().keys, WRITERS * OPS);
    rt.block_on(store.close());
}
