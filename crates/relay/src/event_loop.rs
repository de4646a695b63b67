//! One event loop per thread, the transport: its own SO_REUSEPORT listener and epoll set,
//! accept, edge-triggered reads into one receive buffer shared by all its connections, the
//! HTTP upgrade, WebSocket frames (pings, pongs, the closing handshake), timeouts, shutdown.
//! What the messages mean is the `Handler`'s business (`handler.rs`); writing and closing are
//! `Sockets`' (`sockets.rs`).
//!
//! Timeouts are swept by ticks (`sweep.rs`): each connection keeps two 32-bit tick stamps.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::epoll::{EpollEvent, EpollFlags};

use super::auth::Verifier;
use super::client_addr::Admission;
use super::conn::{self, AWAIT_PONG, Incoming, State};
use super::frame::{self, Fail, close};
use super::handler::{Handler, Sink};
use super::handoff::Handoff;
use super::handshake::{self, Parsed};
use super::id::ProcessId;
use super::metrics::{CloseReason, LoopMetrics};
use super::sockets::{Arrived, Received, Sockets, TICK_MS, ticks};
use super::tls::Certs;
use super::{Config, Options, heap, sys};

mod admit;
mod moving;
mod sweep;
use admit::Refusals;
use moving::{Moved, Waiting};
use sweep::HeartbeatLog;

/// Receive buffer per loop (not per connection).
const RECV_BUF: usize = 64 * 1024;
/// Reads per readiness event before other connections get a turn.
const READS_PER_TURN: usize = 8;

const TOKEN_WAKE: u64 = u64::MAX - 1;
const TOKEN_STOP: u64 = u64::MAX - 2;
/// Listener `i`'s token is `TOKEN_LISTENERS - i` (at most `config::MAX_LISTEN` of them).
const TOKEN_LISTENERS: u64 = u64::MAX - 3;
/// The handoff socket's: above every connection's (generation << 32 | slot, below 2^48) and
/// below the listeners'.
const TOKEN_HANDOFF: u64 = 1 << 63;

/// Tells a loop to stop: stop accepting, close every connection with 1001, drain.
pub struct Stop {
    requested: AtomicBool,
    waker: sys::Waker,
}

impl Stop {
    pub fn new() -> std::io::Result<Arc<Stop>> {
        Ok(Arc::new(Stop {
            requested: AtomicBool::new(false),
            waker: sys::Waker::new()?,
        }))
    }

    pub fn request(&self) {
        self.requested.store(true, Ordering::Relaxed);
        self.waker.wake();
    }
}

pub struct EventLoop<H: Handler> {
    sockets: Sockets<H::Data>,
    handler: H,
    options: Options,
    policy: handshake::Policy,
    stop: Arc<Stop>,
    /// One per `--listen` address; emptied at shutdown.
    listeners: Vec<OwnedFd>,
    reserve: Option<OwnedFd>,
    accept_blocked: bool,
    buf: Vec<u8>,
    incoming: Vec<Incoming>,
    ended: Vec<usize>,
    again: Vec<usize>,
    start: Instant,
    sweep_at: usize,
    shutting_down: bool,
    drain_deadline: u32,
    admission: Arc<Admission>,
    /// With a per-address limit: the client address each admitted connection counts against,
    /// given back when it ends. Empty (and never touched) without a limit.
    held: HashMap<u32, IpAddr>,
    /// Log lines about refused upgrades, one per second at most per kind, whatever a flood
    /// does.
    refusals_logged: Refusals,
    /// Log lines about heartbeat timeouts, one per second at most per kind.
    heartbeats_logged: HeartbeatLog,
    /// Checks the tokens of upgrades when the server requires them.
    verifier: Option<Arc<Verifier>>,
    /// The tick the timers were last swept and `Handler::on_tick` called at.
    ticked: u32,
    /// Where compressed messages are inflated: one buffer per loop, like the receive buffer.
    inflated: Vec<u8>,
    /// Between workers on one host (no TLS): where connections are handed to their room's
    /// home and taken from other loops (`handoff.rs`).
    handoff: Option<Handoff>,
    /// Connections whose home's queue was full, tried again every tick.
    moving: Vec<Waiting>,
    /// When to give the allocator's free pages back (`heap.rs`).
    heap: heap::Keeper,
}

