//! Several `tunegate serve` worker processes on one port (SO_REUSEPORT) joined by the
//! interest-routed bus: room semantics stay exact across workers, and workers holding no member
//! of a room receive none of its messages.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::ws::{Clients, Ws, await_count, incarnation_of, join_all, publish_and_check, spread};
use common::*;
use serde_json::json;

struct Workers {
    procs: Vec<Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    n: usize,
    /// Each worker's current incarnation (what `tunegate run` would hand it).
    incarnations: Vec<u16>,
    next_incarnation: u16,
    /// RLIMIT_NOFILE the workers run with (`prlimit`), when not the test's own.
    nofile: Option<u64>,
}

impl Workers {
    fn start(n: usize) -> Workers {
        Workers::start_with_nofile(n, None)
    }

    fn start_with_nofile(n: usize, nofile: Option<u64>) -> Workers {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut w = Workers {
            procs: Vec::new(),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            dir: tempfile::tempdir().unwrap(),
            n,
            incarnations: vec![0; n],
            next_incarnation: 100,
            nofile,
        };
        for i in 0..n {
            let p = w.spawn(i);
            w.procs.push(p);
        }
        w
    }

    /// Starts worker `i` with a new incarnation, as the daemon's supervisor does.
    fn spawn(&mut self, i: usize) -> Child {
        let incarnation = self.next_incarnation;
        self.next_incarnation += 1;
        self.incarnations[i] = incarnation;
        let mut command = match self.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        let mut child = command
            .args([
                "serve",
                "--listen",
                &self.addr.to_string(),
                "--threads",
                "1",
            ])
            .args(["--workers", &self.n.to_string(), "--worker", &i.to_string()])
            .args(["--incarnation", &incarnation.to_string()])
            .arg("--bus-dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait for "listening on", then keep draining (and showing) the worker's log.
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        loop {
            let line = lines.next().expect("worker exited").unwrap();
            eprintln!("worker {i}: {line}");
            if line.contains("listening on") {
                break;
            }
        }
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                eprintln!("worker {i}: {line}");
            }
        });
        child
    }

    /// SIGKILLs worker `i` (no goodbye on the bus, its sockets just end): its clients in `c`
    /// must see their connections end, and are dropped from `c`.
    fn kill(&mut self, i: usize, c: &mut Clients) {
        self.procs[i].kill().unwrap();
        self.procs[i].wait().unwrap();
        for (ws, _) in c.get_mut(&i).unwrap().iter_mut() {
            assert!(
                ws.ends_within(Duration::from_secs(2)),
                "worker {i}'s client still open"
            );
        }
        c.remove(&i);
    }

    /// Restarts worker `i` (as the daemon's supervisor does) and gives it `per` new clients in
    /// `c`.
    fn restart(&mut self, i: usize, c: &mut Clients, per: usize) {
        self.procs[i] = self.spawn(i);
        let back = self.clients_on(&[i], per).remove(&i).unwrap();
        c.insert(i, back);
    }

    /// Connects until the kernel's SO_REUSEPORT spread has given every worker `per` clients.
    fn clients(&self, per: usize) -> Clients {
        self.clients_on(&(0..self.n).collect::<Vec<_>>(), per)
    }

    /// Connects until each of `workers` holds `per` of our clients; the rest are closed.
    fn clients_on(&self, workers: &[usize], per: usize) -> Clients {
        let worker_of = |id| {
            self.incarnations
                .iter()
                .position(|&n| n == incarnation_of(id))
        };
        spread(|| Ws::connect(self.addr), worker_of, workers, per)
    }

    /// The body of GET /healthz (200 expected), from whichever worker the kernel picks.
    fn healthz(&self) -> String {
        let (status, body) =
            common::ws::http(self.addr, "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(status, 200, "{body}");
        body.split_once("\r\n\r\n").expect("a body").1.to_string()
    }

    /// A metric summed over its series.
    fn metric(&self, name: &str) -> u64 {
        self.metrics(&[name])[0]
    }

    /// Several counters from one /metrics answer once `settled` holds for them, within 5 s.
    /// Every worker's counters travel the bus on its own clock, so an answer can hold one
    /// worker's newer figures with another's older ones: a check across workers waits for
    /// one answer in which they agree, and fails naming the last figures.
    fn metrics_once<const N: usize>(
        &self,
        names: &[&str; N],
        settled: impl Fn(&[u64; N]) -> bool,
    ) -> [u64; N] {
        let mut last = [0; N];
        for _ in 0..50 {
            last = self.metrics(names);
            if settled(&last) {
                return last;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("after 5 s, {names:?} are {last:?}");
    }

    /// Several counters from one /metrics answer, each summed over its series. A worker that
    /// just started answers 503 until it has every other worker's counters (at most 2 s):
    /// asked again then, as Prometheus would.
    fn metrics<const N: usize>(&self, names: &[&str; N]) -> [u64; N] {
        let body = eventually(
            Duration::from_secs(5),
            || "a 200 from /metrics".into(),
            || {
                let (status, body) =
                    common::ws::http(self.addr, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
                (status == 200).then_some(body)
            },
        );
        names.map(|name| {
            body.lines()
                .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum()
        })
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

#[test]
fn rooms_span_workers_exactly_once_in_order_and_skip_uninterested_workers() {
    let w = Workers::start(3);
    let mut c = w.clients(4);
    // Room "all": every client of workers 0 and 1. Room "w2": only worker 2's clients.
    for worker in [0, 1] {
        for (ws, _) in c.get_mut(&worker).unwrap() {
            ws.send_json(json!({"op": "join", "room": "all"}));
            assert_eq!(ws.recv_json()["op"], "joined");
        }
    }
    for (ws, _) in c.get_mut(&2).unwrap() {
        ws.send_json(json!({"op": "join", "room": "w2"}));
        assert_eq!(ws.recv_json()["op"], "joined");
    }
    for worker in [0, 1, 2] {
        await_count(&mut c.get_mut(&worker).unwrap()[0].0, "all", 8);
    }
    await_count(&mut c.get_mut(&0).unwrap()[0].0, "w2", 4);

    // Publishers on every worker (worker 2's is not a member of "all": allowed).
    let publishers: Vec<(usize, usize)> = vec![(0, 0), (1, 0), (2, 0)];
    for seq in 0..40 {
        for &(wk, i) in &publishers {
            let (ws, id) = &mut c.get_mut(&wk).unwrap()[i];
            ws.send_json(json!({"op": "publish", "room": "all", "data": {"seq": seq, "p": *id}}));
        }
    }
    for worker in [0, 1] {
        for (i, (ws, me)) in c.get_mut(&worker).unwrap().iter_mut().enumerate() {
            let own = publishers.contains(&(worker, i));
            let mut next: HashMap<u64, u64> = HashMap::new();
            for _ in 0..(if own { 80 } else { 120 }) {
                let m = ws.recv_json();
                assert_eq!(m["op"], "message", "{m}");
                let from = m["from"].as_u64().unwrap();
                assert_ne!(from, *me, "got its own message without echo");
                let seq = m["data"]["seq"].as_u64().unwrap();
                let want = next.entry(from).or_insert(0);
                assert_eq!(
                    seq, *want,
                    "worker {worker} client {i}: publisher {from} out of order"
                );
                *want += 1;
            }
            ws.send_json(json!({"op": "count", "room": "all", "ref": "sync"}));
            let r = ws.recv_json();
            assert_eq!(r["ref"], "sync", "extra message: {r}");
        }
    }
    interest_routing_is_counted(&w, &mut c);
    direct_messages_cross_workers(&mut c);
}

/// After 40 messages from each of 3 publishers to "all" (members on workers 0 and 1 only):
/// worker 2 received none of them, and the bus counters say so, from whichever worker answers.
fn interest_routing_is_counted(w: &Workers, c: &mut Clients) {
    // Worker 2 holds no member of "all": it received none of its 80 remote messages.
    for (ws, _) in c.get_mut(&2).unwrap() {
        ws.send_json(json!({"op": "count", "room": "all", "ref": "sync"}));
        assert_eq!(ws.recv_json()["ref"], "sync", "a non-member got a message");
    }
    // The other workers' counters travel the bus every half second: wait until one answer
    // has all three workers' final figures (the senders' and the receivers').
    let [all, open, received_0, received_2, routed] = w.metrics_once(
        &[
            "tunegate_bus_broadcast_equivalent_total",
            "tunegate_websockets_open",
            "tunegate_bus_room_messages_received_total{worker=\"0\"}",
            "tunegate_bus_room_messages_received_total{worker=\"2\"}",
            "tunegate_bus_room_deliveries_total",
        ],
        |&[all, open, received_0, _, _]| all == 120 * 2 && open == 12 && received_0 >= 80,
    );
    assert_eq!(received_2, 0, "worker 2 holds no member");
    assert!(received_0 >= 80 && open == 12);
    assert_eq!(
        all,
        120 * 2,
        "send-to-all would hand each message to the 2 other workers"
    );
    assert_eq!(
        routed,
        40 * (1 + 1 + 2),
        "only interested workers get each message"
    );
    // Whole-server gauges, whichever worker answers: two rooms ("all", "w2"), each counted
    // once, by its home worker, whichever worker that is.
    assert_eq!(w.metric("tunegate_websockets_open"), 12);
    assert_eq!(w.metric("tunegate_rooms"), 2);
}

/// Direct messages across workers, and to connections that are gone.
fn direct_messages_cross_workers(c: &mut Clients) {
    // Direct messages across workers.
    let to = c[&2][1].1;
    let from = c[&0][1].1;
    let ws = &mut c.get_mut(&0).unwrap()[1].0;
    ws.send_json(json!({"op": "send", "to": to, "data": "hi w2", "ref": 1}));
    assert_eq!(ws.recv_json()["op"], "sent");
    let d = c.get_mut(&2).unwrap()[1].0.recv_json();
    assert_eq!(
        (d["op"].as_str(), d["from"].as_u64()),
        (Some("direct"), Some(from))
    );
    // And to a connection that is gone, on another live worker (the same slot's previous
    // generation): that worker looks, and a bounce comes back.
    let ghost = to ^ (1 << 26);
    let (ws, _) = &mut c.get_mut(&0).unwrap()[1];
    ws.send_json(json!({"op": "send", "to": ghost, "data": 1, "ref": 2}));
    assert_eq!(ws.recv_json()["op"], "sent");
    let e = ws.recv_json();
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_u64()),
        (Some("no_such_connection"), Some(2))
    );
    // A loop that worker does not have (it runs one): it answers for it the same way.
    ws.send_json(json!({"op": "send", "to": to | (31 << 19), "data": 1, "ref": 3}));
    assert_eq!(ws.recv_json()["op"], "sent");
    let e = ws.recv_json();
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_u64()),
        (Some("no_such_connection"), Some(3)),
        "{e}"
    );
    // An id of a process that is not up (an incarnation no worker has): nobody can look, so
    // the error comes at once, without `sent`.
    ws.send_json(json!({"op": "send", "to": to ^ (1 << 40), "data": 1, "ref": 4}));
    let e = ws.recv_json();
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_u64()),
        (Some("no_such_connection"), Some(4)),
        "{e}"
    );
}

