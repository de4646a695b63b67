//! The saturation watch: every `saturation.interval_s`, how close the host and every server
//! process run to each limit (`tuning::host::saturation`), said before it breaks. A level that
//! crosses `warn_percent` is a warning (journal priority 4), one that crosses `error_percent` an
//! error (3), each naming the fix; while it stays up it is said again at most once a minute, and
//! once when it is back down. Accept-queue overflows (the kernel's ListenOverflows counter)
//! are said as bursts: at most one line every 10 s, with how many since the last one.
//!
//! What it found goes to the status file (`tunegate status`, worst first) and to the metrics
//! listener (`metrics_listen:`, `metrics.rs`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tuning::host::saturation::{Drops, HostSample, Level};

use super::log::Level as Priority;

/// A level still over a threshold is said again at most this often.
const REPEAT: Duration = Duration::from_secs(60);
/// Overflow bursts are said at most this often.
const OVERFLOW_EVERY: Duration = Duration::from_secs(10);

/// `saturation:` in the configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Seconds between samples; 0 turns the watch off.
    pub interval_s: u64,
    /// A level at or above this share of its limit is a warning.
    pub warn_percent: u8,
    /// ... and at or above this one an error.
    pub error_percent: u8,
    /// Sample the ephemeral ports in use per (source, destination) pair (`ephemeral_ports`):
    /// one dump of every TCP socket per sample, so its cost grows with the connections. Default:
    /// on when the profile has a `proxy:` section (a host that connects out), off otherwise.
    pub ephemeral_ports: Option<bool>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            interval_s: 5,
            warn_percent: 80,
            error_percent: 95,
            ephemeral_ports: None,
        }
    }
}

/// One level as the status file shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LevelStatus {
    pub id: String,
    pub what: String,
    pub used: u64,
    pub limit: u64,
    /// used / limit, 0..1 (0 without a limit).
    pub ratio: f64,
}

/// The kernel's drop counters as the status file shows them: totals, and per second over the
/// last sample's interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DropsStatus {
    pub listen_overflows_total: u64,
    pub listen_drops_total: u64,
    pub backlog_drops_total: u64,
    pub listen_overflows_per_second: f64,
    pub listen_drops_per_second: f64,
    pub backlog_drops_per_second: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Band {
    Ok,
    Warn,
    Error,
}

pub struct Watch {
    settings: Settings,
    /// Each level's band, and when it was last said.
    said: HashMap<String, (Band, Instant)>,
    last_drops: Option<(Drops, Instant)>,
    /// Overflows not said yet, since `unsaid_since`.
    unsaid_overflows: u64,
    unsaid_drops: u64,
    unsaid_since: Option<Instant>,
    last_overflow_line: Option<Instant>,
    /// The drop counters and their recent rates, for the status.
    pub drops: DropsStatus,
}

impl Watch {
    pub fn new(settings: Settings) -> Watch {
        Watch {
            settings,
            said: HashMap::new(),
            last_drops: None,
            unsaid_overflows: 0,
            unsaid_drops: 0,
            unsaid_since: None,
            last_overflow_line: None,
            drops: DropsStatus::default(),
        }
    }

    fn band(&self, ratio: f64) -> Band {
        if ratio * 100.0 >= self.settings.error_percent as f64 {
            Band::Error
        } else if ratio * 100.0 >= self.settings.warn_percent as f64 {
            Band::Warn
        } else {
            Band::Ok
        }
    }

