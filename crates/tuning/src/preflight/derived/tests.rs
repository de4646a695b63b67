use super::*;
use crate::host::fake;

fn tree(extra: &[(&str, &str)]) -> (tempfile::TempDir, Host) {
    fake::netns_tree(extra)
}

fn findings(host: &Host, text: &str, ports: &[u16]) -> Vec<Finding> {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("p.yaml");
    std::fs::write(&p, text).unwrap();
    let profile = crate::profile::load(p.to_str().unwrap(), false).unwrap();
    super::super::check(&profile, host, ports).unwrap().findings
}

fn get<'a>(f: &'a [Finding], id: &str) -> &'a Finding {
    f.iter()
        .find(|x| x.id == id)
        .unwrap_or_else(|| panic!("no {id}"))
}

#[test]
fn a_wide_range_without_a_reservation_fails_the_port_guard() {
    let (_d, host) = tree(&[]);
    let f = findings(
        &host,
        "sysctl:\n  net.ipv4.ip_local_port_range: \"1024 65535\"\n",
        &[3000, 6379],
    );
    assert_eq!(get(&f, "derived.listen_port.3000").verdict, Verdict::Fail);
    assert_eq!(get(&f, "derived.listen_port.6379").verdict, Verdict::Fail);

    let f = findings(
        &host,
        "sysctl:\n  net.ipv4.ip_local_port_range: \"1024 65535\"\n  net.ipv4.ip_local_reserved_ports: \"3000,6379\"\n",
        &[3000, 6379],
    );
    assert_eq!(get(&f, "derived.listen_port.3000").verdict, Verdict::Pass);

    // Exposed now, reserved by the profile: apply fixes it, so the fix says so.
    let f = findings(
        &host,
        "sysctl:\n  net.ipv4.ip_local_reserved_ports: \"40000\"\n",
        &[40000],
    );
    let guard = get(&f, "derived.listen_port.40000");
    assert_eq!(guard.verdict, Verdict::Fail);
    assert_eq!(guard.fix, "tunegate apply");
    let f = findings(&host, "target_connections: 1\n", &[40000, 8080]);
    assert_eq!(get(&f, "derived.listen_port.40000").verdict, Verdict::Fail);
    assert_eq!(get(&f, "derived.listen_port.8080").verdict, Verdict::Pass);
}

#[test]
fn a_proxy_warns_when_a_pair_of_addresses_runs_out_of_ports() {
    let (_d, host) = tree(&[]);
    // The fake tree's range is 32768-60999 (28,232 ports), settable.
    let proxy = |upstreams: u32, sources: u32, extra: &str| {
        format!(
            "target_connections: 100000\nproxy:\n  upstreams: {upstreams}\n  \
             source_addresses: {sources}\n{extra}"
        )
    };
    let f = findings(&host, &proxy(2, 1, ""), &[]);
    let g = get(&f, "derived.upstream_ports");
    assert_eq!(g.verdict, Verdict::Warn, "{g:?}");
    assert!(
        g.current.as_ref().unwrap().starts_with("60000 connections"),
        "{g:?}"
    );
    assert!(g.wanted.contains("28232 ports"), "{g:?}");
    // 120,000 / 28,232 -> 5 pairs: 5 upstreams from one address, 3 from two.
    assert!(
        g.fix.contains("at least 5 pairs") && g.fix.contains("(5 upstreams"),
        "{g:?}"
    );
    let f = findings(&host, &proxy(2, 2, ""), &[]);
    assert!(
        get(&f, "derived.upstream_ports")
            .fix
            .contains("(3 upstreams")
    );
    assert_eq!(
        get(
            &findings(&host, &proxy(5, 1, ""), &[]),
            "derived.upstream_ports"
        )
        .verdict,
        Verdict::Pass
    );
    // A wider range after apply passes; reserved ports inside it count against it.
    let wide = "sysctl:\n  net.ipv4.ip_local_port_range: \"1024 65535\"\n";
    assert_eq!(
        get(
            &findings(&host, &proxy(2, 1, wide), &[]),
            "derived.upstream_ports"
        )
        .verdict,
        Verdict::Pass
    );
    let reserved = format!("{wide}  net.ipv4.ip_local_reserved_ports: \"10000-14999\"\n");
    let g = get(
        &findings(&host, &proxy(2, 1, &reserved), &[]),
        "derived.upstream_ports",
    )
    .clone();
    assert_eq!(g.verdict, Verdict::Warn, "{g:?}");
    assert!(
        g.wanted.contains("59512 ports") && g.wanted.contains("5000 of them reserved"),
        "{g:?}"
    );
    // No proxy section: no finding.
    let f = findings(&host, "target_connections: 100000\n", &[]);
    assert!(f.iter().all(|x| x.id != "derived.upstream_ports"));
}

#[test]
fn parity_and_privileged_start_are_warned() {
    let (_d, host) = tree(&[]);
    let f = findings(
        &host,
        "sysctl:\n  net.ipv4.ip_local_port_range: \"1000 61000\"\n",
        &[],
    );
    assert_eq!(get(&f, "derived.port_range_parity").verdict, Verdict::Warn);
    assert_eq!(
        get(&f, "derived.port_range_unprivileged").verdict,
        Verdict::Warn
    );
    let f = findings(&host, "target_connections: 1\n", &[]);
    assert_eq!(get(&f, "derived.port_range_parity").verdict, Verdict::Pass);
}

