//! Checks that follow from `target_connections` and the listen ports rather than from one key:
//! the descriptor ceilings, the ephemeral range, TCP memory, the established-socket hash,
//! conntrack, and the port guard.
//!
//! Where apply would move a value (a wider port range, more reserved ports, bigger buffer
//! minimums), these checks look at the value as it will be after apply, because that is the
//! host the server will live on; the detail says so.

use super::{Context, Finding, Verdict, read_number};
use crate::host::{Host, page_size};
use crate::profile::Profile;
use crate::tunables::{self, PortSet, Scope, SysctlKey, Value};

/// Descriptors a server process needs besides its sockets (listeners, epoll, pipes, logs).
pub const FD_HEADROOM: u64 = 64;

fn finding(id: &str, key: &str, scope: Scope) -> Finding {
    Finding::new(format!("derived.{id}"), key.into(), scope)
}

/// A key's value as it will be after apply: the raise-only target when the profile names it
/// and it can be changed from here, the live value otherwise. None when not visible.
fn effective(profile: &Profile, host: &Host, key: &str) -> anyhow::Result<Option<Value>> {
    let key = SysctlKey::parse(key).expect("static key");
    let shape = tunables::shape_of(&key);
    let Some(raw) = host.read_sysctl(&key)? else {
        return Ok(None);
    };
    let live = shape
        .parse_live(&raw)
        .map_err(|m| anyhow::anyhow!("cannot understand {key}: {m}"))?;
    let writable = matches!(host.sysctl_access(&key), crate::host::Access::Writable);
    Ok(Some(match profile.sysctl.iter().find(|s| s.key == key) {
        Some(s) if writable => shape.raised(&live, &s.value),
        _ => live,
    }))
}

fn numbers(v: Option<Value>) -> Option<Vec<u64>> {
    match v {
        Some(Value::Numbers(n)) => Some(n),
        _ => None,
    }
}

pub fn checks(
    profile: &Profile,
    host: &Host,
    ctx: &Context,
    ports: &[u16],
) -> anyhow::Result<Vec<Finding>> {
    let mut out = Vec::new();
    let nr_open = read_number(host, "fs.nr_open")?;
    let file_max = read_number(host, "fs.file-max")?;
    let nofile = profile.nofile.as_ref().map(|(n, _)| *n);
    if let Some(want) = nofile {
        out.extend(descriptor_ceilings(want, nr_open, file_max));
    }
    if let Some(target) = profile.target_connections {
        // With the clients on this host, both ends of every connection are sockets here.
        let sockets = if profile.clients_on_host {
            2 * target
        } else {
            target
        };
        out.push(connection_budget(ctx, nr_open, target));
        if let Some(file_max) = file_max
            && (nofile.is_none() || profile.clients_on_host)
        {
            out.push(file_max_for_sockets(
                file_max,
                sockets,
                profile.clients_on_host,
            ));
        }
        out.push(ephemeral_range(profile, host, target)?);
        if let Some(proxy) = &profile.proxy {
            out.push(upstream_ports(profile, host, target, proxy)?);
        }
        out.push(tcp_memory(profile, host, sockets)?);
        out.push(socket_memory(host, sockets, profile.clients_on_host));
        if let Some(f) = established_hash(host, sockets)? {
            out.push(f);
        }
        if let Some(f) = conntrack(host, target)? {
            out.push(f);
        }
    }
    let range = numbers(effective(profile, host, "net.ipv4.ip_local_port_range")?);
    if let Some(r) = &range {
        out.extend(range_shape(host, r)?);
    }
    out.extend(port_guard(profile, host, ports)?);
    Ok(out)
}

