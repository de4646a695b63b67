//! Preflight: a profile and the live host -> findings. Read-only.
//!
//! One finding per profile key, two for RLIMIT_NOFILE (soft and hard), and the derived checks
//! that follow from `target_connections` (see `derived`). Each finding says whether it can be
//! changed from here and, when not, exactly what blocks it, because an SRE inside a container
//! needs to know which lines to hand to whoever owns the host.

mod boot;
pub mod bus;
mod derived;
pub mod server;

use serde::Serialize;

use crate::host::{Access, Host};
use crate::profile::{Profile, Setting};
use crate::tunables::{self, NOFILE_WHY, Scope, Shape, SysctlKey, Value};

/// Pass, warn or fail. Ordered so that sorting puts failures first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Fail,
    Warn,
    Pass,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Fail => "FAIL",
            Verdict::Warn => "WARN",
            Verdict::Pass => "PASS",
        }
    }
}

/// One checked fact about the host. Serialised as documented in docs/preflight-json.md.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// Stable identifier: `sysctl.<dotted key>`, `limits.nofile.soft`, `derived.<name>`.
    pub id: String,
    /// What was checked, e.g. `net.core.somaxconn` or `RLIMIT_NOFILE (hard)`.
    pub key: String,
    /// The live value, whitespace-normalised; None when it cannot be read from here.
    pub current: Option<String>,
    /// The value the profile (or the derived rule) asks for.
    pub wanted: String,
    /// How current is compared with wanted ("at least", "range covers", ...).
    pub rule: String,
    pub verdict: Verdict,
    pub scope: Scope,
    /// Whether `tunegate apply` can change it from here.
    pub changeable: bool,
    /// Why it cannot be changed from here, when it cannot.
    pub blocked_by: Option<String>,
    /// Why it matters for holding connections.
    pub why: String,
    /// What to do about it.
    pub fix: String,
    /// More about this particular result.
    pub detail: Option<String>,
    /// The profile file and line that asked for it.
    pub source: Option<String>,
    /// What apply needs to act on it; not part of the JSON output.
    #[serde(skip)]
    pub subject: Subject,
}

impl Finding {
    /// A passing finding with nothing to do and nothing filled in: the checks that build
    /// findings of their own start from it and set what they found.
    pub fn new(id: String, key: String, scope: Scope) -> Finding {
        Finding {
            id,
            key,
            current: None,
            wanted: String::new(),
            rule: "at least".into(),
            verdict: Verdict::Pass,
            scope,
            changeable: false,
            blocked_by: None,
            why: String::new(),
            fix: "nothing to do".into(),
            detail: None,
            source: None,
            subject: Subject::None,
        }
    }
}

/// What a finding is about, for apply.
#[derive(Clone, Debug)]
pub enum Subject {
    Sysctl {
        key: SysctlKey,
        shape: Shape,
        /// The live value exactly as the kernel printed it (the journal keeps this).
        live_raw: String,
        live: Value,
        wanted: Value,
    },
    Nofile {
        soft: u64,
        hard: u64,
        wanted: u64,
    },
    None,
}

/// Facts about where we run, printed with every report.
#[derive(Clone, Debug, Serialize)]
pub struct Context {
    pub root: bool,
    pub initial_netns: bool,
    pub netns: Option<String>,
    pub cap_sys_resource: bool,
    pub nofile_soft: u64,
    pub nofile_hard: u64,
}

/// The outcome of a preflight run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub profile: String,
    pub chain: Vec<String>,
    pub target_connections: Option<u64>,
    pub listen_ports: Vec<u16>,
    pub context: Context,
    pub findings: Vec<Finding>,
    /// Finding ids the service's configuration ignores (`ignore:`; `preflight --config`): they
    /// are reported but neither counted nor failing.
    pub ignored: Vec<String>,
}

impl Report {
    /// Findings with verdict `v`, not counting ignored ones.
    pub fn count(&self, v: Verdict) -> usize {
        self.findings
            .iter()
            .filter(|f| f.verdict == v && !self.is_ignored(f))
            .count()
    }

    pub fn is_ignored(&self, f: &Finding) -> bool {
        self.ignored.contains(&f.id)
    }

    pub fn passed(&self) -> bool {
        self.count(Verdict::Fail) == 0
    }
}

