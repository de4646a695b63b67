//! The user's own server (`--unit NAME.service` or `--pid PID`): what that process really got,
//! not what the host allows. The write-up's readers raised `ulimit -n` and limits.conf, which
//! never reach a service systemd starts, and Node listens with a backlog of 511 whatever
//! somaxconn says; these findings show both.
//!
//! - `server.nofile`: the process's soft RLIMIT_NOFILE (/proc/PID/limits) against the profile's
//!   `limits.nofile`; for a unit that is not running, what its next start is configured to get;
//! - `server.descriptors`: descriptors in use against that limit (warn above 80 %);
//! - `server.backlog.PORT`: each port it listens on (itself or its children; sock_diag, in this
//!   network namespace), the accept queue the kernel enforces, min(listen()'s backlog,
//!   somaxconn), against the profile's somaxconn (or the live one);
//! - `server.listening`: a warning when it holds no TCP listener here.

use std::collections::BTreeMap;

use super::{Finding, Verdict};
use crate::error::UsageError;
use crate::host::{Host, process, systemd};
use crate::profile::Profile;
use crate::tunables::{Scope, SysctlKey};

/// Whose limits to check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Pid(i32),
    /// A checked unit name (`systemd::unit_name`).
    Unit(String),
}

/// Share of the descriptor limit in use above which `server.descriptors` warns.
const BUSY_PERCENT: usize = 80;

fn finding(id: String, key: String) -> Finding {
    Finding::new(id, key, Scope::Process)
}

pub fn checks(profile: &Profile, host: &Host, target: &Target) -> anyhow::Result<Vec<Finding>> {
    let (pid, unit) = match target {
        Target::Pid(pid) => {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                return Err(UsageError(format!("no process {pid} on this host")).into());
            }
            (Some(*pid), None)
        }
        Target::Unit(name) => {
            let unit = systemd::show(name)?;
            if unit.load_state == "not-found" {
                return Err(UsageError(format!("systemd has no unit {name} on this host")).into());
            }
            (unit.main_pid, Some(unit))
        }
    };
    let who = match (&unit, pid) {
        (Some(u), Some(p)) => format!("{} (pid {p})", u.name),
        (Some(u), None) => format!("{} (not running)", u.name),
        (None, Some(p)) => format!("pid {p}"),
        (None, None) => unreachable!("a pid or a unit"),
    };
    let mut out = Vec::new();
    if let Some((wanted, source)) = &profile.nofile {
        let mut f = nofile(&who, *wanted, pid, unit.as_ref(), host)?;
        f.source = Some(source.to_string());
        out.push(f);
    }
    let Some(pid) = pid else {
        return Ok(out);
    };
    let (soft, _) = process::nofile_of(pid)?;
    out.push(descriptors(&who, pid, soft)?);
    out.extend(backlogs(&who, pid, profile, host)?);
    Ok(out)
}

fn nofile(
    who: &str,
    wanted: u64,
    pid: Option<i32>,
    unit: Option<&systemd::Unit>,
    host: &Host,
) -> anyhow::Result<Finding> {
    let mut f = finding("server.nofile".into(), format!("RLIMIT_NOFILE of {who}"));
    f.why = "Every connection is a descriptor: at the soft limit accept() fails with EMFILE \
             (the write-up's servers died at socket 1,025). `ulimit -n` and \
             /etc/security/limits.conf apply to login sessions, never to a service systemd \
             starts; LimitNOFILE= in its unit does."
        .into();
    f.wanted = wanted.to_string();
    let configured = unit.and_then(|u| u.nofile);
    let (soft, hard) = match (pid, configured) {
        (Some(p), _) => process::nofile_of(p)?,
        (None, Some(c)) => c,
        (None, None) => {
            f.verdict = Verdict::Warn;
            f.current = Some("not running, limit unknown".into());
            return Ok(f);
        }
    };
    f.current = Some(format!("soft {soft}, hard {hard}"));
    if pid.is_none() {
        f.detail = Some("not running: what its next start is configured to get".into());
    } else if let Some((c, _)) = configured
        && c != soft
    {
        f.detail = Some(format!(
            "its unit now says LimitNOFILE={c}: that takes effect when it restarts"
        ));
    }
    if soft >= wanted {
        return Ok(f);
    }
    f.verdict = Verdict::Fail;
    match unit {
        Some(u) => {
            f.changeable = true;
            let grant = systemd::grantable_nofile(host.root())?;
            f.fix = format!(
                "tunegate apply --unit {} (a drop-in with LimitNOFILE={}), then systemctl \
                 restart {}",
                u.name,
                wanted.min(grant.limit),
                u.name
            );
            if grant.limit < wanted {
                f.blocked_by = Some(format!(
                    "the service manager can grant at most {} (its own hard limit, without \
                     CAP_SYS_RESOURCE): {wanted} descriptors in one process cannot be had on \
                     this host; spread the connections over several processes",
                    grant.manager_hard
                ));
            }
        }
        None => {
            f.fix = format!(
                "raise it where the process is started: LimitNOFILE={wanted} in its systemd unit \
                 (tunegate apply --unit NAME writes it), or `ulimit -n {wanted}` in the script \
                 that starts it; a running process: prlimit --pid {} --nofile={wanted}:{} (up \
                 to its hard limit without CAP_SYS_RESOURCE)",
                pid.unwrap_or_default(),
                hard.max(wanted)
            );
        }
    }
    Ok(f)
}

