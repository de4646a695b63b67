//! Files tunegate owns: written atomically (temp file, fsync, rename, fsync the directory), so a
//! crash leaves either the old content or the new, never a torn file; and an exclusive lock so
//! two applies never interleave their journals.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Replaces `path` with `bytes` atomically. The directory is created (0755) when missing.
///
/// The temp file is `.NAME.tmp.PID.RANDOM`: a kill can leave one behind, and the next writer
/// may well have the same PID (a container's PID 1 always does), so the PID alone would collide
/// with the leftover. [`remove_stale_temps`] clears leftovers under the state lock.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    write_atomic_owned(path, bytes, mode, None)
}

/// The owner files in `dir` should have when root writes them: the directory's own owner when
/// that is not root. The state directory belongs to the service's user (systemd's
/// StateDirectory=), and an operator's `sudo tunegate apply` must not leave a journal or lock
/// that user can no longer read or update. None when not root, or the directory is root's.
pub fn owner_for(dir: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let meta = fs::metadata(dir).ok()?;
    (meta.uid() != 0).then_some((meta.uid(), meta.gid()))
}

/// [`write_atomic`], the new file given to `owner` (uid, gid) before it replaces the old one.
pub fn write_atomic_owned(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(
        "{}{}.{:016x}",
        temp_prefix(&name.to_string_lossy()),
        std::process::id(),
        random_u64()
    ));
    let result = (|| -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // Exactly `mode`, whatever the umask (a unit's UMask=0077 would make a status file
        // meant for every operator 0600).
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        f.write_all(bytes)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {} atomically", path.display()))
}

/// How every temp file for `name` starts (`.NAME.tmp.`), followed by the writer's PID.
fn temp_prefix(name: &str) -> String {
    format!(".{name}.tmp.")
}

/// 64 random bits for temp names (the kernel's pool; the clock if that is unreadable).
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    match File::open("/dev/urandom").and_then(|mut f| io::Read::read_exact(&mut f, &mut b)) {
        Ok(()) => u64::from_ne_bytes(b),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    }
}

/// Removes temp files that an earlier, killed writer of `dir/name` left behind: those of a PID
/// that no longer runs, or of our own PID (this process is not writing that file now). Call it
/// holding the state lock, so no live writer of ours is mid-write. Returns what it removed.
pub fn remove_stale_temps(dir: &Path, name: &str) -> Vec<PathBuf> {
    let prefix = temp_prefix(name);
    let me = std::process::id();
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return removed;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
            continue;
        };
        let pid = rest.split('.').next().and_then(|p| p.parse::<u32>().ok());
        let stale = match pid {
            Some(pid) if pid == me => true,
            Some(pid) => {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None)
                    == Err(nix::errno::Errno::ESRCH)
            }
            None => true, // not a name write_atomic makes, yet ours by its prefix
        };
        if stale && fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
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
        if let Some((uid, gid)) = owner_for(state_dir) {
            // Ours to hand over: the service's user must be able to take this lock too.
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                .with_context(|| format!("cannot chown {}", path.display()))?;
        }
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

    /// As root, files in a state directory owned by the service's user are that user's: the
    /// lock and an atomically written file (a journal).
    #[test]
    fn root_hands_files_in_a_service_users_directory_to_that_user() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        fs::create_dir(&state).unwrap();
        std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
        let _lock = StateLock::acquire(&state).unwrap();
        let j = state.join("journal.json");
        write_atomic_owned(&j, b"{}", 0o600, owner_for(&state)).unwrap();
        for p in [state.join("lock"), j] {
            let m = fs::metadata(&p).unwrap();
            assert_eq!((m.uid(), m.gid()), (65534, 65534), "{}", p.display());
        }
        assert_eq!(
            owner_for(d.path()),
            None,
            "a root-owned directory keeps root's files"
        );
    }

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

    /// A kill mid-write leaves a temp file; the next writer with the same PID (a container's
    /// PID 1) must neither trip over it nor leave it lying around once it cleans up.
    #[test]
    fn a_leftover_temp_file_of_the_same_pid_neither_blocks_nor_survives_cleanup() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("journal.json");
        let mine = d
            .path()
            .join(format!(".journal.json.tmp.{}", std::process::id()));
        let mine_new = d.path().join(format!(
            ".journal.json.tmp.{}.00000000deadbeef",
            std::process::id()
        ));
        let dead = d
            .path()
            .join(".journal.json.tmp.999999999.0000000000000001");
        let live = d.path().join(".journal.json.tmp.1.0000000000000001"); // init runs
        let other = d.path().join(".status.json.tmp.999999999.0000000000000001");
        for f in [&mine, &mine_new, &dead, &live, &other] {
            std::fs::write(f, "half a journal").unwrap();
        }
        write_atomic(&p, b"whole", 0o600).unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "whole");
        let mut removed = remove_stale_temps(d.path(), "journal.json");
        removed.sort();
        let mut want = vec![mine, mine_new, dead];
        want.sort();
        assert_eq!(removed, want);
        assert!(live.exists() && other.exists());
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
