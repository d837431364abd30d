//! Forward actions: targets (a registry service or static upstreams),
//! traffic splits, path rewrites, load balancing, and the resilience
//! settings (timeouts, retries, breaker, bulkhead, outlier detection,
//! mirroring), checked and compiled.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use meshwork_resilience::breaker::BreakerConfig;
use meshwork_resilience::classify::StatusSet;
use meshwork_resilience::limit::concurrency::BulkheadConfig;
use meshwork_resilience::outlier::OutlierConfig;
use meshwork_resilience::retry::RetryConfig;
use regex::Regex;

use super::super::model::*;
use super::matcher::{Matcher, expand_captures};
use super::resolve::Resolved;
use super::{compile_regex, invalid, valid_name};
use crate::resolver::InstanceFilter;

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
    /// With TLS: the name its endpoints' certificates are checked against
    /// (`None`: each endpoint's IP address).
    pub(crate) tls_name: Option<String>,
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
    /// TLS to the upstreams.
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
}

/// Compiles a route's `forward` table.
pub(super) fn compile(
    route: &str,
    f: &ForwardConfig,
    res: &Resolved,
) -> Result<ForwardPlan, RouteError> {
    let targets = targets(route, f, res)?;
    let total_weight: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
    if total_weight == 0 && f.split.is_empty() {
        return Err(invalid(
            route,
            "forward.targets",
            "all weights are 0 and no split rule",
        ));
    }
    let split = split_rules(route, f, &targets)?;
    let rewrite = rewrite(route, f)?;
    check_lb(route, &f.lb)?;
    let timeout = ms(route, "forward.timeout_ms", f.timeout_ms)?;
    let per_try_timeout = ms(route, "forward.per_try_timeout_ms", f.per_try_timeout_ms)?;
    let (failure_statuses, outlier) = resilience(route, f)?;
    let tls = tls(route, f)?;
    Ok(ForwardPlan {
        targets,
        split,
        total_weight,
        protocol: f.protocol,
        strip_prefix: f.strip_prefix.clone(),
        rewrite,
        preserve_host: f.preserve_host.unwrap_or(true),
        lb: f.lb.clone(),
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
        mirror: mirror(route, f, res)?,
        tls,
    })
}

/// The TLS client of a forward with `tls`: files read and checked now, so a
/// route set naming a missing or bad file is refused when published.
fn tls(route: &str, f: &ForwardConfig) -> Result<Option<Arc<rustls::ClientConfig>>, RouteError> {
    let Some(t) = &f.tls else {
        return Ok(None);
    };
    if f.protocol == UpstreamProtocol::H2c {
        return Err(invalid(
            route,
            "forward.tls",
            "TLS upstreams speak HTTP/1.1: use protocol auto or http1",
        ));
    }
    if let Some(n) = &t.server_name
        && rustls_pki_types::ServerName::try_from(n.as_str()).is_err()
    {
        return Err(invalid(
            route,
            "forward.tls.server_name",
            format!("`{n}` is neither a DNS name nor an IP address"),
        ));
    }
    if t.identity {
        if t.ca_file.is_some() || t.cert_file.is_some() || t.key_file.is_some() {
            return Err(invalid(
                route,
                "forward.tls.identity",
                "the service identity brings its own authority and certificate: drop ca_file, cert_file and key_file",
            ));
        }
        let Some(id) = crate::identity::get() else {
            return Err(invalid(
                route,
                "forward.tls.identity",
                "this node issues no service certificates: start it with --identity-ca DIR (or `meshwork up --tls`)",
            ));
        };
        return id
            .client_config(&[b"http/1.1"])
            .map(Some)
            .map_err(|e| invalid(route, "forward.tls.identity", e.to_string()));
    }
    let cfg = meshwork_tls::ClientTlsConfig {
        ca_file: t.ca_file.clone(),
        cert_file: t.cert_file.clone(),
        key_file: t.key_file.clone(),
    };
    meshwork_tls::client_config(&cfg, &[b"http/1.1"])
        .map(Some)
        .map_err(|e| invalid(route, "forward.tls", e.to_string()))
}

/// The name a target's endpoints are verified against: the configured
/// `server_name`, else the service's name, else the static upstreams' one
/// host name; `None` (each endpoint's IP) when they are IPs or differ.
fn tls_name(
    tls: Option<&UpstreamTlsConfig>,
    service: &Option<String>,
    upstreams: &[String],
) -> Option<String> {
    let t = tls?;
    if let Some(n) = &t.server_name {
        return Some(n.clone());
    }
    if let Some(s) = service {
        return Some(s.clone());
    }
    let host = |u: &str| -> String {
        let u = u.split_once("://").map_or(u, |(_, rest)| rest);
        u.rsplit_once(':').map_or(u, |(h, _)| h).to_string()
    };
    let first = host(upstreams.first()?);
    (upstreams.iter().all(|u| host(u) == first)
        && first.parse::<std::net::IpAddr>().is_err()
        && !first.starts_with('['))
    .then_some(first)
}

/// The targets: one named `default` from `service`/`upstreams`, or the
/// `targets` list (unique names, weights up to 1,000,000).
fn targets(route: &str, f: &ForwardConfig, res: &Resolved) -> Result<Vec<TargetPlan>, RouteError> {
    if f.targets.is_empty() {
        return Ok(vec![TargetPlan {
            name: "default".into(),
            source: source(route, "forward", &f.service, &f.upstreams, &f.filter, res)?,
            weight: 1,
            tls_name: tls_name(f.tls.as_ref(), &f.service, &f.upstreams),
        }]);
    }
    if f.service.is_some() || !f.upstreams.is_empty() {
        return Err(invalid(
            route,
            "forward.targets",
            "use targets or service/upstreams, not both",
        ));
    }
    let mut out = Vec::with_capacity(f.targets.len());
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
            source: source(route, &field, &t.service, &t.upstreams, &t.filter, res)?,
            weight,
            tls_name: tls_name(f.tls.as_ref(), &t.service, &t.upstreams),
        });
    }
    Ok(out)
}

