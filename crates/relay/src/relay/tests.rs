//! The relay without sockets: a sink that records what would be sent, two loops joined by the
//! in-process bus.

use super::access::RATE_LIMIT_STRIKES;
use super::*;
use crate::auth::{self, Verifier};
use crate::bus::{Inbox, LocalBus};
use crate::id::ProcessId;
use crate::metrics::CloseReason;
use crate::{Config, Shared};
use serde_json::{Value, json};
use std::sync::atomic::AtomicBool;

const PROCESS: ProcessId = ProcessId {
    node: 3,
    incarnation: 7,
};

/// A loop's connections as plain data; every frame sent is kept, decoded.
struct Recorder {
    loop_index: usize,
    conns: Vec<(bool, RelayConn)>,
    sent: Vec<(usize, Value)>,
    /// Another loop's inbox, and how many items waited in it at each send (what was handed
    /// on before this loop delivered).
    watch: Option<(Arc<Inbox>, Vec<usize>)>,
}

impl Recorder {
    fn new(loop_index: usize, n: usize) -> Recorder {
        Recorder {
            loop_index,
            conns: vec![(true, RelayConn::default()); n],
            sent: Vec::new(),
            watch: None,
        }
    }

    /// What `slot` received since the last call, decoded.
    fn take(&mut self, slot: usize) -> Vec<Value> {
        let (mine, rest) = self.sent.drain(..).partition(|(s, _)| *s == slot);
        self.sent = rest;
        mine.into_iter().map(|(_, v)| v).collect()
    }
}

impl Sink<RelayConn> for Recorder {
    fn loop_index(&self) -> usize {
        self.loop_index
    }
    fn id(&self, slot: usize) -> u64 {
        let (process, generation, loop_index) = (PROCESS, 0, self.loop_index);
        ConnId {
            process,
            generation,
            loop_index,
            slot,
        }
        .encode()
    }
    fn is_here(&self, id: ConnId) -> bool {
        id.process == PROCESS && id.loop_index == self.loop_index
    }
    fn slot_of(&self, id: u64) -> Option<usize> {
        let id = ConnId::decode(id)?;
        (self.is_here(id) && id.generation == 0 && self.conns.get(id.slot)?.0).then_some(id.slot)
    }
    fn is_open(&self, slot: usize) -> bool {
        self.conns[slot].0
    }
    fn data(&self, slot: usize) -> RelayConn {
        self.conns[slot].1
    }
    fn data_mut(&mut self, slot: usize) -> &mut RelayConn {
        &mut self.conns[slot].1
    }
    fn send(&mut self, slot: usize, out: Out<'_>) {
        let p = crate::frame::server_payload(out.bytes());
        let v = if out.bytes()[0] & 0x0F == crate::frame::OP_BINARY {
            rmp_serde::from_slice(p).expect("MsgPack")
        } else {
            serde_json::from_slice(p).expect("JSON")
        };
        self.sent.push((slot, v));
        if let Some((inbox, waiting)) = &mut self.watch {
            waiting.push(inbox.waiting());
        }
    }
    fn close(&mut self, slot: usize, code: u16, reason: &'static str, _why: CloseReason) {
        self.conns[slot].0 = false;
        self.sent
            .push((slot, json!({"close": code, "reason": reason})));
    }
}

const SETTINGS: RelaySettings = RelaySettings {
    ping_interval_ms: 25_000,
    ping_timeout_ms: 20_000,
    max_rooms_per_conn: 3,
    message_rate: 0,
    message_burst: 0,
};

/// `loops` relays of one process and a recorder of `conns` connections for each, every
/// connection opened (hello taken).
fn setup(loops: usize, conns: usize) -> (Vec<Relay>, Vec<Recorder>) {
    setup_with(loops, conns, SETTINGS, None, |_| None)
}

