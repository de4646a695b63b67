//! Files tunegate owns: written atomically (temp file, fsync, rename, fsync the directory), so a
//! crash leaves either the old content or the new, never a torn file; and an exclusive lock so
//! two applies never interleave their journals.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Replaces `path` with `bytes` atomically. The directory is created (0755) when missing.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {} atomically", path.display()))
}

/// Removes a file and makes the removal durable; a file that is already gone is fine.
pub fn remove_durably(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync {}", dir.display()))?;
    }
    Ok(())
}

/// An exclusive lock on the state directory, held for the life of the value.
pub struct StateLock {
    _lock: nix::fcntl::Flock<File>,
    path: PathBuf,
}

impl StateLock {
    /// Takes the lock without waiting: a second apply or revert fails fast and says why.
    pub fn acquire(state_dir: &Path) -> anyhow::Result<StateLock> {
        fs::create_dir_all(state_dir)
            .with_context(|| format!("cannot create state directory {}", state_dir.display()))?;
        let path = state_dir.join("lock");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .with_context(|| {
                format!(
                    "another tunegate apply or revert holds {}; try again when it has finished",
                    path.display()
                )
            })?;
        Ok(StateLock { _lock: lock, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/journal.json");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "two");
        let names: Vec<_> = fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
        remove_durably(&p).unwrap();
        remove_durably(&p).unwrap();
        assert!(!p.exists());
    }

    #[test]
    fn a_second_lock_is_refused_while_the_first_is_held() {
        let d = tempfile::tempdir().unwrap();
        let first = StateLock::acquire(d.path()).unwrap();
        let e = StateLock::acquire(d.path()).err().unwrap();
        assert!(format!("{e:#}").contains("another tunegate"), "{e:#}");
        drop(first);
        StateLock::acquire(d.path()).unwrap();
    }
}
