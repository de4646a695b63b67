//! How close this host (or the network namespace this process runs in) runs to the limits that
//! decide how many connections it holds, as the kernel says it now: TCP sockets and TCP memory
//! (/proc/net/sockstat) against tcp_mem, tcp_max_orphans and tcp_max_tw_buckets; open files
//! against fs.file-max (fs.file-nr); conntrack entries against nf_conntrack_max when conntrack is
//! loaded; the accept-queue overflow counters (/proc/net/netstat, TcpExt); and, per server
//! process, descriptors in use against its RLIMIT_NOFILE and each listener's accept queue
//! against its limit (sock_diag).
//!
//! Each sample is a few small reads: nothing here walks the connections themselves, so the cost
//! does not grow with them (BENCHMARKS.md measures it with 100,000 held). /proc/net is the
//! reading process's network namespace: the daemon's, which its server shares.

use std::collections::HashSet;

use super::Host;
use super::process;
use crate::tunables::SysctlKey;

/// One limit and how much of it is in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Level {
    /// Stable: `tcp_memory`, `tcp_orphans`, `tcp_time_wait`, `files`, `conntrack`,
    /// `descriptors.PROCESS`, `accept_queue.PORT`.
    pub id: String,
    /// For people: what is counted against what.
    pub what: String,
    pub used: u64,
    pub limit: u64,
    /// What to raise when it runs high.
    pub fix: String,
}

impl Level {
    /// used / limit, 0 when there is no limit.
    pub fn ratio(&self) -> f64 {
        if self.limit == 0 {
            0.0
        } else {
            self.used as f64 / self.limit as f64
        }
    }
}

/// The kernel's own counters of connections it turned away, since boot (or since the
/// namespace was made), from /proc/net/netstat's TcpExt line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drops {
    /// A SYN or a completed handshake found the accept queue full.
    pub listen_overflows: u64,
    /// Connection requests dropped at a listener, overflows included.
    pub listen_drops: u64,
    /// Segments dropped because a socket's backlog was full.
    pub backlog_drops: u64,
}

/// What the host side of one sample found.
#[derive(Clone, Debug, Default)]
pub struct HostSample {
    pub levels: Vec<Level>,
    pub drops: Drops,
    /// /proc/net/sockstat(6): TCP sockets in use (IPv4 + IPv6), orphaned, in TIME_WAIT, and
    /// TCP memory in bytes with tcp_mem's three marks in bytes.
    pub tcp_inuse: u64,
    pub tcp_orphans: u64,
    pub tcp_time_wait: u64,
    pub tcp_memory_bytes: u64,
    pub tcp_mem_marks_bytes: Option<[u64; 3]>,
}