/// Three workers, three clients on each, all nine in room "all" and every worker counting 9.
fn three_workers_in_room_all() -> (Workers, Clients) {
    let w = Workers::start(3);
    let mut c = w.clients(3);
    for list in c.values_mut() {
        join_all(list.iter_mut(), "all");
    }
    for worker in [0, 1, 2] {
        await_count(&mut c.get_mut(&worker).unwrap()[0].0, "all", 9);
    }
    (w, c)
}

#[test]
fn a_killed_worker_comes_back_and_the_others_never_notice() {
    let (mut w, mut c) = three_workers_in_room_all();
    publish_and_check(&mut c, (2, 0), &[0, 1, 2], "before", 20);
    assert_eq!(w.healthz(), "ok: 3 of 3 workers up\n");

    // SIGKILL worker 1: no goodbye on the bus, its sockets just end.
    let dead: Vec<u64> = c[&1].iter().map(|(_, id)| *id).collect();
    w.kill(1, &mut c);
    // The others drop its members at once, and keep relaying among themselves.
    for worker in [0, 2] {
        await_count(&mut c.get_mut(&worker).unwrap()[0].0, "all", 6);
    }
    publish_and_check(&mut c, (0, 1), &[0, 2], "while-down", 20);
    assert_eq!(w.healthz(), "ok: 2 of 3 workers up\n");
    assert_eq!(w.metric("tunegate_workers_up"), 2);

    // Restarted (as the daemon's supervisor does), its clients reconnect and join again.
    w.restart(1, &mut c, 3);
    // Same worker number, same slots, new ids: a message for the dead reaches nobody.
    for (_, id) in &c[&1] {
        assert!(
            !dead.contains(id),
            "{id} handed out again after the restart"
        );
    }
    let survivor = &mut c.get_mut(&0).unwrap()[0].0;
    for (i, id) in dead.iter().enumerate() {
        survivor.send_json(json!({"op": "send", "to": id, "data": "for the dead", "ref": i}));
        let e = survivor.recv_json();
        assert_eq!(
            (e["code"].as_str(), e["ref"].as_u64()),
            (Some("no_such_connection"), Some(i as u64)),
            "{e}"
        );
    }
    join_all(c.get_mut(&1).unwrap().iter_mut(), "all");
    for worker in [0, 1, 2] {
        await_count(&mut c.get_mut(&worker).unwrap()[0].0, "all", 9);
    }
    // Publishers on the restarted worker and on a survivor reach everyone, once, in order.
    publish_and_check(&mut c, (1, 2), &[0, 1, 2], "after-1", 20);
    publish_and_check(&mut c, (0, 0), &[0, 1, 2], "after-0", 20);
    // The survivors' original connections never closed: 9 open on the whole server (the
    // restarted worker's figures arrive over the bus within half a second).
    eventually_true(
        Duration::from_secs(5),
        || "9 websockets open".into(),
        || w.metric("tunegate_websockets_open") == 9,
    );
    assert_eq!(w.healthz(), "ok: 3 of 3 workers up\n");
}

