//! `meshwork bench mq`: the message queue through the SDK's own API
//! (`meshwork_sdk::mq`) on every target — a node's embedded broker and NATS
//! JetStream — phase by phase, each phase on every target before the next, so
//! both sides share the machine's noise: publish throughput and latency with 1
//! and N publishers, consume+ack throughput of a backlog, publish-to-handler
//! latency at a fixed rate, and (with `--backlog`) the RSS of the sampled
//! processes while a large backlog waits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use meshwork_loadgen::Errors;
use meshwork_loadgen::latency::Latency;
use meshwork_loadgen::procs::Procs;
use meshwork_sdk::mq::{MqClient, OutMessage, Received, SubscribeOptions};
use parking_lot::Mutex;
use serde_json::{Value, json};

/// Longest wait for a consume or latency run to see its last message.
const DRAIN_WITHIN: Duration = Duration::from_secs(120);
/// Messages per request when filling a backlog.
const BACKLOG_BATCH: usize = 500;

/// `meshwork bench mq`.
#[derive(Args)]
pub(crate) struct MqBench {
    /// Targets as NAME=ADDRESS, comma-separated: a node's HTTP address (`HOST:PORT`)
    /// for its embedded broker, `nats://HOST:PORT` for NATS JetStream.
    #[arg(long = "target", value_delimiter = ',', required = true)]
    targets: Vec<String>,
    /// Publisher counts: one publish run per value (each publisher sends one
    /// message at a time and waits for its acknowledgement).
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    publishers: Vec<usize>,
    /// Seconds per publish run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Messages the consume run takes and acks from the publish runs' backlog (at most
    /// what they published).
    #[arg(long, default_value_t = 50_000)]
    consume: u64,
    /// Handlers running at once in the consume and latency runs.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Messages per second of the publish-to-handler latency run (0 = skip it).
    #[arg(long, default_value_t = 500)]
    latency_rate: u64,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// Messages of backlog to publish (in batches of 500) before sampling RSS
    /// (0 = skip): the memory a waiting backlog costs each side.
    #[arg(long, default_value_t = 0)]
    backlog: u64,
    /// Processes to sample per phase (CPU %, RSS): NAME=PID, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<String>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

/// One target: its name, client and the topic this run uses on it.
struct Target {
    name: String,
    client: MqClient,
    topic: String,
}

/// `meshwork bench mq`.
pub(crate) async fn run(b: MqBench) -> Result<()> {
    if b.publishers.contains(&0) || b.concurrency == 0 || b.seconds == 0 {
        bail!("--publishers, --concurrency and --seconds must be at least 1");
    }
    if b.size < 16 {
        bail!("--size must be at least 16 (the latency run stamps the body)");
    }
    let mut procs = Procs::new(&b.pids)?;
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut targets = Vec::new();
    for t in &b.targets {
        let (name, addr) = t
            .split_once('=')
            .with_context(|| format!("--target {t:?} must be NAME=ADDRESS"))?;
        let client = MqClient::at(addr);
        let topic = format!("bench-{run_id}");
        client
            .create_topic(&topic, 4)
            .await
            .with_context(|| format!("creating topic {topic} on {name} ({addr})"))?;
        targets.push(Target {
            name: name.to_owned(),
            client,
            topic,
        });
    }
    let body = Bytes::from(vec![b'x'; b.size]);
    let mut results = Vec::new();
    let mut published = vec![0u64; targets.len()];
    for &p in &b.publishers {
        for (i, t) in targets.iter().enumerate() {
            procs.mark();
            let r = publish_run(t, p, Duration::from_secs(b.seconds), &body).await;
            procs.end(&format!("pub{p}-{}", t.name));
            published[i] += r["messages"].as_u64().unwrap_or(0);
            results.push(r);
        }
    }
    for (i, t) in targets.iter().enumerate() {
        let n = b.consume.min(published[i]);
        if n == 0 {
            continue;
        }
        procs.mark();
        let r = consume_run(t, n, b.concurrency).await?;
        procs.end(&format!("consume-{}", t.name));
        results.push(r);
    }
    if b.latency_rate > 0 {
        for t in &targets {
            procs.mark();
            let r =
                latency_run(t, b.latency_rate, b.latency_seconds, b.size, b.concurrency).await?;
            procs.end(&format!("e2e-{}", t.name));
            results.push(r);
        }
    }
    if b.backlog > 0 {
        for t in &targets {
            procs.mark();
            let r = backlog_run(t, b.backlog, &body).await?;
            procs.end(&format!("backlog-{}", t.name));
            results.push(r);
        }
    }
    if b.json {
        println!(
            "{}",
            json!({"size": b.size, "results": results, "phases": procs.json()})
        );
        return Ok(());
    }
    println!(
        "{:<10} {:<24} {:>12} {:>10} {:>10} {:>8}",
        "target", "run", "msg/s", "p50 ms", "p99 ms", "errors"
    );
    for r in &results {
        println!(
            "{:<10} {:<24} {:>12.0} {:>10.2} {:>10.2} {:>8}",
            r["target"].as_str().unwrap_or_default(),
            r["run"].as_str().unwrap_or_default(),
            r["msg_per_s"].as_f64().unwrap_or(0.0),
            r["latency"]["p50_ms"].as_f64().unwrap_or(0.0),
            r["latency"]["p99_ms"].as_f64().unwrap_or(0.0),
            r["errors"].as_u64().unwrap_or(0),
        );
    }
    println!();
    procs.print();
    Ok(())
}

/// `p` publishers, each publishing one message at a time until `for_`.
async fn publish_run(t: &Target, p: usize, for_: Duration, body: &Bytes) -> Value {
    let publisher = t.client.publisher(&t.topic);
    let count = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Errors::default());
    let hist = Arc::new(Mutex::new(Latency::new()));
    let started = Instant::now();
    let until = started + for_;
    let tasks: Vec<_> = (0..p)
        .map(|_| {
            let (publisher, count, errors, hist, body) = (
                publisher.clone(),
                count.clone(),
                errors.clone(),
                hist.clone(),
                body.clone(),
            );
            tokio::spawn(async move {
                let mut local = Latency::new();
                while Instant::now() < until {
                    let t0 = Instant::now();
                    match publisher.publish(OutMessage::new(body.clone())).await {
                        Ok(_) => {
                            local.record(t0.elapsed());
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            errors.add("publish", &e);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                hist.lock().merge(&local);
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    let secs = started.elapsed().as_secs_f64();
    let n = count.load(Ordering::Relaxed);
    let latency = hist.lock().json();
    json!({
        "target": t.name, "run": format!("publish x{p}"), "publishers": p,
        "messages": n, "secs": secs, "msg_per_s": n as f64 / secs,
        "latency": latency, "errors": errors.get(),
    })
}

/// A new group takes `n` messages of the backlog from the start and acks each.
async fn consume_run(t: &Target, n: u64, concurrency: usize) -> Result<Value> {
    let done = Arc::new(AtomicU64::new(0));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let tx = Arc::new(Mutex::new(Some(tx)));
    let started = Instant::now();
    let opts = SubscribeOptions {
        concurrency,
        group: json!({"start": "earliest", "max_unacked": (concurrency * 4).max(1000)}),
        ..SubscribeOptions::default()
    };
    let sub = {
        let (done, tx) = (done.clone(), tx.clone());
        t.client
            .subscribe(&t.topic, "bench-consume", opts, move |_m: Received| {
                let (done, tx) = (done.clone(), tx.clone());
                async move {
                    if done.fetch_add(1, Ordering::Relaxed) + 1 == n
                        && let Some(tx) = tx.lock().take()
                    {
                        let _ = tx.send(());
                    }
                    Ok::<(), String>(())
                }
            })
            .await?
    };
    let finished = tokio::time::timeout(DRAIN_WITHIN, rx).await.is_ok();
    let secs = started.elapsed().as_secs_f64();
    sub.shutdown().await;
    let got = done.load(Ordering::Relaxed);
    if !finished {
        eprintln!(
            "{}: the consume run saw {got} of {n} messages within {DRAIN_WITHIN:?}",
            t.name
        );
    }
    Ok(json!({
        "target": t.name, "run": format!("consume+ack c{concurrency}"),
        "messages": got, "secs": secs, "msg_per_s": got as f64 / secs,
        "errors": n.saturating_sub(got),
    }))
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Publishes `rate` stamped messages a second for `secs` to a new group's
/// subscriber; the latency of each is its handler's start minus its stamp.
async fn latency_run(
    t: &Target,
    rate: u64,
    secs: u64,
    size: usize,
    concurrency: usize,
) -> Result<Value> {
    let hist = Arc::new(Mutex::new(Latency::new()));
    let seen = Arc::new(AtomicU64::new(0));
    let group = format!("bench-e2e-{}", now_nanos());
    let opts = SubscribeOptions {
        concurrency,
        group: json!({"start": "latest"}),
        ..SubscribeOptions::default()
    };
    let sub = {
        let (hist, seen) = (hist.clone(), seen.clone());
        t.client
            .subscribe(&t.topic, &group, opts, move |m: Received| {
                let (hist, seen) = (hist.clone(), seen.clone());
                async move {
                    if let Some(stamp) = m.body.get(..8) {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(stamp);
                        let sent = u64::from_be_bytes(b);
                        let ns = now_nanos().saturating_sub(sent);
                        hist.lock().record(Duration::from_nanos(ns));
                    }
                    seen.fetch_add(1, Ordering::Relaxed);
                    Ok::<(), String>(())
                }
            })
            .await?
    };
    // The group exists once `subscribe` returns (it starts at the latest offset).
    let publisher = t.client.publisher(&t.topic);
    let total = rate * secs;
    let errors = Arc::new(Errors::default());
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sends = tokio::task::JoinSet::new();
    for _ in 0..total {
        tick.tick().await;
        let mut body = vec![b'x'; size];
        body[..8].copy_from_slice(&now_nanos().to_be_bytes());
        let (publisher, errors) = (publisher.clone(), errors.clone());
        sends.spawn(async move {
            if let Err(e) = publisher.publish(OutMessage::new(body)).await {
                errors.add("publish", &e);
            }
        });
        while sends.try_join_next().is_some() {}
    }
    while sends.join_next().await.is_some() {}
    let deadline = Instant::now() + DRAIN_WITHIN;
    while seen.load(Ordering::Relaxed) < total.saturating_sub(errors.get())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sub.shutdown().await;
    let latency = hist.lock().json();
    Ok(json!({
        "target": t.name, "run": format!("e2e latency {rate}/s"),
        "messages": seen.load(Ordering::Relaxed), "msg_per_s": rate,
        "latency": latency, "errors": errors.get(),
    }))
}

/// Publishes `n` messages to a topic of their own (8 publishers, batches of 500)
/// and makes a group that has read none of them: what the backlog costs in memory.
async fn backlog_run(t: &Target, n: u64, body: &Bytes) -> Result<Value> {
    let topic = format!("{}-backlog", t.topic);
    t.client.create_topic(&topic, 4).await?;
    let group_opts = json!({"start": "earliest"});
    t.client
        .ensure_group(&topic, "bench-backlog", &group_opts)
        .await?;
    let publisher = t.client.publisher(&topic);
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Errors::default());
    let started = Instant::now();
    let batches = n.div_ceil(BACKLOG_BATCH as u64);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (publisher, next, errors, body) = (
                publisher.clone(),
                next.clone(),
                errors.clone(),
                body.clone(),
            );
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < batches {
                    let msgs = (0..BACKLOG_BATCH)
                        .map(|_| OutMessage::new(body.clone()))
                        .collect();
                    if let Err(e) = publisher.publish_all(msgs).await {
                        errors.add("publish", &e);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    let secs = started.elapsed().as_secs_f64();
    let info = t
        .client
        .ensure_group(&topic, "bench-backlog", &group_opts)
        .await?;
    let written = batches * BACKLOG_BATCH as u64;
    Ok(json!({
        "target": t.name, "run": format!("backlog {n}"),
        "messages": written, "secs": secs, "msg_per_s": written as f64 / secs,
        "backlog": info["backlog"], "errors": errors.get(),
    }))
}