/// Reads the host's side: sockets, TCP memory, files, conntrack, drop counters. What is not
/// visible here (a file missing, a key hidden in a namespace) is left out, never guessed.
pub fn sample_host(host: &Host) -> HostSample {
    let mut s = HostSample::default();
    let read = |rel: &str| std::fs::read_to_string(host.root().join(rel)).ok();
    let sysctl = |k: &str| -> Option<Vec<u64>> {
        let key = SysctlKey::parse(k).ok()?;
        let text = host.read_sysctl(&key).ok()??;
        text.split_whitespace().map(|v| v.parse().ok()).collect()
    };
    let page = super::page_size();
    if let Some(text) = read("proc/net/sockstat") {
        let tcp = fields(&text, "TCP:");
        s.tcp_inuse = tcp("inuse").unwrap_or(0);
        s.tcp_orphans = tcp("orphan").unwrap_or(0);
        s.tcp_time_wait = tcp("tw").unwrap_or(0);
        s.tcp_memory_bytes = tcp("mem").unwrap_or(0) * page;
    }
    if let Some(text) = read("proc/net/sockstat6") {
        s.tcp_inuse += fields(&text, "TCP6:")("inuse").unwrap_or(0);
    }
    if let Some(marks) = sysctl("net.ipv4.tcp_mem").filter(|m| m.len() == 3) {
        let marks = [marks[0] * page, marks[1] * page, marks[2] * page];
        s.tcp_mem_marks_bytes = Some(marks);
        s.levels.push(Level {
            id: "tcp_memory".into(),
            what: "TCP memory against net.ipv4.tcp_mem's pressure mark (bytes)".into(),
            used: s.tcp_memory_bytes,
            limit: marks[1],
            fix: "raise net.ipv4.tcp_mem (host-wide), or keep idle sockets' buffers small \
                  (tcp_rmem/tcp_wmem minimums)"
                .into(),
        });
    }
    if let Some([max]) = sysctl("net.ipv4.tcp_max_orphans").as_deref() {
        s.levels.push(Level {
            id: "tcp_orphans".into(),
            what: "orphaned TCP sockets against net.ipv4.tcp_max_orphans".into(),
            used: s.tcp_orphans,
            limit: *max,
            fix: "raise net.ipv4.tcp_max_orphans; many orphans mean clients vanish mid-close"
                .into(),
        });
    }
    if let Some([max]) = sysctl("net.ipv4.tcp_max_tw_buckets").as_deref() {
        s.levels.push(Level {
            id: "tcp_time_wait".into(),
            what: "TCP sockets in TIME_WAIT against net.ipv4.tcp_max_tw_buckets".into(),
            used: s.tcp_time_wait,
            limit: *max,
            fix: "raise net.ipv4.tcp_max_tw_buckets; on a host that connects out, a wider \
                  net.ipv4.ip_local_port_range"
                .into(),
        });
    }
    if let Some(nr) = sysctl("fs.file-nr").filter(|v| v.len() == 3) {
        s.levels.push(Level {
            id: "files".into(),
            what: "open files on the host against fs.file-max".into(),
            used: nr[0],
            limit: nr[2],
            fix: "raise fs.file-max (host-wide)".into(),
        });
    }
    if let (Some([count]), Some([max])) = (
        sysctl("net.netfilter.nf_conntrack_count").as_deref(),
        sysctl("net.netfilter.nf_conntrack_max").as_deref(),
    ) {
        s.levels.push(Level {
            id: "conntrack".into(),
            what: "conntrack entries against net.netfilter.nf_conntrack_max".into(),
            used: *count,
            limit: *max,
            fix: "raise net.netfilter.nf_conntrack_max, or exempt the service's port from \
                  connection tracking (a NOTRACK rule)"
                .into(),
        });
    }
    if let Some(text) = read("proc/net/netstat") {
        let ext = table(&text, "TcpExt:");
        let get = |k: &str| ext.iter().find(|(n, _)| n == k).map_or(0, |(_, v)| *v);
        s.drops = Drops {
            listen_overflows: get("ListenOverflows"),
            listen_drops: get("ListenDrops"),
            backlog_drops: get("TCPBacklogDrop"),
        };
    }
    s
}

/// One server process's levels: descriptors against its soft RLIMIT_NOFILE, and the fullest
/// accept queue of each port it (or its children) listens on. `name` says which process
/// (`worker-0`, `child`); a process that is gone gives nothing. `listeners` are the socket
/// inodes of its listeners, found once (it takes a readlink per descriptor) and kept by the
/// caller; `None` looks them up. `all` is this namespace's listeners (`process::all_listeners`,
/// one dump for every process of a sample).
pub fn sample_process(
    pid: i32,
    name: &str,
    all: &[process::Listener],
    listeners: &mut Option<HashSet<u64>>,
) -> Vec<Level> {
    let mut out = Vec::new();
    if let (Ok(used), Ok((soft, _))) = (process::fds_in_use(pid), process::nofile_of(pid)) {
        out.push(Level {
            id: format!("descriptors.{name}"),
            what: format!("descriptors of {name} (pid {pid}) against its RLIMIT_NOFILE"),
            used: used as u64,
            limit: soft,
            fix: "raise limits.nofile (LimitNOFILE= of the unit), or let tunegate run more \
                  workers (target_connections)"
                .into(),
        });
    }
    // With no listener in the namespace (or no dump) there is nothing to match its fds with.
    if listeners.is_none() && !all.is_empty() {
        let held = process::socket_inodes(&process::process_tree(pid));
        let mine: HashSet<u64> = all
            .iter()
            .map(|l| l.inode)
            .filter(|i| held.contains(i))
            .collect();
        // Not listening yet: looked up again next time.
        *listeners = (!mine.is_empty()).then_some(mine);
    }
    let Some(inodes) = listeners.as_ref() else {
        return out;
    };
    let mine: Vec<&process::Listener> = all.iter().filter(|l| inodes.contains(&l.inode)).collect();
    let mut ports: Vec<u16> = mine.iter().map(|l| l.port).collect();
    ports.sort_unstable();
    ports.dedup();
    for port in ports {
        let (queued, limit) = mine
            .iter()
            .filter(|l| l.port == port)
            .map(|l| (l.queued, l.backlog))
            .max_by(|a, b| {
                let r = |(q, b): (u32, u32)| q as f64 / b.max(1) as f64;
                r(*a).total_cmp(&r(*b))
            })
            .unwrap_or((0, 0));
        out.push(Level {
            id: format!("accept_queue.{name}.{port}"),
            what: format!(
                "connections waiting in {name}'s fullest accept queue on port {port} against \
                 its limit"
            ),
            used: queued.into(),
            limit: limit.into(),
            fix: "raise net.core.somaxconn and the server's listen() backlog, or add workers: \
                  the process does not accept fast enough"
                .into(),
        });
    }
    out
}

