//! The relay protocol's operations (docs/protocol.md), as the handler of one event loop: hello,
//! join, leave, publish, send, count, refresh, and what other loops and processes hand this one
//! (room messages, direct messages, bounces). Rooms are this loop's (`rooms.rs`); everything
//! that crosses loops or processes goes through the `Bus`. No sockets here: the transport
//! hands in whole messages and the relay answers through its `Sink`.
//!
//! On a server that requires tokens, each connection's `Grant` (`auth.rs`) decides what it may
//! join, publish, count and send, and its expiry closes it (4001) unless a `refresh` came. The
//! per-connection message rate is a token bucket kept only for connections that published or
//! sent lately. Both live in side tables keyed by slot, so an idle connection of an open server
//! still costs its 4 bytes here.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::auth::{Grant, Verifier};
use super::bus::{Ask, Bus, Inbox, Item};
use super::config::Options;
use super::handler::{Handler, Place, Sink};
use super::handshake;
use super::id::ConnId;
use super::limits::{Clock, Throttle};
use super::metrics::LoopMetrics;
use super::outq::Out;
use super::protocol::{self, Encoding, Outgoing, Reply};
use super::rooms::{RoomId, Rooms};
use super::routes::Routes;
use access::{Authed, Limited};

/// What the relay keeps per connection, in its slot: the first room it joined (most join one;
/// further rooms are in `Relay::more_rooms`) and the encoding it receives in, in 4 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayConn(u32);

const MSGPACK_BIT: u32 = 1 << 31;
const NO_ROOM: RoomId = MSGPACK_BIT - 1;

impl Default for RelayConn {
    fn default() -> RelayConn {
        RelayConn(NO_ROOM)
    }
}

impl RelayConn {
    fn room(self) -> Option<RoomId> {
        let r = self.0 & !MSGPACK_BIT;
        (r != NO_ROOM).then_some(r)
    }

    fn set_room(&mut self, room: Option<RoomId>) {
        self.0 = (self.0 & MSGPACK_BIT) | room.unwrap_or(NO_ROOM);
    }

    fn encoding(self) -> Encoding {
        if self.0 & MSGPACK_BIT != 0 {
            Encoding::MsgPack
        } else {
            Encoding::Json
        }
    }

    fn set_encoding(&mut self, enc: Encoding) {
        match enc {
            Encoding::MsgPack => self.0 |= MSGPACK_BIT,
            Encoding::Json => self.0 &= !MSGPACK_BIT,
        }
    }
}

/// The relay's settings (a part of the server's `Config`).
#[derive(Clone, Debug)]
pub struct RelaySettings {
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    pub max_rooms_per_conn: usize,
    /// Publishes and sends per second per connection; 0: no limit.
    pub message_rate: u32,
    pub message_burst: u32,
}

impl RelaySettings {
    pub fn of(o: &Options) -> RelaySettings {
        RelaySettings {
            ping_interval_ms: o.ping_interval_ms,
            ping_timeout_ms: o.ping_timeout_ms,
            max_rooms_per_conn: o.max_rooms,
            message_rate: o.message_rate,
            message_burst: o.message_burst.unwrap_or(o.message_rate),
        }
    }
}

pub struct Relay {
    settings: RelaySettings,
    /// The token keys, for `refresh`; `None` on an open server.
    verifier: Option<Arc<Verifier>>,
    /// Each connection's grant, by slot (only on a server that requires tokens).
    grants: FxHashMap<u32, Authed>,
    /// (exp, slot, id), soonest first: swept every tick.
    expiries: BinaryHeap<Reverse<(u64, u32, u64)>>,
    /// Message-rate buckets by slot (only with --message-rate).
    limited: FxHashMap<u32, Limited>,
    clock: Clock,
    pruned_at: u32,
    /// Log lines about closes for expiry and for the rate limit.
    closes_logged: Throttle,
    bus: Arc<dyn Bus>,
    /// Where other loops and processes leave items for this loop.
    inbox: Arc<Inbox>,
    metrics: Arc<LoopMetrics>,
    routes: Routes,
    rooms: Rooms,
    /// Rooms beyond the first, by slot.
    more_rooms: FxHashMap<u32, Vec<RoomId>>,
    scratch: Vec<u32>,
    items: Vec<Item>,
}

