#![allow(clippy::unwrap_used)]
//! Model test: random sequences of writes, reads, txns, compactions, lease grants and
//! revokes, and restarts, run against the store and against a small in-memory model of
//! etcd's semantics. Every response must match the model's.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use meshwork_store::ops::*;
use meshwork_store::{
    Event, EventKind, KeyRange, KeyValue, Store, StoreConfig, StoreError, WatchMessage, WatchSpec,
};
use proptest::prelude::*;

/// A small alphabet, so that keys, prefixes and ranges collide often.
const KEYS: &[&[u8]] = &[b"a", b"b", b"c", b"ab", b"ac", b"b\xff"];
const VALUES: &[&[u8]] = &[b"", b"x", b"y", b"zz"];
/// Long enough that no lease expires during a case.
const TTL_SECS: i64 = 3600;

// ---------------------------------------------------------------------------------------
// Generated operations.

#[derive(Clone, Debug)]
enum RangeSpec {
    Single(usize),
    Prefix(usize),
    /// `[KEYS[i], KEYS[j])` ordered so the range is valid.
    Between(usize, usize),
    From(usize),
    All,
    /// `[KEYS[i], KEYS[j])` as given: invalid unless `KEYS[i] < KEYS[j]`.
    Raw(usize, usize),
}

impl RangeSpec {
    fn build(&self) -> KeyRange {
        match *self {
            RangeSpec::Single(i) => KeyRange::single(KEYS[i]),
            RangeSpec::Prefix(i) => KeyRange::new(KEYS[i], model_prefix_end(KEYS[i])),
            RangeSpec::Between(i, j) => {
                let (a, b) = (KEYS[i], KEYS[j]);
                if a == b {
                    let mut end = a.to_vec();
                    end.push(0);
                    KeyRange::new(a, end)
                } else {
                    KeyRange::new(a.min(b), a.max(b))
                }
            }
            RangeSpec::From(i) => KeyRange::new(KEYS[i], &b"\0"[..]),
            RangeSpec::All => KeyRange::new(&b"\0"[..], &b"\0"[..]),
            RangeSpec::Raw(i, j) => KeyRange::new(KEYS[i], KEYS[j]),
        }
    }
}

/// A revision picked relative to the current one when the op runs: `0..=current + 1`.
type RevPick = u16;

fn pick(p: RevPick, current: i64) -> i64 {
    i64::from(p) % (current + 2)
}

#[derive(Clone, Debug)]
struct RangeOp {
    range: RangeSpec,
    revision: Option<RevPick>,
    limit: i64,
    sort_order: u8,
    sort_target: u8,
    keys_only: bool,
    count_only: bool,
    min_mod: Option<RevPick>,
    max_mod: Option<RevPick>,
    min_create: Option<RevPick>,
    max_create: Option<RevPick>,
}

#[derive(Clone, Debug)]
struct PutOp {
    key: usize,
    value: usize,
    lease: u8,
    prev_kv: bool,
    ignore_value: bool,
    ignore_lease: bool,
}

#[derive(Clone, Debug)]
struct CmpOp {
    range: RangeSpec,
    result: u8,
    target: u8,
    number: u16,
    value: usize,
}

#[derive(Clone, Debug)]
enum TxnOp {
    Range(RangeOp),
    Put(PutOp),
    Delete(RangeSpec, bool),
    /// A nested txn (one level deep).
    Txn(Vec<CmpOp>, Vec<TxnOp>, Vec<TxnOp>),
}

#[derive(Clone, Debug)]
enum Op {
    Put(PutOp),
    Delete(RangeSpec, bool),
    Range(RangeOp),
    Txn(Vec<CmpOp>, Vec<TxnOp>, Vec<TxnOp>),
    Compact(RevPick),
    Grant(u8),
    Revoke(u8),
    Reopen,
    /// Continue from a copy of the data directory taken while the store runs: the state
    /// a process crash leaves (the page cache survives; redb's own cache does not).
    Crash,
}

fn range_spec() -> impl Strategy<Value = RangeSpec> {
    let k = 0..KEYS.len();
    prop_oneof![
        4 => k.clone().prop_map(RangeSpec::Single),
        2 => k.clone().prop_map(RangeSpec::Prefix),
        2 => (k.clone(), k.clone()).prop_map(|(i, j)| RangeSpec::Between(i, j)),
        1 => k.prop_map(RangeSpec::From),
        1 => Just(RangeSpec::All),
    ]
}

