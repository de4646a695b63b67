//! The OS behind one narrow module: epoll, listening and accepted sockets, reads and writes,
//! eventfd wake-ups and signalfd. Everything the event loop needs from the kernel, and nothing
//! else; all through nix (and rustix for the one call nix cannot make safely: receiving a
//! descriptor, which rustix hands over as an `OwnedFd`), so no unsafe code. Descriptors are
//! `OwnedFd`s: dropping the last one that refers to a socket closes it (and removes it from
//! every epoll set it was in; a socket handed to another loop is still open there, so the loop
//! that gave it away deletes it from its epoll set first).
//!
//! Every descriptor read or written here is a stream socket, so reads and writes are `recv(2)`
//! and `send(2)`/`sendmsg(2)` (MSG_NOSIGNAL: a write to a reset peer returns EPIPE), not
//! `read(2)`/`write(2)`: those go through the VFS and take the file position lock first, 8 % of
//! a broadcast's server time in perf (bench/broadcast.sh).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{
    AddressFamily, Backlog, Shutdown, SockFlag, SockType, SockaddrStorage, setsockopt, sockopt,
};

/// Edge-triggered read and write readiness plus peer hang-up: one registration per socket for
/// its whole life, no epoll_ctl calls when output starts or stops blocking.
pub fn conn_interest() -> EpollFlags {
    EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET
}

/// Edge-triggered: after EMFILE the loop stops accepting instead of spinning on a listener that
/// stays readable; it retries when a descriptor frees or at the next tick.
pub fn listener_interest() -> EpollFlags {
    EpollFlags::EPOLLIN | EpollFlags::EPOLLET
}

pub struct Poller {
    epoll: Epoll,
}

impl Poller {
    pub fn new() -> io::Result<Poller> {
        Ok(Poller {
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
        })
    }

    pub fn add(&self, fd: BorrowedFd<'_>, token: u64, interest: EpollFlags) -> io::Result<()> {
        Ok(self.epoll.add(fd, EpollEvent::new(interest, token))?)
    }

    pub fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        Ok(self.epoll.delete(fd)?)
    }

    /// Waits up to `timeout_ms`; EINTR counts as "no events".
    pub fn wait(&self, events: &mut [EpollEvent], timeout_ms: u16) -> io::Result<usize> {
        match self.epoll.wait(events, EpollTimeout::from(timeout_ms)) {
            Ok(n) => Ok(n),
            Err(Errno::EINTR) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }
}

/// A non-blocking TCP listener with SO_REUSEPORT, so every loop thread (and every worker
/// process) binds its own and the kernel spreads connections between them. `v6_only`: an IPv6
/// listener takes only IPv6 (set when the server also listens on IPv4 on the same port, which
/// a dual-stack `[::]` would otherwise collide with); otherwise the system's default holds
/// (net.ipv6.bindv6only, 0 on Linux: `[::]` takes IPv4 too, as ::ffff:a.b.c.d).
pub fn listen(addr: SocketAddr, v6_only: bool) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = nix::sys::socket::socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    if v6_only && addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    nix::sys::socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    // The accept queue: -1 means "as long as net.core.somaxconn allows" (the kernel clamps
    // any larger request to it). Node asks for 511 and libc's SOMAXCONN is 4096; both ignore a
    // somaxconn raised for 100k connections: the classic trap. The kernel reads somaxconn at
    // listen() time, which is why the daemon tunes the host before starting the server.
    nix::sys::socket::listen(&fd, Backlog::MAXALLOWABLE)?;
    Ok(fd)
}

/// The address a listener is bound to (to learn the port after binding port 0).
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    inet(nix::sys::socket::getsockname(fd.as_raw_fd())?)
}

/// The address of a connection's peer (asked only when the client's address matters: a
/// trusted proxy or a per-address limit is configured).
pub fn peer_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    inet(nix::sys::socket::getpeername(fd.as_raw_fd())?)
}

fn inet(ss: SockaddrStorage) -> io::Result<SocketAddr> {
    if let Some(v4) = ss.as_sockaddr_in() {
        return Ok(SocketAddr::V4((*v4).into()));
    }
    if let Some(v6) = ss.as_sockaddr_in6() {
        return Ok(SocketAddr::V6((*v6).into()));
    }
    Err(io::Error::other("not an inet socket address"))
}

/// One accept4; the caller loops until `WouldBlock`. TCP_NODELAY is set because relay
/// messages are small and latency matters more than coalescing.
pub fn accept(listener: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    let fd = nix::sys::socket::accept4(listener, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC)?;
    let _ = setsockopt(&fd, sockopt::TcpNoDelay, &true);
    Ok(fd)
}

/// A socket as `Read` and `Write`, for rustls (`tls.rs`): no ownership, no buffering.
pub struct FdIo<'a>(pub BorrowedFd<'a>);

impl std::io::Read for FdIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read(self.0, buf).map_err(io::Error::from)
    }
}