/// `setup` with these settings, tokens checked by `verifier`, and connection `slot` opened
/// with `grant(slot)` on every loop.
fn setup_with(
    loops: usize,
    conns: usize,
    settings: RelaySettings,
    verifier: Option<Arc<Verifier>>,
    grant: impl Fn(usize) -> Option<Grant>,
) -> (Vec<Relay>, Vec<Recorder>) {
    let local = Arc::new(LocalBus::new(loops, PROCESS).unwrap());
    let mut config = Config::default();
    config.options.threads = Some(loops);
    let shared = Arc::new(Shared {
        local: local.clone(),
        bus: local.clone(),
        metrics: (0..loops).map(|_| Arc::default()).collect(),
        accepting: AtomicBool::new(true),
        process: PROCESS,
        admission: Arc::default(),
        carried: Default::default(),
        verifier: verifier.clone(),
        certs: None,
        config,
    });
    let mut relays: Vec<Relay> = (0..loops)
        .map(|n| {
            let routes = Routes::new(shared.clone());
            let bus: Arc<dyn Bus> = local.clone();
            Relay::new(
                settings.clone(),
                bus,
                local.inbox(n),
                Arc::default(),
                routes,
            )
            .with_verifier(verifier.clone())
        })
        .collect();
    let mut sinks: Vec<Recorder> = (0..loops).map(|n| Recorder::new(n, conns)).collect();
    for (r, s) in relays.iter_mut().zip(&mut sinks) {
        for slot in 0..conns {
            r.on_open(s, slot, "/", grant(slot).map(Arc::new));
            assert_eq!(s.take(slot)[0]["op"], "hello");
        }
    }
    (relays, sinks)
}

fn ask(r: &mut Relay, s: &mut Recorder, slot: usize, v: Value) -> Vec<Value> {
    r.on_message(s, slot, false, v.to_string().as_bytes());
    s.take(slot)
}

/// Each (loop, slot) of `members` joins room "call".
fn join_call(relays: &mut [Relay], sinks: &mut [Recorder], members: &[(usize, usize)]) {
    for &(loop_index, slot) in members {
        let got = ask(
            &mut relays[loop_index],
            &mut sinks[loop_index],
            slot,
            json!({"op": "join", "room": "call"}),
        );
        assert_eq!(got[0]["op"], "joined");
    }
}

/// What an idle connection costs: its slot, the relay's 4 bytes included.
#[test]
fn a_slot_stays_32_bytes() {
    assert_eq!(std::mem::size_of::<crate::conn::Conn<RelayConn>>(), 32);
}

#[test]
fn hello_carries_the_id_and_heartbeats_and_the_requested_encoding() {
    let (mut relays, mut sinks) = setup(1, 2);
    let (r, s) = (&mut relays[0], &mut sinks[0]);
    r.on_open(s, 1, "/chat?encoding=msgpack", None);
    let hello = s.take(1);
    assert_eq!(
        hello,
        [json!({"op": "hello", "id": s.id(1), "ping_interval": 25000, "ping_timeout": 20000})]
    );
    assert_eq!(s.data(1).encoding(), Encoding::MsgPack);
    // A text frame switches the connection to JSON.
    let r2 = ask(r, s, 1, json!({"op": "count", "room": "x", "ref": 1}));
    assert_eq!(
        r2,
        [json!({"op": "count", "room": "x", "members": 0, "ref": 1})]
    );
    assert_eq!(s.data(1).encoding(), Encoding::Json);
}

#[test]
fn room_messages_reach_members_once_on_every_loop_and_nobody_else() {
    let (mut relays, mut sinks) = setup(2, 3);
    // Members: loop 0 slots 0 and 1, loop 1 slot 0. Loop 1 slot 1 is not a member.
    join_call(&mut relays, &mut sinks, &[(0, 0), (0, 1), (1, 0)]);
    assert_eq!(
        ask(
            &mut relays[1],
            &mut sinks[1],
            2,
            json!({"op": "count", "room": "call"})
        )[0]["members"],
        3
    );
    let from = sinks[0].id(0);
    let published = ask(
        &mut relays[0],
        &mut sinks[0],
        0,
        json!({"op": "publish", "room": "call", "data": {"sdp": "offer"}, "ref": "p"}),
    );
    assert_eq!(
        published,
        [json!({"op": "published", "room": "call", "ref": "p"})]
    );
    let want = json!({"op": "message", "room": "call", "from": from, "data": {"sdp": "offer"}});
    assert_eq!(sinks[0].take(1), std::slice::from_ref(&want));
    // Loop 1 gets it through its inbox, when woken.
    assert!(sinks[1].take(0).is_empty());
    relays[1].on_wake(&mut sinks[1]);
    assert_eq!(sinks[1].take(0), [want]);
    assert!(sinks[1].take(1).is_empty() && sinks[1].sent.is_empty());
    assert!(
        sinks[0].sent.is_empty(),
        "the publisher got its own message without echo"
    );
}

