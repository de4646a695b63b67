//! `tunegate load` against real servers: ours (every delivery accounted for, in both
//! encodings, across several load processes), a Python `websockets` server we did not write
//! (plain mode), and failures it must report rather than hide: refused connects, a server that
//! dies mid-run.

mod common;

use std::process::Command;
use std::time::Duration;

use common::ws::Server;
use common::*;

fn url(s: &Server) -> String {
    format!("ws://{}/", s.addr)
}

#[test]
fn every_delivery_is_counted_across_processes_and_encodings() {
    let s = Server::start(&["--threads", "2"]);
    for encoding in ["json", "msgpack"] {
        let o = load(
            &url(&s),
            &[
                "-n",
                "600",
                "--rooms",
                "2:50,10:40,100:10",
                "--publish-rate",
                "600",
                "--publish-seconds",
                "1",
                "--processes",
                "2",
                "--encoding",
                encoding,
            ],
        );
        let r = json(&o);
        assert_eq!(code(&o), 0, "{encoding}: {}\n{}", stderr(&o), r);
        assert_eq!(r["processes"], 2);
        assert_eq!(r["opened"], 600);
        assert_eq!(r["joined"], 600);
        assert_eq!(r["open_at_end"], 600);
        assert_eq!(r["rooms_short"], 0);
        let (sent, expected) = (r["sent"].as_u64().unwrap(), r["expected"].as_u64().unwrap());
        assert!(sent >= 500, "{encoding}: only {sent} sent");
        assert!(expected > sent, "rooms have several members");
        assert_eq!(r["received"], expected, "{encoding}");
        assert_eq!(r["lost"], 0);
        assert_eq!(r["latency"]["samples"], expected);
        assert!(r["latency"]["p50_ms"].as_f64().unwrap() > 0.0);
        // The server agrees: it saw our publishes and delivered them.
        assert!(s.metric("tunegate_messages_in_total") >= sent);
    }
}

/// The share of a `.hgrm` distribution's samples at or above `ms` milliseconds: one minus the
/// percentile of the last line below it.
fn share_at_or_above(hgrm: &str, ms: f64) -> f64 {
    let mut below = 0.0;
    for line in hgrm.lines().skip(2).take_while(|l| !l.starts_with('#')) {
        let mut cols = line.split_whitespace();
        let value: f64 = cols.next().unwrap().parse().unwrap();
        let percentile: f64 = cols.next().unwrap().parse().unwrap();
        if value >= ms {
            break;
        }
        below = percentile;
    }
    1.0 - below
}

