//! The one thread that talks to Redis: a single-threaded tokio runtime running fred's cluster
//! clients (one for commands, one for subscriptions, each following MOVED/ASK and failovers
//! and reconnecting every 200 ms while the cluster is out of reach).
//!
//! It works in batches: whatever the loops left since the last batch (`Pending::take`) goes
//! out in one round: first the subscription changes, then one pipeline with the count of every
//! room that changed and every message in the order the loops sent them; then the answers go
//! back to the loops. A batch takes one round trip however much it carries, which is what keeps
//! a hop through Redis cheap under load. Every `RENEW` it renews this process's leases (the
//! alive key, the node claim) and re-checks subscriptions, room by room; every `ROOM_REFRESH`
//! it also writes every room's count again.

use crate::names::NameSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::interfaces::LuaInterface;
use fred::prelude::*;
use fred::types::RespVersion;
use fred::types::config::{ClusterDiscoveryPolicy, Server};
use rustc_hash::FxHashMap;
use tokio::time::Instant;

use super::{LEASE, Outbound, Pending, RENEW, ROOM_REFRESH, Settings, keys, scripts};
use crate::bus::LocalBus;
use crate::id::ProcessId;

/// How long the first contact with the cluster may take before the process starts without it.
const FIRST_CONTACT: Duration = Duration::from_secs(2);
/// A command that has not been answered in this long fails (the message is dropped).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How soon what failed is tried again: a renewal, a subscription, a direct message for a live
/// process that was between subscriptions (`batch.rs`).
pub(super) const RETRY_AFTER: Duration = Duration::from_millis(250);
/// The sweep over every room (a subscription check, and every `ROOM_REFRESH` a count refresh) is
/// spread over each period, a slice every tick: a process with many rooms never sends them all
/// in one batch, which would hold up the messages behind it.
const SWEEP_TICK: Duration = Duration::from_millis(100);

/// The bridge thread, started and past its first contact with the cluster.
pub(crate) struct Started {
    pub node: u8,
    handle: std::thread::JoinHandle<()>,
    /// Hands the bridge the loops' bus once the caller made it (it needs the node first).
    go: tokio::sync::oneshot::Sender<Arc<LocalBus>>,
}

impl Started {
    /// Lets the bridge carry `local`'s traffic; the thread's handle.
    pub fn go(self, local: Arc<LocalBus>) -> std::thread::JoinHandle<()> {
        let _ = self.go.send(local);
        self.handle
    }
}

/// How the first contact went.
enum Contact {
    /// The node id is this host's now.
    Claimed(u8),
    /// The cluster did not answer: the node id is the chosen or preferred one, unchecked.
    Unreachable(u8, String),
    /// The node id is another host's (or every one is).
    Conflict(String),
}

/// Starts the thread, connects, and settles the node id (at most `FIRST_CONTACT`).
pub(crate) fn start(settings: Settings, pending: Arc<Pending>) -> anyhow::Result<Started> {
    let (contact_tx, contact_rx) = std::sync::mpsc::channel::<Contact>();
    let (go, go_rx) = tokio::sync::oneshot::channel::<Arc<LocalBus>>();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (client, sub) = clients(&settings)?;
    let handle = std::thread::Builder::new()
        .name("tunegate-redis".into())
        .spawn(move || {
            runtime.block_on(async move {
                let contact = first_contact(&client, &sub, &settings).await;
                let node = match contact {
                    Contact::Claimed(n) | Contact::Unreachable(n, _) => n,
                    Contact::Conflict(_) => {
                        let _ = contact_tx.send(contact);
                        return;
                    }
                };
                let _ = contact_tx.send(contact);
                let Ok(local) = go_rx.await else { return };
                let process = ProcessId::new(node, settings.incarnation);
                Bridge::new(settings, process, client, sub, local, pending)
                    .run()
                    .await;
            })
        })?;
    let contact = contact_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the Redis bus thread ended before it started"))?;
    let node = match contact {
        Contact::Claimed(n) => {
            log!("bus: Redis Cluster reached; node id {n} is this host's");
            n
        }
        Contact::Unreachable(n, why) => {
            log!(
                "bus: Redis Cluster not reachable within {} s ({why}); serving local clients, \
                 node id {n} not yet checked (it is when the cluster answers)",
                FIRST_CONTACT.as_secs()
            );
            n
        }
        Contact::Conflict(why) => anyhow::bail!("{why}"),
    };
    Ok(Started { node, handle, go })
}