/// A publish is handed to the other loops (and workers) before its own loop's members get it:
/// they fan out while it does, instead of after (a room of 100,000 on 6 workers waited ~200 ms
/// for the publisher's loop; bench/broadcast.sh).
#[test]
fn a_publish_reaches_the_other_loops_before_its_own_loop_delivers() {
    let (mut relays, mut sinks) = setup(2, 3);
    join_call(&mut relays, &mut sinks, &[(0, 0), (0, 1), (0, 2), (1, 0)]);
    sinks[0].watch = Some((relays[1].inbox.clone(), Vec::new()));
    ask(
        &mut relays[0],
        &mut sinks[0],
        0,
        json!({"op": "publish", "room": "call", "data": 1}),
    );
    let (_, waiting) = sinks[0].watch.take().unwrap();
    assert_eq!(
        waiting,
        [1, 1],
        "loop 1's item waited at both of loop 0's deliveries"
    );
    assert_eq!(sinks[0].take(1)[0]["data"], 1);
    assert_eq!(sinks[0].take(2)[0]["data"], 1);
    relays[1].on_wake(&mut sinks[1]);
    assert_eq!(sinks[1].take(0)[0]["data"], 1);
}

#[test]
fn a_connection_that_ends_leaves_every_room_at_once() {
    let (mut relays, mut sinks) = setup(1, 2);
    let (r, s) = (&mut relays[0], &mut sinks[0]);
    for room in ["a", "b", "c"] {
        ask(r, s, 0, json!({"op": "join", "room": room}));
    }
    let too_many = ask(r, s, 0, json!({"op": "join", "room": "d", "ref": 4}));
    assert_eq!(too_many[0]["code"], "too_many_rooms");
    let left = ask(r, s, 0, json!({"op": "leave", "room": "a"}));
    assert_eq!(left, [json!({"op": "left", "room": "a", "members": 0})]);
    ask(r, s, 0, json!({"op": "join", "room": "a"}));
    s.conns[0].0 = false;
    r.on_end(s, 0);
    for room in ["a", "b", "c"] {
        let c = ask(r, s, 1, json!({"op": "count", "room": room}));
        assert_eq!(c[0]["members"], 0, "{room}");
    }
    assert!(r.more_rooms.is_empty() && r.rooms.is_empty());
    let not = ask(r, s, 1, json!({"op": "leave", "room": "a", "ref": 9}));
    assert_eq!(not[0]["code"], "not_a_member");
}

#[test]
fn direct_messages_reach_the_target_or_come_back_as_errors() {
    let (mut relays, mut sinks) = setup(2, 2);
    // Same loop.
    let to = sinks[0].id(1);
    let sent = ask(
        &mut relays[0],
        &mut sinks[0],
        0,
        json!({"op": "send", "to": to, "data": 1, "ref": 1}),
    );
    assert_eq!(sent, [json!({"op": "sent", "to": to, "ref": 1})]);
    assert_eq!(sinks[0].take(1)[0]["op"], "direct");
    // Another loop: handed on (sent), then delivered there.
    let far = sinks[1].id(1);
    let sent = ask(
        &mut relays[0],
        &mut sinks[0],
        0,
        json!({"op": "send", "to": far, "data": 2, "ref": 2}),
    );
    assert_eq!(sent[0]["op"], "sent");
    relays[1].on_wake(&mut sinks[1]);
    assert_eq!(sinks[1].take(1)[0]["data"], 2);
    // Another loop, connection gone: sent, then a bounce comes back.
    sinks[1].conns[1].0 = false;
    ask(
        &mut relays[0],
        &mut sinks[0],
        0,
        json!({"op": "send", "to": far, "data": 3, "ref": 3}),
    );
    relays[1].on_wake(&mut sinks[1]);
    relays[0].on_wake(&mut sinks[0]);
    let e = sinks[0].take(0);
    assert_eq!(e[0]["code"], "no_such_connection", "{e:?}");
    assert_eq!(e[0]["ref"], 3);
    // Ids nobody can hold: another incarnation, a loop this process lacks, 2^53.
    for (i, id) in [far ^ (1 << 45), far | (9 << 20), 1 << 53]
        .into_iter()
        .enumerate()
    {
        let e = ask(
            &mut relays[0],
            &mut sinks[0],
            0,
            json!({"op": "send", "to": id, "ref": i}),
        );
        assert_eq!(
            e,
            [
                json!({"op": "error", "code": "no_such_connection", "message": format!("no connection {id}"), "ref": i})
            ]
        );
    }
}

