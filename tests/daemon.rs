//! `tunegate run` end to end, each test inside its own network namespace (the daemon applies
//! its profile there, never to the host), with a test child that records what happens to it
//! (tests/clients/test_child.py) and a fake NOTIFY_SOCKET standing in for systemd.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::redis::Redis;
use common::*;

const CHILD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/test_child.py");

struct Daemon {
    ns: Netns,
    dir: tempfile::TempDir,
    proc: Child,
    log: PathBuf,
    /// A command the daemon runs under (e.g. `prlimit --nofile=300:300`), or nothing.
    wrap: Vec<String>,
}

impl Daemon {
    /// Starts `tunegate run --config` in a fresh namespace. `config` is YAML added to the
    /// test defaults (state and status under the test dir, fast restarts, port 18080).
    fn start(config: &str, notify: Option<&Path>) -> Daemon {
        Daemon::start_in(Netns::new(), config, notify)
    }

    /// The same, in a namespace the test made (and may have started servers in).
    fn start_in(ns: Netns, config: &str, notify: Option<&Path>) -> Daemon {
        Daemon::start_wrapped(ns, config, notify, &[])
    }

    /// The same, the daemon run under `wrap` (inside the namespace).
    fn start_wrapped(ns: Netns, config: &str, notify: Option<&Path>, wrap: &[&str]) -> Daemon {
        let wrap: Vec<String> = wrap.iter().map(|s| s.to_string()).collect();
        let dir = tempfile::tempdir().unwrap();
        let cfg = profile(
            dir.path(),
            "tunegate.yaml",
            &format!(
                "state_dir: {state}\nstatus_file: {status}\nlisten: 127.0.0.1:18080\n{config}",
                state = dir.path().join("state").display(),
                status = dir.path().join("status.json").display(),
            ),
        );
        let log = dir.path().join("daemon.log");
        let proc = Daemon::spawn(&ns, &dir, &cfg, &log, notify, &wrap);
        Daemon {
            ns,
            dir,
            proc,
            log,
            wrap,
        }
    }

    /// `tunegate run --config CFG` inside `ns`, its log appended to `log`.
    fn spawn(
        ns: &Netns,
        dir: &tempfile::TempDir,
        cfg: &Path,
        log: &Path,
        notify: Option<&Path>,
        wrap: &[String],
    ) -> Child {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .args(wrap)
            .args([bin(), "run", "--config"])
            .arg(cfg)
            .env("CHILD_DIR", dir.path())
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap(),
            );
        if let Some(sock) = notify {
            cmd.env("NOTIFY_SOCKET", sock);
        }
        cmd.spawn().unwrap()
    }

    /// Stops the daemon with SIGTERM (it must exit 0) and starts it again in the same namespace
    /// with the same configuration and state directory, as `systemctl restart` does.
    fn restart(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        assert_eq!(self.exit(Duration::from_secs(10)), 0, "{}", self.log());
        let cfg = self.dir.path().join("tunegate.yaml");
        self.proc = Daemon::spawn(&self.ns, &self.dir, &cfg, &self.log, None, &self.wrap);
    }

    /// Runs a client we did not write (tests/clients/NAME.py) inside the namespace.
    fn python(&self, name: &str, args: &[&str]) -> String {
        let prefix = ["ip", "netns", "exec", &self.ns.name];
        let log = format!("daemon log:\n{}", self.log());
        python_client(&prefix, name, args, &log)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most `limit`) for a log line containing `needle`, and gives that line.
    fn log_line(&self, limit: Duration, needle: &str) -> String {
        let what = || format!("a log line with {needle:?}\nlog:\n{}", self.log());
        eventually(limit, what, || {
            self.log()
                .lines()
                .find(|l| l.contains(needle))
                .map(String::from)
        })
    }

    /// GET `url` from inside the namespace (curl): the body of a 2xx answer.
    fn get(&self, url: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns.name, "curl", "-sf", url])
            .output()
            .unwrap();
        assert!(out.status.success(), "GET {url}\n{}", self.log());
        stdout(&out)
    }

    fn events(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("events")).unwrap_or_default()
    }

    fn status(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.dir.path().join("status.json")).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    /// Waits until `pred` holds, at most `limit`; the failure shows the log and the events.
    fn wait_for(&self, limit: Duration, what: &str, pred: impl Fn(&Daemon) -> bool) {
        let what = || format!("{what}\nlog:\n{}\nevents:\n{}", self.log(), self.events());
        eventually_true(limit, what, || pred(self));
    }

    fn ready(&self) -> bool {
        self.status()["ready"] == true
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        // `ip netns exec` execs, so the pid we spawned is the daemon's.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.proc.id() as i32), sig).unwrap();
    }

    fn exit(&mut self, limit: Duration) -> i32 {
        let log = self.log.clone();
        let what = || {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            format!("the daemon to exit\n{log}")
        };
        let st = eventually(limit, what, || self.proc.try_wait().unwrap());
        st.code().unwrap_or(-1)
    }

    /// The worker whose current process handed out connection id `id` (by its incarnation,
    /// the id's top 16 bits, which the status file lists per worker).
    fn worker_of(&self, id: u64) -> Option<usize> {
        let st = self.status();
        let inc = common::ws::incarnation_of(id) as u64;
        st["workers"]
            .as_array()?
            .iter()
            .position(|w| w["incarnation"].as_u64() == Some(inc))
    }

    fn child_pid(&self) -> i32 {
        self.status()["child_pid"].as_i64().expect("a child pid") as i32
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

/// Waits until the status file at `path` says ready; panics with `log` after 10 s.
fn wait_ready(path: &Path, log: &Path) -> serde_json::Value {
    let what = || {
        let log = std::fs::read_to_string(log).unwrap_or_default();
        format!("ready:\n{log}")
    };
    eventually(Duration::from_secs(10), what, || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let st: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        (st["ready"] == true).then_some(st)
    })
}

