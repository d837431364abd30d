use super::*;

fn perm(t: Type, key: &str, end: &str) -> Option<Permission> {
    Some(Permission {
        perm_type: t as i32,
        key: bytes::Bytes::copy_from_slice(key.as_bytes()),
        range_end: bytes::Bytes::copy_from_slice(end.as_bytes()),
    })
}

#[tokio::test]
async fn users_roles_and_the_switch_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let a = Auth::open(dir.path(), AuthConfig::default()).unwrap();
    assert!(matches!(a.enable(), Err(AuthError::RootUserNotExist)));
    a.user_add("root", "rootpw", false).await.unwrap();
    assert!(matches!(a.enable(), Err(AuthError::RootRoleNotExist)));
    a.user_grant_role("root", ROOT).unwrap();
    a.role_add("app").unwrap();
    a.role_grant_permission("app", perm(Type::Readwrite, "app/", "app0"))
        .unwrap();
    a.user_add("alice", "alicepw", false).await.unwrap();
    a.user_grant_role("alice", "app").unwrap();
    let rev = a.revision();
    a.enable().unwrap();
    assert!(matches!(
        a.user_delete(ROOT),
        Err(AuthError::InvalidAuthMgmt)
    ));
    assert!(matches!(
        a.role_delete(ROOT),
        Err(AuthError::InvalidAuthMgmt)
    ));
    assert!(matches!(
        a.user_revoke_role(ROOT, ROOT),
        Err(AuthError::InvalidAuthMgmt)
    ));

    drop(a);
    let b = Auth::open(dir.path(), AuthConfig::default()).unwrap();
    assert!(b.enabled());
    assert!(b.revision() > rev);
    assert_eq!(b.user_list(), vec!["alice", "root"]);
    assert_eq!(b.user_get("alice").unwrap(), vec!["app"]);
    assert_eq!(b.role_list(), vec!["app"]);
    let tok = b.authenticate("alice", "alicepw", None).await.unwrap();
    let c = b.caller(Some(&tok)).unwrap();
    assert!(c.write(b"app/x", b"").is_ok());
    assert!(c.read(b"app/", b"app0").is_ok());
    assert!(matches!(
        c.read(b"other", b""),
        Err(AuthError::PermissionDenied)
    ));
    assert!(matches!(c.admin(), Err(AuthError::PermissionDenied)));
    assert!(matches!(
        b.authenticate("alice", "wrong", None).await,
        Err(AuthError::AuthFailed)
    ));
    assert!(matches!(
        b.authenticate("nobody", "alicepw", None).await,
        Err(AuthError::AuthFailed)
    ));
    assert!(matches!(b.caller(None), Ok(Caller::Nobody)));
    assert!(matches!(
        b.caller(Some("forged.1")),
        Err(AuthError::InvalidAuthToken)
    ));

    // A damaged file is reported, not taken as "no users".
    drop(b);
    let path = dir.path().join(AUTH_FILE);
    let mut data = std::fs::read(&path).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&path, data).unwrap();
    assert!(matches!(
        Auth::open(dir.path(), AuthConfig::default()),
        Err(AuthError::Storage(_))
    ));
}

#[tokio::test]
async fn password_change_and_delete_end_the_users_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let a = Auth::open(dir.path(), AuthConfig::default()).unwrap();
    a.user_add("root", "pw", false).await.unwrap();
    a.user_grant_role("root", ROOT).unwrap();
    a.user_add("bob", "pw", false).await.unwrap();
    a.enable().unwrap();
    let t1 = a.authenticate("bob", "pw", None).await.unwrap();
    a.user_change_password("bob", "pw2").await.unwrap();
    assert!(matches!(
        a.caller(Some(&t1)),
        Err(AuthError::InvalidAuthToken)
    ));
    let t2 = a.authenticate("bob", "pw2", None).await.unwrap();
    a.user_delete("bob").unwrap();
    assert!(matches!(
        a.caller(Some(&t2)),
        Err(AuthError::InvalidAuthToken)
    ));
    let root = a.authenticate("root", "pw", None).await.unwrap();
    a.disable().unwrap();
    assert!(matches!(a.caller(Some(&root)), Ok(Caller::Trusted)));
}

