//! `meshwork demo load`: places orders through the gateway with a number of
//! concurrent clients and reports successes, failures by reason and latency
//! percentiles.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use meshwork_loadgen::latency::Latency;
use meshwork_loadgen::progress::Progress;
use parking_lot::Mutex;
use serde::Serialize;

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Gateway base URL (`http://127.0.0.1:8080`).
    pub gateway: String,
    /// Orders to place.
    pub orders: usize,
    /// Clients placing them at once.
    pub concurrency: usize,
    /// Distinct customers (each is rate-limited by the gateway on its own).
    pub customers: usize,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// The result.
#[derive(Debug, Clone, Serialize)]
pub struct LoadSummary {
    /// Orders attempted.
    pub orders: usize,
    /// Confirmed (201).
    pub confirmed: usize,
    /// Failures by reason code (`out_of_stock`, `payment_unavailable`,
    /// `rate_limited`, `transport`, `pending` for a 202, ...).
    pub failures: BTreeMap<String, usize>,
    /// Wall time, seconds.
    pub elapsed_secs: f64,
    /// Orders per second (all outcomes).
    pub rate_per_sec: f64,
    /// Latency percentiles of all requests, milliseconds.
    pub p50_ms: f64,
    /// 90th percentile, milliseconds.
    pub p90_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
    /// Slowest, milliseconds.
    pub max_ms: f64,
}

impl std::fmt::Display for LoadSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} orders in {:.1} s ({:.0}/s): {} confirmed, {} failed",
            self.orders,
            self.elapsed_secs,
            self.rate_per_sec,
            self.confirmed,
            self.orders - self.confirmed
        )?;
        for (reason, n) in &self.failures {
            writeln!(f, "  {reason:<24} {n}")?;
        }
        write!(
            f,
            "latency ms: p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
            self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms
        )
    }
}

const SKUS: [&str; 3] = ["sku-keyboard", "sku-mouse", "sku-cable"];

/// Runs the load; `Err` only for bad options.
pub async fn run(opts: LoadOptions) -> Result<LoadSummary, String> {
    if opts.orders == 0 || opts.concurrency == 0 || opts.customers == 0 {
        return Err("orders, concurrency and customers must be at least 1".into());
    }
    if opts.concurrency > 10_000 || opts.customers > 100 {
        return Err(
            "concurrency is limited to 10000 and customers to 100 (acct-1..acct-100)".into(),
        );
    }
    let base = opts.gateway.trim_end_matches('/').to_string();
    let uri: http::Uri = format!("{base}/api/orders")
        .parse()
        .map_err(|e| format!("gateway URL {base:?}: {e}"))?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(Latency::new()));
    let failures = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let run_id: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let started = Instant::now();
    // A progress line only on a terminal: logs and CI get no carriage returns.
    let progress = opts
        .progress
        .then(|| Progress::start("orders", done.clone(), opts.orders as u64));
    let mut workers = Vec::new();
    for _ in 0..opts.concurrency.min(opts.orders) {
        let (client, uri, next, done, hist, failures) = (
            client.clone(),
            uri.clone(),
            next.clone(),
            done.clone(),
            hist.clone(),
            failures.clone(),
        );
        let (total, customers) = (opts.orders, opts.customers);
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let c = i % customers + 1;
                let body = serde_json::json!({
                    "sku": SKUS[i % SKUS.len()],
                    "qty": 1,
                    "account": format!("acct-{c}"),
                });
                let req = http::Request::post(uri.clone())
                    .header("content-type", "application/json")
                    .header("x-customer", format!("cust-{c}"))
                    .header("idempotency-key", format!("load-{run_id}-{i}"))
                    .body(Full::new(Bytes::from(body.to_string())));
                let t = Instant::now();
                let outcome = match req {
                    Ok(req) => match client.request(req).await {
                        Ok(resp) => {
                            let status = resp.status();
                            let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                            if status == http::StatusCode::CREATED {
                                None
                            } else {
                                Some(reason(status, body.ok().as_deref()))
                            }
                        }
                        Err(_) => Some("transport".to_string()),
                    },
                    Err(_) => Some("bad_request".to_string()),
                };
                hist.lock().record(t.elapsed());
                if let Some(r) = outcome {
                    *failures.lock().entry(r).or_default() += 1;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    drop(progress);
    let elapsed = started.elapsed().as_secs_f64();
    let failures = failures.lock().clone();
    let failed: usize = failures.values().sum();
    let h = hist.lock().clone();
    let ms = |q: f64| h.quantile_ms(q);
    Ok(LoadSummary {
        orders: opts.orders,
        confirmed: opts.orders - failed,
        failures,
        elapsed_secs: elapsed,
        rate_per_sec: opts.orders as f64 / elapsed.max(1e-9),
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        max_ms: h.max_ms(),
    })
}

/// The error code of a failed order answer (or its status); `pending` for a
/// 202 (the order was still running when the service answered).
fn reason(status: http::StatusCode, body: Option<&[u8]>) -> String {
    if status == http::StatusCode::ACCEPTED {
        return "pending".into();
    }
    body.and_then(meshwork_sdk::ErrorBody::parse)
        .map_or_else(|| format!("http_{}", status.as_u16()), |e| e.code)
}
