//! Compiling a [`RouteSet`] into matchable plans (pure: no runtime state),
//! matching requests, and explaining matches.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use meshwork_resilience::breaker::BreakerConfig;
use meshwork_resilience::classify::StatusSet;
use meshwork_resilience::limit::concurrency::BulkheadConfig;
use meshwork_resilience::outlier::OutlierConfig;
use meshwork_resilience::retry::RetryConfig;
use regex::Regex;
use serde::Serialize;

use super::model::*;
use crate::auth::{Auth, IpAcl};
use crate::resolver::InstanceFilter;

/// Most routes in one set.
pub(crate) const MAX_ROUTES: usize = 10_000;
/// Longest regex accepted, bytes.
const MAX_REGEX_LEN: usize = 4096;
/// Compiled regex size limit, bytes.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

fn invalid(route: &str, field: impl Into<String>, message: impl Into<String>) -> RouteError {
    RouteError::Invalid {
        route: route.to_owned(),
        field: field.into(),
        message: message.into(),
    }
}

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

#[derive(Debug, Clone)]
pub(crate) enum HostMatch {
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

impl HostMatch {
    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => h == host,
            HostMatch::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
        }
    }
    fn describe(&self) -> String {
        match self {
            HostMatch::Exact(h) => h.clone(),
            HostMatch::Suffix(s) => format!("*{s}"),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) enum PathCond {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl PathCond {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathCond::Exact(p) => p == path,
            PathCond::Prefix(p) => {
                path.starts_with(p.as_str())
                    && (p.ends_with('/')
                        || path.len() == p.len()
                        || path.as_bytes()[p.len()] == b'/')
            }
            PathCond::Regex(r) => r.is_match(path),
        }
    }
    fn describe(&self) -> String {
        match self {
            PathCond::Exact(p) => format!("path = {p}"),
            PathCond::Prefix(p) => format!("path prefix {p}"),
            PathCond::Regex(r) => format!("path regex {}", r.as_str()),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) enum ValueCond {
    Exact(String),
    Regex(Regex),
    Present(bool),
}

impl ValueCond {
    fn matches(&self, v: Option<&str>) -> bool {
        match (self, v) {
            (ValueCond::Present(p), v) => *p == v.is_some(),
            (ValueCond::Exact(e), Some(v)) => e == v,
            (ValueCond::Regex(r), Some(v)) => r.is_match(v),
            (_, None) => false,
        }
    }
    fn describe(&self) -> String {
        match self {
            ValueCond::Exact(e) => format!("= {e:?}"),
            ValueCond::Regex(r) => format!("~ {}", r.as_str()),
            ValueCond::Present(true) => "present".into(),
            ValueCond::Present(false) => "absent".into(),
        }
    }
}

/// What a request looks like to the matcher.
#[derive(Debug)]
pub(crate) struct MatchInput<'a> {
    pub(crate) method: &'a Method,
    pub(crate) host: Option<&'a str>,
    pub(crate) path: &'a str,
    pub(crate) query: Option<&'a str>,
    pub(crate) headers: &'a HeaderMap,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Matcher {
    hosts: Vec<HostMatch>,
    path: Option<PathCond>,
    methods: Vec<Method>,
    headers: Vec<(HeaderName, ValueCond)>,
    query: Vec<(String, ValueCond)>,
}

/// The first value of query parameter `name` (names and values decoded as
/// `application/x-www-form-urlencoded`: `%XX` and `+`).
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

impl Matcher {
    /// `None` if it matches, else why not.
    pub(crate) fn check(&self, input: &MatchInput<'_>) -> Option<String> {
        if !self.hosts.is_empty() {
            let ok = input
                .host
                .is_some_and(|h| self.hosts.iter().any(|m| m.matches(h)));
            if !ok {
                let wanted: Vec<String> = self.hosts.iter().map(HostMatch::describe).collect();
                return Some(format!(
                    "host {:?} is not one of [{}]",
                    input.host.unwrap_or(""),
                    wanted.join(", ")
                ));
            }
        }
        if let Some(p) = &self.path
            && !p.matches(input.path)
        {
            return Some(format!(
                "path {:?} does not match {}",
                input.path,
                p.describe()
            ));
        }
        if !self.methods.is_empty() && !self.methods.contains(input.method) {
            let wanted: Vec<&str> = self.methods.iter().map(Method::as_str).collect();
            return Some(format!(
                "method {} is not one of [{}]",
                input.method,
                wanted.join(", ")
            ));
        }
        for (name, cond) in &self.headers {
            let v = input.headers.get(name).and_then(|v| v.to_str().ok());
            if !cond.matches(v) {
                return Some(format!("header {name} {} (got {:?})", cond.describe(), v));
            }
        }
        for (name, cond) in &self.query {
            let v = query_param(input.query, name);
            if !cond.matches(v.as_deref()) {
                return Some(format!("query {name} {} (got {:?})", cond.describe(), v));
            }
        }
        None
    }

    /// Whether it matches.
    #[inline]
    pub(crate) fn matches(&self, input: &MatchInput<'_>) -> bool {
        self.check(input).is_none()
    }

    pub(crate) fn path_regex(&self) -> Option<&Regex> {
        match &self.path {
            Some(PathCond::Regex(r)) => Some(r),
            _ => None,
        }
    }
}

/// Where a target's endpoints come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    Service {
        name: String,
        filter: InstanceFilter,
    },
    Static(Vec<SocketAddr>),
}

