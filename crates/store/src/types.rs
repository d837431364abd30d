//! The store's data model: revisions, key-values and events, as etcd defines them.
//!
//! These are the store's own types; only `meshwork-etcd` knows the wire format and
//! converts between these and the protobuf messages.

use bytes::Bytes;

/// A key-value pair at one revision, with etcd's metadata.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct KeyValue {
    /// The key.
    pub key: Bytes,
    /// Revision of the last creation of this key.
    pub create_revision: i64,
    /// Revision of the last modification of this key.
    pub mod_revision: i64,
    /// Number of modifications since creation (1 after creation).
    pub version: i64,
    /// The value.
    pub value: Bytes,
    /// Lease the key is attached to (0 for none).
    pub lease: i64,
}

/// Kind of a watch event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A key was created or modified.
    Put,
    /// A key was deleted; the event's `kv` carries only key and `mod_revision`.
    Delete,
}

/// One change, as delivered to watchers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key-value after the change (for a delete: key and mod_revision only).
    pub kv: KeyValue,
    /// The key-value before the change, when requested and still retained.
    pub prev_kv: Option<KeyValue>,
}

/// Position of one change: the store revision and its index inside that revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Revision {
    /// The global store revision (one per write transaction).
    pub main: i64,
    /// The change's index within the write transaction.
    pub sub: u32,
}

/// Returns the range end that selects every key with `prefix` (etcd's `GetPrefixRangeEnd`).
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.last_mut() {
        if *last < 0xff {
            *last += 1;
            return end;
        }
        end.pop();
    }
    // All bytes were 0xff (or empty): the range runs to the end of the key space.
    vec![0]
}

/// A key range as etcd encodes it: `end` empty selects `key` alone, `end == [0]`
/// selects every key `>= key`, otherwise `[key, end)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    /// First key.
    pub key: Bytes,
    /// End of the range (etcd encoding, see the type's doc).
    pub end: Bytes,
}

impl KeyRange {
    /// A range holding exactly one key.
    pub fn single(key: impl Into<Bytes>) -> Self {
        Self {
            key: key.into(),
            end: Bytes::new(),
        }
    }

    /// A range from `key` to `end` in etcd's encoding.
    pub fn new(key: impl Into<Bytes>, end: impl Into<Bytes>) -> Self {
        Self {
            key: key.into(),
            end: end.into(),
        }
    }

    /// Every key starting with `prefix`.
    pub fn prefix(prefix: impl Into<Bytes>) -> Self {
        let key: Bytes = prefix.into();
        let end = Bytes::from(prefix_range_end(&key));
        Self { key, end }
    }

    /// True when the range selects a single key.
    pub fn is_single(&self) -> bool {
        self.end.is_empty()
    }

    /// True when `k` is inside the range.
    pub fn contains(&self, k: &[u8]) -> bool {
        if self.end.is_empty() {
            return k == self.key.as_ref();
        }
        if k < self.key.as_ref() {
            return false;
        }
        self.end.as_ref() == [0] || k < self.end.as_ref()
    }

    /// The upper bound as an optional exclusive end (`None` = unbounded).
    pub(crate) fn upper(&self) -> Option<&[u8]> {
        if self.end.as_ref() == [0] {
            None
        } else {
            Some(self.end.as_ref())
        }
    }
}
