//! The journal: the values a host had before tunegate changed them, written (atomically, fsynced)
//! before the first change, so `tunegate revert` can restore them even after a crash mid-apply.
//!
//! Applying twice keeps the *first* previous value of each key: revert returns the host to what
//! it was before tunegate, not to what an earlier tunegate run left.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::host::files;

/// Bumped when the format changes incompatibly; older tunegate refuses newer journals.
pub const VERSION: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    pub version: u32,
    /// The network namespace the values belong to (`net:[inode]`); apply and revert refuse
    /// another one (`belongs_to`).
    pub netns: Option<String>,
    /// Whether that namespace was the system's own (PID 1's). A container's is created anew at
    /// each boot under a new id; its journal, kept across the reboot, is still its system's.
    #[serde(default)]
    pub system_netns: bool,
    pub entries: Vec<Entry>,
    /// The sysctl.d drop-in tunegate created, removed again by revert.
    pub dropin: Option<PathBuf>,
    /// systemd unit drop-ins tunegate created (`apply --unit`: LimitNOFILE=), removed again by
    /// revert.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unit_dropins: Vec<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Dotted sysctl key.
    pub key: String,
    /// Exactly what the kernel printed before tunegate's first change (trailing newline dropped).
    pub previous: String,
    /// What tunegate last wrote.
    pub applied: String,
    /// The profile that asked for it.
    pub profile: String,
    /// Seconds since the Unix epoch of the last write.
    pub at: u64,
}

/// The journal's file name in the state directory.
pub const FILE_NAME: &str = "journal.json";

impl Journal {
    /// Whether these values are the namespace's of a process in `netns`, `system` saying it
    /// shares PID 1's: the same id, or both the system's own (a container's namespace, and so
    /// its id, is new after each of its reboots; a host's initial one keeps its id). A private
    /// namespace (`ip netns`, `unshare -n`) must match by id: its values are nobody else's.
    pub fn belongs_to(&self, netns: &Option<String>, system: bool) -> bool {
        self.netns == *netns || (self.system_netns && system)
    }

    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(FILE_NAME)
    }

    /// Loads the journal; `Ok(None)` when there is none. A journal we cannot read is an error,
    /// never silently replaced: it may hold the only record of an operator's values.
    pub fn load(state_dir: &Path) -> anyhow::Result<Option<Journal>> {
        let path = Journal::path(state_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let journal: Journal = serde_json::from_str(&text).with_context(|| {
            format!(
                "journal {} is damaged; it holds the values to restore, so tunegate will not \
                 overwrite it: inspect it, restore by hand, then remove it",
                path.display()
            )
        })?;
        if journal.version != VERSION {
            anyhow::bail!(
                "journal {} has version {}, this tunegate understands {VERSION}",
                path.display(),
                journal.version
            );
        }
        Ok(Some(journal))
    }

    /// Writes the journal atomically, or removes it when it holds nothing.
    pub fn save(&self, state_dir: &Path) -> anyhow::Result<()> {
        let path = Journal::path(state_dir);
        if self.entries.is_empty() && self.dropin.is_none() && self.unit_dropins.is_empty() {
            return files::remove_durably(&path);
        }
        let mut text = serde_json::to_string_pretty(self).expect("journal serialises");
        text.push('\n');
        files::write_atomic_owned(&path, text.as_bytes(), 0o600, files::owner_for(state_dir))
    }

    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// Records a change about to be made: the first previous value is kept.
    pub fn record(&mut self, key: &str, previous: &str, applied: &str, profile: &str) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match self.entries.iter_mut().find(|e| e.key == key) {
            Some(e) => {
                e.applied = applied.to_string();
                e.profile = profile.to_string();
                e.at = at;
            }
            None => self.entries.push(Entry {
                key: key.to_string(),
                previous: previous.trim_end_matches('\n').to_string(),
                applied: applied.to_string(),
                profile: profile.to_string(),
                at,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_previous_value_wins_and_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal {
            version: VERSION,
            netns: Some("net:[1]".into()),
            ..Journal::default()
        };
        j.record("net.core.somaxconn", "4096\n", "16384", "c10k");
        j.record("net.core.somaxconn", "16384\n", "65535", "c100k");
        assert_eq!(j.entries.len(), 1);
        assert_eq!(j.entries[0].previous, "4096");
        assert_eq!(j.entries[0].applied, "65535");
        j.save(d.path()).unwrap();
        assert_eq!(Journal::load(d.path()).unwrap().unwrap(), j);
        Journal {
            version: VERSION,
            ..Journal::default()
        }
        .save(d.path())
        .unwrap();
        assert!(Journal::load(d.path()).unwrap().is_none());
    }

    #[test]
    fn a_damaged_journal_is_an_error_not_a_blank() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(Journal::path(d.path()), "{not json").unwrap();
        let e = Journal::load(d.path()).unwrap_err();
        assert!(format!("{e:#}").contains("damaged"));
    }
}
