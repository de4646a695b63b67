//! One load process: its share of the connections, each an async task on a single-threaded
//! tokio runtime. It follows the first process's commands on stdin (`join`, `verify`,
//! `publish`, `finish`) and reports on stdout, one JSON line per event (`Event`).

use std::cell::{Cell, RefCell};
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};

use super::plan::{self, Spread};
use super::report::{self, Tally};
use super::wire::{self, Rng};
use super::{Target, monotonic_us};
use crate::{LoadArgs, LoadEncoding, LoadProtocol};

/// Largest frame a load connection accepts from the server.
const MAX_FRAME: usize = 16 << 20;
/// Rooms a process checks (with `count`) before the message phase.
const ROOMS_TO_CHECK: usize = 64;

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
    },
    /// Every connection has opened or failed.
    Connected {
        first_us: u64,
        last_open_us: u64,
    },
    Joined,
    Verified,
    Published {
        seconds: f64,
    },
    Result {
        tally: Tally,
        open_at_end: u64,
    },
}

fn emit(e: &Event) {
    use std::io::Write;
    let mut line = serde_json::to_string(e).expect("events serialise");
    line.push('\n');
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

enum Cmd {
    Join,
    Count(oneshot::Sender<u64>),
    Publish,
    Finish,
}

struct Shard {
    args: LoadArgs,
    target: Target,
    spread: Option<Spread>,
    source: Option<Ipv4Addr>,
    tally: RefCell<Tally>,
    connect_us: RefCell<Histogram<u64>>,
    latency_us: RefCell<Histogram<u64>>,
    inflight: Cell<u64>,
    open: Cell<u64>,
    /// Connections that ended by themselves, before `finish`.
    dropped: Cell<u64>,
    /// Join answers (joined or error) received.
    join_answers: Cell<u64>,
    finishing: Cell<bool>,
    last_open_us: Cell<u64>,
    rng: RefCell<Rng>,
    /// Padding for message data.
    pad: String,
}

pub fn run(args: &LoadArgs, target: Target, index: u64, shards: u64) -> anyhow::Result<u8> {
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard);
    let range = plan::shard_range(args.connections, index, shards);
    let spread = match args.protocol {
        LoadProtocol::Relay => {
            Some(Spread::parse(&args.rooms, args.connections).map_err(crate::BadArguments)?)
        }
        LoadProtocol::Plain => None,
    };
    let source = args.source.or_else(|| {
        target
            .addr
            .ip()
            .is_loopback()
            .then(|| Ipv4Addr::new(127, 0, 0, 2))
    });
    let shard = Rc::new(Shard {
        args: args.clone(),
        target,
        spread,
        source,
        tally: RefCell::new(Tally::default()),
        connect_us: RefCell::new(report::histogram()),
        latency_us: RefCell::new(report::histogram()),
        inflight: Cell::new(0),
        open: Cell::new(0),
        dropped: Cell::new(0),
        join_answers: Cell::new(0),
        finishing: Cell::new(false),
        last_open_us: Cell::new(0),
        rng: RefCell::new(Rng::new(
            monotonic_us() ^ (u64::from(std::process::id()) << 32),
        )),
        pad: "x".repeat(args.payload),
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
        let deadline = Instant::now() + Duration::from_secs_f64(self.args.connect_timeout);
        let mut conns: Vec<Option<mpsc::UnboundedSender<Cmd>>> = Vec::new();
        let mut rooms: Vec<(String, u64)> = Vec::new();

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

        // Ramp: start connects at this process's share of the rate, never more in flight than
        // its share of the cap.
        let shards = plan_shards(&self.args);
        let rate = (self.args.connect_rate as f64 / shards as f64).max(1.0);
        let cap = (self.args.max_inflight / shards).max(1);
        let ramp_start = Instant::now();
        for (n, global) in range.clone().enumerate() {
            let due = ramp_start + Duration::from_secs_f64(n as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
            while self.inflight.get() >= cap && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if Instant::now() >= deadline {
                let left = range.end - global;
                self.tally.borrow_mut().attempted += left;
                *self
                    .tally
                    .borrow_mut()
                    .connect_errors
                    .entry("not started: connect timeout".into())
                    .or_default() += left;
                break;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            conns.push(Some(tx));
            rooms.push(
                self.spread
                    .as_ref()
                    .map_or((String::new(), 0), |s| s.room_of(global)),
            );
            self.tally.borrow_mut().attempted += 1;
            self.inflight.set(self.inflight.get() + 1);
            let (s, room) = (self.clone(), rooms.last().expect("just pushed").0.clone());
            tokio::task::spawn_local(async move { s.connection(global, room, rx, deadline).await });
        }
        while self.inflight.get() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.report_progress();
        emit(&Event::Connected {
            first_us,
            last_open_us: self.last_open_us.get(),
        });

        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = stdin.next_line().await {
            match line.trim() {
                "join" => {
                    let mut asked = 0;
                    for tx in conns.iter().flatten() {
                        if tx.send(Cmd::Join).is_ok() {
                            asked += 1;
                        }
                    }
                    let until = Instant::now() + Duration::from_secs(60);
                    while self.join_answers.get() + self.dropped.get() < asked
                        && Instant::now() < until
                    {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    emit(&Event::Joined);
                }
                "verify" => {
                    self.verify(&conns, &rooms).await;
                    emit(&Event::Verified);
                }
                "publish" => {
                    let seconds = self.publish(&conns, &rooms).await;
                    self.report_progress();
                    emit(&Event::Published { seconds });
                }
                "finish" => break,
                _ => {}
            }
        }
        // Finish (or the first process went away): close everything, report, exit.
        self.finishing.set(true);
        let open_at_end = self.open.get();
        for tx in conns.iter().flatten() {
            let _ = tx.send(Cmd::Finish);
        }
        let until = Instant::now() + Duration::from_secs(3);
        while self.open.get() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        progress.abort();
        let mut tally = self.tally.borrow().clone();
        tally.connect_us = report::buckets(&self.connect_us.borrow());
        tally.latency_us = report::buckets(&self.latency_us.borrow());
        emit(&Event::Result { tally, open_at_end });
        Ok(0)
    }

    fn report_progress(&self) {
        let t = self.tally.borrow();
        emit(&Event::Progress {
            opened: t.opened,
            failed: t.connect_errors.values().sum(),
            inflight: self.inflight.get(),
            dropped: self.dropped.get(),
            sent: t.sent,
            expected: t.expected,
            received: t.received,
        });
    }

    /// Asks up to `ROOMS_TO_CHECK` rooms' member counts (from connections spread over this
    /// process's range) until each is the planned size: counts cross worker buses
    /// asynchronously, and a message published before they settle could miss a member.
    async fn verify(&self, conns: &[Option<mpsc::UnboundedSender<Cmd>>], rooms: &[(String, u64)]) {
        let step = (conns.len() / ROOMS_TO_CHECK).max(1);
        let until = Instant::now() + Duration::from_secs(10);
        for i in (0..conns.len()).step_by(step).take(ROOMS_TO_CHECK) {
            let Some(tx) = &conns[i] else { continue };
            let want = rooms[i].1;
            self.tally.borrow_mut().rooms_checked += 1;
            let mut ok = false;
            while Instant::now() < until {
                let (reply, got) = oneshot::channel();
                if tx.send(Cmd::Count(reply)).is_err() {
                    break;
                }
                match tokio::time::timeout(Duration::from_secs(2), got).await {
                    Ok(Ok(n)) if n >= want => {
                        ok = true;
                        break;
                    }
                    Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
                    _ => break,
                }
            }
            if !ok {
                self.tally.borrow_mut().rooms_short += 1;
            }
        }
    }

    /// The message phase: this process's share of the rate, from its connections in turn
    /// (those in rooms with someone to receive), for `publish_seconds`.
    async fn publish(
        &self,
        conns: &[Option<mpsc::UnboundedSender<Cmd>>],
        rooms: &[(String, u64)],
    ) -> f64 {
        let shards = plan_shards(&self.args);
        let rate = self.args.publish_rate as f64 / shards as f64;
        let publishers: Vec<usize> = (0..conns.len()).filter(|&i| rooms[i].1 >= 2).collect();
        let start = Instant::now();
        if rate <= 0.0 || publishers.is_empty() {
            return 0.0;
        }
        let total = (rate * self.args.publish_seconds).round() as u64;
        let mut next = 0usize;
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut sent = 0u64;
        while sent < total {
            tick.tick().await;
            let due = ((start.elapsed().as_secs_f64() * rate) as u64).min(total);
            while sent < due {
                // Skip connections that are gone; give up on a full lap of dead ones.
                let mut tries = 0;
                loop {
                    let i = publishers[next % publishers.len()];
                    next += 1;
                    tries += 1;
                    if let Some(tx) = &conns[i]
                        && tx.send(Cmd::Publish).is_ok()
                    {
                        let mut t = self.tally.borrow_mut();
                        t.sent += 1;
                        t.expected += rooms[i].1 - 1;
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

    /// One connection, from connect to finish.
    async fn connection(
        self: Rc<Self>,
        global: u64,
        room: String,
        mut rx: mpsc::UnboundedReceiver<Cmd>,
        deadline: Instant,
    ) {
        let started = Instant::now();
        let left = deadline.saturating_duration_since(started);
        let opened = tokio::time::timeout(left, self.open_connection(global)).await;
        self.inflight.set(self.inflight.get() - 1);
        let (mut stream, mut buf) = match opened {
            Ok(Ok(s)) => s,
            Ok(Err(cause)) => return self.connect_failed(cause),
            Err(_) => return self.connect_failed("timeout".into()),
        };
        let took = started.elapsed().as_micros() as u64;
        let _ = self.connect_us.borrow_mut().record(took.max(1));
        self.tally.borrow_mut().opened += 1;
        self.open.set(self.open.get() + 1);
        self.last_open_us
            .set(self.last_open_us.get().max(monotonic_us()));

        let mut pending_count: Option<oneshot::Sender<u64>> = None;
        let mut out = Vec::new();
        let why = loop {
            // Frames already buffered first (the hello may have come with the upgrade answer).
            match self.take_frames(&mut buf, &mut out, &mut pending_count) {
                Ok(()) => {}
                Err(cause) => break Some(cause),
            }
            if !out.is_empty() {
                if let Err(e) = stream.write_all(&out).await {
                    break Some(io_cause(&e));
                }
                out.clear();
            }
            if buf.capacity() > 8192 && buf.is_empty() {
                buf.shrink_to(1024);
            }
            buf.reserve(1024);
            tokio::select! {
                r = stream.read_buf(&mut buf) => match r {
                    Ok(0) => break Some("eof".to_string()),
                    Ok(_) => {}
                    Err(e) => break Some(io_cause(&e)),
                },
                cmd = rx.recv() => match cmd {
                    Some(Cmd::Join) => self.request(&mut out, &format!(
                        r#"{{"op":"join","room":"{room}","ref":"j"}}"#)),
                    Some(Cmd::Count(reply)) => {
                        pending_count = Some(reply);
                        self.request(&mut out, &format!(r#"{{"op":"count","room":"{room}","ref":"c"}}"#));
                    }
                    Some(Cmd::Publish) => self.publish_frame(&mut out, &room),
                    Some(Cmd::Finish) | None => {
                        let m = self.rng.borrow_mut().next() as u32;
                        wire::frame(&mut out, wire::CLOSE, &1000u16.to_be_bytes(), m);
                        let _ = stream.write_all(&out).await;
                        break None;
                    }
                },
            }
        };
        self.open.set(self.open.get() - 1);
        if let Some(cause) = why
            && !self.finishing.get()
        {
            self.dropped.set(self.dropped.get() + 1);
            *self
                .tally
                .borrow_mut()
                .disconnects
                .entry(cause)
                .or_default() += 1;
        }
    }

    fn connect_failed(&self, cause: String) {
        *self
            .tally
            .borrow_mut()
            .connect_errors
            .entry(cause)
            .or_default() += 1;
    }

    /// TCP connect from this connection's source address, the upgrade, and (relay) the hello.
    async fn open_connection(&self, global: u64) -> Result<(TcpStream, Vec<u8>), String> {
        let socket = TcpSocket::new_v4().map_err(|e| io_cause(&e))?;
        if let Some(base) = self.source {
            let src = plan::source_of(base, self.args.per_source, global);
            // Pick the port at connect() against the whole 4-tuple, not at bind(): each
            // source address then has the full ephemeral range per destination.
            let _ = nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            );
            socket
                .bind(SocketAddr::new(src.into(), 0))
                .map_err(|e| format!("bind {src}: {}", io_cause(&e)))?;
        }
        let mut stream = socket
            .connect(self.target.addr)
            .await
            .map_err(|e| io_cause(&e))?;
        let _ = stream.set_nodelay(true);
        let (req, accept) = wire::request(
            &self.target.host,
            &self.target.path,
            &mut self.rng.borrow_mut(),
        );
        stream.write_all(&req).await.map_err(|e| io_cause(&e))?;
        let mut buf = Vec::with_capacity(512);
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if buf.len() > 8192 {
                return Err("oversized upgrade answer".into());
            }
            buf.reserve(512);
            match stream.read_buf(&mut buf).await {
                Ok(0) => return Err("eof during upgrade".into()),
                Ok(_) => {}
                Err(e) => return Err(io_cause(&e)),
            }
        };
        wire::check_response(&buf[..head_end], &accept)?;
        buf.drain(..head_end);
        if self.args.protocol == LoadProtocol::Relay {
            // Open means greeted: read until the first frame is in.
            loop {
                if wire::parse(&buf, MAX_FRAME)?.is_some() {
                    break;
                }
                buf.reserve(512);
                match stream.read_buf(&mut buf).await {
                    Ok(0) => return Err("eof before hello".into()),
                    Ok(_) => {}
                    Err(e) => return Err(io_cause(&e)),
                }
            }
        }
        Ok((stream, buf))
    }

    /// Handles every complete frame in `buf`, queueing answers (pongs) in `out`.
    fn take_frames(
        &self,
        buf: &mut Vec<u8>,
        out: &mut Vec<u8>,
        pending_count: &mut Option<oneshot::Sender<u64>>,
    ) -> Result<(), String> {
        let mut used = 0;
        while let Some((_fin, opcode, range, len)) = wire::parse(&buf[used..], MAX_FRAME)? {
            let payload = &buf[used + range.start..used + range.end];
            match opcode {
                wire::PING => {
                    let m = self.rng.borrow_mut().next() as u32;
                    wire::frame(out, wire::PONG, payload, m);
                    self.tally.borrow_mut().pings_answered += 1;
                }
                wire::CLOSE => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    return Err(code.map_or("close".into(), |c| format!("close {c}")));
                }
                wire::TEXT | wire::BINARY if self.args.protocol == LoadProtocol::Relay => {
                    let msg: Result<Incoming, String> = if opcode == wire::TEXT {
                        serde_json::from_slice(payload).map_err(|e| e.to_string())
                    } else {
                        rmp_serde::from_slice(payload).map_err(|e| e.to_string())
                    };
                    match msg {
                        Ok(m) => self.incoming(m, pending_count),
                        Err(e) => return Err(format!("unreadable message: {e}")),
                    }
                }
                _ => {}
            }
            used += len;
        }
        buf.drain(..used);
        Ok(())
    }

    fn incoming(&self, m: Incoming, pending_count: &mut Option<oneshot::Sender<u64>>) {
        match m.op.as_str() {
            "message" => {
                // Only this run's messages (stamped) are timed and counted.
                if let Some(DataIn::Stamp { t }) = m.data {
                    let now = monotonic_us();
                    let _ = self
                        .latency_us
                        .borrow_mut()
                        .record(now.saturating_sub(t).max(1));
                    self.tally.borrow_mut().received += 1;
                }
            }
            "joined" => {
                self.tally.borrow_mut().joined += 1;
                self.join_answers.set(self.join_answers.get() + 1);
            }
            "count" => {
                if let Some(reply) = pending_count.take() {
                    let _ = reply.send(m.members.unwrap_or(0));
                }
            }
            "error" => {
                self.tally.borrow_mut().server_errors += 1;
                if matches!(&m.reference, Some(RefIn::Text(r)) if r == "j") {
                    self.join_answers.set(self.join_answers.get() + 1);
                }
            }
            _ => {}
        }
    }

    /// A request in this run's encoding. `json` is the request as JSON text.
    fn request(&self, out: &mut Vec<u8>, json: &str) {
        let m = self.rng.borrow_mut().next() as u32;
        match self.args.encoding {
            LoadEncoding::Json => wire::frame(out, wire::TEXT, json.as_bytes(), m),
            LoadEncoding::Msgpack => {
                let v: serde_json::Value = serde_json::from_str(json).expect("our own JSON");
                let bytes = rmp_serde::to_vec_named(&v).expect("msgpack encodes JSON values");
                wire::frame(out, wire::BINARY, &bytes, m)
            }
        }
    }

    fn publish_frame(&self, out: &mut Vec<u8>, room: &str) {
        let m = self.rng.borrow_mut().next() as u32;
        let t = monotonic_us();
        match self.args.encoding {
            LoadEncoding::Json => {
                let text = format!(
                    r#"{{"op":"publish","room":"{room}","data":{{"t":{t},"p":"{}"}}}}"#,
                    self.pad
                );
                wire::frame(out, wire::TEXT, text.as_bytes(), m)
            }
            LoadEncoding::Msgpack => {
                let msg = PublishMsg {
                    op: "publish",
                    room,
                    data: Stamp {
                        t,
                        p: Some(&self.pad),
                    },
                };
                let bytes = rmp_serde::to_vec_named(&msg).expect("msgpack encodes");
                wire::frame(out, wire::BINARY, &bytes, m)
            }
        }
    }
}

/// How many processes share the run (from `--shard I/K`).
fn plan_shards(args: &LoadArgs) -> u64 {
    args.shard
        .as_deref()
        .and_then(|s| s.split_once('/'))
        .and_then(|(_, k)| k.parse().ok())
        .unwrap_or(1)
        .max(1)
}

fn io_cause(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => format!("{:?}", nix::errno::Errno::from_raw(code)),
        None => format!("{:?}", e.kind()),
    }
}

/// A server message, read leniently: `data` and `ref` of shapes this run did not send (another
/// client's messages in a shared room) are accepted and ignored, not a broken connection.
#[derive(Deserialize)]
struct Incoming {
    op: String,
    #[serde(default)]
    members: Option<u64>,
    #[serde(default)]
    data: Option<DataIn>,
    #[serde(default, rename = "ref")]
    reference: Option<RefIn>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum DataIn {
    Stamp { t: u64 },
    Other(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RefIn {
    Text(String),
    Other(serde::de::IgnoredAny),
}

#[derive(Serialize)]
struct PublishMsg<'a> {
    op: &'static str,
    room: &'a str,
    data: Stamp<'a>,
}

#[derive(Serialize)]
struct Stamp<'a> {
    t: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    p: Option<&'a str>,
}