/// Descriptor ceilings above any process limit: fs.nr_open and fs.file-max against the
/// profile's limits.nofile.
fn descriptor_ceilings(want: u64, nr_open: Option<u64>, file_max: Option<u64>) -> Vec<Finding> {
    let ceilings = [
        (
            "nr_open",
            "fs.nr_open",
            nr_open,
            "No process's hard RLIMIT_NOFILE can exceed fs.nr_open, whatever its privileges.",
        ),
        (
            "file_max",
            "fs.file-max",
            file_max,
            "The kernel-wide ceiling on open files; every socket of every process counts.",
        ),
    ];
    ceilings
        .into_iter()
        .map(|(id, key, have, why)| {
            let mut f = finding(id, key, Scope::HostGlobal);
            f.why = why.into();
            f.wanted = format!("{want} (limits.nofile)");
            f.current = have.map(|v| v.to_string());
            match have {
                Some(v) if v >= want => {}
                Some(_) => {
                    f.verdict = Verdict::Fail;
                    f.fix = format!(
                        "on the host: {key} = {want} in /etc/sysctl.d/ (add it to the profile so tunegate apply sets it)"
                    );
                }
                None => f.verdict = Verdict::Warn,
            }
            f
        })
        .collect()
}

/// How many processes the target needs at this host's descriptor limits.
fn connection_budget(ctx: &Context, nr_open: Option<u64>, target: u64) -> Finding {
    let mut f = finding(
        "connection_budget",
        "connections per process",
        Scope::Process,
    );
    let per_process = ctx
        .nofile_hard
        .min(nr_open.unwrap_or(u64::MAX))
        .saturating_sub(FD_HEADROOM);
    let processes = target.div_ceil(per_process.max(1));
    f.why = "Each connection is a descriptor; one process holds at most its hard \
             RLIMIT_NOFILE of them."
        .into();
    f.current = Some(per_process.to_string());
    f.wanted = format!("{target} (target_connections)");
    f.detail = Some(format!(
        "at the hard limit {} (minus {FD_HEADROOM} for non-socket descriptors) one process holds \
         {per_process} connections; {target} need {processes} process(es)",
        ctx.nofile_hard
    ));
    if processes > 1 {
        f.verdict = Verdict::Warn;
        f.fix = format!(
            "run {processes} or more server processes on the port (SO_REUSEPORT), or raise the \
             hard limit (LimitNOFILE=, needs CAP_SYS_RESOURCE and fs.nr_open)"
        );
    }
    f
}

/// fs.file-max has to hold the target's sockets (both ends with the clients on this host),
/// whatever one process may open.
fn file_max_for_sockets(file_max: u64, sockets: u64, both_ends: bool) -> Finding {
    let id = if both_ends {
        "file_max_both_ends"
    } else {
        "file_max"
    };
    let mut f = finding(id, "fs.file-max", Scope::HostGlobal);
    f.current = Some(file_max.to_string());
    f.wanted = if both_ends {
        format!("{sockets} (target_connections x 2: clients_on_host)")
    } else {
        format!("{sockets} (target_connections)")
    };
    f.why = "The kernel-wide ceiling on open files; every socket counts.".into();
    if file_max < sockets {
        f.verdict = Verdict::Fail;
        f.fix = format!("on the host: fs.file-max = {}", sockets * 2);
    } else if file_max < sockets + sockets / 10 {
        f.verdict = Verdict::Warn;
        f.detail = Some(format!(
            "{} descriptors left for everything else on the host",
            file_max - sockets
        ));
        f.fix = format!("on the host: fs.file-max = {}", sockets * 2);
    }
    f
}

/// Kernel memory one established loopback TCP socket takes when idle (socket, inode, dentry,
/// file, epoll entry; the slab the kernel's Slab line grows by), measured by bench/c100k.sh
/// and bench/c1m.sh: 10,280 B per connection with both ends on the host at 100,000 and
/// 200,000 connections, 9,726 B at 880,000.
const SOCKET_SLAB_BYTES: u64 = 5_140;

