//! The etcd v3 server over real sockets, driven by a tonic client: every RPC, and
//! the status codes and messages etcd clients depend on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshwork_etcd::proto::etcdserverpb as pb;
use meshwork_etcd::proto::v3electionpb as epb;
use meshwork_etcd::proto::v3lockpb as lpb;
use meshwork_etcd::{Client, ServerInfo};
use meshwork_store::{Store, StoreConfig};
use tokio_stream::StreamExt;
use tonic::Code;

struct Node {
    client: Client,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn start(cfg: StoreConfig) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg).unwrap();
    let auth = meshwork_etcd::auth::Auth::open(dir.path(), Default::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let info = ServerInfo::single("test", format!("http://{addr}"));
    tokio::spawn(async move {
        meshwork_etcd::serve(listener, store, auth, info, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    let client = Client::connect(&[addr.to_string()]).await.unwrap();
    Node {
        client,
        _dir: dir,
        stop: Some(stop),
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

fn put(k: &str, v: &str) -> pb::PutRequest {
    pb::PutRequest {
        key: k.as_bytes().to_vec().into(),
        value: v.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

fn get(k: &str) -> pb::RangeRequest {
    pb::RangeRequest {
        key: k.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

fn prefix(k: &str) -> pb::RangeRequest {
    pb::RangeRequest {
        key: k.as_bytes().to_vec().into(),
        range_end: meshwork_store::prefix_range_end(k.as_bytes()).into(),
        ..Default::default()
    }
}

/// Sorting by a target other than the key keeps equal targets in key order in
/// both directions: what etcd 3.4 answers to `etcdctl get "" --prefix
/// --sort-by=VERSION --order=DESCEND` after the same writes (b, a, c, d).
#[tokio::test]
async fn sort_ties_keep_key_order_in_both_directions() {
    let n = start(StoreConfig::default()).await;
    let mut kv = n.client.kv.clone();
    for (k, v) in [
        ("s/a", "va"),
        ("s/b", "vb"),
        ("s/c", "vc"),
        ("s/d", "vd"),
        ("s/b", "v2"),
    ] {
        kv.put(put(k, v)).await.unwrap();
    }
    let keys = |r: pb::RangeResponse| {
        r.kvs
            .into_iter()
            .map(|kv| String::from_utf8(kv.key.to_vec()).unwrap())
            .collect::<Vec<_>>()
    };
    let sorted = |order, target| pb::RangeRequest {
        sort_order: order,
        sort_target: target,
        ..prefix("s/")
    };
    let (ascend, descend, version) = (1, 2, 1);
    let desc = kv
        .range(sorted(descend, version))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(desc), ["s/b", "s/a", "s/c", "s/d"]);
    let asc = kv
        .range(sorted(ascend, version))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(asc), ["s/a", "s/c", "s/d", "s/b"]);
}

#[tokio::test]
async fn kv_put_range_delete_with_headers_and_revisions() {
    let n = start(StoreConfig::default()).await;
    let mut kv = n.client.kv.clone();
    let r1 = kv.put(put("a", "1")).await.unwrap().into_inner();
    let h = r1.header.unwrap();
    assert_eq!(h.revision, 2, "a fresh store is at revision 1, as etcd");
    assert_ne!(h.cluster_id, 0);
    assert_ne!(h.member_id, 0);
    kv.put(put("ab", "2")).await.unwrap();
    let mut p = put("a", "3");
    p.prev_kv = true;
    let r3 = kv.put(p).await.unwrap().into_inner();
    assert_eq!(r3.prev_kv.unwrap().value.as_ref(), b"1");
    let got = kv.range(get("a")).await.unwrap().into_inner();
    let kv0 = &got.kvs[0];
    assert_eq!(
        (kv0.create_revision, kv0.mod_revision, kv0.version),
        (2, 4, 2)
    );
    assert_eq!(got.header.unwrap().revision, 4);
    // Historical read, prefix, count_only, keys_only, limit + more, sort.
    let old = kv
        .range(pb::RangeRequest {
            revision: 2,
            ..get("a")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.kvs[0].value.as_ref(), b"1");
    let all = kv.range(prefix("a")).await.unwrap().into_inner();
    assert_eq!(all.count, 2);
    let count = kv
        .range(pb::RangeRequest {
            count_only: true,
            ..prefix("a")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(count.kvs.is_empty());
    assert_eq!(count.count, 2);
    let keys = kv
        .range(pb::RangeRequest {
            keys_only: true,
            ..prefix("a")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(keys.kvs.iter().all(|kv| kv.value.is_empty()));
    let lim = kv
        .range(pb::RangeRequest {
            limit: 1,
            ..prefix("a")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((lim.kvs.len(), lim.more, lim.count), (1, true, 2));
    let desc = kv
        .range(pb::RangeRequest {
            sort_order: 2,
            sort_target: 3,
            ..prefix("a")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(desc.kvs[0].key.as_ref(), b"a");
    let from_key = kv
        .range(pb::RangeRequest {
            range_end: vec![0].into(),
            ..get("ab")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(from_key.count, 1);
    // Delete with prev_kv.
    let d = kv
        .delete_range(pb::DeleteRangeRequest {
            key: "a".into(),
            range_end: "b".into(),
            prev_kv: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.deleted, 2);
    assert_eq!(d.prev_kvs.len(), 2);
    assert_eq!(d.header.unwrap().revision, 5);
    // Deleting nothing does not create a revision.
    let d2 = kv
        .delete_range(pb::DeleteRangeRequest {
            key: "zz".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((d2.deleted, d2.header.unwrap().revision), (0, 5));
}

#[tokio::test]
async fn txn_compares_branches_and_nested_txn() {
    let n = start(StoreConfig::default()).await;
    let mut kv = n.client.kv.clone();
    kv.put(put("k", "v1")).await.unwrap();
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    let cmp = |result: CompareResult, target: CompareTarget, u: TargetUnion| pb::Compare {
        result: result as i32,
        target: target as i32,
        key: "k".into(),
        target_union: Some(u),
        range_end: Default::default(),
    };
    let op_put = |k: &str, v: &str| pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(put(k, v))),
    };
    let op_get = |k: &str| pb::RequestOp {
        request: Some(pb::request_op::Request::RequestRange(get(k))),
    };
    let t = pb::TxnRequest {
        compare: vec![
            cmp(
                CompareResult::Equal,
                CompareTarget::Value,
                TargetUnion::Value("v1".into()),
            ),
            cmp(
                CompareResult::Greater,
                CompareTarget::Version,
                TargetUnion::Version(0),
            ),
            cmp(
                CompareResult::Less,
                CompareTarget::Mod,
                TargetUnion::ModRevision(100),
            ),
            cmp(
                CompareResult::NotEqual,
                CompareTarget::Create,
                TargetUnion::CreateRevision(7),
            ),
            cmp(
                CompareResult::Equal,
                CompareTarget::Lease,
                TargetUnion::Lease(0),
            ),
        ],
        success: vec![
            op_put("k", "v2"),
            op_get("k"),
            pb::RequestOp {
                request: Some(pb::request_op::Request::RequestTxn(pb::TxnRequest {
                    compare: vec![],
                    success: vec![op_put("other", "x")],
                    failure: vec![],
                })),
            },
        ],
        failure: vec![op_put("k", "failed")],
    };
    let r = kv.txn(t).await.unwrap().into_inner();
    assert!(r.succeeded);
    assert_eq!(
        r.header.unwrap().revision,
        3,
        "one revision for the whole txn"
    );
    match &r.responses[1].response {
        Some(pb::response_op::Response::ResponseRange(rr)) => {
            assert_eq!(rr.kvs[0].value.as_ref(), b"v2")
        }
        other => panic!("unexpected {other:?}"),
    }
    let other = kv.range(get("other")).await.unwrap().into_inner();
    assert_eq!(other.kvs[0].mod_revision, 3);
    // Failing compare takes the failure branch; value compare on a missing key fails.
    let t2 = pb::TxnRequest {
        compare: vec![pb::Compare {
            key: "missing".into(),
            ..cmp(
                CompareResult::Equal,
                CompareTarget::Value,
                TargetUnion::Value("".into()),
            )
        }],
        success: vec![],
        failure: vec![op_get("k")],
    };
    let r2 = kv.txn(t2).await.unwrap().into_inner();
    assert!(!r2.succeeded);
    assert_eq!(
        r2.header.unwrap().revision,
        3,
        "a read-only txn creates no revision"
    );
}

#[tokio::test]
async fn errors_use_etcd_codes_and_messages_and_change_nothing() {
    let cfg = StoreConfig {
        max_value_bytes: 64 * 1024,
        ..StoreConfig::default()
    };
    let n = start(cfg).await;
    let mut kv = n.client.kv.clone();
    kv.put(put("x", "1")).await.unwrap();
    let e = kv.put(put("", "v")).await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "etcdserver: key is not provided")
    );
    let big = "v".repeat(64 * 1024 + 1);
    let e = kv.put(put("k", &big)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let huge = "v".repeat(1536 * 1024 + 10);
    let e = kv.put(put("k", &huge)).await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "etcdserver: request is too large")
    );
    let e = kv
        .range(pb::RangeRequest {
            revision: 99,
            ..get("x")
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision"
        )
    );
    let e = kv
        .put(pb::PutRequest {
            lease: 12345,
            ..put("k", "v")
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::NotFound, "etcdserver: requested lease not found")
    );
    // An end before the key selects nothing (etcd answers an empty result).
    let backwards = kv
        .range(pb::RangeRequest {
            range_end: "a".into(),
            ..get("b")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((backwards.count, backwards.kvs.len()), (0, 0));
    let op = pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(put("d", "1"))),
    };
    let e = kv
        .txn(pb::TxnRequest {
            success: vec![op.clone(), op.clone()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::InvalidArgument,
            "etcdserver: duplicate key given in txn request"
        )
    );
    let e = kv
        .txn(pb::TxnRequest {
            success: vec![op; 129],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::InvalidArgument,
            "etcdserver: too many operations in txn request"
        )
    );
    let e = kv
        .put(pb::PutRequest {
            ignore_value: true,
            ..put("nope", "")
        })
        .await
        .unwrap_err();
    assert_eq!(e.message(), "etcdserver: key not found");
    // Compaction errors.
    kv.compact(pb::CompactionRequest {
        revision: 2,
        physical: true,
    })
    .await
    .unwrap();
    let e = kv
        .compact(pb::CompactionRequest {
            revision: 2,
            physical: true,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted"
        )
    );
    let e = kv
        .range(pb::RangeRequest {
            revision: 0,
            ..get("x")
        })
        .await
        .map(|r| r.into_inner().kvs.len())
        .unwrap();
    assert_eq!(e, 1);
    // Nothing above changed the store: still revision 2 and one key.
    let all = kv
        .range(pb::RangeRequest {
            range_end: vec![0].into(),
            ..get("\0")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((all.count, all.header.unwrap().revision), (1, 2));
    // A negative TTL gets the minimum TTL, as etcd's lessor does.
    let g = n
        .client
        .lease
        .clone()
        .lease_grant(pb::LeaseGrantRequest { ttl: -5, id: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.ttl, StoreConfig::default().min_lease_ttl_secs);
    let e = n
        .client
        .lease
        .clone()
        .lease_revoke(pb::LeaseRevokeRequest { id: 424242 })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::NotFound, "etcdserver: requested lease not found")
    );
}

#[tokio::test]
async fn leases_grant_keepalive_ttl_list_revoke() {
    let n = start(StoreConfig::default()).await;
    let mut lease = n.client.lease.clone();
    let mut kv = n.client.kv.clone();
    let g = lease
        .lease_grant(pb::LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(g.id > 0);
    assert_eq!(g.ttl, 60);
    let e = lease
        .lease_grant(pb::LeaseGrantRequest { ttl: 60, id: g.id })
        .await
        .unwrap_err();
    assert_eq!(e.message(), "etcdserver: lease already exists");
    kv.put(pb::PutRequest {
        lease: g.id,
        ..put("lk", "v")
    })
    .await
    .unwrap();
    let ttl = lease
        .lease_time_to_live(pb::LeaseTimeToLiveRequest {
            id: g.id,
            keys: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ttl.granted_ttl, 60);
    assert_eq!(ttl.keys, vec![bytes::Bytes::from_static(b"lk")]);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::LeaseKeepAliveRequest { id: g.id })
        .await
        .unwrap();
    tx.send(pb::LeaseKeepAliveRequest { id: 999 })
        .await
        .unwrap();
    let mut ka = lease
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ka.next().await.unwrap().unwrap().ttl, 60);
    assert_eq!(
        ka.next().await.unwrap().unwrap().ttl,
        0,
        "unknown lease answers TTL 0"
    );
    let list = lease
        .lease_leases(pb::LeaseLeasesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.leases.len(), 1);
    let rv = lease
        .lease_revoke(pb::LeaseRevokeRequest { id: g.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rv.header.unwrap().revision, 3);
    assert_eq!(kv.range(get("lk")).await.unwrap().into_inner().count, 0);
    let gone = lease
        .lease_time_to_live(pb::LeaseTimeToLiveRequest {
            id: g.id,
            keys: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gone.ttl, -1);
}

async fn next_watch(s: &mut tonic::Streaming<pb::WatchResponse>) -> pb::WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("watch response in time")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn watch_replay_live_filters_progress_cancel_and_compaction() {
    let n = start(StoreConfig::default()).await;
    let mut kv = n.client.kv.clone();
    kv.put(put("w/a", "1")).await.unwrap(); // rev 2
    kv.put(put("w/b", "2")).await.unwrap(); // rev 3
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut s = n
        .client
        .watch
        .clone()
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let create = |start: i64, prev_kv: bool, filters: Vec<i32>, id: i64| pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: "w/".into(),
                range_end: "w0".into(),
                start_revision: start,
                prev_kv,
                filters,
                watch_id: id,
                ..Default::default()
            },
        )),
    };
    tx.send(create(2, false, vec![], 7)).await.unwrap();
    let c = next_watch(&mut s).await;
    assert!(c.created);
    assert_eq!(c.watch_id, 7);
    let ev = next_watch(&mut s).await;
    let revs: Vec<i64> = ev
        .events
        .iter()
        .map(|e| e.kv.as_ref().unwrap().mod_revision)
        .collect();
    assert_eq!(revs, vec![2, 3], "history replayed in order");
    // Live, with prev_kv and a NOPUT filter on a second watcher.
    tx.send(create(0, true, vec![0], 8)).await.unwrap();
    assert!(next_watch(&mut s).await.created);
    kv.put(put("w/a", "3")).await.unwrap();
    kv.delete_range(pb::DeleteRangeRequest {
        key: "w/a".into(),
        prev_kv: false,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut seen7 = Vec::new();
    let mut seen8 = Vec::new();
    while seen7.len() < 2 || seen8.is_empty() {
        let r = next_watch(&mut s).await;
        for e in r.events {
            if r.watch_id == 7 {
                seen7.push(e)
            } else {
                seen8.push(e)
            }
        }
    }
    assert_eq!(seen7[0].r#type, 0);
    assert_eq!(seen7[1].r#type, 1);
    assert_eq!(seen8.len(), 1, "NOPUT drops the put");
    assert_eq!(seen8[0].prev_kv.as_ref().unwrap().value.as_ref(), b"3");
    // Progress request answers with the current revision.
    tx.send(pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(
            pb::WatchProgressRequest {},
        )),
    })
    .await
    .unwrap();
    let p = next_watch(&mut s).await;
    assert!(p.events.is_empty() && !p.created && !p.canceled);
    assert_eq!(p.header.unwrap().revision, 5);
    // Cancel.
    tx.send(pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CancelRequest(
            pb::WatchCancelRequest { watch_id: 8 },
        )),
    })
    .await
    .unwrap();
    loop {
        let r = next_watch(&mut s).await;
        if r.canceled {
            assert_eq!(r.watch_id, 8);
            break;
        }
    }
    // Duplicate watch ID is refused.
    tx.send(create(0, false, vec![], 7)).await.unwrap();
    let dup = next_watch(&mut s).await;
    assert!(dup.canceled);
    // A watch from a compacted revision is cancelled with the compact revision.
    kv.compact(pb::CompactionRequest {
        revision: 4,
        physical: true,
    })
    .await
    .unwrap();
    tx.send(create(2, false, vec![], 9)).await.unwrap();
    let mut got_cancel = false;
    for _ in 0..3 {
        let r = next_watch(&mut s).await;
        if r.watch_id == 9 && r.canceled {
            assert_eq!(r.compact_revision, 4);
            got_cancel = true;
            break;
        }
    }
    assert!(got_cancel);
}

#[tokio::test]
async fn maintenance_status_snapshot_alarm_defrag_and_members() {
    let n = start(StoreConfig::default()).await;
    n.client.kv.clone().put(put("s", "1")).await.unwrap();
    let mut m = n.client.maintenance.clone();
    let st = m.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.header.unwrap().revision, 2);
    assert!(st.db_size > 0);
    assert_eq!(st.leader, st.header.unwrap().member_id);
    let mut snap = m
        .snapshot(pb::SnapshotRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut blob = Vec::new();
    let mut first = true;
    while let Some(chunk) = snap.next().await {
        let c = chunk.unwrap();
        if first {
            assert_eq!(c.header.unwrap().revision, 2);
            first = false;
        }
        blob.extend_from_slice(&c.blob);
    }
    assert_eq!(
        blob.len() % 512,
        32,
        "padded blob followed by a sha256, as etcdctl checks"
    );
    use sha2::Digest;
    let (body, sum) = blob.split_at(blob.len() - 32);
    assert_eq!(sha2::Sha256::digest(body).as_slice(), sum);
    let alarms = m
        .alarm(pb::AlarmRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(alarms.alarms.is_empty());
    m.defragment(pb::DefragmentRequest {}).await.unwrap();
    let members = n
        .client
        .cluster
        .clone()
        .member_list(pb::MemberListRequest {
            linearizable: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(members.members.len(), 1);
    assert_eq!(members.members[0].name, "test");
}

#[tokio::test]
async fn lock_is_exclusive_and_fenced_and_election_follows_leaders() {
    let n = start(StoreConfig::default()).await;
    let mut lease = n.client.lease.clone();
    let l1 = lease
        .lease_grant(pb::LeaseGrantRequest { ttl: 30, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;
    let l2 = lease
        .lease_grant(pb::LeaseGrantRequest { ttl: 30, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;
    let mut lock = n.client.lock.clone();
    let k1 = lock
        .lock(lpb::LockRequest {
            name: "L".into(),
            lease: l1,
        })
        .await
        .unwrap()
        .into_inner()
        .key;
    let mut lock2 = n.client.lock.clone();
    let waiter = tokio::spawn(async move {
        lock2
            .lock(lpb::LockRequest {
                name: "L".into(),
                lease: l2,
            })
            .await
            .unwrap()
            .into_inner()
            .key
    });
    // The second holder cannot get it while the first holds it.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), async {
            while !waiter.is_finished() {
                tokio::task::yield_now().await
            }
        })
        .await
        .is_err()
    );
    lock.unlock(lpb::UnlockRequest { key: k1.clone() })
        .await
        .unwrap();
    let k2 = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(k1, k2);
    // Fencing tokens (create revisions) increase.
    let kv = n
        .client
        .kv
        .clone()
        .range(pb::RangeRequest {
            key: k2.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(kv.kvs[0].create_revision > 0);
    let e = lock
        .lock(lpb::LockRequest {
            name: "L".into(),
            lease: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Election: campaign, leader, observe, proclaim, resign.
    let mut el = n.client.election.clone();
    let e = el
        .leader(epb::LeaderRequest { name: "E".into() })
        .await
        .unwrap_err();
    assert_eq!(e.message(), "etcdserver: election: no leader");
    let c = el
        .campaign(epb::CampaignRequest {
            name: "E".into(),
            lease: l1,
            value: "n1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let leader = c.leader.unwrap();
    let mut obs = el
        .observe(epb::LeaderRequest { name: "E".into() })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), obs.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.kv.unwrap().value.as_ref(), b"n1");
    el.proclaim(epb::ProclaimRequest {
        leader: Some(leader.clone()),
        value: "n1b".into(),
    })
    .await
    .unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), obs.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.kv.unwrap().value.as_ref(), b"n1b");
    let mut el2 = n.client.election.clone();
    let follower = tokio::spawn(async move {
        el2.campaign(epb::CampaignRequest {
            name: "E".into(),
            lease: l2,
            value: "n2".into(),
        })
        .await
    });
    el.resign(epb::ResignRequest {
        leader: Some(leader.clone()),
    })
    .await
    .unwrap();
    let c2 = tokio::time::timeout(Duration::from_secs(10), follower)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(c2.leader.unwrap().lease, l2);
    let third = tokio::time::timeout(Duration::from_secs(10), obs.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(third.kv.unwrap().value.as_ref(), b"n2");
    let e = el
        .proclaim(epb::ProclaimRequest {
            leader: Some(leader),
            value: "stale".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.message(), "etcdserver: election: not leader");
}

/// Regression (issue 13): `etcdctl del "" x` deleted every key below `x`. An empty key
/// is refused with or without a range end, in every request and inside txns at any
/// depth, and nothing changes.
#[tokio::test]
async fn an_empty_key_with_a_range_end_is_refused_and_deletes_nothing() {
    let n = start(StoreConfig::default()).await;
    let mut kv = n.client.kv.clone();
    for k in ["/meshwork/nodes/a", "/meshwork/ids/1", "a", "w"] {
        kv.put(put(k, "v")).await.unwrap();
    }
    let everything = || pb::RangeRequest {
        range_end: vec![0].into(),
        ..get("\0")
    };
    let before = kv.range(everything()).await.unwrap().into_inner();
    assert_eq!(before.count, 4);
    let refused = |e: tonic::Status| {
        assert_eq!(
            (e.code(), e.message()),
            (Code::InvalidArgument, "etcdserver: key is not provided")
        );
    };
    for end in ["x", "\0", "\u{7f}"] {
        let del = pb::DeleteRangeRequest {
            key: "".into(),
            range_end: end.as_bytes().to_vec().into(),
            prev_kv: true,
        };
        refused(kv.delete_range(del.clone()).await.unwrap_err());
        let range = pb::RangeRequest {
            range_end: end.as_bytes().to_vec().into(),
            ..get("")
        };
        refused(kv.range(range.clone()).await.unwrap_err());
        let nested = pb::TxnRequest {
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestDeleteRange(del.clone())),
            }],
            ..Default::default()
        };
        for txn in [
            nested.clone(),
            pb::TxnRequest {
                failure: vec![pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestRange(range)),
                }],
                ..Default::default()
            },
            pb::TxnRequest {
                success: vec![pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestTxn(nested)),
                }],
                ..Default::default()
            },
        ] {
            refused(kv.txn(txn).await.unwrap_err());
        }
    }
    let after = kv.range(everything()).await.unwrap().into_inner();
    assert_eq!(
        after.kvs, before.kvs,
        "a refused request changed the keyspace"
    );
    assert_eq!(
        after.header.unwrap().revision,
        before.header.unwrap().revision
    );
}

/// Many calls in flight on one connection, on a multi-threaded runtime: the
/// responses that one commit completes are coalesced into shared writes
/// (`server/conn.rs`), and every call must still be answered, with its own
/// revision. Messages far larger than the codec's 1 KiB starting buffer
/// round-trip intact, and a lone call afterwards is answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_on_one_connection_are_all_answered() {
    let node = start(StoreConfig::default()).await;
    let calls = (0..500).map(|i| {
        let mut kv = node.client.kv.clone();
        tokio::spawn(async move {
            kv.put(put(&format!("c/{i:04}"), "v"))
                .await
                .unwrap()
                .into_inner()
                .header
                .unwrap()
                .revision
        })
    });
    let mut revisions = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        revisions.push(
            tokio::time::timeout(Duration::from_secs(30), call)
                .await
                .expect("every call answered")
                .unwrap(),
        );
    }
    revisions.sort_unstable();
    assert_eq!(revisions, (2..502).collect::<Vec<i64>>());

    let mut kv = node.client.kv.clone();
    let big = "x".repeat(256 * 1024);
    kv.put(put("big", &big)).await.unwrap();
    let got = kv.range(get("big")).await.unwrap().into_inner();
    assert_eq!(got.kvs[0].value.len(), big.len());
    assert!(got.kvs[0].value.iter().all(|&b| b == b'x'));
    let all = kv.range(prefix("c/")).await.unwrap().into_inner();
    assert_eq!(all.count, 500);
    assert_eq!(all.kvs.len(), 500);
}
