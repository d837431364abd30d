//! Peer test: the same malformed and edge-case requests sent to Debian's etcd 3.4 and
//! to Meshwork's etcd server, with the project's own generated client; the gRPC code
//! and message (or the shape of a success) must be the same request by request, and
//! neither keyspace may change.
//!
//! Skips when etcd is not installed; fails instead under `MESHWORK_REQUIRE_PEERS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

// The real-etcd harness the coordination tests use (one member here).
use meshwork_testkit::etcd_cluster as cluster;

use meshwork_etcd::proto::etcdserverpb as pb;
use meshwork_etcd::{Client, ServerInfo};
use meshwork_store::{Store, StoreConfig};
use pb::request_op::Request as Op;
use tonic::Status;

/// One request of the comparison.
#[derive(Clone, Debug)]
enum Call {
    Range(pb::RangeRequest),
    Put(pb::PutRequest),
    Delete(pb::DeleteRangeRequest),
    Txn(pb::TxnRequest),
    Grant(pb::LeaseGrantRequest),
    Revoke(pb::LeaseRevokeRequest),
    Compact(pb::CompactionRequest),
}

fn bytes(s: &str) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(s.as_bytes())
}

fn range(key: &str, end: &str) -> pb::RangeRequest {
    pb::RangeRequest {
        key: bytes(key),
        range_end: bytes(end),
        ..Default::default()
    }
}

fn put(key: &str, value: &str) -> pb::PutRequest {
    pb::PutRequest {
        key: bytes(key),
        value: bytes(value),
        ..Default::default()
    }
}

fn delete(key: &str, end: &str) -> pb::DeleteRangeRequest {
    pb::DeleteRangeRequest {
        key: bytes(key),
        range_end: bytes(end),
        prev_kv: true,
    }
}

fn op(o: Op) -> pb::RequestOp {
    pb::RequestOp { request: Some(o) }
}

fn compare(key: &str, end: &str) -> pb::Compare {
    pb::Compare {
        key: bytes(key),
        range_end: bytes(end),
        result: pb::compare::CompareResult::Equal as i32,
        target: pb::compare::CompareTarget::Version as i32,
        target_union: Some(pb::compare::TargetUnion::Version(0)),
    }
}

