//! The bus: how a room message, a direct message or a member count crosses from the event loop
//! that has it to the loops that need it, routed by interest (a loop receives a room's messages
//! only while it holds at least one member of that room).
//!
//! The loop talks to `Bus` only; this file's `LocalBus` connects the loops of one process
//! through in-memory queues and eventfd wake-ups. A bus between processes, or hosts (Redis
//! sharded pub/sub: SSUBSCRIBE/SPUBLISH per room), implements the same trait without touching
//! the loop or the codec.

use crate::names::NameMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::handler::Place;
use super::id::{ConnId, ProcessId};
use super::metrics::{RemoteStats, Snapshot};
use super::protocol::Outgoing;
use super::sys::Waker;

/// Something delivered to a loop.
pub enum Item {
    /// A room message: deliver to local members of `room`, except `skip` (the publisher, unless
    /// it asked for its own message).
    Room {
        room: Arc<str>,
        msg: Arc<Outgoing>,
        skip: Option<u64>,
    },
    /// A direct message for connection `to`; `from` hears back if it is gone.
    Direct {
        to: u64,
        from: u64,
        msg: Arc<Outgoing>,
        reference: Option<rmpv::Value>,
    },
    /// Connection `to` sent a direct message to `target`, which does not exist.
    Bounce {
        to: u64,
        target: u64,
        reference: Option<rmpv::Value>,
    },
    /// The answer to an `Ask` the bus could not answer at once.
    Members { ask: Ask, members: u64 },
}

/// A connection's question about a room's member count (`joined`, `left`, `count`), for a bus
/// whose counts live elsewhere (Redis): it answers later, with `Item::Members`, to `to`'s loop.
pub struct Ask {
    /// The connection asking.
    pub to: u64,
    /// The reply's op.
    pub op: &'static str,
    pub room: Arc<str>,
    pub reference: Option<rmpv::Value>,
}

pub trait Bus: Send + Sync {
    /// Loop `loop_index` gained a member of `room`.
    fn joined(&self, room: &Arc<str>, loop_index: usize);
    /// Loop `loop_index` lost a member of `room`.
    fn left(&self, room: &Arc<str>, loop_index: usize);
    /// Members of `ask.room` on the whole service, counting every `joined` and `left` this
    /// process told the bus before: `Some` now, or `None` when the bus keeps the question and
    /// answers later, as `Item::Members` to the loop of `ask.to`.
    fn members(&self, ask: Ask) -> Option<u64>;
    /// Rooms with at least one member that this process answers for: in one process, all of
    /// them; between workers, those homed on this one (so the sum over workers is the
    /// server's); with a cross-host bus, this process's own.
    fn rooms(&self) -> u64;
    /// Hands a room message to every *other* loop holding members of `room`.
    fn publish(&self, from_loop: usize, room: &Arc<str>, msg: &Arc<Outgoing>, skip: Option<u64>);
    /// Hands a direct message or a bounce to the loop of the live process that `to` names (its
    /// incarnation and loop, `id.rs`), this one or another worker. Gives the item back when no
    /// such process or loop is up: then the connection is gone, and the caller answers for it.
    fn route(&self, to: ConnId, item: Item) -> Result<(), Item>;
    /// How many worker processes the bus connects (1 for a single process).
    fn workers(&self) -> usize;
    /// How many loops the bus connects.
    fn loops(&self) -> usize;
    /// Room items handed to other loops (or workers), and how many a send-to-all bus would
    /// have handed.
    fn traffic(&self) -> (u64, u64);
    /// Room messages this process received from other workers.
    fn received(&self) -> u64 {
        0
    }
    /// Worker processes up: this one and every one it has a live link to.
    fn workers_up(&self) -> usize {
        1
    }
    /// Keeps this process's counters and hands them to the other workers.
    fn share_metrics(&self, _snapshot: &Snapshot) {}
    /// Every worker's counters (this one's too) as of its newest snapshot settled at `now_ms`
    /// ([`super::metrics::History::settled`]); empty without other workers.
    fn settled_metrics(&self, _now_ms: u64) -> Vec<Snapshot> {
        Vec::new()
    }
    /// Waits (at most `within`) until this worker is linked to every other: a worker that took
    /// clients before would skip a peer it has no link to yet, although the room's home may
    /// already count that peer's members (what a client waits for before publishing).
    fn wait_for_links(&self, _within: std::time::Duration) {}
    /// Counters of worker `worker` (this one's too) from before this process (read from the
    /// bus directory at start), where every worker's history of it begins.
    fn seed_metrics(&self, _worker: usize, _counters: Snapshot) {}
    /// Whether every other worker's counters are in (or it is too late to wait for them): a
    /// worker that just started answers /metrics only then, so that no scrape sees the whole
    /// server's counters lower than an earlier one did.
    fn metrics_ready(&self) -> bool {
        true
    }
    /// The link to other hosts (Redis), when there is one.
    fn remote(&self) -> RemoteStats {
        RemoteStats::default()
    }
    /// The loops are done: send what waits and say goodbye to other hosts.
    fn close(&self) {}
    /// The worker and loop home to `room`, when connections can be handed between loops
    /// (between workers on one host): a room whose members all live there costs one entry in
    /// one loop and nothing on the bus.
    fn place(&self, _room: &str) -> Option<Place> {
        None
    }
}

