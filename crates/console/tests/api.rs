//! The console's JSON API over a real socket, against coordination on Meshwork's
//! embedded store: every `/v1/console/...` operation the OpenAPI document lists
//! (and only those) answers as documented, and writes need the login when one
//! is configured.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use meshwork_console::{Auth, ConsoleState};
use meshwork_coord::{Coord, CoordOptions};
use meshwork_testkit::schema::Spec;
use serde_json::Value;

struct Harness {
    addr: std::net::SocketAddr,
    coord: Coord,
    _store: meshwork_testkit::store::Embedded,
}

async fn start(auth: Option<Auth>) -> Harness {
    let store = meshwork_testkit::store::embedded().await;
    let coord = Coord::start(
        std::slice::from_ref(&store.endpoint),
        CoordOptions::default(),
    )
    .await
    .unwrap();
    let app = meshwork_coord::api::router(coord.clone())
        .merge(meshwork_console::router(ConsoleState {
            auth: auth.clone(),
            ..ConsoleState::for_coord(coord.clone())
        }))
        .layer(axum::middleware::from_fn_with_state(
            meshwork_console::auth::HttpAuth {
                console: auth,
                tokens: Some(coord.tokens.clone()),
                protect_reads: false,
                audit: Some(coord.audit.clone()),
                ..Default::default()
            },
            meshwork_console::auth::guard,
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Harness {
        addr,
        coord,
        _store: store,
    }
}

async fn call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, Value) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        h,
        serde_json::from_slice(&b).unwrap_or(Value::String(String::from_utf8_lossy(&b).into())),
    )
}

fn doc() -> Value {
    meshwork_api::openapi::merge(&[meshwork_console::OPENAPI]).unwrap()
}

/// The answer is documented (see `Spec::check_response`).
fn check(doc: &Value, path: &str, method: &str, status: u16, body: &Value) {
    Spec { doc: doc.clone() }.check_response(path, method, status, body);
}

