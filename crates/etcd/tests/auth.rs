//! Store auth against real clients:
//! - Debian's etcdctl runs etcd's whole auth flow (users, roles, permissions,
//!   enable, denied and allowed calls, password change, disable) against
//!   Debian's etcd 3.4 and against Meshwork; each step must succeed or fail
//!   alike, with the same output and error text.
//! - Every method of every service in the protos is called without a token,
//!   with a forged one and with a user that holds no permission on the keys
//!   involved: each is refused with etcd's code (or, for the few open calls,
//!   answered), and nothing changes. The methods are read from the protos, so
//!   a new one without a case fails the test.
//!
//! The etcdctl test skips when etcd or etcdctl is missing; under
//! `MESHWORK_REQUIRE_PEERS=1` it fails instead.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use bytes::Bytes;
use meshwork_etcd::auth::{Auth, AuthConfig};
use meshwork_etcd::proto::authpb;
use meshwork_etcd::proto::etcdserverpb as pb;
use meshwork_etcd::proto::v3electionpb as epb;
use meshwork_etcd::proto::v3lockpb as lpb;
use meshwork_etcd::{Client, ServerInfo};
use meshwork_store::{Store, StoreConfig};
use meshwork_testkit::etcd_cluster::EtcdCluster;
use meshwork_testkit::peer;
use tonic::{Code, Request, Status};

struct Meshwork {
    addr: String,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn meshwork() -> Meshwork {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let auth = Auth::open(dir.path(), AuthConfig::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let info = ServerInfo::single("auth-test", format!("http://{addr}"));
    tokio::spawn(meshwork_etcd::serve(listener, store, auth, info, async {
        let _ = stopped.await;
    }));
    Meshwork {
        addr: addr.to_string(),
        _dir: dir,
        _stop: stop,
    }
}

/// One etcdctl run: arguments and what goes to its standard input.
fn etcdctl(bin: &std::path::Path, ep: &str, args: &[&str], input: &str) -> String {
    let out = peer::run_with_input(
        Command::new(bin)
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                ep,
                "--dial-timeout",
                "5s",
                "--command-timeout",
                "20s",
            ])
            .args(args),
        input,
    );
    // Errors only: etcdctl's retry warnings carry timestamps.
    let errors: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("Error:"))
        .map(str::to_string)
        .collect();
    let stdout = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|w| {
            // Lease ids differ between servers.
            if w.len() >= 12 && w.chars().all(|c| c.is_ascii_hexdigit()) {
                "<lease>".to_string()
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "{} | {stdout} | {}",
        if out.status.success() { "ok" } else { "FAILED" },
        errors.join(" ")
    )
}

const ROOT: &str = "root:rootpw";
const ALICE: &str = "alice:alicepw";

