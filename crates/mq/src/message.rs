//! Messages and their encoding in the log.
//!
//! A record's payload (little endian): `id u64 | publish_ms u64 | deliver_at_ms u64 (0 =
//! now) | priority u8 | key_len u16 | key | tag_len u16 | tag | headers u16 | (name_len u16
//! | name | value_len u32 | value)* | body_len u32 | body`.

use bytes::Bytes;

use crate::error::{MqError, Result};

/// A message as a publisher hands it to the broker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewMessage {
    /// The message id (a Snowflake id from coord, chosen by the publisher): a second
    /// publish of the same id within the dedup window is answered with the first's offset.
    /// Zero means "no id": never deduplicated.
    pub id: u64,
    /// Partitioning and ordering key (empty: none, partitions taken in turn).
    pub key: Bytes,
    /// Tag groups filter on (empty: none).
    pub tag: String,
    /// Application headers (trace context, content type...).
    pub headers: Vec<(String, Bytes)>,
    /// The payload.
    pub body: Bytes,
    /// Deliver no earlier than this time, in milliseconds since the epoch (0: at once).
    pub deliver_at_ms: u64,
    /// Priority 0 (lowest) to 9.
    pub priority: u8,
}

/// A message as stored: what a publisher sent plus the broker's publish time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The publisher's message id (0 = none).
    pub id: u64,
    /// When the broker wrote it, in milliseconds since the epoch.
    pub publish_ms: u64,
    /// Partitioning and ordering key (empty: none).
    pub key: Bytes,
    /// Tag (empty: none).
    pub tag: String,
    /// Application headers.
    pub headers: Vec<(String, Bytes)>,
    /// The payload.
    pub body: Bytes,
    /// Deliver no earlier than this (ms since the epoch; 0 = at once).
    pub deliver_at_ms: u64,
    /// Priority 0 to 9.
    pub priority: u8,
}

impl NewMessage {
    /// Bytes this message takes in the log's payload.
    pub(crate) fn encoded_len(&self) -> usize {
        8 + 8
            + 8
            + 1
            + 2
            + self.key.len()
            + 2
            + self.tag.len()
            + 2
            + self
                .headers
                .iter()
                .map(|(k, v)| 2 + k.len() + 4 + v.len())
                .sum::<usize>()
            + 4
            + self.body.len()
    }

    /// Checks sizes and fields against the limits.
    pub(crate) fn validate(&self, max_bytes: usize) -> Result<()> {
        let size = self.encoded_len();
        if size > max_bytes {
            return Err(MqError::TooLarge {
                what: "message",
                size: size as u64,
                limit: max_bytes as u64,
                setting: "max_message_bytes",
            });
        }
        if self.key.len() > u16::MAX as usize {
            return Err(MqError::Invalid(
                "a message key is at most 65535 bytes".into(),
            ));
        }
        if self.tag.len() > 255 {
            return Err(MqError::Invalid(
                "a message tag is at most 255 bytes".into(),
            ));
        }
        if self.headers.len() > 256 {
            return Err(MqError::Invalid("a message has at most 256 headers".into()));
        }
        if self
            .headers
            .iter()
            .any(|(k, _)| k.is_empty() || k.len() > 1024)
        {
            return Err(MqError::Invalid("a header name is 1 to 1024 bytes".into()));
        }
        if self.priority > 9 {
            return Err(MqError::Invalid(format!(
                "priority {} is outside 0..=9",
                self.priority
            )));
        }
        Ok(())
    }

    /// Appends the payload encoding, stamped with `publish_ms`, to `out`.
    pub(crate) fn encode(&self, publish_ms: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&publish_ms.to_le_bytes());
        out.extend_from_slice(&self.deliver_at_ms.to_le_bytes());
        out.push(self.priority);
        // Lengths were validated against their field widths.
        out.extend_from_slice(&(self.key.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&(self.tag.len() as u16).to_le_bytes());
        out.extend_from_slice(self.tag.as_bytes());
        out.extend_from_slice(&(self.headers.len() as u16).to_le_bytes());
        for (k, v) in &self.headers {
            out.extend_from_slice(&(k.len() as u16).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
        out.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.body);
    }
}

impl Message {
    /// The message as a publisher would send it again (a dead letter's redrive).
    pub fn to_new(&self) -> NewMessage {
        NewMessage {
            id: self.id,
            key: self.key.clone(),
            tag: self.tag.clone(),
            headers: self.headers.clone(),
            body: self.body.clone(),
            deliver_at_ms: 0,
            priority: self.priority,
        }
    }

