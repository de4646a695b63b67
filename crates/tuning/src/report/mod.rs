//! Findings, plans and outcomes rendered for people (a checklist, failures first) and for
//! machines (JSON, schema documented in docs/json.md). Pure formatting: no host access.

use std::fmt::Write as _;

use serde::Serialize;

use crate::apply::{Outcome, Plan, RevertOutcome};
use crate::preflight::{Finding, Report, Verdict};
use crate::profile::Profile;
use crate::tunables::Value;

/// JSON schema identifiers; bumped on incompatible change.
pub const PREFLIGHT_SCHEMA: &str = "tunegate.preflight/1";
pub const APPLY_SCHEMA: &str = "tunegate.apply/1";
pub const REVERT_SCHEMA: &str = "tunegate.revert/1";

fn sorted(report: &Report) -> Vec<&Finding> {
    let mut f: Vec<&Finding> = report.findings.iter().collect();
    f.sort_by_key(|f| f.verdict); // stable: keeps check order within a verdict
    f
}

#[derive(Serialize)]
struct Summary {
    result: Verdict,
    fail: usize,
    warn: usize,
    pass: usize,
}

#[derive(Serialize)]
struct PreflightJson<'a> {
    schema: &'static str,
    profile: &'a str,
    chain: &'a [String],
    target_connections: Option<u64>,
    listen_ports: &'a [u16],
    context: &'a crate::preflight::Context,
    summary: Summary,
    findings: Vec<&'a Finding>,
    /// Ids of findings the configuration ignores (counted in none of the summary's numbers).
    ignored: &'a [String],
}

fn preflight_value(report: &Report) -> PreflightJson<'_> {
    PreflightJson {
        schema: PREFLIGHT_SCHEMA,
        profile: &report.profile,
        chain: &report.chain,
        target_connections: report.target_connections,
        listen_ports: &report.listen_ports,
        context: &report.context,
        summary: Summary {
            result: if report.passed() {
                Verdict::Pass
            } else {
                Verdict::Fail
            },
            fail: report.count(Verdict::Fail),
            warn: report.count(Verdict::Warn),
            pass: report.count(Verdict::Pass),
        },
        findings: sorted(report),
        ignored: &report.ignored,
    }
}

pub fn preflight_json(report: &Report) -> String {
    serde_json::to_string_pretty(&preflight_value(report)).expect("report serialises")
}

/// The checklist: a header with where we run, then failures, warnings and passes.
pub fn preflight_human(report: &Report) -> String {
    let mut s = String::new();
    let c = &report.context;
    let _ = writeln!(
        s,
        "tunegate preflight: profile {} ({}){}",
        report.profile,
        report.chain.join(" <- "),
        report
            .target_connections
            .map_or(String::new(), |t| format!(", target {t} connections"))
    );
    let _ = writeln!(
        s,
        "host: {}, {}, {}, RLIMIT_NOFILE soft {} hard {}",
        match (&c.netns, c.initial_netns) {
            (Some(n), true) => format!("initial network namespace {n}"),
            (Some(n), false) => format!("own network namespace {n}"),
            (None, _) => "network namespace unknown".into(),
        },
        if c.root { "root" } else { "not root" },
        if c.cap_sys_resource {
            "CAP_SYS_RESOURCE"
        } else {
            "no CAP_SYS_RESOURCE"
        },
        c.nofile_soft,
        c.nofile_hard
    );
    s.push('\n');
    for f in sorted(report) {
        let current = f.current.as_deref().unwrap_or("(not visible)");
        if report.is_ignored(f) && f.verdict != Verdict::Pass {
            let _ = writeln!(
                s,
                "IGNORED {} {:<38} {}  (want {}: {}; ignored by the configuration's ignore:)",
                f.verdict.label(),
                f.key,
                current,
                f.rule,
                f.wanted
            );
            continue;
        }
        if f.verdict == Verdict::Pass {
            let _ = writeln!(
                s,
                "PASS  {:<40} {}  (want {}: {})",
                f.key, current, f.rule, f.wanted
            );
            continue;
        }
        let _ = writeln!(
            s,
            "{}  {:<40} {}  (want {}: {})",
            f.verdict.label(),
            f.key,
            current,
            f.rule,
            f.wanted
        );
        let _ = writeln!(s, "      id     {} (what `ignore:` takes)", f.id);
        let _ = writeln!(s, "      scope  {}", f.scope.label());
        if let Some(d) = &f.detail {
            let _ = writeln!(s, "      note   {d}");
        }
        match &f.blocked_by {
            Some(b) => {
                let _ = writeln!(s, "      cannot change from here: {b}");
            }
            None if f.changeable => {
                let _ = writeln!(s, "      tunegate apply can change it");
            }
            None => {}
        }
        let _ = writeln!(s, "      why    {}", f.why);
        let _ = writeln!(s, "      fix    {}", f.fix);
        if let Some(src) = &f.source {
            let _ = writeln!(s, "      from   {src}");
        }
    }
    let _ = writeln!(
        s,
        "\n{} fail, {} warn, {} pass: {}",
        report.count(Verdict::Fail),
        report.count(Verdict::Warn),
        report.count(Verdict::Pass),
        if report.passed() { "PASSED" } else { "FAILED" }
    );
    s
}

