//! The Meshwork web console, served from the node's HTTP port: server-rendered
//! pages (overview, services, configuration, gateway, KV, locks, transactions,
//! queues, cache) with a little
//! hand-written JavaScript for live updates (server-sent events) and actions,
//! assets embedded in the binary (no CDN, no JS build step), and the JSON API
//! behind every page ([`api`]).
//!
//! Writes need a login when one is configured ([`auth`]); secrets are never
//! shown in clear ([`secrets`]).

pub mod api;
pub mod auth;
pub mod cache;
pub mod pages;
pub mod queues;
pub mod secrets;
pub mod traces;
pub mod transactions;

use axum::Router;
use axum::response::IntoResponse;
use axum::routing::get;
use http::header;
use meshwork_coord::Coord;
use meshwork_gateway::Gateway;

pub use auth::Auth;

/// The console API's part of the node's OpenAPI document (merged by
/// `meshwork_api::openapi::merge`).
pub const OPENAPI: &str = include_str!("../openapi.json");

/// What the console reads.
#[derive(Clone)]
pub struct ConsoleState {
    /// This node's coordination services.
    pub coord: Coord,
    /// This node's gateway, when it runs the role.
    pub gateway: Option<Gateway>,
    /// This node's message broker, when it runs the role (the Queues pages).
    pub mq: Option<meshwork_mq::Broker>,
    /// This node's cache, when it runs the role (the Cache page).
    pub cache: Option<std::sync::Arc<meshwork_cache::Cache>>,
    /// This node's trace store, when it runs the role (the Traces pages).
    pub traces: Option<meshwork_traces::TraceStore>,
    /// The login, when configured.
    pub auth: Option<Auth>,
}

const CSS: &str = include_str!("../assets/console.css");
const JS: &str = include_str!("../assets/console.js");

/// The console: pages at `/` and `/ui/...`, assets at `/ui/assets/...`, and
/// its JSON API at `/v1/console/...`.
pub fn router(state: ConsoleState) -> Router {
    Router::new()
        .merge(pages::routes())
        .merge(api::routes())
        .route(
            "/ui/assets/console.css",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/css; charset=utf-8"),
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                    CSS,
                )
                    .into_response()
            }),
        )
        .route(
            "/ui/assets/console.js",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                    JS,
                )
                    .into_response()
            }),
        )
        .with_state(state)
}
