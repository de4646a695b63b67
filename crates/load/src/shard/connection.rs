//! One connection's task: connect (from its source address), upgrade, read the hello, then
//! follow the shard's commands (join, count, publish, finish) while answering pings and timing
//! every stamped room message it receives.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpSocket;
use tokio::sync::Notify;

use crate::tls::{self, Stream};

use super::{MAX_FRAME, Shard};
use crate::monotonic_us;
use crate::plan;
use crate::wire;
use crate::{LoadEncoding, LoadProtocol};

/// What the main task asks of one connection, and what the connection answers: a few cells and
/// a `Notify` (no allocation while nobody waits), where a channel per connection cost hundreds
/// of bytes. The connection takes the requests each time it wakes.
#[derive(Default)]
pub struct Mailbox {
    wake: Notify,
    pub join: Cell<bool>,
    pub count: Cell<bool>,
    /// The member count the last `count` was answered with.
    pub counted: Cell<Option<u64>>,
    /// Messages to publish, by their scheduled time (`monotonic_us`); empty without an
    /// allocation while nothing is asked.
    pub publish: RefCell<Vec<u64>>,
    pub finish: Cell<bool>,
    /// Close and open again (`--churn`).
    pub churn: Cell<bool>,
    /// Asked to churn and not back yet (not asked again meanwhile).
    pub churning: Cell<bool>,
    /// Reopened after churn, its join not answered yet.
    rejoining: Cell<bool>,
    /// The connection ended (or never opened): nothing posted reaches it any more.
    gone: Cell<bool>,
}

impl Mailbox {
    /// Leaves a request and wakes the connection; false if it has ended.
    pub fn post(&self, request: impl FnOnce(&Self)) -> bool {
        if self.gone.get() {
            return false;
        }
        request(self);
        // A permit is kept when the task is not waiting: a request made while it writes is
        // taken on its next turn.
        self.wake.notify_one();
        true
    }

    pub fn is_gone(&self) -> bool {
        self.gone.get()
    }
}

impl Shard {
    /// One connection, from connect to finish; with `churn` asked, closed (Close 1000) and
    /// opened again, back in its room, as often as asked.
    pub(super) async fn connection(
        self: Rc<Self>,
        global: u64,
        mailbox: Rc<Mailbox>,
        deadline: Instant,
    ) {
        let mut again = false;
        loop {
            let started = Instant::now();
            let left = if again {
                Duration::from_secs_f64(self.args.connect_timeout)
            } else {
                deadline.saturating_duration_since(started)
            };
            // Boxed: the connect and TLS handshake futures are large, and an async fn is as
            // large as its largest state; boxed, they are freed once the connection is open.
            let opened = tokio::time::timeout(left, Box::pin(self.open_connection(global))).await;
            if !again {
                self.inflight.set(self.inflight.get() - 1);
                self.changed();
            }
            let (stream, held) = match opened {
                Ok(Ok(s)) => s,
                Ok(Err(cause)) => return self.open_failed(&mailbox, again, cause),
                Err(_) => return self.open_failed(&mailbox, again, "timeout".into()),
            };
            if again {
                if self.spread.is_some() {
                    // Back in its room before it counts as back (`incoming`, "joined").
                    mailbox.rejoining.set(true);
                    mailbox.join.set(true);
                } else {
                    self.churned(&mailbox);
                }
            } else {
                let took = started.elapsed().as_micros() as u64;
                let _ = self.connect_us.borrow_mut().record(took.max(1));
                self.tally.borrow_mut().opened += 1;
                self.last_open_us
                    .set(self.last_open_us.get().max(monotonic_us()));
            }
            self.open.set(self.open.get() + 1);
            let why = self.session(global, &mailbox, stream, held).await;
            self.open.set(self.open.get() - 1);
            self.changed();
            match why {
                Ended::Churn => again = true,
                Ended::Finished => break,
                Ended::Dropped(cause) => {
                    if !self.finishing.get() {
                        self.dropped.set(self.dropped.get() + 1);
                        *self
                            .tally
                            .borrow_mut()
                            .disconnects
                            .entry(cause)
                            .or_default() += 1;
                    }
                    break;
                }
            }
        }
        mailbox.gone.set(true);
        self.changed();
    }

