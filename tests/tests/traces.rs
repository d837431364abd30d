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

/// An upstream that answers 200 on `/ok` and 503 elsewhere, and keeps the
/// `traceparent` of every request it got.
fn upstream(seen: std::sync::Arc<parking_lot::Mutex<Vec<String>>>) -> u16 {
    meshwork_tests::serve_app(axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: axum::http::HeaderMap| {
            let seen = seen.clone();
            async move {
                if let Some(tp) = headers.get("traceparent") {
                    seen.lock().push(tp.to_str().unwrap().to_string());
                }
                if uri.path().ends_with("/ok") {
                    (axum::http::StatusCode::OK, "fine")
                } else {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "down")
                }
            }
        },
    ))
}

/// The gateway sends a server span per request and a client span per
/// upstream try into the node's trace store: the server span continues the
/// caller's `traceparent`, each try is its child and the upstream's parent,
/// and a retried 503 shows as two failed tries with their attempt numbers.
#[test]
fn the_gateway_records_a_server_span_and_a_client_span_per_try() {
    let dir = tempfile::tempdir().unwrap();
    let n = meshwork_tests::start(
        dir.path(),
        &[
            "--roles",
            "store,coord,gateway,traces",
            "--gateway-addr",
            "127.0.0.1:0",
            "--otlp-grpc-addr",
            "127.0.0.1:0",
        ],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    let (h, gw) = (n.http.as_str(), n.gateway.clone().unwrap());
    let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    // Two instances, so that the retry has another endpoint to go to.
    let ports = [upstream(seen.clone()), upstream(seen.clone())];
    for port in ports {
        let (ok, _, err) = meshwork_tests::meshwork_http(
            h,
            &[
                "svc",
                "register",
                "web",
                "--address",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--persistent",
            ],
        );
        assert!(ok, "{err}");
    }
    // And an instance nobody listens on, behind its own route.
    let dead = meshwork_tests::free_port().to_string();
    let (ok, _, err) = meshwork_tests::meshwork_http(
        h,
        &[
            "svc",
            "register",
            "dead",
            "--address",
            "127.0.0.1",
            "--port",
            &dead,
            "--persistent",
        ],
    );
    assert!(ok, "{err}");
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        "[[routes]]\nname = \"web\"\n[routes.match]\npath = { prefix = \"/api\" }\n[routes.forward]\nservice = \"web\"\nretry = { max_attempts = 2, initial_backoff_ms = 1, max_backoff_ms = 1 }\n\
         [[routes]]\nname = \"dead\"\n[routes.match]\npath = { prefix = \"/dead\" }\n[routes.forward]\nservice = \"dead\"\n",
    )
    .unwrap();
    let (ok, _, err) =
        meshwork_tests::meshwork_http(h, &["gateway", "apply", "-f", routes.to_str().unwrap()]);
    assert!(ok, "{err}");
    meshwork_testkit::blocking::until(
        "the route to go live",
        std::time::Duration::from_secs(10),
        || http::get(&gw, "/api/ok").is_ok_and(|(c, _)| c == 200),
    );
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    for path in ["/api/ok", "/api/fail"] {
        let (status, _) = http::raw(
            &gw,
            &format!("GET {path} HTTP/1.1\r\nHost: {gw}\r\ntraceparent: 00-{trace_id}-{caller}-01"),
            "",
        )
        .unwrap();
        assert_eq!(status, if path == "/api/ok" { 200 } else { 503 });
    }
    // Two traces' worth of spans under one trace id: 2 server spans, 1 + 2 tries.
    let mut spans = Vec::new();
    meshwork_testkit::blocking::until(
        "the gateway's spans",
        std::time::Duration::from_secs(10),
        || {
            let (code, body) = http::get(h, &format!("/v1/traces/{trace_id}")).unwrap();
            if code != 200 {
                return false;
            }
            let t: Value = serde_json::from_str(&body).unwrap();
            spans = t["spans"].as_array().unwrap().clone();
            spans.len() == 5
        },
    );
    let servers: Vec<&Value> = spans.iter().filter(|s| s["kind"] == "server").collect();
    let clients: Vec<&Value> = spans.iter().filter(|s| s["kind"] == "client").collect();
    assert_eq!((servers.len(), clients.len()), (2, 3), "{spans:#?}");
    for s in &servers {
        assert_eq!(s["service"], "gateway");
        assert_eq!(s["parent_span_id"], caller);
        assert_eq!(s["name"], "GET web");
        assert_eq!(s["attributes"]["meshwork.route"], "web");
    }
    let failed = servers
        .iter()
        .find(|s| s["attributes"]["url.path"] == "/api/fail")
        .unwrap();
    assert_eq!(failed["status"]["code"], "error");
    assert_eq!(failed["attributes"]["http.response.status_code"], 503);
    let tries: Vec<&&Value> = clients
        .iter()
        .filter(|c| c["parent_span_id"] == failed["span_id"])
        .collect();
    assert_eq!(tries.len(), 2, "{spans:#?}");
    let mut attempts: Vec<i64> = tries
        .iter()
        .map(|c| c["attributes"]["meshwork.attempt"].as_i64().unwrap())
        .collect();
    attempts.sort();
    assert_eq!(attempts, [1, 2]);
    assert!(tries.iter().all(|c| {
        c["status"]["code"] == "error"
            && c["attributes"]["http.response.status_code"] == 503
            && ports
                .iter()
                .any(|p| c["attributes"]["server.port"] == i64::from(*p))
    }));
    // The upstream's parent is the try's span.
    let seen = seen.lock().clone();
    for c in &clients {
        let want = format!("00-{trace_id}-{}-01", c["span_id"].as_str().unwrap());
        assert!(seen.contains(&want), "{want} not in {seen:?}");
    }
    // The graph has no edge yet (the upstream sends no spans), and the search finds
    // the failed request by its status.
    let found = get(
        h,
        "/v1/traces?service=gateway&attr=http.response.status_code=503",
    );
    assert_eq!(found["traces"][0]["trace_id"], trace_id);
    // The gateway's own log line about the failed try is in the trace's view.
    let dead_trace = "6bf92f3577b34da6a3ce929d0e0e4738";
    let (status, _) = http::raw(
        &gw,
        &format!("GET /dead/x HTTP/1.1\r\nHost: {gw}\r\ntraceparent: 00-{dead_trace}-{caller}-01"),
        "",
    )
    .unwrap();
    assert!(status >= 500, "{status}");
    let mut logs = Value::Null;
    meshwork_testkit::blocking::until(
        "the failed try's log line",
        std::time::Duration::from_secs(10),
        || {
            let (code, body) = http::get(h, &format!("/v1/traces/{dead_trace}")).unwrap();
            logs = serde_json::from_str::<Value>(&body)
                .map(|v| v["logs"].clone())
                .unwrap_or(Value::Null);
            code == 200 && logs.as_array().is_some_and(|l| !l.is_empty())
        },
    );
    let line = &logs[0];
    assert_eq!(line["level"], "WARN", "{logs}");
    assert!(
        line["message"]
            .as_str()
            .unwrap()
            .contains("upstream try failed"),
        "{logs}"
    );
    assert_eq!(line["trace_id"], dead_trace);
}

