//! The gateway role of the binary: routes published with `meshwork gateway apply`
//! go live on the node, upstreams come from the registry and follow it, and an
//! invalid route set is refused whole while the previous one keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use meshwork_testkit::blocking::until;
use meshwork_testkit::http::blocking as http;
use meshwork_tests::meshwork_http as meshwork;

/// An upstream that answers its own name, on a thread with its own runtime.
fn upstream(name: &'static str) -> u16 {
    meshwork_tests::serve_app(
        axum::Router::new()
            .route("/health", axum::routing::get(|| async { "ok" }))
            .fallback(move || async move { name }),
    )
}

fn tally(gw: &str, path: &str, n: usize) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for _ in 0..n {
        let (code, body) = http::get(gw, path).unwrap();
        *m.entry(format!("{code} {body}")).or_insert(0) += 1;
    }
    m
}

/// A node running store, coordination and the gateway on free ports.
fn gateway_node(dir: &std::path::Path) -> meshwork_tests::Server {
    meshwork_tests::start(
        dir,
        &[
            "--roles",
            "store,coord,gateway",
            "--gateway-addr",
            "127.0.0.1:0",
        ],
        &[],
    )
}

/// How long a change takes at most to show on the gateways.
const WAIT: Duration = Duration::from_secs(10);

