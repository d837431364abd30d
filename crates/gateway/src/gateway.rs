//! The [`Gateway`] handle: configuration, the live route table, upstream
//! clients, and the operations the CLI and admin API use.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::{HeaderMap, HeaderName};
use http::{Method, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::body::Body;
use crate::config::{GatewayConfig, GatewayConfigError};
use crate::limits::{LocalSharedLimiter, SharedLimiter};
use crate::resolver::Resolver;
use crate::route::Explanation;
use crate::route::compile::{self, ActionPlan, MatchInput, RouteCheck};
use crate::route::model::{RouteError, RouteSet};
use crate::table::{self, RouteCounters, RouteTable, StateCache};
use crate::upstream::ClusterSnapshot;

pub(crate) type HttpClient = Client<HttpConnector, Body>;

/// Gateway-wide live counters.
#[derive(Debug, Default)]
pub(crate) struct GatewayStats {
    pub(crate) active_connections: AtomicU64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) requests_total: AtomicU64,
    pub(crate) no_route_total: AtomicU64,
}

pub(crate) struct Shared {
    pub(crate) cfg: GatewayConfig,
    pub(crate) resolver: Arc<dyn Resolver>,
    /// Rollout splits by service (filled by the gateway role).
    pub(crate) splits: Arc<meshwork_coord::rollout::tally::Splits>,
    pub(crate) shared_limiter: Arc<dyn SharedLimiter>,
    pub(crate) table: ArcSwap<RouteTable>,
    pub(crate) cache: Mutex<StateCache>,
    pub(crate) apply_lock: Mutex<()>,
    pub(crate) mirror_slots: Arc<Semaphore>,
    pub(crate) request_id_header: HeaderName,
    pub(crate) via: crate::headers::ViaValues,
    pub(crate) stats: GatewayStats,
    pub(crate) m_active_connections: metrics::Gauge,
    /// Where the request and upstream-call spans go (unset: nowhere).
    pub(crate) tracer: std::sync::OnceLock<meshwork_telemetry::export::Tracer>,
}

/// A running gateway's state; cheap to clone (an `Arc`).
#[derive(Clone)]
pub struct Gateway {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("routes", &self.shared.table.load().routes.len())
            .finish_non_exhaustive()
    }
}

fn client(cfg: &GatewayConfig, h2: bool) -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(Duration::from_millis(cfg.upstream_connect_timeout_ms)));
    conn.enforce_http(true);
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(Duration::from_millis(cfg.upstream_pool_idle_timeout_ms))
        .pool_max_idle_per_host(cfg.upstream_pool_max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .set_host(true)
        .http2_only(h2);
    if h2 {
        b.http2_adaptive_window(true);
    }
    b.build(conn)
}

/// Upstream connection pools (HTTP/1.1 and h2c). Each listener loop has
/// its own, so a connection's task, its requests and its upstream
/// connections stay on one runtime thread.
#[derive(Debug)]
pub(crate) struct Clients {
    pub(crate) pool: Arc<crate::pool::H1Pool>,
    pub(crate) h2: HttpClient,
}

impl Clients {
    pub(crate) fn new(cfg: &GatewayConfig) -> Self {
        Self {
            pool: Arc::new(crate::pool::H1Pool::new(
                Duration::from_millis(cfg.upstream_connect_timeout_ms),
                Duration::from_millis(cfg.upstream_pool_idle_timeout_ms),
                cfg.upstream_pool_max_idle_per_host,
            )),
            h2: client(cfg, true),
        }
    }
}

/// Everything the admin API shows about one route.
#[derive(Debug, Clone, Serialize)]
pub struct RouteInfo {
    /// Name.
    pub name: String,
    /// Priority.
    pub priority: i32,
    /// What it does.
    pub action: String,
    /// Live counters.
    pub counters: RouteCounters,
    /// Circuit breaker state per target (`closed`, `open`, `half_open`), if the route has breakers.
    pub breakers: Vec<(String, &'static str)>,
}

impl Gateway {
    /// A gateway with no routes (everything answers 404 `no_route`) that
    /// resolves services through `resolver` and counts cluster-wide rate
    /// limits on this node only.
    pub fn new(
        cfg: GatewayConfig,
        resolver: Arc<dyn Resolver>,
    ) -> Result<Self, GatewayConfigError> {
        Self::with_shared_limiter(cfg, resolver, Arc::new(LocalSharedLimiter::new()))
    }

