//! Deadlines carried by requests: as a [`Deadline`] extension inside the
//! process, and on the wire as `x-meshwork-deadline-ms` (remaining
//! milliseconds, our HTTP header) and gRPC's `grpc-timeout`
//! (`<1-8 digits><H|M|S|m|u|n>`).

use std::time::Duration;

use tokio::time::Instant;

/// Our HTTP header: milliseconds the callee has left.
pub const DEADLINE_HEADER: &str = "x-meshwork-deadline-ms";
/// gRPC's timeout header.
pub const GRPC_TIMEOUT_HEADER: &str = "grpc-timeout";

/// The absolute deadline of a request, stored in its extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(pub Instant);

/// Parses a `grpc-timeout` value (any other text, non-ASCII included, is
/// `None`).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let b = v.as_bytes();
    if b.len() < 2 || b.len() > 9 {
        return None;
    }
    // On bytes: a split inside a multi-byte character would panic on `str`.
    let (&unit, digits) = b.split_last()?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats `d` as a `grpc-timeout` value: the finest unit whose value fits
/// in 8 digits, rounded down (never promises more time than there is).
pub fn format_grpc_timeout(d: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let nanos = d.as_nanos();
    for (unit, per) in [
        ("n", 1u128),
        ("u", 1_000),
        ("m", 1_000_000),
        ("S", 1_000_000_000),
        ("M", 60_000_000_000),
    ] {
        if nanos / per <= MAX {
            return format!("{}{unit}", nanos / per);
        }
    }
    format!("{}H", (nanos / 3_600_000_000_000).min(MAX))
}

/// Something that can carry a deadline across a call.
///
/// Implemented for `http::Request<B>`; for other request types the default
/// methods carry nothing (`impl DeadlineCarrier for MyRequest {}`).
pub trait DeadlineCarrier {
    /// The deadline the request already carries, as seen at `now`.
    fn deadline(&self, _now: Instant) -> Option<Instant> {
        None
    }
    /// Stamps `deadline` on the request (extension and wire headers).
    fn set_deadline(&mut self, _deadline: Instant, _now: Instant) {}
}

impl<B> DeadlineCarrier for http::Request<B> {
    fn deadline(&self, now: Instant) -> Option<Instant> {
        let ext = self.extensions().get::<Deadline>().map(|d| d.0);
        let header = |name: &str| self.headers().get(name).and_then(|v| v.to_str().ok());
        let ours = header(DEADLINE_HEADER)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .and_then(|ms| now.checked_add(Duration::from_millis(ms)));
        let grpc = header(GRPC_TIMEOUT_HEADER)
            .and_then(parse_grpc_timeout)
            .and_then(|d| now.checked_add(d));
        [ext, ours, grpc].into_iter().flatten().min()
    }

    fn set_deadline(&mut self, deadline: Instant, now: Instant) {
        let remaining = deadline.saturating_duration_since(now);
        self.extensions_mut().insert(Deadline(deadline));
        let ms = remaining.as_millis().to_string();
        if let Ok(v) = http::HeaderValue::from_str(&ms) {
            self.headers_mut().insert(DEADLINE_HEADER, v);
        }
        let is_grpc = self.headers().contains_key(GRPC_TIMEOUT_HEADER)
            || self
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|ct| ct.starts_with("application/grpc"));
        if is_grpc && let Ok(v) = http::HeaderValue::from_str(&format_grpc_timeout(remaining)) {
            self.headers_mut().insert(GRPC_TIMEOUT_HEADER, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grpc_timeout_examples() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("-1m"), None);
        // Found by fuzz/deadline: a two-byte character used to panic.
        assert_eq!(parse_grpc_timeout("\u{97}"), None);
        assert_eq!(parse_grpc_timeout("1\u{e9}"), None);
        assert_eq!(format_grpc_timeout(Duration::from_millis(250)), "250000u");
        assert_eq!(
            format_grpc_timeout(Duration::from_secs(3600 * 24 * 400)),
            "34560000S"
        );
        assert_eq!(
            format_grpc_timeout(Duration::from_secs(3600 * 24 * 365 * 1000)),
            "8760000H"
        );
    }

    proptest! {
        #[test]
        fn grpc_timeout_round_trips_down(nanos in 0u64..u64::MAX / 2) {
            let d = Duration::from_nanos(nanos);
            let s = format_grpc_timeout(d);
            let back = parse_grpc_timeout(&s).unwrap();
            prop_assert!(back <= d);
            prop_assert!(d - back < Duration::from_nanos(nanos / 99_999_999 * 60 + 60_000_000_000).max(Duration::from_secs(61)));
        }
    }

    #[test]
    fn http_request_takes_the_earliest_deadline() {
        let now = Instant::now();
        let mut req = http::Request::builder()
            .header(DEADLINE_HEADER, "500")
            .header(GRPC_TIMEOUT_HEADER, "200m")
            .body(())
            .unwrap();
        assert_eq!(req.deadline(now), Some(now + Duration::from_millis(200)));
        req.set_deadline(now + Duration::from_millis(50), now);
        assert_eq!(req.headers()[DEADLINE_HEADER], "50");
        assert_eq!(req.headers()[GRPC_TIMEOUT_HEADER], "50000000n");
        assert_eq!(req.deadline(now), Some(now + Duration::from_millis(50)));
    }

    proptest! {
        /// Whatever the peer sends in the deadline headers, reading them
        /// never panics and never yields a deadline in the past.
        #[test]
        fn hostile_headers_never_panic(ours in "\\PC{0,24}", grpc in "[0-9]{0,10}[HMSmun]?") {
            let now = Instant::now();
            let mut req = http::Request::new(());
            if let Ok(v) = http::HeaderValue::from_str(&ours) { req.headers_mut().insert(DEADLINE_HEADER, v); }
            if let Ok(v) = http::HeaderValue::from_str(&grpc) { req.headers_mut().insert(GRPC_TIMEOUT_HEADER, v); }
            if let Some(d) = req.deadline(now) { prop_assert!(d >= now); }
            let big = format!("{}", u64::MAX);
            req.headers_mut().insert(DEADLINE_HEADER, http::HeaderValue::from_str(&big).unwrap());
            let _ = req.deadline(now);
        }
    }
}
