//! One event loop's connections, as both the transport and the application see them: the slab
//! of slots, connection ids, and the write side (write now, queue what the socket does not take,
//! cut off a reader past the cap, the closing handshake, closing).
//!
//! The application (a `Handler`) gets `&mut Sockets`, as its `Sink`, in every callback and can send to any of
//! the loop's connections, look one up by id, and keep a few bytes of its own per connection
//! (`data`). It is told when a connection stops being open through `ended`: a connection
//! closed or failed while the application is busy (a slow reader cut off while a room message
//! is fanned out) is only marked, and its slot, with the application's data, stays intact until
//! the loop has told the application (`take_ended`) and then frees it (`release`).

use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use nix::errno::Errno;
use rustc_hash::FxHashMap;

use super::conn::{APP_OPEN, Conn, DEFLATE_OUT, STAYS, State, WEBSOCKET, WRITE_SHUT};
use super::deflate::Codec;
use super::frame::{self, Fail, close};
use super::handler::Sink;
use super::id::{self, ConnId, FreeSlots, ProcessId};
use super::metrics::{CloseReason, LoopMetrics};
use super::outq::Out;
use super::protocol;
use super::sys;
use super::tls::{self, Certs, Session};

/// Tick length; all timeouts are counted in ticks.
pub const TICK_MS: u64 = 100;
/// How long we wait for the peer after our final bytes (Close handshake, HTTP response).
const CLOSE_WAIT_MS: u64 = 2000;

pub fn ticks(ms: u64) -> u32 {
    ms.div_ceil(TICK_MS).max(1) as u32
}

pub struct Sockets<D> {
    /// This loop's index in its process.
    loop_index: usize,
    /// This process (its node and incarnation), the high bits of every id it hands out
    /// (`id.rs`).
    process: ProcessId,
    pub(crate) conns: Vec<Conn<D>>,
    free: FreeSlots,
    pub(crate) poller: sys::Poller,
    pub(crate) metrics: Arc<LoopMetrics>,
    /// Output queued for one connection beyond this closes it with 1008.
    max_pending: usize,
    /// The current tick.
    pub(crate) now: u32,
    /// Connections that stopped being open and whose application has not been told yet.
    ended: Vec<usize>,
    /// With --tls-cert: what every new connection's TLS session starts from.
    certs: Option<Arc<Certs>>,
    /// Each TLS connection's session, by slot (a plain server has none, and its slots stay 32
    /// bytes).
    sessions: FxHashMap<u32, Session>,
    /// With --deflate on: this loop's one compressor and decompressor (`deflate.rs`).
    pub(crate) codec: Option<Codec>,
}

/// How a connection came to a loop.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrived {
    /// From its listener (counted as accepted).
    Accepted,
    /// Handed over by the loop that accepted it (`handoff.rs`; counted there as accepted).
    Moved,
}

/// What reading a connection gave: plaintext in the caller's buffer, or why not.
pub(crate) enum Received {
    Data(usize),
    Again,
    Eof,
    Reset,
    Failed(CloseReason),
}

