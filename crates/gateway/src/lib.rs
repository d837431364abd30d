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
#[cfg(feature = "fuzz")]
#[doc(hidden)]
pub mod fuzz;
mod gateway;
pub mod h1;
mod headers;
pub mod identity;
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
mod upstream;

/// The gateway's part of the node's OpenAPI document (`/v1/gateway/routes`
/// and the admin API under `/gateway/`), merged by
/// `meshwork_api::openapi::merge`.
pub const OPENAPI: &str = include_str!("../openapi.json");

pub use config::{GatewayConfig, GatewayConfigError};
pub use error::{ErrorCode, GatewayError};
pub use gateway::{Gateway, GatewayCounters, RouteInfo};
pub use headers::{TraceContext, cookie};
pub use limits::{LocalSharedLimiter, SharedLimiter};
pub use meshwork_coord::rollout::tally::Splits;
pub use meshwork_tls::{TlsConfig, TlsError, TlsReloader};
pub use registry::{GATEWAY_ROLE, MembershipSharedLimiter, RegistryResolver};
pub use resolver::{Endpoint, InstanceFilter, Resolver, StaticResolver};
pub use role::{GatewayRole, ROUTES_PATH, RoleError};
pub use route::model::{RouteConfig, RouteError, RouteSet};
pub use route::{Explanation, RouteCheck};
pub use server::{Workers, serve, serve_tls, spawn_workers};
pub use table::{LATENCY_BUCKETS_US, RouteCounters, bucket_quantile_ms};
pub use upstream::{ClusterSnapshot, EndpointSnapshot, OutlierSnapshot};

#[cfg(test)]
mod openapi_tests {
    #![allow(clippy::unwrap_used)]

    /// The gateway's fragment merges with the base, and every path in it is
    /// marked as served by the gateway role.
    #[test]
    fn the_fragment_merges_and_marks_its_role() {
        let doc = meshwork_api::openapi::merge(&[super::OPENAPI]).unwrap();
        let fragment: serde_json::Value = serde_json::from_str(super::OPENAPI).unwrap();
        let paths = fragment["paths"].as_object().unwrap();
        assert_eq!(paths.len(), 6);
        for (path, item) in paths {
            assert_eq!(item["x-meshwork-role"], "gateway", "{path}");
            assert!(doc["paths"][path].is_object(), "{path}");
        }
    }
}
