//! The Auth service: the switch, authentication, users and roles, answered
//! as etcd answers them (codes and texts), over [`crate::auth::Auth`].

use tonic::{Request, Response, Status};

use super::Ctx;
use crate::auth::Caller;
use crate::proto::etcdserverpb as pb;

pub(crate) struct AuthService(pub(crate) Ctx);

impl AuthService {
    fn header(&self) -> Option<pb::ResponseHeader> {
        self.0.header.at(self.0.store.revision())
    }

    /// The caller, who must be an administrator.
    fn admin<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let c = self.0.caller(req)?;
        c.admin()?;
        Ok(c)
    }
}

macro_rules! reply {
    ($t:ident, $self:ident) => {
        Ok(Response::new(pb::$t {
            header: $self.header(),
        }))
    };
}

#[tonic::async_trait]
impl pb::auth_server::Auth for AuthService {
    async fn auth_enable(
        &self,
        req: Request<pb::AuthEnableRequest>,
    ) -> Result<Response<pb::AuthEnableResponse>, Status> {
        self.admin(&req)?;
        self.0.auth.enable()?;
        tracing::info!("store authentication enabled");
        reply!(AuthEnableResponse, self)
    }

    async fn auth_disable(
        &self,
        req: Request<pb::AuthDisableRequest>,
    ) -> Result<Response<pb::AuthDisableResponse>, Status> {
        let c = self.admin(&req)?;
        self.0.auth.disable()?;
        tracing::warn!(
            by = c.user().unwrap_or("-"),
            "store authentication disabled"
        );
        reply!(AuthDisableResponse, self)
    }

    async fn auth_status(
        &self,
        _req: Request<pb::AuthStatusRequest>,
    ) -> Result<Response<pb::AuthStatusResponse>, Status> {
        Ok(Response::new(pb::AuthStatusResponse {
            header: self.header(),
            enabled: self.0.auth.enabled(),
            auth_revision: self.0.auth.revision(),
        }))
    }

    async fn authenticate(
        &self,
        req: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        let from = req
            .extensions()
            .get::<super::PeerInfo>()
            .and_then(|p| p.remote_addr)
            .map(|a| a.ip());
        let r = req.into_inner();
        match self.0.auth.authenticate(&r.name, &r.password, from).await {
            Ok(token) => Ok(Response::new(pb::AuthenticateResponse {
                header: self.header(),
                token,
            })),
            Err(e) => {
                tracing::warn!(user = %r.name, from = ?from, error = %e, "store login refused");
                Err(e.into())
            }
        }
    }

    async fn user_add(
        &self,
        req: Request<pb::AuthUserAddRequest>,
    ) -> Result<Response<pb::AuthUserAddResponse>, Status> {
        self.admin(&req)?;
        let r = req.into_inner();
        if !r.hashed_password.is_empty() {
            return Err(Status::invalid_argument(
                "etcdserver: a client-side password hash is not accepted; send the password (over TLS)",
            ));
        }
        let no_password = r.options.is_some_and(|o| o.no_password);
        self.0
            .auth
            .user_add(&r.name, &r.password, no_password)
            .await?;
        reply!(AuthUserAddResponse, self)
    }

    async fn user_get(
        &self,
        req: Request<pb::AuthUserGetRequest>,
    ) -> Result<Response<pb::AuthUserGetResponse>, Status> {
        let c = self.0.caller(&req)?;
        let r = req.into_inner();
        // A user may read its own roles.
        if c.admin().is_err() && c.user() != Some(r.name.as_str()) {
            c.admin()?;
        }
        Ok(Response::new(pb::AuthUserGetResponse {
            header: self.header(),
            roles: self.0.auth.user_get(&r.name)?,
        }))
    }

    async fn user_list(
        &self,
        req: Request<pb::AuthUserListRequest>,
    ) -> Result<Response<pb::AuthUserListResponse>, Status> {
        self.admin(&req)?;
        Ok(Response::new(pb::AuthUserListResponse {
            header: self.header(),
            users: self.0.auth.user_list(),
        }))
    }

