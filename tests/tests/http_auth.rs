//! The node's HTTP API with auth on (a console password configured): every
//! route of the served `/openapi.json` is called without credentials, with a
//! token whose scopes do not cover it, and as an administrator. Without
//! credentials a write is refused with 401 and a token without the scope
//! with 403, before any handler runs (no key but the audit log's changes);
//! an administrator gets past the check everywhere. The routes come from the
//! served document, so a new route cannot be left out. Then forged, revoked
//! and expired tokens, and the tricks that bypassed Nacos' auth.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::time::Duration;

use meshwork_testkit::http::blocking as http;

const PASSWORD: &str = "a long passphrase";

/// The status of one request, read from the first line of the answer (a
/// streaming answer is not waited for).
fn status(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(head.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.windows(2).any(|w| w == b"\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    meshwork_testkit::http::status_of(&String::from_utf8_lossy(&got))
}

fn basic() -> String {
    basic_of("admin", PASSWORD)
}

/// HTTP Basic credentials of `user` and `password`.
fn basic_of(user: &str, password: &str) -> String {
    use std::fmt::Write as _;
    // base64 by hand (no dependency for one header).
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let raw = format!("{user}:{password}");
    let mut out = String::new();
    for c in raw.as_bytes().chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    let mut h = String::new();
    write!(h, "Basic {out}").unwrap();
    h
}

/// Makes a token with `scopes` as the administrator.
fn token(addr: &str, scopes: &[&str], ttl: Option<&str>) -> (String, String) {
    let body = serde_json::json!({"scopes": scopes, "ttl": ttl}).to_string();
    let (code, resp) = http::raw(
        addr,
        &format!(
            "POST /v1/auth/tokens HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAuthorization: {}",
            basic()
        ),
        &body,
    )
    .unwrap();
    assert_eq!(code, 201, "{resp}");
    let v: serde_json::Value =
        serde_json::from_str(meshwork_testkit::http::body_of(&resp)).unwrap();
    (
        v["token"].as_str().unwrap().to_string(),
        v["info"]["id"].as_str().unwrap().to_string(),
    )
}

/// Every documented (method, path), with its parameters filled in.
fn routes(addr: &str) -> Vec<(String, String)> {
    let (code, doc) = http::get(addr, "/openapi.json").unwrap();
    assert_eq!(code, 200);
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let filled = path
            .replace("{service}", "svc")
            .replace("{namespace}", "public")
            .replace("{group}", "g")
            .replace("{data_id}", "d.toml")
            .replace("{version}", "1")
            .replace("{name}", "n")
            .replace("{topic}", "t")
            .replace("{trace_id}", "0af7651916cd43dd8448eb211c80319c")
            .replace("{id}", "1");
        assert!(!filled.contains('{'), "an unfilled parameter in {path}");
        for m in ["get", "put", "post", "delete", "patch"] {
            if item.get(m).is_some() {
                out.push((m.to_uppercase(), filled.clone()));
            }
        }
    }
    assert!(out.len() > 60, "{} routes documented", out.len());
    out
}

/// Every key but the audit log's, with the revision it was last changed at.
fn keyspace(etcd: &str) -> Vec<(Vec<u8>, i64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = meshwork_etcd::Client::connect(&[etcd.to_string()])
            .await
            .unwrap();
        let all =
            c.kv.clone()
                .range(meshwork_etcd::proto::etcdserverpb::RangeRequest {
                    key: vec![0].into(),
                    range_end: vec![0].into(),
                    keys_only: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
        all.kvs
            .into_iter()
            .filter(|kv| !kv.key.starts_with(b"/meshwork/audit/"))
            .map(|kv| (kv.key.to_vec(), kv.mod_revision))
            .collect()
    })
}

/// A node running coordination with the console password set (auth on).
fn node(dir: &std::path::Path) -> meshwork_tests::Server {
    meshwork_tests::start(
        &dir.join("data"),
        &["--roles", "store,coord"],
        &[("MESHWORK_CONSOLE_PASSWORD", PASSWORD)],
    )
}

#[test]
fn every_route_needs_its_scope_and_refusals_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = node(dir.path());
    let addr = s.http.as_str();
    let (admin, _) = token(addr, &["admin"], None);
    // Traces are read-only: this token can write nothing.
    let (reader, _) = token(addr, &["traces:read"], None);
    let all = routes(addr);
    let before = keyspace(&s.etcd);
    let mut wrong = Vec::new();
    for (m, p) in &all {
        let write = m != "GET";
        let open =
            p == "/openapi.json" || p.starts_with("/v1/console/log") || p == "/v1/console/session";
        let admin_only =
            p.starts_with("/v1/auth/") || p == "/v1/audit" || p.starts_with("/v1/console/kv");
        let body = if write { "{}" } else { "" };
        let none = status(addr, m, p, &[], body);
        let bearer = format!("Bearer {reader}");
        let weak = status(addr, m, p, &[("Authorization", &bearer)], body);
        let refused_without =
            (write && !p.ends_with("/listener") && !p.ends_with("/validate")) || admin_only;
        if refused_without && !open && none != 401 {
            wrong.push(format!("{m} {p} without credentials: {none}"));
        }
        if refused_without && !open && weak != 403 {
            wrong.push(format!("{m} {p} with traces:read: {weak}"));
        }
    }
    let after = keyspace(&s.etcd);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(before == after, "a refused call changed the store");
    // An administrator gets past the check everywhere.
    let bearer = format!("Bearer {admin}");
    for (m, p) in &all {
        let body = if m == "GET" { "" } else { "{}" };
        let code = status(addr, m, p, &[("Authorization", &bearer)], body);
        assert!(code != 401 && code != 403, "{m} {p} as admin: {code}");
    }
}