/// Local ports in use towards the busiest (source address, destination address, destination
/// port) against the ephemeral range less its reserved ports: what runs out first on a host
/// that connects out (a proxy, a load generator), since each such pair can hold at most that
/// many connections, TIME_WAIT ones included. One sock_diag dump of every TCP socket that is
/// not listening: its cost grows with the connections, so the daemon takes it only where the
/// host connects out (docs/daemon.md). None when the range is not visible or the dump fails.
pub fn sample_ephemeral(host: &Host) -> Option<Level> {
    let read = |k: &str| -> Option<String> { host.read_sysctl(&SysctlKey::parse(k).ok()?).ok()? };
    let range: Vec<u16> = read("net.ipv4.ip_local_port_range")?
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let [lo, hi] = range[..] else {
        return None;
    };
    let reserved = read("net.ipv4.ip_local_reserved_ports")
        .and_then(|t| crate::tunables::PortSet::parse(&t).ok())
        .unwrap_or_default();
    let ephemeral = |p: u16| lo <= p && p <= hi && !reserved.contains(p);
    let usable = (lo..=hi).filter(|p| ephemeral(*p)).count() as u64;
    let mut pairs: std::collections::HashMap<(std::net::IpAddr, std::net::IpAddr, u16), u64> =
        std::collections::HashMap::new();
    for s in process::connections().ok()? {
        if ephemeral(s.sport) {
            *pairs.entry((s.src, s.dst, s.dport)).or_default() += 1;
        }
    }
    let busiest = pairs.into_iter().max_by_key(|(_, n)| *n);
    let what = match busiest {
        Some(((src, dst, dport), _)) => format!(
            "local ports in use from {src} to {} (the busiest pair), against the ephemeral \
             range {lo}-{hi} less its reserved ports",
            std::net::SocketAddr::new(dst, dport)
        ),
        None => format!(
            "local ports in use towards any one destination (none now), against the \
             ephemeral range {lo}-{hi} less its reserved ports"
        ),
    };
    Some(Level {
        id: "ephemeral_ports".into(),
        what,
        used: busiest.map_or(0, |(_, n)| n),
        limit: usable,
        fix: "widen net.ipv4.ip_local_port_range, or connect out from more source addresses or \
              to more destination addresses or ports; a closed connection keeps its port 60 s \
              in TIME_WAIT"
            .into(),
    })
}

/// `key value key value ...` after `prefix` on its line of /proc/net/sockstat.
fn fields<'a>(text: &'a str, prefix: &str) -> impl Fn(&str) -> Option<u64> + 'a {
    let line = text
        .lines()
        .find(|l| l.starts_with(prefix))
        .map(|l| l[prefix.len()..].to_string())
        .unwrap_or_default();
    move |key: &str| {
        let mut it = line.split_whitespace();
        while let Some(k) = it.next() {
            let v = it.next()?;
            if k == key {
                return v.parse().ok();
            }
        }
        None
    }
}

