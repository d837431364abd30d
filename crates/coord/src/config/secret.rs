//! Secret config entries, encrypted at rest by envelope encryption.
//!
//! Content of an entry marked secret is sealed with AES-256-GCM under a data
//! key before it reaches the store; data keys are kept in the store only
//! wrapped (AES-256-GCM) by a master key that never enters the store: a file
//! (`--secrets-key-file`) or the environment (`MESHWORK_SECRETS_KEY`). The
//! ciphertext is bound to the entry it belongs to (its path is the associated
//! data), so a sealed value copied to another entry does not open.
//!
//! ```text
//! /meshwork/config/live/keyring   Keyring: the active data key and every data key, wrapped
//! ```
//!
//! Rotation makes a new data key active, rewraps every data key under the
//! first master key (so a master key is changed by starting nodes with the
//! new key first and the old one as previous, then rotating), and reseals the
//! current content of every secret entry. Old data keys stay: history records
//! sealed under them remain readable.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use parking_lot::Mutex;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{CoordError, Result};

/// Bytes in a master or data key (AES-256).
pub const KEY_LEN: usize = 32;

/// A master key: wraps the data keys. Its bytes are never printed.
#[derive(Clone)]
pub struct MasterKey {
    id: String,
    key: Arc<LessSafeKey>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({})", self.id)
    }
}

impl MasterKey {
    /// A master key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<MasterKey> {
        if bytes.len() != KEY_LEN {
            return Err(CoordError::invalid(format!(
                "a secrets master key is {KEY_LEN} bytes, not {}",
                bytes.len()
            )));
        }
        let mut h = Sha256::new();
        h.update(b"meshwork secrets master key id\0");
        h.update(bytes);
        let id = hex(&h.finalize()[..8]);
        Ok(MasterKey {
            id,
            key: Arc::new(aead_key(bytes)?),
        })
    }

    /// A master key from text: 64 hex digits or the base64 of 32 bytes.
    pub fn from_text(text: &str) -> Result<MasterKey> {
        let t = text.trim();
        if t.len() == 2 * KEY_LEN && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            let bytes: Vec<u8> = (0..KEY_LEN)
                .filter_map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16).ok())
                .collect();
            return MasterKey::from_bytes(&bytes);
        }
        match B64.decode(t) {
            Ok(bytes) if bytes.len() == KEY_LEN => MasterKey::from_bytes(&bytes),
            _ => Err(CoordError::invalid(format!(
                "a secrets master key is {KEY_LEN} bytes written as 64 hex digits or in base64 \
                 (make one with `head -c 32 /dev/urandom | base64`)"
            ))),
        }
    }

    /// A master key from a file: 32 raw bytes, or the text forms of [`MasterKey::from_text`].
    pub fn from_file(path: &Path) -> Result<MasterKey> {
        let bytes = std::fs::read(path).map_err(|e| {
            CoordError::invalid(format!(
                "reading the secrets master key {}: {e}",
                path.display()
            ))
        })?;
        // 32 bytes that are all printable are a typed passphrase, not a key:
        // parsed as text, which refuses them (random bytes are that only
        // once in ~10^14).
        let key = if bytes.len() == KEY_LEN && !bytes.iter().all(|b| (0x20..0x7f).contains(b)) {
            MasterKey::from_bytes(&bytes)
        } else {
            match std::str::from_utf8(&bytes) {
                Ok(t) => MasterKey::from_text(t),
                Err(_) => MasterKey::from_bytes(&bytes),
            }
        };
        key.map_err(|e| CoordError::invalid(format!("{}: {e}", path.display())))
    }

    /// A new random key, as the text [`MasterKey::from_text`] reads (base64).
    pub fn generate_text() -> Result<String> {
        Ok(B64.encode(random::<KEY_LEN>()?))
    }

    /// Its public id (a hash prefix): which master key wrapped a data key.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// The master keys a process has: the first wraps new data keys, the others
/// (previous keys) only unwrap old ones.
#[derive(Clone, Debug, Default)]
pub struct MasterKeys(pub Vec<MasterKey>);

impl MasterKeys {
    /// The keys named by the environment: `MESHWORK_SECRETS_KEY` (text) or
    /// `MESHWORK_SECRETS_KEY_FILE` (a path), then `MESHWORK_SECRETS_PREVIOUS_KEY_FILE`.
    pub fn from_env() -> Result<MasterKeys> {
        let file = std::env::var_os("MESHWORK_SECRETS_KEY_FILE").map(std::path::PathBuf::from);
        let previous =
            std::env::var_os("MESHWORK_SECRETS_PREVIOUS_KEY_FILE").map(std::path::PathBuf::from);
        MasterKeys::load(file.as_deref(), previous.as_deref())
    }

