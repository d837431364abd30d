//! The KV service: Range, Put, DeleteRange, Txn, Compact.

use prost::Message;
use tonic::{Request, Response, Status};

use super::Ctx;
use crate::auth::{AuthError, Caller};
use crate::convert::{self, status};
use crate::proto::etcdserverpb as pb;
use meshwork_store::StoreError;

pub(crate) struct KvService(pub(crate) Ctx);

/// May `c` put `p`: write on the key, read too for the previous value, and
/// (as etcd) write on every key already on the lease it attaches, since a
/// lease's holder can delete them all by revoking it.
pub(crate) fn check_put(ctx: &Ctx, c: &Caller, p: &pb::PutRequest) -> Result<(), AuthError> {
    c.write(&p.key, b"")?;
    if p.prev_kv {
        c.read(&p.key, b"")?;
    }
    if p.lease != 0 {
        check_lease_keys(ctx, c, p.lease)?;
    }
    Ok(())
}

/// May `c` write every key attached to `lease` (to attach to or revoke it).
pub(crate) fn check_lease_keys(ctx: &Ctx, c: &Caller, lease: i64) -> Result<(), AuthError> {
    if c.admin().is_ok() {
        return Ok(());
    }
    if let Some(info) = ctx.store.lease_time_to_live(lease, true) {
        for k in &info.keys {
            c.write(k, b"")?;
        }
    }
    Ok(())
}

/// May `c` run `t`: read on every compare, and each operation of both
/// branches (nested txns included) as if sent alone.
fn check_txn(ctx: &Ctx, c: &Caller, t: &pb::TxnRequest) -> Result<(), AuthError> {
    use pb::request_op::Request as Op;
    for cmp in &t.compare {
        c.read(&cmp.key, &cmp.range_end)?;
    }
    for op in t.success.iter().chain(&t.failure) {
        match &op.request {
            Some(Op::RequestRange(r)) => c.read(&r.key, &r.range_end)?,
            Some(Op::RequestPut(p)) => check_put(ctx, c, p)?,
            Some(Op::RequestDeleteRange(d)) => {
                c.write(&d.key, &d.range_end)?;
                if d.prev_kv {
                    c.read(&d.key, &d.range_end)?;
                }
            }
            Some(Op::RequestTxn(inner)) => check_txn(ctx, c, inner)?,
            None => {}
        }
    }
    Ok(())
}

impl KvService {
    fn check_size(&self, m: &impl Message) -> Result<(), Status> {
        if m.encoded_len() > self.0.store.config().max_request_bytes {
            return Err(status(StoreError::RequestTooLarge));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    async fn range(
        &self,
        req: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let c = self.0.caller(&req)?;
        let r = req.into_inner();
        c.read(&r.key, &r.range_end)?;
        let r = convert::range_in(r)?;
        let resp = self.0.store.range(&r).map_err(status)?;
        Ok(Response::new(self.0.header.range_out(resp)))
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let c = self.0.caller(&req)?;
        let p = req.into_inner();
        self.check_size(&p)?;
        check_put(&self.0, &c, &p)?;
        let resp = self.0.store.put(convert::put_in(p)).await.map_err(status)?;
        Ok(Response::new(self.0.header.put_out(resp)))
    }

    async fn delete_range(
        &self,
        req: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let c = self.0.caller(&req)?;
        let d = req.into_inner();
        c.write(&d.key, &d.range_end)?;
        if d.prev_kv {
            c.read(&d.key, &d.range_end)?;
        }
        let resp = self
            .0
            .store
            .delete(convert::delete_in(d))
            .await
            .map_err(status)?;
        Ok(Response::new(self.0.header.delete_out(resp)))
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let c = self.0.caller(&req)?;
        let t = req.into_inner();
        self.check_size(&t)?;
        check_txn(&self.0, &c, &t)?;
        let resp = self
            .0
            .store
            .txn(convert::txn_in(t)?)
            .await
            .map_err(status)?;
        Ok(Response::new(self.0.header.txn_out(resp)))
    }

    async fn compact(
        &self,
        req: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        self.0.caller(&req)?.admin()?;
        let revision = self
            .0
            .store
            .compact(req.into_inner().revision)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CompactionResponse {
            header: self.0.header.at(revision),
        }))
    }
}
