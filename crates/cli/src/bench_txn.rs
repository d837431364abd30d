//! `meshwork bench txn`: sagas of N no-op steps through a node's `/v1/txn/`
//! API at several concurrencies — transactions per second, end-to-end
//! latency (start to final record) and the coordinator's cost per step. The
//! participant is an HTTP server in this process that answers 200 at once,
//! registered with the node as a persistent instance.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use meshwork_loadgen::Errors;
use meshwork_loadgen::http::{Conn, open_conns};
use meshwork_loadgen::latency::Latency;
use meshwork_loadgen::procs::{Procs, check_fd_limit};
use parking_lot::Mutex;
use serde_json::{Value, json};

/// Deadline of one call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a worker waits for its transaction to be final.
const WAIT_MS: u64 = 30_000;
/// The participant's service name.
const SERVICE: &str = "bench-txn-noop";

/// `meshwork bench txn`.
#[derive(Args)]
pub(crate) struct TxnBench {
    /// The node's HTTP address.
    #[arg(long, env = "MESHWORK_HTTP", default_value = "127.0.0.1:7070")]
    http: String,
    /// Concurrent clients, one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Steps per saga (one stage each).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Processes to sample per run (CPU %, RSS): NAME=PID, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<String>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

/// Starts the no-op participant; its port.
async fn participant() -> Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the participant")?;
    let port = listener.local_addr()?.port();
    let app = axum::Router::new().fallback(|| async { "" });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(port)
}

fn spec(steps: usize) -> Value {
    let branches: Vec<Value> = (0..steps)
        .map(|i| {
            json!({"name": format!("step{i}"), "service": SERVICE, "stage": i,
                   "action": {"path": format!("/step{i}")}, "undo": {"path": format!("/undo{i}")}})
        })
        .collect();
    json!({"mode": "saga", "branches": branches})
}

/// One run's results.
struct Run {
    concurrency: usize,
    committed: u64,
    failed: u64,
    secs: f64,
    latency: Latency,
}

/// Starts and awaits sagas on one connection until `until`.
async fn worker(
    mut conn: Conn,
    body: Bytes,
    until: Instant,
    committed: Arc<AtomicU64>,
    errors: Arc<Errors>,
    hist: Arc<Mutex<Latency>>,
) {
    let mut local = Latency::new();
    while Instant::now() < until {
        let t0 = Instant::now();
        let id = match conn
            .call("POST", "/v1/txn", Some(body.clone()), CALL_TIMEOUT)
            .await
        {
            Ok(r) if r.status == 201 => match r.json() {
                Ok(v) => v["id"].as_str().unwrap_or_default().to_owned(),
                Err(e) => {
                    errors.add("start", &e);
                    continue;
                }
            },
            Ok(r) => {
                errors.add("start", &r.unexpected("starting a saga"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => {
                errors.add("start", &e);
                continue;
            }
        };
        let path = format!("/v1/txn/{id}?wait_ms={WAIT_MS}");
        let timeout = CALL_TIMEOUT + Duration::from_millis(WAIT_MS);
        match conn.call("GET", &path, None, timeout).await {
            Ok(r) if r.status == 200 => match r.json() {
                Ok(v) if v["status"] == "committed" => {
                    local.record(t0.elapsed());
                    committed.fetch_add(1, Ordering::Relaxed);
                }
                Ok(v) => errors.add("saga", &format!("{id} ended {}", v["status"])),
                Err(e) => errors.add("saga", &e),
            },
            Ok(r) => errors.add("wait", &r.unexpected("waiting for the saga")),
            Err(e) => errors.add("wait", &e),
        }
    }
    hist.lock().merge(&local);
}

/// `meshwork bench txn`.
pub(crate) async fn run(b: TxnBench) -> Result<()> {
    if b.steps == 0 || b.concurrency.contains(&0) {
        bail!("--steps and every --concurrency must be at least 1");
    }
    let max = b.concurrency.iter().copied().max().unwrap_or(1);
    check_fd_limit(2 * max + 8);
    let mut procs = Procs::new(&b.pids)?;
    let port = participant().await?;
    let mut conn = Conn::open(&b.http).await?;
    let instance = json!({"address": "127.0.0.1", "port": port, "ephemeral": false});
    let r = conn
        .call(
            "POST",
            &format!("/v1/services/{SERVICE}/instances"),
            Some(Bytes::from(instance.to_string())),
            CALL_TIMEOUT,
        )
        .await?;
    if r.status != 201 {
        return Err(r.unexpected("registering the participant").into());
    }
    let instance_id = r.json()?["id"].as_str().unwrap_or_default().to_owned();
    let body = Bytes::from(json!({ "spec": spec(b.steps) }).to_string());
    let mut runs = Vec::new();
    for &c in &b.concurrency {
        let conns = open_conns(&b.http, c).await?;
        let committed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Errors::default());
        let hist = Arc::new(Mutex::new(Latency::new()));
        procs.mark();
        let started = Instant::now();
        let until = started + Duration::from_secs(b.seconds);
        let tasks: Vec<_> = conns
            .into_iter()
            .map(|conn| {
                tokio::spawn(worker(
                    conn,
                    body.clone(),
                    until,
                    committed.clone(),
                    errors.clone(),
                    hist.clone(),
                ))
            })
            .collect();
        for t in tasks {
            t.await.context("a bench worker failed")?;
        }
        let secs = started.elapsed().as_secs_f64();
        procs.end(&format!("concurrency-{c}"));
        let run = Run {
            concurrency: c,
            committed: committed.load(Ordering::Relaxed),
            failed: errors.get(),
            secs,
            latency: hist.lock().clone(),
        };
        eprintln!(
            "concurrency {c}: {:.0} sagas/s, latency {}",
            run.committed as f64 / secs.max(1e-9),
            run.latency.line()
        );
        runs.push(run);
    }
    let _ = conn
        .call(
            "DELETE",
            &format!("/v1/services/{SERVICE}/instances/{instance_id}"),
            None,
            CALL_TIMEOUT,
        )
        .await;
    let per_sec = |r: &Run| r.committed as f64 / r.secs.max(1e-9);
    // The participant answers at once, so a step's share of the latency is
    // what the coordinator adds to it.
    let per_step = |r: &Run, q: f64| r.latency.quantile_ms(q) / b.steps as f64;
    if b.json {
        let out = json!({
            "bench": "txn", "http": b.http, "steps": b.steps, "seconds": b.seconds,
            "runs": runs.iter().map(|r| json!({
                "concurrency": r.concurrency, "committed": r.committed, "errors": r.failed,
                "per_sec": per_sec(r), "latency": r.latency.json(),
                "per_step_p50_ms": per_step(r, 0.5), "per_step_p99_ms": per_step(r, 0.99),
            })).collect::<Vec<_>>(),
            "phases": procs.json(),
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "txn bench on {}: {}-step sagas, no-op participant, {} s per run",
        b.http, b.steps, b.seconds
    );
    for r in &runs {
        println!(
            "concurrency {:>3}: {:>7.0} sagas/s  {} committed  {} errors  per step p50 {:.2} ms p99 {:.2} ms  latency {}",
            r.concurrency,
            per_sec(r),
            r.committed,
            r.failed,
            per_step(r, 0.5),
            per_step(r, 0.99),
            r.latency.line()
        );
    }
    procs.print();
    Ok(())
}