/// Runs every check. A key the profile names that does not exist on this kernel (and is not a
/// known key hidden by the namespace) is bad input: a `ConfigError` naming file, line and key.
pub fn check(profile: &Profile, host: &Host, extra_ports: &[u16]) -> anyhow::Result<Report> {
    let (soft, hard) = host.nofile()?;
    let context = Context {
        root: crate::host::running_as_root(),
        initial_netns: host.in_initial_netns(),
        netns: host.netns_id(),
        cap_sys_resource: host.has_cap_sys_resource()?,
        nofile_soft: soft,
        nofile_hard: hard,
    };
    let mut findings = Vec::new();
    for setting in &profile.sysctl {
        findings.push(check_sysctl(setting, host, &context)?);
    }
    if let Some((wanted, source)) = &profile.nofile {
        let nr_open = read_number(host, "fs.nr_open")?;
        findings.extend(check_nofile(
            *wanted,
            nr_open,
            &context,
            &source.to_string(),
        ));
    }
    let mut ports = profile.listen_ports.clone();
    for p in extra_ports {
        if !ports.contains(p) {
            ports.push(*p);
        }
    }
    findings.extend(derived::checks(profile, host, &context, &ports)?);
    Ok(Report {
        profile: profile.name.clone(),
        chain: profile.chain.clone(),
        target_connections: profile.target_connections,
        listen_ports: ports,
        context,
        findings,
        ignored: Vec::new(),
    })
}

/// Adds the boot-persistence findings (`persist.*`): each sysctl key of the profile against
/// the configuration the next boot applies, read under the host's root with `sysctl_dir`
/// standing for /etc/sysctl.d.
pub fn add_boot_checks(
    report: &mut Report,
    profile: &Profile,
    host: &Host,
    sysctl_dir: &std::path::Path,
) {
    let etc = boot::etc_dir(host.root(), sysctl_dir);
    let config = crate::host::boot::BootConfig::read(host.root(), Some(&etc));
    let found = boot::checks(
        profile,
        &report.findings,
        &config,
        report.context.initial_netns,
    );
    report.findings.extend(found);
}

/// Reads a single-number sysctl; None when this kernel or namespace does not show it.
fn read_number(host: &Host, key: &str) -> anyhow::Result<Option<u64>> {
    let key = SysctlKey::parse(key).expect("static key");
    match host.read_sysctl(&key)? {
        None => Ok(None),
        Some(text) => text.trim().parse().map(Some).map_err(|_| {
            anyhow::anyhow!("cannot understand {key}: {:?} is not a number", text.trim())
        }),
    }
}

/// Whether a key can be written from here, and if not, why not.
fn changeable(host: &Host, key: &SysctlKey, scope: Scope, ctx: &Context) -> Result<(), String> {
    if scope == Scope::HostGlobal && !ctx.initial_netns {
        return Err(
            "host-global: this process runs in its own network namespace (a container \
                    or unshare -n), so tunegate leaves it to the host"
                .into(),
        );
    }
    match host.sysctl_access(key) {
        Access::Writable => Ok(()),
        Access::ReadOnly(why) => Err(why),
    }
}

