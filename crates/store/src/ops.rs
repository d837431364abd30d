//! Requests and responses of the KV API, in the store's own types (etcd semantics).

use bytes::Bytes;

use crate::types::{KeyRange, KeyValue};

/// Order of range results.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SortOrder {
    /// Key order (no sorting requested).
    #[default]
    None,
    /// Lowest target first.
    Ascend,
    /// Highest target first.
    Descend,
}

/// Field range results are sorted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SortTarget {
    /// The key.
    #[default]
    Key,
    /// The version.
    Version,
    /// The create revision.
    Create,
    /// The mod revision.
    Mod,
    /// The value.
    Value,
}

/// A range read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeRequest {
    /// Keys to read.
    pub range: Option<KeyRange>,
    /// Revision to read at; 0 or less means the current revision.
    pub revision: i64,
    /// Most keys returned; 0 means no limit.
    pub limit: i64,
    /// Sort order.
    pub sort_order: SortOrder,
    /// Sort field.
    pub sort_target: SortTarget,
    /// Return keys without values.
    pub keys_only: bool,
    /// Return only the count.
    pub count_only: bool,
    /// Drop keys with a lower mod revision (0 = no bound).
    pub min_mod_revision: i64,
    /// Drop keys with a higher mod revision (0 = no bound).
    pub max_mod_revision: i64,
    /// Drop keys with a lower create revision (0 = no bound).
    pub min_create_revision: i64,
    /// Drop keys with a higher create revision (0 = no bound).
    pub max_create_revision: i64,
}

/// The result of a range read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeResponse {
    /// The store's current revision.
    pub revision: i64,
    /// Matching key-values.
    pub kvs: Vec<KeyValue>,
    /// More keys matched than `limit` allowed.
    pub more: bool,
    /// Number of keys in the range (ignoring limit and filters).
    pub count: i64,
}

/// A put.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PutRequest {
    /// The key.
    pub key: Bytes,
    /// The value.
    pub value: Bytes,
    /// Lease to attach (0 = none).
    pub lease: i64,
    /// Return the previous key-value.
    pub prev_kv: bool,
    /// Keep the current value (the key must exist).
    pub ignore_value: bool,
    /// Keep the current lease (the key must exist).
    pub ignore_lease: bool,
}

/// The result of a put.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PutResponse {
    /// The revision of the write.
    pub revision: i64,
    /// The previous key-value, when requested and the key existed.
    pub prev_kv: Option<KeyValue>,
}

/// A delete of a key or range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeleteRequest {
    /// Keys to delete.
    pub range: KeyRange,
    /// Return the deleted key-values.
    pub prev_kv: bool,
}

/// The result of a delete.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeleteResponse {
    /// The store's revision after the delete.
    pub revision: i64,
    /// Number of keys deleted.
    pub deleted: i64,
    /// The deleted key-values, when requested.
    pub prev_kvs: Vec<KeyValue>,
}

/// How a compare relates the key's field to the given value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareResult {
    /// Field == value.
    Equal,
    /// Field > value.
    Greater,
    /// Field < value.
    Less,
    /// Field != value.
    NotEqual,
}

/// The field a compare inspects, with the value to compare against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompareTarget {
    /// The key's version.
    Version(i64),
    /// The key's create revision.
    Create(i64),
    /// The key's mod revision.
    Mod(i64),
    /// The key's value.
    Value(Bytes),
    /// The key's lease.
    Lease(i64),
}

/// One predicate of a txn guard, over a key or a range of keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    /// Key or range compared; every key in it must satisfy the compare.
    pub range: KeyRange,
    /// Relation.
    pub result: CompareResult,
    /// Field and value.
    pub target: CompareTarget,
}

/// One operation of a txn branch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestOp {
    /// A read.
    Range(RangeRequest),
    /// A put.
    Put(PutRequest),
    /// A delete.
    Delete(DeleteRequest),
    /// A nested txn.
    Txn(TxnRequest),
}

/// The result of one txn operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResponseOp {
    /// Result of a read.
    Range(RangeResponse),
    /// Result of a put.
    Put(PutResponse),
    /// Result of a delete.
    Delete(DeleteResponse),
    /// Result of a nested txn.
    Txn(TxnResponse),
}

/// A transaction: if every compare holds, run `success`, else `failure`; atomically, at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxnRequest {
    /// The guard.
    pub compare: Vec<Compare>,
    /// Operations run when the guard holds.
    pub success: Vec<RequestOp>,
    /// Operations run otherwise.
    pub failure: Vec<RequestOp>,
}

/// The result of a transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxnResponse {
    /// The store's revision after the txn.
    pub revision: i64,
    /// Whether the guard held.
    pub succeeded: bool,
    /// One response per executed operation.
    pub responses: Vec<ResponseOp>,
}

impl RequestOp {
    /// True when the operation may write.
    pub fn is_write(&self) -> bool {
        match self {
            RequestOp::Range(_) => false,
            RequestOp::Put(_) | RequestOp::Delete(_) => true,
            RequestOp::Txn(t) => t.is_write(),
        }
    }
}

impl TxnRequest {
    /// True when any branch may write.
    pub fn is_write(&self) -> bool {
        self.success
            .iter()
            .chain(&self.failure)
            .any(RequestOp::is_write)
    }
}
