//! `tunegate load`: a WebSocket load generator (docs/load.md).
//!
//! The first process plans and coordinates; the connections live in shard processes (this
//! binary re-executed with `--shard I/K`), as many as the descriptor limit requires, since a
//! process holds only RLIMIT_NOFILE sockets. Phases, each started by the coordinator once
//! every shard finished the one before: connect (ramped, capped in flight) -> join -> verify
//! member counts -> hold -> publish -> drain -> finish. Shards report progress and results as
//! JSON lines on stdout; the coordinator merges them (counts, HDR histograms) into one
//! `Outcome`.
//!
//! It is a client from the outside: nothing here imports the server or the tuning side.

mod args;
mod headers;
mod plan;
pub mod report;
pub mod scenario;
mod shard;
mod target;
mod thresholds;
mod timeseries;
mod tls;
mod wire;

use std::io::{BufRead, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;

pub use args::{BadArguments, LoadArgs, LoadEncoding, LoadFormat, LoadProtocol};
use report::{Outcome, Tally};
use shard::Event;
pub use target::{Target, Targets};

/// Microseconds on CLOCK_MONOTONIC: one clock for every process on the host, so a message
/// stamped by one shard can be timed by another.
pub fn monotonic_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000
    })
}

/// How a run ended: the exit code (0 every connection opened and stayed open, every message
/// reached every member and every `--fail-if` held; 1 otherwise) and the summary for stdout
/// (for people, or JSON), which the caller prints (this crate writes stdout only as a shard,
/// to its coordinator).
pub struct Finished {
    pub code: u8,
    pub out: String,
}

pub fn generate(args: &LoadArgs) -> anyhow::Result<Finished> {
    let msgpack = args.encoding == LoadEncoding::Msgpack;
    let targets = Targets::parse(&args.url, msgpack).map_err(BadArguments)?;
    let (args, stages) = staged(args)?;
    let args = &args;
    let checked = validate(args, stages)?;
    if let Some(spec) = &args.shard {
        let (i, k) = spec
            .split_once('/')
            .and_then(|(i, k)| Some((i.parse().ok()?, k.parse().ok()?)))
            .filter(|&(i, k): &(u64, u64)| i < k)
            .ok_or_else(|| BadArguments(format!("--shard {spec:?}: expected I/K with I < K")))?;
        let code = shard::run_shard(args, targets, checked, i, k)?;
        return Ok(Finished {
            code,
            out: String::new(),
        });
    }
    Coordinator::new(args.clone(), checked)?.run()
}

/// The arguments that need parsing, parsed once, by `validate` (which refuses what does not
/// parse), for the coordinator and the shards.
pub(crate) struct Checked {
    pub stages: Option<plan::Stages>,
    /// The room plan (relay protocol only).
    pub spread: Option<plan::Spread>,
    pub thresholds: Vec<thresholds::Threshold>,
    pub headers: headers::Extra,
}

/// With `--stages`, the run's connection count is the highest stage's target (every process
/// plans its range and rooms from it); the stages, parsed.
fn staged(args: &LoadArgs) -> Result<(LoadArgs, Option<plan::Stages>), BadArguments> {
    let mut args = args.clone();
    let Some(text) = &args.stages else {
        return Ok((args, None));
    };
    let stages = plan::Stages::parse(text).map_err(BadArguments)?;
    if args.publish_rate > 0.0 && stages.last() < stages.peak() {
        return Err(BadArguments(format!(
            "--publish-rate with --stages: the message phase comes after the stages and \
             needs every connection, but the last stage holds {} of {}",
            stages.last(),
            stages.peak()
        )));
    }
    args.connections = stages.peak();
    Ok((args, Some(stages)))
}

fn validate(args: &LoadArgs, stages: Option<plan::Stages>) -> Result<Checked, BadArguments> {
    let bad = |m: &str| Err(BadArguments(m.to_string()));
    if args.connections == 0 {
        return bad("-n must be at least 1");
    }
    if args.connect_rate == 0 || args.max_inflight == 0 || args.per_source == 0 {
        return bad("--connect-rate, --max-inflight and --per-source must be above 0");
    }
    for (name, v) in [
        ("--publish-seconds", args.publish_seconds),
        ("--hold", args.hold),
        ("--connect-timeout", args.connect_timeout),
        ("--max-time", args.max_time),
    ] {
        if !v.is_finite() || v < 0.0 {
            return bad(&format!("{name} must be a number of seconds >= 0"));
        }
    }
    if !args.churn.is_finite() || args.churn < 0.0 {
        return bad("--churn must be a number of connections per second >= 0");
    }
    if args.churn > 0.0 && args.hold <= 0.0 {
        return bad("--churn needs --hold: connections churn during the hold");
    }
    if !args.publish_rate.is_finite() || args.publish_rate < 0.0 {
        return bad("--publish-rate must be a number of messages per second >= 0");
    }
    if args.publish_rate > 0.0 && args.protocol == LoadProtocol::Plain {
        return bad("--publish-rate needs --protocol relay (plain WebSocket has no rooms)");
    }
    let spread = match args.protocol {
        LoadProtocol::Relay => {
            Some(plan::Spread::parse(&args.rooms, args.connections).map_err(BadArguments)?)
        }
        LoadProtocol::Plain => None,
    };
    let thresholds = args
        .fail_if
        .iter()
        .map(|t| thresholds::Threshold::parse(t).map_err(BadArguments))
        .collect::<Result<_, _>>()?;
    Ok(Checked {
        stages,
        spread,
        thresholds,
        headers: headers::extra(args)?,
    })
}