fn check_sysctl(setting: &Setting, host: &Host, ctx: &Context) -> anyhow::Result<Finding> {
    let key = &setting.key;
    let known = tunables::lookup(&key.dotted());
    let shape = tunables::shape_of(key);
    let scope = tunables::scope_of(key);
    let mut finding = Finding {
        id: format!("sysctl.{key}"),
        key: key.dotted(),
        current: None,
        wanted: setting.value.to_string(),
        rule: shape.rule().into(),
        verdict: Verdict::Pass,
        scope,
        changeable: false,
        blocked_by: None,
        why: known
            .map_or(
                "Not in tunegate's catalogue; compared exactly as the profile gives it.",
                |t| t.why,
            )
            .into(),
        fix: String::new(),
        detail: None,
        source: Some(setting.source.to_string()),
        subject: Subject::None,
    };
    let Some(raw) = host.read_sysctl(key)? else {
        if known.is_none() {
            return Err(setting
                .source
                .error(format!(
                    "sysctl key {key} does not exist under {} on this host",
                    host.root().join("proc/sys").display()
                ))
                .into());
        }
        finding.verdict = Verdict::Warn;
        finding.blocked_by = Some("not visible from here".into());
        finding.detail = Some(if scope == Scope::HostGlobal && !ctx.initial_netns {
            "host-global key, not visible inside this network namespace: check it on the host"
                .into()
        } else {
            "this kernel has no such key here (module not loaded?)".into()
        });
        finding.fix = format!("on the host: sysctl -w {key}=\"{}\"", setting.value);
        return Ok(finding);
    };
    let live = shape.parse_live(&raw).map_err(|m| {
        anyhow::anyhow!(
            "{}: cannot understand {key}: {m}",
            host.sysctl_path(key).display()
        )
    })?;
    finding.current = Some(live.to_string());
    let ok = shape.satisfied(&live, &setting.value);
    let target = shape.raised(&live, &setting.value);
    finding.verdict = if ok { Verdict::Pass } else { Verdict::Fail };
    match changeable(host, key, scope, ctx) {
        Ok(()) => finding.changeable = true,
        Err(why) => finding.blocked_by = Some(why),
    }
    if !ok && target == live {
        finding.changeable = false;
        finding.blocked_by = Some(format!(
            "raise-only: the host's {live} is higher and tunegate never lowers it"
        ));
    }
    let line = format!("{key} = {target}");
    finding.fix = if ok {
        "nothing to do".into()
    } else if finding.changeable {
        format!("tunegate apply (sysctl -w {key}=\"{target}\"); persist with --persist: {line}")
    } else {
        format!("on the host: sysctl -w {key}=\"{target}\" and `{line}` in /etc/sysctl.d/")
    };
    finding.subject = Subject::Sysctl {
        key: key.clone(),
        shape,
        live_raw: raw,
        live,
        wanted: setting.value.clone(),
    };
    Ok(finding)
}

