//! One batch of the bridge: what the loops left since the last one (`Pending::take`) and the
//! sweep's slice, in one round: first the subscription changes, then one pipeline with every
//! message in the order the loops sent them, the count of every room that changed or was asked
//! about (every process's count read back in the same script), the sweep's count refreshes and
//! the dead processes' fields to forget; then, if a count named a process whose liveness this
//! process has not checked in the last `ALIVE_FRESH`, one pipeline of EXISTS on their alive
//! keys; then the answers go back to the loops. A batch takes one or two round trips however
//! much it carries, which is what keeps a hop through Redis cheap under load.

use crate::names::{NameMap, NameSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use fred::prelude::*;
use rustc_hash::FxHashSet;
use tokio::time::Instant;

use super::bridge::{Bridge, RETRY_AFTER};
use super::{Bounce, Outbound, ROOM_TTL, Waiting, keys, scripts};
use crate::bus::{Bus, Item};
use crate::id::ConnId;

/// Commands per pipeline.
const CHUNK: usize = 4096;
/// Tries of a direct message whose process is alive but between subscriptions, `RETRY_AFTER`
/// apart: 6 s, which covers a failover (about 3 s with cluster-node-timeout 2000).
const DIRECT_TRIES: u8 = 24;
/// How long what this process learned of another process's alive key is taken as true. A
/// killed process's members stop counting at most this long after its alive lease lapsed.
const ALIVE_FRESH: std::time::Duration = std::time::Duration::from_secs(1);
/// Other processes' liveness remembered at most (the oldest are forgotten first).
const ALIVE_REMEMBERED: usize = 4096;

/// Subscription changes in flight at once. Each is a future of about 4 KiB: a join storm that
/// creates a thousand rooms in one batch must not hold a thousand of them at the same time
/// (their memory stays with the process after they are done).
pub(super) const SUBSCRIBING: usize = 64;

/// Runs `f` on every room, at most `n` at a time; whether each succeeded.
pub(super) async fn at_most<F, Fut, T>(
    n: usize,
    rooms: Vec<Arc<str>>,
    f: F,
) -> Vec<(Arc<str>, bool)>
where
    F: Fn(&str) -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    use futures::StreamExt;
    futures::stream::iter(rooms.into_iter().map(|room| {
        let fut = f(&room);
        async move { (room, fut.await.is_ok()) }
    }))
    .buffer_unordered(n)
    .collect()
    .await
}

/// One command of a batch's pipeline.
enum Cmd {
    /// Write this process's count of a room and read every process's count back.
    Count(Arc<str>),
    /// Write this process's count of a room again (the slow refresh).
    Renew(Arc<str>),
    /// Remove a dead process's field from a room's counts.
    Forget(Arc<str>, String),
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
        if self.refreshing {
            cmds.extend(renew.into_iter().map(Cmd::Renew));
        }
        cmds.extend(
            std::mem::take(&mut self.forget)
                .into_iter()
                .map(|(room, field)| Cmd::Forget(room, field)),
        );
        let mut counts = NameMap::default();
        while !cmds.is_empty() {
            let chunk: Vec<Cmd> = cmds.drain(..cmds.len().min(CHUNK)).collect();
            let unknown = self.pipeline(chunk, &mut counts).await;
            // Scripts a node did not know: load them everywhere, send those commands again.
            if !unknown.is_empty() && self.load_scripts().await {
                let again = self.pipeline(unknown, &mut counts).await;
                self.pending
                    .stats
                    .dropped
                    .fetch_add(count_out(&again), Ordering::Relaxed);
            }
        }
        let totals = self.live_totals(counts).await;
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

