//! TLS from the gateway to its upstreams: the upstream's certificate is
//! verified (chain and name), the gateway presents its own when the upstream
//! asks (mutual TLS), TLS connections are kept alive and reused, and every
//! misconfiguration — an unknown authority, a name mismatch, a missing client
//! certificate, a plaintext upstream — ends in a 502 (the log says why),
//! never in an unverified exchange. Route sets naming bad files are refused at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use meshwork_gateway::{RouteSet, TlsConfig, TlsReloader};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use tokio::net::TcpListener;

/// A certificate authority and the files it signs, in a directory.
struct Ca {
    dir: PathBuf,
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        Ca {
            dir: dir.to_path_buf(),
            cert,
            key,
        }
    }

    /// Issues `file`.pem / `file`-key.pem for common name `cn` and `sans`.
    fn issue(&self, file: &str, cn: &str, sans: &[&str], client: bool) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let (c, k) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}-key.pem")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// An HTTPS upstream answering every request with the common name of the
/// client certificate it was shown ("-" for none); counts its handshakes.
struct TlsUpstream {
    addr: std::net::SocketAddr,
    handshakes: Arc<AtomicUsize>,
}

async fn tls_upstream(cert: &Path, key: &Path, client_ca: Option<&Path>) -> TlsUpstream {
    let reloader = TlsReloader::load_with_alpn(
        TlsConfig {
            cert_file: cert.to_path_buf(),
            key_file: key.to_path_buf(),
            client_ca_file: client_ca.map(Path::to_path_buf),
        },
        &[b"http/1.1"],
    )
    .unwrap();
    let acceptor = reloader.acceptor();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let count = handshakes.clone();
    tokio::spawn(async move {
        let _keep = reloader;
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let who = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(meshwork_tls::peer_common_name)
                    .unwrap_or_else(|| "-".into());
                let svc = hyper::service::service_fn(move |_req| {
                    let who = who.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(format!("client={who}")),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    TlsUpstream { addr, handshakes }
}

fn route(name: &str, prefix: &str, upstream: &str, tls: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nmatch = {{ path = {{ prefix = \"{prefix}\" }} }}\n\
         [routes.forward]\nupstreams = [\"{upstream}\"]\nstrip_prefix = \"{prefix}\"\n\
         retry = {{ max_attempts = 1 }}\ntls = {tls}\n"
    )
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_verifies_presents_and_reuses_and_refuses_what_does_not_check_out() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let rogue = Ca::new(dir.path(), "rogue");
    let (srv_cert, srv_key) = ca.issue("orders", "orders", &["orders.internal"], false);
    let (gw_cert, gw_key) = ca.issue("gateway", "gateway", &[], true);
    let (rogue_gw_cert, rogue_gw_key) = rogue.issue("rogue-gw", "gateway", &[], true);
    let (ip_cert, ip_key) = ca.issue("by-ip", "by-ip", &["127.0.0.1"], false);
    let ca_file = dir.path().join("ca.pem");
    let rogue_file = dir.path().join("rogue.pem");

    let plain_tls = tls_upstream(&srv_cert, &srv_key, None).await;
    let mutual = tls_upstream(&srv_cert, &srv_key, Some(&ca_file)).await;
    let by_ip = tls_upstream(&ip_cert, &ip_key, None).await;
    let cleartext = Upstream::start("clear").await;

    let good = format!(
        "{{ ca_file = \"{}\", server_name = \"orders.internal\" }}",
        path(&ca_file)
    );
    let with_cert = format!(
        "{{ ca_file = \"{}\", server_name = \"orders.internal\", cert_file = \"{}\", key_file = \"{}\" }}",
        path(&ca_file),
        path(&gw_cert),
        path(&gw_key)
    );
    let routes = [
        route("ok", "/ok", &plain_tls.addr.to_string(), &good),
        route("mtls", "/mtls", &mutual.addr.to_string(), &with_cert),
        route("nocert", "/nocert", &mutual.addr.to_string(), &good),
        route(
            "roguecert",
            "/roguecert",
            &mutual.addr.to_string(),
            &format!(
                "{{ ca_file = \"{}\", server_name = \"orders.internal\", cert_file = \"{}\", key_file = \"{}\" }}",
                path(&ca_file),
                path(&rogue_gw_cert),
                path(&rogue_gw_key)
            ),
        ),
        route(
            "wrongca",
            "/wrongca",
            &plain_tls.addr.to_string(),
            &format!(
                "{{ ca_file = \"{}\", server_name = \"orders.internal\" }}",
                path(&rogue_file)
            ),
        ),
        route(
            "wrongname",
            "/wrongname",
            &plain_tls.addr.to_string(),
            &format!(
                "{{ ca_file = \"{}\", server_name = \"payments.internal\" }}",
                path(&ca_file)
            ),
        ),
        // No server_name and an IP upstream: verified against the IP.
        route(
            "byip",
            "/byip",
            &by_ip.addr.to_string(),
            &format!("{{ ca_file = \"{}\" }}", path(&ca_file)),
        ),
        route(
            "ipmismatch",
            "/ipmismatch",
            &plain_tls.addr.to_string(),
            &format!("{{ ca_file = \"{}\" }}", path(&ca_file)),
        ),
        route("toclear", "/toclear", &cleartext.addr.to_string(), &good),
    ]
    .concat();
    let gw = Gw::start(&routes).await;
    let c = client();

    // Verified, and kept alive: three requests, one handshake.
    for _ in 0..3 {
        let r = get(&c, &gw.url("/ok/x")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "client=-");
    }
    assert_eq!(
        plain_tls.handshakes.load(Ordering::SeqCst),
        1,
        "the TLS connection is reused"
    );
    // Mutual TLS: the upstream sees the gateway's identity.
    let r = get(&c, &gw.url("/mtls/x")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "client=gateway");
    let r = get(&c, &gw.url("/byip/x")).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Everything that does not check out: nothing sent, 502 (the log names
    // the TLS error with the request id; the client is not told internals).
    for p in ["/wrongca/x", "/wrongname/x", "/ipmismatch/x", "/toclear/x"] {
        let r = get(&c, &gw.url(p)).await;
        assert_eq!(r.status, 502, "{p}: {}", r.text());
        assert_eq!(r.code(), "upstream_unavailable", "{p}: {}", r.text());
    }
    assert_eq!(
        cleartext.hits(),
        0,
        "a cleartext upstream got nothing readable"
    );
    // The upstream refuses a missing or foreign client certificate (TLS 1.3
    // reports it after the client's side of the handshake): never a 200.
    for p in ["/nocert/x", "/roguecert/x"] {
        let r = get(&c, &gw.url(p)).await;
        assert_eq!(r.status, 502, "{p}: {}", r.text());
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn route_sets_with_bad_tls_settings_are_refused_when_published() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let (cert, _key) = ca.issue("gw", "gw", &[], true);
    let gateway = meshwork_gateway::Gateway::new(
        meshwork_gateway::GatewayConfig::default(),
        Arc::new(meshwork_gateway::StaticResolver::new()),
    )
    .unwrap();
    let missing = dir.path().join("missing.pem");
    for (tls, why) in [
        (
            format!("{{ ca_file = \"{}\" }}", path(&missing)),
            "missing.pem",
        ),
        (
            format!(
                "{{ ca_file = \"{}\", cert_file = \"{}\" }}",
                path(&dir.path().join("ca.pem")),
                path(&cert)
            ),
            "needs both cert_file and key_file",
        ),
        (
            format!(
                "{{ ca_file = \"{}\", server_name = \"not a name\" }}",
                path(&dir.path().join("ca.pem"))
            ),
            "neither a DNS name nor an IP address",
        ),
    ] {
        let set = RouteSet::from_toml(&route("r", "/r", "127.0.0.1:9", &tls)).unwrap();
        let e = gateway.apply(set).await.unwrap_err().to_string();
        assert!(e.contains(why), "{e}");
    }
    let h2c = format!(
        "[[routes]]\nname = \"g\"\n[routes.forward]\nupstreams = [\"127.0.0.1:9\"]\nprotocol = \"h2c\"\ntls = {{ ca_file = \"{}\" }}\n",
        path(&dir.path().join("ca.pem"))
    );
    let e = gateway
        .apply(RouteSet::from_toml(&h2c).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("HTTP/1.1"), "{e}");
}

/// An upstream that accepts and then never answers the TLS handshake costs a
/// request the connect timeout (TCP and handshake share it), then a 502, and
/// holds no one else up: a route to a healthy TLS upstream answers meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tls_upstream_is_bounded_by_the_connect_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let (cert, key) = ca.issue("orders", "orders", &["orders.internal"], false);
    let healthy = tls_upstream(&cert, &key, None).await;
    // Accepts, reads nothing, says nothing.
    let mute = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mute_addr = mute.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = mute.accept().await {
            held.push(s);
        }
    });
    let tls = format!(
        "{{ ca_file = \"{}\", server_name = \"orders.internal\" }}",
        path(&dir.path().join("ca.pem"))
    );
    let routes = [
        route("mute", "/mute", &mute_addr.to_string(), &tls),
        route("ok", "/ok", &healthy.addr.to_string(), &tls),
    ]
    .concat();
    let cfg = meshwork_gateway::GatewayConfig {
        upstream_connect_timeout_ms: 500,
        ..Default::default()
    };
    let gw = Gw::start_with(cfg, &routes).await;
    let c = client();
    let stalled = {
        let (c, url) = (c.clone(), gw.url("/mute/x"));
        tokio::spawn(async move {
            let t = std::time::Instant::now();
            (get(&c, &url).await, t.elapsed())
        })
    };
    let r = get(&c, &gw.url("/ok/x")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (r, took) = stalled.await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(took < WITHIN, "bounded: {took:?}");
    gw.shutdown().await;
}
