//! The request path: limits, route matching, access control, rate limits,
//! authentication, then the route's action (forward with retries,
//! timeouts, breaker, bulkhead and mirroring; redirect; direct response).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use meshwork_resilience::classify::{Outcome, StatusSet};
use meshwork_resilience::retry::full_jitter;
use meshwork_resilience::retry::{HttpTryEnd, should_retry};
use tokio::time::Instant;

use crate::body::{self, Body, BodyFault, BoxError, GuardedBody};
use crate::error::{ErrorCode, GatewayError};
use crate::framing::FramingFault;
use crate::gateway::{Clients, Shared};
use crate::headers::{self, TraceContext};
use crate::replay::Replay;
use crate::route::compile::{self, ActionPlan, ForwardPlan, MatchInput, SplitCond};
use crate::route::model::{HashOn, UpstreamProtocol};
use crate::table::{ForwardRt, Route};
use crate::upstream::{TryGuard, hash_bytes};

/// What the accepting side knows about a connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    pub(crate) peer: SocketAddr,
    pub(crate) tls: bool,
    pub(crate) clients: Arc<Clients>,
}

/// What the access log and metrics need from the request's processing.
#[derive(Default)]
struct Outcome2 {
    route: Option<Arc<Route>>,
    /// The request's one authority, once settled (logged when access logs are on).
    host: Option<HeaderValue>,
    upstream: Option<SocketAddr>,
    error: Option<&'static str>,
}

fn error_response(e: GatewayError, rid: &HeaderValue, out: &mut Outcome2) -> Response<Body> {
    out.error = Some(e.code.as_str());
    e.into_response(rid.to_str().ok())
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
    let mut out = Outcome2::default();
    let trace = TraceContext::from_headers(req.headers());
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
    let processed = {
        use tracing::Instrument;
        process(&sh, req, &conn, &rid, &trace, &mut out)
            .instrument(span)
            .await
    };
    let mut resp = match processed {
        Ok(r) => r,
        Err(e) => error_response(e, &rid, &mut out),
    };
    resp.headers_mut()
        .insert(sh.request_id_header.clone(), rid.clone());
    let status = resp.status().as_u16();
    let elapsed = start.elapsed();
    sh.stats.requests_total.fetch_add(1, Ordering::Relaxed);
    if let Some(r) = &out.route {
        r.stats.record(status, elapsed.as_secs_f64());
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

/// Settles the one authority of a request (RFC 9112 §3.2 and §3.2.2, RFC
/// 9113 §8.3.1) before anything reads it: an absolute-form target's
/// authority (or HTTP/2's `:authority`) wins and replaces the Host header;
/// otherwise the single Host header. No Host on HTTP/1.1, several Host
/// headers, a Host that disagrees with `:authority`, or an authority that
/// is not `host[:port]` is refused. Afterwards the Host header is the only
/// authority (the target is origin-form), so routing, auth, limits, logs
/// and the forwarded request all see the same value.
fn settle_authority<B>(req: &mut Request<B>) -> Result<(), GatewayError> {
    let bad = |m: &str| GatewayError::new(ErrorCode::BadRequest, m);
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next().cloned();
    if hosts.next().is_some() {
        return Err(bad("the request has more than one Host header"));
    }
    let valid = is_host_port;
    match req.uri().authority().map(|a| a.as_str().to_owned()) {
        Some(target) => {
            if req.version() == Version::HTTP_2
                && host
                    .as_ref()
                    .is_some_and(|h| !h.as_bytes().eq_ignore_ascii_case(target.as_bytes()))
            {
                return Err(bad("the Host header does not match :authority"));
            }
            if !valid(target.as_bytes()) {
                return Err(bad("the request target's authority is not host[:port]"));
            }
            let v = HeaderValue::from_str(&target)
                .map_err(|_| bad("the request target's authority is not host[:port]"))?;
            req.headers_mut().insert(header::HOST, v);
            let pq = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::from(pq);
        }
        None => match host {
            None if req.version() == Version::HTTP_11 => {
                return Err(bad(
                    "the request has no Host header (HTTP/1.1 requires one)",
                ));
            }
            Some(h) if !valid(h.as_bytes()) => {
                return Err(bad("the Host header is not host[:port]"));
            }
            _ => {}
        },
    }
    Ok(())
}

/// Whether `v` is `host[:port]`: a reg-name or IPv4 (unreserved,
/// sub-delims and `%` escapes), or a bracketed IPv6 literal, then an
/// optional port of at most 5 digits. No userinfo, path, spaces or empty
/// host. Checked without allocating (it runs on every request).
fn is_host_port(v: &[u8]) -> bool {
    let (host, port) = if v.first() == Some(&b'[') {
        let Some(close) = v.iter().position(|b| *b == b']') else {
            return false;
        };
        let inner = &v[1..close];
        if inner.is_empty()
            || !inner
                .iter()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        {
            return false;
        }
        (&v[..=close], &v[close + 1..])
    } else {
        match v.iter().position(|b| *b == b':') {
            Some(i) => (&v[..i], &v[i..]),
            None => (v, &v[v.len()..]),
        }
    };
    let host_ok = host.first() == Some(&b'[')
        || (!host.is_empty()
            && host.iter().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(
                        b,
                        b'-' | b'.'
                            | b'_'
                            | b'~'
                            | b'%'
                            | b'!'
                            | b'$'
                            | b'&'
                            | b'\''
                            | b'('
                            | b')'
                            | b'*'
                            | b'+'
                            | b','
                            | b';'
                            | b'='
                    )
            }));
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => {
            (1..=5).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit)
        }
        Some(_) => false,
    };
    host_ok && port_ok
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|s| {
        s == "."
            || s == ".."
            || s.eq_ignore_ascii_case("%2e")
            || s.eq_ignore_ascii_case("%2e%2e")
            || s.eq_ignore_ascii_case(".%2e")
            || s.eq_ignore_ascii_case("%2e.")
    })
}