/// The flow, step by step: (arguments, standard input).
fn flow() -> Vec<(Vec<&'static str>, &'static str)> {
    let u = |user: &'static str, rest: &[&'static str]| {
        let mut v = vec!["--user", user];
        v.extend_from_slice(rest);
        v
    };
    vec![
        (vec!["put", "/app/seed", "0"], ""),
        (vec!["user", "add", ROOT], ""),
        (vec!["user", "add", "root:again"], ""),
        (vec!["auth", "enable"], ""),
        (vec!["auth", "enable"], ""),
        // Nobody: every call but the open ones refused.
        (vec!["put", "/app/x", "1"], ""),
        (vec!["get", "/app/seed"], ""),
        (vec!["user", "list"], ""),
        (u("root:wrong", &["get", "/app/seed"]), ""),
        (u("ghost:pw", &["get", "/app/seed"]), ""),
        // Root sets up a role and a user.
        (u(ROOT, &["role", "add", "app"]), ""),
        (u(ROOT, &["role", "add", "app"]), ""),
        (
            u(
                ROOT,
                &[
                    "role",
                    "grant-permission",
                    "app",
                    "readwrite",
                    "/app/",
                    "--prefix",
                ],
            ),
            "",
        ),
        (
            u(
                ROOT,
                &["role", "grant-permission", "app", "read", "/shared"],
            ),
            "",
        ),
        (
            u(
                ROOT,
                &[
                    "role",
                    "grant-permission",
                    "app",
                    "write",
                    "/drop/",
                    "/drop0",
                ],
            ),
            "",
        ),
        (
            u(ROOT, &["role", "grant-permission", "app", "read", "/x"]),
            "",
        ),
        (u(ROOT, &["role", "get", "app"]), ""),
        (u(ROOT, &["role", "get", "root"]), ""),
        (u(ROOT, &["role", "get", "nope"]), ""),
        (u(ROOT, &["user", "add", ALICE]), ""),
        (u(ROOT, &["user", "grant-role", "alice", "app"]), ""),
        (u(ROOT, &["user", "grant-role", "alice", "nope"]), ""),
        (u(ROOT, &["user", "grant-role", "ghost", "app"]), ""),
        (u(ROOT, &["user", "list"]), ""),
        (u(ROOT, &["role", "list"]), ""),
        (u(ROOT, &["user", "get", "alice"]), ""),
        (u(ROOT, &["put", "/shared", "s"]), ""),
        (u(ROOT, &["put", "/secret", "s"]), ""),
        // Alice: what her role covers, and nothing else.
        (u(ALICE, &["put", "/app/x", "1"]), ""),
        (u(ALICE, &["get", "/app/", "--prefix"]), ""),
        (u(ALICE, &["get", "/shared"]), ""),
        (u(ALICE, &["put", "/shared", "2"]), ""),
        (u(ALICE, &["get", "/secret"]), ""),
        (u(ALICE, &["get", "/", "--prefix"]), ""),
        (u(ALICE, &["get", "", "--from-key"]), ""),
        (u(ALICE, &["put", "/drop/a", "1"]), ""),
        (u(ALICE, &["get", "/drop/a"]), ""),
        (u(ALICE, &["put", "/app/y", "1", "--prev-kv"]), ""),
        (u(ALICE, &["del", "/drop/a"]), ""),
        (u(ALICE, &["del", "/drop/", "--prefix", "--prev-kv"]), ""),
        (u(ALICE, &["del", "/", "--prefix"]), ""),
        (
            u(ALICE, &["txn"]),
            "value(\"/app/x\") = \"1\"\n\nput /app/z 1\n\nput /app/z 2\n\n",
        ),
        (
            u(ALICE, &["txn"]),
            "value(\"/secret\") = \"s\"\n\nput /app/z 1\n\nput /app/z 2\n\n",
        ),
        (
            u(ALICE, &["txn"]),
            "value(\"/app/x\") = \"1\"\n\nput /secret 1\n\nput /app/z 2\n\n",
        ),
        (
            u(ALICE, &["txn"]),
            "value(\"/app/x\") = \"1\"\n\nput /app/z 1\n\nget /secret\n\n",
        ),
        (u(ALICE, &["compaction", "1"]), ""),
        (u(ALICE, &["user", "list"]), ""),
        (u(ALICE, &["user", "get", "alice"]), ""),
        (u(ALICE, &["user", "get", "root"]), ""),
        (u(ALICE, &["role", "get", "app"]), ""),
        (u(ALICE, &["role", "get", "root"]), ""),
        (u(ALICE, &["role", "add", "mine"]), ""),
        (u(ALICE, &["user", "grant-role", "alice", "root"]), ""),
        (u(ALICE, &["auth", "disable"]), ""),
        (u(ALICE, &["defrag"]), ""),
        // Root may not be removed while auth is on.
        (u(ROOT, &["user", "delete", "root"]), ""),
        (u(ROOT, &["user", "revoke-role", "root", "root"]), ""),
        (u(ROOT, &["role", "delete", "root"]), ""),
        // Changes take effect at once.
        (
            u(ROOT, &["role", "revoke-permission", "app", "/shared"]),
            "",
        ),
        (
            u(ROOT, &["role", "revoke-permission", "app", "/shared"]),
            "",
        ),
        (u(ALICE, &["get", "/shared"]), ""),
        (
            u(ROOT, &["user", "passwd", "alice", "--interactive=false"]),
            "newpw\n",
        ),
        (u(ALICE, &["get", "/app/x"]), ""),
        (u("alice:newpw", &["get", "/app/x"]), ""),
        (u(ROOT, &["user", "revoke-role", "alice", "app"]), ""),
        (u(ROOT, &["user", "revoke-role", "alice", "app"]), ""),
        (u("alice:newpw", &["get", "/app/x"]), ""),
        (u(ROOT, &["role", "delete", "app"]), ""),
        (u(ROOT, &["user", "delete", "alice"]), ""),
        (u(ROOT, &["user", "delete", "alice"]), ""),
        (u("alice:newpw", &["get", "/app/x"]), ""),
        (u(ROOT, &["auth", "disable"]), ""),
        (vec!["get", "/app/", "--prefix"], ""),
        (vec!["user", "list"], ""),
    ]
}