/// The kernel memory the target's sockets take, against the machine's memory: no sysctl fixes
/// a host too small, so this warns (with the figure) rather than fails.
fn socket_memory(host: &Host, sockets: u64, both_ends: bool) -> Finding {
    let mut f = finding("socket_memory", "MemTotal", Scope::HostGlobal);
    let need = sockets * SOCKET_SLAB_BYTES;
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    f.rule = "at most 70 % of memory".into();
    f.why = format!(
        "Each idle TCP socket costs the kernel about {SOCKET_SLAB_BYTES} bytes of slab (measured          on loopback){}, before any buffer or any user-space memory.",
        if both_ends {
            "; with the clients on this host, each connection is two sockets"
        } else {
            ""
        }
    );
    f.wanted = format!("{:.1} GiB for {sockets} sockets", gib(need));
    match host.mem_total() {
        None => f.verdict = Verdict::Warn,
        Some(total) => {
            f.current = Some(format!("{:.1} GiB", gib(total)));
            if need > total / 10 * 7 {
                f.verdict = Verdict::Warn;
                f.fix = format!(
                    "spread the connections over more hosts, or give this one at least {:.0} GiB",
                    gib(need / 7 * 10).ceil()
                );
            }
        }
    }
    f
}

/// Sockets per bucket of TCP's established hash beyond which lookups cost measurably: the
/// kernel sizes the table for about one.
const SOCKETS_PER_EHASH_BUCKET: u64 = 2;

/// TCP's established-socket hash against the target's sockets. Every segment received finds
/// its socket there by walking its bucket's chain, and the table is sized once (at boot, from
/// the machine's memory; for a namespace, when it is created) and never grows. It warns: a
/// crowded table costs CPU, not connections. `None` where the kernel does not say (before
/// 6.1: no net.ipv4.tcp_ehash_entries).
fn established_hash(host: &Host, sockets: u64) -> anyhow::Result<Option<Finding>> {
    let key = SysctlKey::parse("net.ipv4.tcp_ehash_entries").expect("static key");
    let Some(text) = host.read_sysctl(&key)? else {
        return Ok(None);
    };
    let entries: i64 = text.trim().parse().map_err(|_| {
        anyhow::anyhow!("cannot understand {key}: {:?} is not a number", text.trim())
    })?;
    // Negative: this namespace has no table of its own and shares the host's.
    let buckets = entries.unsigned_abs().max(1);
    let mut f = finding(
        "established_hash",
        "net.ipv4.tcp_ehash_entries",
        Scope::HostGlobal,
    );
    f.rule = format!("at most {SOCKETS_PER_EHASH_BUCKET} sockets per bucket");
    f.why = "Every TCP segment received looks its socket up in the established hash, walking              its bucket's chain; the table is sized at boot (from memory) or when a network              namespace is created, and never grows. bench/c1m.sh, 1.9 million sockets on              262,144 buckets: that lookup was the kernel's top function (15 % of the CPU) while              connecting."
        .into();
    f.current = Some(if entries < 0 {
        format!("{buckets} buckets (the host's, shared by this namespace)")
    } else {
        format!("{buckets} buckets")
    });
    f.wanted = format!(
        "{} buckets for {sockets} sockets",
        sockets.div_ceil(SOCKETS_PER_EHASH_BUCKET)
    );
    if sockets > buckets * SOCKETS_PER_EHASH_BUCKET {
        let want = sockets.next_power_of_two();
        f.verdict = Verdict::Warn;
        f.detail = Some(format!(
            "{:.1} sockets per bucket",
            sockets as f64 / buckets as f64
        ));
        f.fix = format!(
            "on the host: thash_entries={want} on the kernel command line (the next boot); for              a container or namespace, net.ipv4.tcp_child_ehash_entries = {want} on the host              before it is created"
        );
    }
    Ok(Some(f))
}

