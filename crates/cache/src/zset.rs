//! Sorted sets: members ordered by (score, member bytes), as Redis orders them, with
//! their commands, replies and errors. A member's score is found by hash; ranges walk
//! an ordered tree from their first element (by score: one seek; by rank: from the
//! nearer end). Scores are never NaN; -0 is kept as 0.

use std::collections::BTreeSet;

use indexmap::IndexMap;
use std::ops::Bound;

use bytes::Bytes;

use crate::cmd::{WRONGTYPE, float_of, int_of, upper};
use crate::db::{Db, Value};
use crate::resp::Reply;
use crate::types::{Kind, on, range};

/// A score with a total order (NaN never stored; -0 stored as 0).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Score(f64);

impl Eq for Score {}

impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Score {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

fn score(s: f64) -> Score {
    Score(if s == 0.0 { 0.0 } else { s })
}

/// A sorted set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ZSet {
    scores: IndexMap<Bytes, f64>,
    order: BTreeSet<(Score, Bytes)>,
}

/// A score range (`ZRANGEBYSCORE`'s `min max`, `(` for exclusive).
#[derive(Clone, Copy, Debug)]
pub struct ScoreRange {
    min: f64,
    max: f64,
    min_ex: bool,
    max_ex: bool,
}

impl ScoreRange {
    /// Parses `min max` as Redis does (`(1.5`, `-inf`, `+inf`).
    pub fn parse(min: &[u8], max: &[u8]) -> Option<ScoreRange> {
        let one = |b: &[u8]| match b.strip_prefix(b"(") {
            Some(rest) => float_of(rest).map(|v| (v, true)),
            None => float_of(b).map(|v| (v, false)),
        };
        let ((min, min_ex), (max, max_ex)) = (one(min)?, one(max)?);
        Some(ScoreRange {
            min,
            max,
            min_ex,
            max_ex,
        })
    }

    fn above_min(&self, s: f64) -> bool {
        if self.min_ex {
            s > self.min
        } else {
            s >= self.min
        }
    }

    fn below_max(&self, s: f64) -> bool {
        if self.max_ex {
            s < self.max
        } else {
            s <= self.max
        }
    }

    fn empty(&self) -> bool {
        self.min > self.max || (self.min == self.max && (self.min_ex || self.max_ex))
    }
}

/// One end of a lex range.
#[derive(Clone, Debug)]
enum Lex {
    Min,
    Max,
    In(Bytes),
    Ex(Bytes),
}

/// A lex range (`ZRANGEBYLEX`'s `[a (b - +`).
#[derive(Clone, Debug)]
pub struct LexRange {
    min: Lex,
    max: Lex,
}

impl LexRange {
    /// Parses `min max` as Redis does; `None` for anything else.
    pub fn parse(min: &Bytes, max: &Bytes) -> Option<LexRange> {
        let one = |b: &Bytes| match b.first()? {
            b'-' if b.len() == 1 => Some(Lex::Min),
            b'+' if b.len() == 1 => Some(Lex::Max),
            b'[' => Some(Lex::In(b.slice(1..))),
            b'(' => Some(Lex::Ex(b.slice(1..))),
            _ => None,
        };
        Some(LexRange {
            min: one(min)?,
            max: one(max)?,
        })
    }

    fn above_min(&self, m: &[u8]) -> bool {
        match &self.min {
            Lex::Min => true,
            Lex::Max => false,
            Lex::In(b) => m >= &b[..],
            Lex::Ex(b) => m > &b[..],
        }
    }

    fn below_max(&self, m: &[u8]) -> bool {
        match &self.max {
            Lex::Min => false,
            Lex::Max => true,
            Lex::In(b) => m <= &b[..],
            Lex::Ex(b) => m < &b[..],
        }
    }
}

/// What a range command selects.
#[derive(Clone, Debug)]
pub enum Select {
    /// By rank, Redis' index arithmetic (negative from the end).
    Rank(i64, i64),
    /// By score.
    Score(ScoreRange),
    /// By member bytes (meant for members of one score).
    Lex(LexRange),
}

