//! Facts about other processes: their effective limits (/proc/PID/limits) and the listening
//! sockets they hold, with each socket's accept-queue limit as the kernel enforces it (sock_diag
//! over netlink, what `ss -lt` shows as Send-Q). The daemon uses these to check what its child
//! really got, not what it was asked for: Node listens with backlog 511 whatever somaxconn says.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::Context;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};
use std::os::fd::AsRawFd;

/// RLIMIT_NOFILE (soft, hard) of a process, as /proc/PID/limits reports it.
pub fn nofile_of(pid: i32) -> anyhow::Result<(u64, u64)> {
    let limits = rlimit::ProcLimits::read_process(pid)
        .with_context(|| format!("cannot read /proc/{pid}/limits"))?;
    let l = limits
        .max_open_files
        .with_context(|| format!("/proc/{pid}/limits has no open-files line"))?;
    let v = |x: Option<u64>| x.unwrap_or(u64::MAX);
    Ok((v(l.soft_limit), v(l.hard_limit)))
}

/// Descriptors `pid` holds now. Since Linux 6.2 the size stat() gives /proc/PID/fd is that
/// count, which costs nothing however many there are; older kernels say 0 there, and the
/// directory is counted instead (one entry per descriptor: 20,000 for a busy worker).
pub fn fds_in_use(pid: i32) -> anyhow::Result<usize> {
    let dir = format!("/proc/{pid}/fd");
    let size = std::fs::metadata(&dir)
        .with_context(|| format!("cannot stat {dir}"))?
        .len();
    if size > 0 {
        return Ok(size as usize);
    }
    Ok(std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {dir}"))?
        .count())
}

/// `pid` and all its descendants (via /proc/PID/task/TID/children).
pub fn process_tree(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let children =
                    std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                out.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<i32>().ok()),
                );
            }
        }
        i += 1;
    }
    out
}

/// Socket inodes held by these processes. One readlink per descriptor: costly for a process
/// holding 20,000 connections, so callers that ask often keep what they found.
pub fn socket_inodes(pids: &[i32]) -> HashSet<u64> {
    let mut out = HashSet::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let target: PathBuf = std::fs::read_link(fd.path()).unwrap_or_default();
            let t = target.to_string_lossy();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']'))
                && let Ok(i) = inode.parse()
            {
                out.insert(i);
            }
        }
    }
    out
}

/// A TCP listening socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub port: u16,
    pub ipv6: bool,
    /// The accept-queue limit the kernel enforces: min(backlog asked in listen(), somaxconn).
    pub backlog: u32,
    /// Connections waiting in the accept queue right now.
    pub queued: u32,
    pub inode: u64,
}

/// Every TCP listening socket in this network namespace, IPv4 and IPv6 (one sock_diag dump
/// each: cheap, whatever the connections).
pub fn all_listeners() -> anyhow::Result<Vec<Listener>> {
    let mut all = listening_sockets(libc_af_inet())?;
    all.extend(listening_sockets(libc_af_inet6())?);
    Ok(all)
}

/// The TCP listening sockets held by `pid` or its descendants.
pub fn listeners_of(pid: i32) -> anyhow::Result<Vec<Listener>> {
    let inodes = socket_inodes(&process_tree(pid));
    if inodes.is_empty() {
        return Ok(Vec::new());
    }
    let mut all = listening_sockets(libc_af_inet())?;
    all.extend(listening_sockets(libc_af_inet6())?);
    Ok(all
        .into_iter()
        .filter(|l| inodes.contains(&l.inode))
        .collect())
}

const fn libc_af_inet() -> u8 {
    2
}
const fn libc_af_inet6() -> u8 {
    10
}

/// Every TCP socket in LISTEN state of one address family in this network namespace.
fn listening_sockets(family: u8) -> anyhow::Result<Vec<Listener>> {
    const TCP_LISTEN: u32 = 10;
    Ok(dump(family, 1 << TCP_LISTEN)?
        .into_iter()
        .map(|s| Listener {
            port: s.sport,
            ipv6: family == libc_af_inet6(),
            queued: s.rqueue,
            backlog: s.wqueue,
            inode: s.inode,
        })
        .collect())
}

