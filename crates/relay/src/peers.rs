//! The bus between worker processes on one host: `WorkerBus` implements `Bus` on top of the
//! in-process `LocalBus`, adding one unix-domain-socket link to every other worker.
//!
//! Each worker listens on `DIR/worker-N.sock`; the higher-numbered worker of each pair dials
//! the lower one, so every pair shares exactly one stream (one FIFO per direction: per-publisher
//! order holds, and nothing is delivered twice). Both introduce themselves with a `Hello` that
//! carries their node and incarnation (`id.rs`): a direct message goes to the link whose process
//! its target id names, so an id of a dead process, which no link has, reaches nobody; a peer
//! claiming our own process is refused. On a new link both sides send their whole
//! member table (`Count` per room); afterwards every join or leave sends the room's new count.
//! A room message goes only to workers whose count for the room is above zero (interest
//! routing: in "Optimizing Socket.IO for 100k Concurrent Users" it cut internal traffic
//! by 94 %).
//!
//! A link is the unit of truth about a peer: counts learned on a link are valid exactly as long
//! as that link lives. When it ends (the peer died, or stalled past `MAX_QUEUED`), the peer's
//! counts drop to zero at once; when the peer comes back a new link replaces the old one, and
//! anything still arriving on the old one can no longer change a count. Messages for a peer with
//! no link are dropped: it holds no members then.
//!
//! Nothing here knows about client sockets, frames or rooms' members: the event loop talks to
//! `Bus`, and a Redis (SSUBSCRIBE/SPUBLISH) bus would replace this file alone.

use crate::names::NameMap;
use std::io::{BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use super::bus::{Ask, Bus, Item, LocalBus};
use link::{Link, Outbox, write_link};

mod link;
use super::id::{ConnId, ProcessId};
use super::metrics::{History, Snapshot};
use super::protocol::{Encoding, Outgoing};

/// Largest bus frame accepted (a room message carries at most one client message).
const MAX_WIRE: usize = 64 << 20;
/// Bumped whenever `Wire` changes, so workers of different builds refuse each other loudly.
const PROTOCOL: u32 = 4;
/// How often a worker retries dialling a peer that is down.
const REDIAL: Duration = Duration::from_millis(50);

#[derive(Serialize, Deserialize)]
enum Wire {
    Hello {
        protocol: u32,
        worker: u32,
        workers: u32,
        /// The sender's node and incarnation: direct messages for ids that carry them come to
        /// the sender.
        node: u8,
        incarnation: u16,
    },
    /// The sender now holds `count` members of `room`.
    Count { room: String, count: u64 },
    Room {
        room: String,
        skip: Option<u64>,
        #[serde(with = "serde_bytes")]
        msg: Vec<u8>,
    },
    Direct {
        to: u64,
        from: u64,
        reference: Option<rmpv::Value>,
        #[serde(with = "serde_bytes")]
        msg: Vec<u8>,
    },
    Bounce {
        to: u64,
        target: u64,
        reference: Option<rmpv::Value>,
    },
    /// The sender's counters, every half second (summed into /metrics by whoever answers).
    Metrics(Box<Snapshot>),
}

/// What this worker knows about its peers; one lock, so a count can never be applied from, or
/// a message routed to, a link that has been replaced.
struct Peers {
    links: Vec<Option<Link>>,
    /// Each worker's last few snapshots, this one's too; once a peer's link is gone, their
    /// counters alone (kept so the whole server's sums never go down when a worker dies),
    /// until its successor reports.
    metrics: Vec<History>,
    /// Whether `metrics[w]` came over the current link to `w`.
    reported: Vec<bool>,
    /// Per room with remote members: the members each worker holds.
    counts: NameMap<Box<[u64]>>,
    generations: u64,
}

impl Peers {
    /// Whether link `generation` is still the live link to `worker`.
    fn is_current(&self, worker: usize, generation: u64) -> bool {
        self.links[worker]
            .as_ref()
            .is_some_and(|l| l.generation == generation)
    }

    fn forget(&mut self, worker: usize) {
        self.links[worker] = None;
        self.metrics[worker].keep_counters_only();
        self.reported[worker] = false;
        self.counts.retain(|_, per| {
            per[worker] = 0;
            per.iter().any(|&c| c > 0)
        });
    }
}

pub struct WorkerBus {
    local: Arc<LocalBus>,
    me: usize,
    process: ProcessId,
    /// The last reason logged for not linking, per peer (`workers` for unknown dialers).
    refusals: Mutex<FxHashMap<usize, String>>,
    workers: usize,
    peers: Mutex<Peers>,
    /// Room messages sent to other workers, and how many a send-to-all bus would have sent.
    routed: AtomicU64,
    broadcast_equivalent: AtomicU64,
    /// Room messages received from other workers.
    received: AtomicU64,
    started: std::time::Instant,
}

/// How long a worker that just started waits for every peer's counters before it answers
/// /metrics anyway (a peer that is down may never report).
const METRICS_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Worker `worker`'s socket in the bus directory.
pub fn socket_path(dir: &Path, worker: usize) -> PathBuf {
    dir.join(format!("worker-{worker}.sock"))
}

/// Whether a file in the bus directory is one the workers make (their sockets; files of
/// earlier versions too), which whoever prepares the directory for a new run may remove.
pub fn is_bus_file(name: &str) -> bool {
    (name.starts_with("worker-")
        && (name.ends_with(".sock") || name.ends_with(".counters") || name.ends_with(".tmp")))
        || (name.starts_with("metrics-") && name.ends_with(".json"))
        || (name.starts_with(".metrics-") && name.ends_with(".tmp"))
}

fn encode(w: &Wire) -> Arc<Vec<u8>> {
    let body = rmp_serde::to_vec(w).expect("bus messages serialise");
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Arc::new(out)
}

/// Reads one length-prefixed message; `None` at the end of the stream or on garbage.
fn read_wire(input: &mut impl Read) -> Option<Wire> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len).ok()?;
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_WIRE {
        return None;
    }
    let mut body = vec![0u8; n];
    input.read_exact(&mut body).ok()?;
    rmp_serde::from_slice(&body).ok()
}