/// One finding on one line, for a log (the daemon's gate): id, key, what is there, what is
/// wanted, why it cannot be had from here, and the fix.
pub fn finding_line(f: &Finding) -> String {
    format!(
        "{} {}: current {} wanted {} {}{}; fix: {}",
        f.id,
        f.key,
        f.current.as_deref().unwrap_or("(not visible)"),
        f.rule,
        f.wanted,
        f.blocked_by
            .as_ref()
            .map_or(String::new(), |b| format!(" ({b})")),
        f.fix
    )
}

pub fn plan_human(plan: &Plan) -> String {
    let mut s = String::new();
    if plan.steps.is_empty() {
        s.push_str("plan: no sysctl changes needed from here\n");
    } else {
        let _ = writeln!(s, "plan: {} change(s), raise-only", plan.steps.len());
        for st in &plan.steps {
            let _ = writeln!(s, "  {:<40} {} -> {}", st.key, st.from, st.to);
        }
    }
    if let Some(n) = &plan.nofile {
        let _ = writeln!(
            s,
            "  {:<40} soft {} hard {} -> {} (this process and what it starts)",
            "RLIMIT_NOFILE", n.soft, n.hard, n.wanted
        );
    }
    s
}

pub fn blocked_human(plan: &Plan) -> String {
    let mut s = String::new();
    if plan.blocked.is_empty() {
        return s;
    }
    let _ = writeln!(s, "must be set on the host (cannot be changed from here):");
    for b in &plan.blocked {
        let _ = writeln!(
            s,
            "  {:<40} {} (wanted {})\n      because {}\n      fix     {}",
            b.key,
            b.current.as_deref().unwrap_or("(not visible)"),
            b.wanted,
            b.reason,
            b.fix
        );
    }
    s
}

pub fn outcome_human(out: &Outcome) -> String {
    let mut s = String::new();
    if let Some(u) = &out.unit {
        s.push_str(&unit_human(u));
    }
    if let Some(j) = &out.journal {
        let _ = writeln!(
            s,
            "journal: {} (previous values, saved before the first write)",
            j.display()
        );
    }
    for w in &out.superseded {
        let _ = writeln!(
            s,
            "left     {:<40} planned from {}, but another writer made it {} before this run \
             held the lock: satisfied, not touched",
            w.key, w.planned_from, w.now
        );
    }
    for w in &out.written {
        let _ = writeln!(
            s,
            "set       {:<40} {} -> {} (read back)",
            w.key, w.from, w.to
        );
    }
    if let Some(f) = &out.failure {
        let _ = writeln!(s, "FAILED    step {} {}: {}", f.step, f.key, f.error);
        if out.restored.is_empty() {
            let _ = writeln!(s, "nothing had been written before it; nothing to restore");
        }
        for r in &out.restored {
            match &r.error {
                None => {
                    let _ = writeln!(s, "restored  {:<40} {}", r.key, r.value);
                }
                Some(e) => {
                    let _ = writeln!(
                        s,
                        "NOT RESTORED {:<37} {} ({e}); kept in the journal for tunegate revert",
                        r.key, r.value
                    );
                }
            }
        }
    }
    if let Some(n) = &out.nofile {
        let _ = writeln!(
            s,
            "RLIMIT_NOFILE: now soft {} hard {} for this process (wanted {})",
            n.soft, n.hard, n.wanted
        );
        if let Some(e) = &n.hard_error {
            let _ = writeln!(
                s,
                "  hard limit not raised: {e}; raising it needs CAP_SYS_RESOURCE and a value <= \
                 fs.nr_open. Fix: LimitNOFILE={} in the service unit (systemd sets it before \
                 tunegate starts)",
                n.wanted
            );
        }
        let _ = writeln!(
            s,
            "  a limit lives with its process: `tunegate run` applies it to the server it starts"
        );
    }
    if let Some(p) = &out.persisted {
        let _ = writeln!(
            s,
            "persisted: {} (systemd-sysctl applies it at boot)",
            p.display()
        );
    }
    s
}

