//! Background tasks on the store's tokio runtime, each holding the store weakly and
//! ending once it is stopped or dropped: the lease loop (writes deadlines down,
//! revokes expired leases through the committer), progress notifications for
//! watchers that asked for them, and automatic compaction by revisions or by time.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::Ordering;

use tokio::time::{Duration, Instant};

use super::leases::wall_deadlines;
use super::{Shared, Store};
use crate::apply::WriteReq;
use crate::error::StoreError;

impl Store {
    pub(super) fn spawn_background(&self) {
        let weak = Arc::downgrade(&self.shared);
        let interval = self.shared.cfg.lease_check_interval;
        self.shared
            .runtime
            .spawn(lease_loop(weak.clone(), interval));
        self.shared.runtime.spawn(progress_loop(
            weak.clone(),
            self.shared.cfg.watch_progress_interval,
        ));
        if self.shared.cfg.auto_compaction_retention_revisions > 0
            || self.shared.cfg.auto_compaction_retention.is_some()
        {
            self.shared.runtime.spawn(auto_compact_loop(weak));
        }
    }
}

async fn lease_loop(weak: Weak<Shared>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_checkpoint = Instant::now();
    loop {
        tick.tick().await;
        let Some(shared) = weak.upgrade() else { return };
        if shared.stopped.load(Ordering::Acquire) {
            return;
        }
        let every = shared.cfg.lease_checkpoint_interval;
        if !every.is_zero() && last_checkpoint.elapsed() >= every {
            last_checkpoint = Instant::now();
            let changed = shared.lessor.lock().take_deadlines();
            if let Some(deadlines) = changed {
                let dir = shared.dir.clone();
                let wall = wall_deadlines(&deadlines);
                let written =
                    tokio::task::spawn_blocking(move || crate::lease::save_deadlines(&dir, &wall))
                        .await;
                if let Ok(Err(e)) = written {
                    tracing::warn!(error = %e, "writing lease deadlines failed; retried at the next interval");
                    shared.lessor.lock().mark_dirty();
                }
            }
        }
        let expired = shared.lessor.lock().take_expired(Instant::now());
        let store = Store { shared };
        for id in expired {
            let s = store.clone();
            tokio::spawn(async move {
                match s.submit(WriteReq::LeaseRevoke { id }).await {
                    Ok(_) => {
                        metrics::counter!("meshwork_store_leases_expired_total").increment(1);
                        tracing::debug!(lease = id, "lease expired");
                    }
                    Err(StoreError::LeaseNotFound) => {}
                    Err(e) => {
                        tracing::warn!(lease = id, error = %e, "revoking an expired lease failed; will retry");
                        s.shared.lessor.lock().unmark_expiring(id);
                    }
                }
            });
        }
    }
}

async fn progress_loop(weak: Weak<Shared>, every: Duration) {
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    loop {
        tick.tick().await;
        let Some(shared) = weak.upgrade() else { return };
        if shared.stopped.load(Ordering::Acquire) {
            return;
        }
        shared.hub.progress(None);
    }
}

async fn auto_compact_loop(weak: Weak<Shared>) {
    let mut samples: VecDeque<(Instant, i64)> = VecDeque::new();
    let period = {
        let Some(s) = weak.upgrade() else { return };
        match s.cfg.auto_compaction_retention {
            Some(d) => (d / 10).clamp(Duration::from_secs(1), Duration::from_secs(300)),
            None => Duration::from_secs(300),
        }
    };
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let Some(shared) = weak.upgrade() else { return };
        if shared.stopped.load(Ordering::Acquire) {
            return;
        }
        let store = Store { shared };
        let now = Instant::now();
        let cur = store.revision();
        samples.push_back((now, cur));
        let mut target = 0;
        if store.shared.cfg.auto_compaction_retention_revisions > 0 {
            target = cur - store.shared.cfg.auto_compaction_retention_revisions;
        }
        if let Some(keep) = store.shared.cfg.auto_compaction_retention {
            while samples.len() > 1
                && samples
                    .get(1)
                    .is_some_and(|(t, _)| now.duration_since(*t) >= keep)
            {
                samples.pop_front();
            }
            if let Some((t, r)) = samples.front()
                && now.duration_since(*t) >= keep
            {
                target = target.max(*r);
            }
        }
        if target > store.compact_revision() {
            match store.compact(target).await {
                Ok(_) => tracing::info!(revision = target, "auto-compacted"),
                Err(e) => tracing::warn!(revision = target, error = %e, "auto-compaction failed"),
            }
        }
    }
}
