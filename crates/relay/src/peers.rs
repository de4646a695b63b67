//! The bus between worker processes on one host: `WorkerBus` implements `Bus` on top of the
//! in-process `LocalBus`, adding one unix-domain-socket link to every other worker.
//!
//! Each worker listens on `DIR/worker-N.sock`; the higher-numbered worker of each pair dials
//! the lower one, so every pair shares exactly one stream (one FIFO per direction: per-publisher
//! order holds, and nothing is delivered twice). Both introduce themselves with a `Hello` that
//! carries their node and incarnation (`id.rs`): a direct message goes to the link whose process
//! its target id names, so an id of a dead process, which no link has, reaches nobody; a peer
//! claiming our own process is refused.
//!
//! Rooms have a home: one worker, chosen by a fixed hash of the name (`home_of`), keeps the
//! room's member count per worker; no other worker keeps counts. A worker tells a room's home
//! its new count at every join and leave (`Count`), and asks the home for the room's total
//! (`Ask`, answered with `Members`). Whenever the set of workers holding members changes, the
//! home tells each of them the new set (`Holders`); a worker keeps it only while it holds
//! members. A room message goes from its publisher's worker straight to the other holders when
//! that worker holds members (interest routing: in "Optimizing Socket.IO for 100k Concurrent
//! Users" it cut internal traffic by 94 %), or else to the home, which passes it on (`forward`).
//! So a worker's memory for rooms grows with the rooms it holds members of and the rooms homed
//! on it, never with workers x rooms (which at 51 workers and 20,000 rooms cost 2,550 bytes per
//! connection), and a join costs one message to the home, not one to every worker.
//!
//! A link is the unit of truth about a peer: counts learned on a link are valid exactly as long
//! as that link lives. When it ends (the peer died, or stalled past `MAX_QUEUED`), the peer's
//! counts drop to zero at once; when the peer comes back a new link replaces the old one, and
//! anything still arriving on the old one can no longer change a count. On a new link each side
//! sends the counts of its rooms the other is home to. Messages for a peer with no link are
//! dropped: it holds no members then.
//!
//! Nothing here knows about client sockets, frames or rooms' members: the event loop talks to
//! `Bus`, and a Redis (SSUBSCRIBE/SPUBLISH) bus would replace this file alone.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustc_hash::FxHashMap;

use super::bus::{Ask, Bus, Item, LocalBus};
use link::{Link, Outbox};
use table::{Peers, home_loop_of, home_of, worker_no};
use wire::{MAX_WIRE, PROTOCOL, Wire, encode, read_wire, reply_op};

mod io;
mod link;
mod table;
mod wire;
use super::handler::Place;
use super::id::{ConnId, ProcessId};
use super::metrics::Snapshot;
use super::protocol::{Encoding, Outgoing};

/// How often a worker retries dialling a peer that is down.
const REDIAL: Duration = Duration::from_millis(50);

