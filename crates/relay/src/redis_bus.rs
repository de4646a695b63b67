//! The bus between hosts: Redis 7 Cluster sharded pub/sub (`--bus redis://...`). Every worker
//! process is one member of the service, with its own Redis connections: rooms, direct messages
//! and member counts cross between processes only through Redis, whether the other process is
//! on this host or another (the unix links between a host's workers then carry only their
//! counters, for /metrics).
//!
//! - **Rooms**: a process subscribes (SSUBSCRIBE) to a room's channel while it holds at least
//!   one member, and unsubscribes when the last leaves; a publish is one SPUBLISH, which the
//!   cluster routes to the one shard that owns the channel's slot and from there only to the
//!   processes subscribed. Each process ignores its own messages (its loops already had them
//!   through `LocalBus`). Per-publisher order holds: one publisher's messages travel one
//!   connection to one shard and one connection from it.
//! - **Direct messages**: every process subscribes to its own channel (`tg:p:{NODE.INC}`); a
//!   send is one SPUBLISH there. Nobody listening means the process is gone (the sender gets
//!   `no_such_connection`), unless its alive lease says it is between subscriptions (a
//!   failover): then the message is tried again for a while.
//! - **Counts**: each process writes its member count of a room into the room's hash when it
//!   changes and reads every process's count back in the same script; the bridge adds up the
//!   counts of processes whose alive key (a lease: 15 s, renewed every 5 s, one per process)
//!   exists, so a host that died without a goodbye stops counting within about 15 s, and it
//!   forgets the dead ones' fields. Nothing is renewed per room but a slow refresh that keeps
//!   the hashes from expiring: the standing cost in Redis is per process, not per room.
//!
//! The event loops never wait for Redis: they hand work to `Pending` (one lock, a wake-up) and
//! go on; one thread with a single-threaded tokio runtime (`bridge.rs`) does the talking, in
//! batches, and hands back what comes in through the loops' inboxes, as the unix bus does.
//! Counts that must come from Redis are answered later (`Item::Members`). While Redis is out
//! of reach the process keeps serving its own rooms, answers counts from its own members, and
//! drops (and counts) what it cannot send: pub/sub is at-most-once.

mod batch;
mod bridge;
mod inbound;
pub mod keys;
mod scripts;
mod tls;
pub mod url;

use crate::names::NameSet;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fred::bytes::Bytes;

use super::bus::{Ask, Bus, Item, LocalBus};
use super::handler::Place;
use super::id::{ConnId, ProcessId};
use super::metrics::{RemoteStats, Snapshot};
use super::peers::WorkerBus;
use super::protocol::{Encoding, Outgoing};
use keys::Wire;

/// How long a process's alive key and node claim (and so its counts) outlive it without renewal.
pub const LEASE: Duration = Duration::from_secs(15);
/// How often a live process renews them.
pub const RENEW: Duration = Duration::from_secs(5);
/// A room's count hash expires this long after its last write: the counts of processes that
/// all died without a goodbye go away by themselves.
pub const ROOM_TTL: Duration = Duration::from_secs(30 * 60);
/// How often a live process writes each of its rooms' counts again, well within `ROOM_TTL`.
pub const ROOM_REFRESH: Duration = Duration::from_secs(10 * 60);
/// Bytes of messages waiting for Redis beyond which new ones are dropped (and counted).
const MAX_WAITING_BYTES: usize = 64 << 20;
/// Count questions waiting for Redis beyond which new ones are answered from this process.
const MAX_WAITING_ASKS: usize = 1 << 20;

/// What the bus needs to start.
#[derive(Clone, Debug)]
pub struct Settings {
    pub seeds: url::Seeds,
    pub password: Option<String>,
    /// With `rediss://`: the CA certificates to trust (`None`: the system's).
    pub ca_file: Option<std::path::PathBuf>,
    /// The node id the operator chose; `None` derives one (`keys::preferred_node`).
    pub node: Option<u8>,
    /// This host, as other hosts see it in a node claim: `HOSTNAME/LISTEN-ADDRESS`.
    pub identity: String,
    pub incarnation: u16,
}

/// A message for another process, waiting for the bridge.
pub(crate) enum Outbound {
    Room {
        room: Arc<str>,
        bytes: Bytes,
    },
    /// A direct message or a bounce for process `to`. `bounce` is who hears back if `to` is
    /// gone (direct messages only).
    Direct {
        to: ProcessId,
        bytes: Bytes,
        bounce: Option<Bounce>,
        tries: u8,
    },
}

impl Outbound {
    fn len(&self) -> usize {
        match self {
            Outbound::Room { bytes, .. } | Outbound::Direct { bytes, .. } => bytes.len(),
        }
    }
}

