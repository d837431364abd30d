//! `/metrics` follows Prometheus' conventions, checked by Debian's `promtool
//! check metrics` (a peer): on a node running every role with the demo shop
//! after an order, and on each shop service (the SDK's endpoint). Every
//! family has help text, latencies are histograms with buckets, process and
//! build metrics are there, and one name means one thing (the registry's
//! count on the node, a client's discovery copy in a service).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use meshwork_testkit::blocking::until;
use meshwork_testkit::http::blocking as http;
use serde_json::Value;

fn promtool_check(promtool: &std::path::Path, what: &str, text: &str) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics on {what}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A node running every role with the demo shop, once the shop answers;
/// and its gateway's address.
fn shop_node(dir: &std::path::Path) -> (meshwork_tests::Server, String) {
    let node = meshwork_tests::start(
        dir,
        &[
            "--roles",
            "store,coord,gateway,txn,mq,cache,traces",
            "--gateway-addr",
            "127.0.0.1:0",
            "--cache-addr",
            "127.0.0.1:0",
            "--otlp-http-addr",
            "127.0.0.1:0",
            "--demo",
        ],
        &[],
    );
    let gw = node.gateway.clone().unwrap();
    until("the shop", Duration::from_secs(60), || {
        http::get(&gw, "/api/products").is_ok_and(|(s, _)| s == 200)
    });
    (node, gw)
}

#[test]
fn every_metrics_endpoint_passes_promtool() {
    let Some(promtool) = meshwork_testkit::peer::on_path("promtool") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (node, gw) = shop_node(dir.path());
    // The services register one by one: an order goes through once all are up.
    until("an order through the shop", Duration::from_secs(60), || {
        http::raw(
            &gw,
            "POST /api/orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nx-customer: prom",
            r#"{"sku":"sku-cable","qty":1,"account":"acct-1"}"#,
        )
        .is_ok_and(|(s, _)| s == 201)
    });
    let (status, text) = http::get(&node.http, "/metrics").unwrap();
    assert_eq!(status, 200);
    promtool_check(&promtool, "the node", &text);
    for want in [
        "meshwork_gateway_request_duration_seconds_bucket{",
        "meshwork_store_commit_seconds_bucket{le=\"0.005\"}",
        "# HELP meshwork_gateway_requests_total ",
        "# HELP meshwork_registry_instances ",
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "meshwork_build_info{version=",
    ] {
        assert!(text.contains(want), "{want} in the node's metrics");
    }
    assert!(!text.contains("quantile=\""), "no summaries on the node");
    for service in ["order", "inventory", "payment"] {
        let (_, v) = http::get(&node.http, &format!("/v1/services/{service}/instances")).unwrap();
        let v: Value = serde_json::from_str(&v).unwrap();
        let i = &v["instances"][0];
        let addr = format!("{}:{}", i["address"].as_str().unwrap(), i["port"]);
        let (status, text) = http::get(&addr, "/metrics").unwrap();
        assert_eq!(status, 200);
        promtool_check(&promtool, service, &text);
        assert!(
            text.contains("meshwork_sdk_server_request_duration_seconds_bucket{"),
            "{service}"
        );
        assert!(
            text.contains("meshwork_sdk_build_info{version="),
            "{service}"
        );
        assert!(
            !text.contains("meshwork_registry_instances"),
            "{service}: the node's name"
        );
        if service == "order" {
            assert!(
                text.contains("meshwork_discovery_instances{service=\"inventory\"}"),
                "the order service's copy of inventory's instances"
            );
        }
    }
}

/// Debian's Prometheus, killed when the test ends.
struct Prometheus(std::process::Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Exemplars, checked by the reference scraper: Prometheus (with its
/// exemplar storage on) scrapes the node and the shop's order service in
/// OpenMetrics, accepts both expositions, and answers an exemplar query with
/// the trace id of an order a client sent with a sampled `traceparent`: the
/// gateway's route and upstream latencies and the SDK's server latency each
/// link to that trace.
#[test]
fn prometheus_scrapes_exemplars_that_name_the_trace() {
    let Some(prometheus) = meshwork_testkit::peer::on_path("prometheus") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (node, gw) = shop_node(dir.path());
    // The services register one by one.
    let order = meshwork_testkit::blocking::eventually(
        "the order service registered",
        Duration::from_secs(60),
        || {
            let (_, v) = http::get(&node.http, "/v1/services/order/instances").ok()?;
            let v: Value = serde_json::from_str(&v).ok()?;
            let i = &v["instances"][0];
            Some(format!("{}:{}", i["address"].as_str()?, i["port"]))
        },
    );

    // A free port for Prometheus' web listener (taken back just before).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let web = format!("127.0.0.1:{port}");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: node\n    static_configs:\n      - targets: ['{}']\n  - job_name: order\n    static_configs:\n      - targets: ['{order}']\n",
            node.http
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _prom = Prometheus(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .arg("--enable-feature=exemplar-storage")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // Both targets scraped and up: the OpenMetrics expositions parse.
    until(
        "prometheus scraping both targets",
        Duration::from_secs(60),
        || {
            let Ok((200, body)) = http::get(&web, "/api/v1/targets") else {
                return false;
            };
            let v: Value = serde_json::from_str(&body).unwrap();
            let targets = v["data"]["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for t in &targets {
                let error = t["lastError"].as_str().unwrap_or("");
                assert!(error.is_empty(), "scrape of {}: {error}", t["scrapeUrl"]);
            }
            targets.len() == 2 && targets.iter().all(|t| t["health"] == "up")
        },
    );

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let head = format!(
        "POST /api/orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nx-customer: exemplar\r\ntraceparent: 00-{trace_id}-00f067aa0ba902b7-01"
    );
    until("an order through the shop", Duration::from_secs(60), || {
        http::raw(
            &gw,
            &head,
            r#"{"sku":"sku-cable","qty":1,"account":"acct-1"}"#,
        )
        .is_ok_and(|(s, _)| s == 201)
    });
    for series in [
        "meshwork_gateway_request_duration_seconds_bucket",
        "meshwork_gateway_upstream_duration_seconds_bucket",
        "meshwork_sdk_server_request_duration_seconds_bucket",
    ] {
        until(
            &format!("an exemplar of {series} naming the order's trace"),
            Duration::from_secs(60),
            || {
                let Ok((200, body)) = http::get(
                    &web,
                    &format!("/api/v1/query_exemplars?query={series}&start=0&end=9999999999"),
                ) else {
                    return false;
                };
                body.contains(&format!("\"trace_id\":\"{trace_id}\""))
            },
        );
    }
    // The Prometheus text format stays the default.
    let (status, text) = http::get(&node.http, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(!text.contains("# EOF") && !text.contains("trace_id="));
}
