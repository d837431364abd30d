//! End-to-end proxying and routing over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use meshwork_gateway::{Endpoint, RouteSet};

#[tokio::test]
async fn forwards_with_proxy_headers_and_strips_hop_by_hop() {
    let up = Upstream::start("a").await;
    let gw = Gw::start(&format!(
        r#"
        [[routes]]
        name = "all"
        [routes.forward]
        upstreams = ["{}"]
        "#,
        up.addr
    ))
    .await;
    let c = client();
    let r = send(
        &c,
        req("GET", &gw.url("/hello?x=1"))
            .header("host", "example.com:8080")
            .header("connection", "x-drop-me")
            .header("x-drop-me", "1")
            .header("x-keep", "yes")
            .header("x-request-id", "client-id-1")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .header("tracestate", "vendor=1")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["path"], "/hello");
    assert_eq!(j["query"], "x=1");
    let h = &j["headers"];
    assert_eq!(h["host"], "example.com:8080", "host preserved");
    assert_eq!(h["x-keep"], "yes");
    assert!(
        h.get("x-drop-me").is_none(),
        "header named in Connection removed"
    );
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "example.com:8080");
    assert_eq!(
        h["forwarded"],
        "for=127.0.0.1;proto=http;host=example.com:8080"
    );
    assert_eq!(h["via"], "1.1 meshwork");
    assert_eq!(h["x-request-id"], "client-id-1", "request id kept");
    let tp = h["traceparent"].as_str().unwrap();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert!(!tp.contains("00f067aa0ba902b7"), "a child span id: {tp}");
    assert_eq!(h["tracestate"], "vendor=1");
    // Response side.
    assert_eq!(r.headers["x-request-id"], "client-id-1");
    assert!(
        r.headers.get("x-hop").is_none(),
        "response hop-by-hop removed"
    );
    assert_eq!(r.headers["via"], "1.1 meshwork");
    // A generated request id when none is sent.
    let r = get(&c, &gw.url("/x")).await;
    assert_eq!(r.headers["x-request-id"].len(), 32);
    assert_eq!(
        r.json()["headers"]["x-request-id"],
        r.headers["x-request-id"].to_str().unwrap()
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn no_route_is_a_json_404() {
    let gw = Gw::start("").await;
    let r = get(&client(), &gw.url("/nothing")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.code(), "no_route");
    assert_eq!(r.headers["content-type"], "application/json");
}

#[tokio::test]
async fn streams_large_bodies_both_ways() {
    let up = Upstream::start("a").await;
    let gw = Gw::start(&format!(
        "[[routes]]\nname = \"s\"\n[routes.forward]\nupstreams = [\"{}\"]\n",
        up.addr
    ))
    .await;
    let c = client();
    let big = vec![7u8; 3 * 1024 * 1024];
    let r = send(
        &c,
        req("POST", &gw.url("/stream-echo"))
            .body(Full::new(Bytes::from(big.clone())))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), big.len());
    let r = get(&c, &gw.url("/big")).await;
    assert_eq!(r.body.len(), 64 * 1024);
}

