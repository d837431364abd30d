//! `meshwork bench kv`: a load generator for any etcd v3 endpoint (Meshwork or etcd),
//! with a live progress line and a final summary (throughput, latency percentiles, errors);
//! `meshwork bench registry | config` (in `bench_coord`) drive a node's coordination API;
//! `meshwork bench txn` (`bench_txn`) and `meshwork bench mq` (`bench_mq`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use meshwork_etcd::Client;
use meshwork_etcd::proto::etcdserverpb as pb;
use meshwork_loadgen::latency::Latency;
use parking_lot::Mutex;
use serde_json::json;
use tokio_stream::StreamExt;

#[derive(Subcommand)]
pub(crate) enum BenchCommand {
    /// Drive an etcd v3 endpoint with puts, ranges or watches.
    Kv(KvBench),
    /// Registry load on a node's HTTP API: registrations, heartbeats, change-to-watcher delivery.
    Registry(crate::bench_coord::RegistryBench),
    /// Config center load on a node's HTTP API: publish-to-listener delivery with long-polls.
    Config(crate::bench_coord::ConfigBench),
    /// Sagas through a node's /v1/txn/ API: sagas per second and the cost per step.
    Txn(crate::bench_txn::TxnBench),
    /// The message queue through the SDK on each target (a node's broker, NATS JetStream):
    /// publish and consume throughput, end-to-end latency, memory with a backlog.
    Mq(crate::bench_mq::MqBench),
    /// The trace store: OTLP/gRPC ingestion (spans/s), bytes per span, query latency.
    Traces(crate::bench_traces::TracesBench),
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Op {
    /// Put random keys.
    Put,
    /// Linearizable single-key range.
    Get,
    /// Serializable single-key range.
    GetSerializable,
    /// Watch delivery latency: WATCHERS watchers on one key, TOTAL puts at RATE/s.
    Watch,
}

#[derive(Args)]
pub(crate) struct KvBench {
    /// Comma-separated HOST:PORT endpoints.
    #[arg(long, default_value = "127.0.0.1:2479", value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Log in as USER:PASSWORD (a store with auth on): every call carries the token.
    #[arg(long)]
    user: Option<String>,
    /// Operation.
    #[arg(long, value_enum, default_value = "put")]
    op: Op,
    /// gRPC connections.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Concurrent clients (each runs one request at a time).
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Total requests (puts, for --op watch).
    #[arg(long, default_value_t = 10_000)]
    total: u64,
    /// Key size in bytes.
    #[arg(long, default_value_t = 8)]
    key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 100_000)]
    key_space: u64,
    /// Write every key of the key space before a get benchmark.
    #[arg(long)]
    prefill: bool,
    /// Watchers for --op watch.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// Puts per second for --op watch.
    #[arg(long, default_value_t = 50)]
    rate: u64,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Use keys 0, 1, 2, ... (modulo --key-space) in request order across all clients instead
    /// of random keys, so `--total N --key-space N` writes exactly N distinct keys.
    #[arg(long)]
    sequential: bool,
}

pub(crate) async fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Kv(b) => kv(b).await,
        BenchCommand::Registry(b) => crate::bench_coord::registry(b).await,
        BenchCommand::Config(b) => crate::bench_coord::config(b).await,
        BenchCommand::Txn(b) => crate::bench_txn::run(b).await,
        BenchCommand::Mq(b) => crate::bench_mq::run(b).await,
        BenchCommand::Traces(b) => crate::bench_traces::run(b).await,
    }
}

fn key(i: u64, size: usize) -> Vec<u8> {
    let s = format!("{i:0size$}");
    let b = s.as_bytes();
    b[b.len().saturating_sub(size)..].to_vec()
}