#[test]
fn bad_requests_are_answered_with_their_ref() {
    let (mut relays, mut sinks) = setup(1, 1);
    let (r, s) = (&mut relays[0], &mut sinks[0]);
    r.on_message(s, 0, false, b"{not json");
    assert_eq!(s.take(0)[0]["code"], "bad_request");
    let e = ask(r, s, 0, json!({"op": "dance", "ref": 5}));
    assert_eq!(
        (e[0]["code"].as_str(), e[0]["ref"].as_u64()),
        (Some("unknown_op"), Some(5))
    );
    let e = ask(r, s, 0, json!({"op": "join", "ref": 6}));
    assert_eq!(e[0]["message"], "this op needs \"room\"");
    // MsgPack in, MsgPack out.
    r.on_message(
        s,
        0,
        true,
        &rmp_serde::to_vec_named(&json!({"op": "count", "room": "r", "ref": 7})).unwrap(),
    );
    assert_eq!(
        s.take(0),
        [json!({"op": "count", "room": "r", "members": 0, "ref": 7})]
    );
    assert_eq!(s.data(0).encoding(), Encoding::MsgPack);
}

// ---- tokens and rate limits --------------------------------------------------------------

fn grant(sub: &str, rooms: &[&str], publish: Option<&[&str]>, send: bool, exp: u64) -> Grant {
    let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let rooms = crate::auth::Patterns::parse(&list(rooms)).unwrap();
    Grant {
        sub: Arc::from(sub),
        publish: publish.map_or_else(
            || rooms.clone(),
            |p| crate::auth::Patterns::parse(&list(p)).unwrap(),
        ),
        rooms,
        send,
        exp,
    }
}

/// A verifier with a fresh secret (leeway 0), and the secret file to mint with.
fn verifier() -> (Arc<Verifier>, tempfile::NamedTempFile) {
    use crate::auth::tests::{SECRET, secret_file, verifier};
    let f = secret_file(SECRET, 0o600);
    (Arc::new(verifier(&f, 0)), f)
}

fn token(secret: &tempfile::NamedTempFile, sub: &str, rooms: &[&str], exp: u64) -> String {
    let claims = crate::auth::tests::claims(sub, rooms, exp);
    crate::auth::mint(
        &crate::auth::SigningKey::Secret(secret.path().into()),
        &claims,
    )
    .unwrap()
}

