//! Hashes, lists and sets: their commands, with Redis' replies and errors. A hash keeps
//! its fields in insertion order, as Redis' small hashes do; an aggregate left empty
//! is deleted, as in Redis.

use std::collections::{HashSet, VecDeque};

use bytes::Bytes;

use crate::cmd::{WRONGTYPE, int_of, wrong_args};
use crate::db::{Db, Entry, Shard, Value};
use crate::resp::Reply;

/// The aggregate kinds [`on`] works on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    List,
    Hash,
    Set,
    ZSet,
}

fn kind_of(v: &Value) -> Option<Kind> {
    match v {
        Value::List(_) => Some(Kind::List),
        Value::Hash(_) => Some(Kind::Hash),
        Value::Set(_) => Some(Kind::Set),
        Value::ZSet(_) => Some(Kind::ZSet),
        Value::Str(_) => None,
    }
}

fn empty(k: Kind) -> Value {
    match k {
        Kind::List => Value::List(VecDeque::new()),
        Kind::Hash => Value::Hash(Box::default()),
        Kind::Set => Value::Set(Box::default()),
        Kind::ZSet => Value::ZSet(Box::default()),
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::List(l) => l.is_empty(),
        Value::Hash(h) => h.is_empty(),
        Value::Set(s) => s.is_empty(),
        Value::ZSet(z) => z.is_empty(),
        Value::Str(_) => false,
    }
}

/// A stored copy (arguments are slices of the connection's read buffer).
fn own(b: &Bytes) -> Bytes {
    Bytes::copy_from_slice(b)
}

/// Runs `f` on the `k` value of `key`: an empty one when absent and `create` (stored
/// only if `f` leaves something), `Ok(None)` when absent otherwise, WRONGTYPE for a
/// value of another kind. A value left empty is deleted; the shard's byte count follows.
pub(crate) fn on<T>(
    sh: &mut Shard,
    key: &Bytes,
    now: u64,
    create: bool,
    k: Kind,
    f: impl FnOnce(&mut Value) -> T,
) -> Result<Option<T>, Reply> {
    // One lookup: the value's weight before and after `f` from the same entry.
    if let Some(e) = sh.get_mut(key, now) {
        if kind_of(&e.value) != Some(k) {
            return Err(Reply::Error(WRONGTYPE.into()));
        }
        let before = e.value.weight();
        let r = f(&mut e.value);
        if is_empty(&e.value) {
            sh.remove(key);
        } else {
            let after = e.value.weight();
            sh.resized(before, after);
        }
        return Ok(Some(r));
    }
    if !create {
        return Ok(None);
    }
    let mut v = empty(k);
    let r = f(&mut v);
    if !is_empty(&v) {
        sh.insert(key.clone(), Entry::new(v, None));
    }
    Ok(Some(r))
}

fn not_int() -> Reply {
    Reply::err(crate::cmd::NOT_INT)
}

/// Redis' range arithmetic: negative indexes from the end, clamped; `None` if empty.
pub(crate) fn range(len: usize, start: i64, stop: i64) -> Option<(usize, usize)> {
    let len = len as i64;
    let s = if start < 0 {
        (len + start).max(0)
    } else {
        start
    };
    let e = if stop < 0 {
        len + stop
    } else {
        stop.min(len - 1)
    };
    (s <= e && s < len && e >= 0).then_some((s as usize, e as usize))
}

/// How many entries an aggregate's `weight` samples: past it, the weight is the
/// sample's mean times the length (O(1) per write; a big list pushed to stays cheap).
const SAMPLE: usize = 32;

/// An aggregate's approximate weight from the sizes of (up to [`SAMPLE`] of) its
/// `len` entries. Deterministic for a given value, so a shard's total stays the sum
/// of its values' current weights however they change.
pub(crate) fn estimate(len: usize, sizes: impl Iterator<Item = usize>) -> usize {
    let (mut n, mut sum) = (0usize, 0usize);
    for s in sizes.take(SAMPLE) {
        n += 1;
        sum += s;
    }
    if n == 0 || n == len {
        sum
    } else {
        (sum as u128 * len as u128 / n as u128) as usize
    }
}

