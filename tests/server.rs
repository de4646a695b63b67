//! `tunegate serve` against real clients on loopback: our own RFC 6455 client (tests/common/ws.rs)
//! and Python's `websockets` (tests/clients/relay_check.py), which we did not write.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::eventually_true;
use common::ws::{Server, Ws, http};
use serde_json::{Value, json};

fn hello(ws: &mut Ws) -> u64 {
    let h = ws.recv_json();
    assert_eq!(h["op"], "hello", "{h}");
    h["id"].as_u64().unwrap()
}

/// The event loop a connection id belongs to (bits 19..23, see docs/protocol.md).
fn loop_of(id: u64) -> u64 {
    (id >> 19) & 0x1f
}

#[test]
fn bad_upgrades_get_clear_http_answers() {
    let s = Server::start(&["--threads", "1", "--allowed-origin", "https://app.example"]);
    let req = |extra: &str, version: &str, key: &str, method: &str| {
        format!(
            "{method} /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n{extra}\r\n"
        )
    };
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let origin = "Origin: https://app.example\r\n";
    let (st, text) = http(s.addr, &req(origin, "8", key, "GET"));
    assert_eq!(st, 426, "{text}");
    assert!(text.contains("Sec-WebSocket-Version: 13"), "{text}");
    assert_eq!(http(s.addr, &req(origin, "13", "c2hvcnQ=", "GET")).0, 400);
    assert_eq!(http(s.addr, &req(origin, "13", key, "POST")).0, 405);
    let (st, text) = http(
        s.addr,
        &req("Origin: https://evil.example\r\n", "13", key, "GET"),
    );
    assert_eq!(st, 403, "{text}");
    assert!(text.contains("origin not allowed"));
    assert_eq!(http(s.addr, &req("", "13", key, "GET")).0, 403);
    let (st, text) = http(s.addr, &req(origin, "13", key, "GET"));
    assert_eq!(st, 101, "{text}");
    let (st, text) = http(s.addr, "GET /ws HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(st, 426, "{text}");
    assert!(text.contains("Upgrade: websocket"));
    assert_eq!(http(s.addr, "BREW /pot HTCPCP/1.0\r\n\r\n").0, 400);
    let (st, body) = s.get("/healthz");
    assert_eq!(st, 200);
    assert!(body.ends_with("ok\n"));
    assert!(s.metric("tunegate_connections_closed_total") >= 6);
}

/// `n` clients on `s`, each joined to `room`, the whole-server count checked at every join
/// when `counted` (the room starts empty).
fn joined(s: &Server, n: usize, room: &str, counted: bool) -> Vec<(Ws, u64)> {
    let mut clients: Vec<(Ws, u64)> = (0..n)
        .map(|_| {
            let mut w = Ws::connect(s.addr);
            let id = hello(&mut w);
            (w, id)
        })
        .collect();
    for (i, (w, _)) in clients.iter_mut().enumerate() {
        w.send_json(json!({"op": "join", "room": room, "ref": i}));
        let r = w.recv_json();
        assert_eq!(
            (r["op"].as_str(), r["ref"].as_u64()),
            (Some("joined"), Some(i as u64))
        );
        if counted {
            assert_eq!(r["members"], i as u64 + 1, "whole-server member count");
        }
    }
    clients
}

/// Every member receives each other publisher's `n` messages exactly once, in order, and
/// nothing else (the next frame answers its own `count`, which sees `members`).
fn receive_in_order(members: &mut [(Ws, u64)], publishers: &[usize], n: u64, room_size: u64) {
    for (i, (w, _)) in members.iter_mut().enumerate() {
        let mut next: std::collections::HashMap<u64, u64> = Default::default();
        let expected = n * (publishers.len() as u64 - publishers.contains(&i) as u64);
        for _ in 0..expected {
            let m = w.recv_json();
            assert_eq!(
                (m["op"].as_str(), m["room"].as_str()),
                (Some("message"), Some("call-42"))
            );
            let from = m["from"].as_u64().unwrap();
            assert_eq!(m["data"]["p"], from);
            let seq = m["data"]["seq"].as_u64().unwrap();
            let want = next.entry(from).or_insert(0);
            assert_eq!(seq, *want, "member {i}: publisher {from} out of order");
            *want += 1;
        }
        w.send_json(json!({"op": "count", "room": "call-42", "ref": "sync"}));
        let c = w.recv_json();
        assert_eq!(c["op"], "count", "member {i} got an extra message: {c}");
        assert_eq!(c["members"], room_size);
    }
}

#[test]
fn room_messages_reach_every_member_once_and_no_one_else() {
    let s = Server::start(&["--threads", "2"]);
    let mut members = joined(&s, 20, "call-42", true);
    let mut others = joined(&s, 6, "lobby", false);
    let loops: HashSet<u64> = members.iter().map(|(_, id)| loop_of(*id)).collect();
    assert_eq!(loops.len(), 2, "members should be spread over both loops");

    // Two publishers on (probably) different loops, 50 messages each, interleaved.
    let publishers = [0usize, 1];
    for seq in 0..50 {
        for &p in &publishers {
            let from = members[p].1;
            members[p].0.send_json(
                json!({"op": "publish", "room": "call-42", "data": {"seq": seq, "p": from}}),
            );
        }
    }
    receive_in_order(&mut members, &publishers, 50, 20);
    for (w, _) in others.iter_mut() {
        w.send_json(json!({"op": "count", "room": "call-42"}));
        let c = w.recv_json();
        assert_eq!(
            c["op"], "count",
            "a non-member received a room message: {c}"
        );
    }

    // echo: a member publisher asked for its own copy; the other members get one each.
    others[0]
        .0
        .send_json(json!({"op": "publish", "room": "lobby", "data": "hi", "echo": true, "ref": 1}));
    let mut got = [others[0].0.recv_json(), others[0].0.recv_json()];
    got.sort_by_key(|v| v["op"].as_str().unwrap().to_string());
    assert_eq!(
        (got[0]["op"].as_str(), got[1]["op"].as_str()),
        (Some("message"), Some("published"))
    );
    for (w, _) in others.iter_mut().skip(1) {
        assert_eq!(w.recv_json()["data"], "hi");
    }
    // Publishing to a room one is not in is allowed; the publisher gets nothing back, echo or not.
    members[0]
        .0
        .send_json(json!({"op": "publish", "room": "lobby", "data": "from outside", "echo": true}));
    for (w, _) in others.iter_mut() {
        assert_eq!(w.recv_json()["data"], "from outside");
    }

    direct_messages_reach_their_target_or_come_back(&mut members[0], &mut others);
    errors_are_messages(&mut members[3].0);

    // Closing a member updates the whole-server count.
    drop(members.pop());
    let w = &mut members[0].0;
    eventually_true(
        Duration::from_secs(5),
        || "18 members".into(),
        || {
            w.send_json(json!({"op": "count", "room": "call-42"}));
            w.recv_json()["members"] == 18
        },
    );
    assert!(s.metric("tunegate_bus_room_deliveries_total") > 0);
}

/// Direct messages, across loops, and to connections that do not exist.
fn direct_messages_reach_their_target_or_come_back(
    sender: &mut (Ws, u64),
    others: &mut [(Ws, u64)],
) {
    let target = others
        .iter()
        .position(|(_, id)| loop_of(*id) != loop_of(sender.1))
        .unwrap_or(0);
    let to = others[target].1;
    sender
        .0
        .send_json(json!({"op": "send", "to": to, "data": {"sdp": "offer"}, "ref": 9}));
    assert_eq!(sender.0.recv_json()["op"], "sent");
    let d = others[target].0.recv_json();
    assert_eq!(d["op"], "direct");
    assert_eq!(d["from"], sender.1);
    assert_eq!(d["data"]["sdp"], "offer");
    let ghost = to ^ (1 << 26); // another generation of the same slot
    sender
        .0
        .send_json(json!({"op": "send", "to": ghost, "data": 1, "ref": 10}));
    // On another loop the send is acknowledged first and bounced after; on ours it fails at once.
    let mut reply = sender.0.recv_json();
    if loop_of(ghost) != loop_of(sender.1) {
        assert_eq!(reply["op"], "sent", "{reply}");
        reply = sender.0.recv_json();
    }
    assert_eq!(
        (reply["code"].as_str(), reply["ref"].as_u64()),
        (Some("no_such_connection"), Some(10)),
        "{reply}"
    );
    // An event loop this server does not have (5 of 2), another process's incarnation, a number
    // above 2^53: nobody could hold them, so the error comes at once, never `sent`.
    for (i, id) in [to | (5 << 19), to ^ (1 << 40), 1 << 53]
        .into_iter()
        .enumerate()
    {
        sender
            .0
            .send_json(json!({"op": "send", "to": id, "data": 1, "ref": 20 + i}));
        let e = sender.0.recv_json();
        assert_eq!(
            (e["code"].as_str(), e["ref"].as_u64()),
            (Some("no_such_connection"), Some(20 + i as u64)),
            "{e}"
        );
    }
}

/// Errors are messages, never silent drops. `w` is a member of call-42 (of 20).
fn errors_are_messages(w: &mut Ws) {
    w.send(1, b"{not json");
    let e = w.recv_json();
    assert_eq!(
        (e["op"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_request"))
    );
    w.send_json(json!({"op": "dance", "ref": 5}));
    let e = w.recv_json();
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_u64()),
        (Some("unknown_op"), Some(5))
    );
    w.send_json(json!({"op": "leave", "room": "nowhere"}));
    assert_eq!(w.recv_json()["code"], "not_a_member");
    w.send_json(json!({"op": "leave", "room": "call-42"}));
    let l = w.recv_json();
    assert_eq!(
        (l["op"].as_str(), l["members"].as_u64()),
        (Some("left"), Some(19))
    );
}

#[test]
fn msgpack_clients_get_msgpack_and_json_clients_get_json() {
    let s = Server::start(&["--threads", "1"]);
    let mut j = Ws::connect(s.addr);
    hello(&mut j);
    let mut m = Ws::connect_path(s.addr, "/?encoding=msgpack");
    let h = m.recv().unwrap();
    assert_eq!(h.opcode, 2, "hello should be MsgPack for ?encoding=msgpack");
    let h: rmpv::Value = rmpv::decode::read_value(&mut &h.payload[..]).unwrap();
    assert_eq!(h["op"].as_str(), Some("hello"));
    let join = rmp_serde::to_vec_named(&json!({"op": "join", "room": "r"})).unwrap();
    m.send(2, &join);
    assert_eq!(m.recv().unwrap().opcode, 2);
    j.send_json(json!({"op": "publish", "room": "r", "data": {"type": "offer", "n": [1, 2]}}));
    let f = m.recv().unwrap();
    assert_eq!(f.opcode, 2);
    let v: Value = rmp_serde::from_slice(&f.payload).unwrap();
    assert_eq!(v["op"], "message");
    assert_eq!(v["data"]["type"], "offer");
    assert_eq!(v["data"]["n"], json!([1, 2]));

    // MsgPack can say what JSON cannot (non-string keys, binary): JSON members still get it,
    // and the server lives on.
    let odd = rmpv::Value::Map(vec![
        (rmpv::Value::Boolean(true), "yes".into()),
        (rmpv::Value::Nil, rmpv::Value::Binary(vec![1, 2])),
    ]);
    let publish = rmpv::Value::Map(vec![
        ("op".into(), "publish".into()),
        ("room".into(), "r".into()),
        ("data".into(), odd),
    ]);
    j.send_json(json!({"op": "join", "room": "r"}));
    assert_eq!(j.recv_json()["op"], "joined");
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, &publish).unwrap();
    m.send(2, &bytes);
    let got = j.recv_json();
    assert_eq!(got["data"], json!({"true": "yes", "null": [1, 2]}));
    let mut fresh = Ws::connect(s.addr);
    hello(&mut fresh);

    // Object keys keep the sender's order (SDP offers are read by people too).
    fresh.send_json(json!({"op": "join", "room": "r"}));
    fresh.recv_json();
    j.send(
        1,
        br#"{"op":"publish","room":"r","data":{"type":"offer","sdp":"v=0"}}"#,
    );
    let raw = fresh.recv().unwrap().payload;
    let text = String::from_utf8(raw).unwrap();
    assert!(
        text.find("\"type\"").unwrap() < text.find("\"sdp\"").unwrap(),
        "{text}"
    );
}

