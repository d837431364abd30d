//! Service identity end to end: a node issuing certificates from an
//! authority (`--identity-ca`), services connecting with their identity on
//! (the SDK's `identity`), serving mutual TLS and calling each other over
//! it; the node checks their health over https by their name; the gateway
//! calls them with its own certificate (`forward.tls.identity`); curl (a
//! client we did not write) sees what a caller without a certificate sees.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use meshwork_sdk::server::{Caller, Server, ServerOptions};
use meshwork_sdk::{Meshwork, Options};
use meshwork_testkit::http::blocking as http;
use serde_json::Value;

fn options(etcd: &str, name: &str, identity: bool) -> Options {
    let mut o = Options::new(name, vec![etcd.to_owned()]).unwrap();
    o.identity = identity;
    o
}

fn curl(args: &[&str]) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "-", "-w", " %{http_code}"])
        .args(args)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_get_certificates_and_call_each_other_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    meshwork_tls::identity::Authority::create(&ca, 1).unwrap();
    let ca_arg = ca.display().to_string();
    let node = meshwork_tests::start(
        &dir.path().join("data"),
        &[
            "--roles",
            "store,coord,gateway",
            "--gateway-addr",
            "127.0.0.1:0",
            "--identity-ca",
            &ca_arg,
            "--identity-ttl",
            "600",
        ],
        &[],
    );
    let etcd = node.etcd.clone();

    // inventory serves with its identity and takes calls from order only;
    // its handler answers who called.
    let inv = Meshwork::connect(options(&etcd, "inventory", true))
        .await
        .unwrap();
    let id = inv.identity().expect("an identity");
    assert_eq!(id.service(), "inventory");
    let router = Router::new().route(
        "/whoami",
        get(|axum::Extension(c): axum::Extension<Caller>| async move {
            c.0.unwrap_or_else(|| "nobody".into())
        }),
    );
    let bound = Server::new(
        &inv,
        router,
        ServerOptions {
            allow_callers: Some(vec!["order".into(), "meshwork-gateway".into()]),
            ..ServerOptions::default()
        },
    )
    .bind()
    .await
    .unwrap();
    let port = bound.local_addr().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(bound.run_until(async move {
        let _ = stopped.await;
    }));

    // The node checks its health over https, verifying it is inventory.
    let h = node.http.clone();
    let inst = tokio::task::spawn_blocking(move || {
        meshwork_testkit::blocking::eventually(
            "inventory healthy by an https check",
            Duration::from_secs(20),
            || {
                let (_, body) = http::get(&h, "/v1/services/inventory/instances").ok()?;
                let v: Value = serde_json::from_str(&body).ok()?;
                let i = v["instances"][0].clone();
                (i["health"] == "passing").then_some(i)
            },
        )
    })
    .await
    .unwrap();
    assert_eq!(inst["metadata"]["tls"], "identity", "{inst}");

    // order (with its identity) calls it: mutual TLS, and inventory knows who.
    let order = Meshwork::connect(options(&etcd, "order", true))
        .await
        .unwrap();
    let req = || {
        axum::http::Request::builder()
            .uri("/whoami")
            .body(bytes_of(""))
            .unwrap()
    };
    let resp = order.http().call("inventory", req()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.body().as_ref(), b"order");

    // payment has an identity, but inventory does not take its calls.
    let payment = Meshwork::connect(options(&etcd, "payment", true))
        .await
        .unwrap();
    let resp = payment.http().call("inventory", req()).await.unwrap();
    assert_eq!(resp.status(), 403);
    assert!(
        String::from_utf8_lossy(resp.body()).contains("service payment may not call inventory"),
        "{resp:?}"
    );

    // Meshwork's own names are not for services.
    let e = Meshwork::connect(options(&etcd, "meshwork-gateway", true))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("reserved"), "{e}");

    // A service without an identity is told what it lacks.
    let plain = Meshwork::connect(options(&etcd, "reports", false))
        .await
        .unwrap();
    let e = plain.http().call("inventory", req()).await.unwrap_err();
    assert!(e.to_string().contains("MESHWORK_IDENTITY"), "{e}");

    // curl trusting the authority, without a certificate: the health path
    // answers, the service's own routes want one.
    let cacert = ca.join("ca.pem").display().to_string();
    let resolve = format!("inventory:{port}:127.0.0.1");
    let base = format!("https://inventory:{port}");
    let (cacert2, resolve2, base2) = (cacert.clone(), resolve.clone(), base.clone());
    let (health, whoami) = tokio::task::spawn_blocking(move || {
        (
            curl(&[
                "--cacert",
                &cacert2,
                "--resolve",
                &resolve2,
                &format!("{base2}/health"),
            ]),
            curl(&[
                "--cacert",
                &cacert2,
                "--resolve",
                &resolve2,
                &format!("{base2}/whoami"),
            ]),
        )
    })
    .await
    .unwrap();
    assert!(health.ends_with(" 200"), "{health}");
    assert!(
        whoami.contains("no_caller_identity") && whoami.ends_with(" 401"),
        "{whoami}"
    );
    // Plain HTTP to a TLS port is no way in.
    let plain_http =
        tokio::task::spawn_blocking(move || curl(&[&format!("http://127.0.0.1:{port}/whoami")]))
            .await
            .unwrap();
    assert!(!plain_http.contains("nobody"), "{plain_http}");
    // And a server certificate from another authority is refused by curl.
    let other = dir.path().join("other");
    meshwork_tls::identity::Authority::create(&other, 1).unwrap();
    let wrong = other.join("ca.pem").display().to_string();
    let refused = tokio::task::spawn_blocking(move || {
        curl(&[
            "--cacert",
            &wrong,
            "--resolve",
            &resolve,
            &format!("{base}/health"),
        ])
    })
    .await
    .unwrap();
    assert!(
        refused.starts_with(" 000") && refused.contains("certificate"),
        "{refused}"
    );

    // The gateway calls it with its own certificate, naming it.
    let h = node.http.clone();
    let gw = node.gateway.clone().unwrap();
    let through = tokio::task::spawn_blocking(move || {
        let set = "[[routes]]\nname = \"inv\"\n[routes.match]\npath = { prefix = \"/whoami\" }\n[routes.forward]\nservice = \"inventory\"\ntls = { identity = true }\n";
        let (st, body) = http::request(&h, "PUT", "/v1/gateway/routes", set).unwrap();
        assert_eq!(st, 200, "{body}");
        // Without the identity's authority, plain TLS settings are refused.
        let bad = "[[routes]]\nname = \"inv\"\n[routes.match]\npath = { prefix = \"/whoami\" }\n[routes.forward]\nservice = \"inventory\"\ntls = { identity = true, ca_file = \"/nowhere.pem\" }\n";
        let (st, body) = http::request(&h, "PUT", "/v1/gateway/routes", bad).unwrap();
        assert_eq!(st, 400, "{body}");
        assert!(body.contains("forward.tls.identity"), "{body}");
        meshwork_testkit::blocking::eventually(
            "the gateway to call inventory with its identity",
            Duration::from_secs(20),
            || {
                let (st, body) = http::get(&gw, "/whoami").ok()?;
                (st == 200).then_some(body)
            },
        )
    })
    .await
    .unwrap();
    assert_eq!(through, "meshwork-gateway");

    let _ = stop.send(());
    serving.await.unwrap().unwrap();
}