    /// `MESHWORK_SECRETS_KEY` (inline, first) or the key in `file`, then the
    /// `previous` key (only beside a new one). What the node's flags and the
    /// SDK's variables both come to.
    pub fn load(file: Option<&Path>, previous: Option<&Path>) -> Result<MasterKeys> {
        let mut keys = Vec::new();
        if let Ok(t) = std::env::var("MESHWORK_SECRETS_KEY")
            && !t.trim().is_empty()
        {
            keys.push(
                MasterKey::from_text(&t)
                    .map_err(|e| CoordError::invalid(format!("MESHWORK_SECRETS_KEY: {e}")))?,
            );
        } else if let Some(p) = file {
            keys.push(MasterKey::from_file(p)?);
        }
        if let Some(p) = previous {
            if keys.is_empty() {
                return Err(CoordError::invalid(
                    "the previous secrets key needs the new key too \
                     (MESHWORK_SECRETS_KEY or a key file)",
                ));
            }
            keys.push(MasterKey::from_file(p)?);
        }
        Ok(MasterKeys(keys))
    }

    /// The key that wraps new data keys.
    pub fn primary(&self) -> Option<&MasterKey> {
        self.0.first()
    }

    fn by_id(&self, id: &str) -> Option<&MasterKey> {
        self.0.iter().find(|k| k.id == id)
    }
}

/// Sealed content as stored: which data key, the nonce and the ciphertext with its tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// Data key id.
    pub key: String,
    /// 96-bit nonce, base64.
    pub nonce: String,
    /// Ciphertext and tag, base64.
    pub data: String,
}

impl Sealed {
    /// The checksum a secret entry publishes: a hash of the ciphertext, so that
    /// it changes with every publish and tells nothing about the content.
    pub fn checksum(&self) -> String {
        super::checksum(&format!("{}.{}.{}", self.key, self.nonce, self.data))
    }
}

/// One data key as stored: wrapped by a master key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataKey {
    /// Its id.
    pub id: String,
    /// Id of the master key that wraps it.
    pub master: String,
    /// Nonce, ciphertext and tag, base64.
    pub wrapped: String,
    /// When it was made, Unix milliseconds.
    pub created_at_ms: u64,
}

/// Every data key, and which one seals new content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keyring {
    /// Id of the data key that seals new content.
    pub active: String,
    /// Every data key, oldest first.
    pub keys: Vec<DataKey>,
}

/// What the secrets machinery of one node looks like (no key material).
#[derive(Debug, Clone, Serialize)]
pub struct SecretsStatus {
    /// Whether this node can seal and open secrets (it has a master key).
    pub enabled: bool,
    /// Id of this node's master key that wraps new data keys.
    pub master: Option<String>,
    /// Ids of the previous master keys it can still unwrap with.
    pub previous: Vec<String>,
    /// The active data key.
    pub active: Option<String>,
    /// Every data key: id, wrapping master key, whether this node can unwrap it.
    pub keys: Vec<KeyStatus>,
    /// Secret entries (current versions).
    pub entries: usize,
}

/// One data key in [`SecretsStatus`].
#[derive(Debug, Clone, Serialize)]
pub struct KeyStatus {
    /// Data key id.
    pub id: String,
    /// Master key that wraps it.
    pub master: String,
    /// Whether this node holds that master key.
    pub usable: bool,
    /// When it was made, Unix milliseconds.
    pub created_at_ms: u64,
    /// Current secret entries sealed under it.
    pub entries: usize,
}

/// What a rotation did.
#[derive(Debug, Clone, Serialize)]
pub struct Rotated {
    /// The new active data key.
    pub active: String,
    /// Data keys rewrapped under the primary master key.
    pub rewrapped: usize,
    /// Secret entries resealed under the new data key.
    pub resealed: usize,
    /// Entries left as they were because they changed during the rotation
    /// (their new content is sealed under the new key already).
    pub skipped: usize,
    /// Entries whose content does not open (tampered with, or sealed under a
    /// data key no master key here unwraps): left as they are.
    pub unreadable: Vec<String>,
}

use super::hex;

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| CoordError::Unavailable("the system random source failed".into()))?;
    Ok(b)
}

fn aead_key(bytes: &[u8]) -> Result<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, bytes)
        .map(LessSafeKey::new)
        .map_err(|_| CoordError::invalid("an AES-256 key is 32 bytes"))
}

/// Seals `plain` under `key` with `aad`: (nonce, ciphertext with tag).
fn seal(key: &LessSafeKey, aad: &[u8], plain: &[u8]) -> Result<([u8; NONCE_LEN], Vec<u8>)> {
    let nonce = random::<NONCE_LEN>()?;
    let mut buf = plain.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut buf,
    )
    .map_err(|_| CoordError::Unavailable("sealing failed".into()))?;
    Ok((nonce, buf))
}