    /// Each room's total over the processes alive: this one, and those whose alive key exists
    /// (checked now for those not checked within `ALIVE_FRESH`). A dead process's field is
    /// forgotten by the next batch. A process whose liveness cannot be read (Redis answered
    /// with an error) is counted: a transient error must not make members vanish.
    async fn live_totals(&mut self, counts: NameMap<Vec<(String, u64)>>) -> NameMap<u64> {
        let own = keys::field(self.process);
        let now = Instant::now();
        let mut ask: Vec<String> = Vec::new();
        for fields in counts.values() {
            for (field, _) in fields {
                let fresh = self
                    .alive
                    .get(field)
                    .is_some_and(|(_, at)| now.duration_since(*at) < ALIVE_FRESH);
                if *field != own && !fresh && !ask.contains(field) {
                    ask.push(field.clone());
                }
            }
        }
        let mut unknown = FxHashSet::default();
        if !ask.is_empty() {
            let p = self.client.pipeline();
            for field in &ask {
                let (c, args) = scripts::keyed("EXISTS", keys::alive_of_field(field), vec![]);
                let _: Result<(), Error> = p.custom(c, args).await;
            }
            let results: Vec<Result<i64, Error>> = p.try_all().await;
            for (field, r) in ask.into_iter().zip(results) {
                match r {
                    Ok(n) => {
                        self.alive.insert(field, (n > 0, now));
                    }
                    Err(_) => {
                        unknown.insert(field);
                    }
                }
            }
            if self.alive.len() > ALIVE_REMEMBERED {
                self.alive
                    .retain(|_, (_, at)| now.duration_since(*at) < ALIVE_FRESH * 60);
            }
        }
        let mut totals = NameMap::default();
        for (room, fields) in counts {
            let mut total = 0;
            for (field, n) in fields {
                let alive = field == own
                    || unknown.contains(&field)
                    || self.alive.get(&field).is_some_and(|(a, _)| *a);
                if alive {
                    total += n;
                } else {
                    self.forget.push((room.clone(), field));
                }
            }
            totals.insert(room, total);
        }
        totals
    }

    /// Subscribes to the rooms that gained their first member here, unsubscribes from those
    /// that lost their last. A failure leaves the room as it was; the sweep retries.
    async fn sync_subscriptions(&mut self, rooms: &NameSet) {
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
        let joined = at_most(SUBSCRIBING, join, |r| sub.ssubscribe(keys::room_channel(r)));
        let left = at_most(SUBSCRIBING, leave, |r| {
            sub.sunsubscribe(keys::room_channel(r))
        });
        let (joined, left) = futures::join!(joined, left);
        for (room, ok) in joined {
            if ok {
                self.subscribed.insert(room);
            }
        }
        for (room, ok) in left {
            if ok {
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

    /// One pipeline; then what came of each command (every process's count of each room
    /// counted, into `counts`). Gives back the commands that failed because a node did not know
    /// their script.
    async fn pipeline(
        &mut self,
        chunk: Vec<Cmd>,
        counts: &mut NameMap<Vec<(String, u64)>>,
    ) -> Vec<Cmd> {
        let p = self.client.pipeline();
        let field = keys::field(self.process);
        let ttl = ROOM_TTL.as_millis() as i64;
        let s = &self.scripts;
        for cmd in &chunk {
            let count = |script: &scripts::Script, room: &str| {
                let args = vec![field.as_str().into(), self.mine(room).into(), ttl.into()];
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
                Cmd::Forget(room, dead) => {
                    let args = vec![dead.as_str().into()];
                    let (c, args) = scripts::keyed("HDEL", keys::room_counts(room), args);
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
        let results: Vec<Result<Value, Error>> = p.try_all().await;
        if !results.is_empty() {
            self.reached(results.iter().any(Result::is_ok));
        }
        let mut unknown = Vec::new();
        let pending = self.pending.clone();
        let stats = &pending.stats;
        for (cmd, result) in chunk.into_iter().zip(results) {
            match (cmd, result) {
                (cmd, Err(e)) if scripts::unknown_script(&e) => unknown.push(cmd),
                (Cmd::Count(room), Ok(all)) => {
                    counts.insert(room, fields_of(all));
                }
                (Cmd::Count(_) | Cmd::Renew(_) | Cmd::Forget(..), _) => {}
                (Cmd::Out(_), Err(_)) => {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
                (Cmd::Out(out), Ok(receivers)) => {
                    stats.published.fetch_add(1, Ordering::Relaxed);
                    self.delivered(out, receivers.as_i64().unwrap_or(0));
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

/// A count hash as `HGETALL` returns it (field, count, field, count, ...) as pairs; anything
/// else in it (another build's format) is skipped.
fn fields_of(all: Value) -> Vec<(String, u64)> {
    let Value::Array(items) = all else {
        return Vec::new();
    };
    items
        .chunks_exact(2)
        .filter_map(|pair| {
            let field = pair[0].as_str()?.into_owned();
            let n = pair[1].as_str()?.parse::<u64>().ok()?;
            Some((field, n))
        })
        .collect()
}

/// Messages among `cmds` (what a second NOSCRIPT failure loses).
fn count_out(cmds: &[Cmd]) -> u64 {
    cmds.iter().filter(|c| matches!(c, Cmd::Out(_))).count() as u64
}
