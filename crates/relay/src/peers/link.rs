//! One link to a peer worker: a unix stream, and what waits to be written to it. A sender with
//! nothing ahead of it writes straight to the socket (no thread hop, no wake-up: the common
//! case); only what the socket does not take at once is queued for the link's writer thread.

use std::collections::VecDeque;
use std::io::Write;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};

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
    pub(super) stream: UnixStream,
}

/// What waits to be written to one peer, shared by the senders and the link's writer thread.
/// A sender with nothing ahead of it writes straight to the socket (no thread hop, no wake-up:
/// the common case); only what the socket does not take at once is queued for the writer.
#[derive(Default)]
pub(super) struct Outbox {
    state: Mutex<Pending>,
    ready: Condvar,
}

#[derive(Default)]
struct Pending {
    queue: VecDeque<Arc<Vec<u8>>>,
    /// Bytes of the front item already written.
    offset: usize,
    bytes: usize,
    /// The writer thread is writing what it took, outside the lock: later sends must queue.
    writing: bool,
    closed: bool,
}

impl Link {
    pub(super) fn send(&self, bytes: Arc<Vec<u8>>) {
        let mut p = self.out.state.lock().expect("outbox lock");
        if p.closed {
            return;
        }
        let mut offset = 0;
        if p.queue.is_empty() && !p.writing {
            match sys::send_nowait(self.stream.as_fd(), &bytes) {
                Ok(n) if n == bytes.len() => return,
                Ok(n) => offset = n,
                Err(nix::errno::Errno::EAGAIN) => {}
                Err(_) => {
                    // The peer is gone; the reader sees it too and retires the link.
                    p.closed = true;
                    return;
                }
            }
        }
        if p.bytes + bytes.len() > MAX_QUEUED {
            // The peer stopped reading; the reader sees the shutdown and retires the link.
            p.closed = true;
            let _ = self.stream.shutdown(Shutdown::Both);
            self.out.ready.notify_one();
            return;
        }
        if p.queue.is_empty() {
            p.offset = offset;
        }
        p.bytes += bytes.len();
        p.queue.push_back(bytes);
        drop(p);
        self.out.ready.notify_one();
    }
}

impl Drop for Link {
    /// A link retired (its peer died, or a newer link replaced it): the writer stops, and the
    /// stream's end wakes the reader.
    fn drop(&mut self) {
        if let Ok(mut p) = self.out.state.lock() {
            p.closed = true;
        }
        self.out.ready.notify_one();
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Writes what the senders could not write at once, everything queued in one write, until
/// the link is retired or the stream breaks.
pub(super) fn write_link(stream: UnixStream, out: &Outbox) {
    let mut batch = Vec::with_capacity(64 << 10);
    loop {
        {
            let mut p = out.state.lock().expect("outbox lock");
            while p.queue.is_empty() && !p.closed {
                p = out.ready.wait(p).expect("outbox lock");
            }
            if p.closed {
                break;
            }
            batch.clear();
            let offset = std::mem::take(&mut p.offset);
            for (i, item) in p.queue.drain(..).enumerate() {
                batch.extend_from_slice(if i == 0 { &item[offset..] } else { &item[..] });
            }
            p.bytes = 0;
            p.writing = true;
        }
        let written = (&stream).write_all(&batch);
        let mut p = out.state.lock().expect("outbox lock");
        p.writing = false;
        if written.is_err() {
            p.closed = true;
            break;
        }
        if batch.capacity() > 1 << 20 {
            batch = Vec::with_capacity(64 << 10);
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}