fn range_spec_maybe_invalid() -> impl Strategy<Value = RangeSpec> {
    let k = 0..KEYS.len();
    prop_oneof![9 => range_spec(), 1 => (k.clone(), k).prop_map(|(i, j)| RangeSpec::Raw(i, j))]
}

fn range_op(top_level: bool) -> impl Strategy<Value = RangeOp> {
    let spec = if top_level {
        range_spec_maybe_invalid().boxed()
    } else {
        range_spec().boxed()
    };
    (
        spec,
        prop::option::weighted(0.4, any::<RevPick>()),
        prop_oneof![3 => Just(0i64), 1 => 1i64..4],
        (0u8..3, 0u8..5),
        (prop::bool::weighted(0.2), prop::bool::weighted(0.1)),
        prop::option::weighted(0.1, any::<RevPick>()),
        prop::option::weighted(0.1, any::<RevPick>()),
        prop::option::weighted(0.1, any::<RevPick>()),
        prop::option::weighted(0.1, any::<RevPick>()),
    )
        .prop_map(
            |(
                range,
                revision,
                limit,
                (sort_order, sort_target),
                (keys_only, count_only),
                min_mod,
                max_mod,
                min_create,
                max_create,
            )| {
                RangeOp {
                    range,
                    revision,
                    limit,
                    sort_order,
                    sort_target,
                    keys_only,
                    count_only,
                    min_mod,
                    max_mod,
                    min_create,
                    max_create,
                }
            },
        )
}

fn put_op(top_level: bool) -> impl Strategy<Value = PutOp> {
    (
        0..KEYS.len(),
        0..VALUES.len(),
        prop_oneof![3 => Just(0u8), 2 => 1u8..5],
        any::<bool>(),
        prop::bool::weighted(0.15),
        prop::bool::weighted(0.15),
    )
        .prop_map(
            move |(key, value, lease, prev_kv, ignore_value, ignore_lease)| {
                let mut p = PutOp {
                    key,
                    value,
                    lease,
                    prev_kv,
                    ignore_value,
                    ignore_lease,
                };
                if !top_level {
                    // Inside txns keep requests well-formed; the top level covers the shape errors.
                    if p.ignore_value {
                        p.value = 0;
                    }
                    if p.ignore_lease {
                        p.lease = 0;
                    }
                }
                p
            },
        )
}

fn cmp_op() -> impl Strategy<Value = CmpOp> {
    (range_spec(), 0u8..4, 0u8..5, any::<u16>(), 0..VALUES.len()).prop_map(
        |(range, result, target, number, value)| CmpOp {
            range,
            result,
            target,
            number,
            value,
        },
    )
}

fn flat_txn_op() -> impl Strategy<Value = TxnOp> {
    prop_oneof![
        2 => range_op(false).prop_map(TxnOp::Range),
        3 => put_op(false).prop_map(TxnOp::Put),
        1 => (range_spec(), any::<bool>()).prop_map(|(r, p)| TxnOp::Delete(r, p)),
    ]
}

