//! The in-process transport: a store served at `inproc://NAME` answers a
//! client in the same process as over TCP (watches included); a name is held
//! by one listener at a time and freed when it goes; a client of a name
//! nobody serves gets a clear refusal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshwork_etcd::inproc::{self, Listener};
use meshwork_etcd::proto::etcdserverpb as pb;
use meshwork_etcd::{Client, ServerInfo};
use meshwork_store::{Store, StoreConfig};
use tokio_stream::StreamExt;

async fn client(name: &str) -> Result<Client, tonic::transport::Error> {
    inproc::channel(name, inproc::endpoint())
        .await
        .map(Client::from_channel)
}

#[tokio::test]
async fn a_store_served_in_process_answers_reads_writes_and_watches() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let listener = Listener::bind("inproc-test-a").unwrap();
    assert_eq!(listener.endpoint(), "inproc://inproc-test-a");
    assert_eq!(inproc::name_of(&listener.endpoint()), Some("inproc-test-a"));
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let info = ServerInfo::single("test", "http://127.0.0.1:2379".into());
    let served = tokio::spawn(meshwork_etcd::serve_in_process(
        listener,
        store,
        meshwork_etcd::auth::Auth::open(dir.path(), Default::default()).unwrap(),
        info,
        async {
            let _ = rx.await;
        },
    ));
    let mut c = client("inproc-test-a").await.unwrap();

    let (watch_tx, watch_rx) = tokio::sync::mpsc::channel(4);
    let req = pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: bytes::Bytes::from_static(b"k"),
                ..Default::default()
            },
        )),
    };
    watch_tx.send(req).await.unwrap();
    let mut events = c
        .watch
        .watch(tokio_stream::wrappers::ReceiverStream::new(watch_rx))
        .await
        .unwrap()
        .into_inner();
    assert!(events.next().await.unwrap().unwrap().created);

    // Larger than one pipe buffer: the writer waits for the reader, as on a socket.
    let value = vec![7u8; inproc::PIPE_BYTES * 3];
    let put =
        c.kv.put(pb::PutRequest {
            key: bytes::Bytes::from_static(b"k"),
            value: bytes::Bytes::from(value.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(put.header.unwrap().revision > 1);
    let got =
        c.kv.range(pb::RangeRequest {
            key: bytes::Bytes::from_static(b"k"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.kvs[0].value, value);
    let ev = events.next().await.unwrap().unwrap();
    assert_eq!(ev.events[0].kv.as_ref().unwrap().value, value);

    let _ = stop.send(());
    drop(watch_tx);
    drop(events);
    drop(c);
    served.await.unwrap().unwrap();
    // The listener is gone with its server: the name is free and refuses.
    let err = inproc::dial("inproc-test-a").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(
        err.to_string()
            .contains("no in-process etcd server at inproc://inproc-test-a"),
        "{err}"
    );
}

#[tokio::test]
async fn a_name_has_one_listener_at_a_time() {
    let first = Listener::bind("inproc-test-b").unwrap();
    let err = Listener::bind("inproc-test-b").err().unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    assert!(err.to_string().contains("inproc://inproc-test-b is taken"));
    drop(first);
    let second = Listener::bind("inproc-test-b").unwrap();
    // Dropping a listener frees only its own registration.
    assert!(inproc::dial("inproc-test-b").is_ok());
    drop(second);
    assert!(inproc::dial("inproc-test-b").is_err());
}

#[tokio::test]
async fn a_client_of_a_name_nobody_serves_fails_to_connect() {
    let err = client("inproc-test-nobody").await.err().unwrap();
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    assert!(text.contains("no in-process etcd server"), "{text}");
}
