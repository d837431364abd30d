//! `meshwork bench registry`: registration throughput, sustained heartbeats, then the
//! watch scenarios (in `watch`) with the heartbeats still going.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
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

use super::CALL_TIMEOUT;
use crate::httpc::enc;

/// Where the watchers of a scenario watch.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub(super) enum Scenario {
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
    pub(super) http: String,
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
    pub(super) watchers: usize,
    /// Services the `spread` scenario spreads its watchers over.
    #[arg(long, default_value_t = 100)]
    spread: usize,
    /// Changes (register / deregister of a probe instance) per scenario.
    #[arg(long, default_value_t = 50)]
    pub(super) changes: u64,
    /// Pause after a change reached every watcher, before the next one, ms.
    #[arg(long, default_value_t = 100)]
    pub(super) gap_ms: u64,
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
pub(super) struct Names {
    pub(super) prefix: String,
    pub(super) instances: u64,
    pub(super) ttl: u64,
}

impl Names {
    /// Name of service number `s`.
    pub(super) fn service(&self, s: u64) -> String {
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
    pub(super) fn instances_path(&self, service: &str) -> String {
        format!("/v1/services/{}/instances", enc(service))
    }
}

/// Registers instance `j` (or the probe `id` of service `svc`) on `c`.
pub(super) async fn register(
    c: &mut Conn,
    names: &Names,
    svc: &str,
    id: &str,
    j: u64,
) -> Result<()> {
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
async fn heartbeat_worker(
    addr: String,
    names: Names,
    period: Duration,
    mut rx: mpsc::UnboundedReceiver<(Instant, u64)>,
    mut stop: watch::Receiver<bool>,
    stats: Arc<HbStats>,
) -> (Latency, Latency, Latency) {
    let (mut lat, mut lag, mut lag_steady) = (Latency::new(), Latency::new(), Latency::new());
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
    let period = Duration::from_millis(b.ttl * 1000 / 3);

    // Heartbeat workers first: each instance's heartbeats start one period after it
    // was registered, while registration goes on.
    let mut heartbeats = Heartbeats::start(&b, &names, period);
    let reg = register_all(&b, &names, &heartbeats.senders, &mut procs).await?;
    heartbeats.registration_done();
    procs.end("register");
    eprintln!(
        "registered {}/{} in {:.1} s ({:.0}/s); holding {} s of heartbeats",
        reg.registered,
        reg.total,
        reg.secs,
        reg.per_sec(),
        b.hold
    );

    // Heartbeats alone.
    let hb = heartbeats.stats.clone();
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
        reg.registered as f64 / period.as_secs_f64(),
        hb.expired.load(Ordering::Relaxed),
        hb.errors.get()
    );

    // Watch scenarios, with the heartbeats still going.
    let mut scenarios = Vec::new();
    for s in &b.scenarios {
        let (label, targets) = s.targets(&b, &names);
        let from = (Instant::now(), hb.ok.load(Ordering::Relaxed));
        let mut v = super::watch::scenario(&b, &names, label, targets).await?;
        v["heartbeats_per_sec"] = json!(hb_rate(from));
        procs.end(&format!("watch-{label}"));
        scenarios.push(v);
    }
    let lat = heartbeats.stop().await;
    let report = Report {
        b: &b,
        reg: &reg,
        hb: &hb,
        lat: &lat,
        period,
        hold_rate,
        scenarios: &scenarios,
        procs: &procs,
    };
    if b.json {
        println!("{}", report.json());
    } else {
        report.print();
    }
    Ok(())
}

impl Scenario {
    /// The scenario's label and the services its watchers watch.
    fn targets(self, b: &RegistryBench, names: &Names) -> (&'static str, Vec<String>) {
        match self {
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
        }
    }
}

/// The heartbeat workers and their shared counters.
struct Heartbeats {
    stats: Arc<HbStats>,
    /// Newly registered instances, to each worker (dropped when registration ends).
    senders: Arc<Vec<mpsc::UnboundedSender<(Instant, u64)>>>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<(Latency, Latency, Latency)>>,
}

/// Heartbeat latency and lag behind schedule (while registering, and after).
struct HbLatency {
    latency: Latency,
    lag: Latency,
    lag_steady: Latency,
}

impl Heartbeats {
    /// Starts `--heartbeat-conns` workers.
    fn start(b: &RegistryBench, names: &Names, period: Duration) -> Heartbeats {
        let stats = Arc::new(HbStats::default());
        let (stop, stop_rx) = watch::channel(false);
        let mut senders = Vec::with_capacity(b.heartbeat_conns);
        let mut tasks = Vec::with_capacity(b.heartbeat_conns);
        for _ in 0..b.heartbeat_conns {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            tasks.push(tokio::spawn(heartbeat_worker(
                b.http.clone(),
                names.clone(),
                period,
                rx,
                stop_rx.clone(),
                stats.clone(),
            )));
        }
        Heartbeats {
            stats,
            senders: Arc::new(senders),
            stop,
            tasks,
        }
    }

    /// Registration is over: the workers learn no new instances, and lag is steady-state lag.
    fn registration_done(&mut self) {
        self.senders = Arc::new(Vec::new());
        self.stats.steady.store(true, Ordering::Relaxed);
    }