impl std::io::Write for FdIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        write(self.0, buf).map_err(io::Error::from)
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> io::Result<usize> {
        writev(self.0, bufs).map_err(io::Error::from)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    use nix::sys::socket::MsgFlags;
    loop {
        match nix::sys::socket::recv(fd.as_raw_fd(), buf, MsgFlags::empty()) {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> Result<usize, Errno> {
    use nix::sys::socket::MsgFlags;
    loop {
        match nix::sys::socket::send(fd.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL) {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// Writes several buffers in one system call (a connection's queued output).
pub fn writev(fd: BorrowedFd<'_>, bufs: &[std::io::IoSlice<'_>]) -> Result<usize, Errno> {
    use nix::sys::socket::MsgFlags;
    loop {
        match nix::sys::socket::sendmsg::<()>(
            fd.as_raw_fd(),
            bufs,
            &[],
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// Writes to a stream socket without blocking, whatever the descriptor's own mode (the bus
/// shares one blocking socket between a writer thread and these direct writes), and without
/// SIGPIPE.
pub fn send_nowait(fd: BorrowedFd<'_>, buf: &[u8]) -> Result<usize, Errno> {
    use nix::sys::socket::MsgFlags;
    loop {
        match nix::sys::socket::send(
            fd.as_raw_fd(),
            buf,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        ) {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// A loop's door for connections handed over by other loops (`handoff.rs`): a non-blocking
/// unix datagram socket bound at `path` (a leftover of an earlier life removed first), which
/// only its owner may write to (mode 0600: whoever can send a descriptor here can make the loop
/// serve it).
pub fn handoff_socket(path: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let socket = std::os::unix::net::UnixDatagram::bind(path)?;
    socket.set_nonblocking(true)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(socket.into())
}

/// Sends `bytes` and a duplicate of `conn` as one datagram from `socket` to the socket bound at
/// `to`, without blocking: EAGAIN when the receiver's queue is full, ECONNREFUSED or ENOENT
/// when nobody is bound there.
pub fn send_with_fd(
    socket: BorrowedFd<'_>,
    to: &std::path::Path,
    bytes: &[u8],
    conn: BorrowedFd<'_>,
) -> Result<(), Errno> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix};
    let addr = SocketAddrUnix::new(to).map_err(|e| Errno::from_raw(e.raw_os_error()))?;
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [conn];
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(Errno::ENOBUFS);
    }
    let iov = [io::IoSlice::new(bytes)];
    loop {
        match rustix::net::sendmsg_addr(
            socket,
            &addr,
            &iov,
            &mut control,
            SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
        ) {
            Ok(_) => return Ok(()),
            Err(e) if e == rustix::io::Errno::INTR => continue,
            Err(e) => return Err(Errno::from_raw(e.raw_os_error())),
        }
    }
}

/// One datagram received by `recv_with_fd`.
#[derive(Debug)]
pub enum Datagram {
    /// Its bytes (in the caller's buffer) and the descriptor that came with it.
    WithFd(usize, OwnedFd),
    /// No descriptor, more than one, or longer than the buffer: dropped (descriptors closed).
    Other,
    /// A descriptor came but the kernel could not install it (MSG_CTRUNC: this process is out
    /// of descriptors) and closed it.
    FdLost,
}

/// Receives one datagram into `buf` without blocking, with the descriptor that came with it
/// (close-on-exec).
pub fn recv_with_fd(socket: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Datagram, Errno> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [io::IoSliceMut::new(buf)];
    let got = loop {
        match rustix::net::recvmsg(
            socket,
            &mut iov,
            &mut control,
            RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(got) => break got,
            Err(e) if e == rustix::io::Errno::INTR => continue,
            Err(e) => return Err(Errno::from_raw(e.raw_os_error())),
        }
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    let cut = got
        .flags
        .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC);
    if got.flags.contains(ReturnFlags::CTRUNC) && fds.is_empty() {
        return Ok(Datagram::FdLost);
    }
    match fds.pop() {
        Some(fd) if fds.is_empty() && !cut => Ok(Datagram::WithFd(got.bytes, fd)),
        _ => Ok(Datagram::Other),
    }
}

/// Half-closes our side after a Close frame has been flushed.
pub fn shutdown_write(fd: BorrowedFd<'_>) {
    let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), Shutdown::Write);
}

/// A descriptor held in reserve so that, when accept fails with EMFILE, the loop can free one,
/// accept the waiting connection and close it at once: the client is told "no" instead of
/// hanging in the accept queue. `/dev/null` is the cheapest descriptor there is.
pub fn reserve_fd() -> io::Result<OwnedFd> {
    Ok(std::fs::File::open("/dev/null")?.into())
}

/// Wakes a loop from another thread.
pub struct Waker(nix::sys::eventfd::EventFd);

impl Waker {
    pub fn new() -> io::Result<Waker> {
        Ok(Waker(nix::sys::eventfd::EventFd::from_flags(
            nix::sys::eventfd::EfdFlags::EFD_NONBLOCK | nix::sys::eventfd::EfdFlags::EFD_CLOEXEC,
        )?))
    }

    pub fn wake(&self) {
        let _ = self.0.write(1);
    }

    /// Clears pending wake-ups (edge-triggered: must be read to re-arm).
    pub fn reset(&self) {
        let _ = self.0.read();
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and the threads it starts), and
/// returns a descriptor that reads them.
pub fn termination_signals() -> io::Result<nix::sys::signalfd::SignalFd> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set.thread_block()?;
    Ok(nix::sys::signalfd::SignalFd::with_flags(
        &set,
        nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
    )?)
}