impl Source {
    pub(crate) fn describe(&self) -> String {
        match self {
            Source::Service { name, .. } => format!("service:{name}"),
            Source::Static(addrs) => {
                let v: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                format!("static:{}", v.join(","))
            }
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct TargetPlan {
    pub(crate) name: String,
    pub(crate) source: Source,
    pub(crate) weight: u32,
}

#[derive(Debug, Clone)]
pub(crate) enum SplitCond {
    Header(HeaderName, Option<String>),
    Cookie(String, Option<String>),
}

#[derive(Debug, Clone)]
pub(crate) enum Rewrite {
    Template(String),
    Regex(Regex, String),
}

#[derive(Debug, Clone)]
pub(crate) struct ForwardPlan {
    pub(crate) targets: Vec<TargetPlan>,
    pub(crate) split: Vec<(SplitCond, usize)>,
    pub(crate) total_weight: u64,
    pub(crate) protocol: UpstreamProtocol,
    pub(crate) strip_prefix: Option<String>,
    pub(crate) rewrite: Option<Rewrite>,
    pub(crate) preserve_host: bool,
    pub(crate) lb: LbConfig,
    pub(crate) timeout: Option<Duration>,
    pub(crate) per_try_timeout: Option<Duration>,
    pub(crate) retry: Option<RetryConfig>,
    pub(crate) failover: bool,
    pub(crate) failure_statuses: StatusSet,
    pub(crate) retry_all_methods: bool,
    pub(crate) retry_buffer_bytes: Option<u64>,
    pub(crate) breaker: Option<BreakerConfig>,
    pub(crate) bulkhead: Option<BulkheadConfig>,
    pub(crate) outlier: Option<OutlierConfig>,
    pub(crate) mirror: Option<(TargetPlan, f64)>,
}

#[derive(Debug, Clone)]
pub(crate) struct RedirectPlan {
    pub(crate) status: StatusCode,
    pub(crate) location: Option<String>,
    pub(crate) scheme: Option<String>,
    pub(crate) host: Option<String>,
    pub(crate) keep_query: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct RespondPlan {
    pub(crate) status: StatusCode,
    pub(crate) body: bytes::Bytes,
    pub(crate) content_type: HeaderValue,
}

#[derive(Debug, Clone)]
pub(crate) enum ActionPlan {
    Forward(Box<ForwardPlan>),
    Redirect(RedirectPlan),
    Respond(RespondPlan),
}

#[derive(Debug, Clone, Default)]
pub(crate) struct CompiledOps {
    pub(crate) set: Vec<(HeaderName, HeaderValue)>,
    pub(crate) add: Vec<(HeaderName, HeaderValue)>,
    pub(crate) remove: Vec<HeaderName>,
}

impl CompiledOps {
    pub(crate) fn apply(&self, h: &mut HeaderMap) {
        for n in &self.remove {
            h.remove(n);
        }
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            h.append(n.clone(), v.clone());
        }
    }
}

/// A compiled route without runtime state.
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

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn compile_ops(route: &str, field: &str, ops: &HeaderOps) -> Result<CompiledOps, RouteError> {
    let name = |n: &str, f: String| {
        HeaderName::from_bytes(n.as_bytes())
            .map_err(|_| invalid(route, f, format!("`{n}` is not a valid header name")))
    };
    let value = |v: &str, f: String| {
        HeaderValue::from_str(v)
            .map_err(|_| invalid(route, f, format!("{v:?} is not a valid header value")))
    };
    let pair =
        |(n, v): (&String, &String), kind: &str| -> Result<(HeaderName, HeaderValue), RouteError> {
            let f = format!("{field}.{kind}.{n}");
            let hn = name(n, f.clone())?;
            if is_protected(&hn) {
                return Err(invalid(
                    route,
                    f,
                    "hop-by-hop and framing headers cannot be set",
                ));
            }
            Ok((hn, value(v, f)?))
        };
    Ok(CompiledOps {
        set: ops
            .set
            .iter()
            .map(|p| pair(p, "set"))
            .collect::<Result<_, _>>()?,
        add: ops
            .add
            .iter()
            .map(|p| pair(p, "add"))
            .collect::<Result<_, _>>()?,
        remove: ops
            .remove
            .iter()
            .enumerate()
            .map(|(i, n)| name(n, format!("{field}.remove[{i}]")))
            .collect::<Result<_, _>>()?,
    })
}

fn is_protected(h: &HeaderName) -> bool {
    matches!(
        h.as_str(),
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "content-length"
            | "te"
            | "trailer"
            | "upgrade"
            | "host"
    )
}

fn value_cond(route: &str, field: &str, m: &ValueMatch) -> Result<ValueCond, RouteError> {
    let set = [m.exact.is_some(), m.regex.is_some(), m.present.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    match (set, &m.exact, &m.regex, m.present) {
        (1, Some(e), _, _) => Ok(ValueCond::Exact(e.clone())),
        (1, _, Some(r), _) => Ok(ValueCond::Regex(compile_regex(
            route,
            &format!("{field}.regex"),
            r,
            true,
        )?)),
        (1, _, _, Some(p)) => Ok(ValueCond::Present(p)),
        (0, ..) => Ok(ValueCond::Present(true)),
        _ => Err(invalid(
            route,
            field,
            "set only one of exact, regex, present",
        )),
    }
}

fn parse_upstreams(
    route: &str,
    field: &str,
    ups: &[String],
) -> Result<Vec<SocketAddr>, RouteError> {
    let mut out = Vec::new();
    for (i, u) in ups.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if let Ok(a) = u.parse::<SocketAddr>() {
            out.push(a);
            continue;
        }
        if !u.contains(':') || u.contains('/') {
            return Err(invalid(route, f, format!("`{u}` is not host:port")));
        }
        let addrs: Vec<SocketAddr> = u
            .to_socket_addrs()
            .map_err(|e| invalid(route, f.clone(), format!("cannot resolve `{u}`: {e}")))?
            .collect();
        match addrs.first() {
            Some(a) => out.push(*a),
            None => return Err(invalid(route, f, format!("`{u}` resolves to nothing"))),
        }
    }
    Ok(out)
}

fn source(
    route: &str,
    field: &str,
    service: &Option<String>,
    upstreams: &[String],
    filter: &InstanceFilter,
) -> Result<Source, RouteError> {
    match (service, upstreams.is_empty()) {
        (Some(s), true) => {
            if !valid_name(s) {
                return Err(invalid(
                    route,
                    format!("{field}.service"),
                    format!("`{s}` is not a valid service name"),
                ));
            }
            Ok(Source::Service {
                name: s.clone(),
                filter: filter.clone(),
            })
        }
        (None, false) => {
            if filter != &InstanceFilter::default() {
                return Err(invalid(
                    route,
                    format!("{field}.filter"),
                    "a filter needs a service",
                ));
            }
            Ok(Source::Static(parse_upstreams(
                route,
                &format!("{field}.upstreams"),
                upstreams,
            )?))
        }
        (Some(_), false) => Err(invalid(route, field, "set service or upstreams, not both")),
        (None, true) => Err(invalid(route, field, "set service or upstreams")),
    }
}

fn ms(route: &str, field: &str, v: Option<u64>) -> Result<Option<Duration>, RouteError> {
    match v {
        Some(0) => Err(invalid(route, field, "must be at least 1 ms")),
        Some(v) if v > 86_400_000 => Err(invalid(route, field, "must be at most one day")),
        Some(v) => Ok(Some(Duration::from_millis(v))),
        None => Ok(None),
    }
}

fn compile_forward(route: &str, f: &ForwardConfig) -> Result<ForwardPlan, RouteError> {
    let targets: Vec<TargetPlan> = if f.targets.is_empty() {
        vec![TargetPlan {
            name: "default".into(),
            source: source(route, "forward", &f.service, &f.upstreams, &f.filter)?,
            weight: 1,
        }]
    } else {
        if f.service.is_some() || !f.upstreams.is_empty() {
            return Err(invalid(
                route,
                "forward.targets",
                "use targets or service/upstreams, not both",
            ));
        }
        let mut out = Vec::new();
        for (i, t) in f.targets.iter().enumerate() {
            let field = format!("forward.targets[{i}]");
            if !valid_name(&t.name) {
                return Err(invalid(
                    route,
                    format!("{field}.name"),
                    "a target needs a name (letters, digits, -_.)",
                ));
            }
            if out.iter().any(|o: &TargetPlan| o.name == t.name) {
                return Err(invalid(
                    route,
                    format!("{field}.name"),
                    format!("duplicate target `{}`", t.name),
                ));
            }
            let weight = t.weight.unwrap_or(1);
            if weight > 1_000_000 {
                return Err(invalid(route, format!("{field}.weight"), "at most 1000000"));
            }
            out.push(TargetPlan {
                name: t.name.clone(),
                source: source(route, &field, &t.service, &t.upstreams, &t.filter)?,
                weight,
            });
        }
        out
    };
    let total_weight: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
    if total_weight == 0 && f.split.is_empty() {
        return Err(invalid(
            route,
            "forward.targets",
            "all weights are 0 and no split rule",
        ));
    }
    let mut split = Vec::new();
    for (i, r) in f.split.iter().enumerate() {
        let field = format!("forward.split[{i}]");
        let cond = match (&r.header, &r.cookie) {
            (Some(h), None) => SplitCond::Header(
                HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                    invalid(route, format!("{field}.header"), "not a valid header name")
                })?,
                r.value.clone(),
            ),
            (None, Some(c)) if !c.is_empty() => SplitCond::Cookie(c.clone(), r.value.clone()),
            _ => return Err(invalid(route, field, "set exactly one of header, cookie")),
        };
        let idx = targets
            .iter()
            .position(|t| t.name == r.target)
            .ok_or_else(|| {
                invalid(
                    route,
                    format!("{field}.target"),
                    format!("no target named `{}`", r.target),
                )
            })?;
        split.push((cond, idx));
    }
    if let Some(p) = &f.strip_prefix
        && (!p.starts_with('/') || p.len() < 2)
    {
        return Err(invalid(
            route,
            "forward.strip_prefix",
            "must start with / and not be just /",
        ));
    }
    let rewrite = match &f.rewrite {
        None => None,
        Some(RewriteConfig {
            path: Some(p),
            regex: None,
            replace: None,
        }) => {
            if !p.starts_with('/') {
                return Err(invalid(route, "forward.rewrite.path", "must start with /"));
            }
            Some(Rewrite::Template(p.clone()))
        }
        Some(RewriteConfig {
            path: None,
            regex: Some(r),
            replace: Some(rep),
        }) => Some(Rewrite::Regex(
            compile_regex(route, "forward.rewrite.regex", r, false)?,
            rep.clone(),
        )),
        Some(_) => {
            return Err(invalid(
                route,
                "forward.rewrite",
                "set path, or regex and replace",
            ));
        }
    };
    let lb = f.lb.clone();
    match (&lb.policy, &lb.hash_on) {
        (LbPolicy::RingHash | LbPolicy::Maglev, None) => {
            return Err(invalid(
                route,
                "forward.lb.hash_on",
                "ring_hash and maglev need hash_on",
            ));
        }
        (LbPolicy::P2c | LbPolicy::Wrr | LbPolicy::Random, Some(_)) => {
            return Err(invalid(
                route,
                "forward.lb.hash_on",
                "only for ring_hash and maglev",
            ));
        }
        (_, Some(HashOn::Header(h))) if HeaderName::from_bytes(h.as_bytes()).is_err() => {
            return Err(invalid(
                route,
                "forward.lb.hash_on.header",
                "not a valid header name",
            ));
        }
        _ => {}
    }
    let timeout = ms(route, "forward.timeout_ms", f.timeout_ms)?;
    let per_try_timeout = ms(route, "forward.per_try_timeout_ms", f.per_try_timeout_ms)?;
    let cfg_err = |field: &str, e: meshwork_resilience::ConfigError| {
        invalid(route, format!("forward.{field}"), e.to_string())
    };
    if let Some(r) = &f.retry {
        r.validate().map_err(|e| cfg_err("retry", e))?;
    }
    let failure_statuses = match &f.failure_statuses {
        None => StatusSet::UPSTREAM_FAILURES,
        Some(codes) => StatusSet::from_codes(codes.iter().copied()).map_err(|c| {
            invalid(
                route,
                "forward.failure_statuses",
                format!("{c} is not an HTTP status (100..=599)"),
            )
        })?,
    };
    if let Some(b) = &f.breaker {
        b.validate().map_err(|e| cfg_err("breaker", e))?;
    }
    if let Some(b) = &f.bulkhead {
        b.validate().map_err(|e| cfg_err("bulkhead", e))?;
    }
    if let Some(o) = &f.outlier {
        o.validate().map_err(|e| cfg_err("outlier", e))?;
    }
    let outlier = match (f.outlier_detection, f.outlier) {
        (Some(false), Some(_)) => {
            return Err(invalid(
                route,
                "forward.outlier",
                "outlier settings with outlier_detection = false",
            ));
        }
        (Some(false), None) => None,
        (_, o) => Some(o.unwrap_or_default()),
    };
    let mirror = match &f.mirror {
        None => None,
        Some(m) => {
            let pct = m.percent.unwrap_or(100.0);
            if !(0.0..=100.0).contains(&pct) || !pct.is_finite() {
                return Err(invalid(
                    route,
                    "forward.mirror.percent",
                    "must be within 0..=100",
                ));
            }
            let src = source(route, "forward.mirror", &m.service, &m.upstreams, &m.filter)?;
            Some((
                TargetPlan {
                    name: "mirror".into(),
                    source: src,
                    weight: 1,
                },
                pct,
            ))
        }
    };
    Ok(ForwardPlan {
        targets,
        split,
        total_weight,
        protocol: f.protocol,
        strip_prefix: f.strip_prefix.clone(),
        rewrite,
        preserve_host: f.preserve_host.unwrap_or(true),
        lb,
        timeout,
        per_try_timeout,
        retry: f.retry,
        failover: f.failover.unwrap_or(true),
        failure_statuses,
        retry_all_methods: f.retry_all_methods,
        retry_buffer_bytes: f.retry_buffer_bytes,
        breaker: f.breaker.clone(),
        bulkhead: f.bulkhead,
        outlier,
        mirror,
    })
}

fn compile_route(r: &RouteConfig) -> Result<RoutePlan, RouteError> {
    let route = r.name.as_str();
    let m = &r.matches;
    let mut hosts = Vec::new();
    for (i, h) in m.hosts.iter().enumerate() {
        let h = h.trim().to_ascii_lowercase();
        let field = format!("match.hosts[{i}]");
        let bad = |msg: &str| invalid(route, field.clone(), format!("`{h}`: {msg}"));
        if let Some(rest) = h.strip_prefix("*.") {
            if rest.is_empty() || rest.contains('*') {
                return Err(bad("a wildcard is `*.domain`"));
            }
            hosts.push(HostMatch::Suffix(format!(".{rest}")));
        } else if h.is_empty() || h.contains(['*', '/', ' ']) {
            return Err(bad("not a host name"));
        } else {
            hosts.push(HostMatch::Exact(h));
        }
    }
    let path = match &m.path {
        None => None,
        Some(p) => match (&p.exact, &p.prefix, &p.regex) {
            (Some(e), None, None) if e.starts_with('/') => Some(PathCond::Exact(e.clone())),
            (None, Some(pf), None) if pf.starts_with('/') => Some(PathCond::Prefix(pf.clone())),
            (None, None, Some(re)) => Some(PathCond::Regex(compile_regex(
                route,
                "match.path.regex",
                re,
                true,
            )?)),
            (Some(_), None, None) | (None, Some(_), None) => {
                return Err(invalid(route, "match.path", "paths start with /"));
            }
            _ => {
                return Err(invalid(
                    route,
                    "match.path",
                    "set exactly one of exact, prefix, regex",
                ));
            }
        },
    };
    let methods = m
        .methods
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(invalid(
                    route,
                    format!("match.methods[{i}]"),
                    format!("`{s}` is not an upper-case method"),
                ));
            }
            Method::from_bytes(s.as_bytes()).map_err(|_| {
                invalid(
                    route,
                    format!("match.methods[{i}]"),
                    format!("`{s}` is not a method"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let headers = m
        .headers
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let field = format!("match.headers[{i}]");
            let name = HeaderName::from_bytes(v.name.as_bytes()).map_err(|_| {
                invalid(
                    route,
                    format!("{field}.name"),
                    format!("`{}` is not a header name", v.name),
                )
            })?;
            Ok((name, value_cond(route, &field, v)?))
        })
        .collect::<Result<Vec<_>, RouteError>>()?;
    let query = m
        .query
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let field = format!("match.query[{i}]");
            if v.name.is_empty() {
                return Err(invalid(route, format!("{field}.name"), "must not be empty"));
            }
            Ok((v.name.clone(), value_cond(route, &field, v)?))
        })
        .collect::<Result<Vec<_>, RouteError>>()?;
    let matcher = Matcher {
        hosts,
        path,
        methods,
        headers,
        query,
    };
    let actions = [
        r.forward.is_some(),
        r.redirect.is_some(),
        r.respond.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if actions != 1 {
        return Err(invalid(
            route,
            "forward|redirect|respond",
            "set exactly one action",
        ));
    }
    let (action, summary) = if let Some(f) = &r.forward {
        let plan = compile_forward(route, f)?;
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
        (
            ActionPlan::Forward(Box::new(plan)),
            format!("forward to {}", ts.join(", ")),
        )
    } else if let Some(rd) = &r.redirect {
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
        (ActionPlan::Redirect(plan), format!("redirect {status}"))
    } else if let Some(rs) = &r.respond {
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
        (
            ActionPlan::Respond(RespondPlan {
                status,
                body: bytes::Bytes::from(rs.body.clone()),
                content_type,
            }),
            format!("respond {}", status.as_u16()),
        )
    } else {
        return Err(invalid(
            route,
            "forward|redirect|respond",
            "set exactly one action",
        ));
    };
    let auth = r
        .auth
        .as_ref()
        .map(Auth::compile)
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
        request_ops: compile_ops(route, "request_headers", &r.request_headers)?,
        response_ops: compile_ops(route, "response_headers", &r.response_headers)?,
        auth,
        acl,
        limits: r.rate_limits.clone(),
        summary,
    })
}