struct ShardProc {
    child: Child,
    stdin: ChildStdin,
    last: Option<Event>,
    /// Latest progress numbers: opened, failed, dropped, sent, expected, received, open.
    progress: [u64; 7],
}

struct Coordinator {
    args: LoadArgs,
    stages: Option<plan::Stages>,
    thresholds: Vec<thresholds::Threshold>,
    shards: Vec<ShardProc>,
    events: mpsc::Receiver<(usize, Option<Event>)>,
    deadline: Instant,
    tty: bool,
    last_line: Instant,
    /// The run second by second (`--out DIR/timeseries.csv`).
    series: timeseries::TimeSeries,
}

impl Coordinator {
    fn new(args: LoadArgs, checked: Checked) -> anyhow::Result<Coordinator> {
        let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
        // Each shard holds its connections plus stdio, the runtime's epoll and a few spare.
        let per_process = hard.saturating_sub(64).max(1);
        let needed = args.connections.div_ceil(per_process) as usize;
        let k = args.processes.unwrap_or(1).max(needed).max(1);
        let exe = std::env::current_exe().context("cannot find this binary to start shards")?;
        let (tx, events) = mpsc::channel();
        let mut shards = Vec::new();
        for i in 0..k {
            let mut cmd = Command::new(&exe);
            cmd.args(std::env::args_os().skip(1))
                .arg("--shard")
                .arg(format!("{i}/{k}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut child = cmd
                .spawn()
                .with_context(|| format!("cannot start load process {i}"))?;
            let stdin = child.stdin.take().expect("piped stdin");
            let stdout = child.stdout.take().expect("piped stdout");
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(e) = serde_json::from_str::<Event>(&line) {
                        let _ = tx.send((i, Some(e)));
                    }
                }
                let _ = tx.send((i, None));
            });
            shards.push(ShardProc {
                child,
                stdin,
                last: None,
                progress: [0; 7],
            });
        }
        use std::io::IsTerminal;
        Ok(Coordinator {
            deadline: Instant::now() + Duration::from_secs_f64(args.max_time),
            args,
            stages: checked.stages,
            thresholds: checked.thresholds,
            shards,
            events,
            tty: std::io::stderr().is_terminal(),
            last_line: Instant::now(),
            series: timeseries::TimeSeries::new(Instant::now()),
        })
    }

    fn run(mut self) -> anyhow::Result<Finished> {
        let n = self.args.connections;
        eprintln!(
            "tunegate load: {n} connection(s) to {} from {} process(es), {} connects/s, at most {} in flight",
            self.args.url,
            self.shards.len(),
            self.args.connect_rate,
            self.args.max_inflight
        );
        let result = self.phases();
        for s in &mut self.shards {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        let mut outcome = result?;
        outcome.judge(&self.thresholds);
        if self.tty {
            eprintln!();
        }
        let json = self.args.json || self.args.format == LoadFormat::Json;
        Ok(Finished {
            code: if outcome.ok { 0 } else { 1 },
            // The summary for people goes to stdout; with JSON there, to stderr beside the
            // progress (a log still shows it).
            out: if json {
                eprint!("{}", outcome.human());
                serde_json::to_string_pretty(&outcome)? + "\n"
            } else {
                outcome.human()
            },
        })
    }

    fn phases(&mut self) -> anyhow::Result<Outcome> {
        let n = self.args.connections;
        let relay = self.args.protocol == LoadProtocol::Relay;
        let mut outcome = Outcome {
            target: self.args.url.clone(),
            connections: n,
            processes: self.shards.len(),
            ..Outcome::default()
        };

        let (mut first_us, mut last_us) = (u64::MAX, 0);
        let stages = self.stages.clone();
        let phase = if stages.is_some() {
            "stages"
        } else {
            "connect"
        };
        self.until_all(phase, |e| match e {
            Event::Connected {
                first_us: f,
                last_open_us: l,
            } => {
                first_us = first_us.min(*f);
                last_us = last_us.max(*l);
                true
            }
            _ => false,
        })?;
        outcome.connect_seconds = last_us.saturating_sub(first_us) as f64 / 1e6;
        let opened: u64 = self.shards.iter().map(|s| s.progress[0]).sum();
        outcome.connects_per_second = opened as f64 / outcome.connect_seconds.max(1e-6);

        // Under stages every connection joined its room as it opened; the rooms are checked
        // when the stages end holding every connection.
        if relay && stages.is_none() {
            self.command(shard::Command::Join)?;
            self.until_all("join", |e| matches!(e, Event::Joined))?;
        }
        if relay && stages.as_ref().is_none_or(|s| s.last() == s.peak()) {
            self.command(shard::Command::Verify)?;
            self.until_all("verify", |e| matches!(e, Event::Verified))?;
        }
        let hold_start = Instant::now();
        if self.args.churn > 0.0 {
            let millis = (self.args.hold * 1000.0).round() as u64;
            self.command(shard::Command::Churn { millis })?;
            self.until_all("hold", |e| matches!(e, Event::Churned))?;
        } else {
            let hold_end = hold_start + Duration::from_secs_f64(self.args.hold);
            while Instant::now() < hold_end {
                self.pump(Duration::from_millis(100), "hold")?;
            }
        }
        if relay && self.args.publish_rate > 0.0 {
            let mut seconds: f64 = 0.0;
            self.command(shard::Command::Publish)?;
            self.until_all("publish", |e| match e {
                Event::Published { seconds: s } => {
                    seconds = seconds.max(*s);
                    true
                }
                _ => false,
            })?;
            outcome.publish_seconds = seconds;
            // Drain: until every expected delivery arrived, or nothing moved for 2 s (at most
            // 10 s).
            let drain_end = Instant::now() + Duration::from_secs(10);
            let mut last = (0, Instant::now());
            loop {
                let expected: u64 = self.shards.iter().map(|s| s.progress[4]).sum();
                let received: u64 = self.shards.iter().map(|s| s.progress[5]).sum();
                if received >= expected || Instant::now() > drain_end {
                    break;
                }
                if received != last.0 {
                    last = (received, Instant::now());
                } else if last.1.elapsed() > Duration::from_secs(2) {
                    break;
                }
                self.pump(Duration::from_millis(100), "drain")?;
            }
        }
        outcome.held_seconds = hold_start.elapsed().as_secs_f64();

        self.command(shard::Command::Finish)?;
        let mut tally = Tally::default();
        let mut connect = report::histogram();
        let mut latency = report::histogram();
        let mut service = report::histogram();
        let mut lag = report::histogram();
        let mut open_at_end = 0;
        self.until_all("finish", |e| match e {
            Event::Result {
                tally: t,
                open_at_end: o,
            } => {
                tally.add(t);
                for &(v, c) in &t.connect_us {
                    let _ = connect.record_n(v, c);
                }
                for (h, buckets) in [
                    (&mut latency, &t.latency_us),
                    (&mut service, &t.service_us),
                    (&mut lag, &t.lag_us),
                ] {
                    for &(v, c) in buckets {
                        let _ = h.record_n(v, c);
                    }
                }
                open_at_end += o;
                true
            }
            _ => false,
        })?;
        outcome.tally = tally;
        outcome.open_at_end = open_at_end;
        outcome.connect_time = report::Percentiles::of(&connect);
        outcome.latency = report::Percentiles::of(&latency);
        outcome.service_time = report::Percentiles::of(&service);
        outcome.schedule_lag = report::Lag::of(&lag);
        if let Some(dir) = &self.args.out {
            let now = Instant::now();
            let series = std::mem::replace(&mut self.series, timeseries::TimeSeries::new(now));
            let files = [
                ("latency.hgrm", report::hgrm(&latency)),
                ("service.hgrm", report::hgrm(&service)),
                ("lag.hgrm", report::hgrm(&lag)),
                ("timeseries.csv", series.csv(now)),
            ];
            write_out(dir, &files)?;
        }
        if outcome.publish_seconds > 0.0 {
            outcome.publish_rate_achieved = outcome.tally.sent as f64 / outcome.publish_seconds;
        }
        Ok(outcome)
    }

    fn command(&mut self, cmd: shard::Command) -> anyhow::Result<()> {
        let line = serde_json::to_string(&cmd).expect("commands serialise");
        for (i, s) in self.shards.iter_mut().enumerate() {
            s.last = None;
            writeln!(s.stdin, "{line}")
                .and_then(|_| s.stdin.flush())
                .with_context(|| format!("load process {i} went away"))?;
        }
        Ok(())
    }

    /// Pumps events until every shard's last event satisfies `done`.
    fn until_all(
        &mut self,
        phase: &str,
        mut done: impl FnMut(&Event) -> bool,
    ) -> anyhow::Result<()> {
        let mut finished = vec![false; self.shards.len()];
        while finished.iter().any(|f| !f) {
            self.pump(Duration::from_millis(100), phase)?;
            for (i, s) in self.shards.iter_mut().enumerate() {
                if !finished[i]
                    && let Some(e) = s.last.take()
                {
                    finished[i] = done(&e);
                }
            }
        }
        Ok(())
    }

    /// Takes events for up to `wait`, keeps each shard's progress, redraws the progress line.
    fn pump(&mut self, wait: Duration, phase: &str) -> anyhow::Result<()> {
        if Instant::now() > self.deadline {
            anyhow::bail!(
                "--max-time {} s reached during the {phase} phase; stopped",
                self.args.max_time
            );
        }
        let until = Instant::now() + wait;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match self.events.recv_timeout(left) {
                Ok((
                    i,
                    Some(Event::Progress {
                        opened,
                        failed,
                        dropped,
                        sent,
                        expected,
                        received,
                        open,
                        latency_us,
                        ..
                    }),
                )) => {
                    self.shards[i].progress =
                        [opened, failed, dropped, sent, expected, received, open];
                    let sum = |k: usize| -> u64 { self.shards.iter().map(|s| s.progress[k]).sum() };
                    let totals = (sum(6), sum(3), sum(5));
                    self.series.event(Instant::now(), totals, &latency_us);
                }
                Ok((i, Some(e))) => self.shards[i].last = Some(e),
                // A shard ends by itself only after its result.
                Ok((_, None)) if phase == "finish" => {}
                Ok((i, None)) => {
                    let st = self.shards[i].child.wait().ok();
                    anyhow::bail!("load process {i} ended during the {phase} phase ({st:?})");
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) if phase == "finish" => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => anyhow::bail!("load processes gone"),
            }
        }
        self.progress_line(phase);
        Ok(())
    }

    fn progress_line(&mut self, phase: &str) {
        let sum = |k: usize| -> u64 { self.shards.iter().map(|s| s.progress[k]).sum() };
        // `open` is open now (stages and churn move it); the bar counts connects done.
        let (opened, failed, dropped, open) = (sum(0), sum(1), sum(2), sum(6));
        let (sent, received, expected) = (sum(3), sum(5), sum(4));
        let n = self.args.connections;
        if self.tty {
            let cols = terminal_size::terminal_size_of(std::io::stderr())
                .map_or(80, |(w, _)| usize::from(w.0));
            let text = format!(
                "{phase:8} open {open}/{n} failed {failed} dropped {dropped} sent {sent} delivered {received}/{expected}"
            );
            let done = (opened + failed) as f64 / n as f64;
            eprint!("\r{}\x1b[K", fit_line(cols, done, &text));
        } else if self.last_line.elapsed() >= Duration::from_secs(1) {
            self.last_line = Instant::now();
            eprintln!(
                "tunegate load: {phase}: open {open}/{n} failed {failed} dropped {dropped} sent {sent} delivered {received}/{expected}"
            );
        }
    }
}

