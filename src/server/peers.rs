//! The bus between worker processes on one host: `WorkerBus` implements `Bus` on top of the
//! in-process `LocalBus`, adding unix-domain-socket links to the other workers.
//!
//! Each worker listens on `DIR/worker-N.sock` and keeps one outgoing stream to every other
//! worker (so each pair has one FIFO per direction: per-publisher order holds). Workers tell
//! each other how many members they hold per room (`Count`, absolute and versioned, so a
//! snapshot after a reconnect can never be overtaken by an older update); a room message goes
//! only to workers holding at least one member (interest routing, the article's 94 %). A worker
//! that dies drops out of every count the moment its stream ends; when it comes back it connects
//! again, and each peer resends its whole table.
//!
//! Nothing here knows about sockets of clients, frames or rooms' members: the event loop talks
//! to `Bus`, and a Redis (SSUBSCRIBE/SPUBLISH) bus would replace this file alone.

use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use super::bus::{Bus, Item, LocalBus};
use super::event_loop::EventLoop;
use super::protocol::{Encoding, Outgoing};

/// Largest bus frame accepted (a room message carries at most one client message).
const MAX_WIRE: usize = 64 << 20;

#[derive(Serialize, Deserialize)]
enum Wire {
    Hello {
        worker: u32,
    },
    /// `worker` now holds `count` members of `room`; `version` orders updates.
    Count {
        room: String,
        count: u64,
        version: u64,
    },
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
}

#[derive(Default)]
struct Remote {
    /// Per worker: (members, version of the update that said so).
    counts: Vec<(u64, u64)>,
}

pub struct WorkerBus {
    local: Arc<LocalBus>,
    me: usize,
    workers: usize,
    outboxes: Vec<Option<Sender<Arc<Vec<u8>>>>>,
    remote: Mutex<FxHashMap<Arc<str>, Remote>>,
    version: AtomicU64,
    /// Room messages sent to other workers, and how many a send-to-all bus would have sent.
    routed: AtomicU64,
    broadcast_equivalent: AtomicU64,
    /// Room messages received from other workers.
    received: AtomicU64,
}

pub fn socket_path(dir: &Path, worker: usize) -> PathBuf {
    dir.join(format!("worker-{worker}.sock"))
}