fn txn_op() -> impl Strategy<Value = TxnOp> {
    prop_oneof![
        6 => flat_txn_op(),
        1 => (
            prop::collection::vec(cmp_op(), 0..2),
            prop::collection::vec(flat_txn_op(), 0..3),
            prop::collection::vec(flat_txn_op(), 0..3),
        )
            .prop_map(|(c, s, f)| TxnOp::Txn(c, s, f)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => put_op(true).prop_map(Op::Put),
        3 => (range_spec_maybe_invalid(), any::<bool>()).prop_map(|(r, p)| Op::Delete(r, p)),
        4 => range_op(true).prop_map(Op::Range),
        5 => (
            prop::collection::vec(cmp_op(), 0..3),
            prop::collection::vec(txn_op(), 0..4),
            prop::collection::vec(txn_op(), 0..3),
        )
            .prop_map(|(c, s, f)| Op::Txn(c, s, f)),
        2 => any::<RevPick>().prop_map(Op::Compact),
        2 => (0u8..5).prop_map(Op::Grant),
        1 => (1u8..5).prop_map(Op::Revoke),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

// ---------------------------------------------------------------------------------------
// The model.

fn model_prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last == 0xff {
            end.pop();
        } else {
            *end.last_mut().unwrap() += 1;
            return end;
        }
    }
    vec![0]
}

fn in_range(r: &KeyRange, k: &[u8]) -> bool {
    if r.end.is_empty() {
        return k == r.key.as_ref();
    }
    k >= r.key.as_ref() && (r.end.as_ref() == b"\0" || k < r.end.as_ref())
}

fn check_range(r: &KeyRange) -> Result<(), StoreError> {
    // etcd 3.4: an empty key is refused with or without a range end; an end at or
    // before the key is valid and selects nothing.
    if r.key.is_empty() {
        return Err(StoreError::EmptyKey);
    }
    Ok(())
}

fn check_put(p: &PutRequest) -> Result<(), StoreError> {
    if p.key.is_empty() {
        return Err(StoreError::EmptyKey);
    }
    if p.ignore_value && !p.value.is_empty() {
        return Err(StoreError::ValueProvided);
    }
    if p.ignore_lease && p.lease != 0 {
        return Err(StoreError::LeaseProvided);
    }
    Ok(())
}

#[derive(Debug)]
struct Model {
    /// Every change of every key, oldest first: `None` is a deletion. Never compacted:
    /// compaction only changes which revisions may be read.
    history: BTreeMap<Vec<u8>, Vec<(i64, Option<KeyValue>)>>,
    revision: i64,
    compact_revision: i64,
    leases: BTreeSet<i64>,
    /// The last lease ID the store chose (grant with ID 0).
    chosen_lease: Option<i64>,
    /// Every event, in commit order, with its previous key-value.
    events: Vec<Event>,
}

impl Model {
    /// A fresh store: revision 1, as etcd (its first write is revision 2).
    fn new() -> Self {
        Model {
            history: BTreeMap::new(),
            revision: 1,
            compact_revision: 0,
            leases: BTreeSet::new(),
            chosen_lease: None,
            events: Vec::new(),
        }
    }

    fn lease_id(&self, l: u8) -> i64 {
        match l {
            0 => 0,
            4 => self.chosen_lease.unwrap_or(4),
            n => i64::from(n),
        }
    }

    fn get(&self, key: &[u8], at: i64) -> Option<&KeyValue> {
        self.history
            .get(key)?
            .iter()
            .rev()
            .find(|(r, _)| *r <= at)?
            .1
            .as_ref()
    }

    fn live(&self, range: &KeyRange, at: i64) -> Vec<KeyValue> {
        self.history
            .keys()
            .filter(|k| in_range(range, k))
            .filter_map(|k| self.get(k, at).cloned())
            .collect()
    }

    fn read_revision(&self, requested: i64) -> Result<i64, StoreError> {
        let at = if requested <= 0 {
            self.revision
        } else {
            requested
        };
        if at > self.revision {
            return Err(StoreError::FutureRevision);
        }
        if at < self.compact_revision {
            return Err(StoreError::Compacted {
                compact_revision: self.compact_revision,
            });
        }
        Ok(at)
    }

    fn range_at(&self, r: &RangeRequest, at: i64, header: i64) -> RangeResponse {
        let all = self.live(r.range.as_ref().unwrap(), at);
        let count = all.len() as i64;
        if r.count_only {
            return RangeResponse {
                revision: header,
                kvs: Vec::new(),
                more: false,
                count,
            };
        }
        let mut kvs: Vec<KeyValue> = all
            .into_iter()
            .filter(|kv| r.min_mod_revision <= 0 || kv.mod_revision >= r.min_mod_revision)
            .filter(|kv| r.max_mod_revision <= 0 || kv.mod_revision <= r.max_mod_revision)
            .filter(|kv| r.min_create_revision <= 0 || kv.create_revision >= r.min_create_revision)
            .filter(|kv| r.max_create_revision <= 0 || kv.create_revision <= r.max_create_revision)
            .collect();
        // etcd's rule, stated as one total order rather than copied from the
        // implementation: by the target (ascending unless DESCEND; a target
        // other than KEY with order NONE sorts ascending), equal targets by key
        // ascending, in either direction (what etcd 3.4 answers).
        let descend = r.sort_order == SortOrder::Descend;
        let sorted = r.sort_order != SortOrder::None || r.sort_target != SortTarget::Key;
        if sorted {
            kvs.sort_by(|a, b| {
                let by_target = match r.sort_target {
                    SortTarget::Key => a.key.cmp(&b.key),
                    SortTarget::Version => a.version.cmp(&b.version),
                    SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                    SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                    SortTarget::Value => a.value.cmp(&b.value),
                };
                let by_target = if descend {
                    by_target.reverse()
                } else {
                    by_target
                };
                by_target.then_with(|| a.key.cmp(&b.key))
            });
        }
        let mut more = false;
        if r.limit > 0 && kvs.len() > r.limit as usize {
            kvs.truncate(r.limit as usize);
            more = true;
        }
        if r.keys_only {
            for kv in &mut kvs {
                kv.value = Bytes::new();
            }
        }
        RangeResponse {
            revision: header,
            kvs,
            more,
            count,
        }
    }

    fn range(&self, r: &RangeRequest) -> Result<RangeResponse, StoreError> {
        check_range(r.range.as_ref().unwrap())?;
        let at = self.read_revision(r.revision)?;
        Ok(self.range_at(r, at, self.revision))
    }

    /// Puts at revision `next` (validated by the caller); returns the previous key-value.
    fn apply_put(&mut self, p: &PutRequest, next: i64) -> Option<KeyValue> {
        let prev = self.get(&p.key, next).cloned();
        let value = if p.ignore_value {
            prev.as_ref().unwrap().value.clone()
        } else {
            p.value.clone()
        };
        let lease = if p.ignore_lease {
            prev.as_ref().unwrap().lease
        } else {
            p.lease
        };
        let (create_revision, version) = match &prev {
            Some(kv) => (kv.create_revision, kv.version + 1),
            None => (next, 1),
        };
        let kv = KeyValue {
            key: p.key.clone(),
            create_revision,
            mod_revision: next,
            version,
            value,
            lease,
        };
        self.history
            .entry(p.key.to_vec())
            .or_default()
            .push((next, Some(kv.clone())));
        self.events.push(Event {
            kind: EventKind::Put,
            kv,
            prev_kv: prev.clone(),
        });
        prev
    }

    fn tombstone(&mut self, prev: KeyValue, next: i64) {
        self.history
            .get_mut(prev.key.as_ref())
            .unwrap()
            .push((next, None));
        let kv = KeyValue {
            key: prev.key.clone(),
            mod_revision: next,
            ..KeyValue::default()
        };
        self.events.push(Event {
            kind: EventKind::Delete,
            kv,
            prev_kv: Some(prev),
        });
    }

    fn apply_delete(&mut self, range: &KeyRange, next: i64) -> Vec<KeyValue> {
        let victims = self.live(range, next);
        for kv in &victims {
            self.tombstone(kv.clone(), next);
        }
        victims
    }

    fn precheck_put(&self, p: &PutRequest) -> Result<(), StoreError> {
        if (p.ignore_value || p.ignore_lease) && self.get(&p.key, self.revision).is_none() {
            return Err(StoreError::KeyNotFound);
        }
        if p.lease != 0 && !self.leases.contains(&p.lease) {
            return Err(StoreError::LeaseNotFound);
        }
        Ok(())
    }

    fn put(&mut self, p: &PutRequest) -> Result<PutResponse, StoreError> {
        check_put(p)?;
        self.precheck_put(p)?;
        let next = self.revision + 1;
        let prev = self.apply_put(p, next);
        self.revision = next;
        Ok(PutResponse {
            revision: next,
            prev_kv: if p.prev_kv { prev } else { None },
        })
    }

    fn delete(&mut self, d: &DeleteRequest) -> Result<DeleteResponse, StoreError> {
        check_range(&d.range)?;
        let next = self.revision + 1;
        let victims = self.apply_delete(&d.range, next);
        if !victims.is_empty() {
            self.revision = next;
        }
        let deleted = victims.len() as i64;
        Ok(DeleteResponse {
            revision: self.revision,
            deleted,
            prev_kvs: if d.prev_kv { victims } else { Vec::new() },
        })
    }

    /// A branch's validation; returns the keys it may put and the ranges it may delete.
    /// A key may be written once: by one put of this level, or by one nested txn (whose
    /// two branches may share keys, as only one runs), and not inside a delete of this
    /// level or of another nested txn.
    fn check_branch(ops: &[RequestOp]) -> Result<(Vec<Bytes>, Vec<KeyRange>), StoreError> {
        let mut level_puts: Vec<Bytes> = Vec::new();
        let mut dels: Vec<KeyRange> = Vec::new();
        let mut nested: Vec<(Vec<Bytes>, Vec<KeyRange>)> = Vec::new();
        for op in ops {
            match op {
                RequestOp::Range(r) => check_range(r.range.as_ref().unwrap())?,
                RequestOp::Put(p) => {
                    check_put(p)?;
                    level_puts.push(p.key.clone());
                }
                RequestOp::Delete(d) => {
                    check_range(&d.range)?;
                    dels.push(d.range.clone());
                }
                RequestOp::Txn(t) => {
                    for c in &t.compare {
                        check_range(&c.range)?;
                    }
                    let (mut p1, d1) = Self::check_branch(&t.success)?;
                    let (p2, d2) = Self::check_branch(&t.failure)?;
                    p1.extend(p2);
                    p1.sort();
                    p1.dedup();
                    nested.push((p1, d1.into_iter().chain(d2).collect()));
                }
            }
        }
        let mut all_puts: Vec<&Bytes> = level_puts
            .iter()
            .chain(nested.iter().flat_map(|(p, _)| p))
            .collect();
        let n = all_puts.len();
        all_puts.sort();
        all_puts.dedup();
        if all_puts.len() != n {
            return Err(StoreError::DuplicateKey);
        }
        let all_dels = || dels.iter().chain(nested.iter().flat_map(|(_, d)| d));
        if level_puts
            .iter()
            .any(|k| all_dels().any(|d| in_range(d, k)))
        {
            return Err(StoreError::DuplicateKey);
        }
        for (i, (puts, _)) in nested.iter().enumerate() {
            let mut others = dels.iter().chain(
                nested
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .flat_map(|(_, (_, d))| d),
            );
            if others.any(|d| puts.iter().any(|k| in_range(d, k))) {
                return Err(StoreError::DuplicateKey);
            }
        }
        let every_del = all_dels().cloned().collect();
        Ok((all_puts.into_iter().cloned().collect(), every_del))
    }

    fn holds(c: &Compare, kv: &KeyValue) -> bool {
        let ord = match &c.target {
            CompareTarget::Version(v) => kv.version.cmp(v),
            CompareTarget::Create(v) => kv.create_revision.cmp(v),
            CompareTarget::Mod(v) => kv.mod_revision.cmp(v),
            CompareTarget::Lease(v) => kv.lease.cmp(v),
            CompareTarget::Value(v) => kv.value.cmp(v),
        };
        match c.result {
            CompareResult::Equal => ord.is_eq(),
            CompareResult::NotEqual => ord.is_ne(),
            CompareResult::Greater => ord.is_gt(),
            CompareResult::Less => ord.is_lt(),
        }
    }

    fn compare(&self, c: &Compare) -> bool {
        let kvs = self.live(&c.range, self.revision);
        if kvs.is_empty() {
            // etcd: a value compare on missing keys fails; other fields compare as zero.
            return !matches!(c.target, CompareTarget::Value(_))
                && Self::holds(c, &KeyValue::default());
        }
        kvs.iter().all(|kv| Self::holds(c, kv))
    }

    fn txn(&mut self, t: &TxnRequest) -> Result<TxnResponse, StoreError> {
        for c in &t.compare {
            check_range(&c.range)?;
        }
        Self::check_branch(&t.success)?;
        Self::check_branch(&t.failure)?;
        // Every (nested) guard is decided on the state before the txn, as etcd does.
        let plan = self.plan(t);
        let branch = if plan.succeeded {
            &t.success
        } else {
            &t.failure
        };
        self.precheck(branch, &plan)?;
        let next = self.revision + 1;
        let mut changed = false;
        let mut responses = self.exec(branch, &plan, next, &mut changed);
        if changed {
            self.revision = next;
        }
        set_revisions(&mut responses, self.revision);
        Ok(TxnResponse {
            revision: self.revision,
            succeeded: plan.succeeded,
            responses,
        })
    }

    fn plan(&self, t: &TxnRequest) -> Plan {
        let succeeded = t.compare.iter().all(|c| self.compare(c));
        let branch = if succeeded { &t.success } else { &t.failure };
        let nested = branch
            .iter()
            .filter_map(|op| match op {
                RequestOp::Txn(inner) => Some(self.plan(inner)),
                _ => None,
            })
            .collect();
        Plan { succeeded, nested }
    }

    /// etcd's checkTxn: ranges' revisions and puts' leases/keys, in op order, down the
    /// branches that will run.
    fn precheck(&self, ops: &[RequestOp], plan: &Plan) -> Result<(), StoreError> {
        let mut nested = plan.nested.iter();
        for op in ops {
            match op {
                RequestOp::Range(r) if r.revision > 0 => {
                    self.read_revision(r.revision)?;
                }
                RequestOp::Put(p) => self.precheck_put(p)?,
                RequestOp::Txn(t) => {
                    let np = nested.next().unwrap();
                    self.precheck(if np.succeeded { &t.success } else { &t.failure }, np)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn exec(
        &mut self,
        ops: &[RequestOp],
        plan: &Plan,
        next: i64,
        changed: &mut bool,
    ) -> Vec<ResponseOp> {
        let mut nested = plan.nested.iter();
        let mut responses = Vec::new();
        for op in ops {
            responses.push(match op {
                RequestOp::Range(r) => {
                    // Reads see the txn's own earlier writes, unless at an explicit revision.
                    let at = if r.revision > 0 { r.revision } else { next };
                    ResponseOp::Range(self.range_at(r, at, 0))
                }
                RequestOp::Put(p) => {
                    let prev = self.apply_put(p, next);
                    *changed = true;
                    ResponseOp::Put(PutResponse {
                        revision: 0,
                        prev_kv: if p.prev_kv { prev } else { None },
                    })
                }
                RequestOp::Delete(d) => {
                    let victims = self.apply_delete(&d.range, next);
                    *changed |= !victims.is_empty();
                    let deleted = victims.len() as i64;
                    ResponseOp::Delete(DeleteResponse {
                        revision: 0,
                        deleted,
                        prev_kvs: if d.prev_kv { victims } else { Vec::new() },
                    })
                }
                RequestOp::Txn(t) => {
                    let np = nested.next().unwrap();
                    let branch = if np.succeeded { &t.success } else { &t.failure };
                    ResponseOp::Txn(TxnResponse {
                        revision: 0,
                        succeeded: np.succeeded,
                        responses: self.exec(branch, np, next, changed),
                    })
                }
            });
        }
        responses
    }

    fn compact(&mut self, revision: i64) -> Result<i64, StoreError> {
        if revision <= self.compact_revision {
            return Err(StoreError::AlreadyCompacted);
        }
        if revision > self.revision {
            return Err(StoreError::FutureRevision);
        }
        self.compact_revision = revision;
        Ok(self.revision)
    }

    fn revoke(&mut self, id: i64) -> Result<i64, StoreError> {
        if !self.leases.remove(&id) {
            return Err(StoreError::LeaseNotFound);
        }
        let next = self.revision + 1;
        let attached: Vec<KeyValue> = self
            .live(&everything(), self.revision)
            .into_iter()
            .filter(|kv| kv.lease == id)
            .collect();
        for kv in &attached {
            self.tombstone(kv.clone(), next);
        }
        if !attached.is_empty() {
            self.revision = next;
        }
        Ok(self.revision)
    }
}

/// The branch every (nested) txn takes.
struct Plan {
    succeeded: bool,
    nested: Vec<Plan>,
}

/// Every response inside a txn reports the txn's final revision.
fn set_revisions(responses: &mut [ResponseOp], revision: i64) {
    for r in responses {
        match r {
            ResponseOp::Range(x) => x.revision = revision,
            ResponseOp::Put(x) => x.revision = revision,
            ResponseOp::Delete(x) => x.revision = revision,
            ResponseOp::Txn(x) => {
                x.revision = revision;
                set_revisions(&mut x.responses, revision);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Building requests.

fn build_range(model: &Model, r: &RangeOp) -> RangeRequest {
    let cur = model.revision;
    let opt = |p: Option<RevPick>| p.map(|p| pick(p, cur)).unwrap_or(0);
    RangeRequest {
        range: Some(r.range.build()),
        revision: opt(r.revision),
        limit: r.limit,
        sort_order: [SortOrder::None, SortOrder::Ascend, SortOrder::Descend][r.sort_order as usize],
        sort_target: [
            SortTarget::Key,
            SortTarget::Version,
            SortTarget::Create,
            SortTarget::Mod,
            SortTarget::Value,
        ][r.sort_target as usize],
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: opt(r.min_mod),
        max_mod_revision: opt(r.max_mod),
        min_create_revision: opt(r.min_create),
        max_create_revision: opt(r.max_create),
    }
}

fn build_put(model: &Model, p: &PutOp) -> PutRequest {
    PutRequest {
        key: Bytes::from_static(KEYS[p.key]),
        value: Bytes::from_static(VALUES[p.value]),
        lease: model.lease_id(p.lease),
        prev_kv: p.prev_kv,
        ignore_value: p.ignore_value,
        ignore_lease: p.ignore_lease,
    }
}

fn build_compare(model: &Model, c: &CmpOp) -> Compare {
    let result = [
        CompareResult::Equal,
        CompareResult::NotEqual,
        CompareResult::Greater,
        CompareResult::Less,
    ][c.result as usize];
    let target = match c.target {
        0 => CompareTarget::Version(i64::from(c.number % 4)),
        1 => CompareTarget::Create(pick(c.number, model.revision)),
        2 => CompareTarget::Mod(pick(c.number, model.revision)),
        3 => CompareTarget::Lease(model.lease_id((c.number % 5) as u8)),
        _ => CompareTarget::Value(Bytes::from_static(VALUES[c.value])),
    };
    Compare {
        range: c.range.build(),
        result,
        target,
    }
}

fn build_txn_ops(model: &Model, ops: &[TxnOp]) -> Vec<RequestOp> {
    ops.iter()
        .map(|op| match op {
            TxnOp::Range(r) => RequestOp::Range(build_range(model, r)),
            TxnOp::Put(p) => RequestOp::Put(build_put(model, p)),
            TxnOp::Delete(r, prev_kv) => RequestOp::Delete(DeleteRequest {
                range: r.build(),
                prev_kv: *prev_kv,
            }),
            TxnOp::Txn(c, s, f) => RequestOp::Txn(build_txn(model, c, s, f)),
        })
        .collect()
}

fn build_txn(model: &Model, c: &[CmpOp], s: &[TxnOp], f: &[TxnOp]) -> TxnRequest {
    TxnRequest {
        compare: c.iter().map(|c| build_compare(model, c)).collect(),
        success: build_txn_ops(model, s),
        failure: build_txn_ops(model, f),
    }
}

// ---------------------------------------------------------------------------------------
// The test.

fn everything() -> KeyRange {
    KeyRange::new(&b"\0"[..], &b"\0"[..])
}

fn all_at(revision: i64) -> RangeRequest {
    RangeRequest {
        range: Some(everything()),
        revision,
        ..RangeRequest::default()
    }
}

/// The store's whole state against the model's: current keys, revisions, leases.
fn check_state(store: &Store, model: &Model, when: &str) {
    assert_eq!(store.revision(), model.revision, "revision {when}");
    assert_eq!(
        store.compact_revision(),
        model.compact_revision,
        "compact revision {when}"
    );
    assert_eq!(
        store.lease_list(),
        model.leases.iter().copied().collect::<Vec<_>>(),
        "leases {when}"
    );
    assert_eq!(
        store.range(&all_at(0)),
        model.range(&all_at(0)),
        "all keys {when}"
    );
}

/// What the case's watcher asks for: keys, prev_kv, and 0 = all events, 1 = no puts,
/// 2 = no deletes.
type WatchParams = (RangeSpec, bool, u8);

/// A watcher opened at the start of each store epoch (open..close), replaying from just
/// above the compaction revision; it must deliver exactly the model's events, in order.
struct WatchCheck {
    _stream: meshwork_store::WatchStream,
    rx: tokio::sync::mpsc::Receiver<WatchMessage>,
    spec: WatchSpec,
    got: Vec<Event>,
}

impl WatchCheck {
    async fn open(store: &Store, model: &Model, params: &WatchParams) -> WatchCheck {
        let (range, prev_kv, filter) = params;
        let spec = WatchSpec {
            range: range.build(),
            start_revision: model.compact_revision + 1,
            prev_kv: *prev_kv,
            no_put: *filter == 1,
            no_delete: *filter == 2,
            progress_notify: false,
            watch_id: 0,
        };
        let (stream, mut rx) = store.watch_stream();
        let id = stream.create(spec.clone()).await.unwrap();
        let created = WatchMessage::Created {
            watch_id: id,
            revision: model.revision,
        };
        assert_eq!(recv(&mut rx).await, created);
        WatchCheck {
            _stream: stream,
            rx,
            spec,
            got: Vec::new(),
        }
    }

    fn wanted(&self, model: &Model) -> Vec<Event> {
        model
            .events
            .iter()
            .filter(|e| e.kv.mod_revision >= self.spec.start_revision)
            .filter(|e| in_range(&self.spec.range, &e.kv.key))
            .filter(|e| match e.kind {
                EventKind::Put => !self.spec.no_put,
                EventKind::Delete => !self.spec.no_delete,
            })
            .map(|e| Event {
                prev_kv: if self.spec.prev_kv {
                    e.prev_kv.clone()
                } else {
                    None
                },
                ..e.clone()
            })
            .collect()
    }

    async fn check(&mut self, store: &Store, model: &Model, params: &WatchParams, when: &str) {
        let mut want = self.wanted(model);
        while self.got.len() < want.len() {
            match recv(&mut self.rx).await {
                WatchMessage::Events { events, .. } => self.got.extend(events),
                WatchMessage::Canceled {
                    compact_revision, ..
                } if compact_revision > self.spec.start_revision
                    && compact_revision <= model.compact_revision =>
                {
                    // Compacted while still replaying: etcd cancels such a watcher. Start
                    // a new one above the compaction.
                    *self = WatchCheck::open(store, model, params).await;
                    want = self.wanted(model);
                }
                other => panic!("{when}: unexpected watch message {other:?}"),
            }
        }
        assert_eq!(self.got, want, "watch events {when}");
    }
}

async fn recv(rx: &mut tokio::sync::mpsc::Receiver<WatchMessage>) -> WatchMessage {
    tokio::time::timeout(std::time::Duration::from_secs(60), rx.recv())
        .await
        .expect("no watch message within the hang guard")
        .expect("watch stream closed")
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn run_case(fsync: bool, watch: WatchParams, ops: Vec<Op>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            fsync,
            ..StoreConfig::default()
        };
        let mut store = Store::open(dir.path(), cfg.clone()).unwrap();
        let mut model = Model::new();
        let mut watcher = WatchCheck::open(&store, &model, &watch).await;
        for (i, op) in ops.iter().enumerate() {
            let when = format!("after op #{i} {op:?}");
            match op {
                Op::Put(p) => {
                    let req = build_put(&model, p);
                    let want = model.put(&req);
                    assert_eq!(store.put(req).await, want, "{when}");
                }
                Op::Delete(r, prev_kv) => {
                    let req = DeleteRequest {
                        range: r.build(),
                        prev_kv: *prev_kv,
                    };
                    let want = model.delete(&req);
                    assert_eq!(store.delete(req).await, want, "{when}");
                }
                Op::Range(r) => {
                    let req = build_range(&model, r);
                    assert_eq!(store.range(&req), model.range(&req), "{when}: {req:?}");
                }
                Op::Txn(c, s, f) => {
                    let req = build_txn(&model, c, s, f);
                    let want = model.txn(&req);
                    assert_eq!(store.txn(req.clone()).await, want, "{when}: {req:?}");
                }
                Op::Compact(p) => {
                    let revision = pick(*p, model.revision);
                    let want = model.compact(revision);
                    assert_eq!(
                        store.compact(revision).await,
                        want,
                        "{when}: compact({revision})"
                    );
                }
                Op::Grant(l) => {
                    let id = model.lease_id(*l);
                    let got = store.lease_grant(id, TTL_SECS).await;
                    if id == 0 {
                        let (chosen, ttl, revision) = got.unwrap();
                        assert!(
                            chosen > 0 && !model.leases.contains(&chosen),
                            "{when}: chose {chosen}"
                        );
                        assert_eq!((ttl, revision), (TTL_SECS, model.revision), "{when}");
                        model.leases.insert(chosen);
                        model.chosen_lease = Some(chosen);
                    } else if model.leases.contains(&id) {
                        assert_eq!(got, Err(StoreError::LeaseExists), "{when}");
                    } else {
                        assert_eq!(got, Ok((id, TTL_SECS, model.revision)), "{when}");
                        model.leases.insert(id);
                    }
                }
                Op::Revoke(l) => {
                    let id = model.lease_id(*l);
                    let want = model.revoke(id);
                    assert_eq!(store.lease_revoke(id).await, want, "{when}: revoke({id})");
                }
                Op::Reopen => {
                    watcher.check(&store, &model, &watch, &when).await;
                    store.close().await;
                    assert_eq!(
                        store.range(&all_at(0)).err(),
                        Some(StoreError::Stopped),
                        "{when}: reads after close"
                    );
                    store = Store::open(dir.path(), cfg.clone()).unwrap();
                    check_state(&store, &model, &when);
                    watcher = WatchCheck::open(&store, &model, &watch).await;
                }
                Op::Crash => {
                    watcher.check(&store, &model, &watch, &when).await;
                    // Every write was answered, so the files are at rest.
                    let copy = tempfile::tempdir().unwrap();
                    copy_dir(dir.path(), copy.path());
                    store.close().await;
                    dir = copy;
                    store = Store::open(dir.path(), cfg.clone()).unwrap();
                    check_state(&store, &model, &when);
                    watcher = WatchCheck::open(&store, &model, &watch).await;
                }
            }
            watcher.check(&store, &model, &watch, &when).await;
        }
        check_state(&store, &model, "at the end");
        // Every retained revision reads as the model says; older ones are compacted.
        for at in 1..=model.revision + 1 {
            assert_eq!(
                store.range(&all_at(at)),
                model.range(&all_at(at)),
                "all keys at revision {at}"
            );
        }
        store.close().await;
        // Recovery gives the same state, history included.
        let store = Store::open(dir.path(), cfg).unwrap();
        check_state(&store, &model, "after the final reopen");
        for at in 1..=model.revision + 1 {
            assert_eq!(
                store.range(&all_at(at)),
                model.range(&all_at(at)),
                "all keys at revision {at} after reopen"
            );
        }
        store.close().await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, max_shrink_iters: 512, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_the_model(
        fsync in any::<bool>(),
        watch in (range_spec(), any::<bool>(), 0u8..3),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        run_case(fsync, watch, ops);
    }
}