#[test]
fn a_silent_client_is_closed_within_ping_interval_plus_timeout() {
    let s = Server::start(&[
        "--threads",
        "1",
        "--ping-interval",
        "600",
        "--ping-timeout",
        "600",
    ]);
    let start = Instant::now();
    let mut silent = Ws::connect(s.addr);
    silent.auto_pong = false;
    let mut live = Ws::connect(s.addr);
    hello(&mut silent);
    hello(&mut live);
    // The live client reads (and so answers pings) on its own thread, for 2.5 s.
    let live = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_millis(2500);
        while Instant::now() < until {
            if let Some(f) = live.try_recv(Duration::from_millis(100)) {
                assert_ne!(f.opcode, 8, "the live client was closed");
            }
        }
        live
    });
    let code = silent.recv_close();
    let took = start.elapsed();
    assert_eq!(code, Some(1001), "heartbeat timeout closes with 1001");
    assert!(
        took >= Duration::from_millis(1100),
        "closed too early: {took:?}"
    );
    assert!(
        took <= Duration::from_millis(1200 + 600),
        "closed too late: {took:?}"
    );
    // The live one answered its pings and is still served.
    let mut live = live.join().unwrap();
    live.send_json(json!({"op": "count", "room": "x"}));
    assert_eq!(live.recv_json()["op"], "count");
    assert_eq!(
        s.metric("tunegate_connections_closed_total{reason=\"heartbeat_timeout\"}"),
        1
    );
    assert!(s.metric("tunegate_pings_sent_total") >= 2);
}

