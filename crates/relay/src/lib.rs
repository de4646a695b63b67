//! `tunegate serve`: an epoll WebSocket relay with rooms and heartbeats (docs/protocol.md).
//!
//! Flow: listener -> `event_loop` (accept, read, write, ticks) -> `conn` (per-connection state,
//! frame assembly) -> `frame` / `handshake` (the wire) -> `protocol` (relay messages) -> `rooms`
//! (local membership) -> `bus` (other loops). `sys` is the only module that talks to the kernel
//! about sockets; `heap` the only one that talks to the allocator (from each loop's tick).
//! Nothing here imports the tuning side of tunegate.

/// One line on stderr, prefixed `tunegate serve:`. A closed or broken stderr (the journal
/// restarting, a parent that stopped reading) must never take a thread down, so write errors
/// are ignored where `eprintln!` would panic.
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log_line(format_args!($($arg)*))
    };
}

pub fn log_line(args: std::fmt::Arguments) {
    use std::io::Write;
    let line = format!("tunegate serve: {args}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

pub mod auth;
pub mod bus;
pub mod client_addr;
pub mod config;
pub mod conn;
pub mod deflate;
pub mod echo;
pub mod event_loop;
pub mod frame;
pub mod handler;
pub mod handoff;
pub mod handshake;
pub mod heap;
pub mod id;
pub mod limits;
pub mod metrics;
pub mod names;
pub mod outq;
pub mod peers;
pub mod protocol;
pub mod redis_bus;
pub mod relay;
pub mod rooms;
pub mod routes;
pub mod sockets;
pub mod sys;
pub mod tls;
pub mod utf8;

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;

pub use config::{BadUsage, Config, MAX_WORKERS, Options};

use bus::{Bus, LocalBus};
use event_loop::EventLoop;
use id::ProcessId;
use metrics::LoopMetrics;

/// What the loops share.
pub struct Shared {
    pub config: Config,
    /// The loops of this process (their inboxes).
    pub local: Arc<LocalBus>,
    /// The whole server: this process's loops, and the other workers when there are any.
    pub bus: Arc<dyn Bus>,
    pub metrics: Vec<Arc<LoopMetrics>>,
    pub accepting: AtomicBool,
    /// This process (node and incarnation), the high bits of its connection ids.
    pub process: ProcessId,
    /// Trusted proxies, the per-address limit and upgrade rate, one table for all the loops.
    pub admission: Arc<client_addr::Admission>,
    /// The token keys, when the server requires tokens (`--auth-*`).
    pub verifier: Option<Arc<auth::Verifier>>,
    /// The certificates, when the server speaks TLS (`--tls-cert`, `--tls-key`).
    pub certs: Option<Arc<tls::Certs>>,
    /// The counters this worker's predecessors reached (read from the bus directory at start),
    /// added to its own so the whole server's counters go on from there.
    pub carried: metrics::Snapshot,
}

/// Runs the server until SIGTERM or SIGINT, then drains and returns. `ready` is called with
/// the bound address once every loop listens.
pub fn serve(config: Config, ready: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    // Bad usage (flags, unreadable or unsafe key and certificate files) before anything else.
    config.validate().map_err(BadUsage)?;
    let verifier = auth::Verifier::load(&config.options.key_files())
        .map_err(BadUsage)?
        .map(Arc::new);
    let certs = config.options.certs().map_err(BadUsage)?.map(Arc::new);
    // Signals are blocked before any thread starts, so only the signalfd sees them.
    let signals = sys::termination_signals().context("cannot set up signal handling")?;
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).context("getrlimit")?;
    if soft < hard {
        let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard);
    }
    // Before listening: while a `serve` without --incarnation waits for the clock's next second,
    // no client may be queued on a socket nobody accepts from.
    let incarnation = config
        .incarnation
        .unwrap_or_else(id::incarnation_from_clock);
    // Likewise the first contact with the Redis Cluster (at most 2 s), which settles the node
    // id every connection id carries.
    let connecting = match &config.options.bus {
        Some(url) => Some(redis_bus::RedisBus::connect(redis_settings(
            &config,
            url,
            incarnation,
        )?)?),
        None => None,
    };
    let shared = Arc::new(Shared::start(
        &config,
        incarnation,
        connecting,
        verifier,
        certs,
    )?);
    // Listening only once linked to the other workers (at most 2 s: a peer may be down), so no
    // client is queued while the links come up, and none publishes past a peer not yet linked.
    shared.bus.wait_for_links(std::time::Duration::from_secs(2));
    let (listeners, bound) = listen(&config)?;
    let addr = bound[0];
    for (worker, counters) in worker_counters(&config) {
        shared.bus.seed_metrics(worker, counters);
    }
    let loops = start_loops(&config, &shared, listeners)?;
    log_listening(&config, &bound, shared.process);
    match &shared.verifier {
        Some(v) => log!("tokens required on every upgrade: {}", v.description),
        None if config.options.echo => {}
        None => log!(
            "open: no --auth-secret-file or --auth-public-key, so anyone who reaches {addr} may \
             join any room and read every message in it (docs/security.md)"
        ),
    }
    ready(addr);

    wait_for_termination(&signals, shared.certs.as_deref())?;
    shared
        .accepting
        .store(false, std::sync::atomic::Ordering::Relaxed);
    for (_, stop) in &loops {
        stop.request();
    }
    for (l, _) in loops {
        match l.join() {
            Ok(r) => r.context("event loop failed")?,
            Err(_) => anyhow::bail!("an event loop panicked"),
        }
    }
    shared.bus.close();
    log!("drained, exiting");
    Ok(())
}