    /// An open connection until it ends: its requests written, its frames handled.
    async fn session(
        &self,
        global: u64,
        mailbox: &Mailbox,
        mut stream: Stream,
        mut held: Vec<u8>,
    ) -> Ended {
        // Frames that came with the upgrade answer (the hello) first.
        let mut out = Vec::new();
        if let Err(cause) = self.take_held(&mut held, &[], &mut out, mailbox) {
            return Ended::Dropped(cause);
        }
        loop {
            if mailbox.churn.take() {
                let m = self.rng.borrow_mut().next() as u32;
                wire::frame(&mut out, wire::CLOSE, &1000u16.to_be_bytes(), m);
                self.close(&mut stream, &out).await;
                return Ended::Churn;
            }
            if let Some(last) = self.take_requests(global, mailbox, &mut out) {
                self.close(&mut stream, &out).await;
                return last.map_or(Ended::Finished, Ended::Dropped);
            }
            if !out.is_empty() {
                if let Err(e) = stream.write_all(&out).await {
                    return Ended::Dropped(io_cause(&e));
                }
                // Freed: an idle connection keeps no output buffer.
                out = Vec::new();
            }
            tokio::select! {
                r = std::future::poll_fn(|cx| self.poll_input(&mut stream, cx)) => match r {
                    Ok(0) => return Ended::Dropped("eof".to_string()),
                    Ok(n) => {
                        let input = self.input.borrow();
                        if let Err(cause) = self.take_held(&mut held, &input[..n], &mut out, mailbox) {
                            return Ended::Dropped(cause);
                        }
                    }
                    Err(e) => return Ended::Dropped(io_cause(&e)),
                },
                () = mailbox.wake.notified() => {}
            }
        }
    }

    /// Writes `out` (ending in a Close frame) and waits, at most 2 s, for the server to end
    /// the connection, reading and dropping what still comes (RFC 6455 section 7.1.1: the
    /// server closes TCP first). Closing at once would leave unread data that makes the kernel
    /// answer with a reset, and the server would see a client gone instead of one that said
    /// goodbye.
    async fn close(&self, stream: &mut Stream, out: &[u8]) {
        if stream.write_all(out).await.is_err() {
            return;
        }
        let drained = async {
            let mut sink = [0u8; 512];
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drained).await;
    }

    /// A connect failed: the first (a connect error) or a reopening after churn (the
    /// connection is lost: an unexpected disconnect, by cause).
    fn open_failed(&self, mailbox: &Mailbox, again: bool, cause: String) {
        mailbox.gone.set(true);
        if again {
            mailbox.churning.set(false);
            self.churn_pending.set(self.churn_pending.get() - 1);
            self.dropped.set(self.dropped.get() + 1);
            *self
                .tally
                .borrow_mut()
                .disconnects
                .entry(format!("churn: {cause}"))
                .or_default() += 1;
        } else {
            self.connect_failed(cause);
        }
        self.changed();
    }

    /// A churned connection is open again (and back in its room).
    fn churned(&self, mailbox: &Mailbox) {
        mailbox.churning.set(false);
        self.tally.borrow_mut().churned += 1;
        self.churn_pending.set(self.churn_pending.get() - 1);
        self.changed();
    }

    /// The main task's requests as frames in `out`; `Some` when the connection is to end after
    /// writing them (finish: a Close frame).
    fn take_requests(
        &self,
        global: u64,
        mailbox: &Mailbox,
        out: &mut Vec<u8>,
    ) -> Option<Option<String>> {
        if mailbox.finish.get() {
            let m = self.rng.borrow_mut().next() as u32;
            wire::frame(out, wire::CLOSE, &1000u16.to_be_bytes(), m);
            return Some(None);
        }
        let join = mailbox.join.take();
        let count = mailbox.count.take();
        let publish = mailbox.publish.take();
        if !(join || count || !publish.is_empty()) {
            return None;
        }
        let room = self
            .spread
            .as_ref()
            .map_or(String::new(), |s| s.room_of(global).0);
        if join {
            self.request(
                out,
                &RoomRequest {
                    op: "join",
                    room: &room,
                    reference: "j",
                },
            );
        }
        if count {
            self.request(
                out,
                &RoomRequest {
                    op: "count",
                    room: &room,
                    reference: "c",
                },
            );
        }
        for due in publish {
            self.publish_frame(out, &room, due);
        }
        None
    }

