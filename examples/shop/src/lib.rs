//! The Meshwork demo shop: `order`, `inventory` and `payment`, three axum
//! services with their own SQLite databases, built on `meshwork-sdk`.
//!
//! Each registers itself in the registry (with an HTTP health check), is reached
//! from outside only through the gateway ([`GATEWAY_ROUTES`]) and from inside
//! through the SDK's resilient client. `meshwork up --demo` starts all three;
//! `meshwork demo load` drives orders through the gateway ([`load`]).

mod db;
pub mod error;
pub mod ids;
pub mod inventory;
pub mod load;
pub mod order;
pub mod payment;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use meshwork_sdk::client::Lb;
use meshwork_sdk::server::{Server, ServerOptions};
use meshwork_sdk::{Meshwork, Options, TargetPolicy};

pub use error::ApiError;

/// One of the shop's services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShopService {
    /// Orders (the flow).
    Order,
    /// Stock and reservations.
    Inventory,
    /// Accounts and charges.
    Payment,
}

impl ShopService {
    /// All three, in start order.
    pub const ALL: [ShopService; 3] = [
        ShopService::Inventory,
        ShopService::Payment,
        ShopService::Order,
    ];

    /// The registry name.
    pub fn name(self) -> &'static str {
        match self {
            ShopService::Order => "order",
            ShopService::Inventory => "inventory",
            ShopService::Payment => "payment",
        }
    }
}

impl std::str::FromStr for ShopService {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "order" => Ok(ShopService::Order),
            "inventory" => Ok(ShopService::Inventory),
            "payment" => Ok(ShopService::Payment),
            other => Err(format!(
                "unknown shop service {other:?}: one of order, inventory, payment"
            )),
        }
    }
}

/// Why a service could not run.
#[derive(Debug, thiserror::Error)]
pub enum ShopError {
    /// The SDK failed (control plane, bind).
    #[error(transparent)]
    Sdk(#[from] meshwork_sdk::Error),
    /// The database could not be opened.
    #[error("database {path}: {source}")]
    Db {
        /// Its file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
    /// Seeding failed.
    #[error("seeding: {0}")]
    Seed(ApiError),
    /// The data directory could not be created.
    #[error("data directory {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// How to run one service.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Which.
    pub service: ShopService,
    /// Control plane endpoints.
    pub endpoints: Vec<String>,
    /// Where its database lives (`{dir}/{service}.db`).
    pub data_dir: PathBuf,
    /// Listen address (port 0: any).
    pub listen: SocketAddr,
    /// Insert the demo products/accounts if absent.
    pub seed: bool,
    /// The version it registers (default: the crate's).
    pub version: Option<String>,
    /// Faults it injects into its own answers.
    pub faults: Faults,
}

/// Faults a service injects into its own answers, to show what a rollout
/// does with a bad version (`meshwork demo serve inventory --version 2
/// --error-rate 0.3`). The health and metrics endpoints are never affected.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Share of requests answered `500 injected_fault` (0..=1), spread evenly.
    pub error_rate: f64,
    /// Added to every answer, milliseconds.
    pub delay_ms: u64,
}

impl Faults {
    /// Whether it injects anything.
    pub fn any(&self) -> bool {
        self.error_rate > 0.0 || self.delay_ms > 0
    }

    /// `router` with the faults in front of its handlers.
    pub fn apply(self, router: axum::Router) -> axum::Router {
        if !self.any() {
            return router;
        }
        let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        router.layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let seen = seen.clone();
                async move {
                    if self.delay_ms > 0 {
                        tokio::time::sleep(std::time::Duration::from_millis(self.delay_ms)).await;
                    }
                    // Request i fails when the running share crosses a whole
                    // number: exactly `error_rate` of them, evenly spread.
                    let i = seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as f64;
                    let rate = self.error_rate.clamp(0.0, 1.0);
                    if ((i + 1.0) * rate).floor() > (i * rate).floor() {
                        return axum::response::IntoResponse::into_response(ApiError::new(
                            http::StatusCode::INTERNAL_SERVER_ERROR,
                            "injected_fault",
                            "a fault injected by --error-rate (the demo of a bad version)",
                        ));
                    }
                    next.run(req).await
                }
            },
        ))
    }
}

/// The SDK policies the order service calls with (it prices orders at
/// `inventory`; the coordinator makes the transaction's calls): short
/// timeouts and a breaker that opens after 5 failures in a row for 3 s.
pub fn order_options(endpoints: Vec<String>) -> Result<Options, meshwork_sdk::Error> {
    let policy = |timeout_ms| {
        let mut p = TargetPolicy {
            timeout_ms,
            lb: Lb::P2c,
            ..TargetPolicy::default()
        };
        p.breaker.consecutive_failures = Some(5);
        p.breaker.open_duration_ms = 3_000;
        p
    };
    Ok(Options::new("order", endpoints)?
        .target("inventory", policy(1_000))
        .target("payment", policy(1_000)))
}