#[tokio::test]
async fn every_matcher() {
    let up = Upstream::start("a").await;
    let routes = format!(
        r#"
        [[routes]]
        name = "exact-host"
        priority = 10
        match = {{ hosts = ["api.example.com"], path = {{ exact = "/who" }} }}
        respond = {{ body = "exact-host" }}

        [[routes]]
        name = "wild-host"
        priority = 9
        match = {{ hosts = ["*.example.com"], path = {{ exact = "/who" }} }}
        respond = {{ body = "wild-host" }}

        [[routes]]
        name = "regex"
        match = {{ path = {{ regex = "/users/(?P<id>[0-9]+)" }} }}
        respond = {{ body = "regex" }}

        [[routes]]
        name = "method"
        match = {{ path = {{ prefix = "/m" }}, methods = ["DELETE"] }}
        respond = {{ body = "method" }}

        [[routes]]
        name = "header"
        match = {{ path = {{ prefix = "/h" }}, headers = [{{ name = "x-env", exact = "canary" }}] }}
        respond = {{ body = "header" }}

        [[routes]]
        name = "header-regex"
        match = {{ path = {{ prefix = "/h" }}, headers = [{{ name = "x-env", regex = "st.*" }}] }}
        respond = {{ body = "header-regex" }}

        [[routes]]
        name = "query"
        match = {{ path = {{ prefix = "/q" }}, query = [{{ name = "debug", exact = "on now" }}] }}
        respond = {{ body = "query" }}

        [[routes]]
        name = "absent"
        match = {{ path = {{ prefix = "/q" }}, query = [{{ name = "debug", present = false }}] }}
        respond = {{ body = "absent" }}

        [[routes]]
        name = "fallback"
        priority = -1
        [routes.forward]
        upstreams = ["{}"]
        "#,
        up.addr
    );
    let gw = Gw::start(&routes).await;
    let c = client();
    let body_of = |r: Got| r.text();
    let host = |h: &str, p: &str| {
        req("GET", &gw.url(p))
            .header("host", h)
            .body(empty())
            .unwrap()
    };
    assert_eq!(
        body_of(send(&c, host("api.example.com", "/who")).await),
        "exact-host"
    );
    assert_eq!(
        body_of(send(&c, host("API.example.com:9", "/who")).await),
        "exact-host"
    );
    assert_eq!(
        body_of(send(&c, host("x.y.example.com", "/who")).await),
        "wild-host"
    );
    assert_eq!(
        send(&c, host("example.com", "/who")).await.json()["upstream"],
        "a",
        "wildcard needs a subdomain"
    );
    assert_eq!(body_of(get(&c, &gw.url("/users/42")).await), "regex");
    assert_eq!(
        get(&c, &gw.url("/users/42/x")).await.json()["upstream"],
        "a",
        "regex is anchored"
    );
    assert_eq!(
        body_of(send(&c, req("DELETE", &gw.url("/m")).body(empty()).unwrap()).await),
        "method"
    );
    assert_eq!(get(&c, &gw.url("/m")).await.json()["upstream"], "a");
    let hdr = |v: &str| {
        req("GET", &gw.url("/h"))
            .header("x-env", v)
            .body(empty())
            .unwrap()
    };
    assert_eq!(body_of(send(&c, hdr("canary")).await), "header");
    assert_eq!(body_of(send(&c, hdr("staging")).await), "header-regex");
    assert_eq!(send(&c, hdr("prod")).await.json()["upstream"], "a");
    assert_eq!(
        body_of(get(&c, &gw.url("/q?debug=on%20now")).await),
        "query"
    );
    assert_eq!(body_of(get(&c, &gw.url("/q?debug=on+now")).await), "query");
    assert_eq!(body_of(get(&c, &gw.url("/q")).await), "absent");
    assert_eq!(
        get(&c, &gw.url("/q?debug=off")).await.json()["upstream"],
        "a"
    );
}