/// Two workers that claim one incarnation would hand out the same connection ids: the bus
/// refuses to link them and says why, once (not at every 50 ms redial).
#[test]
fn workers_with_the_same_incarnation_refuse_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let logs: Vec<_> = (0..2)
        .map(|i| dir.path().join(format!("w{i}.log")))
        .collect();
    let mut procs: Vec<Child> = (0..2)
        .map(|i| {
            Command::new(bin())
                .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
                .args([
                    "--threads",
                    "1",
                    "--workers",
                    "2",
                    "--worker",
                    &i.to_string(),
                ])
                .args(["--incarnation", "4042", "--bus-dir"])
                .arg(dir.path().join("bus"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&logs[i]).unwrap())
                .spawn()
                .unwrap()
        })
        .collect();
    let read = |i: usize| std::fs::read_to_string(&logs[i]).unwrap_or_default();
    let what = || format!("both refusals\n{}\n{}", read(0), read(1));
    eventually_true(Duration::from_secs(10), what, || {
        read(0).contains("refused") && read(1).contains("no link")
    });
    // Not a wait for something: ten more redials happen in this half second, and none of
    // them may be logged again.
    std::thread::sleep(Duration::from_millis(500));
    let (w0, w1) = (read(0), read(1));
    for p in &mut procs {
        let _ = p.kill();
        let _ = p.wait();
    }
    assert!(
        w0.contains("bus: refused a link: worker 1 has this worker's process 0.4042, so both would hand out the same connection ids"),
        "{w0}"
    );
    assert!(
        w1.contains("bus: no link to worker 0: the peer closed without introducing itself"),
        "{w1}"
    );
    assert!(
        !w0.contains("link to worker") && !w1.contains(") up"),
        "{w0}\n{w1}"
    );
    assert_eq!(
        w0.matches("refused").count(),
        1,
        "logged at every redial: {w0}"
    );
    assert_eq!(
        w1.matches("no link").count(),
        1,
        "logged at every redial: {w1}"
    );
}

