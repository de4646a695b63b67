//! The daemon's view of the host: preflight, apply what is missing, preflight again, and gate
//! the children on the result (enforce or warn); the drift checks that follow; and what a child
//! really got once it runs (its descriptor limit, its accept queue). The tuning engine does the
//! work (`tuning`); this file decides what the daemon says and does about it.

use tuning::apply::{self, Paths, Plan};
use tuning::host;
use tuning::preflight::{self, Finding, Report, Verdict};
use tuning::report;
use tuning::tunables::SysctlKey;

use super::Daemon;
use super::config::Mode;
use super::status::now;

impl Daemon {
    /// The `bus.redis` finding of `server.bus`, reached the way the workers will reach it (its
    /// password file, its CA file). A password file that cannot be read fails the check.
    fn check_bus(&self, url: &str) -> Finding {
        let server = &self.config.server;
        let bus = preflight::bus::Bus::parse(url).and_then(|bus| match &server.bus_password_file {
            Some(file) => bus.password_from(file),
            None => Ok(bus),
        });
        match bus {
            Ok(bus) => {
                let bus = match &server.bus_ca_file {
                    Some(file) => bus.ca_file(file),
                    None => bus,
                };
                preflight::bus::check(&bus)
            }
            Err(why) => preflight::bus::unusable(url, why),
        }
    }

    /// Preflight, apply what is missing, preflight again, and log the gate's view.
    pub(super) fn tune_and_gate(&mut self) -> anyhow::Result<Vec<Finding>> {
        let ports = [self.config.listen.port()];
        let before = preflight::check(&self.profile, &self.opts.host, &ports)?;
        self.remember(&before);
        self.apply(&before, true)?;
        let mut after = preflight::check(&self.profile, &self.opts.host, &ports)?;
        // The bundled server's cross-host bus is a dependency like any tunable: with
        // `server.bus`, its cluster is checked (finding `bus.redis`) and gated the same way.
        if let (None, Some(url)) = (&self.config.child.command, &self.config.server.bus) {
            after.findings.push(self.check_bus(url));
        }
        self.remember(&after);
        for id in &self.config.ignore {
            if !after.findings.iter().any(|f| &f.id == id) {
                self.log
                    .warn(&format!("ignore: no check has the id {id:?} (typo?)"));
            }
        }
        let mut failing = Vec::new();
        self.status.failing_checks.clear();
        self.status.warnings.clear();
        let enforce = self.config.effective_mode() == Mode::Enforce;
        for f in after.findings.iter().filter(|f| f.verdict != Verdict::Pass) {
            let line = report::finding_line(f);
            if self.config.ignore.contains(&f.id) {
                self.log
                    .info(&format!("check ignored by configuration: {line}"));
            } else if f.verdict == Verdict::Fail {
                if enforce {
                    self.log.err(&format!("check failed: {line}"))
                } else {
                    self.log.warn(&format!("check failed: {line}"))
                }
                self.status.failing_checks.push(line);
                failing.push(f.clone());
            } else {
                self.log.info(&format!("check warns: {line}"));
                self.status.warnings.push(line);
            }
        }
        self.log.notice(&format!(
            "host checked: {} fail, {} warn, {} pass (profile {})",
            failing.len(),
            after.count(Verdict::Warn),
            after.count(Verdict::Pass),
            self.profile.name
        ));
        Ok(failing)
    }

    pub(super) fn apply(&mut self, report: &Report, with_nofile: bool) -> anyhow::Result<()> {
        let mut plan = Plan::from_report(report);
        if !with_nofile {
            plan.nofile = None;
        }
        if plan.steps.is_empty() && plan.nofile.is_none() {
            return Ok(());
        }
        let paths = Paths {
            state_dir: self.config.state_dir.clone(),
            sysctl_dir: apply::DEFAULT_SYSCTL_DIR.into(),
        };
        match apply::apply(&plan, &self.opts.host, &paths, &self.profile.name, false) {
            Ok(out) => {
                for w in &out.written {
                    self.log
                        .notice(&format!("set {} {} -> {}", w.key, w.from, w.to));
                }
                if let Some(f) = &out.failure {
                    self.log.err(&format!(
                        "apply failed at {}: {}; restored {} value(s)",
                        f.key,
                        f.error,
                        out.restored.len()
                    ));
                }
                if let Some(n) = &out.nofile {
                    self.log.info(&format!(
                        "RLIMIT_NOFILE for the child: soft {} hard {} (wanted {})",
                        n.soft, n.hard, n.wanted
                    ));
                    if let Some(e) = &n.hard_error {
                        self.log.warn(&format!("RLIMIT_NOFILE hard limit not raised: {e}; set LimitNOFILE={} in the unit", n.wanted));
                    }
                }
            }
            Err(e) => self
                .log
                .err(&format!("apply failed before changing anything: {e:#}")),
        }
        Ok(())
    }

