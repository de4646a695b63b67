//! `tunegate apply` and `tunegate revert` killed at every system call that matters, and two
//! applies racing for the lock: the engine's promises must hold whatever instant a kill lands
//! on. Kills are injected by strace (`inject=SYSCALL:signal=SIGKILL:when=N`), so every write to
//! /proc/sys, the journal and the drop-in, every fsync and every rename and unlink is a kill
//! point, deterministically, not only the instants a timer happens to hit. All inside network
//! namespaces these tests create; the host's own values are compared before and after.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The system calls apply and revert make that change state, each a class of kill points.
const CLASSES: &[&str] = &["write", "fsync", "rename", "unlink"];

/// Runs tunegate in `ns` under strace, which kills it with SIGKILL on entering the `nth` call
/// of `syscall` (when there are that many), or just counts the calls (`nth` = None).
fn traced(ns: &Netns, args: &[&str], syscall: &str, nth: Option<usize>) -> (Output, String) {
    let log = ns.state.path().join("strace.log");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, "strace", "-f", "-qq", "-o"])
        .arg(&log)
        .args(["-e", &format!("trace={syscall}")]);
    if let Some(n) = nth {
        cmd.args(["-e", &format!("inject={syscall}:signal=SIGKILL:when={n}")]);
    }
    let out = cmd
        .arg(bin())
        .args(args)
        .env("TUNEGATE_STATE_DIR", ns.state_dir())
        .env("TUNEGATE_SYSCTL_DIR", ns.sysctl_dir())
        .stdin(Stdio::null())
        .output()
        .expect("strace (scripts/deps.sh installs it)");
    (out, std::fs::read_to_string(&log).unwrap_or_default())
}

/// How many `syscall` calls a full run of `args` makes.
fn count(ns: &Netns, args: &[&str], syscall: &str) -> usize {
    let (out, trace) = traced(ns, args, syscall, None);
    assert!(
        matches!(code(&out), 0 | 1),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    trace
        .lines()
        .filter(|l| l.contains(&format!(" {syscall}(")))
        .count()
}

/// Files in `dir` other than the lock file (which lives as long as the state directory).
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "lock" && n != "strace.log")
                .collect()
        })
        .unwrap_or_default()
}

/// The promise after any kill: a plain revert succeeds, every original value is back, and no
/// journal, drop-in or temp file is left; then a fresh apply and revert still restore exactly.
fn assert_recovers(ns: &Netns, before: &[(String, String)], what: &str) {
    let rev = ns.tunegate(&["revert", "--format", "json"]);
    assert_eq!(
        code(&rev),
        0,
        "{what}: revert failed\n{}\n{}",
        stdout(&rev),
        stderr(&rev)
    );
    assert_eq!(ns.snapshot(), before, "{what}: revert did not restore");
    assert_eq!(leftovers(&ns.state_dir()), Vec::<String>::new(), "{what}");
    assert_eq!(leftovers(&ns.sysctl_dir()), Vec::<String>::new(), "{what}");
    let again = ns.tunegate(&["apply", "--profile", "c100k", "--persist"]);
    assert!(matches!(code(&again), 0 | 1), "{what}: {}", stderr(&again));
    assert_eq!(ns.read("net/core/somaxconn"), "65535\n", "{what}");
    let rev = ns.tunegate(&["revert"]);
    assert_eq!(code(&rev), 0, "{what}: {}", stdout(&rev));
    assert_eq!(ns.snapshot(), before, "{what}: apply+revert after recovery");
    assert_eq!(leftovers(&ns.state_dir()), Vec::<String>::new(), "{what}");
    assert_eq!(leftovers(&ns.sysctl_dir()), Vec::<String>::new(), "{what}");
}

const APPLY: &[&str] = &["apply", "--profile", "c100k", "--persist"];

/// Kills `args` at every call of every class in `CLASSES`, each time after `prepare`, and checks
/// after each that the namespace recovers (`assert_recovers`) and what `after_kill` asks.
/// Returns how many kill points there were.
fn at_every_kill_point(
    ns: &Netns,
    before: &[(String, String)],
    args: &[&str],
    prepare: impl Fn(&Netns),
    after_kill: impl Fn(&Netns, &str),
) -> usize {
    let started = Instant::now();
    let mut points = 0;
    for &class in CLASSES {
        prepare(ns);
        let n = count(ns, args, class);
        let rev = ns.tunegate(&["revert"]);
        assert_eq!(code(&rev), 0, "{}", stdout(&rev));
        assert_eq!(ns.snapshot(), before);
        for nth in 1..=n {
            let what = format!("{} killed at {class} #{nth} of {n}", args[0]);
            prepare(ns);
            let (out, _) = traced(ns, args, class, Some(nth));
            assert_eq!(
                out.status.code(),
                None,
                "{what}: it was not killed\n{}",
                stderr(&out)
            );
            after_kill(ns, &what);
            assert_recovers(ns, before, &what);
            points += 1;
            assert!(started.elapsed() < Duration::from_secs(240), "too slow");
        }
    }
    points
}