/// The progress line for a terminal `cols` wide: a bar of `done` (0 to 1) as wide as the room
/// the text leaves (none below 10 columns), and the text cut to fit, so it never wraps (a
/// wrapped line is redrawn as a new line each time).
fn fit_line(cols: usize, done: f64, text: &str) -> String {
    let room = cols.saturating_sub(1); // the last column would wrap on some terminals
    let bar = room.saturating_sub(text.chars().count() + 3).min(40);
    if bar < 10 {
        return text.chars().take(room).collect();
    }
    let filled = ((done.clamp(0.0, 1.0)) * bar as f64) as usize;
    format!(
        "[{}{}] {text}",
        "#".repeat(filled),
        " ".repeat(bar - filled)
    )
}

/// `--out DIR`: each file written whole or not at all (a temporary file renamed into place).
fn write_out(dir: &std::path::Path, files: &[(&str, String)]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("--out {}", dir.display()))?;
    for (name, text) in files {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_line_fits_the_terminal() {
        let text = "connect  open 500/1000 failed 0 dropped 0 sent 0 delivered 0/0";
        let wide = fit_line(120, 0.5, text);
        assert_eq!(wide.chars().count(), 40 + 3 + text.len());
        assert!(wide.starts_with(&format!("[{}{}] ", "#".repeat(20), " ".repeat(20))));
        let fits = fit_line(80, 1.0, text);
        assert!(
            fits.chars().count() <= 79 && fits.starts_with("[#"),
            "{fits}"
        );
        assert!(fits.ends_with(text));
        // Too narrow for a bar: the text alone, cut.
        let narrow = fit_line(40, 0.5, text);
        assert_eq!(narrow, text[..39]);
        assert_eq!(fit_line(0, 0.5, text), "");
    }
}