pub struct WorkerBus {
    local: Arc<LocalBus>,
    me: usize,
    process: ProcessId,
    /// The last reason logged for not linking, per peer (`workers` for unknown dialers).
    refusals: Mutex<FxHashMap<usize, String>>,
    workers: usize,
    peers: Mutex<Peers>,
    /// Signalled whenever a link comes up or goes down: the dialling thread sleeps on it while
    /// every link is up (1,275 threads polling every 50 ms at 51 workers took half a core
    /// idle), and a starting worker waits on it for its links (`wait_for_links`).
    links_changed: std::sync::Condvar,
    /// The bus thread's epoll set and wake-up (`peers/io.rs`).
    io: io::BusIo,
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
            peers: Mutex::new(Peers::new(workers)),
            links_changed: std::sync::Condvar::new(),
            io: io::BusIo::new()?,
            routed: AtomicU64::new(0),
            broadcast_equivalent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            started: std::time::Instant::now(),
        });
        let b = bus.clone();
        std::thread::Builder::new()
            .name("tunegate-bus".into())
            .spawn(move || b.io.run(&b))?;
        if me > 0 {
            let b = bus.clone();
            let dir = dir.to_path_buf();
            std::thread::Builder::new()
                .name("tunegate-bus-dial".into())
                .spawn(move || b.dial(&dir))?;
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

    /// Keeps a link to every lower-numbered worker up: whenever one has none, connect,
    /// introduce ourselves, and learn its process from its answer; while all are up, sleep
    /// until one goes down. One thread for all of them.
    fn dial(self: &Arc<Self>, dir: &Path) {
        loop {
            let missing: Vec<usize> = {
                let mut peers = self.lock();
                while peers.links[..self.me].iter().all(Option::is_some) {
                    peers = self.links_changed.wait(peers).expect("peers lock");
                }
                (0..self.me).filter(|&p| peers.links[p].is_none()).collect()
            };
            for peer in missing {
                if let Ok(mut stream) = UnixStream::connect(socket_path(dir, peer))
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
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let stream = Arc::new(stream);
        let out = Arc::new(Outbox::new(self.io.waker.clone()));
        let generation = {
            let mut peers = self.lock();
            peers.forget(peer, self.me);
            peers.generations += 1;
            let link = Link {
                generation: peers.generations,
                process,
                out: out.clone(),
                stream: stream.clone(),
            };
            // Under the lock: no count update can slip in ahead of the table. Only the rooms
            // the peer is home to: it keeps their counts.
            for (room, count) in self.local.snapshot() {
                if home_of(&room, self.workers) == peer {
                    link.send(encode(&Wire::Count {
                        room: room.to_string(),
                        count,
                    }));
                }
            }
            // And the snapshots this worker keeps of itself, so the peer's history of it is
            // the same as its own (what /metrics sums must be the same everywhere).
            for snapshot in peers.metrics[self.me].iter() {
                link.send(encode(&Wire::Metrics(Box::new(snapshot.clone()))));
            }
            peers.links[peer] = Some(link);
            peers.generations
        };
        self.links_changed.notify_all();
        self.refusals.lock().expect("refusals lock").remove(&peer);
        log!("bus: link to worker {peer} (process {process}) up");
        self.io.adopt(io::Adopted {
            generation,
            peer,
            stream,
            out,
        });
    }

    /// One message `peer` sent on link `generation`, in order (the bus thread, `io.rs`); false
    /// ends the link (a second hello).
    fn on_wire(&self, peer: usize, generation: u64, msg: Wire) -> bool {
        match msg {
            Wire::Hello { .. } => return false,
            Wire::Count { room, count } => {
                let mut peers = self.lock();
                // A replaced link's counts are void; a room homed elsewhere is not ours to count.
                if !peers.is_current(peer, generation) || home_of(&room, self.workers) != self.me {
                    return true;
                }
                let room = self.name(&room);
                if peers.set_count(&room, peer, count) {
                    peers.tell_holders(&room, self.me);
                }
            }
            Wire::Holders { room, workers } => {
                let mut peers = self.lock();
                if !peers.is_current(peer, generation) {
                    return true;
                }
                // Kept only while this worker holds members (read under the peers lock,
                // as `announce` changes it).
                if let Some(name) = self.local.shared_name(&room) {
                    let workers = workers.into_iter();
                    let set = workers.filter_map(|w| worker_no(w, self.workers)).collect();
                    peers.holders.insert(name, set);
                } else {
                    peers.holders.remove(room.as_str());
                }
            }
            Wire::Ask {
                to,
                op,
                room,
                reference,
            } => {
                let peers = self.lock();
                if let Some(link) = peers.links[peer]
                    .as_ref()
                    .filter(|l| l.generation == generation)
                {
                    let members = peers.homed_members(&room);
                    link.send(encode(&Wire::Members {
                        to,
                        op,
                        room,
                        reference,
                        members,
                    }));
                }
            }
            Wire::Members {
                to,
                op,
                room,
                reference,
                members,
            } => {
                if let (Some(target), Some(op)) = (ConnId::decode(to), reply_op(&op)) {
                    let ask = Ask {
                        to,
                        op,
                        room: Arc::from(room.as_str()),
                        reference,
                    };
                    let _ = self.local.route(target, Item::Members { ask, members });
                }
            }
            Wire::Room {
                room,
                skip,
                forward,
                msg,
            } => {
                self.received.fetch_add(1, Ordering::Relaxed);
                let room: Arc<str> = Arc::from(room.as_str());
                if forward && home_of(&room, self.workers) == self.me {
                    let peers = self.lock();
                    let targets = peers.homed.get(&room).map_or(&[][..], |p| &p[..]);
                    self.send_room(
                        &peers,
                        &room,
                        skip,
                        &msg,
                        targets.iter().map(|&(w, _)| w.into()),
                        peer,
                    );
                }
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
        true
    }

    /// Link `generation` to `peer` ended; unless a newer link replaced it meanwhile, the peer's
    /// members stop counting, and the dialling thread wakes.
    fn link_ended(&self, peer: usize, generation: u64) {
        let mut peers = self.lock();
        if peers.is_current(peer, generation) {
            peers.forget(peer, self.me);
            drop(peers);
            self.links_changed.notify_all();
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

    /// The local bus's name for `room` while this worker holds members, or a new one: a room
    /// in two tables here is one allocation.
    fn name(&self, room: &str) -> Arc<str> {
        self.local
            .shared_name(room)
            .unwrap_or_else(|| Arc::from(room))
    }

    /// Tells the home of `room` how many members this worker holds now (at home: counts it).
    /// Reading the count and queueing it happen under the peers lock, so the last count queued
    /// is the latest.
    fn announce(&self, room: &Arc<str>) {
        let mut peers = self.lock();
        let count = self.local.local_members(room);
        let home = home_of(room, self.workers);
        if home == self.me {
            if peers.set_count(room, self.me, count) {
                peers.tell_holders(room, self.me);
            }
            return;
        }
        if count == 0 {
            peers.holders.remove(&**room);
        }
        if let Some(link) = &peers.links[home] {
            link.send(encode(&Wire::Count {
                room: room.to_string(),
                count,
            }));
        }
    }

    /// Sends a room message to each of `workers` but this one and `except`; counts them.
    fn send_room(
        &self,
        peers: &Peers,
        room: &str,
        skip: Option<u64>,
        msg: &[u8],
        workers: impl Iterator<Item = u32>,
        except: usize,
    ) {
        let mut bytes = None;
        for w in workers.map(|w| w as usize) {
            if w != self.me
                && w != except
                && let Some(link) = &peers.links[w]
            {
                let bytes = bytes.get_or_insert_with(|| {
                    encode(&Wire::Room {
                        room: room.to_string(),
                        skip,
                        forward: false,
                        msg: msg.to_vec(),
                    })
                });
                self.routed.fetch_add(1, Ordering::Relaxed);
                link.send(bytes.clone());
            }
        }
    }
}

impl Bus for WorkerBus {
    fn place(&self, room: &str) -> Option<Place> {
        Some(Place {
            worker: home_of(room, self.workers),
            loop_index: home_loop_of(room, self.workers, self.local.loops()),
        })
    }

    fn joined(&self, room: &Arc<str>, loop_index: usize) {
        self.local.joined(room, loop_index);
        self.announce(room);
    }

    fn left(&self, room: &Arc<str>, loop_index: usize) {
        self.local.left(room, loop_index);
        self.announce(room);
    }

    /// At the room's home, now; elsewhere the home answers (`Ask`, then `Item::Members`), after
    /// every count this worker sent it before (one FIFO link). With the home's link down, only
    /// this worker's members.
    fn members(&self, ask: Ask) -> Option<u64> {
        let home = home_of(&ask.room, self.workers);
        let peers = self.lock();
        if home == self.me {
            return Some(peers.homed_members(&ask.room));
        }
        let Some(link) = &peers.links[home] else {
            return Some(self.local.local_members(&ask.room));
        };
        link.send(encode(&Wire::Ask {
            to: ask.to,
            op: ask.op.to_string(),
            room: ask.room.to_string(),
            reference: ask.reference,
        }));
        None
    }

    /// The rooms homed here that have members (on any worker): summed over the workers, the
    /// server's rooms, each counted once.
    fn rooms(&self) -> u64 {
        self.lock().homed.len() as u64
    }

    fn publish(&self, from_loop: usize, room: &Arc<str>, msg: &Arc<Outgoing>, skip: Option<u64>) {
        self.local.publish(from_loop, room, msg, skip);
        self.broadcast_equivalent
            .fetch_add(self.workers as u64 - 1, Ordering::Relaxed);
        let home = home_of(room, self.workers);
        let peers = self.lock();
        let payload = || msg.payload(Encoding::MsgPack);
        if home == self.me {
            let Some(per) = peers.homed.get(&**room) else {
                return;
            };
            self.send_room(
                &peers,
                room,
                skip,
                payload(),
                per.iter().map(|&(w, _)| w.into()),
                self.me,
            );
        } else if let Some(set) = peers.holders.get(&**room) {
            let set = set.iter().map(|&w| w.into());
            self.send_room(&peers, room, skip, payload(), set, self.me);
        } else if let Some(link) = &peers.links[home] {
            // No member here, so the holders are unknown: the home passes it on.
            self.routed.fetch_add(1, Ordering::Relaxed);
            link.send(encode(&Wire::Room {
                room: room.to_string(),
                skip,
                forward: true,
                msg: payload().to_vec(),
            }));
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

    fn wait_for_links(&self, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        let mut peers = self.lock();
        while (0..self.workers).any(|w| w != self.me && peers.links[w].is_none()) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            peers = self
                .links_changed
                .wait_timeout(peers, left)
                .expect("peers lock")
                .0;
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
