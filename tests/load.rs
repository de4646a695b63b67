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

#[test]
fn plain_mode_holds_connections_to_a_server_we_did_not_write() {
    let peer = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/peer_websockets.py");
    let mut child = Command::new("python3")
        .args([peer, "0"])
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
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
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
