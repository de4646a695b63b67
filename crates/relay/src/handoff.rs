//! Handing a connection to another loop before its upgrade, so that a room's members live
//! where the room does.
//!
//! Between workers, a room of ten whose members the kernel spread over ten workers costs an
//! entry in ten loops' room tables, ten holder sets and a bus message per member for every
//! message; the same room on one loop costs one entry and no bus at all. The kernel picks a
//! worker (SO_REUSEPORT) before anything is known of a connection, so a client that knows its
//! room says so in its URL (`?affinity=ROOM`, docs/protocol.md), and the loop that accepted it
//! hands it to the room's home (`Handler::place`, answered by the bus) once the request is
//! whole.
//!
//! Each loop owns one unix datagram socket in the bus directory
//! (`worker-W-loop-L.handoff.sock`, mode 0600). Handing over is one datagram to the receiving
//! loop's socket: the request bytes read so far, with the connection's socket attached
//! (SCM_RIGHTS). The receiver serves it as if it had accepted it (parses the same bytes, checks
//! the client's address and token, upgrades), and never moves it again. The giver forgets it
//! without a byte or a shutdown: the socket lives on in the receiver.
//!
//! Why before the upgrade: a connection has no id, no rooms and no queued output yet, only its
//! bytes. A TLS connection is never handed over (its session cannot follow it): with
//! --tls-cert no loop binds a socket here. Why datagrams: each one arrives whole or not at all,
//! with its descriptor, never split or merged. A unix datagram socket's queue holds
//! net.unix.max_dgram_qlen datagrams (10 by default, per network namespace): when it is full
//! (EAGAIN) the giver tries again every tick for up to `WAIT_MS`, then serves the connection
//! itself, as it does when the home is down (ENOENT, ECONNREFUSED); either is counted
//! (`tunegate_connection_moves_failed_total`) and the rooms work across workers as without
//! affinity.
//!
//! Rooms' homes are picked by a hash, so some loops get more connections than others. A loop
//! that holds its share of the descriptors hides its socket (renames it) until it has room
//! again: givers hear ENOENT at once and keep their connections, rather than hand them to a
//! process that may have no descriptor left to receive them with (the kernel would close the
//! socket in flight: the client would see its upgrade end without an answer).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use super::handler::Place;
use super::sys;
pub use super::sys::Datagram;

/// How long a connection waits for its home's full queue before it is served where it is.
pub const WAIT_MS: u64 = 1000;

/// Loop `place`'s socket in the bus directory.
pub fn socket_path(dir: &Path, place: Place) -> PathBuf {
    dir.join(format!(
        "worker-{}-loop-{}.handoff.sock",
        place.worker, place.loop_index
    ))
}

/// Where a full loop's socket is while it is hidden.
fn hidden_path(dir: &Path, place: Place) -> PathBuf {
    dir.join(format!(
        "worker-{}-loop-{}.full.sock",
        place.worker, place.loop_index
    ))
}

/// One loop's end: where others hand it connections, and what it hands others from.
pub struct Handoff {
    socket: OwnedFd,
    dir: PathBuf,
    here: Place,
    /// Connections this loop may hold before it hides its socket: its share of the
    /// descriptors left after `config::DESCRIPTORS_KEPT`.
    capacity: usize,
    /// Whether the socket is hidden (renamed to `hidden_at`), the loop being full.
    hidden: bool,
    /// This loop's socket's two names: where givers find it, and where it is while hidden.
    shown_at: PathBuf,
    hidden_at: PathBuf,
}

impl Handoff {
    /// Binds loop `here`'s socket in `dir` (the bus directory).
    pub fn bind(dir: &Path, here: Place, capacity: usize) -> io::Result<Handoff> {
        let (shown_at, hidden_at) = (socket_path(dir, here), hidden_path(dir, here));
        let socket = sys::handoff_socket(&shown_at)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", shown_at.display())))?;
        let _ = std::fs::remove_file(&hidden_at); // a previous life's, full
        Ok(Handoff {
            socket,
            dir: dir.to_path_buf(),
            here,
            capacity,
            hidden: false,
            shown_at,
            hidden_at,
        })
    }

    /// Hides the socket for good: the loop is shutting down.
    pub fn close_door(&mut self) -> io::Result<()> {
        self.capacity = 0;
        self.track_fill(0).map(|_| ())
    }

    /// The most connections a hidden socket's loop may hold to show it again: 1 % (at least
    /// one) below `capacity`; `None` for a loop that never takes any again (shutting down).
    pub fn shown_again_at(&self) -> Option<usize> {
        self.capacity.checked_sub((self.capacity / 100).max(1))
    }

