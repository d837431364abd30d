//! `meshwork bench registry` and `meshwork bench config`: load generators for a node's
//! coordination HTTP API (registration throughput, sustained heartbeats, change-to-watcher
//! delivery over blocking queries, config publish-to-listener delivery over long-polls),
//! on keep-alive HTTP/1.1 connections, each used by one task at a time.
//!
//! Latencies are measured in this process with the monotonic clock: the generator records
//! t0 just before the call that makes a change, each watcher records when its answer
//! arrived, and the latency is the difference.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use meshwork_loadgen::Errors;
use meshwork_loadgen::http::{Conn, open_conns};
use meshwork_loadgen::latency::Latency;
use meshwork_loadgen::procs::{Procs, check_fd_limit};
use meshwork_loadgen::progress::Progress;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::httpc::enc;

/// Deadline of an ordinary request.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a blocking query or long-poll waits on the server.
const WAIT_SECS: u64 = 60;
/// Deadline of a blocking query or long-poll (server wait plus slack).
const WAIT_TIMEOUT: Duration = Duration::from_secs(WAIT_SECS + 30);
/// How long the generator waits for one change to reach every watcher.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------------------------------
// Delivery tracking
// ------------------------------------------------------------------------------------------

/// The change currently being delivered to one target (service or config entry).
#[derive(Default)]
struct Slot {
    /// t0 of the change in flight (None between changes).
    t0: Mutex<Option<Instant>>,
    /// Deliveries of the change in flight.
    delivered: AtomicU64,
    /// Answers that moved but arrived while no change was in flight.
    stray: AtomicU64,
}

