//! Supervision as a state machine with no I/O: events in (a child started, listens, exited; time
//! passed; stop; reload), actions out (spawn, signal, ready, log, status, exit). The daemon's
//! plumbing (`mod.rs`) turns signals, child exits and a 50 ms tick into events and carries out
//! the actions; everything that decides — backoff, crash loops, readiness deadlines, rolling
//! replacement, the stop sequence — is here and is tested in milliseconds with a fake clock.
//!
//! One `Worker` per process the daemon runs: the bundled server's workers, or the one custom
//! child. A dead worker is restarted alone while the others keep their connections.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::config::{Restart, RestartPolicy};
use super::log::Level;

/// What the supervisor is told.
#[derive(Clone, Debug)]
pub enum Event {
    /// Time passed: due restarts, overdue kills, readiness deadlines, rolling replacement.
    Tick(Instant),
    /// `Action::Spawn(worker)` succeeded.
    Started {
        worker: usize,
        pid: u32,
        at: Instant,
    },
    /// `Action::Spawn(worker)` failed: the daemon cannot run its children at all.
    SpawnFailed {
        worker: usize,
        error: String,
        at: Instant,
    },
    /// The plumbing saw the worker's process listen on the port.
    Listening { worker: usize, pid: u32 },
    /// A child ended. `failed`: not exit status 0. `jitter` in [-1, 1] spreads restarts of a
    /// fleet (the plumbing draws it).
    Exited {
        worker: usize,
        pid: u32,
        failed: bool,
        how: String,
        at: Instant,
        jitter: f64,
    },
    /// SIGTERM or SIGINT: stop every child, then exit 0.
    Stop { why: &'static str, at: Instant },
    /// A reload changed these workers' command lines: replace them one at a time.
    Replace { workers: Vec<usize> },
    /// A reload changed the worker count: stop them all, then start `workers` afresh.
    Resize { workers: usize, at: Instant },
}

/// What the plumbing must do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Start worker N (then report `Started` or `SpawnFailed`).
    Spawn(usize),
    /// SIGTERM to the process group of this pid.
    Term(u32),
    /// SIGKILL to the process group of this pid.
    Kill(u32),
    /// Prepare the bus directory for a new set of workers (after a resize).
    ResetBus,
    /// Every worker listens for the first time: tell systemd (READY=1).
    Ready,
    Log(Level, String),
    /// The state and message `tunegate status` shows.
    Status(&'static str, String),
    /// The daemon ends with this exit code.
    Exit(u8),
}

/// The part of the configuration supervision needs.
#[derive(Clone, Debug)]
pub struct Policy {
    pub restart: Restart,
    pub stop_grace: Duration,
    pub ready_timeout: Duration,
    /// Where the children must listen (for messages).
    pub listen: String,
}

#[derive(Clone, Debug, Default)]
pub struct Worker {
    pub pid: Option<u32>,
    pub started: Option<Instant>,
    pub listening: bool,
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
    /// SIGKILL was sent; give up on its exit then.
    killed: bool,
    restart_at: Option<Instant>,
    pub restarts: u64,
    crashes: VecDeque<Instant>,
    consecutive_failures: u32,
    pub last_exit: Option<String>,
}

/// Where the whole set is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    /// Stopping every child, then ending with this code and status state.
    Ending(u8, &'static str),
    /// Stopping every child, then starting this many afresh.
    Resizing(usize),
    /// `Exit` was said: nothing starts any more.
    Ended,
}

pub struct Supervisor {
    policy: Policy,
    workers: Vec<Worker>,
    phase: Phase,
    ready_sent: bool,
    /// The status message to show once an ending stop is complete.
    ending_message: Option<String>,
    actions: Vec<Action>,
}

impl Supervisor {
    /// `n` workers, none started: the first `Tick` spawns them all.
    pub fn new(policy: Policy, n: usize, now: Instant) -> Supervisor {
        let workers = (0..n)
            .map(|_| Worker {
                restart_at: Some(now),
                ..Worker::default()
            })
            .collect();
        Supervisor {
            policy,
            workers,
            phase: Phase::Running,
            ready_sent: false,
            ending_message: None,
            actions: Vec::new(),
        }
    }