fn descriptors(who: &str, pid: i32, soft: u64) -> anyhow::Result<Finding> {
    let used = process::fds_in_use(pid)?;
    let mut f = finding("server.descriptors".into(), format!("descriptors of {who}"));
    f.rule = "at most".into();
    f.why =
        "How close the process runs to its limit now: past it, every new connection fails.".into();
    let share = if soft == 0 || soft == u64::MAX {
        0
    } else {
        (used as u64 * 100 / soft) as usize
    };
    f.current = Some(format!("{used} in use of {soft} ({share} %)"));
    f.wanted = format!("under {BUSY_PERCENT} % of the soft limit");
    if share >= BUSY_PERCENT {
        f.verdict = Verdict::Warn;
        f.fix = "raise its RLIMIT_NOFILE (see server.nofile), or spread the load".into();
    }
    Ok(f)
}

fn backlogs(who: &str, pid: i32, profile: &Profile, host: &Host) -> anyhow::Result<Vec<Finding>> {
    let key = SysctlKey::parse("net.core.somaxconn").expect("static key");
    let live: Option<u32> = host.read_sysctl(&key)?.and_then(|v| v.trim().parse().ok());
    let asked: Option<u32> = profile
        .sysctl
        .iter()
        .find(|s| s.key == key)
        .and_then(|s| s.value.to_string().parse().ok());
    let listeners = process::listeners_of(pid)?;
    if listeners.is_empty() {
        let mut f = finding("server.listening".into(), format!("TCP listeners of {who}"));
        f.verdict = Verdict::Warn;
        f.current = Some("none in this network namespace".into());
        f.wanted = "at least one".into();
        f.why = "Its accept queues can only be checked where it listens.".into();
        f.fix = "run this preflight in the process's network namespace (nsenter -n -t PID)".into();
        return Ok(vec![f]);
    }
    let mut by_port: BTreeMap<u16, (u32, usize)> = BTreeMap::new();
    for l in &listeners {
        let e = by_port.entry(l.port).or_insert((u32::MAX, 0));
        e.0 = e.0.min(l.backlog);
        e.1 += 1;
    }
    let mut out = Vec::new();
    for (port, (backlog, sockets)) in by_port {
        let mut f = finding(
            format!("server.backlog.{port}"),
            format!("accept queue of {who} on port {port}"),
        );
        f.why = "A burst of connects beyond the accept queue is dropped (SYNs go unanswered, \
                 clients retry after a second or more): the queue is min(the backlog the \
                 program passed to listen(), net.core.somaxconn), fixed when it listens."
            .into();
        let want = asked.or(live).unwrap_or(4096);
        f.wanted = format!(
            "{want} (net.core.somaxconn{})",
            if asked.is_some() {
                " of the profile"
            } else {
                ""
            }
        );
        f.current = Some(format!("{backlog} ({sockets} socket(s))"));
        if backlog >= want {
            out.push(f);
            continue;
        }
        f.verdict = Verdict::Fail;
        let capped = live.is_some_and(|l| backlog >= l);
        if capped {
            f.detail = Some(format!(
                "capped by net.core.somaxconn {} when it listened",
                live.unwrap_or_default()
            ));
            f.fix = "tunegate apply (raises somaxconn), then restart the server: the cap is \
                     taken at listen()"
                .into();
        } else {
            f.detail = Some(format!(
                "the program asked listen() for {backlog} (Node's default is 511, Python's \
                 socketserver 5, Rust's std 128; Go asks for somaxconn)"
            ));
            f.fix = format!(
                "pass a backlog of at least {want} to listen() (Node: server.listen({{port, \
                 backlog: {want}}})), then restart it"
            );
        }
        out.push(f);
    }
    Ok(out)
}
