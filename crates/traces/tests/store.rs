//! The trace store end to end: OTLP over real sockets (HTTP with protobuf
//! and JSON bodies, gRPC with the generated client), malformed payloads
//! answered with errors, retention bounding the disk under a flood, a torn
//! segment tail cut on reopen, and the query API answering as documented.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use meshwork_testkit::schema::Spec;
use meshwork_traces::{Query, TraceStore, TracesConfig};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(dir: &std::path::Path) -> TracesConfig {
    TracesConfig {
        dir: dir.to_path_buf(),
        ..TracesConfig::default()
    }
}

fn kv(k: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

fn span(trace: u128, id: u64, parent: u64, name: &str, start: u64, error: bool) -> Span {
    Span {
        trace_id: trace.to_be_bytes().to_vec(),
        span_id: id.to_be_bytes().to_vec(),
        parent_span_id: if parent == 0 {
            vec![]
        } else {
            parent.to_be_bytes().to_vec()
        },
        name: name.into(),
        kind: 2,
        start_time_unix_nano: start,
        end_time_unix_nano: start + 1_000_000,
        attributes: vec![
            kv("http.route", any_value::Value::StringValue(name.into())),
            kv("attempt", any_value::Value::IntValue(id as i64 % 3)),
        ],
        status: error.then(|| Status {
            code: 2,
            message: "boom".into(),
        }),
        ..Default::default()
    }
}

fn request(service: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv(
                    "service.name",
                    any_value::Value::StringValue(service.into()),
                )],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

const T0: u64 = 1_700_000_000_000_000_000;

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_bounds_the_disk_under_a_flood_and_counts_what_it_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let store = TraceStore::open(TracesConfig {
        max_bytes: 1 << 20,
        segment_bytes: 128 << 10,
        fsync: false,
        ..config(dir.path())
    })
    .unwrap();
    // 40,000 spans of about 150 bytes: six times the budget.
    for batch in 0..400u64 {
        let spans = (0..100u64)
            .map(|i| {
                let n = batch * 100 + i;
                span(
                    u128::from(n / 4) + 1,
                    n + 1,
                    0,
                    "GET /flood",
                    T0 + n * 1000,
                    false,
                )
            })
            .collect();
        let got = store.ingest(request("flood", spans)).await.unwrap();
        assert_eq!((got.accepted, got.rejected), (100, 0));
    }
    let stats = store.stats();
    assert!(
        dir_bytes(dir.path()) <= (1 << 20) + (128 << 10),
        "{} bytes on disk",
        dir_bytes(dir.path())
    );
    assert!(stats.bytes <= 1 << 20, "{stats:?}");
    assert_eq!(stats.received, 40_000);
    assert_eq!(stats.expired as usize + stats.spans, 40_000, "{stats:?}");
    assert!(stats.expired > 20_000, "{stats:?}");
    // The newest trace is kept, the oldest went.
    assert!(store.trace(&10_000u128.to_be_bytes()).unwrap().is_some());
    assert!(store.trace(&1u128.to_be_bytes()).unwrap().is_none());
    let newest = store
        .search(&Query {
            limit: 1,
            ..Query::default()
        })
        .unwrap();
    assert_eq!(newest[0].trace_id, format!("{:032x}", 10_000u128));
    store.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_cut_off_on_reopen_and_the_rest_survives() {
    let dir = tempfile::tempdir().unwrap();
    let store = TraceStore::open(config(dir.path())).unwrap();
    let spans = vec![
        span(7, 1, 0, "GET /a", T0, false),
        span(7, 2, 1, "SELECT", T0 + 10, true),
    ];
    store.ingest(request("shop", spans)).await.unwrap();
    store.close();
    // A crash mid-append: half a record header and some payload.
    let seg = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "spans"))
        .unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, &[200, 0, 0, 0, 1, 2, 3]).unwrap();
    drop(f);
    let store = TraceStore::open(config(dir.path())).unwrap();
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), len);
    let t = store.trace(&7u128.to_be_bytes()).unwrap().unwrap();
    assert_eq!(t.len(), 2);
    store
        .ingest(request(
            "shop",
            vec![span(7, 3, 1, "charge", T0 + 20, false)],
        ))
        .await
        .unwrap();
    store.close();
    let store = TraceStore::open(config(dir.path())).unwrap();
    let t = store.trace(&7u128.to_be_bytes()).unwrap().unwrap();
    let names: Vec<&str> = t
        .iter()
        .map(|s| s.span.as_ref().unwrap().name.as_str())
        .collect();
    assert_eq!(names, ["GET /a", "SELECT", "charge"]);
    // A file that is not a segment is refused with what to do.
    std::fs::write(dir.path().join("0000000099.spans"), b"not a segment at all").unwrap();
    store.close();
    let err = TraceStore::open(config(dir.path()))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a Meshwork span segment"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_segments_leave_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let store = TraceStore::open(TracesConfig {
        max_age: Duration::from_millis(1),
        ..config(dir.path())
    })
    .unwrap();
    store
        .ingest(request("shop", vec![span(9, 1, 0, "GET /old", T0, false)]))
        .await
        .unwrap();
    meshwork_testkit::until(
        "the old span to expire",
        Duration::from_secs(20),
        async || store.stats().spans == 0,
    )
    .await;
    assert_eq!(store.stats().expired, 1);
    assert!(store.trace(&9u128.to_be_bytes()).unwrap().is_none());
    store.close();
}