    /// Remembers each sysctl's current value, for drift detection.
    pub(super) fn remember(&mut self, report: &Report) {
        for f in &report.findings {
            if f.id.starts_with("sysctl.")
                && let Some(c) = &f.current
            {
                self.last_values.insert(f.key.clone(), c.clone());
            }
        }
    }

    pub(super) fn check_drift(&mut self) {
        let ports = [self.config.listen.port()];
        let report = match preflight::check(&self.profile, &self.opts.host, &ports) {
            Ok(r) => r,
            Err(e) => return self.log.warn(&format!("drift check failed: {e:#}")),
        };
        self.status.last_drift_check = Some(now());
        let mut drifted = 0;
        for f in report
            .findings
            .iter()
            .filter(|f| f.id.starts_with("sysctl."))
        {
            let Some(cur) = &f.current else { continue };
            if let Some(old) = self.last_values.get(&f.key)
                && old != cur
            {
                drifted += 1;
                self.log.warn(&format!(
                    "drift: {} was {old}, now {cur} ({})",
                    f.key,
                    f.verdict.label()
                ));
            }
        }
        self.status.drifts += drifted;
        self.remember(&report);
        if self.config.drift.reapply
            && report
                .findings
                .iter()
                .any(|f| f.verdict == Verdict::Fail && f.changeable && f.id.starts_with("sysctl."))
        {
            if let Err(e) = self.apply(&report, false) {
                self.log.warn(&format!("drift re-apply failed: {e:#}"));
            }
            if let Ok(after) = preflight::check(&self.profile, &self.opts.host, &ports) {
                self.remember(&after);
            }
        }
        let _ = self.status.save(&self.config.status_file);
    }

    /// Is the child (or a descendant) listening on the configured port?
    pub(super) fn check_listening(&self, pid: u32) -> bool {
        host::process::listeners_of(pid as i32)
            .map(|ls| ls.iter().any(|l| l.port == self.config.listen.port()))
            .unwrap_or(false)
    }

    /// What the child really got: its RLIMIT_NOFILE and its listener's accept queue.
    pub(super) fn verify_child(&mut self, pid: u32) {
        if let (Some((wanted, _)), Ok((soft, hard))) =
            (&self.profile.nofile, host::process::nofile_of(pid as i32))
        {
            if soft < *wanted {
                let line = format!(
                    "child.nofile: child {pid} runs with RLIMIT_NOFILE soft {soft} hard {hard}, profile wants {wanted}; fix: LimitNOFILE={wanted} in the unit (needs CAP_SYS_RESOURCE above the current hard limit)"
                );
                self.log.warn(&line);
                self.status.warnings.push(line);
            } else {
                self.log.info(&format!(
                    "child {pid} RLIMIT_NOFILE soft {soft} hard {hard}"
                ));
            }
        }
        let somaxconn = SysctlKey::parse("net.core.somaxconn")
            .ok()
            .and_then(|k| self.opts.host.read_sysctl(&k).ok().flatten())
            .and_then(|v| v.trim().parse::<u32>().ok());
        if let (Ok(ls), Some(max)) = (host::process::listeners_of(pid as i32), somaxconn) {
            let port = self.config.listen.port();
            let mine: Vec<_> = ls.iter().filter(|l| l.port == port).collect();
            match mine.iter().map(|l| l.backlog).min() {
                Some(b) if b < max => {
                    let line = format!(
                        "child.backlog: the child's listener(s) on port {port} ({}) have an accept queue of {b} while net.core.somaxconn is {max}: the program asked listen() for less (Node uses 511, libc's SOMAXCONN is 4096); fix: pass a larger backlog to listen()",
                        mine.len()
                    );
                    self.log.warn(&line);
                    self.status.warnings.push(line);
                }
                Some(b) => self.log.info(&format!(
                    "child listener(s) on port {port} ({}): accept queue {b} (somaxconn {max})",
                    mine.len()
                )),
                None => {}
            }
        }
    }
}