async fn clients(b: &KvBench) -> Result<Vec<Client>> {
    let mut out = Vec::with_capacity(b.conns);
    let creds = match &b.user {
        Some(u) => Some(
            meshwork_etcd::client::Credentials::parse(u)
                .context("--user: expected USER:PASSWORD")?,
        ),
        None => None,
    };
    for _ in 0..b.conns.max(1) {
        let c = Client::connect(&b.endpoints).await?;
        if let Some(creds) = &creds {
            c.authenticate(creds)
                .await
                .map_err(|e| anyhow::anyhow!("logging in: {}", e.message()))?;
        }
        out.push(c);
    }
    Ok(out)
}

async fn kv(b: KvBench) -> Result<()> {
    if b.clients == 0 || b.conns == 0 || b.key_space == 0 {
        bail!("--clients, --conns and --key-space must be at least 1");
    }
    if b.op == Op::Watch {
        return watch(b).await;
    }
    let conns = clients(&b).await?;
    if b.prefill && b.op != Op::Put {
        eprintln!("prefilling {} keys...", b.key_space);
        let value = vec![b'x'; b.value_size];
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..b.clients.min(256) {
            let mut c = conns[i % conns.len()].clone();
            let next = next.clone();
            let (ks, size, value) = (b.key_space, b.key_size, value.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= ks {
                        break;
                    }
                    let _ =
                        c.kv.put(pb::PutRequest {
                            key: key(k, size).into(),
                            value: value.clone().into(),
                            ..Default::default()
                        })
                        .await;
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
    }
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let issued = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(Latency::new()));
    let started = Instant::now();
    let prog = {
        let (done, errors, total) = (done.clone(), errors.clone(), b.total);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let d = done.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64().max(1e-9);
                progress!(
                    "\r{d}/{total} requests  {:.0} req/s  errors {}   ",
                    d as f64 / secs,
                    errors.load(Ordering::Relaxed)
                );
                if d >= total {
                    break;
                }
            }
        })
    };
    let mut tasks = Vec::new();
    for i in 0..b.clients {
        let mut c = conns[i % conns.len()].clone();
        let (done, errors, issued, hist) =
            (done.clone(), errors.clone(), issued.clone(), hist.clone());
        let (op, total, ks, size, vsize, sequential) = (
            b.op,
            b.total,
            b.key_space,
            b.key_size,
            b.value_size,
            b.sequential,
        );
        tasks.push(tokio::spawn(async move {
            // Deterministic per client: the same run picks the same keys.
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(i as u64);
            let value: bytes::Bytes = vec![b'v'; vsize].into();
            let mut local = Latency::new();
            loop {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                let idx = if sequential {
                    n % ks
                } else {
                    rand::Rng::random_range(&mut rng, 0..ks.max(1))
                };
                let k: bytes::Bytes = key(idx, size).into();
                let t0 = Instant::now();
                let ok = match op {
                    Op::Put => {
                        c.kv.put(pb::PutRequest {
                            key: k,
                            value: value.clone(),
                            ..Default::default()
                        })
                        .await
                        .map(|_| ())
                    }
                    Op::Get | Op::GetSerializable => {
                        c.kv.range(pb::RangeRequest {
                            key: k,
                            serializable: op == Op::GetSerializable,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ())
                    }
                    Op::Watch => Ok(()),
                };
                local.record(t0.elapsed());
                if let Err(e) = ok {
                    // Show the first failure so a run full of errors explains itself.
                    if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("\nfirst error: {:?}: {}", e.code(), e.message());
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            hist.lock().merge(&local);
        }));
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed();
    prog.abort();
    progress_end!();
    let h = hist.lock();
    summary(
        &b,
        &format!("{:?}", b.op).to_lowercase(),
        done.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        elapsed,
        &h,
    );
    Ok(())
}

fn summary(b: &KvBench, op: &str, n: u64, errors: u64, elapsed: Duration, h: &Latency) {
    let ms = |q: f64| h.quantile_ms(q);
    let rate = n as f64 / elapsed.as_secs_f64().max(1e-9);
    if b.json {
        println!(
            "{}",
            json!({"op": op, "conns": b.conns, "clients": b.clients, "requests": n, "errors": errors, "seconds": elapsed.as_secs_f64(), "throughput": rate,
                   "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99), "max_ms": h.max_ms()})
        );
    } else {
        println!("op {op}  conns {}  clients {}", b.conns, b.clients);
        println!(
            "requests {n}  errors {errors}  time {:.2}s  throughput {rate:.0}/s",
            elapsed.as_secs_f64()
        );
        println!(
            "latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
            ms(0.5),
            ms(0.9),
            ms(0.99),
            h.max_ms()
        );
    }
}

async fn watch(b: KvBench) -> Result<()> {
    let conns = clients(&b).await?;
    let watch_key: bytes::Bytes = bytes::Bytes::from_static(b"meshwork-bench/watch");
    let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; b.total as usize]));
    let hist = Arc::new(Mutex::new(Latency::new()));
    let received = Arc::new(AtomicU64::new(0));
    let expected = b.total * b.watchers as u64;
    // One watch stream per connection, watchers spread over them.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(b.watchers.max(1));
    let mut streams = Vec::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    for (ci, c) in conns.iter().enumerate() {
        let n = b.watchers / conns.len() + usize::from(ci < b.watchers % conns.len());
        if n == 0 {
            continue;
        }
        let mut c = c.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(n.max(1));
        for _ in 0..n {
            let create = pb::WatchCreateRequest {
                key: watch_key.clone(),
                ..Default::default()
            };
            tx.send(pb::WatchRequest {
                request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)),
            })
            .await
            .ok();
        }
        let mut stream = c
            .watch
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let (sent, hist, received, ready) = (
            sent.clone(),
            hist.clone(),
            received.clone(),
            ready_tx.clone(),
        );
        let mut stop = stop_rx.clone();
        streams.push(tokio::spawn(async move {
            let _keep = tx;
            let mut local = Latency::new();
            loop {
                let resp = tokio::select! {
                    m = stream.next() => match m { Some(Ok(r)) => r, _ => break },
                    _ = stop.changed() => break,
                };
                if resp.created {
                    let _ = ready.send(()).await;
                }
                let now = Instant::now();
                for ev in resp.events {
                    let seq: usize = ev
                        .kv
                        .as_ref()
                        .and_then(|kv| std::str::from_utf8(&kv.value).ok())
                        .and_then(|v| v.split(':').next())
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(usize::MAX);
                    if let Some(Some(t)) = sent.lock().get(seq).copied() {
                        local.record(now - t);
                    }
                    received.fetch_add(1, Ordering::Relaxed);
                }
                if received.load(Ordering::Relaxed) >= expected {
                    break;
                }
            }
            hist.lock().merge(&local);
        }));
    }
    drop(ready_tx);
    for _ in 0..b.watchers {
        if ready_rx.recv().await.is_none() {
            break;
        }
    }
    eprintln!(
        "{} watchers ready; writing {} puts at {}/s",
        b.watchers, b.total, b.rate
    );
    let mut writer = conns[0].clone();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / b.rate.max(1)));
    let pad = "x".repeat(b.value_size.saturating_sub(12));
    for seq in 0..b.total {
        tick.tick().await;
        sent.lock()[seq as usize] = Some(Instant::now());
        writer
            .kv
            .put(pb::PutRequest {
                key: watch_key.clone(),
                value: format!("{seq}:{pad}").into(),
                ..Default::default()
            })
            .await?;
        progress!(
            "\rput {}/{}  events received {}/{}   ",
            seq + 1,
            b.total,
            received.load(Ordering::Relaxed),
            expected
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    for s in streams {
        let _ = s.await;
    }
    progress_end!();
    let got = received.load(Ordering::Relaxed);
    let h = hist.lock();
    summary(
        &b,
        "watch",
        got,
        expected.saturating_sub(got),
        started.elapsed(),
        &h,
    );
    Ok(())
}