/// `--otlp-endpoint` (HTTP/protobuf, the default protocol) and the standard
/// `OTEL_EXPORTER_OTLP_ENDPOINT` + `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` send the
/// gateway's spans to another collector — here a second node's trace store.
#[test]
fn spans_go_to_the_configured_otlp_collector() {
    let collector_dir = tempfile::tempdir().unwrap();
    let collector = node(collector_dir.path());
    let grpc = collector.otlp_grpc.clone().unwrap();
    let http_ep = collector.otlp_http.clone().unwrap();
    let http_flag = format!("http://{http_ep}");
    let grpc_env = format!("http://{grpc}");
    for (i, (extra, envs)) in [
        (vec!["--otlp-endpoint", http_flag.as_str()], vec![]),
        (
            vec![],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", grpc_env.as_str()),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec![
            "--roles",
            "store,coord,gateway",
            "--gateway-addr",
            "127.0.0.1:0",
        ];
        args.extend(extra);
        let mut envs = envs;
        envs.push(("OTEL_BSP_SCHEDULE_DELAY", "100"));
        envs.push((
            "OTEL_SERVICE_NAME",
            if i == 0 { "edge-http" } else { "edge-grpc" },
        ));
        let n = meshwork_tests::start(dir.path(), &args, &envs);
        // No route: a 404 from the gateway itself, still one server span.
        let (status, _) = http::get(n.gateway.as_ref().unwrap(), "/nowhere").unwrap();
        assert_eq!(status, 404);
        let service = if i == 0 { "edge-http" } else { "edge-grpc" };
        meshwork_testkit::blocking::until(
            "the span at the collector",
            std::time::Duration::from_secs(10),
            || {
                let v = get(&collector.http, &format!("/v1/traces?service={service}"));
                v["traces"].as_array().is_some_and(|t| t.len() == 1)
            },
        );
    }
}

