//! Plan -> journaled, verified, transactional writes; revert; persistence to sysctl.d.
//!
//! Order of events in `apply`: lock the state directory, clear temp files a killed run left,
//! check the drop-in can be written, re-read every planned key (the plan was made before the
//! lock: another apply may have raised a value since, and it must not be lowered back), journal
//! the previous values and the drop-in about to be written (fsynced), then write each key, read
//! it back and compare parsed values, then write the drop-in. The first failure rolls back every
//! key this run wrote, in reverse, and the journal returns to what it was. Nothing is ever
//! lowered: every target is the smallest raise of the value live under the lock.

pub mod journal;
mod persist;
pub mod plan;
mod revert;
pub mod unit;

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use journal::Journal;
pub use persist::DROPIN_NAME;
pub use plan::{Plan, Step};
pub use revert::{RevertOutcome, revert};

use crate::error::UsageError;
use crate::host::Host;
use crate::host::files::{self, StateLock};

/// Where apply keeps its state and writes its drop-in.
#[derive(Clone, Debug)]
pub struct Paths {
    pub state_dir: PathBuf,
    pub sysctl_dir: PathBuf,
}

/// A write that went through and was read back.
#[derive(Clone, Debug, Serialize)]
pub struct Written {
    pub key: String,
    pub from: String,
    pub to: String,
}

/// The write that failed.
#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    pub key: String,
    pub step: usize,
    pub error: String,
}

/// A key put back after a failure, or one that could not be.
#[derive(Clone, Debug, Serialize)]
pub struct Restore {
    pub key: String,
    pub value: String,
    pub error: Option<String>,
}

/// What happened to RLIMIT_NOFILE of this process.
#[derive(Clone, Debug, Serialize)]
pub struct NofileOutcome {
    pub wanted: u64,
    pub soft: u64,
    pub hard: u64,
    /// Why the hard limit could not be raised to `wanted`, with the errno.
    pub hard_error: Option<String>,
}

/// A planned key that another writer changed between the plan and the lock, so that it already
/// satisfies the profile: left alone.
#[derive(Clone, Debug, Serialize)]
pub struct Superseded {
    pub key: String,
    /// What the plan saw.
    pub planned_from: String,
    /// What was live under the lock.
    pub now: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    pub written: Vec<Written>,
    pub superseded: Vec<Superseded>,
    pub failure: Option<Failure>,
    pub restored: Vec<Restore>,
    pub nofile: Option<NofileOutcome>,
    pub persisted: Option<PathBuf>,
    pub journal: Option<PathBuf>,
    /// `--unit`: the user's service's LimitNOFILE drop-in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<unit::UnitOutcome>,
}

/// Carries out a plan. Errors before the first write (lock, journal, drop-in ownership) leave
/// the host untouched.
pub fn apply(
    plan: &Plan,
    host: &Host,
    paths: &Paths,
    profile: &str,
    persist: bool,
) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::default();
    let _lock = StateLock::acquire(&paths.state_dir)?;
    let prior = own_journal(host, paths)?;
    files::remove_stale_temps(&paths.state_dir, journal::FILE_NAME);
    let dropin = paths.sysctl_dir.join(DROPIN_NAME);
    if persist {
        persist::check_owned(&dropin)?;
        files::remove_stale_temps(&paths.sysctl_dir, DROPIN_NAME);
    }
    let steps = replan(host, &plan.steps, &mut outcome.superseded);

    // The namespace's id as it is now (a container's system namespace has a new one after
    // each reboot: `Journal::belongs_to`).
    let mut journal = prior.clone().unwrap_or_default();
    journal.version = journal::VERSION;
    journal.netns = host.netns_id();
    journal.system_netns = host.in_system_netns();
    for step in &steps {
        journal.record(
            &step.key.dotted(),
            &step.from_raw,
            &step.to.to_string(),
            profile,
        );
    }
    if persist {
        // Journal before write, for the drop-in too: a kill after the rename must not leave a
        // drop-in that no journal knows about (revert would miss it and the next boot would
        // apply the profile again).
        journal.dropin = Some(dropin.clone());
    }
    if !steps.is_empty() || (persist && prior.as_ref() != Some(&journal)) {
        journal.save(&paths.state_dir)?;
        outcome.journal = Some(Journal::path(&paths.state_dir));
    }

    let done = write_all(host, &steps, &mut outcome);
    if outcome.failure.is_some() {
        roll_back(host, &done, &journal, prior, paths, &mut outcome)?;
    } else if persist {
        let lines = persist::lines(host, &plan.persistable, &journal, &dropin);
        outcome.persisted = Some(persist::write(&dropin, &lines, profile)?);
    }
    outcome.nofile = raise_nofile(host, plan);
    Ok(outcome)
}

