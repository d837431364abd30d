//! The HTTP/1 engine's connection loop (`meshwork_gateway::h1::server`)
//! over real sockets, with the clients a server meets: pipelining ones,
//! ones that send ambiguous or oversized heads, send a head a byte at a
//! time, connect and send nothing, give up mid-upload, stall mid-body, or
//! wait for `100 Continue`. What one of them does must stay with it.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use meshwork_gateway::h1::body::CopyLimits;
use meshwork_gateway::h1::server::{Flow, Handler, Request, ServerLimits, serve};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Answers `TARGET BODY-BYTES` for every request (the body read whole,
/// framing included); leaves the body of `/skip` unread; answers `/deny`
/// 401 first and then drops its body.
#[derive(Clone, Default)]
struct Echo {
    handled: Arc<AtomicUsize>,
    body_errors: Arc<AtomicUsize>,
    /// Requests the server said were their connection's last.
    lasts: Arc<AtomicUsize>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Handler<S> for Echo {
    async fn handle(&mut self, req: &mut Request<'_, S>) -> Flow {
        self.handled.fetch_add(1, Ordering::SeqCst);
        if req.is_last() {
            self.lasts.fetch_add(1, Ordering::SeqCst);
        }
        let Some(bytes) = req.head_bytes() else {
            return Flow::Close;
        };
        let target = String::from_utf8_lossy(&bytes[req.head().target.clone()]).into_owned();
        if target == "/deny" {
            // Answered before the body, which is then dropped.
            let answer = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 4\r\n\r\ndeny";
            if req.respond(answer).await.is_err() || req.discard_body().await.is_err() {
                return Flow::Close;
            }
            return Flow::KeepAlive;
        }
        let mut body = Vec::new();
        if target != "/skip"
            && req
                .send_with_body(&mut body, &mut Vec::new())
                .await
                .is_err()
        {
            self.body_errors.fetch_add(1, Ordering::SeqCst);
            return Flow::Close;
        }
        let text = format!("{target} {}", body.len());
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        match req.respond(answer.as_bytes()).await {
            Ok(()) => Flow::KeepAlive,
            Err(_) => Flow::Close,
        }
    }
}

/// A server on loopback serving every connection with `echo` and `limits`.
async fn server(limits: ServerLimits, echo: Echo) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let mut echo = echo.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let _ = serve(&mut s, &limits, &mut echo, &mut buf).await;
            });
        }
    });
    addr
}

/// Reads until `n` complete responses (each `content-length`-framed) or
/// the close; returns their bodies and whether the server closed.
async fn responses<S: AsyncRead + Unpin>(s: &mut S, n: usize) -> (Vec<String>, bool) {
    let mut got = Vec::new();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // Take every complete response buffered so far.
        loop {
            let text = String::from_utf8_lossy(&got).into_owned();
            let Some(head_end) = text.find("\r\n\r\n") else {
                break;
            };
            let len: usize = text[..head_end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() < head_end + 4 + len {
                break;
            }
            out.push(format!(
                "{} | {}",
                text[..head_end].lines().next().unwrap(),
                &text[head_end + 4..head_end + 4 + len]
            ));
            got.drain(..head_end + 4 + len);
        }
        if out.len() >= n {
            return (out, false);
        }
        let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the server neither answered nor closed within 10 s");
        match r {
            Ok(0) | Err(_) => return (out, true),
            Ok(k) => got.extend_from_slice(&buf[..k]),
        }
    }
}