/// Sends one HTTP/1.1 request and reads the whole answer: (status, headers, body bytes).
async fn http(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&out[..split]).to_string();
    let status = head[9..12].parse().unwrap();
    (status, head.to_ascii_lowercase(), out[split + 4..].to_vec())
}

async fn serve_http(app: axum::Router) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    a
}

#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_http_takes_protobuf_and_json_and_refuses_what_is_not_otlp() {
    let dir = tempfile::tempdir().unwrap();
    let store = TraceStore::open(TracesConfig {
        max_request_bytes: 64 << 10,
        ..config(dir.path())
    })
    .unwrap();
    let a = serve_http(meshwork_traces::otlp::http_router(store.clone())).await;
    let pb = [("content-type", "application/x-protobuf")];
    let js = [("content-type", "application/json")];

    // Protobuf: one good span and one with a 3-byte trace id.
    let mut bad = span(1, 2, 0, "bad", T0, false);
    bad.trace_id = vec![1, 2, 3];
    let req = request("pb", vec![span(1, 1, 0, "GET /pb", T0, false), bad]);
    let (status, head, body) = http(a, "/v1/traces", &pb, &req.encode_to_vec()).await;
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: application/x-protobuf"),
        "{head}"
    );
    let resp = ExportTraceServiceResponse::decode(body.as_slice()).unwrap();
    let partial = resp.partial_success.unwrap();
    assert_eq!(partial.rejected_spans, 1);
    assert!(
        partial.error_message.contains("trace_id must be 16 bytes"),
        "{partial:?}"
    );

    // OTLP/JSON as the specification writes it: hex ids, enums as numbers,
    // 64-bit integers as strings.
    let json = r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"js"}}]},
      "scopeSpans":[{"scope":{"name":"hand"},"spans":[{"traceId":"5b8efff798038103d269b633813fc60c",
      "spanId":"eee19b7ec3c1b174","name":"GET /js","kind":2,"startTimeUnixNano":"1700000000000000000",
      "endTimeUnixNano":"1700000000005000000","attributes":[{"key":"http.response.status_code","value":{"intValue":"503"}}],
      "status":{"code":2,"message":"upstream"}}]}]}]}"#;
    let (status, _, body) = http(a, "/v1/traces", &js, json.as_bytes()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body, b"{}");
    let found = store
        .search(&Query {
            attributes: vec![("http.response.status_code".into(), "503".into())],
            error: Some(true),
            limit: 5,
            ..Query::default()
        })
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].trace_id, "5b8efff798038103d269b633813fc60c");
    assert_eq!(found[0].root_service, "js");

    // Not OTLP: a 400 with a google.rpc.Status in the request's encoding.
    let (status, _, body) = http(a, "/v1/traces", &pb, b"\xff\xff\xff garbage").await;
    assert_eq!(status, 400);
    let st = RpcStatus::decode(body.as_slice()).unwrap();
    assert_eq!(st.code, 3);
    assert!(st.message.contains("not an OTLP"), "{st:?}");
    let (status, _, body) = http(a, "/v1/traces", &js, b"{\"resourceSpans\": 7}").await;
    assert_eq!(status, 400);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["code"], 3);
    // Other media types: 415, saying what to send.
    let (status, _, body) = http(a, "/v1/traces", &[("content-type", "text/plain")], b"x").await;
    assert_eq!(status, 415);
    assert!(String::from_utf8_lossy(&body).contains("application/x-protobuf"));
    // Gzip bodies (what exporters send with OTEL_EXPORTER_OTLP_COMPRESSION=gzip)
    // are taken; a broken one is a 400, one that inflates past the limit a
    // 413 (read no further), another encoding a 415.
    let gzip = |data: &[u8]| {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    };
    let gz = [
        ("content-type", "application/x-protobuf"),
        ("content-encoding", "gzip"),
    ];
    let req = request("gz", vec![span(7, 1, 0, "GET /gz", T0, false)]);
    let (status, _, body) = http(a, "/v1/traces", &gz, &gzip(&req.encode_to_vec())).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (status, _, _) = http(a, "/v1/traces", &gz, b"\x1f\x8b not gzip").await;
    assert_eq!(status, 400);
    let bomb = gzip(&vec![0u8; 16 << 20]);
    assert!(bomb.len() < 64 << 10, "small on the wire");
    let (status, _, body) = http(a, "/v1/traces", &gz, &bomb).await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    let br = [
        ("content-type", "application/x-protobuf"),
        ("content-encoding", "br"),
    ];
    let (status, _, body) = http(a, "/v1/traces", &br, b"x").await;
    assert_eq!(status, 415);
    assert!(String::from_utf8_lossy(&body).contains("gzip"));
    // Larger than max_request_bytes: 413.
    let (status, _, _) = http(a, "/v1/traces", &pb, &vec![0u8; 65 << 10]).await;
    assert_eq!(status, 413);
    // Only the good spans were stored.
    assert_eq!(store.stats().spans, 3);
    assert_eq!(store.stats().rejected, 1);
    store.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_grpc_stores_spans_and_reports_refused_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = TraceStore::open(TracesConfig {
        max_request_bytes: 64 << 10,
        ..config(dir.path())
    })
    .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(meshwork_traces::serve_grpc(l, store.clone(), async {
        let _ = stopped.await;
    }));
    let mut client = TraceServiceClient::connect(format!("http://{a}"))
        .await
        .unwrap();
    let mut zero = span(3, 9, 0, "zero", T0, false);
    zero.span_id = vec![0; 8];
    let resp = client
        .export(request(
            "grpc",
            vec![
                span(3, 1, 0, "GET /g", T0, false),
                span(3, 2, 1, "call", T0 + 5, true),
                zero,
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    let p = resp.partial_success.unwrap();
    assert_eq!(p.rejected_spans, 1);
    assert!(p.error_message.contains("span_id"), "{p:?}");
    let t = store.trace(&3u128.to_be_bytes()).unwrap().unwrap();
    assert_eq!(t.len(), 2);
    // A message past max_request_bytes is refused, and the server goes on.
    let big = span(4, 1, 0, &"x".repeat(70 << 10), T0, false);
    let err = client.export(request("grpc", vec![big])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    client
        .export(request("grpc", vec![span(5, 1, 0, "after", T0, false)]))
        .await
        .unwrap();
    assert!(store.trace(&5u128.to_be_bytes()).unwrap().is_some());
    let _ = stop.send(());
    server.await.unwrap().unwrap();
    store.close();
}

async fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let resp = meshwork_testkit::http::raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    let body = meshwork_testkit::http::body_of(&resp);
    (
        meshwork_testkit::http::status_of(&resp),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

fn doc() -> Spec {
    Spec {
        doc: meshwork_api::openapi::merge(&[meshwork_traces::OPENAPI]).unwrap(),
    }
}

#[test]
fn the_document_lists_exactly_the_routes() {
    doc().assert_routes("traces", meshwork_traces::api::ROUTES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_api_answers_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let store = TraceStore::open(config(dir.path())).unwrap();
    // gateway -> order -> payment (declined), and a second, fast trace.
    let mut req = request("gateway", vec![span(11, 1, 0, "POST /orders", T0, false)]);
    let order = request(
        "order",
        vec![span(11, 2, 1, "create order", T0 + 10, false)],
    );
    let payment = request("payment", vec![span(11, 3, 2, "charge", T0 + 20, true)]);
    req.resource_spans.extend(order.resource_spans);
    req.resource_spans.extend(payment.resource_spans);
    store.ingest(req).await.unwrap();
    store
        .ingest(request(
            "gateway",
            vec![span(12, 1, 0, "GET /health", T0 + 99, false)],
        ))
        .await
        .unwrap();
    let a = serve_http(meshwork_traces::api::router(store.clone())).await;
    let d = doc();
    let (s, v) = get(a, "/v1/traces").await;
    d.check_response("/v1/traces", "get", s, &v);
    assert_eq!(v["traces"].as_array().unwrap().len(), 2);
    let (s, v) = get(a, "/v1/traces?service=payment&error=true&attr=attempt=0").await;
    d.check_response("/v1/traces", "get", s, &v);
    let traces = v["traces"].as_array().unwrap();
    assert_eq!(traces.len(), 1);
    assert_eq!(traces[0]["root_service"], "gateway");
    assert_eq!(traces[0]["root_operation"], "POST /orders");
    assert_eq!(traces[0]["errors"], 1);
    let (s, v) = get(a, "/v1/traces?service=gateway&operation=GET%20/health").await;
    assert_eq!((s, v["traces"].as_array().unwrap().len()), (200, 1));
    let (s, v) = get(a, "/v1/traces?attr=attempt=5").await;
    assert_eq!((s, v["traces"].as_array().unwrap().len()), (200, 0));
    for bad in [
        "/v1/traces?limit=0",
        "/v1/traces?min_duration_ms=-1",
        "/v1/traces?error=maybe",
        "/v1/traces?attr=novalue",
        "/v1/traces?operation=x",
        "/v1/traces?min_duration_ms=5&max_duration_ms=1",
        "/v1/traces?colour=red",
    ] {
        let (s, v) = get(a, bad).await;
        assert_eq!(s, 400, "{bad}: {v}");
        d.check_response("/v1/traces", "get", s, &v);
    }
    let id = format!("{:032x}", 11u128);
    let (s, v) = get(a, &format!("/v1/traces/{id}")).await;
    d.check_response("/v1/traces/{trace_id}", "get", s, &v);
    let spans = v["spans"].as_array().unwrap();
    assert_eq!(spans.len(), 3);
    assert_eq!(spans[2]["parent_span_id"], spans[1]["span_id"]);
    assert_eq!(spans[2]["status"]["code"], "error");
    assert_eq!(spans[2]["service"], "payment");
    let (s, v) = get(a, &format!("/v1/traces/{:032x}", 99u128)).await;
    assert_eq!(s, 404);
    d.check_response("/v1/traces/{trace_id}", "get", s, &v);
    let (s, v) = get(a, "/v1/traces/zz").await;
    assert_eq!(s, 400);
    d.check_response("/v1/traces/{trace_id}", "get", s, &v);
    let (s, v) = get(a, "/v1/traces/dependencies").await;
    d.check_response("/v1/traces/dependencies", "get", s, &v);
    assert_eq!(
        v["edges"],
        serde_json::json!([
            {"parent": "gateway", "child": "order", "calls": 1, "errors": 0},
            {"parent": "order", "child": "payment", "calls": 1, "errors": 1},
        ])
    );
    let (s, v) = get(a, "/v1/traces/services").await;
    d.check_response("/v1/traces/services", "get", s, &v);
    assert_eq!(v["services"].as_array().unwrap().len(), 3);
    let (s, v) = get(a, "/v1/traces/stats").await;
    d.check_response("/v1/traces/stats", "get", s, &v);
    assert_eq!(v["spans"], 4);
    // Slowest first: a long trace, older than the others, comes first.
    let mut slow = span(13, 1, 0, "GET /slow", T0 - 1_000_000_000, false);
    slow.end_time_unix_nano = T0;
    store.ingest(request("gateway", vec![slow])).await.unwrap();
    let (s, v) = get(a, "/v1/traces?sort=duration&limit=2").await;
    d.check_response("/v1/traces", "get", s, &v);
    let ids: Vec<&str> = v["traces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["trace_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [format!("{:032x}", 13u128), format!("{:032x}", 11u128)]
    );
    let (s, v) = get(a, "/v1/traces?sort=slowest").await;
    assert_eq!(s, 400, "{v}");
    store.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_sampling_keeps_failed_and_slow_traces_and_samples_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = TraceStore::open(TracesConfig {
        tail_sampling: Some(meshwork_traces::TailSampling {
            decision_wait: Duration::from_millis(200),
            keep_ratio: 0.0,
            slow: Duration::from_millis(500),
            max_pending_spans: 10_000,
        }),
        ..config(dir.path())
    })
    .unwrap();
    let mut slow_root = span(22, 1, 0, "GET /slow", T0, false);
    slow_root.end_time_unix_nano = T0 + 900_000_000;
    let got = store
        .ingest(request(
            "shop",
            vec![
                span(21, 1, 0, "GET /fast", T0, false),
                span(21, 2, 1, "db", T0 + 10, false),
                slow_root,
                span(23, 1, 0, "GET /failing", T0, false),
            ],
        ))
        .await
        .unwrap();
    assert_eq!(got.accepted, 4);
    // The failing trace's error arrives in a later export: still one decision.
    store
        .ingest(request(
            "shop",
            vec![span(23, 2, 1, "charge", T0 + 5, true)],
        ))
        .await
        .unwrap();
    assert_eq!(store.stats().pending_decision, 5);
    // Decided (nothing pending) and written (kept + dropped = all).
    meshwork_testkit::until(
        "the sampling decisions",
        Duration::from_secs(20),
        async || {
            let s = store.stats();
            s.pending_decision == 0 && s.spans as u64 + s.sampled_out == 5
        },
    )
    .await;
    let stats = store.stats();
    assert_eq!((stats.spans, stats.sampled_out), (3, 2), "{stats:?}");
    assert!(store.trace(&21u128.to_be_bytes()).unwrap().is_none());
    assert_eq!(
        store.trace(&22u128.to_be_bytes()).unwrap().unwrap().len(),
        1
    );
    assert_eq!(
        store.trace(&23u128.to_be_bytes()).unwrap().unwrap().len(),
        2
    );
    // A late span follows its trace's decision.
    store
        .ingest(request(
            "shop",
            vec![span(21, 3, 1, "late", T0 + 20, false)],
        ))
        .await
        .unwrap();
    assert_eq!(store.stats().sampled_out, 3);
    // Spans still waiting when the store closes are decided and written.
    store
        .ingest(request("shop", vec![span(24, 1, 0, "boom", T0, true)]))
        .await
        .unwrap();
    store.close();
    let store = TraceStore::open(config(dir.path())).unwrap();
    assert!(store.trace(&24u128.to_be_bytes()).unwrap().is_some());
    store.close();
}
