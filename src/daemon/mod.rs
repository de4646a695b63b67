//! `tunegate run`: the service. The only module that knows both sides of tunegate.
//!
//! load config and profile -> preflight -> apply what is missing (raise-only, journaled) ->
//! preflight again -> gate (enforce or warn) -> start the child -> wait until it listens ->
//! check what it really got (limits, accept queue) -> READY=1 -> supervise: restart with
//! backoff, stop on SIGTERM, reload on SIGHUP, re-check for drift.
//!
//! One thread (tokio's current-thread runtime): children must be forked from a thread that
//! lives as long as the daemon, or PR_SET_PDEATHSIG would kill them when a worker thread exits.

pub mod child;
pub mod config;
pub mod log;
pub mod notify;
pub mod status;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};

use crate::apply::{self, Paths, Plan};
use crate::host::{self, Host};
use crate::preflight::{self, Finding, Report, Verdict};
use crate::profile::{self, Profile};
use crate::tunables::SysctlKey;
use config::{Config, Mode, RestartPolicy};
use log::Log;
use notify::Notifier;
use status::{Status, now};

pub struct Options {
    pub config_path: PathBuf,
    /// `--config` was given: a missing file is an error, not "use the defaults".
    pub explicit: bool,
    pub host: Host,
}

/// Runs the daemon to the end; returns the exit code.
pub fn run(opts: Options) -> anyhow::Result<u8> {
    let root = host::running_as_root();
    let config = Config::load(&opts.config_path, opts.explicit, root)?;
    let profile = profile::load(&config.profile, root)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(Daemon::new(opts, config, profile).main())
}

struct Daemon {
    opts: Options,
    config: Config,
    profile: Profile,
    log: Log,
    notify: Notifier,
    status: Status,
    exe: PathBuf,
    crashes: VecDeque<Instant>,
    consecutive_failures: u32,
    last_values: HashMap<String, String>,
}

enum Event {
    Exited(std::process::ExitStatus),
    Stop(&'static str),
    Reload,
}

impl Daemon {
    fn new(opts: Options, config: Config, profile: Profile) -> Daemon {
        let status = Status {
            pid: std::process::id(),
            started_at: now(),
            state: "starting".into(),
            profile: profile.name.clone(),
            mode: format!("{:?}", config.effective_mode()).to_lowercase(),
            listen: config.listen.to_string(),
            ..Status::default()
        };
        Daemon {
            opts,
            config,
            profile,
            log: Log::new(),
            notify: Notifier::from_env(),
            status,
            exe: std::env::current_exe().unwrap_or_else(|_| "tunegate".into()),
            crashes: VecDeque::new(),
            consecutive_failures: 0,
            last_values: HashMap::new(),
        }
    }

    fn save_status(&mut self, state: &str, message: &str) {
        self.status.state = state.into();
        self.status.message = message.into();
        if let Err(e) = self.status.save(&self.config.status_file) {
            self.log.warn(&format!("cannot write status file: {e:#}"));
        }
        self.notify.status(&format!("{state}: {message}"));
    }

    async fn main(mut self) -> anyhow::Result<u8> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        self.log.notice(&format!(
            "starting: profile {} ({}), mode {:?}, listen {}, config {}",
            self.profile.name,
            self.profile.chain.join(" <- "),
            self.config.effective_mode(),
            self.config.listen,
            self.opts.config_path.display()
        ));
        self.save_status("starting", "checking the host");
        let failing = self.tune_and_gate()?;
        if !failing.is_empty() && self.config.effective_mode() == Mode::Enforce {
            let msg = format!(
                "enforce mode: {} check(s) fail, not starting the child (see the lines above; \
                 fix them, or ignore checks one by one by id)",
                failing.len()
            );
            self.log.err(&msg);
            self.save_status("gated", &msg);
            return Ok(1);
        }

