//! MVCC semantics shared by the read path and the committer: range evaluation,
//! txn compares, request validation, and applying writes to the index and storage.

use std::collections::HashSet;

use bytes::Bytes;

use crate::codec::Record;
use crate::config::StoreConfig;
use crate::error::{Result, StoreError};
use crate::index::{Entry, Index};
use crate::ops::*;
use crate::types::{KeyRange, KeyValue, Revision};

/// Reads a change record by its revision (from a read or a write transaction).
pub(crate) trait Fetch {
    fn fetch(&self, rev: Revision) -> Result<Option<Record>>;
}

/// Keys selected by a range, before values are read.
pub(crate) struct Selected {
    pub(crate) hits: Vec<(Bytes, Entry)>,
    pub(crate) count: i64,
    pub(crate) more: bool,
}

/// Checks a key range as etcd 3.4 does (`checkRangeRequest`, `checkDeleteRequest`):
/// the key must not be empty, with or without a range end. An empty key with an end
/// is *not* "from the start of the keyspace": etcd refuses it, and so must we, or
/// `del "" x` deletes every key below `x`. A range whose end sorts at or before its
/// key is valid and selects nothing (etcd answers an empty result; a delete of it
/// deletes nothing and makes no revision).
pub(crate) fn check_range(r: &KeyRange, cfg: &StoreConfig) -> Result<()> {
    if r.key.is_empty() {
        return Err(StoreError::EmptyKey);
    }
    check_key_size(&r.key, cfg)
}

pub(crate) fn check_key_size(key: &[u8], cfg: &StoreConfig) -> Result<()> {
    if key.len() > cfg.max_key_bytes {
        return Err(StoreError::KeyTooLarge {
            size: key.len(),
            limit: cfg.max_key_bytes,
        });
    }
    Ok(())
}

pub(crate) fn check_put(p: &PutRequest, cfg: &StoreConfig) -> Result<()> {
    if p.key.is_empty() {
        return Err(StoreError::EmptyKey);
    }
    check_key_size(&p.key, cfg)?;
    if p.value.len() > cfg.max_value_bytes {
        return Err(StoreError::ValueTooLarge {
            size: p.value.len(),
            limit: cfg.max_value_bytes,
        });
    }
    if p.ignore_value && !p.value.is_empty() {
        return Err(StoreError::ValueProvided);
    }
    if p.ignore_lease && p.lease != 0 {
        return Err(StoreError::LeaseProvided);
    }
    Ok(())
}

fn check_range_req(r: &RangeRequest, cfg: &StoreConfig) -> Result<()> {
    let range = r.range.as_ref().ok_or(StoreError::EmptyKey)?;
    // A negative limit means "no limit", as in etcd (`limit <= 0` reads everything).
    check_range(range, cfg)
}

/// Validates a txn as etcd does: op counts, request shapes, no key written twice.
pub(crate) fn check_txn(t: &TxnRequest, cfg: &StoreConfig) -> Result<()> {
    if t.compare.len() > cfg.max_txn_ops
        || t.success.len() > cfg.max_txn_ops
        || t.failure.len() > cfg.max_txn_ops
    {
        return Err(StoreError::TooManyOps);
    }
    for c in &t.compare {
        check_range(&c.range, cfg)?;
    }
    check_branch(&t.success, cfg)?;
    check_branch(&t.failure, cfg)?;
    Ok(())
}

/// Returns the keys put and ranges deleted by a branch, rejecting any key written twice.
fn check_branch(ops: &[RequestOp], cfg: &StoreConfig) -> Result<(HashSet<Bytes>, Vec<KeyRange>)> {
    let mut puts: HashSet<Bytes> = HashSet::new();
    let mut level_puts: Vec<Bytes> = Vec::new();
    let mut dels: Vec<KeyRange> = Vec::new();
    // Each nested txn's puts and deletes, both branches together.
    let mut nested: Vec<(HashSet<Bytes>, Vec<KeyRange>)> = Vec::new();
    for op in ops {
        match op {
            RequestOp::Range(r) => check_range_req(r, cfg)?,
            RequestOp::Put(p) => {
                check_put(p, cfg)?;
                if !puts.insert(p.key.clone()) {
                    return Err(StoreError::DuplicateKey);
                }
                level_puts.push(p.key.clone());
            }
            RequestOp::Delete(d) => {
                check_range(&d.range, cfg)?;
                dels.push(d.range.clone());
            }
            RequestOp::Txn(t) => {
                if t.compare.len() > cfg.max_txn_ops
                    || t.success.len() > cfg.max_txn_ops
                    || t.failure.len() > cfg.max_txn_ops
                {
                    return Err(StoreError::TooManyOps);
                }
                for c in &t.compare {
                    check_range(&c.range, cfg)?;
                }
                let (p1, d1) = check_branch(&t.success, cfg)?;
                let (p2, d2) = check_branch(&t.failure, cfg)?;
                // The two nested branches may share keys (only one runs); the parent may not.
                let nested_puts: HashSet<Bytes> = p1.into_iter().chain(p2).collect();
                for k in &nested_puts {
                    if !puts.insert(k.clone()) {
                        return Err(StoreError::DuplicateKey);
                    }
                }
                nested.push((nested_puts, d1.into_iter().chain(d2).collect()));
            }
        }
    }
    // This level's puts against every delete; a nested txn's puts against every delete
    // but its own (a put in one of its branches and a delete in the other is fine, as in
    // etcd: only one branch runs; each branch was checked on its own).
    for k in &level_puts {
        if dels
            .iter()
            .chain(nested.iter().flat_map(|(_, d)| d))
            .any(|d| d.contains(k))
        {
            return Err(StoreError::DuplicateKey);
        }
    }
    for (i, (nested_puts, _)) in nested.iter().enumerate() {
        let others = dels.iter().chain(
            nested
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .flat_map(|(_, (_, d))| d),
        );
        if nested_puts
            .iter()
            .any(|k| others.clone().any(|d| d.contains(k)))
        {
            return Err(StoreError::DuplicateKey);
        }
    }
    dels.extend(nested.into_iter().flat_map(|(_, d)| d));
    Ok((puts, dels))
}

