//! Connection floods and silent clients against a real `meshwork server`:
//! idle sockets by the thousand must not stop the store, connections over
//! the limit are refused and counted, and clients that stall a request head,
//! a request body or an idle connection are cut off at their deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use meshwork_etcd::Client;
use meshwork_etcd::proto::etcdserverpb as pb;
use meshwork_testkit::blocking::until;
use meshwork_testkit::http::blocking as http;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `n` connections to `addr` that send nothing (this process's own
/// open-files limit raised to its hard limit first, to hold them).
fn idle_connections(addr: &str, n: usize) -> Vec<TcpStream> {
    #[allow(unsafe_code)]
    // SAFETY: getrlimit/setrlimit on structs we own, for this process.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    (0..n)
        .map(|i| TcpStream::connect(addr).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect()
}

/// Whether the server closed `s` (EOF or reset) within `within`; bytes it
/// sent first (a 408, say) are returned.
fn closed_within(s: &mut TcpStream, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return None;
            }
            Err(_) => return Some(String::from_utf8_lossy(&got).into_owned()),
        }
    }
}

/// The value of an unlabelled-or-labelled sample in `/metrics`, or 0.
fn metric(node: &str, name_and_labels: &str) -> f64 {
    let (_, text) = http::get(node, "/metrics").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn put(client: &mut Client, key: &str) {
    client
        .kv
        .put(pb::PutRequest {
            key: key.as_bytes().to_vec().into(),
            value: b"v".to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"));
}

/// The case: the usual soft limit of 1,024 descriptors and more
/// idle connections than that, on both ports. The server raises its soft
/// limit to the hard one, as etcd does, so every connection is taken and the
/// store keeps committing, during the flood and after it.
#[test]
fn idle_connections_past_a_1024_soft_limit_do_not_stop_the_store() {
    let dir = tempfile::tempdir().unwrap();
    // Long deadlines: the idle sockets must stay open for the whole test.
    let config = dir.path().join("meshwork.toml");
    std::fs::write(
        &config,
        "[listen]\nheader_read_timeout_ms = 120000\nidle_timeout_ms = 120000\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let server = meshwork_tests::start_with_nofile(
        &data,
        &["--config", config.to_str().unwrap()],
        &[],
        1024,
        8192,
    );
    let rt = rt();
    let mut client = rt
        .block_on(Client::connect(std::slice::from_ref(&server.etcd)))
        .unwrap();
    let http_idle = idle_connections(&server.http, 2000);
    let etcd_idle = idle_connections(&server.etcd, 2000);
    rt.block_on(async {
        for i in 0..20 {
            put(&mut client, &format!("during/{i}")).await;
        }
    });
    assert_eq!(http::get(&server.http, "/readyz").unwrap().0, 200);
    // Every idle socket was taken (the kernel completes connects before
    // the server accepts them: wait for the count to catch up; one deadline
    // for both ports).
    let deadline = Instant::now() + Duration::from_secs(30);
    for listener in ["etcd", "http"] {
        let sample = format!("meshwork_listener_connections{{listener=\"{listener}\"}}");
        until(
            &format!("the {listener} port to take every connection"),
            deadline.saturating_duration_since(Instant::now()),
            || metric(&server.http, &sample) >= 2000.0,
        );
    }
    drop(http_idle);
    drop(etcd_idle);
    rt.block_on(async {
        let mut fresh = Client::connect(std::slice::from_ref(&server.etcd))
            .await
            .unwrap();
        put(&mut fresh, "after").await;
        let r = fresh
            .kv
            .range(pb::RangeRequest {
                key: "during/".into(),
                range_end: "during0".into(),
                count_only: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.count, 20);
    });
    assert_eq!(http::get(&server.http, "/readyz").unwrap().0, 200);
}

/// A hard limit of 1,024 that cannot be raised: the ports take what fits
/// (leaving descriptors for the store) and close the rest on accept, counted;
/// a client already connected keeps committing through the flood.
#[test]
fn connections_over_the_limit_are_refused_and_counted_while_the_store_commits() {
    let dir = tempfile::tempdir().unwrap();
    let server = meshwork_tests::start_with_nofile(dir.path(), &[], &[], 1024, 1024);
    let rt = rt();
    let mut client = rt
        .block_on(Client::connect(std::slice::from_ref(&server.etcd)))
        .unwrap();
    let mut http_idle = idle_connections(&server.http, 1100);
    let mut etcd_idle = idle_connections(&server.etcd, 1100);
    rt.block_on(async {
        for i in 0..20 {
            put(&mut client, &format!("during/{i}")).await;
        }
    });
    // Those over the limit were closed by the server at once.
    let refused = |conns: &mut Vec<TcpStream>| {
        conns
            .iter_mut()
            .rev()
            .take(600)
            .map(|s| closed_within(s, Duration::from_millis(200)).is_some())
            .filter(|&closed| closed)
            .count()
    };
    assert!(
        refused(&mut http_idle) >= 500,
        "HTTP port closed the surplus"
    );
    assert!(
        refused(&mut etcd_idle) >= 500,
        "etcd port closed the surplus"
    );
    drop(http_idle);
    drop(etcd_idle);
    rt.block_on(put(&mut client, "after"));
    // The slots come back as the closes are seen; then /metrics answers.
    until(
        "the HTTP port to take connections again",
        Duration::from_secs(10),
        || http::get(&server.http, "/readyz").map(|r| r.0).ok() == Some(200),
    );
    let http_refused = metric(
        &server.http,
        "meshwork_listener_refused_connections_total{listener=\"http\"}",
    );
    let etcd_refused = metric(
        &server.http,
        "meshwork_listener_refused_connections_total{listener=\"etcd\"}",
    );
    assert!(http_refused >= 500.0, "refusals counted: {http_refused}");
    assert!(etcd_refused >= 500.0, "refusals counted: {etcd_refused}");
}

/// Short deadlines: a stalled request head, a stalled body, an idle
/// keep-alive connection and a silent gRPC connection are each closed, and
/// the stalled body is answered 408 in the API's JSON error shape.
#[test]
fn silent_and_stalled_clients_are_cut_off_at_their_deadlines() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("meshwork.toml");
    std::fs::write(
        &config,
        "[listen]\nheader_read_timeout_ms = 300\nbody_read_timeout_ms = 300\nidle_timeout_ms = 600\nmax_body_bytes = 1000\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let server = meshwork_tests::start(&data, &["--config", config.to_str().unwrap()], &[]);
    let limit = Duration::from_secs(10);

    let mut head = TcpStream::connect(&server.http).unwrap();
    head.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    assert!(
        closed_within(&mut head, limit).is_some(),
        "a stalled head is closed"
    );

    let mut body = TcpStream::connect(&server.http).unwrap();
    body.write_all(b"POST /v1/lock/a HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"ttl")
        .unwrap();
    let answer = closed_within(&mut body, limit).expect("a stalled body is closed");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");

    let mut big = TcpStream::connect(&server.http).unwrap();
    big.write_all(b"POST /v1/lock/a HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n")
        .unwrap();
    let answer = closed_within(&mut big, limit).expect("an oversized body is refused");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("max_body_bytes"), "{answer}");

    // An upload aborted mid-body (the client closes after 10 of 100 bytes)
    // costs nobody else anything: the next request is served.
    let mut aborted = TcpStream::connect(&server.http).unwrap();
    aborted
        .write_all(b"POST /v1/lock/a HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"ttl_secs")
        .unwrap();
    drop(aborted);
    assert_eq!(http::get(&server.http, "/readyz").unwrap().0, 200);

    let mut idle = TcpStream::connect(&server.http).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let answer = closed_within(&mut idle, limit).expect("an idle keep-alive connection is closed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let mut grpc = TcpStream::connect(&server.etcd).unwrap();
    assert!(
        closed_within(&mut grpc, limit).is_some(),
        "a silent etcd connection is closed"
    );

    assert!(
        metric(
            &server.http,
            "meshwork_listener_timeouts_total{listener=\"http\"}"
        ) >= 1.0
    );
    assert!(
        metric(
            &server.http,
            "meshwork_listener_timeouts_total{listener=\"etcd\"}"
        ) >= 1.0
    );
    assert_eq!(http::get(&server.http, "/readyz").unwrap().0, 200);
}