/// SIGTERM to a daemon started by hand; it must exit 0.
fn terminate(mut proc: Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(proc.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(proc.wait().unwrap().success());
}

fn child(mode: &str) -> String {
    format!("child:\n  command: [python3, {CHILD}, {mode}, \"18080\"]\n")
}

const FAST: &str = "restart:\n  initial_backoff_ms: 50\n  max_backoff_ms: 200\n  max_crashes: 3\n  crash_window_s: 60\nstop_grace_ms: 700\n";

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn a_crash_loop_ends_the_daemon_with_a_failure() {
    let mut d = Daemon::start(&format!("{}{FAST}", child("crash")), None);
    assert_eq!(d.exit(Duration::from_secs(10)), 1, "{}", d.log());
    assert!(
        d.log().contains("crash loop: the child failed 3 times"),
        "{}",
        d.log()
    );
    assert_eq!(d.events().matches("crashing").count(), 3);
    assert_eq!(d.status()["state"], "failed");
}

#[test]
fn a_crashing_child_is_restarted_with_backoff_until_it_runs() {
    let d = Daemon::start(&format!("{}{FAST}", child("crash-twice")), None);
    d.wait_for(Duration::from_secs(10), "ready", Daemon::ready);
    assert_eq!(d.status()["restarts"], 2);
    let log = d.log();
    assert_eq!(log.matches("exited with status 3").count(), 2, "{log}");
    assert!(log.contains("restarting in"), "{log}");
}

#[test]
fn sigterm_stops_the_child_and_the_daemon_exits_0() {
    let mut d = Daemon::start(&format!("{}{FAST}", child("listen")), None);
    d.wait_for(Duration::from_secs(10), "ready", Daemon::ready);
    let pid = d.child_pid();
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.exit(Duration::from_secs(5)), 0, "{}", d.log());
    assert!(d.events().contains("SIGTERM"), "{}", d.events());
    assert!(!alive(pid));
    assert_eq!(d.status()["state"], "stopped");
}

#[test]
fn sighup_reloads_and_reaches_the_child() {
    let mut d = Daemon::start(&format!("{}{FAST}", child("listen")), None);
    d.wait_for(Duration::from_secs(10), "ready", Daemon::ready);
    d.signal(nix::sys::signal::Signal::SIGHUP);
    d.wait_for(Duration::from_secs(5), "HUP at the child", |d| {
        d.events().contains("SIGHUP")
    });
    assert!(d.log().contains("reloaded configuration"), "{}", d.log());
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.exit(Duration::from_secs(5)), 0);
}

#[test]
fn a_child_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let mut d = Daemon::start(&format!("{}{FAST}", child("ignore-term")), None);
    d.wait_for(Duration::from_secs(10), "ready", Daemon::ready);
    let pid = d.child_pid();
    let start = Instant::now();
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.exit(Duration::from_secs(5)), 0);
    assert!(
        start.elapsed() >= Duration::from_millis(600),
        "no grace period"
    );
    assert!(d.events().contains("SIGTERM-ignored"));
    assert!(d.log().contains("ignored SIGTERM"), "{}", d.log());
    assert!(!alive(pid));
}

#[test]
fn the_child_does_not_outlive_a_sigkilled_daemon() {
    let mut d = Daemon::start(&format!("{}{FAST}", child("listen")), None);
    d.wait_for(Duration::from_secs(10), "ready", Daemon::ready);
    let pid = d.child_pid();
    assert!(alive(pid));
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.exit(Duration::from_secs(5));
    let what = || format!("child {pid} to die with the daemon (orphaned?)");
    eventually_true(Duration::from_secs(3), what, || !alive(pid));
}

#[test]
fn a_child_that_hangs_without_listening_is_stopped_and_counts_as_a_crash() {
    let mut d = Daemon::start(
        &format!("{}{FAST}ready_timeout_ms: 400\n", child("hang")),
        None,
    );
    assert_eq!(d.exit(Duration::from_secs(15)), 1, "{}", d.log());
    let log = d.log();
    assert_eq!(
        log.matches("did not listen on 127.0.0.1:18080 within 400 ms")
            .count(),
        3,
        "{log}"
    );
    assert!(log.contains("crash loop"), "{log}");
    assert_eq!(d.events().matches("hanging").count(), 3);
}

#[test]
fn a_child_that_exits_cleanly_ends_the_daemon_cleanly() {
    let mut d = Daemon::start(&format!("{}{FAST}", child("exit-clean")), None);
    assert_eq!(d.exit(Duration::from_secs(10)), 0, "{}", d.log());
    assert!(
        d.log().contains("exited with status 0; not restarting"),
        "{}",
        d.log()
    );
}