/// The worker a room's counts live on (`peers.rs`: FNV-1a of the name modulo the workers, the
/// same in every process; restated here so the test knows which worker to kill).
fn home_of(room: &str, workers: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in room.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h % workers
}

/// The home of a room (the one worker that keeps its counts) SIGKILLed: the other holders keep
/// relaying among themselves (their sets of holders stand without it), and once it is back its
/// peers give it their counts again: whole counts, every member reached once, in order, from a
/// publisher on the new home and from one elsewhere.
#[test]
fn a_room_outlives_its_home_worker() {
    assert_eq!(home_of("all", 3), 0, "worker 0 is the home of \"all\"");
    let (mut w, mut c) = three_workers_in_room_all();
    w.kill(0, &mut c);
    publish_and_check(&mut c, (1, 0), &[1, 2], "home-down", 20);

    w.restart(0, &mut c, 3);
    join_all(c.get_mut(&0).unwrap().iter_mut(), "all");
    for worker in [0, 1, 2] {
        await_count(&mut c.get_mut(&worker).unwrap()[0].0, "all", 9);
    }
    publish_and_check(&mut c, (0, 1), &[0, 1, 2], "home-back-0", 20);
    publish_and_check(&mut c, (2, 2), &[0, 1, 2], "home-back-2", 20);
}