fn short(limits: &mut ServerLimits) {
    limits.header_read_timeout = Duration::from_millis(300);
    limits.idle_timeout = Duration::from_millis(300);
    limits.body = CopyLimits {
        read_timeout: Some(Duration::from_millis(300)),
        ..CopyLimits::default()
    };
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_the_connection_kept() {
    let addr = server(ServerLimits::default(), Echo::default()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let chunked = "5;x=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n";
    s.write_all(
        format!(
            "GET /a HTTP/1.1\r\nHost: h\r\n\r\n\
             POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello\
             POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}\
             GET /d HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (got, closed) = responses(&mut s, 4).await;
    assert!(!closed);
    assert_eq!(
        got,
        [
            "HTTP/1.1 200 OK | /a 0",
            "HTTP/1.1 200 OK | /b 5",
            &format!("HTTP/1.1 200 OK | /c {}", chunked.len()),
            "HTTP/1.1 200 OK | /d 0",
        ]
    );
    // The same connection serves the next request; one asking to close is
    // answered, then the connection closes.
    s.write_all(b"GET /e HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = responses(&mut s, 1).await;
    assert_eq!(got, ["HTTP/1.1 200 OK | /e 0"]);
    let (more, closed) = responses(&mut s, 1).await;
    assert!(more.is_empty() && closed);
}

#[tokio::test]
async fn a_refused_head_is_answered_with_its_status_and_reaches_no_handler() {
    let echo = Echo::default();
    let addr = server(ServerLimits::default(), echo.clone()).await;
    for (head, status, says) in [
        (
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
            "both Content-Length and Transfer-Encoding",
        ),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
            "more than one Host",
        ),
        (
            "GET / HTTP/1.1\r\nHost: h\r\nX:  \r\n folded\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
            "malformed",
        ),
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let (got, closed) = responses(&mut s, 2).await;
        assert_eq!(got.len(), 1, "{head:?}: {got:?}");
        assert!(
            got[0].starts_with(status) && got[0].contains(says),
            "{got:?}"
        );
        assert!(closed);
    }
    // A head past the limit: 431, wherever the reads split it.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let big = format!("GET / HTTP/1.1\r\nHost: h\r\nX: {}\r\n", "a".repeat(20_000));
    let _ = s.write_all(big.as_bytes()).await;
    let (got, closed) = responses(&mut s, 2).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].starts_with("HTTP/1.1 431 "), "{got:?}");
    assert!(closed);
    assert_eq!(echo.handled.load(Ordering::SeqCst), 0);
    // A good request before a bad one in the same write is still answered.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /ok HTTP/1.1\r\nHost: h\r\n\r\nGET /bad HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\nHost: h\r\n\r\nx",
    )
    .await
    .unwrap();
    let (got, closed) = responses(&mut s, 3).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0], "HTTP/1.1 200 OK | /ok 0");
    assert!(got[1].starts_with("HTTP/1.1 400 ") && got[1].contains("more than one Content-Length"));
    assert!(closed);
}

