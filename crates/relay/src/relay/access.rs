//! What a connection may do and how fast: its token's grant (joins, publishes, counts and
//! sends checked against the claims; `refresh`; the close at expiry, 4001) and its message
//! rate (a token bucket while it publishes, sends or refreshes). Side tables of the relay by
//! slot, so an idle connection of an open server is in neither.

use std::cmp::Reverse;
use std::sync::Arc;

use super::{Relay, RelayConn};
use crate::auth::{self, Grant};
use crate::frame::close;
use crate::handler::Sink;
use crate::limits::Bucket;
use crate::metrics::{CloseReason, LoopMetrics};
use crate::protocol::Reply;

/// Refusals in a row, at least, after which a connection that goes on past its message rate
/// is closed with 1008 (or its burst, when that is larger).
pub(super) const RATE_LIMIT_STRIKES: u32 = 10;
/// How often message-rate buckets that refilled are forgotten.
pub(super) const PRUNE_BUCKETS_MS: u32 = 10_000;

/// A connection's token, as the relay keeps it.
pub(super) struct Authed {
    /// The connection's id: the expiry queue's entries of an earlier connection in the slot
    /// are told apart by it.
    pub(super) id: u64,
    pub(super) grant: Arc<Grant>,
}

/// A connection's message rate, kept while it publishes or sends.
pub(super) struct Limited {
    pub(super) bucket: Bucket,
    /// Refusals since the last message let through.
    pub(super) strikes: u32,
}

impl Relay {
    /// Connection `id` in `slot` holds `grant` (from its upgrade, or a refresh) until it ends
    /// or the grant expires.
    pub(super) fn hold_grant(&mut self, slot: usize, id: u64, grant: Arc<Grant>) {
        self.expiries.push(Reverse((grant.exp, slot as u32, id)));
        self.grants.insert(slot as u32, Authed { id, grant });
    }

    /// The connection in `slot` ended: its grant and bucket go.
    pub(super) fn forget(&mut self, slot: usize) {
        self.grants.remove(&(slot as u32));
        self.limited.remove(&(slot as u32));
    }

    /// Every 10 s: message-rate buckets that refilled are forgotten.
    pub(super) fn prune_buckets(&mut self) {
        let now = self.clock.now_ms();
        if !self.limited.is_empty() && now.wrapping_sub(self.pruned_at) >= PRUNE_BUCKETS_MS {
            let (rate, burst) = (self.settings.message_rate, self.settings.message_burst);
            self.limited
                .retain(|_, l| !l.bucket.is_full(rate, burst, now));
            self.pruned_at = now;
        }
    }

    pub(super) fn grant(&self, slot: usize) -> Option<&Arc<Grant>> {
        self.grants.get(&(slot as u32)).map(|a| &a.grant)
    }

    /// The sender's user, shown to receivers.
    pub(super) fn user(&self, slot: usize) -> Option<Arc<str>> {
        self.grant(slot).map(|g| g.sub.clone())
    }

    /// Whether the connection's token allows `what` on `room` (always, on an open server);
    /// if not, error forbidden is the answer and nothing changes.
    pub(super) fn permitted(
        &mut self,
        sink: &mut impl Sink<RelayConn>,
        slot: usize,
        what: &str,
        room: Option<&str>,
        reference: &Option<rmpv::Value>,
    ) -> bool {
        let Some(grant) = self.grant(slot) else {
            return true;
        };
        let allowed = match (what, room) {
            ("send", _) => grant.send,
            ("publish", Some(room)) => grant.publish.allows(room),
            (_, Some(room)) => grant.rooms.allows(room),
            (_, None) => true,
        };
        if !allowed {
            LoopMetrics::add(&self.metrics.forbidden, 1);
            let m = match room {
                Some(room) if what != "send" => {
                    format!("your token does not allow {what} in room {room:?}")
                }
                _ => "your token does not allow direct messages".to_string(),
            };
            self.reply_error(sink, slot, "forbidden", m, reference.clone());
        }
        allowed
    }

