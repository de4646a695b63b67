//! One load process: its share of the connections, each an async task on a single-threaded
//! tokio runtime. It follows the first process's commands on stdin (`join`, `verify`,
//! `publish`, `finish`) and reports on stdout, one JSON line per event (`Event`).
//!
//! Its own memory per connection is part of what a run costs the machine (a million clients
//! on the same host as the server): a connection holds no buffer while idle (every read goes
//! into the shard's one input buffer; only a partial frame is kept), reaches the main task
//! through a [`Mailbox`] of a few cells instead of a channel, and keeps no room name.

use std::cell::{Cell, RefCell};
use std::net::Ipv4Addr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;

use super::plan::{self, Spread, Stages};
use super::report::{self, Tally};
use super::wire::Rng;
use super::{Targets, monotonic_us};
use crate::LoadArgs;

mod connection;

pub(crate) use connection::Mailbox;

/// Largest frame a load connection accepts from the server.
const MAX_FRAME: usize = 16 << 20;
/// Rooms a process checks (with `count`) before the message phase.
const ROOMS_TO_CHECK: usize = 64;
/// The shard's input buffer: one read of any connection.
const INPUT_BUFFER: usize = 64 << 10;

/// A shard's report to the first process.
#[derive(Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Progress {
        opened: u64,
        failed: u64,
        inflight: u64,
        dropped: u64,
        sent: u64,
        expected: u64,
        received: u64,
        /// Open now (what the stages and churn move; `opened` only counts up).
        #[serde(default)]
        open: u64,
        /// Latency (from the schedule) of the deliveries since the last progress event:
        /// histogram buckets (µs, count), for the run's time series.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        latency_us: Vec<(u64, u64)>,
    },
    /// Every connection has opened or failed.
    Connected {
        first_us: u64,
        last_open_us: u64,
    },
    Joined,
    Verified,
    Churned,
    Published {
        seconds: f64,
    },
    Result {
        tally: Tally,
        open_at_end: u64,
    },
}

/// The first process's command to a shard, one JSON line on the shard's stdin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// The hold with `--churn`: close and reopen connections at this process's share of the
    /// rate for `millis`, then until every one is back.
    Churn { millis: u64 },
    /// Every connection's join (asked as it opened) answered.
    Join,
    /// Check rooms' member counts until they are whole.
    Verify,
    /// The message phase.
    Publish,
    /// Close everything and report.
    Finish,
}