/// The cases, named. Everything here is refused or changes no key.
fn cases() -> Vec<(&'static str, Call)> {
    let many: Vec<pb::RequestOp> = (0..129)
        .map(|i| op(Op::RequestPut(put(&format!("t{i}"), "v"))))
        .collect();
    vec![
        // Range.
        ("range: empty key", Call::Range(range("", ""))),
        ("range: empty key with end", Call::Range(range("", "x"))),
        ("range: empty key to \\0", Call::Range(range("", "\0"))),
        ("range: end before key", Call::Range(range("b", "a"))),
        ("range: end equal to key", Call::Range(range("b", "b"))),
        (
            "range: negative limit",
            Call::Range(pb::RangeRequest {
                limit: -1,
                ..range("a", "y")
            }),
        ),
        (
            "range: future revision",
            Call::Range(pb::RangeRequest {
                revision: 1_000_000,
                ..range("a", "")
            }),
        ),
        (
            "range: negative revision",
            Call::Range(pb::RangeRequest {
                revision: -5,
                ..range("a", "")
            }),
        ),
        // Put.
        ("put: empty key", Call::Put(put("", "v"))),
        (
            "put: ignore_value with a value",
            Call::Put(pb::PutRequest {
                ignore_value: true,
                ..put("a", "v")
            }),
        ),
        (
            "put: ignore_lease with a lease",
            Call::Put(pb::PutRequest {
                ignore_lease: true,
                lease: 5,
                ..put("a", "v")
            }),
        ),
        (
            "put: ignore_value on a missing key",
            Call::Put(pb::PutRequest {
                ignore_value: true,
                ..put("missing", "")
            }),
        ),
        (
            "put: unknown lease",
            Call::Put(pb::PutRequest {
                lease: 424_242,
                ..put("a", "v")
            }),
        ),
        // DeleteRange.
        ("delete: empty key", Call::Delete(delete("", ""))),
        ("delete: empty key with end", Call::Delete(delete("", "x"))),
        ("delete: empty key to \\0", Call::Delete(delete("", "\0"))),
        ("delete: end before key", Call::Delete(delete("b", "a"))),
        ("delete: end equal to key", Call::Delete(delete("b", "b"))),
        // Txn.
        (
            "txn: compare with empty key",
            Call::Txn(pb::TxnRequest {
                compare: vec![compare("", "x")],
                ..Default::default()
            }),
        ),
        (
            "txn: delete of empty key with end",
            Call::Txn(pb::TxnRequest {
                success: vec![op(Op::RequestDeleteRange(delete("", "x")))],
                ..Default::default()
            }),
        ),
        (
            "txn: range of empty key with end in failure",
            Call::Txn(pb::TxnRequest {
                failure: vec![op(Op::RequestRange(range("", "x")))],
                ..Default::default()
            }),
        ),
        (
            "txn: put of empty key",
            Call::Txn(pb::TxnRequest {
                success: vec![op(Op::RequestPut(put("", "v")))],
                ..Default::default()
            }),
        ),
        (
            "txn: nested delete of empty key to \\0",
            Call::Txn(pb::TxnRequest {
                success: vec![op(Op::RequestTxn(pb::TxnRequest {
                    failure: vec![op(Op::RequestDeleteRange(delete("", "\0")))],
                    ..Default::default()
                }))],
                ..Default::default()
            }),
        ),
        (
            "txn: empty op",
            Call::Txn(pb::TxnRequest {
                success: vec![pb::RequestOp { request: None }],
                ..Default::default()
            }),
        ),
        (
            "txn: 129 ops",
            Call::Txn(pb::TxnRequest {
                success: many,
                ..Default::default()
            }),
        ),
        (
            "txn: a key put twice",
            Call::Txn(pb::TxnRequest {
                success: vec![
                    op(Op::RequestPut(put("a", "1"))),
                    op(Op::RequestPut(put("a", "2"))),
                ],
                ..Default::default()
            }),
        ),
        (
            "txn: a put inside a deleted range",
            Call::Txn(pb::TxnRequest {
                success: vec![
                    op(Op::RequestDeleteRange(delete("a", "c"))),
                    op(Op::RequestPut(put("b", "2"))),
                ],
                ..Default::default()
            }),
        ),
        (
            "txn: backwards delete and range (no change)",
            Call::Txn(pb::TxnRequest {
                success: vec![
                    op(Op::RequestDeleteRange(delete("c", "a"))),
                    op(Op::RequestRange(range("c", "a"))),
                ],
                ..Default::default()
            }),
        ),
        // Lease.
        (
            "lease: negative TTL",
            Call::Grant(pb::LeaseGrantRequest { ttl: -5, id: 0 }),
        ),
        (
            "lease: zero TTL",
            Call::Grant(pb::LeaseGrantRequest { ttl: 0, id: 0 }),
        ),
        (
            "lease: TTL too large",
            Call::Grant(pb::LeaseGrantRequest {
                ttl: 9_000_000_001,
                id: 0,
            }),
        ),
        (
            "lease: client-chosen negative id",
            Call::Grant(pb::LeaseGrantRequest { ttl: 10, id: -77 }),
        ),
        (
            "lease: id already in use",
            Call::Grant(pb::LeaseGrantRequest { ttl: 10, id: -77 }),
        ),
        (
            "lease: revoke of an unknown lease",
            Call::Revoke(pb::LeaseRevokeRequest { id: 424_242 }),
        ),
        (
            "lease: revoke of the negative id",
            Call::Revoke(pb::LeaseRevokeRequest { id: -77 }),
        ),
        // Compaction (last: it changes what older revisions can be read).
        (
            "compact: future revision",
            Call::Compact(pb::CompactionRequest {
                revision: 1_000_000,
                physical: true,
            }),
        ),
        // Not compared: `Compact(0)` on a never-compacted store. etcd starts its
        // compaction revision at -1 and answers OK once (then "compacted"); Meshwork
        // starts at 0 and answers "compacted" at once. Nothing changes either way.
        (
            "compact: negative revision",
            Call::Compact(pb::CompactionRequest {
                revision: -3,
                physical: true,
            }),
        ),
    ]
}

/// What a call answered, reduced to what both servers must agree on.
fn outcome<T>(r: Result<tonic::Response<T>, Status>, ok: impl FnOnce(T) -> String) -> String {
    match r {
        Ok(resp) => format!("ok {}", ok(resp.into_inner())),
        Err(s) => format!("{:?}: {}", s.code(), s.message()),
    }
}