/// The command client and the subscriber client, not yet connected.
fn clients(s: &Settings) -> anyhow::Result<(Client, SubscriberClient)> {
    let config = Config {
        // The seeds, and after the first contact every node the cluster named: a failover of
        // a seed must not cut this process off.
        server: ServerConfig::Clustered {
            hosts: s
                .seeds
                .nodes
                .iter()
                .map(|(host, port)| Server::new(host.as_str(), *port))
                .collect(),
            policy: ClusterDiscoveryPolicy::UseCache,
        },
        username: s.seeds.username.clone(),
        password: s.password.clone(),
        version: RespVersion::RESP3,
        fail_fast: false,
        ..Config::default()
    };
    let config = Config {
        tls: match s.seeds.tls {
            true => Some(super::tls::connector(s.ca_file.as_deref())?.into()),
            false => None,
        },
        ..config
    };
    let perf = PerformanceConfig {
        default_command_timeout: COMMAND_TIMEOUT,
        // Messages arrive through a broadcast channel: room for bursts (a lag beyond it is
        // counted as dropped). fred sizes every one of its broadcast channels with this, and
        // tokio allocates them whole at start: 1 << 16 cost 92 MiB of RSS per process before
        // the first client; 1 << 13 is about 1.6 s of 5,000 incoming messages/s.
        broadcast_channel_capacity: 1 << 13,
        ..PerformanceConfig::default()
    };
    let connection = ConnectionConfig {
        connection_timeout: Duration::from_millis(1000),
        internal_command_timeout: Duration::from_millis(2000),
        ..ConnectionConfig::default()
    };
    let policy = ReconnectPolicy::new_constant(0, 200);
    let builder = |config: Config| {
        let mut b = Builder::from_config(config);
        b.set_performance_config(perf.clone())
            .set_connection_config(connection.clone())
            .set_policy(policy.clone());
        b
    };
    let client = builder(config.clone()).build()?;
    let sub = builder(config).build_subscriber_client()?;
    Ok((client, sub))
}

/// Connects, and claims the chosen node id, or the first free one from the host's preferred.
async fn first_contact(client: &Client, sub: &SubscriberClient, s: &Settings) -> Contact {
    let mut errors = client.error_rx();
    client.connect();
    sub.connect();
    let _manage = sub.manage_subscriptions();
    let fallback = s.node.unwrap_or_else(|| keys::preferred_node(&s.identity));
    let both = async {
        client.wait_for_connect().await?;
        sub.wait_for_connect().await
    };
    match tokio::time::timeout(FIRST_CONTACT, both).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Contact::Unreachable(fallback, e.details().to_string()),
        Err(_) => {
            // fred retries by itself; its last error says why (refused, WRONGPASS, TLS, ...).
            let mut why = "no answer".to_string();
            while let Ok((e, server)) = errors.try_recv() {
                let at = server.map(|s| format!("{s}: ")).unwrap_or_default();
                why = format!("{at}{}", e.details());
            }
            return Contact::Unreachable(fallback, why);
        }
    }
    let candidates: Vec<u8> = match s.node {
        Some(n) => vec![n],
        None => (0..=255u8).map(|i| fallback.wrapping_add(i)).collect(),
    };
    let mut holders = Vec::new();
    for n in candidates {
        match claim(client, &keys::node_claim(n), &s.identity).await {
            Ok(None) => return Contact::Claimed(n),
            Ok(Some(holder)) => holders.push((n, holder)),
            Err(e) => return Contact::Unreachable(fallback, e.details().to_string()),
        }
    }
    Contact::Conflict(match (s.node, holders.first()) {
        (Some(n), Some((_, holder))) => format!(
            "node id {n} is held by another host ({holder}); every host of a service needs its \
             own: give this one another --node (server.node), or leave it out to derive a free one"
        ),
        _ => "all 256 node ids are held by other hosts".to_string(),
    })
}

/// Claims or renews `key` for `owner`: `None` when it is ours, else its holder.
async fn claim(client: &Client, key: &str, owner: &str) -> Result<Option<String>, Error> {
    let lease = LEASE.as_millis().to_string();
    let answer: String = client
        .eval(scripts::CLAIM, vec![key], vec![owner, lease.as_str()])
        .await?;
    Ok((answer != "ok").then_some(answer))
}