/// Selects the keys a range reads at `rev` (validated by the caller), applying filters,
/// sort and limit on metadata; values are read afterwards.
pub(crate) fn select(index: &Index, r: &RangeRequest, rev: i64) -> Selected {
    let mut hits: Vec<(Bytes, Entry)> = Vec::new();
    let mut count = 0i64;
    let Some(range) = r.range.as_ref() else {
        return Selected {
            hits,
            count,
            more: false,
        };
    };
    let sorting = !(matches!(r.sort_order, SortOrder::None | SortOrder::Ascend)
        && r.sort_target == SortTarget::Key);
    // Without sorting, stop materialising after limit+1 hits (the +1 tells `more`).
    let cap = if r.limit > 0 && !sorting {
        r.limit as usize + 1
    } else {
        usize::MAX
    };
    index.for_each_live(range, rev, |k, e| {
        count += 1;
        if r.count_only {
            return true;
        }
        let keep = (r.min_mod_revision <= 0 || e.rev.main >= r.min_mod_revision)
            && (r.max_mod_revision <= 0 || e.rev.main <= r.max_mod_revision)
            && (r.min_create_revision <= 0 || e.create >= r.min_create_revision)
            && (r.max_create_revision <= 0 || e.create <= r.max_create_revision);
        if keep && hits.len() < cap {
            hits.push((Bytes::copy_from_slice(k), *e));
        }
        true
    });
    Selected {
        hits,
        count,
        more: false,
    }
}

/// Reads the values of selected keys, sorts and truncates: the range's response.
pub(crate) fn materialize(
    sel: Selected,
    r: &RangeRequest,
    f: &dyn Fetch,
    revision: i64,
    compact_rev: i64,
) -> Result<RangeResponse> {
    let mut kvs = Vec::with_capacity(sel.hits.len());
    let need_value = !r.keys_only || r.sort_target == SortTarget::Value;
    for (key, e) in sel.hits {
        let value = if need_value {
            match f.fetch(e.rev)? {
                Some(rec) => rec.kv.value,
                // Compacted between selection and read.
                None => {
                    return Err(StoreError::Compacted {
                        compact_revision: compact_rev,
                    });
                }
            }
        } else {
            Bytes::new()
        };
        kvs.push(KeyValue {
            key,
            create_revision: e.create,
            mod_revision: e.rev.main,
            version: e.version,
            value,
            lease: e.lease,
        });
    }
    let order = match (r.sort_order, r.sort_target) {
        (SortOrder::None, SortTarget::Key) => SortOrder::None,
        (SortOrder::None, _) => SortOrder::Ascend,
        (o, _) => o,
    };
    if order != SortOrder::None {
        // Stable sorts of the key-ordered hits: equal targets stay in key order
        // in both directions, as etcd answers (`--sort-by=VERSION --order=DESCEND`
        // lists keys of equal version a, c, d, not d, c, a).
        let desc = order == SortOrder::Descend;
        let dir = |o: std::cmp::Ordering| if desc { o.reverse() } else { o };
        match r.sort_target {
            SortTarget::Key if desc => kvs.reverse(),
            SortTarget::Key => {}
            SortTarget::Version => kvs.sort_by(|a, b| dir(a.version.cmp(&b.version))),
            SortTarget::Create => {
                kvs.sort_by(|a, b| dir(a.create_revision.cmp(&b.create_revision)));
            }
            SortTarget::Mod => kvs.sort_by(|a, b| dir(a.mod_revision.cmp(&b.mod_revision))),
            SortTarget::Value => kvs.sort_by(|a, b| dir(a.value.cmp(&b.value))),
        }
    }
    let mut more = sel.more;
    if r.limit > 0 && kvs.len() > r.limit as usize {
        kvs.truncate(r.limit as usize);
        more = true;
    }
    if r.keys_only {
        for kv in &mut kvs {
            kv.value = Bytes::new();
        }
    }
    Ok(RangeResponse {
        revision,
        kvs,
        more,
        count: sel.count,
    })
}

