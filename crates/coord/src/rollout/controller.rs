//! The rollout controller: once a second, for every running rollout this
//! node owns (rendezvous hashing over the live coordination nodes, so each
//! rollout has one owner and moves within the session TTL when its node
//! dies), it sums the gateways' figures for the current window, counts the
//! new version's healthy instances, runs [`machine::tick`] and writes the
//! result with a compare on the record's revision. Two owners for a moment
//! (a membership change) cannot both write one tick: the second compare fails.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::machine::{self, Observation};
use super::{Rollouts, sum_figures};
use crate::error::Result;
use crate::nodes::Membership;
use crate::registry::{Filter, Registry};

/// How often running rollouts are ticked.
pub const TICK: Duration = Duration::from_secs(1);
/// How often the live figures alone are written to the record (a decision is
/// written at once): every write reaches every caller's watched copy.
pub const FIGURES_EVERY: Duration = Duration::from_secs(5);

/// Runs the rollouts this node owns until dropped.
pub struct Controller {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Controller {
    /// Starts ticking.
    pub fn start(
        rollouts: Rollouts,
        registry: Registry,
        membership: Arc<Membership>,
    ) -> Controller {
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(TICK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut written: HashMap<String, tokio::time::Instant> = HashMap::new();
            loop {
                every.tick().await;
                let me = membership.info().name.clone();
                let all = rollouts.list();
                written.retain(|s, _| all.iter().any(|r| &r.spec.service == s));
                for r in all {
                    let service = &r.spec.service;
                    let running = matches!(
                        r.status.phase,
                        super::Phase::Waiting | super::Phase::Progressing
                    );
                    if !running
                        || membership.owner_of("coord", &format!("rollout/{service}"))
                            != Some(me.clone())
                    {
                        continue;
                    }
                    let due = written
                        .get(service)
                        .is_none_or(|t| t.elapsed() >= FIGURES_EVERY);
                    match tick_one(&rollouts, &registry, service, due).await {
                        Ok(true) => {
                            written.insert(service.clone(), tokio::time::Instant::now());
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::debug!(service = %service, error = %e, "rollout tick skipped");
                        }
                    }
                }
            }
        });
        Controller { task }
    }
}

/// One tick of `service`'s rollout; writes it when a decision was taken, or
/// when its live figures changed and `figures_due`. True when it wrote.
pub async fn tick_one(
    rollouts: &Rollouts,
    registry: &Registry,
    service: &str,
    figures_due: bool,
) -> Result<bool> {
    let Some((r, rev)) = rollouts.get(service) else {
        return Ok(false);
    };
    let figures = rollouts.figures(service).await?;
    let (canary, stable) = sum_figures(figures.iter(), &r.id, r.status.window);
    let healthy = registry
        .discover(
            service,
            &Filter {
                healthy: true,
                version: Some(r.spec.to_version.clone()),
                ..Filter::default()
            },
        )
        .healthy_count;
    let obs = Observation {
        now_ms: crate::registry::model::now_ms(),
        canary_healthy: healthy,
        canary,
        stable,
    };
    let mut next = (*r).clone();
    let decision = machine::tick(&mut next, &obs);
    if next == *r || (decision.is_none() && !figures_due) {
        return Ok(false);
    }
    rollouts.update(&next, rev).await?;
    metrics::gauge!("meshwork_rollout_weight_percent", "service" => service.to_string())
        .set(f64::from(next.status.weight));
    if let Some(d) = decision {
        metrics::counter!("meshwork_rollout_decisions_total",
            "service" => service.to_string(), "action" => d.action.as_str())
        .increment(1);
        tracing::info!(
            service,
            to_version = %next.spec.to_version,
            action = ?d.action,
            weight = d.weight,
            canary_requests = d.canary.requests,
            canary_failures = d.canary.failures,
            stable_requests = d.stable.requests,
            stable_failures = d.stable.failures,
            reason = %d.reason,
            "rollout decision"
        );
    }
    Ok(true)
}