fn ephemeral_range(profile: &Profile, host: &Host, target: u64) -> anyhow::Result<Finding> {
    let mut f = finding(
        "ephemeral_ports",
        "net.ipv4.ip_local_port_range size",
        Scope::NetNamespace,
    );
    f.why = "Outgoing connections from one source address to one destination address and port \
             can use at most this many ports; proxies, load generators and backends that connect \
             out run dry first (port exhaustion: \
             one of the walls a Socket.IO fleet hit at 12,500 users)."
        .into();
    f.wanted = format!("{target} (target_connections)");
    match numbers(effective(profile, host, "net.ipv4.ip_local_port_range")?) {
        Some(r) => {
            let size = r[1] - r[0] + 1;
            f.current = Some(format!("{size} ports ({}-{}, after apply)", r[0], r[1]));
            if size < target {
                f.verdict = Verdict::Warn;
                f.detail = Some(format!(
                    "fine for a server that only accepts; anything here connecting out to one \
                     address:port can open at most {size} connections per source address"
                ));
                f.fix =
                    "connect out from several source addresses (127.0.0.2, .3, ... for loopback \
                         tests), or spread over several destination ports"
                        .into();
            }
        }
        None => f.verdict = Verdict::Warn,
    }
    Ok(f)
}

/// nginx's consistent hash puts 160 points per upstream on its ring, so an upstream's share
/// wanders by about 1/sqrt(160), 8 %, around the even split; 20 % covers 2.5 of those.
const HASH_SKEW_PERCENT: u64 = 20;

/// A proxy opens one outgoing connection per client, so each (source address, upstream
/// address:port) pair carries its share of the target, and the kernel can give one pair at most
/// as many ports as the ephemeral range has, less the reserved ones. Past that, connect() fails
/// with EADDRNOTAVAIL and nginx answers 502 while the upstreams are idle.
fn upstream_ports(
    profile: &Profile,
    host: &Host,
    target: u64,
    proxy: &crate::profile::Proxy,
) -> anyhow::Result<Finding> {
    let mut f = finding(
        "upstream_ports",
        "net.ipv4.ip_local_port_range per upstream",
        Scope::NetNamespace,
    );
    f.rule = "at most".into();
    f.source = Some(proxy.source.to_string());
    f.why = "A proxy opens one outgoing connection per client to one upstream: each (proxy \
             address, upstream address:port) pair can hold at most the ephemeral range, less its \
             reserved ports; past that connect() fails with EADDRNOTAVAIL and clients get 502 \
             while the upstreams are idle (the port exhaustion of the write-up)."
        .into();
    let pairs = u64::from(proxy.upstreams) * u64::from(proxy.source_addresses);
    let per_pair = target.div_ceil(pairs) * (100 + HASH_SKEW_PERCENT) / 100;
    f.current = Some(format!(
        "{per_pair} connections on the busiest pair: {target} over {} upstream(s) x {} source \
         address(es), +{HASH_SKEW_PERCENT} % for uneven hashing",
        proxy.upstreams, proxy.source_addresses
    ));
    let range = numbers(effective(profile, host, "net.ipv4.ip_local_port_range")?);
    let reserved = match effective(profile, host, "net.ipv4.ip_local_reserved_ports")? {
        Some(Value::Ports(p)) => p,
        _ => PortSet::default(),
    };
    let Some(r) = range else {
        f.verdict = Verdict::Warn;
        f.wanted = "the range is not visible here".into();
        return Ok(f);
    };
    let taken = (r[0]..=r[1])
        .filter(|&p| p <= u64::from(u16::MAX) && reserved.contains(p as u16))
        .count() as u64;
    let usable = (r[1] - r[0] + 1).saturating_sub(taken);
    f.wanted = format!(
        "{usable} ports per pair ({}-{} after apply, {taken} of them reserved)",
        r[0], r[1]
    );
    if per_pair > usable {
        f.verdict = Verdict::Warn;
        let need = (target * (100 + HASH_SKEW_PERCENT) / 100).div_ceil(usable.max(1));
        let upstreams = need.div_ceil(u64::from(proxy.source_addresses));
        f.fix = format!(
            "give the proxy at least {need} pairs: list each host under more addresses or ports \
             in the upstream block ({upstreams} upstreams from {} source address(es)), or connect \
             out from more addresses (proxy_bind), or widen net.ipv4.ip_local_port_range (1024 \
             65535 is 64,512 ports)",
            proxy.source_addresses
        );
    }
    Ok(f)
}

