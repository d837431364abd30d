//! What a request to the node's HTTP API needs, and what a token's scopes
//! allow: the one table behind HTTP authorization, so that every route,
//! present and future, falls under it (an unknown `/v1/` route needs `admin`).
//!
//! A scope is `admin`, or `AREA:ACCESS` or `AREA:ACCESS:RESOURCE`, where
//! ACCESS is `read` or `write` (write includes read) and RESOURCE narrows the
//! area to one service, configuration namespace, lock or election name, or
//! topic: `services:write:orders`, `config:read:public`, `queues:write:events`.
//!
//! `secrets:read:NS` is checked by the handlers themselves, on top of what the
//! route needs: it lets a caller see the content of secret config entries in
//! namespace NS (the guard passes what it let in as a [`Granted`] extension).

use axum::http::Method;

/// The areas a scope can name.
pub const AREAS: &[&str] = &[
    "services", "config", "secrets", "leases", "locks", "ids", "gateway", "queues", "txn",
    "traces", "console",
];

/// Who the HTTP guard let a request in as (`token:<id>`, `console:<user>`,
/// `anonymous`), as a request extension: what handlers record as the actor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Who(pub String);

/// What the HTTP guard let a request in with, as a request extension.
#[derive(Clone, Debug)]
pub enum Granted {
    /// The node runs without HTTP auth: everything is open.
    Open,
    /// These scopes (none for an anonymous read where reads are open).
    Scopes(Vec<Scope>),
}

impl Granted {
    /// Whether what was granted covers `need`.
    pub fn allows(&self, need: &Need) -> bool {
        match self {
            Granted::Open => true,
            Granted::Scopes(s) => allowed(s, need),
        }
    }

    /// Whether the caller showed no credentials at all.
    pub fn anonymous(&self) -> bool {
        matches!(self, Granted::Scopes(s) if s.is_empty())
    }
}

/// What reading the content of a secret config entry in `namespace` needs.
pub fn secret_read(namespace: &str) -> Need {
    Need {
        area: "secrets",
        access: Access::Read,
        resource: Some(namespace.to_string()),
    }
}

/// Reading or changing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// Reads only.
    Read,
    /// Reads and writes.
    Write,
}

/// What one request needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Need {
    /// Its area (`admin` for what only an administrator may do).
    pub area: &'static str,
    /// Reading or changing.
    pub access: Access,
    /// The service, namespace, name or topic it is about, when the path says.
    pub resource: Option<String>,
}

impl std::fmt::Display for Need {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.area == "admin" {
            return f.write_str("admin");
        }
        let access = match self.access {
            Access::Read => "read",
            Access::Write => "write",
        };
        match &self.resource {
            Some(r) => write!(f, "{}:{access}:{r}", self.area),
            None => write!(f, "{}:{access}", self.area),
        }
    }
}

/// A parsed scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything, token management included.
    Admin,
    /// One area, reading or also writing, for one resource or all.
    Area {
        /// The area.
        area: String,
        /// Reading or also writing.
        access: Access,
        /// One resource, or every one.
        resource: Option<String>,
    },
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Scope, String> {
        if s == "admin" {
            return Ok(Scope::Admin);
        }
        let mut parts = s.splitn(3, ':');
        let (Some(area), Some(access)) = (parts.next(), parts.next()) else {
            return Err(format!(
                "scope {s:?}: expected admin or AREA:read|write[:RESOURCE] (areas: {})",
                AREAS.join(", ")
            ));
        };
        if !AREAS.contains(&area) {
            return Err(format!(
                "scope {s:?}: unknown area {area:?} (areas: {}, or admin)",
                AREAS.join(", ")
            ));
        }
        let access = match access {
            "read" => Access::Read,
            "write" => Access::Write,
            other => {
                return Err(format!(
                    "scope {s:?}: access {other:?} is neither read nor write"
                ));
            }
        };
        let resource = match parts.next() {
            None => None,
            Some(r) if !r.is_empty() && r != "*" => Some(r.to_string()),
            Some("*") => None,
            Some(_) => return Err(format!("scope {s:?}: empty resource")),
        };
        Ok(Scope::Area {
            area: area.to_string(),
            access,
            resource,
        })
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Admin => f.write_str("admin"),
            Scope::Area {
                area,
                access,
                resource,
            } => Need {
                // Display only: the area string is one of AREAS.
                area: AREAS
                    .iter()
                    .find(|a| **a == area)
                    .copied()
                    .unwrap_or("admin"),
                access: *access,
                resource: resource.clone(),
            }
            .fmt(f),
        }
    }
}

impl Scope {
    /// Whether this scope covers `need`.
    pub fn allows(&self, need: &Need) -> bool {
        match self {
            Scope::Admin => true,
            Scope::Area {
                area,
                access,
                resource,
            } => {
                area == need.area
                    && *access >= need.access
                    && resource
                        .as_ref()
                        .is_none_or(|r| need.resource.as_deref() == Some(r.as_str()))
            }
        }
    }
}

/// Whether any of `scopes` covers `need`.
pub fn allowed(scopes: &[Scope], need: &Need) -> bool {
    scopes.iter().any(|s| s.allows(need))
}