/// What `ZADD` did to one member.
enum Added {
    New,
    Changed,
    Same,
    Skipped,
    Nan,
}

impl ZSet {
    /// Members.
    pub fn len(&self) -> usize {
        self.scores.len()
    }

    /// Whether it has no member.
    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }

    /// A member's score.
    pub fn score(&self, m: &[u8]) -> Option<f64> {
        self.scores.get(m).copied()
    }

    /// Sets a member's score (adding it); whether it was new.
    pub fn insert(&mut self, m: Bytes, s: f64) -> bool {
        let s = score(s);
        match self.scores.insert(m.clone(), s.0) {
            Some(old) => {
                if old != s.0 {
                    self.order.remove(&(Score(old), m.clone()));
                    self.order.insert((s, m));
                }
                false
            }
            None => {
                self.order.insert((s, m));
                true
            }
        }
    }

    /// Removes a member; whether it was there.
    pub fn remove(&mut self, m: &[u8]) -> bool {
        match self.scores.swap_remove_entry(m) {
            Some((k, s)) => {
                self.order.remove(&(Score(s), k));
                true
            }
            None => false,
        }
    }

    /// A member's rank (from the highest score when `rev`).
    pub fn rank(&self, m: &[u8], rev: bool) -> Option<usize> {
        let s = self.score(m)?;
        let below = self
            .order
            .range(..(Score(s), Bytes::copy_from_slice(m)))
            .count();
        Some(if rev { self.len() - 1 - below } else { below })
    }

    /// Pops the lowest (or highest) member.
    pub fn pop(&mut self, max: bool) -> Option<(Bytes, f64)> {
        let (s, m) = if max {
            self.order.pop_last()?
        } else {
            self.order.pop_first()?
        };
        self.scores.swap_remove(&m);
        Some((m, s.0))
    }

    /// The member at position `i` of the member index (not score order: what
    /// `ZSCAN` walks; a removal moves the last member into the gap).
    pub fn member_at(&self, i: usize) -> Option<(&Bytes, f64)> {
        self.scores.get_index(i).map(|(m, s)| (m, *s))
    }

    /// Every member from the lowest score.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&Bytes, f64)> {
        self.order.iter().map(|(s, m)| (m, s.0))
    }

    /// The members `sel` selects, in order (reversed when `rev`), after skipping
    /// `offset` and up to `limit` of them (negative: no limit; a negative offset
    /// selects nothing, as in Redis).
    pub fn select(&self, sel: &Select, rev: bool, offset: i64, limit: i64) -> Vec<(Bytes, f64)> {
        if offset < 0 {
            return Vec::new();
        }
        let take = if limit < 0 {
            usize::MAX
        } else {
            limit as usize
        };
        let out = |it: &mut dyn Iterator<Item = &(Score, Bytes)>| -> Vec<(Bytes, f64)> {
            it.skip(offset as usize)
                .take(take)
                .map(|(s, m)| (m.clone(), s.0))
                .collect()
        };
        match sel {
            Select::Rank(start, stop) => {
                let Some((s, e)) = range(self.len(), *start, *stop) else {
                    return Vec::new();
                };
                // From the nearer end.
                let n = e - s + 1;
                if rev {
                    out(&mut self.order.iter().rev().skip(s).take(n))
                } else if s > self.len() / 2 {
                    let mut v: Vec<_> = self
                        .order
                        .iter()
                        .rev()
                        .skip(self.len() - 1 - e)
                        .take(n)
                        .map(|(sc, m)| (m.clone(), sc.0))
                        .collect();
                    v.reverse();
                    v
                } else {
                    out(&mut self.order.iter().skip(s).take(n))
                }
            }
            Select::Score(r) if r.empty() => Vec::new(),
            Select::Score(r) => {
                if rev {
                    let upper = if r.max == f64::INFINITY {
                        Bound::Unbounded
                    } else {
                        Bound::Excluded((score(r.max.next_up()), Bytes::new()))
                    };
                    out(&mut self
                        .order
                        .range((Bound::Unbounded, upper))
                        .rev()
                        .skip_while(|(s, _)| !r.below_max(s.0))
                        .take_while(|(s, _)| r.above_min(s.0)))
                } else {
                    out(&mut self
                        .order
                        .range((Score(r.min), Bytes::new())..)
                        .skip_while(|(s, _)| !r.above_min(s.0))
                        .take_while(|(s, _)| r.below_max(s.0)))
                }
            }
            Select::Lex(r) => {
                if rev {
                    out(&mut self
                        .order
                        .iter()
                        .rev()
                        .skip_while(|(_, m)| !r.below_max(m))
                        .take_while(|(_, m)| r.above_min(m)))
                } else {
                    out(&mut self
                        .order
                        .iter()
                        .skip_while(|(_, m)| !r.above_min(m))
                        .take_while(|(_, m)| r.below_max(m)))
                }
            }
        }
    }

    /// Approximate bytes (for `used_memory`): sampled, see [`crate::types::estimate`].
    pub fn weight(&self) -> usize {
        crate::types::estimate(self.len(), self.scores.keys().map(|m| 2 * m.len() + 96))
    }

    fn add(&mut self, m: &Bytes, s: f64, f: &Flags) -> (Added, f64) {
        match self.score(m) {
            Some(_) if f.nx => (Added::Skipped, 0.0),
            Some(cur) => {
                let new = if f.incr { cur + s } else { s };
                if new.is_nan() {
                    return (Added::Nan, 0.0);
                }
                if (f.lt && new >= cur) || (f.gt && new <= cur) {
                    return (Added::Skipped, 0.0);
                }
                if new == cur {
                    return (Added::Same, new);
                }
                self.insert(m.clone(), new);
                (Added::Changed, new)
            }
            None if f.xx => (Added::Skipped, 0.0),
            None => {
                self.insert(Bytes::copy_from_slice(m), s);
                (Added::New, s)
            }
        }
    }
}