async fn process<B>(
    sh: &Arc<Shared>,
    mut req: Request<B>,
    conn: &ConnInfo,
    rid: &HeaderValue,
    trace: &TraceContext,
    out: &mut Outcome2,
) -> Result<Response<Body>, GatewayError>
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let cfg = &sh.cfg;
    // Limits first: nothing below runs on oversized input.
    if req.headers().len() > cfg.max_headers
        || headers::header_bytes(req.headers()) > cfg.max_header_bytes
    {
        return Err(GatewayError::new(
            ErrorCode::HeadersTooLarge,
            "request headers exceed the limit",
        ));
    }
    if let Some(cl) = req.headers().get(header::CONTENT_LENGTH) {
        let n: u64 = cl
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| GatewayError::new(ErrorCode::BadRequest, "invalid Content-Length"))?;
        if n > cfg.max_body_bytes {
            return Err(GatewayError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "request body of {n} bytes exceeds {} bytes",
                    cfg.max_body_bytes
                ),
            ));
        }
    }
    if req.method() == Method::CONNECT {
        return Err(GatewayError::new(
            ErrorCode::BadRequest,
            "CONNECT is not supported",
        ));
    }
    settle_authority(&mut req)?;
    if cfg.access_log {
        out.host = req.headers().get(header::HOST).cloned();
    }
    let path = req.uri().path();
    if !path.starts_with('/') {
        return Err(GatewayError::new(
            ErrorCode::BadRequest,
            "the request target must be a path",
        ));
    }
    if has_dot_segment(path) {
        return Err(GatewayError::new(
            ErrorCode::BadRequest,
            "the path has dot segments",
        ));
    }
    let host = headers::request_host(&req);
    let table = sh.table.load_full();
    let route = {
        let input = MatchInput {
            method: req.method(),
            host: host.as_deref(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        };
        table
            .routes
            .iter()
            .find(|r| r.plan.matcher.matches(&input))
            .cloned()
    };
    let Some(route) = route else {
        sh.stats.no_route_total.fetch_add(1, Ordering::Relaxed);
        return Err(GatewayError::new(
            ErrorCode::NoRoute,
            "no route matches the request",
        ));
    };
    out.route = Some(route.clone());
    route.stats.active.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard(route.clone());
    let ip = if cfg.trust_forwarded_headers {
        req.headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.split(',').next())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(conn.peer.ip())
    } else {
        conn.peer.ip()
    };
    if let Some(acl) = &route.plan.acl
        && !acl.allows(ip)
    {
        return Err(GatewayError::new(
            ErrorCode::Forbidden,
            format!("client {ip} is not allowed"),
        ));
    }
    if !route.limiters.is_empty() {
        let now = Instant::now();
        for l in &route.limiters {
            if let Err(rl) = l.check(ip, req.headers(), sh.shared_limiter.as_ref(), now) {
                route.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                route.stats.m_rate_limited.increment(1);
                return Err(
                    GatewayError::new(ErrorCode::RateLimited, "rate limit exceeded")
                        .retry_after(rl.retry_after),
                );
            }
        }
    }
    if let Some(auth) = &route.plan.auth {
        auth.check(req.headers_mut())?;
    }
    let mut resp = match &route.plan.action {
        ActionPlan::Respond(r) => {
            let mut resp = Response::new(body::full(r.body.clone()));
            *resp.status_mut() = r.status;
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, r.content_type.clone());
            resp
        }
        ActionPlan::Redirect(rd) => {
            let uri = req.uri();
            let location = match &rd.location {
                Some(l) => {
                    let mut loc = compile::expand_captures(&route.plan.matcher, uri.path(), l);
                    if rd.keep_query
                        && loc.starts_with('/')
                        && let Some(q) = uri.query()
                    {
                        loc.push(if loc.contains('?') { '&' } else { '?' });
                        loc.push_str(q);
                    }
                    loc
                }
                None => {
                    let scheme =
                        rd.scheme
                            .as_deref()
                            .unwrap_or(if conn.tls { "https" } else { "http" });
                    let h = rd
                        .host
                        .clone()
                        .or_else(|| headers::request_authority(&req))
                        .unwrap_or_default();
                    let mut loc = format!("{scheme}://{h}{}", uri.path());
                    if rd.keep_query
                        && let Some(q) = uri.query()
                    {
                        loc.push('?');
                        loc.push_str(q);
                    }
                    loc
                }
            };
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = rd.status;
            let v = HeaderValue::from_str(&location).map_err(|_| {
                GatewayError::new(
                    ErrorCode::BadRequest,
                    "redirect location is not a valid header",
                )
            })?;
            resp.headers_mut().insert(header::LOCATION, v);
            resp
        }
        ActionPlan::Forward(plan) => {
            let Some(rt) = route.forward.as_ref() else {
                return Err(GatewayError::new(
                    ErrorCode::UpstreamUnavailable,
                    "route has no upstream state",
                ));
            };
            forward(sh, &route, plan, rt, req, conn, ip, rid, trace, out).await?
        }
    };
    route.plan.response_ops.apply(resp.headers_mut());
    Ok(resp)
}

