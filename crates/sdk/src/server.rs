//! Serving an axum router as a Meshwork service.
//!
//! [`Server`] binds, registers the instance (with an HTTP health check Meshwork
//! runs against `health_path`), and serves the router behind:
//!
//! - a rate limit and a concurrency limit (bulkhead) on inbound requests, from
//!   meshwork-resilience: 429 with `Retry-After`, 503 when full;
//! - trace context extraction: each request runs inside a
//!   [`RequestContext`](crate::RequestContext) (its `traceparent` continued, its
//!   deadline read) and a `tracing` span carrying the trace id, so calls made by
//!   the handler through the SDK continue the trace and the deadline;
//! - Prometheus metrics per route (`meshwork_sdk_server_requests_total`,
//!   `meshwork_sdk_server_request_duration_seconds`) served at `metrics_path`;
//! - graceful shutdown: on SIGTERM/Ctrl-C (or the future given to
//!   [`Bound::run_until`]) the health endpoint turns 503 and the instance is
//!   deregistered first, so no new traffic is sent, then in-flight requests
//!   finish (up to `drain_timeout`).
//!
//! ```no_run
//! # async fn demo(mw: meshwork_sdk::Meshwork) -> Result<(), meshwork_sdk::Error> {
//! use axum::{Router, routing::get};
//! use meshwork_sdk::server::{Server, ServerOptions};
//!
//! let app = Router::new().route("/stock/{sku}", get(|| async { "7" }));
//! let bound = Server::new(&mw, app, ServerOptions::default()).bind().await?;
//! println!("listening on {}", bound.local_addr());
//! bound.run().await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
pub use meshwork_resilience::limit::concurrency::BulkheadConfig;
use meshwork_resilience::limit::concurrency::BulkheadLayer;
pub use meshwork_resilience::limit::rate::GcraConfig;
use meshwork_resilience::limit::rate::RateLimitLayer;
use meshwork_resilience::{BoxError, BulkheadFull, RateLimited};
use serde::{Deserialize, Serialize};
use tower::ServiceBuilder;
use tracing::Instrument;

use crate::context::RequestContext;
use crate::{Error, Meshwork};

/// The host an instance listening on every address registers when its
/// options name none (Kubernetes: the pod's IP, `status.podIP`).
pub const ADVERTISE_HOST_ENV: &str = "MESHWORK_ADVERTISE_HOST";

/// How a service is served.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerOptions {
    /// Address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Address registered for others to reach (default: the listen address;
    /// for an unspecified one, `MESHWORK_ADVERTISE_HOST` — a pod's IP from the
    /// downward API — or else 127.0.0.1).
    pub advertise: Option<String>,
    /// Register the instance in the registry.
    pub register: bool,
    /// Version registered with the instance.
    pub version: String,
    /// Zone registered with the instance.
    pub zone: String,
    /// Inbound rate limit (`None`: none).
    pub rate_limit: Option<GcraConfig>,
    /// Inbound concurrency limit (`None`: none).
    pub concurrency: Option<BulkheadConfig>,
    /// Path of the health endpoint Meshwork checks.
    pub health_path: String,
    /// Path of the Prometheus endpoint.
    pub metrics_path: String,
    /// Longest wait for in-flight requests at shutdown, milliseconds.
    pub drain_timeout_ms: u64,
    /// Metadata registered with the instance (`pid` is always added).
    pub metadata: std::collections::BTreeMap<String, String>,
    /// With the service's identity on: the services whose certificates may
    /// call (`None`: any caller, with or without a certificate; the health
    /// and metrics paths are open to all either way). Handlers read who
    /// called from the [`Caller`] extension.
    pub allow_callers: Option<Vec<String>>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            register: true,
            version: String::new(),
            zone: String::new(),
            rate_limit: None,
            concurrency: None,
            health_path: "/health".into(),
            metrics_path: "/metrics".into(),
            drain_timeout_ms: 10_000,
            metadata: Default::default(),
            allow_callers: None,
        }
    }
}

/// A service about to be served; see the [module docs](self).
pub struct Server {
    mw: Meshwork,
    router: Router,
    opts: ServerOptions,
}

impl Server {
    /// Serves `router` for `mw`'s service.
    pub fn new(mw: &Meshwork, router: Router, opts: ServerOptions) -> Server {
        crate::telemetry::init(mw.name());
        Server {
            mw: mw.clone(),
            router,
            opts,
        }
    }

    /// Binds the listener (nothing is registered yet).
    pub async fn bind(self) -> Result<Bound, Error> {
        for (name, path) in [
            ("health_path", &self.opts.health_path),
            ("metrics_path", &self.opts.metrics_path),
        ] {
            if !path.starts_with('/') {
                return Err(Error::Invalid(format!(
                    "{name} {path:?} must start with '/'"
                )));
            }
        }
        let listener = tokio::net::TcpListener::bind(self.opts.listen).await?;
        let addr = listener.local_addr()?;
        Ok(Bound {
            server: self,
            listener,
            addr,
        })
    }
}

