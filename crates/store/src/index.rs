//! The in-memory MVCC index: for every key, the revisions at which it changed, with
//! the metadata etcd compares on (create revision, version, lease).
//!
//! Values are not here: they live in redb, keyed by revision. Invariants:
//! - a key's entries are sorted by revision, strictly increasing;
//! - an entry with `version == 0` is a tombstone (the key was deleted at that revision);
//! - readers look only at entries at or below the revision they read at, so the
//!   committer may append entries for revisions not yet durable without them being seen.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::types::{KeyRange, Revision};

/// One change of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Where the change's record lives in the revision table.
    pub(crate) rev: Revision,
    /// Revision at which the key was (last) created; 0 for a tombstone.
    pub(crate) create: i64,
    /// Version after the change; 0 marks a tombstone.
    pub(crate) version: i64,
    /// Lease after the change.
    pub(crate) lease: i64,
}

impl Entry {
    pub(crate) fn is_tombstone(&self) -> bool {
        self.version == 0
    }
}

/// The history of one key, oldest first.
pub(crate) type History = Vec<Entry>;

/// The latest entry at or below `rev`, if the key is live there.
pub(crate) fn live_at(history: &History, rev: i64) -> Option<&Entry> {
    let e = history.iter().rev().find(|e| e.rev.main <= rev)?;
    if e.is_tombstone() { None } else { Some(e) }
}

/// The key index.
#[derive(Default, Debug)]
pub(crate) struct Index {
    keys: BTreeMap<Vec<u8>, History>,
}

impl Index {
    /// The entry of `key` live at `rev`.
    pub(crate) fn get(&self, key: &[u8], rev: i64) -> Option<&Entry> {
        live_at(self.keys.get(key)?, rev)
    }

    /// The full history of `key`.
    pub(crate) fn history(&self, key: &[u8]) -> Option<&History> {
        self.keys.get(key)
    }

    /// Calls `f` with every key in `range` live at `rev`, in key order, until it returns false.
    pub(crate) fn for_each_live(
        &self,
        range: &KeyRange,
        rev: i64,
        mut f: impl FnMut(&[u8], &Entry) -> bool,
    ) {
        if range.is_single() {
            if let Some(e) = self.get(&range.key, rev) {
                f(&range.key, e);
            }
            return;
        }
        let lower = Bound::Included(range.key.as_ref());
        let upper = match range.upper() {
            // An end at or before the key selects nothing (etcd's answer); `BTreeMap::range`
            // would panic on such bounds.
            Some(end) if end <= range.key.as_ref() => return,
            Some(end) => Bound::Excluded(end),
            None => Bound::Unbounded,
        };
        for (k, h) in self.keys.range::<[u8], _>((lower, upper)) {
            if let Some(e) = live_at(h, rev)
                && !f(k, e)
            {
                return;
            }
        }
    }

    /// Records a change of `key`.
    pub(crate) fn push(&mut self, key: &[u8], entry: Entry) {
        match self.keys.get_mut(key) {
            Some(h) => {
                debug_assert!(
                    h.last().is_none_or(|l| l.rev < entry.rev),
                    "index revisions must increase"
                );
                h.push(entry);
            }
            None => {
                self.keys.insert(key.to_vec(), vec![entry]);
            }
        }
    }

    /// Drops history superseded at or below `compact_rev`; returns the revisions whose
    /// records can be deleted from storage.
    pub(crate) fn compact(&mut self, compact_rev: i64) -> Vec<Revision> {
        let mut removed = Vec::new();
        self.keys.retain(|_, h| {
            // Index of the newest entry at or below the compaction revision.
            let Some(keep) = h.iter().rposition(|e| e.rev.main <= compact_rev) else {
                return true;
            };
            let drop_keep = h[keep].is_tombstone();
            let cut = if drop_keep { keep + 1 } else { keep };
            removed.extend(h.drain(..cut).map(|e| e.rev));
            !h.is_empty()
        });
        removed
    }

    /// Number of keys with any retained history.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(main: i64, create: i64, version: i64) -> Entry {
        Entry {
            rev: Revision { main, sub: 0 },
            create,
            version,
            lease: 0,
        }
    }
    fn del(main: i64) -> Entry {
        Entry {
            rev: Revision { main, sub: 0 },
            create: 0,
            version: 0,
            lease: 0,
        }
    }

    #[test]
    fn reads_see_only_entries_at_or_below_their_revision() {
        let mut idx = Index::default();
        idx.push(b"a", put(2, 2, 1));
        idx.push(b"a", put(4, 2, 2));
        idx.push(b"a", del(6));
        assert_eq!(idx.get(b"a", 1), None);
        assert_eq!(idx.get(b"a", 3).map(|e| e.version), Some(1));
        assert_eq!(idx.get(b"a", 5).map(|e| e.version), Some(2));
        assert_eq!(idx.get(b"a", 6), None);
    }

    #[test]
    fn compaction_keeps_the_live_version_and_drops_dead_keys() {
        let mut idx = Index::default();
        idx.push(b"a", put(2, 2, 1));
        idx.push(b"a", put(4, 2, 2));
        idx.push(b"b", put(3, 3, 1));
        idx.push(b"b", del(5));
        let mut gone = idx.compact(5);
        gone.sort();
        assert_eq!(
            gone.iter().map(|r| r.main).collect::<Vec<_>>(),
            vec![2, 3, 5]
        );
        assert_eq!(idx.get(b"a", 5).map(|e| e.version), Some(2));
        assert!(idx.history(b"b").is_none());
        assert_eq!(idx.len(), 1);
    }
}
