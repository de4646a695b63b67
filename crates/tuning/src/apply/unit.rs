//! `apply --unit NAME.service`: the user's own server gets the profile's RLIMIT_NOFILE through a
//! systemd drop-in, `/etc/systemd/system/NAME.service.d/60-tunegate.conf` with `LimitNOFILE=`.
//!
//! `ulimit -n` and /etc/security/limits.conf (what the write-up's readers raised) never reach a
//! service systemd starts; `LimitNOFILE=` does. The drop-in is journaled before it is written,
//! written atomically, never written over a file tunegate did not create, never lowers what the
//! unit already has, and never asks for more than the manager can grant (a unit asking for more
//! than PID 1's hard limit, without CAP_SYS_RESOURCE, fails to start: "Failed at step LIMITS").
//! `systemctl daemon-reload` is run (and said); the restart that makes it take effect is left to
//! the operator, since restarting someone's server is theirs to decide.

use std::path::PathBuf;

use serde::Serialize;

use super::{Journal, Paths, journal, persist};
use crate::error::UsageError;
use crate::host::files::{self, StateLock};
use crate::host::{Host, systemd};

/// What `apply --unit` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UnitOutcome {
    pub unit: String,
    /// The profile's limits.nofile.
    pub wanted: u64,
    /// LimitNOFILE (soft) the unit had before.
    pub before: Option<u64>,
    /// What the drop-in sets (the wanted value, or the most the manager can grant).
    pub set: Option<u64>,
    pub dropin: Option<PathBuf>,
    /// Why `set` is below `wanted`, when it is.
    pub capped: Option<String>,
    /// Why nothing was written, when nothing was.
    pub unchanged: Option<String>,
    /// Whether `systemctl daemon-reload` ran.
    pub reloaded: bool,
    /// LimitNOFILE (soft) systemd reports after the reload: what the next start gets.
    pub after: Option<u64>,
    /// A drop-in applied after ours that keeps the limit lower, when one does.
    pub overridden_by: Vec<PathBuf>,
    /// What the operator still has to do.
    pub next: Option<String>,
}

/// Writes the unit's drop-in (see the module doc). `unit` is a checked unit name.
pub fn apply_unit(
    host: &Host,
    paths: &Paths,
    unit: &str,
    wanted: u64,
    profile: &str,
) -> anyhow::Result<UnitOutcome> {
    let mut out = UnitOutcome {
        unit: unit.into(),
        wanted,
        ..UnitOutcome::default()
    };
    let live_systemd = host.root() == std::path::Path::new("/") && systemd::booted(host.root());
    let info = if live_systemd {
        let info = systemd::show(unit)?;
        if info.load_state == "not-found" {
            return Err(UsageError(format!("systemd has no unit {unit} on this host")).into());
        }
        Some(info)
    } else {
        None
    };
    out.before = info.as_ref().and_then(|i| i.nofile).map(|(soft, _)| soft);
    if let Some(before) = out.before
        && before >= wanted
    {
        out.unchanged = Some(format!(
            "{unit} already has LimitNOFILE {before}, at least the {wanted} asked (tunegate never lowers it)"
        ));
        return Ok(out);
    }
    let grant = systemd::grantable_nofile(host.root())?;
    let set = wanted.min(grant.limit);
    if set < wanted {
        out.capped = Some(format!(
            "the service manager can grant at most {} (its own hard limit; it lacks \
             CAP_SYS_RESOURCE): the unit gets {set}; {wanted} descriptors in one process need a \
             host that grants CAP_SYS_RESOURCE, or the load spread over several processes",
            grant.manager_hard
        ));
    }
    if out.before.is_some_and(|b| b >= set) {
        out.unchanged = Some(format!(
            "{unit} already has LimitNOFILE {}, the most the manager can grant",
            out.before.unwrap_or_default()
        ));
        return Ok(out);
    }

    let _lock = StateLock::acquire(&paths.state_dir)?;
    let path = systemd::dropin_path(host.root(), unit);
    persist::check_owned(&path)?;
    let dir = path.parent().expect("a drop-in has a directory");
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    files::remove_stale_temps(dir, crate::apply::DROPIN_NAME);
    let mut journal = Journal::load(&paths.state_dir)?.unwrap_or(Journal {
        version: journal::VERSION,
        netns: host.netns_id(),
        system_netns: host.in_system_netns(),
        ..Journal::default()
    });
    if !journal.unit_dropins.contains(&path) {
        // Journal before write: a kill after the rename must not leave a drop-in revert misses.
        journal.unit_dropins.push(path.clone());
        journal.save(&paths.state_dir)?;
    }
    let text = format!(
        "{}; do not edit. RLIMIT_NOFILE for {unit} from profile {profile}\n\
         # (`tunegate apply --unit`); `tunegate revert` removes this file. Put your own settings\n\
         # in a drop-in of your own.\n[Service]\nLimitNOFILE={set}\n",
        persist::MARKER
    );
    files::write_atomic(&path, text.as_bytes(), 0o644)?;
    out.set = Some(set);
    out.dropin = Some(path.clone());
    if live_systemd {
        systemd::daemon_reload()?;
        out.reloaded = true;
        let after = systemd::show(unit)?;
        out.after = after.nofile.map(|(soft, _)| soft);
        if out.after.is_some_and(|a| a < set) {
            let ours = after.drop_ins.iter().position(|p| p == &path);
            out.overridden_by = after
                .drop_ins
                .iter()
                .skip(ours.map_or(0, |i| i + 1))
                .cloned()
                .collect();
        }
    }
    out.next = Some(format!(
        "systemctl restart {unit}: a running process keeps the limit it started with"
    ));
    Ok(out)
}