impl WorkerBus {
    /// Binds this worker's socket and starts the link threads.
    pub fn start(
        local: Arc<LocalBus>,
        dir: &Path,
        me: usize,
        workers: usize,
    ) -> std::io::Result<Arc<WorkerBus>> {
        std::fs::create_dir_all(dir)?;
        let path = socket_path(dir, me);
        let _ = std::fs::remove_file(&path); // a previous life of this worker
        let listener = UnixListener::bind(&path)?;
        let mut outboxes = Vec::new();
        let mut receivers = Vec::new();
        for w in 0..workers {
            if w == me {
                outboxes.push(None);
                receivers.push(None);
            } else {
                let (tx, rx) = channel();
                outboxes.push(Some(tx));
                receivers.push(Some(rx));
            }
        }
        let bus = Arc::new(WorkerBus {
            local,
            me,
            workers,
            outboxes,
            remote: Mutex::new(FxHashMap::default()),
            version: AtomicU64::new(1),
            routed: AtomicU64::new(0),
            broadcast_equivalent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        });
        for (w, rx) in receivers.into_iter().enumerate() {
            if let Some(rx) = rx {
                let b = bus.clone();
                let dir = dir.to_path_buf();
                std::thread::Builder::new()
                    .name(format!("tunegate-bus-to-{w}"))
                    .spawn(move || b.writer(w, &dir, rx))?;
            }
        }
        let b = bus.clone();
        std::thread::Builder::new()
            .name("tunegate-bus-accept".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let b = b.clone();
                    let _ = std::thread::Builder::new()
                        .name("tunegate-bus-from".into())
                        .spawn(move || b.reader(stream));
                }
            })?;
        Ok(bus)
    }

    fn encode(w: &Wire) -> Arc<Vec<u8>> {
        let body = rmp_serde::to_vec(w).expect("bus messages serialise");
        let mut out = Vec::with_capacity(body.len() + 4);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        Arc::new(out)
    }

    fn to(&self, worker: usize, bytes: Arc<Vec<u8>>) {
        if let Some(Some(tx)) = self.outboxes.get(worker) {
            let _ = tx.send(bytes);
        }
    }

    fn to_all(&self, bytes: Arc<Vec<u8>>) {
        for w in 0..self.workers {
            self.to(w, bytes.clone());
        }
    }

    /// Tells every peer how many members of `room` this worker holds now.
    fn announce(&self, room: &str) {
        let count = self.local.members(room);
        let version = self.version.fetch_add(1, Ordering::Relaxed);
        self.to_all(Self::encode(&Wire::Count {
            room: room.to_string(),
            count,
            version,
        }));
    }

    /// One outgoing link: connect (retrying while the peer is down), send our whole table,
    /// then stream queued messages. While the peer is down its messages are dropped: it holds
    /// no members then, and gets the whole table when it is back.
    fn writer(&self, peer: usize, dir: &Path, rx: Receiver<Arc<Vec<u8>>>) {
        let path = socket_path(dir, peer);
        loop {
            let stream = match UnixStream::connect(&path) {
                Ok(s) => s,
                Err(_) => {
                    // Drain what piled up while the peer is away, then retry.
                    while rx.try_recv().is_ok() {}
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let mut out = BufWriter::new(stream);
            let mut hello = vec![Self::encode(&Wire::Hello {
                worker: self.me as u32,
            })];
            for (room, count) in self.local.snapshot() {
                let version = self.version.fetch_add(1, Ordering::Relaxed);
                hello.push(Self::encode(&Wire::Count {
                    room: room.to_string(),
                    count,
                    version,
                }));
            }
            if hello.iter().any(|m| out.write_all(m).is_err()) || out.flush().is_err() {
                continue;
            }
            loop {
                let Ok(msg) = rx.recv() else { return };
                if out.write_all(&msg).is_err() {
                    break;
                }
                // Batch whatever else is queued into the same flush.
                while let Ok(more) = rx.try_recv() {
                    if out.write_all(&more).is_err() {
                        break;
                    }
                }
                if out.flush().is_err() {
                    break;
                }
            }
        }
    }

    /// One incoming link, until the peer goes away; then its members no longer count.
    fn reader(&self, stream: UnixStream) {
        let mut input = BufReader::new(stream);
        let mut peer = None;
        let mut len = [0u8; 4];
        while input.read_exact(&mut len).is_ok() {
            let n = u32::from_le_bytes(len) as usize;
            if n > MAX_WIRE {
                break;
            }
            let mut body = vec![0u8; n];
            if input.read_exact(&mut body).is_err() {
                break;
            }
            let Ok(msg) = rmp_serde::from_slice::<Wire>(&body) else {
                break;
            };
            match msg {
                Wire::Hello { worker } => {
                    let w = worker as usize;
                    if w >= self.workers || w == self.me {
                        break;
                    }
                    peer = Some(w);
                }
                Wire::Count {
                    room,
                    count,
                    version,
                } => {
                    let Some(w) = peer else { break };
                    let mut remote = self.remote.lock().expect("remote lock");
                    let entry = remote.entry(Arc::from(room.as_str())).or_default();
                    entry.counts.resize(self.workers, (0, 0));
                    if version >= entry.counts[w].1 {
                        entry.counts[w] = (count, version);
                    }
                    if entry.counts.iter().all(|c| c.0 == 0) {
                        remote.remove(room.as_str());
                    }
                }
                Wire::Room { room, skip, msg } => {
                    self.received.fetch_add(1, Ordering::Relaxed);
                    let room: Arc<str> = Arc::from(room.as_str());
                    let msg = Outgoing::from_msgpack(msg);
                    self.local.publish(usize::MAX, &room, &msg, skip);
                }
                Wire::Direct {
                    to,
                    from,
                    reference,
                    msg,
                } => {
                    let (_, node, _, _) = EventLoop::split_id(to);
                    self.local.send(
                        node,
                        Item::Direct {
                            to,
                            from,
                            msg: Outgoing::from_msgpack(msg),
                            reference,
                        },
                    );
                }
                Wire::Bounce {
                    to,
                    target,
                    reference,
                } => {
                    let (_, node, _, _) = EventLoop::split_id(to);
                    self.local.send(
                        node,
                        Item::Bounce {
                            to,
                            target,
                            reference,
                        },
                    );
                }
            }
        }
        if let Some(w) = peer {
            let mut remote = self.remote.lock().expect("remote lock");
            remote.retain(|_, e| {
                if let Some(c) = e.counts.get_mut(w) {
                    c.0 = 0;
                }
                e.counts.iter().any(|c| c.0 > 0)
            });
        }
    }

    fn remote_members(&self, room: &str) -> u64 {
        let remote = self.remote.lock().expect("remote lock");
        remote
            .get(room)
            .map_or(0, |e| e.counts.iter().map(|c| c.0).sum())
    }
}

impl Bus for WorkerBus {
    fn joined(&self, room: &Arc<str>, node: usize) -> u64 {
        self.local.joined(room, node);
        self.announce(room);
        self.members(room)
    }

    fn left(&self, room: &Arc<str>, node: usize) -> u64 {
        self.local.left(room, node);
        self.announce(room);
        self.members(room)
    }

    fn members(&self, room: &str) -> u64 {
        self.local.members(room) + self.remote_members(room)
    }

    fn rooms(&self) -> u64 {
        let mut names: Vec<Arc<str>> = self.local.snapshot().into_iter().map(|(r, _)| r).collect();
        let remote = self.remote.lock().expect("remote lock");
        names.extend(remote.keys().cloned());
        names.sort_unstable();
        names.dedup();
        names.len() as u64
    }

    fn publish(&self, from_node: usize, room: &Arc<str>, msg: &Arc<Outgoing>, skip: Option<u64>) {
        self.local.publish(from_node, room, msg, skip);
        let interested: Vec<usize> = {
            let remote = self.remote.lock().expect("remote lock");
            match remote.get(&**room) {
                Some(e) => (0..self.workers)
                    .filter(|&w| w != self.me && e.counts.get(w).is_some_and(|c| c.0 > 0))
                    .collect(),
                None => Vec::new(),
            }
        };
        self.broadcast_equivalent
            .fetch_add(self.workers as u64 - 1, Ordering::Relaxed);
        if interested.is_empty() {
            return;
        }
        self.routed
            .fetch_add(interested.len() as u64, Ordering::Relaxed);
        let bytes = Self::encode(&Wire::Room {
            room: room.to_string(),
            skip,
            msg: msg.payload(Encoding::MsgPack).to_vec(),
        });
        for w in interested {
            self.to(w, bytes.clone());
        }
    }

    fn send(&self, node: usize, item: Item) {
        self.local.send(node, item)
    }

    fn route(&self, worker: u64, node: usize, item: Item) {
        let w = worker as usize;
        if w == self.me {
            return self.local.send(node, item);
        }
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
            _ => return,
        };
        self.to(w, Self::encode(&wire));
    }

    fn workers(&self) -> usize {
        self.workers
    }

    fn nodes(&self) -> usize {
        self.local.nodes()
    }

    fn traffic(&self) -> (u64, u64) {
        (
            self.routed.load(Ordering::Relaxed),
            self.broadcast_equivalent.load(Ordering::Relaxed),
        )
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}
