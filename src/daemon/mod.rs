//! `tunegate run`: the service. The only module that knows both sides of tunegate.
//!
//! load config and profile -> preflight -> apply what is missing (raise-only, journaled) ->
//! preflight again -> gate (enforce or warn) -> size the workers (`sizing`) -> start them ->
//! wait until every one listens -> check what they really got (limits, accept queue) ->
//! READY=1 -> supervise: a worker that dies is restarted alone, with backoff, while the others
//! keep their connections; stop on SIGTERM, reload on SIGHUP, re-check for drift.
//!
//! One thread (tokio's current-thread runtime): children must be forked from a thread that
//! lives as long as the daemon, or PR_SET_PDEATHSIG would kill them when a worker thread exits.

pub mod child;
pub mod config;
pub mod incarnation;
pub mod log;
pub mod notify;
pub mod sizing;
pub mod status;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use config::{Config, Mode, RestartPolicy};
use log::Log;
use notify::Notifier;
use sizing::{Fixed, Sizing};
use status::{Status, WorkerStatus, now};
use tuning::apply::{self, Paths, Plan};
use tuning::host::{self, Host};
use tuning::preflight::{self, Finding, Report, Verdict};
use tuning::profile::{self, Profile};
use tuning::tunables::SysctlKey;

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
    sizing: Sizing,
    slots: Vec<Slot>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits: mpsc::UnboundedReceiver<Exit>,
    ready_sent: bool,
    last_values: HashMap<String, String>,
    /// Where every worker start gets its connection-id incarnation.
    incarnations: incarnation::Incarnations,
}

/// One worker process (or the one custom child) and its history.
#[derive(Default)]
struct Slot {
    pid: Option<u32>,
    /// The running process's incarnation (the bundled server only).
    incarnation: Option<u16>,
    started: Option<Instant>,
    listening: bool,
    /// It must listen by then, or it is stopped and counted as failed.
    ready_by: Option<Instant>,
    /// It was stopped for never listening: a failure, whatever status it exits with.
    not_ready: bool,
    /// We asked it to stop so it can be replaced (reload); its exit is not a failure.
    replacing: bool,
    /// Marked for a rolling replacement once every worker listens.
    stale: bool,
    /// SIGKILL it if it is still there then (it ignored our SIGTERM).
    kill_at: Option<Instant>,
    restart_at: Option<Instant>,
    restarts: u64,
    crashes: VecDeque<Instant>,
    consecutive_failures: u32,
    last_exit: Option<String>,
}

/// A child ended: (slot, pid, how).
type Exit = (usize, u32, std::io::Result<std::process::ExitStatus>);