#[test]
fn forged_revoked_and_expired_tokens_and_known_bypasses_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = node(dir.path());
    let addr = s.http.as_str();
    let put = |headers: &[(&str, &str)]| {
        status(
            addr,
            "PUT",
            "/v1/services/svc",
            headers,
            r#"{"protect_threshold":0.5}"#,
        )
    };
    let (good, id) = token(addr, &["services:write:svc"], None);
    let bearer = format!("Bearer {good}");
    assert!(
        !matches!(put(&[("Authorization", &bearer)]), 401 | 403),
        "a valid token passes"
    );
    // Forgeries: the right id with another secret, another format, a JWT.
    let forged = format!("Bearer mwt_{id}_{}", "0".repeat(64));
    let jwt = "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.";
    for h in [
        forged.as_str(),
        jwt,
        "Bearer ",
        "Bearer mwt_",
        "Basic YWRtaW46YWRtaW4=",
    ] {
        assert_eq!(put(&[("Authorization", h)]), 401, "{h}");
    }
    // Nacos #4779 (a server User-Agent skipped auth) and Host tricks.
    assert_eq!(put(&[("User-Agent", "Nacos-Server")]), 401);
    let code = put(&[("Host", "localhost")]);
    assert!(matches!(code, 400 | 401 | 421), "Host: localhost -> {code}");
    for p in [
        "/v1//auth/tokens",
        "/v1/%61uth/tokens",
        "/v1/services/../auth/tokens",
    ] {
        let code = status(addr, "GET", p, &[], "");
        assert!(code == 401 || code == 400 || code == 404, "GET {p}: {code}");
        assert_ne!(code, 200, "GET {p}");
    }
    // Revoked: refused at once.
    let code = status(
        addr,
        "DELETE",
        &format!("/v1/auth/tokens/{id}"),
        &[("Authorization", &basic())],
        "",
    );
    assert_eq!(code, 204);
    assert_eq!(put(&[("Authorization", &bearer)]), 401);
    // Expired: refused once its lifetime is over.
    let (short, _) = token(addr, &["services:write:svc"], Some("1s"));
    let bearer = format!("Bearer {short}");
    meshwork_testkit::blocking::until("the token to expire", Duration::from_secs(10), || {
        put(&[("Authorization", &bearer)]) == 401
    });
    // The token list never shows a secret.
    let (code, resp) = http::raw(
        addr,
        &format!(
            "GET /v1/auth/tokens HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {}",
            basic()
        ),
        "",
    )
    .unwrap();
    assert_eq!(code, 200);
    assert!(!resp.contains(&good[good.len() - 64..]), "{resp}");
    assert!(!resp.contains("secret"), "{resp}");
}