        let mut drift =
            tokio::time::interval(Duration::from_secs(self.config.drift.interval_s.max(1)));
        drift.reset();
        let mut watchdog =
            tokio::time::interval(self.notify.watchdog.unwrap_or(Duration::from_secs(3600)));
        let mut ready_sent = false;
        loop {
            let argv = child::argv(&self.config, &self.exe);
            let mut kid = match child::spawn(&self.config, &argv) {
                Ok(k) => k,
                Err(e) => {
                    self.log.err(&format!("{e:#}"));
                    self.save_status("failed", &format!("{e:#}"));
                    return Ok(1);
                }
            };
            let pid = kid.id().unwrap_or(0);
            let started = Instant::now();
            self.status.child_pid = Some(pid);
            self.status.child_started_at = Some(now());
            self.status.child_command = argv.clone();
            self.status.ready = false;
            self.log
                .info(&format!("child started: pid {pid}: {}", argv.join(" ")));
            self.save_status(
                "starting",
                &format!(
                    "child {pid} started, waiting for it to listen on {}",
                    self.config.listen
                ),
            );

            // Wait until it listens, it dies, or we are told to stop.
            let ready_by = Instant::now() + Duration::from_millis(self.config.ready_timeout_ms);
            let mut poll = tokio::time::interval(Duration::from_millis(50));
            let mut event = None;
            let mut listening = false;
            // A child stopped for never listening has failed, whatever status it exits with.
            let mut not_ready = false;
            while !listening && event.is_none() {
                tokio::select! {
                    st = kid.wait() => event = Some(Event::Exited(st?)),
                    _ = term.recv() => event = Some(Event::Stop("SIGTERM")),
                    _ = int.recv() => event = Some(Event::Stop("SIGINT")),
                    _ = watchdog.tick() => self.notify.send("WATCHDOG=1"),
                    _ = poll.tick() => {
                        listening = self.check_listening(pid);
                        if !listening && Instant::now() > ready_by {
                            self.log.err(&format!(
                                "child {pid} did not listen on {} within {} ms; stopping it",
                                self.config.listen, self.config.ready_timeout_ms
                            ));
                            self.stop_child(&mut kid, pid).await;
                            not_ready = true;
                            event = Some(Event::Exited(kid.wait().await?));
                        }
                    }
                }
            }
            if listening {
                self.verify_child(pid);
                self.status.ready = true;
                let msg = format!(
                    "serving on {} (child {pid}, profile {}, {} failing check(s))",
                    self.config.listen,
                    self.profile.name,
                    self.status.failing_checks.len()
                );
                self.log.notice(&msg);
                // The status file first, so `tunegate status` agrees with systemd at once.
                self.save_status("running", &msg);
                if !ready_sent {
                    self.notify
                        .send(&format!("READY=1\nMAINPID={}", std::process::id()));
                    ready_sent = true;
                }
                while event.is_none() {
                    tokio::select! {
                        st = kid.wait() => event = Some(Event::Exited(st?)),
                        _ = term.recv() => event = Some(Event::Stop("SIGTERM")),
                        _ = int.recv() => event = Some(Event::Stop("SIGINT")),
                        _ = hup.recv() => event = Some(Event::Reload),
                        _ = watchdog.tick() => self.notify.send("WATCHDOG=1"),
                        _ = drift.tick() => {
                            if self.config.drift.interval_s > 0 {
                                self.check_drift();
                            }
                        }
                    }
                    if let Some(Event::Reload) = event {
                        event = self.reload(pid);
                    }
                }
            }

            match event.expect("loop ends with an event") {
                Event::Stop(why) => {
                    self.log.notice(&format!("{why}: stopping child {pid}"));
                    self.notify.send("STOPPING=1");
                    self.save_status("stopping", why);
                    self.stop_child(&mut kid, pid).await;
                    self.status.child_pid = None;
                    self.save_status("stopped", why);
                    return Ok(0);
                }
                Event::Reload => unreachable!("handled in the loop"),
                Event::Exited(st) => {
                    let ran = started.elapsed();
                    self.status.child_pid = None;
                    let how = if not_ready {
                        format!("never listened ({})", describe(&st))
                    } else {
                        describe(&st)
                    };
                    let failed = !st.success() || not_ready;
                    match (self.config.restart.policy, failed) {
                        (RestartPolicy::Never, _) | (RestartPolicy::OnFailure, false) => {
                            self.log.notice(&format!(
                                "child {pid} {how}; not restarting ({:?})",
                                self.config.restart.policy
                            ));
                            self.save_status("stopped", &format!("child {how}"));
                            return Ok(if failed { 1 } else { 0 });
                        }
                        _ => {}
                    }
                    if ran > Duration::from_secs(self.config.restart.crash_window_s) {
                        self.consecutive_failures = 0;
                    }
                    if failed {
                        self.consecutive_failures += 1;
                        let window = Duration::from_secs(self.config.restart.crash_window_s);
                        self.crashes.push_back(Instant::now());
                        while self.crashes.front().is_some_and(|t| t.elapsed() > window) {
                            self.crashes.pop_front();
                        }
                        if self.crashes.len() as u32 >= self.config.restart.max_crashes {
                            let msg = format!(
                                "crash loop: the child failed {} times within {} s (last: {how}); giving up",
                                self.crashes.len(),
                                self.config.restart.crash_window_s
                            );
                            self.log.err(&msg);
                            self.save_status("failed", &msg);
                            return Ok(1);
                        }
                    }
                    let delay = self.backoff();
                    self.status.restarts += 1;
                    self.log.warn(&format!(
                        "child {pid} {how} after {:.1} s; restarting in {} ms",
                        ran.as_secs_f64(),
                        delay.as_millis()
                    ));
                    self.save_status(
                        "restarting",
                        &format!("child {how}; restart in {} ms", delay.as_millis()),
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = term.recv() => { self.save_status("stopped", "SIGTERM while restarting"); return Ok(0); }
                        _ = int.recv() => { self.save_status("stopped", "SIGINT while restarting"); return Ok(0); }
                    }
                }
            }
        }
    }

