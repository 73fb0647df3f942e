//! WireGuard keys: 32 bytes, written as base64 like `wg` does.
//!
//! Two types, so that a private key cannot go where a public one is meant: a [`PublicKey`]
//! travels on the wire (serde, base64); a [`PrivateKey`] never does (no serde), prints nothing
//! of itself in `Debug`, and is zeroed when dropped (x25519-dalek's `StaticSecret`).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use x25519_dalek::StaticSecret;

/// A WireGuard public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

/// A WireGuard private key. Never serialized, never printed.
#[derive(Clone)]
pub struct PrivateKey(StaticSecret);

fn decode(s: &str) -> Result<[u8; 32], String> {
    let v = STANDARD
        .decode(s.trim())
        .map_err(|e| format!("bad key: {e}"))?;
    <[u8; 32]>::try_from(v.as_slice()).map_err(|_| format!("bad key: {} bytes, want 32", v.len()))
}

fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl PublicKey {
    /// The key in base64.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The key in hex, as the WireGuard configuration protocol writes it.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses base64.
    pub fn from_base64(s: &str) -> Result<PublicKey, String> {
        decode(s).map(PublicKey)
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The first bytes identify a key well enough in logs.
        write!(f, "PublicKey({}…)", &self.to_base64()[..8])
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PublicKey, D::Error> {
        let s = String::deserialize(d)?;
        PublicKey::from_base64(&s).map_err(serde::de::Error::custom)
    }
}

impl PrivateKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> PrivateKey {
        PrivateKey(StaticSecret::random())
    }

    /// Its public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    /// The key's bytes, for the data plane and the key file.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The key in base64, for the key file.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.as_bytes())
    }

    /// The key in hex, for the WireGuard configuration protocol's `get` (which `wg show` reads).
    pub fn to_hex(&self) -> String {
        hex(self.0.as_bytes())
    }

    /// Parses base64.
    pub fn from_base64(s: &str) -> Result<PrivateKey, String> {
        decode(s).map(PrivateKey::from)
    }
}

impl From<[u8; 32]> for PrivateKey {
    fn from(bytes: [u8; 32]) -> PrivateKey {
        PrivateKey(StaticSecret::from(bytes))
    }
}

impl PartialEq for PrivateKey {
    fn eq(&self, other: &PrivateKey) -> bool {
        self.0.as_bytes() == other.0.as_bytes()
    }
}

impl Eq for PrivateKey {}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip_and_errors() {
        let k = PrivateKey::generate();
        assert_eq!(PrivateKey::from_base64(&k.to_base64()), Ok(k.clone()));
        let p = k.public_key();
        assert_eq!(PublicKey::from_base64(&p.to_base64()), Ok(p));
        assert!(PublicKey::from_base64("abc").is_err());
        assert!(PublicKey::from_base64(&STANDARD.encode([0u8; 31])).is_err());
        assert_ne!(p.0, k.to_bytes());
        assert_eq!(k.public_key(), p);
        assert_eq!(k.to_hex().len(), 64);
        assert_eq!(p.to_hex().len(), 64);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), p);
    }

    #[test]
    fn debug_prints_nothing_of_a_private_key() {
        let k = PrivateKey::generate();
        let shown = format!("{k:?}");
        assert_eq!(shown, "PrivateKey(…)");
        for s in [k.to_base64(), k.to_hex()] {
            assert!(!shown.contains(&s[..6]));
        }
        // A public key shows a prefix, never the whole key.
        let p = k.public_key();
        assert!(!format!("{p:?}").contains(&p.to_base64()));
    }
}
