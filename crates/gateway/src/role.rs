//! The gateway role of a node: the proxy on its own worker threads, upstreams from
//! the registry, routes from the configuration center (`meshwork/gateway/routes.toml`,
//! applied on every change; a set that does not apply is logged and the previous one
//! keeps serving), the admin API under `/gateway`, and `/v1/gateway/routes` to
//! validate and publish a route set.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use meshwork_coord::Coord;
use meshwork_coord::config::{ClientIdentity, ConfigKey, Format, Publish};

use crate::route::compile;
use crate::{
    Gateway, GatewayConfig, GatewayConfigError, MembershipSharedLimiter, RegistryResolver,
    RouteSet, Workers,
};

/// Why the gateway role did not start.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// The `[gateway]` configuration is invalid.
    #[error("gateway configuration: {0}")]
    Config(#[from] GatewayConfigError),
    /// The gateway address could not be bound.
    #[error("binding the gateway address {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the system said.
        source: std::io::Error,
    },
    /// The route set's configuration key is invalid (a bug).
    #[error("routes key: {0}")]
    RoutesKey(#[from] meshwork_coord::CoordError),
}

/// Namespace / group / data id of the route set in the configuration center.
pub const ROUTES_PATH: (&str, &str, &str) = ("meshwork", "gateway", "routes.toml");

fn routes_key() -> Result<ConfigKey, meshwork_coord::CoordError> {
    ConfigKey::new(ROUTES_PATH.0, ROUTES_PATH.1, ROUTES_PATH.2)
}

/// A running gateway role.
pub struct GatewayRole {
    /// The gateway (routes, counters, admin).
    pub gateway: Gateway,
    /// The address it listens on (the port chosen when 0 was asked).
    pub addr: SocketAddr,
    workers: Workers,
    follow: tokio::task::JoinHandle<()>,
    rollouts: tokio::task::JoinHandle<()>,
}

impl GatewayRole {
    /// Stops following routes and drains the workers.
    pub async fn shutdown(self) {
        self.follow.abort();
        self.rollouts.abort();
        let w = self.workers;
        let _ = tokio::task::spawn_blocking(move || w.shutdown()).await;
    }
}

/// Starts the gateway on `addr` and keeps its routes current.
pub fn start(
    coord: &Coord,
    cfg: GatewayConfig,
    addr: SocketAddr,
    workers: Option<usize>,
    node: &str,
) -> Result<GatewayRole, RoleError> {
    let resolver = Arc::new(RegistryResolver::new(coord.registry.clone()));
    // Cluster-wide limits (`cluster = true` rules) are split over the live gateways.
    let limiter = Arc::new(MembershipSharedLimiter::new(coord.membership.clone()));
    let gateway = Gateway::with_shared_limiter(cfg, resolver, limiter)?;
    let n = workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let workers = crate::spawn_workers(addr, gateway.clone(), n, None)
        .map_err(|source| RoleError::Bind { addr, source })?;
    let addr = workers.local_addr();
    // A gray release of the routes can target gateway nodes by name.
    let identity = ClientIdentity {
        address: String::new(),
        labels: [
            ("meshwork.node".to_string(), node.to_string()),
            ("meshwork.role".to_string(), "gateway".to_string()),
        ]
        .into(),
    };
    let mut updates = Box::pin(coord.config.subscribe(routes_key()?, identity));
    let gw = gateway.clone();
    let follow = tokio::spawn(async move {
        while let Some(served) = updates.next().await {
            let (set, version) = match &served {
                Some(s) if s.locked.is_some() => {
                    tracing::error!(
                        version = s.entry.version,
                        reason = s.locked.as_deref().unwrap_or(""),
                        "gateway routes are a secret entry this node cannot open; keeping the previous set"
                    );
                    metrics::counter!("meshwork_gateway_route_apply_errors_total").increment(1);
                    continue;
                }
                Some(s) => match RouteSet::from_toml(&s.entry.content) {
                    Ok(set) => (set, s.entry.version),
                    Err(e) => {
                        tracing::error!(version = s.entry.version, error = %e, "gateway routes do not parse; keeping the previous set");
                        metrics::counter!("meshwork_gateway_route_apply_errors_total").increment(1);
                        continue;
                    }
                },
                None => (RouteSet::default(), 0),
            };
            // The gateway logs the routes it installs, with this version.
            if let Err(e) = gw.apply_version(set, version).await {
                tracing::error!(config_version = version, error = %e, "gateway routes rejected; keeping the previous set");
                metrics::counter!("meshwork_gateway_route_apply_errors_total").increment(1);
            }
        }
    });
    // The gateway's rollout figures, under its node's name and session.
    let membership = coord.membership.clone();
    let rollouts = tokio::spawn(meshwork_coord::rollout::tally::follow(
        coord.rollouts.clone(),
        gateway.splits(),
        node.to_string(),
        move || membership.session().lease,
    ));
    Ok(GatewayRole {
        gateway,
        addr,
        workers,
        follow,
        rollouts,
    })
}