#[test]
fn the_cli_makes_lists_and_revokes_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let s = node(dir.path());
    let cli = |args: &[&str], envs: &[(&str, &str)]| {
        let out = std::process::Command::new(meshwork_tests::bin())
            .args(args)
            .args(["--http", &s.http])
            .env_remove("MESHWORK_CONSOLE_PASSWORD")
            .env_remove("MESHWORK_TOKEN")
            .envs(envs.iter().copied())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let admin = [("MESHWORK_CONSOLE_PASSWORD", PASSWORD)];
    let (ok, out, err) = cli(
        &[
            "token",
            "create",
            "--scope",
            "ids:write",
            "--ttl",
            "30d",
            "--description",
            "batch",
            "--json",
        ],
        &admin,
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let token = v["token"].as_str().unwrap().to_string();
    let id = v["info"]["id"].as_str().unwrap().to_string();
    // The token works for what its scope covers, from the environment.
    let (ok, _, err) = cli(
        &["id", "next", "--count", "2"],
        &[("MESHWORK_TOKEN", &token)],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = cli(
        &["lock", "acquire", "jobs", "--ttl", "10"],
        &[("MESHWORK_TOKEN", &token)],
    );
    assert!(!ok && err.contains("403"), "{err}");
    // Without credentials nothing is written.
    let (ok, _, err) = cli(&["id", "next"], &[]);
    assert!(!ok && err.contains("401"), "{err}");
    // A token cannot list or make tokens; the administrator can.
    let (ok, _, err) = cli(&["token", "list"], &[("MESHWORK_TOKEN", &token)]);
    assert!(!ok && err.contains("403"), "{err}");
    let (ok, out, err) = cli(&["token", "list"], &admin);
    assert!(
        ok && out.contains(&id) && out.contains("batch"),
        "{out}{err}"
    );
    assert!(!out.contains(&token), "the list shows no secret");
    let (ok, _, err) = cli(&["token", "create", "--scope", "kv:read"], &admin);
    assert!(!ok && err.contains("unknown area"), "{err}");
    let (ok, _, err) = cli(&["token", "revoke", &id], &admin);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&["id", "next"], &[("MESHWORK_TOKEN", &token)]);
    assert!(!ok && err.contains("401"), "{err}");
}

#[test]
fn a_node_open_to_the_network_refuses_to_start_unless_told() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        std::process::Command::new(meshwork_tests::bin())
            .arg("server")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--roles", "store"])
            .args(extra)
            .env_remove("MESHWORK_CONSOLE_PASSWORD")
            .output()
            .unwrap()
    };
    let out = run(&["--http-addr", "0.0.0.0:0", "--etcd-addr", "127.0.0.1:0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to start") && err.contains("no console password"),
        "{err}"
    );
    let out = run(&["--http-addr", "127.0.0.1:0", "--etcd-addr", "0.0.0.0:0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("store auth off"),
        "{err}"
    );
    // Told: it starts (and is stopped here).
    let s = meshwork_tests::start(
        &dir.path().join("data2"),
        &["--http-addr", "0.0.0.0:0", "--insecure-allow-open"],
        &[],
    );
    assert!(!s.http.is_empty());
}

