//! Beyond one host: `tunegate serve` processes on their own loopback addresses, joined by a
//! real Redis 7 Cluster (3 masters, 3 replicas, Debian's redis-server), driven by Python's
//! `websockets` (tests/clients/cross_host.py). Each test has its own cluster and addresses.

mod common;

use common::redis::{Host, Redis};
use common::*;

fn seeds(port: u16) -> String {
    format!("redis://127.0.0.1:{port},127.0.0.1:{}", port + 1)
}

/// Every host's log, for a failure message.
fn logs(hosts: &[&Host]) -> String {
    hosts
        .iter()
        .map(|h| format!("--- {}\n{}", h.addr, h.log()))
        .collect()
}

/// Two hosts, the second with two workers (whose rooms also cross through Redis): exactly-once
/// delivery in per-publisher order, nothing for non-members, direct messages and counts
/// across hosts, and bounces for connections gone from another host.
#[test]
fn rooms_direct_messages_and_counts_span_hosts() {
    let _cluster = Redis::cluster(17200);
    let bus = seeds(17200);
    let a = Host::start("127.0.0.21:9101", &bus, &[]);
    let dir = tempfile::tempdir().unwrap();
    let worker = |i: &str, incarnation: &str| {
        let bus_dir = dir.path().to_str().unwrap().to_string();
        Host::start(
            "127.0.0.22:9101",
            &bus,
            &[
                "--workers",
                "2",
                "--worker",
                i,
                "--incarnation",
                incarnation,
                "--bus-dir",
                &bus_dir,
            ],
        )
    };
    let (b0, b1) = (worker("0", "10"), worker("1", "11"));
    let context = logs(&[&a, &b0, &b1]);
    python_client(
        &[],
        "cross_host",
        &["steady", &a.url(), &b0.url(), &b1.url()],
        &context,
    );
    // The clients are gone, so are the members: no process stays subscribed to the room.
    let subscribers = || {
        let out = std::process::Command::new("redis-cli")
            .args([
                "-c",
                "-p",
                "17200",
                "pubsub",
                "shardnumsub",
                "tg:r:{steady}",
            ])
            .output()
            .unwrap();
        stdout(&out)
            .lines()
            .nth(1)
            .unwrap_or("?")
            .trim()
            .to_string()
    };
    eventually_true(
        std::time::Duration::from_secs(3),
        || format!("subscribers of the room left: {}", subscribers()),
        || subscribers() == "0",
    );
    // Every command went straight to the shard of its slot: a command sent elsewhere costs a
    // MOVED and a fresh read of the whole slot map (fred re-reads it on every MOVED).
    for port in 17200..17206 {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "info", "errorstats"])
            .output()
            .unwrap();
        assert!(
            !stdout(&out).contains("MOVED"),
            "port {port}: {}",
            stdout(&out)
        );
    }
    // Both of b's workers claimed the same node: one host, one node id.
    let node = |h: &Host| {
        let log = h.log();
        let at = log.find(", node ").expect("node in the listening line");
        log[at + 2..].split([' ', ',']).nth(1).unwrap().to_string()
    };
    assert_eq!(node(&b0), node(&b1), "{}", logs(&[&b0, &b1]));
    assert_ne!(node(&a), node(&b0), "{}", logs(&[&a, &b0]));
}

/// A cluster on `port`.. and two single-worker hosts, on `ips`, for `test`.
fn two_hosts(port: u16, ips: [&str; 2], test: impl FnOnce(&Redis, &Host, &Host)) {
    let cluster = Redis::cluster(port);
    let bus = seeds(port);
    let a = Host::start(&format!("{}:9101", ips[0]), &bus, &[]);
    let b = Host::start(&format!("{}:9101", ips[1]), &bus, &[]);
    test(&cluster, &a, &b);
}

/// `tests/clients/cross_host.py CMD A B EXTRA...`.
fn between(cmd: &str, a: &Host, b: &Host, extra: &[&str]) -> String {
    let (url_a, url_b) = (a.url(), b.url());
    let args = [&[cmd, &url_a, &url_b][..], extra].concat();
    python_client(&[], "cross_host", &args, &logs(&[a, b]))
}

/// At rest, the cluster's work is per process, not per room: 150 rooms held on two hosts cost
/// fewer commands in 12 s than there are rooms (each room's count is written when it changes,
/// and refreshed only every `ROOM_REFRESH`; liveness is one lease per process).
#[test]
fn rooms_held_at_rest_cost_the_cluster_per_process_not_per_room() {
    two_hosts(17300, ["127.0.0.33", "127.0.0.34"], |_, a, b| {
        between("idle_cost", a, b, &["17300"]);
    });
}

#[test]
fn a_sigkilled_host_stops_counting_within_the_lease_and_the_others_keep_their_clients() {
    two_hosts(17210, ["127.0.0.31", "127.0.0.32"], |_, a, b| {
        between("host_killed", a, b, &[&b.pid().to_string()]);
    });
}

#[test]
fn a_host_stopped_cleanly_stops_counting_at_once_and_its_ids_bounce() {
    two_hosts(17260, ["127.0.0.71", "127.0.0.72"], |_, a, b| {
        between("host_stopped", a, b, &[&b.pid().to_string()]);
    });
}