/// Opens what [`seal`] made; `None` when it is not authentic.
fn open(key: &LessSafeKey, aad: &[u8], nonce: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut buf = data.to_vec();
    let plain = key.open_in_place(nonce, Aad::from(aad), &mut buf).ok()?;
    Some(plain.to_vec())
}

fn dek_aad(id: &str) -> Vec<u8> {
    format!("meshwork data key {id}").into_bytes()
}

fn content_aad(entry: &str) -> Vec<u8> {
    format!("meshwork config {entry}").into_bytes()
}

/// A data key wrapped by `master`.
fn wrap(master: &MasterKey, id: &str, dek: &[u8]) -> Result<String> {
    let (nonce, ct) = seal(&master.key, &dek_aad(id), dek)?;
    let mut blob = nonce.to_vec();
    blob.extend_from_slice(&ct);
    Ok(B64.encode(blob))
}

/// Seals and opens entry content with the data keys of a keyring.
#[derive(Debug, Default)]
pub struct Vault {
    masters: MasterKeys,
    opened: Mutex<HashMap<String, Arc<LessSafeKey>>>,
}

impl Vault {
    /// A vault holding `masters`.
    pub fn new(masters: MasterKeys) -> Vault {
        Vault {
            masters,
            opened: Mutex::new(HashMap::new()),
        }
    }

    /// The master keys.
    pub fn masters(&self) -> &MasterKeys {
        &self.masters
    }

    /// Whether this process can seal secrets.
    pub fn enabled(&self) -> bool {
        self.masters.primary().is_some()
    }

    fn no_master() -> CoordError {
        CoordError::Unavailable(
            "this process has no secrets master key, so it cannot seal or open secret entries: \
             give one with --secrets-key-file or MESHWORK_SECRETS_KEY (SDK: MESHWORK_SECRETS_KEY_FILE)"
                .into(),
        )
    }

    /// The unwrapped data key `dk`.
    fn data_key(&self, dk: &DataKey) -> Result<Arc<LessSafeKey>> {
        if let Some(k) = self.opened.lock().get(&dk.id) {
            return Ok(k.clone());
        }
        let key = Arc::new(aead_key(&self.unwrap_bytes(dk)?)?);
        self.opened.lock().insert(dk.id.clone(), key.clone());
        Ok(key)
    }