    /// One sample: the lines to log, and the levels worst first for the status. `context`
    /// names what the overflow line suggests (somaxconn, the accept queues).
    pub fn observe(
        &mut self,
        host: &HostSample,
        processes: Vec<Level>,
        context: &OverflowContext,
        now: Instant,
    ) -> (Vec<(Priority, String)>, Vec<LevelStatus>) {
        let mut lines = Vec::new();
        let mut levels: Vec<Level> = host.levels.iter().cloned().chain(processes).collect();
        levels.sort_by(|a, b| b.ratio().total_cmp(&a.ratio()));
        for l in &levels {
            let band = self.band(l.ratio());
            let (before, at) = self
                .said
                .get(&l.id)
                .copied()
                .unwrap_or((Band::Ok, now - REPEAT));
            let say = match (band, before) {
                (Band::Ok, Band::Ok) => None,
                (Band::Ok, _) => Some((
                    Priority::Info,
                    format!(
                        "saturation: {} back at {:.0} % ({} of {})",
                        l.id,
                        l.ratio() * 100.0,
                        l.used,
                        l.limit
                    ),
                )),
                (b, a) if b > a || now.duration_since(at) >= REPEAT => {
                    let priority = if b == Band::Error {
                        Priority::Err
                    } else {
                        Priority::Warning
                    };
                    Some((
                        priority,
                        format!(
                            "saturation: {} at {:.0} % ({} of {}: {}); fix: {}",
                            l.id,
                            l.ratio() * 100.0,
                            l.used,
                            l.limit,
                            l.what,
                            l.fix
                        ),
                    ))
                }
                _ => None,
            };
            if let Some(line) = say {
                lines.push(line);
                self.said.insert(l.id.clone(), (band, now));
            } else if band == Band::Ok {
                self.said.remove(&l.id);
            }
        }
        // Levels gone (a process that exited) are forgotten.
        self.said.retain(|id, _| levels.iter().any(|l| &l.id == id));
        lines.extend(self.overflows(host.drops, context, now));
        let status = levels
            .iter()
            .map(|l| LevelStatus {
                id: l.id.clone(),
                what: l.what.clone(),
                used: l.used,
                limit: l.limit,
                ratio: l.ratio(),
            })
            .collect();
        (lines, status)
    }

    /// Accept-queue overflows since the last sample, said as a burst at most every
    /// `OVERFLOW_EVERY`.
    fn overflows(
        &mut self,
        drops: Drops,
        context: &OverflowContext,
        now: Instant,
    ) -> Option<(Priority, String)> {
        let previous = self.last_drops.replace((drops, now));
        let rate = |now: u64, before: u64, secs: f64| {
            now.checked_sub(before).map_or(0.0, |d| d as f64 / secs)
        };
        let secs = previous.map_or(0.0, |(_, t)| now.duration_since(t).as_secs_f64());
        self.drops = DropsStatus {
            listen_overflows_total: drops.listen_overflows,
            listen_drops_total: drops.listen_drops,
            backlog_drops_total: drops.backlog_drops,
            ..DropsStatus::default()
        };
        if let Some((before, _)) = previous
            && secs > 0.0
        {
            self.drops.listen_overflows_per_second =
                rate(drops.listen_overflows, before.listen_overflows, secs);
            self.drops.listen_drops_per_second =
                rate(drops.listen_drops, before.listen_drops, secs);
            self.drops.backlog_drops_per_second =
                rate(drops.backlog_drops, before.backlog_drops, secs);
        }
        let (before, _) = previous?;
        // A counter that went down is a new namespace or a reboot of the counters: start over.
        let overflows = drops
            .listen_overflows
            .checked_sub(before.listen_overflows)?;
        let dropped = drops.listen_drops.checked_sub(before.listen_drops)?;
        if overflows > 0 {
            self.unsaid_overflows += overflows;
            self.unsaid_drops += dropped;
            self.unsaid_since.get_or_insert(now);
        }
        if self.unsaid_overflows == 0
            || self
                .last_overflow_line
                .is_some_and(|t| now.duration_since(t) < OVERFLOW_EVERY)
        {
            return None;
        }
        let since = self.unsaid_since.take().unwrap_or(now);
        let seconds = now.duration_since(since).as_secs().max(1);
        let line = format!(
            "saturation: accept queues overflowed {} times in the last {} s (ListenOverflows; \
             {} connection requests dropped at listeners in all); {}fix: raise \
             net.core.somaxconn (now {}) and the server's listen() backlog, or add workers: \
             the server does not accept as fast as clients connect",
            self.unsaid_overflows,
            seconds,
            self.unsaid_drops,
            context.queues,
            context
                .somaxconn
                .map_or("unknown".to_string(), |s| s.to_string()),
        );
        self.unsaid_overflows = 0;
        self.unsaid_drops = 0;
        self.last_overflow_line = Some(now);
        Some((Priority::Warning, line))
    }
}

