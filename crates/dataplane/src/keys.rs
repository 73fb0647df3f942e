//! WireGuard keys: 32 bytes, written as base64 like `wg` does.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use boringtun::x25519::{PublicKey, StaticSecret};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A 32-byte key, public or private, in base64 when written.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(pub [u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material by accident; the first bytes identify a public key well enough.
        write!(f, "Key({}…)", &self.to_base64()[..8])
    }
}

impl Key {
    /// The key in base64.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The key in hex, as the WireGuard configuration protocol writes it.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses base64.
    pub fn from_base64(s: &str) -> Result<Key, String> {
        let v = STANDARD
            .decode(s.trim())
            .map_err(|e| format!("bad key: {e}"))?;
        <[u8; 32]>::try_from(v.as_slice())
            .map(Key)
            .map_err(|_| format!("bad key: {} bytes, want 32", v.len()))
    }
}

impl Serialize for Key {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        let s = String::deserialize(d)?;
        Key::from_base64(&s).map_err(serde::de::Error::custom)
    }
}

/// A new private key from the operating system's random source.
pub fn generate_private_key() -> Key {
    Key(StaticSecret::random_from_rng(rand_core::OsRng).to_bytes())
}

/// The public key of a private key.
pub fn public_key(private: &Key) -> Key {
    Key(PublicKey::from(&StaticSecret::from(private.0)).to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip_and_errors() {
        let k = generate_private_key();
        assert_eq!(Key::from_base64(&k.to_base64()), Ok(k));
        assert!(Key::from_base64("abc").is_err());
        assert!(Key::from_base64(&STANDARD.encode([0u8; 31])).is_err());
        assert_ne!(public_key(&k), k);
        assert_eq!(public_key(&k), public_key(&k));
        assert_eq!(k.to_hex().len(), 64);
        assert!(!format!("{k:?}").contains(&k.to_base64()));
    }
}