pub(crate) struct Bounce {
    pub sender: u64,
    pub target: u64,
    pub reference: Option<rmpv::Value>,
}

/// What the loops left for the bridge. Asks are taken before rooms are (see `Pending::take`).
#[derive(Default)]
pub(crate) struct Waiting {
    pub asks: Vec<Ask>,
    /// Rooms whose member count in this process changed.
    pub dirty: NameSet,
    pub out: VecDeque<Outbound>,
    out_bytes: usize,
    pub stopping: bool,
}

/// Between the loops and the bridge: what waits, the wake-up, and the counters.
pub(crate) struct Pending {
    waiting: Mutex<Waiting>,
    pub wake: tokio::sync::Notify,
    pub stats: Stats,
}

#[derive(Default)]
pub(crate) struct Stats {
    /// The bridge reaches the cluster (and this host's node is not in conflict).
    pub connected: AtomicBool,
    /// This host's node id is held by another host: nothing goes to Redis.
    pub isolated: AtomicBool,
    pub published: AtomicU64,
    pub received: AtomicU64,
    pub dropped: AtomicU64,
}

impl Pending {
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().expect("redis bus lock")
    }

    /// Everything waiting, for one batch. The asks are taken in the same critical section as
    /// the rooms, and every ask's `joined` or `left` marked its room before the ask was made,
    /// so the batch that answers an ask also writes the count the ask must see.
    pub fn take(&self) -> Waiting {
        let mut w = self.lock();
        let stopping = w.stopping;
        let mut batch = std::mem::take(&mut *w);
        w.stopping = stopping;
        batch.out_bytes = 0;
        batch
    }

    pub fn mark(&self, rooms: impl IntoIterator<Item = Arc<str>>) {
        self.lock().dirty.extend(rooms);
        self.wake.notify_one();
    }

    /// Queues a message unless too much waits already; says whether it was queued.
    pub fn send(&self, out: Outbound) -> bool {
        let mut w = self.lock();
        if w.out_bytes + out.len() > MAX_WAITING_BYTES {
            drop(w);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        w.out_bytes += out.len();
        w.out.push_back(out);
        drop(w);
        self.wake.notify_one();
        true
    }

    fn usable(&self) -> bool {
        self.stats.connected.load(Ordering::Relaxed) && !self.stats.isolated.load(Ordering::Relaxed)
    }
}

pub struct RedisBus {
    local: Arc<LocalBus>,
    /// The unix links to this host's other workers, for their counters only.
    host: Option<Arc<WorkerBus>>,
    process: ProcessId,
    pending: Arc<Pending>,
    bridge: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A bus whose bridge has met the cluster (or given up waiting) and settled the node id, but
/// does not carry anything yet: the loops' `LocalBus` needs the process id first.
pub struct Connecting {
    started: bridge::Started,
    incarnation: u16,
    pending: Arc<Pending>,
}

impl Connecting {
    /// The process id this process hands out connection ids under.
    pub fn process(&self) -> ProcessId {
        ProcessId::new(self.started.node, self.incarnation)
    }

    /// Carries the loops of `local` (and the host's other workers' counters through `host`).
    pub fn run(self, local: Arc<LocalBus>, host: Option<Arc<WorkerBus>>) -> Arc<RedisBus> {
        let process = self.process();
        let handle = self.started.go(local.clone());
        Arc::new(RedisBus {
            local,
            host,
            process,
            pending: self.pending,
            bridge: Mutex::new(Some(handle)),
        })
    }
}

impl RedisBus {
    /// Starts the bridge and waits (at most 2 s) for the cluster: the node id this process
    /// hands out ids under, claimed for this host when the cluster answered. Refuses to start
    /// when the chosen node id is another host's. An unreachable cluster is not an error: the
    /// process serves its own clients and joins the cluster when it answers.
    pub fn connect(settings: Settings) -> anyhow::Result<Connecting> {
        let pending = Arc::new(Pending {
            waiting: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            stats: Stats::default(),
        });
        let incarnation = settings.incarnation;
        let started = bridge::start(settings, pending.clone())?;
        Ok(Connecting {
            started,
            incarnation,
            pending,
        })
    }

    /// Queues a direct message or bounce for another process; false when it cannot go.
    fn send_to(&self, to: ProcessId, wire: &Wire, bounce: Option<Bounce>) -> bool {
        self.pending.usable()
            && self.pending.send(Outbound::Direct {
                to,
                bytes: wire.encode().into(),
                bounce,
                tries: 0,
            })
    }
}

impl Bus for RedisBus {
    /// The home among this host's workers (rooms span hosts, but on this host one worker then
    /// holds a room's members, and only it subscribes to the room).
    fn place(&self, room: &str) -> Option<Place> {
        self.host.as_ref().and_then(|host| host.place(room))
    }