#[test]
fn enforce_refuses_a_failing_host_and_warn_starts_anyway() {
    // A hard RLIMIT_NOFILE no unprivileged process here can reach: the check must fail.
    let dir = tempfile::tempdir().unwrap();
    // Above fs.nr_open: no process can have it, whatever its privileges, so this fails on any
    // machine (it used to be a fixed 1048576, and the test returned silently where that fit).
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .expect("fs.nr_open")
        .trim()
        .parse()
        .expect("a number");
    let p = profile(
        dir.path(),
        "big.yaml",
        &format!("extends: default\nlimits:\n  nofile: {}\n", nr_open + 1),
    );
    let base = format!("profile: {}\n{}{FAST}", p.display(), child("listen"));
    let mut d = Daemon::start(&format!("{base}mode: enforce\n"), None);
    assert_eq!(d.exit(Duration::from_secs(10)), 1, "{}", d.log());
    assert!(
        d.log().contains("check failed: limits.nofile.hard"),
        "{}",
        d.log()
    );
    assert!(d.log().contains("not starting the child"), "{}", d.log());
    assert!(!d.events().contains("started"), "enforce started the child");
    assert_eq!(d.status()["state"], "gated");

    let d = Daemon::start(&format!("{base}mode: warn\n"), None);
    d.wait_for(Duration::from_secs(10), "ready", Daemon::ready);
    assert!(d.log().contains("check failed: limits.nofile.hard"));
    assert!(d.events().contains("listening"));

    // The same checks (and fs.nr_open's, which the limit also exceeds), ignored by id, no
    // longer fail the gate.
    let ignore = "ignore: [limits.nofile.hard, limits.nofile.soft, derived.nr_open]";
    let mut d = Daemon::start(&format!("{base}mode: enforce\n{ignore}\n"), None);
    d.wait_for(Duration::from_secs(10), "ready", Daemon::ready);
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.exit(Duration::from_secs(5)), 0);
}

#[test]
fn drift_in_the_namespace_is_logged_and_corrected() {
    let d = Daemon::start(
        &format!(
            "{}{FAST}drift:\n  interval_s: 1\n  reapply: true\n",
            child("listen")
        ),
        None,
    );
    d.wait_for(Duration::from_secs(10), "ready", Daemon::ready);
    let want = d.ns.read("net/core/somaxconn");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &d.ns.name,
            "sh",
            "-c",
            "echo 128 > /proc/sys/net/core/somaxconn",
        ])
        .status()
        .unwrap();
    assert!(out.success());
    d.wait_for(Duration::from_secs(5), "drift corrected", |d| {
        d.log().contains("drift: net.core.somaxconn was") && d.ns.read("net/core/somaxconn") == want
    });
    assert!(d.log().contains("now 128"), "{}", d.log());
    d.wait_for(Duration::from_secs(3), "the drift counted", |d| {
        d.status()["drifts"].as_u64().unwrap_or(0) >= 1
    });
}

#[test]
fn ready_is_sent_only_once_the_child_listens() {
    let sock_dir = tempfile::tempdir().unwrap();
    let path = sock_dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let d = Daemon::start(&format!("{}{FAST}", child("slow-listen")), Some(&path));
    let mut statuses = Vec::new();
    let ready_at = loop {
        let mut buf = [0u8; 4096];
        let n = sock
            .recv(&mut buf)
            .expect("a notification before the timeout");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.contains("READY=1") {
            break std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64();
        }
        statuses.push(msg);
    };
    let events = d.events();
    let listened: f64 = events
        .lines()
        .find(|l| l.contains("listening"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .expect("the child listened");
    assert!(
        ready_at >= listened,
        "READY=1 came before the child listened\n{events}"
    );
    assert!(
        statuses.iter().any(|s| s.starts_with("STATUS=")),
        "{statuses:?}"
    );
    assert!(d.ready());
}

#[test]
fn a_bad_config_exits_2_naming_file_line_and_field() {
    let mut d = Daemon::start("child:\n  comand: [x]\n", None);
    assert_eq!(d.exit(Duration::from_secs(5)), 2);
    let log = d.log();
    assert!(log.contains("tunegate.yaml:5:3"), "{log}");
    assert!(log.contains("unknown field `comand`"), "{log}");
}

/// The README's main job: `tunegate run` with no arguments and no config file applies what it
/// can, reports what it cannot, and serves WebSocket clients on its default port.
#[test]
fn run_with_no_arguments_serves_websockets_on_the_default_port() {
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let proc = Command::new("ip")
        .args(["netns", "exec", &ns.name, bin(), "run"])
        .env("TUNEGATE_STATE_DIR", dir.path().join("state"))
        .env("TUNEGATE_STATUS_FILE", dir.path().join("status.json"))
        .env_remove("NOTIFY_SOCKET")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_ready(&dir.path().join("status.json"), &log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("set net.ipv4.tcp_max_syn_backlog"),
        "applied: {text}"
    );
    assert!(text.contains("serving on 127.0.0.1:8080"), "{text}");
    let client = Command::new("ip")
        .args(["netns", "exec", &ns.name, "python3", "-c"])
        .arg(
            "import asyncio, json\n\
             from websockets.asyncio.client import connect\n\
             async def main():\n\
             \x20   async with connect('ws://127.0.0.1:8080') as ws:\n\
             \x20       hello = json.loads(await asyncio.wait_for(ws.recv(), 5))\n\
             \x20       assert hello['op'] == 'hello', hello\n\
             \x20       print('hello', hello['id'])\n\
             asyncio.run(main())\n",
        )
        .output()
        .unwrap();
    assert!(
        client.status.success(),
        "{}",
        String::from_utf8_lossy(&client.stderr)
    );
    assert!(String::from_utf8_lossy(&client.stdout).starts_with("hello"));
    let st = Command::new("ip")
        .args(["netns", "exec", &ns.name, bin(), "status"])
        .env("TUNEGATE_STATUS_FILE", dir.path().join("status.json"))
        .output()
        .unwrap();
    assert!(st.status.success());
    assert!(String::from_utf8_lossy(&st.stdout).contains("running"));
    terminate(proc);
}

/// As under systemd/tunegate.service: not root, only CAP_NET_ADMIN (ambient). The daemon still
/// raises the namespace's net keys, and the server it starts holds no capability at all.
#[test]
fn an_unprivileged_daemon_with_cap_net_admin_tunes_and_its_child_has_no_capabilities() {
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let cfg = profile(
        dir.path(),
        "c.yaml",
        &format!(
            "profile: default\nlisten: 127.0.0.1:18090\nstate_dir: {d}/state\nstatus_file: {d}/status.json\n",
            d = dir.path().display()
        ),
    );
    let log = dir.path().join("log");
    let proc = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
        ])
        .args([
            "--clear-groups",
            "--inh-caps=+net_admin",
            "--ambient-caps=+net_admin",
            bin(),
        ])
        .args(["run", "--config"])
        .arg(&cfg)
        .env_remove("NOTIFY_SOCKET")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = wait_ready(&dir.path().join("status.json"), &log);
    assert_eq!(
        ns.read("net/ipv4/tcp_max_syn_backlog"),
        "4096\n",
        "net key not raised"
    );
    let caps = |pid: i64, field: &str| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = s.lines().find(|l| l.starts_with(field)).unwrap();
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    let child = status["child_pid"].as_i64().unwrap();
    let daemon = status["pid"].as_i64().unwrap();
    const CAP_NET_ADMIN: u64 = 1 << 12;
    assert_eq!(caps(daemon, "CapEff:"), CAP_NET_ADMIN);
    assert_eq!(
        caps(child, "CapEff:"),
        0,
        "the server inherited capabilities"
    );
    assert_eq!(caps(child, "CapAmb:"), 0);
    terminate(proc);
}

