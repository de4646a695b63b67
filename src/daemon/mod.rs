//! `tunegate run`: the service. The only module that knows both sides of tunegate.
//!
//! load config and profile -> preflight -> apply what is missing (raise-only, journaled) ->
//! preflight again -> gate (enforce or warn) (`gate.rs`) -> size the workers (`sizing.rs`) ->
//! start and supervise them (`supervisor.rs`, a pure state machine; this file carries out what
//! it decides) -> READY=1 once every one listens -> drift checks, reload on SIGHUP, stop on
//! SIGTERM.
//!
//! One thread (tokio's current-thread runtime): children must be forked from a thread that
//! lives as long as the daemon, or PR_SET_PDEATHSIG would kill them when a worker thread exits.

pub mod child;
pub mod config;
mod gate;
pub mod incarnation;
pub mod log;
mod metrics;
pub mod notify;
pub mod saturation;
pub mod sizing;
pub mod status;
pub mod supervisor;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use config::{Config, Mode};
use log::Log;
use notify::Notifier;
use sizing::{Fixed, Sizing};
use status::{Status, WorkerStatus, now};
use supervisor::{Action, Event, Supervisor};
use tuning::host::{self, Host};
use tuning::profile::{self, Profile};

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
    sup: Supervisor,
    /// Each worker's current incarnation (the bundled server only).
    incarnation_of: Vec<Option<u16>>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits: mpsc::UnboundedReceiver<Exit>,
    last_values: HashMap<String, String>,
    /// Where every worker start gets its connection-id incarnation.
    incarnations: incarnation::Incarnations,
    watch: saturation::Watch,
    /// What the metrics listener serves.
    page: metrics::Page,
    /// Each running worker's listener inodes, found once per process (a readlink per
    /// descriptor is too dear to repeat every sample with 20,000 connections held).
    listener_inodes: HashMap<u32, Option<std::collections::HashSet<u64>>>,
}

