//! One batch of the bridge: what the loops left since the last one (`Pending::take`) and the
//! sweep's slice of lease renewals, in one round: first the subscription changes, then one
//! pipeline with every message in the order the loops sent them, the count of every room that
//! changed or was asked about (read back in the same script), and the renewals; then the
//! answers go back to the loops. A batch takes one round trip however much it carries, which
//! is what keeps a hop through Redis cheap under load.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use fred::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::time::Instant;

use super::bridge::{Bridge, RETRY_AFTER};
use super::{Bounce, LEASE, Outbound, Waiting, keys, scripts};
use crate::bus::{Bus, Item};
use crate::id::ConnId;

/// Commands per pipeline.
const CHUNK: usize = 4096;
/// Tries of a direct message whose process is alive but between subscriptions, `RETRY_AFTER`
/// apart: 6 s, which covers a failover (about 3 s with cluster-node-timeout 2000).
const DIRECT_TRIES: u8 = 24;

/// One command of a batch's pipeline.
enum Cmd {
    /// Write this process's count of a room and read the room's total back.
    Count(Arc<str>),
    /// Write this process's count of a room under a new lease.
    Renew(Arc<str>),
    Out(Outbound),
}

impl Bridge {
    pub(super) async fn work(&mut self, batch: Waiting) {
        let Waiting {
            asks, dirty, out, ..
        } = batch;
        let renew: Vec<Arc<str>> = std::mem::take(&mut self.renewing)
            .into_iter()
            .filter(|r| !dirty.contains(r))
            .collect();
        let mut check = dirty.clone();
        check.extend(renew.iter().cloned());
        self.sync_subscriptions(&check).await;
        let mut rooms = dirty;
        rooms.extend(asks.iter().map(|a| a.room.clone()));
        // Messages first: a message waits for nothing, while counts only matter to the asks,
        // which are answered once the whole batch is back.
        let mut cmds: Vec<Cmd> = out.into_iter().map(Cmd::Out).collect();
        cmds.extend(rooms.into_iter().map(Cmd::Count));
        cmds.extend(renew.into_iter().map(Cmd::Renew));
        let mut totals = FxHashMap::default();
        while !cmds.is_empty() {
            let chunk: Vec<Cmd> = cmds.drain(..cmds.len().min(CHUNK)).collect();
            let unknown = self.pipeline(chunk, &mut totals).await;
            // Scripts a node did not know: load them everywhere, send those commands again.
            if !unknown.is_empty() && self.load_scripts().await {
                let again = self.pipeline(unknown, &mut totals).await;
                self.pending
                    .stats
                    .dropped
                    .fetch_add(count_out(&again), Ordering::Relaxed);
            }
        }
        for ask in asks {
            let members = totals
                .get(&ask.room)
                .copied()
                .unwrap_or_else(|| self.local.local_members(&ask.room));
            if let Some(to) = ConnId::decode(ask.to) {
                let _ = self.local.route(to, Item::Members { ask, members });
            }
        }
    }

    /// Subscribes to the rooms that gained their first member here, unsubscribes from those
    /// that lost their last. A failure leaves the room as it was; the sweep retries.
    async fn sync_subscriptions(&mut self, rooms: &FxHashSet<Arc<str>>) {
        let (mut join, mut leave) = (Vec::new(), Vec::new());
        for room in rooms {
            let want = self.local.local_members(room) > 0 && !self.isolated();
            match (want, self.subscribed.contains(room)) {
                (true, false) => join.push(room.clone()),
                (false, true) => leave.push(room.clone()),
                _ => {}
            }
        }
        if join.is_empty() && leave.is_empty() {
            return;
        }
        let sub = &self.sub;
        let joined =
            futures::future::join_all(join.iter().map(|r| sub.ssubscribe(keys::room_channel(r))));
        let left = futures::future::join_all(
            leave
                .iter()
                .map(|r| sub.sunsubscribe(keys::room_channel(r))),
        );
        let (joined, left) = futures::join!(joined, left);
        for (room, r) in join.into_iter().zip(joined) {
            if r.is_ok() {
                self.subscribed.insert(room);
            }
        }
        for (room, r) in leave.into_iter().zip(left) {
            if r.is_ok() {
                self.subscribed.remove(&room);
            }
        }
    }

