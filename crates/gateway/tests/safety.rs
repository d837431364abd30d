//! The gateway's safety rules, over real sockets: one authority per
//! request, failure attribution (a client's fault never touches an
//! upstream's health), ejection limits and HTTP/1.0 upstreams.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn two_hosts_one_upstream(up: &Upstream) -> String {
    format!(
        r#"
        [[routes]]
        name = "admin"
        match = {{ hosts = ["admin.test"] }}
        auth = {{ api_keys = {{ header = "x-api-key", keys = {{ ops = "k-secret" }} }} }}
        [routes.forward]
        upstreams = ["{a}"]

        [[routes]]
        name = "public"
        match = {{ hosts = ["public.test"] }}
        [routes.forward]
        upstreams = ["{a}"]

        [[routes]]
        name = "any"
        [routes.forward]
        upstreams = ["{a}"]
        "#,
        a = up.addr
    )
}

/// One route `name` over `ups` with `extra` lines in its forward table.
fn route_over(name: &str, ups: &[&Upstream], extra: &str) -> String {
    let list: Vec<String> = ups.iter().map(|u| format!("\"{}\"", u.addr)).collect();
    format!(
        "[[routes]]\nname = \"{name}\"\n[routes.forward]\nupstreams = [{}]\n{extra}\n",
        list.join(", ")
    )
}

