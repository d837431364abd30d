//! The Meshwork web console, served from the node's HTTP port: server-rendered
//! pages (overview, services, configuration, gateway, KV, locks, transactions, rollouts,
//! queues, cache) with a little
//! hand-written JavaScript for live updates (server-sent events) and actions,
//! assets embedded in the binary (no CDN, no JS build step), and the JSON API
//! behind every page ([`api`]).
//!
//! Writes need a login when one is configured ([`auth`]); secrets are never
//! shown in clear ([`secrets`]).

pub mod access;
pub mod api;
pub mod auth;
pub mod cache;
pub mod instances;
pub mod pages;
pub mod queues;
pub mod rollouts;
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
    /// The charts' recent past ([`History::default`]; [`router`] fills it).
    pub history: History,
    /// The login, when configured.
    pub auth: Option<Auth>,
}

impl ConsoleState {
    /// The console of a node that runs coordination only (no gateway,
    /// broker, cache or trace store, no login); set more with `..`.
    pub fn for_coord(coord: Coord) -> ConsoleState {
        ConsoleState {
            coord,
            gateway: None,
            mq: None,
            cache: None,
            traces: None,
            history: History::default(),
            auth: None,
        }
    }
}

const CSS: &str = include_str!("../assets/console.css");
const JS: &str = include_str!("../assets/console.js");

/// Ticks the history keeps: one hour at [`HISTORY_EVERY`].
pub const HISTORY_TICKS: usize = 360;
/// How often the history takes a tick.
pub const HISTORY_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The charted counters' recent past: a tick every [`HISTORY_EVERY`] for
/// the last [`HISTORY_TICKS`], so that a chart opened now starts an hour back.
#[derive(Clone, Default)]
pub struct History(std::sync::Arc<parking_lot::Mutex<std::collections::VecDeque<api::Tick>>>);

impl History {
    /// The ticks kept, oldest first.
    pub fn ticks(&self) -> Vec<api::Tick> {
        self.0.lock().iter().cloned().collect()
    }

    fn push(&self, t: api::Tick) {
        let mut q = self.0.lock();
        if q.len() >= HISTORY_TICKS {
            q.pop_front();
        }
        q.push_back(t);
    }
}

/// The console: pages at `/` and `/ui/...`, assets at `/ui/assets/...`, and
/// its JSON API at `/v1/console/...`. Starts the history's sampler (on the
/// current tokio runtime; it ends when the last router is dropped).
pub fn router(state: ConsoleState) -> Router {
    let weak = std::sync::Arc::downgrade(&state.history.0);
    state.history.push(state.tick());
    let sampler = state.clone();
    tokio::spawn(async move {
        let mut every =
            tokio::time::interval_at(tokio::time::Instant::now() + HISTORY_EVERY, HISTORY_EVERY);
        loop {
            every.tick().await;
            // Only while someone still holds the history (a router's state).
            if weak.strong_count() <= 1 {
                return;
            }
            sampler.history.push(sampler.tick());
        }
    });
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