impl Relay {
    pub fn new(
        settings: RelaySettings,
        bus: Arc<dyn Bus>,
        inbox: Arc<Inbox>,
        metrics: Arc<LoopMetrics>,
        routes: Routes,
    ) -> Relay {
        Relay {
            settings,
            verifier: None,
            grants: FxHashMap::default(),
            expiries: BinaryHeap::new(),
            limited: FxHashMap::default(),
            clock: Clock::default(),
            pruned_at: 0,
            closes_logged: Throttle::default(),
            bus,
            inbox,
            metrics,
            routes,
            rooms: Rooms::default(),
            more_rooms: FxHashMap::default(),
            scratch: Vec::new(),
            items: Vec::new(),
        }
    }

    /// Tokens required: `verifier` checks the ones `refresh` brings.
    pub fn with_verifier(mut self, verifier: Option<Arc<Verifier>>) -> Relay {
        self.verifier = verifier;
        self
    }

    fn rooms_of(&self, sink: &impl Sink<RelayConn>, slot: usize) -> Vec<RoomId> {
        let mut all: Vec<RoomId> = sink.data(slot).room().into_iter().collect();
        if let Some(more) = self.more_rooms.get(&(slot as u32)) {
            all.extend_from_slice(more);
        }
        all
    }

    fn is_member(&self, sink: &impl Sink<RelayConn>, slot: usize, id: RoomId) -> bool {
        sink.data(slot).room() == Some(id)
            || self
                .more_rooms
                .get(&(slot as u32))
                .is_some_and(|m| m.contains(&id))
    }

    fn reply(&mut self, sink: &mut impl Sink<RelayConn>, slot: usize, reply: &Reply) {
        let bytes = reply.frame(sink.data(slot).encoding());
        sink.send(slot, Out::Bytes(&bytes));
    }

    fn reply_error(
        &mut self,
        sink: &mut impl Sink<RelayConn>,
        slot: usize,
        code: &'static str,
        message: impl Into<String>,
        reference: Option<rmpv::Value>,
    ) {
        LoopMetrics::add(&self.metrics.protocol_errors_replied, 1);
        self.reply(sink, slot, &Reply::error(code, message, reference));
    }

    fn send_shared(&mut self, sink: &mut impl Sink<RelayConn>, slot: usize, msg: &Arc<Outgoing>) {
        let enc = sink.data(slot).encoding();
        sink.send(slot, Out::Shared(msg, enc));
    }

    fn on_request(&mut self, sink: &mut impl Sink<RelayConn>, slot: usize, req: protocol::Request) {
        let reference = req.reference;
        let need_room = |room: Option<String>| room.ok_or("this op needs \"room\"");
        let op = req.op.as_str();
        if matches!(op, "join" | "publish" | "count" | "send")
            && !self.permitted(sink, slot, op, req.room.as_deref(), &reference)
        {
            return;
        }
        // A refresh costs a signature check (tens of microseconds with RSA): it shares the
        // bucket, so no request that does work per call is unbounded.
        if matches!(op, "publish" | "send" | "refresh") && !self.within_rate(sink, slot, &reference)
        {
            return;
        }
        match op {
            "join" => match need_room(req.room) {
                Ok(room) => self.join(sink, slot, &room, reference),
                Err(m) => self.reply_error(sink, slot, "bad_request", m, reference),
            },
            "refresh" => match req.token {
                Some(token) => self.refresh(sink, slot, &token, reference),
                None => {
                    let m = "refresh needs \"token\"";
                    self.reply_error(sink, slot, "bad_request", m, reference)
                }
            },
            "leave" => match need_room(req.room) {
                Ok(room) => self.leave(sink, slot, &room, reference),
                Err(m) => self.reply_error(sink, slot, "bad_request", m, reference),
            },
            "publish" => match need_room(req.room) {
                Ok(room) => {
                    let data = req.data.unwrap_or(rmpv::Value::Nil);
                    self.publish(sink, slot, &room, data, req.echo, reference)
                }
                Err(m) => self.reply_error(sink, slot, "bad_request", m, reference),
            },
            "send" => match req.to {
                Some(to) => {
                    let data = req.data.unwrap_or(rmpv::Value::Nil);
                    self.direct(sink, slot, to, data, reference)
                }
                None => self.reply_error(sink, slot, "bad_request", "send needs \"to\"", reference),
            },
            "count" => match need_room(req.room) {
                Ok(room) => self.reply_members(sink, slot, "count", &room, reference),
                Err(m) => self.reply_error(sink, slot, "bad_request", m, reference),
            },
            other => {
                let m =
                    format!("unknown op {other:?} (join, leave, publish, send, count, refresh)");
                self.reply_error(sink, slot, "unknown_op", m, reference)
            }
        }
    }