/// Where a target's endpoints come from: a registry service (with an
/// instance filter) or static upstreams, not both.
fn source(
    route: &str,
    field: &str,
    service: &Option<String>,
    upstreams: &[String],
    filter: &InstanceFilter,
    res: &Resolved,
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
            Ok(Source::Static(static_upstreams(
                route,
                &format!("{field}.upstreams"),
                upstreams,
                res,
            )?))
        }
        (Some(_), false) => Err(invalid(route, field, "set service or upstreams, not both")),
        (None, true) => Err(invalid(route, field, "set service or upstreams")),
    }
}

/// Static upstreams: socket addresses, or `host:port` resolved beforehand.
fn static_upstreams(
    route: &str,
    field: &str,
    ups: &[String],
    res: &Resolved,
) -> Result<Vec<SocketAddr>, RouteError> {
    let mut out = Vec::with_capacity(ups.len());
    for (i, u) in ups.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if let Ok(a) = u.parse::<SocketAddr>() {
            out.push(a);
            continue;
        }
        if !u.contains(':') || u.contains('/') {
            return Err(invalid(route, f, format!("`{u}` is not host:port")));
        }
        out.push(res.addr(u).map_err(|m| invalid(route, f, m))?);
    }
    Ok(out)
}

/// Split rules: a header or a cookie sends the request to a named target.
fn split_rules(
    route: &str,
    f: &ForwardConfig,
    targets: &[TargetPlan],
) -> Result<Vec<(SplitCond, usize)>, RouteError> {
    let mut split = Vec::with_capacity(f.split.len());
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
    Ok(split)
}

/// `strip_prefix` and `rewrite` (a path template, or a regex and its
/// replacement).
fn rewrite(route: &str, f: &ForwardConfig) -> Result<Option<Rewrite>, RouteError> {
    if let Some(p) = &f.strip_prefix
        && (!p.starts_with('/') || p.len() < 2)
    {
        return Err(invalid(
            route,
            "forward.strip_prefix",
            "must start with / and not be just /",
        ));
    }
    match &f.rewrite {
        None => Ok(None),
        Some(RewriteConfig {
            path: Some(p),
            regex: None,
            replace: None,
        }) => {
            if !p.starts_with('/') {
                return Err(invalid(route, "forward.rewrite.path", "must start with /"));
            }
            Ok(Some(Rewrite::Template(p.clone())))
        }
        Some(RewriteConfig {
            path: None,
            regex: Some(r),
            replace: Some(rep),
        }) => Ok(Some(Rewrite::Regex(
            compile_regex(route, "forward.rewrite.regex", r, false)?,
            rep.clone(),
        ))),
        Some(_) => Err(invalid(
            route,
            "forward.rewrite",
            "set path, or regex and replace",
        )),
    }
}

/// Hash-based policies need `hash_on`; the others refuse it.
fn check_lb(route: &str, lb: &LbConfig) -> Result<(), RouteError> {
    match (&lb.policy, &lb.hash_on) {
        (LbPolicy::RingHash | LbPolicy::Maglev, None) => Err(invalid(
            route,
            "forward.lb.hash_on",
            "ring_hash and maglev need hash_on",
        )),
        (LbPolicy::P2c | LbPolicy::Wrr | LbPolicy::Random, Some(_)) => Err(invalid(
            route,
            "forward.lb.hash_on",
            "only for ring_hash and maglev",
        )),
        (_, Some(HashOn::Header(h))) if HeaderName::from_bytes(h.as_bytes()).is_err() => {
            Err(invalid(
                route,
                "forward.lb.hash_on.header",
                "not a valid header name",
            ))
        }
        _ => Ok(()),
    }
}

/// Checks the retry, breaker, bulkhead and outlier settings; returns the
/// statuses that count as failures and the outlier settings in force (on
/// by default).
fn resilience(
    route: &str,
    f: &ForwardConfig,
) -> Result<(StatusSet, Option<OutlierConfig>), RouteError> {
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
    Ok((failure_statuses, outlier))
}

/// The mirror: a share (0..=100 %) of requests copied to a shadow source.
fn mirror(
    route: &str,
    f: &ForwardConfig,
    res: &Resolved,
) -> Result<Option<(TargetPlan, f64)>, RouteError> {
    let Some(m) = &f.mirror else {
        return Ok(None);
    };
    let pct = m.percent.unwrap_or(100.0);
    if !(0.0..=100.0).contains(&pct) || !pct.is_finite() {
        return Err(invalid(
            route,
            "forward.mirror.percent",
            "must be within 0..=100",
        ));
    }
    let source = source(
        route,
        "forward.mirror",
        &m.service,
        &m.upstreams,
        &m.filter,
        res,
    )?;
    Ok(Some((
        TargetPlan {
            name: "mirror".into(),
            source,
            weight: 1,
            // Shadow traffic goes in clear (documented).
            tls_name: None,
        },
        pct,
    )))
}

/// A duration in milliseconds: 1 ms up to one day.
fn ms(route: &str, field: &str, v: Option<u64>) -> Result<Option<Duration>, RouteError> {
    match v {
        Some(0) => Err(invalid(route, field, "must be at least 1 ms")),
        Some(v) if v > 86_400_000 => Err(invalid(route, field, "must be at most one day")),
        Some(v) => Ok(Some(Duration::from_millis(v))),
        None => Ok(None),
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