/// A bound server; [`Bound::run`] registers and serves.
pub struct Bound {
    server: Server,
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
}

#[derive(Clone)]
struct Shared {
    service: Arc<str>,
    draining: Arc<AtomicBool>,
}

impl Bound {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until SIGTERM or Ctrl-C, then shuts down gracefully.
    pub async fn run(self) -> Result<(), Error> {
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `shutdown` completes, then shuts down gracefully.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let Bound {
            server,
            listener,
            addr,
        } = self;
        let Server { mw, router, opts } = server;
        let shared = Shared {
            service: mw.name().into(),
            draining: Arc::new(AtomicBool::new(false)),
        };
        let identity = mw.identity().cloned();
        if identity.is_none() && opts.allow_callers.is_some() {
            return Err(Error::Invalid(
                "allow_callers needs the service's identity (Options::identity)".into(),
            ));
        }
        let app = build_router(router, &opts, shared.clone())?;
        let app = match &identity {
            Some(_) => app.layer(axum::middleware::from_fn_with_state(
                Arc::new(Gate {
                    service: shared.service.clone(),
                    allow: opts.allow_callers.clone(),
                    open: vec![opts.health_path.clone(), opts.metrics_path.clone()],
                }),
                identify,
            )),
            None => app,
        };
        let registered = if opts.register {
            let host = match &opts.advertise {
                Some(h) => h.clone(),
                None if addr.ip().is_unspecified() => std::env::var(ADVERTISE_HOST_ENV)
                    .ok()
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| "127.0.0.1".into()),
                None => addr.ip().to_string(),
            };
            let mut spec = crate::instance(&host, addr.port())
                .with_http_check(&opts.health_path)
                .version(&opts.version)
                .zone(&opts.zone)
                .build();
            spec.metadata = opts.metadata.clone();
            spec.metadata
                .insert("pid".into(), std::process::id().to_string());
            // Where the console reads this instance's own breakers and ejections.
            spec.metadata
                .insert("metrics_path".into(), opts.metrics_path.clone());
            if identity.is_some() {
                // Callers dial it with TLS; its health is checked over https.
                spec.metadata.insert(
                    crate::identity::TLS_METADATA.into(),
                    crate::identity::TLS_IDENTITY.into(),
                );
                if let Some(meshwork_coord::registry::probe::HealthCheck {
                    spec: meshwork_coord::registry::probe::CheckSpec::Http { scheme, .. },
                    ..
                }) = &mut spec.check
                {
                    *scheme = "https".into();
                }
            }
            let r = mw.register(spec).await?;
            tracing::info!(service = %mw.name(), id = %r.instance.spec.id, %addr, "registered");
            Some(r.instance.spec.id)
        } else {
            None
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let stopped = async move {
            let _ = stop_rx.await;
        };
        let serving = match &identity {
            None => {
                let serve = axum::serve(listener, app).with_graceful_shutdown(stopped);
                tokio::spawn(async move { serve.await })
            }
            Some(id) => {
                let tls = id
                    .server_config(&[b"http/1.1"])
                    .map_err(|e| Error::Invalid(format!("service identity: {e}")))?;
                let listener = crate::identity::TlsListener::new(listener, tls);
                let serve = axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<crate::identity::Peer>(),
                )
                .with_graceful_shutdown(stopped);
                tokio::spawn(async move { serve.await })
            }
        };
        shutdown.await;
        // Out of rotation first: no new traffic, then drain what is in flight.
        shared.draining.store(true, Ordering::Release);
        if let Some(id) = registered
            && let Err(e) = mw.coord().deregister(mw.name(), &id).await
        {
            tracing::warn!(error = %e, "deregistration failed; the instance expires with the session");
        }
        let _ = stop_tx.send(());
        match tokio::time::timeout(Duration::from_millis(opts.drain_timeout_ms), serving).await {
            Ok(Ok(r)) => r?,
            Ok(Err(e)) => tracing::warn!(error = %e, "server task failed"),
            Err(_) => tracing::warn!("in-flight requests did not finish within the drain timeout"),
        }
        Ok(())
    }
}