    fn join(
        &mut self,
        sink: &mut impl Sink<RelayConn>,
        slot: usize,
        room: &str,
        reference: Option<rmpv::Value>,
    ) {
        let already = self
            .rooms
            .lookup(room)
            .is_some_and(|id| self.is_member(sink, slot, id));
        if !already {
            let count = self.rooms_of(sink, slot).len();
            if count >= self.settings.max_rooms_per_conn {
                let m = format!(
                    "a connection may be in at most {} rooms",
                    self.settings.max_rooms_per_conn
                );
                return self.reply_error(sink, slot, "too_many_rooms", m, reference);
            }
            let (id, _) = self.rooms.join(room, slot as u32);
            if sink.data(slot).room().is_none() {
                sink.data_mut(slot).set_room(Some(id));
            } else {
                self.more_rooms.entry(slot as u32).or_default().push(id);
            }
            let name = self.rooms.name(id).clone();
            self.bus.joined(&name, sink.loop_index());
        }
        self.reply_members(sink, slot, "joined", room, reference);
    }

    /// Answers a room op with the room's whole-service member count: now, or when the bus
    /// hands the answer back (`Item::Members`).
    fn reply_members(
        &mut self,
        sink: &mut impl Sink<RelayConn>,
        slot: usize,
        op: &'static str,
        room: &str,
        reference: Option<rmpv::Value>,
    ) {
        let room: Arc<str> = match self.rooms.lookup(room) {
            Some(id) => self.rooms.name(id).clone(),
            None => Arc::from(room),
        };
        let ask = Ask {
            to: sink.id(slot),
            op,
            room,
            reference,
        };
        // The bus keeps the question when it answers later; a clone of the room is cheap.
        let (room, reference) = (ask.room.clone(), ask.reference.clone());
        if let Some(members) = self.bus.members(ask) {
            self.reply_count(sink, slot, op, room, members, reference);
        }
    }

    fn reply_count(
        &mut self,
        sink: &mut impl Sink<RelayConn>,
        slot: usize,
        op: &'static str,
        room: Arc<str>,
        members: u64,
        reference: Option<rmpv::Value>,
    ) {
        let reply = Reply {
            op,
            room: Some(room),
            members: Some(members),
            reference,
            ..Reply::default()
        };
        self.reply(sink, slot, &reply);
    }

    fn leave(
        &mut self,
        sink: &mut impl Sink<RelayConn>,
        slot: usize,
        room: &str,
        reference: Option<rmpv::Value>,
    ) {
        let id = self
            .rooms
            .lookup(room)
            .filter(|id| self.is_member(sink, slot, *id));
        let Some(id) = id else {
            let m = format!("not in room {room:?}");
            return self.reply_error(sink, slot, "not_a_member", m, reference);
        };
        self.drop_membership(sink, slot, id);
        self.reply_members(sink, slot, "left", room, reference);
    }

