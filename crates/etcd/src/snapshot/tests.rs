use super::*;
use bytes::Bytes;
use meshwork_store::ops::{DeleteRequest, PutRequest, RangeRequest};
use meshwork_store::{KeyRange, Store, StoreConfig};

fn all(store: &Store, revision: i64) -> Vec<KeyValue> {
    store
        .range(&RangeRequest {
            range: Some(KeyRange::new(
                Bytes::from_static(&[0]),
                Bytes::from_static(&[0]),
            )),
            revision,
            ..Default::default()
        })
        .unwrap()
        .kvs
}

async fn put(store: &Store, k: &str, v: &str, lease: i64) {
    store
        .put(PutRequest {
            key: Bytes::copy_from_slice(k.as_bytes()),
            value: Bytes::copy_from_slice(v.as_bytes()),
            lease,
            ..Default::default()
        })
        .await
        .unwrap();
}

/// A store with history: puts, overwrites, deletes, a lease with keys, a
/// compaction, more writes after it.
async fn populated(dir: &Path) -> Store {
    let store = Store::open(dir, StoreConfig::default()).unwrap();
    let (lease, _, _) = store.lease_grant(0x1234, 600).await.unwrap();
    for i in 0..300 {
        put(&store, &format!("/app/k{i:03}"), &format!("v{i}"), 0).await;
    }
    for i in 0..50 {
        put(&store, &format!("/app/k{i:03}"), &format!("w{i}"), 0).await;
    }
    put(&store, "/session/a", "held", lease).await;
    store
        .delete(DeleteRequest {
            range: KeyRange::prefix(Bytes::from_static(b"/app/k02")),
            prev_kv: false,
        })
        .await
        .unwrap();
    let mid = store.revision();
    store.compact(mid - 5).await.unwrap();
    put(&store, "/after", &"x".repeat(10_000), 0).await;
    store
}

#[tokio::test]
async fn a_store_survives_the_round_trip_through_an_etcd_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let src = populated(&tmp.path().join("src")).await;
    let export = src.export().unwrap();
    let file = tmp.path().join("snap.db");
    let written = write(&export, &file).unwrap();
    assert_eq!(written.revision, src.revision());
    assert_eq!(written.size_bytes % 4096, 0);
    drop(export);

    let dst_dir = tmp.path().join("dst");
    let restored = restore(&file, &dst_dir).unwrap();
    assert_eq!(restored.kind, SnapshotKind::Etcd);
    assert!(!restored.hash_checked, "no trailer on a bare database");
    assert_eq!(restored.imported.revision, src.revision());
    assert_eq!(restored.imported.compact_revision, src.compact_revision());
    assert_eq!(restored.imported.changes, written.changes);
    let dst = Store::open(&dst_dir, StoreConfig::default()).unwrap();
    assert_eq!(dst.revision(), src.revision());
    assert_eq!(dst.compact_revision(), src.compact_revision());
    assert_eq!(all(&dst, 0), all(&src, 0));
    // History after the compaction point reads the same too.
    let back = src.compact_revision() + 2;
    assert_eq!(all(&dst, back), all(&src, back));
    assert_eq!(dst.lease_list(), src.lease_list());
    let ttl = dst.lease_time_to_live(0x1234, true).unwrap();
    assert_eq!(ttl.keys, vec![b"/session/a".to_vec()]);
    // Restoring twice into the same directory is refused, nothing touched.
    let again = restore(&file, &dst_dir).unwrap_err().to_string();
    assert!(again.contains("empty directory"), "{again}");
    assert_eq!(all(&dst, 0), all(&src, 0));
}

#[tokio::test]
async fn the_sha256_trailer_is_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let src = populated(&tmp.path().join("src")).await;
    let file = tmp.path().join("snap.db");
    write(&src.export().unwrap(), &file).unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let sum = Sha256::digest(&bytes);
    bytes.extend_from_slice(&sum);
    let with = tmp.path().join("with-hash.db");
    std::fs::write(&with, &bytes).unwrap();
    let r = restore(&with, &tmp.path().join("a")).unwrap();
    assert!(r.hash_checked);
    // One flipped byte in the middle: refused before anything is written.
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let bad = tmp.path().join("bad.db");
    std::fs::write(&bad, &bytes).unwrap();
    let e = restore(&bad, &tmp.path().join("b")).unwrap_err();
    assert!(matches!(e, SnapshotError::HashMismatch), "{e}");
    assert!(!tmp.path().join("b").join("meshwork.redb").exists());
}

#[tokio::test]
async fn a_meshwork_database_file_restores_too() {
    let tmp = tempfile::tempdir().unwrap();
    let src = populated(&tmp.path().join("src")).await;
    let snap = src.snapshot().unwrap();
    let r = restore(&snap.path, &tmp.path().join("dst")).unwrap();
    assert_eq!(r.kind, SnapshotKind::Meshwork);
    let dst = Store::open(tmp.path().join("dst"), StoreConfig::default()).unwrap();
    assert_eq!(all(&dst, 0), all(&src, 0));
    assert_eq!(dst.revision(), src.revision());
    let junk = tmp.path().join("junk");
    std::fs::write(&junk, b"definitely not a database").unwrap();
    let e = restore(&junk, &tmp.path().join("j"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("neither an etcd snapshot"), "{e}");
}

#[test]
fn crc32c_matches_the_standard_check_value() {
    let mut c = Crc32c::new();
    c.update(b"123456789");
    assert_eq!(c.sum(), 0xE306_9283);
}

#[tokio::test]
async fn hashes_follow_the_history() {
    let tmp = tempfile::tempdir().unwrap();
    let a = populated(&tmp.path().join("a")).await;
    let b = populated(&tmp.path().join("b")).await;
    let rev = a.revision();
    let (ea, eb) = (a.export().unwrap(), b.export().unwrap());
    assert_eq!(hash_kv(&ea, rev).unwrap(), hash_kv(&eb, rev).unwrap());
    assert_ne!(
        hash_kv(&ea, rev).unwrap(),
        hash_kv(&ea, rev - 1).unwrap(),
        "the last write counts"
    );
    drop((ea, eb));
    put(&b, "/one-more", "x", 0).await;
    let (ea, eb) = (a.export().unwrap(), b.export().unwrap());
    assert_eq!(
        hash_kv(&ea, rev).unwrap(),
        hash_kv(&eb, rev).unwrap(),
        "the same history up to rev"
    );
    assert_ne!(hash(&ea).unwrap(), hash(&eb).unwrap());
}