#[derive(Clone)]
struct RoutesState {
    coord: Coord,
    gateway: Option<Gateway>,
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    meshwork_api::ApiError::new(status, code, message).into_response()
}

/// `GET /v1/gateway/routes`: the published route set (TOML) and its version;
/// `PUT /v1/gateway/routes` (TOML body, `?if_version=N`): validate the whole set
/// and publish it to the configuration center.
pub fn routes_router(coord: Coord, gateway: Option<Gateway>) -> Router {
    Router::new()
        .route(
            "/v1/gateway/routes",
            axum::routing::get(get_routes).put(put_routes),
        )
        .with_state(RoutesState { coord, gateway })
}

async fn get_routes(State(s): State<RoutesState>) -> Response {
    let Ok(key) = routes_key() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "routes key".into(),
        );
    };
    let entry = s.coord.config.get(&key);
    // Secrets (JWT secrets, API keys) never leave the node in clear.
    let content = entry
        .as_ref()
        .and_then(|e| RouteSet::from_toml(&e.content).ok())
        .and_then(|set| set.redacted().to_toml().ok())
        .unwrap_or_default();
    axum::Json(serde_json::json!({
        "published_version": entry.as_ref().map(|e| e.version).unwrap_or(0),
        "content": content,
        "applied_table_version": s.gateway.as_ref().map(|g| g.routes_version()),
    }))
    .into_response()
}

async fn put_routes(
    State(s): State<RoutesState>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let Ok(text) = std::str::from_utf8(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the route set must be UTF-8 TOML".into(),
        );
    };
    // Reject the whole set before anyone applies it.
    let checked = match RouteSet::from_toml(text) {
        Ok(set) => match compile::resolve_off_runtime(set).await {
            Ok((set, resolved)) => compile::plan(&set, &resolved).map(drop),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    if let Err(e) = checked {
        return error(StatusCode::BAD_REQUEST, "invalid_routes", e.to_string());
    }
    let if_version = match q.get("if_version").map(|v| v.parse::<u64>()) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                "if_version must be a number".into(),
            );
        }
    };
    let Ok(key) = routes_key() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "routes key".into(),
        );
    };
    let publish = Publish {
        content: text.to_string(),
        format: Format::Toml,
        author: q
            .get("author")
            .cloned()
            .unwrap_or_else(|| "gateway apply".into()),
        description: q.get("description").cloned().unwrap_or_default(),
        if_version,
        secret: None,
    };
    match s.coord.config.publish(&key, publish).await {
        Ok(p) => axum::Json(serde_json::json!({
            "version": p.entry.version,
            "changed": p.changed,
        }))
        .into_response(),
        Err(e) => error(
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            e.code(),
            e.to_string(),
        ),
    }
}