/// A server that falls behind (here: stopped with SIGSTOP past the ping timeout, as two
/// saturated cores can hold a worker) must not blame its clients for its own lateness. When it
/// runs again, a batch of epoll events holds at most 1,024 connections and the sweep comes
/// right after it: every pong and hang-up beyond that batch was there, unread, when its ping's
/// timeout was checked. Those that answered stay open; those that hung up count as gone, not
/// as heartbeat timeouts.
#[test]
fn answers_waiting_unread_in_a_stalled_server_are_read_not_timed_out() {
    const CLIENTS: usize = 1500;
    let s = Server::start(&[
        "--threads",
        "1",
        "--ping-interval",
        "2000",
        "--ping-timeout",
        "2000",
    ]);
    let mut clients: Vec<Ws> = (0..CLIENTS)
        .map(|_| {
            let mut c = Ws::connect(s.addr);
            c.auto_pong = false;
            hello(&mut c);
            c
        })
        .collect();
    // Any bytes restart a connection's heartbeat clock: a ping from every client, all within
    // a few milliseconds, so that their pings come 1.5 to 2 s from now however long the
    // connects took, and every first ping is in well before the first timeout.
    for c in clients.iter_mut() {
        c.send(9, b"");
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let pong = c.try_recv(Duration::from_secs(3));
        assert_eq!(pong.map(|f| f.opcode), Some(10), "client {i}'s pong");
        let ping = c.try_recv(Duration::from_secs(3));
        assert_eq!(ping.map(|f| f.opcode), Some(9), "client {i}'s first ping");
    }
    s.signal(nix::sys::signal::Signal::SIGSTOP);
    // While it is stopped: nine of ten answer, the tenth hangs up.
    let mut answered = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        if i % 10 == 9 {
            drop(c);
        } else {
            c.send(10, b"");
            answered.push(c);
        }
    }
    // Past the ping timeout, whichever ping was last.
    std::thread::sleep(Duration::from_millis(2500));
    s.signal(nix::sys::signal::Signal::SIGCONT);
    let gone = (CLIENTS / 10) as u64;
    eventually_true(
        Duration::from_secs(10),
        || format!("{gone} hang-ups counted: {}", s.stderr.lock().unwrap()),
        || s.metric("tunegate_connections_closed_total{reason=\"peer_gone\"}") == gone,
    );
    assert_eq!(
        s.metric("tunegate_connections_closed_total{reason=\"heartbeat_timeout\"}"),
        0,
        "{}",
        s.stderr.lock().unwrap()
    );
    assert!(
        s.metric("tunegate_heartbeat_late_reads_total") > 0,
        "the sweep met no answer waiting unread: the test did not stall the server as meant"
    );
    assert_eq!(s.metric("tunegate_websockets_open"), answered.len() as u64);
    // And the clients that answered are served: each gets its next ping, not a Close.
    for (i, c) in answered.iter_mut().enumerate() {
        let f = c.try_recv(Duration::from_secs(3));
        assert_eq!(f.map(|f| f.opcode), Some(9), "client {i} after the stall");
    }
}

