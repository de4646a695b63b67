//! Shared helpers for the integration tests: the real binary, run inside network namespaces
//! the tests create (`ip netns add`), never against the host's own values.

#![allow(dead_code)]

pub mod certs;
pub mod redis;
pub mod ws;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tunegate")
}

/// Per-namespace keys the tests change inside their namespaces.
pub const NETNS_KEYS: &[&str] = &[
    "net/core/somaxconn",
    "net/ipv4/tcp_max_syn_backlog",
    "net/ipv4/ip_local_port_range",
    "net/ipv4/ip_local_reserved_ports",
    "net/ipv4/tcp_rmem",
    "net/ipv4/tcp_wmem",
    "net/ipv4/tcp_fin_timeout",
    "net/ipv4/ping_group_range",
    "net/ipv4/tcp_migrate_req",
];

/// Host-global keys the profiles under test name; tests must never change them.
pub const HOST_KEYS: &[&str] = &[
    "net/core/rmem_max",
    "net/core/wmem_max",
    "net/core/netdev_max_backlog",
    "net/ipv4/tcp_mem",
    "fs/file-max",
    "fs/nr_open",
];

/// The host's values of every key above, read from this test process (which stays in the host's
/// namespace: namespaces are per thread and the tests never unshare a thread).
pub fn host_snapshot() -> Vec<(String, String)> {
    NETNS_KEYS
        .iter()
        .chain(HOST_KEYS)
        .map(|k| {
            let v = std::fs::read_to_string(Path::new("/proc/sys").join(k))
                .unwrap_or_else(|e| format!("<{e}>"));
            (k.to_string(), v)
        })
        .collect()
}

/// Polls `check` every 20 ms until it gives a value, and returns it; after `limit`, fails the
/// test saying what it waited for (`what` is built only then). The one way tests wait: never a
/// sleep standing in for "long enough".
pub fn eventually<T>(
    limit: std::time::Duration,
    what: impl FnOnce() -> String,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        if start.elapsed() >= limit {
            panic!("timed out after {limit:?} waiting for {}", what());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `eventually` for a condition.
pub fn eventually_true(
    limit: std::time::Duration,
    what: impl FnOnce() -> String,
    mut check: impl FnMut() -> bool,
) {
    eventually(limit, what, || check().then_some(()))
}

/// `tunegate load URL --json --max-time 60 ARGS`, run to its end.
pub fn load(url: &str, args: &[&str]) -> Output {
    Command::new(bin())
        .args(["load", url, "--json", "--max-time", "60"])
        .args(args)
        .output()
        .expect("run tunegate load")
}

/// The JSON report of a `tunegate load` run that exited 0 with all `opened` connections open
/// and no delivery lost; `context` (a server's log) is shown with a failure.
pub fn load_whole(o: &Output, opened: u64, context: &str) -> serde_json::Value {
    let r = json(o);
    assert_eq!(code(o), 0, "{}\n{r}\n{context}", stderr(o));
    assert_eq!(
        (r["opened"].as_u64(), r["lost"].as_u64()),
        (Some(opened), Some(0)),
        "{r}"
    );
    r
}

/// `tunegate token ARGS`: the token it printed (the test fails if it did not exit 0).
pub fn token(args: &[&str]) -> String {
    let out = Command::new(bin())
        .arg("token")
        .args(args)
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    stdout(&out).trim().to_string()
}

/// Runs a client we did not write, `tests/clients/NAME.py ARGS`, through `prefix` (e.g. `ip
/// netns exec NS`, or nothing); returns its whole output after checking it exited 0 and said
/// "NAME: ok". `context` is shown on failure (a server's log).
pub fn python_client(prefix: &[&str], name: &str, args: &[&str], context: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/clients/{name}.py"));
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest);
            c
        }
        None => Command::new("python3"),
    };
    if !prefix.is_empty() {
        cmd.arg("python3");
    }
    let out = cmd.arg(&script).args(args).output().expect("python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{name} {args:?}: {text}\n{context}");
    assert!(text.contains(&format!("{name}: ok")), "{text}\n{context}");
    text
}