/// With stderr going to the journal (systemd sets JOURNAL_STREAM to its device:inode), every
/// line carries a syslog priority; otherwise lines are plain.
#[test]
fn log_lines_carry_priorities_when_stderr_is_the_journal() {
    use std::os::unix::fs::MetadataExt;
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let cfg = profile(
        dir.path(),
        "c.yaml",
        &format!(
            "{}{FAST}state_dir: {d}/state\nstatus_file: {d}/status.json\nlisten: 127.0.0.1:18080\n",
            child("crash"),
            d = dir.path().display()
        ),
    );
    let log = dir.path().join("log");
    let file = std::fs::File::create(&log).unwrap();
    let meta = file.metadata().unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, bin(), "run", "--config"])
        .arg(&cfg)
        .env("CHILD_DIR", dir.path())
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env_remove("NOTIFY_SOCKET")
        .stderr(file)
        .status()
        .unwrap();
    assert_eq!(out.code(), Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("tunegate serve"))
        .collect();
    assert!(!ours.is_empty());
    for line in &ours {
        assert!(
            line.len() > 3 && line.starts_with('<') && line.as_bytes()[2] == b'>',
            "no priority prefix: {line:?}"
        );
    }
    assert!(
        ours.iter().any(|l| l.starts_with("<3>crash loop")),
        "{text}"
    );
    assert!(ours.iter().any(|l| l.starts_with("<4>the child")), "{text}");
}

