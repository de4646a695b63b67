//! The worker's one bus thread: every link's socket in one epoll set, read as it becomes
//! readable (length-prefixed messages handed to `WorkerBus::on_wire` in order), and written when
//! it drains of whatever senders had to queue (`Link::send` writes directly when it can).
//! Links are made elsewhere (the dialling and accepting threads introduce the peer, then
//! `install` hands the stream over with `adopt`); a link ends here when its stream does.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::sys::epoll::{EpollEvent, EpollFlags};
use rustc_hash::FxHashMap;

use super::link::Outbox;
use super::{MAX_WIRE, WorkerBus};
use crate::sys;

/// The waker's token; links are keyed by their generation, which starts at 1.
const WAKE: u64 = 0;

/// A link's stream, handed to the bus thread by `install`.
pub(super) struct Adopted {
    pub(super) generation: u64,
    pub(super) peer: usize,
    pub(super) stream: Arc<UnixStream>,
    pub(super) out: Arc<Outbox>,
}

pub(super) struct BusIo {
    poller: sys::Poller,
    pub(super) waker: Arc<sys::Waker>,
    adopted: Mutex<Vec<Adopted>>,
}

/// What the bus thread keeps per live link: the stream, its queue, and the start of a message
/// that has not fully arrived.
struct Entry {
    peer: usize,
    stream: Arc<UnixStream>,
    out: Arc<Outbox>,
    input: Vec<u8>,
}

impl BusIo {
    pub(super) fn new() -> std::io::Result<BusIo> {
        let poller = sys::Poller::new()?;
        let waker = Arc::new(sys::Waker::new()?);
        poller.add(waker.fd(), WAKE, EpollFlags::EPOLLIN | EpollFlags::EPOLLET)?;
        Ok(BusIo {
            poller,
            waker,
            adopted: Mutex::default(),
        })
    }

    /// Hands a new link's stream (non-blocking) to the bus thread.
    pub(super) fn adopt(&self, link: Adopted) {
        self.adopted.lock().expect("adopted lock").push(link);
        self.waker.wake();
    }

    /// The bus thread's loop; it runs as long as the process.
    pub(super) fn run(&self, bus: &WorkerBus) {
        let mut links: FxHashMap<u64, Entry> = FxHashMap::default();
        let mut events = vec![EpollEvent::empty(); 256];
        let mut buf = vec![0u8; 64 << 10];
        let mut to_read = Vec::new();
        loop {
            let n = match self.poller.wait(&mut events, 1000) {
                Ok(n) => n,
                Err(e) => {
                    log!("bus: epoll_wait failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            for ev in &events[..n] {
                let token = ev.data();
                if token == WAKE {
                    self.waker.reset();
                    let adopted = std::mem::take(&mut *self.adopted.lock().expect("adopted lock"));
                    for a in adopted {
                        let interest = sys::conn_interest();
                        if let Err(e) = self.poller.add(a.stream.as_fd(), a.generation, interest) {
                            log!("bus: cannot watch the link to worker {}: {e}", a.peer);
                            let _ = a.stream.shutdown(std::net::Shutdown::Both);
                            bus.link_ended(a.peer, a.generation);
                            continue;
                        }
                        // Whatever came before it was watched is read now.
                        to_read.push(a.generation);
                        links.insert(
                            a.generation,
                            Entry {
                                peer: a.peer,
                                stream: a.stream,
                                out: a.out,
                                input: Vec::new(),
                            },
                        );
                    }
                    // A sender queued something: write every link's queue that the socket takes.
                    for e in links.values() {
                        e.out.flush(&e.stream);
                    }
                    continue;
                }
                let flags = ev.events();
                if let Some(e) = links.get(&token)
                    && flags.contains(EpollFlags::EPOLLOUT)
                {
                    e.out.flush(&e.stream);
                }
                if flags.intersects(
                    EpollFlags::EPOLLIN
                        | EpollFlags::EPOLLRDHUP
                        | EpollFlags::EPOLLHUP
                        | EpollFlags::EPOLLERR,
                ) {
                    to_read.push(token);
                }
            }
            for generation in to_read.drain(..) {
                let Some(e) = links.get_mut(&generation) else {
                    continue;
                };
                if !read_link(bus, generation, e, &mut buf) {
                    let e = links.remove(&generation).expect("present");
                    let _ = self.poller.delete(e.stream.as_fd());
                    let _ = e.stream.shutdown(std::net::Shutdown::Both);
                    bus.link_ended(e.peer, generation);
                }
            }
        }
    }
}

/// Reads everything the link's socket holds (edge-triggered: until EAGAIN) and hands every
/// whole message on; false when the link is over (its end, an error, garbage, a second hello).
///
/// Messages are parsed where they were read, in the bus thread's one buffer; a link keeps only
/// the start of a message cut off at the end of a read, and nothing once it is whole. (A buffer
/// per link kept at its high-water mark held up to 64 KiB for each of 50 links after the burst
/// of joins a load brings: more than the rooms themselves cost at 51 workers.)
fn read_link(bus: &WorkerBus, generation: u64, e: &mut Entry, buf: &mut [u8]) -> bool {
    loop {
        match sys::read(e.stream.as_fd(), buf) {
            Ok(0) => return false,
            Ok(n) => {
                let taken = if e.input.is_empty() {
                    take_messages(bus, generation, e.peer, &buf[..n]).map(|used| {
                        e.input.extend_from_slice(&buf[used..n]);
                    })
                } else {
                    e.input.extend_from_slice(&buf[..n]);
                    take_messages(bus, generation, e.peer, &e.input).map(|used| {
                        e.input.drain(..used);
                    })
                };
                if taken.is_none() {
                    return false;
                }
                if e.input.is_empty() {
                    e.input = Vec::new();
                }
            }
            Err(Errno::EAGAIN) => return true,
            Err(_) => return false,
        }
    }
}

/// Hands on every whole `[length: u32 LE][MessagePack]` message at the start of `input`; how
/// many bytes they took, or `None` when the link is over (garbage, a second hello).
fn take_messages(bus: &WorkerBus, generation: u64, peer: usize, input: &[u8]) -> Option<usize> {
    let mut used = 0;
    while input.len() - used >= 4 {
        let len = u32::from_le_bytes(input[used..used + 4].try_into().expect("4 bytes")) as usize;
        if len > MAX_WIRE {
            return None;
        }
        if input.len() - used - 4 < len {
            break;
        }
        let body = &input[used + 4..used + 4 + len];
        let wire = rmp_serde::from_slice(body).ok()?;
        used += 4 + len;
        if !bus.on_wire(peer, generation, wire) {
            return None;
        }
    }
    Some(used)
}
