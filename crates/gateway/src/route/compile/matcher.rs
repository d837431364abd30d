//! Match conditions: compiled from a route's `match` table, checked
//! against every request (host, path, methods, headers, query), and able
//! to say which condition failed (for `gateway explain`).

use http::Method;
use http::header::{HeaderMap, HeaderName};
use regex::Regex;

use super::super::model::{MatchConfig, PathMatch, ValueMatch};
use super::{compile_regex, invalid};
use crate::h1::head::RequestView;
use crate::route::model::RouteError;

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

/// A request's header lines as the matcher reads them: a name's first
/// line, as text. Served by hyper's header map and by a head parsed in
/// place, so both engines route alike.
pub(crate) trait Fields {
    /// The first value of `name`: `None` if absent or not visible ASCII.
    fn first_text(&self, name: &HeaderName) -> Option<&str>;
}

impl Fields for HeaderMap {
    fn first_text(&self, name: &HeaderName) -> Option<&str> {
        self.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Fields for RequestView<'_> {
    fn first_text(&self, name: &HeaderName) -> Option<&str> {
        RequestView::first_text(self, name.as_str().as_bytes())
    }
}

/// What a request looks like to the matcher.
pub(crate) struct MatchInput<'a> {
    pub(crate) method: &'a Method,
    pub(crate) host: Option<&'a str>,
    pub(crate) path: &'a str,
    pub(crate) query: Option<&'a str>,
    pub(crate) headers: &'a dyn Fields,
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
            let v = input.headers.first_text(name);
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

/// Compiles a route's `match` table.
pub(crate) fn compile(route: &str, m: &MatchConfig) -> Result<Matcher, RouteError> {
    Ok(Matcher {
        hosts: hosts(route, &m.hosts)?,
        path: m.path.as_ref().map(|p| path(route, p)).transpose()?,
        methods: methods(route, &m.methods)?,
        headers: m
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
            .collect::<Result<_, RouteError>>()?,
        query: m
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
            .collect::<Result<_, RouteError>>()?,
    })
}

/// Host names, lower-cased; `*.domain` matches any subdomain.
fn hosts(route: &str, hosts: &[String]) -> Result<Vec<HostMatch>, RouteError> {
    let mut out = Vec::with_capacity(hosts.len());
    for (i, h) in hosts.iter().enumerate() {
        let h = h.trim().to_ascii_lowercase();
        let field = format!("match.hosts[{i}]");
        let bad = |msg: &str| invalid(route, field.clone(), format!("`{h}`: {msg}"));
        if let Some(rest) = h.strip_prefix("*.") {
            if rest.is_empty() || rest.contains('*') {
                return Err(bad("a wildcard is `*.domain`"));
            }
            out.push(HostMatch::Suffix(format!(".{rest}")));
        } else if h.is_empty() || h.contains(['*', '/', ' ']) {
            return Err(bad("not a host name"));
        } else {
            out.push(HostMatch::Exact(h));
        }
    }
    Ok(out)
}

/// Exactly one of exact, prefix (both starting with `/`) or regex.
fn path(route: &str, p: &PathMatch) -> Result<PathCond, RouteError> {
    match (&p.exact, &p.prefix, &p.regex) {
        (Some(e), None, None) if e.starts_with('/') => Ok(PathCond::Exact(e.clone())),
        (None, Some(pf), None) if pf.starts_with('/') => Ok(PathCond::Prefix(pf.clone())),
        (None, None, Some(re)) => Ok(PathCond::Regex(compile_regex(
            route,
            "match.path.regex",
            re,
            true,
        )?)),
        (Some(_), None, None) | (None, Some(_), None) => {
            Err(invalid(route, "match.path", "paths start with /"))
        }
        _ => Err(invalid(
            route,
            "match.path",
            "set exactly one of exact, prefix, regex",
        )),
    }
}

/// Upper-case method names.
fn methods(route: &str, methods: &[String]) -> Result<Vec<Method>, RouteError> {
    methods
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
        .collect()
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
