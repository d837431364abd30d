//! The gRPC service over a real socket with the generated client: a batch
//! publish; a Consume stream that never sends more than the credit granted,
//! takes acks, nacks (redelivered, counted) and extensions on the same stream;
//! and what it refuses: no subscribe first (or nothing at all), an unknown group, an ack of an
//! unknown delivery (the stream ends with its status), an empty or oversize
//! publish; and a consumer that vanishes mid-stream holding deliveries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshwork_mq::grpc::proto::broker_client::BrokerClient;
use meshwork_mq::grpc::proto::consume_request::Kind;
use meshwork_mq::grpc::proto::{
    ConsumeRequest, ConsumeResponse, OutMessage, Position, PublishRequest, Settle, Subscribe,
};
use meshwork_mq::{Broker, BrokerConfig, GroupConfig, StartAt, TopicConfig};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

async fn start() -> (BrokerClient<Channel>, Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::open(dir.path(), BrokerConfig::default()).unwrap();
    b.create_topic(
        "t",
        TopicConfig {
            partitions: 2,
            ..TopicConfig::default()
        },
    )
    .await
    .unwrap();
    b.create_group(
        "t",
        "g",
        GroupConfig {
            start: StartAt::Earliest,
            ack_wait_ms: 60_000,
            ..GroupConfig::default()
        },
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = meshwork_mq::grpc::service_with(b.clone(), Duration::from_millis(300));
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = BrokerClient::new(channel);
    (client, b, dir)
}

fn msg(body: &str) -> OutMessage {
    OutMessage {
        body: body.as_bytes().to_vec().into(),
        ..OutMessage::default()
    }
}

fn req(kind: Kind) -> ConsumeRequest {
    ConsumeRequest { kind: Some(kind) }
}

fn settle(ps: &[(u32, u64)], delay_ms: u64) -> Settle {
    Settle {
        positions: ps
            .iter()
            .map(|&(partition, offset)| Position { partition, offset })
            .collect(),
        delay_ms,
    }
}

/// Opens a Consume stream on `t`/`g` with `credit`.
async fn consume(
    client: &mut BrokerClient<Channel>,
    credit: u32,
) -> (
    mpsc::Sender<ConsumeRequest>,
    tonic::Streaming<ConsumeResponse>,
) {
    let (tx, rx) = mpsc::channel(16);
    tx.send(req(Kind::Subscribe(Subscribe {
        topic: "t".into(),
        group: "g".into(),
        consumer: String::new(),
        credit,
    })))
    .await
    .unwrap();
    let stream = client
        .consume(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

async fn next(s: &mut tonic::Streaming<ConsumeResponse>) -> ConsumeResponse {
    tokio::time::timeout(Duration::from_secs(20), s.message())
        .await
        .expect("a response in time")
        .unwrap()
        .expect("the stream goes on")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_then_consume_within_credit_with_acks_nacks_and_extensions() {
    let (mut client, b, _dir) = start().await;
    let r = client
        .publish(PublishRequest {
            topic: "t".into(),
            messages: (0..5).map(|i| msg(&format!("m{i}"))).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), 5);

    let (tx, mut stream) = consume(&mut client, 2).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend(next(&mut stream).await.deliveries);
    }
    assert_eq!(got.len(), 2, "no more than the credit");
    // Nothing more arrives without credit.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.message())
            .await
            .is_err()
    );
    assert_eq!(b.group_info("t", "g").unwrap().unacked, 2);

    // Ack the first, extend then nack the second: it comes back as delivery 2.
    let (a, n) = (&got[0], &got[1]);
    tx.send(req(Kind::Ack(settle(&[(a.partition, a.offset)], 0))))
        .await
        .unwrap();
    tx.send(req(Kind::Extend(settle(&[(n.partition, n.offset)], 5_000))))
        .await
        .unwrap();
    tx.send(req(Kind::Nack(settle(&[(n.partition, n.offset)], 0))))
        .await
        .unwrap();
    tx.send(req(Kind::Credit(10))).await.unwrap();
    let mut rest = Vec::new();
    while rest.len() < 4 {
        rest.extend(next(&mut stream).await.deliveries);
    }
    let again = rest
        .iter()
        .find(|d| (d.partition, d.offset) == (n.partition, n.offset))
        .expect("the nacked one again");
    assert_eq!(again.delivery, 2);
    let all: Vec<(u32, u64)> = rest.iter().map(|d| (d.partition, d.offset)).collect();
    tx.send(req(Kind::Ack(settle(&all, 0)))).await.unwrap();
    meshwork_testkit::eventually("everything acked", Duration::from_secs(20), || {
        let b = b.clone();
        async move {
            let i = b.group_info("t", "g").unwrap();
            (i.backlog == 0 && i.unacked == 0).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_service_refuses() {
    let (mut client, b, _dir) = start().await;
    // Publish: nothing, too big, an unknown topic.
    let publish = |topic: &str, messages: Vec<OutMessage>| PublishRequest {
        topic: topic.into(),
        messages,
    };
    let e = client.publish(publish("t", vec![])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let big = OutMessage {
        body: vec![b'x'; 2 << 20].into(),
        ..OutMessage::default()
    };
    let e = client.publish(publish("t", vec![big])).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    let e = client
        .publish(publish("nope", vec![msg("x")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");

    // Consume: not opened with subscribe; an unknown group.
    let (tx, rx) = mpsc::channel(4);
    tx.send(req(Kind::Credit(1))).await.unwrap();
    let e = client.consume(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let (tx, rx) = mpsc::channel(4);
    tx.send(req(Kind::Subscribe(Subscribe {
        topic: "t".into(),
        group: "nobody".into(),
        consumer: String::new(),
        credit: 1,
    })))
    .await
    .unwrap();
    let e = client.consume(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    // A stream that never says anything is closed at the subscribe deadline.
    let (_silent, rx) = mpsc::channel::<ConsumeRequest>(1);
    let e = tokio::time::timeout(
        Duration::from_secs(20),
        client.consume(ReceiverStream::new(rx)),
    )
    .await
    .expect("the broker ends it")
    .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");

    // An ack of a delivery that was never made ends the stream with its status,
    // and changes nothing.
    client
        .publish(publish("t", vec![msg("keep")]))
        .await
        .unwrap();
    let (tx, mut stream) = consume(&mut client, 0).await;
    tx.send(req(Kind::Ack(settle(&[(0, 999_999)], 0))))
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert_eq!(b.group_info("t", "g").unwrap().backlog, 1, "nothing lost");
}

/// A consumer that vanishes mid-stream holding deliveries costs nobody else:
/// another stream gets them after their ack deadline, counted as a second delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_vanishes_holding_deliveries_loses_nothing() {
    let (mut client, b, _dir) = start().await;
    b.create_group(
        "t",
        "quick",
        GroupConfig {
            start: StartAt::Earliest,
            ack_wait_ms: 300,
            ..GroupConfig::default()
        },
    )
    .await
    .unwrap();
    client
        .publish(PublishRequest {
            topic: "t".into(),
            messages: vec![msg("held")],
        })
        .await
        .unwrap();
    let open = |c: &mut BrokerClient<Channel>| {
        let mut c = c.clone();
        async move {
            let (tx, rx) = mpsc::channel(4);
            tx.send(req(Kind::Subscribe(Subscribe {
                topic: "t".into(),
                group: "quick".into(),
                consumer: String::new(),
                credit: 5,
            })))
            .await
            .unwrap();
            let s = c
                .consume(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            (tx, s)
        }
    };
    let (tx, mut first) = open(&mut client).await;
    let got = next(&mut first).await;
    assert_eq!(got.deliveries[0].delivery, 1);
    // Gone without a word: both halves dropped, nothing acked.
    drop((tx, first));
    let (_tx, mut second) = open(&mut client).await;
    let again = next(&mut second).await;
    assert_eq!(again.deliveries[0].body.as_ref(), b"held");
    assert_eq!(again.deliveries[0].delivery, 2);
}