#[derive(Default)]
struct Flags {
    nx: bool,
    xx: bool,
    gt: bool,
    lt: bool,
    ch: bool,
    incr: bool,
}

fn syntax() -> Reply {
    Reply::err("syntax error")
}

fn not_float() -> Reply {
    Reply::err("value is not a valid float")
}

fn not_int() -> Reply {
    Reply::err(crate::cmd::NOT_INT)
}

/// `member, score` pairs: a flat array in RESP2, pairs in RESP3.
fn with_scores(items: Vec<(Bytes, f64)>, scores: bool) -> Reply {
    if scores {
        Reply::Pairs(
            items
                .into_iter()
                .map(|(m, s)| (Reply::Bulk(m), Reply::Double(s)))
                .collect(),
        )
    } else {
        Reply::Array(items.into_iter().map(|(m, _)| Reply::Bulk(m)).collect())
    }
}

fn zset_of(v: &mut Value) -> Option<&mut ZSet> {
    match v {
        Value::ZSet(z) => Some(z),
        _ => None,
    }
}

/// Runs a sorted-set command; `None` when `name` is none of them.
pub fn run(db: &Db, name: &str, args: &[Bytes], now: u64) -> Option<Reply> {
    let key = args.get(1)?;
    let out = |r: Result<Reply, Reply>| r.unwrap_or_else(|e| e);
    let read = |f: &mut dyn FnMut(&ZSet) -> Reply, absent: Reply| -> Reply {
        let mut sh = db.lock(key);
        match sh.get(key, now) {
            None => absent,
            Some(e) => match &e.value {
                Value::ZSet(z) => f(z),
                _ => Reply::Error(WRONGTYPE.into()),
            },
        }
    };
    let reply = match name {
        "ZADD" | "ZINCRBY" => {
            let mut f = Flags::default();
            let mut i = 2;
            if name == "ZINCRBY" {
                f.incr = true;
            } else {
                while i < args.len() {
                    match upper(&args[i]).as_str() {
                        "NX" => f.nx = true,
                        "XX" => f.xx = true,
                        "GT" => f.gt = true,
                        "LT" => f.lt = true,
                        "CH" => f.ch = true,
                        "INCR" => f.incr = true,
                        _ => break,
                    }
                    i += 1;
                }
            }
            let pairs = &args[i..];
            if pairs.is_empty() || !pairs.len().is_multiple_of(2) {
                return Some(syntax());
            }
            if f.nx && f.xx {
                return Some(Reply::err(
                    "XX and NX options at the same time are not compatible",
                ));
            }
            if (f.nx && (f.gt || f.lt)) || (f.gt && f.lt) {
                return Some(Reply::err(
                    "GT, LT, and/or NX options at the same time are not compatible",
                ));
            }
            if f.incr && pairs.len() > 2 {
                return Some(Reply::err(
                    "INCR option supports a single increment-element pair",
                ));
            }
            let mut parsed = Vec::with_capacity(pairs.len() / 2);
            for p in pairs.chunks(2) {
                match float_of(&p[0]) {
                    Some(s) => parsed.push((s, &p[1])),
                    None => return Some(not_float()),
                }
            }
            let mut sh = db.lock(key);
            let done = on(&mut sh, key, now, !f.xx, Kind::ZSet, |v| {
                let Some(z) = zset_of(v) else {
                    return Err(Reply::Error(WRONGTYPE.into()));
                };
                let (mut added, mut changed, mut processed, mut last) = (0, 0, 0, 0.0);
                for (s, m) in &parsed {
                    let (what, new) = z.add(m, *s, &f);
                    match what {
                        Added::Nan => {
                            return Err(Reply::err("resulting score is not a number (NaN)"));
                        }
                        Added::New => added += 1,
                        Added::Changed => changed += 1,
                        Added::Same | Added::Skipped => {}
                    }
                    if !matches!(what, Added::Skipped) {
                        processed += 1;
                        last = new;
                    }
                }
                Ok((added, changed, processed, last))
            });
            out(done.and_then(|r| {
                let (added, changed, processed, last) = r.unwrap_or(Ok((0, 0, 0, 0.0)))?;
                Ok(if f.incr {
                    if processed > 0 {
                        Reply::Double(last)
                    } else {
                        Reply::Nil
                    }
                } else {
                    Reply::Int(if f.ch { added + changed } else { added })
                })
            }))
        }
        "ZREM" => {
            let mut sh = db.lock(key);
            out(on(&mut sh, key, now, false, Kind::ZSet, |v| {
                zset_of(v).map_or(0, |z| {
                    args[2..].iter().map(|m| i64::from(z.remove(m))).sum()
                })
            })
            .map(|n| Reply::Int(n.unwrap_or(0))))
        }
        "ZCARD" => read(&mut |z| Reply::Int(z.len() as i64), Reply::Int(0)),
        "ZSCORE" => read(
            &mut |z| z.score(&args[2]).map_or(Reply::Nil, Reply::Double),
            Reply::Nil,
        ),
        "ZMSCORE" => read(
            &mut |z| {
                Reply::Array(
                    args[2..]
                        .iter()
                        .map(|m| z.score(m).map_or(Reply::Nil, Reply::Double))
                        .collect(),
                )
            },
            Reply::Array(args[2..].iter().map(|_| Reply::Nil).collect()),
        ),
        "ZRANK" | "ZREVRANK" => read(
            &mut |z| {
                z.rank(&args[2], name == "ZREVRANK")
                    .map_or(Reply::Nil, |r| Reply::Int(r as i64))
            },
            Reply::Nil,
        ),
        "ZCOUNT" | "ZLEXCOUNT" => {
            let sel = if name == "ZCOUNT" {
                match ScoreRange::parse(&args[2], &args[3]) {
                    Some(r) => Select::Score(r),
                    None => return Some(Reply::err("min or max is not a float")),
                }
            } else {
                match LexRange::parse(&args[2], &args[3]) {
                    Some(r) => Select::Lex(r),
                    None => return Some(Reply::err("min or max not valid string range item")),
                }
            };
            read(
                &mut |z| Reply::Int(z.select(&sel, false, 0, -1).len() as i64),
                Reply::Int(0),
            )
        }
        "ZRANGE" | "ZREVRANGE" | "ZRANGEBYSCORE" | "ZREVRANGEBYSCORE" | "ZRANGEBYLEX"
        | "ZREVRANGEBYLEX" => {
            let (by, rev) = match name {
                "ZRANGE" => (None, None),
                "ZREVRANGE" => (Some("RANK"), Some(true)),
                "ZRANGEBYSCORE" => (Some("BYSCORE"), Some(false)),
                "ZREVRANGEBYSCORE" => (Some("BYSCORE"), Some(true)),
                "ZRANGEBYLEX" => (Some("BYLEX"), Some(false)),
                _ => (Some("BYLEX"), Some(true)),
            };
            zrange(&read, args, by, rev)
        }
        "ZREMRANGEBYRANK" | "ZREMRANGEBYSCORE" | "ZREMRANGEBYLEX" => {
            let sel = match name {
                "ZREMRANGEBYRANK" => match (int_of(&args[2]), int_of(&args[3])) {
                    (Some(a), Some(b)) => Select::Rank(a, b),
                    _ => return Some(not_int()),
                },
                "ZREMRANGEBYSCORE" => match ScoreRange::parse(&args[2], &args[3]) {
                    Some(r) => Select::Score(r),
                    None => return Some(Reply::err("min or max is not a float")),
                },
                _ => match LexRange::parse(&args[2], &args[3]) {
                    Some(r) => Select::Lex(r),
                    None => return Some(Reply::err("min or max not valid string range item")),
                },
            };
            let mut sh = db.lock(key);
            out(on(&mut sh, key, now, false, Kind::ZSet, |v| {
                zset_of(v).map_or(0, |z| {
                    let gone = z.select(&sel, false, 0, -1);
                    for (m, _) in &gone {
                        z.remove(m);
                    }
                    gone.len() as i64
                })
            })
            .map(|n| Reply::Int(n.unwrap_or(0))))
        }
        "ZPOPMIN" | "ZPOPMAX" => {
            let count = match args.get(2) {
                None => None,
                Some(c) => match int_of(c) {
                    Some(n) if n >= 0 => Some(n as usize),
                    _ => return Some(Reply::err("value is out of range, must be positive")),
                },
            };
            if args.len() > 3 {
                return Some(syntax());
            }
            let mut sh = db.lock(key);
            out(on(&mut sh, key, now, false, Kind::ZSet, |v| {
                let Some(z) = zset_of(v) else {
                    return Vec::new();
                };
                (0..count.unwrap_or(1))
                    .map_while(|_| z.pop(name == "ZPOPMAX"))
                    .collect()
            })
            .map(|popped| {
                let popped = popped.unwrap_or_default();
                match count {
                    // One member (or none): a flat pair in both protocols.
                    None => Reply::Array(
                        popped
                            .into_iter()
                            .flat_map(|(m, s)| [Reply::Bulk(m), Reply::Double(s)])
                            .collect(),
                    ),
                    Some(_) => with_scores(popped, true),
                }
            }))
        }
        _ => return None,
    };
    Some(reply)
}