/// A child ended: (worker, pid, how).
type Exit = (usize, u32, std::io::Result<std::process::ExitStatus>);

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
        let sup = Supervisor::new(policy(&config), 0, Instant::now());
        let watch = saturation::Watch::new(config.saturation.clone());
        Daemon {
            opts,
            config,
            profile,
            log,
            notify: Notifier::from_env(),
            status,
            exe: std::env::current_exe().unwrap_or_else(|_| "tunegate".into()),
            sizing: Sizing::default(),
            sup,
            incarnation_of: Vec::new(),
            exits_tx,
            exits,
            last_values: HashMap::new(),
            incarnations,
            watch,
            page: metrics::Page::default(),
            listener_inodes: HashMap::new(),
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

    /// Copies the supervisor's view of the workers into the status (saved by the caller).
    fn refresh_status(&mut self) {
        let workers = self.sup.workers();
        self.status.workers = workers
            .iter()
            .enumerate()
            .map(|(index, w)| WorkerStatus {
                index,
                pid: w.pid,
                started_at: w
                    .started
                    .map(|t| now().saturating_sub(t.elapsed().as_secs())),
                listening: w.listening,
                restarts: w.restarts,
                last_exit: w.last_exit.clone(),
                incarnation: self.incarnation_of.get(index).copied().flatten(),
            })
            .collect();
        self.status.child_pid = workers.first().and_then(|w| w.pid);
        self.status.child_started_at = self.status.workers.first().and_then(|w| w.started_at);
        self.status.restarts = workers.iter().map(|w| w.restarts).sum();
        self.status.ready = self.sup.ready();
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
        if let Some(addr) = self.config.metrics_listen {
            match metrics::serve(addr, self.page.clone()).await {
                Ok(bound) => self
                    .log
                    .notice(&format!("metrics on http://{bound}/metrics")),
                Err(e) => self.log.err(&format!(
                    "cannot serve metrics on {addr}: {e} (going on without)"
                )),
            }
        }
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
        self.sup = Supervisor::new(policy(&self.config), self.sizing.workers, Instant::now());
        self.incarnation_of = vec![None; self.sizing.workers];

        let mut drift =
            tokio::time::interval(Duration::from_secs(self.config.drift.interval_s.max(1)));
        drift.reset();
        let mut watchdog =
            tokio::time::interval(self.notify.watchdog.unwrap_or(Duration::from_secs(3600)));
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let every = self.config.saturation.interval_s;
        let mut sample = tokio::time::interval(Duration::from_secs(every.max(1)));
        loop {
            let event = tokio::select! {
                Some((worker, pid, st)) = self.exits.recv() => Some(exited(worker, pid, st)),
                _ = term.recv() => Some(self.stopping("SIGTERM")),
                _ = int.recv() => Some(self.stopping("SIGINT")),
                _ = hup.recv() => self.reload().await,
                _ = watchdog.tick() => { self.notify.send("WATCHDOG=1"); None }
                _ = drift.tick() => {
                    if self.config.drift.interval_s > 0 && self.sup.came_up() {
                        self.check_drift();
                    }
                    None
                }
                _ = tick.tick() => {
                    self.look_for_listeners();
                    Some(Event::Tick(Instant::now()))
                }
                _ = sample.tick(), if every > 0 => {
                    self.sample_saturation();
                    None
                }
            };
            if let Some(event) = event
                && let Some(code) = self.feed(event)
            {
                return Ok(code);
            }
        }
    }

    /// One sample of the saturation watch: the host and every running server process; what
    /// crossed a threshold is logged; the status and the metrics page are brought up to date.
    fn sample_saturation(&mut self) {
        use tuning::host::saturation;
        let host = saturation::sample_host(&self.opts.host);
        let workers: Vec<(usize, u32)> = self
            .sup
            .workers()
            .iter()
            .enumerate()
            .filter_map(|(i, w)| w.pid.map(|p| (i, p)))
            .collect();
        let mut processes = Vec::new();
        let outgoing = self
            .config
            .saturation
            .ephemeral_ports
            .unwrap_or(self.profile.proxy.is_some());
        if outgoing && let Some(level) = saturation::sample_ephemeral(&self.opts.host) {
            processes.push(level);
        }
        self.listener_inodes
            .retain(|pid, _| workers.iter().any(|(_, p)| p == pid));
        // One dump of the listeners for every process of the sample.
        let listeners = tuning::host::process::all_listeners().unwrap_or_default();
        for (i, pid) in workers {
            let name = if self.sizing.workers > 1 {
                format!("worker-{i}")
            } else {
                "child".to_string()
            };
            let inodes = self.listener_inodes.entry(pid).or_default();
            processes.extend(saturation::sample_process(
                pid as i32, &name, &listeners, inodes,
            ));
        }
        if self.sizing.workers > 1 {
            // The whole server, as well as each worker.
            let fds: Vec<&tuning::host::saturation::Level> = processes
                .iter()
                .filter(|l| l.id.starts_with("descriptors.worker-"))
                .collect();
            if !fds.is_empty() {
                processes.push(tuning::host::saturation::Level {
                    id: "descriptors.server".into(),
                    what: format!(
                        "descriptors of all {} workers against their limits",
                        fds.len()
                    ),
                    used: fds.iter().map(|l| l.used).sum(),
                    limit: fds.iter().map(|l| l.limit).sum(),
                    fix: "raise limits.nofile, or target_connections for more workers".into(),
                });
            }
        }
        let somaxconn = tuning::tunables::SysctlKey::parse("net.core.somaxconn")
            .ok()
            .and_then(|k| self.opts.host.read_sysctl(&k).ok().flatten())
            .and_then(|v| v.trim().parse().ok());
        let mut queues: Vec<String> = processes
            .iter()
            .filter_map(|l| {
                let port = l.id.strip_prefix("accept_queue.")?.rsplit_once('.')?.1;
                Some(format!("accept queue limit {} on port {port}; ", l.limit))
            })
            .collect();
        queues.sort();
        queues.dedup();
        let context = self::saturation::OverflowContext {
            somaxconn,
            queues: queues.concat(),
        };
        let page = metrics::render(&host, &[&host.levels[..], &processes[..]].concat());
        let (lines, levels) = self
            .watch
            .observe(&host, processes, &context, Instant::now());
        for (priority, line) in lines {
            self.log.line(priority, &line);
        }
        if let Ok(mut p) = self.page.lock() {
            *p = page;
        }
        self.status.saturation = levels;
        self.status.drops = Some(self.watch.drops.clone());
        self.status.last_saturation_sample = Some(now());
        if let Err(e) = self.status.save(&self.config.status_file) {
            self.log.warn(&format!("cannot write status file: {e:#}"));
        }
    }

    /// SIGTERM or SIGINT: systemd hears that the service is stopping.
    fn stopping(&mut self, why: &'static str) -> Event {
        self.notify.send("STOPPING=1");
        Event::Stop {
            why,
            at: Instant::now(),
        }
    }

    /// Feeds an event to the supervisor and carries out what it decides (a spawn's outcome is
    /// fed back at once). `Some(code)` when the daemon ends.
    fn feed(&mut self, event: Event) -> Option<u8> {
        let mut queue = std::collections::VecDeque::from([event]);
        while let Some(event) = queue.pop_front() {
            for action in self.sup.handle(event) {
                match action {
                    Action::Spawn(worker) => queue.push_back(self.spawn(worker)),
                    Action::Term(pid) => child::signal_group(pid, Signal::SIGTERM),
                    Action::Kill(pid) => child::signal_group(pid, Signal::SIGKILL),
                    Action::ResetBus => {
                        if let Err(e) = self.prepare_bus_dir() {
                            let msg = format!("{e:#}");
                            self.log.err(&msg);
                            self.save_status("failed", &msg);
                            return Some(1);
                        }
                        self.incarnation_of = vec![None; self.sizing.workers];
                    }
                    Action::Ready => self.announce_ready(),
                    Action::Log(level, message) => self.log.line(level, &message),
                    Action::Status(state, message) => self.save_status(state, &message),
                    Action::Exit(code) => return Some(code),
                }
            }
        }
        None
    }

    /// Starts worker `i` with a new incarnation; what happened, for the supervisor.
    fn spawn(&mut self, i: usize) -> Event {
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
                return Event::SpawnFailed {
                    worker: i,
                    error: format!("{e:#}"),
                    at: Instant::now(),
                };
            }
        };
        let pid = kid.id().unwrap_or(0);
        let tx = self.exits_tx.clone();
        tokio::spawn(async move {
            let st = kid.wait().await;
            let _ = tx.send((i, pid, st));
        });
        if let Some(current) = self.incarnation_of.get_mut(i) {
            *current = incarnation;
        }
        let name = if self.sizing.workers == 1 {
            "the child".to_string()
        } else {
            format!("worker {i}")
        };
        self.log
            .info(&format!("{name} started: pid {pid}: {}", argv.join(" ")));
        self.status.child_command = argv;
        Event::Started {
            worker: i,
            pid,
            at: Instant::now(),
        }
    }

    /// Tells the supervisor which waiting workers now listen (and checks what each got).
    fn look_for_listeners(&mut self) {
        for (worker, pid) in self.sup.awaiting_listen() {
            if self.check_listening(pid) {
                self.verify_child(pid);
                if let Some(code) = self.feed(Event::Listening { worker, pid }) {
                    // Listening never ends the daemon; keep the code for the record anyway.
                    self.log
                        .err(&format!("unexpected end ({code}) on a listen"));
                }
            }
        }
    }

    /// Every worker listens for the first time: the service is up.
    fn announce_ready(&mut self) {
        let pids: Vec<String> = self
            .sup
            .workers()
            .iter()
            .filter_map(|w| w.pid.map(|p| p.to_string()))
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

    /// SIGHUP: re-read config and profile, re-apply, pass HUP on. Workers whose command line
    /// changed are replaced one at a time (the port keeps answering); a changed worker count
    /// needs all of them replaced together, since the bus is sized for one count.
    async fn reload(&mut self) -> Option<Event> {
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
        let workers = self.sizing.workers;
        let old_argv: Vec<Vec<String>> = (0..workers)
            .map(|i| child::argv(&self.config, &self.exe, &self.sizing, i, None))
            .collect();
        self.config = config;
        self.profile = profile;
        self.status.profile = self.profile.name.clone();
        self.sup.set_policy(policy(&self.config));
        if let Err(e) = self.tune_and_gate() {
            self.log.err(&format!("reload: {e:#}"));
        }
        self.size_workers();
        self.log.notice(&format!(
            "reloaded configuration and profile {}",
            self.profile.name
        ));
        for w in self.sup.workers() {
            if let Some(pid) = w.pid {
                child::signal_group(pid, Signal::SIGHUP);
            }
        }
        self.refresh_status();
        let _ = self.status.save(&self.config.status_file);
        if self.sizing.workers != workers {
            return Some(Event::Resize {
                workers: self.sizing.workers,
                at: Instant::now(),
            });
        }
        let stale: Vec<usize> = (0..workers)
            .filter(|&i| child::argv(&self.config, &self.exe, &self.sizing, i, None) != old_argv[i])
            .collect();
        if !stale.is_empty() {
            self.log
                .notice("child settings changed: replacing the child(ren) one at a time");
        }
        self.notify.send("READY=1");
        Some(Event::Replace { workers: stale })
    }
}

/// The supervisor's rules, from the configuration.
fn policy(config: &Config) -> supervisor::Policy {
    supervisor::Policy {
        restart: config.restart.clone(),
        stop_grace: Duration::from_millis(config.stop_grace_ms),
        ready_timeout: Duration::from_millis(config.ready_timeout_ms),
        listen: config.listen.to_string(),
    }
}

/// A child's end, as the supervisor hears it (with a fresh jitter for its backoff).
fn exited(worker: usize, pid: u32, st: std::io::Result<std::process::ExitStatus>) -> Event {
    let (failed, how) = match st {
        Ok(st) => (!st.success(), describe(&st)),
        Err(e) => (true, format!("could not be waited for: {e}")),
    };
    let mut seed = [0u8; 2];
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed));
    let jitter = u16::from_ne_bytes(seed) as f64 / u16::MAX as f64 * 2.0 - 1.0;
    Event::Exited {
        worker,
        pid,
        failed,
        how,
        at: Instant::now(),
        jitter,
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