    /// Reads what `stream` has into the shard's input buffer (borrowed only within this poll).
    fn poll_input(
        &self,
        stream: &mut Stream,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<usize>> {
        let mut input = self.input.borrow_mut();
        let mut buf = ReadBuf::new(&mut input[..]);
        match std::pin::Pin::new(stream).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(buf.filled().len())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Handles every complete frame of `held` followed by `input`; what is left of a partial
    /// frame stays in `held`, which holds nothing (no allocation) between whole frames.
    fn take_held(
        &self,
        held: &mut Vec<u8>,
        input: &[u8],
        out: &mut Vec<u8>,
        mailbox: &Mailbox,
    ) -> Result<(), String> {
        if held.is_empty() {
            let used = self.take_frames(input, out, mailbox)?;
            *held = input[used..].to_vec();
            return Ok(());
        }
        held.extend_from_slice(input);
        let used = self.take_frames(held, out, mailbox)?;
        held.drain(..used);
        if held.is_empty() {
            *held = Vec::new();
        }
        Ok(())
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
    async fn open_connection(&self, global: u64) -> Result<(Stream, Vec<u8>), String> {
        let target = self.targets.of(global);
        let socket = if target.addr.is_ipv6() {
            TcpSocket::new_v6()
        } else {
            TcpSocket::new_v4()
        }
        .map_err(|e| io_cause(&e))?;
        if let Some(base) = self.source.filter(|_| target.addr.is_ipv4()) {
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
        let tcp = socket
            .connect(target.addr)
            .await
            .map_err(|e| io_cause(&e))?;
        let _ = tcp.set_nodelay(true);
        let mut stream = match (&self.tls, target.tls) {
            (Some(connector), true) => tls::wrap(connector, tcp, target)
                .await
                .map_err(|e| format!("tls: {}", io_cause(&e)))?,
            _ => Stream::Plain(tcp),
        };
        let offer = wire::Offer {
            headers: &self.headers.lines,
            deflate: self.args.deflate,
        };
        let path = match self.spread.as_ref().filter(|_| self.args.affinity) {
            Some(spread) => {
                let sep = if target.path.contains('?') { '&' } else { '?' };
                let room = wire::percent_encoded(&spread.room_of(global).0);
                format!("{}{sep}affinity={room}", target.path)
            }
            None => target.path.clone(),
        };
        let (req, accept) = wire::request(
            self.headers.host.as_deref().unwrap_or(&target.host),
            &path,
            &offer,
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
        wire::check_response(&buf[..head_end], &accept, self.args.deflate)?;
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

    /// Handles every complete frame at the start of `buf`, queueing answers (pongs) in `out`;
    /// returns how many bytes they took.
    fn take_frames(
        &self,
        buf: &[u8],
        out: &mut Vec<u8>,
        mailbox: &Mailbox,
    ) -> Result<usize, String> {
        let mut used = 0;
        let mut inflated = self.inflated.borrow_mut();
        while let Some((rsv1, opcode, range, len)) = wire::parse(&buf[used..], MAX_FRAME)? {
            let mut payload = &buf[used + range.start..used + range.end];
            if rsv1 {
                if !self.args.deflate {
                    return Err("compressed frame without permessage-deflate".into());
                }
                self.inflate(payload, &mut inflated)?;
                payload = &inflated;
                self.tally.borrow_mut().inflated += 1;
            }
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
                        Ok(m) => self.incoming(m, mailbox),
                        Err(e) => return Err(format!("unreadable message: {e}")),
                    }
                }
                _ => {}
            }
            used += len;
        }
        Ok(used)
    }

    /// A compressed message (no context takeover: it stands alone), into `out`.
    fn inflate(&self, data: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let mut z = self.inflater.borrow_mut();
        z.reset(false);
        out.clear();
        out.reserve(data.len() * 4 + 64);
        for input in [data, &[0, 0, 0xff, 0xff][..]] {
            let start = z.total_in();
            loop {
                let done = (z.total_in() - start) as usize;
                if out.capacity() - out.len() < 4096 {
                    out.reserve(out.capacity().max(4096));
                }
                z.decompress_vec(&input[done..], out, flate2::FlushDecompress::Sync)
                    .map_err(|e| format!("bad compressed message: {e}"))?;
                if out.len() > MAX_FRAME {
                    return Err("compressed message too big".into());
                }
                if (z.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
                    break;
                }
            }
        }
        Ok(())
    }

    fn incoming(&self, m: Incoming, mailbox: &Mailbox) {
        match m.op.as_str() {
            "message" => {
                // Only this run's messages (stamped) are timed and counted.
                if let Some(DataIn::Stamp { t, s }) = m.data {
                    let now = monotonic_us();
                    let latency = now.saturating_sub(t).max(1);
                    let _ = self.latency_us.borrow_mut().record(latency);
                    let _ = self.recent_us.borrow_mut().record(latency);
                    let _ = self
                        .service_us
                        .borrow_mut()
                        .record(now.saturating_sub(s.unwrap_or(t)).max(1));
                    self.tally.borrow_mut().received += 1;
                }
            }
            "joined" if mailbox.rejoining.take() => self.churned(mailbox),
            "joined" => {
                self.tally.borrow_mut().joined += 1;
                self.join_answers.set(self.join_answers.get() + 1);
                self.changed();
            }
            "count" => {
                mailbox.counted.set(Some(m.members.unwrap_or(0)));
                self.changed();
            }
            "error" => {
                self.tally.borrow_mut().server_errors += 1;
                if matches!(&m.reference, Some(RefIn::Text(r)) if r == "j") {
                    if mailbox.rejoining.take() {
                        // Open again, though refused its room: the error counts above.
                        self.churned(mailbox);
                    } else {
                        self.join_answers.set(self.join_answers.get() + 1);
                        self.changed();
                    }
                }
            }
            _ => {}
        }
    }

    /// A request in this run's encoding.
    fn request(&self, out: &mut Vec<u8>, msg: &impl Serialize) {
        let m = self.rng.borrow_mut().next() as u32;
        match self.args.encoding {
            LoadEncoding::Json => {
                let text = serde_json::to_vec(msg).expect("requests encode");
                wire::frame(out, wire::TEXT, &text, m)
            }
            LoadEncoding::Msgpack => {
                let bytes = rmp_serde::to_vec_named(msg).expect("requests encode");
                wire::frame(out, wire::BINARY, &bytes, m)
            }
        }
    }

    /// A message scheduled for `due`, written now: stamped with both, so its delivery counts
    /// from the schedule (a publisher behind it does not hide the wait) and from the write.
    fn publish_frame(&self, out: &mut Vec<u8>, room: &str, due: u64) {
        let now = monotonic_us();
        let _ = self
            .lag_us
            .borrow_mut()
            .record(now.saturating_sub(due).max(1));
        let msg = PublishMsg {
            op: "publish",
            room,
            data: Stamp {
                t: due,
                s: now,
                p: Some(&self.pad),
            },
        };
        self.request(out, &msg);
    }
}

/// How a session ended.
enum Ended {
    /// Asked to churn: closed, to be opened again.
    Churn,
    /// Finished as the run asked.
    Finished,
    /// Ended by itself (or failed): the cause.
    Dropped(String),
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
    Stamp {
        t: u64,
        #[serde(default)]
        s: Option<u64>,
    },
    Other(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RefIn {
    Text(String),
    Other(serde::de::IgnoredAny),
}

/// `join` or `count` of this connection's room.
#[derive(Serialize)]
struct RoomRequest<'a> {
    op: &'static str,
    room: &'a str,
    #[serde(rename = "ref")]
    reference: &'static str,
}

#[derive(Serialize)]
struct PublishMsg<'a> {
    op: &'static str,
    room: &'a str,
    data: Stamp<'a>,
}

#[derive(Serialize)]
struct Stamp<'a> {
    /// When the message was scheduled.
    t: u64,
    /// When it was written.
    s: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    p: Option<&'a str>,
}
