//! The request's own checks and the actions that need no upstream: limits,
//! one authority, the path, the route match, admission (IP lists, rate
//! limits, authentication), then a redirect or a direct answer, or the
//! hand-off to [`forward`](super::forward).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body::Body as HttpBody;
use tokio::time::Instant;

use super::{Exchange, RequestLog, forward};
use crate::body::{self, Body, BoxError};
use crate::config::GatewayConfig;
use crate::error::{ErrorCode, GatewayError};
use crate::gateway::Shared;
use crate::headers;
use crate::route::compile::{self, ActionPlan, MatchInput, RedirectPlan, RespondPlan};
use crate::table::Route;

/// Runs a request through every stage and its route's action.
pub(super) async fn process<B>(
    cx: &Exchange<'_>,
    mut req: Request<B>,
    out: &mut RequestLog,
) -> Result<Response<Body>, GatewayError>
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let cfg = &cx.sh.cfg;
    // Limits first: nothing below runs on oversized input.
    check_limits(cfg, &req)?;
    settle_authority(&mut req)?;
    if cfg.access_log {
        out.host = req.headers().get(header::HOST).cloned();
    }
    check_path(req.uri().path())?;
    let route = match_route(cx.sh, &req)?;
    out.route = Some(route.clone());
    route.stats.active.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard(route.clone());
    let ip = client_ip(cfg, &req, cx.conn.peer.ip());
    admit(cx.sh, &route, ip, &mut req)?;
    let mut resp = match &route.plan.action {
        ActionPlan::Respond(r) => respond(r),
        ActionPlan::Redirect(rd) => redirect(&route, rd, &req, cx.conn.tls)?,
        ActionPlan::Forward(plan) => {
            let Some(rt) = route.forward.as_ref() else {
                return Err(GatewayError::new(
                    ErrorCode::UpstreamUnavailable,
                    "route has no upstream state",
                ));
            };
            forward::forward(cx, ip, &route, plan, rt, req, out).await?
        }
    };
    route.plan.response_ops.apply(resp.headers_mut());
    Ok(resp)
}

