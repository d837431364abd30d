//! Active health checking. Each instance with a check is owned by exactly one live
//! node (rendezvous hashing over the membership, see [`crate::nodes`]); the owner
//! probes it every interval and writes a health record when the status flips (after
//! the healthy/unhealthy thresholds) or when it takes the check over. Writes are
//! guarded by the owner's membership key, so a node that lost its session cannot
//! overwrite a newer owner's result. When a node dies its lease expires, the others
//! see it leave and the new owners start at once: a check moves within the node TTL
//! plus one interval.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::Registry;
use super::model::{HealthStatus, Instance, health_key, instance_key, now_ms};
use super::probe::HealthCheck;
use super::prober::{ProbeOutcome, probe_as};
use crate::backend::txn;
use crate::nodes::{CHECKER_ROLE, Membership};

/// Runs the checks this node owns until dropped.
pub struct Checker {
    task: JoinHandle<()>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Running {
    check: HealthCheck,
    address: (String, u16),
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Checker {
    /// Starts scheduling: re-plans on every registry or membership change.
    pub fn start(registry: Registry, membership: Arc<Membership>) -> Checker {
        let task = tokio::spawn(async move {
            let mut running: HashMap<(String, String), Running> = HashMap::new();
            let mut reg_rx = registry.cache().lock().subscribe_all();
            let mut mem_rx = membership.changes();
            // None = re-plan everything (start, membership change, missed events).
            let mut scope: Option<HashSet<String>> = None;
            loop {
                plan(&registry, &membership, &mut running, scope.as_ref()).await;
                let mut next: Option<HashSet<String>> = Some(HashSet::new());
                let mut add = |r: Result<String, broadcast::error::RecvError>| match r {
                    Ok(svc) => {
                        if let Some(set) = next.as_mut() {
                            set.insert(svc);
                        }
                        true
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        next = None;
                        true
                    }
                    Err(broadcast::error::RecvError::Closed) => false,
                };
                tokio::select! {
                    r = reg_rx.recv() => if !add(r) { return },
                    r = mem_rx.changed() => {
                        if r.is_err() { return }
                        next = None;
                    }
                    _ = tokio::time::sleep(Duration::from_secs(30)) => next = None,
                }
                // Coalesce a burst of changes into one re-plan.
                loop {
                    match reg_rx.try_recv() {
                        Ok(svc) => {
                            if let Some(set) = next.as_mut() {
                                set.insert(svc);
                            }
                        }
                        Err(broadcast::error::TryRecvError::Lagged(_)) => next = None,
                        Err(_) => break,
                    }
                }
                scope = next;
            }
        });
        Checker { task }
    }
}

/// Starts and stops check tasks to match ownership, for the services in `scope`
/// (all when None).
async fn plan(
    registry: &Registry,
    membership: &Arc<Membership>,
    running: &mut HashMap<(String, String), Running>,
    scope: Option<&HashSet<String>>,
) {
    let me = membership.info().name.clone();
    let mut wanted: HashMap<(String, String), Instance> = HashMap::new();
    let mut orphans = Vec::new();
    {
        let cache = registry.cache().lock();
        // Only the changed services when scoped: a registration must not cost a walk
        // over every service.
        let services: Vec<(&String, &super::cache::ServiceState)> = match scope {
            Some(set) => set
                .iter()
                .filter_map(|name| cache.service(name).map(|st| (name, st)))
                .collect(),
            None => cache.services().collect(),
        };
        for (svc, st) in services {
            for (id, inst) in &st.instances {
                if inst.spec.check.is_some()
                    && membership
                        .owner_of(CHECKER_ROLE, &format!("{svc}/{id}"))
                        .as_deref()
                        == Some(&me)
                {
                    wanted.insert((svc.clone(), id.clone()), inst.clone());
                }
            }
            for id in st.health.keys() {
                if !st.instances.contains_key(id)
                    && membership
                        .owner_of(CHECKER_ROLE, &format!("{svc}/{id}"))
                        .as_deref()
                        == Some(&me)
                {
                    orphans.push((svc.clone(), id.clone()));
                }
            }
        }
    }
    running.retain(|k, r| {
        if r.task.is_finished() {
            return false;
        }
        if scope.is_some_and(|s| !s.contains(&k.0)) {
            return true;
        }
        wanted.get(k).is_some_and(|i| {
            i.spec.check.as_ref() == Some(&r.check)
                && (i.spec.address.as_str(), i.spec.port) == (r.address.0.as_str(), r.address.1)
        })
    });
    for (k, inst) in wanted {
        if running.contains_key(&k) {
            continue;
        }
        let Some(check) = inst.spec.check.clone() else {
            continue;
        };
        let task = tokio::spawn(run_check(
            registry.clone(),
            membership.clone(),
            inst.clone(),
        ));
        running.insert(
            k,
            Running {
                check,
                address: (inst.spec.address.clone(), inst.spec.port),
                task,
            },
        );
    }
    for (svc, id) in orphans {
        // A health record whose instance is gone (its lease expired): remove it, unless
        // the instance came back meanwhile.
        let r = registry
            .backend()
            .txn(meshwork_etcd::proto::etcdserverpb::TxnRequest {
                compare: vec![txn::absent(instance_key(&svc, &id))],
                success: vec![txn::delete(health_key(&svc, &id))],
                failure: vec![],
            })
            .await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "orphan health record cleanup failed");
        }
    }
}

