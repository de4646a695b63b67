//! The seam between the transport and the application, the way uWebSockets sits on uSockets:
//! the event loop knows sockets, frames, timers and the HTTP upgrade, and calls a `Handler` for
//! everything that means something to the application. The handler answers through a `Sink`
//! (send, look a connection up by id, keep a few bytes of its own per connection). The relay
//! (`relay.rs`) and the echo server (`echo.rs`) are the two handlers; neither touches a socket,
//! so both are tested with a sink that only records (`relay.rs` tests).

use std::os::fd::BorrowedFd;

use std::sync::Arc;

use super::auth::Grant;
use super::id::ConnId;
use super::metrics::CloseReason;
use super::outq::Out;

/// What an application may do with its loop's connections.
pub trait Sink<D> {
    /// This loop's index in its process.
    fn loop_index(&self) -> usize;
    /// The id of the connection in `slot` (`id.rs`).
    fn id(&self, slot: usize) -> u64;
    /// Whether an id names this process and this loop (its connection may still be gone).
    fn is_here(&self, id: ConnId) -> bool;
    /// The slot of this loop's open WebSocket with this id.
    fn slot_of(&self, id: u64) -> Option<usize>;
    /// An open WebSocket: it receives what is sent to it.
    fn is_open(&self, slot: usize) -> bool;
    fn data(&self, slot: usize) -> D;
    fn data_mut(&mut self, slot: usize) -> &mut D;
    /// Sends one message: a reply, or a frame shared with other receivers. A connection that
    /// cannot keep up is cut off by the transport (Close 1008) and then ends (`on_end`).
    fn send(&mut self, slot: usize, out: Out<'_>);
    /// Closes an open WebSocket with `code` and `reason` (the closing handshake; the
    /// application hears `on_end` next), counted under `why`.
    fn close(&mut self, slot: usize, code: u16, reason: &'static str, why: CloseReason);
}

/// A loop among all the workers' loops: where a connection may be handed before its upgrade
/// (`handoff.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    pub worker: usize,
    pub loop_index: usize,
}

pub trait Handler {
    /// The application's own state per connection, kept in the connection's slot: every idle
    /// connection pays for it, so keep it to a few bytes (the relay's is 4).
    type Data: Copy + Default;

    /// A WebSocket opened; `path` is the upgrade request's path, query included; `grant`, what
    /// its token allows when the server checks tokens (`auth.rs`), `None` on an open server.
    fn on_open(
        &mut self,
        sink: &mut impl Sink<Self::Data>,
        slot: usize,
        path: &str,
        grant: Option<Arc<Grant>>,
    );

    /// A whole message arrived (fragments reassembled, text already checked to be UTF-8).
    fn on_message(
        &mut self,
        sink: &mut impl Sink<Self::Data>,
        slot: usize,
        binary: bool,
        payload: &[u8],
    );

    /// The connection stopped being open (it closed, failed, or is being closed): it gets
    /// nothing more. Called once per `on_open`, while the slot's data is still intact.
    fn on_end(&mut self, sink: &mut impl Sink<Self::Data>, slot: usize);

    /// A descriptor that becomes readable when the application has work from outside the loop
    /// (messages from other loops or processes); the loop watches it, edge-triggered.
    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// `wake_fd` became readable.
    fn on_wake(&mut self, _sink: &mut impl Sink<Self::Data>) {}

    /// The loop's clock ticked (every 100 ms): deadlines of the application's own are swept
    /// here, never with a timer per connection.
    fn on_tick(&mut self, _sink: &mut impl Sink<Self::Data>) {}

    /// Where a connection upgrading to `path` (query included) would best live, when the
    /// application can tell from the request alone: the relay answers the room's home for
    /// `?affinity=ROOM`. The loop hands the connection there before its upgrade when that is
    /// another loop and it can (`handoff.rs`).
    fn place(&self, _path: &str) -> Option<Place> {
        None
    }

    /// The whole HTTP response to a plain GET of `path` (no upgrade).
    fn on_get(&mut self, path: &str) -> Vec<u8>;
}