/// Compiles the whole set, sorted for matching (priority desc, then order).
pub(crate) fn plan(set: &RouteSet) -> Result<Vec<RoutePlan>, RouteError> {
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
        plans.push(compile_route(r)?);
    }
    // Stable: equal priorities keep file order.
    plans.sort_by_key(|p| std::cmp::Reverse(p.priority));
    Ok(plans)
}

/// Validates a set without building anything.
pub(crate) fn validate(set: &RouteSet) -> Result<(), RouteError> {
    plan(set).map(drop)
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

/// Applies strip_prefix and rewrite to `path` (no query).
pub(crate) fn rewrite_path(plan: &ForwardPlan, matcher: &Matcher, path: &str) -> String {
    let mut p = match &plan.strip_prefix {
        Some(pre) if path.starts_with(pre.as_str()) => {
            let rest = &path[pre.len()..];
            if rest.starts_with('/') {
                rest.to_owned()
            } else {
                format!("/{rest}")
            }
        }
        _ => path.to_owned(),
    };
    match &plan.rewrite {
        None => {}
        Some(Rewrite::Template(t)) => {
            p = expand_captures(matcher, path, t);
        }
        Some(Rewrite::Regex(re, rep)) => {
            p = re.replace_all(&p, rep.as_str()).into_owned();
            if !p.starts_with('/') {
                p.insert(0, '/');
            }
        }
    }
    p
}

/// Expands `$1` / `${name}` in `template` with the captures of the route's
/// path regex on `path`.
pub(crate) fn expand_captures(matcher: &Matcher, path: &str, template: &str) -> String {
    match matcher.path_regex().and_then(|r| r.captures(path)) {
        Some(caps) => {
            let mut out = String::new();
            caps.expand(template, &mut out);
            out
        }
        None => template.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn query_decoding() {
        assert_eq!(
            query_param(Some("a=1&b=x%20y+z"), "b").as_deref(),
            Some("x y z")
        );
        assert_eq!(query_param(Some("a"), "a").as_deref(), Some(""));
        assert_eq!(query_param(Some("a=%zz%"), "a").as_deref(), Some("%zz%"));
        assert_eq!(query_param(None, "a"), None);
    }

    #[test]
    fn prefix_respects_segments() {
        let p = PathCond::Prefix("/api".into());
        assert!(p.matches("/api"));
        assert!(p.matches("/api/x"));
        assert!(!p.matches("/apix"));
        let p = PathCond::Prefix("/api/".into());
        assert!(p.matches("/api/x"));
        assert!(!p.matches("/api"));
    }
}