    pub(super) fn isolated(&self) -> bool {
        self.pending.stats.isolated.load(Ordering::Relaxed)
    }

    /// This process's member count of `room` as Redis should know it (none while isolated).
    fn mine(&self, room: &str) -> i64 {
        if self.isolated() {
            0
        } else {
            self.local.local_members(room) as i64
        }
    }

    /// One pipeline; then what came of each command. Gives back the commands that failed
    /// because a node did not know their script.
    async fn pipeline(
        &mut self,
        chunk: Vec<Cmd>,
        totals: &mut FxHashMap<Arc<str>, u64>,
    ) -> Vec<Cmd> {
        let p = self.client.pipeline();
        let field = keys::field(self.process);
        let lease = LEASE.as_millis() as i64;
        let s = &self.scripts;
        for cmd in &chunk {
            let count = |script: &scripts::Script, room: &str| {
                let args = vec![field.as_str().into(), self.mine(room).into(), lease.into()];
                script.call(vec![keys::room_counts(room)], args)
            };
            let _: Result<(), Error> = match cmd {
                Cmd::Count(room) => {
                    let (c, args) = count(&s.count, room);
                    p.custom(c, args).await
                }
                Cmd::Renew(room) => {
                    let (c, args) = count(&s.renew, room);
                    p.custom(c, args).await
                }
                Cmd::Out(Outbound::Room { room, bytes }) => {
                    p.spublish(keys::room_channel(room), bytes.clone()).await
                }
                Cmd::Out(Outbound::Direct { to, bytes, .. }) => {
                    let keys = vec![keys::process_channel(*to), keys::process_alive(*to)];
                    let (c, args) = s.direct.call(keys, vec![Value::Bytes(bytes.clone())]);
                    p.custom(c, args).await
                }
            };
        }
        let results: Vec<Result<i64, Error>> = p.try_all().await;
        if !results.is_empty() {
            self.reached(results.iter().any(Result::is_ok));
        }
        let mut unknown = Vec::new();
        let pending = self.pending.clone();
        let stats = &pending.stats;
        for (cmd, result) in chunk.into_iter().zip(results) {
            match (cmd, result) {
                (cmd, Err(e)) if scripts::unknown_script(&e) => unknown.push(cmd),
                (Cmd::Count(room), Ok(total)) => {
                    totals.insert(room, total.max(0) as u64);
                }
                (Cmd::Count(_) | Cmd::Renew(_), _) => {}
                (Cmd::Out(_), Err(_)) => {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
                (Cmd::Out(out), Ok(receivers)) => {
                    stats.published.fetch_add(1, Ordering::Relaxed);
                    self.delivered(out, receivers);
                }
            }
        }
        unknown
    }

    /// What to do after a message went out and `receivers` got it.
    fn delivered(&mut self, out: Outbound, receivers: i64) {
        let Outbound::Direct {
            to,
            bytes,
            bounce,
            tries,
        } = out
        else {
            return;
        };
        match receivers {
            0 => {
                // Nobody listens and the process is dead: its connections are gone.
                if let Some(b) = bounce {
                    self.bounce(b);
                }
            }
            -1 if tries + 1 < DIRECT_TRIES => {
                // Alive but between subscriptions (a failover): once more, a little later.
                let again = Outbound::Direct {
                    to,
                    bytes,
                    bounce,
                    tries: tries + 1,
                };
                self.later.push((Instant::now() + RETRY_AFTER, again));
            }
            -1 => {
                self.pending.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// Tells a sender in this process that its direct message found nobody.
    fn bounce(&self, b: Bounce) {
        if let Some(sender) = ConnId::decode(b.sender) {
            let item = Item::Bounce {
                to: b.sender,
                target: b.target,
                reference: b.reference,
            };
            let _ = self.local.route(sender, item);
        }
    }
}

/// Messages among `cmds` (what a second NOSCRIPT failure loses).
fn count_out(cmds: &[Cmd]) -> u64 {
    cmds.iter().filter(|c| matches!(c, Cmd::Out(_))).count() as u64
}