fn tcp_memory(profile: &Profile, host: &Host, sockets: u64) -> anyhow::Result<Finding> {
    let mut f = finding("tcp_mem", "net.ipv4.tcp_mem", Scope::HostGlobal);
    f.rule = "high mark at least".into();
    f.why = "Pages all TCP sockets together may use; every connection pins at least its \
             tcp_rmem and tcp_wmem minimums under memory pressure."
        .into();
    let rmin = numbers(effective(profile, host, "net.ipv4.tcp_rmem")?).map_or(4096, |v| v[0]);
    let wmin = numbers(effective(profile, host, "net.ipv4.tcp_wmem")?).map_or(4096, |v| v[0]);
    let page = page_size();
    let needed = (sockets * (rmin + wmin)).div_ceil(page);
    f.wanted =
        format!("{needed} pages ({sockets} sockets x ({rmin} + {wmin}) bytes minimum buffers)");
    match numbers(effective(profile, host, "net.ipv4.tcp_mem")?) {
        None => {
            f.verdict = Verdict::Warn;
            f.detail = Some(
                "tcp_mem is host-global and not visible inside this network namespace: check it on the host"
                    .into(),
            );
            f.fix =
                format!("on the host: make the third field of net.ipv4.tcp_mem at least {needed}");
        }
        Some(m) => {
            f.current = Some(format!("{} {} {}", m[0], m[1], m[2]));
            if m[2] < needed {
                f.verdict = Verdict::Fail;
                f.fix = format!(
                    "on the host: net.ipv4.tcp_mem = {} {} {}",
                    m[0].max(needed / 2),
                    m[1].max(needed),
                    m[2].max(needed * 3 / 2)
                );
            } else if m[1] < needed {
                f.verdict = Verdict::Warn;
                f.detail = Some(format!(
                    "{sockets} sockets at minimum buffers would push TCP into memory pressure \
                     (second field {} < {needed})",
                    m[1]
                ));
                f.fix =
                    format!("on the host: raise the second field of net.ipv4.tcp_mem to {needed}");
            }
        }
    }
    Ok(f)
}

fn conntrack(host: &Host, target: u64) -> anyhow::Result<Option<Finding>> {
    let Some(max) = read_number(host, "net.netfilter.nf_conntrack_max")? else {
        return Ok(None); // conntrack not loaded: nothing tracks connections, nothing to check
    };
    let mut f = finding(
        "conntrack",
        "net.netfilter.nf_conntrack_max",
        Scope::HostGlobal,
    );
    f.why = "nf_conntrack is loaded, so the firewall tracks every connection; when its table is \
             full new connections are dropped."
        .into();
    f.current = Some(max.to_string());
    f.wanted = format!("{target} (target_connections)");
    if max < target {
        f.verdict = Verdict::Fail;
        f.fix = format!(
            "on the host: net.netfilter.nf_conntrack_max = {}",
            target * 2
        );
    }
    Ok(Some(f))
}

