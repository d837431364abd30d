//! The Lease service: grant, revoke, keep-alive streams, time-to-live, list.

use std::pin::Pin;

use futures_util::Stream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::Ctx;
use crate::convert::status;
use crate::proto::etcdserverpb as pb;

pub(crate) struct LeaseService(pub(crate) Ctx);

type KeepAliveStream =
    Pin<Box<dyn Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::lease_server::Lease for LeaseService {
    async fn lease_grant(
        &self,
        req: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        self.0.caller(&req)?.authenticated()?;
        let r = req.into_inner();
        let (id, ttl, revision) = self
            .0
            .store
            .lease_grant(r.id, r.ttl)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::LeaseGrantResponse {
            header: self.0.header.at(revision),
            id,
            ttl,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        req: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let c = self.0.caller(&req)?;
        c.authenticated()?;
        let id = req.into_inner().id;
        super::kv::check_lease_keys(&self.0, &c, id)?;
        let revision = self.0.store.lease_revoke(id).await.map_err(status)?;
        Ok(Response::new(pb::LeaseRevokeResponse {
            header: self.0.header.at(revision),
        }))
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let ctx = self.0.clone();
        ctx.caller(&req)?.authenticated()?;
        let incoming = req.into_inner();
        let out = incoming.map(move |r| {
            let r = r?;
            // etcd answers TTL 0 for a lease that does not exist (any more).
            let ttl = ctx.store.lease_keep_alive(r.id).unwrap_or(0);
            Ok(pb::LeaseKeepAliveResponse {
                header: ctx.header.at(ctx.store.revision()),
                id: r.id,
                ttl,
            })
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let c = self.0.caller(&req)?;
        c.authenticated()?;
        let r = req.into_inner();
        let header = self.0.header.at(self.0.store.revision());
        let resp = match self.0.store.lease_time_to_live(r.id, r.keys) {
            Some(info) => {
                // Listing the keys needs read on each of them (etcd 3.5).
                if r.keys {
                    for k in &info.keys {
                        c.read(k, b"")?;
                    }
                }
                pb::LeaseTimeToLiveResponse {
                    header,
                    id: r.id,
                    ttl: info.remaining_ttl_secs,
                    granted_ttl: info.granted_ttl_secs,
                    keys: info.keys.into_iter().map(Into::into).collect(),
                }
            }
            // etcd reports an unknown lease as TTL -1, not as an error.
            None => pb::LeaseTimeToLiveResponse {
                header,
                id: r.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            },
        };
        Ok(Response::new(resp))
    }

    async fn lease_leases(
        &self,
        req: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        self.0.caller(&req)?.authenticated()?;
        let leases = self
            .0
            .store
            .lease_list()
            .into_iter()
            .map(|id| pb::LeaseStatus { id })
            .collect();
        Ok(Response::new(pb::LeaseLeasesResponse {
            header: self.0.header.at(self.0.store.revision()),
            leases,
        }))
    }
}
