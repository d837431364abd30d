//! A forward action: choose the target, ask its breaker, build the
//! upstream head (hop-by-hop headers out, forwarding headers and the
//! route's edits in, the rewritten path), guard the body (size, idle
//! time, a tee for the mirror), run the [tries](super::attempt) inside the
//! bulkhead, tell the breaker how it went, and answer in the client's
//! protocol version.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as HttpBody;
use meshwork_resilience::breaker::Permit;
use meshwork_resilience::classify::Outcome;
use tokio::time::Instant;

use super::attempt::Tries;
use super::{Exchange, RequestLog, mirror, upgrade};
use crate::body::{self, Body, BodyFault, BoxError, GuardedBody};
use crate::config::GatewayConfig;
use crate::error::{ErrorCode, GatewayError};
use crate::gateway::Shared;
use crate::headers;
use crate::route::compile::{self, ForwardPlan, SplitCond};
use crate::route::model::{HashOn, UpstreamProtocol};
use crate::table::{ForwardRt, Route, TargetRt};
use crate::upstream::hash_bytes;

/// Forwards a request on a route's forward action.
pub(super) async fn forward<B>(
    cx: &Exchange<'_>,
    ip: IpAddr,
    route: &Route,
    plan: &ForwardPlan,
    rt: &ForwardRt,
    mut req: Request<B>,
    out: &mut RequestLog,
) -> Result<Response<Body>, GatewayError>
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let cfg = &cx.sh.cfg;
    let Some(target) = rt.targets.get(choose_target(plan, req.headers())) else {
        return Err(GatewayError::new(
            ErrorCode::UpstreamUnavailable,
            "route has no target",
        ));
    };
    let permit = admit_breaker(route, target)?;
    let upgrade = headers::is_upgrade(req.version(), req.headers());
    let on_client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let client_version = parts.version;
    let hash = request_hash(plan, &parts.headers, ip);
    let head = UpstreamHead::new(cx, ip, route, plan, parts, upgrade);
    let fault = BodyFault::default();
    let mirror = mirror::Mirror::admit(cx.sh, rt);
    let (body, mirror_body) = guard_body(cfg, body, &fault, mirror.is_some());
    if let Some(m) = mirror {
        m.send(cx, &head, mirror_body);
    }
    let tries = Tries::new(cfg, plan, rt, target, head, hash, body, fault);
    let started = Instant::now();
    let result = match &rt.bulkhead {
        None => tries.run(cx, route, plan, rt, out).await,
        // The bulkhead holds a slot while the tries (to response head) run.
        Some(layer) => match layer.acquire().await {
            Ok(_slot) => tries.run(cx, route, plan, rt, out).await,
            Err(_) => Err(GatewayError::new(
                ErrorCode::Overloaded,
                "route is at its concurrency limit",
            )),
        },
    };
    if let Some(p) = permit {
        record_breaker(route, plan, target, p, &result, started);
    }
    let resp = result?;
    Ok(respond(cx.sh, resp, on_client_upgrade, client_version))
}

/// The target a request goes to: the first split condition it meets, else
/// a weighted random choice.
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

/// The request's hash for hash-based balancing (a header, a cookie or the
/// client's address), when the route balances by one.
fn request_hash(plan: &ForwardPlan, headers: &HeaderMap, ip: IpAddr) -> Option<u64> {
    match plan.lb.hash_on.as_ref()? {
        HashOn::Header(h) => headers.get(h.as_str()).map(|v| hash_bytes(v.as_bytes())),
        HashOn::Cookie(c) => headers::cookie(headers, c).map(|v| hash_bytes(v.as_bytes())),
        HashOn::ClientIp => Some(match ip.to_canonical() {
            IpAddr::V4(v4) => hash_bytes(&v4.octets()),
            IpAddr::V6(v6) => hash_bytes(&v6.octets()),
        }),
    }
}

/// The target's breaker lets the request through (a permit to report its
/// outcome with), or answers 503 with when to come back.
fn admit_breaker(route: &Route, target: &TargetRt) -> Result<Option<Permit>, GatewayError> {
    let Some((b, gauge)) = &target.breaker else {
        return Ok(None);
    };
    match b.try_acquire(Instant::now()) {
        Ok(p) => {
            if let Some(t) = p.transition {
                gauge.set(t.to.as_gauge());
                tracing::info!(route = %route.plan.name, target = %target.name, to = t.to.as_str(), "breaker state");
            }
            Ok(Some(p))
        }
        Err(open) => Err(
            GatewayError::new(ErrorCode::BreakerOpen, "circuit breaker is open")
                .retry_after(open.remaining.max(Duration::from_secs(1))),
        ),
    }
}