#[derive(Serialize)]
struct ApplyJson<'a> {
    schema: &'static str,
    dry_run: bool,
    plan: &'a Plan,
    outcome: Option<&'a Outcome>,
    after: Option<PreflightJson<'a>>,
}

pub fn apply_json(
    plan: &Plan,
    outcome: Option<&Outcome>,
    after: Option<&Report>,
    dry_run: bool,
) -> String {
    serde_json::to_string_pretty(&ApplyJson {
        schema: APPLY_SCHEMA,
        dry_run,
        plan,
        outcome,
        after: after.map(preflight_value),
    })
    .expect("apply serialises")
}

fn unit_human(u: &crate::apply::unit::UnitOutcome) -> String {
    let mut s = String::new();
    if let Some(why) = &u.unchanged {
        let _ = writeln!(s, "unit     {}: nothing written: {why}", u.unit);
        return s;
    }
    if let (Some(set), Some(path)) = (u.set, &u.dropin) {
        let before = u.before.map_or("?".into(), |b| b.to_string());
        let _ = writeln!(
            s,
            "unit     {}: LimitNOFILE {before} -> {set} in {}",
            u.unit,
            path.display()
        );
    }
    if let Some(c) = &u.capped {
        let _ = writeln!(s, "         capped: {c}");
    }
    if u.reloaded {
        let _ = writeln!(
            s,
            "         systemctl daemon-reload done: its next start gets LimitNOFILE {}",
            u.after.map_or("?".into(), |a| a.to_string())
        );
    }
    if !u.overridden_by.is_empty() {
        let list: Vec<String> = u
            .overridden_by
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let _ = writeln!(
            s,
            "         WARNING: a drop-in applied after ours keeps it lower: {} (tunegate never edits it)",
            list.join(", ")
        );
    }
    if let Some(n) = &u.next {
        let _ = writeln!(s, "         to take effect: {n}");
    }
    s
}

pub fn revert_human(out: &RevertOutcome) -> String {
    let mut s = String::new();
    for p in &out.temp_files_removed {
        let _ = writeln!(s, "removed   {} (left by a killed run)", p.display());
    }
    if !out.had_journal {
        if let Some(p) = &out.dropin_removed {
            let _ = writeln!(
                s,
                "removed   {} (ours; no journal recorded it)",
                p.display()
            );
        }
        s.push_str("nothing to revert: no journal\n");
        return s;
    }
    for (k, from, to) in &out.restored {
        let _ = writeln!(s, "restored  {k:<40} {from} -> {to}");
    }
    for k in &out.unchanged {
        let _ = writeln!(s, "unchanged {k:<40} already at its previous value");
    }
    for (k, live, ours) in &out.skipped {
        let _ = writeln!(
            s,
            "skipped   {k:<40} now {live}, tunegate set {ours}: changed by someone since, left \
             alone (--force restores it anyway)"
        );
    }
    for (k, e) in &out.failed {
        let _ = writeln!(s, "FAILED    {k:<40} {e} (kept in the journal)");
    }
    if let Some(p) = &out.dropin_removed {
        let _ = writeln!(s, "removed   {}", p.display());
    }
    for p in &out.unit_dropins_removed {
        let _ = writeln!(s, "removed   {}", p.display());
    }
    if out.reloaded {
        s.push_str("systemctl daemon-reload done: restart the unit(s) to drop the raised limit\n");
    }
    if out.failed.is_empty() {
        s.push_str("journal cleared\n");
    }
    s
}

