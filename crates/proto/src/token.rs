//! Join tokens: `bh1.` then base64url (no padding) of a small JSON object holding the
//! controller URLs, the CA fingerprint and the secret. The secret is what the controller checks
//! (it stores only its hash); the rest tells the node where to go and whom to trust.

use base64::Engine;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "bh1.";

/// A decoded join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Controller URLs, `https://HOST:PORT`.
    #[serde(rename = "u")]
    pub urls: Vec<String>,
    /// SHA-256 of the CA certificate, hex.
    #[serde(rename = "f")]
    pub ca_fingerprint: String,
    /// The one-time secret, hex.
    #[serde(rename = "s")]
    pub secret: String,
}

impl Token {
    /// The token as text.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        )
    }

    /// Parses a token; the error says what is wrong with it (never echoes the secret).
    pub fn decode(s: &str) -> Result<Token, String> {
        let body = s
            .trim()
            .strip_prefix(PREFIX)
            .ok_or("not a Bulkhead join token (expected it to start with \"bh1.\")")?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| "join token is damaged (bad base64)")?;
        let t: Token =
            serde_json::from_slice(&json).map_err(|_| "join token is damaged (bad contents)")?;
        if t.urls.is_empty() || t.secret.len() < 32 || t.ca_fingerprint.len() != 64 {
            return Err("join token is incomplete".into());
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let t = Token {
            urls: vec!["https://10.0.0.1:7443".into()],
            ca_fingerprint: "a".repeat(64),
            secret: "b".repeat(64),
        };
        let s = t.encode();
        assert!(s.starts_with("bh1."));
        assert_eq!(Token::decode(&s).unwrap(), t);
        assert!(
            Token::decode("hello")
                .unwrap_err()
                .contains("not a Bulkhead")
        );
        assert!(Token::decode(&s[..s.len() - 5]).is_err());
        assert!(Token::decode("bh1.e30").unwrap_err().contains("damaged"));
    }
}