/// Plaintext to the socket now: straight, or through the connection's TLS session.
fn send_now(
    fd: BorrowedFd<'_>,
    session: Option<&mut Session>,
    slices: &[IoSlice<'_>],
) -> Result<usize, Errno> {
    match session {
        Some(s) => s.send(fd, slices),
        None if slices.len() == 1 => sys::write(fd, &slices[0]),
        None => sys::writev(fd, slices),
    }
}

impl<D: Copy + Default> Sockets<D> {
    pub(crate) fn new(
        loop_index: usize,
        process: ProcessId,
        poller: sys::Poller,
        metrics: Arc<LoopMetrics>,
        max_pending: usize,
        certs: Option<Arc<Certs>>,
        deflate: bool,
    ) -> Sockets<D> {
        Sockets {
            loop_index,
            process,
            conns: Vec::new(),
            free: FreeSlots::default(),
            poller,
            metrics,
            max_pending,
            now: 0,
            ended: Vec::new(),
            certs,
            sessions: FxHashMap::default(),
            codec: deflate.then(Codec::default),
        }
    }

    // ---- for the loop ---------------------------------------------------------------------

    /// A new connection in a free slot (reused first-in first-out, `id.rs`); `None` when the
    /// slab is full.
    pub(crate) fn insert(
        &mut self,
        fd: OwnedFd,
        handshake_ms: u64,
        arrived: Arrived,
    ) -> std::io::Result<usize> {
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
        let now = self.now;
        let c = &mut self.conns[slot];
        c.state = State::Handshake;
        c.flags = 0;
        c.last_rx = now;
        c.mark = now + ticks(handshake_ms);
        let token = (c.generation as u64) << 32 | slot as u64;
        let session = self.certs.as_ref().map(|certs| certs.session()).transpose();
        let added = session.and_then(|session| {
            self.poller.add(fd.as_fd(), token, sys::conn_interest())?;
            Ok(session)
        });
        match added {
            Ok(Some(session)) => {
                self.sessions.insert(slot as u32, session);
            }
            Ok(None) => {}
            Err(e) => {
                self.conns[slot].state = State::Free;
                self.free.put(slot);
                return Err(e);
            }
        }
        self.conns[slot].fd = Some(fd);
        match arrived {
            Arrived::Accepted => LoopMetrics::add(&self.metrics.accepted, 1),
            Arrived::Moved => {
                LoopMetrics::add(&self.metrics.moved_in, 1);
                self.conns[slot].flags |= STAYS;
            }
        }
        self.metrics.open.fetch_add(1, Ordering::Relaxed);
        Ok(slot)
    }

    /// `slot`'s connection was handed to another loop (`handoff.rs`), which now holds its
    /// socket: it is forgotten here without a byte or a shutdown. Its epoll registration goes
    /// first: it belongs to the socket, which the receiver keeps open, so closing this
    /// descriptor alone would leave it in this loop's set.
    pub(crate) fn hand_over(&mut self, slot: usize) {
        let c = &mut self.conns[slot];
        debug_assert!(c.state == State::Handshake && c.flags & APP_OPEN == 0);
        c.busy = None;
        c.state = State::Closed;
        if let Some(fd) = c.fd.take() {
            let _ = self.poller.delete(fd.as_fd());
            drop(fd);
        }
        self.metrics.open.fetch_sub(1, Ordering::Relaxed);
        LoopMetrics::add(&self.metrics.moved_out, 1);
        self.release(slot);
    }

    /// The epoll token of `slot`'s current connection: stale events carry an older generation.
    pub(crate) fn token(&self, slot: usize) -> u64 {
        (self.conns[slot].generation as u64) << 32 | slot as u64
    }

    /// The upgrade succeeded: a WebSocket now, and the application hears of it next.
    pub(crate) fn opened(&mut self, slot: usize) {
        let c = &mut self.conns[slot];
        c.state = State::Open;
        c.flags |= WEBSOCKET | APP_OPEN;
        self.metrics.websockets.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads what the connection has: from the socket, or decrypted by its TLS session.
    pub(crate) fn recv(&mut self, slot: usize, buf: &mut [u8]) -> Received {
        let Some(fd) = self.conns[slot].fd.as_ref() else {
            return Received::Eof;
        };
        match self.sessions.get_mut(&(slot as u32)) {
            Some(s) => match s.recv(fd.as_fd(), buf) {
                tls::Recv::Data(n) => Received::Data(n),
                tls::Recv::Again => Received::Again,
                tls::Recv::Eof => Received::Eof,
                tls::Recv::Failed(_) => Received::Failed(CloseReason::TlsError),
            },
            None => match sys::read(fd.as_fd(), buf) {
                Ok(0) => Received::Eof,
                Ok(n) => Received::Data(n),
                Err(Errno::EAGAIN) => Received::Again,
                Err(Errno::ECONNRESET | Errno::EPIPE) => Received::Reset,
                Err(_) => Received::Failed(CloseReason::IoError),
            },
        }
    }

    /// Best effort, now or never (the connection closes next): what the socket takes of
    /// `bytes`, through TLS when the connection has it.
    pub(crate) fn blurt(&mut self, slot: usize, bytes: &[u8]) {
        if let Some(fd) = self.conns[slot].fd.as_ref() {
            let session = self.sessions.get_mut(&(slot as u32));
            let _ = send_now(fd.as_fd(), session, &[IoSlice::new(bytes)]);
        }
    }

    /// Writes the transport's own bytes (handshake answers, pongs, pings, Close frames): not
    /// counted as messages.
    pub(crate) fn send_bytes(&mut self, slot: usize, bytes: &[u8]) {
        self.write(slot, Out::Bytes(bytes));
    }

    /// Writes now if nothing is queued; queues what the socket does not take (a shared frame
    /// stays shared). Past the cap the connection is a slow reader: its queue is dropped and
    /// it is closed with 1008.
    fn write(&mut self, slot: usize, out: Out<'_>) {
        let cap = self.max_pending;
        let c = &mut self.conns[slot];
        if !c.live() || c.flags & WRITE_SHUT != 0 {
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
        let session = self.sessions.get_mut(&(slot as u32));
        let written = match send_now(fd.as_fd(), session, &[IoSlice::new(out.bytes())]) {
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
    pub(crate) fn flush(&mut self, slot: usize) {
        let c = &mut self.conns[slot];
        let Some(fd) = c.fd.as_ref() else { return };
        let mut session = self.sessions.get_mut(&(slot as u32));
        // Ciphertext rustls holds goes first: it is older than anything queued here.
        let pushed = session.as_deref_mut().map(|s| s.push(fd.as_fd()));
        match pushed {
            Some(Ok(false)) => return,
            Some(Err(_)) => return self.close(slot, CloseReason::IoError),
            _ => {}
        }
        let Some(b) = c.busy.as_mut() else {
            return self.after_flush(slot);
        };
        while !b.out.is_empty() {
            match send_now(fd.as_fd(), session.as_deref_mut(), &b.out.slices()) {
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
        if self.conns[slot].live() {
            self.conns[slot].settle();
        }
    }

    /// Everything queued has gone out: a lingering connection half-closes now (a TLS one
    /// once its close_notify is on the wire).
    fn after_flush(&mut self, slot: usize) {
        let c = &mut self.conns[slot];
        if c.pending_out() == 0 && c.state == State::Lingering && c.flags & WRITE_SHUT == 0 {
            if let Some(fd) = c.fd.as_ref() {
                if let Some(s) = self.sessions.get_mut(&(slot as u32))
                    && !s.close_notify(fd.as_fd())
                {
                    return; // the rest when the socket is writable again
                }
                sys::shutdown_write(fd.as_fd());
            }
            c.flags |= WRITE_SHUT;
        }
    }

    // ---- closing --------------------------------------------------------------------------

    /// The connection stops being open: from now on it gets nothing from the application,
    /// which hears of it (once) when the loop next hands out `take_ended`.
    fn end(&mut self, slot: usize) {
        let c = &mut self.conns[slot];
        if c.flags & APP_OPEN != 0 {
            c.flags &= !APP_OPEN;
            self.ended.push(slot);
        }
    }

    /// Sends our last bytes (an HTTP response, a Close reply, a failing Close), half-closes once
    /// they are out, and waits briefly for the peer's EOF so it reads everything first.
    pub(crate) fn finish(&mut self, slot: usize, last: &[u8], reason: CloseReason) {
        let now = self.now;
        let c = &mut self.conns[slot];
        if !c.live() {
            return;
        }
        // Not Open any more, so the slow-reader cap no longer applies to these last bytes.
        c.state = State::Lingering;
        c.set_why(reason);
        c.mark = now + ticks(CLOSE_WAIT_MS);
        self.end(slot);
        self.write(slot, Out::Bytes(last));
        if self.conns[slot].live() {
            self.after_flush(slot);
        }
    }

    /// Starts the closing handshake with `fail`'s code and waits for the peer's Close; a
    /// connection still in its HTTP handshake is simply closed.
    pub(crate) fn fail(&mut self, slot: usize, fail: Fail, reason: CloseReason) {
        let now = self.now;
        let c = &mut self.conns[slot];
        match c.state {
            State::Open => {
                c.state = State::Closing;
                c.set_why(reason);
                c.mark = now + ticks(CLOSE_WAIT_MS);
                self.end(slot);
                self.write(
                    slot,
                    Out::Bytes(&frame::close_frame(fail.code, fail.reason)),
                );
            }
            State::Free | State::Closed => {}
            _ => self.close(slot, reason),
        }
    }

    /// Closes the socket. The slot is freed at once unless the application must first hear
    /// that the connection ended; then `release` frees it after `take_ended`.
    pub(crate) fn close(&mut self, slot: usize, reason: CloseReason) {
        if !self.conns[slot].live() {
            return;
        }
        self.end(slot);
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
        c.busy = None;
        c.state = State::Closed;
        self.sessions.remove(&(slot as u32));
        if let Some(fd) = c.fd.take() {
            let _ = self.poller.delete(fd.as_fd());
            drop(fd);
        }
        self.metrics.open.fetch_sub(1, Ordering::Relaxed);
        self.metrics.closed(reason);
        if !self.ended.contains(&slot) {
            self.release(slot);
        }
    }

    /// Connections that stopped being open since the last call, for the application.
    pub(crate) fn take_ended(&mut self, into: &mut Vec<usize>) {
        std::mem::swap(&mut self.ended, into);
    }

    /// The application has heard that `slot` ended: a closed slot is freed now.
    pub(crate) fn release(&mut self, slot: usize) {
        let c = &mut self.conns[slot];
        if c.state == State::Closed {
            *c = Conn::free(id::next_generation(c.generation));
            self.free.put(slot);
        }
    }
}

impl<D: Copy + Default> Sink<D> for Sockets<D> {
    fn loop_index(&self) -> usize {
        self.loop_index
    }

    fn id(&self, slot: usize) -> u64 {
        ConnId {
            process: self.process,
            generation: self.conns[slot].generation,
            loop_index: self.loop_index,
            slot,
        }
        .encode()
    }

    fn is_here(&self, id: ConnId) -> bool {
        id.process == self.process && id.loop_index == self.loop_index
    }

    fn slot_of(&self, id: u64) -> Option<usize> {
        let id = ConnId::decode(id)?;
        let c = self.conns.get(id.slot)?;
        (self.is_here(id) && c.generation == id.generation && c.state == State::Open)
            .then_some(id.slot)
    }

    fn is_open(&self, slot: usize) -> bool {
        self.conns[slot].state == State::Open
    }

    fn data(&self, slot: usize) -> D {
        self.conns[slot].data
    }

    fn data_mut(&mut self, slot: usize) -> &mut D {
        &mut self.conns[slot].data
    }

    /// A message; to a connection that negotiated permessage-deflate, compressed when that
    /// pays (a room message once per encoding, shared; a reply of its own on its own).
    fn send(&mut self, slot: usize, out: Out<'_>) {
        LoopMetrics::add(&self.metrics.messages_out, 1);
        let codec = match self.codec.as_mut() {
            Some(c) if self.conns[slot].flags & DEFLATE_OUT != 0 => c,
            _ => return self.write(slot, out),
        };
        match out {
            Out::Shared(msg, enc) => match msg.deflated(enc, codec) {
                Some(frame) => {
                    let frame = frame.clone();
                    LoopMetrics::add(&self.metrics.deflated_out, 1);
                    self.write(slot, Out::Frame(&frame));
                }
                None => self.write(slot, out),
            },
            Out::Bytes(bytes) => match protocol::deflate_frame(bytes, codec) {
                Some(frame) => {
                    LoopMetrics::add(&self.metrics.deflated_out, 1);
                    self.write(slot, Out::Bytes(&frame));
                }
                None => self.write(slot, out),
            },
            Out::Frame(_) => self.write(slot, out),
        }
    }

    fn close(&mut self, slot: usize, code: u16, reason: &'static str, why: CloseReason) {
        self.fail(slot, Fail { code, reason }, why);
    }
}