impl WorkerBus {
    /// Binds this worker's socket and starts dialling the lower-numbered workers.
    pub fn start(
        local: Arc<LocalBus>,
        dir: &Path,
        me: usize,
        workers: usize,
        process: ProcessId,
    ) -> std::io::Result<Arc<WorkerBus>> {
        std::fs::create_dir_all(dir)?;
        let path = socket_path(dir, me);
        let _ = std::fs::remove_file(&path); // a previous life of this worker
        let listener = UnixListener::bind(&path)?;
        let bus = Arc::new(WorkerBus {
            local,
            me,
            process,
            refusals: Mutex::default(),
            workers,
            peers: Mutex::new(Peers {
                links: (0..workers).map(|_| None).collect(),
                metrics: (0..workers).map(|_| History::default()).collect(),
                reported: vec![false; workers],
                counts: NameMap::default(),
                generations: 0,
            }),
            routed: AtomicU64::new(0),
            broadcast_equivalent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            started: std::time::Instant::now(),
        });
        for peer in 0..me {
            let b = bus.clone();
            let dir = dir.to_path_buf();
            std::thread::Builder::new()
                .name(format!("tunegate-bus-dial-{peer}"))
                .spawn(move || b.dial(peer, &dir))?;
        }
        let b = bus.clone();
        std::thread::Builder::new()
            .name("tunegate-bus-accept".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    b.accept(stream);
                }
            })?;
        Ok(bus)
    }

    fn lock(&self) -> MutexGuard<'_, Peers> {
        self.peers.lock().expect("bus peers lock")
    }

    fn hello(&self) -> Arc<Vec<u8>> {
        encode(&Wire::Hello {
            protocol: PROTOCOL,
            worker: self.me as u32,
            workers: self.workers as u32,
            node: self.process.node,
            incarnation: self.process.incarnation,
        })
    }

    /// Keeps a link to `peer` (a lower-numbered worker) up: whenever there is none, connect,
    /// introduce ourselves, and learn its process from its answer.
    fn dial(self: &Arc<Self>, peer: usize, dir: &Path) {
        let path = socket_path(dir, peer);
        loop {
            if self.lock().links[peer].is_none()
                && let Ok(mut stream) = UnixStream::connect(&path)
                && stream.write_all(&self.hello()).is_ok()
            {
                match self.introduction(&mut stream, |w| w == peer) {
                    Ok((_, process)) => self.install(peer, process, stream),
                    Err(why) => self.refused(
                        peer,
                        format!("no link to worker {peer}: {why} (its log says why)"),
                    ),
                }
            }
            std::thread::sleep(REDIAL);
        }
    }

    /// A higher-numbered worker connected: learn who it is, answer with who we are, link.
    fn accept(self: &Arc<Self>, mut stream: UnixStream) {
        match self.introduction(&mut stream, |w| w > self.me) {
            Ok((who, process)) => {
                if stream.write_all(&self.hello()).is_ok() {
                    self.install(who, process, stream);
                }
            }
            Err(why) => self.refused(self.workers, format!("refused a link: {why}")),
        }
    }

    /// Reads the peer's `Hello` (at most 2 s): a worker of this build and size, whose number
    /// `expected` accepts, and whose process is not ours (two processes handing out the same ids
    /// would deliver each other's direct messages). Its number and process.
    fn introduction(
        &self,
        stream: &mut UnixStream,
        expected: impl Fn(usize) -> bool,
    ) -> Result<(usize, ProcessId), String> {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let hello = read_wire(stream);
        let _ = stream.set_read_timeout(None);
        match hello {
            Some(Wire::Hello {
                protocol,
                worker,
                workers,
                node,
                incarnation,
            }) if protocol == PROTOCOL
                && workers as usize == self.workers
                && (worker as usize) < self.workers
                && expected(worker as usize) =>
            {
                let process = ProcessId::new(node, incarnation);
                if process == self.process {
                    return Err(format!(
                        "worker {worker} has this worker's process {process}, so both \
                         would hand out the same connection ids"
                    ));
                }
                Ok((worker as usize, process))
            }
            None => Err("the peer closed without introducing itself".into()),
            _ => Err("the peer is not a worker of this build and size".into()),
        }
    }

    /// Logs why a link could not be made, once per peer until the reason changes or a link
    /// is made: dialling retries every 50 ms and must not flood the journal.
    fn refused(&self, key: usize, line: String) {
        let mut last = self.refusals.lock().expect("refusals lock");
        if last.get(&key) != Some(&line) {
            log!("bus: {line}");
            last.insert(key, line);
        }
    }

    /// Makes `stream` the link to `peer`: it replaces any older one (whose counts are void
    /// from now on), carries our whole table first, then every update in order.
    fn install(self: &Arc<Self>, peer: usize, process: ProcessId, stream: UnixStream) {
        let (Ok(for_writer), Ok(for_link)) = (stream.try_clone(), stream.try_clone()) else {
            return;
        };
        let out = Arc::new(Outbox::default());
        let generation = {
            let mut peers = self.lock();
            peers.forget(peer);
            peers.generations += 1;
            let link = Link {
                generation: peers.generations,
                process,
                out: out.clone(),
                stream: for_link,
            };
            // Under the lock: no count update can slip in ahead of the table.
            for (room, count) in self.local.snapshot() {
                link.send(encode(&Wire::Count {
                    room: room.to_string(),
                    count,
                }));
            }
            // And the snapshots this worker keeps of itself, so the peer's history of it is
            // the same as its own (what /metrics sums must be the same everywhere).
            for snapshot in peers.metrics[self.me].iter() {
                link.send(encode(&Wire::Metrics(Box::new(snapshot.clone()))));
            }
            peers.links[peer] = Some(link);
            peers.generations
        };
        self.refusals.lock().expect("refusals lock").remove(&peer);
        log!("bus: link to worker {peer} (process {process}) up");
        let spawned = std::thread::Builder::new()
            .name(format!("tunegate-bus-to-{peer}"))
            .spawn(move || write_link(for_writer, &out));
        if spawned.is_err() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let bus = self.clone();
        let _ = std::thread::Builder::new()
            .name(format!("tunegate-bus-from-{peer}"))
            .spawn(move || bus.read_link(peer, generation, stream));
    }

    /// Everything `peer` says on one link, until the link ends; then, unless a newer link
    /// replaced it meanwhile, the peer's members stop counting.
    fn read_link(&self, peer: usize, generation: u64, stream: UnixStream) {
        let mut input = BufReader::new(&stream);
        while let Some(msg) = read_wire(&mut input) {
            match msg {
                Wire::Hello { .. } => break,
                Wire::Count { room, count } => {
                    let mut peers = self.lock();
                    if !peers.is_current(peer, generation) {
                        continue; // a replaced link: its counts are void
                    }
                    let workers = self.workers;
                    let per = peers
                        .counts
                        .entry(Arc::from(room.as_str()))
                        .or_insert_with(|| vec![0; workers].into_boxed_slice());
                    per[peer] = count;
                    if per.iter().all(|&c| c == 0) {
                        peers.counts.remove(room.as_str());
                    }
                }
                Wire::Room { room, skip, msg } => {
                    self.received.fetch_add(1, Ordering::Relaxed);
                    let room: Arc<str> = Arc::from(room.as_str());
                    let msg = Outgoing::from_msgpack(msg);
                    self.local.deliver(&room, &msg, skip);
                }
                Wire::Direct {
                    to,
                    from,
                    reference,
                    msg,
                } => {
                    let msg = Outgoing::from_msgpack(msg);
                    let item = Item::Direct {
                        to,
                        from,
                        msg,
                        reference,
                    };
                    if let Some(target) = ConnId::decode(to)
                        && let Err(Item::Direct {
                            to,
                            from,
                            reference,
                            ..
                        }) = self.local.route(target, item)
                    {
                        // Not one of ours (another process, a loop we do not have): gone.
                        self.bounce(to, from, reference);
                    }
                }
                Wire::Metrics(snapshot) => {
                    let mut peers = self.lock();
                    if peers.is_current(peer, generation) {
                        peers.metrics[peer].push(*snapshot);
                        peers.reported[peer] = true;
                    }
                }
                Wire::Bounce {
                    to,
                    target,
                    reference,
                } => {
                    if let Some(sender) = ConnId::decode(to) {
                        let _ = self.local.route(
                            sender,
                            Item::Bounce {
                                to,
                                target,
                                reference,
                            },
                        );
                    }
                }
            }
        }
        let _ = stream.shutdown(Shutdown::Both);
        let mut peers = self.lock();
        if peers.is_current(peer, generation) {
            peers.forget(peer);
            drop(peers);
            log!("bus: link to worker {peer} down; its members no longer count");
        }
    }

    /// A direct message from `from` found no connection `to` here: tell the sender, wherever
    /// it is (a sender that is gone too needs no answer).
    fn bounce(&self, to: u64, from: u64, reference: Option<rmpv::Value>) {
        if let Some(sender) = ConnId::decode(from) {
            let _ = self.route(
                sender,
                Item::Bounce {
                    to: from,
                    target: to,
                    reference,
                },
            );
        }
    }

    /// Tells every peer how many members of `room` this worker holds now. Reading the count and
    /// queueing it happen under the peers lock, so the last count queued is the latest.
    fn announce(&self, room: &str) {
        let peers = self.lock();
        let bytes = encode(&Wire::Count {
            room: room.to_string(),
            count: self.local.local_members(room),
        });
        for link in peers.links.iter().flatten() {
            link.send(bytes.clone());
        }
    }

    fn remote_members(&self, room: &str) -> u64 {
        self.lock()
            .counts
            .get(room)
            .map_or(0, |per| per.iter().sum())
    }
}

