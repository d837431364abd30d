//! Conversions between the etcd protobuf messages and the store's types, and the
//! mapping of store errors to the gRPC status codes and messages etcd uses.

use meshwork_store::ops::*;
use meshwork_store::{Event, EventKind, KeyRange, KeyValue, StoreError};
use tonic::{Code, Status};

use crate::proto::etcdserverpb as pb;
use crate::proto::mvccpb;

/// Maps a store error to the status etcd answers with.
pub fn status(e: StoreError) -> Status {
    let code = match &e {
        StoreError::Compacted { .. }
        | StoreError::AlreadyCompacted
        | StoreError::FutureRevision => Code::OutOfRange,
        StoreError::LeaseNotFound => Code::NotFound,
        StoreError::LeaseExists => Code::FailedPrecondition,
        StoreError::LeaseTtlTooLarge => Code::OutOfRange,
        StoreError::NoSpace => Code::ResourceExhausted,
        StoreError::Storage(_) => Code::Internal,
        StoreError::Stopped | StoreError::Exhausted(_) => Code::Unavailable,
        StoreError::Corrupt => Code::DataLoss,
        StoreError::KeyNotFound
        | StoreError::TooManyOps
        | StoreError::DuplicateKey
        | StoreError::EmptyKey
        | StoreError::ValueProvided
        | StoreError::LeaseProvided
        | StoreError::KeyTooLarge { .. }
        | StoreError::ValueTooLarge { .. }
        | StoreError::RequestTooLarge
        | StoreError::InvalidArgument(_) => Code::InvalidArgument,
    };
    Status::new(code, e.to_string())
}

/// Store key-value to wire.
pub fn kv_out(kv: KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: kv.key,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: kv.value,
        lease: kv.lease,
    }
}

/// Wire key-value to store.
pub fn kv_in(kv: mvccpb::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: kv.value,
        lease: kv.lease,
    }
}

/// Store event to wire.
pub fn event_out(e: Event) -> mvccpb::Event {
    mvccpb::Event {
        r#type: match e.kind {
            EventKind::Put => mvccpb::event::EventType::Put as i32,
            EventKind::Delete => mvccpb::event::EventType::Delete as i32,
        },
        kv: Some(kv_out(e.kv)),
        prev_kv: e.prev_kv.map(kv_out),
    }
}

/// A range request to the store.
pub fn range_in(r: pb::RangeRequest) -> Result<RangeRequest, Status> {
    use pb::range_request::{SortOrder as O, SortTarget as T};
    let sort_order = match O::try_from(r.sort_order) {
        Ok(O::None) => SortOrder::None,
        Ok(O::Ascend) => SortOrder::Ascend,
        Ok(O::Descend) => SortOrder::Descend,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "etcdserver: invalid sort order {}",
                r.sort_order
            )));
        }
    };
    let sort_target = match T::try_from(r.sort_target) {
        Ok(T::Key) => SortTarget::Key,
        Ok(T::Version) => SortTarget::Version,
        Ok(T::Create) => SortTarget::Create,
        Ok(T::Mod) => SortTarget::Mod,
        Ok(T::Value) => SortTarget::Value,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "etcdserver: invalid sort target {}",
                r.sort_target
            )));
        }
    };
    Ok(RangeRequest {
        range: Some(KeyRange::new(r.key, r.range_end)),
        revision: r.revision,
        limit: r.limit,
        sort_order,
        sort_target,
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: r.min_mod_revision,
        max_mod_revision: r.max_mod_revision,
        min_create_revision: r.min_create_revision,
        max_create_revision: r.max_create_revision,
    })
}

/// A put request to the store.
pub fn put_in(p: pb::PutRequest) -> PutRequest {
    PutRequest {
        key: p.key,
        value: p.value,
        lease: p.lease,
        prev_kv: p.prev_kv,
        ignore_value: p.ignore_value,
        ignore_lease: p.ignore_lease,
    }
}

/// A delete request to the store.
pub fn delete_in(d: pb::DeleteRangeRequest) -> DeleteRequest {
    DeleteRequest {
        range: KeyRange::new(d.key, d.range_end),
        prev_kv: d.prev_kv,
    }
}