    /// New rules after a reload; they apply from the next event on.
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    pub fn workers(&self) -> &[Worker] {
        &self.workers
    }

    /// READY=1 was sent and every worker listens.
    pub fn ready(&self) -> bool {
        self.ready_sent && self.workers.iter().all(|w| w.listening)
    }

    /// READY=1 was sent once (the service is up, whatever happened since).
    pub fn came_up(&self) -> bool {
        self.ready_sent
    }

    /// Workers whose process runs but has not been seen listening yet: the plumbing looks,
    /// and reports `Listening`.
    pub fn awaiting_listen(&self) -> Vec<(usize, u32)> {
        self.workers
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.listening && !w.not_ready)
            .filter_map(|(i, w)| w.pid.map(|p| (i, p)))
            .collect()
    }

    /// Feeds one event; returns what to do.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        match event {
            Event::Tick(now) => self.tick(now),
            Event::Started { worker, pid, at } => self.started(worker, pid, at),
            Event::SpawnFailed { error, at, .. } => {
                self.log(Level::Err, error.clone());
                self.end(1, "failed", &error, at);
            }
            Event::Listening { worker, pid } => self.listening(worker, pid),
            Event::Exited {
                worker,
                pid,
                failed,
                how,
                at,
                jitter,
            } => self.exited(worker, pid, failed, how, at, jitter),
            Event::Stop { why, at } => {
                self.log(Level::Notice, format!("{why}: stopping the children"));
                self.status("stopping", why.to_string());
                self.end(0, "stopped", why, at);
            }
            Event::Replace { workers } => {
                for i in workers {
                    if let Some(w) = self.workers.get_mut(i) {
                        w.stale = true;
                    }
                }
            }
            Event::Resize { workers, at } => {
                let from = self.workers.len();
                self.log(
                    Level::Notice,
                    format!(
                        "worker count changes from {from} to {workers}: restarting all workers"
                    ),
                );
                self.phase = Phase::Resizing(workers);
                self.stop_all(at);
                self.after_stop();
            }
        }
        std::mem::take(&mut self.actions)
    }

    fn log(&mut self, level: Level, message: String) {
        self.actions.push(Action::Log(level, message));
    }

    fn status(&mut self, state: &'static str, message: String) {
        self.actions.push(Action::Status(state, message));
    }

    /// "the child" when there is one, "worker N" among several.
    fn name(&self, i: usize) -> String {
        if self.workers.len() == 1 {
            "the child".into()
        } else {
            format!("worker {i}")
        }
    }

    fn started(&mut self, i: usize, pid: u32, at: Instant) {
        let ready_by = at + self.policy.ready_timeout;
        let w = &mut self.workers[i];
        *w = Worker {
            pid: Some(pid),
            started: Some(at),
            ready_by: Some(ready_by),
            restarts: w.restarts,
            crashes: std::mem::take(&mut w.crashes),
            consecutive_failures: w.consecutive_failures,
            last_exit: w.last_exit.take(),
            ..Worker::default()
        };
        let msg = format!(
            "{} ({pid}) started, waiting for it to listen on {}",
            self.name(i),
            self.policy.listen
        );
        let state = if self.ready_sent {
            "running"
        } else {
            "starting"
        };
        self.status(state, msg);
    }

    fn listening(&mut self, i: usize, pid: u32) {
        let Some(w) = self.workers.get_mut(i) else {
            return;
        };
        if w.pid != Some(pid) || w.listening {
            return;
        }
        w.listening = true;
        if self.ready_sent {
            let msg = format!("{} ({pid}) listens again", self.name(i));
            self.log(Level::Notice, msg.clone());
            self.status("running", msg);
        }
    }

    fn tick(&mut self, now: Instant) {
        for i in 0..self.workers.len() {
            self.tick_worker(i, now);
        }
        if self.phase != Phase::Running {
            return self.after_stop();
        }
        if !self.ready_sent && self.workers.iter().all(|w| w.listening) {
            self.ready_sent = true;
            self.actions.push(Action::Ready);
        }
        // A reload replaces workers one at a time, each once all the others listen, so the
        // port never stops answering.
        if self
            .workers
            .iter()
            .all(|w| w.listening && !w.replacing && w.pid.is_some())
            && let Some(i) = self.workers.iter().position(|w| w.stale)
        {
            self.workers[i].stale = false;
            self.workers[i].replacing = true;
            let msg = format!("replacing {} for the new settings", self.name(i));
            self.log(Level::Notice, msg);
            self.terminate(i, now);
        }
    }

    fn tick_worker(&mut self, i: usize, now: Instant) {
        let w = &self.workers[i];
        let Some(pid) = w.pid else {
            if self.phase == Phase::Running && w.restart_at.is_some_and(|t| t <= now) {
                self.workers[i].restart_at = None;
                self.actions.push(Action::Spawn(i));
            }
            return;
        };
        if w.kill_at.is_some_and(|t| t <= now) {
            if w.killed {
                // SIGKILL cannot be ignored; a process stuck in the kernel is let go.
                let msg = format!(
                    "{} ({pid}) did not exit after SIGKILL; giving up on it",
                    self.name(i)
                );
                self.log(Level::Err, msg);
                let w = &mut self.workers[i];
                w.pid = None;
                w.listening = false;
                return;
            }
            let msg = format!(
                "{} ({pid}) ignored SIGTERM for {} ms: SIGKILL",
                self.name(i),
                self.policy.stop_grace.as_millis()
            );
            self.log(Level::Warning, msg);
            self.actions.push(Action::Kill(pid));
            let w = &mut self.workers[i];
            w.killed = true;
            w.kill_at = Some(now + Duration::from_secs(5));
            return;
        }
        if self.phase == Phase::Running
            && !w.listening
            && !w.not_ready
            && w.ready_by.is_some_and(|t| t < now)
        {
            let msg = format!(
                "{} ({pid}) did not listen on {} within {} ms; stopping it",
                self.name(i),
                self.policy.listen,
                self.policy.ready_timeout.as_millis()
            );
            self.log(Level::Err, msg);
            self.workers[i].not_ready = true;
            self.terminate(i, now);
        }
    }

    /// SIGTERM to worker `i`; SIGKILL follows after the grace period.
    fn terminate(&mut self, i: usize, now: Instant) {
        if let Some(pid) = self.workers[i].pid {
            self.actions.push(Action::Term(pid));
            self.workers[i].kill_at = Some(now + self.policy.stop_grace);
        }
    }

    /// Stops every child (restarts cancelled); `after_stop` finishes once all are gone.
    fn stop_all(&mut self, now: Instant) {
        for i in 0..self.workers.len() {
            self.workers[i].restart_at = None;
            if self.workers[i].kill_at.is_none() {
                self.terminate(i, now);
            }
        }
    }

    /// Ends the daemon with `code` once every child is gone.
    fn end(&mut self, code: u8, state: &'static str, message: &str, now: Instant) {
        if matches!(self.phase, Phase::Ending(..) | Phase::Ended) {
            return;
        }
        self.phase = Phase::Ending(code, state);
        self.ending_message = Some(message.to_string());
        self.stop_all(now);
        self.after_stop();
    }

    fn after_stop(&mut self) {
        if self.workers.iter().any(|w| w.pid.is_some()) {
            return;
        }
        match self.phase {
            Phase::Running | Phase::Ended => {}
            Phase::Ending(code, state) => {
                let message = self.ending_message.take().unwrap_or_default();
                self.status(state, message);
                self.actions.push(Action::Exit(code));
                self.phase = Phase::Ended;
            }
            Phase::Resizing(n) => {
                self.phase = Phase::Running;
                self.ready_sent = false;
                self.workers = (0..n).map(|_| Worker::default()).collect();
                self.actions.push(Action::ResetBus);
                self.actions.extend((0..n).map(Action::Spawn));
            }
        }
    }

    fn exited(&mut self, i: usize, pid: u32, failed: bool, how: String, at: Instant, jitter: f64) {
        let Some(w) = self.workers.get_mut(i) else {
            return;
        };
        if w.pid != Some(pid) {
            return;
        }
        // Anything it left in its group goes too.
        self.actions.push(Action::Kill(pid));
        let ran = w
            .started
            .map_or(Duration::ZERO, |t| at.saturating_duration_since(t));
        let how = if w.not_ready {
            format!("never listened ({how})")
        } else {
            how
        };
        w.pid = None;
        w.listening = false;
        w.kill_at = None;
        w.killed = false;
        w.last_exit = Some(how.clone());
        let name = self.name(i);
        if self.phase != Phase::Running {
            self.log(Level::Info, format!("{name} ({pid}) {how}"));
            return self.after_stop();
        }
        if self.workers[i].replacing {
            self.workers[i].replacing = false;
            self.workers[i].restart_at = Some(at);
            return self.log(
                Level::Info,
                format!("{name} ({pid}) {how}; starting its replacement"),
            );
        }
        let failed = failed || self.workers[i].not_ready;
        let policy = self.policy.restart.policy;
        if policy == RestartPolicy::Never || (policy == RestartPolicy::OnFailure && !failed) {
            let msg = format!("{name} ({pid}) {how}; not restarting ({policy:?})");
            self.log(Level::Notice, msg);
            return self.end(u8::from(failed), "stopped", &format!("{name} {how}"), at);
        }
        let r = self.policy.restart.clone();
        let window = Duration::from_secs(r.crash_window_s);
        let w = &mut self.workers[i];
        if ran > window {
            w.consecutive_failures = 0;
        }
        if failed {
            w.consecutive_failures += 1;
            w.crashes.push_back(at);
            while w
                .crashes
                .front()
                .is_some_and(|t| at.saturating_duration_since(*t) > window)
            {
                w.crashes.pop_front();
            }
            if w.crashes.len() as u32 >= r.max_crashes {
                let msg = format!(
                    "crash loop: {name} failed {} times within {} s (last: {how}); giving up",
                    w.crashes.len(),
                    r.crash_window_s
                );
                self.log(Level::Err, msg.clone());
                return self.end(1, "failed", &msg, at);
            }
        }
        let delay = backoff(&r, w.consecutive_failures, jitter);
        w.restarts += 1;
        w.restart_at = Some(at + delay);
        let several = self.workers.len() > 1;
        let others = self.workers.iter().filter(|w| w.pid.is_some()).count();
        let msg = format!(
            "{name} ({pid}) {how} after {:.1} s; restarting in {} ms{}",
            ran.as_secs_f64(),
            delay.as_millis(),
            if several {
                format!("; the other {others} worker(s) keep serving")
            } else {
                String::new()
            }
        );
        self.log(Level::Warning, msg.clone());
        let state = if several && self.ready_sent {
            "running"
        } else {
            "restarting"
        };
        self.status(state, msg);
    }
}

/// Exponential backoff with ±20 % jitter (`jitter` in [-1, 1]), so a fleet does not restart in
/// lockstep.
pub fn backoff(r: &Restart, consecutive_failures: u32, jitter: f64) -> Duration {
    let exp = consecutive_failures.saturating_sub(1).min(20);
    let base = r
        .initial_backoff_ms
        .saturating_mul(1 << exp)
        .min(r.max_backoff_ms);
    let factor = 1.0 + 0.2 * jitter.clamp(-1.0, 1.0);
    Duration::from_millis(((base as f64) * factor).max(1.0) as u64)
}

#[cfg(test)]
mod tests;