#[test]
fn tcp_mem_budget_scales_with_the_target() {
    let (_d, host) = tree(&[("net/ipv4/tcp_mem", "1000\t2000\t300000\n")]);
    let f = findings(&host, "target_connections: 100000\n", &[]);
    // 100000 x 8 KiB = 200000 pages: above the pressure mark, below the high one.
    assert_eq!(get(&f, "derived.tcp_mem").verdict, Verdict::Warn);
    let f = findings(&host, "target_connections: 1000000\n", &[]);
    assert_eq!(get(&f, "derived.tcp_mem").verdict, Verdict::Fail);
    let (_d, host) = tree(&[]);
    let f = findings(&host, "target_connections: 10\n", &[]);
    assert_eq!(get(&f, "derived.tcp_mem").verdict, Verdict::Warn);
}

/// A load test on one machine: both ends of every connection are sockets and descriptors
/// here. At this machine's own figures (fs.file-max 2,466,170, 24 GiB), a million passes
/// the descriptor ceiling with little to spare and its sockets' slab fits; two million
/// connections would not.
#[test]
fn clients_on_the_host_count_both_ends() {
    let (d, host) = tree(&[
        ("fs/file-max", "2466170\n"),
        ("net/ipv4/tcp_mem", "287901\t383869\t575802\n"),
    ]);
    std::fs::write(
        d.path().join("proc/meminfo"),
        "MemTotal:       24683520 kB\n",
    )
    .unwrap();
    let one_end = findings(&host, "target_connections: 1000000\n", &[]);
    assert_eq!(get(&one_end, "derived.file_max").verdict, Verdict::Pass);
    assert_eq!(
        get(&one_end, "derived.socket_memory").verdict,
        Verdict::Pass
    );
    let both = "target_connections: 1000000\nclients_on_host: true\nlimits:\n  nofile: 20000\n";
    let f = findings(&host, both, &[]);
    let fm = get(&f, "derived.file_max_both_ends");
    assert_eq!(fm.verdict, Verdict::Pass, "{fm:?}");
    assert!(fm.wanted.starts_with("2000000 "), "{}", fm.wanted);
    assert!(
        get(&f, "derived.tcp_mem")
            .wanted
            .contains("2000000 sockets")
    );
    let mem = get(&f, "derived.socket_memory");
    assert_eq!(mem.verdict, Verdict::Pass, "{mem:?}");
    assert_eq!(mem.current.as_deref(), Some("23.5 GiB"));
    let f = findings(
        &host,
        "target_connections: 1200000\nclients_on_host: true\n",
        &[],
    );
    assert_eq!(get(&f, "derived.file_max_both_ends").verdict, Verdict::Warn);
    let f = findings(
        &host,
        "target_connections: 2000000\nclients_on_host: true\n",
        &[],
    );
    assert_eq!(get(&f, "derived.file_max_both_ends").verdict, Verdict::Fail);
    let mem = get(&f, "derived.socket_memory");
    assert_eq!(mem.verdict, Verdict::Warn);
    assert!(mem.fix.contains("at least 28 GiB"), "{}", mem.fix);
}

/// The established hash as this machine has it (262,144 buckets, shared with a namespace
/// as a negative number): 200,000 connections with both ends here pass, a million warn with
/// the boot parameter and the namespace knob; a namespace with a table of its own passes.
#[test]
fn the_established_hash_is_checked_against_the_sockets() {
    let (_d, host) = tree(&[("net/ipv4/tcp_ehash_entries", "-262144\n")]);
    let both = |n: u64| format!("target_connections: {n}\nclients_on_host: true\n");
    let f = findings(&host, &both(200_000), &[]);
    let e = get(&f, "derived.established_hash");
    assert_eq!(e.verdict, Verdict::Pass, "{e:?}");
    assert_eq!(
        e.current.as_deref(),
        Some("262144 buckets (the host's, shared by this namespace)")
    );
    let f = findings(&host, &both(1_000_000), &[]);
    let e = get(&f, "derived.established_hash");
    assert_eq!(e.verdict, Verdict::Warn, "{e:?}");
    assert_eq!(e.detail.as_deref(), Some("7.6 sockets per bucket"));
    assert!(e.fix.contains("thash_entries=2097152"), "{}", e.fix);
    assert!(
        e.fix.contains("tcp_child_ehash_entries = 2097152"),
        "{}",
        e.fix
    );
    let (_d, own) = tree(&[("net/ipv4/tcp_ehash_entries", "2097152\n")]);
    let f = findings(&own, &both(1_000_000), &[]);
    assert_eq!(get(&f, "derived.established_hash").verdict, Verdict::Pass);
    let (_d, old_kernel) = tree(&[]);
    let f = findings(&old_kernel, &both(1_000_000), &[]);
    assert!(f.iter().all(|x| x.id != "derived.established_hash"));
}

#[test]
fn conntrack_is_checked_only_when_loaded() {
    let (_d, host) = tree(&[("net/netfilter/nf_conntrack_max", "65536\n")]);
    let f = findings(&host, "target_connections: 100000\n", &[]);
    assert_eq!(get(&f, "derived.conntrack").verdict, Verdict::Fail);
    let (_d, host) = tree(&[]);
    let f = findings(&host, "target_connections: 100000\n", &[]);
    assert!(f.iter().all(|x| x.id != "derived.conntrack"));
}

#[test]
fn descriptor_ceilings_follow_nofile() {
    let (_d, host) = tree(&[]);
    let f = findings(&host, "limits:\n  nofile: 2097152\n", &[]);
    assert_eq!(get(&f, "derived.nr_open").verdict, Verdict::Fail);
    assert_eq!(get(&f, "derived.file_max").verdict, Verdict::Fail);
    let f = findings(&host, "target_connections: 100000\n", &[]);
    let budget = get(&f, "derived.connection_budget");
    let (_, hard) = host.nofile().unwrap();
    if hard < 100_000 {
        assert_eq!(budget.verdict, Verdict::Warn);
    }
}
