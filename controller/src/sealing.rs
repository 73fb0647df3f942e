//! The CA's private key is never in the store in clear: it is sealed (AES-256-GCM) with a
//! 256-bit key that the controllers hold outside the store, in `--ca-key-file`.
//!
//! Whoever reads the store (an etcd snapshot, a backup of `store.redb`, a client that reached
//! etcd) gets the CA certificate and an opaque blob; minting credentials needs the key file too.
//! The sealed record is bound to its purpose and to the CA certificate it goes with (associated
//! data), so a sealed key cannot be moved to another record or paired with another certificate.
//!
//! The file holds 64 hex digits (`openssl rand -hex 32`). With the embedded store it defaults to
//! `STATE/ca-seal.key` and is created (0600) on first start; with etcd it must be given, and
//! every controller sharing the etcd must have the same file.

use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// The default file name in the state directory.
pub const DEFAULT_FILE: &str = "ca-seal.key";

/// What the sealed bytes are, bound into every seal.
const PURPOSE: &[u8] = b"bulkhead ca private key v1\0";

/// The key that seals the CA's private key, and the file it came from (for error messages).
pub struct SealKey {
    key: LessSafeKey,
    path: PathBuf,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealKey")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn parse(text: &str) -> Option<[u8; 32]> {
    let t = text.trim();
    if t.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(t.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl SealKey {
    /// Reads the key from `path`. If it is absent and `create` is set, makes a new random key
    /// there (0600) first.
    pub fn load(path: &Path, create: bool) -> anyhow::Result<SealKey> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let mut k = [0u8; 32];
                SystemRandom::new()
                    .fill(&mut k)
                    .map_err(|_| anyhow::anyhow!("no randomness for the CA key file"))?;
                let text = format!("{}\n", hex(&k));
                bulkhead_proto::private::write_file(path, text.as_bytes())
                    .with_context(|| format!("cannot create the CA key file {}", path.display()))?;
                tracing::info!(path = %path.display(), "created the CA key file");
                text
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
                "CA key file {} does not exist: make it once with `openssl rand -hex 32 > {0}` \
                 (mode 0600) and give the same file to every controller sharing the store",
                path.display()
            ),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot read CA key file {}", path.display()));
            }
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(m) = std::fs::metadata(path)
                && m.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(path = %path.display(), "the CA key file is readable by others: chmod 600");
            }
        }
        let bytes = parse(&text).with_context(|| {
            format!(
                "CA key file {}: expected 64 hex digits (openssl rand -hex 32)",
                path.display()
            )
        })?;
        let key = UnboundKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| anyhow::anyhow!("CA key file {}: unusable key", path.display()))?;
        Ok(SealKey {
            key: LessSafeKey::new(key),
            path: path.to_path_buf(),
        })
    }

    /// Seals the PEM private key of the CA whose certificate is `cert_pem`: base64 of a random
    /// nonce followed by the ciphertext and tag.
    pub fn seal(&self, cert_pem: &str, key_pem: &str) -> anyhow::Result<String> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| anyhow::anyhow!("no randomness to seal the CA key"))?;
        let mut buf = key_pem.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(cert_pem)),
                &mut buf,
            )
            .map_err(|_| anyhow::anyhow!("cannot seal the CA key"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(B64.encode(out))
    }

    /// Opens what [`SealKey::seal`] made for `cert_pem`. Fails, naming the file, if this is not
    /// the key it was sealed with.
    pub fn open(&self, cert_pem: &str, sealed: &str) -> anyhow::Result<String> {
        let wrong = || {
            anyhow::anyhow!(
                "the CA key in the store does not open with the CA key file {}: every \
                 controller sharing a store needs the same file (refusing to start)",
                self.path.display()
            )
        };
        let raw = B64.decode(sealed.trim()).map_err(|_| wrong())?;
        if raw.len() < NONCE_LEN {
            return Err(wrong());
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| wrong())?;
        let mut ct = ct.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad(cert_pem)), &mut ct)
            .map_err(|_| wrong())?;
        String::from_utf8(plain.to_vec()).map_err(|_| wrong())
    }
}

/// The associated data: the record's purpose and the SHA-256 of the certificate it goes with.
fn aad(cert_pem: &str) -> Vec<u8> {
    let mut a = PURPOSE.to_vec();
    a.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, cert_pem.as_bytes()).as_ref());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dir: &Path, name: &str) -> SealKey {
        SealKey::load(&dir.join(name), true).unwrap()
    }

    #[test]
    fn seals_open_only_with_the_same_key_and_certificate() {
        let dir = std::env::temp_dir().join(format!("bh-seal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = key(&dir, "a");
        let sealed = k
            .seal("CERT", "-----BEGIN PRIVATE KEY-----\nabc\n")
            .unwrap();
        assert!(!sealed.contains("BEGIN") && !sealed.contains("abc"));
        assert_ne!(
            sealed,
            k.seal("CERT", "-----BEGIN PRIVATE KEY-----\nabc\n")
                .unwrap()
        );
        assert_eq!(
            k.open("CERT", &sealed).unwrap(),
            "-----BEGIN PRIVATE KEY-----\nabc\n"
        );
        // Reloading the file gives the same key; a new file does not.
        assert!(key(&dir, "a").open("CERT", &sealed).is_ok());
        let e = key(&dir, "b")
            .open("CERT", &sealed)
            .unwrap_err()
            .to_string();
        assert!(e.contains("same file"), "{e}");
        // Bound to its certificate.
        assert!(k.open("OTHER CERT", &sealed).is_err());
        assert!(k.open("CERT", "garbage").is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let m = std::fs::metadata(dir.join("a"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(m & 0o777, 0o600);
        }
        // Not created unless asked; a malformed file is refused.
        let e = SealKey::load(&dir.join("absent"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("openssl rand -hex 32"), "{e}");
        std::fs::write(dir.join("bad"), "not hex").unwrap();
        assert!(SealKey::load(&dir.join("bad"), false).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hex_round_trips() {
        let k: [u8; 32] = std::array::from_fn(|i| i as u8 * 7);
        assert_eq!(parse(&format!("  {}\n", hex(&k))), Some(k));
        assert_eq!(parse("00"), None);
    }
}