/// A route asking for the service identity on a node that issues none is
/// refused when published, saying what to start the node with.
#[test]
fn a_route_with_identity_needs_a_node_that_issues_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let node = meshwork_tests::start(
        dir.path(),
        &[
            "--roles",
            "store,coord,gateway",
            "--gateway-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    let set = "[[routes]]\nname = \"inv\"\n[routes.match]\npath = { prefix = \"/\" }\n[routes.forward]\nservice = \"inventory\"\ntls = { identity = true }\n";
    let (st, body) = http::request(&node.http, "PUT", "/v1/gateway/routes", set).unwrap();
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("--identity-ca"), "{body}");
}

/// The issuer answers a request it cannot sign with why, and signs nothing:
/// a request that is not one, written straight into the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issuer_refuses_what_is_not_a_request() {
    use meshwork_etcd::proto::etcdserverpb::{PutRequest, RangeRequest, kv_client::KvClient};
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    meshwork_tls::identity::Authority::create(&ca, 1).unwrap();
    let ca_arg = ca.display().to_string();
    let node = meshwork_tests::start(
        &dir.path().join("data"),
        &["--roles", "store,coord", "--identity-ca", &ca_arg],
        &[],
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", node.etcd))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut kv = KvClient::new(channel);
    kv.put(PutRequest {
        key: b"/meshwork/identity/requests/evil/1".to_vec().into(),
        value: br#"{"csr":"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}"#
            .to_vec()
            .into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let answer = loop {
        let r = kv
            .range(RangeRequest {
                key: b"/meshwork/identity/issued/evil/1".to_vec().into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if let Some(kv) = r.kvs.first() {
            break String::from_utf8_lossy(&kv.value).to_string();
        }
        assert!(tokio::time::Instant::now() < deadline, "no answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let v: Value = serde_json::from_str(&answer).unwrap();
    assert!(v["chain"].is_null(), "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("certificate signing request"),
        "{v}"
    );
}

fn bytes_of(s: &'static str) -> axum::body::Bytes {
    axum::body::Bytes::from_static(s.as_bytes())
}