/// What a request needs, or `None` when it is open to anyone: the health and
/// readiness probes, metrics, the OpenAPI document, the console's pages and
/// assets, and logging in and out. Every other path needs a scope; one this
/// table does not know needs `admin`.
pub fn need(method: &Method, path: &str) -> Option<Need> {
    let read_method = [Method::GET, Method::HEAD, Method::OPTIONS].contains(method);
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let seg = |i: usize| segs.get(i).copied().filter(|s| !s.is_empty());
    let res = |i: usize| seg(i).map(str::to_string);
    let access = |reads: bool| {
        if read_method || reads {
            Access::Read
        } else {
            Access::Write
        }
    };
    let mk = |area: &'static str, reads: bool, resource: Option<String>| {
        Some(Need {
            area,
            access: access(reads),
            resource,
        })
    };
    // gRPC services on the HTTP port (`/meshwork.mq.v1.Broker/Publish`).
    if let Some(service) = seg(0)
        && service.starts_with("meshwork.mq.")
    {
        return mk("queues", false, None);
    }
    match (seg(0), seg(1)) {
        (Some("gateway"), _) => mk("gateway", false, None),
        (Some("v1"), Some(area)) => match area {
            "console" => match seg(2) {
                Some("login" | "logout" | "session") => None,
                // The raw keyspace (every key the store's own auth guards):
                // administrators only, even where reads are open.
                Some("kv") => Some(Need {
                    area: "admin",
                    access: Access::Read,
                    resource: None,
                }),
                Some("validate") => mk("console", true, None),
                _ => mk("console", false, None),
            },
            "nodes" | "registry" => mk("services", true, None),
            "services" => mk("services", false, res(2)),
            "config" => match seg(2) {
                None | Some("namespaces") => mk("config", false, None),
                // The long-poll names its namespaces in the body: it reads.
                Some("listener") => mk("config", true, None),
                // The secrets' keys (a namespace called so has longer paths).
                Some("secrets") if seg(4).is_none() => Some(Need {
                    area: "admin",
                    access: access(false),
                    resource: None,
                }),
                Some(ns) => mk("config", false, Some(ns.to_string())),
            },
            "leases" => mk("leases", false, None),
            "locks" | "elections" => mk("locks", false, res(2)),
            "ids" => mk("ids", false, None),
            "gateway" => mk("gateway", false, None),
            // Rollouts shift the gateway's traffic.
            "rollouts" => mk("gateway", false, None),
            "mq" => match (seg(2), seg(3)) {
                (Some("topics"), Some(topic)) => mk("queues", false, Some(topic.to_string())),
                _ => mk("queues", false, None),
            },
            "txn" => mk("txn", false, None),
            "traces" => mk("traces", false, None),
            _ => Some(Need {
                area: "admin",
                access: Access::Write,
                resource: None,
            }),
        },
        (Some("v1"), None) => Some(Need {
            area: "admin",
            access: Access::Write,
            resource: None,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn scope(s: &str) -> Scope {
        s.parse().unwrap()
    }

    #[test]
    fn scopes_parse_print_and_refuse_nonsense() {
        for s in [
            "admin",
            "services:write:orders",
            "config:read:public",
            "queues:write",
        ] {
            assert_eq!(scope(s).to_string(), s);
        }
        assert_eq!(scope("locks:read:*").to_string(), "locks:read");
        for bad in [
            "",
            "root",
            "services",
            "services:all",
            "kv:read",
            "config:read:",
        ] {
            assert!(bad.parse::<Scope>().is_err(), "{bad}");
        }
    }

    #[test]
    fn routes_map_to_areas_and_resources() {
        let n = |m: Method, p: &str| need(&m, p).map(|n| n.to_string());
        assert_eq!(n(Method::GET, "/healthz"), None);
        assert_eq!(n(Method::GET, "/ui/services"), None);
        assert_eq!(n(Method::POST, "/v1/console/login"), None);
        assert_eq!(
            n(Method::POST, "/v1/services/orders/instances").as_deref(),
            Some("services:write:orders")
        );
        assert_eq!(
            n(Method::GET, "/v1/services").as_deref(),
            Some("services:read")
        );
        assert_eq!(
            n(Method::POST, "/v1/config/listener").as_deref(),
            Some("config:read")
        );
        assert_eq!(
            n(Method::POST, "/v1/config/public/G/app.toml/rollback").as_deref(),
            Some("config:write:public")
        );
        assert_eq!(
            n(Method::POST, "/v1/mq/topics/events/messages").as_deref(),
            Some("queues:write:events")
        );
        assert_eq!(
            n(Method::POST, "/meshwork.mq.v1.Broker/Publish").as_deref(),
            Some("queues:write")
        );
        assert_eq!(
            n(Method::PUT, "/v1/gateway/routes").as_deref(),
            Some("gateway:write")
        );
        assert_eq!(n(Method::GET, "/v1/auth/tokens").as_deref(), Some("admin"));
        assert_eq!(n(Method::GET, "/v1/console/kv").as_deref(), Some("admin"));
        assert_eq!(
            n(Method::GET, "/v1/console/kv/watch").as_deref(),
            Some("admin")
        );
        assert_eq!(n(Method::GET, "/v1/whatever").as_deref(), Some("admin"));
    }

    #[test]
    fn write_includes_read_and_resources_narrow() {
        let need_of = |m: Method, p: &str| need(&m, p).unwrap();
        let orders_w = need_of(Method::PUT, "/v1/services/orders");
        let orders_r = need_of(Method::GET, "/v1/services/orders");
        let list = need_of(Method::GET, "/v1/services");
        assert!(scope("services:write:orders").allows(&orders_w));
        assert!(scope("services:write:orders").allows(&orders_r));
        assert!(!scope("services:read:orders").allows(&orders_w));
        assert!(
            !scope("services:write:orders").allows(&list),
            "a list shows every service"
        );
        assert!(!scope("services:write:payments").allows(&orders_r));
        assert!(scope("services:read").allows(&list));
        assert!(!scope("config:write").allows(&orders_r));
        assert!(scope("admin").allows(&orders_w));
        assert!(!scope("console:read").allows(&need_of(Method::GET, "/v1/auth/tokens")));
    }
}
