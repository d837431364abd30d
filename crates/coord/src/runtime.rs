//! Everything coordination runs on one Meshwork node: membership, the registry with
//! its health checker, the configuration center and the ID generator, all on one
//! [`Backend`].

use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Backend, BackendOptions};
use crate::config::{ConfigCenter, ConfigOptions};
use crate::error::Result;
use crate::ids::{IdGenerator, IdLayout};
use crate::nodes::{Membership, NodeInfo};
use crate::registry::checker::Checker;
use crate::registry::{Registry, RegistryOptions};

/// How a node runs coordination.
#[derive(Debug, Clone)]
pub struct CoordOptions {
    /// Unique node name within the cluster.
    pub node_name: String,
    /// The node's HTTP address (advertised to the other nodes).
    pub http_addr: String,
    /// Membership session TTL, seconds: how long a dead node keeps its health checks.
    pub node_ttl: i64,
    /// Run active health checks on this node.
    pub run_checks: bool,
    /// More roles this node announces in its membership record (e.g. `gateway`).
    pub extra_roles: Vec<String>,
    /// Addresses of its other listeners it announces, by role (`cache`).
    pub endpoints: std::collections::BTreeMap<String, String>,
    /// Registry limits.
    pub registry: RegistryOptions,
    /// Config center limits.
    pub config: ConfigOptions,
    /// Connection and retry behaviour towards etcd.
    pub backend: BackendOptions,
    /// ID layout.
    pub ids: IdLayout,
    /// Where the node remembers its session lease, so that a restart after a crash
    /// revokes the previous run's session at once instead of waiting out its TTL.
    pub session_file: Option<std::path::PathBuf>,
    /// How long the audit log keeps an entry.
    pub audit_retention: std::time::Duration,
}