/// The journal in the state directory, refused if it belongs to another network namespace.
fn own_journal(host: &Host, paths: &Paths) -> anyhow::Result<Option<Journal>> {
    let netns = host.netns_id();
    let prior = Journal::load(&paths.state_dir)?;
    if let Some(j) = &prior
        && !j.belongs_to(&netns, host.in_system_netns())
    {
        return Err(UsageError(format!(
            "the journal in {} belongs to network namespace {} but this process is in {}; \
             revert there first, or use another --state-dir",
            paths.state_dir.display(),
            j.netns.as_deref().unwrap_or("?"),
            netns.as_deref().unwrap_or("?")
        ))
        .into());
    }
    Ok(prior)
}

/// Writes each step and reads it back, stopping at the first failure (recorded in `outcome`);
/// returns the steps that went through.
fn write_all<'a>(host: &Host, steps: &'a [Step], outcome: &mut Outcome) -> Vec<&'a Step> {
    let mut done = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        match write_verified(host, step, &step.to) {
            Ok(()) => {
                outcome.written.push(Written {
                    key: step.key.dotted(),
                    from: step.from.to_string(),
                    to: step.to.to_string(),
                });
                done.push(step);
            }
            Err(error) => {
                outcome.failure = Some(Failure {
                    key: step.key.dotted(),
                    step: i + 1,
                    error,
                });
                break;
            }
        }
    }
    done
}

/// After a failure: puts back what this run wrote, in reverse, and saves the journal as the
/// previous one plus only what could not be put back.
fn roll_back(
    host: &Host,
    done: &[&Step],
    journal: &Journal,
    prior: Option<Journal>,
    paths: &Paths,
    outcome: &mut Outcome,
) -> anyhow::Result<()> {
    let mut kept = prior.unwrap_or(Journal {
        version: journal::VERSION,
        netns: host.netns_id(),
        ..Journal::default()
    });
    for step in done.iter().rev() {
        let result = write_verified(host, step, &step.from);
        if result.is_err()
            && let Some(e) = journal.entry(&step.key.dotted())
            && kept.entry(&e.key).is_none()
        {
            kept.entries.push(e.clone());
        }
        outcome.restored.push(Restore {
            key: step.key.dotted(),
            value: step.from.to_string(),
            error: result.err(),
        });
    }
    // Keys never written kept their values, so the previous journal plus whatever could not be
    // put back is exactly the truth.
    kept.save(&paths.state_dir)
}

/// The plan's steps against the host as it is now, under the lock. A key still at the value
/// the plan saw keeps its step; one another writer changed meanwhile gets a new step from its
/// live value (the smallest raise that satisfies the profile), or none if it already satisfies
/// it. So a slow apply can never write a planned value below what a faster one raised.
fn replan(host: &Host, planned: &[Step], superseded: &mut Vec<Superseded>) -> Vec<Step> {
    let mut steps = Vec::with_capacity(planned.len());
    for step in planned {
        let live = host
            .read_sysctl(&step.key)
            .ok()
            .flatten()
            .and_then(|raw| step.shape.parse_live(&raw).ok().map(|v| (raw, v)));
        let Some((raw, live)) = live else {
            steps.push(step.clone()); // unreadable now: the write and read-back will say why
            continue;
        };
        if live == step.from {
            steps.push(step.clone());
        } else if step.shape.satisfied(&live, &step.wanted) {
            superseded.push(Superseded {
                key: step.key.dotted(),
                planned_from: step.from.to_string(),
                now: live.to_string(),
            });
        } else {
            steps.push(Step {
                to: step.shape.raised(&live, &step.wanted),
                from_raw: raw,
                from: live,
                ..step.clone()
            });
        }
    }
    steps
}

