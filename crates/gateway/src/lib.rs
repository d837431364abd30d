//! The Meshwork API gateway: an L7 proxy on hyper with live routes,
//! discovery-based load balancing, resilience, authentication, tracing and
//! metrics.
//!
//! * [`Gateway`] holds the configuration, the live route table (swapped
//!   atomically by [`Gateway::apply`]) and the pooled upstream clients.
//! * [`serve`] / [`serve_tls`] accept client connections (HTTP/1.1, h2c,
//!   and TLS with ALPN) until shutdown.
//! * [`RouteSet`] is the user-facing route format (TOML or JSON).
//! * [`Resolver`] is the seam to the service registry; [`StaticResolver`]
//!   serves fixed lists.
//! * [`SharedLimiter`] is the seam for cluster-wide rate limits.
//! * [`Gateway::admin_router`] is the admin API.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod admin;
mod auth;
pub mod body;
mod config;
mod error;
mod framing;
mod gateway;
mod headers;
mod limits;
mod pool;
mod proxy;
mod registry;
mod replay;
mod resolver;
pub mod role;
pub mod route;
mod server;
mod table;
mod tls;
mod upstream;

pub use config::{GatewayConfig, GatewayConfigError};
pub use error::{ErrorCode, GatewayError};
pub use gateway::{Gateway, GatewayCounters, RouteInfo};
pub use headers::{TraceContext, cookie};
pub use limits::{LocalSharedLimiter, SharedLimiter};
pub use registry::{GATEWAY_ROLE, MembershipSharedLimiter, RegistryResolver};
pub use resolver::{Endpoint, InstanceFilter, Resolver, StaticResolver};
pub use role::{GatewayRole, ROUTES_PATH, RoleError};
pub use route::model::{RouteConfig, RouteError, RouteSet};
pub use route::{Explanation, RouteCheck};
pub use server::{Workers, serve, serve_tls, spawn_workers};
pub use table::{LATENCY_BUCKETS_US, RouteCounters, bucket_quantile_ms};
pub use tls::{TlsConfig, TlsError, TlsReloader};
pub use upstream::{ClusterSnapshot, EndpointSnapshot, OutlierSnapshot};