#[test]
fn a_client_that_never_finishes_its_handshake_is_dropped() {
    let s = Server::start(&["--threads", "1", "--handshake-timeout", "300"]);
    let mut c = std::net::TcpStream::connect(s.addr).unwrap();
    use std::io::{Read, Write};
    c.write_all(b"GET / HTTP/1.1\r\nHost: slow\r\n").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut out = String::new();
    let start = Instant::now();
    let _ = c.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn a_slow_reader_is_cut_off_at_the_cap_with_1008() {
    let s = Server::start(&[
        "--threads",
        "1",
        "--max-pending-output",
        "262144",
        "--max-message-size",
        "65536",
    ]);
    let mut slow = Ws::connect(s.addr);
    hello(&mut slow);
    slow.send_json(json!({"op": "join", "room": "feed"}));
    assert_eq!(slow.recv_json()["op"], "joined");
    let mut publisher = Ws::connect(s.addr);
    hello(&mut publisher);
    let blob = "x".repeat(16 * 1024);
    // Bounded: at most 4000 x 16 KiB; stops as soon as the server reports the cut.
    let mut sent = 0;
    while sent < 4000 && s.metric("tunegate_backpressure_closes_total") == 0 {
        for _ in 0..100 {
            publisher.send_json(json!({"op": "publish", "room": "feed", "data": blob}));
            sent += 1;
        }
        // Pacing: the publisher's own answers queue up too, and it reads none of them.
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        s.metric("tunegate_backpressure_closes_total"),
        1,
        "after {sent} messages"
    );
    // The slow reader, reading at last, finds the kernel's backlog and then Close 1008.
    assert_eq!(slow.recv_close(), Some(1008));
    // Memory stayed bounded: the publisher is fine and the server still answers.
    publisher.send_json(json!({"op": "count", "room": "feed"}));
    let c = publisher.recv_json();
    assert_eq!(c["op"], "count");
    assert_eq!(c["members"], 0);
}

#[test]
fn sigterm_closes_every_client_with_1001_and_exits_0() {
    let mut s = Server::start(&["--threads", "2", "--drain-timeout", "3000"]);
    let mut clients: Vec<Ws> = (0..6)
        .map(|_| {
            let mut w = Ws::connect(s.addr);
            hello(&mut w);
            w
        })
        .collect();
    // One client is in the middle of its upgrade when the signal comes (as happens to a
    // worker replaced by a rolling reload): it may finish it, and then goes away like the rest.
    use std::io::Write;
    let upgrade = common::ws::UPGRADE.as_bytes();
    let mut late = std::net::TcpStream::connect(s.addr).unwrap();
    late.write_all(&upgrade[..20]).unwrap();
    // The server holds 7 connections (the 7th in its handshake) before it is told to stop...
    eventually_true(
        Duration::from_secs(5),
        || "7 connections".into(),
        || {
            s.metric("tunegate_connections_open") == 7 + 1 // and the /metrics request itself
        },
    );
    s.signal(nix::sys::signal::Signal::SIGTERM);
    // ...and has stopped listening before the rest of the upgrade comes.
    eventually_true(
        Duration::from_secs(5),
        || "the listener to close".into(),
        || std::net::TcpStream::connect(s.addr).is_err(),
    );
    late.write_all(&upgrade[20..]).unwrap();
    let mut late = Ws::after_upgrade(late).expect("the upgrade under way completes");
    hello(&mut late);
    clients.push(late);
    for w in clients.iter_mut() {
        assert_eq!(w.recv_close(), Some(1001));
        w.send(8, &1001u16.to_be_bytes());
    }
    let status = s.wait(Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
    assert!(
        std::net::TcpStream::connect(s.addr).is_err(),
        "still accepting"
    );
    assert!(s.stderr.lock().unwrap().contains("draining"));
}

/// With its descriptor table full the server must keep serving the connections it has, turn
/// new ones away at once instead of spinning on accept, and accept again when one closes.
#[test]
fn running_out_of_descriptors_sheds_new_connections_without_spinning() {
    let mut wrapper = Command::new("prlimit");
    wrapper.arg("--nofile=48:48");
    let s = Server::start_with(wrapper, &["--threads", "1"]);
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..60 {
        let stream = std::net::TcpStream::connect(s.addr).unwrap();
        match Ws::handshake(stream, "/") {
            Ok(mut w) => {
                hello(&mut w);
                held.push(w);
            }
            Err(_) => refused += 1,
        }
    }
    assert!(refused > 0, "no connection was shed with 48 descriptors");
    assert!(held.len() > 30, "only {} connections held", held.len());
    // At the limit, with clients knocking: no busy loop.
    let cpu = s.cpu_seconds();
    for _ in 0..50 {
        let _ = std::net::TcpStream::connect(s.addr);
    }
    // A measurement window, not a wait: the CPU the server spends in it must stay small.
    std::thread::sleep(Duration::from_secs(1));
    let spent = s.cpu_seconds() - cpu;
    assert!(
        spent < 0.3,
        "server burned {spent:.2} s of CPU at the descriptor limit"
    );
    // Existing connections are still served.
    held[0].send_json(json!({"op": "count", "room": "r"}));
    assert_eq!(held[0].recv_json()["op"], "count");
    // Free one descriptor: accepting resumes (the metrics request itself gets through).
    drop(held.pop());
    drop(held.pop());
    eventually_true(
        Duration::from_secs(5),
        || "a request answered".into(),
        || std::net::TcpStream::connect(s.addr).is_ok_and(|c| Ws::handshake(c, "/").is_ok()),
    );
    assert!(s.metric("tunegate_accept_errors_total{errno=\"EMFILE\"}") > 0);
    assert!(s.metric("tunegate_connections_shed_total") > 0);
    let (st, _) = s.get("/healthz");
    assert_eq!(st, 200);
}

#[test]
fn python_websockets_client_relays_rooms_and_encodings() {
    let s = Server::start(&["--threads", "2"]);
    let url = format!("ws://{}", s.addr);
    common::python_client(&[], "relay_check", &[&url], "");
}

/// A `tunegate serve` restarted by hand (no daemon, no --incarnation) takes a new incarnation
/// from the clock, so the first connection of each run gets a different id (issue 12).
#[test]
fn a_restarted_serve_never_repeats_an_id() {
    let mut seen = HashSet::new();
    for run in 0..3 {
        let s = Server::start(&["--threads", "1"]);
        let mut w = Ws::connect(s.addr);
        let id = hello(&mut w);
        assert!(seen.insert(id), "run {run} handed out {id} again");
        let log = s.stderr.lock().unwrap().clone();
        let inc = common::ws::incarnation_of(id);
        assert!(
            log.contains(&format!("incarnation {inc} from the clock")),
            "{log}"
        );
        drop(w);
        s.signal(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Issue 14: a reader that keeps up with a busy room but stays megabytes behind must cost the
/// server its capped queue, not everything written since the queue was last empty; a reader that
/// never reads is cut at the cap; one that keeps up costs nothing. Client: Python `websockets`
/// (tests/clients/lagging_reader.py measures the server's VmRSS and /metrics).
#[test]
fn a_lagging_reader_costs_at_most_its_capped_queue() {
    let cap = 4u64 << 20;
    for mode in ["steady", "never", "caughtup"] {
        let s = Server::start(&["--threads", "1", "--ping-interval", "600000"]);
        let args = [
            format!("ws://{}", s.addr),
            s.pid().to_string(),
            cap.to_string(),
            mode.to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let text = common::python_client(&[], "lagging_reader", &args, "");
        assert!(
            text.contains(&format!("lagging_reader: ok {mode}")),
            "{text}"
        );
        eprintln!("{text}");
    }
}

/// Frames a client sends right behind its upgrade request are answered however the request and
/// the frames are cut into reads (issue 14 saw them dropped after a request split in two reads):
/// every split point of the request, with the frames in the same write, split, or in their own.
#[test]
fn frames_right_behind_a_split_upgrade_request_are_answered() {
    use common::ws::{UPGRADE, masked_frame};
    use std::io::{Read, Write};
    let s = Server::start(&["--threads", "1"]);
    let req = UPGRADE.as_bytes();
    let mut tail = masked_frame(true, 1, br#"{"op":"publish","room":"r","data":1,"ref":1}"#);
    tail.extend(masked_frame(
        true,
        1,
        br#"{"op":"count","room":"r","ref":2}"#,
    ));
    for cut in 1..req.len() {
        for tail_cut in [0, 5, tail.len()] {
            let mut c = std::net::TcpStream::connect(s.addr).unwrap();
            c.set_nodelay(true).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut second = req[cut..].to_vec();
            second.extend_from_slice(&tail[..tail_cut]);
            for piece in [&req[..cut], &second[..], &tail[tail_cut..]] {
                c.write_all(piece).unwrap();
                // Separate reads on the server's side are the point of this test.
                std::thread::sleep(Duration::from_millis(2));
            }
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            let want = [
                br#""op":"hello""#.as_slice(),
                br#""ref":1}"#,
                br#""ref":2}"#,
            ];
            while !want.iter().all(|w| got.windows(w.len()).any(|x| x == *w)) {
                match c.read(&mut buf) {
                    Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                    other => panic!(
                        "request cut at {cut}, frames at {tail_cut}: {other:?} after {:?}",
                        String::from_utf8_lossy(&got)
                    ),
                }
            }
        }
    }
}

/// `--listen` repeated, IPv4 and IPv6: one relay behind both (a room spans them), `tunegate
/// load` over IPv6, and `[::]` alone taking IPv4 clients too (dual stack).
#[test]
fn ipv4_and_ipv6_listeners_serve_one_relay() {
    let s = Server::start(&["--threads", "2", "--listen", "[::1]:0"]);
    let line = s.stderr.lock().unwrap().lines().next().unwrap().to_string();
    let v6: std::net::SocketAddr = line
        .split("also ")
        .nth(1)
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no second address in {line:?}"))
        .parse()
        .unwrap();
    assert!(v6.is_ipv6(), "{line}");
    let mut a = Ws::connect(s.addr);
    let mut b = Ws::connect(v6);
    hello(&mut a);
    let b_id = hello(&mut b);
    for w in [&mut a, &mut b] {
        w.send_json(json!({"op": "join", "room": "both"}));
        w.recv_json();
    }
    b.send_json(json!({"op": "publish", "room": "both", "data": "over v6"}));
    let got = a.recv_json();
    assert_eq!(
        (got["from"].as_u64(), &got["data"]),
        (Some(b_id), &json!("over v6"))
    );
    let o = common::load(
        &format!("ws://{v6}/"),
        &[
            "-n",
            "200",
            "--rooms",
            "10:100",
            "--publish-rate",
            "200",
            "--publish-seconds",
            "1",
        ],
    );
    common::load_whole(&o, 200, "");

    let dual = Server::start_on(Command::new(common::bin()), "[::]:0", &["--threads", "1"]);
    let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], dual.addr.port()));
    let mut c = Ws::connect(v4);
    hello(&mut c);
    let mut d = Ws::connect(std::net::SocketAddr::from((
        std::net::Ipv6Addr::LOCALHOST,
        dual.addr.port(),
    )));
    hello(&mut d);

    // An IPv4 address and [::] on one port: the IPv6 listener takes IPv6 only, so both bind.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let both = Server::start_on(
        Command::new(common::bin()),
        &format!("127.0.0.1:{port}"),
        &["--threads", "2", "--listen", &format!("[::]:{port}")],
    );
    hello(&mut Ws::connect(both.addr));
    hello(&mut Ws::connect(std::net::SocketAddr::from((
        std::net::Ipv6Addr::LOCALHOST,
        port,
    ))));
}

/// A burst of connections leaves free memory between the allocations that outlive it; the
/// server gives those pages back to the kernel once the burst is over (crates/relay/src/heap.rs,
/// checked every 5 s): 3,000 connections joining rooms of 10 (`tunegate load`) and held are
/// followed by a trim that takes resident memory off the process while they are open; their
/// closing by another; and a server with nothing coming or going is left alone.
#[test]
fn a_burst_of_connections_gives_its_free_pages_back() {
    let s = Server::start(&["--threads", "1"]);
    assert_eq!(s.metric("tunegate_heap_trims_total"), 0);
    let url = format!("ws://{}/", s.addr);
    let load = std::thread::spawn(move || {
        common::load(&url, &["-n", "3000", "--rooms", "10", "--hold", "20"])
    });
    // Polled twice a second: every /metrics request is a connection that comes and goes too.
    let trims = || {
        std::thread::sleep(Duration::from_millis(500));
        s.metric("tunegate_heap_trims_total")
    };
    eventually_true(
        Duration::from_secs(20),
        || "a trim while the 3,000 are held".into(),
        || trims() >= 1,
    );
    let given_back = s.metric("tunegate_heap_trimmed_bytes_total");
    // 68-76 KiB here (23-26 bytes per connection); four pages is more than nothing by far.
    assert!(
        given_back >= 16 << 10,
        "{given_back} bytes given back, at least 4 pages expected"
    );
    assert_eq!(
        s.metric("tunegate_websockets_open"),
        3000,
        "trimmed while held"
    );
    common::load_whole(&load.join().unwrap(), 3000, &s.stderr.lock().unwrap());
    eventually_true(
        Duration::from_secs(20),
        || "a trim after the 3,000 closed".into(),
        || trims() >= 2,
    );
    let trims = s.metric("tunegate_heap_trims_total");
    // Past the next check (5 s): nothing came or went but a few /metrics requests.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        s.metric("tunegate_heap_trims_total"),
        trims,
        "idle, trimmed"
    );
}