#[tokio::test]
async fn etcdctl_auth_flow_answers_as_etcd() {
    let Some(bin) = peer::on_path("etcdctl") else {
        return;
    };
    let Some(etcd) = EtcdCluster::start(1).await else {
        return;
    };
    let ours = meshwork().await;
    let theirs = etcd.client_urls()[0].clone();
    let (bin2, ours_ep) = (bin, ours.addr.clone());
    let mismatches = tokio::task::spawn_blocking(move || {
        let mut mismatches = Vec::new();
        for (args, input) in flow() {
            // One deliberate difference: etcd 3.4 lets any user compact the
            // history away; Meshwork (as etcd 3.5) only an administrator.
            if args.contains(&"compaction") {
                let got = etcdctl(&bin2, &ours_ep, &args, input);
                if got != "FAILED |  | Error: etcdserver: permission denied" {
                    mismatches.push(format!("etcdctl {args:?}: {got}"));
                }
                continue;
            }
            let want = etcdctl(&bin2, &theirs, &args, input);
            let got = etcdctl(&bin2, &ours_ep, &args, input);
            if want != got {
                mismatches.push(format!(
                    "etcdctl {args:?}\n  etcd:     {want}\n  meshwork: {got}"
                ));
            }
        }
        mismatches
    })
    .await
    .unwrap();
    assert!(
        mismatches.is_empty(),
        "{} steps differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

/// Every `package.Service/Method` in the protos.
fn methods() -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    let fds = protox::compile(
        [
            "etcdserverpb/rpc.proto",
            "v3lockpb/lock.proto",
            "v3electionpb/election.proto",
        ],
        [dir],
    )
    .unwrap();
    let mut out = Vec::new();
    for f in fds.file {
        for s in f.service {
            for m in s.method {
                out.push(format!(
                    "{}.{}/{}",
                    f.package.clone().unwrap_or_default(),
                    s.name.clone().unwrap_or_default(),
                    m.name.unwrap_or_default()
                ));
            }
        }
    }
    out
}

fn req<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert("token", t.parse().unwrap());
    }
    r
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// Calls `method` as the holder of `token`, on keys under `/secret` and on
/// other users' and roles' names; `lease` carries the key `/secret/leased`.
async fn call(c: &Client, method: &str, token: Option<&str>, lease: i64) -> Result<(), Status> {
    let mut c = c.clone();
    let t = token;
    let secret_put = || pb::PutRequest {
        key: b("/secret/k"),
        value: b("v"),
        ..Default::default()
    };
    match method.split('/').next_back().unwrap_or_default() {
        "Range" => {
            c.kv.range(req(
                pb::RangeRequest {
                    key: b("/secret/"),
                    range_end: b("/secret0"),
                    ..Default::default()
                },
                t,
            ))
            .await
            .map(drop)
        }
        "Put" => c.kv.put(req(secret_put(), t)).await.map(drop),
        "DeleteRange" => {
            c.kv.delete_range(req(
                pb::DeleteRangeRequest {
                    key: b("/secret/"),
                    range_end: b("/secret0"),
                    prev_kv: false,
                },
                t,
            ))
            .await
            .map(drop)
        }
        "Txn" => {
            c.kv.txn(req(
                pb::TxnRequest {
                    compare: vec![],
                    success: vec![pb::RequestOp {
                        request: Some(pb::request_op::Request::RequestPut(secret_put())),
                    }],
                    failure: vec![],
                },
                t,
            ))
            .await
            .map(drop)
        }
        "Compact" => {
            c.kv.compact(req(
                pb::CompactionRequest {
                    revision: 1,
                    physical: false,
                },
                t,
            ))
            .await
            .map(drop)
        }
        "Watch" => {
            let create = pb::WatchRequest {
                request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                    pb::WatchCreateRequest {
                        key: b("/secret/"),
                        range_end: b("/secret0"),
                        ..Default::default()
                    },
                )),
            };
            let mut stream = c
                .watch
                .watch(req(tokio_stream::iter(vec![create]), t))
                .await?
                .into_inner();
            let first = stream.message().await?.expect("a watch answer");
            // A refused watch is answered created and canceled with the reason.
            if first.canceled {
                let reason = first.cancel_reason;
                let code = if reason.contains("PermissionDenied") {
                    Code::PermissionDenied
                } else if reason.contains("Unauthenticated") {
                    Code::Unauthenticated
                } else {
                    Code::InvalidArgument
                };
                let desc = reason.split("desc = ").nth(1).unwrap_or(&reason);
                return Err(Status::new(code, desc.to_string()));
            }
            Ok(())
        }
        "LeaseGrant" => c
            .lease
            .lease_grant(req(pb::LeaseGrantRequest { ttl: 60, id: 0 }, t))
            .await
            .map(drop),
        "LeaseRevoke" => c
            .lease
            .lease_revoke(req(pb::LeaseRevokeRequest { id: lease }, t))
            .await
            .map(drop),
        "LeaseKeepAlive" => {
            let mut s = c
                .lease
                .lease_keep_alive(req(
                    tokio_stream::iter(vec![pb::LeaseKeepAliveRequest { id: lease }]),
                    t,
                ))
                .await?
                .into_inner();
            s.message().await.map(drop)
        }
        "LeaseTimeToLive" => c
            .lease
            .lease_time_to_live(req(
                pb::LeaseTimeToLiveRequest {
                    id: lease,
                    keys: true,
                },
                t,
            ))
            .await
            .map(drop),
        "LeaseLeases" => c
            .lease
            .lease_leases(req(pb::LeaseLeasesRequest {}, t))
            .await
            .map(drop),
        "MemberAdd" => c
            .cluster
            .member_add(req(pb::MemberAddRequest::default(), t))
            .await
            .map(drop),
        "MemberRemove" => c
            .cluster
            .member_remove(req(pb::MemberRemoveRequest::default(), t))
            .await
            .map(drop),
        "MemberUpdate" => c
            .cluster
            .member_update(req(pb::MemberUpdateRequest::default(), t))
            .await
            .map(drop),
        "MemberList" => c
            .cluster
            .member_list(req(pb::MemberListRequest::default(), t))
            .await
            .map(drop),
        "MemberPromote" => c
            .cluster
            .member_promote(req(pb::MemberPromoteRequest::default(), t))
            .await
            .map(drop),
        "Alarm" => c
            .maintenance
            .alarm(req(
                pb::AlarmRequest {
                    action: pb::alarm_request::AlarmAction::Activate as i32,
                    member_id: 1,
                    alarm: pb::AlarmType::Corrupt as i32,
                },
                t,
            ))
            .await
            .map(drop),
        "Status" => c
            .maintenance
            .status(req(pb::StatusRequest {}, t))
            .await
            .map(drop),
        "Defragment" => c
            .maintenance
            .defragment(req(pb::DefragmentRequest {}, t))
            .await
            .map(drop),
        "Hash" => c
            .maintenance
            .hash(req(pb::HashRequest {}, t))
            .await
            .map(drop),
        "HashKV" => c
            .maintenance
            .hash_kv(req(pb::HashKvRequest { revision: 0 }, t))
            .await
            .map(drop),
        "Snapshot" => {
            let mut s = c
                .maintenance
                .snapshot(req(pb::SnapshotRequest {}, t))
                .await?
                .into_inner();
            s.message().await.map(drop)
        }
        "MoveLeader" => c
            .maintenance
            .move_leader(req(pb::MoveLeaderRequest { target_id: 1 }, t))
            .await
            .map(drop),
        "AuthEnable" => c
            .auth
            .auth_enable(req(pb::AuthEnableRequest {}, t))
            .await
            .map(drop),
        "AuthDisable" => c
            .auth
            .auth_disable(req(pb::AuthDisableRequest {}, t))
            .await
            .map(drop),
        "AuthStatus" => c
            .auth
            .auth_status(req(pb::AuthStatusRequest {}, t))
            .await
            .map(drop),
        "Authenticate" => c
            .auth
            .authenticate(req(
                pb::AuthenticateRequest {
                    name: "root".into(),
                    password: "guess".into(),
                },
                t,
            ))
            .await
            .map(drop),
        "UserAdd" => c
            .auth
            .user_add(req(
                pb::AuthUserAddRequest {
                    name: "mallory".into(),
                    password: "pw".into(),
                    ..Default::default()
                },
                t,
            ))
            .await
            .map(drop),
        "UserGet" => c
            .auth
            .user_get(req(
                pb::AuthUserGetRequest {
                    name: "root".into(),
                },
                t,
            ))
            .await
            .map(drop),
        "UserList" => c
            .auth
            .user_list(req(pb::AuthUserListRequest {}, t))
            .await
            .map(drop),
        "UserDelete" => c
            .auth
            .user_delete(req(
                pb::AuthUserDeleteRequest {
                    name: "root".into(),
                },
                t,
            ))
            .await
            .map(drop),
        "UserChangePassword" => c
            .auth
            .user_change_password(req(
                pb::AuthUserChangePasswordRequest {
                    name: "root".into(),
                    password: "owned".into(),
                    ..Default::default()
                },
                t,
            ))
            .await
            .map(drop),
        "UserGrantRole" => c
            .auth
            .user_grant_role(req(
                pb::AuthUserGrantRoleRequest {
                    user: "weak".into(),
                    role: "root".into(),
                },
                t,
            ))
            .await
            .map(drop),
        "UserRevokeRole" => c
            .auth
            .user_revoke_role(req(
                pb::AuthUserRevokeRoleRequest {
                    name: "root".into(),
                    role: "root".into(),
                },
                t,
            ))
            .await
            .map(drop),
        "RoleAdd" => c
            .auth
            .role_add(req(
                pb::AuthRoleAddRequest {
                    name: "evil".into(),
                },
                t,
            ))
            .await
            .map(drop),
        "RoleGet" => c
            .auth
            .role_get(req(
                pb::AuthRoleGetRequest {
                    role: "root".into(),
                },
                t,
            ))
            .await
            .map(drop),
        "RoleList" => c
            .auth
            .role_list(req(pb::AuthRoleListRequest {}, t))
            .await
            .map(drop),
        "RoleDelete" => c
            .auth
            .role_delete(req(
                pb::AuthRoleDeleteRequest {
                    role: "weak".into(),
                },
                t,
            ))
            .await
            .map(drop),
        "RoleGrantPermission" => c
            .auth
            .role_grant_permission(req(
                pb::AuthRoleGrantPermissionRequest {
                    name: "weak".into(),
                    perm: Some(authpb::Permission {
                        perm_type: authpb::permission::Type::Readwrite as i32,
                        key: b("/secret/"),
                        range_end: b("/secret0"),
                    }),
                },
                t,
            ))
            .await
            .map(drop),
        "RoleRevokePermission" => c
            .auth
            .role_revoke_permission(req(
                pb::AuthRoleRevokePermissionRequest {
                    role: "weak".into(),
                    key: b("/weak/"),
                    range_end: b("/weak0"),
                },
                t,
            ))
            .await
            .map(drop),
        "Lock" => c
            .lock
            .lock(req(
                lpb::LockRequest {
                    name: b("/secret/lock"),
                    lease,
                },
                t,
            ))
            .await
            .map(drop),
        "Unlock" => c
            .lock
            .unlock(req(
                lpb::UnlockRequest {
                    key: b("/secret/k"),
                },
                t,
            ))
            .await
            .map(drop),
        "Campaign" => c
            .election
            .campaign(req(
                epb::CampaignRequest {
                    name: b("/secret/el"),
                    lease,
                    value: b("me"),
                },
                t,
            ))
            .await
            .map(drop),
        "Proclaim" | "Resign" => {
            let leader = Some(epb::LeaderKey {
                name: b("/secret/el"),
                key: b("/secret/el/1"),
                rev: 1,
                lease,
            });
            if method.ends_with("Proclaim") {
                c.election
                    .proclaim(req(
                        epb::ProclaimRequest {
                            leader,
                            value: b("x"),
                        },
                        t,
                    ))
                    .await
                    .map(drop)
            } else {
                c.election
                    .resign(req(epb::ResignRequest { leader }, t))
                    .await
                    .map(drop)
            }
        }
        "Leader" => c
            .election
            .leader(req(
                epb::LeaderRequest {
                    name: b("/secret/el"),
                },
                t,
            ))
            .await
            .map(drop),
        "Observe" => {
            let mut s = c
                .election
                .observe(req(
                    epb::LeaderRequest {
                        name: b("/secret/el"),
                    },
                    t,
                ))
                .await?
                .into_inner();
            // Nobody leads: the stream stays open. A refusal comes first.
            match tokio::time::timeout(std::time::Duration::from_millis(300), s.message()).await {
                Ok(r) => r.map(drop),
                Err(_) => Ok(()),
            }
        }
        other => panic!("{method}: no case for {other}; add one to `call`"),
    }
}

