//! Spans for the node's own HTTP API: one server span per `/v1/` call
//! (service `meshwork-node`), named by its route template, continuing the
//! caller's `traceparent`. Left out: the transaction API (its coordinator
//! records its own spans), the trace queries (reading traces must not make
//! more) and the console's background calls (polls and streams of open pages).

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use meshwork_telemetry::TraceContext;
use meshwork_telemetry::export::{Kind, SpanRecord, Tracer};

/// Whether calls to `path` get a span.
fn traced(path: &str) -> bool {
    path.starts_with("/v1/")
        && !["/v1/txn/", "/v1/traces", "/v1/console/"]
            .iter()
            .any(|p| path.starts_with(p))
}

/// The middleware (state: the node's tracer for `meshwork-node`).
pub(crate) async fn server_span(
    State(tracer): State<Tracer>,
    req: Request,
    next: Next,
) -> Response {
    if !tracer.enabled() || !traced(req.uri().path()) {
        return next.run(req).await;
    }
    let ctx = TraceContext::from_headers(req.headers());
    if !ctx.sampled() {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| req.uri().path().to_string(), |m| m.as_str().to_string());
    let path = req.uri().path().to_string();
    let wall = std::time::SystemTime::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let mut span = SpanRecord::new(&ctx, format!("{method} {route}"), Kind::Server, wall)
        .attr("http.request.method", method.as_str())
        .attr("http.route", route)
        .attr("url.path", path)
        .attr("http.response.status_code", status);
    if status >= 500 {
        span = span.failed(format!("HTTP {status}"));
    }
    tracer.record(span);
    resp
}

#[cfg(test)]
mod tests {
    use super::traced;

    #[test]
    fn the_api_is_traced_but_not_its_own_noise() {
        assert!(traced("/v1/config/public/G/app.toml"));
        assert!(traced("/v1/services/orders/instances"));
        assert!(!traced("/v1/traces"));
        assert!(!traced("/v1/traces/abc"));
        assert!(!traced("/v1/txn/transactions"));
        assert!(!traced("/v1/console/history"));
        assert!(!traced("/healthz"));
        assert!(!traced("/ui/config"));
    }
}
