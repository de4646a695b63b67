//! `--persist`: a sysctl.d drop-in holding the profile's values, so the host still passes it
//! after a reboot (not only the values this run raised: a key already satisfied at run time by
//! a hand-made `sysctl -w` is gone at the next boot unless something sets it).
//!
//! systemd-sysctl reads /etc/sysctl.d, /run/sysctl.d and /usr/lib/sysctl.d; on recent Debian
//! it no longer reads /etc/sysctl.conf, which is why the usual advice (edit sysctl.conf) would not
//! survive a
//! reboot there. tunegate only ever writes its own file, recognised by its first line.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::Journal;
use super::plan::Persistable;
use crate::host::{Host, files};

/// The drop-in's file name. 60 sorts after distribution defaults (10-, 50-) and before the
/// 99- files operators conventionally use for their own overrides, which therefore win.
pub const DROPIN_NAME: &str = "60-tunegate.conf";

/// The first line of every drop-in tunegate writes; a file without it is not ours.
pub(crate) const MARKER: &str = "# Written by tunegate";

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

/// What the drop-in holds, one `key = value` line each, in this order: every key of the
/// profile this host can set, at the value live now raised to what the profile asks (so never
/// lower than the host has: an operator's higher value is kept); every other key an earlier run
/// raised (the journal); every other key an earlier drop-in of ours held (so a run with another
/// profile never drops what a previous one persisted).
pub fn lines(
    host: &Host,
    persistable: &[Persistable],
    journal: &Journal,
    earlier: &Path,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut add = |key: String, value: String| {
        if !out.iter().any(|(k, _)| *k == key) {
            out.push((key, value));
        }
    };
    for p in persistable {
        let live = host
            .read_sysctl(&p.key)
            .ok()
            .flatten()
            .and_then(|raw| p.shape.parse_live(&raw).ok());
        if let Some(live) = live {
            add(p.key.dotted(), p.shape.raised(&live, &p.wanted).to_string());
        }
    }
    for e in &journal.entries {
        add(e.key.clone(), e.applied.clone());
    }
    if let Ok(text) = std::fs::read_to_string(earlier)
        && text.starts_with(MARKER)
    {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some((k, v)) = line.split_once('=') {
                add(k.trim().to_string(), v.trim().to_string());
            }
        }
    }
    out
}

/// Writes the drop-in (atomically), holding `lines`.
pub fn write(path: &Path, lines: &[(String, String)], profile: &str) -> anyhow::Result<PathBuf> {
    let mut text = format!(
        "{MARKER}; do not edit. Every key of profile {profile} this host can set, at the value\n\
         # live when written (what the profile asks, or the host's own higher value), and what\n\
         # earlier runs persisted: systemd-sysctl applies it at boot, so the host passes the\n\
         # profile after a reboot. `tunegate revert` removes this file and puts back the values\n\
         # tunegate changed. Put your own settings in a file of your own, e.g. 99-local.conf.\n"
    );
    for (key, value) in lines {
        text.push_str(&format!("{key} = {value}\n"));
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