/// A room's members in this process. Per loop only with more than one loop: a worker among
/// many runs one loop and holds one member of most rooms, where a box of one count would cost
/// more than the entry.
struct Entry {
    per_loop: Box<[u32]>,
    total: u64,
}

impl Entry {
    fn holds(&self, loop_index: usize) -> bool {
        match self.per_loop.get(loop_index) {
            Some(&n) => n > 0,
            None => self.total > 0,
        }
    }
}

/// One loop's inbox.
pub struct Inbox {
    queue: Mutex<Vec<Item>>,
    pub waker: Waker,
}

impl Inbox {
    pub fn new() -> std::io::Result<Inbox> {
        Ok(Inbox {
            queue: Mutex::new(Vec::new()),
            waker: Waker::new()?,
        })
    }

    /// Takes everything queued, in order.
    pub fn drain(&self, into: &mut Vec<Item>) {
        self.waker.reset();
        let mut q = self.queue.lock().expect("inbox lock");
        std::mem::swap(&mut *q, into);
    }

    /// How many items wait to be drained (what a test checks before the loop runs).
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.queue.lock().expect("inbox lock").len()
    }

    fn push(&self, item: Item) {
        let was_empty = {
            let mut q = self.queue.lock().expect("inbox lock");
            q.push(item);
            q.len() == 1
        };
        if was_empty {
            self.waker.wake();
        }
    }
}

/// The bus between the loops of one process.
pub struct LocalBus {
    /// This process: the ids `route` can reach.
    process: ProcessId,
    directory: Mutex<NameMap<Entry>>,
    inboxes: Vec<Arc<Inbox>>,
    routed: AtomicU64,
    broadcast_equivalent: AtomicU64,
}

impl LocalBus {
    pub fn new(loops: usize, process: ProcessId) -> std::io::Result<LocalBus> {
        Ok(LocalBus {
            process,
            directory: Mutex::new(NameMap::default()),
            inboxes: (0..loops)
                .map(|_| Inbox::new().map(Arc::new))
                .collect::<Result<_, _>>()?,
            routed: AtomicU64::new(0),
            broadcast_equivalent: AtomicU64::new(0),
        })
    }

    pub fn inbox(&self, loop_index: usize) -> Arc<Inbox> {
        self.inboxes[loop_index].clone()
    }

    /// Every room with members in this process, and how many.
    pub fn snapshot(&self) -> Vec<(Arc<str>, u64)> {
        let dir = self.directory.lock().expect("directory lock");
        dir.iter().map(|(r, e)| (r.clone(), e.total)).collect()
    }

    /// Members of `room` in this process.
    pub fn local_members(&self, room: &str) -> u64 {
        let dir = self.directory.lock().expect("directory lock");
        dir.get(room).map_or(0, |e| e.total)
    }

    /// The name this process keeps for `room` while it holds members, for a table of the
    /// worker bus to share rather than keep a copy of its own.
    pub fn shared_name(&self, room: &str) -> Option<Arc<str>> {
        let dir = self.directory.lock().expect("directory lock");
        dir.get_key_value(room).map(|(name, _)| name.clone())
    }

    fn change(&self, room: &Arc<str>, loop_index: usize, up: bool) -> u64 {
        let mut dir = self.directory.lock().expect("directory lock");
        let loops = self.inboxes.len();
        let entry = dir.entry(room.clone()).or_insert_with(|| Entry {
            per_loop: vec![0; if loops > 1 { loops } else { 0 }].into_boxed_slice(),
            total: 0,
        });
        if up {
            if let Some(n) = entry.per_loop.get_mut(loop_index) {
                *n += 1;
            }
            entry.total += 1;
        } else {
            if let Some(n) = entry.per_loop.get_mut(loop_index) {
                *n = n.saturating_sub(1);
            }
            entry.total = entry.total.saturating_sub(1);
        }
        let total = entry.total;
        if total == 0 {
            dir.remove(room);
        }
        total
    }