#[test]
fn apply_killed_at_every_write_fsync_rename_and_unlink_is_fully_revertible() {
    let host = host_snapshot();
    let ns = Netns::new();
    let before = ns.snapshot();
    let points = at_every_kill_point(
        &ns,
        &before,
        APPLY,
        |_| {},
        |ns, what| {
            // The journal a kill leaves is whole (or absent), never torn.
            let journal = ns.state_dir().join("journal.json");
            if let Ok(text) = std::fs::read_to_string(&journal) {
                serde_json::from_str::<serde_json::Value>(&text)
                    .unwrap_or_else(|e| panic!("{what}: torn journal ({e}): {text}"));
            }
        },
    );
    // write: 6 sysctl writes, the journal, the drop-in and the plan on stdout; fsync: 2 per
    // atomic file; rename: the journal and the drop-in.
    assert!(points >= 15, "only {points} kill points");
    eprintln!("{points} kill points of apply, each recovered");
    assert_eq!(host_snapshot(), host);
}

#[test]
fn revert_killed_at_every_write_fsync_rename_and_unlink_finishes_when_run_again() {
    let host = host_snapshot();
    let ns = Netns::new();
    let before = ns.snapshot();
    let apply = |ns: &Netns| {
        let applied = ns.tunegate(APPLY);
        assert!(matches!(code(&applied), 0 | 1), "{}", stderr(&applied));
    };
    let points = at_every_kill_point(&ns, &before, &["revert"], apply, |_, _| {});
    assert!(points >= 8, "only {points} kill points");
    eprintln!("{points} kill points of revert, each recovered");
    assert_eq!(host_snapshot(), host);
}

/// The stale-plan race: a c10k apply reads the host and plans, then waits 2 s to take the lock
/// (strace delays its flock); meanwhile a c100k apply runs start to end. The c10k run must not
/// write its planned 16384 over c100k's 65535: it re-reads under the lock and leaves alone what
/// is already high enough. Then revert restores the values from before both.
#[test]
fn an_apply_that_waited_for_the_lock_never_lowers_what_another_raised() {
    let host = host_snapshot();
    let ns = Netns::new();
    let before = ns.snapshot();
    let mut slow = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "strace",
            "-f",
            "-qq",
            "-o",
            "/dev/null",
        ])
        .args([
            "-e",
            "trace=flock",
            "-e",
            "inject=flock:delay_enter=2000000",
        ])
        .arg(bin())
        .args(["apply", "--profile", "c10k"])
        .env("TUNEGATE_STATE_DIR", ns.state_dir())
        .env("TUNEGATE_SYSCTL_DIR", ns.sysctl_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its plan is printed before it asks for the lock: from then on its reading is stale.
    let mut slow_out = std::io::BufReader::new(slow.stdout.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("net.core.somaxconn") {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut slow_out, &mut line).unwrap();
        assert!(n > 0, "the c10k apply ended before planning: {seen}");
        seen.push_str(&line);
    }
    assert!(seen.contains("4096 -> 16384"), "{seen}");
    let fast = ns.tunegate(&["apply", "--profile", "c100k"]);
    assert!(matches!(code(&fast), 0 | 1), "{}", stderr(&fast));
    assert_eq!(ns.read("net/core/somaxconn"), "65535\n");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut slow_out, &mut rest).unwrap();
    let status = slow.wait().unwrap();
    let text = format!("{seen}{rest}");
    assert!(matches!(status.code(), Some(0 | 1)), "{text}");
    // c100k's raises stand.
    assert_eq!(ns.read("net/core/somaxconn"), "65535\n", "{text}");
    assert_eq!(ns.read("net/ipv4/tcp_max_syn_backlog"), "65535\n", "{text}");
    assert_eq!(
        ns.read("net/ipv4/ip_local_port_range"),
        "1024\t65535\n",
        "{text}"
    );
    assert!(
        text.contains("another writer made it 65535 before this run held the lock"),
        "{text}"
    );
    assert!(!text.contains("set       net.core.somaxconn"), "{text}");
    // The journal still holds the values from before both runs.
    let rev = ns.tunegate(&["revert"]);
    assert_eq!(code(&rev), 0, "{}", stdout(&rev));
    assert_eq!(ns.snapshot(), before);
    assert_eq!(host_snapshot(), host);
}