/// /proc/net/netstat's pair of lines for `prefix`: names on the first, values on the second.
fn table(text: &str, prefix: &str) -> Vec<(String, u64)> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return Vec::new();
    };
    names
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .filter_map(|(n, v)| Some((n.to_string(), v.parse().ok()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake;

    const SOCKSTAT: &str = "sockets: used 8\nTCP: inuse 100 orphan 3 tw 148 alloc 120 mem 109\n\
                            UDP: inuse 0 mem 0\n";
    const NETSTAT: &str = "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPBacklogDrop\n\
                           TcpExt: 0 312 320 7\nIpExt: InNoRoutes\nIpExt: 0\n";

    fn tree() -> (tempfile::TempDir, Host) {
        let (d, host) = fake::netns_tree(&[
            ("net/ipv4/tcp_mem", "100\t200\t300\n"),
            ("net/ipv4/tcp_max_orphans", "10\n"),
            ("net/ipv4/tcp_max_tw_buckets", "1000\n"),
            ("fs/file-nr", "304\t0\t2466183\n"),
        ]);
        std::fs::create_dir_all(d.path().join("proc/net")).unwrap();
        std::fs::write(d.path().join("proc/net/sockstat"), SOCKSTAT).unwrap();
        std::fs::write(d.path().join("proc/net/sockstat6"), "TCP6: inuse 5\n").unwrap();
        std::fs::write(d.path().join("proc/net/netstat"), NETSTAT).unwrap();
        (d, host)
    }

    #[test]
    fn the_kernels_figures_become_levels_and_counters() {
        let (_d, host) = tree();
        let s = sample_host(&host);
        let page = crate::host::page_size();
        assert_eq!((s.tcp_inuse, s.tcp_orphans, s.tcp_time_wait), (105, 3, 148));
        assert_eq!(s.tcp_memory_bytes, 109 * page);
        let level = |id: &str| s.levels.iter().find(|l| l.id == id).unwrap().clone();
        let mem = level("tcp_memory");
        assert_eq!((mem.used, mem.limit), (109 * page, 200 * page));
        assert!((mem.ratio() - 0.545).abs() < 1e-9);
        assert_eq!(
            (level("tcp_orphans").used, level("tcp_orphans").limit),
            (3, 10)
        );
        assert_eq!(level("tcp_time_wait").limit, 1000);
        assert_eq!((level("files").used, level("files").limit), (304, 2466183));
        assert!(
            s.levels.iter().all(|l| l.id != "conntrack"),
            "not loaded here"
        );
        assert_eq!(
            s.drops,
            Drops {
                listen_overflows: 312,
                listen_drops: 320,
                backlog_drops: 7
            }
        );
    }

    #[test]
    fn what_is_not_visible_is_left_out() {
        let (_d, host) = fake::netns_tree(&[]);
        let s = sample_host(&host);
        assert!(s.levels.is_empty(), "{:?}", s.levels);
        assert_eq!(s.drops, Drops::default());
    }

    #[test]
    fn this_process_has_descriptors_and_a_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let all = process::all_listeners().unwrap();
        let mut inodes = None;
        let levels = sample_process(std::process::id() as i32, "self", &all, &mut inodes);
        assert!(inodes.is_some(), "found once, kept by the caller");
        let fds = levels.iter().find(|l| l.id == "descriptors.self").unwrap();
        assert!(fds.used > 0 && fds.limit >= fds.used, "{fds:?}");
        let q = levels
            .iter()
            .find(|l| l.id == format!("accept_queue.self.{port}"))
            .unwrap();
        assert_eq!(q.used, 0);
        assert!(q.limit > 0);
        // Again with what was found kept: the same levels (their figures move with the other
        // tests running in this process).
        let again = sample_process(std::process::id() as i32, "self", &all, &mut inodes);
        let ids = |v: &[Level]| v.iter().map(|l| l.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&again), ids(&levels));
        assert!(sample_process(i32::MAX, "gone", &all, &mut None).is_empty());
    }
}
