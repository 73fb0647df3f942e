//! Private state on disk: directories 0700 and files 0600 from the moment they exist, whatever
//! the process's umask (a umask only ever takes bits away). Keys, credentials and the store live
//! in them: a file created 0644 and tightened afterwards is readable in between.
//!
//! A directory or file that already exists with looser permissions (state written by an older
//! version) is tightened, with a warning.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Modes for private state.
const DIR: u32 = 0o700;
const FILE: u32 = 0o600;

/// Tightens `path` to `mode` if group or others have any access to it.
fn tighten(path: &Path, mode: u32) -> std::io::Result<()> {
    let now = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if now & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{now:o}"), "private state was readable by others: now {mode:o}");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Creates `dir` (and missing parents) as 0700; an existing one is tightened.
pub fn create_dir(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR).create(dir)?;
    tighten(dir, DIR)
}

/// Opens `path` for reading and writing, creating it 0600 if absent; an existing one is
/// tightened.
pub fn open_file(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE)
        .open(path)?;
    tighten(path, FILE)?;
    Ok(f)
}

/// Writes `data` to `path` as 0600: a new temporary file, fsync, rename. A crash leaves the old
/// file or the new one, never half of one.
pub fn write_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).map_or(0, |m| m.permissions().mode() & 0o777)
    }

    #[test]
    fn private_from_creation_and_tightened_when_found_loose() {
        let base = std::env::temp_dir().join(format!("bh-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dir = base.join("a/b");
        create_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let f = dir.join("f");
        write_file(&f, b"secret").unwrap();
        assert_eq!(
            (mode(&f), std::fs::read(&f).unwrap()),
            (0o600, b"secret".to_vec())
        );
        let g = dir.join("g");
        drop(open_file(&g).unwrap());
        assert_eq!(mode(&g), 0o600);
        // Left loose by an older version: tightened.
        std::fs::set_permissions(&g, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_dir(&dir).unwrap();
        drop(open_file(&g).unwrap());
        assert_eq!((mode(&dir), mode(&g)), (0o700, 0o600));
        let _ = std::fs::remove_dir_all(&base);
    }
}
