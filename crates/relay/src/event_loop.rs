//! One event loop per thread: its own SO_REUSEPORT listener, epoll set, connection slab, rooms,
//! and one receive buffer shared by all its connections. Timeouts are swept by ticks: each
//! connection keeps two 32-bit tick stamps, and a sweep walks a slice of the slab every tick,
//! so there is no timer object per connection.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::epoll::{EpollEvent, EpollFlags};

use super::bus::{Bus, Inbox, Item};
use super::conn::{
    self, AWAIT_PONG, Conn, Incoming, MSGPACK, NO_ROOM, State, WEBSOCKET, WRITE_SHUT,
};
use super::frame::{self, Fail, close};
use super::handshake::{self, Parsed};
use super::id::{self, ConnId, FreeSlots};
use super::metrics::{CloseReason, Global, LoopMetrics};
use super::outq::Out;
use super::protocol::{self, Encoding, Outgoing, Reply};
use super::{Config, Shared, sys};

/// Tick length; all timeouts are counted in ticks.
pub const TICK_MS: u64 = 100;
/// Receive buffer per loop (not per connection).
const RECV_BUF: usize = 64 * 1024;
/// Reads per readiness event before other connections get a turn.
const READS_PER_TURN: usize = 8;
/// How long we wait for the peer after our final bytes (Close handshake, HTTP response).
const CLOSE_WAIT_MS: u64 = 2000;

const TOKEN_LISTENER: u64 = u64::MAX;
const TOKEN_WAKER: u64 = u64::MAX - 1;

pub struct EventLoop {
    node: usize,
    /// This process's start, the high bits of every id it hands out (`id.rs`).
    incarnation: u16,
    shared: Arc<Shared>,
    bus: Arc<dyn Bus>,
    config: Config,
    metrics: Arc<LoopMetrics>,
    poller: sys::Poller,
    listener: Option<OwnedFd>,
    reserve: Option<OwnedFd>,
    accept_blocked: bool,
    conns: Vec<Conn>,
    free: FreeSlots,
    rooms: super::rooms::Rooms,
    buf: Vec<u8>,
    incoming: Vec<Incoming>,
    scratch: Vec<u32>,
    again: Vec<usize>,
    inbox_items: Vec<Item>,
    start: Instant,
    now: u32,
    sweep_at: usize,
    shutting_down: bool,
    drain_deadline: u32,
}

/// How much earlier than the full interval `slot` is pinged: a fixed share of up to a quarter
/// of the interval, different per slot. Connections that went quiet together (a reconnect
/// storm, a load test's cohort) would otherwise all be pinged, and all answer, in the same few
/// ticks; with this their pings spread over a quarter of the interval, and stay spread, since
/// each pong restarts its own connection's clock.
fn spread(slot: usize, interval: u32) -> u32 {
    let h = (slot as u32).wrapping_mul(0x9E37_79B9) >> 16; // Fibonacci hashing: 0..65535
    ((interval as u64 / 4) * h as u64 / 65536) as u32
}

fn ticks(ms: u64) -> u32 {
    ms.div_ceil(TICK_MS).max(1) as u32
}

impl EventLoop {
    pub fn new(node: usize, listener: OwnedFd, shared: Arc<Shared>) -> std::io::Result<EventLoop> {
        let poller = sys::Poller::new()?;
        poller.add(listener.as_fd(), TOKEN_LISTENER, sys::listener_interest())?;
        poller.add(
            shared.local.inbox(node).waker.fd(),
            TOKEN_WAKER,
            EpollFlags::EPOLLIN | EpollFlags::EPOLLET,
        )?;
        Ok(EventLoop {
            node,
            incarnation: shared.incarnation,
            bus: shared.bus.clone(),
            config: shared.config.clone(),
            metrics: shared.metrics[node].clone(),
            shared,
            poller,
            listener: Some(listener),
            reserve: sys::reserve_fd().ok(),
            accept_blocked: false,
            conns: Vec::new(),
            free: FreeSlots::default(),
            rooms: Default::default(),
            buf: vec![0; RECV_BUF],
            incoming: Vec::new(),
            scratch: Vec::new(),
            again: Vec::new(),
            inbox_items: Vec::new(),
            start: Instant::now(),
            now: 0,
            sweep_at: 0,
            shutting_down: false,
            drain_deadline: 0,
        })
    }

