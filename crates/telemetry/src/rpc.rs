//! Spans of gRPC calls as OpenTelemetry's RPC conventions name them: the
//! span `package.Service/Method`, with `rpc.system`, `rpc.service`,
//! `rpc.method` and `rpc.grpc.status_code`. Shared by the node's etcd port
//! (server spans) and the SDK's gRPC channel (client spans).

use std::time::SystemTime;

use crate::TraceContext;
use crate::export::{Kind, SpanRecord};

/// `(service, method)` of a gRPC path (`/package.Service/Method`).
pub fn method_of(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

/// The gRPC status code of a response head: a failed unary call is
/// answered trailers-only (`grpc-status` in the head); a success carries it
/// in the trailers, so its absence here means OK.
pub fn status_code(headers: &http::HeaderMap) -> i64 {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The span of a call to `path` that started at `start`: `head` is the
/// response's head, or why no response came. `None` if `path` is no gRPC
/// method.
pub fn span(
    ctx: &TraceContext,
    path: &str,
    kind: Kind,
    start: SystemTime,
    head: Result<&http::HeaderMap, String>,
) -> Option<SpanRecord> {
    let (service, method) = method_of(path)?;
    let s = SpanRecord::new(ctx, format!("{service}/{method}"), kind, start)
        .attr("rpc.system", "grpc")
        .attr("rpc.service", service)
        .attr("rpc.method", method);
    Some(match head {
        Ok(h) => {
            let code = status_code(h);
            let s = s.attr("rpc.grpc.status_code", code);
            if code == 0 {
                s
            } else {
                let message = h
                    .get("grpc-message")
                    .and_then(|v| v.to_str().ok())
                    .map_or_else(|| format!("gRPC status {code}"), str::to_owned);
                s.failed(message)
            }
        }
        Err(why) => s.attr("error.type", "call_failed").failed(why),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn names_and_codes() {
        assert_eq!(
            method_of("/etcdserverpb.KV/Range"),
            Some(("etcdserverpb.KV", "Range"))
        );
        assert_eq!(method_of("/etcdserverpb.KV/"), None);
        assert_eq!(method_of("/a/b/c"), None);
        assert_eq!(method_of("nope"), None);
        let mut h = http::HeaderMap::new();
        assert_eq!(status_code(&h), 0);
        h.insert("grpc-status", http::HeaderValue::from_static("7"));
        assert_eq!(status_code(&h), 7);
        let ctx = TraceContext::new_root();
        assert!(span(&ctx, "/x", Kind::Client, SystemTime::now(), Ok(&h)).is_none());
        assert!(span(&ctx, "/p.S/M", Kind::Client, SystemTime::now(), Ok(&h)).is_some());
    }
}