fn compare_in(c: pb::Compare) -> Result<Compare, Status> {
    use pb::compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
    let result = match R::try_from(c.result) {
        Ok(R::Equal) => CompareResult::Equal,
        Ok(R::Greater) => CompareResult::Greater,
        Ok(R::Less) => CompareResult::Less,
        Ok(R::NotEqual) => CompareResult::NotEqual,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "etcdserver: invalid compare result {}",
                c.result
            )));
        }
    };
    let target = match (T::try_from(c.target), c.target_union) {
        (Ok(T::Version), Some(U::Version(v))) => CompareTarget::Version(v),
        (Ok(T::Version), None) => CompareTarget::Version(0),
        (Ok(T::Create), Some(U::CreateRevision(v))) => CompareTarget::Create(v),
        (Ok(T::Create), None) => CompareTarget::Create(0),
        (Ok(T::Mod), Some(U::ModRevision(v))) => CompareTarget::Mod(v),
        (Ok(T::Mod), None) => CompareTarget::Mod(0),
        (Ok(T::Value), Some(U::Value(v))) => CompareTarget::Value(v),
        (Ok(T::Value), None) => CompareTarget::Value(Default::default()),
        (Ok(T::Lease), Some(U::Lease(v))) => CompareTarget::Lease(v),
        (Ok(T::Lease), None) => CompareTarget::Lease(0),
        (Ok(t), Some(_)) => {
            return Err(Status::invalid_argument(format!(
                "etcdserver: compare target {t:?} does not match the value given"
            )));
        }
        (Err(_), _) => {
            return Err(Status::invalid_argument(format!(
                "etcdserver: invalid compare target {}",
                c.target
            )));
        }
    };
    Ok(Compare {
        range: KeyRange::new(c.key, c.range_end),
        result,
        target,
    })
}

fn op_in(op: pb::RequestOp) -> Result<RequestOp, Status> {
    use pb::request_op::Request;
    match op.request {
        Some(Request::RequestRange(r)) => Ok(RequestOp::Range(range_in(r)?)),
        Some(Request::RequestPut(p)) => Ok(RequestOp::Put(put_in(p))),
        Some(Request::RequestDeleteRange(d)) => Ok(RequestOp::Delete(delete_in(d))),
        Some(Request::RequestTxn(t)) => Ok(RequestOp::Txn(txn_in(t)?)),
        // etcd 3.4 (`checkRequestOp`): an empty op answers ErrGRPCKeyNotFound.
        None => Err(status(StoreError::KeyNotFound)),
    }
}

/// A txn request to the store.
pub fn txn_in(t: pb::TxnRequest) -> Result<TxnRequest, Status> {
    Ok(TxnRequest {
        compare: t
            .compare
            .into_iter()
            .map(compare_in)
            .collect::<Result<_, _>>()?,
        success: t.success.into_iter().map(op_in).collect::<Result<_, _>>()?,
        failure: t.failure.into_iter().map(op_in).collect::<Result<_, _>>()?,
    })
}

/// Builds response headers.
#[derive(Clone, Copy, Debug)]
pub struct Header {
    /// Cluster ID.
    pub cluster_id: u64,
    /// Member ID.
    pub member_id: u64,
    /// Raft term reported (constant on a single node).
    pub raft_term: u64,
}

impl Header {
    /// A header at `revision`.
    pub fn at(&self, revision: i64) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision,
            raft_term: self.raft_term,
        })
    }

    /// A range response.
    pub fn range_out(&self, r: RangeResponse) -> pb::RangeResponse {
        pb::RangeResponse {
            header: self.at(r.revision),
            kvs: r.kvs.into_iter().map(kv_out).collect(),
            more: r.more,
            count: r.count,
        }
    }

    /// A put response.
    pub fn put_out(&self, r: PutResponse) -> pb::PutResponse {
        pb::PutResponse {
            header: self.at(r.revision),
            prev_kv: r.prev_kv.map(kv_out),
        }
    }

    /// A delete response.
    pub fn delete_out(&self, r: DeleteResponse) -> pb::DeleteRangeResponse {
        pb::DeleteRangeResponse {
            header: self.at(r.revision),
            deleted: r.deleted,
            prev_kvs: r.prev_kvs.into_iter().map(kv_out).collect(),
        }
    }

    /// A txn response.
    pub fn txn_out(&self, r: TxnResponse) -> pb::TxnResponse {
        use pb::response_op::Response;
        let responses = r
            .responses
            .into_iter()
            .map(|op| pb::ResponseOp {
                response: Some(match op {
                    ResponseOp::Range(x) => Response::ResponseRange(self.range_out(x)),
                    ResponseOp::Put(x) => Response::ResponsePut(self.put_out(x)),
                    ResponseOp::Delete(x) => Response::ResponseDeleteRange(self.delete_out(x)),
                    ResponseOp::Txn(x) => Response::ResponseTxn(self.txn_out(x)),
                }),
            })
            .collect();
        pb::TxnResponse {
            header: self.at(r.revision),
            succeeded: r.succeeded,
            responses,
        }
    }
}
