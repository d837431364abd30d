//! The one step of compiling that touches the world: resolving static
//! upstreams' host names and reading the key files routes name. It runs
//! before the pure compile, on a blocking thread when called from async
//! code ([`resolve_off_runtime`]), so DNS or a slow disk never stalls a
//! runtime thread. Failures are kept per item, and the compile step
//! reports them with the route and field that named the item.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use super::super::model::{ForwardConfig, RouteError, RouteSet};

/// What the compile step needs from outside: upstream addresses by the
/// text that named them, and key files' contents by path.
#[derive(Debug, Default)]
pub(crate) struct Resolved {
    addrs: HashMap<String, Result<SocketAddr, String>>,
    files: HashMap<PathBuf, Result<Vec<u8>, String>>,
}

impl Resolved {
    /// The address `upstream` (`host:port`, not a literal address)
    /// resolved to, or why it did not.
    pub(crate) fn addr(&self, upstream: &str) -> Result<SocketAddr, String> {
        self.addrs
            .get(upstream)
            .cloned()
            .unwrap_or_else(|| Err(format!("`{upstream}` was not resolved")))
    }

    /// The contents of the file at `path`, or why it could not be read.
    pub(crate) fn file(&self, path: &Path) -> Result<&[u8], String> {
        match self.files.get(path) {
            Some(Ok(bytes)) => Ok(bytes),
            Some(Err(e)) => Err(e.clone()),
            None => Err(format!("{} was not read", path.display())),
        }
    }
}

/// Resolves every static upstream given by name and reads every key file
/// of `set`. Blocking: DNS and file reads.
pub(crate) fn resolve(set: &RouteSet) -> Resolved {
    let mut out = Resolved::default();
    for r in &set.routes {
        if let Some(f) = &r.forward {
            for u in upstream_names(f) {
                if !out.addrs.contains_key(u) {
                    out.addrs.insert(u.to_owned(), lookup(u));
                }
            }
        }
        if let Some(jwt) = r.auth.as_ref().and_then(|a| a.jwt.as_ref()) {
            let paths = [&jwt.secret_file, &jwt.public_key_file, &jwt.jwks_file];
            for p in paths.into_iter().flatten() {
                if !out.files.contains_key(p) {
                    let read =
                        std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
                    out.files.insert(p.clone(), read);
                }
            }
        }
    }
    out
}

/// [`resolve`] on tokio's blocking pool; the set comes back with what was
/// resolved.
pub(crate) async fn resolve_off_runtime(set: RouteSet) -> Result<(RouteSet, Resolved), RouteError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::task::spawn_blocking(move || {
        let resolved = resolve(&set);
        let _ = tx.send((set, resolved));
    });
    // The blocking task does not panic on any input; should it die anyway,
    // the set is refused (never replaced by an empty one).
    rx.await.map_err(|_| RouteError::Invalid {
        route: "*".into(),
        field: "routes".into(),
        message: "resolving host names and reading key files did not finish".into(),
    })
}

/// The upstreams of a forward action that name a host (literal socket
/// addresses need no lookup; malformed ones are refused by the compile
/// step).
fn upstream_names(f: &ForwardConfig) -> impl Iterator<Item = &str> {
    let mirror = f.mirror.iter().flat_map(|m| m.upstreams.iter());
    let targets = f.targets.iter().flat_map(|t| t.upstreams.iter());
    f.upstreams
        .iter()
        .chain(targets)
        .chain(mirror)
        .map(String::as_str)
        .filter(|u| u.parse::<SocketAddr>().is_err() && u.contains(':') && !u.contains('/'))
}

/// The first address `host:port` resolves to.
fn lookup(u: &str) -> Result<SocketAddr, String> {
    let mut addrs = u
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{u}`: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("`{u}` resolves to nothing"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn resolves_names_reads_files_and_keeps_failures_per_item() {
        let dir = std::env::temp_dir().join(format!("mw-resolve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, b"s3cret\n").unwrap();
        let missing = dir.join("missing");
        let toml = format!(
            r#"
[[routes]]
name = "a"
match.path.prefix = "/a"
forward.upstreams = ["localhost:1", "127.0.0.1:2", "no-port"]
auth.jwt.secret_file = "{}"

[[routes]]
name = "b"
match.path.prefix = "/b"
forward.upstreams = ["127.0.0.1:3"]
auth.jwt.jwks_file = "{}"
"#,
            secret.display(),
            missing.display()
        );
        let set = RouteSet::from_toml(&toml).unwrap();
        let r = resolve(&set);
        assert!(r.addr("localhost:1").unwrap().ip().is_loopback());
        // Literal addresses and malformed names are not looked up.
        assert!(r.addr("127.0.0.1:2").is_err());
        assert!(r.addr("no-port").is_err());
        assert_eq!(r.file(&secret).unwrap(), b"s3cret\n");
        let err = r.file(&missing).unwrap_err();
        assert!(err.starts_with("cannot read"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