impl Bus for WorkerBus {
    fn joined(&self, room: &Arc<str>, loop_index: usize) {
        self.local.joined(room, loop_index);
        self.announce(room);
    }

    fn left(&self, room: &Arc<str>, loop_index: usize) {
        self.local.left(room, loop_index);
        self.announce(room);
    }

    fn members(&self, ask: Ask) -> Option<u64> {
        Some(self.local.local_members(&ask.room) + self.remote_members(&ask.room))
    }

    fn rooms(&self) -> u64 {
        let mut names: Vec<Arc<str>> = self.local.snapshot().into_iter().map(|(r, _)| r).collect();
        names.extend(self.lock().counts.keys().cloned());
        names.sort_unstable();
        names.dedup();
        names.len() as u64
    }

    fn publish(&self, from_loop: usize, room: &Arc<str>, msg: &Arc<Outgoing>, skip: Option<u64>) {
        self.local.publish(from_loop, room, msg, skip);
        self.broadcast_equivalent
            .fetch_add(self.workers as u64 - 1, Ordering::Relaxed);
        let peers = self.lock();
        let Some(per) = peers.counts.get(&**room) else {
            return;
        };
        let mut bytes = None;
        for (w, link) in peers.links.iter().enumerate() {
            if let Some(link) = link
                && per[w] > 0
            {
                let bytes = bytes.get_or_insert_with(|| {
                    encode(&Wire::Room {
                        room: room.to_string(),
                        skip,
                        msg: msg.payload(Encoding::MsgPack).to_vec(),
                    })
                });
                self.routed.fetch_add(1, Ordering::Relaxed);
                link.send(bytes.clone());
            }
        }
    }

