//! `tunegate serve`: an epoll WebSocket relay with rooms and heartbeats (docs/protocol.md).
//!
//! Flow: listener -> `event_loop` (accept, read, write, ticks) -> `conn` (per-connection state,
//! frame assembly) -> `frame` / `handshake` (the wire) -> `protocol` (relay messages) -> `rooms`
//! (local membership) -> `bus` (other loops). `sys` is the only module that talks to the kernel.
//! Nothing here imports the tuning side of tunegate.

pub mod bus;
pub mod conn;
pub mod event_loop;
pub mod frame;
pub mod handshake;
pub mod metrics;
pub mod protocol;
pub mod rooms;
pub mod sys;
pub mod utf8;

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;

use bus::{Bus, Item, LocalBus};
use metrics::LoopMetrics;

/// Everything `tunegate serve` can be told.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub threads: usize,
    /// Ping a connection silent for this long (Socket.IO's pingInterval; the article: 25 s).
    pub ping_interval_ms: u64,
    /// Close it if the pong does not come within this (pingTimeout; the article: 20 s).
    pub ping_timeout_ms: u64,
    /// A client must finish its HTTP upgrade within this (slowloris).
    pub handshake_timeout_ms: u64,
    /// On SIGTERM, how long clients get to answer our Close 1001.
    pub drain_timeout_ms: u64,
    /// Largest message (after reassembly) a client may send; larger ones close with 1009.
    pub max_message: usize,
    /// Output queued for one connection beyond this closes it with 1008 (slow reader).
    pub max_pending: usize,
    pub max_rooms_per_conn: usize,
    pub policy: handshake::Policy,
    /// Echo every message back instead of speaking the relay protocol (conformance testing).
    pub echo: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: "127.0.0.1:8080".parse().expect("static address"),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            ping_interval_ms: 25_000,
            ping_timeout_ms: 20_000,
            handshake_timeout_ms: 10_000,
            drain_timeout_ms: 5_000,
            max_message: 1 << 20,
            max_pending: 4 << 20,
            max_rooms_per_conn: 64,
            policy: handshake::Policy::default(),
            echo: false,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), String> {
        if self.threads == 0 || self.threads > event_loop::MAX_NODES {
            return Err(format!("--threads must be 1..={}", event_loop::MAX_NODES));
        }
        if self.ping_interval_ms == 0 || self.ping_timeout_ms == 0 {
            return Err("ping interval and timeout must be above 0".into());
        }
        if self.max_pending < self.max_message + 14 {
            return Err(format!(
                "--max-pending-output ({}) must hold at least one largest message (--max-message-size {} + 14)",
                self.max_pending, self.max_message
            ));
        }
        Ok(())
    }
}

/// What the loops share.
pub struct Shared {
    pub config: Config,
    pub bus: Arc<LocalBus>,
    pub metrics: Vec<Arc<LoopMetrics>>,
    pub accepting: AtomicBool,
    /// This process's worker number, encoded in connection ids.
    pub worker: u8,
}

/// Runs the server until SIGTERM or SIGINT, then drains and returns. `ready` is called with
/// the bound address once every loop listens.
pub fn serve(config: Config, ready: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    config.validate().map_err(crate::error::UsageError)?;
    // Signals are blocked before any thread starts, so only the signalfd sees them.
    let signals = sys::termination_signals().context("cannot set up signal handling")?;
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).context("getrlimit")?;
    if soft < hard {
        let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard);
    }

    let mut listeners = Vec::with_capacity(config.threads);
    let first = sys::listen(config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = sys::local_addr(first.as_fd())?;
    listeners.push(first);
    for _ in 1..config.threads {
        listeners.push(sys::listen(addr).with_context(|| format!("cannot listen on {addr}"))?);
    }
    let shared = Arc::new(Shared {
        bus: Arc::new(LocalBus::new(config.threads)?),
        metrics: (0..config.threads)
            .map(|_| Arc::new(LoopMetrics::default()))
            .collect(),
        accepting: AtomicBool::new(true),
        worker: 0,
        config: config.clone(),
    });
    let mut loops: Vec<std::thread::JoinHandle<std::io::Result<()>>> = Vec::new();
    for (node, listener) in listeners.into_iter().enumerate() {
        let l = event_loop::EventLoop::new(node, listener, shared.clone())?;
        loops.push(
            std::thread::Builder::new()
                .name(format!("tunegate-loop-{node}"))
                .spawn(move || {
                    // A loop that dies takes its connections with it; the process must not
                    // carry on looking healthy. Exit so the supervisor restarts us.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| l.run()));
                    let why = match result {
                        Ok(Ok(())) => return Ok(()),
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => "panicked (message above)".to_string(),
                    };
                    eprintln!("tunegate serve: event loop {node} failed: {why}; exiting");
                    std::process::exit(70);
                })?,
        );
    }
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((0, 0));
    eprintln!(
        "tunegate serve: listening on {addr} (threads {}, ping {}/{} ms, max message {} bytes, nofile {soft}{})",
        config.threads,
        config.ping_interval_ms,
        config.ping_timeout_ms,
        config.max_message,
        if config.echo { ", echo mode" } else { "" }
    );
    ready(addr);

    loop {
        match signals.read_signal() {
            Ok(Some(info)) if info.ssi_signo == nix::sys::signal::Signal::SIGHUP as u32 => {
                eprintln!("tunegate serve: SIGHUP ignored (serve has no configuration to reload)");
            }
            Ok(Some(info)) => {
                eprintln!(
                    "tunegate serve: signal {}: closing connections with 1001 and draining",
                    info.ssi_signo
                );
                break;
            }
            Ok(None) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("reading signals"),
        }
    }
    shared
        .accepting
        .store(false, std::sync::atomic::Ordering::Relaxed);
    for node in 0..shared.bus.nodes() {
        shared.bus.send(node, Item::Shutdown);
    }
    for l in loops {
        match l.join() {
            Ok(r) => r.context("event loop failed")?,
            Err(_) => anyhow::bail!("an event loop panicked"),
        }
    }
    eprintln!("tunegate serve: drained, exiting");
    Ok(())
}