#[derive(Serialize)]
struct RevertJson<'a> {
    schema: &'static str,
    #[serde(flatten)]
    outcome: &'a RevertOutcome,
}

pub fn revert_json(out: &RevertOutcome) -> String {
    serde_json::to_string_pretty(&RevertJson {
        schema: REVERT_SCHEMA,
        outcome: out,
    })
    .expect("revert serialises")
}

/// A YAML value that loads back as the same tunable value.
fn yaml_value(v: &Value) -> String {
    match v {
        Value::Numbers(n) if n.len() == 1 => n[0].to_string(),
        other => format!("\"{other}\""),
    }
}

/// The resolved profile as YAML that loads back to the same profile, with each value's origin.
pub fn profile_yaml(p: &Profile) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# profile {} resolved ({}); from {}",
        p.name,
        p.chain.join(" <- "),
        p.origin
    );
    if let Some(d) = &p.description {
        let _ = writeln!(s, "description: {}", serde_json::to_string(d).unwrap());
    }
    if let Some(t) = p.target_connections {
        let _ = writeln!(s, "target_connections: {t}");
    }
    if !p.listen_ports.is_empty() {
        let ports: Vec<String> = p.listen_ports.iter().map(u16::to_string).collect();
        let _ = writeln!(s, "listen_ports: [{}]", ports.join(", "));
    }
    if let Some(x) = &p.proxy {
        let _ = writeln!(
            s,
            "proxy:  # {}\n  upstreams: {}\n  source_addresses: {}",
            x.source, x.upstreams, x.source_addresses
        );
    }
    if let Some((n, src)) = &p.nofile {
        let _ = writeln!(s, "limits:\n  nofile: {n}  # {src}");
    }
    if !p.sysctl.is_empty() {
        s.push_str("sysctl:\n");
        for st in &p.sysctl {
            let _ = writeln!(
                s,
                "  {}: {}  # {}",
                st.key,
                yaml_value(&st.value),
                st.source
            );
        }
    }
    s
}

pub fn profile_json(p: &Profile) -> String {
    let sysctl: Vec<serde_json::Value> = p
        .sysctl
        .iter()
        .map(|s| {
            serde_json::json!({
                "key": s.key.dotted(),
                "value": s.value.to_string(),
                "source": s.source.to_string(),
            })
        })
        .collect();
    serde_json::to_string_pretty(&serde_json::json!({
        "name": p.name,
        "origin": p.origin.to_string(),
        "chain": p.chain,
        "description": p.description,
        "target_connections": p.target_connections,
        "listen_ports": p.listen_ports,
        "proxy": p.proxy.as_ref().map(|x| serde_json::json!({
            "upstreams": x.upstreams,
            "source_addresses": x.source_addresses,
            "source": x.source.to_string(),
        })),
        "nofile": p.nofile.as_ref().map(|(n, _)| n),
        "sysctl": sysctl,
    }))
    .expect("profile serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_profiles_load_back_to_the_same_settings() {
        for name in crate::profile::builtin_names() {
            let p = crate::profile::load(name, false).unwrap();
            let d = tempfile::tempdir().unwrap();
            let path = d.path().join("shown.yaml");
            std::fs::write(&path, profile_yaml(&p)).unwrap();
            let q = crate::profile::load(path.to_str().unwrap(), false).unwrap();
            let flat = |p: &Profile| {
                p.sysctl
                    .iter()
                    .map(|s| (s.key.dotted(), s.value.clone()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(flat(&p), flat(&q), "{name}");
            assert_eq!(p.target_connections, q.target_connections);
            assert_eq!(p.listen_ports, q.listen_ports);
            let proxy = |p: &Profile| p.proxy.as_ref().map(|x| (x.upstreams, x.source_addresses));
            assert_eq!(proxy(&p), proxy(&q), "{name}");
            assert_eq!(p.nofile.map(|n| n.0), q.nofile.map(|n| n.0));
        }
    }
}
