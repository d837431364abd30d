//! Header edits a route makes to requests and responses (`set`, `add`,
//! `remove`), checked and compiled; hop-by-hop and framing headers are
//! off limits.

use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::super::model::{HeaderOps, RouteError};
use super::invalid;

/// A route's compiled header edits.
#[derive(Debug, Clone, Default)]
pub(crate) struct CompiledOps {
    pub(crate) set: Vec<(HeaderName, HeaderValue)>,
    pub(crate) add: Vec<(HeaderName, HeaderValue)>,
    pub(crate) remove: Vec<HeaderName>,
}

impl CompiledOps {
    /// Applies the edits: removes, then sets, then appends.
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

/// Compiles one `request_headers` or `response_headers` table.
pub(super) fn compile(
    route: &str,
    field: &str,
    ops: &HeaderOps,
) -> Result<CompiledOps, RouteError> {
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

/// Headers no route may set: hop-by-hop, framing and Host.
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
