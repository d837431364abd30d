//! The demo shop: `meshwork up --demo` starts the order, inventory and payment
//! services as child processes of the node (`meshwork demo serve <service>`),
//! publishes their gateway routes and the payments flag, restarts a child that
//! dies, and stops them with the node. `meshwork demo load` drives orders.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::{Args, Subcommand};
use meshwork_shop::{GATEWAY_ROUTES, ShopService, order::PAYMENTS_FLAG};
use tokio::process::{Child, Command};

use crate::httpc;

/// `meshwork demo ...`.
#[derive(Args)]
pub(crate) struct DemoArgs {
    #[command(subcommand)]
    command: DemoCommand,
}

#[derive(Subcommand)]
enum DemoCommand {
    /// Run one shop service (what `up --demo` starts for each).
    Serve {
        /// `order`, `inventory` or `payment`.
        service: String,
        /// Control plane etcd endpoints, comma-separated.
        #[arg(long, env = "MESHWORK_ENDPOINTS", default_value = "127.0.0.1:2479")]
        endpoints: String,
        /// Directory of the service's SQLite database.
        #[arg(long, default_value = "meshwork-data/shop")]
        data_dir: PathBuf,
        /// Listen address (port 0: any free port; the registry tells callers).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Insert the demo products and accounts if absent.
        #[arg(long)]
        seed: bool,
        /// Exit when the parent process exits (how `up --demo` starts its children,
        /// so that a killed node leaves no orphans).
        #[arg(long)]
        exit_with_parent: bool,
        /// The version this instance registers (default: the binary's); a
        /// rollout shifts traffic by it.
        #[arg(long = "instance-version")]
        instance_version: Option<String>,
        /// Share of requests (0..=1) answered 500, to play a bad version.
        #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
        error_rate: f64,
        /// Milliseconds added to every answer, to play a slow version.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Publish the shop's gateway routes and its payments flag through a
    /// node's HTTP API (what `up --demo` does first; a Kubernetes Job runs it).
    Setup {
        /// The node's HTTP address.
        #[arg(long, env = "MESHWORK_HTTP", default_value = "127.0.0.1:7070")]
        http: String,
    },
    /// Place orders through the gateway and print a summary.
    Load {
        /// Gateway base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        gateway: String,
        /// Orders to place.
        #[arg(long, default_value_t = 1000)]
        orders: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Distinct customers (1..=100; each has its own rate limit).
        #[arg(long, default_value_t = 100)]
        customers: usize,
        /// Print the summary as JSON (no progress bar).
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(args: DemoArgs) -> Result<()> {
    match args.command {
        DemoCommand::Serve {
            service,
            endpoints,
            data_dir,
            listen,
            seed,
            exit_with_parent,
            instance_version,
            error_rate,
            delay_ms,
        } => {
            let service: ShopService = service.parse().map_err(anyhow::Error::msg)?;
            let listen = listen
                .parse()
                .with_context(|| format!("--listen {listen:?} is not HOST:PORT"))?;
            let endpoints = endpoints
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            let serve = meshwork_shop::serve(meshwork_shop::ServeOptions {
                service,
                endpoints,
                data_dir,
                listen,
                seed,
                version: instance_version,
                faults: meshwork_shop::Faults {
                    error_rate,
                    delay_ms,
                },
            });
            if exit_with_parent {
                tokio::select! {
                    r = serve => r?,
                    () = parent_gone() => {
                        tracing::warn!("parent exited; stopping");
                    }
                }
            } else {
                serve.await?;
            }
            Ok(())
        }
        DemoCommand::Setup { http } => {
            publish_routes(&http).await?;
            publish_flag(&http).await?;
            println!("the shop's routes and payments flag are published");
            Ok(())
        }
        DemoCommand::Load {
            gateway,
            orders,
            concurrency,
            customers,
            json,
        } => {
            let summary = meshwork_shop::load::run(meshwork_shop::load::LoadOptions {
                gateway,
                orders,
                concurrency,
                customers,
                progress: !json,
            })
            .await
            .map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                println!("{summary}");
            }
            Ok(())
        }
    }
}

/// A share in 0..=1.
fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: a share between 0 and 1 (e.g. 0.3)")),
    }
}

/// Resolves when this process's parent changes (it died and we were re-parented).
async fn parent_gone() {
    let parent = std::os::unix::process::parent_id();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        if std::os::unix::process::parent_id() != parent {
            return;
        }
    }
}

/// The running shop: supervised children.
pub(crate) struct Shop {
    stop: Arc<AtomicBool>,
    supervisors: Vec<tokio::task::JoinHandle<()>>,
    stop_tx: tokio::sync::watch::Sender<bool>,
}