/// Tells the breaker how the request went: a failure status or an
/// upstream error counts against it, the client's own faults do not.
fn record_breaker(
    route: &Route,
    plan: &ForwardPlan,
    target: &TargetRt,
    permit: Permit,
    result: &Result<Response<Body>, GatewayError>,
    started: Instant,
) {
    let Some((b, gauge)) = &target.breaker else {
        return;
    };
    let outcome = match result {
        Ok(r) if plan.failure_statuses.contains(r.status().as_u16()) => Outcome::Failure,
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
    if let Some(t) = b.record(permit, outcome, now.saturating_duration_since(started), now) {
        gauge.set(t.to.as_gauge());
        tracing::warn!(route = %route.plan.name, target = %target.name, from = t.from.as_str(), to = t.to.as_str(), "breaker state");
    }
}

/// The request as it goes upstream, less the body and the endpoint.
pub(super) struct UpstreamHead {
    pub(super) method: Method,
    pub(super) headers: HeaderMap,
    /// HTTP/2 (h2c) to the upstream, else HTTP/1.1.
    pub(super) h2: bool,
    pub(super) version: Version,
    /// The client asked for a protocol upgrade (WebSocket, ...).
    pub(super) upgrade: bool,
    /// The client's authority, for forwarding headers and the mirror's Host.
    pub(super) client_host: Option<String>,
    /// The client's own path and query, when no rewrite applies.
    original_path: Option<http::uri::PathAndQuery>,
    /// The rewritten path and query, when a rewrite applies.
    rewritten_path: String,
}

impl UpstreamHead {
    /// Builds the upstream head from the client's: hop-by-hop headers
    /// removed, forwarding and trace headers set, the route's request edits
    /// applied, Host kept or dropped, the path rewritten.
    fn new(
        cx: &Exchange<'_>,
        ip: IpAddr,
        route: &Route,
        plan: &ForwardPlan,
        parts: Parts,
        upgrade: bool,
    ) -> Self {
        let sh = cx.sh;
        let grpc = parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let h2 = match plan.protocol {
            UpstreamProtocol::H2c => true,
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Auto => parts.version == Version::HTTP_2 && grpc,
        } && !upgrade
            && plan.tls.is_none();
        let orig_authority = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let client_host = orig_authority
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut hdrs = parts.headers;
        headers::remove_hop_by_hop(&mut hdrs, true, upgrade);
        if upgrade {
            hdrs.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        headers::set_forwarding(
            &mut hdrs,
            SocketAddr::new(ip, cx.conn.peer.port()),
            if cx.conn.tls { "https" } else { "http" },
            client_host.as_deref(),
            parts.version,
            &sh.via,
            sh.cfg.trust_forwarded_headers,
        );
        cx.trace.apply(&mut hdrs);
        hdrs.insert(sh.request_id_header.clone(), cx.rid.clone());
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
        let original_path = if plan.strip_prefix.is_none() && plan.rewrite.is_none() {
            parts.uri.path_and_query().cloned()
        } else {
            None
        };
        let rewritten_path = if original_path.is_some() {
            String::new()
        } else {
            let mut p = compile::rewrite_path(plan, &route.plan.matcher, parts.uri.path());
            if let Some(q) = parts.uri.query() {
                p.push('?');
                p.push_str(q);
            }
            p
        };
        UpstreamHead {
            method: parts.method,
            headers: hdrs,
            h2,
            version: if h2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            },
            upgrade,
            client_host,
            original_path,
            rewritten_path,
        }
    }

    /// The absolute URI of the request on an endpoint.
    pub(super) fn uri(&self, authority: &http::uri::Authority) -> Result<Uri, http::Error> {
        let pq = match &self.original_path {
            Some(pq) => pq.clone(),
            None => http::uri::PathAndQuery::try_from(self.rewritten_path.as_str())?,
        };
        Uri::builder()
            .scheme(http::uri::Scheme::HTTP)
            .authority(authority.clone())
            .path_and_query(pq)
            .build()
    }
}

/// The client's body behind its guard (size limit, idle timeout, fault
/// flag), with a tee feeding the mirror's copy when one is wanted. `None`
/// for an empty body.
fn guard_body<B>(
    cfg: &GatewayConfig,
    body: B,
    fault: &BodyFault,
    tee: bool,
) -> (Option<Body>, Option<Body>)
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    if body.is_end_stream() {
        return (None, None);
    }
    let mut g = GuardedBody::new(
        body,
        cfg.max_body_bytes,
        Duration::from_millis(cfg.body_read_timeout_ms),
        fault.clone(),
    );
    let mut copy = None;
    if tee {
        let (tx, rx) = tokio::sync::mpsc::channel(cfg.mirror_buffer_chunks);
        let aborted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        g = g.with_tee(tx, aborted.clone());
        copy = Some(body::channel_body(rx, aborted));
    }
    (Some(body::boxed(g)), copy)
}

/// The upstream's answer as the client gets it: a 101 hands both
/// connections to the tunnel; otherwise hop-by-hop headers out, `Via` in,
/// and the client's own protocol version.
fn respond(
    sh: &Shared,
    mut resp: Response<Body>,
    on_client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    client_version: Version,
) -> Response<Body> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client) = on_client_upgrade
    {
        upgrade::splice(client, hyper::upgrade::on(&mut resp));
        let (mut parts, body) = resp.into_parts();
        sh.via.append(&mut parts.headers, Version::HTTP_11);
        return Response::from_parts(parts, body);
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
    Response::from_parts(parts, body)
}