/// The bundled server as several workers: the daemon sizes them from the descriptor limit it
/// really has and the profile's target_connections, and restarts a killed worker alone while
/// the other workers' clients stay connected and keep receiving.
#[test]
fn workers_are_sized_from_the_limit_and_restarted_one_by_one() {
    use common::ws::{Ws, await_count, join_all, publish_and_check, spread};
    let hard = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap().1;
    // Three workers' worth of connections at this machine's hard limit.
    let target = (hard - 256) * 2 + 1;
    let dir = tempfile::tempdir().unwrap();
    let prof = profile(
        dir.path(),
        "three.yaml",
        &format!("extends: default\ntarget_connections: {target}\nlimits:\n  nofile: {hard}\n"),
    );
    let d = Daemon::start(
        &format!(
            "profile: {}\nserver:\n  ping_interval_ms: 60000\n",
            prof.display()
        ),
        None,
    );
    d.wait_for(Duration::from_secs(20), "ready", Daemon::ready);
    let st = d.status();
    assert_eq!(st["sizing"]["workers"], 3, "{st}");
    assert_eq!(st["workers"].as_array().unwrap().len(), 3);
    assert!(
        d.log().contains(&format!(
            "sizing: 3 worker(s): RLIMIT_NOFILE {hard} leaves {} connections per worker",
            hard - 256
        )),
        "{}",
        d.log()
    );
    let pids: Vec<i64> = (0..3)
        .map(|i| st["workers"][i]["pid"].as_i64().unwrap())
        .collect();
    let addr: std::net::SocketAddr = "127.0.0.1:18080".parse().unwrap();
    let connect = || Ws::handshake(d.ns.connect(addr), "/").unwrap();
    let mut c = spread(connect, |id| d.worker_of(id), &[0, 1, 2], 2);
    for list in c.values_mut() {
        join_all(list.iter_mut(), "all");
    }
    for w in [0, 1, 2] {
        await_count(&mut c.get_mut(&w).unwrap()[0].0, "all", 6);
    }

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[1] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    for (ws, _) in c.get_mut(&1).unwrap().iter_mut() {
        assert!(ws.ends_within(Duration::from_secs(5)));
    }
    c.remove(&1);
    d.wait_for(Duration::from_secs(10), "worker 1 back", |d| {
        let w = &d.status()["workers"][1];
        w["listening"] == true && w["pid"].as_i64() != Some(pids[1])
    });
    let st = d.status();
    for i in [0, 2] {
        assert_eq!(
            st["workers"][i]["pid"], pids[i],
            "worker {i} was restarted too"
        );
        assert_eq!(st["workers"][i]["restarts"], 0);
    }
    assert_eq!(st["workers"][1]["restarts"], 1);
    assert_eq!(st["workers"][1]["last_exit"], "was killed by SIGKILL");
    assert!(
        d.log().contains("the other 2 worker(s) keep serving"),
        "{}",
        d.log()
    );
    // The survivors' clients never noticed: still open, still relaying to each other.
    publish_and_check(&mut c, (0, 0), &[0, 2], "survivors", 10);
    // The restarted worker's clients come back and are members again.
    c.extend(spread(connect, |id| d.worker_of(id), &[1], 2));
    join_all(c.get_mut(&1).unwrap().iter_mut(), "all");
    for w in [0, 1, 2] {
        await_count(&mut c.get_mut(&w).unwrap()[0].0, "all", 6);
    }
    publish_and_check(&mut c, (1, 1), &[0, 1, 2], "after", 10);

    let out = Command::new(bin())
        .args(["status", "--status-file"])
        .arg(d.dir.path().join("status.json"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("sizing: 3 worker(s)"), "{text}");
    assert!(text.contains("worker 1: pid"), "{text}");
    assert!(
        text.contains("restarts 1, last was killed by SIGKILL"),
        "{text}"
    );
}

/// Issue 12: after a worker is SIGKILLed and restarted, and after the whole daemon is restarted,
/// no new connection gets an id any earlier connection had, and a `send` to a dead id answers
/// `no_such_connection` instead of reaching a stranger. Clients: Python `websockets`.
#[test]
fn connection_ids_are_never_handed_out_twice_across_worker_and_daemon_restarts() {
    let mut d = Daemon::start(
        &format!("server:\n  workers: 3\n  ping_interval_ms: 60000\n{FAST}"),
        None,
    );
    d.wait_for(Duration::from_secs(20), "ready", Daemon::ready);
    let incarnations = |d: &Daemon| -> Vec<u64> {
        let st = d.status();
        (0..3)
            .map(|i| {
                st["workers"][i]["incarnation"]
                    .as_u64()
                    .expect("an incarnation")
            })
            .collect()
    };
    let first = incarnations(&d);
    let status = d.dir.path().join("status.json");
    let ids = d.dir.path().join("ids.json");
    let url = "ws://127.0.0.1:18080/";
    let text = d.python(
        "stale_ids",
        &["kill", url, status.to_str().unwrap(), ids.to_str().unwrap()],
    );
    eprintln!("{text}");
    let second = incarnations(&d);

    d.restart();
    d.wait_for(Duration::from_secs(20), "ready again", |d| {
        d.ready() && d.status()["pid"].as_u64() == Some(d.proc.id() as u64)
    });
    let third = incarnations(&d);
    for n in &third {
        assert!(
            !first.contains(n) && !second.contains(n),
            "the restarted daemon reused incarnation {n}: {first:?} {second:?} {third:?}"
        );
    }
    let text = d.python("stale_ids", &["again", url, ids.to_str().unwrap()]);
    eprintln!("{text}");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.exit(Duration::from_secs(10)), 0);
}