    async fn user_delete(
        &self,
        req: Request<pb::AuthUserDeleteRequest>,
    ) -> Result<Response<pb::AuthUserDeleteResponse>, Status> {
        self.admin(&req)?;
        self.0.auth.user_delete(&req.into_inner().name)?;
        reply!(AuthUserDeleteResponse, self)
    }

    async fn user_change_password(
        &self,
        req: Request<pb::AuthUserChangePasswordRequest>,
    ) -> Result<Response<pb::AuthUserChangePasswordResponse>, Status> {
        self.admin(&req)?;
        let r = req.into_inner();
        if !r.hashed_password.is_empty() {
            return Err(Status::invalid_argument(
                "etcdserver: a client-side password hash is not accepted; send the password (over TLS)",
            ));
        }
        self.0
            .auth
            .user_change_password(&r.name, &r.password)
            .await?;
        reply!(AuthUserChangePasswordResponse, self)
    }

    async fn user_grant_role(
        &self,
        req: Request<pb::AuthUserGrantRoleRequest>,
    ) -> Result<Response<pb::AuthUserGrantRoleResponse>, Status> {
        self.admin(&req)?;
        let r = req.into_inner();
        self.0.auth.user_grant_role(&r.user, &r.role)?;
        reply!(AuthUserGrantRoleResponse, self)
    }

    async fn user_revoke_role(
        &self,
        req: Request<pb::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<pb::AuthUserRevokeRoleResponse>, Status> {
        self.admin(&req)?;
        let r = req.into_inner();
        self.0.auth.user_revoke_role(&r.name, &r.role)?;
        reply!(AuthUserRevokeRoleResponse, self)
    }

    async fn role_add(
        &self,
        req: Request<pb::AuthRoleAddRequest>,
    ) -> Result<Response<pb::AuthRoleAddResponse>, Status> {
        self.admin(&req)?;
        self.0.auth.role_add(&req.into_inner().name)?;
        reply!(AuthRoleAddResponse, self)
    }

    async fn role_get(
        &self,
        req: Request<pb::AuthRoleGetRequest>,
    ) -> Result<Response<pb::AuthRoleGetResponse>, Status> {
        let c = self.0.caller(&req)?;
        let r = req.into_inner();
        // A user may read the roles it holds.
        let holds = c.user().is_some_and(|u| self.0.auth.has_role(u, &r.role));
        if !holds {
            c.admin()?;
        }
        Ok(Response::new(pb::AuthRoleGetResponse {
            header: self.header(),
            perm: self.0.auth.role_get(&r.role)?,
        }))
    }

    async fn role_list(
        &self,
        req: Request<pb::AuthRoleListRequest>,
    ) -> Result<Response<pb::AuthRoleListResponse>, Status> {
        self.admin(&req)?;
        Ok(Response::new(pb::AuthRoleListResponse {
            header: self.header(),
            roles: self.0.auth.role_list(),
        }))
    }

    async fn role_delete(
        &self,
        req: Request<pb::AuthRoleDeleteRequest>,
    ) -> Result<Response<pb::AuthRoleDeleteResponse>, Status> {
        self.admin(&req)?;
        self.0.auth.role_delete(&req.into_inner().role)?;
        reply!(AuthRoleDeleteResponse, self)
    }

    async fn role_grant_permission(
        &self,
        req: Request<pb::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<pb::AuthRoleGrantPermissionResponse>, Status> {
        self.admin(&req)?;
        let r = req.into_inner();
        self.0.auth.role_grant_permission(&r.name, r.perm)?;
        reply!(AuthRoleGrantPermissionResponse, self)
    }

    async fn role_revoke_permission(
        &self,
        req: Request<pb::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<pb::AuthRoleRevokePermissionResponse>, Status> {
        self.admin(&req)?;
        let r = req.into_inner();
        self.0
            .auth
            .role_revoke_permission(&r.role, &r.key, &r.range_end)?;
        reply!(AuthRoleRevokePermissionResponse, self)
    }
}