/// Every loop's listeners: for each `--listen` address, one SO_REUSEPORT listener per loop,
/// all on the address the first one got (port 0 picks one per address). Returns them by loop,
/// and the bound addresses in the order given.
fn listen(config: &Config) -> anyhow::Result<(Vec<Vec<std::os::fd::OwnedFd>>, Vec<SocketAddr>)> {
    let mut by_loop: Vec<Vec<std::os::fd::OwnedFd>> =
        (0..config.threads()).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    for &wanted in &config.listen {
        // An IPv6 listener shares its port with an IPv4 one only when it takes IPv6 alone.
        let v6_only = config
            .listen
            .iter()
            .any(|a| a.is_ipv4() && a.port() == wanted.port() && wanted.port() != 0);
        let first =
            sys::listen(wanted, v6_only).with_context(|| format!("cannot listen on {wanted}"))?;
        let addr = sys::local_addr(first.as_fd())?;
        by_loop[0].push(first);
        for listeners in by_loop.iter_mut().skip(1) {
            listeners.push(
                sys::listen(addr, v6_only).with_context(|| format!("cannot listen on {addr}"))?,
            );
        }
        bound.push(addr);
    }
    Ok((by_loop, bound))
}

impl Shared {
    /// The bus: the loops of this process; the other workers of this host when there are any;
    /// with --bus, every process of every host through Redis (the unix links then carry only
    /// the workers' counters).
    fn start(
        config: &Config,
        incarnation: u16,
        connecting: Option<redis_bus::Connecting>,
        verifier: Option<Arc<auth::Verifier>>,
        certs: Option<Arc<tls::Certs>>,
    ) -> anyhow::Result<Shared> {
        let threads = config.threads();
        let process = match &connecting {
            Some(c) => c.process(),
            None => ProcessId::new(config.options.node.unwrap_or(0), incarnation),
        };
        let local = Arc::new(LocalBus::new(threads, process)?);
        let host = match &config.options.bus_dir {
            Some(dir) if config.workers() > 1 => Some(
                peers::WorkerBus::start(
                    local.clone(),
                    dir,
                    config.worker,
                    config.workers(),
                    process,
                )
                .with_context(|| format!("cannot start the worker bus in {}", dir.display()))?,
            ),
            _ => None,
        };
        let bus: Arc<dyn Bus> = match (connecting, host) {
            (Some(c), host) => c.run(local.clone(), host),
            (None, Some(host)) => host,
            (None, None) => local.clone(),
        };
        Ok(Shared {
            local,
            bus,
            metrics: (0..threads)
                .map(|_| Arc::new(LoopMetrics::default()))
                .collect(),
            accepting: AtomicBool::new(true),
            process,
            admission: Arc::new(client_addr::Admission::new(
                config.options.trusted_proxies.clone(),
                config.options.max_connections_per_address,
                config.options.max_upgrade_rate,
            )),
            carried: carried_counters(config),
            verifier,
            certs,
            config: config.clone(),
        })
    }
}

