//! The running daemon's state, written atomically to a JSON file on every change and read by
//! `tunegate status`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::sizing::Sizing;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub started_at: u64,
    /// starting | gated | running | restarting | stopping | stopped | failed
    pub state: String,
    pub profile: String,
    pub mode: String,
    pub listen: String,
    pub ready: bool,
    pub failing_checks: Vec<String>,
    pub warnings: Vec<String>,
    /// How many workers and why (the bundled server).
    pub sizing: Option<Sizing>,
    /// One entry per worker process (one for a custom command).
    pub workers: Vec<WorkerStatus>,
    /// The first worker's pid (the only child's, for a custom command).
    pub child_pid: Option<u32>,
    pub child_started_at: Option<u64>,
    pub child_command: Vec<String>,
    pub restarts: u64,
    pub drifts: u64,
    pub last_drift_check: Option<u64>,
    pub message: String,
    /// The saturation watch's last sample, worst first.
    #[serde(default)]
    pub saturation: Vec<super::saturation::LevelStatus>,
    #[serde(default)]
    pub last_saturation_sample: Option<u64>,
    /// The kernel's connection-drop counters and their rates over the last sample's interval.
    #[serde(default)]
    pub drops: Option<super::saturation::DropsStatus>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub index: usize,
    pub pid: Option<u32>,
    pub started_at: Option<u64>,
    pub listening: bool,
    pub restarts: u64,
    /// How its last process ended.
    pub last_exit: Option<String>,
    /// The running process's incarnation: the high bits of its connection ids
    /// (docs/protocol.md), so an id can be traced to the process that handed it out.
    #[serde(default)]
    pub incarnation: Option<u16>,
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Status {
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        tuning::host::files::write_atomic(path, text.as_bytes(), 0o644)
    }

    pub fn load(path: &Path) -> anyhow::Result<Status> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot read {}: {e} (is tunegate run running?)",
                path.display()
            )
        })?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Whether the daemon that wrote this file is still alive. EPERM means it is, but belongs
    /// to another user (the service's, for an operator who is not root).
    pub fn alive(&self) -> bool {
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), None) {
            Ok(()) | Err(nix::errno::Errno::EPERM) => true,
            Err(_) => false,
        }
    }

    pub fn human(&self) -> String {
        let age =
            |t: Option<u64>| t.map_or("-".to_string(), |t| format!("{}s", now().saturating_sub(t)));
        let mut s = format!(
            "tunegate run: {}{} (pid {}, up {})\nprofile {}, mode {}, listen {}, ready {}\n",
            self.state,
            if self.alive() {
                ""
            } else {
                " (daemon not running)"
            },
            self.pid,
            age(Some(self.started_at)),
            self.profile,
            self.mode,
            self.listen,
            self.ready
        );
        s.push_str(&format!(
            "child: pid {}, up {}, restarts {}: {}\n",
            self.child_pid.map_or("-".into(), |p| p.to_string()),
            age(self.child_started_at),
            self.restarts,
            self.child_command.join(" ")
        ));
        if let Some(z) = &self.sizing {
            s.push_str(&format!("sizing: {}\n", z.explanation));
            if let Some(short) = &z.shortfall {
                s.push_str(&format!("WARN {short}\n"));
            }
        }
        if self.workers.len() > 1 {
            for w in &self.workers {
                s.push_str(&format!(
                    "worker {}: pid {}, incarnation {}, up {}, listening {}, restarts {}{}\n",
                    w.index,
                    w.pid.map_or("-".into(), |p| p.to_string()),
                    w.incarnation.map_or("-".into(), |n| n.to_string()),
                    age(w.started_at),
                    w.listening,
                    w.restarts,
                    w.last_exit
                        .as_ref()
                        .map_or(String::new(), |e| format!(", last {e}"))
                ));
            }
        }
        s.push_str(&format!(
            "drifts {}, last drift check {} ago\n",
            self.drifts,
            age(self.last_drift_check)
        ));
        if !self.saturation.is_empty() {
            s.push_str(&format!(
                "saturation, worst first (sampled {} ago):\n",
                age(self.last_saturation_sample)
            ));
            for l in &self.saturation {
                s.push_str(&format!(
                    "  {:<32} {:>5.1} %  {} of {}  ({})\n",
                    l.id,
                    l.ratio * 100.0,
                    l.used,
                    l.limit,
                    l.what
                ));
            }
        }
        if let Some(d) = &self.drops {
            s.push_str(&format!(
                "accept-queue overflows {} ({:.1}/s), listen drops {} ({:.1}/s), backlog drops {} ({:.1}/s)\n",
                d.listen_overflows_total,
                d.listen_overflows_per_second,
                d.listen_drops_total,
                d.listen_drops_per_second,
                d.backlog_drops_total,
                d.backlog_drops_per_second
            ));
        }
        for f in &self.failing_checks {
            s.push_str(&format!("FAIL {f}\n"));
        }
        for w in &self.warnings {
            s.push_str(&format!("WARN {w}\n"));
        }
        if !self.message.is_empty() {
            s.push_str(&format!("{}\n", self.message));
        }
        s
    }
}