fn range_shape(host: &Host, r: &[u64]) -> anyhow::Result<Vec<Finding>> {
    let mut parity = finding(
        "port_range_parity",
        "net.ipv4.ip_local_port_range parity",
        Scope::NetNamespace,
    );
    parity.rule = "different parity".into();
    parity.why = "connect() takes even ports and bind() odd ones first; the kernel asks for a \
                  start and end of different parity so both halves are the same size."
        .into();
    parity.current = Some(format!("{} {} (after apply)", r[0], r[1]));
    parity.wanted = "start and end, one even and one odd".into();
    if r[0] % 2 == r[1] % 2 {
        parity.verdict = Verdict::Warn;
        parity.fix = format!(
            "use {} {} instead",
            r[0],
            if r[1] > r[0] { r[1] - 1 } else { r[1] + 1 }
        );
    }
    let mut privileged = finding(
        "port_range_unprivileged",
        "net.ipv4.ip_local_port_range start",
        Scope::NetNamespace,
    );
    privileged.why = "Ephemeral ports below ip_unprivileged_port_start land among the ports \
                      services bind with privilege."
        .into();
    privileged.current = Some(r[0].to_string());
    match read_number(host, "net.ipv4.ip_unprivileged_port_start")? {
        Some(start) => {
            privileged.wanted = format!("{start} (net.ipv4.ip_unprivileged_port_start)");
            if r[0] < start {
                privileged.verdict = Verdict::Warn;
                privileged.fix = format!("start the range at {start} or above");
            }
        }
        None => privileged.verdict = Verdict::Warn,
    }
    Ok(vec![parity, privileged])
}

/// A listen port inside the ephemeral range can be taken by an outgoing connection before the
/// server binds it (a 1024-65535 range, the usual advice, swallows 3000 and 6379), unless it is
/// reserved.
fn port_guard(profile: &Profile, host: &Host, ports: &[u16]) -> anyhow::Result<Vec<Finding>> {
    let range_key = SysctlKey::parse("net.ipv4.ip_local_port_range").expect("static key");
    let reserved_key = SysctlKey::parse("net.ipv4.ip_local_reserved_ports").expect("static key");
    let read = |key: &SysctlKey| -> anyhow::Result<Option<Value>> {
        Ok(match host.read_sysctl(key)? {
            Some(raw) => Some(
                tunables::shape_of(key)
                    .parse_live(&raw)
                    .map_err(|m| anyhow::anyhow!("cannot understand {key}: {m}"))?,
            ),
            None => None,
        })
    };
    let now_range = numbers(read(&range_key)?);
    let after_range = numbers(effective(profile, host, "net.ipv4.ip_local_port_range")?);
    let as_set = |v: Option<Value>| match v {
        Some(Value::Ports(p)) => p,
        _ => PortSet::default(),
    };
    let now_reserved = as_set(read(&reserved_key)?);
    let after_reserved = as_set(effective(
        profile,
        host,
        "net.ipv4.ip_local_reserved_ports",
    )?);
    let inside = |r: &Option<Vec<u64>>, p: u16| {
        r.as_ref()
            .is_some_and(|r| r[0] <= p as u64 && p as u64 <= r[1])
    };
    let mut out = Vec::new();
    for &port in ports {
        let mut f = finding(
            &format!("listen_port.{port}"),
            &format!("listen port {port}"),
            Scope::NetNamespace,
        );
        f.rule = "not exposed".into();
        f.why = "A listen port inside ip_local_port_range can be handed to an outgoing \
                 connection before the server binds it; the server then fails with EADDRINUSE."
            .into();
        f.wanted = "outside the range or in ip_local_reserved_ports".into();
        let exposed_now = inside(&now_range, port) && !now_reserved.contains(port);
        let exposed_after = inside(&after_range, port) && !after_reserved.contains(port);
        f.current = Some(match (&after_range, after_reserved.contains(port)) {
            (Some(r), true) => format!("reserved (range {}-{} after apply)", r[0], r[1]),
            (Some(r), false) if inside(&after_range, port) => {
                format!("inside {}-{} after apply, not reserved", r[0], r[1])
            }
            (Some(r), false) => format!("outside {}-{}", r[0], r[1]),
            (None, _) => "range not visible".into(),
        });
        if exposed_after {
            f.verdict = Verdict::Fail;
            f.fix = format!(
                "add `net.ipv4.ip_local_reserved_ports: \"{port}\"` to the profile (apply merges it \
                 with ports already reserved)"
            );
        } else if exposed_now {
            f.verdict = Verdict::Fail;
            f.detail = Some("exposed now; tunegate apply reserves it".into());
            f.fix = "tunegate apply".into();
        }
        out.push(f);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
