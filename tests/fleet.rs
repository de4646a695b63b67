//! The fleet of "Optimizing Socket.IO for 100k Concurrent Users", on loopback: Debian's nginx
//! running the shipped example (packaging/nginx/tunegate.conf, with its upstream list and
//! listen address replaced) in front of two `tunegate serve --bus` hosts joined by a 3+3 Redis
//! Cluster, driven by Python `websockets` from their own source addresses
//! (tests/clients/fleet.py).

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::redis::{Host, Redis};
use common::*;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/nginx/tunegate.conf");

/// nginx running the example configuration, in the foreground; stopped on drop.
struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// The example, listening on `listen`, proxying to `upstreams`.
    fn start(listen: &str, upstreams: &[&str]) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, example_for(listen, upstreams, dir.path())).unwrap();
        let nginx = ["/usr/sbin/nginx", "nginx"]
            .into_iter()
            .find(|n| Path::new(n).exists() || n == &"nginx")
            .unwrap();
        let test = Command::new(nginx).arg("-t").arg("-c").arg(&conf).output();
        let test = test.expect("nginx (scripts/deps.sh installs it)");
        assert!(test.status.success(), "nginx -t: {}", stderr(&test));
        let pid = format!(
            "pid {}; daemon off;",
            dir.path().join("nginx.pid").display()
        );
        // Its own process group: the drop signals the master and its workers together.
        let child = Command::new(nginx)
            .arg("-c")
            .arg(&conf)
            .args(["-g", &pid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let n = Nginx { child, dir };
        let addr: std::net::SocketAddr = listen.parse().unwrap();
        eventually(
            Duration::from_secs(10),
            || format!("nginx to listen on {listen}: {}", n.log()),
            || std::net::TcpStream::connect(addr).ok().map(|_| ()),
        );
        n
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    /// SIGTERM (nginx's fast shutdown: the master stops its workers), then, after 5 s, SIGKILL to
    /// the whole group. Killing only the master would leave its workers listening, orphaned.
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, killpg};
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The shipped example with only what a deployment changes: the hosts, the listen address, and
/// (for a test) where the error log goes.
fn example_for(listen: &str, upstreams: &[&str], dir: &Path) -> String {
    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    let servers: String = upstreams
        .iter()
        .map(|u| format!("        server {u} max_fails=1 fail_timeout=5s;\n"))
        .collect();
    let mut out = String::new();
    let mut replaced = (false, false);
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("server 10.0.0.") {
            if !replaced.0 {
                out.push_str(&servers);
                replaced.0 = true;
            }
        } else if t.starts_with("listen 80 ") {
            out.push_str(&line.replace("listen 80 ", &format!("listen {listen} ")));
            out.push('\n');
            replaced.1 = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(replaced == (true, true), "the example changed shape");
    let log = dir.join("error.log");
    out.replace("/var/log/nginx/error.log", log.to_str().unwrap())
}

/// Two hosts (nodes 1 and 2) on a cluster at `port`, nginx on `front` in front of them.
fn fleet(port: u16, front: &str, ips: [&str; 2]) -> (Redis, [Host; 2], Nginx) {
    let cluster = Redis::cluster(port);
    let bus = format!("redis://127.0.0.1:{port},127.0.0.1:{}", port + 1);
    let host = |i: usize| {
        let addr = format!("{}:9101", ips[i]);
        Host::start(&addr, &bus, &["--node", &(i + 1).to_string()])
    };
    let hosts = [host(0), host(1)];
    let upstreams = [hosts[0].addr.to_string(), hosts[1].addr.to_string()];
    let nginx = Nginx::start(front, &[&upstreams[0], &upstreams[1]]);
    (cluster, hosts, nginx)
}

fn context(hosts: &[Host], nginx: &Nginx) -> String {
    let mut s: String = hosts
        .iter()
        .map(|h| format!("--- {}\n{}", h.addr, h.log()))
        .collect();
    s.push_str(&format!("--- nginx\n{}", nginx.log()));
    s
}

#[test]
fn through_nginx_clients_stick_to_a_host_and_rooms_span_both() {
    let (_cluster, hosts, nginx) = fleet(17280, "127.0.0.90:9180", ["127.0.0.91", "127.0.0.92"]);
    let url = "ws://127.0.0.90:9180/";
    python_client(&[], "fleet", &["sticky", url], &context(&hosts, &nginx));
    python_client(&[], "fleet", &["rooms", url], &context(&hosts, &nginx));
}

#[test]
fn a_host_stopped_behind_nginx_moves_its_clients_to_the_other_without_losing_messages() {
    let (_cluster, hosts, nginx) = fleet(17290, "127.0.0.93:9180", ["127.0.0.94", "127.0.0.95"]);
    let url = "ws://127.0.0.93:9180/";
    let pid = hosts[1].pid().to_string();
    python_client(
        &[],
        "fleet",
        &["host_stopped", url, &pid, "2"],
        &context(&hosts, &nginx),
    );
}

/// One host behind nginx, trusting it: the per-address limit counts each real client (from the
/// X-Forwarded-For nginx sends), never the proxy's address, never an address a client claims;
/// the refusals and the ignored headers show in the log and on /metrics.
#[test]
fn behind_a_trusted_proxy_the_per_address_limit_counts_real_clients() {
    let host = Host::start_with(
        "127.0.0.96:9101",
        &[
            "--trusted-proxy",
            "127.0.0.1",
            "--max-connections-per-address",
            "3",
        ],
    );
    let nginx = Nginx::start("127.0.0.97:9180", &["127.0.0.96:9101"]);
    let ctx = || context(std::slice::from_ref(&host), &nginx);
    python_client(
        &[],
        "fleet",
        &["trusted_proxy", "ws://127.0.0.97:9180/", &host.url()],
        &ctx(),
    );
    let log = host.log();
    assert!(
        log.contains("trusted proxies 127.0.0.1, at most 3 connections per address"),
        "{}",
        ctx()
    );
    assert!(
        log.contains("refused an upgrade from 127.0.0.121 (via proxy 127.0.0.1) with 429"),
        "{}",
        ctx()
    );
    assert!(
        log.contains("ignored X-Forwarded-For/X-Real-IP from 127.0.0.124: not a --trusted-proxy"),
        "{}",
        ctx()
    );
    assert_eq!(
        log.matches("ignored X-Forwarded-For").count(),
        1,
        "{}",
        ctx()
    );
}