struct ActiveGuard(Arc<Route>);
impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn choose_target(plan: &ForwardPlan, headers: &HeaderMap) -> usize {
    for (cond, idx) in &plan.split {
        let hit = match cond {
            SplitCond::Header(h, want) => headers
                .get(h)
                .is_some_and(|v| want.as_ref().is_none_or(|w| v.as_bytes() == w.as_bytes())),
            SplitCond::Cookie(c, want) => {
                headers::cookie(headers, c).is_some_and(|v| want.as_ref().is_none_or(|w| v == w))
            }
        };
        if hit {
            return *idx;
        }
    }
    if plan.targets.len() == 1 || plan.total_weight == 0 {
        return 0;
    }
    let mut r = rand::random_range(0..plan.total_weight);
    for (i, t) in plan.targets.iter().enumerate() {
        let w = u64::from(t.weight);
        if r < w {
            return i;
        }
        r -= w;
    }
    0
}

fn request_hash(plan: &ForwardPlan, headers: &HeaderMap, ip: std::net::IpAddr) -> Option<u64> {
    match plan.lb.hash_on.as_ref()? {
        HashOn::Header(h) => headers.get(h.as_str()).map(|v| hash_bytes(v.as_bytes())),
        HashOn::Cookie(c) => headers::cookie(headers, c).map(|v| hash_bytes(v.as_bytes())),
        HashOn::ClientIp => Some(match ip.to_canonical() {
            std::net::IpAddr::V4(v4) => hash_bytes(&v4.octets()),
            std::net::IpAddr::V6(v6) => hash_bytes(&v6.octets()),
        }),
    }
}

/// An upstream call's failure.
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    /// Nothing reached the upstream: no connection, or the connection
    /// closed before the request was written.
    #[error("{0}")]
    NotSent(String),
    /// The exchange failed once the request was (at least partly) sent.
    #[error("{0}")]
    Broken(String),
}