fn check_nofile(wanted: u64, nr_open: Option<u64>, ctx: &Context, source: &str) -> Vec<Finding> {
    let unit_fix = format!(
        "LimitNOFILE={wanted} in the service's [Service] section (systemd/tunegate.service sets it \
         for tunegate run); for a login shell, `nofile` in /etc/security/limits.d/"
    );
    let subject = Subject::Nofile {
        soft: ctx.nofile_soft,
        hard: ctx.nofile_hard,
        wanted,
    };
    let mut hard_blockers = Vec::new();
    if !ctx.cap_sys_resource {
        hard_blockers.push(
            "this process lacks CAP_SYS_RESOURCE, so setrlimit above the hard limit fails with EPERM"
                .to_string(),
        );
    }
    if let Some(n) = nr_open.filter(|&n| wanted > n) {
        hard_blockers.push(format!(
            "fs.nr_open is {n}: no hard limit can exceed it (raise fs.nr_open on the host)"
        ));
    }
    let hard_ok = ctx.nofile_hard >= wanted;
    let soft_ok = ctx.nofile_soft >= wanted;
    let hard = Finding {
        id: "limits.nofile.hard".into(),
        key: "RLIMIT_NOFILE (hard)".into(),
        current: Some(ctx.nofile_hard.to_string()),
        wanted: wanted.to_string(),
        rule: "at least".into(),
        verdict: if hard_ok {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
        scope: Scope::Process,
        changeable: hard_ok || hard_blockers.is_empty(),
        blocked_by: (!hard_ok && !hard_blockers.is_empty()).then(|| hard_blockers.join("; ")),
        why: NOFILE_WHY.into(),
        fix: if hard_ok {
            "nothing to do".into()
        } else {
            unit_fix.clone()
        },
        detail: (!hard_ok).then(|| {
            format!(
                "one process here can hold at most {} descriptors; more connections need a higher \
                 hard limit or several processes",
                ctx.nofile_hard
            )
        }),
        source: Some(source.into()),
        subject: subject.clone(),
    };
    let soft_reach = wanted.min(ctx.nofile_hard);
    let soft = Finding {
        id: "limits.nofile.soft".into(),
        key: "RLIMIT_NOFILE (soft)".into(),
        current: Some(ctx.nofile_soft.to_string()),
        wanted: wanted.to_string(),
        rule: "at least".into(),
        verdict: if soft_ok {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
        scope: Scope::Process,
        changeable: soft_ok || hard_ok || hard_blockers.is_empty(),
        blocked_by: (!soft_ok && !hard_ok && !hard_blockers.is_empty()).then(|| {
            format!(
                "the soft limit can rise only to the hard limit {}",
                ctx.nofile_hard
            )
        }),
        why: NOFILE_WHY.into(),
        fix: if soft_ok {
            "nothing to do".into()
        } else {
            format!("tunegate run raises it for its child (to {soft_reach} here); {unit_fix}")
        },
        detail: None,
        source: Some(source.into()),
        subject,
    };
    vec![soft, hard]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ConfigError;
    use crate::host::fake;
    use crate::profile;

    fn profile_from(dir: &std::path::Path, text: &str) -> Profile {
        let p = dir.join("p.yaml");
        std::fs::write(&p, text).unwrap();
        profile::load(p.to_str().unwrap(), false).unwrap()
    }

    #[test]
    fn failing_keys_are_found_and_passing_ones_pass() {
        let (d, host) = fake::netns_tree(&[]);
        let p = profile_from(
            d.path(),
            "sysctl:\n  net.core.somaxconn: 65535\n  net.ipv4.tcp_rmem: \"4096 87380 6291456\"\n  net.ipv4.ip_local_port_range: \"1024 65535\"\n",
        );
        let r = check(&p, &host, &[]).unwrap();
        let by_id = |id: &str| r.findings.iter().find(|f| f.id == id).unwrap().clone();
        let s = by_id("sysctl.net.core.somaxconn");
        assert_eq!(s.verdict, Verdict::Fail);
        assert_eq!(s.current.as_deref(), Some("4096"));
        assert!(s.changeable);
        assert!(s.source.unwrap().ends_with("p.yaml:2:3"));
        assert_eq!(by_id("sysctl.net.ipv4.tcp_rmem").verdict, Verdict::Pass);
        assert_eq!(
            by_id("sysctl.net.ipv4.ip_local_port_range").verdict,
            Verdict::Fail
        );
        assert!(!r.passed());
    }

    #[test]
    fn unknown_missing_keys_are_config_errors_known_ones_are_warnings() {
        let (d, host) = fake::netns_tree(&[]);
        let p = profile_from(d.path(), "sysctl:\n  net.core.no_such_thing: 1\n");
        let e = check(&p, &host, &[]).unwrap_err();
        let ce = e.downcast_ref::<ConfigError>().expect("config error");
        assert_eq!(ce.line, Some(2));
        assert!(ce.message.contains("net.core.no_such_thing"), "{ce}");

        let p = profile_from(d.path(), "sysctl:\n  net.ipv4.tcp_mem: \"1 2 3\"\n");
        let r = check(&p, &host, &[]).unwrap();
        assert_eq!(r.findings[0].verdict, Verdict::Warn);
        assert!(
            r.findings[0]
                .detail
                .as_ref()
                .unwrap()
                .contains("host-global")
        );
    }

    #[test]
    fn host_global_keys_are_not_changeable_outside_the_initial_namespace() {
        let (d, host) = fake::netns_tree(&[]);
        let p = profile_from(d.path(), "sysctl:\n  fs.nr_open: 2097152\n");
        let r = check(&p, &host, &[]).unwrap();
        assert_eq!(r.findings[0].verdict, Verdict::Fail);
        assert!(!r.findings[0].changeable);
        assert!(
            r.findings[0]
                .blocked_by
                .as_ref()
                .unwrap()
                .contains("host-global")
        );

        let (d, host) = fake::netns_tree(&[("net/core/netdev_max_backlog", "1000\n")]);
        let p = profile_from(d.path(), "sysctl:\n  fs.nr_open: 2097152\n");
        assert!(check(&p, &host, &[]).unwrap().findings[0].changeable);
    }

    #[test]
    fn nofile_reports_both_limits_with_the_real_blockers() {
        let (d, host) = fake::netns_tree(&[]);
        let (soft, hard) = host.nofile().unwrap();
        let p = profile_from(d.path(), &format!("limits:\n  nofile: {}\n", hard + 1));
        let r = check(&p, &host, &[]).unwrap();
        let h = r
            .findings
            .iter()
            .find(|f| f.id == "limits.nofile.hard")
            .unwrap();
        assert_eq!(h.verdict, Verdict::Fail);
        if !r.context.cap_sys_resource {
            assert!(h.blocked_by.as_ref().unwrap().contains("CAP_SYS_RESOURCE"));
            assert!(!h.changeable);
        }
        let s = r
            .findings
            .iter()
            .find(|f| f.id == "limits.nofile.soft")
            .unwrap();
        assert_eq!(s.current, Some(soft.to_string()));
    }
}