    /// A header's value by name.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// Decodes a payload; `buf` is the record's payload (shared, so the key and body
    /// are slices of it, not copies).
    pub(crate) fn decode(buf: Bytes) -> Result<Message> {
        let mut r = Reader { buf, pos: 0 };
        let id = r.u64()?;
        let publish_ms = r.u64()?;
        let deliver_at_ms = r.u64()?;
        let priority = r.bytes(1)?[0];
        let n = r.u16()? as usize;
        let key = r.bytes(n)?;
        let n = r.u16()? as usize;
        let tag = r.string(n)?;
        let count = r.u16()? as usize;
        let mut headers = Vec::with_capacity(count);
        for _ in 0..count {
            let n = r.u16()? as usize;
            let k = r.string(n)?;
            let n = r.u32()? as usize;
            headers.push((k, r.bytes(n)?));
        }
        let n = r.u32()? as usize;
        let body = r.bytes(n)?;
        if r.pos != r.buf.len() {
            return Err(MqError::Storage("trailing bytes after a message".into()));
        }
        Ok(Message {
            id,
            publish_ms,
            key,
            tag,
            headers,
            body,
            deliver_at_ms,
            priority,
        })
    }

    /// Reads only the fields a filter needs (id, publish time, deliver-at, priority, tag)
    /// without building the rest.
    pub(crate) fn peek_tag(buf: &[u8]) -> Result<&[u8]> {
        let key_len = u16::from_le_bytes(field::<2>(buf, 25)?) as usize;
        let at = 27 + key_len;
        let tag_len = u16::from_le_bytes(field::<2>(buf, at)?) as usize;
        buf.get(at + 2..at + 2 + tag_len)
            .ok_or_else(|| MqError::Storage("truncated message".into()))
    }
}

fn field<const N: usize>(buf: &[u8], at: usize) -> Result<[u8; N]> {
    let mut a = [0u8; N];
    a.copy_from_slice(
        buf.get(at..at + N)
            .ok_or_else(|| MqError::Storage("truncated message".into()))?,
    );
    Ok(a)
}

struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    fn bytes(&mut self, n: usize) -> Result<Bytes> {
        if self.buf.len() - self.pos < n {
            return Err(MqError::Storage("truncated message".into()));
        }
        let b = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }
    fn string(&mut self, n: usize) -> Result<String> {
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| MqError::Storage("a name is not UTF-8".into()))
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(
            field::<2>(&self.buf, self.pos).inspect(|_| self.pos += 2)?,
        ))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            field::<4>(&self.buf, self.pos).inspect(|_| self.pos += 4)?,
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            field::<8>(&self.buf, self.pos).inspect(|_| self.pos += 8)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m = NewMessage {
            id: 42,
            key: Bytes::from_static(b"k1"),
            tag: "paid".into(),
            headers: vec![("traceparent".into(), Bytes::from_static(b"00-ab"))],
            body: Bytes::from_static(b"hello"),
            deliver_at_ms: 7,
            priority: 3,
        };
        let mut buf = Vec::new();
        m.encode(99, &mut buf);
        assert_eq!(buf.len(), m.encoded_len());
        assert_eq!(Message::peek_tag(&buf).expect("tag"), b"paid");
        let d = Message::decode(Bytes::from(buf)).expect("decode");
        assert_eq!(
            d.to_new(),
            NewMessage {
                deliver_at_ms: 0,
                ..m
            }
        );
        assert_eq!(d.publish_ms, 99);
        assert_eq!(d.deliver_at_ms, 7);
        assert_eq!(d.header("traceparent").map(|v| &v[..]), Some(&b"00-ab"[..]));
    }

    #[test]
    fn truncated_is_an_error() {
        let mut buf = Vec::new();
        NewMessage::default().encode(1, &mut buf);
        for cut in 0..buf.len() {
            assert!(Message::decode(Bytes::copy_from_slice(&buf[..cut])).is_err());
        }
    }
}
