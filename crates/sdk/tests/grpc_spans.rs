//! The SDK's gRPC channel records a client span per call, as OpenTelemetry's
//! RPC conventions name it, when the service exports spans: the test is a
//! service whose exporter points at an OTLP/HTTP receiver it runs, and calls a tonic service it found in
//! the registry. Its own binary: the exporter is one per process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::ControlPlane;
use meshwork_etcd::proto::etcdserverpb::{PutRequest, RangeRequest, kv_client::KvClient};
use meshwork_sdk::{Meshwork, Options};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use parking_lot::Mutex;
use prost::Message;

fn attr(span: &Span, key: &str) -> Option<Any> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|v| v.value)
}

#[test]
fn a_grpc_call_through_the_channel_is_a_client_span() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let kept = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| {
                let kept = kept.clone();
                async move {
                    let req = ExportTraceServiceRequest::decode(body).unwrap();
                    for rs in req.resource_spans {
                        for ss in rs.scope_spans {
                            kept.lock().extend(ss.spans);
                        }
                    }
                    ([("content-type", "application/x-protobuf")], Vec::new())
                }
            }),
        );
        let l = tokio::net::TcpListener::from_std(listener).unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        let endpoint = meshwork_telemetry::export::Endpoint::new(
            &format!("http://{addr}"),
            false,
            meshwork_telemetry::export::Protocol::HttpProtobuf,
            Vec::new(),
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(meshwork_sdk::telemetry::init_with("order", endpoint).enabled());

        let cp = ControlPlane::start().await;
        let mut opts = Options::new("order", vec![cp.endpoint.clone()]).unwrap();
        opts.session_ttl = 2;
        let mw = Meshwork::connect(opts).await.unwrap();
        // The control plane's etcd endpoint is a tonic service: register it.
        let direct: std::net::SocketAddr = cp.direct.parse().unwrap();
        let mut spec = meshwork_sdk::instance("127.0.0.1", direct.port()).build();
        spec.protocol = meshwork_coord::registry::Protocol::Grpc;
        mw.coord().register("etcd", spec).await.unwrap();
        let mut kv = KvClient::new(mw.grpc_channel("etcd").await.unwrap());
        kv.put(PutRequest {
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"v"),
            ..Default::default()
        })
        .await
        .unwrap();
        // Refused (no key): an error span with the gRPC status.
        let e = kv.range(RangeRequest::default()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);

        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let (put, range) = loop {
            {
                let s = spans.lock();
                let find = |name: &str| s.iter().find(|sp| sp.name == name).cloned();
                if let (Some(p), Some(r)) =
                    (find("etcdserverpb.KV/Put"), find("etcdserverpb.KV/Range"))
                {
                    break (p, r);
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no client spans: {:?}",
                spans
                    .lock()
                    .iter()
                    .map(|s| s.name.clone())
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // SpanKind::Client is 3.
        assert_eq!(put.kind, 3);
        assert_eq!(
            attr(&put, "rpc.system"),
            Some(Any::StringValue("grpc".into()))
        );
        assert_eq!(
            attr(&put, "rpc.service"),
            Some(Any::StringValue("etcdserverpb.KV".into()))
        );
        assert_eq!(
            attr(&put, "rpc.method"),
            Some(Any::StringValue("Put".into()))
        );
        assert_eq!(
            attr(&put, "server.address"),
            Some(Any::StringValue("etcd".into()))
        );
        assert_eq!(attr(&put, "rpc.grpc.status_code"), Some(Any::IntValue(0)));
        assert_eq!(attr(&range, "rpc.grpc.status_code"), Some(Any::IntValue(3)));
        // Status code 2 is ERROR.
        assert_eq!(range.status.as_ref().map(|s| s.code), Some(2));
        mw.shutdown().await;
    });
}