    /// A room message that came from another worker: to every loop of this process holding
    /// members. Not counted as a hand-off between loops (the worker bus counts it).
    pub fn deliver(&self, room: &Arc<str>, msg: &Arc<Outgoing>, skip: Option<u64>) {
        self.hand(None, room, msg, skip);
    }

    /// Queues the message for every loop holding members of `room`, except `from_loop`;
    /// returns how many loops got it.
    fn hand(
        &self,
        from_loop: Option<usize>,
        room: &Arc<str>,
        msg: &Arc<Outgoing>,
        skip: Option<u64>,
    ) -> u64 {
        let targets: Vec<usize> = {
            let dir = self.directory.lock().expect("directory lock");
            match dir.get(room) {
                Some(e) => (0..self.inboxes.len())
                    .filter(|&n| Some(n) != from_loop && e.holds(n))
                    .collect(),
                None => Vec::new(),
            }
        };
        for &n in &targets {
            self.inboxes[n].push(Item::Room {
                room: room.clone(),
                msg: msg.clone(),
                skip,
            });
        }
        targets.len() as u64
    }
}

impl Bus for LocalBus {
    fn joined(&self, room: &Arc<str>, loop_index: usize) {
        self.change(room, loop_index, true);
    }

    fn left(&self, room: &Arc<str>, loop_index: usize) {
        self.change(room, loop_index, false);
    }

    fn members(&self, ask: Ask) -> Option<u64> {
        Some(self.local_members(&ask.room))
    }

    fn rooms(&self) -> u64 {
        self.directory.lock().expect("directory lock").len() as u64
    }

    fn publish(&self, from_loop: usize, room: &Arc<str>, msg: &Arc<Outgoing>, skip: Option<u64>) {
        let handed = self.hand(Some(from_loop), room, msg, skip);
        self.broadcast_equivalent
            .fetch_add(self.inboxes.len() as u64 - 1, Ordering::Relaxed);
        self.routed.fetch_add(handed, Ordering::Relaxed);
    }

    fn route(&self, to: ConnId, item: Item) -> Result<(), Item> {
        match self.inboxes.get(to.loop_index) {
            Some(inbox) if to.process == self.process => {
                inbox.push(item);
                Ok(())
            }
            _ => Err(item),
        }
    }

    fn workers(&self) -> usize {
        1
    }

    fn loops(&self) -> usize {
        self.inboxes.len()
    }

    fn traffic(&self) -> (u64, u64) {
        (
            self.routed.load(Ordering::Relaxed),
            self.broadcast_equivalent.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Reply;

    #[test]
    fn room_messages_go_only_to_interested_loops() {
        let bus = LocalBus::new(3, ProcessId::default()).unwrap();
        let room: Arc<str> = Arc::from("r");
        bus.joined(&room, 2);
        bus.joined(&room, 0);
        let msg = Outgoing::new(Reply {
            op: "message",
            ..Reply::default()
        });
        bus.publish(0, &room, &msg, None);
        let mut got = Vec::new();
        bus.inbox(1).drain(&mut got);
        assert!(got.is_empty(), "loop 1 holds no member");
        bus.inbox(2).drain(&mut got);
        assert_eq!(got.len(), 1);
        assert_eq!(bus.traffic(), (1, 2));
        let ask = || Ask {
            to: 0,
            op: "count",
            room: room.clone(),
            reference: None,
        };
        assert_eq!(bus.members(ask()), Some(2));
        bus.left(&room, 2);
        assert_eq!(bus.members(ask()), Some(1));
        bus.left(&room, 0);
        assert_eq!(bus.members(ask()), Some(0));
        assert_eq!(bus.rooms(), 0);
    }

    #[test]
    fn routing_reaches_only_this_processs_incarnation_and_loops() {
        let bus = LocalBus::new(2, ProcessId::new(1, 9)).unwrap();
        let to = |incarnation, loop_index| ConnId {
            process: ProcessId::new(1, incarnation),
            generation: 0,
            loop_index,
            slot: 0,
        };
        let bounce = || Item::Bounce {
            to: 0,
            target: 0,
            reference: None,
        };
        assert!(bus.route(to(9, 1), bounce()).is_ok());
        let mut got = Vec::new();
        bus.inbox(1).drain(&mut got);
        assert_eq!(got.len(), 1);
        // Another process's incarnation or node, or a loop this process does not have: handed
        // back.
        assert!(bus.route(to(8, 1), bounce()).is_err());
        let other_node = ConnId {
            process: ProcessId::new(2, 9),
            ..to(9, 1)
        };
        assert!(bus.route(other_node, bounce()).is_err());
        assert!(bus.route(to(9, 2), bounce()).is_err());
    }
}