/// Runs a function on the key's sorted set under its shard's lock, or answers the
/// second argument when the key is absent (WRONGTYPE for another type).
type Reader<'a> = &'a dyn Fn(&mut dyn FnMut(&ZSet) -> Reply, Reply) -> Reply;

/// `ZRANGE key start stop [BYSCORE|BYLEX] [REV] [LIMIT offset count] [WITHSCORES]`
/// and its older forms (`by`/`rev` fixed by the command's name), with Redis' order of
/// checks and its errors.
fn zrange(read: Reader<'_>, args: &[Bytes], mut by: Option<&str>, mut rev: Option<bool>) -> Reply {
    let fixed_rev = rev.is_some();
    let fixed_by = by.is_some();
    let (mut scores, mut offset, mut limit) = (false, 0i64, -1i64);
    let mut i = 4;
    while i < args.len() {
        let left = args.len() - i - 1;
        match upper(&args[i]).as_str() {
            "WITHSCORES" => scores = true,
            "LIMIT" if left >= 2 => {
                match (int_of(&args[i + 1]), int_of(&args[i + 2])) {
                    (Some(o), Some(l)) => (offset, limit) = (o, l),
                    _ => return not_int(),
                }
                i += 2;
            }
            "REV" if !fixed_rev && rev.is_none() => rev = Some(true),
            "BYLEX" if !fixed_by && by.is_none() => by = Some("BYLEX"),
            "BYSCORE" if !fixed_by && by.is_none() => by = Some("BYSCORE"),
            _ => return syntax(),
        }
        i += 1;
    }
    let rev = rev.unwrap_or(false);
    let by = by.unwrap_or("RANK");
    let limited = i64::from(limit != -1 || offset != 0);
    if limited == 1 && by == "RANK" {
        return Reply::err(
            "syntax error, LIMIT is only supported in combination with either BYSCORE or BYLEX",
        );
    }
    if scores && by == "BYLEX" {
        return Reply::err("syntax error, WITHSCORES not supported in combination with BYLEX");
    }
    let (lo, hi) = if rev && by != "RANK" {
        (&args[3], &args[2])
    } else {
        (&args[2], &args[3])
    };
    let sel = match by {
        "RANK" => match (int_of(lo), int_of(hi)) {
            (Some(a), Some(b)) => Select::Rank(a, b),
            _ => return not_int(),
        },
        "BYSCORE" => match ScoreRange::parse(lo, hi) {
            Some(r) => Select::Score(r),
            None => return Reply::err("min or max is not a float"),
        },
        _ => match LexRange::parse(lo, hi) {
            Some(r) => Select::Lex(r),
            None => return Reply::err("min or max not valid string range item"),
        },
    };
    read(
        &mut |z| with_scores(z.select(&sel, rev, offset, limit), scores),
        Reply::Array(Vec::new()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn z(items: &[(f64, &str)]) -> ZSet {
        let mut z = ZSet::default();
        for (s, m) in items {
            z.insert(Bytes::copy_from_slice(m.as_bytes()), *s);
        }
        z
    }

    fn names(v: Vec<(Bytes, f64)>) -> Vec<String> {
        v.into_iter()
            .map(|(m, _)| String::from_utf8_lossy(&m).into_owned())
            .collect()
    }

    #[test]
    fn order_ranks_and_ranges() {
        let mut s = z(&[(2.0, "b"), (1.0, "c"), (2.0, "a"), (f64::INFINITY, "z")]);
        assert_eq!(
            names(s.select(&Select::Rank(0, -1), false, 0, -1)),
            ["c", "a", "b", "z"]
        );
        assert_eq!(
            names(s.select(&Select::Rank(0, 1), true, 0, -1)),
            ["z", "b"]
        );
        assert_eq!(
            names(s.select(&Select::Rank(2, 3), false, 0, -1)),
            ["b", "z"]
        );
        assert_eq!(s.rank(b"b", false), Some(2));
        assert_eq!(s.rank(b"b", true), Some(1));
        let r = ScoreRange::parse(b"(1", b"+inf").unwrap();
        assert_eq!(
            names(s.select(&Select::Score(r), false, 0, -1)),
            ["a", "b", "z"]
        );
        assert_eq!(names(s.select(&Select::Score(r), true, 1, 1)), ["b"]);
        let r = ScoreRange::parse(b"-inf", b"(2").unwrap();
        assert_eq!(names(s.select(&Select::Score(r), true, 0, -1)), ["c"]);
        s.insert(Bytes::from_static(b"c"), 5.0);
        assert_eq!(
            names(s.select(&Select::Rank(0, -1), false, 0, -1)),
            ["a", "b", "c", "z"]
        );
        assert!(s.remove(b"a"));
        assert_eq!(s.pop(false).map(|p| p.1), Some(2.0));
        assert_eq!(s.len(), 2);
        let mut zero = ZSet::default();
        zero.insert(Bytes::from_static(b"m"), -0.0);
        assert_eq!(zero.score(b"m").map(f64::is_sign_negative), Some(false));
    }
}
