//! The request path: limits, route matching, access control, rate limits,
//! authentication, then the route's action (forward with retries,
//! timeouts, breaker, bulkhead and mirroring; redirect; direct response).
//!
//! One module per stage, in the order a request meets them:
//! [`request`] (checks, one authority, route match, admission, redirect and
//! direct answers), [`forward`] (target, breaker, upstream head, body,
//! bulkhead, response), [`attempt`] (the tries: endpoint pick, per-try
//! timeout, who is to blame, the retry rule, backoff), [`mirror`] (the
//! shadow copy) and [`upgrade`] (the byte tunnel after a 101).

mod attempt;
mod forward;
mod mirror;
mod request;
mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response};
use http_body::Body as HttpBody;
use tokio::time::Instant;

use crate::body::{Body, BoxError};
use crate::error::{ErrorCode, GatewayError};
use crate::framing::FramingFault;
use crate::gateway::{Clients, Shared};
use crate::headers::{self, TraceContext};
use crate::table::Route;
use meshwork_telemetry::export::{Kind, SpanRecord};

/// What the accepting side knows about a connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    pub(crate) peer: SocketAddr,
    pub(crate) tls: bool,
    pub(crate) clients: Arc<Clients>,
}

/// What every stage of one request may read: the gateway, the connection,
/// the request id and the trace context.
struct Exchange<'a> {
    sh: &'a Arc<Shared>,
    conn: &'a ConnInfo,
    rid: &'a HeaderValue,
    trace: &'a TraceContext,
}

/// What the access log and metrics need from the request's processing.
#[derive(Default)]
struct RequestLog {
    route: Option<Arc<Route>>,
    /// The request's one authority, once settled (logged when access logs are on).
    host: Option<HeaderValue>,
    upstream: Option<SocketAddr>,
    error: Option<&'static str>,
}

/// Handles one client request; never fails (errors become JSON responses).
/// `framing` is the framing tracker's verdict on it: a refused request is
/// answered 400 before anything else.
pub(crate) async fn handle<B>(
    sh: Arc<Shared>,
    req: Request<B>,
    conn: ConnInfo,
    framing: Option<FramingFault>,
) -> Response<Body>
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    if let Some(fault) = framing {
        return refuse_framing(&sh, &req, &conn, fault);
    }
    let start = Instant::now();
    let rid = headers::request_id(req.headers(), &sh.request_id_header);
    let method = req.method().clone();
    let uri_log = sh.cfg.access_log.then(|| req.uri().clone());
    let version = req.version();
    let mut out = RequestLog::default();
    let trace = TraceContext::from_headers(req.headers());
    let tracer = sh.tracer.get().filter(|t| t.enabled()).cloned();
    let traced = tracer
        .as_ref()
        .map(|_| (std::time::SystemTime::now(), req.uri().path().to_string()));
    // One span per request, carrying the W3C ids (an OpenTelemetry layer on
    // the subscriber can export it); free when no subscriber wants it.
    let span = tracing::info_span!(
        "gateway.request",
        otel.kind = "server",
        trace_id = %trace.trace_id,
        span_id = %trace.span_id,
        parent_span_id = trace.parent_id.as_deref().unwrap_or(""),
        http.method = %method,
    );
    let cx = Exchange {
        sh: &sh,
        conn: &conn,
        rid: &rid,
        trace: &trace,
    };
    let processed = {
        use tracing::Instrument;
        // Boxed: built in place on the heap instead of on the stack and
        // then moved into this future's state (a multi-KiB memcpy per
        // request, measured with callgrind).
        Box::pin(request::process(&cx, req, &mut out))
            .instrument(span)
            .await
    };
    let mut resp = match processed {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(e.code.as_str());
            e.into_response(rid.to_str().ok())
        }
    };
    resp.headers_mut()
        .insert(sh.request_id_header.clone(), rid.clone());
    let status = resp.status().as_u16();
    let elapsed = start.elapsed();
    sh.stats.requests_total.fetch_add(1, Ordering::Relaxed);
    if let Some(r) = &out.route {
        r.stats.record(status, elapsed.as_secs_f64(), Some(&trace));
    }
    if let (Some(t), Some((wall, path))) = (&tracer, traced) {
        t.record(server_span(
            &trace, wall, path, &method, status, &conn, &rid, &out,
        ));
    }
    if sh.cfg.access_log {
        tracing::info!(
            target: "meshwork_gateway::access",
            request_id = rid.to_str().unwrap_or(""),
            client = %conn.peer,
            method = %method,
            host = out.host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or(""),
            path = uri_log.as_ref().map_or("", |u| u.path()),
            version = headers::via_version(version),
            status,
            route = out.route.as_ref().map_or("", |r| r.plan.name.as_str()),
            upstream = out.upstream.map(|a| a.to_string()).unwrap_or_default(),
            error = out.error.unwrap_or(""),
            duration_us = elapsed.as_micros() as u64,
            trace_id = %trace.trace_id,
            "request"
        );
    }
    resp
}

/// The request's server span: HTTP semantic conventions, plus the route and
/// the upstream that answered; an error for a gateway error or a 5xx.
#[allow(clippy::too_many_arguments)]
fn server_span(
    trace: &TraceContext,
    wall: std::time::SystemTime,
    path: String,
    method: &http::Method,
    status: u16,
    conn: &ConnInfo,
    rid: &HeaderValue,
    out: &RequestLog,
) -> SpanRecord {
    let name = match &out.route {
        Some(r) => format!("{method} {}", r.plan.name),
        None => method.to_string(),
    };
    let mut s = SpanRecord::new(trace, name, Kind::Server, wall)
        .attr("http.request.method", method.as_str())
        .attr("url.path", path)
        .attr("http.response.status_code", status)
        .attr("client.address", conn.peer.ip().to_string())
        .attr("meshwork.request_id", rid.to_str().unwrap_or(""));
    if let Some(r) = &out.route {
        s = s.attr("meshwork.route", r.plan.name.as_str());
    }
    if let Some(u) = out.upstream {
        s = s.attr("meshwork.upstream", u.to_string());
    }
    match out.error {
        Some(e) => s.attr("error.type", e).failed(e),
        None if status >= 500 => s.failed(format!("HTTP {status}")),
        None => s,
    }
}

/// Answers a request whose head the framing tracker refused (both
/// `Content-Length` and `Transfer-Encoding`, ...): 400, and the connection
/// closes, so the body (which may hide a second request) is never read.
fn refuse_framing<B>(
    sh: &Shared,
    req: &Request<B>,
    conn: &ConnInfo,
    fault: FramingFault,
) -> Response<Body> {
    let rid = headers::request_id(req.headers(), &sh.request_id_header);
    sh.stats.requests_total.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        request_id = rid.to_str().unwrap_or(""),
        client = %conn.peer,
        method = %req.method(),
        reason = fault.message(),
        "request refused: ambiguous framing"
    );
    let mut resp =
        GatewayError::new(ErrorCode::BadRequest, fault.message()).into_response(rid.to_str().ok());
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp.headers_mut().insert(sh.request_id_header.clone(), rid);
    resp
}