#[tokio::test]
async fn jwts_are_old_after_any_change() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = AuthConfig {
        token: TokenKind::Jwt,
        ..AuthConfig::default()
    };
    let a = Auth::open(dir.path(), cfg.clone()).unwrap();
    a.user_add("root", "pw", false).await.unwrap();
    a.user_grant_role("root", ROOT).unwrap();
    a.enable().unwrap();
    let t = a.authenticate("root", "pw", None).await.unwrap();
    assert!(matches!(
        a.caller(Some(&t)),
        Ok(Caller::User { root: true, .. })
    ));
    // The generated key was kept: a restarted store accepts the token.
    drop(a);
    let a = Auth::open(dir.path(), cfg).unwrap();
    assert!(a.caller(Some(&t)).is_ok());
    a.role_add("r").unwrap();
    assert!(matches!(
        a.caller(Some(&t)),
        Err(AuthError::AuthOldRevision)
    ));
}

#[tokio::test(start_paused = true)]
async fn failed_logins_are_throttled_per_user_and_address() {
    let dir = tempfile::tempdir().unwrap();
    let a = Auth::open(
        dir.path(),
        AuthConfig {
            free_login_failures: 2,
            ..AuthConfig::default()
        },
    )
    .unwrap();
    a.user_add("root", "pw", false).await.unwrap();
    a.user_grant_role("root", ROOT).unwrap();
    a.enable().unwrap();
    let evil: Option<IpAddr> = Some([10, 0, 0, 1].into());
    let good: Option<IpAddr> = Some([10, 0, 0, 2].into());
    for _ in 0..2 {
        assert!(matches!(
            a.authenticate("root", "guess", evil).await,
            Err(AuthError::AuthFailed)
        ));
    }
    // Two failures, two free: the next try from there waits 1 s, and after
    // one more failure 2 s.
    let r = a.authenticate("root", "pw", evil).await;
    assert!(matches!(r, Err(AuthError::Throttled(1))), "{r:?}");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(matches!(
        a.authenticate("root", "guess", evil).await,
        Err(AuthError::AuthFailed)
    ));
    let r = a.authenticate("root", "pw", evil).await;
    assert!(matches!(r, Err(AuthError::Throttled(2))), "{r:?}");
    // Another address is not held back by it.
    assert!(a.authenticate("root", "pw", good).await.is_ok());
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(a.authenticate("root", "pw", evil).await.is_ok());
    // Success forgets the failures.
    assert!(matches!(
        a.authenticate("root", "guess", evil).await,
        Err(AuthError::AuthFailed)
    ));
    assert!(a.authenticate("root", "pw", evil).await.is_ok());
}

#[tokio::test]
async fn grants_replace_and_revokes_need_the_exact_range() {
    let dir = tempfile::tempdir().unwrap();
    let a = Auth::open(dir.path(), AuthConfig::default()).unwrap();
    a.role_add("r").unwrap();
    assert!(matches!(a.role_add("r"), Err(AuthError::RoleAlreadyExist)));
    assert!(matches!(a.role_add(""), Err(AuthError::RoleEmpty)));
    assert!(matches!(
        a.role_grant_permission("r", None),
        Err(AuthError::PermissionNotGiven)
    ));
    assert!(matches!(
        a.role_grant_permission("r", perm(Type::Read, "", "\0")),
        Err(AuthError::InvalidAuthMgmt)
    ));
    assert!(matches!(
        a.role_grant_permission("nope", perm(Type::Read, "a", "")),
        Err(AuthError::RoleNotFound)
    ));
    a.role_grant_permission("r", perm(Type::Read, "b", "c"))
        .unwrap();
    a.role_grant_permission("r", perm(Type::Read, "a", ""))
        .unwrap();
    a.role_grant_permission("r", perm(Type::Write, "b", "c"))
        .unwrap();
    let got = a.role_get("r").unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(&got[0].key[..], b"a");
    assert_eq!(got[1].perm_type, Type::Write as i32);
    assert!(matches!(
        a.role_revoke_permission("r", b"b", b""),
        Err(AuthError::PermissionNotGranted)
    ));
    a.role_revoke_permission("r", b"b", b"c").unwrap();
    assert_eq!(a.role_get("r").unwrap().len(), 1);
    assert!(matches!(
        a.user_grant_role("ghost", "r"),
        Err(AuthError::UserNotFound)
    ));
    a.user_add("u", "", true).await.unwrap();
    assert!(matches!(
        a.user_revoke_role("u", "r"),
        Err(AuthError::RoleNotGranted)
    ));
    a.user_grant_role("u", "r").unwrap();
    a.role_delete("r").unwrap();
    assert!(
        a.user_get("u").unwrap().is_empty(),
        "the role left its users"
    );
    assert!(matches!(
        a.user_add("v", "", false).await,
        Err(AuthError::BadPassword(_))
    ));
}
