//! `meshwork bench traces`: the trace store under load — OTLP/gRPC ingestion
//! (spans per second, export latency), bytes per span on disk, then query
//! latency over what was stored (search without and with filters, one trace,
//! the dependency graph). The spans are a shop-like trace of eight spans over
//! four services with HTTP attributes, 1 % of them failed, durations with a
//! long tail.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Args;
use meshwork_loadgen::latency::Latency;
use meshwork_loadgen::procs::Procs;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use parking_lot::Mutex;
use serde_json::{Value, json};

/// `meshwork bench traces`.
#[derive(Args)]
pub(crate) struct TracesBench {
    /// The node's OTLP/gRPC address.
    #[arg(long, default_value = "127.0.0.1:4317")]
    otlp_grpc: String,
    /// The node's HTTP address (queries, stats).
    #[arg(long, env = "MESHWORK_HTTP", default_value = "127.0.0.1:7070")]
    http: String,
    /// Spans to send (eight per trace).
    #[arg(long, default_value_t = 200_000)]
    spans: u64,
    /// Spans per export request.
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// Exports in flight.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Times each query runs.
    #[arg(long, default_value_t = 20)]
    queries: usize,
    /// Processes to sample during ingestion (CPU %, RSS): NAME=PID, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<String>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

fn kv(k: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: k.to_string(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

fn s(v: &str) -> any_value::Value {
    any_value::Value::StringValue(v.to_string())
}

/// Eight spans of trace `n`: gateway server and client, order server, its
/// database and two calls, inventory and payment servers.
fn trace(n: u64, now_ns: u64) -> Vec<(usize, Span)> {
    let tid = (u128::from(n) << 64 | 0x5eed).to_be_bytes().to_vec();
    let id = |k: u64| (n << 4 | k).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    // Durations: mostly 1-20 ms, one trace in 1000 slow (0.5-2 s).
    let base = 1_000_000 + (n * 7_919 % 19_000_000);
    let total = if n % 1000 == 7 {
        500_000_000 + n % 1_500_000_000
    } else {
        base
    };
    let failed = n % 100 == 3;
    let start = now_ns;
    let mk = |svc: usize, k: u64, parent: u64, name: &str, kind: i32, off: u64, dur: u64| {
        let mut sp = Span {
            trace_id: tid.clone(),
            span_id: id(k).to_be_bytes().to_vec(),
            parent_span_id: if parent == 0 {
                vec![]
            } else {
                id(parent).to_be_bytes().to_vec()
            },
            name: name.to_string(),
            kind,
            start_time_unix_nano: start + off,
            end_time_unix_nano: start + off + dur,
            attributes: vec![
                kv("http.request.method", s("POST")),
                kv("http.route", s(name)),
                kv("url.path", s(&format!("/api/orders/{n}"))),
                kv("customer", s(&format!("cust-{}", n % 50_000))),
                kv(
                    "http.response.status_code",
                    any_value::Value::IntValue(if failed && svc == 3 { 402 } else { 200 }),
                ),
            ],
            ..Default::default()
        };
        if failed && svc == 3 {
            sp.status = Some(Status {
                code: 2,
                message: "card declined".into(),
            });
        }
        (svc, sp)
    };
    vec![
        mk(0, 1, 0, "POST shop-orders-create", 2, 0, total),
        mk(0, 2, 1, "POST", 3, total / 50, total - total / 25),
        mk(1, 3, 2, "POST /orders", 2, total / 25, total - total / 10),
        mk(1, 4, 3, "INSERT orders", 3, total / 10, total / 20),
        mk(1, 5, 3, "POST inventory", 3, total / 5, total / 5),
        mk(
            2,
            6,
            5,
            "POST /reservations",
            2,
            total / 5 + 10_000,
            total / 5 - 20_000,
        ),
        mk(1, 7, 3, "POST payment", 3, total / 2, total / 4),
        mk(
            3,
            8,
            7,
            "POST /charges",
            2,
            total / 2 + 10_000,
            total / 4 - 20_000,
        ),
    ]
}

const SERVICES: [&str; 4] = ["gateway", "order", "inventory", "payment"];

fn request(spans: Vec<(usize, Span)>) -> ExportTraceServiceRequest {
    let mut by: Vec<Vec<Span>> = vec![Vec::new(); SERVICES.len()];
    for (svc, sp) in spans {
        by[svc].push(sp);
    }
    ExportTraceServiceRequest {
        resource_spans: by
            .into_iter()
            .enumerate()
            .filter(|(_, v)| !v.is_empty())
            .map(|(i, spans)| ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", s(SERVICES[i]))],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

async fn get_json(http: &str, path: &str) -> Result<(Value, Duration)> {
    let started = Instant::now();
    let reply = crate::httpc::call(http, "GET", path, None).await?;
    let took = started.elapsed();
    Ok((reply.json()?, took))
}

pub(crate) async fn run(b: TracesBench) -> Result<()> {
    let traces = b.spans.div_ceil(8);
    let per_batch = (b.batch / 8).max(1) as u64;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", b.otlp_grpc))?
        .connect()
        .await
        .with_context(|| format!("connecting to OTLP/gRPC at {}", b.otlp_grpc))?;
    let next = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Latency::new()));
    let refused = Arc::new(AtomicU64::new(0));
    let mut procs = Procs::new(&b.pids)?;
    procs.mark();
    let started = Instant::now();
    let t0 = now_ns();
    let mut workers = Vec::new();
    for _ in 0..b.concurrency.max(1) {
        let (next, lat, refused) = (next.clone(), lat.clone(), refused.clone());
        let mut client =
            TraceServiceClient::new(channel.clone()).max_encoding_message_size(64 << 20);
        workers.push(tokio::spawn(async move {
            let mut mine = Latency::new();
            loop {
                let first = next.fetch_add(per_batch, Ordering::Relaxed);
                if first >= traces {
                    break;
                }
                let last = (first + per_batch).min(traces);
                let spans: Vec<(usize, Span)> = (first..last)
                    .flat_map(|n| trace(n, t0 + n * 1_000))
                    .collect();
                let req = request(spans);
                let at = Instant::now();
                match client.export(req).await {
                    Ok(_) => mine.record(at.elapsed()),
                    Err(_) => {
                        refused.fetch_add(last - first, Ordering::Relaxed);
                    }
                }
            }
            lat.lock().merge(&mine);
        }));
    }
    for w in workers {
        w.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    procs.end("ingest");
    let sent = traces * 8;
    let spans_per_sec = sent as f64 / secs;
    let (stats, _) = get_json(&b.http, "/v1/traces/stats").await?;
    let stored = stats["spans"].as_u64().unwrap_or(0);
    let bytes = stats["bytes"].as_u64().unwrap_or(0);
    let bytes_per_span = bytes as f64 / stored.max(1) as f64;
    // Queries over what is stored.
    let some_trace = format!("{:032x}", u128::from(traces / 2) << 64 | 0x5eed);
    let queries: Vec<(&str, String)> = vec![
        ("newest 20", "/v1/traces?limit=20".into()),
        (
            "service=payment&error=true",
            "/v1/traces?service=payment&error=true&limit=20".into(),
        ),
        (
            "min_duration_ms=400",
            "/v1/traces?min_duration_ms=400&limit=20".into(),
        ),
        (
            "service+operation",
            "/v1/traces?service=inventory&operation=POST%20/reservations&limit=20".into(),
        ),
        (
            "rare attribute",
            format!(
                "/v1/traces?attr=customer=cust-{}&limit=20",
                (traces / 3) % 50_000
            ),
        ),
        (
            "absent attribute",
            "/v1/traces?attr=customer=nobody&limit=20".into(),
        ),
        ("one trace", format!("/v1/traces/{some_trace}")),
        ("dependencies", "/v1/traces/dependencies".into()),
    ];
    let mut qout = Vec::new();
    for (name, path) in &queries {
        let mut l = Latency::new();
        let mut found = 0;
        for _ in 0..b.queries.max(1) {
            let (v, took) = get_json(&b.http, path).await?;
            l.record(took);
            found = v["traces"]
                .as_array()
                .map(Vec::len)
                .or_else(|| v["spans"].as_array().map(Vec::len))
                .or_else(|| v["edges"].as_array().map(Vec::len))
                .unwrap_or(0);
        }
        qout.push(json!({ "query": name, "results": found, "p50_ms": l.quantile_ms(0.5), "p99_ms": l.quantile_ms(0.99) }));
    }
    let l = lat.lock();
    let out = json!({
        "sent_spans": sent,
        "refused_spans": refused.load(Ordering::Relaxed),
        "stored_spans": stored,
        "seconds": secs,
        "spans_per_sec": spans_per_sec,
        "export_p50_ms": l.quantile_ms(0.5),
        "export_p99_ms": l.quantile_ms(0.99),
        "disk_bytes": bytes,
        "bytes_per_span": bytes_per_span,
        "queries": qout,
        "procs": procs.json(),
    });
    if b.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "ingest: {sent} spans in {secs:.1} s = {spans_per_sec:.0} spans/s (batches of {}, {} in flight); export p50 {:.2} ms p99 {:.2} ms; refused {}",
        per_batch * 8,
        b.concurrency,
        l.quantile_ms(0.5),
        l.quantile_ms(0.99),
        refused.load(Ordering::Relaxed)
    );
    println!("disk: {stored} spans stored, {bytes} bytes = {bytes_per_span:.0} bytes/span");
    for q in &qout {
        println!(
            "query {:<28} {:>4} results  p50 {:>8.2} ms  p99 {:>8.2} ms",
            q["query"].as_str().unwrap_or(""),
            q["results"],
            q["p50_ms"].as_f64().unwrap_or(0.0),
            q["p99_ms"].as_f64().unwrap_or(0.0)
        );
    }
    procs.print();
    Ok(())
}