/// Misbehaving clients on the OTLP/gRPC port: connections that send nothing
/// are closed past the `[listen]` header deadline, one past the connection
/// limit is closed at once, and neither costs a well-behaved exporter its
/// export afterwards.
#[test]
fn idle_and_surplus_connections_on_the_otlp_grpc_port_do_not_stop_exports() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("meshwork.toml");
    std::fs::write(
        &cfg,
        "[listen]\nheader_read_timeout_ms = 300\nhttp_max_connections = 6\n",
    )
    .unwrap();
    let n = meshwork_tests::start(
        &dir.path().join("data"),
        &[
            "--roles",
            "store,coord,traces",
            "--otlp-grpc-addr",
            "127.0.0.1:0",
            "--config",
            cfg.to_str().unwrap(),
        ],
        &[],
    );
    let grpc = n.otlp_grpc.clone().unwrap();
    // Every slot taken by a client that sends nothing.
    let idle: Vec<std::net::TcpStream> = (0..6)
        .map(|_| std::net::TcpStream::connect(&grpc).unwrap())
        .collect();
    let closed = |mut s: &std::net::TcpStream| {
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut b = [0u8; 256];
        // The server's HTTP/2 preface may come first; then EOF or a reset: the
        // server closed it (a read timeout is an error of another kind, and
        // fails the test).
        loop {
            match s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        }
    };
    // One more (accepted after them) is refused: closed at once.
    let surplus = std::net::TcpStream::connect(&grpc).unwrap();
    assert!(closed(&surplus), "the connection past the limit is closed");
    // The silent ones are closed past the header deadline.
    for s in &idle {
        assert!(closed(s), "a silent connection is closed");
    }
    // A real exporter is served afterwards.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
        let mut c = TraceServiceClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        let span = Span {
            trace_id: vec![7; 16],
            span_id: vec![7; 8],
            name: "after the flood".into(),
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_000_000_001,
            ..Default::default()
        };
        c.export(ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![span],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    });
    let t = get(&n.http, "/v1/traces/07070707070707070707070707070707");
    assert_eq!(t["spans"][0]["name"], "after the flood");
}

