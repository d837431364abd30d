//! A minimal hyper upstream for the gateway benchmark and the gateway's
//! process-level fault tests.
//!
//! `meshwork-bench-upstream [ADDR] [BODY_BYTES] [NAME]` listens on ADDR
//! (default 127.0.0.1:0), prints `listening ADDR` on stdout, and answers
//! every request (HTTP/1.1 or h2c) with BODY_BYTES bytes (default 13:
//! "hello, world\n" for 13) and an `x-upstream: NAME` header, after reading
//! the request body.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()
        .map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("bad address: {e}"),
            )
        })?;
    let size: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()
        .map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad size: {e}"))
        })?
        .unwrap_or(13);
    let name = args.next().unwrap_or_else(|| "upstream".into());
    let body = if size == 13 {
        Bytes::from_static(b"hello, world\n")
    } else {
        Bytes::from(vec![b'x'; size])
    };
    let name = http::HeaderValue::from_str(&name)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad name"))?;
    let threads = std::env::var("UPSTREAM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let mut out = std::io::stdout();
        writeln!(out, "listening {local}")?;
        out.flush()?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            let name = name.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let body = body.clone();
                    let name = name.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        let mut resp = http::Response::new(Full::new(body));
                        resp.headers_mut().insert("x-upstream", name);
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}