/// One call to an upstream endpoint: HTTP/1.1 through the listener's own
/// pool, h2c through hyper-util's pooled client.
async fn call_upstream(
    clients: &Clients,
    h2: bool,
    addr: SocketAddr,
    authority: &http::uri::Authority,
    mut req: Request<Body>,
) -> Result<Response<Body>, UpstreamError> {
    if h2 {
        return match clients.h2.request(req).await {
            Ok(r) => Ok(r.map(body::boxed)),
            Err(e) if e.is_connect() => Err(UpstreamError::NotSent(error_chain(&e))),
            Err(e) => Err(UpstreamError::Broken(error_chain(&e))),
        };
    }
    // HTTP/1.1 on a connection: origin-form target, explicit Host.
    if let Some(pq) = req.uri().path_and_query().cloned() {
        *req.uri_mut() = Uri::from(pq);
    }
    if !req.headers().contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    clients.pool.send(addr, req).await.map_err(|e| {
        if e.is_connect() {
            UpstreamError::NotSent(e.to_string())
        } else {
            UpstreamError::Broken(error_chain(&e))
        }
    })
}

/// How one try ended. Only what the upstream did counts against it.
enum TryEnd {
    /// The upstream answered (any status).
    Answered(Response<Body>),
    /// The upstream failed: nothing sent, a broken exchange, or no answer
    /// within the try's time (`None` error).
    Failed(Option<UpstreamError>),
    /// The client's body failed (`BodyFault` code): the client's doing,
    /// never counted against the upstream.
    ClientFault(u8),
}

impl TryEnd {
    /// What the try says about the endpoint's health.
    fn outcome(&self, failure_statuses: &StatusSet) -> Outcome {
        match self {
            TryEnd::Answered(r) if failure_statuses.contains(r.status().as_u16()) => {
                Outcome::Failure
            }
            TryEnd::Answered(_) => Outcome::Success,
            TryEnd::Failed(_) => Outcome::Failure,
            TryEnd::ClientFault(_) => Outcome::Ignored,
        }
    }
}

/// The retry rules of one request (see [`retry_allowed`]).
#[derive(Debug, Clone, Copy)]
struct RetryRules {
    /// The route configures `retry`.
    configured: bool,
    /// The route fails over on connection failures (default on).
    failover: bool,
    /// The method may be sent twice (idempotent, or `retry_all_methods`).
    method_retryable: bool,
    /// Per-try timeouts are shorter than the overall one.
    per_try_shorter: bool,
}

/// Whether a try that ended so may be tried again on another endpoint
/// (attempts, body replay, budget and deadline are checked elsewhere):
///
/// * nothing sent: for every method, with retries or failover;
/// * a broken exchange: idempotent methods, with retries or failover;
/// * 502/503/504: idempotent methods, with retries, or with failover when
///   the try was an endpoint's trial after an ejection;
/// * a per-try timeout: idempotent methods, with retries;
/// * the client's fault: never.
///
/// What may go again by method and outcome is the shared rule
/// ([`should_retry`], also the SDK's); this adds which route settings allow it.
fn retry_allowed(end: &TryEnd, rules: RetryRules, trial: bool) -> bool {
    let any = rules.configured || rules.failover;
    // `method_retryable` already folds in `retry_all_methods`.
    let shared = |e| should_retry(&Method::POST, e, rules.method_retryable);
    match end {
        TryEnd::Failed(Some(UpstreamError::NotSent(_))) => any && shared(HttpTryEnd::NotSent),
        TryEnd::Failed(Some(UpstreamError::Broken(_))) => any && shared(HttpTryEnd::Failed),
        TryEnd::Failed(None) => {
            rules.configured && rules.per_try_shorter && shared(HttpTryEnd::Failed)
        }
        TryEnd::Answered(r) => {
            shared(HttpTryEnd::Answered(r.status().as_u16()))
                && (rules.configured || (trial && rules.failover))
        }
        TryEnd::ClientFault(_) => false,
    }
}

/// Tries in all when the route has failover but no `retry` settings.
const FAILOVER_ATTEMPTS: u32 = 3;

