//! The layers on the server side of an axum app: per-client rate limiting,
//! a timeout honouring the caller's deadline header, a bulkhead, with
//! rejections mapped to HTTP statuses by axum's `HandleErrorLayer`.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report we want

use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::StatusCode;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use meshwork_resilience::limit::concurrency::{BulkheadConfig, BulkheadLayer};
use meshwork_resilience::limit::rate::{KeyedConfig, RateLimitLayer, header_key};
use meshwork_resilience::timeout::{DEADLINE_HEADER, TimeoutConfig, TimeoutLayer};
use meshwork_resilience::{BoxError, BulkheadFull, Elapsed, RateLimited};
use tower::ServiceBuilder;

/// Maps this crate's rejections to HTTP statuses.
async fn status_of(err: BoxError) -> (StatusCode, String) {
    let status = if err.is::<RateLimited>() {
        StatusCode::TOO_MANY_REQUESTS
    } else if err.is::<Elapsed>() {
        StatusCode::GATEWAY_TIMEOUT
    } else if err.is::<BulkheadFull>() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    (status, err.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_app_with_resilience_layers() {
    let per_client = KeyedConfig {
        rate_per_sec: 1.0,
        burst: 3,
        ..Default::default()
    };
    let app = Router::new()
        .route("/fast", get(|| async { "ok" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "late"
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(status_of))
                .layer(RateLimitLayer::keyed(per_client, header_key("x-client")).unwrap())
                .layer(TimeoutLayer::new(TimeoutConfig { timeout_ms: 5_000 }).unwrap())
                .layer(
                    BulkheadLayer::new(BulkheadConfig {
                        max_in_flight: 64,
                        max_queued: 0,
                        max_wait_ms: 0,
                    })
                    .unwrap(),
                ),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let get = |path: &str, client_id: &str, deadline_ms: Option<u64>| {
        let mut req = http::Request::builder()
            .uri(format!("http://{addr}{path}"))
            .header("x-client", client_id);
        if let Some(ms) = deadline_ms {
            req = req.header(DEADLINE_HEADER, ms.to_string());
        }
        client.request(req.body(Full::new(Bytes::new())).unwrap())
    };

    for _ in 0..3 {
        assert_eq!(
            get("/fast", "alice", None).await.unwrap().status(),
            StatusCode::OK
        );
    }
    assert_eq!(
        get("/fast", "alice", None).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        get("/fast", "bob", None).await.unwrap().status(),
        StatusCode::OK,
        "limits are per client"
    );
    // The caller's 50 ms deadline is shorter than the server's 5 s timeout.
    let resp = get("/slow", "carol", Some(50)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
}