/// What the Redis bus needs from the configuration: the seeds, the password (read from its
/// file now, so a missing file stops the start with the file's name), the node, and this
/// host's identity in node claims (`HOSTNAME/LISTEN-ADDRESS`, as configured: every worker of a
/// host has the same).
fn redis_settings(
    config: &Config,
    url: &str,
    incarnation: u16,
) -> anyhow::Result<redis_bus::Settings> {
    let seeds = redis_bus::url::parse(url).map_err(anyhow::Error::msg)?;
    let password = match &config.options.bus_password_file {
        Some(file) => {
            let text = std::fs::read_to_string(file).with_context(|| {
                format!("cannot read the Redis password from {}", file.display())
            })?;
            Some(text.lines().next().unwrap_or("").to_string())
        }
        None => None,
    };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    Ok(redis_bus::Settings {
        seeds,
        password,
        ca_file: config.options.bus_ca_file.clone(),
        node: config.options.node,
        identity: format!("{hostname}/{}", config.listen[0]),
        incarnation,
    })
}

type LoopThread = std::thread::JoinHandle<std::io::Result<()>>;

/// One event loop per listener, each on its own thread with its handler (the relay, or echo),
/// and the `Stop` that ends it.
fn start_loops(
    config: &Config,
    shared: &Arc<Shared>,
    listeners: Vec<Vec<std::os::fd::OwnedFd>>,
) -> anyhow::Result<Vec<(LoopThread, Arc<event_loop::Stop>)>> {
    if config.workers() > 1 {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("tunegate-metrics".into())
            .spawn(move || metrics_publisher(&shared))?;
    }
    // Each loop's share of the descriptors left for connections (`handoff.rs`).
    let (limit, _) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    let share = (limit.saturating_sub(config::DESCRIPTORS_KEPT) / config.threads() as u64) as usize;
    let mut loops = Vec::new();
    for (loop_index, listener) in listeners.into_iter().enumerate() {
        let stop = event_loop::Stop::new()?;
        let metrics = shared.metrics[loop_index].clone();
        let routes = routes::Routes::new(shared.clone());
        let (inc, c, s) = (shared.process, config.clone(), stop.clone());
        let access = event_loop::Access {
            admission: shared.admission.clone(),
            verifier: shared.verifier.clone(),
            certs: shared.certs.clone(),
        };
        let thread = if config.options.echo {
            let echo = echo::Echo::new(routes);
            spawn_loop(
                loop_index,
                EventLoop::new(loop_index, inc, listener, echo, c, metrics, s, access)?,
            )?
        } else {
            let settings = relay::RelaySettings::of(&config.options);
            let inbox = shared.local.inbox(loop_index);
            let bus = shared.bus.clone();
            let relay = relay::Relay::new(settings, bus, inbox, metrics.clone(), routes)
                .with_verifier(access.verifier.clone());
            let mut event_loop =
                EventLoop::new(loop_index, inc, listener, relay, c, metrics, s, access)?;
            // Between workers, a connection can be handed to its room's home; a TLS session
            // cannot follow its socket (handoff.rs).
            if let Some(dir) = config
                .options
                .bus_dir
                .as_ref()
                .filter(|_| config.workers() > 1 && shared.certs.is_none())
            {
                let here = handler::Place {
                    worker: config.worker,
                    loop_index,
                };
                let handoff = handoff::Handoff::bind(dir, here, share)
                    .context("cannot bind the socket connections are handed over on")?;
                event_loop = event_loop.with_handoff(handoff)?;
            }
            spawn_loop(loop_index, event_loop)?
        };
        loops.push((thread, stop));
    }
    Ok(loops)
}