/// The client-facing error for a try's end (never an internal address or
/// a library's message: those are logged with the request id).
fn try_error(
    end: TryEnd,
    max_body_bytes: u64,
    waited: Duration,
) -> Result<Response<Body>, GatewayError> {
    match end {
        TryEnd::Answered(r) => Ok(r),
        TryEnd::ClientFault(BodyFault::TOO_LARGE) => Err(GatewayError::new(
            ErrorCode::PayloadTooLarge,
            format!("request body exceeds {max_body_bytes} bytes"),
        )),
        TryEnd::ClientFault(BodyFault::TIMEOUT) => Err(GatewayError::new(
            ErrorCode::RequestTimeout,
            "request body read timed out",
        )),
        TryEnd::ClientFault(_) => Err(GatewayError::new(
            ErrorCode::BadRequest,
            "the request body was malformed or cut short",
        )),
        TryEnd::Failed(Some(UpstreamError::NotSent(_))) => Err(GatewayError::new(
            ErrorCode::UpstreamUnavailable,
            "no upstream endpoint could be reached",
        )),
        TryEnd::Failed(Some(UpstreamError::Broken(_))) => Err(GatewayError::new(
            ErrorCode::UpstreamUnavailable,
            "the upstream failed before answering",
        )),
        TryEnd::Failed(None) => Err(GatewayError::new(
            ErrorCode::UpstreamTimeout,
            format!("upstream did not answer within {} ms", waited.as_millis()),
        )),
    }
}