#[tokio::test]
async fn a_head_sent_a_byte_at_a_time_is_cut_at_the_header_timeout() {
    let mut limits = ServerLimits::default();
    short(&mut limits);
    let echo = Echo::default();
    let addr = server(limits, echo.clone()).await;
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    // 40 bytes, one every 50 ms: 2 s for a head the server gives 300 ms.
    let slow = tokio::spawn(async move {
        for b in b"GET / HTTP/1.1\r\nHost: h\r\nX-Slow: aaaaaaaa\r\n\r\n" {
            if w.write_all(&[*b]).await.is_err() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut got))
        .await
        .unwrap()
        .ok();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408 Request Timeout"), "{text}");
    assert_eq!(echo.handled.load(Ordering::SeqCst), 0);
    slow.abort();
}

#[tokio::test]
async fn idle_connections_are_closed_and_do_not_hold_others_up() {
    let mut limits = ServerLimits::default();
    short(&mut limits);
    let addr = server(limits, Echo::default()).await;
    // Many connections that send nothing.
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // Another client is served meanwhile.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /busy HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = responses(&mut s, 1).await;
    assert_eq!(got, ["HTTP/1.1 200 OK | /busy 0"]);
    // Each idle one is closed by the server (no answer: nothing was asked),
    // and so is the served one once it idles.
    for mut c in idle.into_iter().chain([s]) {
        let (got, closed) = responses(&mut c, 1).await;
        assert!(got.is_empty() && closed);
    }
}

#[tokio::test]
async fn an_upload_given_up_or_stalled_ends_only_its_own_connection() {
    let mut limits = ServerLimits::default();
    short(&mut limits);
    let echo = Echo::default();
    let addr = server(limits, echo.clone()).await;
    // Gives up after 10 of 1,000 bytes.
    let mut quitter = TcpStream::connect(addr).await.unwrap();
    quitter
        .write_all(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n0123456789")
        .await
        .unwrap();
    quitter.shutdown().await.unwrap();
    // Stalls after 10 bytes, connection held open.
    let mut staller = TcpStream::connect(addr).await.unwrap();
    staller
        .write_all(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n0123456789")
        .await
        .unwrap();
    // Meanwhile another client's upload goes through whole.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /fine HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")
        .await
        .unwrap();
    let (got, _) = responses(&mut s, 1).await;
    assert_eq!(got, ["HTTP/1.1 200 OK | /fine 3"]);
    for c in [&mut quitter, &mut staller] {
        let (got, closed) = responses(c, 1).await;
        assert!(got.is_empty() && closed, "{got:?}");
    }
    assert_eq!(echo.body_errors.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body_is_read() {
    let addr = server(ServerLimits::default(), Echo::default()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PUT /e HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&first, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"hello").await.unwrap();
    let (got, _) = responses(&mut s, 1).await;
    assert_eq!(got, ["HTTP/1.1 200 OK | /e 5"]);
}

#[tokio::test]
async fn a_body_left_unread_closes_the_connection_after_the_answer() {
    let addr = server(ServerLimits::default(), Echo::default()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The pipelined request after the unread body cannot be found safely.
    s.write_all(
        b"POST /skip HTTP/1.1\r\nHost: h\r\nContent-Length: 37\r\n\r\nGET /hidden HTTP/1.1\r\nHost: h\r\n\r\n\r\n\r\n",
    )
    .await
    .unwrap();
    let (got, closed) = responses(&mut s, 2).await;
    assert_eq!(got, ["HTTP/1.1 200 OK | /skip 0"]);
    assert!(closed);
}

#[tokio::test]
async fn a_client_waiting_for_100_continue_is_not_told_to_send_a_refused_body() {
    let addr = server(ServerLimits::default(), Echo::default()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"PUT /deny HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    .await
    .unwrap();
    let (got, closed) = responses(&mut s, 2).await;
    assert_eq!(got, ["HTTP/1.1 401 Unauthorized | deny"]);
    assert!(closed, "the body was never sent, so the connection ends");
    // Sent along with the head, the body is dropped and the connection kept.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PUT /deny HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhelloGET /after HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = responses(&mut s, 2).await;
    assert_eq!(
        got,
        [
            "HTTP/1.1 401 Unauthorized | deny",
            "HTTP/1.1 200 OK | /after 0"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_crlf_after_a_body_does_not_start_the_next_heads_clock() {
    let mut limits = ServerLimits::default();
    short(&mut limits);
    limits.header_read_timeout = Duration::from_millis(200);
    limits.idle_timeout = Duration::from_secs(10);
    // Over an in-memory connection on tokio's paused clock: the wait below
    // passes the head timeout exactly, whatever the machine's load.
    let (mut s, mut conn) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = serve(&mut conn, &limits, &mut Echo::default(), &mut buf).await;
    });
    s.write_all(b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello\r\n")
        .await
        .unwrap();
    let (got, _) = responses(&mut s, 1).await;
    assert_eq!(got, ["HTTP/1.1 200 OK | /b 5"]);
    // Well past the head timeout, within the idle one: still open, and
    // the next request is served (a 408 would have closed it).
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.write_all(b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = responses(&mut s, 1).await;
    assert_eq!(got, ["HTTP/1.1 200 OK | /c 0"]);
}

/// Serves `/engine...` with [`Echo`] and hands every other request off.
#[derive(Clone)]
struct EngineFirst {
    echo: Echo,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Handler<S> for EngineFirst {
    async fn handle(&mut self, req: &mut Request<'_, S>) -> Flow {
        let Some(bytes) = req.head_bytes() else {
            return Flow::Close;
        };
        if !bytes[req.head().target.clone()].starts_with(b"/engine") {
            return Flow::HandOff;
        }
        self.echo.handle(req).await
    }

    async fn stopping(&mut self) {
        let _ = self.stop.wait_for(|s| *s).await;
    }
}

/// A server whose connections start on the engine and go on with hyper
/// from the first request the engine hands off (hyper answers
/// `hyper TARGET BODY-BYTES`).
async fn engine_then_hyper(stop: tokio::sync::watch::Receiver<bool>) -> SocketAddr {
    use http_body_util::BodyExt;
    use meshwork_gateway::h1::server::{Prefixed, Served};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let handler = EngineFirst {
        echo: Echo::default(),
        stop,
    };
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let mut handler = handler.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                // A head timeout well past `responses`' 10 s, so that only
                // the stop can close a silent connection within them.
                let limits = ServerLimits {
                    header_read_timeout: Duration::from_secs(60),
                    ..ServerLimits::default()
                };
                let Ok(Served::HandedOff { at, end }) =
                    serve(&mut s, &limits, &mut handler, &mut buf).await
                else {
                    return;
                };
                let io = Prefixed::new(buf[at..end].to_vec(), s);
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let target = req.uri().to_string();
                        let n = req
                            .into_body()
                            .collect()
                            .await
                            .map_or(0, |b| b.to_bytes().len());
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(format!(
                                "hyper {target} {n}"
                            ))),
                        ))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_handed_off_request_and_those_after_it_are_served_by_the_next_server() {
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let addr = engine_then_hyper(stop).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    // Pipelined in one write: the engine answers the first, hands off the
    // second (its head, its body and the third request are already in the
    // engine's buffer), and hyper reads them as if it had read them itself.
    s.write_all(
        b"GET /engine/1 HTTP/1.1\r\nHost: h\r\n\r\n\
          POST /other HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello\
          GET /engine/2 HTTP/1.1\r\nHost: h\r\n\r\n",
    )
    .await
    .unwrap();
    let (got, closed) = responses(&mut s, 3).await;
    assert!(!closed);
    assert_eq!(
        got,
        [
            "HTTP/1.1 200 OK | /engine/1 0",
            "HTTP/1.1 200 OK | hyper /other 5",
            "HTTP/1.1 200 OK | hyper /engine/2 0",
        ]
    );
    // A request that arrives alone, after the hand-off, is hyper's too.
    s.write_all(b"GET /engine/3 HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = responses(&mut s, 1).await;
    assert_eq!(got, ["HTTP/1.1 200 OK | hyper /engine/3 0"]);
}

#[tokio::test]
async fn a_stopping_server_closes_connections_waiting_for_a_request() {
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let addr = engine_then_hyper(stop).await;
    // One connection that has sent nothing yet, one between requests.
    let mut fresh = TcpStream::connect(addr).await.unwrap();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /engine/1 HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let (got, closed) = responses(&mut idle, 1).await;
    assert_eq!(
        (got.as_slice(), closed),
        (&["HTTP/1.1 200 OK | /engine/1 0".to_string()][..], false)
    );
    stop_tx.send(true).unwrap();
    // Closed without an answer (without the stop it would wait for the 75 s
    // idle timeout, and `responses` gives up after 10 s).
    let (more, closed) = responses(&mut idle, 1).await;
    assert!(more.is_empty() && closed);
    let (more, closed) = responses(&mut fresh, 1).await;
    assert!(more.is_empty() && closed);
}

#[tokio::test]
async fn a_connection_closes_after_its_last_request() {
    let limits = ServerLimits {
        max_requests: 2,
        ..ServerLimits::default()
    };
    let echo = Echo::default();
    let addr = server(limits, echo.clone()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n\
          GET /2 HTTP/1.1\r\nHost: h\r\n\r\n\
          GET /3 HTTP/1.1\r\nHost: h\r\n\r\n",
    )
    .await
    .unwrap();
    let (got, closed) = responses(&mut s, 3).await;
    assert_eq!(got, ["HTTP/1.1 200 OK | /1 0", "HTTP/1.1 200 OK | /2 0"]);
    assert!(closed);
    // The handler was told the second was the last (to say so), and the
    // third never reached it.
    assert_eq!(echo.lasts.load(Ordering::SeqCst), 1);
    assert_eq!(echo.handled.load(Ordering::SeqCst), 2);
}