    /// As [`new`](Self::new), with a cluster-wide rate limiter.
    pub fn with_shared_limiter(
        cfg: GatewayConfig,
        resolver: Arc<dyn Resolver>,
        shared_limiter: Arc<dyn SharedLimiter>,
    ) -> Result<Self, GatewayConfigError> {
        cfg.validate()?;
        let request_id_header =
            HeaderName::from_bytes(cfg.request_id_header.as_bytes()).map_err(|_| {
                GatewayConfigError {
                    field: "request_id_header",
                    value: cfg.request_id_header.clone(),
                    expected: "a valid header name",
                }
            })?;
        let via = crate::headers::ViaValues::new(&cfg.via_name);
        Ok(Self {
            shared: Arc::new(Shared {
                mirror_slots: Arc::new(Semaphore::new(cfg.mirror_max_in_flight)),
                cfg,
                resolver,
                splits: Arc::new(meshwork_coord::rollout::tally::Splits::default()),
                shared_limiter,
                table: ArcSwap::from_pointee(RouteTable::default()),
                cache: Mutex::new(StateCache::default()),
                apply_lock: Mutex::new(()),
                request_id_header,
                via,
                stats: GatewayStats::default(),
                m_active_connections: metrics::gauge!("meshwork_gateway_active_connections"),
                tracer: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Sends a server span per request and a client span per upstream try to
    /// `tracer` from now on (once; a second call changes nothing).
    pub fn set_tracer(&self, tracer: meshwork_telemetry::export::Tracer) {
        let _ = self.shared.tracer.set(tracer);
    }

    /// The rollout splits this gateway routes by (see `meshwork_coord::rollout`).
    pub fn splits(&self) -> Arc<meshwork_coord::rollout::tally::Splits> {
        self.shared.splits.clone()
    }

    /// The configuration in force.
    pub fn config(&self) -> &GatewayConfig {
        &self.shared.cfg
    }

    /// Validates and installs `set`. On error nothing changes (the previous
    /// routes keep serving); on success new requests use the new routes at
    /// once while requests in flight finish on the old ones. Host names and
    /// key files are resolved on the blocking pool, never on a runtime
    /// thread.
    pub async fn apply(&self, set: RouteSet) -> Result<(), RouteError> {
        let (set, resolved) = compile::resolve_off_runtime(set).await?;
        self.install(set, &resolved, None)
    }

    /// As [`apply`](Self::apply), numbering the table `version`: the
    /// configuration center's version of the routes entry, so the version
    /// `meshwork gateway apply` printed is the one `gateway routes` shows.
    pub async fn apply_version(&self, set: RouteSet, version: u64) -> Result<(), RouteError> {
        let (set, resolved) = compile::resolve_off_runtime(set).await?;
        self.install(set, &resolved, Some(version))
    }

    /// Compiles `set` with what was resolved and swaps the table in.
    fn install(
        &self,
        set: RouteSet,
        resolved: &compile::Resolved,
        version: Option<u64>,
    ) -> Result<(), RouteError> {
        let _one_at_a_time = self.shared.apply_lock.lock();
        let plans = compile::plan(&set, resolved)?;
        let version = version.unwrap_or_else(|| self.shared.table.load().version + 1);
        let mut cache = self.shared.cache.lock();
        let (table, new_cache) = table::build(
            plans,
            set,
            version,
            &mut cache,
            self.shared.resolver.as_ref(),
            &self.shared.splits,
        );
        let n = table.routes.len();
        self.shared.table.store(Arc::new(table));
        *cache = new_cache;
        tracing::info!(routes = n, version, "gateway routes applied");
        Ok(())
    }

    /// The route set in force.
    pub fn routes(&self) -> RouteSet {
        self.shared.table.load().set.clone()
    }

    /// Version of the route table: the configuration center's version when
    /// installed with [`apply_version`](Self::apply_version), else bumped by
    /// every successful apply.
    pub fn routes_version(&self) -> u64 {
        self.shared.table.load().version
    }

    /// Routes in matching order with their live counters.
    pub fn route_info(&self) -> Vec<RouteInfo> {
        self.shared
            .table
            .load()
            .routes
            .iter()
            .map(|r| RouteInfo {
                name: r.plan.name.clone(),
                priority: r.plan.priority,
                action: r.plan.summary.clone(),
                counters: r.stats.counters(&r.plan.name),
                breakers: r
                    .forward
                    .iter()
                    .flat_map(|f| f.targets.iter())
                    .filter_map(|t| {
                        t.breaker
                            .as_ref()
                            .map(|(b, _)| (t.name.clone(), b.state().as_str()))
                    })
                    .collect(),
            })
            .collect()
    }

    /// Upstream clusters in use, with endpoint health, ejection and load.
    pub fn upstreams(&self) -> Vec<ClusterSnapshot> {
        let mut v: Vec<ClusterSnapshot> = self
            .shared
            .cache
            .lock()
            .clusters()
            .map(|c| c.snapshot())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Gateway-wide counters.
    pub fn counters(&self) -> GatewayCounters {
        let s = &self.shared.stats;
        GatewayCounters {
            active_connections: s.active_connections.load(Ordering::Relaxed),
            connections_total: s.connections_total.load(Ordering::Relaxed),
            requests_total: s.requests_total.load(Ordering::Relaxed),
            no_route_total: s.no_route_total.load(Ordering::Relaxed),
            routes_version: self.routes_version(),
        }
    }

    /// Which route `method url` (with `headers`) would take and why the
    /// routes before it did not match. `url` is absolute
    /// (`http://host/path?q`) or a path (the host then comes from `headers`).
    pub fn explain(
        &self,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
    ) -> Result<Explanation, RouteError> {
        let uri: Uri = url
            .parse()
            .map_err(|e| RouteError::Parse(format!("bad url `{url}`: {e}")))?;
        let host_owned = uri.host().map(str::to_ascii_lowercase).or_else(|| {
            headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(|h| h.split(':').next().unwrap_or(h).to_ascii_lowercase())
        });
        let input = MatchInput {
            method,
            host: host_owned.as_deref(),
            path: uri.path(),
            query: uri.query(),
            headers,
        };
        let table = self.shared.table.load();
        let mut checks = Vec::new();
        for r in &table.routes {
            match r.plan.matcher.check(&input) {
                Some(reason) => checks.push(RouteCheck {
                    route: r.plan.name.clone(),
                    priority: r.plan.priority,
                    matched: false,
                    reason,
                }),
                None => {
                    let action = match &r.plan.action {
                        ActionPlan::Forward(f) => {
                            let path = compile::rewrite_path(f, &r.plan.matcher, uri.path());
                            format!("{} (upstream path {path})", r.plan.summary)
                        }
                        _ => r.plan.summary.clone(),
                    };
                    checks.push(RouteCheck {
                        route: r.plan.name.clone(),
                        priority: r.plan.priority,
                        matched: true,
                        reason: "all conditions hold".into(),
                    });
                    return Ok(Explanation {
                        matched: Some(r.plan.name.clone()),
                        action: Some(action),
                        checks,
                    });
                }
            }
        }
        Ok(Explanation {
            matched: None,
            action: None,
            checks,
        })
    }

    /// The admin API (mount it under e.g. `/gateway` on the node's HTTP port).
    pub fn admin_router(&self) -> axum::Router {
        crate::admin::router(self.clone())
    }
}

/// Gateway-wide counters for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayCounters {
    /// Client connections open.
    pub active_connections: u64,
    /// Client connections accepted.
    pub connections_total: u64,
    /// Requests answered.
    pub requests_total: u64,
    /// Requests that matched no route.
    pub no_route_total: u64,
    /// Route table version.
    pub routes_version: u64,
}
