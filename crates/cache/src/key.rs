//! `Key`: a stored key in 24 bytes, its bytes inline up to 22 of them (most keys)
//! and in one exact allocation past that. A `Bytes` takes 32 bytes plus an
//! allocation for every key; with a million keys that is about 40 MB more.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};

/// The longest key kept inline.
pub const INLINE: usize = 22;

/// A stored key; it hashes, compares and orders as its bytes, so maps keyed by it
/// are looked up with a `&[u8]`.
#[derive(Clone)]
pub struct Key(Repr);

#[derive(Clone)]
enum Repr {
    Inline { len: u8, buf: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl Key {
    /// A copy of `b`.
    pub fn new(b: &[u8]) -> Key {
        if b.len() <= INLINE {
            let mut buf = [0u8; INLINE];
            buf[..b.len()].copy_from_slice(b);
            Key(Repr::Inline {
                len: b.len() as u8,
                buf,
            })
        } else {
            Key(Repr::Heap(b.into()))
        }
    }

    /// Its bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, buf } => &buf[..usize::from(*len)],
            Repr::Heap(b) => b,
        }
    }

    /// Bytes it takes beyond its own 24 (its allocation, if any).
    pub fn heap_bytes(&self) -> usize {
        match &self.0 {
            Repr::Inline { .. } => 0,
            Repr::Heap(b) => b.len(),
        }
    }
}

impl std::ops::Deref for Key {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Exactly as `[u8]` hashes, which `Borrow` lookups rely on.
        self.as_bytes().hash(state);
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Key) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Key) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", bytes::Bytes::copy_from_slice(self.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn keys_are_24_bytes_and_behave_as_their_bytes() {
        assert_eq!(std::mem::size_of::<Key>(), 24);
        let long = vec![b'x'; 100];
        for b in [&b""[..], b"k", &[7u8; INLINE], &[7u8; INLINE + 1], &long] {
            let k = Key::new(b);
            assert_eq!(k.as_bytes(), b);
            assert_eq!(k.heap_bytes(), if b.len() > INLINE { b.len() } else { 0 });
            let mut m = HashMap::new();
            m.insert(k.clone(), 1);
            assert_eq!(m.get(b), Some(&1), "a lookup by bytes finds it");
        }
        assert!(Key::new(b"a") < Key::new(b"ab"));
        assert!(Key::new(&[b'b'; 30]) > Key::new(b"a"));
    }
}