impl Shop {
    /// Starts the shop against a node: routes, flag, children; returns once every
    /// service has a registered instance.
    /// `otlp_env`: the `OTEL_*` variables that send the services' spans (to
    /// the node's trace store or the configured collector).
    pub(crate) async fn start(
        http: &str,
        endpoints: &[String],
        data_dir: &Path,
        otlp_env: &[(&str, String)],
    ) -> Result<Shop> {
        publish_routes(http).await?;
        publish_flag(http).await?;
        let exe = std::env::current_exe().context("locating the meshwork binary")?;
        let stop = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut supervisors = Vec::new();
        for svc in ShopService::ALL {
            let mut cmd = Command::new(&exe);
            cmd.arg("demo")
                .arg("serve")
                .arg(svc.name())
                .arg("--endpoints")
                .arg(endpoints.join(","))
                .arg("--data-dir")
                .arg(data_dir.join("shop"))
                .arg("--seed")
                .arg("--exit-with-parent")
                .envs(otlp_env.iter().map(|(k, v)| (*k, v.as_str())))
                .stdout(std::process::Stdio::null())
                .kill_on_drop(true);
            supervisors.push(tokio::spawn(supervise(
                svc,
                cmd,
                stop.clone(),
                stop_rx.clone(),
            )));
        }
        let shop = Shop {
            stop,
            supervisors,
            stop_tx,
        };
        for svc in ShopService::ALL {
            wait_registered(http, svc.name()).await?;
        }
        Ok(shop)
    }

    /// Stops the children (SIGTERM, then SIGKILL after 10 s).
    pub(crate) async fn shutdown(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.stop_tx.send(true);
        for s in self.supervisors {
            let _ = s.await;
        }
    }
}

async fn supervise(
    svc: ShopService,
    mut cmd: Command,
    stop: Arc<AtomicBool>,
    mut stop_rx: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(500);
    while !stop.load(Ordering::Acquire) {
        let mut child: Child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(service = svc.name(), error = %e, "cannot start shop service");
                return;
            }
        };
        tracing::info!(
            service = svc.name(),
            pid = child.id(),
            "shop service started"
        );
        let started = tokio::time::Instant::now();
        tokio::select! {
            status = child.wait() => {
                if stop.load(Ordering::Acquire) {
                    return;
                }
                let status = match status {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("not known: {e}"),
                };
                tracing::warn!(service = svc.name(), %status, "shop service exited; restarting");
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(500);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            _ = async { let _ = stop_rx.wait_for(|s| *s).await.is_ok(); } => {
                terminate(svc, &mut child).await;
                return;
            }
        }
    }
}

async fn terminate(svc: ShopService, child: &mut Child) {
    if let Some(pid) = child.id()
        && let Ok(pid) = i32::try_from(pid)
    {
        // SAFETY: kill(2) has no memory effects; the pid is our own child's,
        // not yet reaped (we still hold it), so it cannot name another process.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            service = svc.name(),
            "shop service did not stop; killing it"
        );
        let _ = child.kill().await;
    }
}

async fn publish_routes(http: &str) -> Result<()> {
    httpc::call(
        http,
        "PUT",
        "/v1/gateway/routes?author=demo&description=shop%20routes",
        Some(Bytes::from_static(GATEWAY_ROUTES.as_bytes())),
    )
    .await?
    .json()
    .context("publishing the shop's gateway routes")?;
    Ok(())
}

async fn publish_flag(http: &str) -> Result<()> {
    let body = serde_json::json!({
        "content": "true",
        "format": "json",
        "author": "demo",
        "description": "payments on (set to false to switch them off)",
        "if_version": 0,
    });
    let r = httpc::call(
        http,
        "PUT",
        &format!("/v1/config/{PAYMENTS_FLAG}"),
        Some(Bytes::from(body.to_string())),
    )
    .await?;
    // 409: already there (a restart keeps the operator's choice).
    if r.status != 409 {
        r.json().context("publishing the payments flag")?;
    }
    Ok(())
}

async fn wait_registered(http: &str, service: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = httpc::call(
            http,
            "GET",
            &format!("/v1/services/{service}/instances"),
            None,
        )
        .await?;
        if r.status == 200
            && let Ok(v) = r.json()
            && v["instances"].as_array().is_some_and(|a| !a.is_empty())
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("shop service {service} did not register within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The banner lines of the demo.
pub(crate) fn banner(http: &str, gateway: &str) -> String {
    format!(
        "  demo shop  order, inventory and payment are running (child processes)
               curl http://{gateway}/api/products
               curl -X POST http://{gateway}/api/orders -H 'content-type: application/json' \\
                    -H 'x-customer: alice' -H 'idempotency-key: order-1' \\
                    -d '{{\"sku\":\"sku-keyboard\",\"qty\":1,\"account\":\"acct-1\"}}'
               curl http://{gateway}/api/orders
               curl http://{gateway}/api/accounts/acct-1
               meshwork demo load --gateway http://{gateway} --orders 1000
               payments off: meshwork config --http {http} publish {PAYMENTS_FLAG} --format json --content false"
    )
}
