//! One link to a peer worker: a unix stream, and what waits to be written to it. A sender with
//! nothing ahead of it writes straight to the socket (no thread hop, no wake-up: the common
//! case); only what the socket does not take at once is queued, and the worker's bus thread
//! (`io.rs`) writes it when the socket drains. No thread per link: at 51 workers, a reader and a
//! writer thread for each of 50 links made 6,579 threads.

use std::collections::VecDeque;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use crate::sys;

/// Bytes queued for one peer beyond this mean it has stopped reading: the link is cut (its
/// members stop counting) rather than letting this process's memory grow without bound.
const MAX_QUEUED: usize = 256 << 20;

/// The live stream to one peer.
pub(super) struct Link {
    /// Which link this is (a peer that restarts gets a new one).
    pub(super) generation: u64,
    /// The peer process (`id.rs`): the ids this link leads to.
    pub(super) process: crate::id::ProcessId,
    pub(super) out: Arc<Outbox>,
    pub(super) stream: Arc<UnixStream>,
}

/// What waits to be written to one peer, shared by the senders and the bus thread.
pub(super) struct Outbox {
    state: Mutex<Pending>,
    /// Wakes the bus thread when something is queued (it also writes on EPOLLOUT).
    waker: Arc<sys::Waker>,
}

#[derive(Default)]
struct Pending {
    queue: VecDeque<Arc<Vec<u8>>>,
    /// Bytes of the front item already written.
    offset: usize,
    bytes: usize,
    closed: bool,
}

impl Outbox {
    pub(super) fn new(waker: Arc<sys::Waker>) -> Outbox {
        Outbox {
            state: Mutex::default(),
            waker,
        }
    }

    /// Writes what is queued until the socket is full or the queue empty (the bus thread, when
    /// woken or when the socket drains). Under the lock, so nothing a sender writes directly can
    /// overtake it.
    pub(super) fn flush(&self, stream: &UnixStream) {
        let mut p = self.state.lock().expect("outbox lock");
        while let Some(front) = p.queue.front().cloned() {
            match sys::send_nowait(stream.as_fd(), &front[p.offset..]) {
                Ok(n) if p.offset + n == front.len() => {
                    p.queue.pop_front();
                    p.offset = 0;
                    p.bytes -= front.len();
                }
                Ok(n) => p.offset += n,
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(_) => {
                    // The peer is gone; the bus thread reads the end and retires the link.
                    p.closed = true;
                    p.queue.clear();
                    p.bytes = 0;
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
        if p.queue.capacity() > 1024 {
            p.queue.shrink_to(64);
        }
    }
}

impl Link {
    pub(super) fn send(&self, bytes: Arc<Vec<u8>>) {
        let mut p = self.out.state.lock().expect("outbox lock");
        if p.closed {
            return;
        }
        let mut offset = 0;
        if p.queue.is_empty() {
            match sys::send_nowait(self.stream.as_fd(), &bytes) {
                Ok(n) if n == bytes.len() => return,
                Ok(n) => offset = n,
                Err(nix::errno::Errno::EAGAIN) => {}
                Err(_) => {
                    // The peer is gone; the bus thread reads the end and retires the link.
                    p.closed = true;
                    return;
                }
            }
        }
        if p.bytes + bytes.len() > MAX_QUEUED {
            // The peer stopped reading; the bus thread reads the shutdown and retires the link.
            p.closed = true;
            p.queue.clear();
            p.bytes = 0;
            let _ = self.stream.shutdown(Shutdown::Both);
            return;
        }
        let first = p.queue.is_empty();
        if first {
            p.offset = offset;
        }
        p.bytes += bytes.len();
        p.queue.push_back(bytes);
        drop(p);
        if first {
            self.out.waker.wake();
        }
    }
}

impl Drop for Link {
    /// A link retired (its peer died, or a newer link replaced it): nothing more is written,
    /// and the stream's end tells the bus thread to let go of it.
    fn drop(&mut self) {
        if let Ok(mut p) = self.out.state.lock() {
            p.closed = true;
            p.queue.clear();
        }
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}