/// What the overflow line names besides the counters.
#[derive(Clone, Debug, Default)]
pub struct OverflowContext {
    pub somaxconn: Option<u64>,
    /// "accept queue limit 4096 on port 8080; " or empty.
    pub queues: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(id: &str, used: u64, limit: u64) -> Level {
        Level {
            id: id.into(),
            what: "x".into(),
            used,
            limit,
            fix: "raise it".into(),
        }
    }

    fn sample(levels: Vec<Level>, overflows: u64) -> HostSample {
        HostSample {
            levels,
            drops: Drops {
                listen_overflows: overflows,
                listen_drops: overflows,
                backlog_drops: 0,
            },
            ..HostSample::default()
        }
    }

    #[test]
    fn crossing_says_once_repeats_each_minute_and_says_when_back() {
        let mut w = Watch::new(Settings::default());
        let ctx = OverflowContext::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let (lines, status) = w.observe(
            &sample(vec![level("files", 10, 100)], 0),
            vec![],
            &ctx,
            at(0),
        );
        assert!(lines.is_empty());
        assert_eq!(status[0].id, "files");
        let fds = |used| vec![level("descriptors.worker-0", used, 20000)];
        let (lines, status) = w.observe(&sample(vec![], 0), fds(17000), &ctx, at(5));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0].0, Priority::Warning);
        assert!(
            lines[0]
                .1
                .contains("descriptors.worker-0 at 85 % (17000 of 20000"),
            "{lines:?}"
        );
        assert!(lines[0].1.contains("fix: raise it"));
        assert!((status[0].ratio - 0.85).abs() < 1e-9);
        // Still up: nothing for a minute, then once more.
        assert!(
            w.observe(&sample(vec![], 0), fds(17100), &ctx, at(30))
                .0
                .is_empty()
        );
        assert_eq!(
            w.observe(&sample(vec![], 0), fds(17100), &ctx, at(66))
                .0
                .len(),
            1
        );
        // Up a band: at once, as an error.
        let (lines, _) = w.observe(&sample(vec![], 0), fds(19500), &ctx, at(70));
        assert_eq!(lines[0].0, Priority::Err, "{lines:?}");
        // Back down: said once.
        let (lines, _) = w.observe(&sample(vec![], 0), fds(1000), &ctx, at(75));
        assert_eq!(lines[0].0, Priority::Info);
        assert!(lines[0].1.contains("back at 5 %"), "{lines:?}");
        assert!(
            w.observe(&sample(vec![], 0), fds(1000), &ctx, at(80))
                .0
                .is_empty()
        );
    }

    #[test]
    fn overflows_are_said_as_bursts_at_most_every_ten_seconds() {
        let mut w = Watch::new(Settings::default());
        let ctx = OverflowContext {
            somaxconn: Some(4096),
            queues: "accept queue limit 511 on port 8080; ".into(),
        };
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(
            w.observe(&sample(vec![], 1000), vec![], &ctx, at(0))
                .0
                .is_empty(),
            "a baseline"
        );
        let (lines, _) = w.observe(&sample(vec![], 1312), vec![], &ctx, at(5));
        assert_eq!(lines.len(), 1);
        assert!(lines[0].1.contains("overflowed 312 times"), "{lines:?}");
        assert_eq!(w.drops.listen_overflows_total, 1312);
        assert!(
            (w.drops.listen_overflows_per_second - 62.4).abs() < 1e-9,
            "{:?}",
            w.drops
        );
        assert!(lines[0].1.contains("somaxconn (now 4096)") && lines[0].1.contains("limit 511"));
        assert!(
            w.observe(&sample(vec![], 1400), vec![], &ctx, at(10))
                .0
                .is_empty(),
            "too soon"
        );
        let (lines, _) = w.observe(&sample(vec![], 1450), vec![], &ctx, at(16));
        assert!(lines[0].1.contains("overflowed 138 times"), "{lines:?}");
        assert!(
            w.observe(&sample(vec![], 1450), vec![], &ctx, at(30))
                .0
                .is_empty(),
            "quiet"
        );
        assert!(
            w.observe(&sample(vec![], 3), vec![], &ctx, at(35))
                .0
                .is_empty(),
            "a reset"
        );
    }
}