/// A reload that changes the workers' command line replaces them one at a time, each once the
/// others listen: a client connecting all through the reload is always answered.
#[test]
fn reload_replaces_workers_one_at_a_time_and_the_port_keeps_answering() {
    use common::ws::Ws;
    let mut d = Daemon::start(
        &format!("server:\n  workers: 3\n  ping_interval_ms: 60000\n{FAST}"),
        None,
    );
    d.wait_for(Duration::from_secs(20), "ready", Daemon::ready);
    let before: Vec<i64> = (0..3)
        .map(|i| d.status()["workers"][i]["pid"].as_i64().unwrap())
        .collect();
    // Keep connecting (and waiting for hello) from inside the namespace through the reload.
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let probes = std::sync::Arc::new(AtomicUsize::new(0));
    let prober = {
        let (stop, probes, ns) = (stop.clone(), probes.clone(), d.ns.name.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let addr = "127.0.0.1:18080".parse().unwrap();
                let hello = connect_in(&ns, addr)
                    .map_err(|e| e.to_string())
                    .and_then(|s| Ws::handshake(s, "/"))
                    .map(|mut ws| ws.recv_json()["op"].clone());
                match hello {
                    Ok(op) if op == "hello" => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
                probes.fetch_add(1, Ordering::Relaxed);
                // Pacing, not waiting: about a hundred probes a second.
                std::thread::sleep(Duration::from_millis(10));
            }
            (ok, failed)
        })
    };
    let probed = |n: usize| {
        let probes = probes.clone();
        move || probes.load(Ordering::Relaxed) >= n
    };
    eventually_true(
        Duration::from_secs(10),
        || "probes before".into(),
        probed(10),
    );
    let cfg = d.dir.path().join("tunegate.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("ping_interval_ms: 60000", "ping_interval_ms: 50000"),
    )
    .unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    d.wait_for(Duration::from_secs(20), "all three replaced", |d| {
        let st = d.status();
        (0..3).all(|i| {
            let w = &st["workers"][i];
            w["listening"] == true && w["pid"].as_i64() != Some(before[i])
        })
    });
    let after = probes.load(Ordering::Relaxed) + 10;
    eventually_true(
        Duration::from_secs(10),
        || "probes after".into(),
        probed(after),
    );
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = prober.join().unwrap();
    assert!(ok > 20, "only {ok} probes");
    assert!(
        failed.is_empty(),
        "{} of {} connects failed during the reload: {failed:?}\n{}",
        failed.len(),
        ok + failed.len(),
        d.log()
    );
    let log = d.log();
    let order: Vec<usize> = (0..3)
        .map(|i| {
            log.find(&format!("replacing worker {i} for the new settings"))
                .expect("replaced")
        })
        .collect();
    assert!(order[0] < order[1] && order[1] < order[2], "{log}");
    assert!(log.contains("--ping-interval 50000"), "{log}");
    assert_eq!(d.status()["restarts"], 0, "a replacement is not a restart");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.exit(Duration::from_secs(10)), 0);
}

