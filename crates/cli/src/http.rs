//! The HTTP endpoint: `/healthz` (the process is alive), `/readyz` (the store and the
//! etcd server are up and, with coordination, this node is a listed member holding
//! an id worker), and Prometheus `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use meshwork_store::Store;
use metrics_exporter_prometheus::PrometheusHandle;

/// What the handlers read.
#[derive(Clone)]
pub(crate) struct AppState {
    /// The embedded store (None on an external etcd cluster).
    pub(crate) store: Option<Store>,
    pub(crate) serving: Arc<AtomicBool>,
    /// Coordination, when this node runs it.
    pub(crate) coord: Option<meshwork_coord::Coord>,
    pub(crate) prometheus: Option<PrometheusHandle>,
}

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let store_ok = s.store.as_ref().is_none_or(|st| st.is_healthy());
    if !(store_ok && s.serving.load(Ordering::Acquire)) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the store is stopped or failed (see the log)\n".to_string(),
        );
    }
    if let Some(Err(why)) = s.coord.as_ref().map(|c| c.readiness()) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        );
    }
    (StatusCode::OK, "ready\n".to_string())
}

async fn metrics(State(s): State<AppState>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    let mut body = s
        .prometheus
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    // Gauges read at scrape time.
    if let Some(store) = &s.store {
        let st = store.status();
        for (name, help, value) in [
            (
                "meshwork_store_keys",
                "Keys in the store at its current revision.",
                st.keys,
            ),
            (
                "meshwork_store_leases",
                "Leases granted and not yet expired or revoked.",
                st.leases,
            ),
            (
                "meshwork_store_watchers",
                "Watchers open on the store.",
                st.watchers,
            ),
            (
                "meshwork_store_compact_revision",
                "The store's compacted revision.",
                st.compact_revision as _,
            ),
        ] {
            body.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
            ));
        }
    }
    // What every Prometheus client writes: process figures and the build.
    body.push_str(&meshwork_telemetry::metrics::process_text(
        "meshwork",
        env!("CARGO_PKG_VERSION"),
    ));
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = meshwork_telemetry::exemplar::exposition(accept, body);
    ([(header::CONTENT_TYPE, content_type)], body)
}