    fn drop_membership(&mut self, sink: &mut impl Sink<RelayConn>, slot: usize, id: RoomId) {
        let key = slot as u32;
        if sink.data(slot).room() == Some(id) {
            let next = self.more_rooms.get_mut(&key).and_then(|m| m.pop());
            sink.data_mut(slot).set_room(next);
        } else if let Some(m) = self.more_rooms.get_mut(&key) {
            m.retain(|r| *r != id);
        }
        if self.more_rooms.get(&key).is_some_and(Vec::is_empty) {
            self.more_rooms.remove(&key);
        }
        let name = self.rooms.name(id).clone();
        self.rooms.leave(id, key);
        self.bus.left(&name, sink.loop_index());
    }

    fn publish(
        &mut self,
        sink: &mut impl Sink<RelayConn>,
        slot: usize,
        room: &str,
        data: rmpv::Value,
        echo: bool,
        reference: Option<rmpv::Value>,
    ) {
        let from = sink.id(slot);
        let name: Arc<str> = match self.rooms.lookup(room) {
            Some(id) => self.rooms.name(id).clone(),
            None => Arc::from(room),
        };
        let msg = Outgoing::new(Reply {
            op: "message",
            room: Some(name.clone()),
            from: Some(from),
            user: self.user(slot),
            data: Some(data),
            ..Reply::default()
        });
        let skip = (!echo).then_some(from);
        // The other loops and workers first: they fan out while this loop does, instead of
        // waiting for this loop's members (a room of 100,000 on 6 workers: ~200 ms each).
        self.bus.publish(sink.loop_index(), &name, &msg, skip);
        self.deliver_room(sink, &name, &msg, skip);
        if reference.is_some() {
            let reply = Reply {
                op: "published",
                room: Some(name),
                reference,
                ..Reply::default()
            };
            self.reply(sink, slot, &reply);
        }
    }

    /// A room message to this loop's members of `room`, except `skip`.
    fn deliver_room(
        &mut self,
        sink: &mut impl Sink<RelayConn>,
        room: &str,
        msg: &Arc<Outgoing>,
        skip: Option<u64>,
    ) {
        let Some(id) = self.rooms.lookup(room) else {
            return;
        };
        let mut members = std::mem::take(&mut self.scratch);
        self.rooms.members_into(id, &mut members);
        for &m in &members {
            let m = m as usize;
            if !sink.is_open(m) || skip == Some(sink.id(m)) {
                continue;
            }
            self.send_shared(sink, m, msg);
        }
        self.scratch = members;
    }

    fn direct(
        &mut self,
        sink: &mut impl Sink<RelayConn>,
        slot: usize,
        to: u64,
        data: rmpv::Value,
        reference: Option<rmpv::Value>,
    ) {
        let from = sink.id(slot);
        let msg = Outgoing::new(Reply {
            op: "direct",
            from: Some(from),
            user: self.user(slot),
            data: Some(data),
            ..Reply::default()
        });
        let gone = |to: u64| format!("no connection {to}");
        let Some(target) = ConnId::decode(to) else {
            return self.reply_error(sink, slot, "no_such_connection", gone(to), reference);
        };
        if sink.is_here(target) {
            let Some(target) = sink.slot_of(to) else {
                return self.reply_error(sink, slot, "no_such_connection", gone(to), reference);
            };
            self.send_shared(sink, target, &msg);
        } else {
            let item = Item::Direct {
                to,
                from,
                msg,
                reference: reference.clone(),
            };
            if self.bus.route(target, item).is_err() {
                // No live process or loop of this server has that id's incarnation or loop:
                // the connection is gone (or never was), and nobody else can look it up.
                return self.reply_error(sink, slot, "no_such_connection", gone(to), reference);
            }
        }
        if reference.is_some() {
            let reply = Reply {
                op: "sent",
                to: Some(to),
                reference,
                ..Reply::default()
            };
            self.reply(sink, slot, &reply);
        }
    }

