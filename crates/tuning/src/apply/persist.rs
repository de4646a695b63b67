//! `--persist`: a sysctl.d drop-in holding the values tunegate raised, so they survive a reboot.
//!
//! systemd-sysctl reads /etc/sysctl.d, /run/sysctl.d and /usr/lib/sysctl.d; on recent Debian
//! it no longer reads /etc/sysctl.conf, which is why the usual advice (edit sysctl.conf) would not
//! survive a
//! reboot there. tunegate only ever writes its own file, recognised by its first line.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::Journal;
use crate::host::files;

/// The drop-in's file name. 60 sorts after distribution defaults (10-, 50-) and before the
/// 99- files operators conventionally use for their own overrides, which therefore win.
pub const DROPIN_NAME: &str = "60-tunegate.conf";

/// The first line of every drop-in tunegate writes; a file without it is not ours.
const MARKER: &str = "# Written by tunegate";

/// Fails unless `path` is absent or a file tunegate wrote.
pub fn check_owned(path: &Path) -> anyhow::Result<()> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.starts_with(MARKER) => Ok(()),
        Ok(_) => anyhow::bail!(
            "{} exists and was not written by tunegate; tunegate never edits a file it did not \
             create (rename it, or move its settings into your own file)",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes every journaled value (what tunegate raised, across runs) to the drop-in.
pub fn write(path: &Path, journal: &Journal, profile: &str) -> anyhow::Result<PathBuf> {
    let mut text = format!(
        "{MARKER}; do not edit. These are the values `tunegate apply --persist` raised\n\
         # (profile {profile}); systemd-sysctl applies them at boot. `tunegate revert` removes\n\
         # this file. Put your own settings in a file of your own, e.g. 99-local.conf.\n"
    );
    for e in &journal.entries {
        text.push_str(&format!("{} = {}\n", e.key, e.applied));
    }
    files::write_atomic(path, text.as_bytes(), 0o644)?;
    Ok(path.to_path_buf())
}

/// Removes the drop-in if it is still ours. Returns whether a file was removed.
pub fn remove(path: &Path) -> anyhow::Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    check_owned(path)?;
    files::remove_durably(path)?;
    Ok(true)
}