impl Slot {
    /// Records one delivery arriving at `at` into `h`.
    fn deliver(&self, at: Instant, h: &Mutex<Latency>) {
        let t0 = *self.t0.lock();
        match t0 {
            Some(t0) => {
                h.lock().record(at.saturating_duration_since(t0));
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                self.stray.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Arms the slot for a new change; returns its t0.
    fn arm(&self) -> Instant {
        self.delivered.store(0, Ordering::Relaxed);
        let t0 = Instant::now();
        *self.t0.lock() = Some(t0);
        t0
    }

    /// Waits until `expected` deliveries arrived (or the timeout); disarms; returns the
    /// number delivered.
    async fn wait(&self, expected: u64) -> u64 {
        let deadline = Instant::now() + DELIVERY_TIMEOUT;
        while self.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        *self.t0.lock() = None;
        self.delivered.load(Ordering::Relaxed)
    }
}

// ------------------------------------------------------------------------------------------
// meshwork bench registry
// ------------------------------------------------------------------------------------------

/// Where the watchers of a scenario watch.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub(crate) enum Scenario {
    /// Every watcher on one hot service.
    Hot,
    /// Watchers spread evenly over --spread services.
    Spread,
}

/// `meshwork bench registry`: registration throughput, heartbeats and change-to-watcher
/// delivery against a node's HTTP API.
#[derive(Args)]
pub(crate) struct RegistryBench {
    /// The node's HTTP address.
    #[arg(long, env = "MESHWORK_HTTP", default_value = "127.0.0.1:7070")]
    http: String,
    /// Services to register.
    #[arg(long, default_value_t = 10_000)]
    services: u64,
    /// Instances per service.
    #[arg(long, default_value_t = 10)]
    instances: u64,
    /// Lease TTL of every (ephemeral) instance, seconds; heartbeats go every TTL/3.
    #[arg(long, default_value_t = 30)]
    ttl: u64,
    /// Concurrent registration connections.
    #[arg(long, default_value_t = 64)]
    conns: usize,
    /// Heartbeat connections (each sends one heartbeat at a time).
    #[arg(long, default_value_t = 64)]
    heartbeat_conns: usize,
    /// Seconds of heartbeats alone after registration, before the watch scenarios.
    #[arg(long, default_value_t = 20)]
    hold: u64,
    /// Watchers per scenario, each a blocking query on its own connection.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// Services the `spread` scenario spreads its watchers over.
    #[arg(long, default_value_t = 100)]
    spread: usize,
    /// Changes (register / deregister of a probe instance) per scenario.
    #[arg(long, default_value_t = 50)]
    changes: u64,
    /// Pause after a change reached every watcher, before the next one, ms.
    #[arg(long, default_value_t = 100)]
    gap_ms: u64,
    /// Watch scenarios to run.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "hot,spread")]
    scenarios: Vec<Scenario>,
    /// Prefix of the service names (`PREFIX-00042`).
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Processes to sample per phase (CPU %, RSS): NAME=PID, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<String>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

/// Heartbeat counters.
#[derive(Default)]
struct HbStats {
    sent: AtomicU64,
    ok: AtomicU64,
    expired: AtomicU64,
    reregistered: AtomicU64,
    errors: Errors,
    /// True once registration is over: lag is then recorded as steady-state lag.
    steady: AtomicBool,
}

/// Naming and record shape of the bench's instances.
#[derive(Clone)]
struct Names {
    prefix: String,
    instances: u64,
    ttl: u64,
}

impl Names {
    /// Name of service number `s`.
    fn service(&self, s: u64) -> String {
        format!("{}-{s:05}", self.prefix)
    }

    /// (service, instance id) of instance number `j`.
    fn of(&self, j: u64) -> (String, String) {
        (
            self.service(j / self.instances),
            format!("i-{:03}", j % self.instances),
        )
    }

    /// The registration body of instance `j`.
    fn spec(&self, j: u64, id: &str) -> Bytes {
        let addr = format!("10.{}.{}.{}", (j >> 16) & 255, (j >> 8) & 255, j & 255);
        Bytes::from(
            json!({
                "id": id, "address": addr, "port": 8000 + (j % self.instances),
                "ephemeral": true, "ttl_seconds": self.ttl,
                "zone": "zone-a", "version": "1.4.2", "tags": ["bench", "http"],
                "metadata": {"owner": "bench"},
            })
            .to_string(),
        )
    }

    /// `/v1/services/{service}/instances`.
    fn instances_path(&self, service: &str) -> String {
        format!("/v1/services/{}/instances", enc(service))
    }
}

/// Registers instance `j` (or the probe `id` of service `svc`) on `c`.
async fn register(c: &mut Conn, names: &Names, svc: &str, id: &str, j: u64) -> Result<()> {
    let r = c
        .call(
            "POST",
            &names.instances_path(svc),
            Some(names.spec(j, id)),
            CALL_TIMEOUT,
        )
        .await?;
    if r.status != 201 {
        return Err(r.unexpected(&format!("registering {svc}/{id}")).into());
    }
    Ok(())
}

/// When instance `j` first heartbeats after registering at `t`: at a fraction of `period`
/// that is spread evenly over the instances (as independent clients would be), so the
/// heartbeat load is steady instead of coming in bursts shaped like the registration.
fn first_due(t: Instant, j: u64, period: Duration) -> Instant {
    // Golden-ratio sequence: evenly spread fractions in (0, 1].
    let frac = ((j as f64) * 0.618_033_988_749_895).fract();
    t + period.mul_f64(1.0 - frac)
}

/// Heartbeats its share of instances every `period`, from when each was registered, until
/// `stop`; re-registers an instance whose lease expired. Returns the latency histogram and
/// the lag behind schedule during registration and after it (steady state).
#[allow(clippy::too_many_arguments)]
async fn heartbeat_worker(
    addr: String,
    names: Names,
    period: Duration,
    mut rx: mpsc::UnboundedReceiver<(Instant, u64)>,
    mut stop: watch::Receiver<bool>,
    stats: Arc<HbStats>,
    mut lat: Latency,
    mut lag: Latency,
) -> (Latency, Latency, Latency) {
    let mut lag_steady = lag.clone();
    let mut conn = Conn::new(&addr);
    let mut q: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    // False once registration is over and every sender is gone.
    let mut open = true;
    loop {
        loop {
            match rx.try_recv() {
                Ok((t, j)) => q.push(Reverse((first_due(t, j, period), j))),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let Some(&Reverse((due, j))) = q.peek() else {
            tokio::select! {
                m = rx.recv() => match m {
                    Some((t, j)) => { q.push(Reverse((first_due(t, j, period), j))); continue }
                    None => break,
                },
                _ = stop.changed() => break,
            }
        };
        if *stop.borrow() {
            break;
        }
        let now = Instant::now();
        if due > now {
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => {}
                // A newly registered instance may be due earlier.
                m = rx.recv(), if open => match m {
                    Some((t, j)) => q.push(Reverse((first_due(t, j, period), j))),
                    None => open = false,
                },
                _ = stop.changed() => break,
            }
            continue;
        }
        q.pop();
        if stats.steady.load(Ordering::Relaxed) {
            lag_steady.record(now - due);
        } else {
            lag.record(now - due);
        }
        let (svc, id) = names.of(j);
        let path = format!(
            "/v1/services/{}/instances/{}/heartbeat",
            enc(&svc),
            enc(&id)
        );
        stats.sent.fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        match conn.call("PUT", &path, None, CALL_TIMEOUT).await {
            Ok(r) if r.status == 200 => {
                lat.record(t0.elapsed());
                stats.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(r) if r.status == 404 => {
                // The lease expired before this heartbeat: register again, as a client would.
                stats.expired.fetch_add(1, Ordering::Relaxed);
                match register(&mut conn, &names, &svc, &id, j).await {
                    Ok(()) => {
                        stats.reregistered.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => stats.errors.add("re-registration", &e),
                }
            }
            Ok(r) => stats.errors.add("heartbeat", &r.unexpected("heartbeat")),
            Err(e) => stats.errors.add("heartbeat", &e),
        }
        q.push(Reverse((due + period, j)));
    }
    (lat, lag, lag_steady)
}

/// Runs one watch scenario: `watchers` blocking queries over `targets`, `changes`
/// register/deregister calls of a probe instance round-robin over the targets.
async fn watch_scenario(
    b: &RegistryBench,
    names: &Names,
    label: &str,
    targets: Vec<String>,
    hist0: &Latency,
) -> Result<Value> {
    let n = targets.len();
    let slots: Arc<Vec<Slot>> = Arc::new((0..n).map(|_| Slot::default()).collect());
    let per_target: Vec<u64> = (0..n)
        .map(|t| (b.watchers / n + usize::from(t < b.watchers % n)) as u64)
        .collect();
    let hist = Arc::new(Mutex::new(hist0.clone()));
    let ready = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Errors::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    eprintln!("{label}: opening {} watchers on {n} service(s)", b.watchers);
    let conns = open_conns(&b.http, b.watchers).await?;
    let mut tasks = Vec::with_capacity(b.watchers);
    for (w, mut conn) in conns.into_iter().enumerate() {
        let t = w % n;
        let path = names.instances_path(&targets[t]);
        let (slots, hist, ready, errors) =
            (slots.clone(), hist.clone(), ready.clone(), errors.clone());
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut index = match conn.call("GET", &path, None, CALL_TIMEOUT).await {
                Ok(r) if r.status == 200 => r.index.unwrap_or(0),
                Ok(r) => {
                    errors.add("watcher", &r.unexpected("first read"));
                    return;
                }
                Err(e) => {
                    errors.add("watcher", &e);
                    return;
                }
            };
            ready.fetch_add(1, Ordering::Relaxed);
            loop {
                let q = format!("{path}?index={index}&wait={WAIT_SECS}s");
                let r = tokio::select! {
                    r = conn.call("GET", &q, None, WAIT_TIMEOUT) => r,
                    _ = stop.changed() => return,
                };
                let at = Instant::now();
                match r {
                    Ok(r) if r.status == 200 => {
                        let Some(new) = r
                            .index
                            .or_else(|| r.json().ok().and_then(|v| v["index"].as_i64()))
                        else {
                            errors.add("watcher", &anyhow!("answer without an index"));
                            continue;
                        };
                        if new > index {
                            slots[t].deliver(at, &hist);
                            index = new;
                        }
                    }
                    Ok(r) => {
                        errors.add("watcher", &r.unexpected("blocking query"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => {
                        errors.add("watcher", &e);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready.load(Ordering::Relaxed) < b.watchers as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let parked = ready.load(Ordering::Relaxed);
    if parked < b.watchers as u64 {
        eprintln!("{label}: only {parked}/{} watchers started", b.watchers);
    }
    // Let every blocking query reach the server and park.
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!(
        "{label}: {parked} watchers parked; making {} changes",
        b.changes
    );
    let mut gen_conn = Conn::open(&b.http).await?;
    let mut probe_up = vec![false; n];
    let mut call_hist = hist0.clone();
    let (mut delivered, mut missed, mut change_errors) = (0u64, 0u64, 0u64);
    let probe = "probe-0";
    let started = Instant::now();
    for k in 0..b.changes {
        let t = (k as usize) % n;
        let svc = &targets[t];
        let t0 = slots[t].arm();
        let r = if probe_up[t] {
            let path = format!("{}/{}", names.instances_path(svc), enc(probe));
            gen_conn
                .call("DELETE", &path, None, CALL_TIMEOUT)
                .await
                .and_then(|r| {
                    if r.status == 204 {
                        Ok(())
                    } else {
                        Err(r.unexpected("deregistering the probe"))
                    }
                })
                .map_err(anyhow::Error::from)
        } else {
            // The probe lives longer than the run; it is deregistered at the end.
            let probe_names = Names {
                ttl: 600,
                ..names.clone()
            };
            register(&mut gen_conn, &probe_names, svc, probe, k).await
        };
        call_hist.record(t0.elapsed());
        if let Err(e) = r {
            change_errors += 1;
            errors.add("change", &e);
            slots[t].wait(0).await;
            continue;
        }
        probe_up[t] = !probe_up[t];
        let got = slots[t].wait(per_target[t]).await;
        delivered += got;
        missed += per_target[t].saturating_sub(got);
        progress!(
            "\r{label}: change {}/{}  delivered {delivered}  missed {missed}   ",
            k + 1,
            b.changes
        );
        tokio::time::sleep(Duration::from_millis(b.gap_ms)).await;
    }
    progress_end!();
    let elapsed = started.elapsed();
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    for (t, up) in probe_up.iter().enumerate() {
        if *up {
            let path = format!("{}/{}", names.instances_path(&targets[t]), enc(probe));
            let _ = gen_conn.call("DELETE", &path, None, CALL_TIMEOUT).await;
        }
    }
    let stray: u64 = slots.iter().map(|s| s.stray.load(Ordering::Relaxed)).sum();
    let h = hist.lock().clone();
    Ok(json!({
        "scenario": label, "watchers": b.watchers, "watchers_started": parked,
        "services": n, "changes": b.changes, "change_errors": change_errors,
        "deliveries": delivered, "missed": missed, "stray": stray,
        "watcher_errors": errors.get(), "seconds": elapsed.as_secs_f64(),
        "latency": h.json(), "change_call": call_hist.json(),
        "_table": format!("{}  | change call {}", h.line(), call_hist.line()),
    }))
}

/// `meshwork bench registry`.
pub(crate) async fn registry(b: RegistryBench) -> Result<()> {
    if b.services == 0 || b.instances == 0 || b.conns == 0 || b.heartbeat_conns == 0 {
        bail!("--services, --instances, --conns and --heartbeat-conns must be at least 1");
    }
    if b.ttl < 3 {
        bail!("--ttl must be at least 3 seconds (heartbeats go every TTL/3)");
    }
    if b.spread == 0 || b.spread as u64 > b.services {
        bail!("--spread must be between 1 and --services");
    }
    check_fd_limit(b.conns + b.heartbeat_conns + b.watchers + 2);
    let mut procs = Procs::new(&b.pids)?;
    let names = Names {
        prefix: b.prefix.clone(),
        instances: b.instances,
        ttl: b.ttl,
    };
    let hist0 = Latency::new();
    let total = b.services * b.instances;
    let period = Duration::from_millis(b.ttl * 1000 / 3);

    // Heartbeat workers first: each instance's heartbeats start one period after it
    // was registered, while registration goes on.
    let hb = Arc::new(HbStats::default());
    let (hb_stop_tx, hb_stop_rx) = watch::channel(false);
    let mut hb_tx = Vec::with_capacity(b.heartbeat_conns);
    let mut hb_tasks = Vec::with_capacity(b.heartbeat_conns);
    for _ in 0..b.heartbeat_conns {
        let (tx, rx) = mpsc::unbounded_channel();
        hb_tx.push(tx);
        hb_tasks.push(tokio::spawn(heartbeat_worker(
            b.http.clone(),
            names.clone(),
            period,
            rx,
            hb_stop_rx.clone(),
            hb.clone(),
            hist0.clone(),
            hist0.clone(),
        )));
    }
    let hb_tx = Arc::new(hb_tx);

    // Registration.
    eprintln!(
        "registering {} services x {} instances = {total} (ttl {} s) on {} connections",
        b.services, b.instances, b.ttl, b.conns
    );
    let conns = open_conns(&b.http, b.conns).await?;
    procs.mark();
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let reg_errors = Arc::new(Errors::default());
    let reg_hist = Arc::new(Mutex::new(hist0.clone()));
    let progress = Progress::start("registered", done.clone(), total);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(b.conns);
    for mut conn in conns {
        let (next, done, errs, hist, hb_tx, names) = (
            next.clone(),
            done.clone(),
            reg_errors.clone(),
            reg_hist.clone(),
            hb_tx.clone(),
            names.clone(),
        );
        let mut local = hist0.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                if j >= total {
                    break;
                }
                let (svc, id) = names.of(j);
                let t0 = Instant::now();
                match register(&mut conn, &names, &svc, &id, j).await {
                    Ok(()) => {
                        local.record(t0.elapsed());
                        done.fetch_add(1, Ordering::Relaxed);
                        let _ = hb_tx[(j as usize) % hb_tx.len()].send((Instant::now(), j));
                    }
                    Err(e) => errs.add("registration", &e),
                }
            }
            hist.lock().merge(&local);
        }));
    }
    for t in tasks {
        t.await.context("registration task failed")?;
    }
    let reg_secs = started.elapsed().as_secs_f64();
    drop(progress);
    drop(hb_tx);
    hb.steady.store(true, Ordering::Relaxed);
    procs.end("register");
    let registered = done.load(Ordering::Relaxed);
    let reg_h = reg_hist.lock().clone();
    let register = json!({
        "instances": total, "registered": registered, "errors": reg_errors.get(),
        "seconds": reg_secs, "per_sec": registered as f64 / reg_secs.max(1e-9),
        "latency": reg_h.json(),
    });
    eprintln!(
        "registered {registered}/{total} in {reg_secs:.1} s ({:.0}/s); holding {} s of heartbeats",
        registered as f64 / reg_secs.max(1e-9),
        b.hold
    );

    // Heartbeats alone.
    let hb_rate = |from: (Instant, u64)| {
        let now = hb.ok.load(Ordering::Relaxed);
        (now - from.1) as f64 / from.0.elapsed().as_secs_f64().max(1e-9)
    };
    let hold_from = (Instant::now(), hb.ok.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs(b.hold)).await;
    let hold_rate = hb_rate(hold_from);
    procs.end("heartbeats-only");
    eprintln!(
        "heartbeats: {hold_rate:.0}/s sustained (target {:.0}/s), expired {}, errors {}",
        registered as f64 / period.as_secs_f64(),
        hb.expired.load(Ordering::Relaxed),
        hb.errors.get()
    );

    // Watch scenarios, with the heartbeats still going.
    let mut scenarios = Vec::new();
    for s in &b.scenarios {
        let (label, targets) = match s {
            Scenario::Hot => ("hot", vec![names.service(0)]),
            Scenario::Spread => {
                let step = b.services / b.spread as u64;
                (
                    "spread",
                    (0..b.spread as u64)
                        .map(|t| names.service(b.services - 1 - t * step))
                        .collect(),
                )
            }
        };
        let from = (Instant::now(), hb.ok.load(Ordering::Relaxed));
        let mut v = watch_scenario(&b, &names, label, targets, &hist0).await?;
        v["heartbeats_per_sec"] = json!(hb_rate(from));
        procs.end(&format!("watch-{label}"));
        scenarios.push(v);
    }

    let _ = hb_stop_tx.send(true);
    let (mut hb_lat, mut hb_lag, mut hb_lag_steady) = (hist0.clone(), hist0.clone(), hist0.clone());
    for t in hb_tasks {
        if let Ok((l, g, gs)) = t.await {
            hb_lat.merge(&l);
            hb_lag.merge(&g);
            hb_lag_steady.merge(&gs);
        }
    }
    let heartbeat = json!({
        "period_s": period.as_secs_f64(),
        "target_per_sec": registered as f64 / period.as_secs_f64(),
        "hold_per_sec": hold_rate,
        "sent": hb.sent.load(Ordering::Relaxed), "ok": hb.ok.load(Ordering::Relaxed),
        "expired": hb.expired.load(Ordering::Relaxed),
        "reregistered": hb.reregistered.load(Ordering::Relaxed),
        "errors": hb.errors.get(),
        "latency": hb_lat.json(), "lag_registering": hb_lag.json(),
        "lag_steady": hb_lag_steady.json(),
    });
    let out = json!({
        "bench": "registry", "http": b.http, "services": b.services,
        "instances_per_service": b.instances, "ttl_s": b.ttl, "conns": b.conns,
        "heartbeat_conns": b.heartbeat_conns, "watchers": b.watchers, "spread": b.spread,
        "register": register, "heartbeat": heartbeat,
        "watch": scenarios.iter().map(|s| {
            let mut s = s.clone();
            if let Some(o) = s.as_object_mut() { o.remove("_table"); }
            s
        }).collect::<Vec<_>>(),
        "phases": procs.json(),
    });
    if b.json {
        println!("{out}");
        return Ok(());
    }
    println!(
        "registry bench on {}: {} services x {} instances, ttl {} s",
        b.http, b.services, b.instances, b.ttl
    );
    println!(
        "register   {registered}/{total} ok, {} errors, {reg_secs:.1} s: {:.0} registrations/s  latency {}",
        reg_errors.get(),
        registered as f64 / reg_secs.max(1e-9),
        reg_h.line()
    );
    println!(
        "heartbeat  every {:.1} s: {hold_rate:.0}/s sustained alone (target {:.0}/s); sent {} ok {} expired {} errors {}",
        period.as_secs_f64(),
        registered as f64 / period.as_secs_f64(),
        hb.sent.load(Ordering::Relaxed),
        hb.ok.load(Ordering::Relaxed),
        hb.expired.load(Ordering::Relaxed),
        hb.errors.get()
    );
    println!("           latency {}", hb_lat.line());
    println!(
        "           lag behind schedule while registering {}",
        hb_lag.line()
    );
    println!(
        "           lag behind schedule after registration {}",
        hb_lag_steady.line()
    );
    for s in &scenarios {
        println!(
            "watch {:<6} {} watchers on {} service(s): {} changes, {} deliveries, {} missed, heartbeats {:.0}/s",
            s["scenario"].as_str().unwrap_or(""),
            s["watchers_started"],
            s["services"],
            s["changes"],
            s["deliveries"],
            s["missed"],
            s["heartbeats_per_sec"].as_f64().unwrap_or(0.0)
        );
        println!(
            "             change-to-delivery {}",
            s["_table"].as_str().unwrap_or("")
        );
    }
    procs.print();
    Ok(())
}

// ------------------------------------------------------------------------------------------
// meshwork bench config
// ------------------------------------------------------------------------------------------

/// `meshwork bench config`: publish-to-delivery latency with long-poll listeners.
#[derive(Args)]
pub(crate) struct ConfigBench {
    /// The node's HTTP address.
    #[arg(long, env = "MESHWORK_HTTP", default_value = "127.0.0.1:7070")]
    http: String,
    /// Long-poll listeners, each on its own connection.
    #[arg(long, default_value_t = 1000)]
    listeners: usize,
    /// Config entries the listeners are spread over (each listener listens to one).
    #[arg(long, default_value_t = 10)]
    entries: usize,
    /// Publishes, round-robin over the entries.
    #[arg(long, default_value_t = 50)]
    publishes: u64,
    /// Content size of an entry, bytes.
    #[arg(long, default_value_t = 1024)]
    content_size: usize,
    /// Pause after a publish reached every listener, before the next one, ms.
    #[arg(long, default_value_t = 100)]
    gap_ms: u64,
    /// Namespace of the bench's entries.
    #[arg(long, default_value = "bench")]
    namespace: String,
    /// Group of the bench's entries.
    #[arg(long, default_value = "BENCH")]
    group: String,
    /// Processes to sample per phase (CPU %, RSS): NAME=PID, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<String>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

/// Text content of `size` bytes that differs per `seq`.
fn content(seq: u64, size: usize) -> String {
    let head = format!("# meshwork bench config, version {seq}\n");
    let mut s = head.clone();
    let line = "bench.key = some value that looks like configuration\n";
    while s.len() < size {
        s.push_str(line);
    }
    s.truncate(size.max(head.len()));
    s
}

/// Publishes `body` to `path`; returns the new checksum.
async fn publish(c: &mut Conn, path: &str, body: String) -> Result<String> {
    let r = c
        .call("PUT", path, Some(Bytes::from(body)), CALL_TIMEOUT)
        .await?;
    if r.status != 200 && r.status != 201 {
        return Err(r.unexpected(&format!("publishing {path}")).into());
    }
    r.json()?["entry"]["checksum"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("publishing {path}: no entry.checksum in the answer"))
}

/// `meshwork bench config`.
pub(crate) async fn config(b: ConfigBench) -> Result<()> {
    if b.entries == 0 || b.listeners == 0 {
        bail!("--entries and --listeners must be at least 1");
    }
    check_fd_limit(b.listeners + 2);
    let mut procs = Procs::new(&b.pids)?;
    let hist0 = Latency::new();
    let mut gen_conn = Conn::open(&b.http).await?;
    let ids: Vec<String> = (0..b.entries).map(|e| format!("entry-{e:04}")).collect();
    let path = |id: &str| {
        format!(
            "/v1/config/{}/{}/{}",
            enc(&b.namespace),
            enc(&b.group),
            enc(id)
        )
    };
    let body = |seq: u64| {
        json!({"content": content(seq, b.content_size), "format": "text",
               "author": "bench", "description": format!("bench publish {seq}")})
        .to_string()
    };
    let mut sums = Vec::with_capacity(b.entries);
    for (e, id) in ids.iter().enumerate() {
        // A fresh content per run, so every listener starts out of date for nothing.
        let seq = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0))
            ^ e as u64;
        sums.push(publish(&mut gen_conn, &path(id), body(seq)).await?);
    }
    let n = b.entries;
    let per_entry: Vec<u64> = (0..n)
        .map(|e| (b.listeners / n + usize::from(e < b.listeners % n)) as u64)
        .collect();
    let slots: Arc<Vec<Slot>> = Arc::new((0..n).map(|_| Slot::default()).collect());
    let hist = Arc::new(Mutex::new(hist0.clone()));
    let ready = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Errors::default());
    let stopping = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    eprintln!("opening {} listeners on {n} entries", b.listeners);
    let conns = open_conns(&b.http, b.listeners).await?;
    procs.mark();
    let mut tasks = Vec::with_capacity(b.listeners);
    for (l, mut conn) in conns.into_iter().enumerate() {
        let e = l % n;
        let entry_path = path(&ids[e]);
        let mut checksum = sums[e].clone();
        let item = json!({"namespace": b.namespace, "group": b.group, "data_id": ids[e]});
        let (slots, hist, ready, errors, stopping) = (
            slots.clone(),
            hist.clone(),
            ready.clone(),
            errors.clone(),
            stopping.clone(),
        );
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            ready.fetch_add(1, Ordering::Relaxed);
            loop {
                let mut it = item.clone();
                it["checksum"] = json!(checksum);
                let req = json!({"items": [it], "timeout_ms": WAIT_SECS * 1000}).to_string();
                let r = tokio::select! {
                    r = conn.call("POST", "/v1/config/listener", Some(Bytes::from(req)), WAIT_TIMEOUT) => r,
                    _ = stop.changed() => return,
                };
                let at = Instant::now();
                let changed = match r.and_then(|r| {
                    if r.status == 200 {
                        r.json()
                    } else {
                        Err(r.unexpected("long-poll"))
                    }
                }) {
                    Ok(v) => v["changed"].as_array().is_some_and(|a| !a.is_empty()),
                    Err(e) => {
                        if !stopping.load(Ordering::Relaxed) {
                            errors.add("listener", &e);
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if !changed {
                    continue;
                }
                slots[e].deliver(at, &hist);
                // Fetch the new content, as a client does, and listen with its checksum.
                match conn.call("GET", &entry_path, None, CALL_TIMEOUT).await {
                    Ok(r) if r.status == 200 => match r.json() {
                        Ok(v) => match v["checksum"].as_str() {
                            Some(s) => checksum = s.to_string(),
                            None => errors.add("listener", &anyhow!("entry without checksum")),
                        },
                        Err(e) => errors.add("listener", &e),
                    },
                    Ok(r) => errors.add("listener", &r.unexpected("reading the entry")),
                    Err(e) => errors.add("listener", &e),
                }
            }
        }));
    }
    while ready.load(Ordering::Relaxed) < b.listeners as u64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let every long-poll reach the server and park.
    tokio::time::sleep(Duration::from_secs(1)).await;
    procs.end("listeners-parked");
    eprintln!(
        "{} listeners parked; {} publishes of {} bytes",
        b.listeners, b.publishes, b.content_size
    );
    let mut pub_hist = hist0.clone();
    let (mut delivered, mut missed, mut pub_errors) = (0u64, 0u64, 0u64);
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        * 1_000_000;
    let started = Instant::now();
    for k in 0..b.publishes {
        let e = (k as usize) % n;
        let req = body(base + k);
        let t0 = slots[e].arm();
        let r = publish(&mut gen_conn, &path(&ids[e]), req).await;
        pub_hist.record(t0.elapsed());
        if let Err(err) = r {
            pub_errors += 1;
            errors.add("publish", &err);
            slots[e].wait(0).await;
            continue;
        }
        let got = slots[e].wait(per_entry[e]).await;
        delivered += got;
        missed += per_entry[e].saturating_sub(got);
        progress!(
            "\rpublish {}/{}  delivered {delivered}  missed {missed}   ",
            k + 1,
            b.publishes
        );
        tokio::time::sleep(Duration::from_millis(b.gap_ms)).await;
    }
    progress_end!();
    let elapsed = started.elapsed();
    procs.end("publish");
    stopping.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let stray: u64 = slots.iter().map(|s| s.stray.load(Ordering::Relaxed)).sum();
    let h = hist.lock().clone();
    let out = json!({
        "bench": "config", "http": b.http, "listeners": b.listeners, "entries": n,
        "publishes": b.publishes, "publish_errors": pub_errors, "content_size": b.content_size,
        "deliveries": delivered, "missed": missed, "stray": stray,
        "listener_errors": errors.get(), "seconds": elapsed.as_secs_f64(),
        "latency": h.json(), "publish_call": pub_hist.json(),
        "phases": procs.json(),
    });
    if b.json {
        println!("{out}");
        return Ok(());
    }
    println!(
        "config bench on {}: {} listeners on {n} entries, {} publishes of {} bytes",
        b.http, b.listeners, b.publishes, b.content_size
    );
    println!(
        "deliveries {delivered}  missed {missed}  stray {stray}  publish errors {pub_errors}  listener errors {}",
        errors.get()
    );
    println!("publish-to-listener  {}", h.line());
    println!("publish call         {}", pub_hist.line());
    procs.print();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_and_distinct() {
        let n = Names {
            prefix: "bench".into(),
            instances: 10,
            ttl: 30,
        };
        assert_eq!(n.of(0), ("bench-00000".into(), "i-000".into()));
        assert_eq!(n.of(99_999), ("bench-09999".into(), "i-009".into()));
        let v: Value = serde_json::from_slice(&n.spec(70_000, "i-000")).unwrap();
        assert_eq!(v["address"], "10.1.17.112");
        assert_eq!(v["ttl_seconds"], 30);
    }

    #[test]
    fn content_has_the_requested_size_and_differs() {
        assert_eq!(content(1, 1024).len(), 1024);
        assert_ne!(content(1, 1024), content(2, 1024));
    }
}