async fn run(c: &Client, call: Call) -> String {
    match call {
        Call::Range(r) => outcome(c.kv.clone().range(r).await, |r| {
            format!("count={} kvs={} more={}", r.count, r.kvs.len(), r.more)
        }),
        Call::Put(p) => outcome(c.kv.clone().put(p).await, |_| String::new()),
        Call::Delete(d) => outcome(c.kv.clone().delete_range(d).await, |d| {
            format!("deleted={} prev_kvs={}", d.deleted, d.prev_kvs.len())
        }),
        Call::Txn(t) => outcome(c.kv.clone().txn(t).await, |t| {
            format!("succeeded={} responses={}", t.succeeded, t.responses.len())
        }),
        Call::Grant(g) => {
            let chosen = g.id;
            outcome(c.lease.clone().lease_grant(g).await, |g| {
                // The TTL floor depends on each server's settings; the id is compared
                // only when the client chose it.
                let id = if chosen == 0 {
                    "auto".to_string()
                } else {
                    g.id.to_string()
                };
                format!("id={id} error={:?}", g.error)
            })
        }
        Call::Revoke(r) => outcome(c.lease.clone().lease_revoke(r).await, |_| String::new()),
        Call::Compact(r) => outcome(c.kv.clone().compact(r).await, |_| String::new()),
    }
}

/// Every key with its value and version (revisions differ between the two servers).
async fn keyspace(c: &Client) -> (i64, Vec<(String, String, i64)>) {
    let r =
        c.kv.clone()
            .range(range("\0", "\0"))
            .await
            .unwrap()
            .into_inner();
    let kvs = r
        .kvs
        .into_iter()
        .filter(|kv| !kv.key.starts_with(b"/meshwork-harness/"))
        .map(|kv| {
            (
                String::from_utf8_lossy(&kv.key).into_owned(),
                String::from_utf8_lossy(&kv.value).into_owned(),
                kv.version,
            )
        })
        .collect();
    (r.header.map(|h| h.revision).unwrap_or(0), kvs)
}

async fn seed(c: &Client) {
    for (k, v) in [
        ("a", "1"),
        ("b", "2"),
        ("c", "3"),
        ("x/1", "4"),
        ("x/2", "5"),
    ] {
        c.kv.clone().put(put(k, v)).await.unwrap();
    }
}

#[tokio::test]
async fn malformed_requests_answer_as_etcd_and_change_nothing() {
    let Some(etcd) = cluster::EtcdCluster::start(1).await else {
        return;
    };
    let etcd = Client::connect(&etcd.client_urls()).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let auth = meshwork_etcd::auth::Auth::open(dir.path(), Default::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let info = ServerInfo::single("peer-test", format!("http://{addr}"));
    let server = tokio::spawn(meshwork_etcd::serve(listener, store, auth, info, async {
        let _ = stopped.await;
    }));
    let meshwork = Client::connect(&[addr.to_string()]).await.unwrap();

    seed(&etcd).await;
    seed(&meshwork).await;
    let (etcd_rev, etcd_before) = keyspace(&etcd).await;
    let (mw_rev, mw_before) = keyspace(&meshwork).await;
    assert_eq!(etcd_before, mw_before, "the seeds differ");

    let mut mismatches = Vec::new();
    for (name, call) in cases() {
        let want = run(&etcd, call.clone()).await;
        let got = run(&meshwork, call).await;
        eprintln!("{name:48} etcd: {want}");
        if want != got {
            mismatches.push(format!("{name}\n    etcd:     {want}\n    meshwork: {got}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} requests answered differently:\n{}",
        mismatches.len(),
        cases().len(),
        mismatches.join("\n")
    );

    let (etcd_rev_after, etcd_after) = keyspace(&etcd).await;
    let (mw_rev_after, mw_after) = keyspace(&meshwork).await;
    assert_eq!(etcd_after, etcd_before, "etcd's keyspace changed");
    assert_eq!(mw_after, mw_before, "Meshwork's keyspace changed");
    assert_eq!(
        mw_rev_after - mw_rev,
        etcd_rev_after - etcd_rev,
        "the two servers made a different number of revisions"
    );

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
