//! Alarms and the quota: raising and clearing alarms (etcd `Alarm`), the database
//! size checked against `quota_bytes` after every commit, and the refusal flags
//! both set: `NOSPACE` refuses writes that add data, `CORRUPT` every write. The
//! persisted alarm list is `crate::alarm`.

use std::sync::atomic::Ordering;

use super::{DB_FILE, Store};
use crate::alarm::{Alarm, AlarmMember};
use crate::error::{Result, StoreError};

impl Store {
    /// Sets this member's id (the quota's `NOSPACE` alarm carries it).
    pub fn set_member_id(&self, id: u64) {
        self.shared.member_id.store(id, Ordering::Relaxed);
    }

    /// Raises `alarm` about `member_id` (etcd `Alarm ACTIVATE`); durable
    /// when it returns. `NOSPACE` refuses writes that add data, `CORRUPT`
    /// every write (reads still answer, as in etcd), until it is cleared.
    pub fn activate_alarm(&self, member_id: u64, alarm: Alarm) -> Result<()> {
        self.shared
            .alarms
            .lock()
            .activate(AlarmMember { member_id, alarm })?;
        tracing::warn!(member_id, alarm = alarm.as_str(), "alarm raised");
        self.refresh_alarms();
        Ok(())
    }

    /// Clears `alarm` about `member_id` (etcd `Alarm DEACTIVATE`); the
    /// quota's `NOSPACE` is raised again at once if the database is still
    /// over its quota.
    pub fn deactivate_alarm(&self, member_id: u64, alarm: Alarm) -> Result<()> {
        self.shared
            .alarms
            .lock()
            .deactivate(AlarmMember { member_id, alarm })?;
        if alarm == Alarm::NoSpace {
            self.shared.over_quota.store(false, Ordering::Release);
        }
        self.refresh_alarms();
        self.check_quota();
        Ok(())
    }

    /// Clears the quota's `NOSPACE` alarm; it is raised again if the
    /// database is still over its quota.
    pub fn disarm(&self, alarm: Alarm) {
        if alarm == Alarm::NoSpace {
            self.shared.over_quota.store(false, Ordering::Release);
        }
        self.refresh_alarms();
        self.check_quota();
    }

    /// Brings the refusal flags in line with the quota and the alarms.
    pub(super) fn refresh_alarms(&self) {
        let (no_space, corrupt) = {
            let a = self.shared.alarms.lock();
            (a.any(Alarm::NoSpace), a.any(Alarm::Corrupt))
        };
        let over = self.shared.over_quota.load(Ordering::Acquire);
        self.shared
            .no_space
            .store(no_space || over, Ordering::Release);
        self.shared.corrupt.store(corrupt, Ordering::Release);
    }

    pub(super) fn check_corrupt(&self) -> Result<()> {
        if self.shared.corrupt.load(Ordering::Acquire) {
            return Err(StoreError::Corrupt);
        }
        Ok(())
    }

    pub(super) fn check_quota(&self) {
        let size = std::fs::metadata(self.shared.dir.join(DB_FILE))
            .map(|m| m.len())
            .unwrap_or(0);
        metrics::gauge!("meshwork_store_db_size_bytes").set(size as f64);
        if size > self.shared.cfg.quota_bytes
            && !self.shared.over_quota.swap(true, Ordering::AcqRel)
        {
            self.shared.no_space.store(true, Ordering::Release);
            tracing::warn!(
                size,
                quota = self.shared.cfg.quota_bytes,
                "database space exceeded: writes refused until compaction, defragmentation and alarm disarm"
            );
        }
    }
}
