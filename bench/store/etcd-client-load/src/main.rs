//! `etcd-client-load ENDPOINT CLIENTS CONNS TOTAL [VALUE_BYTES]`: TOTAL puts
//! (8-byte keys over a 10,000-key space, 256-byte values by default) from
//! CLIENTS concurrent tasks spread over CONNS `etcd_client::Client`
//! connections. Prints one JSON line: puts/s, p50/p99/max latency (ms).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: etcd-client-load ENDPOINT CLIENTS CONNS TOTAL [VALUE_BYTES]");
        std::process::exit(2);
    }
    let endpoint = args[1].clone();
    let clients: usize = args[2].parse()?;
    let conns: usize = args[3].parse()?;
    let total: u64 = args[4].parse()?;
    let value_bytes: usize = args.get(5).map(|v| v.parse()).transpose()?.unwrap_or(256);
    let mut pool = Vec::with_capacity(conns);
    for _ in 0..conns {
        pool.push(etcd_client::Client::connect([endpoint.as_str()], None).await?);
    }
    let value = vec![b'v'; value_bytes];
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        let mut kv = pool[c % conns].kv_client();
        let next = next.clone();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
            let mut errors = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let key = format!("{:08}", i % 10_000);
                let t = Instant::now();
                match kv.put(key, value.clone(), None).await {
                    Ok(_) => {
                        let _ = hist.record(t.elapsed().as_micros() as u64);
                    }
                    Err(_) => errors += 1,
                }
            }
            (hist, errors)
        }));
    }
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await?;
        hist.add(h)?;
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"puts\":{},\"errors\":{errors},\"secs\":{secs:.3},\"puts_per_sec\":{:.0},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"max_ms\":{:.2}}}",
        hist.len(),
        hist.len() as f64 / secs,
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.max() as f64 / 1000.0
    );
    Ok(())
}