pub(crate) fn validate_range(r: &RangeRequest, cfg: &StoreConfig) -> Result<()> {
    check_range_req(r, cfg)
}

/// Evaluates one compare at `rev`.
pub(crate) fn compare(index: &Index, c: &Compare, rev: i64, f: &dyn Fetch) -> Result<bool> {
    let mut entries: Vec<Entry> = Vec::new();
    index.for_each_live(&c.range, rev, |_, e| {
        entries.push(*e);
        true
    });
    if entries.is_empty() {
        // etcd: a value compare on missing keys fails; other targets compare against zero.
        if matches!(c.target, CompareTarget::Value(_)) {
            return Ok(false);
        }
        return Ok(holds(
            c,
            &Entry {
                rev: Revision::default(),
                create: 0,
                version: 0,
                lease: 0,
            },
            None,
        ));
    }
    for e in entries {
        let value = if matches!(c.target, CompareTarget::Value(_)) {
            match f.fetch(e.rev)? {
                Some(rec) => Some(rec.kv.value),
                None => return Ok(false),
            }
        } else {
            None
        };
        if !holds(c, &e, value.as_ref()) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn holds(c: &Compare, e: &Entry, value: Option<&Bytes>) -> bool {
    use std::cmp::Ordering;
    let ord: Ordering = match &c.target {
        CompareTarget::Version(v) => e.version.cmp(v),
        CompareTarget::Create(v) => e.create.cmp(v),
        // A missing key's mod revision is 0 (the zero entry's revision).
        CompareTarget::Mod(v) => e.rev.main.cmp(v),
        CompareTarget::Lease(v) => e.lease.cmp(v),
        CompareTarget::Value(v) => value
            .map(|x| x.as_ref().cmp(v.as_ref()))
            .unwrap_or(Ordering::Less),
    };
    match c.result {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
    }
}

/// The branch each (nested) txn takes, decided on the state before the txn runs.
#[derive(Debug)]
pub(crate) struct Path {
    pub(crate) succeeded: bool,
    pub(crate) nested: Vec<Path>,
}

pub(crate) fn plan(index: &Index, t: &TxnRequest, rev: i64, f: &dyn Fetch) -> Result<Path> {
    let mut succeeded = true;
    for c in &t.compare {
        if !compare(index, c, rev, f)? {
            succeeded = false;
            break;
        }
    }
    let ops = if succeeded { &t.success } else { &t.failure };
    let mut nested = Vec::new();
    for op in ops {
        if let RequestOp::Txn(inner) = op {
            nested.push(plan(index, inner, rev, f)?);
        }
    }
    Ok(Path { succeeded, nested })
}

/// Checks, before anything is applied, what etcd checks: leases exist, keys exist
/// for `ignore_value`/`ignore_lease`, and ranges read a retained revision.
pub(crate) fn precheck(
    index: &Index,
    ops: &[RequestOp],
    path: &Path,
    rev: i64,
    compact: i64,
    lease_exists: &dyn Fn(i64) -> bool,
) -> Result<()> {
    let mut nested = path.nested.iter();
    for op in ops {
        match op {
            RequestOp::Put(p) => precheck_put(index, p, rev, lease_exists)?,
            RequestOp::Range(r) if r.revision > 0 => {
                if r.revision > rev {
                    return Err(StoreError::FutureRevision);
                }
                if r.revision < compact {
                    return Err(StoreError::Compacted {
                        compact_revision: compact,
                    });
                }
            }
            RequestOp::Txn(t) => {
                let Some(np) = nested.next() else { continue };
                let branch = if np.succeeded { &t.success } else { &t.failure };
                precheck(index, branch, np, rev, compact, lease_exists)?;
            }
            RequestOp::Range(_) | RequestOp::Delete(_) => {}
        }
    }
    Ok(())
}

/// The revision a range inside a txn reads at: its own, or the txn's.
pub(crate) fn txn_read_rev(r: &RangeRequest, txn_rev: i64) -> i64 {
    if r.revision > 0 { r.revision } else { txn_rev }
}

pub(crate) fn precheck_put(
    index: &Index,
    p: &PutRequest,
    rev: i64,
    lease_exists: &dyn Fn(i64) -> bool,
) -> Result<()> {
    if (p.ignore_value || p.ignore_lease) && index.get(&p.key, rev).is_none() {
        return Err(StoreError::KeyNotFound);
    }
    if p.lease != 0 && !lease_exists(p.lease) {
        return Err(StoreError::LeaseNotFound);
    }
    Ok(())
}