/// Who gets in, shared by every loop of the process: the per-address table, the token keys
/// (tokens required), the certificates (TLS).
#[derive(Clone)]
pub struct Access {
    pub admission: Arc<Admission>,
    pub verifier: Option<Arc<Verifier>>,
    pub certs: Option<Arc<Certs>>,
}

impl<H: Handler> EventLoop<H> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        loop_index: usize,
        process: ProcessId,
        listeners: Vec<OwnedFd>,
        handler: H,
        config: Config,
        metrics: Arc<LoopMetrics>,
        stop: Arc<Stop>,
        access: Access,
    ) -> std::io::Result<EventLoop<H>> {
        let Access {
            admission,
            verifier,
            certs,
        } = access;
        let poller = sys::Poller::new()?;
        for (i, listener) in listeners.iter().enumerate() {
            poller.add(
                listener.as_fd(),
                TOKEN_LISTENERS - i as u64,
                sys::listener_interest(),
            )?;
        }
        poller.add(
            stop.waker.fd(),
            TOKEN_STOP,
            EpollFlags::EPOLLIN | EpollFlags::EPOLLET,
        )?;
        if let Some(fd) = handler.wake_fd() {
            poller.add(fd, TOKEN_WAKE, EpollFlags::EPOLLIN | EpollFlags::EPOLLET)?;
        }
        Ok(EventLoop {
            sockets: Sockets::new(
                loop_index,
                process,
                poller,
                metrics,
                config.options.max_pending_output,
                certs,
                config.options.deflate.on(),
            ),
            handler,
            policy: config.policy(),
            options: config.options,
            stop,
            listeners,
            reserve: sys::reserve_fd().ok(),
            accept_blocked: false,
            buf: vec![0; RECV_BUF],
            incoming: Vec::new(),
            ended: Vec::new(),
            again: Vec::new(),
            start: Instant::now(),
            sweep_at: 0,
            shutting_down: false,
            drain_deadline: 0,
            admission,
            held: HashMap::new(),
            refusals_logged: Refusals::default(),
            heartbeats_logged: HeartbeatLog::default(),
            verifier,
            ticked: 0,
            inflated: Vec::new(),
            handoff: None,
            moving: Vec::new(),
            heap: heap::Keeper::default(),
        })
    }

    /// Hands connections to their room's home and takes those handed here (`handoff.rs`).
    pub fn with_handoff(mut self, handoff: Handoff) -> std::io::Result<EventLoop<H>> {
        self.sockets.poller.add(
            handoff.fd(),
            TOKEN_HANDOFF,
            EpollFlags::EPOLLIN | EpollFlags::EPOLLET,
        )?;
        self.handoff = Some(handoff);
        Ok(self)
    }

    /// Runs until shutdown has drained every connection (or the drain timeout passed).
    pub fn run(mut self) -> std::io::Result<()> {
        let mut events = vec![EpollEvent::empty(); 1024];
        loop {
            let timeout = if self.again.is_empty() {
                TICK_MS as u16
            } else {
                0
            };
            let n = self.sockets.poller.wait(&mut events, timeout)?;
            self.sockets.now = (self.start.elapsed().as_millis() as u64 / TICK_MS) as u32 + 1;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_WAKE => self.handler.on_wake(&mut self.sockets),
                    TOKEN_HANDOFF => self.take_moved(),
                    TOKEN_STOP => {
                        self.stop.waker.reset();
                        if self.stop.requested.load(Ordering::Relaxed) {
                            self.begin_shutdown();
                        }
                    }
                    token
                        if token <= TOKEN_LISTENERS
                            && TOKEN_LISTENERS - token < self.listeners.len() as u64 =>
                    {
                        self.accept_all((TOKEN_LISTENERS - token) as usize)
                    }
                    token => self.on_event(token, ev.events()),
                }
                self.tell_ended();
            }
            for slot in std::mem::take(&mut self.again) {
                if self.sockets.conns[slot].live() {
                    self.on_readable(slot);
                    self.tell_ended();
                }
            }
            if self.ticked != self.sockets.now {
                let elapsed = self.sockets.now.wrapping_sub(self.ticked);
                self.ticked = self.sockets.now;
                self.sweep(elapsed);
                if !self.moving.is_empty() {
                    self.retry_moves();
                }
                self.track_fill();
                self.handler.on_tick(&mut self.sockets);
                self.keep_heap();
            }
            self.tell_ended();
            if self.accept_blocked {
                for i in 0..self.listeners.len() {
                    self.accept_all(i);
                }
            }
            if self.shutting_down {
                let open = self.sockets.conns.iter().filter(|c| c.live()).count();
                if open == 0 || self.sockets.now >= self.drain_deadline {
                    for slot in 0..self.sockets.conns.len() {
                        self.sockets.close(slot, CloseReason::Shutdown);
                    }
                    self.tell_ended();
                    return Ok(());
                }
            }
        }
    }

    /// Gives the allocator's free pages back once a burst of connections is over (`heap.rs`).
    fn keep_heap(&mut self) {
        let m = &self.sockets.metrics;
        let churn = m.accepted.load(Ordering::Relaxed)
            + m.moved_in.load(Ordering::Relaxed)
            + m.closed_total();
        if self.heap.due(self.now_ms(), churn) {
            let given_back = heap::trim();
            LoopMetrics::add(&m.heap_trims, 1);
            LoopMetrics::add(&m.heap_trimmed_bytes, given_back);
        }
    }

    /// The loop's clock in milliseconds (tick resolution), for the log throttles.
    fn now_ms(&self) -> u32 {
        self.sockets.now.wrapping_mul(TICK_MS as u32)
    }

    /// Tells the application about every connection that stopped being open, then frees
    /// those whose sockets are already closed.
    fn tell_ended(&mut self) {
        loop {
            self.sockets.take_ended(&mut self.ended);
            if self.ended.is_empty() {
                return;
            }
            for slot in std::mem::take(&mut self.ended) {
                self.handler.on_end(&mut self.sockets, slot);
                self.sockets.release(slot);
                if let Some(client) = self.held.remove(&(slot as u32)) {
                    self.admission.release(client);
                }
            }
        }
    }

    // ---- accepting ------------------------------------------------------------------------

    fn accept_all(&mut self, index: usize) {
        self.accept_blocked = false;
        loop {
            let Some(listener) = self.listeners.get(index) else {
                return;
            };
            match sys::accept(listener.as_fd()) {
                Ok(fd) => {
                    if let Err(e) = self.sockets.insert(
                        fd,
                        self.options.handshake_timeout_ms,
                        Arrived::Accepted,
                    ) {
                        log!(
                            "loop {}: cannot register a connection: {e}",
                            self.sockets.loop_index()
                        );
                    }
                }
                Err(Errno::EAGAIN) => return,
                Err(Errno::ECONNABORTED | Errno::EINTR) => continue,
                Err(e @ (Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)) => {
                    self.sockets.metrics.accept_error(e);
                    self.shed(index);
                    return;
                }
                Err(e) => {
                    self.sockets.metrics.accept_error(e);
                    return;
                }
            }
        }
    }

    /// Out of descriptors: accept each waiting connection with the reserve descriptor and close
    /// it at once, so clients learn "no" now rather than timing out in the accept queue. The
    /// listener is edge-triggered, so nothing spins; accepting resumes when a connection closes
    /// (or at the next tick if the reserve could not be had back).
    fn shed(&mut self, index: usize) {
        let Some(listener) = self.listeners.get(index) else {
            return;
        };
        while self.reserve.take().is_some() {
            match sys::accept(listener.as_fd()) {
                Ok(fd) => {
                    drop(fd);
                    LoopMetrics::add(&self.sockets.metrics.shed, 1);
                    self.reserve = sys::reserve_fd().ok();
                }
                Err(_) => break,
            }
        }
        self.reserve = self.reserve.take().or_else(|| sys::reserve_fd().ok());
        self.accept_blocked = true;
    }

    // ---- events ---------------------------------------------------------------------------

    fn on_event(&mut self, token: u64, flags: EpollFlags) {
        let slot = (token & 0xFFFF_FFFF) as usize;
        if slot >= self.sockets.conns.len()
            || self.sockets.token(slot) != token
            || !self.sockets.conns[slot].live()
        {
            return; // stale: the slot was closed and reused earlier in this batch
        }
        if flags.contains(EpollFlags::EPOLLOUT) {
            self.sockets.flush(slot);
        }
        if self.sockets.token(slot) == token
            && flags.intersects(
                EpollFlags::EPOLLIN
                    | EpollFlags::EPOLLRDHUP
                    | EpollFlags::EPOLLHUP
                    | EpollFlags::EPOLLERR,
            )
        {
            self.on_readable(slot);
        }
    }

    fn on_readable(&mut self, slot: usize) {
        let token = self.sockets.token(slot);
        let mut buf = std::mem::take(&mut self.buf);
        for turn in 0.. {
            let c = &self.sockets.conns[slot];
            if self.sockets.token(slot) != token || !c.live() {
                break;
            }
            if turn == READS_PER_TURN {
                self.again.push(slot);
                break;
            }
            match self.sockets.recv(slot, &mut buf) {
                Received::Eof => {
                    let c = &self.sockets.conns[slot];
                    let reason = match c.state {
                        State::Closing | State::Lingering => c.why(),
                        _ => CloseReason::PeerGone,
                    };
                    self.sockets.close(slot, reason);
                    break;
                }
                Received::Data(n) => {
                    LoopMetrics::add(&self.sockets.metrics.bytes_in, n as u64);
                    let now = self.sockets.now;
                    let c = &mut self.sockets.conns[slot];
                    c.last_rx = now;
                    c.flags &= !AWAIT_PONG;
                    match c.state {
                        State::Handshake => self.on_request_bytes(slot, &mut buf, n),
                        State::Open | State::Closing => self.on_frame_bytes(slot, &mut buf, 0..n),
                        _ => {} // lingering: the peer's leftovers are discarded
                    }
                }
                Received::Again => break,
                Received::Reset => {
                    self.sockets.close(slot, CloseReason::PeerGone);
                    break;
                }
                Received::Failed(reason) => {
                    self.sockets.close(slot, reason);
                    break;
                }
            }
        }
        self.buf = buf;
        if self.sockets.token(slot) == token && self.sockets.conns[slot].live() {
            self.sockets.conns[slot].settle();
        }
    }

    /// Bytes of the HTTP request: accumulate until whole, then upgrade, answer a plain GET, or
    /// refuse. Frames that came right behind an upgrade are handled at once.
    fn on_request_bytes(&mut self, slot: usize, buf: &mut [u8], n: usize) {
        let pending = self.sockets.conns[slot]
            .busy
            .as_mut()
            .map(|b| std::mem::take(&mut b.request))
            .unwrap_or_default();
        let mut request = pending;
        let from_buf = request.is_empty();
        if !from_buf {
            let room = (handshake::MAX_REQUEST + 1).saturating_sub(request.len());
            request.extend_from_slice(&buf[..n.min(room)]);
        }
        let parsed = if from_buf {
            handshake::parse(&buf[..n], &self.policy)
        } else {
            handshake::parse(&request, &self.policy)
        };
        match parsed {
            Parsed::Incomplete => {
                if from_buf {
                    request.extend_from_slice(&buf[..n]);
                }
                self.sockets.conns[slot].busy().request = request;
            }
            Parsed::Upgrade {
                response,
                consumed,
                path,
                forwarded,
                credentials,
                deflate,
            } => {
                let whole = if from_buf { &buf[..n] } else { &request[..] };
                if let Moved::Away = self.move_home(slot, &path, whole) {
                    return;
                }
                let Ok(counted) = self.admit(slot, &forwarded) else {
                    return;
                };
                let Ok(grant) = self.authenticate(slot, credentials) else {
                    if let Some(client) = counted {
                        self.admission.release(client);
                    }
                    return;
                };
                self.sockets.send_bytes(slot, &response);
                if !self.sockets.conns[slot].live() {
                    if let Some(client) = counted {
                        self.admission.release(client);
                    }
                    return;
                }
                if let Some(client) = counted {
                    self.held.insert(slot as u32, client);
                }
                self.sockets.opened(slot);
                if let Some(compress) = deflate {
                    let c = &mut self.sockets.conns[slot];
                    c.flags |= conn::DEFLATE;
                    if compress {
                        c.flags |= conn::DEFLATE_OUT;
                    }
                }
                self.handler.on_open(&mut self.sockets, slot, &path, grant);
                if from_buf {
                    if consumed < n {
                        self.on_frame_bytes(slot, buf, consumed..n);
                    }
                } else if consumed < request.len() {
                    let len = request.len();
                    self.on_frame_bytes(slot, &mut request, consumed..len);
                }
                if self.shutting_down && self.sockets.is_open(slot) {
                    self.go_away(slot);
                }
            }
            Parsed::Get { path } => {
                let response = self.handler.on_get(&path);
                self.sockets.finish(slot, &response, CloseReason::HttpDone);
            }
            Parsed::Reject { response, .. } => {
                self.sockets
                    .finish(slot, &response, CloseReason::HandshakeRejected);
            }
        }
    }

    fn on_frame_bytes(&mut self, slot: usize, buf: &mut [u8], range: std::ops::Range<usize>) {
        let mut reader = self.sockets.conns[slot]
            .busy
            .as_mut()
            .map(|b| std::mem::take(&mut b.reader))
            .unwrap_or_default();
        let mut incoming = std::mem::take(&mut self.incoming);
        let result = conn::decode(
            &mut reader,
            buf,
            range,
            self.options.max_message_size,
            self.sockets.conns[slot].flags & conn::DEFLATE != 0,
            &mut incoming,
        );
        if !reader.is_idle() {
            self.sockets.conns[slot].busy().reader = reader;
        }
        let token = self.sockets.token(slot);
        for inc in incoming.drain(..) {
            if self.sockets.token(slot) != token
                || !matches!(self.sockets.conns[slot].state, State::Open | State::Closing)
            {
                break;
            }
            self.on_incoming(slot, inc, buf);
        }
        self.incoming = incoming;
        if let Err(fail) = result
            && self.sockets.token(slot) == token
        {
            self.fail_connection(slot, fail);
        }
    }

    /// "Fail the WebSocket Connection" (RFC 6455 7.1.7): what arrives can no longer be made
    /// sense of, so send Close, then close our side without waiting for the reply.
    fn fail_connection(&mut self, slot: usize, fail: Fail) {
        let reason = match fail.code {
            close::INVALID_DATA => CloseReason::InvalidUtf8,
            close::TOO_BIG => CloseReason::MessageTooBig,
            _ => CloseReason::ProtocolError,
        };
        if let Some(b) = self.sockets.conns[slot].busy.as_mut() {
            b.reader = Default::default();
        }
        if self.sockets.is_open(slot) {
            let last = frame::close_frame(fail.code, fail.reason);
            self.sockets.finish(slot, &last, reason);
        } else {
            self.sockets.close(slot, reason);
        }
    }

    /// A compressed message, inflated into the loop's one buffer for inflated messages (UTF-8
    /// checked for text) and handed to the application; a bomb or corrupt data fails the
    /// connection (1009, 1007).
    fn on_compressed(&mut self, slot: usize, opcode: u8, data: &[u8]) {
        let mut out = std::mem::take(&mut self.inflated);
        let max = self.options.max_message_size;
        let inflated = match self.sockets.codec.as_mut() {
            Some(codec) => codec.inflate(data, max, &mut out),
            None => Err(Fail::protocol("reserved bits set without an extension")),
        };
        let checked = inflated.and_then(|()| {
            if opcode == frame::OP_TEXT && std::str::from_utf8(&out).is_err() {
                return Err(Fail {
                    code: close::INVALID_DATA,
                    reason: "text message is not valid UTF-8",
                });
            }
            Ok(())
        });
        match checked {
            Ok(()) => {
                LoopMetrics::add(&self.sockets.metrics.messages_in, 1);
                LoopMetrics::add(&self.sockets.metrics.inflated_in, 1);
                let binary = opcode == frame::OP_BINARY;
                self.handler
                    .on_message(&mut self.sockets, slot, binary, &out);
            }
            Err(fail) => self.fail_connection(slot, fail),
        }
        // A large message's buffer is not kept for the next small one.
        if out.capacity() > RECV_BUF {
            out = Vec::new();
        }
        self.inflated = out;
    }

    fn on_incoming(&mut self, slot: usize, inc: Incoming, buf: &[u8]) {
        let state = self.sockets.conns[slot].state;
        match inc {
            Incoming::Close(code) => {
                if state == State::Closing {
                    let why = self.sockets.conns[slot].why();
                    self.sockets.close(slot, why);
                } else {
                    let reply = frame::close_frame(code, "");
                    self.sockets.finish(slot, &reply, CloseReason::ClientClose);
                }
            }
            _ if state == State::Closing => {} // after our Close, only the peer's Close matters
            Incoming::Ping(payload) => self
                .sockets
                .send_bytes(slot, &frame::frame(frame::OP_PONG, &payload)),
            Incoming::Pong => {}
            Incoming::Data {
                opcode,
                payload,
                compressed: true,
            } => self.on_compressed(slot, opcode, payload.bytes(buf)),
            Incoming::Data {
                opcode, payload, ..
            } => {
                LoopMetrics::add(&self.sockets.metrics.messages_in, 1);
                let binary = opcode == frame::OP_BINARY;
                self.handler
                    .on_message(&mut self.sockets, slot, binary, payload.bytes(buf));
            }
        }
    }

    /// Close 1001 "server shutting down"; the client gets the whole drain timeout to answer.
    fn go_away(&mut self, slot: usize) {
        let fail = Fail {
            code: close::GOING_AWAY,
            reason: "server shutting down",
        };
        self.sockets.fail(slot, fail, CloseReason::Shutdown);
        if self.sockets.conns[slot].state == State::Closing {
            self.sockets.conns[slot].mark = self.drain_deadline;
        }
    }

    fn begin_shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        self.drain_deadline = self.sockets.now + ticks(self.options.drain_timeout_ms);
        for l in std::mem::take(&mut self.listeners) {
            let _ = self.sockets.poller.delete(l.as_fd());
        }
        // Nor does it take connections handed over from now on: they would only be told 1001.
        if let Some(handoff) = &mut self.handoff {
            let _ = handoff.close_door();
        }
        for slot in 0..self.sockets.conns.len() {
            match self.sockets.conns[slot].state {
                State::Open => self.go_away(slot),
                // A client whose upgrade is under way (one that connected an instant before a
                // rolling reload stopped this worker's listener) may finish it and is then told
                // to go away like everyone else, rather than being dropped mid-handshake.
                State::Handshake => {
                    let c = &mut self.sockets.conns[slot];
                    c.mark = c.mark.min(self.drain_deadline);
                }
                _ => {}
            }
        }
    }
}