#[allow(clippy::too_many_arguments)]
async fn forward<B>(
    sh: &Arc<Shared>,
    route: &Arc<Route>,
    plan: &ForwardPlan,
    rt: &ForwardRt,
    mut req: Request<B>,
    conn: &ConnInfo,
    ip: std::net::IpAddr,
    rid: &HeaderValue,
    trace: &TraceContext,
    out: &mut Outcome2,
) -> Result<Response<Body>, GatewayError>
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let cfg = &sh.cfg;
    let Some(target) = rt.targets.get(choose_target(plan, req.headers())) else {
        return Err(GatewayError::new(
            ErrorCode::UpstreamUnavailable,
            "route has no target",
        ));
    };
    let permit = match &target.breaker {
        Some((b, gauge)) => {
            let now = Instant::now();
            match b.try_acquire(now) {
                Ok(p) => {
                    if let Some(t) = p.transition {
                        gauge.set(t.to.as_gauge());
                        tracing::info!(route = %route.plan.name, target = %target.name, to = t.to.as_str(), "breaker state");
                    }
                    Some(p)
                }
                Err(open) => {
                    return Err(GatewayError::new(
                        ErrorCode::BreakerOpen,
                        "circuit breaker is open",
                    )
                    .retry_after(open.remaining.max(Duration::from_secs(1))));
                }
            }
        }
        None => None,
    };
    let upgrade = headers::is_upgrade(req.version(), req.headers());
    let on_client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let client_version = parts.version;
    let body_empty = body.is_end_stream();
    let method = parts.method.clone();
    let grpc = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let h2 = match plan.protocol {
        UpstreamProtocol::H2c => true,
        UpstreamProtocol::Http1 => false,
        UpstreamProtocol::Auto => parts.version == Version::HTTP_2 && grpc,
    } && !upgrade;
    let hash = request_hash(plan, &parts.headers, ip);
    let orig_authority = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let fwd_host = orig_authority
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // Headers going upstream.
    let mut hdrs = parts.headers;
    headers::remove_hop_by_hop(&mut hdrs, true, upgrade);
    if upgrade {
        hdrs.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    headers::set_forwarding(
        &mut hdrs,
        SocketAddr::new(ip, conn.peer.port()),
        if conn.tls { "https" } else { "http" },
        fwd_host.as_deref(),
        parts.version,
        &sh.via,
        cfg.trust_forwarded_headers,
    );
    trace.apply(&mut hdrs);
    hdrs.insert(sh.request_id_header.clone(), rid.clone());
    route.plan.request_ops.apply(&mut hdrs);
    match (&orig_authority, plan.preserve_host && !h2) {
        (Some(h), true) => {
            hdrs.insert(header::HOST, h.clone());
        }
        _ => {
            hdrs.remove(header::HOST);
        }
    }
    // The upstream path: the client's own when no rewrite applies.
    let orig_pq = if plan.strip_prefix.is_none() && plan.rewrite.is_none() {
        parts.uri.path_and_query().cloned()
    } else {
        None
    };
    let path_q = if orig_pq.is_some() {
        String::new()
    } else {
        let mut p = compile::rewrite_path(plan, &route.plan.matcher, parts.uri.path());
        if let Some(q) = parts.uri.query() {
            p.push('?');
            p.push_str(q);
        }
        p
    };
    // Body: streamed through the guard unless empty.
    let fault = BodyFault::default();
    let mut mirror_body = None;
    let mirror_target = rt
        .mirror
        .as_ref()
        .filter(|(_, pct)| *pct >= 100.0 || rand::random::<f64>() * 100.0 < *pct);
    let mirror_permit =
        mirror_target.and_then(|_| sh.mirror_slots.clone().try_acquire_owned().ok());
    let guarded = if body_empty {
        None
    } else {
        let mut g = GuardedBody::new(
            body,
            cfg.max_body_bytes,
            Duration::from_millis(cfg.body_read_timeout_ms),
            fault.clone(),
        );
        if mirror_permit.is_some() {
            let (tx, rx) = tokio::sync::mpsc::channel(cfg.mirror_buffer_chunks);
            let aborted = Arc::new(AtomicBool::new(false));
            g = g.with_tee(tx, aborted.clone());
            mirror_body = Some(body::channel_body(rx, aborted));
        }
        Some(body::boxed(g))
    };
    if let (Some((cluster, _)), Some(permit)) = (mirror_target, mirror_permit) {
        let mb = mirror_body.unwrap_or_else(body::empty);
        if let Some(p) = cluster.pick(None, &[]) {
            let mut mh = hdrs.clone();
            if let Some(h) = fwd_host.as_deref() {
                let shadow = format!("{}-shadow", h.split(':').next().unwrap_or(h));
                if let Ok(v) = HeaderValue::from_str(&shadow) {
                    mh.insert(header::HOST, v);
                }
            }
            if let Ok(uri) = upstream_uri(&p.authority, &path_q, orig_pq.as_ref()) {
                let mut mreq = Request::new(mb);
                *mreq.method_mut() = method.clone();
                *mreq.uri_mut() = uri;
                *mreq.headers_mut() = mh;
                let clients = conn.clients.clone();
                let limit = Duration::from_millis(cfg.default_timeout_ms);
                let (maddr, mauth) = (p.addr, p.authority.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = tokio::time::timeout(limit, async move {
                        if let Ok(resp) = call_upstream(&clients, false, maddr, &mauth, mreq).await
                        {
                            let mut b = resp.into_body();
                            while let Some(Ok(_)) = b.frame().await {}
                        }
                    })
                    .await;
                });
            }
        }
    }
    let method_retryable = should_retry(&method, HttpTryEnd::Failed, plan.retry_all_methods);
    let mut attempts_allowed = match &plan.retry {
        Some(r) if !upgrade => r.max_attempts,
        _ if plan.failover => FAILOVER_ATTEMPTS,
        _ => 1,
    };
    // A body that may be retried is kept while it streams (up to the
    // limit); one that may only be retried on a connect failure keeps
    // nothing (replayable only while untouched).
    let (replay, mut next_body) = match guarded {
        Some(b) if attempts_allowed > 1 => {
            let limit = if method_retryable {
                plan.retry_buffer_bytes.unwrap_or(cfg.retry_buffer_bytes)
            } else {
                0
            };
            let r = Replay::new(b, limit);
            let first = r.next_body().map(body::boxed);
            (Some(r), first)
        }
        other => (None, other),
    };
    if let Some(b) = &rt.budget {
        b.deposit(Instant::now());
    }
    let overall = plan
        .timeout
        .unwrap_or(Duration::from_millis(cfg.default_timeout_ms));
    let per_try = plan.per_try_timeout.unwrap_or(overall);
    let deadline = Instant::now() + overall;
    let version = if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };

    let rules = RetryRules {
        configured: plan.retry.is_some() && !upgrade,
        failover: plan.failover,
        method_retryable,
        per_try_shorter: per_try < overall,
    };
    let statuses = plan.failure_statuses;
    let call = async {
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let Some(picked) = target.cluster.pick(hash, &tried) else {
                return Err(GatewayError::new(
                    ErrorCode::NoHealthyUpstream,
                    format!("no healthy endpoint for {}", target.cluster.name),
                ));
            };
            // A failed trial is retried elsewhere: it gets one try more.
            if picked.trial && rules.failover {
                attempts_allowed = attempts_allowed.max(attempt + 1);
            }
            out.upstream = Some(picked.addr);
            tried.push(picked.addr);
            let uri = upstream_uri(&picked.authority, &path_q, orig_pq.as_ref()).map_err(|_| {
                GatewayError::new(ErrorCode::BadRequest, "cannot build the upstream URI")
            })?;
            let last = attempt >= attempts_allowed;
            let body = next_body.take().unwrap_or_else(body::empty);
            let mut up = Request::new(body);
            *up.method_mut() = method.clone();
            *up.uri_mut() = uri;
            *up.version_mut() = version;
            *up.headers_mut() = if last {
                std::mem::take(&mut hdrs)
            } else {
                hdrs.clone()
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let this_try = per_try.min(remaining);
            let guard = TryGuard::start(&picked);
            let res = tokio::time::timeout(
                this_try,
                call_upstream(&conn.clients, h2, picked.addr, &picked.authority, up),
            )
            .await;
            let rtt = guard.end();
            let end = match res {
                Ok(Ok(r)) => TryEnd::Answered(r),
                // The client's body broke the exchange: not the upstream's doing.
                Ok(Err(_)) | Err(_) if fault.get() != BodyFault::NONE => {
                    TryEnd::ClientFault(fault.get())
                }
                Ok(Err(e)) => TryEnd::Failed(Some(e)),
                Err(_) => TryEnd::Failed(None),
            };
            let outcome = end.outcome(&statuses);
            if outcome == Outcome::Failure {
                picked.stats.failures.fetch_add(1, Ordering::Relaxed);
            }
            target.cluster.record(picked.addr, outcome, rtt);
            match &end {
                TryEnd::Failed(e) => tracing::warn!(
                    request_id = rid.to_str().unwrap_or(""),
                    route = %route.plan.name,
                    endpoint = %picked.addr,
                    attempt,
                    error = e.as_ref().map_or_else(|| format!("no answer within {} ms", this_try.as_millis()), ToString::to_string),
                    "upstream try failed"
                ),
                TryEnd::ClientFault(f) => {
                    route.stats.client_faults.fetch_add(1, Ordering::Relaxed);
                    route.stats.m_client_faults.increment(1);
                    tracing::info!(
                        request_id = rid.to_str().unwrap_or(""),
                        route = %route.plan.name,
                        client = %conn.peer,
                        fault = f,
                        "client's request body failed (aborted, malformed, too large or too slow)"
                    );
                }
                TryEnd::Answered(_) => {}
            }
            let may_retry = !last
                && retry_allowed(&end, rules, picked.trial)
                && replay.as_ref().map_or(body_empty, Replay::replayable)
                && rt
                    .budget
                    .as_ref()
                    .is_none_or(|b| b.try_withdraw(Instant::now()));
            if may_retry {
                // Nothing was sent: the next endpoint at once. Otherwise
                // the configured backoff.
                let not_sent = matches!(&end, TryEnd::Failed(Some(UpstreamError::NotSent(_))));
                let backoff = match &plan.retry {
                    Some(r) if !not_sent => full_jitter(
                        Duration::from_millis(r.initial_backoff_ms),
                        Duration::from_millis(r.max_backoff_ms),
                        r.multiplier,
                        attempt,
                    ),
                    _ => Duration::ZERO,
                };
                // The retry's body (this supersedes the failed try's, which
                // its connection may still be sending); `None` if the body
                // went past the limit since the check above.
                if Instant::now() + backoff < deadline
                    && let Some(body) = match &replay {
                        Some(r) => r.next_body().map(|b| Some(body::boxed(b))),
                        None => Some(None),
                    }
                {
                    next_body = body;
                    tracing::debug!(route = %route.plan.name, endpoint = %picked.addr, attempt, "retrying");
                    if !backoff.is_zero() {
                        tokio::time::sleep(backoff).await;
                    }
                    continue;
                }
            }
            return try_error(end, cfg.max_body_bytes, this_try);
        }
    };
    let started = Instant::now();
    let result = match &rt.bulkhead {
        None => call.await,
        // The bulkhead holds a slot while the call (to response head) runs.
        Some(layer) => match layer.acquire().await {
            Ok(_slot) => call.await,
            Err(_) => Err(GatewayError::new(
                ErrorCode::Overloaded,
                "route is at its concurrency limit",
            )),
        },
    };
    if let (Some(p), Some((b, gauge))) = (permit, &target.breaker) {
        let outcome = match &result {
            Ok(r) if statuses.contains(r.status().as_u16()) => Outcome::Failure,
            Ok(_) => Outcome::Success,
            Err(e)
                if matches!(
                    e.code,
                    ErrorCode::PayloadTooLarge | ErrorCode::RequestTimeout | ErrorCode::BadRequest
                ) =>
            {
                Outcome::Ignored
            }
            Err(_) => Outcome::Failure,
        };
        let now = Instant::now();
        if let Some(t) = b.record(p, outcome, now.saturating_duration_since(started), now) {
            gauge.set(t.to.as_gauge());
            tracing::warn!(route = %route.plan.name, target = %target.name, from = t.from.as_str(), to = t.to.as_str(), "breaker state");
        }
    }
    let mut resp = result?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS && upgrade {
        let up = hyper::upgrade::on(&mut resp);
        if let Some(client_up) = on_client_upgrade {
            tokio::spawn(async move {
                match tokio::try_join!(client_up, up) {
                    Ok((c, u)) => {
                        let mut c = TokioIo::new(c);
                        let mut u = TokioIo::new(u);
                        if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                            tracing::debug!(error = %e, "upgraded tunnel ended");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
            });
        }
        let (mut parts, body) = resp.into_parts();
        sh.via.append(&mut parts.headers, Version::HTTP_11);
        return Ok(Response::from_parts(parts, body));
    }
    let (mut parts, body) = resp.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers, false, false);
    sh.via.append(&mut parts.headers, parts.version);
    // The client's connection keeps its own protocol: an HTTP/1.0 upstream
    // answering with close must not make the gateway answer HTTP/1.0 (and
    // close the client's keep-alive connection).
    parts.version = if client_version == Version::HTTP_2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    Ok(Response::from_parts(parts, body))
}