    fn on_item(&mut self, sink: &mut impl Sink<RelayConn>, item: Item) {
        match item {
            Item::Room { room, msg, skip } => self.deliver_room(sink, &room, &msg, skip),
            Item::Direct {
                to,
                from,
                msg,
                reference,
            } => match sink.slot_of(to) {
                Some(target) => self.send_shared(sink, target, &msg),
                None => {
                    if let Some(sender) = ConnId::decode(from) {
                        // A sender that is gone too needs no answer.
                        let bounce = Item::Bounce {
                            to: from,
                            target: to,
                            reference,
                        };
                        let _ = self.bus.route(sender, bounce);
                    }
                }
            },
            Item::Bounce {
                to,
                target,
                reference,
            } => {
                if let Some(slot) = sink.slot_of(to) {
                    let m = format!("no connection {target}");
                    self.reply_error(sink, slot, "no_such_connection", m, reference);
                }
            }
            Item::Members { ask, members } => {
                if let Some(slot) = sink.slot_of(ask.to) {
                    self.reply_count(sink, slot, ask.op, ask.room, members, ask.reference);
                }
            }
        }
    }
}

impl Handler for Relay {
    type Data = RelayConn;

    fn on_open(
        &mut self,
        sink: &mut impl Sink<RelayConn>,
        slot: usize,
        path: &str,
        grant: Option<Arc<Grant>>,
    ) {
        if handshake::query_param(path, "encoding") == Some("msgpack") {
            sink.data_mut(slot).set_encoding(Encoding::MsgPack);
        }
        let id = sink.id(slot);
        let (user, exp) = match &grant {
            Some(g) => (Some(g.sub.clone()), Some(g.exp)),
            None => (None, None),
        };
        if let Some(grant) = grant {
            self.hold_grant(slot, id, grant);
        }
        let hello = Reply {
            op: "hello",
            id: Some(id),
            user,
            exp,
            ping_interval: Some(self.settings.ping_interval_ms),
            ping_timeout: Some(self.settings.ping_timeout_ms),
            ..Reply::default()
        };
        self.reply(sink, slot, &hello);
    }

    fn on_message(
        &mut self,
        sink: &mut impl Sink<RelayConn>,
        slot: usize,
        binary: bool,
        payload: &[u8],
    ) {
        // Each connection receives in the encoding of the last data frame it sent.
        let enc = if binary {
            Encoding::MsgPack
        } else {
            Encoding::Json
        };
        sink.data_mut(slot).set_encoding(enc);
        match protocol::decode(payload, enc) {
            Ok(req) => self.on_request(sink, slot, req),
            Err(e) => {
                let reference = protocol::salvage_ref(payload, enc);
                self.reply_error(sink, slot, "bad_request", e, reference)
            }
        }
    }

    /// Leaves every room at once: member counts only count connections that still receive.
    fn on_end(&mut self, sink: &mut impl Sink<RelayConn>, slot: usize) {
        for id in self.rooms_of(sink, slot) {
            self.drop_membership(sink, slot, id);
        }
        self.forget(slot);
    }

    /// Expired tokens, and (every 10 s) message-rate buckets that refilled.
    fn on_tick(&mut self, sink: &mut impl Sink<RelayConn>) {
        self.close_expired(sink);
        self.prune_buckets();
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.inbox.waker.fd())
    }

    fn on_wake(&mut self, sink: &mut impl Sink<RelayConn>) {
        let mut items = std::mem::take(&mut self.items);
        self.inbox.drain(&mut items);
        for item in items.drain(..) {
            self.on_item(sink, item);
        }
        self.items = items;
    }

    /// `?affinity=ROOM` (percent-encoded, 1 to 128 bytes): the worker and loop home to ROOM,
    /// where its members cost the least and a message to them crosses no bus.
    fn place(&self, path: &str) -> Option<Place> {
        let room = handshake::percent_decoded(handshake::query_param(path, "affinity")?)?;
        protocol::is_room_name(&room).then(|| self.bus.place(&room))?
    }

    fn on_get(&mut self, path: &str) -> Vec<u8> {
        self.routes.answer(path)
    }
}

mod access;
#[cfg(test)]
mod tests;
