//! Metrics, the JSON access log, trace context and the admin API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::sync::Arc;

use common::*;
use http_body_util::BodyExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::ServiceExt;

#[derive(Clone, Default)]
struct Buf(Arc<parking_lot::Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn admin_get(gw: &Gw, path: &str) -> serde_json::Value {
    let resp = gw
        .gateway
        .admin_router()
        .oneshot(
            http::Request::get(path)
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{path}");
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&b).unwrap()
}

#[tokio::test]
async fn metrics_access_log_and_admin_api() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::INFO)
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let up = Upstream::start("a").await;
    let gw = Gw::start(&format!(
        r#"
        [[routes]]
        name = "api"
        match = {{ path = {{ prefix = "/api" }} }}
        [routes.forward]
        upstreams = ["{}"]
        strip_prefix = "/api"
        "#,
        up.addr
    ))
    .await;
    let c = client();
    assert_eq!(get(&c, &gw.url("/api/ok")).await.status, 200);
    assert_eq!(get(&c, &gw.url("/api/status/503")).await.status, 503);
    assert_eq!(get(&c, &gw.url("/none")).await.status, 404);

    // Prometheus metrics through the `metrics` facade.
    let snap = snapshotter.snapshot().into_vec();
    let counter = |name: &str, labels: &[(&str, &str)]| -> u64 {
        snap.iter()
            .filter(|(k, ..)| {
                k.key().name() == name
                    && labels.iter().all(|(ln, lv)| {
                        k.key().labels().any(|l| l.key() == *ln && l.value() == *lv)
                    })
            })
            .map(|(.., v)| match v {
                DebugValue::Counter(c) => *c,
                _ => 0,
            })
            .sum()
    };
    assert_eq!(
        counter(
            "meshwork_gateway_requests_total",
            &[("route", "api"), ("status_class", "2xx")]
        ),
        1
    );
    assert_eq!(
        counter(
            "meshwork_gateway_requests_total",
            &[("route", "api"), ("status_class", "5xx")]
        ),
        1
    );
    assert!(
        snap.iter()
            .any(|(k, ..)| k.key().name() == "meshwork_gateway_request_duration_seconds")
    );
    assert!(
        snap.iter()
            .any(|(k, ..)| k.key().name() == "meshwork_gateway_active_connections")
    );

    // One JSON access-log line per request.
    let log = String::from_utf8(buf.0.lock().clone()).unwrap();
    let access: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "meshwork_gateway::access")
        .collect();
    assert_eq!(access.len(), 3, "{log}");
    let first = &access[0]["fields"];
    assert_eq!(first["route"], "api");
    assert_eq!(first["status"], 200);
    assert_eq!(first["path"], "/api/ok");
    assert_eq!(first["upstream"], up.addr.to_string());
    assert_eq!(first["request_id"].as_str().unwrap().len(), 32);
    assert_eq!(first["trace_id"].as_str().unwrap().len(), 32);
    assert_eq!(access[2]["fields"]["error"], "no_route");

    // Admin API.
    let routes = admin_get(&gw, "/routes").await;
    assert_eq!(routes["routes"][0]["name"], "api");
    assert_eq!(routes["routes"][0]["counters"]["requests"], 2);
    let ups = admin_get(&gw, "/upstreams").await;
    let ep = &ups["upstreams"][0]["endpoints"][0];
    assert_eq!(ep["addr"], up.addr.to_string());
    assert_eq!(ep["ejected"], false);
    assert_eq!(ep["requests"], 2);
    assert_eq!(ep["failures"], 1);
    let stats = admin_get(&gw, "/stats").await;
    assert_eq!(stats["gateway"]["requests_total"], 3);
    assert_eq!(stats["gateway"]["no_route_total"], 1);
    let ex = admin_get(&gw, "/explain?url=http://x/api/y&method=POST").await;
    assert_eq!(ex["matched"], "api");
    let src = admin_get(&gw, "/routes/source").await;
    assert_eq!(src["routes"][0]["name"], "api");
}