/// An exporter that speaks TLS to its collector (`https://`, the collector's
/// authority in `OTEL_EXPORTER_OTLP_CERTIFICATE`) and gzips its batches
/// (`OTEL_EXPORTER_OTLP_COMPRESSION=gzip`), over OTLP/HTTP and OTLP/gRPC; the
/// collector is a node with `--tls-cert`. And head sampling
/// (`OTEL_TRACES_SAMPLER=parentbased_always_off`): a request whose caller did
/// not sample it records nothing, one whose caller did is recorded.
#[test]
fn spans_go_to_a_tls_collector_gzipped_and_the_head_sampler_decides() {
    let Some(curl) = meshwork_testkit::peer::on_path("curl") else {
        return;
    };
    let certs = tempfile::tempdir().unwrap();
    let c = certs.path().to_str().unwrap();
    for args in [
        vec!["cert", "init", "--dir", c],
        vec!["cert", "issue", "--dir", c, "--name", "node"],
    ] {
        let out = Command::new(meshwork_tests::bin())
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ca = certs.path().join("ca.pem");
    let collector_dir = tempfile::tempdir().unwrap();
    let collector = meshwork_tests::start(
        collector_dir.path(),
        &[
            "--roles",
            "store,coord,traces",
            "--otlp-grpc-addr",
            "127.0.0.1:0",
            "--otlp-http-addr",
            "127.0.0.1:0",
            "--tls-cert",
            certs.path().join("node.pem").to_str().unwrap(),
            "--tls-key",
            certs.path().join("node-key.pem").to_str().unwrap(),
        ],
        &[],
    );
    let query = |path: &str| -> Value {
        let out = Command::new(&curl)
            .args(["-sS", "--cacert", ca.to_str().unwrap()])
            .arg(format!("https://{}{path}", collector.http))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let grpc = format!("https://{}", collector.otlp_grpc.clone().unwrap());
    let http_ep = format!("https://{}", collector.otlp_http.clone().unwrap());
    for (i, (protocol, endpoint)) in [("http/protobuf", &http_ep), ("grpc", &grpc)]
        .into_iter()
        .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let service = format!("edge-tls-{i}");
        let n = meshwork_tests::start(
            dir.path(),
            &[
                "--roles",
                "store,coord,gateway",
                "--gateway-addr",
                "127.0.0.1:0",
            ],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.to_str().unwrap()),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
                ("OTEL_SERVICE_NAME", service.as_str()),
                ("OTEL_TRACES_SAMPLER", "parentbased_always_off"),
            ],
        );
        let gw = n.gateway.clone().unwrap();
        // Not sampled by anyone: nothing recorded.
        let (status, _) = http::get(&gw, "/nowhere").unwrap();
        assert_eq!(status, 404);
        // Sampled by its caller: recorded, with the caller's trace id.
        let trace_id = format!("4bf92f3577b34da6a3ce929d0e0e47{i:02}");
        let (status, _) = http::raw(
            &gw,
            &format!(
                "GET /nowhere HTTP/1.1\r\nHost: {gw}\r\ntraceparent: 00-{trace_id}-00f067aa0ba902b7-01"
            ),
            "",
        )
        .unwrap();
        assert_eq!(status, 404);
        let found = meshwork_testkit::blocking::eventually(
            "the sampled span at the TLS collector",
            std::time::Duration::from_secs(15),
            || {
                let v = query(&format!("/v1/traces?service={service}"));
                v["traces"].as_array().filter(|t| !t.is_empty()).cloned()
            },
        );
        // Spans leave in order: the unsampled request's would be here by now.
        assert_eq!(found.len(), 1, "{protocol}: {found:?}");
        assert_eq!(found[0]["trace_id"], trace_id.as_str(), "{protocol}");
    }
}

