//! The command line as users meet it: profile listing and showing, exit codes, and the
//! host-global write path exercised against a fake /proc/sys tree (never the host's own).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn tunegate(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().unwrap()
}

#[test]
fn profile_list_names_every_builtin() {
    let out = tunegate(&["profile", "list"]);
    assert_eq!(code(&out), 0);
    let text = stdout(&out);
    for name in ["default", "c10k", "c100k", "c1m", "proxy"] {
        assert!(text.lines().any(|l| l.starts_with(name)), "{name}: {text}");
    }
    assert!(text.contains("100000"));
}

#[test]
fn profile_show_resolves_extends_and_loads_back() {
    let out = tunegate(&["profile", "show", "c1m"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("c1m <- c100k <- c10k <- default"), "{text}");
    // Inherited from default, overridden by c100k, added by c1m:
    assert!(text.contains("listen_ports: [8080]"), "{text}");
    assert!(
        text.contains("net.core.somaxconn: 65535  # built-in:c100k:"),
        "{text}"
    );
    assert!(
        text.contains("fs.nr_open: 2097152  # built-in:c1m:"),
        "{text}"
    );
    let dir = tempfile::tempdir().unwrap();
    let p = profile(dir.path(), "shown.yaml", &text);
    let again = tunegate(&["profile", "show", p.to_str().unwrap(), "--format", "json"]);
    assert_eq!(code(&again), 0, "{}", stderr(&again));
    let j = json(&again);
    assert_eq!(j["target_connections"], 1_000_000);
    assert_eq!(j["nofile"], 2_097_152);

    let bad = tunegate(&["profile", "show", "c5k"]);
    assert_eq!(code(&bad), 2);
    assert!(stderr(&bad).contains("no built-in profile or file named \"c5k\""));
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(code(&tunegate(&["preflight", "--format", "xml"])), 2);
    assert_eq!(code(&tunegate(&["frobnicate"])), 2);
    assert_eq!(code(&tunegate(&["preflight", "--port", "70000"])), 2);
}

/// The files of a fake tree that looks like the initial network namespace's /proc/sys (it has
/// net/core/netdev_max_backlog), with their contents.
const HOST_LIKE_FILES: [(&str, &str); 8] = [
    ("net/core/netdev_max_backlog", "1000\n"),
    ("net/core/rmem_max", "212992\n"),
    ("fs/nr_open", "1048576\n"),
    ("fs/file-max", "100000\n"),
    ("net/ipv4/tcp_mem", "10000\t20000\t30000\n"),
    ("net/ipv4/ip_local_port_range", "32768\t60999\n"),
    ("net/ipv4/ip_local_reserved_ports", "\n"),
    ("net/ipv4/ip_unprivileged_port_start", "1024\n"),
];

/// A fake root with [`HOST_LIKE_FILES`] under proc/sys, for TUNEGATE_HOST_ROOT.
fn host_like_tree() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for (rel, content) in HOST_LIKE_FILES {
        let p = root.path().join("proc/sys").join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    std::fs::create_dir_all(root.path().join("proc/self")).unwrap();
    std::fs::copy("/proc/self/status", root.path().join("proc/self/status")).unwrap();
    root
}

/// The binary with `root` (from [`host_like_tree`]) as the host and its journal and drop-in
/// under `dir`.
fn on_fake_host(root: &Path, dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env("TUNEGATE_HOST_ROOT", root)
        .env("TUNEGATE_STATE_DIR", dir.join("state"))
        .env("TUNEGATE_SYSCTL_DIR", dir.join("sysctl.d"));
    cmd
}

/// Host-global keys are written only from the initial network namespace. A fake tree that
/// looks like one (it has net/core/netdev_max_backlog) lets us prove the write, the journal,
/// the drop-in and the revert for them without touching the real host.
#[test]
fn host_global_keys_are_applied_and_reverted_on_a_host_like_tree() {
    let root = host_like_tree();
    let dir = tempfile::tempdir().unwrap();
    let prof = profile(
        dir.path(),
        "hostwide.yaml",
        "sysctl:\n  fs.nr_open: 2097152\n  fs.file-max: 50000\n  net.core.netdev_max_backlog: 65536\n  net.ipv4.tcp_mem: \"10000 40000 60000\"\n  net.core.rmem_max: 16777216\n",
    );
    let run = |args: &[&str]| {
        on_fake_host(root.path(), dir.path(), args)
            .output()
            .unwrap()
    };
    let read = |rel: &str| std::fs::read_to_string(root.path().join("proc/sys").join(rel)).unwrap();
    let out = run(&[
        "apply",
        "--profile",
        prof.to_str().unwrap(),
        "--persist",
        "--format",
        "json",
    ]);
    let j = json(&out);
    assert!(j["outcome"]["failure"].is_null(), "{j:#}");
    assert_eq!(read("fs/nr_open"), "2097152\n");
    assert_eq!(
        read("fs/file-max"),
        "100000\n",
        "raise-only: a higher value was lowered"
    );
    assert_eq!(read("net/core/netdev_max_backlog"), "65536\n");
    assert_eq!(read("net/ipv4/tcp_mem"), "10000 40000 60000\n");
    assert_eq!(read("net/core/rmem_max"), "16777216\n");
    let dropin = std::fs::read_to_string(dir.path().join("sysctl.d/60-tunegate.conf")).unwrap();
    assert!(dropin.contains("fs.nr_open = 2097152\n"), "{dropin}");
    // Not raised (the host's 100000 is above the 50000 asked) but persisted at the host's
    // value, never the lower one asked: the drop-in alone must make the host pass after boot.
    assert!(dropin.contains("fs.file-max = 100000\n"), "{dropin}");

    let rev = run(&["revert"]);
    assert_eq!(code(&rev), 0, "{}{}", stdout(&rev), stderr(&rev));
    for (rel, content) in HOST_LIKE_FILES {
        assert_eq!(read(rel), content, "{rel} not restored");
    }
    assert!(!dir.path().join("sysctl.d/60-tunegate.conf").exists());
}

/// `tunegate ... | head` must not panic when head exits, and an apply whose reader went away
/// still does all its work: the pipe's read end is closed before the command starts, so every
/// write it makes to stdout fails with EPIPE.
#[test]
fn a_closed_stdout_pipe_neither_panics_nor_stops_the_work() {
    let closed_pipe = || {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        writer
    };
    let shown = Command::new(bin())
        .args(["profile", "show", "c1m", "--format", "json"])
        .stdout(closed_pipe())
        .output()
        .unwrap();
    assert_eq!(code(&shown), 0, "{}", stderr(&shown));
    assert_eq!(
        stderr(&shown),
        "",
        "a closed pipe is not an error to report"
    );

    let root = host_like_tree();
    let dir = tempfile::tempdir().unwrap();
    let prof = profile(dir.path(), "p.yaml", "sysctl:\n  fs.nr_open: 2097152\n");
    let applied = on_fake_host(
        root.path(),
        dir.path(),
        &["apply", "--profile", prof.to_str().unwrap(), "--persist"],
    )
    .stdout(closed_pipe())
    .output()
    .unwrap();
    assert!(
        !stderr(&applied).contains("panicked"),
        "{}",
        stderr(&applied)
    );
    let nr_open = std::fs::read_to_string(root.path().join("proc/sys/fs/nr_open")).unwrap();
    assert_eq!(nr_open, "2097152\n", "the apply stopped with its output");
    assert!(dir.path().join("state/journal.json").exists());
    assert!(dir.path().join("sysctl.d/60-tunegate.conf").exists());
}

/// `--config` checks what `tunegate run` would: the configuration's profile, and its listen
/// port in the port guard. It is refused together with `--profile` (which it replaces), and a
/// bad configuration is bad input.
#[test]
fn preflight_with_the_service_configuration() {
    let root = host_like_tree();
    let dir = tempfile::tempdir().unwrap();
    let config = profile(
        dir.path(),
        "tunegate.yaml",
        "profile: c10k\nlisten: 127.0.0.1:9090\n",
    );
    let config = config.to_str().unwrap();
    let out = on_fake_host(
        root.path(),
        dir.path(),
        &["preflight", "--config", config, "--format", "json"],
    )
    .output()
    .unwrap();
    let j = json(&out);
    assert_eq!(j["profile"], "c10k", "{j:#}");
    let ids: Vec<&str> = j["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["id"].as_str())
        .collect();
    assert!(ids.contains(&"derived.listen_port.9090"), "{ids:?}");

    let both = tunegate(&["preflight", "--config", config, "--profile", "c100k"]);
    assert_eq!(code(&both), 2);
    let bad = profile(dir.path(), "bad.yaml", "profile: [c10k\n");
    let bad = tunegate(&["preflight", "--config", bad.to_str().unwrap()]);
    assert_eq!(code(&bad), 2);
    assert!(stderr(&bad).contains("bad.yaml:1:"), "{}", stderr(&bad));
}

/// `preflight --config` is the check the service makes, `ignore:` included: an ignored failing
/// check is shown (with its id, as every warn and fail line is) but fails nothing; an ignored
/// id that matches no check is said. The boot configuration under the host root is read as
/// systemd-sysctl would: a later file that lowers a key is named with its line.
#[test]
fn preflight_config_honours_ignore_and_names_the_file_the_boot_ends_with() {
    let root = host_like_tree();
    let dir = tempfile::tempdir().unwrap();
    let prof = profile(
        dir.path(),
        "mine.yaml",
        "sysctl:\n  net.core.netdev_max_backlog: 4096\n  fs.file-max: 50000\n",
    );
    let config = dir.path().join("tunegate.yaml");
    std::fs::write(
        &config,
        format!(
            "profile: {}\nignore: [sysctl.net.core.netdev_max_backlog, derived.no_such_check]\n",
            prof.display()
        ),
    )
    .unwrap();
    let etc = root.path().join("etc/sysctl.d");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("99-local.conf"), "# mine\nfs.file-max = 1000\n").unwrap();
    let run = |args: &[&str]| {
        on_fake_host(root.path(), dir.path(), args)
            .env_remove("TUNEGATE_SYSCTL_DIR")
            .output()
            .unwrap()
    };
    let plain = run(&["preflight", "--profile", prof.to_str().unwrap()]);
    assert_eq!(code(&plain), 1, "{}", stdout(&plain));
    assert!(
        stdout(&plain).contains("      id     sysctl.net.core.netdev_max_backlog"),
        "{}",
        stdout(&plain)
    );
    let with = run(&["preflight", "--config", config.to_str().unwrap()]);
    let text = stdout(&with);
    assert_eq!(code(&with), 0, "{text}\n{}", stderr(&with));
    assert!(
        text.contains("IGNORED FAIL net.core.netdev_max_backlog"),
        "{text}"
    );
    assert!(stderr(&with).contains("no check has the id \"derived.no_such_check\""));
    // fs.file-max passes live (100000) but the boot ends with 99-local.conf's 1000.
    assert!(text.contains("WARN  fs.file-max at boot"), "{text}");
    assert!(
        text.contains("id     persist.overridden.fs.file-max"),
        "{text}"
    );
    assert!(text.contains("change or remove line 2 of"), "{text}");
    let j = json(&run(&[
        "preflight",
        "--config",
        config.to_str().unwrap(),
        "--format",
        "json",
    ]));
    assert_eq!(j["summary"]["result"], "pass", "{j:#}");
    assert_eq!(j["ignored"][0], "sysctl.net.core.netdev_max_backlog");
}

/// `--pid`: what a running server really got. A Python listener started with a soft limit of
/// 1024 and listen(5), as the write-up's readers' servers ran: both are failures, with the
/// program's own backlog named; `apply --pid` is refused (a running process keeps its limits).
#[test]
fn preflight_pid_reports_the_limit_and_the_accept_queue_the_process_really_has() {
    let mut server = Command::new("prlimit")
        .args(["--nofile=1024:4096", "python3", "-c"])
        .arg(
            "import socket, sys, time\n\
             s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(5)\n\
             print(s.getsockname()[1], flush=True); time.sleep(60)\n",
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("prlimit and python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let port: u16 = line.trim().parse().unwrap();
    let pid = server.id().to_string();
    let out = Command::new(bin())
        .args([
            "preflight",
            "--profile",
            "default",
            "--pid",
            &pid,
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let j = json(&out);
    let find = |id: &str| {
        j["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["id"] == id)
            .unwrap_or_else(|| panic!("no {id} in {j:#}"))
            .clone()
    };
    let nofile = find("server.nofile");
    assert_eq!(nofile["verdict"], "fail", "{nofile:#}");
    assert_eq!(nofile["current"], "soft 1024, hard 4096");
    assert!(
        nofile["fix"].as_str().unwrap().contains("prlimit --pid"),
        "{nofile:#}"
    );
    let backlog = find(&format!("server.backlog.{port}"));
    assert_eq!(backlog["verdict"], "fail", "{backlog:#}");
    assert_eq!(backlog["current"], "5 (1 socket(s))");
    assert!(
        backlog["detail"]
            .as_str()
            .unwrap()
            .contains("asked listen() for 5")
    );
    assert_eq!(find("server.descriptors")["verdict"], "pass");

    let refused = Command::new(bin())
        .args(["apply", "--profile", "default", "--pid", &pid])
        .output()
        .unwrap();
    assert_eq!(code(&refused), 2, "{}", stderr(&refused));
    let missing = Command::new(bin())
        .args(["preflight", "--pid", "999999999"])
        .output()
        .unwrap();
    assert_eq!(code(&missing), 2);
    assert!(
        stderr(&missing).contains("no process 999999999"),
        "{}",
        stderr(&missing)
    );
}
