//! Retries of requests with bodies: the body is kept while it streams (up to
//! `retry_buffer_bytes`) and sent again, byte for byte, on a retry; a larger
//! body is streamed once and not retried.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use meshwork_testkit::upstream::{FirstHit, Flaky};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A deterministic, non-repeating-looking body of `len` bytes.
fn payload(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect::<Vec<u8>>()
        .into()
}

fn routes(addr: SocketAddr, extra: &str) -> String {
    format!(
        r#"
        [[routes]]
        name = "orders"
        [routes.forward]
        upstreams = ["{addr}"]
        outlier_detection = false
        retry = {{ max_attempts = 3, initial_backoff_ms = 1, max_backoff_ms = 2 }}
        {extra}
        "#
    )
}

type Chunks =
    StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, std::io::Error>>>;

/// Opens an HTTP/1.1 connection to `addr` and sends a POST whose body is
/// fed chunk by chunk through the returned sender (chunked encoding unless
/// `content_length` is given).
async fn post_streaming(
    addr: SocketAddr,
    content_length: Option<usize>,
) -> (
    mpsc::Sender<Bytes>,
    tokio::task::JoinHandle<(StatusCode, Bytes)>,
) {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
    });
    let body: Chunks = StreamBody::new(Box::pin(stream));
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::post(format!("http://{addr}/orders")).header("host", "shop.test");
    if let Some(n) = content_length {
        req = req.header("content-length", n);
    }
    let req = req.body(body).unwrap();
    let task = tokio::spawn(async move {
        let resp = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req))
            .await
            .expect("response timed out")
            .expect("request failed");
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, body)
    });
    (tx, task)
}

#[tokio::test]
async fn post_body_is_replayed_after_a_503() {
    let up = Flaky::start(FirstHit::Answer503).await;
    let gw = Gw::start(&routes(up.addr, "retry_all_methods = true")).await;
    let body = payload(40 * 1024);
    let r = send(
        &client(),
        req("POST", &gw.url("/orders"))
            .body(Full::new(body.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, body, "the retry's body came back different");
    assert_eq!(up.hits(), 2);
    assert_eq!(up.bodies(), vec![body.clone(), body]);
}

#[tokio::test]
async fn streamed_body_is_replayed_after_the_upstream_drops_mid_body() {
    for content_length in [None, Some(30 * 1024)] {
        let up = Flaky::start(FirstHit::CloseAfter(1)).await;
        let gw = Gw::start(&routes(up.addr, "retry_all_methods = true")).await;
        let body = payload(30 * 1024);
        let (tx, resp) = post_streaming(gw.addr, content_length).await;
        // First chunk; the upstream drops the connection once it has part of
        // it; the rest is sent only then, so the retry has to replay the
        // kept part and continue with the client's stream.
        tx.send(body.slice(..10 * 1024)).await.unwrap();
        up.failed.notified().await;
        tx.send(body.slice(10 * 1024..20 * 1024)).await.unwrap();
        tx.send(body.slice(20 * 1024..)).await.unwrap();
        drop(tx);
        let (status, got) = resp.await.unwrap();
        assert_eq!(
            status,
            200,
            "{content_length:?}: {}",
            String::from_utf8_lossy(&got)
        );
        assert_eq!(got, body, "{content_length:?}");
        assert_eq!(up.hits(), 2, "{content_length:?}");
        assert_eq!(up.bodies(), vec![body], "{content_length:?}");
    }
}

#[tokio::test]
async fn body_over_the_retry_buffer_is_not_retried_and_arrives_intact() {
    let up = Flaky::start(FirstHit::Answer503).await;
    let gw = Gw::start(&routes(
        up.addr,
        "retry_all_methods = true\nretry_buffer_bytes = 1024",
    ))
    .await;
    let c = client();
    let body = payload(4096);
    // Declared length over the limit: streamed, the 503 goes to the client.
    let r = send(
        &c,
        req("POST", &gw.url("/orders"))
            .body(Full::new(body.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(up.hits(), 1);
    // The next one goes through, unchanged.
    let r = send(
        &c,
        req("POST", &gw.url("/orders"))
            .body(Full::new(body.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, body);
    assert_eq!(up.bodies(), vec![body.clone(), body]);
}

#[tokio::test]
async fn unknown_length_body_growing_past_the_buffer_is_not_retried() {
    let up = Flaky::start(FirstHit::CloseAfter(1)).await;
    let gw = Gw::start(&routes(
        up.addr,
        "retry_all_methods = true\nretry_buffer_bytes = 1024",
    ))
    .await;
    let body = payload(8 * 1024);
    let (tx, resp) = post_streaming(gw.addr, None).await;
    tx.send(body.slice(..4096)).await.unwrap();
    up.failed.notified().await;
    // The gateway may still take the rest before it sees the drop; either
    // way the body went past the limit and is not sent again.
    let _ = tx.send(body.slice(4096..)).await;
    drop(tx);
    let (status, got) = resp.await.unwrap();
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&got));
    let err: serde_json::Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(err["error"]["code"], "upstream_unavailable");
    assert_eq!(up.hits(), 1, "retried although over the limit");
    assert!(up.bodies().is_empty());
}

#[tokio::test]
async fn post_without_retry_all_methods_is_not_retried_after_it_was_sent() {
    let up = Flaky::start(FirstHit::Answer503).await;
    let gw = Gw::start(&routes(up.addr, "")).await;
    let body = payload(2048);
    let r = send(
        &client(),
        req("POST", &gw.url("/orders"))
            .body(Full::new(body.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 503);
    assert_eq!(up.hits(), 1);
    assert_eq!(up.bodies(), vec![body]);
}

#[tokio::test]
async fn post_with_body_is_retried_on_connect_failure_without_retry_all_methods() {
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let up = Flaky::start(FirstHit::Answer503).await;
    // Weighted round robin over [dead, live]: the dead one is tried first
    // for one of every two requests.
    let routes = format!(
        r#"
        [[routes]]
        name = "orders"
        [routes.forward]
        upstreams = ["{dead}", "{}"]
        lb = {{ policy = "wrr" }}
        outlier_detection = false
        retry = {{ max_attempts = 2, initial_backoff_ms = 1, max_backoff_ms = 2 }}
        "#,
        up.addr
    );
    let gw = Gw::start(&routes).await;
    let c = client();
    let body = payload(100 * 1024);
    // The first request that reaches the upstream gets its 503 (POST, sent:
    // not retried); every other one is 200 even when it tried `dead` first.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = send(
            &c,
            req("POST", &gw.url("/orders"))
                .body(Full::new(body.clone()))
                .unwrap(),
        )
        .await;
        if r.status == 200 {
            assert_eq!(r.body, body);
        }
        statuses.push(r.status.as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 503).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(up.hits(), 4);
    let ups = gw.gateway.upstreams();
    let dead_ep = ups[0]
        .endpoints
        .iter()
        .find(|e| e.addr == dead)
        .expect("dead endpoint listed");
    assert!(dead_ep.failures >= 1, "{ups:?}");
}
