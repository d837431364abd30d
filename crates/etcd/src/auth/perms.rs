//! A user's key permissions merged from all its roles: the union of the
//! ranges it may read and of those it may write, and the one question asked
//! of them, "is all of this range covered".
//!
//! A permission is etcd's: a single key (no range end), `[key, range_end)`,
//! or every key from `key` on (range end `"\0"`). A request's range is
//! covered when one merged interval holds all of it, so two adjacent grants
//! `[a, b)` and `[b, c)` together allow a read of `[a, c)`, as in etcd.

use crate::proto::authpb::{Permission, permission::Type};

/// One half-open interval `[start, end)`; `end == None` is "no upper bound".
#[derive(Clone, Debug, PartialEq, Eq)]
struct Interval {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Interval {
    /// The keys an etcd `(key, range_end)` pair names. A single key `k` is
    /// `[k, k\0)`: the only key in that interval is `k` itself.
    fn of(key: &[u8], range_end: &[u8]) -> Interval {
        let end = match range_end {
            [] => {
                let mut e = key.to_vec();
                e.push(0);
                Some(e)
            }
            [0] => None,
            _ if range_end <= key => {
                // An empty range reads nothing; ask for the first key alone.
                let mut e = key.to_vec();
                e.push(0);
                Some(e)
            }
            _ => Some(range_end.to_vec()),
        };
        Interval {
            start: key.to_vec(),
            end,
        }
    }
}

/// Sorted, disjoint, non-adjacent intervals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Union(Vec<Interval>);

impl Union {
    fn from_intervals(mut v: Vec<Interval>) -> Union {
        v.sort_by(|a, b| a.start.cmp(&b.start));
        let mut out: Vec<Interval> = Vec::with_capacity(v.len());
        for i in v {
            if let Some(last) = out.last_mut() {
                // Overlapping or touching: extend the last one.
                let touches = match &last.end {
                    None => true,
                    Some(e) => i.start <= *e,
                };
                if touches {
                    last.end = match (last.end.take(), i.end) {
                        (None, _) | (_, None) => None,
                        (Some(a), Some(b)) => Some(a.max(b)),
                    };
                    continue;
                }
            }
            out.push(i);
        }
        Union(out)
    }

    fn covers(&self, want: &Interval) -> bool {
        // The last interval starting at or before `want.start`.
        let idx = self.0.partition_point(|i| i.start <= want.start);
        let Some(i) = idx.checked_sub(1).and_then(|n| self.0.get(n)) else {
            return false;
        };
        match (&i.end, &want.end) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(have), Some(need)) => need <= have,
        }
    }
}

/// What a user may read and write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Perms {
    read: Union,
    write: Union,
}

impl Perms {
    /// Merges the permissions of every role a user holds.
    pub fn merge<'a>(perms: impl IntoIterator<Item = &'a Permission>) -> Perms {
        let (mut read, mut write) = (Vec::new(), Vec::new());
        for p in perms {
            let i = Interval::of(&p.key, &p.range_end);
            match Type::try_from(p.perm_type) {
                Ok(Type::Read) => read.push(i),
                Ok(Type::Write) => write.push(i),
                Ok(Type::Readwrite) => {
                    read.push(i.clone());
                    write.push(i);
                }
                // Never stored: the grant validates the type.
                Err(_) => {}
            }
        }
        Perms {
            read: Union::from_intervals(read),
            write: Union::from_intervals(write),
        }
    }

    /// Whether every key of `(key, range_end)` may be read.
    pub fn can_read(&self, key: &[u8], range_end: &[u8]) -> bool {
        self.read.covers(&Interval::of(key, range_end))
    }

    /// Whether every key of `(key, range_end)` may be written.
    pub fn can_write(&self, key: &[u8], range_end: &[u8]) -> bool {
        self.write.covers(&Interval::of(key, range_end))
    }
}

/// Whether `(key, range_end)` is a range a permission may name (etcd's
/// rules): a non-empty key, and no end, an end after the key, or `"\0"`.
pub fn valid_permission_range(key: &[u8], range_end: &[u8]) -> bool {
    !key.is_empty() && (range_end.is_empty() || range_end == [0] || key < range_end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn perm(t: Type, key: &str, end: &str) -> Permission {
        Permission {
            perm_type: t as i32,
            key: Bytes::copy_from_slice(key.as_bytes()),
            range_end: Bytes::copy_from_slice(end.as_bytes()),
        }
    }

    #[test]
    fn single_keys_ranges_and_open_ends() {
        let p = Perms::merge(&[
            perm(Type::Read, "a", ""),
            perm(Type::Readwrite, "b/", "b0"),
            perm(Type::Write, "z", "\0"),
        ]);
        assert!(p.can_read(b"a", b""));
        assert!(!p.can_read(b"a", b"b"), "a range is not the single key");
        assert!(!p.can_write(b"a", b""));
        assert!(p.can_read(b"b/x", b""));
        assert!(p.can_read(b"b/", b"b0"));
        assert!(p.can_read(b"b/a", b"b/b"));
        assert!(!p.can_read(b"b/", b"b1"));
        assert!(!p.can_read(b"b", b""));
        assert!(p.can_write(b"zzz", b""));
        assert!(p.can_write(b"z", b"\0"));
        assert!(!p.can_write(b"y", b"\0"));
        assert!(!p.can_read(b"z", b""));
        assert!(
            !p.can_read(b"\0", b"\0"),
            "no user but root reads everything"
        );
    }

    #[test]
    fn adjacent_and_overlapping_grants_join() {
        let p = Perms::merge(&[
            perm(Type::Read, "a", "c"),
            perm(Type::Read, "c", "e"),
            perm(Type::Read, "d", "f"),
            perm(Type::Read, "x", "y"),
        ]);
        assert!(p.can_read(b"a", b"f"));
        assert!(p.can_read(b"b", b"e"));
        assert!(!p.can_read(b"a", b"g"));
        assert!(!p.can_read(b"e", b"y"), "a gap between f and x");
        assert!(p.can_read(b"xa", b"xb"));
    }

    #[test]
    fn permission_ranges_are_validated_as_etcd_does() {
        assert!(valid_permission_range(b"a", b""));
        assert!(valid_permission_range(b"a", b"b"));
        assert!(valid_permission_range(b"a", b"\0"));
        assert!(!valid_permission_range(b"", b""));
        assert!(!valid_permission_range(b"", b"\0"));
        assert!(!valid_permission_range(b"b", b"a"));
        assert!(!valid_permission_range(b"a", b"a"));
    }
}
