//! The host's service manager, for the user's own server (`--unit NAME.service`): what systemd
//! says about a unit (`systemctl show`: its main process, its configured LimitNOFILE), what the
//! manager itself can grant (PID 1's hard limit and whether it holds CAP_SYS_RESOURCE), the
//! unit's drop-in directory under /etc/systemd/system, and `systemctl daemon-reload`.
//!
//! `systemctl show` rather than D-Bus: it is what an operator would run, it needs no client
//! library, and its `key=value` output is stable. Every call is bounded (`--no-ask-password`,
//! a timeout on the child).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// CAP_SYS_RESOURCE's bit (linux/capability.h).
const CAP_SYS_RESOURCE: u32 = 24;
/// How long one systemctl call may take.
const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(20);

/// A unit name as given: `name.service` (the suffix added when missing), only the characters
/// systemd allows in unit names, never a path.
pub fn unit_name(given: &str) -> Result<String, String> {
    let name = if given.contains('.') {
        given.to_string()
    } else {
        format!("{given}.service")
    };
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c));
    if !name.ends_with(".service") || !ok_chars || name.starts_with('.') || name.len() > 255 {
        return Err(format!(
            "{given:?} is not a service unit name (NAME or NAME.service, letters, digits and \
             :-_.\\@ only)"
        ));
    }
    Ok(name)
}

/// What systemd says about a unit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unit {
    pub name: String,
    /// `loaded`, `not-found`, `masked`, ...
    pub load_state: String,
    /// `active`, `inactive`, `failed`, ...
    pub active_state: String,
    /// The main process while the unit runs.
    pub main_pid: Option<i32>,
    /// LimitNOFILE as configured (soft, hard); what the next start will get if the manager can
    /// grant it.
    pub nofile: Option<(u64, u64)>,
    /// The drop-ins systemd read for it.
    pub drop_ins: Vec<PathBuf>,
}

impl Unit {
    /// Parses `systemctl show -p LoadState,ActiveState,MainPID,LimitNOFILE,LimitNOFILESoft,
    /// DropInPaths` output.
    pub fn parse(name: &str, text: &str) -> Unit {
        let mut u = Unit {
            name: name.into(),
            ..Unit::default()
        };
        let (mut soft, mut hard) = (None, None);
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let limit = |v: &str| match v {
                "infinity" => Some(u64::MAX),
                v => v.parse().ok(),
            };
            match k {
                "LoadState" => u.load_state = v.into(),
                "ActiveState" => u.active_state = v.into(),
                "MainPID" => u.main_pid = v.parse().ok().filter(|p| *p > 0),
                "LimitNOFILE" => hard = limit(v),
                "LimitNOFILESoft" => soft = limit(v),
                "DropInPaths" => {
                    u.drop_ins = v.split_whitespace().map(PathBuf::from).collect();
                }
                _ => {}
            }
        }
        if let (Some(s), Some(h)) = (soft, hard) {
            u.nofile = Some((s, h));
        }
        u
    }
}

/// `systemctl show` for `name`. An error when systemctl cannot be run or systemd does not
/// answer (no systemd as PID 1); a unit systemd does not know comes back as `not-found`.
pub fn show(name: &str) -> anyhow::Result<Unit> {
    let out = systemctl(&[
        "show",
        "-p",
        "LoadState,ActiveState,MainPID,LimitNOFILE,LimitNOFILESoft,DropInPaths",
        "--",
        name,
    ])?;
    Ok(Unit::parse(name, &out))
}

/// `systemctl daemon-reload`, so a new or removed drop-in is read.
pub fn daemon_reload() -> anyhow::Result<()> {
    systemctl(&["daemon-reload"]).map(|_| ())
}

/// Whether this host runs systemd as its service manager (the check systemd's own tools make).
pub fn booted(root: &Path) -> bool {
    root.join("run/systemd/system").is_dir()
}