    /// Whether the connection's message rate lets one more publish or send through; if not,
    /// error rate_limited, and Close 1008 once it has been told too many times in a row.
    pub(super) fn within_rate(
        &mut self,
        sink: &mut impl Sink<RelayConn>,
        slot: usize,
        reference: &Option<rmpv::Value>,
    ) -> bool {
        let (rate, burst) = (self.settings.message_rate, self.settings.message_burst);
        if rate == 0 {
            return true;
        }
        let now = self.clock.now_ms();
        let l = self.limited.entry(slot as u32).or_insert(Limited {
            bucket: Bucket::full(burst, now),
            strikes: 0,
        });
        if l.bucket.take(rate, burst, now) {
            l.strikes = 0;
            return true;
        }
        l.strikes += 1;
        let strikes = l.strikes;
        LoopMetrics::add(&self.metrics.rate_limited, 1);
        if strikes >= RATE_LIMIT_STRIKES.max(burst) {
            if let Some(unlogged) = self.closes_logged.ready(now) {
                log!(
                    "loop {}: closed connection {}{} with 1008: {strikes} messages in a row over \
                     --message-rate {rate} ({unlogged} other such closes since the last line)",
                    sink.loop_index(),
                    sink.id(slot),
                    self.user_said(slot),
                );
            }
            sink.close(
                slot,
                close::POLICY,
                "message rate limit exceeded",
                CloseReason::RateLimited,
            );
        } else {
            let m = format!("more than {rate} messages a second (bursts of {burst})");
            self.reply_error(sink, slot, "rate_limited", m, reference.clone());
        }
        false
    }

    /// " (user NAME)" for log lines, when the connection has a token.
    pub(super) fn user_said(&self, slot: usize) -> String {
        self.grant(slot)
            .map_or_else(String::new, |g| format!(" (user {:?})", &*g.sub))
    }

    /// A new token for this connection: the same user, a later end; rooms the new token does
    /// not allow are left (each answered `left`).
    pub(super) fn refresh(
        &mut self,
        sink: &mut impl Sink<RelayConn>,
        slot: usize,
        token: &str,
        reference: Option<rmpv::Value>,
    ) {
        let Some(verifier) = self.verifier.clone() else {
            let m = "this server takes no tokens";
            return self.reply_error(sink, slot, "bad_request", m, reference);
        };
        let grant = match verifier.verify(token) {
            Ok(g) => g,
            Err(why) => {
                let m = format!("token {why}");
                return self.reply_error(sink, slot, "unauthorized", m, reference);
            }
        };
        if self.grant(slot).is_some_and(|old| old.sub != grant.sub) {
            let m = "a refreshed token must name the same sub";
            return self.reply_error(sink, slot, "forbidden", m, reference);
        }
        let grant = Arc::new(grant);
        self.hold_grant(slot, sink.id(slot), grant.clone());
        LoopMetrics::add(&self.metrics.refreshed, 1);
        for room in self.rooms_of(sink, slot) {
            let name = self.rooms.name(room).clone();
            if !grant.rooms.allows(&name) {
                self.drop_membership(sink, slot, room);
                self.reply_members(sink, slot, "left", &name, None);
            }
        }
        let reply = Reply {
            op: "refreshed",
            exp: Some(grant.exp),
            reference,
            ..Reply::default()
        };
        self.reply(sink, slot, &reply);
    }

    /// Closes (4001) every connection whose token ran out and was not refreshed.
    pub(super) fn close_expired(&mut self, sink: &mut impl Sink<RelayConn>) {
        let Some(verifier) = self.verifier.clone() else {
            return;
        };
        let now = auth::now();
        while let Some(Reverse((exp, slot, id))) = self.expiries.peek().copied() {
            if now <= exp.saturating_add(verifier.leeway()) {
                break;
            }
            self.expiries.pop();
            let current = self
                .grants
                .get(&slot)
                .is_some_and(|a| a.id == id && a.grant.exp == exp);
            if !current || !sink.is_open(slot as usize) {
                continue; // refreshed since, or another connection's slot now
            }
            if let Some(unlogged) = self.closes_logged.ready(self.clock.now_ms()) {
                log!(
                    "loop {}: closed connection {id}{} with {}: its token expired at {exp} \
                     ({unlogged} other such closes since the last line)",
                    sink.loop_index(),
                    self.user_said(slot as usize),
                    auth::CLOSE_EXPIRED,
                );
            }
            sink.close(
                slot as usize,
                auth::CLOSE_EXPIRED,
                "token expired",
                CloseReason::TokenExpired,
            );
        }
    }
}