    fn inbox(&self) -> &Inbox {
        self.shared.local.inbox(self.node)
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
            let n = self.poller.wait(&mut events, timeout)?;
            self.now = (self.start.elapsed().as_millis() as u64 / TICK_MS) as u32 + 1;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_LISTENER => self.accept_all(),
                    TOKEN_WAKER => self.drain_inbox(),
                    token => self.on_event(token, ev.events()),
                }
            }
            for slot in std::mem::take(&mut self.again) {
                if self.conns[slot].state != State::Free {
                    self.on_readable(slot);
                }
            }
            self.sweep();
            if self.accept_blocked {
                self.accept_all();
            }
            if self.shutting_down {
                let open = self.conns.iter().filter(|c| c.state != State::Free).count();
                if open == 0 || self.now >= self.drain_deadline {
                    for slot in 0..self.conns.len() {
                        if self.conns[slot].state != State::Free {
                            self.close(slot, CloseReason::Shutdown);
                        }
                    }
                    return Ok(());
                }
            }
        }
    }

    // ---- ids ------------------------------------------------------------------------------

    pub fn conn_id(&self, slot: usize) -> u64 {
        ConnId {
            incarnation: self.incarnation,
            generation: self.conns[slot].generation,
            node: self.node,
            slot,
        }
        .encode()
    }

    /// The slot of a local, open WebSocket with this id.
    fn local_slot(&self, id: u64) -> Option<usize> {
        let id = ConnId::decode(id)?;
        let c = self.conns.get(id.slot)?;
        (id.incarnation == self.incarnation
            && id.node == self.node
            && c.generation == id.generation
            && c.state == State::Open)
            .then_some(id.slot)
    }

    fn token(&self, slot: usize) -> u64 {
        (self.conns[slot].generation as u64) << 32 | slot as u64
    }

    // ---- accepting ------------------------------------------------------------------------

    fn accept_all(&mut self) {
        self.accept_blocked = false;
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            match sys::accept(listener.as_fd()) {
                Ok(fd) => {
                    if let Err(e) = self.register(fd) {
                        log!("loop {}: cannot register a connection: {e}", self.node);
                    }
                }
                Err(Errno::EAGAIN) => return,
                Err(Errno::ECONNABORTED | Errno::EINTR) => continue,
                Err(e @ (Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)) => {
                    self.metrics.accept_error(e);
                    self.shed();
                    return;
                }
                Err(e) => {
                    self.metrics.accept_error(e);
                    return;
                }
            }
        }
    }

    /// Out of descriptors: accept each waiting connection with the reserve descriptor and close
    /// it at once, so clients learn "no" now rather than timing out in the accept queue. The
    /// listener is edge-triggered, so nothing spins; accepting resumes when a connection closes
    /// (or at the next tick if the reserve could not be had back).
    fn shed(&mut self) {
        let Some(listener) = self.listener.as_ref() else {
            return;
        };
        while self.reserve.take().is_some() {
            match sys::accept(listener.as_fd()) {
                Ok(fd) => {
                    drop(fd);
                    LoopMetrics::add(&self.metrics.shed, 1);
                    self.reserve = sys::reserve_fd().ok();
                }
                Err(_) => break,
            }
        }
        self.reserve = self.reserve.take().or_else(|| sys::reserve_fd().ok());
        self.accept_blocked = true;
    }

    fn register(&mut self, fd: OwnedFd) -> std::io::Result<()> {
        let slot = match self.free.take() {
            Some(s) => s,
            None => {
                if self.conns.len() >= id::MAX_SLOTS {
                    return Err(std::io::Error::other("slab full"));
                }
                self.conns.push(Conn::free(0));
                self.conns.len() - 1
            }
        };
        let c = &mut self.conns[slot];
        c.state = State::Handshake;
        c.flags = 0;
        c.last_rx = self.now;
        c.mark = self.now + ticks(self.config.handshake_timeout_ms);
        c.room = NO_ROOM;
        let token = (c.generation as u64) << 32 | slot as u64;
        if let Err(e) = self.poller.add(fd.as_fd(), token, sys::conn_interest()) {
            self.conns[slot].state = State::Free;
            self.free.put(slot);
            return Err(e);
        }
        self.conns[slot].fd = Some(fd);
        LoopMetrics::add(&self.metrics.accepted, 1);
        self.metrics.open.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    // ---- events ---------------------------------------------------------------------------

    fn on_event(&mut self, token: u64, flags: EpollFlags) {
        let slot = (token & 0xFFFF_FFFF) as usize;
        if slot >= self.conns.len()
            || self.token(slot) != token
            || self.conns[slot].state == State::Free
        {
            return; // stale: the slot was closed and reused earlier in this batch
        }
        if flags.contains(EpollFlags::EPOLLOUT) {
            self.flush(slot);
        }
        if self.token(slot) == token
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
        let token = self.token(slot);
        let mut buf = std::mem::take(&mut self.buf);
        for turn in 0.. {
            if self.token(slot) != token || self.conns[slot].state == State::Free {
                break;
            }
            if turn == READS_PER_TURN {
                self.again.push(slot);
                break;
            }
            let Some(fd) = self.conns[slot].fd.as_ref() else {
                break;
            };
            match sys::read(fd.as_fd(), &mut buf) {
                Ok(0) => {
                    let reason = match self.conns[slot].state {
                        State::Closing | State::Lingering => self.conns[slot].why(),
                        _ => CloseReason::PeerGone,
                    };
                    self.close(slot, reason);
                    break;
                }
                Ok(n) => {
                    LoopMetrics::add(&self.metrics.bytes_in, n as u64);
                    let c = &mut self.conns[slot];
                    c.last_rx = self.now;
                    c.flags &= !AWAIT_PONG;
                    match c.state {
                        State::Handshake => self.on_request_bytes(slot, &mut buf, n),
                        State::Open | State::Closing => self.on_frame_bytes(slot, &mut buf, 0..n),
                        _ => {} // lingering: the peer's leftovers are discarded
                    }
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::ECONNRESET | Errno::EPIPE) => {
                    self.close(slot, CloseReason::PeerGone);
                    break;
                }
                Err(_) => {
                    self.close(slot, CloseReason::IoError);
                    break;
                }
            }
        }
        self.buf = buf;
        if self.token(slot) == token && self.conns[slot].state != State::Free {
            self.conns[slot].settle();
        }
    }

    fn on_request_bytes(&mut self, slot: usize, buf: &mut [u8], n: usize) {
        let pending = self.conns[slot]
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
            handshake::parse(&buf[..n], &self.config.policy)
        } else {
            handshake::parse(&request, &self.config.policy)
        };
        match parsed {
            Parsed::Incomplete => {
                if from_buf {
                    request.extend_from_slice(&buf[..n]);
                }
                self.conns[slot].busy().request = request;
            }
            Parsed::Upgrade {
                response,
                consumed,
                encoding,
            } => {
                self.send_bytes(slot, &response);
                let c = &mut self.conns[slot];
                c.state = State::Open;
                c.flags |= WEBSOCKET
                    | if encoding == Encoding::MsgPack {
                        MSGPACK
                    } else {
                        0
                    };
                self.metrics.websockets.fetch_add(1, Ordering::Relaxed);
                if !self.config.echo {
                    let hello = Reply {
                        op: "hello",
                        id: Some(self.conn_id(slot)),
                        ping_interval: Some(self.config.ping_interval_ms),
                        ping_timeout: Some(self.config.ping_timeout_ms),
                        ..Reply::default()
                    };
                    self.send_reply(slot, &hello);
                }
                if from_buf {
                    if consumed < n {
                        self.on_frame_bytes(slot, buf, consumed..n);
                    }
                } else if consumed < request.len() {
                    let len = request.len();
                    self.on_frame_bytes(slot, &mut request, consumed..len);
                }
                if self.shutting_down && self.conns[slot].state == State::Open {
                    self.go_away(slot);
                }
            }
            Parsed::Get { path } => {
                let route = path.split('?').next().unwrap_or("");
                let response = match route {
                    "/healthz" if self.shared.accepting.load(Ordering::Relaxed) => {
                        let (up, of) = (self.bus.workers_up(), self.bus.workers());
                        let body = if of > 1 {
                            format!("ok: {up} of {of} workers up\n")
                        } else {
                            "ok\n".to_string()
                        };
                        handshake::response(200, "", "text/plain; charset=utf-8", &body)
                    }
                    "/healthz" => {
                        handshake::response(503, "", "text/plain; charset=utf-8", "draining\n")
                    }
                    "/metrics" => {
                        let (total, received_by_worker) = super::server_snapshot(&self.shared);
                        let body = super::metrics::render(
                            &total,
                            &Global {
                                rooms: self.bus.rooms(),
                                accepting: self.shared.accepting.load(Ordering::Relaxed),
                                workers_up: self.bus.workers_up(),
                                workers: self.bus.workers(),
                                received_by_worker,
                            },
                        );
                        handshake::response(
                            200,
                            "",
                            "text/plain; version=0.0.4; charset=utf-8",
                            &body,
                        )
                    }
                    _ => handshake::upgrade_required(),
                };
                self.finish(slot, &response, CloseReason::HttpDone);
            }
            Parsed::Reject { response, .. } => {
                self.finish(slot, &response, CloseReason::HandshakeRejected);
            }
        }
    }

    fn on_frame_bytes(&mut self, slot: usize, buf: &mut [u8], range: std::ops::Range<usize>) {
        let mut reader = self.conns[slot]
            .busy
            .as_mut()
            .map(|b| std::mem::take(&mut b.reader))
            .unwrap_or_default();
        let mut incoming = std::mem::take(&mut self.incoming);
        let result = conn::decode(
            &mut reader,
            buf,
            range,
            self.config.max_message,
            &mut incoming,
        );
        if !reader.is_idle() {
            self.conns[slot].busy().reader = reader;
        }
        let token = self.token(slot);
        for inc in incoming.drain(..) {
            if self.token(slot) != token
                || !matches!(self.conns[slot].state, State::Open | State::Closing)
            {
                break;
            }
            self.on_incoming(slot, inc, buf);
        }
        self.incoming = incoming;
        if let Err(fail) = result
            && self.token(slot) == token
        {
            let reason = match fail.code {
                close::INVALID_DATA => CloseReason::InvalidUtf8,
                close::TOO_BIG => CloseReason::MessageTooBig,
                _ => CloseReason::ProtocolError,
            };
            // "Fail the WebSocket Connection" (RFC 6455 7.1.7): the byte stream can no longer
            // be parsed, so send Close, then close our side without waiting for the reply.
            if let Some(b) = self.conns[slot].busy.as_mut() {
                b.reader = Default::default();
            }
            if self.conns[slot].state == State::Open {
                self.finish(slot, &frame::close_frame(fail.code, fail.reason), reason);
            } else {
                self.close(slot, reason);
            }
        }
    }

    fn on_incoming(&mut self, slot: usize, inc: Incoming, buf: &[u8]) {
        let state = self.conns[slot].state;
        match inc {
            Incoming::Close(code) => {
                if state == State::Closing {
                    let why = self.conns[slot].why();
                    self.close(slot, why);
                } else {
                    self.finish(
                        slot,
                        &frame::close_frame(code, ""),
                        CloseReason::ClientClose,
                    );
                }
            }
            _ if state == State::Closing => {} // after our Close, only the peer's Close matters
            Incoming::Ping(payload) => {
                self.send_bytes(slot, &frame::frame(frame::OP_PONG, &payload))
            }
            Incoming::Pong => {}
            Incoming::Data { opcode, payload } => {
                LoopMetrics::add(&self.metrics.messages_in, 1);
                let bytes = payload.bytes(buf);
                if self.config.echo {
                    LoopMetrics::add(&self.metrics.messages_out, 1);
                    self.send_bytes(slot, &frame::frame(opcode, bytes));
                    return;
                }
                let enc = if opcode == frame::OP_BINARY {
                    self.conns[slot].flags |= MSGPACK;
                    Encoding::MsgPack
                } else {
                    self.conns[slot].flags &= !MSGPACK;
                    Encoding::Json
                };
                match protocol::decode(bytes, enc) {
                    Ok(req) => self.on_request(slot, req),
                    Err(e) => {
                        let reference = protocol::salvage_ref(bytes, enc);
                        self.reply_error(slot, "bad_request", e, reference)
                    }
                }
            }
        }
    }

    // ---- the relay ------------------------------------------------------------------------

    fn on_request(&mut self, slot: usize, req: protocol::Request) {
        let reference = req.reference;
        let need_room = |room: Option<String>| room.ok_or("this op needs \"room\"");
        match req.op.as_str() {
            "join" => match need_room(req.room) {
                Ok(room) => self.join(slot, &room, reference),
                Err(m) => self.reply_error(slot, "bad_request", m, reference),
            },
            "leave" => match need_room(req.room) {
                Ok(room) => self.leave(slot, &room, reference),
                Err(m) => self.reply_error(slot, "bad_request", m, reference),
            },
            "publish" => match need_room(req.room) {
                Ok(room) => self.publish(
                    slot,
                    &room,
                    req.data.unwrap_or(rmpv::Value::Nil),
                    req.echo,
                    reference,
                ),
                Err(m) => self.reply_error(slot, "bad_request", m, reference),
            },
            "send" => match req.to {
                Some(to) => self.direct(slot, to, req.data.unwrap_or(rmpv::Value::Nil), reference),
                None => self.reply_error(slot, "bad_request", "send needs \"to\"", reference),
            },
            "count" => match need_room(req.room) {
                Ok(room) => self.reply_members(slot, "count", &room, reference),
                Err(m) => self.reply_error(slot, "bad_request", m, reference),
            },
            other => {
                let m = format!("unknown op {other:?} (join, leave, publish, send, count)");
                self.reply_error(slot, "unknown_op", m, reference)
            }
        }
    }

    fn join(&mut self, slot: usize, room: &str, reference: Option<rmpv::Value>) {
        let already = self
            .rooms
            .lookup(room)
            .is_some_and(|id| self.conns[slot].rooms().any(|r| r == id));
        if !already {
            if self.conns[slot].rooms().count() >= self.config.max_rooms_per_conn {
                let m = format!(
                    "a connection may be in at most {} rooms",
                    self.config.max_rooms_per_conn
                );
                return self.reply_error(slot, "too_many_rooms", m, reference);
            }
            let (id, _) = self.rooms.join(room, slot as u32);
            let c = &mut self.conns[slot];
            if c.room == NO_ROOM {
                c.room = id;
            } else {
                c.busy().rooms.push(id);
            }
            let name = self.rooms.name(id).clone();
            self.bus.joined(&name, self.node);
        }
        self.reply_members(slot, "joined", room, reference);
    }

    /// Answers a room op with the room's whole-server member count.
    fn reply_members(
        &mut self,
        slot: usize,
        op: &'static str,
        room: &str,
        reference: Option<rmpv::Value>,
    ) {
        let members = self.bus.members(room);
        self.send_reply(
            slot,
            &Reply {
                op,
                room: Some(room.into()),
                members: Some(members),
                reference,
                ..Reply::default()
            },
        );
    }

    fn leave(&mut self, slot: usize, room: &str, reference: Option<rmpv::Value>) {
        let id = self
            .rooms
            .lookup(room)
            .filter(|id| self.conns[slot].rooms().any(|r| r == *id));
        let Some(id) = id else {
            return self.reply_error(
                slot,
                "not_a_member",
                format!("not in room {room:?}"),
                reference,
            );
        };
        self.drop_membership(slot, id);
        self.reply_members(slot, "left", room, reference);
    }

    fn drop_membership(&mut self, slot: usize, id: super::rooms::RoomId) {
        let c = &mut self.conns[slot];
        if c.room == id {
            c.room = NO_ROOM;
            if let Some(b) = c.busy.as_mut()
                && !b.rooms.is_empty()
            {
                c.room = b.rooms.swap_remove(0);
            }
        } else if let Some(b) = c.busy.as_mut() {
            b.rooms.retain(|r| *r != id);
        }
        let name = self.rooms.name(id).clone();
        self.rooms.leave(id, slot as u32);
        self.bus.left(&name, self.node);
    }

    fn publish(
        &mut self,
        slot: usize,
        room: &str,
        data: rmpv::Value,
        echo: bool,
        reference: Option<rmpv::Value>,
    ) {
        let from = self.conn_id(slot);
        let name: Arc<str> = match self.rooms.lookup(room) {
            Some(id) => self.rooms.name(id).clone(),
            None => Arc::from(room),
        };
        let msg = Outgoing::new(Reply {
            op: "message",
            room: Some(name.clone()),
            from: Some(from),
            data: Some(data),
            ..Reply::default()
        });
        let skip = (!echo).then_some(from);
        self.deliver_room(&name, &msg, skip);
        self.bus.publish(self.node, &name, &msg, skip);
        if reference.is_some() {
            self.send_reply(
                slot,
                &Reply {
                    op: "published",
                    room: Some(name),
                    reference,
                    ..Reply::default()
                },
            );
        }
    }

    fn deliver_room(&mut self, room: &str, msg: &Arc<Outgoing>, skip: Option<u64>) {
        let Some(id) = self.rooms.lookup(room) else {
            return;
        };
        let mut members = std::mem::take(&mut self.scratch);
        self.rooms.members_into(id, &mut members);
        for &m in &members {
            let m = m as usize;
            if skip == Some(self.conn_id(m)) || self.conns[m].state != State::Open {
                continue;
            }
            self.send_outgoing(m, msg);
        }
        self.scratch = members;
    }

    fn direct(&mut self, slot: usize, to: u64, data: rmpv::Value, reference: Option<rmpv::Value>) {
        let from = self.conn_id(slot);
        let msg = Outgoing::new(Reply {
            op: "direct",
            from: Some(from),
            data: Some(data),
            ..Reply::default()
        });
        let gone = |to: u64| format!("no connection {to}");
        let Some(target) = ConnId::decode(to) else {
            return self.reply_error(slot, "no_such_connection", gone(to), reference);
        };
        if target.incarnation == self.incarnation && target.node == self.node {
            let Some(target) = self.local_slot(to) else {
                return self.reply_error(slot, "no_such_connection", gone(to), reference);
            };
            self.send_outgoing(target, &msg);
        } else {
            let item = Item::Direct {
                to,
                from,
                msg,
                reference: reference.clone(),
            };
            if self.bus.route(target, item).is_err() {
                // No live process or loop of this server has that id's incarnation or loop:
                // the connection is gone (or never was), and nobody else can look it up.
                return self.reply_error(slot, "no_such_connection", gone(to), reference);
            }
        }
        if reference.is_some() {
            self.send_reply(
                slot,
                &Reply {
                    op: "sent",
                    to: Some(to),
                    reference,
                    ..Reply::default()
                },
            );
        }
    }

    fn drain_inbox(&mut self) {
        let mut items = std::mem::take(&mut self.inbox_items);
        self.inbox().drain(&mut items);
        for item in items.drain(..) {
            match item {
                Item::Room { room, msg, skip } => self.deliver_room(&room, &msg, skip),
                Item::Direct {
                    to,
                    from,
                    msg,
                    reference,
                } => match self.local_slot(to) {
                    Some(target) => self.send_outgoing(target, &msg),
                    None => {
                        if let Some(sender) = ConnId::decode(from) {
                            // A sender that is gone too needs no answer.
                            let _ = self.bus.route(
                                sender,
                                Item::Bounce {
                                    to: from,
                                    target: to,
                                    reference,
                                },
                            );
                        }
                    }
                },
                Item::Bounce {
                    to,
                    target,
                    reference,
                } => {
                    if let Some(slot) = self.local_slot(to) {
                        self.reply_error(
                            slot,
                            "no_such_connection",
                            format!("no connection {target}"),
                            reference,
                        );
                    }
                }
                Item::Shutdown => self.begin_shutdown(),
            }
        }
        self.inbox_items = items;
    }

    // ---- output ---------------------------------------------------------------------------

    fn encoding(&self, slot: usize) -> Encoding {
        if self.conns[slot].flags & MSGPACK != 0 {
            Encoding::MsgPack
        } else {
            Encoding::Json
        }
    }

    fn send_reply(&mut self, slot: usize, reply: &Reply) {
        let bytes = reply.frame(self.encoding(slot));
        LoopMetrics::add(&self.metrics.messages_out, 1);
        self.send_bytes(slot, &bytes);
    }

    fn send_outgoing(&mut self, slot: usize, msg: &Arc<Outgoing>) {
        LoopMetrics::add(&self.metrics.messages_out, 1);
        let enc = self.encoding(slot);
        self.send(slot, Out::Shared(msg, enc));
    }

    fn reply_error(
        &mut self,
        slot: usize,
        code: &'static str,
        message: impl Into<String>,
        reference: Option<rmpv::Value>,
    ) {
        LoopMetrics::add(&self.metrics.protocol_errors_replied, 1);
        self.send_reply(slot, &Reply::error(code, message, reference));
    }

    fn send_bytes(&mut self, slot: usize, bytes: &[u8]) {
        self.send(slot, Out::Bytes(bytes));
    }

    /// Writes now if nothing is queued; queues what the socket does not take (a shared frame
    /// stays shared). Past the cap the connection is a slow reader: its queue is dropped and it
    /// is closed with 1008.
    fn send(&mut self, slot: usize, out: Out<'_>) {
        let cap = self.config.max_pending;
        let c = &mut self.conns[slot];
        if c.state == State::Free || c.flags & WRITE_SHUT != 0 {
            return;
        }
        let len = out.bytes().len();
        let pending = c.pending_out();
        if pending > 0 {
            if pending + len > cap && c.state == State::Open {
                return self.cut_off_slow_reader(slot);
            }
            c.busy().out.push(out, 0);
            self.metrics.queued.fetch_add(len as i64, Ordering::Relaxed);
            return;
        }
        let Some(fd) = c.fd.as_ref() else { return };
        let written = match sys::write(fd.as_fd(), out.bytes()) {
            Ok(n) => n,
            Err(Errno::EAGAIN) => 0,
            Err(_) => return self.close(slot, CloseReason::IoError),
        };
        LoopMetrics::add(&self.metrics.bytes_out, written as u64);
        if written < len {
            if len - written > cap && c.state == State::Open {
                return self.cut_off_slow_reader(slot);
            }
            c.busy().out.push(out, written);
            self.metrics
                .queued
                .fetch_add((len - written) as i64, Ordering::Relaxed);
        }
    }

    fn cut_off_slow_reader(&mut self, slot: usize) {
        LoopMetrics::add(&self.metrics.backpressure_cutoffs, 1);
        if let Some(b) = self.conns[slot].busy.as_mut() {
            let before = b.out.pending();
            b.out.drop_unsent_frames();
            let dropped = before - b.out.pending();
            self.metrics
                .queued
                .fetch_sub(dropped as i64, Ordering::Relaxed);
        }
        let fail = Fail {
            code: close::POLICY,
            reason: "slow reader: pending output over the limit",
        };
        self.fail(slot, fail, CloseReason::Backpressure);
    }

    /// The socket can take more: write what is queued, in as few writev(2) calls as it takes.
    fn flush(&mut self, slot: usize) {
        let c = &mut self.conns[slot];
        let Some(fd) = c.fd.as_ref() else { return };
        let Some(b) = c.busy.as_mut() else {
            return self.after_flush(slot);
        };
        while !b.out.is_empty() {
            match sys::writev(fd.as_fd(), &b.out.slices()) {
                Ok(n) => {
                    b.out.consume(n);
                    LoopMetrics::add(&self.metrics.bytes_out, n as u64);
                    self.metrics.queued.fetch_sub(n as i64, Ordering::Relaxed);
                }
                Err(Errno::EAGAIN) => return,
                Err(_) => return self.close(slot, CloseReason::IoError),
            }
        }
        self.after_flush(slot);
        if self.conns[slot].state != State::Free {
            self.conns[slot].settle();
        }
    }

    /// Everything queued has gone out: a lingering connection half-closes now.
    fn after_flush(&mut self, slot: usize) {
        let c = &mut self.conns[slot];
        if c.pending_out() == 0 && c.state == State::Lingering && c.flags & WRITE_SHUT == 0 {
            if let Some(fd) = c.fd.as_ref() {
                sys::shutdown_write(fd.as_fd());
            }
            c.flags |= WRITE_SHUT;
        }
    }

    // ---- closing --------------------------------------------------------------------------

    /// Sends our last bytes (an HTTP response, a Close reply, a failing Close), half-closes once
    /// they are out, and waits briefly for the peer's EOF so it reads everything first.
    fn finish(&mut self, slot: usize, last: &[u8], reason: CloseReason) {
        let c = &mut self.conns[slot];
        if c.state == State::Free {
            return;
        }
        // Not Open any more, so the slow-reader cap no longer applies to these last bytes.
        c.state = State::Lingering;
        c.set_why(reason);
        self.leave_all(slot);
        let c = &mut self.conns[slot];
        c.set_why(reason);
        c.mark = self.now + ticks(CLOSE_WAIT_MS);
        self.send_bytes(slot, last);
        if self.conns[slot].state != State::Free {
            self.after_flush(slot);
        }
    }

    /// Starts the closing handshake with `fail`'s code and waits for the peer's Close; a
    /// connection still in its HTTP handshake is simply closed.
    fn fail(&mut self, slot: usize, fail: Fail, reason: CloseReason) {
        let c = &mut self.conns[slot];
        match c.state {
            State::Open => {
                c.state = State::Closing;
                c.set_why(reason);
                c.mark = self.now + ticks(CLOSE_WAIT_MS);
                self.leave_all(slot);
                self.send_bytes(slot, &frame::close_frame(fail.code, fail.reason));
            }
            State::Free => {}
            _ => self.close(slot, reason),
        }
    }

    /// Leaves every room: done as soon as a connection stops being Open, so member counts
    /// only count connections that still receive.
    fn leave_all(&mut self, slot: usize) {
        let rooms: Vec<_> = self.conns[slot].rooms().collect();
        for id in rooms {
            self.drop_membership(slot, id);
        }
    }

    fn close(&mut self, slot: usize, reason: CloseReason) {
        if self.conns[slot].state == State::Free {
            return;
        }
        self.leave_all(slot);
        let c = &mut self.conns[slot];
        if c.flags & WEBSOCKET != 0 {
            self.metrics.websockets.fetch_sub(1, Ordering::Relaxed);
        }
        let unsent = c.pending_out();
        if unsent > 0 {
            self.metrics
                .queued
                .fetch_sub(unsent as i64, Ordering::Relaxed);
        }
        let fd = c.fd.take();
        *c = Conn::free(id::next_generation(c.generation));
        if let Some(fd) = fd {
            let _ = self.poller.delete(fd.as_fd());
            drop(fd);
        }
        self.free.put(slot);
        self.metrics.open.fetch_sub(1, Ordering::Relaxed);
        self.metrics.closed(reason);
        if self.accept_blocked {
            self.accept_all();
        }
    }

    // ---- time -----------------------------------------------------------------------------

    /// Walks a slice of the slab each tick, covering all of it once per sweep period (at most
    /// a quarter of the shortest timeout), sending pings and closing what timed out.
    fn sweep(&mut self) {
        let len = self.conns.len();
        if len == 0 {
            return;
        }
        let period_ms = (self
            .config
            .ping_interval_ms
            .min(self.config.ping_timeout_ms)
            / 4)
        .clamp(TICK_MS, 1000);
        let per_tick = len.div_ceil((period_ms / TICK_MS) as usize).max(1);
        let interval = ticks(self.config.ping_interval_ms);
        let timeout = ticks(self.config.ping_timeout_ms);
        for _ in 0..per_tick.min(len) {
            let slot = self.sweep_at % len;
            self.sweep_at = (self.sweep_at + 1) % len;
            let now = self.now;
            let c = &mut self.conns[slot];
            match c.state {
                State::Handshake if now >= c.mark => {
                    let response = handshake::response(
                        408,
                        "",
                        "text/plain; charset=utf-8",
                        "handshake timeout\n",
                    );
                    self.finish(slot, &response, CloseReason::HandshakeTimeout);
                }
                State::Open
                    if c.flags & AWAIT_PONG != 0 && now.saturating_sub(c.mark) >= timeout =>
                {
                    // The peer is presumably gone: a best-effort Close, no waiting.
                    if let Some(fd) = c.fd.as_ref() {
                        let _ = sys::write(
                            fd.as_fd(),
                            &frame::close_frame(close::GOING_AWAY, "heartbeat timeout"),
                        );
                    }
                    self.close(slot, CloseReason::HeartbeatTimeout);
                }
                State::Open if c.flags & AWAIT_PONG != 0 => {} // pong not due yet
                State::Open
                    if now.saturating_sub(c.last_rx) >= interval - spread(slot, interval) =>
                {
                    c.flags |= AWAIT_PONG;
                    c.mark = now;
                    LoopMetrics::add(&self.metrics.pings, 1);
                    self.send_bytes(slot, &frame::frame(frame::OP_PING, b""));
                }
                State::Closing | State::Lingering if now >= c.mark => {
                    let why = c.why();
                    self.close(slot, why);
                }
                _ => {}
            }
        }
    }

    /// Close 1001 "server shutting down"; the client gets the whole drain timeout to answer.
    fn go_away(&mut self, slot: usize) {
        self.fail(
            slot,
            Fail {
                code: close::GOING_AWAY,
                reason: "server shutting down",
            },
            CloseReason::Shutdown,
        );
        if self.conns[slot].state == State::Closing {
            self.conns[slot].mark = self.drain_deadline;
        }
    }

    fn begin_shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        self.drain_deadline = self.now + ticks(self.config.drain_timeout_ms);
        if let Some(l) = self.listener.take() {
            let _ = self.poller.delete(l.as_fd());
        }
        for slot in 0..self.conns.len() {
            match self.conns[slot].state {
                State::Open => self.go_away(slot),
                // A client whose upgrade is under way (one that connected an instant before a
                // rolling reload stopped this worker's listener) may finish it and is then told
                // to go away like everyone else, rather than being dropped mid-handshake.
                State::Handshake => {
                    let c = &mut self.conns[slot];
                    c.mark = c.mark.min(self.drain_deadline);
                }
                _ => {}
            }
        }
    }
}