/// The line scripts and supervisors wait for: the (first) address, and how this process is set
/// up, the other addresses last.
fn log_listening(config: &Config, bound: &[SocketAddr], process: ProcessId) {
    let addr = bound[0];
    let also: String = bound[1..].iter().map(|a| format!(", also {a}")).collect();
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((0, 0));
    let from_clock = if config.incarnation.is_none() {
        " from the clock"
    } else {
        ""
    };
    let echo = if config.options.echo {
        ", echo mode"
    } else {
        ""
    };
    let tls = if config.options.tls_cert.is_some() {
        ", tls"
    } else {
        ""
    };
    let bus = if config.options.bus.is_some() {
        ", bus redis"
    } else {
        ""
    };
    let mut proxies = String::new();
    if !config.options.trusted_proxies.is_empty() {
        let list: Vec<String> = config
            .options
            .trusted_proxies
            .iter()
            .map(|c| c.to_string())
            .collect();
        proxies = format!(", trusted proxies {}", list.join(" "));
    }
    if config.options.max_connections_per_address > 0 {
        proxies.push_str(&format!(
            ", at most {} connections per address",
            config.options.max_connections_per_address
        ));
    }
    let (node, incarnation) = (process.node, process.incarnation);
    log!(
        "listening on {addr} (worker {}/{}, node {node}, incarnation {incarnation}{from_clock}, threads {}, ping {}/{} ms, max message {} bytes, nofile {soft}{tls}{echo}{bus}{proxies}{also})",
        config.worker,
        config.workers(),
        config.threads(),
        config.options.ping_interval_ms,
        config.options.ping_timeout_ms,
        config.options.max_message_size,
    );
}

/// Blocks until SIGTERM or SIGINT. SIGHUP reloads the TLS certificate and key (new
/// connections get them; open ones keep their sessions); without TLS it is said and ignored.
fn wait_for_termination(
    signals: &nix::sys::signalfd::SignalFd,
    certs: Option<&tls::Certs>,
) -> anyhow::Result<()> {
    loop {
        match signals.read_signal() {
            Ok(Some(info)) if info.ssi_signo == nix::sys::signal::Signal::SIGHUP as u32 => {
                match certs.map(|c| (c, c.reload())) {
                    None => log!("SIGHUP ignored (serve has no certificate to reload)"),
                    Some((c, Ok(()))) => log!("SIGHUP: reloaded the TLS certificate ({c:?})"),
                    Some((c, Err(e))) => {
                        log!("SIGHUP: kept the TLS certificate in use: cannot reload {c:?}: {e}")
                    }
                }
            }
            Ok(Some(info)) => {
                log!(
                    "signal {}: closing connections with 1001 and draining",
                    info.ssi_signo
                );
                return Ok(());
            }
            Ok(None) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("reading signals"),
        }
    }
}

/// Runs one loop on its own thread. A loop that dies takes its connections with it; the
/// process must not carry on looking healthy, so it exits and the supervisor restarts it.
fn spawn_loop<H: handler::Handler<Data: Send> + Send + 'static>(
    loop_index: usize,
    l: EventLoop<H>,
) -> std::io::Result<std::thread::JoinHandle<std::io::Result<()>>> {
    std::thread::Builder::new()
        .name(format!("tunegate-loop-{loop_index}"))
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| l.run()));
            let why = match result {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "panicked (message above)".to_string(),
            };
            log!("event loop {loop_index} failed: {why}; exiting");
            std::process::exit(70);
        })
}