/// `tunegate load` for a message phase of 6 s at 200 messages/s (rooms of 10, one load
/// process), its histograms in `out`; `stall` is called with the load's pid once its progress
/// line says it publishes (at most a second into the phase).
fn stalled_run(s: &Server, out: &std::path::Path, stall: impl FnOnce(i32)) -> serde_json::Value {
    use std::io::BufRead;
    let mut child = Command::new(bin())
        .args([
            "load",
            &url(s),
            "--json",
            "--max-time",
            "60",
            "-n",
            "20",
            "--rooms",
            "10",
        ])
        .args([
            "--publish-rate",
            "200",
            "--publish-seconds",
            "6",
            "--processes",
            "1",
        ])
        .arg("--out")
        .arg(out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (publishing, seen) = std::sync::mpsc::channel();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let log = std::thread::spawn(move || {
        let mut all = String::new();
        for line in stderr.lines().map_while(Result::ok) {
            if line.starts_with("tunegate load: publish:") {
                let _ = publishing.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let phase = seen.recv_timeout(Duration::from_secs(30));
    if phase.is_ok() {
        stall(child.id() as i32);
    }
    let o = child.wait_with_output().unwrap();
    let log = log.join().unwrap();
    assert!(phase.is_ok(), "the load never said it publishes\n{log}");
    load_whole(&o, 20, &log)
}

/// What the longest wait in a 2 s stall is at least: the first message scheduled after the
/// stop began (at most 1/200 s later) waits the rest of it.
const STALLED_MS: f64 = 2000.0 - 5.0;

/// SIGSTOP for two seconds, then SIGCONT.
fn stop_for_two_seconds(pid: i32) {
    use nix::sys::signal::{Signal, kill};
    let pid = nix::unistd::Pid::from_raw(pid);
    kill(pid, Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    kill(pid, Signal::SIGCONT).unwrap();
}

/// The test that cannot be fooled: the server stops for 2 s mid-phase. Every message
/// scheduled in the stall waits for its end, so the worst delivery took at least 2 s and about
/// one message in six (those scheduled in the stall's first second, of a 6 s phase) took more
/// than one: p99 shows the stall, not just the max.
#[test]
fn a_server_stalled_for_two_seconds_shows_in_the_latency() {
    let s = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let server = s.child.id() as i32;
    let r = stalled_run(&s, dir.path(), |_| stop_for_two_seconds(server));
    let latency = &r["latency"];
    assert!(latency["max_ms"].as_f64().unwrap() >= STALLED_MS, "{r}");
    assert!(latency["p99_ms"].as_f64().unwrap() >= 1500.0, "{r}");
    let hgrm = std::fs::read_to_string(dir.path().join("latency.hgrm")).unwrap();
    let slow = share_at_or_above(&hgrm, 1000.0);
    assert!(
        (0.08..0.3).contains(&slow),
        "{slow} of deliveries took 1 s or more\n{hgrm}"
    );
    assert!(hgrm.contains("#[Max     ="), "{hgrm}");
    for name in ["service.hgrm", "lag.hgrm"] {
        assert!(dir.path().join(name).exists(), "{name}");
    }
    // Second by second, the stall is where it happened: a second in the message phase with
    // nothing delivered, then one whose deliveries waited a second or more.
    let csv = std::fs::read_to_string(dir.path().join("timeseries.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(
        csv.lines().next(),
        Some("second,open,sent,delivered,p50_ms,p99_ms")
    );
    let silent = rows
        .iter()
        .position(|r| r[2] != "0" && r[3] == "0")
        .unwrap_or_else(|| panic!("no second sent without deliveries\n{csv}"));
    assert!(
        rows[silent..]
            .iter()
            .any(|r| r[5].parse::<f64>().is_ok_and(|p99| p99 >= 1000.0)),
        "no slow second after the silent one\n{csv}"
    );
    assert!(rows.iter().all(|r| r[1] == "20" || r[1] == "0"), "{csv}");
}

/// Coordinated omission: when the publisher itself stalls (its process stopped for 2 s), the
/// messages it should have sent meanwhile go out late. Stamped when written they would look
/// fast; counted from their scheduled time they show the wait, and the report says how far
/// the publishers fell behind.
#[test]
fn a_publisher_that_falls_behind_does_not_hide_the_wait() {
    let s = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let r = stalled_run(&s, dir.path(), |load| {
        let shard = std::fs::read_to_string(format!("/proc/{load}/task/{load}/children")).unwrap();
        let shard: i32 = shard.split_whitespace().next().unwrap().parse().unwrap();
        stop_for_two_seconds(shard);
    });
    assert!(
        r["latency"]["max_ms"].as_f64().unwrap() >= STALLED_MS,
        "{r}"
    );
    assert!(r["latency"]["p99_ms"].as_f64().unwrap() >= 1500.0, "{r}");
    let lag = &r["schedule_lag"];
    assert!(lag["max_ms"].as_f64().unwrap() >= 1900.0, "{r}");
    // About 400 messages were due in the stall; all but the last few went out > 10 ms late.
    assert!(lag["late"].as_u64().unwrap() >= 350, "{r}");
    // Written late, each was delivered quickly: the service time alone would hide the stall.
    // (Not its maximum: the receivers live in the stopped process too, so a message in flight
    // when it stopped, a handful of 10,800 deliveries, waits as well.)
    assert!(
        r["service_time"]["p99_ms"].as_f64().unwrap() < 1000.0,
        "{r}"
    );
}

/// A report's thresholds: (how many, how many met).
fn thresholds_met(r: &serde_json::Value) -> (usize, usize) {
    let all = r["thresholds"].as_array().unwrap();
    (all.len(), all.iter().filter(|t| t["ok"] == true).count())
}

/// `--fail-if` gates a run: thresholds met leave exit 0, one not met makes it 1 and is named
/// with what was measured, in the JSON (its schema named) and in the summary on stdout.
#[test]
fn thresholds_gate_the_run_and_name_what_failed() {
    let s = Server::start(&[]);
    let run = |extra: &[&str]| {
        let mut args = vec![
            "-n",
            "40",
            "--publish-rate",
            "100",
            "--publish-seconds",
            "1",
        ];
        args.extend_from_slice(extra);
        load(&url(&s), &args)
    };
    let o = run(&["--fail-if", "lost==0", "--fail-if", "open_ratio>=0.999"]);
    let r = json(&o);
    assert_eq!(code(&o), 0, "{r}");
    assert_eq!(r["schema"], "tunegate.load/1");
    assert_eq!(thresholds_met(&r), (2, 2), "{r}");
    // Nobody delivers in under a microsecond.
    let o = run(&["--fail-if", "lost==0", "--fail-if", "p50 < 1us"]);
    let r = json(&o);
    assert_eq!(code(&o), 1, "{r}");
    assert_eq!(r["ok"], false);
    let failed = &r["thresholds"][1];
    assert_eq!(
        (failed["threshold"].as_str(), failed["ok"].as_bool()),
        (Some("p50 < 1us"), Some(false))
    );
    assert_eq!(failed["measured"].as_f64(), r["latency"]["p50_ms"].as_f64());
    let problems = r["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "only the threshold failed: {r}");
    assert!(
        problems[0]
            .as_str()
            .unwrap()
            .starts_with("--fail-if \"p50 < 1us\" not met: p50 was "),
        "{r}"
    );
    // For people (no --json): the summary on stdout, the verdict per threshold in it.
    let o = Command::new(bin())
        .args([
            "load",
            &url(&s),
            "-n",
            "10",
            "--fail-if",
            "opened>=10",
            "--fail-if",
            "opened>10",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("threshold \"opened>=10\": met (opened 10)"),
        "{out}"
    );
    assert!(
        out.contains("threshold \"opened>10\": NOT met (opened 10)"),
        "{out}"
    );
    assert!(
        !stderr(&o).contains("threshold"),
        "the summary is not on stderr"
    );
    // --format json is --json.
    let o = Command::new(bin())
        .args(["load", &url(&s), "-n", "5", "--format", "json"])
        .output()
        .unwrap();
    assert_eq!(json(&o)["opened"], 5);
}

/// `-H` headers reach the server: one that accepts a single Origin refuses a load without it
/// (every connect answered 403) and takes every connection that sends it.
#[test]
fn headers_reach_the_server() {
    let s = Server::start(&["--allowed-origin", "https://app.example"]);
    let o = load(&url(&s), &["-n", "20"]);
    let r = json(&o);
    assert_eq!(code(&o), 1, "{r}");
    assert_eq!(r["connect_errors"]["http 403"], 20, "{r}");
    let o = load(
        &url(&s),
        &[
            "-n",
            "20",
            "-H",
            "Origin: https://app.example",
            "-H",
            "Cookie: sid=1",
        ],
    );
    let r = json(&o);
    assert_eq!(code(&o), 0, "{r}\n{}", stderr(&o));
    assert_eq!(r["opened"], 20);
}

/// `--churn`: during the hold, connections close (Close 1000) and open again, back in their
/// rooms: the server saw each come again, every one is open at the end, and a message phase
/// after it finds whole rooms (nothing lost).
#[test]
fn churned_connections_come_back_to_their_rooms() {
    let s = Server::start(&["--threads", "2"]);
    // /metrics is served on the same port: each scrape is a connection accepted too, counted
    // in its own answer.
    let accepted_before = s.metric("tunegate_connections_accepted_total");
    let o = load(
        &url(&s),
        &[
            "-n",
            "400",
            "--processes",
            "2",
            "--hold",
            "2",
            "--churn",
            "100",
            "--publish-rate",
            "200",
            "--publish-seconds",
            "1",
        ],
    );
    let r = load_whole(&o, 400, "");
    assert_eq!(r["churned"], 200, "100/s for 2 s: {r}");
    assert_eq!(r["open_at_end"], 400);
    assert_eq!(r["joined"], 400, "a rejoin is not a join: {r}");
    assert_eq!(r["received"], r["expected"]);
    assert!(r["expected"].as_u64().unwrap() > 0);
    // The server saw 600 upgrades, and 200 clients closing normally before the finish.
    let accepted = s.metric("tunegate_connections_accepted_total") - accepted_before - 1;
    assert_eq!(accepted, 600);
    let closed_by_clients: u64 = s
        .get("/metrics")
        .1
        .lines()
        .filter(|l| l.starts_with("tunegate_connections_closed_total{"))
        .filter(|l| l.contains("reason=\"client_close\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(
        closed_by_clients,
        600,
        "200 churned, then 400 at the finish\n{}",
        s.get("/metrics").1
    );
}

/// `--stages`: the connections held follow the stages up and down (the time series shows the
/// peak and the end), each joins its room as it opens, the falling stage closes connections
/// as planned (client closes at the server, not disconnects), and a run whose stages end
/// holding every connection has its rooms checked and its message phase whole.
#[test]
fn stages_move_the_connections_held_up_and_down() {
    let s = Server::start(&["--threads", "2"]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let o = load(
        &url(&s),
        &[
            "--stages",
            "1s:200,1s:200,1s:50",
            "--processes",
            "2",
            "--out",
            out,
        ],
    );
    let r = json(&o);
    assert_eq!(code(&o), 0, "{r}\n{}", stderr(&o));
    assert_eq!(
        (r["connections"].as_u64(), r["opened"].as_u64()),
        (Some(200), Some(200))
    );
    assert_eq!(
        (r["joined"].as_u64(), r["open_at_end"].as_u64()),
        (Some(200), Some(50))
    );
    assert_eq!(r["disconnects"], serde_json::json!({}));
    let csv = std::fs::read_to_string(dir.path().join("timeseries.csv")).unwrap();
    let open: Vec<u64> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(open.iter().max(), Some(&200), "{csv}");
    assert_eq!(open.last(), Some(&50), "{csv}");
    let climbing = open.iter().position(|&o| o == 200).unwrap();
    assert!(
        open[..climbing].iter().any(|&o| o > 0 && o < 200),
        "a ramp, not a jump: {csv}"
    );
    let closed = |reason: &str| {
        s.metric(&format!(
            "tunegate_connections_closed_total{{reason=\"{reason}\"}}"
        ))
    };
    assert_eq!(
        closed("client_close"),
        200,
        "150 by the stages, 50 at the finish"
    );
    // Ending with every connection held: rooms checked, messages all delivered.
    let o = load(
        &url(&s),
        &[
            "--stages",
            "1s:100,500ms:100",
            "--publish-rate",
            "100",
            "--publish-seconds",
            "1",
        ],
    );
    let r = load_whole(&o, 100, "");
    assert_eq!(r["rooms_short"], 0);
    assert!(r["rooms_checked"].as_u64().unwrap() > 0, "{r}");
    assert!(r["expected"].as_u64().unwrap() > 0);
}

/// `--scenario FILE`: the run from YAML, the command line's flags winning; a key that is not
/// an option is bad input naming the file, line and key (exit 2), and nothing runs.
#[test]
fn a_scenario_file_runs_and_the_command_line_wins() {
    let s = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("run.yaml");
    std::fs::write(
        &file,
        format!(
            "# a run too long for a command line\nurl: {}\nconnections: 50\nrooms: [\"2:50\", \"10:50\"]\n\
             publish_rate: 100\npublish-seconds: 1\nfail-if: [lost==0]\nheader: ['X-Run: ci']\n",
            url(&s)
        ),
    )
    .unwrap();
    let scenario = file.to_str().unwrap();
    let o = Command::new(bin())
        .args([
            "load",
            "--scenario",
            scenario,
            "--json",
            "-n",
            "30",
            "--fail-if",
            "opened==30",
        ])
        .output()
        .unwrap();
    let r = load_whole(&o, 30, "");
    assert_eq!(thresholds_met(&r), (2, 2), "{r}");
    assert!(r["sent"].as_u64().unwrap() >= 90, "the file's rate: {r}");
    std::fs::write(&file, "url: ws://127.0.0.1:1/\n\npublish-rat: 5\n").unwrap();
    let o = Command::new(bin())
        .args(["load", "--scenario", scenario])
        .output()
        .unwrap();
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("{scenario}:3: publish-rat: not an option")),
        "{}",
        stderr(&o)
    );
}

#[test]
fn connections_survive_heartbeat_rounds_because_pings_are_answered() {
    let s = Server::start(&["--ping-interval", "300", "--ping-timeout", "300"]);
    let o = load(&url(&s), &["-n", "200", "--hold", "1.5"]);
    let r = json(&o);
    assert_eq!(code(&o), 0, "{}\n{r}", stderr(&o));
    assert!(
        r["pings_answered"].as_u64().unwrap() >= 400,
        "two rounds for 200 connections: {r}"
    );
    assert_eq!(r["open_at_end"], 200);
    assert_eq!(
        s.metric("tunegate_connections_closed_total{reason=\"heartbeat_timeout\"}"),
        0
    );
}

#[test]
fn refused_connects_are_reported_by_cause() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // closed again: nothing listens there now
    let o = load(&format!("ws://127.0.0.1:{port}/"), &["-n", "50"]);
    let r = json(&o);
    assert_eq!(code(&o), 1, "{r}");
    assert_eq!(r["opened"], 0);
    assert_eq!(r["connect_errors"]["ECONNREFUSED"], 50, "{r}");
    assert_eq!(r["ok"], false);
}

#[test]
fn a_server_that_dies_mid_run_is_a_failure_with_the_cause() {
    let mut s = Server::start(&[]);
    let target = url(&s);
    let run = std::thread::spawn(move || load(&target, &["-n", "100", "--hold", "3"]));
    // Mid-run: once all 100 are open (the hold has begun), the server dies.
    common::eventually_true(
        Duration::from_secs(10),
        || "100 open".into(),
        || s.metric("tunegate_websockets_open") == 100,
    );
    s.child.kill().unwrap();
    let o = run.join().unwrap();
    let r = json(&o);
    assert_eq!(code(&o), 1, "{r}");
    let dropped: u64 = r["disconnects"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(dropped, 100, "{r}");
    assert!(
        r["problems"][0]
            .as_str()
            .unwrap()
            .contains("unexpected disconnects"),
        "{r}"
    );
}

/// Starts `python3 SCRIPT ARGS` (a path in the repository), a server that prints "listening on
/// HOST:PORT" as its first line on stderr; returns it and that address.
fn python_listener(script: &str, args: &[&str]) -> (std::process::Child, String) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let mut child = Command::new("python3")
        .arg(&script)
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with websockets (scripts/deps.sh installs it)");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stderr.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line
        .split("listening on ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?} from {script:?}"))
        .to_string();
    (child, addr)
}

#[test]
fn plain_mode_holds_connections_to_a_server_we_did_not_write() {
    let (mut child, addr) = python_listener("bench/peer_websockets.py", &["0"]);
    let o = load(
        &format!("ws://{addr}/"),
        &["-n", "300", "--protocol", "plain", "--hold", "0.5"],
    );
    let _ = child.kill();
    let _ = child.wait();
    let r = json(&o);
    assert_eq!(code(&o), 0, "{}\n{r}", stderr(&o));
    assert_eq!(r["opened"], 300);
    assert_eq!(r["open_at_end"], 300);
}

/// `tunegate load` (640 connections in rooms of 10, one process: 64 rooms checked) through
/// tests/clients/slow_counts.py, a proxy in front of our server that answers `count` late.
fn load_through_slow_counts(
    s: &Server,
    proxy_args: &[&str],
) -> (std::process::Output, serde_json::Value) {
    let upstream = s.addr.to_string();
    let args: Vec<&str> = std::iter::once(upstream.as_str())
        .chain(proxy_args.iter().copied())
        .collect();
    let (mut child, addr) = python_listener("tests/clients/slow_counts.py", &args);
    let args = [
        "-n",
        "640",
        "--rooms",
        "10",
        "--processes",
        "1",
        "--hold",
        "0",
    ];
    let o = load(&format!("ws://{addr}/"), &args);
    let _ = child.kill();
    let _ = child.wait();
    let r = json(&o);
    assert_eq!(r["rooms_checked"], 64, "{r}");
    (o, r)
}

/// Count answers that trickle in, one every 0.25 s (the last after 16 s): the verify phase asks
/// its 64 rooms at once and waits while rooms keep being found whole, so none is short. One
/// room at a time within a fixed 10 s (as it was) counted most of them short; the million's
/// saturated run had 3,038 of 3,264 rooms short though their members were all there. Answers
/// that never come (30 s late) end the check 10 s after the last progress, each room counted
/// short and unanswered.
#[test]
fn slow_count_answers_do_not_make_rooms_look_short() {
    let s = Server::start(&[]);
    let (o, r) = load_through_slow_counts(&s, &["0.25", "ramp"]);
    assert_eq!(r["rooms_short"], 0, "{}\n{r}", stderr(&o));
    assert_eq!(code(&o), 0, "{}\n{r}", stderr(&o));

    let (o, r) = load_through_slow_counts(&s, &["30"]);
    assert_eq!(
        (r["rooms_short"].as_u64(), r["rooms_unanswered"].as_u64()),
        (Some(64), Some(64)),
        "{r}"
    );
    assert_eq!(code(&o), 1, "{}\n{r}", stderr(&o));
    let problems = r["problems"].to_string();
    assert!(
        problems.contains(
            "64 of 64 rooms checked never counted their planned members (64 of them unanswered)"
        ),
        "{problems}"
    );
}

#[test]
fn bad_arguments_exit_2_and_name_the_flag() {
    for (args, needle) in [
        (vec!["http://127.0.0.1:1/"], "ws://"),
        (vec!["ws://127.0.0.1:1/", "--rooms", "2:50,3:40"], "add up"),
        (
            vec![
                "ws://127.0.0.1:1/",
                "--protocol",
                "plain",
                "--publish-rate",
                "5",
            ],
            "--protocol relay",
        ),
        (
            vec!["ws://127.0.0.1:1/", "--fail-if", "p99<50"],
            "--fail-if \"p99<50\": p99 needs a time with its unit",
        ),
        (
            vec!["ws://127.0.0.1:1/", "--fail-if", "latency<5ms"],
            "unknown metric \"latency\"",
        ),
        (
            vec!["ws://127.0.0.1:1/", "--churn", "10"],
            "--churn needs --hold",
        ),
        (
            vec!["ws://127.0.0.1:1/", "--stages", "10s"],
            "DURATION:CONNECTIONS",
        ),
        (
            vec![
                "ws://127.0.0.1:1/",
                "--stages",
                "1s:10,1s:5",
                "--publish-rate",
                "1",
            ],
            "the last stage holds 5 of 10",
        ),
        (
            vec!["ws://127.0.0.1:1/", "--stages", "1s:10", "-n", "5"],
            "cannot be used with",
        ),
        (
            vec!["ws://127.0.0.1:1/", "-H", "Sec-WebSocket-Version: 8"],
            "the handshake sets it",
        ),
        (
            vec!["ws://127.0.0.1:1/", "--token-file", "/nonexistent/token"],
            "--token-file /nonexistent/token: ",
        ),
    ] {
        let o = Command::new(bin())
            .arg("load")
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
}