#[test]
fn the_document_lists_exactly_the_console_routes() {
    Spec { doc: doc() }.assert_routes("console", meshwork_console::api::ROUTES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_console_operation_answers_as_documented() {
    let h = start(None).await;
    let d = doc();
    let a = h.addr;
    let (s, _, b) = call(a, "GET", "/v1/console/overview", "", &[]).await;
    check(&d, "/v1/console/overview", "get", s, &b);
    assert_eq!(s, 200);
    assert!(b["store"]["revision"].as_i64().unwrap() > 0);

    h.coord.backend.put("/app/a/x", "1", 0).await.unwrap();
    h.coord
        .backend
        .put("/app/a/x", "password = hunter2", 0)
        .await
        .unwrap();
    h.coord.backend.put("/app/b", "2", 0).await.unwrap();
    let (s, _, b) = call(a, "GET", "/v1/console/kv?prefix=/app/", "", &[]).await;
    check(&d, "/v1/console/kv", "get", s, &b);
    assert_eq!(b["dirs"][0][0], "/app/a/");
    assert_eq!(b["keys"][0]["key"], "/app/b");
    let (s, _, b) = call(a, "GET", "/v1/console/kv/value?key=/app/a/x", "", &[]).await;
    check(&d, "/v1/console/kv/value", "get", s, &b);
    let revs = b["revisions"].as_array().unwrap();
    assert_eq!(revs.len(), 2, "{b}");
    assert!(
        !revs[0]["value"].as_str().unwrap().contains("hunter2"),
        "masked"
    );
    assert_eq!(revs[1]["value"], "1");
    let (s, _, b) = call(a, "GET", "/v1/console/kv/value?key=/nope", "", &[]).await;
    check(&d, "/v1/console/kv/value", "get", s, &b);
    assert_eq!(s, 404);

    let (s, _, b) = call(a, "GET", "/v1/console/locks", "", &[]).await;
    check(&d, "/v1/console/locks", "get", s, &b);

    let (s, _, b) = call(
        a,
        "POST",
        "/v1/console/validate",
        r#"{"format":"json","content":"{\"a\": 1,}"}"#,
        &[],
    )
    .await;
    check(&d, "/v1/console/validate", "post", s, &b);
    assert_eq!(b["ok"], false);
    assert_eq!(b["line"], 1);
    let (s, _, b) = call(
        a,
        "POST",
        "/v1/console/validate",
        r#"{"format":"toml","content":"a = 1"}"#,
        &[],
    )
    .await;
    check(&d, "/v1/console/validate", "post", s, &b);
    assert_eq!(b["ok"], true);
    let (s, _, b) = call(a, "POST", "/v1/console/validate", "nope", &[]).await;
    check(&d, "/v1/console/validate", "post", s, &b);
    assert_eq!(s, 400);

    let (s, _, b) = call(a, "GET", "/v1/console/session", "", &[]).await;
    check(&d, "/v1/console/session", "get", s, &b);
    assert_eq!(b["auth_required"], false);
    let (s, _, b) = call(
        a,
        "POST",
        "/v1/console/login",
        r#"{"user":"a","password":"b"}"#,
        &[],
    )
    .await;
    check(&d, "/v1/console/login", "post", s, &b);
    assert_eq!(s, 404, "no login configured");
    let (s, _, b) = call(a, "POST", "/v1/console/logout", "{}", &[]).await;
    check(&d, "/v1/console/logout", "post", s, &b);

    // The history: the sampler's first tick is taken as the router starts.
    let (s, _, b) = call(a, "GET", "/v1/console/history", "", &[]).await;
    check(&d, "/v1/console/history", "get", s, &b);
    assert_eq!(b["interval_ms"], 10_000);
    assert!(!b["ticks"].as_array().unwrap().is_empty(), "{b}");

    // Streams: the first tick, and a change seen by a watch.
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    for (path, trigger) in [
        ("/v1/console/stream", false),
        ("/v1/console/kv/watch?prefix=/app/", true),
    ] {
        let resp = client
            .get(format!("http://{a}{path}").parse().unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        // Writes keep coming until the reader has seen one: no guess at when the
        // watch is in place.
        let writer = trigger.then(|| {
            let be = h.coord.backend.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                for i in 0..100 {
                    tick.tick().await;
                    be.put("/app/c", i.to_string(), 0).await.unwrap();
                }
            })
        });
        let mut body = resp.into_body();
        let text = tokio::time::timeout(Duration::from_secs(10), async {
            let mut acc = String::new();
            while let Some(Ok(f)) = body.frame().await {
                if let Some(d) = f.data_ref() {
                    acc.push_str(&String::from_utf8_lossy(d));
                    if acc.contains("data:") {
                        return acc;
                    }
                }
            }
            acc
        })
        .await
        .unwrap();
        if let Some(w) = writer {
            w.abort();
        }
        let want = if trigger {
            "event: change"
        } else {
            "event: tick"
        };
        assert!(text.contains(want), "{path}: {text}");
        if trigger {
            assert!(text.contains("/app/c"), "{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_need_the_login_when_one_is_configured() {
    let h = start(Some(Auth::new("admin", "correct horse").unwrap())).await;
    let a = h.addr;
    let publish = r#"{"content":"x = 1","format":"toml"}"#;
    let (s, _, b) = call(a, "PUT", "/v1/config/public/g/app.toml", publish, &[]).await;
    assert_eq!(s, 401, "{b}");
    assert_eq!(b["error"]["code"], "unauthenticated");
    // Reads stay open.
    assert_eq!(call(a, "GET", "/v1/config", "", &[]).await.0, 200);
    let (s, _, _) = call(
        a,
        "POST",
        "/v1/console/login",
        r#"{"user":"admin","password":"wrong horse"}"#,
        &[],
    )
    .await;
    assert_eq!(s, 401);
    let (s, headers, b) = call(
        a,
        "POST",
        "/v1/console/login",
        r#"{"user":"admin","password":"correct horse"}"#,
        &[],
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let cookie = headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert!(headers["set-cookie"].to_str().unwrap().contains("HttpOnly"));
    let (s, _, b) = call(a, "GET", "/v1/console/session", "", &[("cookie", &cookie)]).await;
    assert_eq!((s, b["user"].as_str()), (200, Some("admin")));
    let (s, _, b) = call(
        a,
        "PUT",
        "/v1/config/public/g/app.toml",
        publish,
        &[("cookie", &cookie)],
    )
    .await;
    assert!((200..300).contains(&s), "{b}");
    // Basic credentials work too (curl -u).
    let (s, _, b) = call(
        a,
        "PUT",
        "/v1/config/public/g/app.toml",
        r#"{"content":"x = 2","format":"toml"}"#,
        &[("authorization", "Basic YWRtaW46Y29ycmVjdCBob3JzZQ==")],
    )
    .await;
    assert!((200..300).contains(&s), "{b}");
    // A forged cookie does not.
    let (s, _, _) = call(
        a,
        "PUT",
        "/v1/config/public/g/app.toml",
        publish,
        &[("cookie", "mw_session=YWRtaW58OTk5OTk5OTk5OTk5OXxBQUFB")],
    )
    .await;
    assert_eq!(s, 401);
}