    /// Stops the workers; their merged latencies.
    async fn stop(self) -> HbLatency {
        let _ = self.stop.send(true);
        let mut out = HbLatency {
            latency: Latency::new(),
            lag: Latency::new(),
            lag_steady: Latency::new(),
        };
        for t in self.tasks {
            if let Ok((l, g, gs)) = t.await {
                out.latency.merge(&l);
                out.lag.merge(&g);
                out.lag_steady.merge(&gs);
            }
        }
        out
    }
}

/// What the registration phase did.
struct Registration {
    total: u64,
    registered: u64,
    errors: u64,
    secs: f64,
    latency: Latency,
}

impl Registration {
    fn per_sec(&self) -> f64 {
        self.registered as f64 / self.secs.max(1e-9)
    }
}

/// Registers every instance over `--conns` connections, handing each registered
/// instance to a heartbeat worker.
async fn register_all(
    b: &RegistryBench,
    names: &Names,
    hb_tx: &Arc<Vec<mpsc::UnboundedSender<(Instant, u64)>>>,
    procs: &mut Procs,
) -> Result<Registration> {
    let total = b.services * b.instances;
    eprintln!(
        "registering {} services x {} instances = {total} (ttl {} s) on {} connections",
        b.services, b.instances, b.ttl, b.conns
    );
    let conns = open_conns(&b.http, b.conns).await?;
    procs.mark();
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Errors::default());
    let hist = Arc::new(Mutex::new(Latency::new()));
    let progress = Progress::start("registered", done.clone(), total);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(b.conns);
    for mut conn in conns {
        let (next, done, errs, hist, hb_tx, names) = (
            next.clone(),
            done.clone(),
            errors.clone(),
            hist.clone(),
            hb_tx.clone(),
            names.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut local = Latency::new();
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
    let secs = started.elapsed().as_secs_f64();
    drop(progress);
    let latency = hist.lock().clone();
    Ok(Registration {
        total,
        registered: done.load(Ordering::Relaxed),
        errors: errors.get(),
        secs,
        latency,
    })
}

/// The results of a run, as text or JSON.
struct Report<'a> {
    b: &'a RegistryBench,
    reg: &'a Registration,
    hb: &'a HbStats,
    lat: &'a HbLatency,
    period: Duration,
    hold_rate: f64,
    scenarios: &'a [Value],
    procs: &'a Procs,
}

impl Report<'_> {
    fn target_rate(&self) -> f64 {
        self.reg.registered as f64 / self.period.as_secs_f64()
    }

    fn json(&self) -> Value {
        let (b, reg, hb, lat) = (self.b, self.reg, self.hb, self.lat);
        let register = json!({
            "instances": reg.total, "registered": reg.registered, "errors": reg.errors,
            "seconds": reg.secs, "per_sec": reg.per_sec(), "latency": reg.latency.json(),
        });
        let heartbeat = json!({
            "period_s": self.period.as_secs_f64(),
            "target_per_sec": self.target_rate(),
            "hold_per_sec": self.hold_rate,
            "sent": hb.sent.load(Ordering::Relaxed), "ok": hb.ok.load(Ordering::Relaxed),
            "expired": hb.expired.load(Ordering::Relaxed),
            "reregistered": hb.reregistered.load(Ordering::Relaxed),
            "errors": hb.errors.get(),
            "latency": lat.latency.json(), "lag_registering": lat.lag.json(),
            "lag_steady": lat.lag_steady.json(),
        });
        json!({
            "bench": "registry", "http": b.http, "services": b.services,
            "instances_per_service": b.instances, "ttl_s": b.ttl, "conns": b.conns,
            "heartbeat_conns": b.heartbeat_conns, "watchers": b.watchers, "spread": b.spread,
            "register": register, "heartbeat": heartbeat,
            "watch": self.scenarios.iter().map(|s| {
                let mut s = s.clone();
                if let Some(o) = s.as_object_mut() { o.remove("_table"); }
                s
            }).collect::<Vec<_>>(),
            "phases": self.procs.json(),
        })
    }

    fn print(&self) {
        let (b, reg, hb, lat) = (self.b, self.reg, self.hb, self.lat);
        println!(
            "registry bench on {}: {} services x {} instances, ttl {} s",
            b.http, b.services, b.instances, b.ttl
        );
        println!(
            "register   {}/{} ok, {} errors, {:.1} s: {:.0} registrations/s  latency {}",
            reg.registered,
            reg.total,
            reg.errors,
            reg.secs,
            reg.per_sec(),
            reg.latency.line()
        );
        println!(
            "heartbeat  every {:.1} s: {:.0}/s sustained alone (target {:.0}/s); sent {} ok {} expired {} errors {}",
            self.period.as_secs_f64(),
            self.hold_rate,
            self.target_rate(),
            hb.sent.load(Ordering::Relaxed),
            hb.ok.load(Ordering::Relaxed),
            hb.expired.load(Ordering::Relaxed),
            hb.errors.get()
        );
        println!("           latency {}", lat.latency.line());
        println!(
            "           lag behind schedule while registering {}",
            lat.lag.line()
        );
        println!(
            "           lag behind schedule after registration {}",
            lat.lag_steady.line()
        );
        for s in self.scenarios {
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
        self.procs.print();
    }
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
}
