//! Will the host still pass after a reboot? Each profile key against the sysctl configuration
//! the next boot applies (`host::boot`): `persist.missing.KEY` when the live value passes but
//! nothing sets it at boot and the kernel's own default would not pass; `persist.overridden.KEY`
//! when the file the boot ends with for the key sets a value that fails the profile (named by
//! file and line); `persist.KEY` (pass) otherwise.
//!
//! Warnings by default: a host that passes now serves now. A profile with
//! `boot_persistence: fail` makes them failures, for provisioning pipelines that must not hand
//! over a host that breaks at its next reboot.

use std::path::Path;

use super::{Finding, Subject, Verdict};
use crate::host::boot::BootConfig;
use crate::profile::Profile;
use crate::tunables::{self, Shape, SysctlKey, Value};

/// The persistence findings for every sysctl key of `profile`, given the live findings of the
/// same run (`findings`, for each key's live value and verdict). Inside a network namespace of
/// its own (a container), host-global keys are skipped: this root's boot does not set them,
/// the host's does (their `sysctl.*` findings already say to check them there).
pub fn checks(
    profile: &Profile,
    findings: &[Finding],
    boot: &BootConfig,
    initial_netns: bool,
) -> Vec<Finding> {
    let severity = if profile.boot_persistence_fails {
        Verdict::Fail
    } else {
        Verdict::Warn
    };
    let mut out = Vec::new();
    for f in findings {
        let Subject::Sysctl {
            key,
            shape,
            live,
            wanted,
            ..
        } = &f.subject
        else {
            continue;
        };
        if f.scope == crate::tunables::Scope::HostGlobal && !initial_netns {
            continue;
        }
        let live_passes = shape.satisfied(live, wanted);
        let apply = format!("tunegate apply --profile {} --persist", profile.name);
        if let Some(finding) =
            check_key(key, *shape, live_passes, wanted, boot, severity, f, &apply)
        {
            out.push(finding);
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn check_key(
    key: &SysctlKey,
    shape: Shape,
    live_passes: bool,
    wanted: &Value,
    boot: &BootConfig,
    severity: Verdict,
    live: &Finding,
    apply: &str,
) -> Option<Finding> {
    let mut f = Finding {
        wanted: live.wanted.clone(),
        rule: live.rule.clone(),
        why: "What the next boot sets: a value that passes only until the next reboot (a \
              `sysctl -w` by hand, an edit to a file the boot does not read) fails the profile \
              again on a host nobody touched."
            .into(),
        source: live.source.clone(),
        ..Finding::new(
            format!("persist.{key}"),
            format!("{key} at boot"),
            live.scope,
        )
    };
    match boot.effective(key) {
        Some(a) => {
            let value = a.value.clone().unwrap_or_default();
            let parsed = shape.parse_live(&value);
            f.current = Some(format!("{} ({})", tunables::normalise(&value), a.place()));
            if parsed.is_ok_and(|v| shape.satisfied(&v, wanted)) {
                return Some(f);
            }
            f.id = format!("persist.overridden.{key}");
            f.verdict = severity;
            let ours = a
                .file
                .file_name()
                .is_some_and(|n| n == crate::apply::DROPIN_NAME);
            f.fix = if ours {
                format!("{apply} (it rewrites {})", a.file.display())
            } else {
                format!(
                    "change or remove line {} of {}: the boot applies it last for this key \
                     (tunegate never edits a file it did not create)",
                    a.line,
                    a.file.display()
                )
            };
            f.detail = Some(overridden_detail(key, boot, a));
            Some(f)
        }
        None if !live_passes => None, // the live finding fails already; apply --persist fixes both
        None => {
            let default = tunables::lookup(&key.dotted()).and_then(|t| t.boot_default);
            let default_passes = default
                .and_then(|d| shape.parse_live(d).ok())
                .is_some_and(|d| shape.satisfied(&d, wanted));
            if default_passes {
                f.current = Some(format!(
                    "not set at boot; the kernel's default {:?} passes",
                    default.unwrap_or_default()
                ));
                return Some(f);
            }
            f.id = format!("persist.missing.{key}");
            f.verdict = severity;
            f.current = Some("not set by any sysctl.d file".into());
            f.detail = Some(missing_detail(key, boot, default));
            f.fix = format!(
                "{apply}, or `{key} = {}` in a file of your own in /etc/sysctl.d/",
                live.current.as_deref().unwrap_or(&live.wanted)
            );
            Some(f)
        }
    }
}

fn overridden_detail(
    key: &SysctlKey,
    boot: &BootConfig,
    last: &crate::host::boot::Assignment,
) -> String {
    let earlier: Vec<String> = boot
        .assignments
        .iter()
        .filter(|a| {
            a.value.is_some() && !a.glob && a.path == last.path && a != &last && a.file != last.file
        })
        .map(|a| {
            format!(
                "{} = {} ({})",
                key,
                a.value.as_deref().unwrap_or(""),
                a.place()
            )
        })
        .collect();
    let mut s = format!(
        "after a reboot {key} is {} from {}",
        tunables::normalise(last.value.as_deref().unwrap_or("")),
        last.place()
    );
    if !earlier.is_empty() {
        s.push_str(&format!(", applied after {}", earlier.join(", ")));
    }
    s
}

fn missing_detail(key: &SysctlKey, boot: &BootConfig, default: Option<&str>) -> String {
    let mut s = match default {
        Some(d) => format!("after a reboot it is the kernel's default {d:?}, which fails"),
        None => "after a reboot it is the kernel's default, which depends on the kernel and \
                 memory and is not known to pass"
            .into(),
    };
    if let Some(a) = boot.unread(key) {
        s.push_str(&format!(
            "; {} sets it, but nothing reads /etc/sysctl.conf at boot here: systemd-sysctl reads \
             only sysctl.d (Debian 12's procps links the file in as \
             /etc/sysctl.d/99-sysctl.conf; that link is missing)",
            a.place()
        ));
    }
    s
}

/// The sysctl.d directory standing for /etc/sysctl.d: the `--sysctl-dir` when it is not the
/// default, else the host root's /etc/sysctl.d.
pub fn etc_dir(root: &Path, sysctl_dir: &Path) -> std::path::PathBuf {
    if sysctl_dir == Path::new(crate::apply::DEFAULT_SYSCTL_DIR) {
        root.join("etc/sysctl.d")
    } else {
        sysctl_dir.to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake;

    /// A fake host whose live values pass `PROFILE` (somaxconn set by hand, port range too),
    /// with the given sysctl.d files under its root.
    fn run(files: &[(&str, &str)], profile_extra: &str) -> Vec<Finding> {
        let (d, host) = fake::netns_tree(&[
            ("net/core/somaxconn", "65535\n"),
            ("net/ipv4/ip_local_port_range", "1024\t65535\n"),
        ]);
        for (rel, text) in files {
            let p = d.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            if let Some(target) = text.strip_prefix("-> ") {
                std::os::unix::fs::symlink(target, &p).unwrap();
            } else {
                std::fs::write(&p, text).unwrap();
            }
        }
        let p = d.path().join("p.yaml");
        std::fs::write(
            &p,
            format!(
                "{profile_extra}sysctl:\n  net.core.somaxconn: 65535\n  \
                 net.ipv4.ip_local_port_range: \"1024 65535\"\n  \
                 net.ipv4.ip_local_reserved_ports: \"\"\n  net.ipv4.tcp_rmem: \"4096 87380 6291456\"\n"
            ),
        )
        .unwrap();
        let profile = crate::profile::load(p.to_str().unwrap(), false).unwrap();
        let mut report = super::super::check(&profile, &host, &[]).unwrap();
        super::super::add_boot_checks(&mut report, &profile, &host, Path::new("/etc/sysctl.d"));
        report
            .findings
            .into_iter()
            .filter(|f| f.id.starts_with("persist."))
            .collect()
    }

    fn by_key<'a>(f: &'a [Finding], key: &str) -> &'a Finding {
        f.iter()
            .find(|x| x.key == format!("{key} at boot"))
            .unwrap_or_else(|| panic!("no persist finding for {key}: {f:#?}"))
    }

    #[test]
    fn a_value_set_by_hand_is_missing_at_boot_unless_its_default_passes() {
        let f = run(&[], "");
        let s = by_key(&f, "net.core.somaxconn");
        assert_eq!(
            (s.id.as_str(), s.verdict),
            ("persist.missing.net.core.somaxconn", Verdict::Warn)
        );
        assert!(
            s.detail
                .as_ref()
                .unwrap()
                .contains("kernel's default \"4096\", which fails"),
            "{s:#?}"
        );
        assert!(
            s.fix.contains("tunegate apply --profile p --persist"),
            "{}",
            s.fix
        );
        assert!(s.fix.contains("`net.core.somaxconn = 65535`"), "{}", s.fix);
        // The kernel's default empty set passes an empty reservation.
        let r = by_key(&f, "net.ipv4.ip_local_reserved_ports");
        assert_eq!(
            (r.id.as_str(), r.verdict),
            ("persist.net.ipv4.ip_local_reserved_ports", Verdict::Pass)
        );
        // A memory-derived default is not known to pass.
        let t = by_key(&f, "net.ipv4.tcp_rmem");
        assert_eq!(t.id, "persist.missing.net.ipv4.tcp_rmem");
        assert!(t.detail.as_ref().unwrap().contains("not known to pass"));
    }

    #[test]
    fn the_last_file_for_a_key_decides_and_is_named() {
        let ours = "etc/sysctl.d/60-tunegate.conf";
        let body = "# Written by tunegate\nnet.core.somaxconn = 65535\nnet.ipv4.ip_local_port_range = 1024 65535\n";
        let f = run(&[(ours, body)], "");
        assert_eq!(by_key(&f, "net.core.somaxconn").verdict, Verdict::Pass);
        assert!(
            by_key(&f, "net.core.somaxconn")
                .current
                .as_ref()
                .unwrap()
                .contains("60-tunegate.conf:2")
        );

        // 99-local.conf, applied later, lowers it: named with its line and what it overrides.
        let f = run(
            &[
                (ours, body),
                (
                    "etc/sysctl.d/99-local.conf",
                    "\n\nnet.core.somaxconn = 1024\n",
                ),
            ],
            "",
        );
        let s = by_key(&f, "net.core.somaxconn");
        assert_eq!(
            (s.id.as_str(), s.verdict),
            ("persist.overridden.net.core.somaxconn", Verdict::Warn)
        );
        assert!(s.current.as_ref().unwrap().starts_with("1024 ("), "{s:#?}");
        assert!(
            s.fix.contains("line 3 of") && s.fix.contains("99-local.conf"),
            "{}",
            s.fix
        );
        assert!(
            s.detail
                .as_ref()
                .unwrap()
                .contains("applied after net.core.somaxconn = 65535"),
            "{s:#?}"
        );
        assert_eq!(
            by_key(&f, "net.ipv4.ip_local_port_range").verdict,
            Verdict::Pass
        );

        // Our drop-in masked by a same-named file in a higher-precedence directory: tunegate's
        // file in /usr/lib would be masked by /etc's; here /etc's is ours and /run's is masked.
        let f = run(
            &[
                (ours, "net.core.somaxconn = 100\n"),
                ("run/sysctl.d/60-tunegate.conf", body),
            ],
            "",
        );
        let s = by_key(&f, "net.core.somaxconn");
        assert_eq!(s.id, "persist.overridden.net.core.somaxconn");
        assert!(
            s.fix
                .starts_with("tunegate apply --profile p --persist (it rewrites"),
            "{}",
            s.fix
        );

        // A glob assignment counts; a profile can make these failures.
        let f = run(
            &[("usr/lib/sysctl.d/10-x.conf", "net.core.somax* = 10\n")],
            "boot_persistence: fail\n",
        );
        let s = by_key(&f, "net.core.somaxconn");
        assert_eq!(
            (s.id.as_str(), s.verdict),
            ("persist.overridden.net.core.somaxconn", Verdict::Fail)
        );
    }

    #[test]
    fn sysctl_conf_not_linked_in_is_said_to_be_unread() {
        let conf = ("etc/sysctl.conf", "net.core.somaxconn = 65535\n");
        let f = run(&[conf], "");
        let s = by_key(&f, "net.core.somaxconn");
        assert_eq!(s.id, "persist.missing.net.core.somaxconn");
        assert!(
            s.detail
                .as_ref()
                .unwrap()
                .contains("nothing reads /etc/sysctl.conf at boot"),
            "{s:#?}"
        );
        let f = run(
            &[conf, ("etc/sysctl.d/99-sysctl.conf", "-> ../sysctl.conf")],
            "",
        );
        let s = by_key(&f, "net.core.somaxconn");
        assert_eq!(s.verdict, Verdict::Pass, "{s:#?}");
        assert!(
            s.current
                .as_ref()
                .unwrap()
                .contains("99-sysctl.conf:1 (-> "),
            "{s:#?}"
        );
    }
}