/// `server.bus`: the daemon checks the Redis Cluster like a tunable (finding `bus.redis`), gates
/// on it in enforce mode, and its workers meet through it (in-host rooms cross Redis too),
/// checked with Python `websockets`. Everything, the cluster included, runs inside the test's
/// namespace.
#[test]
fn server_bus_is_gated_on_and_the_workers_meet_through_the_cluster() {
    let bus =
        "mode: enforce\nserver:\n  workers: 2\n  threads: 1\n  bus: redis://127.0.0.1:17250\n";
    // No cluster: the gate refuses to start anything.
    let mut d = Daemon::start(bus, None);
    assert_eq!(d.exit(Duration::from_secs(20)), 1, "{}", d.log());
    assert!(d.log().contains("check failed: bus.redis"), "{}", d.log());

    let ns = Netns::new();
    let prefix = ["ip", "netns", "exec", ns.name.as_str()];
    let _cluster = Redis::run_in(&prefix, &["start", "17250"]);
    let d = Daemon::start_in(ns, bus, None);
    d.wait_for(Duration::from_secs(20), "ready", Daemon::ready);
    let listening = |d: &Daemon| d.log().matches("bus redis)").count() == 2;
    d.wait_for(Duration::from_secs(5), "both workers listening", listening);
    let nodes: Vec<String> = d
        .log()
        .lines()
        .filter(|l| l.contains("listening on") && l.contains("bus redis"))
        .map(|l| {
            l.split(", node ")
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(nodes.len(), 2, "{}", d.log());
    assert_eq!(nodes[0], nodes[1], "one host, one node: {}", d.log());
    let url = "ws://127.0.0.1:18080/";
    d.python("cross_host", &["steady", url, url]);
}

/// The saturation watch against the real kernel of the test's namespace. A worker under a
/// 300-descriptor limit holding 260 connections: the journal says so once (with the fix), the
/// status lists it worst first, and the daemon's metrics listener serves it in a form promtool
/// accepts. Then the worker stopped (SIGSTOP) while 60 clients connect to an accept queue of 8
/// (somaxconn 8, set in the namespace before the start): the overflow counter rises and the
/// daemon says so naming somaxconn and the queue's limit.
#[test]
fn saturation_is_sampled_said_listed_and_served() {
    let ns = Netns::new();
    ns.sysctl(&["-w", "net.core.somaxconn=8"]);
    let dir = tempfile::tempdir().unwrap();
    // No somaxconn in the profile: the namespace keeps its 8.
    let prof = profile(dir.path(), "small.yaml", "target_connections: 100\n");
    let config = format!(
        "profile: {}\nmode: warn\nserver:\n  workers: 1\n  threads: 1\n  \
         handshake_timeout_ms: 60000\nsaturation:\n  interval_s: 1\nmetrics_listen: 127.0.0.1:19464\n",
        prof.display()
    );
    let d = Daemon::start_wrapped(ns, &config, None, &["prlimit", "--nofile=300:300"]);
    d.wait_for(Duration::from_secs(20), "ready", Daemon::ready);
    d.python("saturation", &["hold", "127.0.0.1", "18080", "260", "4"]);
    let line = d.log_line(Duration::from_secs(5), "saturation: descriptors.child at");
    let log = d.log();
    assert!(
        line.contains("of 300: descriptors of child") && line.contains("fix: raise limits.nofile"),
        "{line}"
    );
    assert_eq!(
        log.matches("saturation: descriptors.child at").count(),
        1,
        "said once: {log}"
    );
    let st = d.status();
    let worst = &st["saturation"][0];
    assert_eq!(worst["id"], "descriptors.child", "{st:#}");
    assert_eq!(worst["limit"], 300);
    let status_file = d.dir.path().join("status.json");
    let shown = Command::new(bin())
        .args(["status", "--format", "json", "--status-file"])
        .arg(&status_file)
        .output()
        .unwrap();
    let shown = json(&shown);
    assert_eq!(shown["schema"], "tunegate.status/1");
    assert_eq!(shown["saturation"][0]["id"], "descriptors.child");
    let human = Command::new(bin())
        .args(["status", "--status-file"])
        .arg(&status_file)
        .output()
        .unwrap();
    assert!(
        stdout(&human).contains("saturation, worst first"),
        "{}",
        stdout(&human)
    );
    let mode = std::fs::metadata(&status_file).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o644
    );

    let text = d.get("http://127.0.0.1:19464/metrics");
    assert!(
        text.contains("tunegate_process_max_fds{process=\"child\"} 300"),
        "{text}"
    );
    assert!(
        text.contains("tunegate_saturation_ratio{resource=\"descriptors.child\"}"),
        "{text}"
    );
    assert!(
        text.contains("tunegate_listen_queue_limit{process=\"child\",port=\"18080\"} 8"),
        "{text}"
    );
    // Every metric the shipped alerts and dashboard name is one tunegate serves: on this page or
    // on the bundled server's.
    let served = format!("{text}{}", d.get("http://127.0.0.1:18080/metrics"));
    let read = |rel: &str| {
        std::fs::read_to_string(format!("{}/{rel}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    };
    let sources = read("src/daemon/metrics.rs") + &read("crates/relay/src/metrics.rs");
    let docs = read("docs/daemon.md") + &read("docs/deployment.md") + &read("docs/protocol.md");
    for file in ["tunegate-alerts.yml", "tunegate-dashboard.json"] {
        let path = format!("{}/packaging/monitoring/{file}", env!("CARGO_MANIFEST_DIR"));
        let body = std::fs::read_to_string(path).unwrap();
        for (at, _) in body.match_indices("tunegate_") {
            let name: String = body[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // Not every family shows everywhere (host-global keys are hidden in a namespace,
            // the Redis families need --bus): those must at least be families the code renders
            // and the docs describe.
            let literal = format!("\"{}\"", &name["tunegate_".len()..]);
            let known = served.contains(&format!("{name} "))
                || served.contains(&format!("{name}{{"))
                || (sources.contains(&literal) && docs.contains(&name));
            assert!(known, "{file} names {name}, which tunegate does not serve");
        }
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/deps.sh installs the prometheus package)");
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success() && stdout(&checked).is_empty() && stderr(&checked).is_empty(),
        "promtool check metrics: {}{}\n{text}",
        stdout(&checked),
        stderr(&checked)
    );

    let child = nix::unistd::Pid::from_raw(d.child_pid());
    nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGSTOP).unwrap();
    d.python("saturation", &["burst", "127.0.0.1", "18080", "60"]);
    let line = d.log_line(
        Duration::from_secs(5),
        "saturation: accept queues overflowed",
    );
    nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(
        line.contains("somaxconn (now 8)") && line.contains("accept queue limit 8 on port 18080"),
        "{line}"
    );
}

/// The bundled server's counters on /metrics never go down, whichever worker answers a scrape,
/// while a worker is SIGKILLed and restarted: its peers keep the counters it reached, and its
/// successor carries them on from the bus directory (issue 19).
#[test]
fn server_counters_never_go_down_across_a_worker_restart() {
    let d = Daemon::start(
        "mode: warn\nserver:\n  workers: 2\n  threads: 1\nrestart:\n  initial_backoff_ms: 50\n",
        None,
    );
    d.wait_for(Duration::from_secs(20), "ready", Daemon::ready);
    let two = |d: &Daemon| d.status()["workers"][1]["pid"].as_u64().is_some();
    d.wait_for(Duration::from_secs(10), "worker 1's pid", two);
    let pid = d.status()["workers"][1]["pid"]
        .as_u64()
        .unwrap()
        .to_string();
    d.python("monotonic", &["127.0.0.1", "18080", "8", &pid, "3"]);
    let restarted = |d: &Daemon| d.status()["workers"][1]["restarts"].as_u64() >= Some(1);
    d.wait_for(Duration::from_secs(10), "worker 1 restarted", restarted);
}

/// Ephemeral ports and TIME_WAIT, from a loopback connect/close loop bounded in count: in a
/// namespace whose ephemeral range is 100 ports and tcp_max_tw_buckets 100, 90 connections
/// opened and closed by the client each leave their port in TIME_WAIT; the watch (ephemeral
/// ports on, as on a proxy host) says both the busiest pair's ports and TIME_WAIT are past 80 %.
#[test]
fn ephemeral_port_and_time_wait_pressure_is_said() {
    let ns = Netns::new();
    for kv in [
        "net.ipv4.ip_local_port_range=40000 40099",
        "net.ipv4.tcp_max_tw_buckets=100",
    ] {
        ns.sysctl(&["-w", kv]);
    }
    let dir = tempfile::tempdir().unwrap();
    let prof = profile(dir.path(), "small.yaml", "target_connections: 100\n");
    let config = format!(
        "profile: {}\nmode: warn\nsaturation:\n  interval_s: 1\n  ephemeral_ports: true\n\
         metrics_listen: 127.0.0.1:19465\n",
        prof.display()
    );
    let d = Daemon::start_in(ns, &config, None);
    d.wait_for(Duration::from_secs(20), "ready", Daemon::ready);
    d.python("saturation", &["churn", "127.0.0.1", "18080", "90"]);
    // Said when it crossed 80 % (a sample may land in the middle of the loop).
    let said = |d: &Daemon| {
        let log = d.log();
        log.contains("saturation: ephemeral_ports at")
            && log.contains("of 100: local ports in use from 127.0.0.1 to 127.0.0.1:18080")
            && log.contains("saturation: tcp_time_wait at")
    };
    d.wait_for(
        Duration::from_secs(5),
        "the port and TIME_WAIT warnings",
        said,
    );
    let level = |d: &Daemon, id: &str| {
        d.status()["saturation"]
            .as_array()
            .and_then(|l| l.iter().find(|x| x["id"] == id).cloned())
            .unwrap_or_default()
    };
    // 90 closes, less the few ports a later connect may take back from TIME_WAIT (loopback
    // allows it: tcp_tw_reuse 2).
    let held = |d: &Daemon, id: &str| level(d, id)["used"].as_u64().unwrap_or(0);
    let high = |d: &Daemon| held(d, "ephemeral_ports") >= 80 && held(d, "tcp_time_wait") >= 80;
    d.wait_for(
        Duration::from_secs(5),
        "80 or more ports in TIME_WAIT",
        high,
    );
    let line = d.log_line(Duration::ZERO, "saturation: ephemeral_ports at");
    assert!(
        line.contains("fix: widen net.ipv4.ip_local_port_range"),
        "{line}"
    );
    // And served on the metrics listener.
    let text = d.get("http://127.0.0.1:19465/metrics");
    assert!(
        text.contains("tunegate_ephemeral_ports_usable 100\n"),
        "{text}"
    );
    assert!(text.contains("tunegate_ephemeral_ports_in_use "), "{text}");
}

/// The watch works for any child: a custom command (a Python listener) is sampled as `child`
/// (its descriptors, its accept queue), listed in the status and served on the daemon's own
/// metrics listener, with the drop counters and their rates.
#[test]
fn a_custom_command_is_watched_too() {
    let config = format!(
        "{}mode: warn\nsaturation:\n  interval_s: 1\nmetrics_listen: 127.0.0.1:19466\n",
        child("listen")
    );
    let d = Daemon::start(&config, None);
    d.wait_for(Duration::from_secs(20), "ready", Daemon::ready);
    let sampled = |d: &Daemon| {
        let st = d.status();
        let ids: Vec<String> = st["saturation"]
            .as_array()
            .map(|l| {
                l.iter()
                    .map(|x| x["id"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default();
        ids.contains(&"descriptors.child".to_string())
            && ids.contains(&"accept_queue.child.18080".to_string())
            && st["drops"]["listen_overflows_per_second"].is_number()
    };
    d.wait_for(Duration::from_secs(5), "the child sampled", sampled);
    let text = d.get("http://127.0.0.1:19466/metrics");
    assert!(
        text.contains("tunegate_process_open_fds{process=\"child\"}"),
        "{text}"
    );
    assert!(
        text.contains("tunegate_listen_queue_limit{process=\"child\",port=\"18080\"}"),
        "{text}"
    );
}

/// Issue 20, the operator's path (docs/security.md): `tunegate run` with TLS, tokens and limits
/// in its `server:` section, sized to two workers; every worker serves wss:// and requires a
/// token: `tunegate load` over wss:// with a token loses nothing, without one is refused 401.
#[test]
fn an_exposed_server_under_tunegate_run_serves_tls_and_requires_tokens_on_every_worker() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = common::certs::make_certs(dir.path(), "server");
    let secret = dir.path().join("token.secret");
    std::fs::write(&secret, "the-daemon-test-secret-0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let hard = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap().1;
    let prof = profile(
        dir.path(),
        "two.yaml",
        &format!(
            "extends: default\ntarget_connections: {}\nlimits:\n  nofile: {hard}\n",
            hard - 255
        ),
    );
    let d = Daemon::start(
        &format!(
            "profile: {}\nserver:\n  tls_cert: {}\n  tls_key: {}\n  auth_secret_file: {}\n  \
             message_rate: 100\n  max_upgrade_rate: 1000\n  max_connections_per_address: 1000\n",
            prof.display(),
            cert.display(),
            key.display(),
            secret.display()
        ),
        None,
    );
    d.wait_for(Duration::from_secs(20), "ready", Daemon::ready);
    assert_eq!(d.status()["sizing"]["workers"], 2, "{}", d.status());
    assert_eq!(
        d.log().matches("tokens required on every upgrade").count(),
        2,
        "{}",
        d.log()
    );
    let secret_s = secret.to_str().unwrap();
    let token = common::token(&["--secret-file", secret_s, "--sub", "ops", "--rooms", "*"]);
    let load = |token: Option<&str>| {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &d.ns.name,
            bin(),
            "load",
            "wss://127.0.0.1:18080/",
        ])
        .args(["--json", "--max-time", "60", "--ca-file"])
        .arg(&ca)
        .args(["-n", "400", "--rooms", "10:100", "--publish-rate", "400"])
        .args(["--publish-seconds", "1"]);
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        cmd.output().unwrap()
    };
    let o = load(Some(&token));
    common::load_whole(&o, 400, &d.log());
    let o = load(None);
    let r = json(&o);
    assert_eq!((code(&o), r["opened"].as_u64()), (1, Some(0)), "{r}");
    assert!(r.to_string().contains("401"), "{r}");
}
