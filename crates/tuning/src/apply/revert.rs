//! `tunegate revert`: put back the journaled previous values and clear the journal.
//!
//! A key whose live value is no longer what tunegate wrote was changed by someone else since;
//! it is left alone (and reported) unless `--force`, because never clobbering an operator's
//! change matters more than a tidy revert.
//!
//! The drop-in goes too: the one the journal names and, even when the journal was cut short by
//! a kill (or is gone), one in the sysctl directory that carries tunegate's marker line. Temp
//! files killed writers left beside the journal and the drop-in are removed.

use std::path::PathBuf;

use serde::Serialize;

use super::{Journal, Paths, persist};
use crate::error::UsageError;
use crate::host::Host;
use crate::host::files::{self, StateLock};
use crate::tunables::{SysctlKey, shape_of};

#[derive(Clone, Debug, Default, Serialize)]
pub struct RevertOutcome {
    /// (key, from, to) put back.
    pub restored: Vec<(String, String, String)>,
    /// Already at the previous value.
    pub unchanged: Vec<String>,
    /// (key, live value, what tunegate wrote): changed by someone else since, left alone.
    pub skipped: Vec<(String, String, String)>,
    /// (key, error): could not be put back; still in the journal.
    pub failed: Vec<(String, String)>,
    pub dropin_removed: Option<std::path::PathBuf>,
    /// systemd unit drop-ins of `apply --unit` removed.
    pub unit_dropins_removed: Vec<std::path::PathBuf>,
    /// Whether `systemctl daemon-reload` ran after removing unit drop-ins.
    pub reloaded: bool,
    pub had_journal: bool,
    /// Temp files of killed writers that were removed.
    pub temp_files_removed: Vec<std::path::PathBuf>,
}

pub fn revert(host: &Host, paths: &Paths, force: bool) -> anyhow::Result<RevertOutcome> {
    let _lock = StateLock::acquire(&paths.state_dir)?;
    let mut out = RevertOutcome {
        temp_files_removed: files::remove_stale_temps(&paths.state_dir, super::journal::FILE_NAME),
        ..RevertOutcome::default()
    };
    let own_dropin = paths.sysctl_dir.join(persist::DROPIN_NAME);
    let Some(journal) = Journal::load(&paths.state_dir)? else {
        // No journal: nothing to restore, but a drop-in of ours may outlive one (a journal
        // removed by hand, an apply of an older tunegate killed before it journaled it).
        remove_dropins(&[(own_dropin, false)], &mut out, &mut None);
        remove_unit_dropins(host, &[], &mut out);
        return Ok(out);
    };
    out.had_journal = true;
    let netns = host.netns_id();
    if !journal.belongs_to(&netns, host.in_system_netns()) && !force {
        return Err(UsageError(format!(
            "the journal in {} was written in network namespace {}, this process is in {}; \
             run revert there (or --force to restore these values here anyway)",
            paths.state_dir.display(),
            journal.netns.as_deref().unwrap_or("?"),
            netns.as_deref().unwrap_or("?")
        ))
        .into());
    }
    let mut kept = Journal {
        entries: Vec::new(),
        dropin: None,
        unit_dropins: Vec::new(),
        ..journal.clone()
    };
    for entry in journal.entries.iter().rev() {
        let key = SysctlKey::parse(&entry.key)
            .map_err(|m| anyhow::anyhow!("journal holds a bad key: {m}"))?;
        let shape = shape_of(&key);
        let parse = |t: &str| {
            shape
                .parse_live(t)
                .map_err(|m| anyhow::anyhow!("{key}: {m}"))
        };
        let previous = parse(&entry.previous)?;
        let applied = parse(&entry.applied)?;
        let live = match host.read_sysctl(&key) {
            Ok(Some(raw)) => parse(&raw)?,
            Ok(None) => {
                out.failed
                    .push((entry.key.clone(), "key not visible from here".into()));
                kept.entries.insert(0, entry.clone());
                continue;
            }
            Err(e) => {
                out.failed.push((entry.key.clone(), format!("{e:#}")));
                kept.entries.insert(0, entry.clone());
                continue;
            }
        };
        if live == previous {
            out.unchanged.push(entry.key.clone());
            continue;
        }
        if live != applied && !force {
            out.skipped
                .push((entry.key.clone(), live.to_string(), applied.to_string()));
            continue;
        }
        let result = host
            .write_sysctl(&key, &entry.previous)
            .map_err(|e| format!("write failed: {e}"))
            .and_then(|()| match host.read_sysctl(&key) {
                Ok(Some(raw)) if parse(&raw).ok().as_ref() == Some(&previous) => Ok(()),
                Ok(other) => Err(format!("read back {other:?}")),
                Err(e) => Err(format!("read-back failed: {e:#}")),
            });
        match result {
            Ok(()) => {
                out.restored
                    .push((entry.key.clone(), live.to_string(), previous.to_string()))
            }
            Err(e) => {
                out.failed.push((entry.key.clone(), e));
                kept.entries.insert(0, entry.clone());
            }
        }
    }
    let mut dropins: Vec<(PathBuf, bool)> =
        journal.dropin.iter().map(|p| (p.clone(), true)).collect();
    if journal.dropin.as_ref() != Some(&own_dropin) {
        dropins.push((own_dropin, false));
    }
    remove_dropins(&dropins, &mut out, &mut kept.dropin);
    kept.unit_dropins = remove_unit_dropins(host, &journal.unit_dropins, &mut out);
    kept.save(&paths.state_dir)?;
    Ok(out)
}

