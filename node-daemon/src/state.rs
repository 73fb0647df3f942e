//! What the daemon keeps on disk in `--state`: its WireGuard private key.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, bail};
use bulkhead_dataplane::{Key, generate_private_key};

const KEY_FILE: &str = "private.key";

/// Reads the node's private key from `dir`, creating the directory (0700) and a new key (0600)
/// if there is none. A key file that does not parse is an error: the daemon refuses to start
/// rather than run with an identity it did not mean to have.
pub fn load_or_create_key(dir: &Path) -> anyhow::Result<Key> {
    let path = dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Key::from_base64(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}; refusing to start", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create state directory {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            let key = generate_private_key();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            writeln!(f, "{}", key.to_base64())?;
            f.sync_all()?;
            Ok(key)
        }
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
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
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