#[test]
fn routes_from_the_config_center_and_upstreams_from_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let s = gateway_node(dir.path());
    let (h, gw) = (s.http.as_str(), s.gateway.clone().unwrap());
    let (a, b) = (upstream("A"), upstream("B"));
    for port in [a, b] {
        let (ok, _, err) = meshwork(
            h,
            &[
                "svc",
                "register",
                "web",
                "--address",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--persistent",
            ],
        );
        assert!(ok, "{err}");
    }
    // No routes yet: a JSON 404.
    let (code, body) = http::get(&gw, "/api/x").unwrap();
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("no_route"));

    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        "[[routes]]\nname = \"web\"\n[routes.match]\npath = { prefix = \"/api\" }\n[routes.forward]\nservice = \"web\"\nstrip_prefix = \"/api\"\nlb = { policy = \"wrr\" }\n",
    )
    .unwrap();
    let (ok, out, err) = meshwork(h, &["gateway", "apply", "-f", routes.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("version 1"), "{out}");
    // Live within a second; both registered instances take traffic (round robin, so
    // that the test does not depend on P2C's latency-driven choices).
    until("the route to go live", WAIT, || {
        http::get(&gw, "/api/x")
            .map(|(c, _)| c == 200)
            .unwrap_or(false)
    });
    until("both instances to take traffic", WAIT, || {
        let t = tally(&gw, "/api/x", 20);
        t.contains_key("200 A") && t.contains_key("200 B")
    });
    let (_, out, _) = meshwork(
        h,
        &["gateway", "explain", &format!("http://{gw}/api/orders")],
    );
    assert!(out.contains("\"matched\": \"web\""), "{out}");

    // Deregistering an instance takes it out of rotation.
    let (ok, _, err) = meshwork(h, &["svc", "deregister", "web", &format!("127.0.0.1:{b}")]);
    assert!(ok, "{err}");
    until("B to leave rotation", WAIT, || {
        let t = tally(&gw, "/api/x", 20);
        t.len() == 1 && t.contains_key("200 A")
    });

    // An invalid set is refused whole; the previous one keeps serving.
    std::fs::write(
        &routes,
        "[[routes]]\nname = \"web\"\n[routes.match]\npath = { regex = \"(\" }\n[routes.forward]\nservice = \"web\"\n",
    )
    .unwrap();
    let (ok, _, err) = meshwork(h, &["gateway", "apply", "-f", routes.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("invalid_routes") && err.contains("match.path.regex"),
        "{err}"
    );
    assert_eq!(http::get(&gw, "/api/x").unwrap(), (200, "A".to_string()));

    // A new valid set replaces it.
    std::fs::write(
        &routes,
        "[[routes]]\nname = \"hello\"\n[routes.match]\npath = { exact = \"/hello\" }\n[routes.respond]\nstatus = 200\nbody = \"hi\"\n",
    )
    .unwrap();
    let (ok, applied, err) = meshwork(h, &["gateway", "apply", "-f", routes.to_str().unwrap()]);
    assert!(ok, "{err}");
    until("the new set to go live", WAIT, || {
        http::get(&gw, "/hello")
            .map(|r| r == (200, "hi".to_string()))
            .unwrap_or(false)
    });
    assert_eq!(http::get(&gw, "/api/x").unwrap().0, 404);
    // A table by default, headed by the same version `apply` printed.
    let (_, out, _) = meshwork(h, &["gateway", "routes"]);
    let version = applied.split_whitespace().nth(2).unwrap();
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some(format!("routes version {version}").as_str()),
        "{applied}\n{out}"
    );
    assert!(lines.next().unwrap().starts_with("PRIORITY"), "{out}");
    assert!(lines.next().unwrap().contains("hello"), "{out}");
    let (_, out, _) = meshwork(h, &["gateway", "routes", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["version"].to_string(), version);
    assert_eq!(v["routes"][0]["name"], "hello");
}

/// A `cluster = true` rate limit is shared by the gateway nodes: two nodes together
/// admit the limit's burst once, not once each.
#[test]
fn cluster_rate_limits_are_split_over_the_gateway_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let a = meshwork_tests::start(
        &dir.path().join("a"),
        &[
            "--roles",
            "store,coord,gateway",
            "--gateway-addr",
            "127.0.0.1:0",
            "--name",
            "a",
        ],
        &[],
    );
    let store = format!("etcd://{}", a.etcd);
    let b = meshwork_tests::start(
        &dir.path().join("b"),
        &[
            "--roles",
            "coord,gateway",
            "--store",
            &store,
            "--gateway-addr",
            "127.0.0.1:0",
            "--name",
            "b",
        ],
        &[],
    );
    until("both gateways in the membership", WAIT, || {
        let (_, body) = http::get(&a.http, "/v1/nodes").unwrap();
        body.matches("\"gateway\"").count() == 2
    });
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        "[[routes]]\nname = \"limited\"\nrate_limits = [{ by = \"route\", rate_per_sec = 0.01, burst = 10, cluster = true }]\n[routes.match]\npath = { exact = \"/x\" }\n[routes.respond]\nstatus = 200\nbody = \"ok\"\n",
    )
    .unwrap();
    let (ok, _, err) = meshwork(
        &a.http,
        &["gateway", "apply", "-f", routes.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let (ga, gb) = (a.gateway.clone().unwrap(), b.gateway.clone().unwrap());
    for gw in [&ga, &gb] {
        until("the route on every gateway", WAIT, || {
            http::get(gw, "/nothing")
                .map(|(c, _)| c == 404)
                .unwrap_or(false)
                && http::get(gw, "/x").map(|(c, _)| c != 404).unwrap_or(false)
        });
    }
    // Each node admits half the burst (the probes above took one each).
    let admitted = |gw: &str| {
        (0..20)
            .filter(|_| http::get(gw, "/x").unwrap().0 == 200)
            .count()
    };
    let (na, nb) = (admitted(&ga), admitted(&gb));
    assert_eq!(na + nb + 2, 10, "a admitted {na}, b admitted {nb}");
    let (code, body) = http::get(&ga, "/x").unwrap();
    assert_eq!(code, 429, "{body}");
    assert!(body.contains("rate_limited"), "{body}");
}

/// The operations `/openapi.json` documents for the gateway role answer as
/// documented: statuses listed, required fields present with their types.
#[test]
fn the_gateway_routes_api_answers_as_its_openapi_document_says() {
    let dir = tempfile::tempdir().unwrap();
    let s = gateway_node(dir.path());
    let h = s.http.as_str();
    let (status, body) = http::get(h, "/openapi.json").unwrap();
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let gateway_ops: Vec<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, item)| item["x-meshwork-role"] == "gateway")
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|k| ["get", "put", "post", "delete"].contains(&k.as_str()))
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect();
    assert_eq!(
        gateway_ops.len(),
        7,
        "GET and PUT /v1/gateway/routes and five admin GETs: {gateway_ops:?}"
    );
    let check = |method: &str, path: &str, status: u16, body: &str| {
        let op = &doc["paths"][path][method];
        let resp = &op["responses"][status.to_string()];
        assert!(
            !resp.is_null(),
            "{method} {path} answered {status}, not documented: {body}"
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        let schema_ref = resp["content"]["application/json"]["schema"]["$ref"]
            .as_str()
            .or_else(|| {
                resp["$ref"].as_str().map(|r| {
                    let name = r.rsplit('/').next().unwrap();
                    doc["components"]["responses"][name]["content"]["application/json"]["schema"]
                        ["$ref"]
                        .as_str()
                        .unwrap()
                })
            })
            .unwrap();
        let schema = &doc["components"]["schemas"][schema_ref.rsplit('/').next().unwrap()];
        for field in schema["required"].as_array().unwrap() {
            let f = field.as_str().unwrap();
            assert!(
                v.get(f).is_some(),
                "{method} {path} {status}: no `{f}` in {v}"
            );
            let ty = &schema["properties"][f]["type"];
            let ok = |t: &str| match t {
                "integer" => v[f].is_i64() || v[f].is_u64(),
                "string" => v[f].is_string(),
                "boolean" => v[f].is_boolean(),
                "object" => v[f].is_object(),
                "null" => v[f].is_null(),
                _ => true,
            };
            let matches = match ty {
                serde_json::Value::String(t) => ok(t),
                serde_json::Value::Array(ts) => ts.iter().any(|t| ok(t.as_str().unwrap())),
                _ => true,
            };
            assert!(matches, "{method} {path}: `{f}` is not {ty}: {v}");
        }
        if let Some(code) = v["error"]["code"].as_str() {
            let codes = &doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]
                ["code"]["enum"];
            assert!(
                codes.as_array().unwrap().iter().any(|c| c == code),
                "error code {code} is not in the documented enum"
            );
        }
    };
    let path = "/v1/gateway/routes";
    let (st, body) = http::get(h, path).unwrap();
    check("get", path, st, &body);
    assert_eq!(st, 200);
    let set = "[[routes]]\nname = \"hello\"\n[routes.match]\npath = { exact = \"/hello\" }\n[routes.respond]\nstatus = 200\nbody = \"hi\"\n";
    let (st, body) = http::request(h, "PUT", path, set).unwrap();
    check("put", path, st, &body);
    assert_eq!(st, 200);
    let (st, body) = http::request(h, "PUT", path, "[[routes]]\nname = 1\n").unwrap();
    check("put", path, st, &body);
    assert_eq!(st, 400);
    let (st, body) = http::request(h, "PUT", &format!("{path}?if_version=7"), set).unwrap();
    check("put", path, st, &body);
    assert_eq!(st, 409);
    let (st, body) = http::get(h, path).unwrap();
    check("get", path, st, &body);
    assert!(body.contains("hello"));
    // The admin API under /gateway.
    for (path, query) in [
        ("/gateway/routes", ""),
        ("/gateway/routes/source", ""),
        ("/gateway/upstreams", ""),
        ("/gateway/stats", ""),
        ("/gateway/explain", "?url=http%3A%2F%2Fx%2Fhello"),
        ("/gateway/explain", ""),
    ] {
        let (st, body) = http::get(h, &format!("{path}{query}")).unwrap();
        check("get", path, st, &body);
    }
    // Secrets in a published set are redacted wherever the set is shown.
    let secret_set = "[[routes]]\nname = \"api\"\n[routes.match]\npath = { prefix = \"/api\" }\n[routes.auth.api_keys]\nkeys = { mobile = \"k-very-secret\" }\n[routes.respond]\nstatus = 200\nbody = \"ok\"\n";
    let (st, body) = http::request(h, "PUT", path, secret_set).unwrap();
    assert_eq!(st, 200, "{body}");
    for p in [path, "/gateway/routes/source"] {
        until(&format!("{p} to show the new set"), WAIT, || {
            let (_, body) = http::get(h, p).unwrap();
            assert!(
                !body.contains("k-very-secret"),
                "{p} shows a secret: {body}"
            );
            body.contains("mobile")
        });
    }
}