fn status_of(resp: &str) -> u16 {
    resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// The body of the first response in `resp` (JSON echo of the upstream).
fn echo_of(resp: &str) -> serde_json::Value {
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

#[tokio::test]
async fn absolute_form_target_wins_over_host_and_cannot_bypass_auth() {
    let up = Upstream::start("a").await;
    let gw = Gw::start(&two_hosts_one_upstream(&up)).await;
    // Routed by the target's authority, and forwarded with that authority.
    let resp = raw(
        gw.addr,
        b"GET http://public.test/a HTTP/1.1\r\nHost: admin.test\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    let echo = echo_of(&resp);
    assert_eq!(echo["headers"]["host"], "public.test", "{resp}");
    assert_eq!(echo["path"], "/a");
    // The other way round: the admin route asks for its key.
    let resp = raw(
        gw.addr,
        b"GET http://admin.test/a HTTP/1.1\r\nHost: public.test\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), 401, "{resp}");
    let resp = raw(
        gw.addr,
        b"GET http://admin.test/a HTTP/1.1\r\nHost: public.test\r\nx-api-key: k-secret\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    assert_eq!(echo_of(&resp)["headers"]["host"], "admin.test");
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn host_header_variants() {
    let up = Upstream::start("a").await;
    let gw = Gw::start(&two_hosts_one_upstream(&up)).await;
    for (req, want, why) in [
        (
            &b"GET /a HTTP/1.1\r\n\r\n"[..],
            400,
            "HTTP/1.1 without Host",
        ),
        (
            b"GET /a HTTP/1.1\r\nHost: public.test\r\nHost: admin.test\r\n\r\n",
            400,
            "two Host headers",
        ),
        (
            b"GET /a HTTP/1.1\r\nHost: public.test\r\nHost: public.test\r\n\r\n",
            400,
            "two Host headers, even equal",
        ),
        (
            b"GET /a HTTP/1.1\r\nHost: user@admin.test\r\n\r\n",
            400,
            "userinfo in Host",
        ),
        (
            b"GET http://user@public.test/a HTTP/1.1\r\nHost: public.test\r\n\r\n",
            400,
            "userinfo in the target",
        ),
        (b"GET /a HTTP/1.0\r\n\r\n", 200, "HTTP/1.0 may omit Host"),
        (
            b"GET /a HTTP/1.1\r\nHost: PUBLIC.test:8080\r\n\r\n",
            200,
            "case and port",
        ),
    ] {
        let resp = raw(gw.addr, req).await;
        assert_eq!(status_of(&resp), want, "{why}: {resp}");
        if want == 400 {
            assert!(resp.contains("\"bad_request\""), "{why}: {resp}");
        }
    }
    assert_eq!(up.hits(), 2, "only the two valid requests were forwarded");
}

#[tokio::test]
async fn h2_authority_and_host_must_agree() {
    let up = Upstream::start("a").await;
    let gw = Gw::start(&two_hosts_one_upstream(&up)).await;
    let c = h2_client();
    // :authority is the gateway's address (the URL's); Host is added or not.
    let direct = |host: Option<&str>| {
        let mut b = req("GET", &gw.url("/a"));
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(empty()).unwrap()
    };
    let ok = send(&c, direct(None)).await;
    assert_eq!(ok.status, 200);
    let same = send(&c, direct(Some(&gw.addr.to_string()))).await;
    assert_eq!(same.status, 200, "{}", same.text());
    let other = send(&c, direct(Some("admin.test"))).await;
    assert_eq!(other.status, 400, "{}", other.text());
    assert_eq!(other.code(), "bad_request");
}

/// Sends a request announcing 1000 body bytes, 10 of them, waits until an
/// upstream has the request (`hits` grew past `before`), then goes away.
async fn aborted_upload(addr: SocketAddr, hits: impl Fn() -> u64, before: u64) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
        .await
        .unwrap();
    until("the upstream has the request", WITHIN, async || {
        hits() > before
    })
    .await;
    drop(s);
}

#[tokio::test]
async fn client_faults_never_eject_an_upstream() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let routes = route_over("two", &[&a, &b], "outlier = { consecutive_failures = 2 }");
    let gw = Gw::start(&routes).await;
    // Uploads aborted mid-body, once the upstream is reading them.
    let hits = || a.hits() + b.hits();
    for _ in 0..5 {
        aborted_upload(gw.addr, hits, hits()).await;
    }
    // Invalid chunk sizes: each gets a 400 of its own.
    for _ in 0..5 {
        let resp = raw_until_close(
            gw.addr,
            b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        )
        .await;
        assert_eq!(status_of(&resp), 400, "{resp}");
        assert!(!resp.contains("127.0.0.1"), "no internal address: {resp}");
    }
    until(
        "the aborted uploads are accounted for",
        WITHIN,
        async || gw.gateway.route_info()[0].counters.client_faults >= 5,
    )
    .await;
    let snap = gw.gateway.upstreams();
    for ep in &snap[0].endpoints {
        assert!(!ep.ejected, "{snap:?}");
        assert_eq!(ep.failures, 0, "{snap:?}");
        assert_eq!(ep.outlier.state, "active");
    }
    assert_eq!(snap[0].ejections_total, 0);
    let c = client();
    for _ in 0..10 {
        assert_eq!(get(&c, &gw.url("/next")).await.status, 200);
    }
}

#[tokio::test]
async fn error_bodies_carry_no_internal_address() {
    // A port with nothing listening.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let routes = format!(
        r#"
        [[routes]]
        name = "dead"
        [routes.forward]
        upstreams = ["{dead}"]
        "#
    );
    let gw = Gw::start(&routes).await;
    let got = get(&client(), &gw.url("/x")).await;
    assert_eq!(got.status, 502, "{}", got.text());
    assert_eq!(got.code(), "upstream_unavailable");
    let text = got.text();
    assert!(!text.contains("127.0.0.1"), "{text}");
    assert!(!text.to_lowercase().contains("refused"), "{text}");
}

#[tokio::test]
async fn a_business_503_never_ejects_a_lone_instance() {
    let up = Upstream::start("only").await;
    let routes = route_over("svc", &[&up], "outlier = { consecutive_failures = 2 }");
    let gw = Gw::start(&routes).await;
    let c = client();
    for _ in 0..20 {
        let got = get(&c, &gw.url("/status/503")).await;
        assert_eq!(got.status, 503);
        assert_eq!(
            got.text(),
            "status 503 from only",
            "the upstream's own answer"
        );
    }
    // Reads of the same service still reach it.
    for _ in 0..5 {
        assert_eq!(get(&c, &gw.url("/orders")).await.status, 200);
    }
    let snap = gw.gateway.upstreams();
    assert!(!snap[0].endpoints[0].ejected, "{snap:?}");
    assert_eq!(snap[0].ejections_total, 0);
}

#[tokio::test]
async fn at_most_half_the_endpoints_are_ejected() {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
        Upstream::start("d").await,
    ];
    let routes = route_over(
        "svc",
        &ups.iter().collect::<Vec<_>>(),
        "outlier = { consecutive_failures = 1 }",
    );
    let gw = Gw::start(&routes).await;
    let c = client();
    for _ in 0..40 {
        let got = get(&c, &gw.url("/status/503")).await;
        assert_eq!(got.status, 503, "the upstream's own 503: {}", got.text());
        assert_ne!(got.code(), "no_healthy_upstream");
    }
    let snap = gw.gateway.upstreams();
    let out: Vec<_> = snap[0].endpoints.iter().filter(|e| e.ejected).collect();
    assert_eq!(out.len(), 2, "50 % of 4: {snap:?}");
    for e in out {
        assert_eq!(e.outlier.state, "ejected");
        assert_eq!(e.outlier.reason, Some("consecutive_failures"));
        assert!(e.outlier.remaining_ms.is_some());
    }
    // 500 is not in the default failure set: the rest stay in.
    for _ in 0..20 {
        assert_eq!(get(&c, &gw.url("/status/500")).await.status, 500);
    }
    assert_eq!(gw.gateway.upstreams()[0].ejections_total, 2);
}

#[tokio::test]
async fn failure_statuses_are_configurable() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let routes = route_over(
        "svc",
        &[&a, &b],
        "outlier = { consecutive_failures = 1 }\nfailure_statuses = [500]",
    );
    let gw = Gw::start(&routes).await;
    let c = client();
    for _ in 0..10 {
        assert_eq!(get(&c, &gw.url("/status/503")).await.status, 503);
    }
    assert_eq!(
        gw.gateway.upstreams()[0].ejections_total,
        0,
        "503 no longer counts"
    );
    assert_eq!(get(&c, &gw.url("/status/500")).await.status, 500);
    assert_eq!(gw.gateway.upstreams()[0].ejections_total, 1);
    let bad = meshwork_gateway::RouteSet::from_toml(
        r#"
        [[routes]]
        name = "svc"
        [routes.forward]
        upstreams = ["127.0.0.1:1"]
        failure_statuses = [99]
        "#,
    )
    .unwrap();
    let err = gw.gateway.apply(bad).await.unwrap_err().to_string();
    assert!(
        err.contains("failure_statuses") && err.contains("99"),
        "{err}"
    );
}

/// An upstream speaking HTTP/1.0: answers and closes every connection.
async fn http10_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.0 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_http10_upstream_keeps_the_clients_keep_alive() {
    let old = http10_upstream().await;
    let routes = format!(
        r#"
        [[routes]]
        name = "old"
        [routes.forward]
        upstreams = ["{old}"]
        "#
    );
    let gw = Gw::start(&routes).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    for i in 0..3 {
        s.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !(got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"ok")) {
            let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf))
                .await
                .expect("answer")
                .unwrap();
            assert!(
                n > 0,
                "request {i}: the gateway closed the client's connection"
            );
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "request {i}: {text}");
        assert!(
            !text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn a_dead_endpoint_costs_no_request_even_for_post() {
    let live = Upstream::start("live").await;
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    // Default route settings: no `retry`, failover on.
    let routes = format!(
        r#"
        [[routes]]
        name = "svc"
        [routes.forward]
        upstreams = ["{}", "{dead}"]
        lb = {{ policy = "wrr" }}
        "#,
        live.addr
    );
    let gw = Gw::start(&routes).await;
    let c = client();
    for i in 0..20 {
        let got = send(
            &c,
            req("POST", &gw.url("/orders"))
                .body(Full::new(Bytes::from_static(b"{\"n\":1}")))
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, 200, "request {i}: {}", got.text());
        assert_eq!(got.json()["body_len"], 7);
    }
    let off = format!(
        r#"
        [[routes]]
        name = "svc"
        [routes.forward]
        upstreams = ["{}", "{dead}"]
        lb = {{ policy = "wrr" }}
        failover = false
        outlier_detection = false
        "#,
        live.addr
    );
    gw.gateway
        .apply(meshwork_gateway::RouteSet::from_toml(&off).unwrap())
        .await
        .unwrap();
    let mut failed = 0;
    for _ in 0..10 {
        if get(&c, &gw.url("/x")).await.status == 502 {
            failed += 1;
        }
    }
    assert!(failed > 0, "with failover off the dead endpoint shows");
}