#[test]
fn the_audit_log_says_who_changed_what_and_who_was_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = node(dir.path());
    let addr = s.http.as_str();
    let (ids, id) = token(addr, &["ids:write"], None);
    let bearer = format!("Bearer {ids}");
    assert_eq!(
        status(addr, "POST", "/v1/ids", &[("Authorization", &bearer)], ""),
        200
    );
    assert_eq!(
        status(
            addr,
            "POST",
            "/v1/locks/jobs",
            &[("Authorization", &bearer)],
            "{}"
        ),
        403
    );
    assert_eq!(
        status(addr, "DELETE", "/v1/services/x/instances/y", &[], ""),
        401
    );
    let entries = meshwork_testkit::blocking::eventually(
        "the audit entries to be written",
        Duration::from_secs(10),
        || {
            let (code, resp) = http::raw(
                addr,
                &format!(
                    "GET /v1/audit?limit=50 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {}",
                    basic()
                ),
                "",
            )
            .ok()?;
            assert_eq!(code, 200, "{resp}");
            let v: serde_json::Value =
                serde_json::from_str(meshwork_testkit::http::body_of(&resp)).ok()?;
            let entries = v["entries"].as_array()?.clone();
            (entries.len() >= 4).then_some(entries)
        },
    );
    let find = |method: &str, path: &str| {
        entries
            .iter()
            .find(|e| e["method"] == method && e["path"] == path)
            .unwrap_or_else(|| panic!("no entry for {method} {path} in {entries:?}"))
            .clone()
    };
    let made = find("POST", "/v1/auth/tokens");
    assert_eq!(made["who"], "console:admin");
    assert_eq!(made["status"], 201);
    assert!(
        made["from"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{made}"
    );
    let next = find("POST", "/v1/ids");
    assert_eq!(next["who"], format!("token:{id}"));
    assert_eq!(next["scope"], "ids:write");
    assert_eq!(next["status"], 200);
    let refused = find("POST", "/v1/locks/jobs");
    assert_eq!(
        (refused["who"].as_str(), refused["status"].as_u64()),
        (Some(format!("token:{id}").as_str()), Some(403))
    );
    let anon = find("DELETE", "/v1/services/x/instances/y");
    assert_eq!(
        (anon["who"].as_str(), anon["status"].as_u64()),
        (Some("anonymous"), Some(401))
    );
    // Newest first.
    let times: Vec<u64> = entries
        .iter()
        .map(|e| e["at_ms"].as_u64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    // The log itself needs admin.
    assert_eq!(
        status(addr, "GET", "/v1/audit", &[("Authorization", &bearer)], ""),
        403
    );
}

#[test]
fn password_guessing_is_throttled_and_tokens_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node.toml");
    std::fs::write(&cfg, "[console]\ntoken_rate_per_sec = 5\n").unwrap();
    let s = meshwork_tests::start(
        &dir.path().join("data"),
        &["--roles", "store,coord", "--config", cfg.to_str().unwrap()],
        &[("MESHWORK_CONSOLE_PASSWORD", PASSWORD)],
    );
    let addr = s.http.as_str();
    let login = |password: &str| {
        status(
            addr,
            "POST",
            "/v1/console/login",
            &[],
            &serde_json::json!({"user": "admin", "password": password}).to_string(),
        )
    };
    // Five wrong guesses are answered; then even the right password waits.
    for _ in 0..5 {
        assert_eq!(login("guess-guess"), 401);
    }
    assert_eq!(login(PASSWORD), 429);
    // Basic credentials for the same user from here wait too; another user
    // name is its own count, and a token is not held back.
    let wrong = "Basic YWRtaW46d3Jvbmctd3Jvbmc="; // admin:wrong-wrong
    assert_eq!(
        status(addr, "POST", "/v1/ids", &[("Authorization", wrong)], ""),
        429
    );
    let other = "Basic cm9vdDp3cm9uZy13cm9uZw=="; // root:wrong-wrong
    assert_eq!(
        status(addr, "POST", "/v1/ids", &[("Authorization", other)], ""),
        401
    );
    meshwork_testkit::blocking::until("the wait to end", Duration::from_secs(5), || {
        login(PASSWORD) == 200
    });
    // A token calls at most 5/s in bursts of 10: a quick run of 30 is cut.
    let (tok, _) = token(addr, &["ids:write"], None);
    let bearer = format!("Bearer {tok}");
    let codes: Vec<u16> = (0..30)
        .map(|_| status(addr, "POST", "/v1/ids", &[("Authorization", &bearer)], ""))
        .collect();
    assert!(
        codes.iter().filter(|c| **c == 200).count() >= 10,
        "{codes:?}"
    );
    assert!(codes.contains(&429), "{codes:?}");
    assert!(codes.iter().all(|c| *c == 200 || *c == 429), "{codes:?}");
}

