//! HTTP/2 (h2c), gRPC-style trailers, WebSocket upgrades and TLS with ALPN
//! and certificate reload.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshwork_gateway::{Gateway, GatewayConfig, RouteSet, StaticResolver, TlsConfig, TlsReloader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn h2c_clients_and_grpc_trailers_end_to_end() {
    let up = Upstream::start("a").await;
    let gw = Gw::start(&format!(
        "[[routes]]\nname = \"all\"\n[routes.forward]\nupstreams = [\"{}\"]\n",
        up.addr
    ))
    .await;
    let c = h2_client();
    // Plain h2c request to an HTTP/1.1 upstream.
    let r = get(&c, &gw.url("/x")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["version"],
        "HTTP/1.1",
        "auto: plain requests go upstream over h1"
    );
    assert_eq!(r.json()["headers"]["via"], "2 meshwork");
    // gRPC: h2 end to end, trailers kept.
    let resp = c
        .request(
            req("POST", &gw.url("/grpc"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02yo")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers forwarded");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
    assert_eq!(collected.to_bytes().as_ref(), b"\0\0\0\0\x02hi");
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled() {
    let up = Upstream::start("a").await;
    let gw = Gw::start(&format!(
        "[[routes]]\nname = \"ws\"\n[routes.forward]\nupstreams = [\"{}\"]\n",
        up.addr
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut b).await.unwrap(),
            1,
            "connection closed during the head"
        );
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in ["hello", "world"] {
        s.write_all(msg.as_bytes()).await.unwrap();
        let want = format!("echo:{msg}");
        let mut got = vec![0u8; want.len()];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), want);
    }
}

fn write_cert(dir: &std::path::Path) -> Vec<u8> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.key_pair.serialize_pem()).unwrap();
    ck.cert.der().to_vec()
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    root: &[u8],
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(root.to_vec()))
        .unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let conn = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await.unwrap();
    conn.connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn tls_with_alpn_and_certificate_reload() {
    let up = Upstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let first = write_cert(dir.path());
    let reloader = TlsReloader::load(TlsConfig {
        cert_file: dir.path().join("cert.pem"),
        key_file: dir.path().join("key.pem"),
        client_ca_file: None,
    })
    .unwrap();
    let gateway = Gateway::new(GatewayConfig::default(), Arc::new(StaticResolver::new())).unwrap();
    gateway
        .apply(
            RouteSet::from_toml(&format!(
                "[[routes]]\nname = \"t\"\n[routes.forward]\nupstreams = [\"{}\"]\n",
                up.addr
            ))
            .unwrap(),
        )
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(meshwork_gateway::serve_tls(
        listener,
        gateway,
        reloader.acceptor(),
        async move {
            let _ = stop_rx.await;
        },
    ));

    // ALPN h2.
    let tls = tls_connect(addr, &first, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            http::Request::get("https://localhost/x")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["headers"]["x-forwarded-proto"], "https");

    // ALPN http/1.1.
    let tls = tls_connect(addr, &first, &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            http::Request::get("/y")
                .header("host", "localhost")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // Replace the files: the next handshake presents the new certificate.
    assert!(
        !reloader.reload_if_changed().unwrap(),
        "nothing changed yet"
    );
    let second = write_cert(dir.path());
    let later = SystemTime::now() + Duration::from_secs(5);
    for f in ["cert.pem", "key.pem"] {
        std::fs::File::options()
            .write(true)
            .open(dir.path().join(f))
            .unwrap()
            .set_modified(later)
            .unwrap();
    }
    assert!(reloader.reload_if_changed().unwrap());
    let tls = tls_connect(addr, &second, &[b"http/1.1"]).await;
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(presented, second);
    // A broken file keeps the current certificate.
    std::fs::write(dir.path().join("cert.pem"), "garbage").unwrap();
    std::fs::File::options()
        .write(true)
        .open(dir.path().join("cert.pem"))
        .unwrap()
        .set_modified(later + Duration::from_secs(5))
        .unwrap();
    assert!(reloader.reload_if_changed().is_err());
    let tls = tls_connect(addr, &second, &[b"http/1.1"]).await;
    assert_eq!(
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec(),
        second
    );

    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}