/// Header count and size, a declared body size, and the method.
fn check_limits<B>(cfg: &GatewayConfig, req: &Request<B>) -> Result<(), GatewayError> {
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
    Ok(())
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
    let valid = crate::h1::head::is_host_port;
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

/// The target must be an origin-form path without dot segments (plain or
/// percent-encoded), so a prefix route cannot be escaped upstream.
fn check_path(path: &str) -> Result<(), GatewayError> {
    if !path.starts_with('/') {
        return Err(GatewayError::new(
            ErrorCode::BadRequest,
            "the request target must be a path",
        ));
    }
    let dot_segment = path.split('/').any(|s| {
        s == "."
            || s == ".."
            || s.eq_ignore_ascii_case("%2e")
            || s.eq_ignore_ascii_case("%2e%2e")
            || s.eq_ignore_ascii_case(".%2e")
            || s.eq_ignore_ascii_case("%2e.")
    });
    if dot_segment {
        return Err(GatewayError::new(
            ErrorCode::BadRequest,
            "the path has dot segments",
        ));
    }
    Ok(())
}

/// The first route of the live table that matches.
fn match_route<B>(sh: &Shared, req: &Request<B>) -> Result<Arc<Route>, GatewayError> {
    let host = headers::request_host(req);
    let table = sh.table.load();
    let input = MatchInput {
        method: req.method(),
        host: host.as_deref(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
    };
    match table.routes.iter().find(|r| r.plan.matcher.matches(&input)) {
        Some(r) => Ok(r.clone()),
        None => {
            sh.stats.no_route_total.fetch_add(1, Ordering::Relaxed);
            Err(GatewayError::new(
                ErrorCode::NoRoute,
                "no route matches the request",
            ))
        }
    }
}

/// The client's address: the first `X-Forwarded-For` entry when the
/// gateway is configured to trust it, else the connection's peer.
fn client_ip<B>(cfg: &GatewayConfig, req: &Request<B>, peer: IpAddr) -> IpAddr {
    if !cfg.trust_forwarded_headers {
        return peer;
    }
    req.headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(peer)
}

/// The route's IP lists, rate limits and authentication, in that order.
fn admit<B>(
    sh: &Shared,
    route: &Route,
    ip: IpAddr,
    req: &mut Request<B>,
) -> Result<(), GatewayError> {
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
    Ok(())
}

/// A route's direct answer.
fn respond(r: &RespondPlan) -> Response<Body> {
    let mut resp = Response::new(body::full(r.body.clone()));
    *resp.status_mut() = r.status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, r.content_type.clone());
    resp
}

/// A route's redirect: a location template with the path's captures, or
/// the same path on another scheme or host.
fn redirect<B>(
    route: &Route,
    rd: &RedirectPlan,
    req: &Request<B>,
    tls: bool,
) -> Result<Response<Body>, GatewayError> {
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
            let scheme = rd
                .scheme
                .as_deref()
                .unwrap_or(if tls { "https" } else { "http" });
            let h = rd
                .host
                .clone()
                .or_else(|| headers::request_authority(req))
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
    Ok(resp)
}

/// Counts a request as active on its route while it lives.
struct ActiveGuard(Arc<Route>);
impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h1::head::is_host_port;

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

    #[test]
    fn paths_must_be_origin_form_without_dot_segments() {
        for ok in ["/", "/a/b", "/a.b/c..d", "/%2ex"] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "*",
            "a/b",
            "/a/../b",
            "/./a",
            "/a/%2E%2e/b",
            "/a/.%2e",
            "/%2e./x",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }

    /// Routing on a head parsed in place agrees with routing on the header
    /// map hyper builds from the same bytes (httparse's lines, `Uri` from
    /// the target) once its authority is settled: random requests against
    /// matchers of every kind, the host, path and query compared, then
    /// every matcher's verdict and reason.
    #[test]
    #[allow(clippy::unwrap_used, clippy::expect_used)]
    fn raw_heads_route_as_header_maps_do() {
        use crate::h1::head::{Limits, RequestView, parse_request};
        use crate::route::compile::{Matcher, compile_matcher};
        use http::header::HeaderName;
        let matchers: Vec<Matcher> = [
            r#"{"hosts": ["example.com"]}"#,
            r#"{"hosts": ["*.example.com"]}"#,
            r#"{"hosts": ["::1"]}"#,
            r#"{"hosts": ["[::1]"]}"#,
            r#"{"path": {"exact": "/api"}}"#,
            r#"{"path": {"prefix": "/api"}}"#,
            r#"{"path": {"prefix": "/api/"}}"#,
            r#"{"path": {"regex": "/api/(\\w+)"}}"#,
            r#"{"methods": ["GET", "PURGE"]}"#,
            r#"{"headers": [{"name": "x-env", "exact": "prod"}]}"#,
            r#"{"headers": [{"name": "X-Env", "regex": "pr.*"}]}"#,
            r#"{"headers": [{"name": "x-env", "present": true}]}"#,
            r#"{"headers": [{"name": "x-env", "present": false}]}"#,
            r#"{"query": [{"name": "k", "exact": "v w"}]}"#,
            r#"{"query": [{"name": "a", "present": true}]}"#,
            r#"{"headers": [{"name": "host", "regex": ".*xample.*"}]}"#,
            r#"{"headers": [{"name": "Host", "exact": "other"}]}"#,
        ]
        .iter()
        .map(|j| compile_matcher("t", &serde_json::from_str(j).unwrap()).unwrap())
        .collect();
        let methods = ["GET", "POST", "PURGE", "get", "OPTIONS"];
        let targets: [&[u8]; 24] = [
            b"/",
            b"/api",
            b"/api/",
            b"/apix",
            b"/api/v1?k=v+w",
            b"/api/x?k=v%20w&a",
            b"/p?",
            b"/p?a=1&a=2",
            b"/%41pi",
            b"/a|b{c}",
            b"http://Example.COM:8080/api?k=v%20w",
            b"https://a.example.com",
            b"http://[::1]:9/api/",
            b"HTTP://x.example.com?a",
            b"/caf\xc3\xa9",
            b"/api/x?k=caf\xc3\xa9",
            b"/caf\xe9",
            b"/a<b",
            b"/a`b",
            b"/a\"b",
            b"/p?a`b",
            b"/p?a\"b",
            b"/p?a<b",
            b"http://a.example.com/caf\xc3\xa9?x=\xff",
        ];
        let hosts = [
            "example.com",
            "Example.COM:8080",
            "api.example.com",
            "x.y.Example.com:1",
            "[::1]:80",
            "[::1]",
            "other",
        ];
        let extras: [&[u8]; 9] = [
            b"X-Env: prod",
            b"x-env: PROD",
            b"X-ENV: pr",
            b"X-Env:",
            b"X-Env: \tprod",
            b"X-Env: caf\xc3\xa9",
            b"X-Env: a\x7fb",
            b"Cookie: a=b",
            b"X-Other: 1",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let (mut compared, mut refused, rounds) = (0, 0, 3000);
        for _ in 0..rounds {
            let mut raw = methods[next(methods.len())].as_bytes().to_vec();
            raw.push(b' ');
            raw.extend_from_slice(targets[next(targets.len())]);
            raw.extend_from_slice(b" HTTP/1.1\r\nHost: ");
            raw.extend_from_slice(hosts[next(hosts.len())].as_bytes());
            raw.extend_from_slice(b"\r\n");
            for _ in 0..next(4) {
                raw.extend_from_slice(extras[next(extras.len())]);
                raw.extend_from_slice(b"\r\n");
            }
            raw.extend_from_slice(b"\r\n");
            let Ok(Some(head)) = parse_request(&raw, Limits::default()) else {
                continue;
            };
            // As hyper builds its request from httparse's parse.
            let mut slots = [httparse::EMPTY_HEADER; 16];
            let mut parsed = httparse::Request::new(&mut slots);
            assert!(parsed.parse(&raw).unwrap().is_complete());
            let view = RequestView::new(&raw, &head);
            let shown = String::from_utf8_lossy(&raw).into_owned();
            let Ok(uri) = http::Uri::from_maybe_shared(bytes::Bytes::copy_from_slice(
                parsed.path.unwrap().as_bytes(),
            )) else {
                // hyper answers 400; the view refuses it too.
                assert_eq!(view.path_and_query(), None, "{shown}");
                refused += 1;
                continue;
            };
            let mut req = http::Request::builder()
                .method(Method::from_bytes(parsed.method.unwrap().as_bytes()).unwrap())
                .uri(uri)
                .body(())
                .unwrap();
            for h in parsed.headers.iter() {
                req.headers_mut().append(
                    HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                    http::HeaderValue::from_bytes(h.value).unwrap(),
                );
            }
            // What the pipeline does before routing.
            settle_authority(&mut req).expect(&shown);
            let (host, raw_host) = (crate::headers::request_host(&req), view.host());
            assert_eq!(host, raw_host, "{shown}");
            let (path, query) = view.path_and_query().expect(&shown);
            assert_eq!(
                (req.uri().path(), req.uri().query()),
                (path, query),
                "{shown}"
            );
            let method = Method::from_bytes(view.method()).unwrap();
            let a = MatchInput {
                method: req.method(),
                host: host.as_deref(),
                path: req.uri().path(),
                query: req.uri().query(),
                headers: req.headers(),
            };
            let b = MatchInput {
                method: &method,
                host: raw_host.as_deref(),
                path,
                query,
                headers: &view,
            };
            for m in &matchers {
                assert_eq!(m.check(&a), m.check(&b), "{shown}");
            }
            compared += 1;
        }
        assert!(
            compared > rounds / 2,
            "only {compared} of {rounds} compared"
        );
        assert!(refused > 0, "no target hyper refuses was tried");
    }
}
