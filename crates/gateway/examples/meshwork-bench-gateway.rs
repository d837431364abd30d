//! The gateway as a standalone process for the benchmark (until the
//! `meshwork` binary wires the gateway role).
//!
//! `meshwork-bench-gateway ADDR ROUTES.toml [WORKER_THREADS]` serves
//! ROUTES on ADDR, printing `listening ADDR`; access log off, default
//! limits otherwise. Stops on Ctrl-C / SIGTERM.

use std::io::Write;
use std::sync::Arc;

use meshwork_gateway::{Gateway, GatewayConfig, RouteSet, StaticResolver};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn fail(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, routes, rest @ ..] = args.as_slice() else {
        return Err(fail(
            "usage: meshwork-bench-gateway ADDR ROUTES.toml [THREADS]".into(),
        ));
    };
    let threads: usize = match rest.first() {
        Some(t) => t
            .parse()
            .map_err(|e| fail(format!("bad thread count: {e}")))?,
        None => std::thread::available_parallelism().map_or(2, |n| n.get()),
    };
    let text = std::fs::read_to_string(routes)?;
    let set = RouteSet::from_toml(&text).map_err(|e| fail(e.to_string()))?;
    let cfg = GatewayConfig {
        access_log: false,
        ..GatewayConfig::default()
    };
    let gw = Gateway::new(cfg, Arc::new(StaticResolver::new())).map_err(|e| fail(e.to_string()))?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(gw.apply(set))
        .map_err(|e| fail(e.to_string()))?;
    let addr: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| fail(format!("bad address: {e}")))?;
    let workers = meshwork_gateway::spawn_workers(addr, gw, threads, None)?;
    let mut out = std::io::stdout();
    writeln!(out, "listening {}", workers.local_addr())?;
    out.flush()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok::<_, std::io::Error>(())
    })?;
    workers.shutdown()
}
