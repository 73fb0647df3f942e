//! What the daemon keeps on disk in `--state` (directory 0700, files 0600, written atomically):
//!
//! - `private.key`: its WireGuard private key;
//! - `enrollment.json`: its identity, its credential (certificate and key), the CA and the
//!   controller URLs, from `bulkheadd join`;
//! - `config.json`: the last configuration the controller sent, enforced after a restart until
//!   the controller answers.
//!
//! Any of them that does not parse is an error: the daemon refuses to start rather than run
//! with an identity or a policy it did not mean to have.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bulkhead_proto::{NodeConfig, PrivateKey, private};
use serde::{Deserialize, Serialize};

const KEY_FILE: &str = "private.key";
const ENROLLMENT_FILE: &str = "enrollment.json";
const CONFIG_FILE: &str = "config.json";

/// Creates the state directory with mode 0700.
fn ensure_dir(dir: &Path) -> anyhow::Result<()> {
    private::create_dir(dir)
        .with_context(|| format!("cannot create state directory {}", dir.display()))
}

/// Writes `data` to `path` with mode 0600 from its creation, atomically.
pub fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    private::write_file(path, data).with_context(|| format!("cannot write {}", path.display()))
}

/// Reads the node's private key from `dir`, creating the directory (0700) and a new key (0600)
/// if there is none.
pub fn load_or_create_key(dir: &Path) -> anyhow::Result<PrivateKey> {
    let path = dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => PrivateKey::from_base64(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}; refusing to start", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            ensure_dir(dir)?;
            let key = PrivateKey::generate();
            write_private(&path, format!("{}\n", key.to_base64()).as_bytes())?;
            Ok(key)
        }
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    }
}

/// The result of `bulkheadd join`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    /// The identity the token enrolled.
    pub identity: String,
    /// The client certificate, PEM.
    pub certificate: String,
    /// Its private key, PEM.
    pub key: String,
    /// The CA, PEM.
    pub ca: String,
    /// Controller URLs.
    pub controllers: Vec<String>,
}

fn read_optional<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &str,
) -> anyhow::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            anyhow::anyhow!(
                "{}: corrupt {what} ({e}); refusing to start. Remove it to start over{}",
                path.display(),
                if what == "enrollment" {
                    " with a new token"
                } else {
                    " (nothing passes until the controller answers)"
                }
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir(pub PathBuf);

impl StateDir {
    /// The enrollment, if the node has joined.
    pub fn enrollment(&self) -> anyhow::Result<Option<Enrollment>> {
        read_optional(&self.0.join(ENROLLMENT_FILE), "enrollment")
    }

    /// Saves the enrollment.
    pub fn save_enrollment(&self, e: &Enrollment) -> anyhow::Result<()> {
        ensure_dir(&self.0)?;
        write_private(
            &self.0.join(ENROLLMENT_FILE),
            &serde_json::to_vec_pretty(e)?,
        )
    }

    /// The cached configuration, if any.
    pub fn cached_config(&self) -> anyhow::Result<Option<NodeConfig>> {
        read_optional(&self.0.join(CONFIG_FILE), "cached configuration")
    }

    /// Caches the configuration in force.
    pub fn save_config(&self, c: &NodeConfig) -> anyhow::Result<()> {
        write_private(&self.0.join(CONFIG_FILE), &serde_json::to_vec(c)?)
    }

    /// Forgets the cached configuration (the controller said there is none).
    pub fn clear_config(&self) -> anyhow::Result<()> {
        match std::fs::remove_file(self.0.join(CONFIG_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_key_is_created_once_and_a_corrupt_one_refused() {
        let dir = std::env::temp_dir().join(format!("bulkheadd-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = load_or_create_key(&dir).unwrap();
        let b = load_or_create_key(&dir).unwrap();
        assert_eq!(a, b);
        let mode = std::fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.join(KEY_FILE), "not a key").unwrap();
        let e = load_or_create_key(&dir).unwrap_err().to_string();
        assert!(e.contains("refusing to start"), "{e}");

        let s = StateDir(dir.clone());
        assert_eq!(s.enrollment().unwrap(), None);
        let en = Enrollment {
            identity: "web-1".into(),
            certificate: "c".into(),
            key: "k".into(),
            ca: "ca".into(),
            controllers: vec!["https://127.0.0.1:7443".into()],
        };
        s.save_enrollment(&en).unwrap();
        assert_eq!(s.enrollment().unwrap(), Some(en));
        std::fs::write(dir.join(CONFIG_FILE), b"{\"allowlist\": tru").unwrap();
        let e = s.cached_config().unwrap_err().to_string();
        assert!(
            e.contains("corrupt cached configuration") && e.contains("refusing"),
            "{e}"
        );
        s.clear_config().unwrap();
        assert_eq!(s.cached_config().unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