fn systemctl(args: &[&str]) -> anyhow::Result<String> {
    let mut child = Command::new("systemctl")
        .arg("--no-ask-password")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run systemctl")?;
    let start = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if start.elapsed() > SYSTEMCTL_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "systemctl {} did not answer within {} s",
                args.join(" "),
                SYSTEMCTL_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!(
            "systemctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The most RLIMIT_NOFILE the service manager can give a unit: its own hard limit, unless it
/// holds CAP_SYS_RESOURCE (then fs.nr_open, the kernel's ceiling). A unit asking for more fails
/// to start ("Failed at step LIMITS"), so a drop-in must not ask for more.
pub fn grantable_nofile(root: &Path) -> anyhow::Result<Grantable> {
    let status = root.join("proc/1/status");
    let status = <procfs::process::Status as procfs::FromRead>::from_file(&status)
        .with_context(|| format!("cannot read {}", status.display()))?;
    let cap = status.capeff & (1 << CAP_SYS_RESOURCE) != 0;
    let limits = std::fs::read_to_string(root.join("proc/1/limits"))
        .context("cannot read /proc/1/limits")?;
    let hard = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|h| match h {
            "unlimited" => Some(u64::MAX),
            h => h.parse().ok(),
        })
        .context("no open-files line in /proc/1/limits")?;
    let nr_open = std::fs::read_to_string(root.join("proc/sys/fs/nr_open"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    Ok(Grantable {
        limit: if cap { nr_open } else { hard },
        cap_sys_resource: cap,
        manager_hard: hard,
    })
}

/// What the manager can grant, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grantable {
    pub limit: u64,
    pub cap_sys_resource: bool,
    pub manager_hard: u64,
}

/// The drop-in tunegate writes for `unit` under the host root.
pub fn dropin_path(root: &Path, unit: &str) -> PathBuf {
    root.join("etc/systemd/system")
        .join(format!("{unit}.d"))
        .join(crate::apply::DROPIN_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_are_checked_and_completed() {
        assert_eq!(unit_name("web").unwrap(), "web.service");
        assert_eq!(unit_name("web@1.service").unwrap(), "web@1.service");
        for bad in ["../x.service", "a/b", "web.socket", ".service", "we b"] {
            assert!(unit_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn show_output_is_parsed() {
        let u = Unit::parse(
            "web.service",
            "LoadState=loaded\nActiveState=active\nMainPID=4242\nLimitNOFILE=524288\n\
             LimitNOFILESoft=1024\nDropInPaths=/etc/systemd/system/web.service.d/60-tunegate.conf /run/x.conf\n",
        );
        assert_eq!(u.main_pid, Some(4242));
        assert_eq!(u.nofile, Some((1024, 524288)));
        assert_eq!(u.drop_ins.len(), 2);
        let stopped = Unit::parse(
            "web.service",
            "LoadState=loaded\nMainPID=0\nLimitNOFILE=infinity\nLimitNOFILESoft=infinity\n",
        );
        assert_eq!(stopped.main_pid, None);
        assert_eq!(stopped.nofile, Some((u64::MAX, u64::MAX)));
    }

    #[test]
    fn the_manager_grants_its_own_hard_limit_without_cap_sys_resource() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("proc/1")).unwrap();
        std::fs::create_dir_all(d.path().join("proc/sys/fs")).unwrap();
        std::fs::write(d.path().join("proc/sys/fs/nr_open"), "1048576\n").unwrap();
        std::fs::write(
            d.path().join("proc/1/limits"),
            "Limit                     Soft Limit           Hard Limit           Units     \n\
             Max open files            1024                 20000                files     \n",
        )
        .unwrap();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let without: String = status
            .lines()
            .map(|l| {
                if l.starts_with("CapEff:") {
                    "CapEff:\t0000000000000000".to_string()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(d.path().join("proc/1/status"), format!("{without}\n")).unwrap();
        let g = grantable_nofile(d.path()).unwrap();
        assert_eq!(
            g,
            Grantable {
                limit: 20000,
                cap_sys_resource: false,
                manager_hard: 20000
            }
        );
        let with: String = status
            .lines()
            .map(|l| {
                if l.starts_with("CapEff:") {
                    "CapEff:\t000001ffffffffff".to_string()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(d.path().join("proc/1/status"), format!("{with}\n")).unwrap();
        assert_eq!(grantable_nofile(d.path()).unwrap().limit, 1048576);
    }
}
