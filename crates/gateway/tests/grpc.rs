//! A real tonic gRPC service behind the gateway, called by a tonic client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;

use common::Gw;
use http::uri::PathAndQuery;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::{Code, Request, Response, Status};
use tonic_prost::ProstCodec;

/// Unary echo: "fail" answers NOT_FOUND, anything else is echoed back.
async fn say(req: Request<String>) -> Result<Response<String>, Status> {
    let msg = req.into_inner();
    if msg == "fail" {
        return Err(Status::not_found("no such greeting"));
    }
    Ok(Response::new(format!("hello {msg}")))
}

async fn start_grpc_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let mut grpc =
                            tonic::server::Grpc::new(ProstCodec::<String, String>::default());
                        let resp = grpc.unary(tower::service_fn(say), req).await;
                        Ok::<_, Infallible>(resp)
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .http2_only()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn tonic_unary_calls_and_status_codes_pass_through() {
    let backend = start_grpc_server().await;
    let gw = Gw::start(&format!(
        r#"
        [[routes]]
        name = "grpc"
        match = {{ path = {{ prefix = "/echo.Echo/" }}, headers = [{{ name = "content-type", regex = "application/grpc.*" }}] }}
        [routes.forward]
        upstreams = ["{backend}"]
        "#
    ))
    .await;
    let channel = tonic::transport::Endpoint::from_shared(gw.url(""))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tonic::client::Grpc::new(channel);
    for name in ["alice", "bob"] {
        client.ready().await.unwrap();
        let resp = client
            .unary(
                Request::new(name.to_owned()),
                PathAndQuery::from_static("/echo.Echo/Say"),
                ProstCodec::<String, String>::default(),
            )
            .await
            .unwrap();
        assert_eq!(resp.into_inner(), format!("hello {name}"));
    }
    client.ready().await.unwrap();
    let err = client
        .unary(
            Request::new("fail".to_owned()),
            PathAndQuery::from_static("/echo.Echo/Say"),
            ProstCodec::<String, String>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "no such greeting");
}
