//! `meshwork bench config`: publish-to-listener latency with long-poll listeners, each
//! on its own connection, fetching the new content after every change as a client does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use clap::Args;
use meshwork_loadgen::http::{Conn, open_conns};
use meshwork_loadgen::procs::{Procs, check_fd_limit};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::{
    CALL_TIMEOUT, Deliveries, WAIT_SECS, WAIT_TIMEOUT, await_parked, drive_changes, spread,
};
use crate::httpc::enc;

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

impl ConfigBench {
    /// `/v1/config/{namespace}/{group}/{id}`.
    fn path(&self, id: &str) -> String {
        format!(
            "/v1/config/{}/{}/{}",
            enc(&self.namespace),
            enc(&self.group),
            enc(id)
        )
    }

    /// The publish body of version `seq`.
    fn body(&self, seq: u64) -> String {
        json!({"content": content(seq, self.content_size), "format": "text",
               "author": "bench", "description": format!("bench publish {seq}")})
        .to_string()
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn unix_now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// `meshwork bench config`.
pub(crate) async fn config(b: ConfigBench) -> Result<()> {
    if b.entries == 0 || b.listeners == 0 {
        bail!("--entries and --listeners must be at least 1");
    }
    check_fd_limit(b.listeners + 2);
    let mut procs = Procs::new(&b.pids)?;
    let mut gen_conn = Conn::open(&b.http).await?;
    let ids: Vec<String> = (0..b.entries).map(|e| format!("entry-{e:04}")).collect();
    let mut sums = Vec::with_capacity(b.entries);
    for (e, id) in ids.iter().enumerate() {
        // A fresh content per run, so every listener starts out of date for nothing.
        let seq = (unix_now().as_nanos() as u64) ^ e as u64;
        sums.push(publish(&mut gen_conn, &b.path(id), b.body(seq)).await?);
    }
    let n = b.entries;
    let expected = spread(b.listeners, n);
    let d = Deliveries::new(n);
    let ready = Arc::new(AtomicU64::new(0));
    let stopping = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    eprintln!("opening {} listeners on {n} entries", b.listeners);
    let conns = open_conns(&b.http, b.listeners).await?;
    procs.mark();
    let mut tasks = Vec::with_capacity(b.listeners);
    for (l, conn) in conns.into_iter().enumerate() {
        let e = l % n;
        let listener = Listener {
            conn,
            entry_path: b.path(&ids[e]),
            checksum: sums[e].clone(),
            item: json!({"namespace": b.namespace, "group": b.group, "data_id": ids[e]}),
            target: e,
            d: d.clone(),
            stopping: stopping.clone(),
        };
        ready.fetch_add(1, Ordering::Relaxed);
        tasks.push(tokio::spawn(listener.run(stop_rx.clone())));
    }
    await_parked("config", &ready, b.listeners).await;
    procs.end("listeners-parked");
    eprintln!(
        "{} listeners parked; {} publishes of {} bytes",
        b.listeners, b.publishes, b.content_size
    );
    let base = unix_now().as_secs() * 1_000_000;
    let tally = drive_changes(
        "publish",
        &d.slots,
        &expected,
        b.publishes,
        Duration::from_millis(b.gap_ms),
        &d.errors,
        async |k, e| {
            publish(&mut gen_conn, &b.path(&ids[e]), b.body(base + k))
                .await
                .map(drop)
        },
    )
    .await;
    procs.end("publish");
    stopping.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let (stray, h) = (d.stray(), d.latency());
    // Change errors are counted in the tally; the rest are the listeners'.
    let listener_errors = d.errors.get().saturating_sub(tally.change_errors);
    if b.json {
        let out = json!({
            "bench": "config", "http": b.http, "listeners": b.listeners, "entries": n,
            "publishes": b.publishes, "publish_errors": tally.change_errors,
            "content_size": b.content_size,
            "deliveries": tally.delivered, "missed": tally.missed, "stray": stray,
            "listener_errors": listener_errors, "seconds": tally.elapsed.as_secs_f64(),
            "latency": h.json(), "publish_call": tally.call.json(),
            "phases": procs.json(),
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "config bench on {}: {} listeners on {n} entries, {} publishes of {} bytes",
        b.http, b.listeners, b.publishes, b.content_size
    );
    println!(
        "deliveries {}  missed {}  stray {stray}  publish errors {}  listener errors {listener_errors}",
        tally.delivered, tally.missed, tally.change_errors,
    );
    println!("publish-to-listener  {}", h.line());
    println!("publish call         {}", tally.call.line());
    procs.print();
    Ok(())
}

/// One listener: a long-poll on one entry with the checksum it holds; after a change it
/// fetches the new content, as a client does, and listens with the new checksum.
struct Listener {
    conn: Conn,
    entry_path: String,
    checksum: String,
    item: Value,
    target: usize,
    d: Deliveries,
    stopping: Arc<AtomicBool>,
}

impl Listener {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            let mut it = self.item.clone();
            it["checksum"] = json!(self.checksum);
            let req = json!({"items": [it], "timeout_ms": WAIT_SECS * 1000}).to_string();
            let r = tokio::select! {
                r = self.conn.call("POST", "/v1/config/listener", Some(Bytes::from(req)), WAIT_TIMEOUT) => r,
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
                    if !self.stopping.load(Ordering::Relaxed) {
                        self.d.errors.add("listener", &e);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if !changed {
                continue;
            }
            self.d.record(self.target, at);
            if let Err(e) = self.refetch().await {
                self.d.errors.add("listener", &e);
            }
        }
    }

    /// Reads the entry and keeps its checksum.
    async fn refetch(&mut self) -> Result<()> {
        let r = self
            .conn
            .call("GET", &self.entry_path, None, CALL_TIMEOUT)
            .await?;
        if r.status != 200 {
            return Err(r.unexpected("reading the entry").into());
        }
        self.checksum = r.json()?["checksum"]
            .as_str()
            .ok_or_else(|| anyhow!("entry without checksum"))?
            .to_string();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_has_the_requested_size_and_differs() {
        assert_eq!(content(1, 1024).len(), 1024);
        assert_ne!(content(1, 1024), content(2, 1024));
    }
}