/// The price cache shared by the order and inventory services (`None`, logged,
/// when it cannot be opened: prices are then read from inventory every time).
pub(crate) async fn price_cache(mw: &Meshwork) -> Option<meshwork_sdk::cache::Cache> {
    match mw.cache(PRICE_CACHE).await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "no price cache");
            None
        }
    }
}

/// The name of the price cache.
pub const PRICE_CACHE: &str = "shop-prices";

/// Runs one service until SIGTERM/Ctrl-C.
pub async fn serve(opts: ServeOptions) -> Result<(), ShopError> {
    std::fs::create_dir_all(&opts.data_dir).map_err(|source| ShopError::Io {
        path: opts.data_dir.clone(),
        source,
    })?;
    let path = opts.data_dir.join(format!("{}.db", opts.service.name()));
    let open = |schema| {
        db::Db::open(&path, schema).map_err(|source| ShopError::Db {
            path: path.clone(),
            source,
        })
    };
    let name = opts.service.name();
    let (mw, router) = match opts.service {
        ShopService::Inventory => {
            let db = open(inventory::SCHEMA)?;
            if opts.seed {
                inventory::seed(&db, inventory::seed_products())
                    .await
                    .map_err(ShopError::Seed)?;
            }
            let mw = Meshwork::connect(Options::new(name, opts.endpoints.clone())?).await?;
            let prices = price_cache(&mw).await;
            (mw, inventory::router(db, prices))
        }
        ShopService::Payment => {
            let db = open(payment::SCHEMA)?;
            if opts.seed {
                payment::seed(&db, payment::seed_accounts())
                    .await
                    .map_err(ShopError::Seed)?;
            }
            let mw = Meshwork::connect(Options::new(name, opts.endpoints.clone())?).await?;
            (mw, payment::router(db))
        }
        ShopService::Order => {
            let db = open(order::SCHEMA)?;
            let mw = Meshwork::connect(order_options(opts.endpoints.clone())?).await?;
            let router = order::router(db, mw.clone()).await?;
            (mw, router)
        }
    };
    if opts.faults.any() {
        tracing::warn!(
            error_rate = opts.faults.error_rate,
            delay_ms = opts.faults.delay_ms,
            "injecting faults into this service's answers"
        );
    }
    let router = opts.faults.apply(router);
    let server_opts = ServerOptions {
        listen: opts.listen,
        version: opts
            .version
            .clone()
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").into()),
        concurrency: Some(meshwork_sdk::server::BulkheadConfig {
            max_in_flight: 512,
            max_queued: 512,
            max_wait_ms: 1_000,
        }),
        ..ServerOptions::default()
    };
    let bound = Server::new(&mw, router, server_opts).bind().await?;
    println!("{name} listening on http://{}", bound.local_addr());
    bound.run().await?;
    mw.shutdown().await;
    Ok(())
}

/// The gateway routes of the shop (`meshwork gateway apply -f` format):
/// `/api/orders` (creation rate-limited per customer and per client IP),
/// `/api/products`, `/api/accounts`, each forwarded with `/api` stripped.
pub const GATEWAY_ROUTES: &str = r#"
[[routes]]
name = "shop-orders-create"
priority = 20
rate_limits = [
  { by = "header", header = "x-customer", rate_per_sec = 20, burst = 40 },
  { by = "client_ip", rate_per_sec = 2000, burst = 4000 },
]
[routes.match]
path = { exact = "/api/orders" }
methods = ["POST"]
[routes.forward]
service = "order"
strip_prefix = "/api"
timeout_ms = 10000

[[routes]]
name = "shop-orders"
priority = 10
[routes.match]
path = { prefix = "/api/orders" }
methods = ["GET", "HEAD"]
[routes.forward]
service = "order"
strip_prefix = "/api"

[[routes]]
name = "shop-notifications"
priority = 10
[routes.match]
path = { exact = "/api/notifications" }
methods = ["GET", "HEAD"]
[routes.forward]
service = "order"
strip_prefix = "/api"

[[routes]]
name = "shop-products"
priority = 10
[routes.match]
path = { prefix = "/api/products" }
methods = ["GET", "HEAD"]
[routes.forward]
service = "inventory"
strip_prefix = "/api"

[[routes]]
name = "shop-accounts"
priority = 10
[routes.match]
path = { prefix = "/api/accounts" }
methods = ["GET", "HEAD"]
[routes.forward]
service = "payment"
strip_prefix = "/api"
"#;