#[test]
fn a_master_killed_fails_over_and_room_traffic_resumes_without_disconnecting_anyone() {
    two_hosts(17220, ["127.0.0.41", "127.0.0.42"], |cluster, a, b| {
        let dir = cluster.dir();
        let out = between("failover", a, b, &[dir.to_str().unwrap(), "17220"]);
        eprintln!("{out}");
    });
}

/// Redis down when the hosts start: they serve their own clients, then join the cluster when
/// it comes; the whole cluster killed: they go on serving their own rooms; restarted: they
/// follow it again.
#[test]
fn hosts_start_without_redis_join_it_later_and_follow_a_full_restart() {
    let bus = seeds(17230);
    let a = Host::start("127.0.0.51:9101", &bus, &[]);
    let b = Host::start("127.0.0.52:9101", &bus, &[]);
    assert!(
        a.log().contains("not reachable within 2 s (")
            && a.log().contains("Connection refused")
            && a.log().contains("serving local clients"),
        "{}",
        a.log()
    );
    python_client(&[], "cross_host", &["local", &a.url()], &a.log());
    let cluster = Redis::cluster(17230);
    between("resume", &a, &b, &[]);
    cluster.kill_all();
    python_client(&[], "cross_host", &["local", &a.url()], &a.log());
    cluster.restart();
    between("resume", &a, &b, &[]);
}

/// A node id is one host's: a second host claiming it is refused with a clear error, and a
/// host that derives its id takes a free one.
#[test]
fn two_hosts_claiming_one_node_id_is_an_error_not_cross_talk() {
    let _cluster = Redis::cluster(17240);
    let bus = seeds(17240);
    let a = Host::start("127.0.0.61:9101", &bus, &["--node", "5"]);
    let log = tempfile::NamedTempFile::new().unwrap();
    let out = std::process::Command::new(bin())
        .args(["serve", "--listen", "127.0.0.62:9101", "--bus", &bus])
        .args(["--node", "5"])
        .stderr(log.reopen().unwrap())
        .output()
        .unwrap();
    let said = std::fs::read_to_string(log.path()).unwrap();
    assert_eq!(code(&out), 1, "{said}");
    assert!(
        said.contains("node id 5 is held by another host")
            && said.contains("127.0.0.61:9101")
            && said.contains("give this one another --node"),
        "{said}"
    );
    let c = Host::start("127.0.0.63:9101", &bus, &[]);
    assert!(
        c.log().contains("Redis Cluster reached; node id"),
        "{}",
        c.log()
    );
    assert!(!c.log().contains("node id 5 is"), "{}", c.log());
    drop(a);
}

/// `preflight --bus ARGS...`: its bus.redis finding.
fn preflight_bus(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(bin())
        .args(["preflight", "--format", "json", "--bus"])
        .args(args)
        .output()
        .unwrap();
    let r = json(&out);
    r["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == "bus.redis")
        .cloned()
        .unwrap_or_else(|| panic!("no bus.redis finding: {r:#}"))
}

/// A cluster that speaks only TLS and requires a password: preflight and the hosts reach it
/// with the password file and the CA file, and say exactly what is wrong without them.
#[test]
fn a_tls_cluster_with_a_password_is_reached_with_the_ca_and_password_files() {
    let tls = common::redis::tls_files();
    let _cluster = Redis::secure_cluster(17270, tls.path(), "s3cret-pw");
    let files = tempfile::tempdir().unwrap();
    let (pw, wrong) = (files.path().join("pw"), files.path().join("wrong"));
    std::fs::write(&pw, "s3cret-pw\n").unwrap();
    std::fs::write(&wrong, "nope\n").unwrap();
    let (pw, wrong) = (pw.to_str().unwrap(), wrong.to_str().unwrap());
    let ca = tls.path().join("ca.crt");
    let ca = ca.to_str().unwrap();
    let bus = "rediss://127.0.0.1:17270,127.0.0.1:17271";

    let f = preflight_bus(&[bus, "--bus-password-file", pw, "--bus-ca-file", ca]);
    assert_eq!(f["verdict"], "pass", "{f:#}");
    let detail = |f: &serde_json::Value| f["detail"].as_str().unwrap().to_string();
    let f = preflight_bus(&[bus, "--bus-ca-file", ca]);
    assert!(
        f["verdict"] == "fail" && detail(&f).contains("NOAUTH"),
        "{f:#}"
    );
    let f = preflight_bus(&[bus, "--bus-password-file", wrong, "--bus-ca-file", ca]);
    assert!(
        f["verdict"] == "fail" && detail(&f).contains("WRONGPASS"),
        "{f:#}"
    );
    assert!(
        !detail(&f).contains("nope"),
        "the password must not be repeated: {f:#}"
    );
    // The system's roots do not know the test CA.
    let f = preflight_bus(&[bus, "--bus-password-file", pw]);
    assert!(
        f["verdict"] == "fail" && detail(&f).contains("certificate"),
        "{f:#}"
    );

    let secrets = ["--bus-password-file", pw, "--bus-ca-file", ca];
    let a = Host::start("127.0.0.81:9101", bus, &secrets);
    let b = Host::start("127.0.0.82:9101", bus, &secrets);
    between("steady", &a, &b, &[]);
    let c = Host::start(
        "127.0.0.83:9101",
        bus,
        &["--bus-password-file", wrong, "--bus-ca-file", ca],
    );
    let log = c.log();
    assert!(
        log.contains("not reachable within 2 s") && log.contains("WRONGPASS"),
        "{log}"
    );
}
