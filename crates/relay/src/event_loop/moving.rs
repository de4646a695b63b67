//! Connections handed to the loop home to their room before their upgrade, and taken from
//! other loops (`handoff.rs` says why and how).

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;

use nix::errno::Errno;

use super::EventLoop;
use crate::conn::{STAYS, State};
use crate::handler::{Handler, Sink};
use crate::handoff::{self, Datagram};
use crate::metrics::LoopMetrics;
use crate::sockets::{Arrived, ticks};

/// A connection whose home's queue was full: tried again every tick until `deadline`.
#[derive(Clone, Copy)]
pub(super) struct Waiting {
    slot: usize,
    token: u64,
    deadline: u32,
}

/// What became of a connection that might have moved.
pub(super) enum Moved {
    /// Handed over, or waiting for its home to take it: nothing more to do here now.
    Away,
    /// Served here.
    Stays,
}

impl<H: Handler> EventLoop<H> {
    /// Hands `slot`'s connection, whose whole request is in `bytes`, to the loop home to the
    /// room its URL (`path`) names, unless that is this loop or it may not move. On a full
    /// queue its bytes are kept and it waits (`retry_moves`); when its home refuses (down) or
    /// the wait ran out, it stays.
    pub(super) fn move_home(&mut self, slot: usize, path: &str, bytes: &[u8]) -> Moved {
        let Some(handoff) = &self.handoff else {
            return Moved::Stays;
        };
        let c = &self.sockets.conns[slot];
        if c.flags & STAYS != 0 {
            return Moved::Stays;
        }
        let Some(to) = self.handler.place(path).filter(|&p| p != handoff.here()) else {
            return Moved::Stays;
        };
        let Some(fd) = c.fd.as_ref() else {
            return Moved::Stays;
        };
        let token = self.sockets.token(slot);
        let waiting = self
            .moving
            .iter()
            .position(|w| w.slot == slot && w.token == token);
        let why = match handoff.give(to, fd.as_fd(), bytes) {
            Ok(()) => {
                if let Some(i) = waiting {
                    self.moving.swap_remove(i);
                }
                self.sockets.hand_over(slot);
                return Moved::Away;
            }
            Err(Errno::EAGAIN) => match waiting {
                None => {
                    self.moving.push(Waiting {
                        slot,
                        token,
                        deadline: self.sockets.now + ticks(handoff::WAIT_MS),
                    });
                    self.sockets.conns[slot].busy().request = bytes.to_vec();
                    return Moved::Away;
                }
                Some(i) if self.sockets.now < self.moving[i].deadline => {
                    self.sockets.conns[slot].busy().request = bytes.to_vec();
                    return Moved::Away;
                }
                Some(i) => {
                    self.moving.swap_remove(i);
                    format!("its queue stayed full for {} ms", handoff::WAIT_MS)
                }
            },
            Err(e) => {
                if let Some(i) = waiting {
                    self.moving.swap_remove(i);
                }
                match e {
                    Errno::ENOENT | Errno::ECONNREFUSED => format!("down or full ({e})"),
                    _ => format!("{e}"),
                }
            }
        };
        self.sockets.conns[slot].flags |= STAYS;
        LoopMetrics::add(&self.sockets.metrics.move_failed, 1);
        if let Some(unlogged) = self.refusals_logged.moves.ready(self.now_ms()) {
            log!(
                "loop {}: served a connection here that asked for the home of its room, worker \
                 {} loop {}: {why} ({unlogged} other such connections since the last such line)",
                self.sockets.loop_index(),
                to.worker,
                to.loop_index
            );
        }
        Moved::Stays
    }

    /// Every tick: connections waiting for their home's queue try again, with the request
    /// bytes they kept.
    pub(super) fn retry_moves(&mut self) {
        for w in self.moving.clone() {
            let c = &self.sockets.conns[w.slot];
            if self.sockets.token(w.slot) != w.token || !c.live() || c.state != State::Handshake {
                self.moving
                    .retain(|m| m.slot != w.slot || m.token != w.token);
                continue;
            }
            self.on_request_bytes(w.slot, &mut [], 0);
            self.tell_ended();
        }
    }

    /// Takes every connection handed to this loop and serves it from the bytes that came with
    /// it, as if it had been accepted here.
    pub(super) fn take_moved(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        while let Some(handoff) = &self.handoff {
            match handoff.take(&mut buf) {
                Ok(Datagram::WithFd(n, fd)) => {
                    match self
                        .sockets
                        .insert(fd, self.options.handshake_timeout_ms, Arrived::Moved)
                    {
                        Ok(slot) => self.on_request_bytes(slot, &mut buf, n),
                        Err(e) => log!(
                            "loop {}: cannot register a connection handed over: {e}",
                            self.sockets.loop_index()
                        ),
                    }
                    self.tell_ended();
                    self.track_fill();
                }
                Ok(Datagram::Other) => {} // not a handover: dropped, its descriptors closed
                Ok(Datagram::FdLost) => {
                    LoopMetrics::add(&self.sockets.metrics.move_failed, 1);
                    if let Some(unlogged) = self.refusals_logged.moves.ready(self.now_ms()) {
                        log!(
                            "loop {}: lost a connection handed over: no descriptor left to \
                             receive it with (RLIMIT_NOFILE) ({unlogged} other such events since \
                             the last such line)",
                            self.sockets.loop_index()
                        );
                    }
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => break,
                Err(e) => {
                    log!(
                        "loop {}: cannot take connections handed over: {e}",
                        self.sockets.loop_index()
                    );
                    break;
                }
            }
        }
        self.buf = buf;
    }

    /// Hides this loop's handoff socket while it holds its share of the descriptors, and shows
    /// it again once it has room (`Handoff::track_fill`); called after every connection handed
    /// in and at every tick (which covers those accepted here).
    pub(super) fn track_fill(&mut self) {
        let open = self.sockets.metrics.open.load(Ordering::Relaxed).max(0) as usize;
        let Some(handoff) = &mut self.handoff else {
            return;
        };
        match handoff.track_fill(open) {
            Ok(Some(true)) => log!(
                "loop {}: holds {open} connections, its share of the descriptors: takes no more \
                 handed over (they are served where they arrive) until it holds at most {}",
                self.sockets.loop_index(),
                handoff.shown_again_at().unwrap_or(0)
            ),
            Ok(Some(false)) => log!(
                "loop {}: holds {open} connections: takes connections handed over again",
                self.sockets.loop_index()
            ),
            Ok(None) => {}
            Err(e) => log!(
                "loop {}: cannot hide or show its handoff socket: {e}",
                self.sockets.loop_index()
            ),
        }
    }
}