    /// Exponential backoff with ±20 % jitter, so a fleet does not restart in lockstep.
    fn backoff(&self) -> Duration {
        let r = &self.config.restart;
        let exp = self.consecutive_failures.saturating_sub(1).min(20);
        let base = r
            .initial_backoff_ms
            .saturating_mul(1 << exp)
            .min(r.max_backoff_ms);
        let mut seed = [0u8; 2];
        let _ = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed));
        let jitter = u16::from_ne_bytes(seed) as f64 / u16::MAX as f64 * 0.4 - 0.2;
        Duration::from_millis(((base as f64) * (1.0 + jitter)).max(1.0) as u64)
    }

    /// Preflight, apply what is missing, preflight again, and log the gate's view.
    fn tune_and_gate(&mut self) -> anyhow::Result<Vec<Finding>> {
        let ports = [self.config.listen.port()];
        let before = preflight::run(&self.profile, &self.opts.host, &ports)?;
        self.remember(&before);
        self.apply(&before, true)?;
        let after = preflight::run(&self.profile, &self.opts.host, &ports)?;
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
            let line = format!(
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
            );
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

    fn apply(&mut self, report: &Report, with_nofile: bool) -> anyhow::Result<()> {
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
    fn remember(&mut self, report: &Report) {
        for f in &report.findings {
            if f.id.starts_with("sysctl.")
                && let Some(c) = &f.current
            {
                self.last_values.insert(f.key.clone(), c.clone());
            }
        }
    }

    fn check_drift(&mut self) {
        let ports = [self.config.listen.port()];
        let report = match preflight::run(&self.profile, &self.opts.host, &ports) {
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
            if let Ok(after) = preflight::run(&self.profile, &self.opts.host, &ports) {
                self.remember(&after);
            }
        }
        let _ = self.status.save(&self.config.status_file);
    }

    /// SIGHUP: re-read config and profile, re-apply, pass HUP on. Returns an event when the
    /// child has to be restarted for the new configuration to take effect.
    fn reload(&mut self, pid: u32) -> Option<Event> {
        self.notify.send("RELOADING=1");
        let root = host::running_as_root();
        let loaded = Config::load(&self.opts.config_path, self.opts.explicit, root)
            .map_err(anyhow::Error::from)
            .and_then(|c| Ok((profile::load(&c.profile, root)?, c)));
        match loaded {
            Ok((profile, config)) => {
                let restart =
                    child::argv(&config, &self.exe) != child::argv(&self.config, &self.exe);
                self.config = config;
                self.profile = profile;
                self.status.profile = self.profile.name.clone();
                if let Err(e) = self.tune_and_gate() {
                    self.log.err(&format!("reload: {e:#}"));
                }
                self.log.notice(&format!(
                    "reloaded configuration and profile {}",
                    self.profile.name
                ));
                child::signal_group(pid, Signal::SIGHUP);
                self.notify.send("READY=1");
                let _ = self.status.save(&self.config.status_file);
                if restart {
                    self.log
                        .notice("child settings changed: restarting the child");
                    child::signal_group(pid, Signal::SIGTERM);
                }
            }
            Err(e) => {
                self.log.err(&format!(
                    "reload refused, keeping the running configuration: {e:#}"
                ));
                self.notify.send("READY=1");
            }
        }
        None
    }

    /// Is the child (or a descendant) listening on the configured port?
    fn check_listening(&self, pid: u32) -> bool {
        host::process::listeners_of(pid as i32)
            .map(|ls| ls.iter().any(|l| l.port == self.config.listen.port()))
            .unwrap_or(false)
    }

    /// What the child really got: its RLIMIT_NOFILE and its listener's accept queue.
    fn verify_child(&mut self, pid: u32) {
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

    /// SIGTERM to the child's group, a grace period, then SIGKILL; reaps it.
    async fn stop_child(&mut self, kid: &mut tokio::process::Child, pid: u32) {
        child::signal_group(pid, Signal::SIGTERM);
        let grace = Duration::from_millis(self.config.stop_grace_ms);
        match tokio::time::timeout(grace, kid.wait()).await {
            Ok(st) => {
                let how = st.map(|s| describe(&s)).unwrap_or_else(|e| e.to_string());
                self.log.info(&format!("child {pid} {how}"));
            }
            Err(_) => {
                self.log.warn(&format!(
                    "child {pid} ignored SIGTERM for {} ms: SIGKILL",
                    grace.as_millis()
                ));
                child::signal_group(pid, Signal::SIGKILL);
                let _ = kid.wait().await;
            }
        }
        // Anything left in its group goes too.
        child::signal_group(pid, Signal::SIGKILL);
    }
}

fn describe(st: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!(
            "was killed by {}",
            Signal::try_from(s).map_or(format!("signal {s}"), |s| s.as_str().to_string())
        ),
        _ => "ended".into(),
    }
}