#[test]
fn claims_decide_joins_publishes_counts_and_sends_and_a_refusal_changes_nothing() {
    let later = auth::now() + 3600;
    let (v, _secret) = verifier();
    // 0: alice, team-7/* to join, only team-7/announce to publish, no direct messages.
    // 1: bob, every room, may send.
    let (mut relays, mut sinks) = setup_with(1, 2, SETTINGS, Some(v), |slot| match slot {
        0 => Some(grant(
            "alice",
            &["team-7/*"],
            Some(&["team-7/announce"]),
            false,
            later,
        )),
        _ => Some(grant("bob", &["*"], None, true, later)),
    });
    let (r, s) = (&mut relays[0], &mut sinks[0]);
    let forbidden = |v: &Vec<Value>| v.len() == 1 && v[0]["code"] == "forbidden";
    assert!(forbidden(&ask(
        r,
        s,
        0,
        json!({"op": "join", "room": "team-8/x"})
    )));
    assert!(forbidden(&ask(
        r,
        s,
        0,
        json!({"op": "count", "room": "team-70"})
    )));
    assert_eq!(
        ask(r, s, 1, json!({"op": "count", "room": "team-8/x"}))[0]["members"],
        0,
        "nothing joined"
    );
    assert_eq!(
        ask(r, s, 0, json!({"op": "join", "room": "team-7/standup"}))[0]["op"],
        "joined"
    );
    assert_eq!(
        ask(r, s, 1, json!({"op": "join", "room": "team-7/standup"}))[0]["members"],
        2
    );
    // alice may not publish where she may join, nor send; bob receives nothing of either.
    assert!(forbidden(&ask(
        r,
        s,
        0,
        json!({"op": "publish", "room": "team-7/standup", "data": 1})
    )));
    let bob = s.id(1);
    assert!(forbidden(&ask(
        r,
        s,
        0,
        json!({"op": "send", "to": bob, "data": 1})
    )));
    assert!(s.take(1).is_empty(), "nothing delivered");
    // bob may do both, and receivers are told who spoke.
    ask(
        r,
        s,
        1,
        json!({"op": "publish", "room": "team-7/standup", "data": "hi"}),
    );
    let got = s.take(0);
    assert_eq!(got[0]["user"], "bob");
    assert_eq!(got[0]["from"], bob);
    let alice = s.id(0);
    ask(r, s, 1, json!({"op": "send", "to": alice, "data": "psst"}));
    assert_eq!(
        s.take(0)[0],
        json!({"op": "direct", "from": bob, "user": "bob", "data": "psst"})
    );
    assert_eq!(
        r.metrics
            .forbidden
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
}

#[test]
fn a_token_that_expires_closes_its_connection_with_4001_unless_refreshed() {
    let (v, secret) = verifier();
    let soon = auth::now() - 1; // already past: the next tick closes it
    let (mut relays, mut sinks) = setup_with(1, 3, SETTINGS, Some(v), |slot| {
        Some(grant(&format!("u{slot}"), &["r", "s"], None, false, soon))
    });
    let (r, s) = (&mut relays[0], &mut sinks[0]);
    ask(r, s, 1, json!({"op": "join", "room": "r"}));
    ask(r, s, 1, json!({"op": "join", "room": "s"}));
    // Slot 1 refreshes with a later token that no longer allows room s: it leaves s.
    let fresh = token(&secret, "u1", &["r"], auth::now() + 3600);
    let got = ask(r, s, 1, json!({"op": "refresh", "token": fresh, "ref": 7}));
    assert_eq!(got[0]["op"], "left");
    assert_eq!(got[0]["room"], "s");
    assert_eq!(got[1]["op"], "refreshed");
    assert_eq!(got[1]["ref"], 7);
    // Slot 2 tries another user's token, and an expired one: refused, still the old token.
    let other = token(&secret, "mallory", &["*"], auth::now() + 3600);
    assert_eq!(
        ask(r, s, 2, json!({"op": "refresh", "token": other}))[0]["code"],
        "forbidden"
    );
    let stale = token(&secret, "u2", &["*"], auth::now() - 60);
    let got = ask(r, s, 2, json!({"op": "refresh", "token": stale}));
    assert_eq!(got[0]["code"], "unauthorized");
    assert_eq!(got[0]["message"], "token expired");
    r.on_tick(s);
    assert_eq!(
        s.take(0),
        [json!({"close": 4001, "reason": "token expired"})]
    );
    assert_eq!(
        s.take(2),
        [json!({"close": 4001, "reason": "token expired"})]
    );
    assert!(
        s.take(1).is_empty() && s.is_open(1),
        "the refreshed one stays"
    );
}

#[test]
fn the_message_rate_answers_rate_limited_then_closes_with_1008_if_it_goes_on() {
    let settings = RelaySettings {
        message_rate: 1,
        message_burst: 3,
        ..SETTINGS
    };
    let (mut relays, mut sinks) = setup_with(1, 2, settings, None, |_| None);
    let (r, s) = (&mut relays[0], &mut sinks[0]);
    ask(r, s, 1, json!({"op": "join", "room": "r"}));
    let publish = json!({"op": "publish", "room": "r", "data": 1, "ref": 1});
    for _ in 0..3 {
        assert_eq!(ask(r, s, 0, publish.clone())[0]["op"], "published");
    }
    assert_eq!(s.take(1).len(), 3);
    for _ in 0..RATE_LIMIT_STRIKES - 1 {
        assert_eq!(ask(r, s, 0, publish.clone())[0]["code"], "rate_limited");
    }
    assert!(s.is_open(0));
    let last = ask(r, s, 0, publish.clone());
    assert_eq!(
        last,
        [json!({"close": 1008, "reason": "message rate limit exceeded"})]
    );
    assert!(s.take(1).is_empty(), "nothing over the rate was delivered");
    // Another connection has its own bucket; joins and counts are not rate limited.
    for _ in 0..20 {
        assert_eq!(
            ask(r, s, 1, json!({"op": "count", "room": "r"}))[0]["op"],
            "count"
        );
    }
    assert_eq!(
        ask(r, s, 1, json!({"op": "publish", "room": "r", "ref": 1}))[0]["op"],
        "published"
    );
    // Refreshes draw from the same bucket (on an open server each is refused as bad_request,
    // once the rate let it through): two more empty it, and the next publish waits.
    let refresh = json!({"op": "refresh", "token": "x", "ref": 2});
    for _ in 0..2 {
        assert_eq!(ask(r, s, 1, refresh.clone())[0]["code"], "bad_request");
    }
    assert_eq!(ask(r, s, 1, refresh)[0]["code"], "rate_limited");
    assert_eq!(ask(r, s, 1, publish)[0]["code"], "rate_limited");
}
