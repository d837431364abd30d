//! What a service's instances report about their own resilience: each SDK
//! instance registers the path of its Prometheus endpoint (`metrics_path`
//! in its metadata); the service page reads it and shows the instance's
//! circuit breakers (`meshwork_breaker_state`) and outlier ejections
//! (`meshwork_outlier_ejections_total`) — the SDK's view, next to the
//! gateway's.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Time one instance has to answer.
pub const FETCH_TIMEOUT: Duration = Duration::from_millis(500);
/// Largest metrics page read.
pub const MAX_BYTES: usize = 2 << 20;
/// Instances read at most per page view.
pub const MAX_INSTANCES: usize = 50;

/// An instance's figures.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Resilience {
    /// (breaker name, state) in name order.
    pub breakers: Vec<(String, &'static str)>,
    /// Outlier ejections so far.
    pub ejections: u64,
}

/// Reads `http://{addr}{path}` (HTTP/1.0, bounded in time and size).
pub async fn fetch(addr: &str, path: &str) -> Option<String> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 << 10];
        loop {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_BYTES {
                return None;
            }
        }
        let text = String::from_utf8(buf).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        // An HTTP/1.0 request gets an HTTP/1.0 (or 1.1) status line.
        let ok = head
            .split_whitespace()
            .nth(1)
            .is_some_and(|code| code == "200");
        (head.starts_with("HTTP/1.") && ok).then(|| body.to_string())
    };
    tokio::time::timeout(FETCH_TIMEOUT, work)
        .await
        .ok()
        .flatten()
}

fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let rest = &labels[start..];
    Some(&rest[..rest.find('"')?])
}

/// The breakers and ejections in a Prometheus text page.
pub fn parse(text: &str) -> Resilience {
    let mut r = Resilience::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("meshwork_breaker_state{") {
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            let state = match value.trim().parse::<f64>().unwrap_or(-1.0) as i64 {
                0 => "closed",
                1 => "open",
                2 => "half_open",
                _ => continue,
            };
            if let Some(name) = label(labels, "name") {
                r.breakers.push((name.to_string(), state));
            }
        } else if let Some(rest) = line.strip_prefix("meshwork_outlier_ejections_total")
            && let Some((_, v)) = rest.rsplit_once(' ')
        {
            r.ejections += v.trim().parse::<f64>().unwrap_or(0.0) as u64;
        }
    }
    r.breakers.sort();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_states_and_ejections_are_read_from_the_text_format() {
        let text = "# HELP meshwork_breaker_state x\n# TYPE meshwork_breaker_state gauge\n\
            meshwork_breaker_state{name=\"payment\"} 1\nmeshwork_breaker_state{name=\"inventory\"} 0\n\
            meshwork_outlier_ejections_total{service=\"inventory\"} 2\nmeshwork_outlier_ejections_total{service=\"payment\"} 1\n";
        let r = parse(text);
        assert_eq!(
            r.breakers,
            vec![
                ("inventory".to_string(), "closed"),
                ("payment".to_string(), "open")
            ]
        );
        assert_eq!(r.ejections, 3);
    }
}