impl Workers {
    /// `n` Python `websockets` clients naming `room` in their URL (tests/clients/affinity.py:
    /// greeted, then, unless `hello_only`, joined, counted and messaged): the incarnation of
    /// the worker that held each.
    fn affinity_clients(&self, room: &str, n: usize, hello_only: bool) -> Vec<u16> {
        self.affinity_clients_seeing(room, n, hello_only, None).0
    }

    /// As `affinity_clients`, and whether `path` existed (waited for, bounded) while every
    /// client was still connected: what a worker shows only while they are (a full home's
    /// hidden socket) cannot have gone again by the time the clients have closed.
    fn affinity_clients_seeing(
        &self,
        room: &str,
        n: usize,
        hello_only: bool,
        path: Option<&std::path::Path>,
    ) -> (Vec<u16>, bool) {
        let url = format!("ws://{}", self.addr);
        let out = self.dir.path().join("affinity-ids.json");
        let (n, out_arg) = (n.to_string(), out.to_str().unwrap());
        let mut args = vec![url.as_str(), room, n.as_str(), out_arg];
        if hello_only {
            args.push("hello-only");
        }
        let while_open = path.map(|p| format!("while-open={}", p.display()));
        if let Some(o) = &while_open {
            args.push(o);
        }
        python_client(&[], "affinity", &args, "");
        // {"ids": [every hello's connection id], "seen": whether `path` existed}
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let ids = v["ids"].as_array().unwrap().iter();
        let incarnations = ids.map(|id| incarnation_of(id.as_u64().unwrap()));
        (incarnations.collect(), v["seen"].as_bool().unwrap_or(false))
    }
}

/// `?affinity=ROOM` puts every member of a room on the room's home worker, whichever worker
/// the kernel gave the connection to: Python `websockets` clients (percent-encoding the name
/// as a browser does) all get ids of the home, their room works, and its messages cross no
/// bus. With the home SIGKILLed, the same URL is served by whichever worker took it (counted
/// as a failed move); once the home is back, new connections go to it again and their room
/// works.
#[test]
fn an_affinity_puts_a_rooms_members_on_its_home_worker() {
    let mut w = Workers::start(3);
    let routed_before = w.metric("tunegate_bus_room_deliveries_total");
    for room in ["call-42", "café/7 a+b"] {
        let home = home_of(room, 3) as usize;
        let got = w.affinity_clients(room, 12, false);
        assert!(
            got.iter().all(|&i| i == w.incarnations[home]),
            "{room}: every member on worker {home} ({}), got {got:?}",
            w.incarnations[home]
        );
    }
    // 24 connections, each on a random worker first: about 16 moved (none or all 24 by
    // chance: about once in 3^24 and (3/2)^24 = 17,000 runs). Every worker's counters travel
    // the bus every half second, each worker on its own clock, so whoever answers may have a
    // giver's count newer than its taker's: wait until one answer has all 24 accepted (plus
    // its own /metrics requests) and as many moved in as out.
    let [_, moved_out, moved_in] = w.metrics_once(
        &[
            "tunegate_connections_accepted_total",
            "tunegate_connections_moved_out_total",
            "tunegate_connections_moved_in_total",
        ],
        |&[accepted, out, into]| accepted >= 24 && out == into,
    );
    assert!(moved_out > 0 && moved_out < 24, "moved out: {moved_out}");
    assert_eq!(moved_in, moved_out);
    assert_eq!(w.metric("tunegate_connection_moves_failed_total"), 0);
    assert_eq!(
        w.metric("tunegate_bus_room_deliveries_total"),
        routed_before,
        "room messages crossed the bus"
    );

    let room = "call-42";
    let home = home_of(room, 3) as usize;
    w.procs[home].kill().unwrap();
    w.procs[home].wait().unwrap();
    let got = w.affinity_clients(room, 9, true);
    assert!(got.iter().all(|&i| i != w.incarnations[home]), "{got:?}");
    eventually_true(
        Duration::from_secs(5),
        || "a failed move counted".into(),
        || w.metric("tunegate_connection_moves_failed_total") > 0,
    );

    w.procs[home] = w.spawn(home);
    let got = w.affinity_clients(room, 9, false);
    assert!(
        got.iter().all(|&i| i == w.incarnations[home]),
        "back on the restarted home: {got:?}"
    );
}

