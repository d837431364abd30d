//! The traces role through the node: `meshwork server --otlp-grpc-addr
//! --otlp-http-addr` receives spans from an OpenTelemetry SDK we did not
//! write (Python's, from PyPI: a peer), and the query API on the node's HTTP
//! port gives them back; spans survive a SIGKILL of the node.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use meshwork_testkit::http::blocking as http;
use serde_json::Value;

fn node(dir: &std::path::Path) -> meshwork_tests::Server {
    meshwork_tests::start(
        dir,
        &[
            "--roles",
            "store,coord,traces",
            "--otlp-grpc-addr",
            "127.0.0.1:0",
            "--otlp-http-addr",
            "127.0.0.1:0",
        ],
        &[],
    )
}

fn get(http: &str, path: &str) -> Value {
    let (status, body) = http::get(http, path).unwrap();
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// The Python OpenTelemetry SDK with its OTLP/HTTP (protobuf) and OTLP/gRPC
/// exporters (`tests/scripts/otel_py.py`) sends a trace over each; both come
/// back through `/v1/traces` with their parent links, attributes, events and
/// error status, and are still there after the node is killed and restarted.
#[test]
fn the_python_opentelemetry_sdk_sends_spans_the_query_api_returns() {
    let Some(py) = meshwork_testkit::peer::at(
        "python3 with opentelemetry-sdk and the OTLP exporters",
        "MESHWORK_OTEL_PYTHON",
        "/opt/meshwork-otel/bin/python",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut n = node(dir.path());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/otel_py.py");
    let out = Command::new(&py)
        .arg(script)
        .arg(format!("http://{}", n.otlp_http.as_ref().unwrap()))
        .arg(format!("http://{}", n.otlp_grpc.as_ref().unwrap()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The SDK logs a failed export and carries on: nothing may have failed.
    assert!(!stderr.contains("Failed to export"), "{stderr}");
    let ids: Value = serde_json::from_slice(&out.stdout).unwrap();
    for (transport, service, route) in [
        ("http", "py-http", "/orders/{id}"),
        ("grpc", "py-grpc", "/stock/{sku}"),
    ] {
        let id = ids[transport].as_str().unwrap();
        let found = get(&n.http, &format!("/v1/traces?service={service}&error=true"));
        let traces = found["traces"].as_array().unwrap();
        assert_eq!(traces.len(), 1, "{found}");
        assert_eq!(traces[0]["trace_id"], id);
        assert_eq!(traces[0]["root_operation"], format!("GET {route}"));
        assert_eq!(
            (traces[0]["spans"].as_u64(), traces[0]["errors"].as_u64()),
            (Some(3), Some(1))
        );
        let t = get(&n.http, &format!("/v1/traces/{id}"));
        let spans = t["spans"].as_array().unwrap();
        let root = &spans[0];
        assert_eq!(root["kind"], "server");
        assert_eq!(root["parent_span_id"], Value::Null);
        assert_eq!(root["attributes"]["http.response.status_code"], 500);
        assert_eq!(root["attributes"]["http.route"], route);
        let child = spans.iter().find(|s| s["name"] == "SELECT stock").unwrap();
        assert_eq!(child["parent_span_id"], root["span_id"]);
        assert_eq!(child["kind"], "client");
        assert_eq!(child["scope"], "otel-py-peer-test");
        assert_eq!(child["events"][0]["name"], "cache miss");
        assert_eq!(child["events"][0]["attributes"]["key"], "sku-1");
        let failing = spans.iter().find(|s| s["name"] == "charge").unwrap();
        assert_eq!(failing["status"]["code"], "error");
        assert_eq!(failing["status"]["message"], "card declined");
    }
    // Acknowledged spans are on disk: a SIGKILL loses none of them.
    n.kill9();
    let n = node(dir.path());
    let stats = get(&n.http, "/v1/traces/stats");
    assert_eq!(stats["spans"], 6, "{stats}");
    let services = get(&n.http, "/v1/traces/services");
    assert_eq!(
        services["services"].as_array().unwrap().len(),
        2,
        "{services}"
    );
}

/// The role needs an address, and the query API is in the node's document.
#[test]
fn the_traces_role_needs_an_address_and_is_documented() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(meshwork_tests::bin())
        .args(["server", "--roles", "traces", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--otlp-grpc-addr"));
    let n = node(dir.path());
    let doc = get(&n.http, "/openapi.json");
    assert_eq!(doc["paths"]["/v1/traces"]["x-meshwork-role"], "traces");
}