/// Runs `tests/clients/NAME.js ARGS` on Node's `ws` (a client library we did not write, from
/// the folder scripts/deps.sh installs it in): whether it exited 0 and said "NAME: ok", and its
/// whole output.
pub fn node_client(name: &str, args: &[&str]) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/clients/{name}.js"));
    let modules = format!(
        "{}/.cache/tunegate/test-node/node_modules",
        std::env::var("HOME").unwrap()
    );
    let out = Command::new("node")
        .arg(&script)
        .args(args)
        .env("NODE_PATH", modules)
        .output()
        .expect("node (scripts/deps.sh installs it and ws)");
    let text = format!("{}{}", stdout(&out), stderr(&out));
    let ok = out.status.success() && text.contains(&format!("{name}: ok"));
    (ok, text)
}

/// Fails loudly when the machine cannot run these tests, instead of skipping them.
pub fn require_root_and_netns() {
    assert!(
        nix_is_root(),
        "the namespace tests need root (CI runs them as root via .ci/run)"
    );
    let ok = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "`ip` (iproute2) is missing; .ci/run installs it");
}

fn nix_is_root() -> bool {
    // The effective uid is the third field of the Uid: line.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A named network namespace, deleted on drop. Every tunegate run inside it sees the
/// namespace's own copy of the per-namespace keys.
pub struct Netns {
    pub name: String,
    pub state: tempfile::TempDir,
}

impl Netns {
    pub fn new() -> Netns {
        require_root_and_netns();
        let name = format!(
            "tgtest-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip netns add");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A new namespace's loopback is down; servers in it listen on 127.0.0.1.
        let up = Command::new("ip")
            .args(["-n", &name, "link", "set", "lo", "up"])
            .status()
            .expect("ip link set lo up");
        assert!(up.success());
        Netns {
            name,
            state: tempfile::tempdir().unwrap(),
        }
    }

    /// Runs tunegate inside the namespace with its state and drop-in directories in a temp dir.
    pub fn tunegate(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, bin()])
            .args(args)
            .env("TUNEGATE_STATE_DIR", self.state_dir())
            .env("TUNEGATE_SYSCTL_DIR", self.sysctl_dir())
            .output()
            .expect("run tunegate in the namespace")
    }

    /// A TCP connection made inside the namespace. A fresh thread joins the namespace,
    /// connects and ends, so no test thread ever changes namespace; the socket stays in the
    /// namespace it was made in, usable from any thread.
    pub fn connect(&self, addr: std::net::SocketAddr) -> std::net::TcpStream {
        connect_in(&self.name, addr).expect("connect inside the namespace")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state.path().join("state")
    }

    pub fn sysctl_dir(&self) -> PathBuf {
        self.state.path().join("sysctl.d")
    }

    /// Runs `sysctl -q ARGS` inside the namespace (`-w KEY=VALUE`, `-p FILE`); it must succeed.
    pub fn sysctl(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sysctl", "-q"])
            .args(args)
            .output()
            .expect("run sysctl in the namespace");
        assert!(out.status.success(), "sysctl {args:?}: {}", stderr(&out));
    }

    /// Reads a key as the namespace sees it.
    pub fn read(&self, key: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "cat"])
            .arg(Path::new("/proc/sys").join(key))
            .output()
            .expect("run cat in the namespace");
        assert!(out.status.success(), "cat {key} failed");
        String::from_utf8(out.stdout).unwrap()
    }

    /// The namespace's values of the per-namespace keys.
    pub fn snapshot(&self) -> Vec<(String, String)> {
        NETNS_KEYS
            .iter()
            .map(|k| (k.to_string(), self.read(k)))
            .collect()
    }
}

/// Connects to `addr` from inside the named namespace (see `Netns::connect`).
pub fn connect_in(netns: &str, addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path)?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        std::net::TcpStream::connect(addr)
    })
    .join()
    .expect("connect thread")
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Writes a profile file with safe permissions (root refuses group/other-writable ones).
pub fn profile(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    p
}

pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): stdout={} stderr={}", stdout(o), stderr(o)))
}