    /// Hides the socket while the loop holds `capacity` connections (`open`), and shows it
    /// again at `shown_again_at`: `Some(true)` when it was hidden now, `Some(false)` when
    /// shown. A hidden socket's name is gone, so a giver hears ENOENT at once and serves
    /// the connection where it arrived, as when the home is down, instead of handing it to a
    /// loop whose process may have no descriptor left to receive it with. What was already
    /// queued is still taken (from the descriptors kept). Renaming, not closing: the socket
    /// and its queue stay as they are.
    pub fn track_fill(&mut self, open: usize) -> io::Result<Option<bool>> {
        if !self.hidden && open >= self.capacity {
            std::fs::rename(&self.shown_at, &self.hidden_at)?;
            self.hidden = true;
            return Ok(Some(true));
        }
        if self.hidden && self.shown_again_at().is_some_and(|at| open <= at) {
            std::fs::rename(&self.hidden_at, &self.shown_at)?;
            self.hidden = false;
            return Ok(Some(false));
        }
        Ok(None)
    }

    pub fn here(&self) -> Place {
        self.here
    }

    /// What the loop watches for connections handed to it.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Hands `conn`, whose request so far is `bytes`, to loop `to`. On success the receiver
    /// holds the socket; the caller must drop its own descriptor without touching the socket.
    pub fn give(&self, to: Place, conn: BorrowedFd<'_>, bytes: &[u8]) -> Result<(), Errno> {
        sys::send_with_fd(
            self.socket.as_fd(),
            &socket_path(&self.dir, to),
            bytes,
            conn,
        )
    }

    /// The next connection handed to this loop: its request bytes so far (in `buf`) and its
    /// socket; EAGAIN when none is waiting.
    pub fn take(&self, buf: &mut [u8]) -> Result<Datagram, Errno> {
        sys::recv_with_fd(self.socket.as_fd(), buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn bind(dir: &tempfile::TempDir, worker: usize) -> Handoff {
        let here = Place {
            worker,
            loop_index: 0,
        };
        Handoff::bind(dir.path(), here, 100).unwrap()
    }

    /// A connection handed over arrives with its bytes, and its socket is the same one: what
    /// the client writes next, and what the receiver answers, go through it after the giver
    /// dropped its descriptor.
    #[test]
    fn a_connection_and_its_bytes_arrive_whole() {
        let dir = tempfile::tempdir().unwrap();
        let a = bind(&dir, 0);
        let b = bind(&dir, 1);
        let (mut client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        a.give(b.here(), server.as_fd(), b"GET / HTTP/1.1\r\n\r\n")
            .unwrap();
        drop(server);
        let mut buf = [0u8; 64];
        let Datagram::WithFd(n, fd) = b.take(&mut buf).unwrap() else {
            panic!("no descriptor")
        };
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
        let mut moved = std::os::unix::net::UnixStream::from(fd);
        client.write_all(b"more").unwrap();
        let mut got = [0u8; 4];
        moved.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"more");
        moved.write_all(b"answer").unwrap();
        let mut answer = [0u8; 6];
        client.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"answer");
        assert_eq!(b.take(&mut buf).unwrap_err(), Errno::EAGAIN);
    }

    /// Nobody at the home's address: the giver hears it at once and keeps the connection.
    #[test]
    fn a_home_that_is_down_refuses_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = bind(&dir, 0);
        let (_client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        let gone = Place {
            worker: 3,
            loop_index: 0,
        };
        assert_eq!(a.give(gone, server.as_fd(), b"x"), Err(Errno::ENOENT));
        let b = Handoff::bind(dir.path(), gone, 100).unwrap();
        drop(b); // its file stays, nobody reads it
        assert_eq!(a.give(gone, server.as_fd(), b"x"), Err(Errno::ECONNREFUSED));
    }

    /// A datagram without a descriptor (anything else written to the socket) is dropped, and
    /// the next real handover still arrives.
    #[test]
    fn a_datagram_without_a_socket_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let b = bind(&dir, 1);
        let stranger = std::os::unix::net::UnixDatagram::unbound().unwrap();
        stranger
            .send_to(b"GET / HTTP/1.1\r\n\r\n", socket_path(dir.path(), b.here()))
            .unwrap();
        let mut buf = [0u8; 64];
        assert!(matches!(b.take(&mut buf), Ok(Datagram::Other)));
        let a = bind(&dir, 0);
        let (_client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        a.give(b.here(), server.as_fd(), b"ok").unwrap();
        let Datagram::WithFd(n, _fd) = b.take(&mut buf).unwrap() else {
            panic!("no descriptor")
        };
        assert_eq!(&buf[..n], b"ok");
    }

    /// The queue's length is the kernel's (net.unix.max_dgram_qlen): past it the giver gets
    /// EAGAIN, not a block, and the home takes what was queued.
    #[test]
    fn a_full_queue_says_eagain() {
        let dir = tempfile::tempdir().unwrap();
        let a = bind(&dir, 0);
        let b = bind(&dir, 1);
        let (_client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut sent = 0;
        let full = loop {
            match a.give(b.here(), server.as_fd(), b"x") {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 100_000, "never full");
        };
        assert_eq!(full, Errno::EAGAIN);
        let mut buf = [0u8; 8];
        let mut taken = 0;
        while let Ok(Datagram::WithFd(..)) = b.take(&mut buf) {
            taken += 1;
        }
        assert_eq!(taken, sent);
    }
}