/// Removes the unit drop-ins the journal names and any other of ours on disk; returns those
/// that could not be removed (they stay in the journal). Runs `systemctl daemon-reload` when
/// one went, so systemd forgets it (the running service keeps its limit until restarted).
fn remove_unit_dropins(host: &Host, named: &[PathBuf], out: &mut RevertOutcome) -> Vec<PathBuf> {
    let mut all: Vec<(PathBuf, bool)> = named.iter().map(|p| (p.clone(), true)).collect();
    for p in super::unit::ours_on_disk(host) {
        if !named.contains(&p) {
            all.push((p, false));
        }
    }
    let mut kept = Vec::new();
    for (path, named) in all {
        if let (Some(dir), Some(name)) = (path.parent(), path.file_name()) {
            out.temp_files_removed
                .extend(files::remove_stale_temps(dir, &name.to_string_lossy()));
        }
        if !named && persist::check_owned(&path).is_err() {
            continue;
        }
        match persist::remove(&path) {
            Ok(true) => {
                if let Some(dir) = path.parent() {
                    let _ = std::fs::remove_dir(dir); // only if empty: never someone else's
                }
                out.unit_dropins_removed.push(path);
            }
            Ok(false) => {}
            Err(e) => {
                out.failed
                    .push((path.display().to_string(), format!("{e:#}")));
                kept.push(path);
            }
        }
    }
    let live =
        host.root() == std::path::Path::new("/") && crate::host::systemd::booted(host.root());
    if !out.unit_dropins_removed.is_empty() && live {
        match crate::host::systemd::daemon_reload() {
            Ok(()) => out.reloaded = true,
            Err(e) => out
                .failed
                .push(("systemctl daemon-reload".into(), format!("{e:#}"))),
        }
    }
    kept
}

/// Removes each drop-in that is ours (marker line), and the temp files killed writers left
/// beside it. `named` says whether the journal named it: a named file that is no longer ours,
/// or cannot be removed, is a failure and stays in `keep`; a file only found by its name is left
/// alone, quietly, unless it carries our marker.
fn remove_dropins(
    dropins: &[(PathBuf, bool)],
    out: &mut RevertOutcome,
    keep: &mut Option<PathBuf>,
) {
    for (path, named) in dropins {
        if let (Some(dir), Some(name)) = (path.parent(), path.file_name()) {
            out.temp_files_removed
                .extend(files::remove_stale_temps(dir, &name.to_string_lossy()));
        }
        if !named && persist::check_owned(path).is_err() {
            continue;
        }
        match persist::remove(path) {
            Ok(true) => out.dropin_removed = Some(path.clone()),
            Ok(false) => {}
            Err(e) => {
                out.failed
                    .push((path.display().to_string(), format!("{e:#}")));
                *keep = Some(path.clone());
            }
        }
    }
}
