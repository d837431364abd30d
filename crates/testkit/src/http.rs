//! Raw HTTP/1.1 over a socket: for the bytes a client library would never
//! send (two Host headers, a torn head, conflicting framing) and for tests
//! that want the exact response text. Async functions for tests on a tokio
//! runtime, [`blocking`] ones for tests that drive child processes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest wait for a whole response.
pub const READ_WITHIN: Duration = Duration::from_secs(20);

/// Sends `bytes` and reads until the server closes or a full response head
/// plus its `Content-Length` body has arrived; the response as text.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if response_complete(&out) {
                        break;
                    }
                }
            }
        }
    };
    tokio::time::timeout(READ_WITHIN, read)
        .await
        .expect("raw read timed out");
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends `bytes` and reads until the server closes the connection (fails
/// the test if it does not within [`READ_WITHIN`]).
pub async fn raw_until_close(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(READ_WITHIN, s.read_to_end(&mut out))
        .await
        .expect("the server did not close the connection")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `b` holds a response head and the whole `Content-Length` body.
fn response_complete(b: &[u8]) -> bool {
    let Some(head_end) = b.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&b[..head_end]).to_ascii_lowercase();
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|n| b.len() >= head_end + 4 + n)
}

/// The status code of a response's text (0 when it has none).
pub fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// The body of a response's text (after the head).
pub fn body_of(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// Blocking raw HTTP/1.1, one request per connection (`Connection: close`).
pub mod blocking {
    use std::io::{Read, Write};
    use std::time::Duration;

    /// A GET: the status and body.
    pub fn get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
        request(addr, "GET", path, "")
    }

    /// A POST of a JSON body: the status and body.
    pub fn post(addr: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
        request(addr, "POST", path, body)
    }

    /// A request with a JSON body: the status and body.
    pub fn request(
        addr: &str,
        method: &str,
        path: &str,
        body: &str,
    ) -> std::io::Result<(u16, String)> {
        let (status, out) = raw(
            addr,
            &format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json"),
            body,
        )?;
        Ok((status, super::body_of(&out).to_owned()))
    }

    /// One request from its head lines (request line and headers, without
    /// `Connection` and `Content-Length`, which are added) and body: the
    /// status and the whole response text.
    pub fn raw(addr: &str, head: &str, body: &str) -> std::io::Result<(u16, String)> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "{head}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok((super::status_of(&out), out))
    }
}