/// Shares this worker's counters with the other workers every half second (less often past 22
/// workers: `metrics::publish_interval_ms`), over the bus, so /metrics answered by any worker
/// covers the whole server; not when nothing changed (every worker sends to every other: at 51
/// workers an idle server spent a fifth of a core on it). A worker that dies takes its last
/// snapshot with its link: nothing stale is ever summed.
fn metrics_publisher(shared: &Shared) {
    let file = counters_file(&shared.config);
    let interval =
        std::time::Duration::from_millis(metrics::publish_interval_ms(shared.config.workers()));
    let mut last: Option<metrics::Snapshot> = None;
    loop {
        let snap = own_snapshot(shared);
        let unchanged = last.as_ref().is_some_and(|l| {
            metrics::Snapshot {
                sent_ms: snap.sent_ms,
                ..l.clone()
            } == snap
        });
        if unchanged {
            std::thread::sleep(interval);
            continue;
        }
        last = Some(snap.clone());
        shared.bus.share_metrics(&snap);
        if let Some(file) = &file {
            // For the next process in this worker's place (a restart): best effort, no fsync,
            // at most one interval behind.
            if let Ok(bytes) = serde_json::to_vec(&snap.counters()) {
                let tmp = file.with_extension("tmp");
                if std::fs::write(&tmp, bytes).is_ok() {
                    let _ = std::fs::rename(&tmp, file);
                }
            }
        }
        std::thread::sleep(interval);
    }
}

/// Where a worker of several keeps its counters for its successor: `BUS_DIR/worker-N.counters`.
fn counters_file(config: &Config) -> Option<std::path::PathBuf> {
    let dir = config.options.bus_dir.as_ref()?;
    (config.workers() > 1).then(|| dir.join(format!("worker-{}.counters", config.worker)))
}

/// The counters every worker's last process left in the bus directory (this one's too: what it
/// carries), where the sums start.
fn worker_counters(config: &Config) -> Vec<(usize, metrics::Snapshot)> {
    let Some(dir) = config
        .options
        .bus_dir
        .as_ref()
        .filter(|_| config.workers() > 1)
    else {
        return Vec::new();
    };
    (0..config.workers())
        .filter_map(|w| {
            let bytes = std::fs::read(dir.join(format!("worker-{w}.counters"))).ok()?;
            let s = serde_json::from_slice::<metrics::Snapshot>(&bytes).ok()?;
            Some((w, s.counters()))
        })
        .collect()
}

/// The counters the previous process in this worker's place left (none without one).
fn carried_counters(config: &Config) -> metrics::Snapshot {
    counters_file(config)
        .and_then(|f| std::fs::read(f).ok())
        .and_then(|b| serde_json::from_slice::<metrics::Snapshot>(&b).ok())
        .map(|s| s.counters())
        .unwrap_or_default()
}

/// The whole server's counters: every worker's newest settled snapshot, this one's included
/// (live when it shares nothing: one worker), or the counters a dead one reached. Every worker
/// picks the same snapshots ([`metrics::SETTLED_MS`]), so whichever answers a scrape, no
/// counter is ever lower than an earlier scrape saw, even when a worker dies and is replaced.
/// (Answering with its own counters as last published and its peers' as last received, a
/// worker could sum less than a peer that had just published: seen under a loaded CPU.)
pub fn server_snapshot(shared: &Shared) -> (metrics::Snapshot, Vec<(usize, u64)>) {
    if shared.config.workers() == 1 {
        let live = own_snapshot(shared);
        let received = vec![(shared.config.worker, live.bus_received)];
        return (live, received);
    }
    let mut total = metrics::Snapshot {
        pid: std::process::id(),
        ..metrics::Snapshot::default()
    };
    let mut received = Vec::new();
    for snap in shared.bus.settled_metrics(metrics::monotonic_ms()) {
        received.push((snap.worker, snap.bus_received));
        total.add(&snap);
    }
    received.sort_unstable();
    (total, received)
}

/// This process's counters, bus included.
fn own_snapshot(shared: &Shared) -> metrics::Snapshot {
    let mut snap = metrics::Snapshot::of(&shared.metrics);
    let (routed, all) = shared.bus.traffic();
    snap.worker = shared.config.worker;
    snap.bus_routed = routed;
    snap.bus_broadcast_equivalent = all;
    snap.bus_received = shared.bus.received();
    snap.remote = shared.bus.remote();
    snap.rooms = shared.bus.rooms() as i64;
    snap.add(&shared.carried);
    snap.sent_ms = metrics::monotonic_ms();
    snap
}