fn upstream_uri(
    authority: &http::uri::Authority,
    path_q: &str,
    orig: Option<&http::uri::PathAndQuery>,
) -> Result<Uri, http::Error> {
    let pq = match orig {
        Some(pq) => pq.clone(),
        None => http::uri::PathAndQuery::try_from(path_q)?,
    };
    Uri::builder()
        .scheme(http::uri::Scheme::HTTP)
        .authority(authority.clone())
        .path_and_query(pq)
        .build()
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_accepts_names_addresses_and_ports_only() {
        for ok in [
            "a.test",
            "A.Test:8080",
            "127.0.0.1:1",
            "[::1]:80",
            "[fe80::1]",
            "xn--bcher-kva.example",
            "a_b",
        ] {
            assert!(is_host_port(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "user@a.test",
            "a.test:",
            "a.test:123456",
            "a b",
            "a/b",
            "[::1",
            "[]",
            "a.test:8o",
            "[::1]x",
            "a?b",
        ] {
            assert!(!is_host_port(bad.as_bytes()), "{bad}");
        }
    }

    fn answered(status: u16) -> TryEnd {
        let mut r = Response::new(body::empty());
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        TryEnd::Answered(r)
    }

    #[test]
    fn retry_rules() {
        let failover = RetryRules {
            configured: false,
            failover: true,
            method_retryable: false,
            per_try_shorter: true,
        };
        let not_sent = TryEnd::Failed(Some(UpstreamError::NotSent(String::new())));
        let broken = TryEnd::Failed(Some(UpstreamError::Broken(String::new())));
        // Nothing sent: any method, with failover alone.
        assert!(retry_allowed(&not_sent, failover, false));
        // Sent and broken: idempotent methods only.
        assert!(!retry_allowed(&broken, failover, false));
        let get = RetryRules {
            method_retryable: true,
            ..failover
        };
        assert!(retry_allowed(&broken, get, false));
        // A 503 is retried with `retry`, or when it was a trial.
        assert!(!retry_allowed(&answered(503), get, false));
        assert!(retry_allowed(&answered(503), get, true));
        assert!(!retry_allowed(&answered(500), get, true));
        let configured = RetryRules {
            configured: true,
            ..get
        };
        assert!(retry_allowed(&answered(503), configured, false));
        assert!(retry_allowed(&TryEnd::Failed(None), configured, false));
        assert!(!retry_allowed(&TryEnd::Failed(None), get, false));
        // The client's fault: never.
        assert!(!retry_allowed(
            &TryEnd::ClientFault(BodyFault::CLIENT),
            configured,
            true
        ));
        // Nothing at all with failover off and no retry.
        let off = RetryRules {
            failover: false,
            ..get
        };
        assert!(!retry_allowed(&not_sent, off, true));
        assert!(!retry_allowed(&answered(503), off, true));
    }
}