/// Rooms' homes are picked by a hash, so a home can fill up: with RLIMIT_NOFILE 286 a worker
/// has room for 30 connections beyond the 256 descriptors it keeps. 45 Python `websockets`
/// clients naming one room: the home takes 30 and hides its handoff socket, the other workers
/// serve the rest (counted as failed moves), none is lost, and the room works across them;
/// once they are gone the home takes its room's members again.
#[test]
fn a_full_home_leaves_the_rest_where_they_arrive() {
    let w = Workers::start_with_nofile(3, Some(256 + 30));
    let room = "crowded";
    let home = home_of(room, 3) as usize;
    let hidden = w.dir.path().join(format!("worker-{home}-loop-0.full.sock"));
    // The home hides its socket at its next tick once full and shows it again at the tick after
    // the clients close: looked for while they are all connected.
    let (got, hidden_while_full) = w.affinity_clients_seeing(room, 45, false, Some(&hidden));
    assert_eq!(got.len(), 45);
    // The home took 30 handed over or accepted, then only what the kernel gave it directly.
    let at_home = got.iter().filter(|&&i| i == w.incarnations[home]).count() as u64;
    assert!(
        (30..45).contains(&at_home),
        "the home holds {at_home} of 45: {got:?}"
    );
    assert!(hidden_while_full, "a full home hides its socket");
    // Every one elsewhere asked for the home and was served where it arrived.
    eventually_true(
        Duration::from_secs(5),
        || format!("{} failed moves counted", 45 - at_home),
        || w.metric("tunegate_connection_moves_failed_total") == 45 - at_home,
    );
    // All closed: the home shows its socket again (at its next tick) and takes its room's
    // members once more.
    eventually_true(
        Duration::from_secs(5),
        || "the home's socket shown again".into(),
        || !hidden.exists(),
    );
    let got = w.affinity_clients(room, 9, false);
    assert!(got.iter().all(|&i| i == w.incarnations[home]), "{got:?}");
}

/// What a handoff socket takes is only ever a connection: datagrams without a descriptor, or
/// with a descriptor that is not a socket (a pipe, /dev/null), written to every worker's
/// socket, are dropped or closed; the workers go on serving, and moving connections.
#[test]
fn handoff_sockets_shrug_off_what_is_not_a_connection() {
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixDatagram;
    let w = Workers::start(3);
    let stranger = UnixDatagram::unbound().unwrap();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for worker in 0..3 {
        let path = w
            .dir
            .path()
            .join(format!("worker-{worker}-loop-0.handoff.sock"));
        for _ in 0..200 {
            let len = (rng % 600) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect();
            let _ = stranger.send_to(&bytes, &path);
        }
        // Descriptors that are not sockets, with a request that names a room.
        let (reader, _writer) = nix::unistd::pipe().unwrap();
        let devnull = std::fs::File::open("/dev/null").unwrap();
        for fd in [reader.as_fd(), devnull.as_fd()] {
            send_fd(
                &stranger,
                &path,
                fd,
                b"GET /?affinity=x HTTP/1.1\r\nHost: t\r\n\r\n",
            );
        }
    }
    let got = w.affinity_clients("after-noise", 9, false);
    let home = home_of("after-noise", 3) as usize;
    assert!(got.iter().all(|&i| i == w.incarnations[home]), "{got:?}");
    assert!(w.healthz().contains("ok"), "{}", w.healthz());
}

/// One datagram with a descriptor attached, as a handover is sent (SCM_RIGHTS).
fn send_fd(
    socket: &std::os::unix::net::UnixDatagram,
    to: &std::path::Path,
    fd: std::os::fd::BorrowedFd<'_>,
    bytes: &[u8],
) {
    use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
    use std::os::fd::AsRawFd;
    let fds = [fd.as_raw_fd()];
    let addr = UnixAddr::new(to).unwrap();
    sendmsg(
        socket.as_raw_fd(),
        &[std::io::IoSlice::new(bytes)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        Some(&addr),
    )
    .unwrap();
}