/// Writes `value` and reads it back: the kernel may refuse a value (EINVAL), clamp it, or
/// reinterpret it (leading zeros are octal), so success means the parsed read-back equals what
/// we meant, not that write(2) returned.
fn write_verified(host: &Host, step: &Step, value: &crate::tunables::Value) -> Result<(), String> {
    host.write_sysctl(&step.key, &value.to_string())
        .map_err(|e| format!("write of \"{value}\" failed: {e}"))?;
    let back = host
        .read_sysctl(&step.key)
        .map_err(|e| format!("read-back failed: {e:#}"))?
        .ok_or("read-back failed: key vanished")?;
    let parsed = step
        .shape
        .parse_live(&back)
        .map_err(|e| format!("read-back unparseable: {e}"))?;
    if parsed != *value {
        return Err(format!(
            "read back {:?} after writing {:?}",
            crate::tunables::normalise(&back),
            value.to_string()
        ));
    }
    Ok(())
}

/// Raises this process's RLIMIT_NOFILE as far as it can go: the hard limit to the wanted value
/// (needs CAP_SYS_RESOURCE and at most fs.nr_open), the soft one to min(wanted, hard).
/// `rlimit::increase_nofile_limit` would clamp silently; we say what we got and why.
fn raise_nofile(host: &Host, plan: &Plan) -> Option<NofileOutcome> {
    let change = plan.nofile?;
    let mut hard = change.hard;
    let mut hard_error = None;
    if change.hard < change.wanted {
        match host.set_nofile(change.soft.min(change.wanted), change.wanted) {
            Ok(()) => hard = change.wanted,
            Err(e) => {
                let errno = nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0));
                hard_error = Some(format!(
                    "setrlimit(RLIMIT_NOFILE, hard={}) failed with {errno:?} ({e})",
                    change.wanted
                ));
            }
        }
    }
    let soft = change.wanted.min(hard).max(change.soft);
    if let Err(e) = host.set_nofile(soft, hard) {
        hard_error.get_or_insert(format!("setrlimit(RLIMIT_NOFILE, soft={soft}) failed: {e}"));
    }
    let (soft, hard) = host.nofile().unwrap_or((change.soft, change.hard));
    Some(NofileOutcome {
        wanted: change.wanted,
        soft,
        hard,
        hard_error,
    })
}

/// Default state directory; the journal lives here.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tunegate";
/// Default sysctl.d directory for `--persist`.
pub const DEFAULT_SYSCTL_DIR: &str = "/etc/sysctl.d";