/// One request with optional credentials (`Authorization` value): status and body.
fn call(addr: &str, method: &str, path: &str, auth: Option<&str>, body: &str) -> (u16, String) {
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json");
    if let Some(a) = auth {
        head.push_str(&format!("\r\nAuthorization: {a}"));
    }
    let (code, resp) = http::raw(addr, &head, body).unwrap();
    (code, meshwork_testkit::http::body_of(&resp).to_string())
}

/// Every byte of every file under `dir`.
fn files_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_bytes(&p));
        } else if let Ok(b) = std::fs::read(&p) {
            out.extend(b);
        }
    }
    out
}

/// Secret config entries over the HTTP API: written with a config scope,
/// read only with `secrets:read` on their namespace (401 anonymous, 403 with
/// a token that lacks it, even where reads are open), listed without their
/// content, and never on disk in clear; the key status and rotation are for
/// administrators.
#[test]
fn secret_config_entries_need_the_secrets_scope_and_stay_encrypted_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let key = "5ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2";
    let s = meshwork_tests::start(
        &dir.path().join("data"),
        &["--roles", "store,coord"],
        &[
            ("MESHWORK_CONSOLE_PASSWORD", PASSWORD),
            ("MESHWORK_SECRETS_KEY", key),
        ],
    );
    let addr = s.http.as_str();
    let bearer = |t: &str| format!("Bearer {t}");
    let (writer, _) = token(addr, &["config:write:prod"], None);
    let (reader, _) = token(addr, &["config:read:prod", "secrets:read:prod"], None);
    let (plain_reader, _) = token(addr, &["config:read:prod"], None);
    let (elsewhere, _) = token(addr, &["secrets:read:staging"], None);
    const SECRET: &str = "dsn = \"postgres://app:s3cr3t-Pa55word@db/app\"";
    let body = serde_json::json!({"content": SECRET, "format": "toml", "secret": true}).to_string();
    let entry = "/v1/config/prod/db/dsn";
    let (code, resp) = call(addr, "PUT", entry, Some(&bearer(&writer)), &body);
    assert_eq!(code, 201, "{resp}");
    assert!(
        !resp.contains("s3cr3t"),
        "the answer does not echo it: {resp}"
    );
    let body2 =
        serde_json::json!({"content": format!("{SECRET}\npool = 4"), "format": "toml"}).to_string();
    assert_eq!(
        call(addr, "PUT", entry, Some(&bearer(&writer)), &body2).0,
        200
    );

    // Reading the content: who may and who may not.
    let (code, resp) = call(addr, "GET", entry, None, "");
    assert_eq!(code, 401, "anonymous, although reads are open: {resp}");
    assert!(resp.contains("secrets:read:prod"), "{resp}");
    for t in [&writer, &plain_reader, &elsewhere] {
        let (code, resp) = call(addr, "GET", entry, Some(&bearer(t)), "");
        assert_eq!(code, 403, "{resp}");
        assert!(!resp.contains("s3cr3t"));
        for sub in ["/history/1", "/diff?from=1&to=2", "/watch"] {
            let (code, _) = call(addr, "GET", &format!("{entry}{sub}"), Some(&bearer(t)), "");
            assert_eq!(code, 403, "{sub}");
        }
    }
    let (code, resp) = call(addr, "GET", entry, Some(&bearer(&reader)), "");
    assert_eq!(code, 200, "{resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["content"], format!("{SECRET}\npool = 4"));
    assert_eq!(v["secret"], true);
    assert!(
        v.get("sealed").is_none(),
        "no ciphertext in answers: {resp}"
    );
    let (code, resp) = call(
        addr,
        "GET",
        &format!("{entry}/history/1"),
        Some(&bearer(&reader)),
        "",
    );
    assert_eq!(code, 200);
    assert!(resp.contains("s3cr3t"), "{resp}");
    let (code, resp) = call(
        addr,
        "GET",
        &format!("{entry}/diff?from=1&to=2"),
        Some(&bearer(&reader)),
        "",
    );
    assert_eq!(code, 200);
    assert!(resp.contains("pool = 4"), "{resp}");
    assert_eq!(
        call(addr, "GET", entry, Some(&basic()), "").0,
        200,
        "the administrator reads it"
    );

    // Lists and history show that it is a secret, never what it is.
    for path in [
        "/v1/config?namespace=prod",
        "/v1/config/prod/db/dsn/history",
    ] {
        let (code, resp) = call(addr, "GET", path, None, "");
        assert_eq!(code, 200, "{path}: {resp}");
        assert!(
            resp.contains("\"secret\":true") && !resp.contains("s3cr3t"),
            "{resp}"
        );
    }

    // The console marks it and never renders it, even to the administrator.
    for page in [
        "/ui/config?namespace=prod",
        "/ui/config/prod/db/dsn?from=1&to=2",
    ] {
        let (code, html) = call(addr, "GET", page, Some(&basic()), "");
        assert_eq!(code, 200, "{page}");
        assert!(
            html.contains("secret") && !html.contains("s3cr3t"),
            "{page}: {html}"
        );
    }

    // The keys' status and rotation: administrators only.
    assert_eq!(
        call(
            addr,
            "GET",
            "/v1/config/secrets",
            Some(&bearer(&reader)),
            ""
        )
        .0,
        403
    );
    assert_eq!(
        call(
            addr,
            "POST",
            "/v1/config/secrets/rotate",
            Some(&bearer(&writer)),
            ""
        )
        .0,
        403
    );
    let (code, resp) = call(addr, "GET", "/v1/config/secrets", Some(&basic()), "");
    assert_eq!(code, 200, "{resp}");
    assert!(
        resp.contains("\"enabled\":true") && resp.contains("\"entries\":1"),
        "{resp}"
    );
    assert!(!resp.contains(key), "never key material");
    let (code, resp) = call(
        addr,
        "POST",
        "/v1/config/secrets/rotate",
        Some(&basic()),
        "",
    );
    assert_eq!(code, 200, "{resp}");
    assert!(resp.contains("\"resealed\":1"), "{resp}");
    let (code, resp) = call(addr, "GET", entry, Some(&bearer(&reader)), "");
    assert_eq!(code, 200);
    assert!(
        resp.contains("s3cr3t"),
        "still opens after the rotation: {resp}"
    );

    // Nothing on disk holds it in clear: not the store, not the WAL, not a log.
    let disk = files_bytes(dir.path());
    assert!(!disk.is_empty());
    assert!(
        !disk
            .windows(b"s3cr3t-Pa55word".len())
            .any(|w| w == b"s3cr3t-Pa55word"),
        "the secret is in a file under the data directory"
    );
}