/// BLPOP/BRPOP's pop: the first of `keys` holding a non-empty list gives its first
/// (`left`) or last element; `None` when all are empty; WRONGTYPE for a key of another
/// type met before a list.
pub fn pop_first(
    db: &Db,
    keys: &[Bytes],
    left: bool,
    now: u64,
) -> Result<Option<(Bytes, Bytes)>, Reply> {
    for k in keys {
        let mut sh = db.lock(k);
        let popped = on(&mut sh, k, now, false, Kind::List, |v| match v {
            Value::List(l) if left => l.pop_front(),
            Value::List(l) => l.pop_back(),
            _ => None,
        })?;
        if let Some(Some(v)) = popped {
            return Ok(Some((k.clone(), v)));
        }
    }
    Ok(None)
}

/// Runs a hash, list or set command; `None` when `name` is none of them.
pub fn run(
    db: &Db,
    name: &str,
    args: &[Bytes],
    now: u64,
    rng: &mut impl FnMut(usize) -> usize,
) -> Option<Reply> {
    let key = args.get(1)?;
    let lock = || db.lock(key);
    let out = |r: Result<Reply, Reply>| r.unwrap_or_else(|e| e);
    let reply = match name {
        // ---- hashes ----
        "HSET" | "HMSET" => {
            if !args.len().is_multiple_of(2) {
                return Some(wrong_args(name));
            }
            let mut sh = lock();
            out(on(&mut sh, key, now, true, Kind::Hash, |v| {
                let Value::Hash(h) = v else { return 0 };
                let mut added = 0;
                for p in args[2..].chunks(2) {
                    added += i64::from(h.insert(own(&p[0]), own(&p[1])).is_none());
                }
                added
            })
            .map(|n| {
                if name == "HMSET" {
                    Reply::Simple("OK")
                } else {
                    Reply::Int(n.unwrap_or(0))
                }
            }))
        }
        "HSETNX" => {
            let mut sh = lock();
            out(on(&mut sh, key, now, true, Kind::Hash, |v| {
                let Value::Hash(h) = v else { return 0 };
                if h.contains_key(&args[2]) {
                    0
                } else {
                    h.insert(own(&args[2]), own(&args[3]));
                    1
                }
            })
            .map(|n| Reply::Int(n.unwrap_or(0))))
        }
        "HGET" | "HEXISTS" | "HSTRLEN" => {
            let mut sh = lock();
            out(on(&mut sh, key, now, false, Kind::Hash, |v| {
                let Value::Hash(h) = v else { return None };
                h.get(&args[2]).cloned()
            })
            .map(|found| {
                let found = found.flatten();
                match name {
                    "HGET" => found.map_or(Reply::Nil, Reply::Bulk),
                    "HEXISTS" => Reply::Int(i64::from(found.is_some())),
                    _ => Reply::Int(found.map_or(0, |b| b.len() as i64)),
                }
            }))
        }
        "HMGET" => {
            let mut sh = lock();
            out(on(&mut sh, key, now, false, Kind::Hash, |v| {
                let Value::Hash(h) = v else {
                    return Vec::new();
                };
                args[2..]
                    .iter()
                    .map(|f| h.get(f).cloned().map_or(Reply::Nil, Reply::Bulk))
                    .collect()
            })
            .map(|r| {
                Reply::Array(r.unwrap_or_else(|| args[2..].iter().map(|_| Reply::Nil).collect()))
            }))
        }
        "HDEL" => {
            let mut sh = lock();
            out(on(&mut sh, key, now, false, Kind::Hash, |v| {
                let Value::Hash(h) = v else { return 0 };
                args[2..]
                    .iter()
                    .map(|f| i64::from(h.shift_remove(f).is_some()))
                    .sum()
            })
            .map(|n| Reply::Int(n.unwrap_or(0))))
        }
        "HLEN" => {
            let mut sh = lock();
            out(on(&mut sh, key, now, false, Kind::Hash, |v| match v {
                Value::Hash(h) => h.len() as i64,
                _ => 0,
            })
            .map(|n| Reply::Int(n.unwrap_or(0))))
        }
        "HKEYS" | "HVALS" | "HGETALL" => {
            let mut sh = lock();
            out(on(&mut sh, key, now, false, Kind::Hash, |v| {
                let Value::Hash(h) = v else {
                    return Reply::Array(Vec::new());
                };
                match name {
                    "HKEYS" => Reply::Array(h.keys().cloned().map(Reply::Bulk).collect()),
                    "HVALS" => Reply::Array(h.values().cloned().map(Reply::Bulk).collect()),
                    _ => Reply::Map(
                        h.iter()
                            .map(|(k, v)| (Reply::Bulk(k.clone()), Reply::Bulk(v.clone())))
                            .collect(),
                    ),
                }
            })
            .map(|r| {
                r.unwrap_or_else(|| {
                    if name == "HGETALL" {
                        Reply::Map(Vec::new())
                    } else {
                        Reply::Array(Vec::new())
                    }
                })
            }))
        }
        "HINCRBY" => {
            let Some(by) = int_of(&args[3]) else {
                return Some(not_int());
            };
            let mut sh = lock();
            out(on(&mut sh, key, now, true, Kind::Hash, |v| {
                let Value::Hash(h) = v else {
                    return Err(not_int());
                };
                let cur = match h.get(&args[2]) {
                    None => 0,
                    Some(b) => {
                        int_of(b).ok_or_else(|| Reply::err("hash value is not an integer"))?
                    }
                };
                let n = cur
                    .checked_add(by)
                    .ok_or_else(|| Reply::err("increment or decrement would overflow"))?;
                h.insert(own(&args[2]), Bytes::from(n.to_string()));
                Ok(n)
            })
            .and_then(|r| r.unwrap_or(Ok(0)).map(Reply::Int)))
        }
        // ---- lists ----
        "LPUSH" | "RPUSH" | "LPUSHX" | "RPUSHX" => {
            let create = !name.ends_with('X');
            let left = name.starts_with('L');
            let mut sh = lock();
            out(on(&mut sh, key, now, create, Kind::List, |v| {
                let Value::List(l) = v else { return 0 };
                for a in &args[2..] {
                    if left {
                        l.push_front(own(a));
                    } else {
                        l.push_back(own(a));
                    }
                }
                l.len() as i64
            })
            .map(|n| {
                if n.is_some_and(|n| n > 0) {
                    db.pushed();
                }
                Reply::Int(n.unwrap_or(0))
            }))
        }
        "LPOP" | "RPOP" => {
            let count = match args.get(2) {
                None => None,
                Some(c) => match int_of(c) {
                    Some(n) if n >= 0 => Some(n as usize),
                    _ => return Some(Reply::err("value is out of range, must be positive")),
                },
            };
            if args.len() > 3 {
                return Some(wrong_args(name));
            }
            let left = name == "LPOP";
            let mut sh = lock();
            out(on(&mut sh, key, now, false, Kind::List, |v| {
                let Value::List(l) = v else {
                    return Reply::Nil;
                };
                let mut pop = || if left { l.pop_front() } else { l.pop_back() };
                match count {
                    None => pop().map_or(Reply::Nil, Reply::Bulk),
                    Some(n) => Reply::Array((0..n).map_while(|_| pop()).map(Reply::Bulk).collect()),
                }
            })
            .map(|r| {
                r.unwrap_or(if count.is_some() {
                    Reply::NilArray
                } else {
                    Reply::Nil
                })
            }))
        }
        "LLEN" => {
            let mut sh = lock();
            out(on(&mut sh, key, now, false, Kind::List, |v| match v {
                Value::List(l) => l.len() as i64,
                _ => 0,
            })
            .map(|n| Reply::Int(n.unwrap_or(0))))
        }
        "LINDEX" => {
            let Some(i) = int_of(&args[2]) else {
                return Some(not_int());
            };
            let mut sh = lock();
            out(on(&mut sh, key, now, false, Kind::List, |v| {
                let Value::List(l) = v else { return None };
                let idx = if i < 0 { l.len() as i64 + i } else { i };
                usize::try_from(idx).ok().and_then(|i| l.get(i)).cloned()
            })
            .map(|r| r.flatten().map_or(Reply::Nil, Reply::Bulk)))
        }
        "LRANGE" => {
            let (Some(s), Some(e)) = (int_of(&args[2]), int_of(&args[3])) else {
                return Some(not_int());
            };
            let mut sh = lock();
            out(on(&mut sh, key, now, false, Kind::List, |v| {
                let Value::List(l) = v else {
                    return Vec::new();
                };
                // Written here, in the array form both protocols share.
                let mut w = Vec::new();
                match range(l.len(), s, e) {
                    None => w.extend_from_slice(b"*0\r\n"),
                    Some((s, e)) => {
                        let items = l.range(s..=e);
                        let size: usize = 16 + items.clone().map(|b| b.len() + 16).sum::<usize>();
                        w.reserve(size);
                        crate::resp::head(&mut w, b'*', (e - s + 1) as i64);
                        for b in items {
                            crate::resp::bulk(&mut w, b);
                        }
                    }
                }
                w
            })
            .map(|r| r.map_or_else(|| Reply::Array(Vec::new()), Reply::Raw)))
        }
        "LSET" => {
            let Some(i) = int_of(&args[2]) else {
                return Some(not_int());
            };
            let mut sh = lock();
            match on(&mut sh, key, now, false, Kind::List, |v| {
                let Value::List(l) = v else { return false };
                let idx = if i < 0 { l.len() as i64 + i } else { i };
                match usize::try_from(idx).ok().and_then(|i| l.get_mut(i)) {
                    Some(slot) => {
                        *slot = own(&args[3]);
                        true
                    }
                    None => false,
                }
            }) {
                Ok(Some(true)) => Reply::Simple("OK"),
                Ok(Some(false)) => Reply::err("index out of range"),
                Ok(None) => Reply::err("no such key"),
                Err(e) => e,
            }
        }
        "LREM" => {
            let Some(count) = int_of(&args[2]) else {
                return Some(not_int());
            };
            let mut sh = lock();
            out(on(&mut sh, key, now, false, Kind::List, |v| {
                let Value::List(l) = v else { return 0 };
                let limit = if count == 0 {
                    usize::MAX
                } else {
                    count.unsigned_abs() as usize
                };
                let mut removed = 0;
                if count >= 0 {
                    let mut i = 0;
                    while i < l.len() && removed < limit {
                        if l[i] == args[3] {
                            l.remove(i);
                            removed += 1;
                        } else {
                            i += 1;
                        }
                    }
                } else {
                    let mut i = l.len();
                    while i > 0 && removed < limit {
                        i -= 1;
                        if l[i] == args[3] {
                            l.remove(i);
                            removed += 1;
                        }
                    }
                }
                removed as i64
            })
            .map(|n| Reply::Int(n.unwrap_or(0))))
        }
        "LTRIM" => {
            let (Some(s), Some(e)) = (int_of(&args[2]), int_of(&args[3])) else {
                return Some(not_int());
            };
            let mut sh = lock();
            out(on(&mut sh, key, now, false, Kind::List, |v| {
                let Value::List(l) = v else { return };
                match range(l.len(), s, e) {
                    Some((s, e)) => {
                        l.truncate(e + 1);
                        l.drain(..s);
                    }
                    None => l.clear(),
                }
            })
            .map(|_| Reply::Simple("OK")))
        }
        // ---- sets ----
        "SADD" => {
            let mut sh = lock();
            out(on(&mut sh, key, now, true, Kind::Set, |v| {
                let Value::Set(s) = v else { return 0 };
                args[2..].iter().map(|m| i64::from(s.insert(own(m)))).sum()
            })
            .map(|n| Reply::Int(n.unwrap_or(0))))
        }
        "SREM" => {
            let mut sh = lock();
            out(on(&mut sh, key, now, false, Kind::Set, |v| {
                let Value::Set(s) = v else { return 0 };
                args[2..].iter().map(|m| i64::from(s.swap_remove(m))).sum()
            })
            .map(|n| Reply::Int(n.unwrap_or(0))))
        }
        "SISMEMBER" | "SMISMEMBER" => {
            let mut sh = lock();
            out(on(&mut sh, key, now, false, Kind::Set, |v| {
                let Value::Set(s) = v else {
                    return Vec::new();
                };
                args[2..]
                    .iter()
                    .map(|m| i64::from(s.contains(m)))
                    .collect::<Vec<_>>()
            })
            .map(|r| {
                let r = r.unwrap_or_else(|| vec![0; args.len() - 2]);
                if name == "SISMEMBER" {
                    Reply::Int(r.first().copied().unwrap_or(0))
                } else {
                    Reply::Array(r.into_iter().map(Reply::Int).collect())
                }
            }))
        }
        "SCARD" => {
            let mut sh = lock();
            out(on(&mut sh, key, now, false, Kind::Set, |v| match v {
                Value::Set(s) => s.len() as i64,
                _ => 0,
            })
            .map(|n| Reply::Int(n.unwrap_or(0))))
        }
        "SMEMBERS" => {
            let mut sh = lock();
            out(on(&mut sh, key, now, false, Kind::Set, |v| match v {
                Value::Set(s) => s.iter().cloned().map(Reply::Bulk).collect(),
                _ => Vec::new(),
            })
            .map(|r| Reply::Set(r.unwrap_or_default())))
        }
        "SPOP" | "SRANDMEMBER" => {
            let count = match args.get(2) {
                None => None,
                Some(c) => match int_of(c) {
                    Some(n) if n >= 0 || name == "SRANDMEMBER" => Some(n),
                    Some(_) => return Some(Reply::err("value is out of range, must be positive")),
                    None => return Some(not_int()),
                },
            };
            if args.len() > 3 {
                return Some(wrong_args(name));
            }
            let pop = name == "SPOP";
            let mut sh = lock();
            out(on(&mut sh, key, now, false, Kind::Set, |v| {
                let Value::Set(s) = v else {
                    return Reply::Nil;
                };
                // O(1): a random position of the index set.
                let mut pick = |s: &indexmap::IndexSet<Bytes>| -> Option<Bytes> {
                    if s.is_empty() {
                        return None;
                    }
                    s.get_index(rng(s.len())).cloned()
                };
                match count {
                    None => {
                        let m = pick(s);
                        if pop && let Some(m) = &m {
                            s.swap_remove(m);
                        }
                        m.map_or(Reply::Nil, Reply::Bulk)
                    }
                    Some(n) if n < 0 => Reply::Array(
                        (0..n.unsigned_abs())
                            .filter_map(|_| pick(s))
                            .map(Reply::Bulk)
                            .collect(),
                    ),
                    Some(n) => {
                        let mut out = Vec::new();
                        if !pop && n as usize >= s.len() {
                            out.extend(s.iter().cloned());
                        } else {
                            let mut chosen: HashSet<Bytes> = HashSet::new();
                            while chosen.len() < (n as usize).min(s.len()) {
                                if let Some(m) = pick(s) {
                                    chosen.insert(m);
                                }
                            }
                            for m in chosen {
                                if pop {
                                    s.swap_remove(&m);
                                }
                                out.push(m);
                            }
                        }
                        let items = out.into_iter().map(Reply::Bulk).collect();
                        if pop {
                            Reply::Set(items)
                        } else {
                            Reply::Array(items)
                        }
                    }
                }
            })
            .map(|r| {
                r.unwrap_or(match count {
                    None => Reply::Nil,
                    Some(_) if pop => Reply::Set(Vec::new()),
                    Some(_) => Reply::Array(Vec::new()),
                })
            }))
        }
        _ => return None,
    };
    Some(reply)
}