    /// The bytes of data key `dk`, unwrapped by the master key that wrapped it.
    fn unwrap_bytes(&self, dk: &DataKey) -> Result<Vec<u8>> {
        let master = self.masters.by_id(&dk.master).ok_or_else(|| {
            if self.masters.0.is_empty() {
                Vault::no_master()
            } else {
                CoordError::Unavailable(format!(
                    "data key {} is wrapped by master key {}, which this process does not have \
                     (it has {}); give it as the previous key (--secrets-previous-key-file)",
                    dk.id,
                    dk.master,
                    self.masters
                        .0
                        .iter()
                        .map(|k| k.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
        })?;
        let blob = B64
            .decode(&dk.wrapped)
            .map_err(|e| super::corrupt("keyring", e))?;
        if blob.len() < NONCE_LEN {
            return Err(super::corrupt("keyring", "wrapped data key too short"));
        }
        let (nonce, ct) = blob.split_at(NONCE_LEN);
        open(&master.key, &dek_aad(&dk.id), nonce, ct).ok_or_else(|| {
            super::corrupt(
                "keyring",
                format!(
                    "data key {} does not unwrap with master key {}",
                    dk.id, master.id
                ),
            )
        })
    }

    /// A new data key wrapped by the primary master key (also kept unwrapped).
    pub fn new_data_key(&self) -> Result<DataKey> {
        let master = self.masters.primary().ok_or_else(Vault::no_master)?;
        let id = hex(&random::<8>()?);
        let dek = random::<KEY_LEN>()?;
        let wrapped = wrap(master, &id, &dek)?;
        self.opened
            .lock()
            .insert(id.clone(), Arc::new(aead_key(&dek)?));
        Ok(DataKey {
            id,
            master: master.id.clone(),
            wrapped,
            created_at_ms: crate::registry::model::now_ms(),
        })
    }

    /// `dk` wrapped by the primary master key (unchanged when it already is).
    pub fn rewrap(&self, dk: &DataKey) -> Result<DataKey> {
        let master = self.masters.primary().ok_or_else(Vault::no_master)?;
        if dk.master == master.id {
            return Ok(dk.clone());
        }
        let bytes = self.unwrap_bytes(dk)?;
        Ok(DataKey {
            wrapped: wrap(master, &dk.id, &bytes)?,
            master: master.id.clone(),
            ..dk.clone()
        })
    }

    /// Seals `plain` for entry `entry` (its `ns/group/id`) under the keyring's active key.
    pub fn seal(&self, ring: &Keyring, entry: &str, plain: &str) -> Result<Sealed> {
        let dk = ring
            .keys
            .iter()
            .find(|k| k.id == ring.active)
            .ok_or_else(|| super::corrupt("keyring", "the active data key is missing"))?;
        let key = self.data_key(dk)?;
        let (nonce, data) = seal(&key, &content_aad(entry), plain.as_bytes())?;
        Ok(Sealed {
            key: dk.id.clone(),
            nonce: B64.encode(nonce),
            data: B64.encode(data),
        })
    }

    /// Opens the content of entry `entry` sealed as `s`.
    pub fn open(&self, ring: &Keyring, entry: &str, s: &Sealed) -> Result<String> {
        let dk = ring.keys.iter().find(|k| k.id == s.key).ok_or_else(|| {
            super::corrupt(
                entry,
                format!("sealed under data key {}, which the keyring lacks", s.key),
            )
        })?;
        let key = self.data_key(dk)?;
        let nonce = B64.decode(&s.nonce).map_err(|e| super::corrupt(entry, e))?;
        let data = B64.decode(&s.data).map_err(|e| super::corrupt(entry, e))?;
        let plain = open(&key, &content_aad(entry), &nonce, &data).ok_or_else(|| {
            super::corrupt(
                entry,
                "the sealed content is not authentic (changed, or copied from another entry)",
            )
        })?;
        String::from_utf8(plain).map_err(|e| super::corrupt(entry, e))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn vault() -> (Vault, Keyring) {
        let v = Vault::new(MasterKeys(vec![
            MasterKey::from_text(&MasterKey::generate_text().unwrap()).unwrap(),
        ]));
        let dk = v.new_data_key().unwrap();
        let ring = Keyring {
            active: dk.id.clone(),
            keys: vec![dk],
        };
        (v, ring)
    }

    #[test]
    fn sealed_content_opens_only_for_its_entry_and_unchanged() {
        let (v, ring) = vault();
        let s = v.seal(&ring, "prod/db/password", "hunter2").unwrap();
        assert!(!s.data.contains("hunter2"));
        assert_eq!(v.open(&ring, "prod/db/password", &s).unwrap(), "hunter2");
        assert!(
            v.open(&ring, "prod/db/other", &s).is_err(),
            "bound to its entry"
        );
        let mut bad = s.clone();
        let mut raw = B64.decode(&bad.data).unwrap();
        raw[0] ^= 1;
        bad.data = B64.encode(raw);
        assert!(v.open(&ring, "prod/db/password", &bad).is_err(), "tampered");
        let again = v.seal(&ring, "prod/db/password", "hunter2").unwrap();
        assert_ne!(again.nonce, s.nonce, "a fresh nonce per seal");
        assert_ne!(again.checksum(), s.checksum());
    }

    #[test]
    fn data_keys_need_their_master_and_rewrap_to_a_new_one() {
        let (v, ring) = vault();
        let s = v.seal(&ring, "a/b/c", "x").unwrap();
        // Another process with another master key cannot open it.
        let other = Vault::new(MasterKeys(vec![
            MasterKey::from_text(&MasterKey::generate_text().unwrap()).unwrap(),
        ]));
        assert!(other.open(&ring, "a/b/c", &s).is_err());
        // New master first, the old one as previous: rewrap, then the old one can go.
        let new_master = MasterKey::from_text(&MasterKey::generate_text().unwrap()).unwrap();
        let both = Vault::new(MasterKeys(vec![new_master.clone(), v.masters.0[0].clone()]));
        let rewrapped = Keyring {
            active: ring.active.clone(),
            keys: vec![both.rewrap(&ring.keys[0]).unwrap()],
        };
        assert_eq!(rewrapped.keys[0].master, new_master.id());
        let only_new = Vault::new(MasterKeys(vec![new_master]));
        assert_eq!(only_new.open(&rewrapped, "a/b/c", &s).unwrap(), "x");
        // Without any key: a clear refusal.
        let none = Vault::new(MasterKeys::default());
        let e = none.open(&ring, "a/b/c", &s).unwrap_err().to_string();
        assert!(e.contains("no secrets master key"), "{e}");
    }

    #[test]
    fn master_keys_parse_from_hex_base64_and_raw_files() {
        let hex64 = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let a = MasterKey::from_text(hex64).unwrap();
        let raw: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&hex64[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let b = MasterKey::from_text(&B64.encode(&raw)).unwrap();
        assert_eq!(a.id(), b.id());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, &raw).unwrap();
        assert_eq!(MasterKey::from_file(&p).unwrap().id(), a.id());
        assert!(MasterKey::from_text("short").is_err());
        // 32 typed characters are a passphrase, not a key: refused.
        std::fs::write(&p, "correct horse battery staple 123").unwrap();
        assert!(MasterKey::from_file(&p).is_err());
        assert!(
            !format!("{a:?}").contains("0011"),
            "Debug shows only the id"
        );
    }
}