pub(super) struct Bridge {
    pub(super) settings: Settings,
    pub(super) process: ProcessId,
    pub(super) client: Client,
    pub(super) sub: SubscriberClient,
    pub(super) local: Arc<LocalBus>,
    pub(super) pending: Arc<Pending>,
    /// Rooms whose channel this process is subscribed to, confirmed by the cluster.
    pub(super) subscribed: NameSet,
    /// Whether this process's own channel is subscribed.
    pub(super) listening: bool,
    /// Whether the subscriptions must be made again (a subscriber connection came back).
    pub(super) resubscribe: bool,
    /// Direct messages to try again, and when.
    pub(super) later: Vec<(Instant, Outbound)>,
    /// Rooms whose count this period's sweep has yet to renew (taken from the end).
    pub(super) sweep: Vec<Arc<str>>,
    /// Rooms the sweep takes each tick.
    pub(super) per_tick: usize,
    /// Every count must be written again at once (a connection came back).
    pub(super) rewrite_all: bool,
    /// Rooms the next batch checks (the sweep's current slice).
    pub(super) renewing: Vec<Arc<str>>,
    /// Whether the current sweep also writes the counts again (one sweep in
    /// `ROOM_REFRESH / RENEW`).
    pub(super) refreshing: bool,
    /// Sweeps started.
    sweeps: u64,
    /// What this process last learned of other processes' alive keys: alive?, and when.
    pub(super) alive: FxHashMap<String, (bool, Instant)>,
    /// Fields of dead processes seen in count hashes, removed by the next batch.
    pub(super) forget: Vec<(Arc<str>, String)>,
    pub(super) scripts: scripts::Scripts,
}

impl Bridge {
    fn new(
        settings: Settings,
        process: ProcessId,
        client: Client,
        sub: SubscriberClient,
        local: Arc<LocalBus>,
        pending: Arc<Pending>,
    ) -> Bridge {
        Bridge {
            settings,
            process,
            client,
            sub,
            local,
            pending,
            subscribed: NameSet::default(),
            listening: false,
            resubscribe: false,
            later: Vec::new(),
            sweep: Vec::new(),
            per_tick: 1,
            rewrite_all: true,
            renewing: Vec::new(),
            refreshing: false,
            // The start writes every count (`rewrite_all`): the first refresh is a whole
            // `ROOM_REFRESH` later.
            sweeps: 1,
            alive: FxHashMap::default(),
            forget: Vec::new(),
            scripts: scripts::Scripts::new(),
        }
    }

    async fn run(mut self) {
        let _inbound = tokio::spawn(super::inbound::run(
            self.sub.message_rx(),
            self.process,
            self.local.clone(),
            self.pending.clone(),
        ));
        let mut reconnects = self.client.reconnect_rx();
        let mut resubscribes = self.sub.reconnect_rx();
        let mut next_renew = Instant::now();
        let mut next_sweep = Instant::now();
        loop {
            let retry_at = self.later.iter().map(|(t, _)| *t).min();
            let far = Instant::now() + RENEW;
            let sweeping = !self.sweep.is_empty();
            tokio::select! {
                _ = self.pending.wake.notified() => {}
                _ = tokio::time::sleep_until(next_renew) => {}
                _ = tokio::time::sleep_until(retry_at.unwrap_or(far)) => {}
                _ = tokio::time::sleep_until(next_sweep), if sweeping => {}
                // A connection came back (a restart, a failover): restore the leases now.
                Ok(_) = reconnects.recv() => {
                    self.rewrite_all = true;
                    next_renew = Instant::now();
                }
                // A subscriber connection came back: the node it now talks to may not know
                // this process's subscriptions (a promoted replica, a restarted node).
                Ok(_) = resubscribes.recv() => {
                    self.resubscribe = true;
                    next_renew = Instant::now();
                }
            }
            if sweeping && Instant::now() >= next_sweep {
                self.sweep_step();
                next_sweep = Instant::now() + SWEEP_TICK;
            }
            if Instant::now() >= next_renew {
                self.renew().await;
                // What did not go through is tried again soon, not a whole period later.
                let down = !self.pending.stats.connected.load(Ordering::Relaxed);
                let wait = if self.resubscribe || !self.listening || down {
                    RETRY_AFTER
                } else {
                    RENEW
                };
                next_renew = Instant::now() + wait;
            }
            let mut batch = self.pending.take();
            let now = Instant::now();
            let (due, wait): (Vec<_>, Vec<_>) = self.later.drain(..).partition(|(t, _)| *t <= now);
            self.later = wait;
            for (_, out) in due.into_iter().rev() {
                batch.out.push_front(out);
            }
            let stopping = batch.stopping;
            self.work(batch).await;
            if !self.pending.stats.connected.load(Ordering::Relaxed) {
                next_renew = next_renew.min(Instant::now() + RETRY_AFTER);
            }
            if stopping {
                self.goodbye().await;
                return;
            }
        }
    }