/// What ends the daemon.
enum End {
    Code(u8),
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
        let (exits_tx, exits) = mpsc::unbounded_channel();
        let log = Log::new();
        let (incarnations, note) = incarnation::Incarnations::open(&config.state_dir);
        if let Some(note) = note {
            log.warn(&note);
        }
        Daemon {
            opts,
            config,
            profile,
            log,
            notify: Notifier::from_env(),
            status,
            exe: std::env::current_exe().unwrap_or_else(|_| "tunegate".into()),
            sizing: Sizing::default(),
            slots: Vec::new(),
            exits_tx,
            exits,
            ready_sent: false,
            last_values: HashMap::new(),
            incarnations,
        }
    }

    fn save_status(&mut self, state: &str, message: &str) {
        self.status.state = state.into();
        self.status.message = message.into();
        self.refresh_status();
        if let Err(e) = self.status.save(&self.config.status_file) {
            self.log.warn(&format!("cannot write status file: {e:#}"));
        }
        self.notify.status(&format!("{state}: {message}"));
    }

    /// Copies the slots into the status (saved by the caller).
    fn refresh_status(&mut self) {
        self.status.workers = self
            .slots
            .iter()
            .enumerate()
            .map(|(index, s)| WorkerStatus {
                index,
                pid: s.pid,
                started_at: s
                    .started
                    .map(|t| now().saturating_sub(t.elapsed().as_secs())),
                listening: s.listening,
                restarts: s.restarts,
                last_exit: s.last_exit.clone(),
                incarnation: s.incarnation,
            })
            .collect();
        self.status.child_pid = self.slots.first().and_then(|s| s.pid);
        self.status.child_started_at = self.status.workers.first().and_then(|w| w.started_at);
        self.status.restarts = self.slots.iter().map(|s| s.restarts).sum();
        self.status.ready = self.ready_sent && self.slots.iter().all(|s| s.listening);
    }

    /// "the child" when there is one, "worker N" among several.
    fn name(&self, i: usize) -> String {
        if self.slots.len() == 1 {
            "the child".into()
        } else {
            format!("worker {i}")
        }
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
        self.size_workers();
        if let Err(e) = self.prepare_bus_dir() {
            let msg = format!("{e:#}");
            self.log.err(&msg);
            self.save_status("failed", &msg);
            return Ok(1);
        }
        self.slots = (0..self.sizing.workers).map(|_| Slot::default()).collect();
        for i in 0..self.slots.len() {
            if let Err(code) = self.start_worker(i).await {
                return Ok(code);
            }
        }

        let mut drift =
            tokio::time::interval(Duration::from_secs(self.config.drift.interval_s.max(1)));
        drift.reset();
        let mut watchdog =
            tokio::time::interval(self.notify.watchdog.unwrap_or(Duration::from_secs(3600)));
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            let ended = tokio::select! {
                Some((i, pid, st)) = self.exits.recv() => self.on_exit(i, pid, st?).await,
                _ = term.recv() => Some(self.stop_all("SIGTERM").await),
                _ = int.recv() => Some(self.stop_all("SIGINT").await),
                _ = hup.recv() => self.reload().await,
                _ = watchdog.tick() => { self.notify.send("WATCHDOG=1"); None }
                _ = drift.tick() => {
                    if self.config.drift.interval_s > 0 && self.ready_sent {
                        self.check_drift();
                    }
                    None
                }
                _ = tick.tick() => self.on_tick().await,
            };
            if let Some(End::Code(code)) = ended {
                return Ok(code);
            }
        }
    }

    /// Decides the worker count and event loops (docs/daemon.md, "Workers").
    fn size_workers(&mut self) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let custom = self.config.child.command.is_some();
        let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(_, hard)| hard);
        let fixed = Fixed {
            workers: if custom {
                Some(1)
            } else {
                self.config.server.workers
            },
            threads: self.config.server.threads,
        };
        self.sizing = sizing::size(
            nofile,
            self.profile.target_connections,
            cores,
            fixed,
            relay::MAX_WORKERS,
        );
        if custom {
            self.sizing.explanation = "1 child: a custom command runs as configured".into();
        } else {
            self.log
                .notice(&format!("sizing: {}", self.sizing.explanation));
            if let Some(short) = &self.sizing.shortfall {
                self.log.warn(&format!("sizing: {short}"));
            }
        }
        self.status.sizing = Some(self.sizing.clone());
    }

    /// The workers' meeting place: ours alone, emptied of any earlier run's sockets and
    /// snapshots, owned by the user the workers run as.
    fn prepare_bus_dir(&self) -> anyhow::Result<()> {
        if self.sizing.workers < 2 || self.config.child.command.is_some() {
            return Ok(());
        }
        let dir = self.config.bus_dir();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the bus directory {}", dir.display()))?;
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if relay::peers::is_bus_file(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        if let Some(user) = &self.config.child.user
            && host::running_as_root()
            && let Ok(Some(u)) = nix::unistd::User::from_name(user)
        {
            nix::unistd::chown(&dir, Some(u.uid), Some(u.gid))
                .with_context(|| format!("cannot hand {} to {user}", dir.display()))?;
        }
        Ok(())
    }

    /// Starts worker `i`; a failure to start at all ends the daemon (`Err(exit code)`).
    async fn start_worker(&mut self, i: usize) -> Result<(), u8> {
        // Every start of the bundled server gets a new incarnation, so its connection ids differ
        // from every earlier process's.
        let incarnation = self.config.child.command.is_none().then(|| {
            let (n, warning) = self.incarnations.take();
            if let Some(w) = warning {
                self.log.warn(&w);
            }
            n
        });
        let argv = child::argv(&self.config, &self.exe, &self.sizing, i, incarnation);
        let mut kid = match child::spawn(&self.config, &argv) {
            Ok(k) => k,
            Err(e) => {
                let msg = format!("{e:#}");
                self.log.err(&msg);
                self.stop_all_quietly().await;
                self.save_status("failed", &msg);
                return Err(1);
            }
        };
        let pid = kid.id().unwrap_or(0);
        let tx = self.exits_tx.clone();
        tokio::spawn(async move {
            let st = kid.wait().await;
            let _ = tx.send((i, pid, st));
        });
        let ready_timeout = Duration::from_millis(self.config.ready_timeout_ms);
        let slot = &mut self.slots[i];
        slot.pid = Some(pid);
        slot.incarnation = incarnation;
        slot.started = Some(Instant::now());
        slot.listening = false;
        slot.not_ready = false;
        slot.replacing = false;
        slot.kill_at = None;
        slot.restart_at = None;
        slot.ready_by = Some(Instant::now() + ready_timeout);
        self.status.child_command = argv.clone();
        let name = self.name(i);
        self.log
            .info(&format!("{name} started: pid {pid}: {}", argv.join(" ")));
        self.save_status(
            if self.ready_sent {
                "running"
            } else {
                "starting"
            },
            &format!(
                "{name} ({pid}) started, waiting for it to listen on {}",
                self.config.listen
            ),
        );
        Ok(())
    }

    /// Every 50 ms: readiness of new workers, due restarts, overdue stops, rolling replacement.
    async fn on_tick(&mut self) -> Option<End> {
        let now_i = Instant::now();
        for i in 0..self.slots.len() {
            let Some(pid) = self.slots[i].pid else {
                if self.slots[i].restart_at.is_some_and(|t| t <= now_i)
                    && let Err(code) = self.start_worker(i).await
                {
                    return Some(End::Code(code));
                }
                continue;
            };
            if self.slots[i].kill_at.is_some_and(|t| t <= now_i) {
                self.log.warn(&format!(
                    "{} ({pid}) ignored SIGTERM for {} ms: SIGKILL",
                    self.name(i),
                    self.config.stop_grace_ms
                ));
                child::signal_group(pid, Signal::SIGKILL);
                self.slots[i].kill_at = None;
            }
            if self.slots[i].listening || self.slots[i].not_ready {
                continue;
            }
            if self.check_listening(pid) {
                self.slots[i].listening = true;
                self.verify_child(pid);
                if self.ready_sent {
                    let msg = format!("{} ({pid}) listens again", self.name(i));
                    self.log.notice(&msg);
                    self.save_status("running", &msg);
                }
            } else if self.slots[i].ready_by.is_some_and(|t| t < now_i) {
                self.log.err(&format!(
                    "{} ({pid}) did not listen on {} within {} ms; stopping it",
                    self.name(i),
                    self.config.listen,
                    self.config.ready_timeout_ms
                ));
                self.slots[i].not_ready = true;
                self.terminate(i);
            }
        }
        if !self.ready_sent && self.slots.iter().all(|s| s.listening) {
            self.ready_sent = true;
            let pids: Vec<String> = self
                .slots
                .iter()
                .filter_map(|s| s.pid.map(|p| p.to_string()))
                .collect();
            let msg = format!(
                "serving on {} ({} {}, profile {}, {} failing check(s))",
                self.config.listen,
                if pids.len() == 1 { "child" } else { "workers" },
                pids.join(", "),
                self.profile.name,
                self.status.failing_checks.len()
            );
            self.log.notice(&msg);
            // The status file first, so `tunegate status` agrees with systemd at once.
            self.save_status("running", &msg);
            self.notify
                .send(&format!("READY=1\nMAINPID={}", std::process::id()));
        }
        // A reload replaces workers one at a time, each once all the others listen, so the
        // port never stops answering.
        if self
            .slots
            .iter()
            .all(|s| s.listening && !s.replacing && s.pid.is_some())
            && let Some(i) = self.slots.iter().position(|s| s.stale)
        {
            self.slots[i].stale = false;
            self.slots[i].replacing = true;
            self.log
                .notice(&format!("replacing {} for the new settings", self.name(i)));
            self.terminate(i);
        }
        None
    }

    /// SIGTERM to slot `i`'s process group; SIGKILL follows after the grace period.
    fn terminate(&mut self, i: usize) {
        if let Some(pid) = self.slots[i].pid {
            child::signal_group(pid, Signal::SIGTERM);
            self.slots[i].kill_at =
                Some(Instant::now() + Duration::from_millis(self.config.stop_grace_ms));
        }
    }

    /// A child ended. Restarts it alone (the others keep their connections), or ends the
    /// daemon when the policy says so or it is crash-looping.
    async fn on_exit(&mut self, i: usize, pid: u32, st: std::process::ExitStatus) -> Option<End> {
        if self.slots[i].pid != Some(pid) {
            return None;
        }
        // Anything it left in its group goes too.
        child::signal_group(pid, Signal::SIGKILL);
        let name = self.name(i);
        let slot = &mut self.slots[i];
        let ran = slot.started.map_or(Duration::ZERO, |t| t.elapsed());
        slot.pid = None;
        slot.listening = false;
        slot.kill_at = None;
        let how = if slot.not_ready {
            format!("never listened ({})", describe(&st))
        } else {
            describe(&st)
        };
        slot.last_exit = Some(how.clone());
        if slot.replacing {
            slot.replacing = false;
            slot.restart_at = Some(Instant::now());
            self.log
                .info(&format!("{name} ({pid}) {how}; starting its replacement"));
            return None;
        }
        let failed = !st.success() || slot.not_ready;
        match (self.config.restart.policy, failed) {
            (RestartPolicy::Never, _) | (RestartPolicy::OnFailure, false) => {
                self.log.notice(&format!(
                    "{name} ({pid}) {how}; not restarting ({:?})",
                    self.config.restart.policy
                ));
                self.stop_all_quietly().await;
                self.save_status("stopped", &format!("{name} {how}"));
                return Some(End::Code(if failed { 1 } else { 0 }));
            }
            _ => {}
        }
        let window = Duration::from_secs(self.config.restart.crash_window_s);
        if ran > window {
            slot.consecutive_failures = 0;
        }
        if failed {
            slot.consecutive_failures += 1;
            slot.crashes.push_back(Instant::now());
            while slot.crashes.front().is_some_and(|t| t.elapsed() > window) {
                slot.crashes.pop_front();
            }
            if slot.crashes.len() as u32 >= self.config.restart.max_crashes {
                let msg = format!(
                    "crash loop: {name} failed {} times within {} s (last: {how}); giving up",
                    slot.crashes.len(),
                    self.config.restart.crash_window_s
                );
                self.log.err(&msg);
                self.stop_all_quietly().await;
                self.save_status("failed", &msg);
                return Some(End::Code(1));
            }
        }
        let delay = backoff(&self.config.restart, slot.consecutive_failures);
        slot.restarts += 1;
        slot.restart_at = Some(Instant::now() + delay);
        let others = self.slots.iter().filter(|s| s.pid.is_some()).count();
        let msg = format!(
            "{name} ({pid}) {how} after {:.1} s; restarting in {} ms{}",
            ran.as_secs_f64(),
            delay.as_millis(),
            if self.slots.len() > 1 {
                format!("; the other {others} worker(s) keep serving")
            } else {
                String::new()
            }
        );
        self.log.warn(&msg);
        self.save_status(
            if self.slots.len() > 1 && self.ready_sent {
                "running"
            } else {
                "restarting"
            },
            &msg,
        );
        None
    }

    /// SIGTERM or SIGINT: stop every child (grace, then SIGKILL) and end with 0.
    async fn stop_all(&mut self, why: &'static str) -> End {
        self.log.notice(&format!("{why}: stopping the children"));
        self.notify.send("STOPPING=1");
        self.save_status("stopping", why);
        self.stop_all_quietly().await;
        self.save_status("stopped", why);
        End::Code(0)
    }

    /// SIGTERM to every child's group, the grace period, SIGKILL to what is left; reaps all.
    async fn stop_all_quietly(&mut self) {
        let groups: Vec<u32> = self.slots.iter().filter_map(|s| s.pid).collect();
        for &pid in &groups {
            child::signal_group(pid, Signal::SIGTERM);
        }
        for s in &mut self.slots {
            s.restart_at = None;
        }
        let grace = Duration::from_millis(self.config.stop_grace_ms);
        let deadline = tokio::time::Instant::now() + grace;
        while self.slots.iter().any(|s| s.pid.is_some()) {
            match tokio::time::timeout_at(deadline, self.exits.recv()).await {
                Ok(Some((i, pid, st))) => {
                    if self.slots[i].pid == Some(pid) {
                        let how = st.map(|s| describe(&s)).unwrap_or_else(|e| e.to_string());
                        self.log.info(&format!("{} ({pid}) {how}", self.name(i)));
                        self.slots[i].pid = None;
                        self.slots[i].listening = false;
                        self.slots[i].last_exit = Some(how);
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    for (i, s) in self.slots.iter().enumerate() {
                        if let Some(pid) = s.pid {
                            self.log.warn(&format!(
                                "{} ({pid}) ignored SIGTERM for {} ms: SIGKILL",
                                self.name(i),
                                grace.as_millis()
                            ));
                            child::signal_group(pid, Signal::SIGKILL);
                        }
                    }
                    // SIGKILL cannot be ignored: the exits follow promptly.
                    let more = tokio::time::Instant::now() + Duration::from_secs(5);
                    while self.slots.iter().any(|s| s.pid.is_some()) {
                        match tokio::time::timeout_at(more, self.exits.recv()).await {
                            Ok(Some((i, pid, _))) if self.slots[i].pid == Some(pid) => {
                                self.slots[i].pid = None;
                                self.slots[i].listening = false;
                            }
                            Ok(Some(_)) => {}
                            _ => break,
                        }
                    }
                    break;
                }
            }
        }
        // Anything left in their groups goes too.
        for pid in groups {
            child::signal_group(pid, Signal::SIGKILL);
        }
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

    /// SIGHUP: re-read config and profile, re-apply, pass HUP on. Workers whose command line
    /// changed are replaced one at a time (the port keeps answering); a changed worker count
    /// needs all of them replaced together, since the bus is sized for one count.
    async fn reload(&mut self) -> Option<End> {
        self.notify.send("RELOADING=1");
        let root = host::running_as_root();
        let loaded = Config::load(&self.opts.config_path, self.opts.explicit, root)
            .map_err(anyhow::Error::from)
            .and_then(|c| Ok((profile::load(&c.profile, root)?, c)));
        let (profile, config) = match loaded {
            Ok(l) => l,
            Err(e) => {
                self.log.err(&format!(
                    "reload refused, keeping the running configuration: {e:#}"
                ));
                self.notify.send("READY=1");
                return None;
            }
        };
        let old_argv: Vec<Vec<String>> = (0..self.slots.len())
            .map(|i| child::argv(&self.config, &self.exe, &self.sizing, i, None))
            .collect();
        let old_workers = self.sizing.workers;
        self.config = config;
        self.profile = profile;
        self.status.profile = self.profile.name.clone();
        if let Err(e) = self.tune_and_gate() {
            self.log.err(&format!("reload: {e:#}"));
        }
        self.size_workers();
        self.log.notice(&format!(
            "reloaded configuration and profile {}",
            self.profile.name
        ));
        for s in &self.slots {
            if let Some(pid) = s.pid {
                child::signal_group(pid, Signal::SIGHUP);
            }
        }
        if self.sizing.workers != old_workers {
            self.log.notice(&format!(
                "worker count changes from {old_workers} to {}: restarting all workers",
                self.sizing.workers
            ));
            self.stop_all_quietly().await;
            if let Err(e) = self.prepare_bus_dir() {
                let msg = format!("{e:#}");
                self.log.err(&msg);
                self.save_status("failed", &msg);
                return Some(End::Code(1));
            }
            self.slots = (0..self.sizing.workers).map(|_| Slot::default()).collect();
            self.ready_sent = false;
            for i in 0..self.slots.len() {
                if let Err(code) = self.start_worker(i).await {
                    return Some(End::Code(code));
                }
            }
        } else {
            for (i, old) in old_argv.iter().enumerate() {
                if &child::argv(&self.config, &self.exe, &self.sizing, i, None) != old {
                    self.slots[i].stale = true;
                }
            }
            if self.slots.iter().any(|s| s.stale) {
                self.log
                    .notice("child settings changed: replacing the child(ren) one at a time");
            }
            self.notify.send("READY=1");
        }
        self.refresh_status();
        let _ = self.status.save(&self.config.status_file);
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
}

/// Exponential backoff with ±20 % jitter, so a fleet does not restart in lockstep.
fn backoff(r: &config::Restart, consecutive_failures: u32) -> Duration {
    let exp = consecutive_failures.saturating_sub(1).min(20);
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