impl Default for CoordOptions {
    fn default() -> Self {
        CoordOptions {
            node_name: "meshwork".into(),
            http_addr: String::new(),
            node_ttl: 10,
            run_checks: true,
            extra_roles: Vec::new(),
            endpoints: Default::default(),
            registry: RegistryOptions::default(),
            config: ConfigOptions::default(),
            backend: BackendOptions::default(),
            ids: IdLayout::default(),
            session_file: None,
            audit_retention: std::time::Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// The coordination services of a node. Cheap to clone.
#[derive(Clone)]
pub struct Coord {
    /// The etcd endpoint set.
    pub backend: Backend,
    /// The registry.
    pub registry: Registry,
    /// The configuration center.
    pub config: ConfigCenter,
    /// This node's membership.
    pub membership: Arc<Membership>,
    /// The HTTP API's bearer tokens (a watched copy).
    pub tokens: crate::tokens::Tokens,
    /// The console's users.
    pub users: crate::users::Users,
    /// Progressive delivery: every service's rollout.
    pub rollouts: crate::rollout::Rollouts,
    /// The audit log of changes made through the HTTP API.
    pub audit: crate::audit::AuditLog,
    ids: Arc<parking_lot::RwLock<Option<Arc<IdGenerator>>>>,
    _ids_task: Arc<AbortOnDrop>,
    _checker: Option<Arc<Checker>>,
    _rollouts: Arc<crate::rollout::controller::Controller>,
    /// The options in force.
    pub options: Arc<CoordOptions>,
}

impl Coord {
    /// Connects to `endpoints` and starts every service.
    pub async fn start(endpoints: &[String], opts: CoordOptions) -> Result<Coord> {
        let backend = Backend::connect(endpoints, opts.backend.clone()).await?;
        if let Some(path) = &opts.session_file {
            revoke_previous_session(&backend, path, &opts.node_name).await?;
        }
        let membership = Arc::new(
            Membership::join(
                &backend,
                NodeInfo {
                    name: opts.node_name.clone(),
                    http_addr: opts.http_addr.clone(),
                    roles: {
                        let mut r = vec!["coord".to_string()];
                        if opts.run_checks {
                            r.push(crate::nodes::CHECKER_ROLE.into());
                        }
                        r.extend(opts.extra_roles.iter().cloned());
                        r
                    },
                    started_at_ms: 0,
                    endpoints: opts.endpoints.clone(),
                },
                opts.node_ttl,
            )
            .await?,
        );
        let registry = Registry::open(&backend, None, opts.registry.clone()).await?;
        let config = ConfigCenter::open(&backend, opts.config.clone()).await?;
        let tokens = crate::tokens::Tokens::open(&backend).await?;
        let users = crate::users::Users::open(&backend).await?;
        let rollouts = crate::rollout::Rollouts::open(&backend).await?;
        let controller = Arc::new(crate::rollout::controller::Controller::start(
            rollouts.clone(),
            registry.clone(),
            membership.clone(),
        ));
        let audit = crate::audit::AuditLog::start(&backend, &opts.node_name, opts.audit_retention);
        if let Some(path) = &opts.session_file {
            remember_session(path, membership.session().lease);
        }
        let first = IdGenerator::start(
            &backend,
            opts.ids.clone(),
            membership.session().lease,
            &opts.node_name,
        )
        .await?;
        let ids = Arc::new(parking_lot::RwLock::new(Some(Arc::new(first))));
        let ids_task = Arc::new(AbortOnDrop(tokio::spawn(follow_session(
            backend.clone(),
            membership.clone(),
            ids.clone(),
            opts.ids.clone(),
            opts.node_name.clone(),
            opts.session_file.clone(),
        ))));
        let checker = opts
            .run_checks
            .then(|| Arc::new(Checker::start(registry.clone(), membership.clone())));
        tracing::info!(node = %opts.node_name, endpoints = %endpoints.join(","), "coordination started");
        Ok(Coord {
            backend,
            registry,
            config,
            membership,
            tokens,
            users,
            rollouts,
            audit,
            ids,
            _ids_task: ids_task,
            _checker: checker,
            _rollouts: controller,
            options: Arc::new(opts),
        })
    }

    /// Whether this node can serve coordination now: a listed member on a
    /// live session, holding a live id worker. The reason when not.
    pub fn readiness(&self) -> std::result::Result<(), String> {
        if let Some(silent) = self.membership.store_silent_for() {
            return Err(format!(
                "the store has not renewed this node's session for {} s (no quorum, or unreachable)",
                silent.as_secs()
            ));
        }
        if !self.membership.is_listed() {
            return Err("this node's cluster membership is being re-established".into());
        }
        if !self.ids.read().as_ref().is_some_and(|g| g.is_live()) {
            return Err("this node holds no id worker right now (claiming one)".into());
        }
        Ok(())
    }

    /// The ID generator, while this node holds a worker id.
    pub fn ids(&self) -> Result<Arc<IdGenerator>> {
        self.ids.read().clone().ok_or_else(|| {
            crate::error::CoordError::Unavailable(
                "this node holds no id worker right now (its session is being re-established)"
                    .into(),
            )
        })
    }

    /// Leaves the cluster promptly (others take over health checks at once).
    pub async fn shutdown(self) {
        drop(self._checker);
        if let Some(g) = self.ids.write().take() {
            g.invalidate();
        }
        // Other clones (the HTTP router's) may live on: revoke the session directly so
        // checks and the id worker move at once.
        tokio::time::timeout(Duration::from_secs(2), self.membership.leave())
            .await
            .ok();
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Re-claims a worker id whenever the membership session changes (the claim
/// lives on the session lease, so a lost session means a lost worker id), and
/// when the claim key was deleted under a live session (the generator finds
/// it gone at its next renewal).
async fn follow_session(
    backend: Backend,
    membership: Arc<Membership>,
    ids: Arc<parking_lot::RwLock<Option<Arc<IdGenerator>>>>,
    layout: IdLayout,
    node: String,
    session_file: Option<std::path::PathBuf>,
) {
    let mut rx = membership.session_changes();
    let mut current = membership.session().lease;
    let mut check = tokio::time::interval(Duration::from_millis(250));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() {
                    return;
                }
                let s = *rx.borrow_and_update();
                if s.lease == current {
                    continue;
                }
                if let Some(old) = ids.write().take() {
                    old.invalidate();
                }
                current = s.lease;
                if s.lease == 0 {
                    continue;
                }
                if let Some(path) = &session_file {
                    remember_session(path, s.lease);
                }
            }
            _ = check.tick() => {
                let lost = ids.read().as_ref().is_some_and(|g| !g.is_live());
                if !lost || current == 0 || membership.session().lease != current {
                    continue;
                }
                tracing::warn!(%node, "this node's id worker claim was deleted; claiming a worker again");
                metrics::counter!("meshwork_coord_session_heals_total").increment(1);
                ids.write().take();
            }
        }
        claim_ids(&backend, &membership, &ids, &layout, &node, current).await;
    }
}

/// Claims a worker id on `lease` and installs its generator; gives up when
/// the session moves on.
async fn claim_ids(
    backend: &Backend,
    membership: &Membership,
    ids: &parking_lot::RwLock<Option<Arc<IdGenerator>>>,
    layout: &IdLayout,
    node: &str,
    lease: i64,
) {
    loop {
        match IdGenerator::start(backend, layout.clone(), lease, node).await {
            Ok(g) => {
                *ids.write() = Some(Arc::new(g));
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "claiming an id worker failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                if membership.session().lease != lease {
                    return;
                }
            }
        }
    }
}

/// Revokes the session a previous run of this node left behind (after a crash it
/// would otherwise hold the node name, its checks and its id worker for a TTL).
async fn revoke_previous_session(
    backend: &Backend,
    path: &std::path::Path,
    node: &str,
) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let Ok(prev) = text.trim().parse::<i64>() else {
        tracing::warn!(file = %path.display(), "ignoring an unreadable session file");
        return Ok(());
    };
    let (kv, _) = backend.get(crate::nodes::member_key(node)).await?;
    if kv.is_some_and(|kv| kv.lease == prev) {
        backend.revoke(prev).await?;
        tracing::info!(
            node,
            lease = prev,
            "revoked the session of this node's previous run"
        );
    }
    Ok(())
}

fn remember_session(path: &std::path::Path, lease: i64) {
    if let Err(e) = std::fs::write(path, lease.to_string()) {
        tracing::warn!(file = %path.display(), error = %e, "cannot remember the session lease");
    }
}
