//! The KV service: Range, Put, DeleteRange, Txn, Compact.

use prost::Message;
use tonic::{Request, Response, Status};

use super::Ctx;
use crate::convert::{self, status};
use crate::proto::etcdserverpb as pb;
use meshwork_store::StoreError;

pub(crate) struct KvService(pub(crate) Ctx);

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
        let r = convert::range_in(req.into_inner())?;
        let resp = self.0.store.range(&r).map_err(status)?;
        Ok(Response::new(self.0.header.range_out(resp)))
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let p = req.into_inner();
        self.check_size(&p)?;
        let resp = self.0.store.put(convert::put_in(p)).await.map_err(status)?;
        Ok(Response::new(self.0.header.put_out(resp)))
    }

    async fn delete_range(
        &self,
        req: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let resp = self
            .0
            .store
            .delete(convert::delete_in(req.into_inner()))
            .await
            .map_err(status)?;
        Ok(Response::new(self.0.header.delete_out(resp)))
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let t = req.into_inner();
        self.check_size(&t)?;
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