    /// Whether the cluster answers, judged by what commands did: fred's own connection state
    /// lags a failover (a dead node stays in it until the topology is read again), while a
    /// command that got its answer is proof.
    pub(super) fn reached(&self, up: bool) {
        let was = self.pending.stats.connected.swap(up, Ordering::Relaxed);
        if was != up {
            if up {
                log!("bus: Redis Cluster reachable");
            } else {
                log!("bus: Redis Cluster out of reach; serving local rooms, dropping the rest");
            }
        }
    }

    /// Renews this process's leases and checks the node claim; subscribes again where a
    /// reconnection may have lost subscriptions; starts a sweep that checks every room's
    /// subscription (and, one sweep in `ROOM_REFRESH / RENEW`, writes its count again) over the
    /// next period, a slice each `SWEEP_TICK`, or writes them all at once after a reconnection.
    async fn renew(&mut self) {
        let identity = self.settings.identity.clone();
        let node = keys::node_claim(self.process.node);
        match claim(&self.client, &node, &identity).await {
            Ok(None) => self.reached(true),
            Ok(Some(holder)) => {
                self.reached(true);
                if !self.pending.stats.isolated.swap(true, Ordering::Relaxed) {
                    log!(
                        "bus: error: node id {} is now held by another host ({holder}): this \
                         process stops using Redis (its ids could reach that host's \
                         connections); restart it with a free --node",
                        self.process.node
                    );
                }
            }
            Err(_) => return self.reached(false),
        }
        let _ = claim(&self.client, &keys::process_alive(self.process), &identity).await;
        if !self.listening || self.resubscribe {
            let own = keys::process_channel(self.process);
            self.listening = self.sub.ssubscribe(own).await.is_ok();
        }
        if self.resubscribe {
            let rooms: Vec<Arc<str>> = self.subscribed.iter().cloned().collect();
            let n = rooms.len();
            let sub = &self.sub;
            let results = super::batch::at_most(super::batch::SUBSCRIBING, rooms, |r| {
                sub.ssubscribe(keys::room_channel(r))
            })
            .await;
            self.resubscribe = results.iter().any(|(_, ok)| !ok);
            if !self.resubscribe {
                log!("bus: subscribed again to every room held here ({n})");
            }
        }
        let mut rooms: Vec<Arc<str>> = self.local.snapshot().into_iter().map(|(r, _)| r).collect();
        rooms.extend(self.subscribed.iter().cloned());
        rooms.sort_unstable();
        rooms.dedup();
        if std::mem::take(&mut self.rewrite_all) {
            // After a reconnection the cluster may have lost everything (the scripts too):
            // all at once.
            self.load_scripts().await;
            self.pending.mark(rooms);
            self.sweep.clear();
            self.sweeps = 1;
        } else {
            // In order, so a room's place (and the time between its refreshes) barely moves.
            let every = (ROOM_REFRESH.as_millis() / RENEW.as_millis()).max(1) as u64;
            self.refreshing = self.sweeps.is_multiple_of(every);
            self.sweeps += 1;
            let ticks = (RENEW.as_millis() / SWEEP_TICK.as_millis()) as usize;
            self.per_tick = rooms.len().div_ceil(ticks).max(1);
            rooms.reverse();
            self.sweep = rooms;
        }
    }

    /// Hands the next slice of the sweep to the next batch: a subscription check for each room,
    /// and a count refresh when this sweep refreshes.
    fn sweep_step(&mut self) {
        let n = self.per_tick.min(self.sweep.len());
        let slice = self.sweep.split_off(self.sweep.len() - n);
        self.renewing.extend(slice);
    }

    /// Loads the scripts on every master (after a reconnection, or a NOSCRIPT answer).
    pub(super) async fn load_scripts(&self) -> bool {
        for script in self.scripts.all() {
            let loaded: Result<(), Error> = self.client.script_load_cluster(script.body).await;
            if loaded.is_err() {
                return false;
            }
        }
        true
    }

    /// A clean stop: the counts are already out (the loops left every room before), so give
    /// the alive lease back; direct messages for this process now bounce at once.
    async fn goodbye(&mut self) {
        let key = keys::process_alive(self.process);
        let owner = self.settings.identity.as_str();
        let _: Result<i64, Error> = self
            .client
            .eval(scripts::RELEASE, vec![key], vec![owner])
            .await;
        let _ = self.client.quit().await;
        let _ = self.sub.quit().await;
    }
}