fn build_router(router: Router, opts: &ServerOptions, shared: Shared) -> Result<Router, Error> {
    let mut app = router.route_layer(axum::middleware::from_fn_with_state(
        shared.clone(),
        observe,
    ));
    if let Some(cfg) = opts.concurrency {
        let layer = BulkheadLayer::new(cfg).map_err(|e| Error::Invalid(e.to_string()))?;
        app = app.route_layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(rejection))
                .layer(layer),
        );
    }
    if let Some(cfg) = opts.rate_limit {
        let layer = RateLimitLayer::gcra(cfg).map_err(|e| Error::Invalid(e.to_string()))?;
        app = app.route_layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(rejection))
                .layer(layer),
        );
    }
    let health = shared.clone();
    app = app.route(
        &opts.health_path,
        axum::routing::get(move || {
            let draining = health.draining.load(Ordering::Acquire);
            async move {
                if draining {
                    (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
                } else {
                    (StatusCode::OK, "ok\n").into_response()
                }
            }
        }),
    );
    if let Some(handle) = prometheus() {
        app = app.route(
            &opts.metrics_path,
            axum::routing::get(move |headers: http::HeaderMap| {
                let mut text = handle.render();
                text.push_str(&meshwork_telemetry::metrics::process_text(
                    "meshwork_sdk",
                    env!("CARGO_PKG_VERSION"),
                ));
                let accept = headers
                    .get(http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let (content_type, body) = meshwork_telemetry::exemplar::exposition(accept, text);
                async move { ([(http::header::CONTENT_TYPE, content_type)], body) }
            }),
        );
    }
    Ok(app)
}

/// The process's Prometheus recorder (installed on first use; `None` if another
/// recorder was installed first).
pub fn prometheus() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = meshwork_telemetry::metrics::builder()
                .install_recorder()
                .ok();
            meshwork_telemetry::metrics::describe_all();
            handle
        })
        .clone()
}

/// A JSON error body with a stable code (the platform's envelope, [`meshwork_api::ApiError`]).
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    meshwork_api::ApiError::new(status, code, message).into_response()
}

async fn rejection(e: BoxError) -> Response {
    if let Some(r) = e.downcast_ref::<RateLimited>() {
        let secs = r.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        let mut resp = json_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            &format!("too many requests; retry in {secs} s"),
        );
        if let Ok(v) = http::HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
        return resp;
    }
    if e.is::<BulkheadFull>() {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many requests in flight; retry later",
        );
    }
    json_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        &e.to_string(),
    )
}

async fn observe(State(shared): State<Shared>, req: Request, next: Next) -> Response {
    let ctx = RequestContext::from_request(&req);
    let traced = crate::telemetry::tracer().map(|t| {
        (
            t,
            ctx.trace.clone(),
            std::time::SystemTime::now(),
            req.uri().path().to_string(),
        )
    });
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let method = req.method().to_string();
    let span = tracing::info_span!("request", service = %shared.service, %method, %route, trace_id = %ctx.trace.trace_id, span_id = %ctx.trace.span_id);
    let started = tokio::time::Instant::now();
    let trace = ctx.trace.clone();
    let resp = ctx.scope(next.run(req)).instrument(span).await;
    if let Some((t, trace, wall, path)) = traced {
        use meshwork_telemetry::export::{Kind, SpanRecord};
        let code = resp.status().as_u16();
        let s = SpanRecord::new(&trace, format!("{method} {route}"), Kind::Server, wall)
            .attr("http.request.method", method.as_str())
            .attr("http.route", route.as_str())
            .attr("url.path", path)
            .attr("http.response.status_code", code);
        t.record(if code >= 500 {
            s.failed(format!("HTTP {code}"))
        } else {
            s
        });
    }
    let status = resp.status().as_u16().to_string();
    metrics::counter!("meshwork_sdk_server_requests_total", "service" => shared.service.to_string(), "route" => route.clone(), "method" => method.clone(), "status" => status).increment(1);
    let secs = started.elapsed().as_secs_f64();
    meshwork_telemetry::exemplar::offer(
        "meshwork_sdk_server_request_duration_seconds",
        &[
            ("service", &*shared.service),
            ("route", route.as_str()),
            ("method", method.as_str()),
        ],
        secs,
        &trace,
    );
    metrics::histogram!("meshwork_sdk_server_request_duration_seconds", "service" => shared.service.to_string(), "route" => route, "method" => method).record(secs);
    resp
}

/// Who called, on a service serving with its identity: the service its
/// certificate names, `None` for a caller without one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub Option<String>);

struct Gate {
    service: Arc<str>,
    allow: Option<Vec<String>>,
    open: Vec<String>,
}

/// Tells the handlers who called ([`Caller`]) and turns away callers the
/// options do not allow.
async fn identify(State(gate): State<Arc<Gate>>, mut req: Request, next: Next) -> Response {
    let caller = req
        .extensions()
        .get::<axum::extract::ConnectInfo<crate::identity::Peer>>()
        .and_then(|c| c.0.service.clone());
    let open = gate.open.iter().any(|p| p == req.uri().path());
    if let (Some(allow), false) = (&gate.allow, open) {
        match &caller {
            Some(s) if allow.iter().any(|a| a == s) => {}
            Some(s) => {
                return json_error(
                    StatusCode::FORBIDDEN,
                    "caller_not_allowed",
                    &format!("service {s} may not call {}", gate.service),
                );
            }
            None => {
                return json_error(
                    StatusCode::UNAUTHORIZED,
                    "no_caller_identity",
                    &format!(
                        "{} takes calls from services presenting their certificate (mutual TLS)",
                        gate.service
                    ),
                );
            }
        }
    }
    req.extensions_mut().insert(Caller(caller));
    next.run(req).await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