/// A console session outlives a restart of the node (its signing key is kept
/// in the store), and ends when the password changes.
#[test]
fn console_sessions_survive_a_restart_but_not_a_new_password() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let start = |password: &str| {
        meshwork_tests::start(
            &data,
            &["--roles", "store,coord"],
            &[("MESHWORK_CONSOLE_PASSWORD", password)],
        )
    };
    let s = start(PASSWORD);
    let body = serde_json::json!({"user": "admin", "password": PASSWORD}).to_string();
    let (code, whole) = http::raw(
        &s.http,
        &format!(
            "POST /v1/console/login HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json",
            s.http
        ),
        &body,
    )
    .unwrap();
    assert!(code == 200 || code == 204, "{code} {whole}");
    let cookie = whole
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().starts_with("set-cookie:").then(|| {
                l["set-cookie:".len()..]
                    .trim()
                    .split(';')
                    .next()
                    .unwrap()
                    .to_string()
            })
        })
        .expect("a session cookie");
    let write = |addr: &str| status(addr, "POST", "/v1/ids", &[("Cookie", cookie.as_str())], "");
    assert_eq!(write(&s.http), 200);
    drop(s);
    let s = start(PASSWORD);
    assert_eq!(write(&s.http), 200, "the session survived the restart");
    drop(s);
    let s = start("another long passphrase");
    assert_eq!(write(&s.http), 401, "a new password ends every session");
}

