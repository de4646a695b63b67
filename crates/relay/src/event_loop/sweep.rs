//! Time: a sweep walks a slice of the slab every tick, covering all of it once per period, so
//! there is no timer object per connection. It ends handshakes and closing handshakes that took
//! too long, pings connections that went quiet, and closes those that never answered.

use std::os::fd::AsFd;

use super::EventLoop;
use crate::conn::{AWAIT_PONG, State};
use crate::frame::{self, close};
use crate::handler::{Handler, Sink};
use crate::handshake;
use crate::limits::Throttle;
use crate::metrics::{CloseReason, LoopMetrics};
use crate::sockets::{TICK_MS, ticks};
use crate::sys;

/// Log lines about heartbeats, at most one a second per kind whatever a mass timeout does.
#[derive(Default)]
pub(super) struct HeartbeatLog {
    closed: Throttle,
    read_late: Throttle,
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

impl<H: Handler> EventLoop<H> {
    /// Walks the slice of the slab that `elapsed` ticks stand for, covering all of it once per
    /// sweep period (at most a quarter of the shortest timeout), sending pings and closing what
    /// timed out. Called once per tick that passed, not per wake-up: a loop woken a few hundred
    /// times a second (pongs, messages) would otherwise walk its slab that many times over.
    pub(super) fn sweep(&mut self, elapsed: u32) {
        let len = self.sockets.conns.len();
        if len == 0 {
            return;
        }
        let period_ms = (self
            .options
            .ping_interval_ms
            .min(self.options.ping_timeout_ms)
            / 4)
        .clamp(TICK_MS, 1000);
        let per_tick = len.div_ceil((period_ms / TICK_MS) as usize).max(1);
        let interval = ticks(self.options.ping_interval_ms);
        let timeout = ticks(self.options.ping_timeout_ms);
        for _ in 0..per_tick.saturating_mul(elapsed as usize).min(len) {
            let slot = self.sweep_at % len;
            self.sweep_at = (self.sweep_at + 1) % len;
            let now = self.sockets.now;
            let c = &mut self.sockets.conns[slot];
            match c.state {
                State::Handshake if now >= c.mark => {
                    let response = handshake::response(
                        408,
                        "",
                        "text/plain; charset=utf-8",
                        "handshake timeout\n",
                    );
                    self.sockets
                        .finish(slot, &response, CloseReason::HandshakeTimeout);
                }
                State::Open
                    if c.flags & AWAIT_PONG != 0 && now.saturating_sub(c.mark) >= timeout =>
                {
                    self.no_answer(slot);
                }
                State::Open if c.flags & AWAIT_PONG != 0 => {} // pong not due yet
                State::Open
                    if now.saturating_sub(c.last_rx) >= interval - spread(slot, interval) =>
                {
                    c.flags |= AWAIT_PONG;
                    c.mark = now;
                    LoopMetrics::add(&self.sockets.metrics.pings, 1);
                    self.sockets
                        .send_bytes(slot, &frame::frame(frame::OP_PING, b""));
                }
                State::Closing | State::Lingering if now >= c.mark => {
                    let why = c.why();
                    self.sockets.close(slot, why);
                }
                _ => {}
            }
        }
    }

    /// `slot` was pinged `ping_timeout` ago and nothing has been read from it since. It is read
    /// once more first: a loop behind in its events (a batch of a thousand still to come, two
    /// saturated cores) may not have read an answer, a Close or a hang-up that is already
    /// there, and a peer that did answer, or is simply gone, must not be counted as one that
    /// stopped answering. Only when nothing is there is the peer presumably gone: a
    /// best-effort Close 1001, no waiting.
    fn no_answer(&mut self, slot: usize) {
        let token = self.sockets.token(slot);
        // Asked now: after the read below, a connection that hung up has no peer to name.
        let addr = self.sockets.conns[slot]
            .fd
            .as_ref()
            .and_then(|fd| sys::peer_addr(fd.as_fd()).ok())
            .map_or_else(|| "a client gone since".to_string(), |a| a.to_string());
        self.on_readable(slot);
        let c = &self.sockets.conns[slot];
        let now_ms = self.now_ms();
        if self.sockets.token(slot) != token || c.state != State::Open || c.flags & AWAIT_PONG == 0
        {
            LoopMetrics::add(&self.sockets.metrics.heartbeat_late_reads, 1);
            if let Some(unlogged) = self.heartbeats_logged.read_late.ready(now_ms) {
                log!(
                    "loop {}: heartbeat: the connection from {addr} had sent something this loop \
                     had not read yet when its ping timed out: read, not closed for the heartbeat \
                     ({unlogged} more since the last such line; \
                     tunegate_heartbeat_late_reads_total counts them)",
                    self.sockets.loop_index(),
                );
            }
            return;
        }
        if let Some(unlogged) = self.heartbeats_logged.closed.ready(now_ms) {
            // What this side still held for it says whether the ping can have reached it.
            let queued = c.pending_out();
            log!(
                "loop {}: heartbeat: closed the connection from {addr} with 1001: nothing within \
                 {} ms of its ping ({queued} bytes for it still queued here; {unlogged} more \
                 since the last such line; \
                 tunegate_connections_closed_total{{reason=\"heartbeat_timeout\"}} counts them)",
                self.sockets.loop_index(),
                self.options.ping_timeout_ms,
            );
        }
        let bye = frame::close_frame(close::GOING_AWAY, "heartbeat timeout");
        self.sockets.blurt(slot, &bye);
        self.sockets.close(slot, CloseReason::HeartbeatTimeout);
    }
}
