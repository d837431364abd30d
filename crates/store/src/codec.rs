//! The on-disk record of one change, stored in the revision table under `(main, sub)`.
//!
//! Layout (little endian): `flags u8 | create i64 | version i64 | lease i64 | key_len u32 | key | value`.
//! `flags & 1` marks a tombstone. The mod revision is the table key, so it is not repeated.

use bytes::Bytes;

use crate::error::{Result, StoreError};
use crate::types::{KeyValue, Revision};

const HEADER: usize = 1 + 8 + 8 + 8 + 4;
const TOMBSTONE: u8 = 1;

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) tombstone: bool,
    pub(crate) kv: KeyValue,
}

pub(crate) fn encode(out: &mut Vec<u8>, tombstone: bool, kv: &KeyValue) {
    out.clear();
    out.reserve(HEADER + kv.key.len() + kv.value.len());
    out.push(if tombstone { TOMBSTONE } else { 0 });
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.version.to_le_bytes());
    out.extend_from_slice(&kv.lease.to_le_bytes());
    // Keys are bounded by the store's key limit, far below u32::MAX.
    out.extend_from_slice(&(kv.key.len() as u32).to_le_bytes());
    out.extend_from_slice(&kv.key);
    out.extend_from_slice(&kv.value);
}

fn le_i64(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_le_bytes(a)
}

pub(crate) fn decode(rev: Revision, b: &[u8]) -> Result<Record> {
    if b.len() < HEADER {
        return Err(StoreError::Storage(format!(
            "record at revision {} is truncated",
            rev.main
        )));
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&b[25..29]);
    let key_len = u32::from_le_bytes(len) as usize;
    if b.len() < HEADER + key_len {
        return Err(StoreError::Storage(format!(
            "record at revision {} has a bad key length",
            rev.main
        )));
    }
    let key = Bytes::copy_from_slice(&b[HEADER..HEADER + key_len]);
    let value = Bytes::copy_from_slice(&b[HEADER + key_len..]);
    Ok(Record {
        tombstone: b[0] & TOMBSTONE != 0,
        kv: KeyValue {
            key,
            create_revision: le_i64(b, 1),
            mod_revision: rev.main,
            version: le_i64(b, 9),
            lease: le_i64(b, 17),
            value,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_truncation() {
        let kv = KeyValue {
            key: Bytes::from_static(b"k"),
            create_revision: 3,
            mod_revision: 7,
            version: 2,
            value: Bytes::from_static(b"value"),
            lease: 42,
        };
        let mut buf = Vec::new();
        encode(&mut buf, false, &kv);
        let rev = Revision { main: 7, sub: 0 };
        assert_eq!(
            decode(rev, &buf).unwrap(),
            Record {
                tombstone: false,
                kv: kv.clone()
            }
        );
        assert!(decode(rev, &buf[..10]).is_err());
        buf[25] = 200;
        assert!(decode(rev, &buf).is_err());
    }
}
