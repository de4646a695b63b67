//! The catalogue: every tunable tunegate knows, why it decides how many connections a host can
//! hold, where it lives, and how to fix it. Keys not listed here are still allowed in profiles;
//! they compare exactly (see `Shape::Text`).

use serde::Serialize;

use super::value::Shape;

/// Where a tunable's value lives, which decides who can change it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// Each network namespace has its own copy; a container or `unshare -n` can change it.
    NetNamespace,
    /// One value for the whole kernel; only the host (initial namespaces) may change it.
    HostGlobal,
    /// A property of a process, inherited by its children (rlimits).
    Process,
    /// A service elsewhere that the server depends on (the Redis Cluster of the bus).
    Service,
}

impl Scope {
    pub fn label(self) -> &'static str {
        match self {
            Scope::NetNamespace => "per network namespace",
            Scope::HostGlobal => "host-global",
            Scope::Process => "per process",
            Scope::Service => "remote service",
        }
    }
}

/// One known tunable.
#[derive(Debug)]
pub struct Tunable {
    /// Dotted key, exactly as `SysctlKey::dotted` prints it.
    pub key: &'static str,
    pub shape: Shape,
    pub scope: Scope,
    /// Why it matters for holding many connections, in one or two sentences.
    pub why: &'static str,
    /// What the kernel sets at boot when no sysctl.d file does, where that is a constant of
    /// Linux 5.4 and later (not derived from memory): a key whose default passes the profile
    /// needs nothing at boot.
    pub boot_default: Option<&'static str>,
}

const INT_MAX: u64 = i32::MAX as u64;
const LONG_MAX: u64 = i64::MAX as u64;

/// The known tunables, in the order reports list them.
pub static CATALOGUE: &[Tunable] = &[
    Tunable {
        key: "net.core.somaxconn",
        shape: Shape::Int { max: INT_MAX },
        scope: Scope::NetNamespace,
        why: "Caps the accept queue any listen() can ask for; when a burst of connects fills it, \
              the kernel drops SYNs and clients see timeouts (128, the old default, is far too small).",
        boot_default: Some("4096"),
    },
    Tunable {
        key: "net.ipv4.tcp_max_syn_backlog",
        shape: Shape::Int { max: INT_MAX },
        scope: Scope::NetNamespace,
        why: "Half-open connections the kernel keeps per listener while handshakes complete; \
              too small and connect storms are dropped before accept() sees them.",
        boot_default: None,
    },
    Tunable {
        key: "net.ipv4.ip_local_port_range",
        shape: Shape::PortRange,
        scope: Scope::NetNamespace,
        why: "Ephemeral ports for outgoing connections: each (source address, destination) pair \
              can have at most this many connections open, so proxies and load generators run \
              out of ports (port exhaustion).",
        boot_default: Some("32768 60999"),
    },
    Tunable {
        key: "net.ipv4.ip_local_reserved_ports",
        shape: Shape::PortSet,
        scope: Scope::NetNamespace,
        why: "Ports inside the ephemeral range that outgoing connections must not take, so a \
              server can still bind its listen port after a wide ip_local_port_range.",
        boot_default: Some(""),
    },
    Tunable {
        key: "net.ipv4.tcp_rmem",
        shape: Shape::Fields {
            count: 3,
            max: INT_MAX,
            ordered: true,
        },
        scope: Scope::NetNamespace,
        why: "Per-socket receive buffer min/default/max in bytes: the minimum is what every idle \
              connection can pin under pressure, the maximum bounds throughput per connection.",
        boot_default: None,
    },
    Tunable {
        key: "net.ipv4.tcp_wmem",
        shape: Shape::Fields {
            count: 3,
            max: INT_MAX,
            ordered: true,
        },
        scope: Scope::NetNamespace,
        why: "Per-socket send buffer min/default/max in bytes; bounds how much a slow reader \
              can queue in the kernel per connection.",
        boot_default: None,
    },
    Tunable {
        key: "net.ipv4.tcp_migrate_req",
        shape: Shape::Int { max: 1 },
        scope: Scope::NetNamespace,
        why: "With several processes on one port (SO_REUSEPORT workers), a listener that closes \
              hands the connections waiting in its accept queue to another listener of the port \
              instead of resetting them: restarting one worker loses no connect.",
        boot_default: Some("0"),
    },
    Tunable {
        key: "net.ipv4.tcp_tw_reuse",
        shape: Shape::Text,
        scope: Scope::NetNamespace,
        why: "Lets outgoing connections reuse TIME-WAIT ports, which keeps a proxy's ephemeral \
              ports from running out under churn.",
        boot_default: Some("2"),
    },
    Tunable {
        key: "net.core.rmem_max",
        shape: Shape::Int { max: INT_MAX },
        scope: Scope::HostGlobal,
        why: "Largest receive buffer a program may ask for with SO_RCVBUF; read-only inside a \
              network namespace.",
        boot_default: Some("212992"),
    },
    Tunable {
        key: "net.core.wmem_max",
        shape: Shape::Int { max: INT_MAX },
        scope: Scope::HostGlobal,
        why: "Largest send buffer a program may ask for with SO_SNDBUF; read-only inside a \
              network namespace.",
        boot_default: Some("212992"),
    },
    Tunable {
        key: "net.core.netdev_max_backlog",
        shape: Shape::Int { max: INT_MAX },
        scope: Scope::HostGlobal,
        why: "Packets queued per CPU between the NIC and the stack; bursts beyond it are dropped.",
        boot_default: Some("1000"),
    },
    Tunable {
        key: "net.ipv4.tcp_mem",
        shape: Shape::Fields {
            count: 3,
            max: LONG_MAX,
            ordered: true,
        },
        scope: Scope::HostGlobal,
        why: "Pages all TCP sockets together may use (low/pressure/high); past the high mark \
              new buffer allocations fail and connections stall or drop.",
        boot_default: None,
    },
    Tunable {
        key: "net.netfilter.nf_conntrack_max",
        shape: Shape::Int { max: INT_MAX },
        scope: Scope::HostGlobal,
        why: "Connections the firewall tracks; when the table is full new connections are \
              dropped (\"nf_conntrack: table full\").",
        boot_default: None,
    },
    Tunable {
        key: "fs.file-max",
        shape: Shape::Int { max: LONG_MAX },
        scope: Scope::HostGlobal,
        why: "Open files the whole kernel allows; every socket is a file.",
        boot_default: None,
    },
    Tunable {
        key: "fs.nr_open",
        shape: Shape::Int { max: INT_MAX },
        scope: Scope::HostGlobal,
        why: "Ceiling for any process's RLIMIT_NOFILE hard limit: no process can hold more \
              sockets than this.",
        boot_default: Some("1048576"),
    },
];

/// Looks a tunable up by its dotted key.
pub fn lookup(dotted: &str) -> Option<&'static Tunable> {
    CATALOGUE.iter().find(|t| t.key == dotted)
}

/// Why RLIMIT_NOFILE matters; it is a process limit, not a sysctl, so it has no catalogue row.
pub const NOFILE_WHY: &str = "Descriptors one process may hold; every socket is one, so a \
    server at the default 1024 dies with EMFILE at connection 1,025.";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunables::SysctlKey;

    #[test]
    fn every_catalogue_key_is_a_valid_key_in_canonical_spelling() {
        for t in CATALOGUE {
            let k = SysctlKey::parse(t.key).unwrap();
            assert_eq!(k.dotted(), t.key);
            assert!(!t.why.is_empty());
        }
    }
}
