//! Coordination through the binary: the `svc`, `config`, `lock` and `id` commands
//! against a running node, and a node killed with SIGKILL handing its health checks
//! to another node on the same store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use meshwork_testkit::blocking::{eventually, until};
use meshwork_testkit::http::blocking as http;
use meshwork_tests::meshwork_http as run;

fn json(node: &str, path: &str) -> serde_json::Value {
    let (code, body) = http::get(node, path).unwrap();
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn svc_config_lock_and_id_commands() {
    let dir = tempfile::tempdir().unwrap();
    let s = meshwork_tests::start(dir.path(), &["--roles", "store,coord"], &[]);
    let h = s.http.as_str();

    let (ok, out, err) = run(
        h,
        &[
            "svc",
            "register",
            "orders",
            "--address",
            "127.0.0.1",
            "--port",
            "9100",
            "--persistent",
            "--tag",
            "blue",
            "--zone",
            "z1",
            "--meta",
            "team=shop",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.starts_with("ID ") && out.contains("127.0.0.1:9100"),
        "{out}"
    );
    let (ok, out, _) = run(h, &["svc", "list"]);
    assert!(ok);
    assert!(out.lines().any(|l| l.starts_with("orders")), "{out}");
    // A table by default; the API's JSON with -o json or --json.
    let (_, out, _) = run(h, &["svc", "get", "orders", "--tags", "blue"]);
    let mut lines = out.lines();
    assert!(lines.next().unwrap().starts_with("ID "), "{out}");
    assert!(
        lines.next().unwrap().starts_with("127.0.0.1:9100 "),
        "{out}"
    );
    let (_, out, _) = run(h, &["svc", "get", "orders", "--tags", "blue", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["instances"][0]["metadata"]["team"], "shop");
    let (_, out, _) = run(h, &["svc", "get", "orders", "--zone", "z2", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["instances"].as_array().unwrap().len(), 0);
    // Bad input: non-zero exit and the API's message.
    let (ok, _, err) = run(
        h,
        &[
            "svc",
            "register",
            "bad/name",
            "--address",
            "127.0.0.1",
            "--port",
            "1",
        ],
    );
    assert!(!ok);
    assert!(err.contains("404") || err.contains("service name"), "{err}");
    let (ok, _, err) = run(
        h,
        &[
            "svc",
            "register",
            "orders",
            "--address",
            "bad host",
            "--port",
            "1",
        ],
    );
    assert!(!ok);
    assert!(err.contains("invalid_argument"), "{err}");

    let path = "public/DEFAULT_GROUP/app.toml";
    let (ok, out, err) = run(
        h,
        &[
            "config",
            "publish",
            path,
            "--format",
            "toml",
            "--content",
            "port = 80\n",
            "--author",
            "me",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("version 1"), "{out}");
    let (ok, _, err) = run(
        h,
        &[
            "config",
            "publish",
            path,
            "--format",
            "toml",
            "--content",
            "port = \n",
        ],
    );
    assert!(!ok);
    assert!(err.contains("line 1"), "{err}");
    let (ok, _, err) = run(
        h,
        &[
            "config",
            "publish",
            path,
            "--format",
            "toml",
            "--content",
            "port = 81\n",
            "--if-version",
            "5",
        ],
    );
    assert!(!ok);
    assert!(err.contains("409"), "{err}");
    run(
        h,
        &[
            "config",
            "publish",
            path,
            "--format",
            "toml",
            "--content",
            "port = 81\n",
        ],
    );
    let (_, out, _) = run(h, &["config", "get", path, "--raw"]);
    assert_eq!(out, "port = 81\n");
    let (_, out, _) = run(h, &["config", "diff", path, "1", "2"]);
    assert!(
        out.contains("-port = 80") && out.contains("+port = 81"),
        "{out}"
    );
    let (ok, out, _) = run(h, &["config", "rollback", path, "1"]);
    assert!(ok);
    assert!(out.contains("now version 3"), "{out}");
    let (_, out, _) = run(h, &["config", "history", path]);
    assert_eq!(out.lines().count(), 4, "{out}");
    assert!(out.contains("rollback"));

    let (ok, out, _) = run(h, &["id", "next", "--count", "3"]);
    assert!(ok);
    let ids: Vec<i64> = out.lines().map(|l| l.parse().unwrap()).collect();
    assert!(ids.len() == 3 && ids[0] < ids[1] && ids[1] < ids[2]);
    let (_, out, _) = run(h, &["id", "explain", &ids[0].to_string()]);
    assert!(out.starts_with("ID ") && out.contains("WORKER"), "{out}");
    let (_, out, _) = run(h, &["id", "explain", &ids[0].to_string(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["id"], ids[0].to_string());

    // Only leases granted through the API can be renewed or revoked by id: an
    // instance's own lease cannot be revoked by a stranger.
    let (code, body) = http::post(
        h,
        "/v1/services/eph/instances",
        r#"{"address":"127.0.0.1","port":9200,"ttl_seconds":30}"#,
    )
    .unwrap();
    assert_eq!(code, 201, "{body}");
    let lease = serde_json::from_str::<serde_json::Value>(&body).unwrap()["lease"]
        .as_i64()
        .unwrap();
    let (code, body) = http::request(h, "DELETE", &format!("/v1/leases/{lease}"), "").unwrap();
    assert_eq!(code, 404, "{body}");
    let (code, body) = http::post(h, "/v1/leases", r#"{"ttl_seconds":10}"#).unwrap();
    assert_eq!(code, 201, "{body}");
    let own = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_i64()
        .unwrap();
    let (code, _) = http::request(h, "DELETE", &format!("/v1/leases/{own}"), "").unwrap();
    assert_eq!(code, 204);

    let v = json(h, "/v1/locks");
    assert_eq!(v["locks"].as_array().unwrap().len(), 0);
    let api = json(h, "/openapi.json");
    assert!(api["paths"].is_object());
}

fn checker_of(node: &str, svc: &str, id: &str) -> Option<String> {
    let (code, body) = http::get(node, &format!("/v1/services/{svc}/instances/{id}")).ok()?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["health_detail"]["checker"].as_str().map(str::to_string)
}

/// Three nodes: `a` serves the store (and runs no checks); `b` and `c` run
/// coordination on it with `--store etcd://`. The node checking an instance is
/// killed with SIGKILL; the other takes the check over within its session TTL plus
/// a check interval.
#[test]
fn a_killed_node_hands_its_health_checks_over() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("a.toml");
    std::fs::write(&cfg, "[coord]\nrun_health_checks = false\n").unwrap();
    let a = meshwork_tests::start(
        &dir.path().join("a"),
        &[
            "--roles",
            "store,coord",
            "--name",
            "a",
            "--config",
            cfg.to_str().unwrap(),
        ],
        &[],
    );
    let store = format!("etcd://{}", a.etcd);
    let mut nodes: Vec<(String, meshwork_tests::Server)> = ["b", "c"]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                meshwork_tests::start(
                    &dir.path().join(n),
                    &[
                        "--roles",
                        "coord",
                        "--store",
                        &store,
                        "--name",
                        n,
                        "--node-ttl",
                        "2",
                    ],
                    &[],
                ),
            )
        })
        .collect();
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = target.local_addr().unwrap().port();
    let body = format!(
        r#"{{"address":"127.0.0.1","port":{port},"ephemeral":false,
            "check":{{"type":"tcp","interval_ms":300,"timeout_ms":200}}}}"#
    );
    let (code, resp) = http::post(&a.http, "/v1/services/web/instances", &body).unwrap();
    assert_eq!(code, 201, "{resp}");
    let id = format!("127.0.0.1:{port}");
    let first = eventually(
        "a node to pick the check up",
        Duration::from_secs(15),
        || checker_of(&a.http, "web", &id),
    );
    assert!(first == "b" || first == "c", "checker {first}");
    let i = nodes.iter().position(|(n, _)| *n == first).unwrap();
    let (_, mut victim) = nodes.remove(i);
    let killed = Instant::now();
    victim.kill9();
    let other = &nodes[0].0;
    // TTL 2 s + interval 0.3 s; allow slack for a loaded CI machine.
    let deadline = killed + Duration::from_secs(12);
    loop {
        if checker_of(&a.http, "web", &id).as_deref() == Some(other.as_str()) {
            break;
        }
        if Instant::now() >= deadline {
            let inst = http::get(&a.http, &format!("/v1/services/web/instances/{id}"));
            let members = http::get(&a.http, "/v1/nodes");
            let events = http::get(&a.http, "/v1/registry/events?service=web");
            panic!("the check did not move to {other}: {inst:?} {members:?} {events:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "check moved from {first} to {other} in {:?}",
        killed.elapsed()
    );
    // And it keeps checking: close the target, the new checker marks it failing.
    drop(target);
    let v = eventually(
        "the new checker to see the failure",
        Duration::from_secs(10),
        || {
            let (_, body) =
                http::get(&a.http, &format!("/v1/services/web/instances/{id}")).unwrap();
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            (v["health"] == "failing").then_some(v)
        },
    );
    assert_eq!(v["health_detail"]["checker"], other.as_str());
}

/// Acknowledged coordination writes survive SIGKILL: config versions published and
/// persistent instances registered while the node is killed are all there after a
/// restart, with their history intact.
#[test]
fn acknowledged_coordination_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut s = meshwork_tests::start(&data, &["--roles", "store,coord"], &[]);
    let node = s.http.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            for i in 0..10_000u32 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let body = format!(r#"{{"content":"n = {i}\n","format":"toml"}}"#);
                match http::request(&node, "PUT", "/v1/config/crash/g/app.toml", &body) {
                    Ok((200 | 201, resp)) => {
                        let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
                        acked.push((v["entry"]["version"].as_u64().unwrap(), i));
                    }
                    _ => break,
                }
                let inst = format!(
                    r#"{{"address":"127.0.0.1","port":{},"ephemeral":false}}"#,
                    1000 + i
                );
                if !matches!(
                    http::post(&node, "/v1/services/crash/instances", &inst),
                    Ok((201, _))
                ) {
                    break;
                }
                acked.push((0, 1000 + i));
            }
            acked
        })
    };
    // Let some writes land, then kill the node in the middle of the stream.
    until("writes to land", Duration::from_secs(20), || {
        http::get(&s.http, "/v1/config/crash/g/app.toml")
            .is_ok_and(|(c, b)| c == 200 && b.contains("\"version\":2"))
    });
    s.kill9();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.join().unwrap();
    assert!(!acked.is_empty());
    let s2 = meshwork_tests::start(&data, &["--roles", "store,coord"], &[]);
    let (code, body) =
        http::get(&s2.http, "/v1/config/crash/g/app.toml/history?limit=10000").unwrap();
    assert_eq!(code, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    let versions: Vec<u64> = h["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    for (version, i) in &acked {
        if *version > 0 {
            assert!(
                versions.contains(version),
                "acked version {version} (n = {i}) lost"
            );
        } else {
            let (code, _) = http::get(
                &s2.http,
                &format!("/v1/services/crash/instances/127.0.0.1:{i}"),
            )
            .unwrap();
            assert_eq!(code, 200, "acked instance on port {i} lost");
        }
    }
    // History is gap-free: versions 1..=max.
    let max = versions.iter().copied().max().unwrap();
    assert_eq!(versions.len() as u64, max, "history has gaps: {versions:?}");
}

/// Someone deletes the node's own keys (`etcdctl del --prefix
/// /meshwork/nodes/`, then the id worker claims): the node sees it by watch,
/// starts a new session, and is back in `/v1/nodes`, allocating ids and
/// ready within seconds, without losing its session first.
#[test]
fn a_node_whose_keys_are_deleted_heals_itself() {
    use meshwork_etcd::proto::etcdserverpb as pb;
    let dir = tempfile::tempdir().unwrap();
    let s = meshwork_tests::start(dir.path(), &["--roles", "store,coord"], &[]);
    let h = s.http.as_str();
    let listed = |h: &str| {
        json(h, "/v1/nodes")["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == "meshwork")
    };
    assert!(listed(h));
    let ids_ok = |h: &str| http::post(h, "/v1/ids", "").map(|r| r.0).ok() == Some(200);
    assert!(ids_ok(h));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let delete_prefix = |prefix: &str| {
        rt.block_on(async {
            let mut c = meshwork_etcd::Client::connect(std::slice::from_ref(&s.etcd))
                .await
                .unwrap();
            let key = prefix.as_bytes().to_vec();
            let mut end = key.clone();
            *end.last_mut().unwrap() += 1;
            c.kv.delete_range(pb::DeleteRangeRequest {
                key: key.into(),
                range_end: end.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .deleted
        })
    };
    let heals = |h: &str| -> f64 {
        let (_, metrics) = http::get(h, "/metrics").unwrap();
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix("meshwork_coord_session_heals_total ")?
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0)
    };
    let back_within = Duration::from_secs(15);
    for (n, prefix) in [(1.0, "/meshwork/nodes/"), (2.0, "/meshwork/ids/")] {
        assert!(delete_prefix(prefix) >= 1, "{prefix} held this node's keys");
        // The node notices (the member key by watch, the id claim at its next
        // renewal, within a second) and starts over...
        until(
            &format!("a heal after deleting {prefix}"),
            back_within,
            || heals(h) >= n,
        );
        // ...and is whole again.
        until(
            &format!("back in /v1/nodes after deleting {prefix}"),
            back_within,
            || listed(h),
        );
        until(
            &format!("ids served after deleting {prefix}"),
            back_within,
            || ids_ok(h),
        );
        until(
            &format!("ready after deleting {prefix}"),
            back_within,
            || http::get(h, "/readyz").map(|r| r.0).ok() == Some(200),
        );
    }
}

/// One raw HTTP/1.1 request with the given head lines; the status and body.
fn raw(addr: &str, head: &str, body: &str) -> (u16, String) {
    let (status, out) = http::raw(addr, head, body).unwrap();
    (status, meshwork_testkit::http::body_of(&out).to_owned())
}

/// What a web page or a careless client can send, refused at the edge with
/// the API's JSON error and nothing written: a foreign Host (DNS
/// rebinding), a write from another site's page, a write not declared
/// JSON (an HTML form), a body that is not an object, and an author with a
/// terminal escape.
#[test]
fn the_http_api_refuses_foreign_hosts_cross_site_writes_and_non_json() {
    let dir = tempfile::tempdir().unwrap();
    let s = meshwork_tests::start(dir.path(), &["--roles", "store,coord"], &[]);
    let h = s.http.as_str();
    let put = |extra: &str, body: &str| {
        raw(
            h,
            &format!("PUT /v1/config/public/app/a HTTP/1.1\r\nHost: {h}{extra}"),
            body,
        )
    };
    let ok = r#"{"content":"x"}"#;
    let cases: [(&str, &str, &str, u16, &str); 7] = [
        (
            "two hosts",
            "\r\nContent-Type: application/json\r\nHost: evil.example",
            ok,
            400,
            "one Host",
        ),
        (
            "cross-site page",
            "\r\nContent-Type: application/json\r\nOrigin: http://evil.example",
            ok,
            403,
            "cross_origin",
        ),
        (
            "html form",
            "\r\nContent-Type: application/x-www-form-urlencoded",
            "content=x",
            415,
            "unsupported_media_type",
        ),
        (
            "text/plain",
            "\r\nContent-Type: text/plain",
            ok,
            415,
            "unsupported_media_type",
        ),
        ("no content type", "", ok, 415, "unsupported_media_type"),
        (
            "array body",
            "\r\nContent-Type: application/json",
            r#"["x"]"#,
            400,
            "invalid_body",
        ),
        (
            "escape in author",
            "\r\nContent-Type: application/json",
            "{\"content\":\"x\",\"author\":\"\\u001b[2J\"}",
            400,
            "U+001B",
        ),
    ];
    for (what, extra, body, status, needle) in cases {
        let (code, answer) = put(extra, body);
        assert_eq!(code, status, "{what}: {answer}");
        assert!(answer.contains(needle), "{what}: {answer}");
    }
    // Only one Host per request (two are refused by the parser, 400); a
    // single foreign one is refused by name.
    let (code, answer) = raw(
        h,
        "GET /v1/config HTTP/1.1\r\nHost: attacker.example:7070",
        "",
    );
    assert_eq!(code, 421, "{answer}");
    assert!(answer.contains("allowed_hosts"), "{answer}");
    assert_eq!(
        http::get(h, "/v1/config/public/app/a").unwrap().0,
        404,
        "nothing was written"
    );
    // The node's own pages write; so does a plain JSON client.
    let (code, answer) = put(
        &format!("\r\nContent-Type: application/json; charset=utf-8\r\nOrigin: http://{h}"),
        ok,
    );
    assert_eq!(code, 201, "{answer}");
    // Health probes answer whatever the Host.
    assert_eq!(
        raw(h, "GET /readyz HTTP/1.1\r\nHost: lb.internal", "").0,
        200
    );
}