/// One TCP socket as sock_diag describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Socket {
    pub src: std::net::IpAddr,
    pub sport: u16,
    pub dst: std::net::IpAddr,
    pub dport: u16,
    /// The kernel's TCP state number (1 established, 2 syn-sent, 6 time-wait, 10 listen, ...).
    pub state: u8,
    /// For a listener: connections waiting; otherwise bytes not yet read.
    pub rqueue: u32,
    /// For a listener: the accept queue's limit; otherwise bytes not yet acknowledged.
    pub wqueue: u32,
    pub inode: u64,
}

/// Every TCP socket of both families in this network namespace whose state is not LISTEN:
/// what holds a local port (established, connecting, closing, TIME_WAIT). One dump per family.
pub fn connections() -> anyhow::Result<Vec<Socket>> {
    const ALL_BUT_LISTEN: u32 = 0xfff & !(1 << 10);
    let mut all = dump(libc_af_inet(), ALL_BUT_LISTEN)?;
    all.extend(dump(libc_af_inet6(), ALL_BUT_LISTEN)?);
    Ok(all)
}

/// A sock_diag dump of the TCP sockets of `family` whose state is in `states` (a bit per state).
fn dump(family: u8, states: u32) -> anyhow::Result<Vec<Socket>> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const IPPROTO_TCP: u8 = 6;

    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .context("netlink sock_diag socket")?;
    // nlmsghdr (16 bytes) + inet_diag_req_v2 (56 bytes), native endian as the kernel wants.
    let mut req = Vec::with_capacity(72);
    req.extend_from_slice(&72u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    req.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    req.extend_from_slice(&states.to_ne_bytes());
    req.extend_from_slice(&[0u8; 48]); // inet_diag_sockid: match everything
    sendto(
        fd.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .context("sock_diag request")?;

    let addr = |b: &[u8]| -> std::net::IpAddr {
        if family == libc_af_inet6() {
            let a: [u8; 16] = b[..16].try_into().expect("16 bytes");
            std::net::IpAddr::from(a)
        } else {
            let a: [u8; 4] = b[..4].try_into().expect("4 bytes");
            std::net::IpAddr::from(a)
        }
    };
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).context("sock_diag reply")?;
        let mut at = 0;
        while at + 16 <= n {
            let u32_at = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().expect("4 bytes"));
            let len = u32_at(at) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < 16 || at + len > n {
                anyhow::bail!("malformed sock_diag reply");
            }
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => anyhow::bail!("sock_diag refused the request"),
                _ if len >= 16 + 72 => {
                    let m = at + 16; // inet_diag_msg
                    out.push(Socket {
                        state: buf[m + 1],
                        sport: u16::from_be_bytes([buf[m + 4], buf[m + 5]]),
                        dport: u16::from_be_bytes([buf[m + 6], buf[m + 7]]),
                        src: addr(&buf[m + 8..m + 24]),
                        dst: addr(&buf[m + 24..m + 40]),
                        rqueue: u32_at(m + 56),
                        wqueue: u32_at(m + 60),
                        inode: u32_at(m + 68) as u64,
                    });
                }
                _ => {}
            }
            at += (len + 3) & !3;
        }
        if n == 0 {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_count_is_the_directorys() {
        // A process whose descriptors do not move (this one's do: tests run in parallel).
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let listed = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count();
        let counted = fds_in_use(pid).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(counted, listed);
    }

    #[test]
    fn our_own_connection_is_dumped_with_both_ends() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let local = c.local_addr().unwrap();
        let all = connections().unwrap();
        let mine = all
            .iter()
            .find(|s| s.sport == local.port() && s.dport == port)
            .expect("the client end");
        assert_eq!(mine.state, 1, "established");
        assert_eq!(mine.dst, local.ip());
        assert!(
            all.iter().all(|s| s.state != 10),
            "no listener in this dump"
        );
    }

    #[test]
    fn our_own_listener_is_found_with_its_backlog() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mine = listeners_of(std::process::id() as i32).unwrap();
        let found = mine.iter().find(|x| x.port == port).expect("our listener");
        // std asks for 128 (SOMAXCONN in libc); the kernel caps it at somaxconn.
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(found.backlog, 128.min(somaxconn));
        assert!(!found.ipv6);
        let (soft, hard) = nofile_of(std::process::id() as i32).unwrap();
        assert!(soft <= hard);
    }
}
