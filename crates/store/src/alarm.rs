//! Alarms as etcd keeps them: a set of `(member id, alarm)` raised by the
//! server (`NOSPACE` past the quota) or by a client (`Maintenance.Alarm`
//! with `ACTIVATE`), listed and disarmed one by one, and kept across a
//! restart.
//!
//! The set is small and changes rarely, so it lives in its own file in the
//! data directory (`alarms`), rewritten whole on every change (temporary
//! file, fsync, rename, directory fsync): a change is acknowledged only once
//! it is on disk, and a crash leaves the old set or the new one.
//!
//! Effects (etcd's `applierV3Capped` and `applierV3Corrupt`): any `NOSPACE`
//! refuses writes that add data; any `CORRUPT` refuses every write
//! (key-value, txn, compaction, lease grant and revoke) with `etcdserver:
//! corrupt cluster`, while reads still answer.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::{Result, StoreError};

/// File holding the raised alarms, one `member_id kind` per line.
const ALARMS_FILE: &str = "alarms";

/// An alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Alarm {
    /// The database reached its quota: writes that add data are refused.
    NoSpace,
    /// The data is known to be damaged: every write is refused.
    Corrupt,
}

impl Alarm {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Alarm::NoSpace => "NOSPACE",
            Alarm::Corrupt => "CORRUPT",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "NOSPACE" => Some(Alarm::NoSpace),
            "CORRUPT" => Some(Alarm::Corrupt),
            _ => None,
        }
    }
}

/// One raised alarm: who it is about, and which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AlarmMember {
    /// The member the alarm is about (the store's own alarms carry the id
    /// the server gave at [`Store::set_member_id`](crate::Store::set_member_id)).
    pub member_id: u64,
    /// The alarm.
    pub alarm: Alarm,
}

/// The persisted set.
#[derive(Debug)]
pub(crate) struct Alarms {
    path: PathBuf,
    set: BTreeSet<AlarmMember>,
}

impl Alarms {
    /// Loads the set from `dir` (empty if never written).
    pub(crate) fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(ALARMS_FILE);
        let mut set = BTreeSet::new();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                for (n, line) in text.lines().enumerate() {
                    let bad = || {
                        StoreError::Storage(format!(
                            "{} line {}: expected `MEMBER_ID NOSPACE|CORRUPT`",
                            path.display(),
                            n + 1
                        ))
                    };
                    let (id, kind) = line.split_once(' ').ok_or_else(bad)?;
                    set.insert(AlarmMember {
                        member_id: id.parse().map_err(|_| bad())?,
                        alarm: Alarm::parse(kind).ok_or_else(bad)?,
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StoreError::Storage(format!(
                    "reading {}: {e}",
                    path.display()
                )));
            }
        }
        Ok(Self { path, set })
    }

    pub(crate) fn list(&self) -> Vec<AlarmMember> {
        self.set.iter().copied().collect()
    }

    pub(crate) fn any(&self, alarm: Alarm) -> bool {
        self.set.iter().any(|a| a.alarm == alarm)
    }

    /// Raises `a`; durable when it returns. False if it was raised already.
    pub(crate) fn activate(&mut self, a: AlarmMember) -> Result<bool> {
        if self.set.contains(&a) {
            return Ok(false);
        }
        let mut next = self.set.clone();
        next.insert(a);
        self.save(&next)?;
        self.set = next;
        Ok(true)
    }

    /// Clears `a`; durable when it returns. False if it was not raised.
    pub(crate) fn deactivate(&mut self, a: AlarmMember) -> Result<bool> {
        if !self.set.contains(&a) {
            return Ok(false);
        }
        let mut next = self.set.clone();
        next.remove(&a);
        self.save(&next)?;
        self.set = next;
        Ok(true)
    }

    fn save(&self, set: &BTreeSet<AlarmMember>) -> Result<()> {
        let mut text = String::new();
        for a in set {
            text.push_str(&format!("{} {}\n", a.member_id, a.alarm.as_str()));
        }
        crate::durable::write_file(&self.path, text.as_bytes())
            .map_err(|e| StoreError::Storage(format!("writing {}: {e}", self.path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alarms_survive_a_reload_and_damage_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Alarms::load(dir.path()).unwrap();
        let corrupt = AlarmMember {
            member_id: 7,
            alarm: Alarm::Corrupt,
        };
        assert!(a.activate(corrupt).unwrap());
        assert!(!a.activate(corrupt).unwrap());
        let nospace = AlarmMember {
            member_id: u64::MAX,
            alarm: Alarm::NoSpace,
        };
        assert!(a.activate(nospace).unwrap());
        let b = Alarms::load(dir.path()).unwrap();
        assert_eq!(b.list(), vec![corrupt, nospace], "by member id");
        assert!(b.any(Alarm::Corrupt));
        let mut b = b;
        assert!(b.deactivate(corrupt).unwrap());
        assert!(!b.deactivate(corrupt).unwrap());
        assert_eq!(Alarms::load(dir.path()).unwrap().list(), vec![nospace]);
        std::fs::write(dir.path().join(ALARMS_FILE), "x y\n").unwrap();
        assert!(Alarms::load(dir.path()).is_err());
    }
}
