//! Small builders for transaction parts.

use bytes::Bytes;
use meshwork_etcd::proto::etcdserverpb as pb;
use pb::compare::{CompareResult, CompareTarget, TargetUnion};

fn cmp(key: Bytes, result: CompareResult, target: CompareTarget, u: TargetUnion) -> pb::Compare {
    pb::Compare {
        result: result as i32,
        target: target as i32,
        key,
        range_end: Bytes::new(),
        target_union: Some(u),
    }
}

/// `key` does not exist.
pub fn absent(key: impl Into<Bytes>) -> pb::Compare {
    cmp(
        key.into(),
        CompareResult::Equal,
        CompareTarget::Create,
        TargetUnion::CreateRevision(0),
    )
}

/// `key` exists.
pub fn exists(key: impl Into<Bytes>) -> pb::Compare {
    cmp(
        key.into(),
        CompareResult::Greater,
        CompareTarget::Create,
        TargetUnion::CreateRevision(0),
    )
}

/// `key` was last modified at `rev` (0 = does not exist).
pub fn mod_rev_is(key: impl Into<Bytes>, rev: i64) -> pb::Compare {
    cmp(
        key.into(),
        CompareResult::Equal,
        CompareTarget::Mod,
        TargetUnion::ModRevision(rev),
    )
}

/// `key` was created at `rev`.
pub fn create_rev_is(key: impl Into<Bytes>, rev: i64) -> pb::Compare {
    cmp(
        key.into(),
        CompareResult::Equal,
        CompareTarget::Create,
        TargetUnion::CreateRevision(rev),
    )
}

/// Put `value` at `key` on `lease` (0 = none).
pub fn put(key: impl Into<Bytes>, value: impl Into<Bytes>, lease: i64) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
            ..Default::default()
        })),
    }
}

/// Delete `key`.
pub fn delete(key: impl Into<Bytes>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestDeleteRange(
            pb::DeleteRangeRequest {
                key: key.into(),
                ..Default::default()
            },
        )),
    }
}

/// Read `key`.
pub fn get(key: impl Into<Bytes>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
            key: key.into(),
            ..Default::default()
        })),
    }
}

/// The key-values of the `i`-th response if it is a range.
pub fn range_kvs(r: &pb::TxnResponse, i: usize) -> Vec<super::KeyValue> {
    match r.responses.get(i).and_then(|o| o.response.as_ref()) {
        Some(pb::response_op::Response::ResponseRange(rr)) => rr.kvs.clone(),
        _ => Vec::new(),
    }
}

/// The revision the transaction committed at.
pub fn revision(r: &pb::TxnResponse) -> i64 {
    r.header.map(|h| h.revision).unwrap_or(0)
}