/// A node with its trace store, exporting its own spans every 100 ms.
fn node_with_traces(dir: &std::path::Path) -> meshwork_tests::Server {
    meshwork_tests::start(
        dir,
        &[
            "--roles",
            "store,coord,traces",
            "--otlp-grpc-addr",
            "127.0.0.1:0",
        ],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
}

/// The node's own HTTP API is traced: a config publish is a server span of
/// service `meshwork-node` named by its route template, continuing the
/// caller's trace, with its status; reading traces makes none.
#[test]
fn the_nodes_api_calls_are_spans() {
    let dir = tempfile::tempdir().unwrap();
    let n = node_with_traces(dir.path());
    let h = n.http.as_str();
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let body = r#"{"content":"port = 1\n","format":"toml"}"#;
    let (status, resp) = http::raw(
        h,
        &format!(
            "PUT /v1/config/public/G/app.toml HTTP/1.1\r\nHost: {h}\r\nContent-Type: application/json\r\ntraceparent: 00-{trace_id}-b7ad6b7169203331-01"
        ),
        body,
    )
    .unwrap();
    assert_eq!(status, 201, "{resp}");
    let (status, _) = http::get(h, "/v1/config/public/G/missing.toml").unwrap();
    assert_eq!(status, 404);
    let t = meshwork_testkit::blocking::eventually(
        "the API's span",
        std::time::Duration::from_secs(10),
        || {
            let (code, body) = http::get(h, &format!("/v1/traces/{trace_id}")).unwrap();
            (code == 200).then(|| serde_json::from_str::<Value>(&body).unwrap())
        },
    );
    let span = &t["spans"][0];
    assert_eq!(span["service"], "meshwork-node", "{t}");
    assert_eq!(span["name"], "PUT /v1/config/{namespace}/{group}/{data_id}");
    assert_eq!(span["parent_span_id"], "b7ad6b7169203331");
    let found = meshwork_testkit::blocking::eventually(
        "the 404's span",
        std::time::Duration::from_secs(10),
        || {
            let v = get(
                h,
                "/v1/traces?service=meshwork-node&attr=http.response.status_code=404",
            );
            v["traces"].as_array().filter(|a| !a.is_empty()).cloned()
        },
    );
    assert_eq!(found.len(), 1);
    // Every query above was a /v1/traces call: none of them is a trace.
    let all = get(h, "/v1/traces?service=meshwork-node&limit=100");
    assert_eq!(all["traces"].as_array().unwrap().len(), 2, "{all}");
}

/// The etcd gRPC port is traced too, for callers that trace: a unary call
/// with a sampled `traceparent` is a server span of `meshwork-node` named
/// `service/method` with the RPC attributes and its gRPC status (a refused
/// call is an error span); a call without one makes no span.
#[test]
fn etcd_calls_that_carry_a_trace_are_spans() {
    use meshwork_etcd::proto::etcdserverpb::{PutRequest, RangeRequest, kv_client::KvClient};
    let dir = tempfile::tempdir().unwrap();
    let n = node_with_traces(dir.path());
    let trace_id = "5af7651916cd43dd8448eb211c80319d";
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let etcd = n.etcd.clone();
    rt.block_on(async move {
        let channel = tonic::transport::Channel::from_shared(format!("http://{etcd}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut kv = KvClient::new(channel);
        fn traced<T>(msg: T, trace_id: &str, span: &str) -> tonic::Request<T> {
            let mut req = tonic::Request::new(msg);
            req.metadata_mut().insert(
                "traceparent",
                format!("00-{trace_id}-{span}-01").parse().unwrap(),
            );
            req
        }
        // Untraced: no span.
        kv.put(PutRequest {
            key: b"untraced".to_vec().into(),
            value: b"1".to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap();
        kv.put(traced(
            PutRequest {
                key: b"traced".to_vec().into(),
                value: b"1".to_vec().into(),
                ..Default::default()
            },
            trace_id,
            "b7ad6b7169203331",
        ))
        .await
        .unwrap();
        // Refused as etcd refuses it (no key): an error span.
        let e = kv
            .range(traced(
                RangeRequest::default(),
                trace_id,
                "c7ad6b7169203332",
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    });
    let h = n.http.as_str();
    let t = meshwork_testkit::blocking::eventually(
        "both etcd spans",
        std::time::Duration::from_secs(10),
        || {
            let (code, body) = http::get(h, &format!("/v1/traces/{trace_id}")).unwrap();
            let v: Value = serde_json::from_str(&body).unwrap_or_default();
            (code == 200 && v["spans"].as_array().is_some_and(|s| s.len() == 2)).then_some(v)
        },
    );
    let spans = t["spans"].as_array().unwrap();
    let put = spans
        .iter()
        .find(|s| s["name"] == "etcdserverpb.KV/Put")
        .unwrap_or_else(|| panic!("{t}"));
    assert_eq!(put["service"], "meshwork-node");
    assert_eq!(put["parent_span_id"], "b7ad6b7169203331");
    let attrs = put["attributes"].to_string();
    for want in [
        r#""rpc.system":"grpc""#,
        r#""rpc.service":"etcdserverpb.KV""#,
        r#""rpc.method":"Put""#,
    ] {
        assert!(attrs.contains(want), "{want} in {attrs}");
    }
    let range = spans
        .iter()
        .find(|s| s["name"] == "etcdserverpb.KV/Range")
        .unwrap_or_else(|| panic!("{t}"));
    assert_eq!(range["parent_span_id"], "c7ad6b7169203332");
    assert_eq!(range["attributes"]["rpc.grpc.status_code"], 3, "{range}");
    assert_eq!(range["status"]["code"], "error", "{range}");
    assert_eq!(put["status"]["code"], "unset", "{put}");
    assert_eq!(put["kind"], "server");
    let all = get(h, "/v1/traces?service=meshwork-node&limit=100");
    assert_eq!(all["traces"].as_array().unwrap().len(), 1, "{all}");
}
