//! One watch scenario of `meshwork bench registry`: watchers parked in blocking queries
//! on some services while a probe instance is registered and deregistered on them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use meshwork_loadgen::http::{Conn, open_conns};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::registry::{Names, RegistryBench, register};
use super::{
    CALL_TIMEOUT, Deliveries, WAIT_SECS, WAIT_TIMEOUT, await_parked, drive_changes, spread,
};
use crate::httpc::enc;

/// The probe instance whose registration and deregistration are the changes.
const PROBE: &str = "probe-0";

/// Runs one watch scenario: `watchers` blocking queries over `targets`, `changes`
/// register/deregister calls of a probe instance round-robin over the targets.
pub(super) async fn scenario(
    b: &RegistryBench,
    names: &Names,
    label: &str,
    targets: Vec<String>,
) -> Result<Value> {
    let n = targets.len();
    let d = Deliveries::new(n);
    let expected = spread(b.watchers, n);
    let ready = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    eprintln!("{label}: opening {} watchers on {n} service(s)", b.watchers);
    let conns = open_conns(&b.http, b.watchers).await?;
    let mut tasks = Vec::with_capacity(b.watchers);
    for (w, conn) in conns.into_iter().enumerate() {
        let t = w % n;
        let watcher = Watcher {
            conn,
            path: names.instances_path(&targets[t]),
            target: t,
            d: d.clone(),
            ready: ready.clone(),
        };
        tasks.push(tokio::spawn(watcher.run(stop_rx.clone())));
    }
    let parked = await_parked(label, &ready, b.watchers).await;
    eprintln!(
        "{label}: {parked} watchers parked; making {} changes",
        b.changes
    );

    let mut gen_conn = Conn::open(&b.http).await?;
    let mut probe_up = vec![false; n];
    // The probe lives longer than the run; it is deregistered at the end.
    let probe_names = Names {
        ttl: 600,
        ..names.clone()
    };
    let gap = Duration::from_millis(b.gap_ms);
    let tally = drive_changes(
        label,
        &d.slots,
        &expected,
        b.changes,
        gap,
        &d.errors,
        async |k, t| {
            let svc = &targets[t];
            if probe_up[t] {
                deregister_probe(&mut gen_conn, names, svc).await?;
            } else {
                register(&mut gen_conn, &probe_names, svc, PROBE, k).await?;
            }
            probe_up[t] = !probe_up[t];
            Ok(())
        },
    )
    .await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    for (t, up) in probe_up.iter().enumerate() {
        if *up {
            let _ = deregister_probe(&mut gen_conn, names, &targets[t]).await;
        }
    }
    let (stray, h) = (d.stray(), d.latency());
    Ok(json!({
        "scenario": label, "watchers": b.watchers, "watchers_started": parked,
        "services": n, "changes": b.changes, "change_errors": tally.change_errors,
        "deliveries": tally.delivered, "missed": tally.missed, "stray": stray,
        "watcher_errors": d.errors.get(), "seconds": tally.elapsed.as_secs_f64(),
        "latency": h.json(), "change_call": tally.call.json(),
        "_table": format!("{}  | change call {}", h.line(), tally.call.line()),
    }))
}

/// Deregisters the probe instance of `svc`.
async fn deregister_probe(c: &mut Conn, names: &Names, svc: &str) -> Result<()> {
    let path = format!("{}/{}", names.instances_path(svc), enc(PROBE));
    let r = c.call("DELETE", &path, None, CALL_TIMEOUT).await?;
    if r.status == 204 {
        Ok(())
    } else {
        Err(r.unexpected("deregistering the probe").into())
    }
}

/// One watcher: a blocking query on one service's instances, re-issued with the last
/// index after every answer, recording a delivery whenever the index moved.
struct Watcher {
    conn: Conn,
    path: String,
    target: usize,
    d: Deliveries,
    ready: Arc<AtomicU64>,
}

impl Watcher {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut index = match self.conn.call("GET", &self.path, None, CALL_TIMEOUT).await {
            Ok(r) if r.status == 200 => r.index.unwrap_or(0),
            Ok(r) => {
                self.d.errors.add("watcher", &r.unexpected("first read"));
                return;
            }
            Err(e) => {
                self.d.errors.add("watcher", &e);
                return;
            }
        };
        self.ready.fetch_add(1, Ordering::Relaxed);
        loop {
            let q = format!("{}?index={index}&wait={WAIT_SECS}s", self.path);
            let r = tokio::select! {
                r = self.conn.call("GET", &q, None, WAIT_TIMEOUT) => r,
                _ = stop.changed() => return,
            };
            let at = Instant::now();
            let failure = match r {
                Ok(r) if r.status == 200 => {
                    match r
                        .index
                        .or_else(|| r.json().ok().and_then(|v| v["index"].as_i64()))
                    {
                        Some(new) if new > index => {
                            self.d.record(self.target, at);
                            index = new;
                            None
                        }
                        Some(_) => None,
                        None => {
                            self.d
                                .errors
                                .add("watcher", &anyhow!("answer without an index"));
                            None
                        }
                    }
                }
                Ok(r) => Some(anyhow::Error::from(r.unexpected("blocking query"))),
                Err(e) => Some(anyhow::Error::from(e)),
            };
            if let Some(e) = failure {
                self.d.errors.add("watcher", &e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
