//! The Cluster service: a single member; membership changes are not supported.

use tonic::{Request, Response, Status};

use super::Ctx;
use crate::proto::etcdserverpb as pb;

pub(crate) struct ClusterService(pub(crate) Ctx);

const SINGLE: &str = "meshwork runs a single member; membership changes are not supported (use --store etcd://... for a cluster)";

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn member_add(
        &self,
        r: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        self.0.caller(&r)?.admin()?;
        Err(Status::unimplemented(SINGLE))
    }
    async fn member_remove(
        &self,
        r: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        self.0.caller(&r)?.admin()?;
        Err(Status::unimplemented(SINGLE))
    }
    async fn member_update(
        &self,
        r: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        self.0.caller(&r)?.admin()?;
        Err(Status::unimplemented(SINGLE))
    }
    async fn member_promote(
        &self,
        r: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        self.0.caller(&r)?.admin()?;
        Err(Status::unimplemented(SINGLE))
    }
    async fn member_list(
        &self,
        _r: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        let me = pb::Member {
            id: self.0.info.member_id,
            name: self.0.info.name.clone(),
            peer_ur_ls: Vec::new(),
            client_ur_ls: self.0.info.client_urls.clone(),
            is_learner: false,
        };
        Ok(Response::new(pb::MemberListResponse {
            header: self.0.header.at(self.0.store.revision()),
            members: vec![me],
        }))
    }
}