/// The session cookie of a console login by `user`.
fn login_cookie(addr: &str, user: &str, password: &str) -> Option<String> {
    let body = serde_json::json!({"user": user, "password": password}).to_string();
    let (_, whole) = http::raw(
        addr,
        &format!(
            "POST /v1/console/login HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json"
        ),
        &body,
    )
    .unwrap();
    whole.lines().find_map(|l| {
        l.to_ascii_lowercase().starts_with("set-cookie:").then(|| {
            l["set-cookie:".len()..]
                .trim()
                .split(';')
                .next()
                .unwrap_or_default()
                .to_string()
        })
    })
}

/// Users kept in the store sign in (console login or HTTP Basic) with their
/// own password and get their own scopes, nothing more; a new password or
/// new scopes end their sessions, removal ends them all; no answer shows a
/// password or its hash.
#[test]
fn store_users_sign_in_with_their_own_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let s = node(dir.path());
    let h = s.http.as_str();
    let admin = basic();
    let add = |body: &str| call(h, "POST", "/v1/auth/users", Some(&admin), body);
    let (code, body) =
        add(r#"{"name":"alice","password":"alice passphrase","scopes":["config:write:public"]}"#);
    assert_eq!(code, 201, "{body}");
    assert!(
        !body.contains("passphrase") && !body.contains("argon2"),
        "{body}"
    );
    // A taken name, a short password, a bad scope, a bad name: refused.
    let (code, _) = add(r#"{"name":"alice","password":"another passphrase","scopes":["admin"]}"#);
    assert_eq!(code, 409);
    let (code, body) = add(r#"{"name":"bob","password":"short","scopes":["admin"]}"#);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("8 characters"), "{body}");
    let (code, _) = add(r#"{"name":"bob","password":"long enough","scopes":["root"]}"#);
    assert_eq!(code, 400);
    let (code, _) = add(r#"{"name":"bo b","password":"long enough","scopes":["admin"]}"#);
    assert_eq!(code, 400);

    let alice = basic_of("alice", "alice passphrase");
    let publish = |ns: &str, auth: &str| {
        call(
            h,
            "PUT",
            &format!("/v1/config/{ns}/G/app.toml"),
            Some(auth),
            r#"{"content":"port = 1\n","format":"toml"}"#,
        )
        .0
    };
    assert_eq!(publish("public", &alice), 201, "her scope");
    assert_eq!(publish("billing", &alice), 403, "not her namespace");
    let (code, _) = call(
        h,
        "POST",
        "/v1/auth/tokens",
        Some(&alice),
        r#"{"scopes":["admin"]}"#,
    );
    assert_eq!(code, 403, "no admin scope: no tokens");
    let (code, _) = call(h, "GET", "/v1/auth/users", Some(&alice), "");
    assert_eq!(code, 403);
    assert_eq!(
        publish("public", &basic_of("alice", "wrong passphrase")),
        401
    );
    // The raw keyspace page is for administrators, as its API is.
    let (code, page) = call(h, "GET", "/ui/kv?prefix=/meshwork/auth/", Some(&alice), "");
    assert_eq!(code, 200);
    assert!(
        page.contains("as an administrator") && !page.contains("argon2"),
        "{page}"
    );
    // A store user named like the administrator is never the administrator.
    let (code, body) =
        add(r#"{"name":"admin","password":"not the admin's","scopes":["ids:write"]}"#);
    assert_eq!(code, 201, "{body}");
    let (code, _) = call(
        h,
        "POST",
        "/v1/auth/tokens",
        Some(&basic_of("admin", "not the admin's")),
        r#"{"scopes":["admin"]}"#,
    );
    assert_eq!(code, 401);

    // A console login: the cookie carries her scopes.
    let cookie = login_cookie(h, "alice", "alice passphrase").expect("a session");
    let with_cookie = |path: &str| {
        status(
            h,
            "PUT",
            path,
            &[("Cookie", cookie.as_str())],
            r#"{"content":"port = 2\n","format":"toml"}"#,
        )
    };
    assert_eq!(with_cookie("/v1/config/public/G/app.toml"), 200);
    assert_eq!(with_cookie("/v1/config/billing/G/app.toml"), 403);

    // A new password: her session and her old password end.
    let (code, body) = call(
        h,
        "PUT",
        "/v1/auth/users/alice",
        Some(&admin),
        r#"{"password":"a newer passphrase"}"#,
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(with_cookie("/v1/config/public/G/app.toml"), 401);
    assert_eq!(publish("public", &alice), 401);
    let alice = basic_of("alice", "a newer passphrase");
    assert_eq!(publish("public", &alice), 200);
    // New scopes take effect at once.
    let (code, _) = call(
        h,
        "PUT",
        "/v1/auth/users/alice",
        Some(&admin),
        r#"{"scopes":["config:write:billing"]}"#,
    );
    assert_eq!(code, 200);
    assert_eq!(publish("billing", &alice), 201);
    assert_eq!(publish("public", &alice), 403);

    let (code, body) = call(h, "GET", "/v1/auth/users", Some(&admin), "");
    assert_eq!(code, 200);
    assert!(
        body.contains("\"alice\"") && !body.contains("argon2"),
        "{body}"
    );
    // Removed: nothing she holds works.
    let (code, _) = call(h, "DELETE", "/v1/auth/users/alice", Some(&admin), "");
    assert_eq!(code, 204);
    assert_eq!(publish("billing", &alice), 401);
    let (code, _) = call(h, "DELETE", "/v1/auth/users/alice", Some(&admin), "");
    assert_eq!(code, 404);
}

/// `meshwork user`: add (the password from standard input), list, passwd,
/// scopes, rm; the user then signs in from the CLI like the administrator
/// (`MESHWORK_CONSOLE_USER` / `MESHWORK_CONSOLE_PASSWORD`).
#[test]
fn the_cli_manages_users_who_then_sign_in() {
    let dir = tempfile::tempdir().unwrap();
    let s = node(dir.path());
    let cli = |args: &[&str], envs: &[(&str, &str)], input: &str| {
        let mut cmd = std::process::Command::new(meshwork_tests::bin());
        cmd.args(args)
            .args(["--http", &s.http])
            .env_remove("MESHWORK_CONSOLE_USER")
            .env_remove("MESHWORK_CONSOLE_PASSWORD")
            .env_remove("MESHWORK_TOKEN")
            .envs(envs.iter().copied());
        let out = meshwork_testkit::peer::run_with_input(&mut cmd, input);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let admin = [("MESHWORK_CONSOLE_PASSWORD", PASSWORD)];
    let (ok, out, err) = cli(
        &["user", "add", "batch", "--scope", "ids:write"],
        &admin,
        "batch passphrase\n",
    );
    assert!(
        ok && out.contains("batch") && out.contains("ids:write"),
        "{out}{err}"
    );
    assert!(!out.contains("passphrase"), "{out}");
    let as_batch = |password: &str| {
        cli(
            &["id", "next"],
            &[
                ("MESHWORK_CONSOLE_USER", "batch"),
                ("MESHWORK_CONSOLE_PASSWORD", password),
            ],
            "",
        )
    };
    let (ok, _, err) = as_batch("batch passphrase");
    assert!(ok, "{err}");
    // Without a password on standard input nothing is added.
    let (ok, _, err) = cli(&["user", "add", "x", "--scope", "admin"], &admin, "");
    assert!(!ok && err.contains("standard input"), "{err}");
    let (ok, _, err) = cli(&["user", "passwd", "batch"], &admin, "another passphrase\n");
    assert!(ok, "{err}");
    let (ok, _, err) = as_batch("batch passphrase");
    assert!(!ok && err.contains("401"), "{err}");
    let (ok, _, err) = cli(
        &["user", "scopes", "batch", "--scope", "locks:write"],
        &admin,
        "",
    );
    assert!(ok, "{err}");
    let (ok, _, err) = as_batch("another passphrase");
    assert!(!ok && err.contains("403"), "ids:write is gone: {err}");
    let (ok, out, err) = cli(&["user", "list"], &admin, "");
    assert!(ok && out.contains("locks:write"), "{out}{err}");
    let (ok, _, err) = cli(&["user", "rm", "batch"], &admin, "");
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&["user", "rm", "batch"], &admin, "");
    assert!(!ok && err.contains("404"), "{err}");
}