async fn resolve(address: &str, port: u16) -> Result<SocketAddr, String> {
    if let Ok(ip) = address.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    match tokio::net::lookup_host((address, port)).await {
        Ok(mut it) => it
            .next()
            .ok_or_else(|| format!("{address} resolves to no address")),
        Err(e) => Err(format!("resolve {address}: {e}")),
    }
}

async fn run_check(registry: Registry, membership: Arc<Membership>, inst: Instance) {
    let Some(check) = inst.spec.check.clone() else {
        return;
    };
    let (svc, id) = (inst.service.clone(), inst.spec.id.clone());
    let me = membership.info().name.clone();
    let prev = registry
        .cache()
        .lock()
        .service(&svc)
        .and_then(|s| s.health.get(&id).cloned());
    let mut healthy = prev.as_ref().map(|h| h.healthy);
    let mut since = prev.as_ref().map(|h| h.since_ms).unwrap_or_else(now_ms);
    let mut streak = 0u32;
    let interval = Duration::from_millis(check.policy.interval_ms);
    let host = format!("{}:{}", inst.spec.address, inst.spec.port);
    // An instance serving with its service identity is verified by its name.
    let server_name = inst
        .spec
        .metadata
        .get("tls")
        .is_some_and(|v| v == "identity")
        .then(|| svc.clone());
    // What the store holds from us (None until our first write lands): a flip whose
    // write failed is written again on the next round.
    let mut written: Option<bool> = None;
    loop {
        let outcome = match resolve(&inst.spec.address, inst.spec.port).await {
            Ok(addr) => probe_as(&check, addr, &host, server_name.as_deref()).await,
            Err(e) => ProbeOutcome {
                healthy: false,
                detail: e,
                latency: Duration::ZERO,
            },
        };
        metrics::counter!("meshwork_health_checks_total", "result" => if outcome.healthy { "pass" } else { "fail" }).increment(1);
        let flipped = match healthy {
            None => true,
            Some(h) if h == outcome.healthy => {
                streak = 0;
                false
            }
            Some(_) => {
                streak += 1;
                let need = if outcome.healthy {
                    check.policy.healthy_threshold
                } else {
                    check.policy.unhealthy_threshold
                };
                streak >= need
            }
        };
        if flipped {
            healthy = Some(outcome.healthy);
            since = now_ms();
            streak = 0;
        }
        if flipped || written != healthy {
            let status = HealthStatus {
                healthy: healthy.unwrap_or(outcome.healthy),
                detail: if outcome.healthy {
                    "ok".to_string()
                } else {
                    outcome.detail.clone()
                },
                checker: me.clone(),
                since_ms: since,
                checked_at_ms: now_ms(),
            };
            match write_status(&registry, &membership, &svc, &id, &status).await {
                Ok(true) => written = Some(status.healthy),
                Ok(false) => return, // instance gone or we are no longer a member
                Err(e) => {
                    tracing::warn!(service = %svc, instance = %id, error = %e, "writing health failed")
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

async fn write_status(
    registry: &Registry,
    membership: &Membership,
    svc: &str,
    id: &str,
    status: &HealthStatus,
) -> crate::error::Result<bool> {
    let Some(member) = membership.still_member() else {
        return Ok(false);
    };
    let value =
        serde_json::to_vec(status).map_err(|e| crate::error::CoordError::invalid(e.to_string()))?;
    let exists = txn::exists(instance_key(svc, id));
    let r = registry
        .backend()
        .txn(meshwork_etcd::proto::etcdserverpb::TxnRequest {
            compare: vec![member, exists],
            success: vec![txn::put(health_key(svc, id), value, 0)],
            failure: vec![],
        })
        .await?;
    if r.succeeded {
        tracing::info!(service = %svc, instance = %id, healthy = status.healthy, detail = %status.detail, "health status written");
    }
    Ok(r.succeeded)
}