impl Paths {
    pub fn new(state_dir: Option<&Path>, sysctl_dir: Option<&Path>) -> Paths {
        Paths {
            state_dir: state_dir.map_or_else(|| DEFAULT_STATE_DIR.into(), Path::to_path_buf),
            sysctl_dir: sysctl_dir.map_or_else(|| DEFAULT_SYSCTL_DIR.into(), Path::to_path_buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake;
    use crate::preflight;

    fn setup(
        files: &[(&'static str, &'static str)],
        profile: &str,
    ) -> (tempfile::TempDir, Host, Plan, Paths) {
        let (d, host) = fake::tree(files);
        let p = d.path().join("p.yaml");
        std::fs::write(&p, profile).unwrap();
        let prof = crate::profile::load(p.to_str().unwrap(), false).unwrap();
        let report = preflight::check(&prof, &host, &[]).unwrap();
        let plan = Plan::from_report(&report);
        let paths = Paths::new(
            Some(&d.path().join("state")),
            Some(&d.path().join("sysctl.d")),
        );
        (d, host, plan, paths)
    }

    fn read(d: &tempfile::TempDir, rel: &str) -> String {
        std::fs::read_to_string(d.path().join("proc/sys").join(rel)).unwrap()
    }

    const FILES: &[(&str, &str)] = &[
        ("net/core/somaxconn", "4096\n"),
        ("net/ipv4/tcp_max_syn_backlog", "8192\n"),
        ("net/ipv4/tcp_wmem", "4096\t16384\t4194304\n"),
        ("net/ipv4/ip_local_port_range", "32768\t60999\n"),
        ("fs/nr_open", "1048576\n"),
    ];

    const PROFILE: &str = "sysctl:\n  net.core.somaxconn: 65535\n  net.ipv4.tcp_max_syn_backlog: 4096\n  net.ipv4.tcp_wmem: \"4096 65536 1048576\"\n  net.ipv4.ip_local_port_range: \"1024 65535\"\n";

    /// Points the fake tree's /proc/self/ns/net and /proc/1/ns/net at namespace ids, as the
    /// kernel's links read.
    fn namespaces(d: &tempfile::TempDir, own: &str, init: &str) {
        for (pid, id) in [("self", own), ("1", init)] {
            let dir = d.path().join("proc").join(pid).join("ns");
            std::fs::create_dir_all(&dir).unwrap();
            let _ = std::fs::remove_file(dir.join("net"));
            std::os::unix::fs::symlink(format!("net:[{id}]"), dir.join("net")).unwrap();
        }
    }

    /// A container's system namespace gets a new id at each of its boots; its journal, kept
    /// across the reboot, is still its own: apply and revert take it. A private namespace's
    /// journal is refused anywhere else, by id, as before (exit 2 with the ids).
    #[test]
    fn a_journal_of_the_systems_namespace_survives_a_reboot_a_private_ones_does_not() {
        let (d, host, plan, paths) = setup(FILES, PROFILE);
        namespaces(&d, "4026532177", "4026532177");
        apply(&plan, &host, &paths, "p", false).unwrap();
        let j = Journal::load(&paths.state_dir).unwrap().unwrap();
        assert!(j.system_netns && j.netns.as_deref() == Some("net:[4026532177]"));
        // The container rebooted: PID 1 and we are in a new namespace, at the kernel's values.
        namespaces(&d, "4026532182", "4026532182");
        for (rel, content) in FILES {
            std::fs::write(d.path().join("proc/sys").join(rel), content).unwrap();
        }
        let plan = Plan::from_report(&preflight::check(&load_p(&d), &host, &[]).unwrap());
        apply(&plan, &host, &paths, "p", false).unwrap();
        let j = Journal::load(&paths.state_dir).unwrap().unwrap();
        assert_eq!(
            j.netns.as_deref(),
            Some("net:[4026532182]"),
            "the id as it is now"
        );
        revert::revert(&host, &paths, false).unwrap();
        assert_eq!(read(&d, "net/core/somaxconn"), "4096\n");

        // A private namespace (ip netns, unshare -n): another one is refused.
        namespaces(&d, "4026532300", "4026531840");
        apply(&plan, &host, &paths, "p", false).unwrap();
        assert!(
            !Journal::load(&paths.state_dir)
                .unwrap()
                .unwrap()
                .system_netns
        );
        namespaces(&d, "4026532301", "4026531840");
        let e = revert::revert(&host, &paths, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("net:[4026532300]") && e.contains("net:[4026532301]"),
            "{e}"
        );
        let e = apply(&plan, &host, &paths, "p", false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("belongs to network namespace net:[4026532300]"),
            "{e}"
        );
        // Nor does the system's namespace take a private one's journal.
        namespaces(&d, "4026531840", "4026531840");
        assert!(revert::revert(&host, &paths, false).is_err());
    }

    fn load_p(d: &tempfile::TempDir) -> crate::profile::Profile {
        crate::profile::load(d.path().join("p.yaml").to_str().unwrap(), false).unwrap()
    }

    #[test]
    fn plan_is_raise_only() {
        let (_d, _h, plan, _p) = setup(FILES, PROFILE);
        let keys: Vec<_> = plan
            .steps
            .iter()
            .map(|s| (s.key.dotted(), s.to.to_string()))
            .collect();
        assert_eq!(
            keys,
            [
                ("net.core.somaxconn".into(), "65535".into()),
                ("net.ipv4.tcp_wmem".into(), "4096 65536 4194304".into()),
                ("net.ipv4.ip_local_port_range".into(), "1024 65535".into()),
            ] as [(String, String); 3]
        );
    }

    #[test]
    fn apply_then_revert_restores_exactly() {
        let (d, host, plan, paths) = setup(FILES, PROFILE);
        let out = apply(&plan, &host, &paths, "p", true).unwrap();
        assert!(out.failure.is_none());
        assert_eq!(read(&d, "net/core/somaxconn"), "65535\n");
        let j = Journal::load(&paths.state_dir).unwrap().unwrap();
        assert_eq!(
            j.entry("net.ipv4.tcp_wmem").unwrap().previous,
            "4096\t16384\t4194304"
        );
        let dropin = std::fs::read_to_string(paths.sysctl_dir.join(DROPIN_NAME)).unwrap();
        assert!(dropin.contains("net.core.somaxconn = 65535\n"), "{dropin}");

        let r = revert(&host, &paths, false).unwrap();
        assert!(r.failed.is_empty() && r.skipped.is_empty(), "{r:?}");
        assert_eq!(read(&d, "net/core/somaxconn"), "4096\n");
        assert_eq!(read(&d, "net/ipv4/tcp_wmem"), "4096\t16384\t4194304\n");
        assert!(!paths.sysctl_dir.join(DROPIN_NAME).exists());
        assert!(Journal::load(&paths.state_dir).unwrap().is_none());
    }

    /// The drop-in holds the whole profile: tcp_max_syn_backlog (8192, above the 4096 asked)
    /// passes untouched but is persisted at the host's higher value; a later run with another
    /// profile keeps what the first persisted; revert still restores only the journal.
    #[test]
    fn persist_writes_every_settable_key_of_the_profile_never_below_the_host() {
        let (d, host, plan, paths) = setup(FILES, PROFILE);
        assert!(
            plan.steps
                .iter()
                .all(|s| s.key.dotted() != "net.ipv4.tcp_max_syn_backlog")
        );
        apply(&plan, &host, &paths, "p", true).unwrap();
        let dropin = || std::fs::read_to_string(paths.sysctl_dir.join(DROPIN_NAME)).unwrap();
        let body: Vec<String> = dropin()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(String::from)
            .collect();
        assert_eq!(
            body,
            [
                "net.core.somaxconn = 65535",
                "net.ipv4.tcp_max_syn_backlog = 8192",
                "net.ipv4.tcp_wmem = 4096 65536 4194304",
                "net.ipv4.ip_local_port_range = 1024 65535",
            ],
            "{}",
            dropin()
        );
        assert!(dropin().contains("Every key of profile p this host can set"));

        // Another profile, naming only somaxconn: the first one's keys stay persisted.
        let p2 = d.path().join("p2.yaml");
        std::fs::write(&p2, "sysctl:\n  net.core.somaxconn: 1024\n").unwrap();
        let prof = crate::profile::load(p2.to_str().unwrap(), false).unwrap();
        let plan2 = Plan::from_report(&preflight::check(&prof, &host, &[]).unwrap());
        apply(&plan2, &host, &paths, "p2", true).unwrap();
        let text = dropin();
        for line in [
            "net.core.somaxconn = 65535\n",
            "net.ipv4.tcp_max_syn_backlog = 8192\n",
            "net.ipv4.ip_local_port_range = 1024 65535\n",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }

        let r = revert(&host, &paths, false).unwrap();
        assert!(r.failed.is_empty() && r.skipped.is_empty(), "{r:?}");
        assert_eq!(read(&d, "net/ipv4/tcp_max_syn_backlog"), "8192\n");
        assert_eq!(read(&d, "net/core/somaxconn"), "4096\n");
        assert!(!paths.sysctl_dir.join(DROPIN_NAME).exists());
    }

    #[test]
    fn revert_leaves_values_someone_changed_since() {
        let (d, host, plan, paths) = setup(FILES, PROFILE);
        apply(&plan, &host, &paths, "p", false).unwrap();
        std::fs::write(d.path().join("proc/sys/net/core/somaxconn"), "100000\n").unwrap();
        let r = revert(&host, &paths, false).unwrap();
        assert_eq!(r.skipped.len(), 1);
        assert_eq!(read(&d, "net/core/somaxconn"), "100000\n");
        assert_eq!(read(&d, "net/ipv4/ip_local_port_range"), "32768\t60999\n");
    }

    #[test]
    fn a_foreign_dropin_is_never_touched_and_nothing_changes() {
        let (d, host, plan, paths) = setup(FILES, PROFILE);
        std::fs::create_dir_all(&paths.sysctl_dir).unwrap();
        std::fs::write(paths.sysctl_dir.join(DROPIN_NAME), "vm.swappiness = 1\n").unwrap();
        let e = apply(&plan, &host, &paths, "p", true).unwrap_err();
        assert!(
            format!("{e:#}").contains("not written by tunegate"),
            "{e:#}"
        );
        assert_eq!(read(&d, "net/core/somaxconn"), "4096\n");
        assert!(Journal::load(&paths.state_dir).unwrap().is_none());
    }

    #[test]
    fn a_second_apply_keeps_the_first_previous_value() {
        let (d, host, plan, paths) = setup(FILES, "sysctl:\n  net.core.somaxconn: 8192\n");
        apply(&plan, &host, &paths, "a", false).unwrap();
        let prof_path = d.path().join("q.yaml");
        std::fs::write(&prof_path, "sysctl:\n  net.core.somaxconn: 65535\n").unwrap();
        let prof = crate::profile::load(prof_path.to_str().unwrap(), false).unwrap();
        let plan2 = Plan::from_report(&preflight::check(&prof, &host, &[]).unwrap());
        apply(&plan2, &host, &paths, "b", false).unwrap();
        let j = Journal::load(&paths.state_dir).unwrap().unwrap();
        assert_eq!(j.entries[0].previous, "4096");
        assert_eq!(j.entries[0].applied, "65535");
        revert(&host, &paths, false).unwrap();
        assert_eq!(read(&d, "net/core/somaxconn"), "4096\n");
    }

    /// Issue 13: a plan made before another apply raised a value must not lower it once it
    /// holds the lock. The plan here saw 4096 and 32768-60999; meanwhile "another apply" made
    /// them 65535 and 1024-65535 (satisfied: left alone), and tcp_wmem 4096 20000 4194304 (still
    /// short of the profile: raised from that, not from what the plan saw).
    #[test]
    fn a_plan_made_before_the_lock_never_lowers_what_another_writer_raised() {
        let (d, host, plan, paths) = setup(FILES, PROFILE);
        let set = |rel: &str, v: &str| std::fs::write(d.path().join("proc/sys").join(rel), v);
        set("net/core/somaxconn", "65535\n").unwrap();
        set("net/ipv4/ip_local_port_range", "1024\t65535\n").unwrap();
        set("net/ipv4/tcp_wmem", "4096\t20000\t8388608\n").unwrap();
        let out = apply(&plan, &host, &paths, "p", false).unwrap();
        assert_eq!(read(&d, "net/core/somaxconn"), "65535\n");
        assert_eq!(read(&d, "net/ipv4/ip_local_port_range"), "1024\t65535\n");
        assert_eq!(read(&d, "net/ipv4/tcp_wmem"), "4096 65536 8388608\n");
        let left: Vec<_> = out.superseded.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(left, ["net.core.somaxconn", "net.ipv4.ip_local_port_range"]);
        let w = &out.written[0];
        assert_eq!(
            (w.key.as_str(), w.from.as_str(), w.to.as_str()),
            (
                "net.ipv4.tcp_wmem",
                "4096 20000 8388608",
                "4096 65536 8388608"
            )
        );
        // The journal records only what this run changed, with the value it found.
        let j = Journal::load(&paths.state_dir).unwrap().unwrap();
        assert_eq!(j.entries.len(), 1);
        assert_eq!(j.entries[0].previous, "4096\t20000\t8388608");
    }

    /// Issue 13: the drop-in is journaled before it exists, and revert removes a drop-in of
    /// ours even when the journal does not name it (cut short by a kill, or removed by hand).
    #[test]
    fn revert_removes_our_dropin_even_when_the_journal_does_not_name_it() {
        let (d, host, plan, paths) = setup(FILES, PROFILE);
        apply(&plan, &host, &paths, "p", true).unwrap();
        let dropin = paths.sysctl_dir.join(DROPIN_NAME);
        let mut j = Journal::load(&paths.state_dir).unwrap().unwrap();
        assert_eq!(j.dropin.as_ref(), Some(&dropin));
        j.dropin = None; // what a kill between the rename and the journal used to leave
        j.save(&paths.state_dir).unwrap();
        std::fs::write(
            paths.sysctl_dir.join(".60-tunegate.conf.tmp.1234567"),
            "half",
        )
        .unwrap();
        let r = revert(&host, &paths, false).unwrap();
        assert_eq!(r.dropin_removed.as_ref(), Some(&dropin));
        assert!(!dropin.exists());
        assert_eq!(r.temp_files_removed.len(), 1, "{r:?}");
        assert_eq!(std::fs::read_dir(&paths.sysctl_dir).unwrap().count(), 0);
        assert_eq!(read(&d, "net/core/somaxconn"), "4096\n");
        // With no journal at all, our drop-in still goes; someone else's file never does.
        apply(&plan, &host, &paths, "p", true).unwrap();
        std::fs::remove_file(Journal::path(&paths.state_dir)).unwrap();
        let r = revert(&host, &paths, false).unwrap();
        assert!(!r.had_journal && r.dropin_removed.is_some() && !dropin.exists());
        std::fs::write(&dropin, "vm.swappiness = 1\n").unwrap();
        let r = revert(&host, &paths, false).unwrap();
        assert!(r.failed.is_empty() && r.dropin_removed.is_none(), "{r:?}");
        assert_eq!(
            std::fs::read_to_string(&dropin).unwrap(),
            "vm.swappiness = 1\n"
        );
    }
}