    fn joined(&self, room: &Arc<str>, loop_index: usize) {
        self.local.joined(room, loop_index);
        self.pending.mark([room.clone()]);
    }

    fn left(&self, room: &Arc<str>, loop_index: usize) {
        self.local.left(room, loop_index);
        self.pending.mark([room.clone()]);
    }

    fn members(&self, ask: Ask) -> Option<u64> {
        if !self.pending.usable() {
            return Some(self.local.local_members(&ask.room));
        }
        let mut w = self.pending.lock();
        if w.asks.len() >= MAX_WAITING_ASKS {
            return Some(self.local.local_members(&ask.room));
        }
        w.asks.push(ask);
        drop(w);
        self.pending.wake.notify_one();
        None
    }

    fn rooms(&self) -> u64 {
        self.local.rooms()
    }

    fn publish(&self, from_loop: usize, room: &Arc<str>, msg: &Arc<Outgoing>, skip: Option<u64>) {
        self.local.publish(from_loop, room, msg, skip);
        if !self.pending.usable() {
            self.pending.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let wire = Wire::Room {
            version: keys::VERSION,
            node: self.process.node,
            incarnation: self.process.incarnation,
            skip,
            msg: msg.payload(Encoding::MsgPack).to_vec(),
        };
        self.pending.send(Outbound::Room {
            room: room.clone(),
            bytes: wire.encode().into(),
        });
    }

    fn route(&self, to: ConnId, item: Item) -> Result<(), Item> {
        if to.process == self.process {
            return self.local.route(to, item);
        }
        let (wire, bounce) = match item {
            Item::Direct {
                to,
                from,
                msg,
                reference,
            } => (
                Wire::Direct {
                    version: keys::VERSION,
                    to,
                    from,
                    reference: reference.clone(),
                    msg: msg.payload(Encoding::MsgPack).to_vec(),
                },
                Some(Bounce {
                    sender: from,
                    target: to,
                    reference,
                }),
            ),
            Item::Bounce {
                to,
                target,
                reference,
            } => (
                Wire::Bounce {
                    version: keys::VERSION,
                    to,
                    target,
                    reference,
                },
                None,
            ),
            other => return Err(other),
        };
        if !self.send_to(to.process, &wire, bounce) {
            // Not sent: Redis is out of reach or the queue is full. Dropped and counted, as
            // a room message would be; the sender was told `sent` only for the hand-off.
            self.pending.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn workers(&self) -> usize {
        self.host.as_ref().map_or(1, |h| h.workers())
    }

    fn loops(&self) -> usize {
        self.local.loops()
    }

    fn traffic(&self) -> (u64, u64) {
        let (loops, loops_all) = self.local.traffic();
        let published = self.pending.stats.published.load(Ordering::Relaxed);
        (loops + published, loops_all + published)
    }

    fn received(&self) -> u64 {
        self.pending.stats.received.load(Ordering::Relaxed)
    }

    fn workers_up(&self) -> usize {
        self.host.as_ref().map_or(1, |h| h.workers_up())
    }

    fn share_metrics(&self, snapshot: &Snapshot) {
        if let Some(h) = &self.host {
            h.share_metrics(snapshot);
        }
    }

    fn settled_metrics(&self, now_ms: u64) -> Vec<Snapshot> {
        self.host
            .as_ref()
            .map_or_else(Vec::new, |h| h.settled_metrics(now_ms))
    }

    fn seed_metrics(&self, worker: usize, counters: Snapshot) {
        if let Some(h) = &self.host {
            h.seed_metrics(worker, counters);
        }
    }

    fn wait_for_links(&self, within: std::time::Duration) {
        if let Some(h) = &self.host {
            h.wait_for_links(within);
        }
    }

    fn metrics_ready(&self) -> bool {
        self.host.as_ref().is_none_or(|h| h.metrics_ready())
    }

    fn remote(&self) -> RemoteStats {
        let s = &self.pending.stats;
        RemoteStats {
            connected: self.pending.usable() as u64,
            published: s.published.load(Ordering::Relaxed),
            received: s.received.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
        }
    }

    /// Sends what waits, takes this process's counts out of the rooms and gives its alive
    /// lease back (at most 2 s), so the other hosts see it gone at once.
    fn close(&self) {
        self.pending.lock().stopping = true;
        self.pending.wake.notify_one();
        if let Some(handle) = self.bridge.lock().expect("bridge lock").take() {
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while !handle.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
