//! Keep-alive HTTP/1.1 connections for load generation: one hyper client
//! connection each (no pool, no extra tasks per request), reopened when it
//! breaks, every call bounded by a timeout.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::LoadError;

/// A response: status, the `X-Meshwork-Index` header if present, and the body.
#[derive(Debug)]
pub struct Resp {
    /// The status code.
    pub status: u16,
    /// The `X-Meshwork-Index` header (a blocking query's index), if present.
    pub index: Option<i64>,
    /// The whole body.
    pub body: Bytes,
}

impl Resp {
    /// The start of the body as text, for error messages.
    fn excerpt(&self, n: usize) -> String {
        String::from_utf8_lossy(&self.body[..self.body.len().min(n)]).into_owned()
    }

    /// The body as JSON, with the status and the body in the error when it is not.
    pub fn json(&self) -> Result<Value, LoadError> {
        serde_json::from_slice(&self.body).map_err(|e| LoadError::Unexpected {
            what: format!("response is not JSON ({e})"),
            status: self.status,
            body: self.excerpt(200),
        })
    }

    /// An error describing an unexpected answer to `what`.
    pub fn unexpected(&self, what: &str) -> LoadError {
        LoadError::Unexpected {
            what: what.to_owned(),
            status: self.status,
            body: self.excerpt(300),
        }
    }
}

/// One keep-alive HTTP/1.1 connection; reopened when it breaks.
#[derive(Debug)]
pub struct Conn {
    addr: String,
    sender: Option<SendRequest<Full<Bytes>>>,
    driver: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(d) = self.driver.take() {
            d.abort();
        }
    }
}

impl Conn {
    /// A connection to `addr` (`HOST:PORT` or `http://HOST:PORT`), opened on first use.
    pub fn new(addr: &str) -> Conn {
        Conn {
            addr: addr
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string(),
            sender: None,
            driver: None,
        }
    }

    /// Opens the connection now (so that connection errors show up early).
    pub async fn open(addr: &str) -> Result<Conn, LoadError> {
        let mut c = Conn::new(addr);
        c.connect().await?;
        Ok(c)
    }

    /// (Re)opens the TCP connection and runs the HTTP/1.1 handshake.
    async fn connect(&mut self) -> Result<(), LoadError> {
        if let Some(d) = self.driver.take() {
            d.abort();
        }
        self.sender = None;
        let stream = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|source| LoadError::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| LoadError::Http {
                what: "HTTP/1.1 handshake".into(),
                source,
            })?;
        self.driver = Some(tokio::spawn(async move {
            let _ = conn.await;
        }));
        self.sender = Some(sender);
        Ok(())
    }

    /// Sends one request (a JSON body when given) and reads the whole
    /// response, within `timeout`. A broken connection is dropped (the next
    /// call reconnects) and the call fails.
    pub async fn call(
        &mut self,
        method: &'static str,
        path: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Resp, LoadError> {
        let r = tokio::time::timeout(timeout, self.call_inner(method, path, body)).await;
        match r {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.sender = None;
                Err(e)
            }
            Err(_) => {
                self.sender = None;
                Err(LoadError::Timeout {
                    what: format!("{method} {path}"),
                    ms: timeout.as_millis(),
                })
            }
        }
    }

    /// One request and its whole response, reconnecting first if the connection closed.
    async fn call_inner(
        &mut self,
        method: &'static str,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Resp, LoadError> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.connect().await?;
        }
        let what = || format!("{method} {path}");
        let Some(sender) = self.sender.as_mut() else {
            return Err(LoadError::Invalid(format!(
                "{}: no connection after connecting",
                what()
            )));
        };
        sender.ready().await.map_err(|source| LoadError::Http {
            what: format!("{}: connection not ready", what()),
            source,
        })?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.addr.as_str());
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| LoadError::Invalid(format!("building {}: {e}", what())))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| LoadError::Http {
                what: what(),
                source,
            })?;
        let status = resp.status().as_u16();
        let index = resp
            .headers()
            .get("x-meshwork-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|source| LoadError::Http {
                what: format!("{}: reading the response", what()),
                source,
            })?
            .to_bytes();
        Ok(Resp {
            status,
            index,
            body,
        })
    }
}

/// Opens `n` connections to `addr` concurrently; waits until all are open.
pub async fn open_conns(addr: &str, n: usize) -> Result<Vec<Conn>, LoadError> {
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let addr = addr.to_string();
        tasks.push(tokio::spawn(async move { Conn::open(&addr).await }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        let conn = t
            .await
            .map_err(|e| LoadError::Invalid(format!("connection task failed: {e}")))??;
        out.push(conn);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-connection server answering each request with `answers` in turn,
    /// then closing.
    async fn server(answers: Vec<&'static str>) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            for a in answers {
                let _ = s.read(&mut buf).await.unwrap();
                s.write_all(a.as_bytes()).await.unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn calls_read_status_index_and_body_and_time_out() {
        let addr = server(vec![
            "HTTP/1.1 200 OK\r\nx-meshwork-index: 42\r\ncontent-length: 7\r\n\r\n{\"a\":1}",
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy",
        ])
        .await;
        let mut c = Conn::open(&format!("http://{addr}/")).await.unwrap();
        let r = c
            .call("GET", "/x", None, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!((r.status, r.index), (200, Some(42)));
        assert_eq!(r.json().unwrap()["a"], 1);
        let r = c
            .call(
                "POST",
                "/y",
                Some(Bytes::from_static(b"{}")),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 503);
        assert!(r.json().is_err());
        assert_eq!(
            r.unexpected("posting").to_string(),
            "posting: HTTP 503: busy"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_server_times_the_call_out() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let _held = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            std::future::pending::<()>().await;
            drop(s);
        });
        let mut c = Conn::open(&addr).await.unwrap();
        let err = c
            .call("GET", "/slow", None, Duration::from_millis(250))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "GET /slow: no answer within 250 ms");
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        assert!(matches!(
            Conn::open(&addr).await,
            Err(LoadError::Connect { .. })
        ));
    }
}