    fn route(&self, to: ConnId, item: Item) -> Result<(), Item> {
        if to.process == self.process {
            return self.local.route(to, item);
        }
        let peers = self.lock();
        let Some(link) = peers
            .links
            .iter()
            .flatten()
            .find(|l| l.process == to.process)
        else {
            // No live worker is that process: the connection died with it.
            return Err(item);
        };
        let wire = match item {
            Item::Direct {
                to,
                from,
                msg,
                reference,
            } => Wire::Direct {
                to,
                from,
                reference,
                msg: msg.payload(Encoding::MsgPack).to_vec(),
            },
            Item::Bounce {
                to,
                target,
                reference,
            } => Wire::Bounce {
                to,
                target,
                reference,
            },
            other => return Err(other),
        };
        link.send(encode(&wire));
        Ok(())
    }

    fn workers(&self) -> usize {
        self.workers
    }

    fn loops(&self) -> usize {
        self.local.loops()
    }

    /// Hand-offs to this process's other loops plus to other workers, so the counters mean
    /// the same whatever the mix of loops and workers.
    fn traffic(&self) -> (u64, u64) {
        let (loops, loops_all) = self.local.traffic();
        (
            loops + self.routed.load(Ordering::Relaxed),
            loops_all + self.broadcast_equivalent.load(Ordering::Relaxed),
        )
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    fn workers_up(&self) -> usize {
        1 + self.lock().links.iter().flatten().count()
    }

    fn share_metrics(&self, snapshot: &Snapshot) {
        let bytes = encode(&Wire::Metrics(Box::new(snapshot.clone())));
        // Kept and sent under one lock: a link installed meanwhile gets it exactly once.
        let mut peers = self.lock();
        peers.metrics[self.me].push(snapshot.clone());
        for link in peers.links.iter().flatten() {
            link.send(bytes.clone());
        }
    }

    fn settled_metrics(&self, now_ms: u64) -> Vec<Snapshot> {
        let peers = self.lock();
        peers
            .metrics
            .iter()
            .filter_map(|h| h.settled(now_ms).cloned())
            .collect()
    }

    fn seed_metrics(&self, worker: usize, counters: Snapshot) {
        let mut peers = self.lock();
        if worker < peers.metrics.len() {
            peers.metrics[worker].seed(counters);
        }
    }

    fn metrics_ready(&self) -> bool {
        if self.started.elapsed() >= METRICS_WAIT {
            return true;
        }
        let peers = self.lock();
        (0..self.workers).all(|w| w == self.me || peers.reported[w])
    }
}