#[tokio::test]
async fn rewrite_strip_headers_redirect_respond() {
    let up = Upstream::start("a").await;
    let routes = format!(
        r#"
        [[routes]]
        name = "strip"
        match = {{ path = {{ prefix = "/api" }} }}
        request_headers = {{ set = {{ "x-set" = "1" }}, add = {{ "x-added" = "2" }}, remove = ["x-secret"] }}
        response_headers = {{ set = {{ "x-resp" = "r" }}, remove = ["x-upstream"] }}
        [routes.forward]
        upstreams = ["{a}"]
        strip_prefix = "/api"

        [[routes]]
        name = "rewrite-captures"
        match = {{ path = {{ regex = "/users/(?P<id>[0-9]+)/profile" }} }}
        [routes.forward]
        upstreams = ["{a}"]
        rewrite = {{ path = "/v2/profiles/${{id}}" }}

        [[routes]]
        name = "rewrite-regex"
        match = {{ path = {{ prefix = "/old" }} }}
        [routes.forward]
        upstreams = ["{a}"]
        rewrite = {{ regex = "^/old/(.*)$", replace = "/new/$1" }}

        [[routes]]
        name = "redirect"
        match = {{ path = {{ regex = "/go/(.+)" }} }}
        redirect = {{ status = 301, location = "/target/$1" }}

        [[routes]]
        name = "https"
        match = {{ path = {{ prefix = "/secure" }} }}
        redirect = {{ scheme = "https" }}

        [[routes]]
        name = "teapot"
        match = {{ path = {{ exact = "/tea" }} }}
        respond = {{ status = 418, body = '{{"tea":true}}', content_type = "application/json" }}
        "#,
        a = up.addr
    );
    let gw = Gw::start(&routes).await;
    let c = client();
    let r = send(
        &c,
        req("GET", &gw.url("/api/items?id=3"))
            .header("x-secret", "s")
            .body(empty())
            .unwrap(),
    )
    .await;
    let j = r.json();
    assert_eq!(j["path"], "/items");
    assert_eq!(j["query"], "id=3");
    assert_eq!(j["headers"]["x-set"], "1");
    assert_eq!(j["headers"]["x-added"], "2");
    assert!(j["headers"].get("x-secret").is_none());
    assert_eq!(r.headers["x-resp"], "r");
    assert!(r.headers.get("x-upstream").is_none());
    assert_eq!(get(&c, &gw.url("/api")).await.json()["path"], "/");
    assert_eq!(
        get(&c, &gw.url("/users/7/profile")).await.json()["path"],
        "/v2/profiles/7"
    );
    assert_eq!(
        get(&c, &gw.url("/old/a/b")).await.json()["path"],
        "/new/a/b"
    );
    let r = get(&c, &gw.url("/go/somewhere?x=1")).await;
    assert_eq!(r.status, 301);
    assert_eq!(r.headers["location"], "/target/somewhere?x=1");
    let r = send(
        &c,
        req("GET", &gw.url("/secure/x"))
            .header("host", "shop.test")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 302);
    assert_eq!(r.headers["location"], "https://shop.test/secure/x");
    let r = get(&c, &gw.url("/tea")).await;
    assert_eq!(r.status, 418);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.json()["tea"], true);
    assert_eq!(up.hits(), 4, "only forwards reached the upstream");
}