fn emit(e: &Event) {
    use std::io::Write;
    let mut line = serde_json::to_string(e).expect("events serialise");
    line.push('\n');
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

/// A connection's task as the main task reaches it, and the size of its room.
struct Conn {
    mailbox: Rc<Mailbox>,
    room_size: u32,
}

struct Shard {
    args: LoadArgs,
    /// What every upgrade request adds (`-H`, the token).
    headers: crate::headers::Extra,
    /// `--stages`, when the connections held follow them.
    stages: Option<Stages>,
    /// This process's place among the run's (`--shard I/K`, I < K): its share of the connect
    /// rate and cap, and which of the run's messages it publishes.
    index: u64,
    shards: u64,
    targets: Targets,
    /// For wss:// targets: one TLS client configuration for every connection.
    tls: Option<tokio_rustls::TlsConnector>,
    spread: Option<Spread>,
    source: Option<Ipv4Addr>,
    tally: RefCell<Tally>,
    connect_us: RefCell<Histogram<u64>>,
    /// From each message's scheduled send time to its delivery.
    latency_us: RefCell<Histogram<u64>>,
    /// The same, since the last progress event (emptied by each).
    recent_us: RefCell<Histogram<u64>>,
    /// From the moment a message was written to its delivery.
    service_us: RefCell<Histogram<u64>>,
    /// From each message's scheduled time to the moment it was written.
    lag_us: RefCell<Histogram<u64>>,
    inflight: Cell<u64>,
    open: Cell<u64>,
    /// Connections that ended by themselves, before `finish`.
    dropped: Cell<u64>,
    /// Join answers (joined or error) received.
    join_answers: Cell<u64>,
    /// Connections asked to churn that are not back yet.
    churn_pending: Cell<u64>,
    finishing: Cell<bool>,
    last_open_us: Cell<u64>,
    /// Woken whenever a count above changes (inflight, open, dropped, join answers), so the
    /// shard's main task waits for a condition instead of polling it.
    changed: tokio::sync::Notify,
    rng: RefCell<Rng>,
    /// Padding for message data.
    pad: String,
    /// With --deflate: one decompressor for every connection of the shard (no context
    /// takeover), and where it inflates.
    inflater: RefCell<flate2::Decompress>,
    inflated: RefCell<Vec<u8>>,
    /// Where every connection's reads land (one task reads at a time: a single thread).
    input: RefCell<Box<[u8]>>,
}

pub(crate) fn run_shard(
    args: &LoadArgs,
    targets: Targets,
    checked: crate::Checked,
    index: u64,
    shards: u64,
) -> anyhow::Result<u8> {
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard);
    let range = plan::shard_range(args.connections, index, shards);
    let source = args
        .source
        .or_else(|| targets.loopback().then(|| Ipv4Addr::new(127, 0, 0, 2)));
    let tls = if targets.tls() {
        Some(crate::tls::connector(args.ca_file.as_deref()).map_err(crate::BadArguments)?)
    } else {
        None
    };
    let shard = Rc::new(Shard {
        args: args.clone(),
        headers: checked.headers,
        stages: checked.stages,
        index,
        shards,
        targets,
        tls,
        spread: checked.spread,
        source,
        tally: RefCell::new(Tally::default()),
        connect_us: RefCell::new(report::histogram()),
        latency_us: RefCell::new(report::histogram()),
        recent_us: RefCell::new(report::histogram()),
        service_us: RefCell::new(report::histogram()),
        lag_us: RefCell::new(report::histogram()),
        inflight: Cell::new(0),
        open: Cell::new(0),
        dropped: Cell::new(0),
        join_answers: Cell::new(0),
        churn_pending: Cell::new(0),
        finishing: Cell::new(false),
        last_open_us: Cell::new(0),
        changed: tokio::sync::Notify::new(),
        rng: RefCell::new(Rng::new(
            monotonic_us() ^ (u64::from(std::process::id()) << 32),
        )),
        pad: "x".repeat(args.payload),
        inflater: RefCell::new(flate2::Decompress::new_with_window_bits(false, 15)),
        inflated: RefCell::new(Vec::new()),
        input: RefCell::new(vec![0; INPUT_BUFFER].into_boxed_slice()),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, shard.main(range))
}

impl Shard {
    async fn main(self: Rc<Self>, range: std::ops::Range<u64>) -> anyhow::Result<u8> {
        let first_us = monotonic_us();
        // Progress every 250 ms, whatever the phase.
        let progress = {
            let s = self.clone();
            tokio::task::spawn_local(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tick.tick().await;
                    s.report_progress();
                }
            })
        };
        let conns = match &self.stages {
            Some(stages) => self.follow_stages(range, stages).await,
            None => self.ramp(range).await,
        };
        self.wait_until(None, |s| s.inflight.get() == 0).await;
        self.report_progress();
        emit(&Event::Connected {
            first_us,
            last_open_us: self.last_open_us.get(),
        });
        self.follow_commands(&conns).await;
        // Finish (or the first process went away): close everything, report, exit.
        self.finishing.set(true);
        let open_at_end = self.open.get();
        for c in &conns {
            c.mailbox.post(|m| m.finish.set(true));
        }
        let until = Instant::now() + Duration::from_secs(3);
        self.wait_until(Some(until), |s| s.open.get() == 0).await;
        progress.abort();
        let mut tally = self.tally.borrow().clone();
        tally.connect_us = report::buckets(&self.connect_us.borrow());
        tally.latency_us = report::buckets(&self.latency_us.borrow());
        tally.service_us = report::buckets(&self.service_us.borrow());
        tally.lag_us = report::buckets(&self.lag_us.borrow());
        emit(&Event::Result { tally, open_at_end });
        Ok(0)
    }

    /// Something the main task waits for changed.
    fn changed(&self) {
        self.changed.notify_one();
    }

    /// Waits until `done` holds, or `until` passes. (`notify_one` keeps a permit when nobody
    /// waits, so a change between the check and the wait is never lost.)
    async fn wait_until(&self, until: Option<Instant>, done: impl Fn(&Self) -> bool) {
        while !done(self) {
            match until {
                Some(t) => {
                    let t = tokio::time::Instant::from_std(t);
                    if tokio::time::timeout_at(t, self.changed.notified())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                None => self.changed.notified().await,
            }
        }
    }

    /// Starts this process's connections at its share of the connect rate, never more in
    /// flight than its share of the cap; each is a task that then follows `Cmd`s.
    async fn ramp(self: &Rc<Self>, range: std::ops::Range<u64>) -> Vec<Conn> {
        let deadline = Instant::now() + Duration::from_secs_f64(self.args.connect_timeout);
        let shards = self.shards;
        let rate = (self.args.connect_rate as f64 / shards as f64).max(1.0);
        let cap = (self.args.max_inflight / shards).max(1);
        let mut conns = Vec::with_capacity((range.end - range.start) as usize);
        let ramp_start = Instant::now();
        for (n, global) in range.clone().enumerate() {
            let due = ramp_start + Duration::from_secs_f64(n as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
            self.wait_until(Some(deadline), |s| s.inflight.get() < cap)
                .await;
            if Instant::now() >= deadline {
                let left = range.end - global;
                let mut t = self.tally.borrow_mut();
                t.attempted += left;
                *t.connect_errors
                    .entry("not started: connect timeout".into())
                    .or_default() += left;
                break;
            }
            // A relay connection asks for its room as soon as it is open, as a real client
            // does: asked all at once after the ramp, a million joins kept two saturated cores
            // (and this process's queue) so busy that pings waited past their timeout.
            conns.push(self.start(global, deadline, self.spread.is_some()));
        }
        conns
    }

    /// Starts connection `global` (a task that opens it by `deadline` and then follows its
    /// mailbox), joining its room as soon as it is open when `join` says so.
    fn start(self: &Rc<Self>, global: u64, deadline: Instant, join: bool) -> Conn {
        let mailbox = Rc::new(Mailbox::default());
        let room_size = self.spread.as_ref().map_or(0, |s| s.room_of(global).1);
        if join {
            mailbox.join.set(true);
        }
        self.tally.borrow_mut().attempted += 1;
        self.inflight.set(self.inflight.get() + 1);
        let (s, m) = (self.clone(), mailbox.clone());
        tokio::task::spawn_local(async move { s.connection(global, m, deadline).await });
        Conn {
            mailbox,
            room_size: room_size as u32,
        }
    }

    /// `--stages`: keeps this process's share of the run's target open as it moves, opening
    /// the next connections of its range as it rises (each joins its room once open) and
    /// closing the latest opened as it falls, until the stages end. Returns the connections
    /// the stages end with, for the phases after them.
    async fn follow_stages(
        self: &Rc<Self>,
        range: std::ops::Range<u64>,
        stages: &Stages,
    ) -> Vec<Conn> {
        let (n, len) = (self.args.connections.max(1), range.end - range.start);
        let share = |target: u64| (u128::from(target) * u128::from(len) / u128::from(n)) as usize;
        let cap = (self.args.max_inflight / self.shards).max(1);
        let mut conns: Vec<Conn> = Vec::with_capacity(len as usize);
        let mut live = 0usize;
        let start = Instant::now();
        loop {
            let elapsed = start.elapsed();
            let target = share(stages.target_at(elapsed));
            while live < target && self.inflight.get() < cap {
                let global = range.start + live as u64;
                let deadline = Instant::now() + Duration::from_secs_f64(self.args.connect_timeout);
                let conn = self.start(global, deadline, self.spread.is_some());
                match conns.get_mut(live) {
                    Some(slot) => *slot = conn,
                    None => conns.push(conn),
                }
                live += 1;
            }
            while live > target {
                live -= 1;
                conns[live].mailbox.post(|m| m.finish.set(true));
            }
            if elapsed >= stages.length() && live == target {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The stages end once the connections they closed are closed (a close waits for the
        // server's end of it).
        let until = Instant::now() + Duration::from_secs(5);
        self.wait_until(Some(until), |s| {
            s.open.get() + s.inflight.get() <= live as u64
        })
        .await;
        conns.truncate(live);
        conns
    }

    /// Carries out the first process's commands until `finish` (or until it goes away).
    async fn follow_commands(&self, conns: &[Conn]) {
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = stdin.next_line().await {
            let Ok(command) = serde_json::from_str::<Command>(&line) else {
                eprintln!("tunegate load: shard: not a command: {line:?}");
                continue;
            };
            match command {
                Command::Join => {
                    // Every connection asked for its room as it opened (`ramp`): the answers.
                    let until = Instant::now() + Duration::from_secs(60);
                    self.wait_until(Some(until), |s| {
                        s.join_answers.get() + s.dropped.get() >= s.tally.borrow().opened
                    })
                    .await;
                    emit(&Event::Joined);
                }
                Command::Verify => {
                    self.verify(conns).await;
                    emit(&Event::Verified);
                }
                Command::Churn { millis } => {
                    self.churn(conns, Duration::from_millis(millis)).await;
                    self.report_progress();
                    emit(&Event::Churned);
                }
                Command::Publish => {
                    let seconds = self.publish(conns).await;
                    self.report_progress();
                    emit(&Event::Published { seconds });
                }
                Command::Finish => return,
            }
        }
    }

    fn report_progress(&self) {
        let t = self.tally.borrow();
        let mut recent = self.recent_us.borrow_mut();
        let latency_us = report::buckets(&recent);
        recent.reset();
        emit(&Event::Progress {
            opened: t.opened,
            failed: t.connect_errors.values().sum(),
            inflight: self.inflight.get(),
            dropped: self.dropped.get(),
            sent: t.sent,
            expected: t.expected,
            received: t.received,
            open: self.open.get(),
            latency_us,
        });
    }

    /// Asks up to `ROOMS_TO_CHECK` rooms' member counts (from connections spread over this
    /// process's range) until each is the planned size: counts cross worker buses
    /// asynchronously, and a message published before they settle could miss a member. Every
    /// room is asked at once; one answered short is asked again. The check ends 10 s after the
    /// last room was found whole (at most the connect timeout): a saturated server or load
    /// (the million: both cores busy, seconds an answer) answers late but goes on answering,
    /// and one room at a time within a fixed 10 s had counted 3,038 of 3,264 rooms short.
    async fn verify(&self, conns: &[Conn]) {
        const QUIET: Duration = Duration::from_secs(10);
        let step = (conns.len() / ROOMS_TO_CHECK).max(1);
        let start = Instant::now();
        let cap = start + Duration::from_secs_f64(self.args.connect_timeout).max(QUIET);
        let mut until = start + QUIET;
        let mut pending: Vec<&Conn> = conns.iter().step_by(step).take(ROOMS_TO_CHECK).collect();
        self.tally.borrow_mut().rooms_checked += pending.len() as u64;
        let ask = |c: &Conn| {
            c.mailbox.counted.set(None);
            c.mailbox.post(|m| m.count.set(true))
        };
        for c in &pending {
            ask(c); // one gone already is counted at the first turn
        }
        let mut gone = 0;
        while !pending.is_empty() {
            let answered = |_: &Self| {
                pending
                    .iter()
                    .any(|c| c.mailbox.counted.get().is_some() || c.mailbox.is_gone())
            };
            self.wait_until(Some(until), answered).await;
            let before = pending.len();
            let mut again = false;
            pending.retain(|c| match c.mailbox.counted.get() {
                Some(n) if n >= u64::from(c.room_size) => false,
                Some(_) => {
                    // Short for now: a member's join may still be crossing the bus.
                    again = true;
                    true
                }
                None if c.mailbox.is_gone() => {
                    gone += 1;
                    false
                }
                None => true,
            });
            let now = Instant::now();
            if pending.len() < before {
                until = (now + QUIET).min(cap);
            }
            if pending.is_empty() || now >= until {
                break;
            }
            if again {
                tokio::time::sleep(Duration::from_millis(20)).await;
                for c in pending.iter().filter(|c| c.mailbox.counted.get().is_some()) {
                    ask(c); // a connection gone since is counted at the next turn
                }
            }
        }
        let unanswered = pending.iter().filter(|c| c.mailbox.counted.get().is_none());
        let mut tally = self.tally.borrow_mut();
        tally.rooms_unanswered += unanswered.count() as u64;
        tally.rooms_short += gone + pending.len() as u64;
    }

    /// `--churn` during the hold: this process's share of the rate, evenly spaced, each from
    /// the next live connection in a scattered turn (as `publish` picks), for `length`; then
    /// until every churned connection is open again and back in its room (at most the
    /// connect timeout and 10 s), so a message phase after it finds whole rooms.
    async fn churn(&self, conns: &[Conn], length: Duration) {
        let rate = self.args.churn / self.shards as f64;
        let start = Instant::now();
        if rate > 0.0 && !conns.is_empty() {
            let stride = lap_stride(conns.len());
            let (mut next, mut asked) = (0usize, 0u64);
            let total = (rate * length.as_secs_f64()).round() as u64;
            while asked < total {
                let due = start + Duration::from_secs_f64(asked as f64 / rate);
                tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
                let mut tries = 0;
                while tries < conns.len() {
                    let c = &conns[next.wrapping_mul(stride) % conns.len()];
                    next += 1;
                    tries += 1;
                    // Not one still coming back from its last churn.
                    let ask = |m: &Mailbox| {
                        m.churn.set(true);
                        m.churning.set(true);
                    };
                    if !c.mailbox.churning.get() && c.mailbox.post(ask) {
                        self.churn_pending.set(self.churn_pending.get() + 1);
                        break;
                    }
                }
                asked += 1;
            }
        }
        let rest = start + length;
        tokio::time::sleep_until(tokio::time::Instant::from_std(rest)).await;
        let until = Instant::now()
            + Duration::from_secs_f64(self.args.connect_timeout.min(60.0))
            + Duration::from_secs(10);
        self.wait_until(Some(until), |s| s.churn_pending.get() == 0)
            .await;
    }

    /// The message phase: this process's share of the rate, from its connections in turn
    /// (those in rooms with someone to receive), for `publish_seconds`. The turn order strides
    /// through them (`lap_stride`), so every connection publishes once per lap whatever its
    /// room, and a short run is not all from the first rooms of the plan (with a spread of
    /// sizes, the smallest rooms come first).
    async fn publish(&self, conns: &[Conn]) -> f64 {
        let rate = self.args.publish_rate;
        let publishers: Vec<usize> = (0..conns.len())
            .filter(|&i| conns[i].room_size >= 2)
            .collect();
        let (start, start_us) = (Instant::now(), monotonic_us());
        if rate <= 0.0 || publishers.is_empty() {
            return 0.0;
        }
        // The run's messages are due at m / rate (m = 0, 1, ...); this process publishes those
        // with m = index mod shards. Together the processes publish at the run's rate, evenly
        // spaced: at 1/s over 6 processes, one a second, not six at once every six seconds.
        // Each carries its scheduled time, from which its latency counts (`schedule_us`).
        let all = (rate * self.args.publish_seconds).round() as u64;
        let (index, shards) = (self.index, self.shards);
        let mine = |upto: u64| {
            // How many of messages 0..upto are this process's.
            if upto > index {
                (upto - index).div_ceil(shards)
            } else {
                0
            }
        };
        let total = mine(all);
        let stride = lap_stride(publishers.len());
        let mut next = 0usize;
        let mut sent = 0u64;
        while sent < total {
            // Asleep until this process's next message is due (the timer's resolution, 1 ms,
            // is what it may be late by), then everything due by now.
            let next_due = schedule_us(0, index + sent * shards, rate);
            let wake = start + Duration::from_micros(next_due);
            tokio::time::sleep_until(tokio::time::Instant::from_std(wake)).await;
            let due = mine(((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(all));
            while sent < due {
                // Skip connections that are gone; give up on a full lap of dead ones.
                let mut tries = 0;
                loop {
                    let i = publishers[next.wrapping_mul(stride) % publishers.len()];
                    next += 1;
                    tries += 1;
                    let c = &conns[i];
                    let due = schedule_us(start_us, index + sent * shards, rate);
                    if c.mailbox.post(|m| m.publish.borrow_mut().push(due)) {
                        let mut t = self.tally.borrow_mut();
                        t.sent += 1;
                        t.expected += u64::from(c.room_size) - 1;
                        break;
                    }
                    if tries > publishers.len() {
                        return start.elapsed().as_secs_f64();
                    }
                }
                sent += 1;
            }
        }
        start.elapsed().as_secs_f64()
    }
}

/// When message `m` of the run (numbered over all processes) is due: m / rate seconds after
/// the message phase began, in `monotonic_us` time.
fn schedule_us(start_us: u64, m: u64, rate: f64) -> u64 {
    start_us + (m as f64 * 1e6 / rate).round() as u64
}

/// A step that visits every one of `n` places once per lap (coprime with `n`) and jumps far
/// each time: the first number coprime with `n` from n x 0.618 up.
fn lap_stride(n: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let start = (n as f64 * 0.618) as usize;
    (start.max(1)..).find(|&s| gcd(s, n) == 1).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::{lap_stride, schedule_us};

    /// Messages are due evenly from the phase's start, whatever process sends them: the
    /// schedule their latency counts from.
    #[test]
    fn messages_are_due_at_their_place_in_the_run() {
        assert_eq!(schedule_us(1_000, 0, 10.0), 1_000);
        assert_eq!(schedule_us(1_000, 25, 10.0), 2_501_000);
        assert_eq!(schedule_us(0, 3, 0.5), 6_000_000);
        assert_eq!(schedule_us(0, 1, 3.0), 333_333);
    }

    #[test]
    fn a_lap_visits_every_publisher_once_and_scatters() {
        for n in [1usize, 2, 10, 38, 1000, 16_667] {
            let s = lap_stride(n);
            let mut seen: Vec<usize> = (0..n).map(|k| k.wrapping_mul(s) % n).collect();
            // Scattered: the first tenth of a lap (and two) reaches past the first half.
            if n >= 10 {
                assert!(seen[..n / 10 + 2].iter().any(|&i| i > n / 2), "n {n}");
            }
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n {n}");
        }
    }
}