/// Calls open to anyone once auth is on (as in etcd): logging in, and reading
/// the member list, status and auth status.
const OPEN: &[&str] = &["Authenticate", "AuthStatus", "Status", "MemberList"];
/// Calls any authenticated user may make on its own leases.
const ANY_USER: &[&str] = &["LeaseGrant", "LeaseKeepAlive", "LeaseLeases"];

#[tokio::test]
async fn every_rpc_refuses_callers_without_a_token_or_a_permission() {
    let server = meshwork().await;
    let c = Client::connect(std::slice::from_ref(&server.addr))
        .await
        .unwrap();
    let mut admin = c.auth.clone();
    admin
        .user_add(pb::AuthUserAddRequest {
            name: "root".into(),
            password: "rootpw".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .user_grant_role(pb::AuthUserGrantRoleRequest {
            user: "root".into(),
            role: "root".into(),
        })
        .await
        .unwrap();
    // "weak" may touch /weak/ only.
    admin
        .role_add(pb::AuthRoleAddRequest {
            name: "weak".into(),
        })
        .await
        .unwrap();
    admin
        .role_grant_permission(pb::AuthRoleGrantPermissionRequest {
            name: "weak".into(),
            perm: Some(authpb::Permission {
                perm_type: authpb::permission::Type::Readwrite as i32,
                key: b("/weak/"),
                range_end: b("/weak0"),
            }),
        })
        .await
        .unwrap();
    admin
        .user_add(pb::AuthUserAddRequest {
            name: "weak".into(),
            password: "weakpw".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .user_grant_role(pb::AuthUserGrantRoleRequest {
            user: "weak".into(),
            role: "weak".into(),
        })
        .await
        .unwrap();
    // A lease holding a secret key, made before auth is on.
    let mut kv = c.kv.clone();
    let lease = c
        .lease
        .clone()
        .lease_grant(pb::LeaseGrantRequest { ttl: 600, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;
    kv.put(pb::PutRequest {
        key: b("/secret/leased"),
        value: b("v"),
        lease,
        ..Default::default()
    })
    .await
    .unwrap();
    admin.auth_enable(pb::AuthEnableRequest {}).await.unwrap();
    let login = |name: &str, pw: &str| pb::AuthenticateRequest {
        name: name.into(),
        password: pw.into(),
    };
    let root = admin
        .authenticate(login("root", "rootpw"))
        .await
        .unwrap()
        .into_inner()
        .token;
    let weak = admin
        .authenticate(login("weak", "weakpw"))
        .await
        .unwrap()
        .into_inner()
        .token;

    let state = async |c: &Client| {
        let kvs =
            c.kv.clone()
                .range(req(
                    pb::RangeRequest {
                        key: b("\0"),
                        range_end: b("\0"),
                        ..Default::default()
                    },
                    Some(&root),
                ))
                .await
                .unwrap()
                .into_inner();
        let auth = c
            .auth
            .clone()
            .auth_status(pb::AuthStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        (kvs.header.unwrap().revision, kvs.kvs, auth.auth_revision)
    };
    let before = state(&c).await;

    let all = methods();
    assert!(all.len() >= 40, "{all:?}");
    let mut wrong = Vec::new();
    for m in &all {
        let name = m.split('/').next_back().unwrap();
        let open = OPEN.contains(&name);
        // Nobody.
        let got = call(&c, m, None, lease).await;
        let ok = if open {
            got.is_ok() || name == "Authenticate"
        } else {
            matches!(&got, Err(s) if s.code() == Code::InvalidArgument
                && s.message() == "etcdserver: user name is empty")
        };
        if !ok {
            wrong.push(format!("{m} without a token: {got:?}"));
        }
        // A forged token.
        let got = call(&c, m, Some("forged.1"), lease).await;
        let ok = if open && name != "Alarm" {
            got.is_ok() || name == "Authenticate"
        } else {
            matches!(&got, Err(s) if s.code() == Code::Unauthenticated
                && s.message() == "etcdserver: invalid auth token")
        };
        if !ok {
            wrong.push(format!("{m} with a forged token: {got:?}"));
        }
        // A user without the permission.
        let got = call(&c, m, Some(&weak), lease).await;
        let ok = if open || ANY_USER.contains(&name) {
            got.is_ok() || name == "Authenticate"
        } else {
            matches!(&got, Err(s) if s.code() == Code::PermissionDenied
                && s.message() == "etcdserver: permission denied")
        };
        if !ok {
            wrong.push(format!("{m} as a user without the permission: {got:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} calls answered wrongly:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    let after = state(&c).await;
    assert_eq!(before.1, after.1, "no key changed");
    assert_eq!(before.2, after.2, "no user or role changed");
    // Leases granted by "weak" add no revision; nothing else may have.
    assert_eq!(before.0, after.0, "no revision was made");
}