#[tokio::test]
async fn weighted_and_header_cookie_split_over_registry_services() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let routes = r#"
        [[routes]]
        name = "split"
        [routes.forward]
        targets = [
          { name = "stable", service = "shop", filter = { version = "1" }, weight = 3 },
          { name = "canary", service = "shop", filter = { version = "2", tags = ["canary"] }, weight = 1 },
        ]
        split = [
          { header = "x-canary", value = "yes", target = "canary" },
          { cookie = "group", value = "beta", target = "canary" },
        ]
        lb = { policy = "wrr" }
    "#;
    let gw = Gw::start(routes).await;
    let mut v1 = Endpoint::new(stable.addr);
    v1.version = Some("1".into());
    let mut v2 = Endpoint::new(canary.addr);
    v2.version = Some("2".into());
    v2.tags = vec!["canary".into()];
    gw.resolver.set("shop", vec![v1, v2]);
    let c = client();
    let mut counts = std::collections::HashMap::new();
    for _ in 0..400 {
        let r = get(&c, &gw.url("/")).await;
        *counts
            .entry(r.json()["upstream"].as_str().unwrap().to_owned())
            .or_insert(0u32) += 1;
    }
    let s = counts.get("stable").copied().unwrap_or(0);
    let k = counts.get("canary").copied().unwrap_or(0);
    assert_eq!(s + k, 400);
    assert!(s > k && k > 0, "3:1 split, got stable {s} canary {k}");
    for _ in 0..20 {
        let r = send(
            &c,
            req("GET", &gw.url("/"))
                .header("x-canary", "yes")
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(r.json()["upstream"], "canary");
        let r = send(
            &c,
            req("GET", &gw.url("/"))
                .header("cookie", "a=1; group=beta")
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(r.json()["upstream"], "canary");
    }
    // The registry marks the canary unhealthy: it gets nothing.
    let mut v2u = Endpoint::new(canary.addr);
    v2u.version = Some("2".into());
    v2u.tags = vec!["canary".into()];
    v2u.healthy = false;
    let mut v1 = Endpoint::new(stable.addr);
    v1.version = Some("1".into());
    gw.resolver.set("shop", vec![v1, v2u]);
    let r = send(
        &c,
        req("GET", &gw.url("/"))
            .header("x-canary", "yes")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.code(), "no_healthy_upstream");
}

#[tokio::test]
async fn consistent_hashing_sticks_to_one_endpoint() {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    for policy in ["ring_hash", "maglev"] {
        let routes = format!(
            r#"
            [[routes]]
            name = "hash"
            [routes.forward]
            upstreams = ["{}", "{}", "{}"]
            lb = {{ policy = "{policy}", hash_on = {{ header = "x-user" }} }}
            "#,
            ups[0].addr, ups[1].addr, ups[2].addr
        );
        let gw = Gw::start(&routes).await;
        let c = client();
        let mut seen = std::collections::HashSet::new();
        for user in 0..30 {
            let mut first = None;
            for _ in 0..5 {
                let r = send(
                    &c,
                    req("GET", &gw.url("/"))
                        .header("x-user", format!("u{user}"))
                        .body(empty())
                        .unwrap(),
                )
                .await;
                let u = r.json()["upstream"].as_str().unwrap().to_owned();
                assert_eq!(
                    first.get_or_insert(u.clone()),
                    &u,
                    "{policy}: user {user} moved"
                );
                seen.insert(u);
            }
        }
        assert!(seen.len() > 1, "{policy}: keys spread over endpoints");
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn mirror_gets_a_copy_and_the_client_gets_the_primary() {
    let primary = Upstream::start("primary").await;
    let shadow = Upstream::start("shadow").await;
    let routes = format!(
        r#"
        [[routes]]
        name = "m"
        [routes.forward]
        upstreams = ["{}"]
        mirror = {{ upstreams = ["{}"] }}
        "#,
        primary.addr, shadow.addr
    );
    let gw = Gw::start(&routes).await;
    let c = client();
    for i in 0..5 {
        let r = send(
            &c,
            req("POST", &gw.url("/order"))
                .body(Full::new(Bytes::from(format!("body-{i}"))))
                .unwrap(),
        )
        .await;
        assert_eq!(r.json()["upstream"], "primary");
    }
    until("mirror copies", WITHIN, async || shadow.hits() == 5).await;
    assert_eq!(primary.hits(), 5);
}

#[tokio::test]
async fn apply_swaps_routes_and_rejects_bad_sets_whole() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let gw = Gw::start(&format!(
        "[[routes]]\nname = \"r\"\n[routes.forward]\nupstreams = [\"{}\"]\n",
        a.addr
    ))
    .await;
    let c = client();
    assert_eq!(get(&c, &gw.url("/")).await.json()["upstream"], "a");
    let bad = RouteSet::from_toml(&format!(
        "[[routes]]\nname = \"r\"\n[routes.forward]\nupstreams = [\"{}\"]\n[[routes]]\nname = \"broken\"\nmatch = {{ path = {{ regex = \"(\" }} }}\nrespond = {{ body = \"x\" }}\n",
        b.addr
    ))
    .unwrap();
    let err = gw.gateway.apply(bad).await.unwrap_err().to_string();
    assert!(
        err.contains("route `broken`") && err.contains("match.path.regex"),
        "{err}"
    );
    assert_eq!(
        get(&c, &gw.url("/")).await.json()["upstream"],
        "a",
        "old set still serves"
    );
    let good = RouteSet::from_toml(&format!(
        "[[routes]]\nname = \"r\"\n[routes.forward]\nupstreams = [\"{}\"]\n",
        b.addr
    ))
    .unwrap();
    gw.gateway.apply(good).await.unwrap();
    assert_eq!(get(&c, &gw.url("/")).await.json()["upstream"], "b");
}

#[tokio::test]
async fn explain_says_which_route_and_why_not() {
    let gw = Gw::start(
        r#"
        [[routes]]
        name = "admin"
        priority = 5
        match = { hosts = ["admin.test"], path = { prefix = "/" } }
        respond = { body = "a" }

        [[routes]]
        name = "posts"
        match = { path = { prefix = "/api" }, methods = ["POST"] }
        respond = { body = "p" }

        [[routes]]
        name = "api"
        match = { path = { prefix = "/api" } }
        [routes.forward]
        upstreams = ["127.0.0.1:1"]
        strip_prefix = "/api"
        "#,
    )
    .await;
    let e = gw
        .gateway
        .explain(
            &http::Method::GET,
            "http://shop.test/api/items",
            &http::HeaderMap::new(),
        )
        .unwrap();
    assert_eq!(e.matched.as_deref(), Some("api"));
    assert_eq!(e.checks.len(), 3);
    assert!(
        e.checks[0].reason.contains("host \"shop.test\""),
        "{}",
        e.checks[0].reason
    );
    assert!(
        e.checks[1].reason.contains("method GET"),
        "{}",
        e.checks[1].reason
    );
    assert!(
        e.action
            .as_deref()
            .unwrap()
            .contains("upstream path /items"),
        "{e}"
    );
    let text = e.to_string();
    assert!(text.contains("MATCH api"), "{text}");
    let none = gw
        .gateway
        .explain(&http::Method::GET, "/zzz", &http::HeaderMap::new())
        .unwrap();
    assert!(none.matched.is_none());
    assert!(none.to_string().contains("no route"));
}

#[tokio::test]
async fn route_sets_parse_from_json_and_validation_names_fields() {
    let set = RouteSet::from_json(
        r#"{"routes":[{"name":"j","match":{"path":{"prefix":"/"}},"respond":{"body":"ok"}}]}"#,
    )
    .unwrap();
    set.validate().unwrap();
    let cases = [
        (
            r#"[[routes]]
name = "x"
respond = { body = "a" }
redirect = { status = 301, location = "/" }"#,
            "forward|redirect|respond",
        ),
        (
            r#"[[routes]]
name = "x"
match = { hosts = ["a*b"] }
respond = { body = "a" }"#,
            "match.hosts[0]",
        ),
        (
            r#"[[routes]]
name = "x"
[routes.forward]
upstreams = ["nope"]"#,
            "forward.upstreams[0]",
        ),
        (
            r#"[[routes]]
name = "x"
[routes.forward]
upstreams = ["127.0.0.1:1"]
retry = { max_attempts = 0 }"#,
            "forward.retry",
        ),
        (
            r#"[[routes]]
name = "x"
[routes.forward]
upstreams = ["127.0.0.1:1"]
lb = { policy = "maglev" }"#,
            "forward.lb.hash_on",
        ),
        (
            r#"[[routes]]
name = "x"
respond = { body = "a" }
rate_limits = [{ by = "header", rate_per_sec = 1.0 }]"#,
            "rate_limits[0]",
        ),
        (
            r#"[[routes]]
name = "x"
respond = { body = "a" }
ip = { allow = ["10.0.0.0/33"] }"#,
            "ip.allow[0]",
        ),
        (
            r#"[[routes]]
name = "x"
respond = { body = "a" }
auth = { jwt = { secret = "s", algorithms = ["none"] } }"#,
            "auth.jwt.algorithms[0]",
        ),
        (
            r#"[[routes]]
name = "x"
respond = { body = "a" }
[[routes]]
name = "x"
respond = { body = "b" }"#,
            "name",
        ),
    ];
    for (toml, field) in cases {
        let set = RouteSet::from_toml(toml).unwrap();
        match set.validate() {
            Err(meshwork_gateway::RouteError::Invalid {
                field: f, route, ..
            }) => {
                assert_eq!(route, "x");
                assert!(f.contains(field), "expected {field}, got {f} for {toml}");
            }
            other => panic!("{toml}: {other:?}"),
        }
    }
    assert!(
        RouteSet::from_toml("[[routes]]\nname = \"x\"\nbogus = 1\n").is_err(),
        "unknown keys rejected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_per_core_workers_serve_and_shut_down() {
    let up = Upstream::start("a").await;
    let gateway = meshwork_gateway::Gateway::new(
        meshwork_gateway::GatewayConfig::default(),
        std::sync::Arc::new(meshwork_gateway::StaticResolver::new()),
    )
    .unwrap();
    gateway
        .apply(
            RouteSet::from_toml(&format!(
                "[[routes]]\nname = \"w\"\n[routes.forward]\nupstreams = [\"{}\"]\n",
                up.addr
            ))
            .unwrap(),
        )
        .await
        .unwrap();
    let workers =
        meshwork_gateway::spawn_workers("127.0.0.1:0".parse().unwrap(), gateway.clone(), 2, None)
            .unwrap();
    let url = format!("http://{}/w", workers.local_addr());
    let c = client();
    for _ in 0..20 {
        // New connections spread over both workers' listeners.
        let r = send(
            &c,
            req("GET", &url)
                .header("connection", "close")
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["path"], "/w");
    }
    assert_eq!(gateway.counters().requests_total, 20);
    tokio::task::spawn_blocking(move || workers.shutdown())
        .await
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(url.trim_start_matches("http://").trim_end_matches("/w"))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let up = Upstream::start("a").await;
    let cfg = meshwork_gateway::GatewayConfig {
        idle_timeout_ms: 100,
        ..Default::default()
    };
    let gw = Gw::start_with(
        cfg,
        &format!(
            "[[routes]]\nname = \"i\"\n[routes.forward]\nupstreams = [\"{}\"]\n",
            up.addr
        ),
    )
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Read the response, then wait: the server closes the idle connection.
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "idle connection still open");
    assert!(String::from_utf8_lossy(&all).starts_with("HTTP/1.1 200"));
    until("connection count back to 0", WITHIN, async || {
        gw.gateway.counters().active_connections == 0
    })
    .await;
}

#[tokio::test]
async fn upstream_connections_are_reused_and_closed_ones_replaced() {
    let up = Upstream::start("a").await;
    let gw = Gw::start(&format!(
        "[[routes]]\nname = \"p\"\n[routes.forward]\nupstreams = [\"{}\"]\n",
        up.addr
    ))
    .await;
    let c = client();
    for _ in 0..50 {
        assert_eq!(get(&c, &gw.url("/x")).await.status, 200);
    }
    assert_eq!(
        up.conns.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one kept-alive upstream connection"
    );
    // The upstream closes after every response: each request still succeeds
    // (POST too: a closed pooled connection is detected before sending).
    for i in 0..20 {
        let m = if i % 2 == 0 { "GET" } else { "POST" };
        let r = send(&c, req(m, &gw.url("/close")).body(empty()).unwrap()).await;
        assert_eq!(r.status, 200, "{m} {}", r.text());
        assert_eq!(r.text(), "bye");
    }
    assert!(up.conns.load(std::sync::atomic::Ordering::SeqCst) >= 20);
}
