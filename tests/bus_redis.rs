//! The preflight check of a cross-host bus against real Redis servers from Debian's package: a
//! Redis 7 Cluster of 3 masters and 3 replicas on loopback (scripts/redis-cluster.sh), a plain
//! server, a cluster that lost a shard, and nothing listening.

mod common;

use std::process::Command;
use std::time::Duration;

use common::redis::Redis;
use common::*;

fn preflight(bus: &str) -> (i32, serde_json::Value) {
    let out = Command::new(bin())
        .args(["preflight", "--format", "json", "--bus", bus])
        .output()
        .unwrap();
    let r = json(&out);
    let f = r["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == "bus.redis")
        .cloned()
        .unwrap_or_else(|| panic!("no bus.redis finding: {r:#}"));
    (code(&out), f)
}

#[test]
fn the_bus_check_passes_a_whole_cluster_and_says_what_is_wrong_otherwise() {
    let cluster = Redis::cluster(17100);
    let (_, f) = preflight("redis://127.0.0.1:17100,127.0.0.1:17101");
    assert_eq!(f["verdict"], "pass", "{f:#}");
    assert_eq!(f["scope"], "service");
    assert!(
        f["current"].as_str().unwrap().starts_with("Redis 7."),
        "{f:#}"
    );
    assert!(
        f["detail"]
            .as_str()
            .unwrap()
            .contains("cluster ok, 6 nodes"),
        "{f:#}"
    );

    // One seed down: the others still answer for the cluster, a warning names it.
    let (_, f) = preflight("redis://127.0.0.1:17100,127.0.0.1:17199");
    assert_eq!(f["verdict"], "warn", "{f:#}");
    assert!(
        f["detail"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1:17199: cannot connect")
    );

    // A plain server is not a cluster node.
    let plain = Redis::run(&["standalone", "17190"]);
    let (code_plain, f) = preflight("redis://127.0.0.1:17190");
    assert_eq!(
        (code_plain, f["verdict"].as_str()),
        (1, Some("fail")),
        "{f:#}"
    );
    assert!(
        f["detail"].as_str().unwrap().contains("cluster_enabled:0"),
        "{f:#}"
    );
    drop(plain);

    // A shard lost with its replica: slots go unserved and the cluster says fail.
    let replica = (17103..17106)
        .find(|&p| {
            let info = Command::new("redis-cli")
                .args(["-p", &p.to_string(), "info", "replication"])
                .output()
                .unwrap();
            stdout(&info).contains("master_port:17100")
        })
        .expect("a replica of 17100");
    for port in [17100, replica] {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(cluster.pid(port)),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    let f = eventually(
        Duration::from_secs(20),
        || "the cluster to notice the lost shard".into(),
        || {
            let (_, f) = preflight("redis://127.0.0.1:17101");
            (f["verdict"] == "fail").then_some(f)
        },
    );
    assert!(
        f["detail"].as_str().unwrap().contains("cluster_state:fail"),
        "{f:#}"
    );
    drop(cluster);

    // Nothing there at all.
    let (code_none, f) = preflight("redis://127.0.0.1:17100");
    assert_eq!(
        (code_none, f["verdict"].as_str()),
        (1, Some("fail")),
        "{f:#}"
    );
    assert!(f["detail"].as_str().unwrap().contains("cannot connect"));
}

#[test]
fn a_bad_bus_url_is_bad_usage() {
    for url in [
        "http://127.0.0.1:1",
        "redis://nowhere",
        "redis://user:secret@127.0.0.1:1",
    ] {
        let out = Command::new(bin())
            .args(["preflight", "--bus", url])
            .output()
            .unwrap();
        assert_eq!(code(&out), 2, "{url}: {}", stderr(&out));
    }
    // A password file that cannot be read is bad input too, named in the error.
    let out = Command::new(bin())
        .args(["preflight", "--bus", "redis://127.0.0.1:1"])
        .args(["--bus-password-file", "/nonexistent/redis.pw"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("/nonexistent/redis.pw"),
        "{}",
        stderr(&out)
    );
}