/// Every unit drop-in of ours under the host root (marker line), whatever the journal says: one
/// may outlive a journal removed by hand.
pub fn ours_on_disk(host: &Host) -> Vec<PathBuf> {
    let base = host.root().join("etc/systemd/system");
    let Ok(entries) = std::fs::read_dir(&base) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path().join(crate::apply::DROPIN_NAME))
        .filter(|p| {
            p.parent()
                .and_then(|d| d.file_name())
                .is_some_and(|n| n.to_string_lossy().ends_with(".service.d"))
                && persist::check_owned(p).is_ok()
                && p.exists()
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake;

    /// A fake root whose PID 1 has a hard limit of 20000 and no CAP_SYS_RESOURCE.
    fn setup() -> (tempfile::TempDir, Host, Paths) {
        let (d, host) = fake::netns_tree(&[]);
        let p1 = d.path().join("proc/1");
        std::fs::create_dir_all(&p1).unwrap();
        std::fs::write(
            p1.join("limits"),
            "Limit  Soft Limit  Hard Limit  Units\nMax open files            1024                 20000                files     \n",
        )
        .unwrap();
        let status: String = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .map(|l| {
                if l.starts_with("CapEff:") {
                    "CapEff:\t0000000000000000\n".to_string()
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(p1.join("status"), status).unwrap();
        let paths = Paths::new(
            Some(&d.path().join("state")),
            Some(&d.path().join("sysctl.d")),
        );
        (d, host, paths)
    }

    #[test]
    fn the_dropin_is_journaled_capped_at_what_the_manager_grants_and_reverted() {
        let (d, host, paths) = setup();
        let out = apply_unit(&host, &paths, "web.service", 1_048_576, "c100k").unwrap();
        assert_eq!(out.set, Some(20000));
        assert!(
            out.capped.as_ref().unwrap().contains("at most 20000"),
            "{out:?}"
        );
        let path = d
            .path()
            .join("etc/systemd/system/web.service.d/60-tunegate.conf");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# Written by tunegate"), "{text}");
        assert!(text.ends_with("[Service]\nLimitNOFILE=20000\n"), "{text}");
        let j = Journal::load(&paths.state_dir).unwrap().unwrap();
        assert_eq!(j.unit_dropins, std::slice::from_ref(&path));

        let r = crate::apply::revert(&host, &paths, false).unwrap();
        assert_eq!(r.unit_dropins_removed, std::slice::from_ref(&path));
        assert!(
            !path.parent().unwrap().exists(),
            "the empty .d directory stays"
        );
        assert!(Journal::load(&paths.state_dir).unwrap().is_none());
    }

    #[test]
    fn a_file_of_someone_else_is_never_written_over_and_ours_outlive_a_lost_journal() {
        let (d, host, paths) = setup();
        let path = d
            .path()
            .join("etc/systemd/system/web.service.d/60-tunegate.conf");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "[Service]\nLimitNOFILE=500\n").unwrap();
        let e = apply_unit(&host, &paths, "web.service", 16384, "default").unwrap_err();
        assert!(
            format!("{e:#}").contains("was not written by tunegate"),
            "{e:#}"
        );
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "[Service]\nLimitNOFILE=500\n"
        );
        assert!(
            Journal::load(&paths.state_dir).unwrap().is_none(),
            "nothing journaled"
        );

        std::fs::remove_file(&path).unwrap();
        apply_unit(&host, &paths, "web.service", 16384, "default").unwrap();
        std::fs::remove_file(Journal::path(&paths.state_dir)).unwrap(); // lost by hand
        let r = crate::apply::revert(&host, &paths, false).unwrap();
        assert_eq!(r.unit_dropins_removed, std::slice::from_ref(&path));
        assert!(!path.exists());
    }
}
