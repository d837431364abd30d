//! Compiling a [`RouteSet`] into matchable plans, in two steps: a
//! [`resolve`] step that does the I/O (DNS for static upstreams, key files
//! for JWT auth) off the runtime threads, then a pure compile of the set
//! with what was resolved. Split by part of a route: [`matcher`] (the
//! `match` table), [`forward`] (targets and resilience settings), [`ops`]
//! (header edits); redirects, direct answers and the explanation of a
//! match are here.

mod forward;
mod matcher;
mod ops;
mod resolve;

use http::StatusCode;
use http::header::HeaderValue;
use regex::Regex;
use serde::Serialize;

use super::model::*;
use crate::auth::{Auth, IpAcl};

pub(crate) use forward::{ForwardPlan, Rewrite, Source, SplitCond, TargetPlan, rewrite_path};
#[cfg(test)]
pub(crate) use matcher::compile as compile_matcher;
pub(crate) use matcher::{MatchInput, Matcher, expand_captures};
pub(crate) use ops::CompiledOps;
pub(crate) use resolve::{Resolved, resolve, resolve_off_runtime};

/// Most routes in one set.
pub(crate) const MAX_ROUTES: usize = 10_000;
/// Longest regex accepted, bytes.
const MAX_REGEX_LEN: usize = 4096;
/// Compiled regex size limit, bytes.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// The error for an invalid field of a route.
fn invalid(route: &str, field: impl Into<String>, message: impl Into<String>) -> RouteError {
    RouteError::Invalid {
        route: route.to_owned(),
        field: field.into(),
        message: message.into(),
    }
}

/// Compiles a user's regex within the length and size limits (anchored
/// to the whole value when `anchored`).
fn compile_regex(route: &str, field: &str, re: &str, anchored: bool) -> Result<Regex, RouteError> {
    if re.len() > MAX_REGEX_LEN {
        return Err(invalid(
            route,
            field,
            format!("regex longer than {MAX_REGEX_LEN} bytes"),
        ));
    }
    let src = if anchored {
        format!("^(?:{re})$")
    } else {
        re.to_owned()
    };
    regex::RegexBuilder::new(&src)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| invalid(route, field, format!("invalid regex: {e}")))
}

/// A compiled redirect.
#[derive(Debug, Clone)]
pub(crate) struct RedirectPlan {
    pub(crate) status: StatusCode,
    pub(crate) location: Option<String>,
    pub(crate) scheme: Option<String>,
    pub(crate) host: Option<String>,
    pub(crate) keep_query: bool,
}

/// A compiled direct answer.
#[derive(Debug, Clone)]
pub(crate) struct RespondPlan {
    pub(crate) status: StatusCode,
    pub(crate) body: bytes::Bytes,
    pub(crate) content_type: HeaderValue,
}

/// A route's one action.
#[derive(Debug, Clone)]
pub(crate) enum ActionPlan {
    Forward(Box<ForwardPlan>),
    Redirect(RedirectPlan),
    Respond(RespondPlan),
}

#[derive(Debug, Clone)]
pub(crate) struct RoutePlan {
    pub(crate) name: String,
    pub(crate) priority: i32,
    pub(crate) matcher: Matcher,
    pub(crate) action: ActionPlan,
    pub(crate) request_ops: CompiledOps,
    pub(crate) response_ops: CompiledOps,
    pub(crate) auth: Option<Auth>,
    pub(crate) acl: Option<IpAcl>,
    pub(crate) limits: Vec<RateLimitRule>,
    pub(crate) summary: String,
}

/// Route, target and service names: 1..=128 of letters, digits, `-_.`.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Compiles one route: its match, its action, header edits, auth, IP
/// lists and rate limits.
fn compile_route(r: &RouteConfig, res: &Resolved) -> Result<RoutePlan, RouteError> {
    let route = r.name.as_str();
    let matcher = matcher::compile(route, &r.matches)?;
    let (action, summary) = action(route, r, &matcher, res)?;
    let auth = r
        .auth
        .as_ref()
        .map(|a| Auth::compile(a, res))
        .transpose()
        .map_err(|(f, m)| invalid(route, f, m))?;
    let acl =
        r.ip.as_ref()
            .map(IpAcl::compile)
            .transpose()
            .map_err(|(f, m)| invalid(route, f, m))?;
    for (i, l) in r.rate_limits.iter().enumerate() {
        crate::limits::Limiter::build(route, i, l)
            .map_err(|m| invalid(route, format!("rate_limits[{i}]"), m))?;
    }
    Ok(RoutePlan {
        name: r.name.clone(),
        priority: r.priority,
        matcher,
        action,
        request_ops: ops::compile(route, "request_headers", &r.request_headers)?,
        response_ops: ops::compile(route, "response_headers", &r.response_headers)?,
        auth,
        acl,
        limits: r.rate_limits.clone(),
        summary,
    })
}

