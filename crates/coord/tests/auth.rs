//! Coordination over a store with auth on: a backend with credentials logs
//! in, works with the permissions of its user, and keeps working when the
//! store stops taking its token (revoked, or old after a change to users and
//! roles) by logging in again; bad credentials fail at once with a clear
//! message. Against Meshwork's store (simple and JWT tokens) and Debian's
//! etcd 3.4 (which skips when missing; fails under MESHWORK_REQUIRE_PEERS=1).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use meshwork_coord::backend::{BackendOptions, Credentials};
use meshwork_coord::{Backend, ClientOptions, CoordClient};
use meshwork_etcd::Client;
use meshwork_etcd::proto::authpb;
use meshwork_etcd::proto::etcdserverpb as pb;
use meshwork_testkit::etcd_cluster::EtcdCluster;
use meshwork_testkit::store::embedded_with_auth;
use tonic::Request;

fn creds(user: &str, password: &str) -> Credentials {
    Credentials {
        user: user.into(),
        password: password.into(),
    }
}

fn opts(c: Option<Credentials>) -> BackendOptions {
    BackendOptions {
        credentials: c,
        ..BackendOptions::default()
    }
}

/// Sets up root and a user `svc` that may read and write `/meshwork/`, and
/// turns auth on; returns a client logged in as root.
async fn set_up(endpoint: &str) -> Client {
    let c = Client::connect(&[endpoint.to_string()]).await.unwrap();
    let mut a = c.auth.clone();
    let user = |name: &str, pw: &str| pb::AuthUserAddRequest {
        name: name.into(),
        password: pw.into(),
        ..Default::default()
    };
    let grant = |user: &str, role: &str| pb::AuthUserGrantRoleRequest {
        user: user.into(),
        role: role.into(),
    };
    a.user_add(user("root", "rootpw")).await.unwrap();
    a.user_grant_role(grant("root", "root")).await.unwrap();
    a.role_add(pb::AuthRoleAddRequest { name: "svc".into() })
        .await
        .unwrap();
    a.role_grant_permission(pb::AuthRoleGrantPermissionRequest {
        name: "svc".into(),
        perm: Some(authpb::Permission {
            perm_type: authpb::permission::Type::Readwrite as i32,
            key: Bytes::from_static(b"/meshwork/"),
            range_end: Bytes::from_static(b"/meshwork0"),
        }),
    })
    .await
    .unwrap();
    a.user_add(user("svc", "svcpw")).await.unwrap();
    a.user_grant_role(grant("svc", "svc")).await.unwrap();
    a.auth_enable(pb::AuthEnableRequest {}).await.unwrap();
    c.authenticate(&creds("root", "rootpw")).await.unwrap();
    c
}

async fn flow(endpoint: &str, jwt: bool) {
    let root = set_up(endpoint).await;
    let eps = vec![endpoint.to_string()];

    // No credentials, or wrong ones: refused, saying why.
    let no_login = Backend::connect(&eps, opts(None)).await.unwrap();
    let err = no_login.put("/meshwork/x", "1", 0).await.unwrap_err();
    assert!(err.to_string().contains("user name is empty"), "{err}");
    let Err(err) = Backend::connect(&eps, opts(Some(creds("svc", "wrong")))).await else {
        panic!("a wrong password must not connect");
    };
    let msg = err.to_string();
    assert!(
        msg.contains("logging in to etcd as user \"svc\" failed")
            && msg.contains("authentication failed"),
        "{msg}"
    );

    // The user's permissions, no more.
    let b = Backend::connect(&eps, opts(Some(creds("svc", "svcpw"))))
        .await
        .unwrap();
    b.put("/meshwork/a", "1", 0).await.unwrap();
    let err = b.put("/elsewhere", "1", 0).await.unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");

    // The store stops taking the token: tokens revoked by a password change
    // (to the same password), and for JWTs any change to roles.
    let mut admin = root.auth.clone();
    admin
        .user_change_password(pb::AuthUserChangePasswordRequest {
            name: "svc".into(),
            password: "svcpw".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    b.put("/meshwork/b", "2", 0).await.unwrap();
    if jwt {
        // The password change made root's own JWT old too.
        root.authenticate(&creds("root", "rootpw")).await.unwrap();
        admin
            .role_add(pb::AuthRoleAddRequest {
                name: "unrelated".into(),
            })
            .await
            .unwrap();
        b.put("/meshwork/c", "3", 0).await.unwrap();
    }
    let (kv, _) = b.get("/meshwork/b").await.unwrap();
    assert_eq!(&kv.unwrap().value[..], b"2");

    // A whole client session: lease, keep-alive and registration.
    let client = CoordClient::connect(
        &eps,
        ClientOptions {
            name: "svc".into(),
            backend: opts(Some(creds("svc", "svcpw"))),
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    let spec = serde_json::from_value(serde_json::json!({
        "address": "127.0.0.1",
        "port": 9000,
    }))
    .unwrap();
    client.register("orders", spec).await.unwrap();
    root.authenticate(&creds("root", "rootpw")).await.unwrap();
    let mut kv = root.kv.clone();
    let listed = kv
        .range(Request::new(pb::RangeRequest {
            key: Bytes::from_static(b"/meshwork/registry/s/orders/"),
            range_end: Bytes::from_static(b"/meshwork/registry/s/orders0"),
            keys_only: true,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.count, 1, "{listed:?}");
}

#[tokio::test]
async fn a_backend_logs_in_to_meshwork_and_again_when_its_token_is_refused() {
    let s = embedded_with_auth(Default::default()).await;
    flow(&s.endpoint, false).await;
}

#[tokio::test]
async fn jwt_tokens_made_old_by_a_role_change_are_replaced() {
    let s = embedded_with_auth(meshwork_etcd::auth::AuthConfig {
        token: meshwork_etcd::auth::TokenKind::Jwt,
        ..Default::default()
    })
    .await;
    flow(&s.endpoint, true).await;
}

#[tokio::test]
async fn a_backend_logs_in_to_etcd_and_again_when_its_token_is_refused() {
    let Some(etcd) = EtcdCluster::start(1).await else {
        return;
    };
    flow(&etcd.client_urls()[0], false).await;
}