/// The route's one action and its one-line summary.
fn action(
    route: &str,
    r: &RouteConfig,
    matcher: &Matcher,
    res: &Resolved,
) -> Result<(ActionPlan, String), RouteError> {
    match (&r.forward, &r.redirect, &r.respond) {
        (Some(f), None, None) => {
            let plan = forward::compile(route, f, res)?;
            if let Some(Rewrite::Template(t)) = &plan.rewrite
                && t.contains('$')
                && matcher.path_regex().is_none()
            {
                return Err(invalid(
                    route,
                    "forward.rewrite.path",
                    "captures need a match.path.regex",
                ));
            }
            let ts: Vec<String> = plan
                .targets
                .iter()
                .map(|t| format!("{} ({}, weight {})", t.name, t.source.describe(), t.weight))
                .collect();
            Ok((
                ActionPlan::Forward(Box::new(plan)),
                format!("forward to {}", ts.join(", ")),
            ))
        }
        (None, Some(rd), None) => redirect(route, rd),
        (None, None, Some(rs)) => respond(route, rs),
        _ => Err(invalid(
            route,
            "forward|redirect|respond",
            "set exactly one action",
        )),
    }
}

/// A redirect: a 3xx status and a location, or a scheme or host to change.
fn redirect(route: &str, rd: &RedirectConfig) -> Result<(ActionPlan, String), RouteError> {
    let status = rd.status.unwrap_or(302);
    if ![301, 302, 303, 307, 308].contains(&status) {
        return Err(invalid(
            route,
            "redirect.status",
            "one of 301, 302, 303, 307, 308",
        ));
    }
    if rd.location.is_none() && rd.scheme.is_none() && rd.host.is_none() {
        return Err(invalid(route, "redirect", "set location, scheme or host"));
    }
    if let Some(s) = &rd.scheme
        && s != "http"
        && s != "https"
    {
        return Err(invalid(route, "redirect.scheme", "http or https"));
    }
    if let Some(l) = &rd.location
        && HeaderValue::from_str(l).is_err()
    {
        return Err(invalid(
            route,
            "redirect.location",
            "not a valid header value",
        ));
    }
    let plan = RedirectPlan {
        status: StatusCode::from_u16(status)
            .map_err(|_| invalid(route, "redirect.status", "invalid"))?,
        location: rd.location.clone(),
        scheme: rd.scheme.clone(),
        host: rd.host.clone(),
        keep_query: rd.keep_query.unwrap_or(true),
    };
    Ok((ActionPlan::Redirect(plan), format!("redirect {status}")))
}

/// A direct answer: a status, a body of at most 1 MiB and its type.
fn respond(route: &str, rs: &RespondConfig) -> Result<(ActionPlan, String), RouteError> {
    let status = rs.status.unwrap_or(200);
    let status = StatusCode::from_u16(status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| invalid(route, "respond.status", "200..=599"))?;
    if rs.body.len() > 1024 * 1024 {
        return Err(invalid(route, "respond.body", "at most 1 MiB"));
    }
    let ct = rs
        .content_type
        .as_deref()
        .unwrap_or("text/plain; charset=utf-8");
    let content_type = HeaderValue::from_str(ct)
        .map_err(|_| invalid(route, "respond.content_type", "not a valid header value"))?;
    Ok((
        ActionPlan::Respond(RespondPlan {
            status,
            body: bytes::Bytes::from(rs.body.clone()),
            content_type,
        }),
        format!("respond {}", status.as_u16()),
    ))
}

/// Compiles the whole set with what [`resolve`] found, sorted for matching
/// (priority desc, then order). Pure.
pub(crate) fn plan(set: &RouteSet, res: &Resolved) -> Result<Vec<RoutePlan>, RouteError> {
    if set.routes.len() > MAX_ROUTES {
        return Err(invalid(
            "*",
            "routes",
            format!("at most {MAX_ROUTES} routes"),
        ));
    }
    let mut names = std::collections::HashSet::new();
    let mut plans = Vec::with_capacity(set.routes.len());
    for (i, r) in set.routes.iter().enumerate() {
        if !valid_name(&r.name) {
            let shown = if r.name.is_empty() {
                format!("#{i}")
            } else {
                r.name.clone()
            };
            return Err(invalid(
                &shown,
                "name",
                "1..=128 letters, digits, '-', '_', '.'",
            ));
        }
        if !names.insert(r.name.as_str()) {
            return Err(invalid(&r.name, "name", "duplicate route name"));
        }
        plans.push(compile_route(r, res)?);
    }
    // Stable: equal priorities keep file order.
    plans.sort_by_key(|p| std::cmp::Reverse(p.priority));
    Ok(plans)
}

/// Validates a set without building anything. Blocking: resolves host
/// names and reads key files.
pub(crate) fn validate(set: &RouteSet) -> Result<(), RouteError> {
    plan(set, &resolve(set)).map(drop)
}

/// How one route fared against a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteCheck {
    /// The route.
    pub route: String,
    /// Its priority.
    pub priority: i32,
    /// Whether every condition held.
    pub matched: bool,
    /// The first condition that failed, or what it does if it matched.
    pub reason: String,
}

/// Which route a request would take, and why the earlier ones did not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The route chosen, if any.
    pub matched: Option<String>,
    /// What it would do (after rewrites), if any.
    pub action: Option<String>,
    /// Routes in matching order up to and including the chosen one.
    pub checks: Vec<RouteCheck>,
}

impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in &self.checks {
            let mark = if c.matched { "MATCH" } else { "skip " };
            writeln!(
                f,
                "{mark} {} (priority {}): {}",
                c.route, c.priority, c.reason
            )?;
        }
        match (&self.matched, &self.action) {
            (Some(r), Some(a)) => write!(f, "=> route {r}: {a}"),
            (Some(r), None) => write!(f, "=> route {r}"),
            _ => write!(f, "=> no route matches (404 no_route)"),
        }
    }
}
