//! Everything `tunegate serve` can be told, in one type: the command line (clap derives the
//! flags from it), the `server:` section of `tunegate run`'s YAML (serde derives the keys), the
//! defaults (`Default`, from the constants below), and the argv the daemon starts each worker
//! with (`Config::to_args`, which a test parses back to the same value).
//!
//! `Options` is what an operator chooses; `Config` adds where one process sits: its address,
//! its worker number and its incarnation, which the daemon decides per worker.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;

use clap::Args;
use serde::{Deserialize, Serialize};

use super::client_addr::Cidr;
use super::id;

pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 8080));
/// Socket.IO's pingInterval, the value the write-up "Optimizing Socket.IO for 100k Concurrent
/// Users" settled on.
pub const DEFAULT_PING_INTERVAL_MS: u64 = 25_000;
/// Socket.IO's pingTimeout, from the same write-up.
pub const DEFAULT_PING_TIMEOUT_MS: u64 = 20_000;
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1 << 20;
pub const DEFAULT_MAX_PENDING_OUTPUT: usize = 4 << 20;
pub const DEFAULT_MAX_ROOMS: usize = 64;
pub const DEFAULT_AUTH_LEEWAY_S: u64 = super::auth::DEFAULT_LEEWAY_S;
/// Worker processes one server can have.
pub const MAX_WORKERS: usize = 256;
/// Descriptors a worker keeps for everything that is not a client connection: stdio, per event
/// loop its epoll, listener, eventfd, handoff socket and spare descriptor, the signalfd, the bus
/// socket and a link (three descriptors) per other worker, metrics files. 256 covers 32 loops
/// and 40 peers. `tunegate run` sizes workers by what is left; a loop stops taking connections
/// handed over by others once its share of the rest is full (`handoff.rs`).
pub const DESCRIPTORS_KEPT: u64 = 256;
/// `--listen` addresses one server can have.
pub const MAX_LISTEN: usize = 8;

/// Bad usage of `tunegate serve` (flags that do not go together, key or certificate files that
/// do not load): said before anything listens; the binary maps it to exit code 2.
#[derive(Debug)]
pub struct BadUsage(pub String);

impl std::fmt::Display for BadUsage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadUsage {}

/// A feature switched `on` or `off` (a flag value and a YAML string alike).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Toggle {
    On,
    #[default]
    Off,
}

impl Toggle {
    pub fn on(self) -> bool {
        self == Toggle::On
    }
}

/// What an operator chooses about the server: flags of `tunegate serve`, keys of the `server:`
/// section of `tunegate run`'s configuration.
#[derive(Args, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    /// Event loops, one thread each with its own SO_REUSEPORT listener [default: one per core;
    /// under `tunegate run`, one per core in total over the workers].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Worker processes sharing the port (SO_REUSEPORT) [default: 1; under `tunegate run`,
    /// sized from RLIMIT_NOFILE, target_connections and cores].
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Where the workers' bus sockets live (with --workers above 1) [`tunegate run`'s default:
    /// bus/ next to its status file].
    #[arg(long, value_name = "DIR")]
    pub bus_dir: Option<PathBuf>,
    /// Join other hosts through a Redis 7 Cluster: seed nodes as
    /// redis://[USER@]HOST:PORT[,HOST:PORT...] (rooms, direct messages and counts then span
    /// every host; docs/deployment.md). Without it the server is one host.
    #[arg(long, value_name = "URL")]
    pub bus: Option<String>,
    /// A file whose first line is the Redis password (AUTH), with --bus.
    #[arg(long, value_name = "FILE")]
    pub bus_password_file: Option<PathBuf>,
    /// With a rediss:// --bus: the CA certificates (PEM) to trust for the cluster's TLS, instead
    /// of the system's.
    #[arg(long, value_name = "FILE")]
    pub bus_ca_file: Option<PathBuf>,
    /// This host's node id, 0..=255, the top bits of its connection ids: every host of a
    /// service needs its own. [default: 0 without --bus; with --bus, derived from the host
    /// name and listen address and claimed in Redis]
    #[arg(long, value_name = "N")]
    pub node: Option<u8>,
    /// Ping a connection after this much silence (Socket.IO's pingInterval).
    #[arg(long = "ping-interval", value_name = "MS", default_value_t = DEFAULT_PING_INTERVAL_MS)]
    pub ping_interval_ms: u64,
    /// Close a connection whose pong has not come within this (Socket.IO's pingTimeout).
    #[arg(long = "ping-timeout", value_name = "MS", default_value_t = DEFAULT_PING_TIMEOUT_MS)]
    pub ping_timeout_ms: u64,
    /// Time a client has to complete the HTTP upgrade (against slowloris).
    #[arg(long = "handshake-timeout", value_name = "MS", default_value_t = DEFAULT_HANDSHAKE_TIMEOUT_MS)]
    pub handshake_timeout_ms: u64,
    /// On SIGTERM, how long clients get to answer Close 1001 before the server exits.
    #[arg(long = "drain-timeout", value_name = "MS", default_value_t = DEFAULT_DRAIN_TIMEOUT_MS)]
    pub drain_timeout_ms: u64,
    /// Largest message a client may send, after reassembly; larger closes with 1009.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_MESSAGE_SIZE)]
    pub max_message_size: usize,
    /// Output queued for one slow reader beyond this closes it with 1008.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_PENDING_OUTPUT)]
    pub max_pending_output: usize,
    /// Rooms one connection may be in at once.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_ROOMS)]
    pub max_rooms: usize,
    /// Accept only these Origin header values (repeatable); default: any origin.
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    pub allowed_origins: Vec<String>,
    /// A proxy in front of the server whose X-Forwarded-For / X-Real-IP name the client
    /// (repeatable; an address or ADDR/BITS). From any other peer those headers are ignored.
    #[arg(long = "trusted-proxy", value_name = "ADDR[/BITS]")]
    pub trusted_proxies: Vec<Cidr>,
    /// Refuse an upgrade with 429 when its client address (behind a trusted proxy, the
    /// forwarded one; IPv6 per /64) already has this many connections open in this worker
    /// process. 0: no limit.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_connections_per_address: u32,
    /// Refuse an upgrade with 429 when its client address (as for
    /// --max-connections-per-address) has upgraded more than N times in the last second
    /// (a token bucket: N per second, bursts of N). 0: no limit.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_upgrade_rate: u32,
    /// Require a token signed with HS256 and this secret on every upgrade (`?token=` or
    /// `Authorization: Bearer`; docs/security.md). The file (at least 32 bytes; one trailing
    /// newline is not part of it) must not be readable by group or others.
    #[arg(long, value_name = "FILE")]
    pub auth_secret_file: Option<PathBuf>,
    /// Require a token signed by the private key of this PEM public key (Ed25519: EdDSA; RSA:
    /// RS256) on every upgrade; with --auth-secret-file too, either kind is accepted.
    #[arg(long, value_name = "FILE")]
    pub auth_public_key: Option<PathBuf>,
    /// Clock skew allowed on a token's exp and nbf, in seconds.
    #[arg(long = "auth-leeway", value_name = "SECONDS", default_value_t = DEFAULT_AUTH_LEEWAY_S)]
    pub auth_leeway_s: u64,
    /// Serve TLS (wss:// and https://) with this PEM certificate chain (the server's own first)
    /// on every --listen address; with --tls-key. Reloaded, with the key, on SIGHUP: new
    /// connections get the new certificate, open ones keep theirs.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Publishes, direct messages and token refreshes one connection may send per second (a
    /// token bucket); beyond it, error rate_limited, and a connection that keeps on is closed
    /// with 1008. 0: no limit.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub message_rate: u32,
    /// How many publishes and direct messages a connection may send at once above
    /// --message-rate [default: one second's worth, the rate itself].
    #[arg(long, value_name = "N")]
    pub message_burst: Option<u32>,
    /// permessage-deflate (RFC 7692): with `on`, accepted when a client offers it, without
    /// context takeover either way, so a connection holds no compression state (one
    /// compressor and one decompressor per event loop); room messages of 256 bytes and more are
    /// compressed once per encoding and shared.
    #[arg(long, value_enum, value_name = "on|off", default_value = "off")]
    pub deflate: Toggle,
    /// Echo every message back instead of speaking the relay protocol (for conformance suites
    /// such as Autobahn).
    #[arg(long)]
    pub echo: bool,
}

impl Options {
    /// The certificates, when TLS is configured (read now; errors name the file).
    pub fn certs(&self) -> Result<Option<super::tls::Certs>, String> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => super::tls::Certs::load(cert, key).map(Some),
            (None, None) => Ok(None),
            _ => Err("--tls-cert and --tls-key go together".into()),
        }
    }

    /// The token keys as configured (read by `auth::Verifier::load`).
    pub fn key_files(&self) -> super::auth::KeyFiles {
        super::auth::KeyFiles {
            secret_file: self.auth_secret_file.clone(),
            public_key: self.auth_public_key.clone(),
            leeway_s: self.auth_leeway_s,
        }
    }
}

impl Default for Options {
    fn default() -> Options {
        Options {
            threads: None,
            workers: None,
            bus_dir: None,
            bus: None,
            bus_password_file: None,
            bus_ca_file: None,
            node: None,
            ping_interval_ms: DEFAULT_PING_INTERVAL_MS,
            ping_timeout_ms: DEFAULT_PING_TIMEOUT_MS,
            handshake_timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT_MS,
            drain_timeout_ms: DEFAULT_DRAIN_TIMEOUT_MS,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_pending_output: DEFAULT_MAX_PENDING_OUTPUT,
            max_rooms: DEFAULT_MAX_ROOMS,
            allowed_origins: Vec::new(),
            trusted_proxies: Vec::new(),
            max_connections_per_address: 0,
            max_upgrade_rate: 0,
            auth_secret_file: None,
            auth_public_key: None,
            auth_leeway_s: DEFAULT_AUTH_LEEWAY_S,
            tls_cert: None,
            tls_key: None,
            message_rate: 0,
            message_burst: None,
            deflate: Toggle::Off,
            echo: false,
        }
    }
}

/// One server process: the options, and where it sits.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Address to listen on: IPv4 (`127.0.0.1:8080`) or IPv6 (`[::1]:8080`; `[::]:8080` takes
    /// IPv4 too, unless an IPv4 address of the same port is also given). Repeatable, up to 8.
    /// Port 0 picks a free port; the chosen addresses are printed.
    #[arg(long, value_name = "ADDR", default_values_t = [DEFAULT_LISTEN])]
    pub listen: Vec<SocketAddr>,
    /// This process's number among the workers, 0..N.
    #[arg(long, value_name = "I", default_value_t = 0)]
    pub worker: usize,
    /// 0..=4095, the 12 bits below the node in every connection id this process hands out: a
    /// number no earlier start of this server used, so an id never names two connections
    /// (docs/protocol.md). `tunegate run` hands every worker start the next one from its state
    /// directory. Without it, the wall clock's next whole second is taken (start-up waits for
    /// it, up to 1 s); required with --workers above 1.
    #[arg(long, value_name = "N")]
    pub incarnation: Option<u16>,
    #[command(flatten)]
    pub options: Options,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: vec![DEFAULT_LISTEN],
            worker: 0,
            incarnation: None,
            options: Options::default(),
        }
    }
}

impl Config {
    /// Event loops this process runs.
    pub fn threads(&self) -> usize {
        self.options
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Worker processes of the server.
    pub fn workers(&self) -> usize {
        self.options.workers.unwrap_or(1)
    }

    /// Bad usage, said in the flags' terms (the CLI maps it to exit code 2).
    pub fn validate(&self) -> Result<(), String> {
        let o = &self.options;
        if self.listen.is_empty() || self.listen.len() > MAX_LISTEN {
            return Err(format!("--listen is needed 1..={MAX_LISTEN} times"));
        }
        for (i, a) in self.listen.iter().enumerate() {
            if self.listen[..i].contains(a) && a.port() != 0 {
                return Err(format!("--listen {a} is given twice"));
            }
        }
        let threads = self.threads();
        if threads == 0 || threads > id::MAX_LOOPS {
            return Err(format!("--threads must be 1..={}", id::MAX_LOOPS));
        }
        if o.ping_interval_ms == 0 || o.ping_timeout_ms == 0 {
            return Err("ping interval and timeout must be above 0".into());
        }
        let workers = self.workers();
        if workers == 0 || workers > MAX_WORKERS || self.worker >= workers {
            return Err(format!(
                "--worker must be below --workers, and --workers 1..={MAX_WORKERS}"
            ));
        }
        if workers > 1 && o.bus_dir.is_none() {
            return Err("--workers above 1 needs --bus-dir".into());
        }
        if workers > 1 && self.incarnation.is_none() {
            // Workers started together would all take the same second from the clock.
            return Err(
                "--workers above 1 needs --incarnation, a different number for every \
                 worker start (tunegate run hands them out)"
                    .into(),
            );
        }
        if let Some(n) = self.incarnation
            && u32::from(n) >= id::INCARNATIONS
        {
            return Err(format!(
                "--incarnation must be 0..={}",
                id::INCARNATIONS - 1
            ));
        }
        match &o.bus {
            Some(url) => {
                let seeds = crate::redis_bus::url::parse(url)?;
                if o.bus_ca_file.is_some() && !seeds.tls {
                    return Err("--bus-ca-file needs a rediss:// --bus".into());
                }
            }
            None if o.bus_password_file.is_some() || o.bus_ca_file.is_some() => {
                return Err("--bus-password-file and --bus-ca-file need --bus".into());
            }
            None => {}
        }
        if o.tls_cert.is_some() != o.tls_key.is_some() {
            return Err("--tls-cert and --tls-key go together".into());
        }
        if o.message_burst.is_some() && o.message_rate == 0 {
            return Err("--message-burst needs --message-rate".into());
        }
        if o.max_pending_output < o.max_message_size + 14 {
            return Err(format!(
                "--max-pending-output ({}) must hold at least one largest message (--max-message-size {} + 14)",
                o.max_pending_output, o.max_message_size
            ));
        }
        Ok(())
    }

    /// The `tunegate serve` arguments that parse back to this configuration (the daemon starts
    /// each worker with them). Only what differs from the defaults is spelled out.
    pub fn to_args(&self) -> Vec<String> {
        let d = Config::default();
        let o = &self.options;
        let mut v: Vec<String> = Vec::new();
        for a in &self.listen {
            v.extend(["--listen".into(), a.to_string()]);
        }
        let mut flag = |name: &str, value: String| v.extend([format!("--{name}"), value]);
        if self.worker != d.worker {
            flag("worker", self.worker.to_string());
        }
        if let Some(n) = self.incarnation {
            flag("incarnation", n.to_string());
        }
        if let Some(n) = o.threads {
            flag("threads", n.to_string());
        }
        if let Some(n) = o.workers {
            flag("workers", n.to_string());
        }
        if let Some(dir) = &o.bus_dir {
            flag("bus-dir", dir.display().to_string());
        }
        if let Some(url) = &o.bus {
            flag("bus", url.clone());
        }
        if let Some(file) = &o.bus_password_file {
            flag("bus-password-file", file.display().to_string());
        }
        if let Some(file) = &o.bus_ca_file {
            flag("bus-ca-file", file.display().to_string());
        }
        if let Some(n) = o.node {
            flag("node", n.to_string());
        }
        if let Some(file) = &o.auth_secret_file {
            flag("auth-secret-file", file.display().to_string());
        }
        if let Some(file) = &o.auth_public_key {
            flag("auth-public-key", file.display().to_string());
        }
        if let Some(n) = o.message_burst {
            flag("message-burst", n.to_string());
        }
        if let Some(file) = &o.tls_cert {
            flag("tls-cert", file.display().to_string());
        }
        if let Some(file) = &o.tls_key {
            flag("tls-key", file.display().to_string());
        }
        let numbers = [
            (
                "ping-interval",
                o.ping_interval_ms,
                d.options.ping_interval_ms,
            ),
            ("ping-timeout", o.ping_timeout_ms, d.options.ping_timeout_ms),
            (
                "handshake-timeout",
                o.handshake_timeout_ms,
                d.options.handshake_timeout_ms,
            ),
            (
                "drain-timeout",
                o.drain_timeout_ms,
                d.options.drain_timeout_ms,
            ),
            (
                "max-message-size",
                o.max_message_size as u64,
                d.options.max_message_size as u64,
            ),
            (
                "max-pending-output",
                o.max_pending_output as u64,
                d.options.max_pending_output as u64,
            ),
            ("max-rooms", o.max_rooms as u64, d.options.max_rooms as u64),
            (
                "max-connections-per-address",
                u64::from(o.max_connections_per_address),
                0,
            ),
            ("max-upgrade-rate", u64::from(o.max_upgrade_rate), 0),
            ("auth-leeway", o.auth_leeway_s, d.options.auth_leeway_s),
            ("message-rate", u64::from(o.message_rate), 0),
        ];
        for (name, value, default) in numbers {
            if value != default {
                flag(name, value.to_string());
            }
        }
        for origin in &o.allowed_origins {
            flag("allowed-origin", origin.clone());
        }
        for proxy in &o.trusted_proxies {
            flag("trusted-proxy", proxy.to_string());
        }
        if o.deflate.on() {
            flag("deflate", "on".into());
        }
        if o.echo {
            v.push("--echo".into());
        }
        v
    }

    /// The Origin policy of the upgrade.
    pub fn policy(&self) -> super::handshake::Policy {
        super::handshake::Policy {
            allowed_origins: self.options.allowed_origins.clone(),
            deflate: self.options.deflate.on(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        config: Config,
    }

    fn parse(args: &[String]) -> Config {
        let argv = std::iter::once("serve".to_string()).chain(args.iter().cloned());
        Serve::try_parse_from(argv).expect("parses").config
    }

    /// Configuration -> argv -> parsed is the same configuration, for the defaults and with
    /// every field away from its default. Written without `..Default::default()`, so a new
    /// field does not compile until this test sets it.
    #[test]
    fn every_option_survives_the_trip_through_argv() {
        assert_eq!(parse(&Config::default().to_args()), Config::default());
        assert_eq!(parse(&[]), Config::default());
        let all = Config {
            listen: vec![
                "127.0.0.11:9000".parse().unwrap(),
                "[::1]:9000".parse().unwrap(),
            ],
            worker: 2,
            incarnation: Some(4042),
            options: Options {
                threads: Some(3),
                workers: Some(5),
                bus_dir: Some("/run/tunegate/bus dir".into()),
                bus: Some("rediss://relay@127.0.0.1:7000,127.0.0.1:7001".into()),
                bus_password_file: Some("/etc/tunegate/redis password".into()),
                bus_ca_file: Some("/etc/tunegate/redis ca.pem".into()),
                node: Some(11),
                ping_interval_ms: 1,
                ping_timeout_ms: 2,
                handshake_timeout_ms: 3,
                drain_timeout_ms: 4,
                max_message_size: 5,
                max_pending_output: 6,
                max_rooms: 7,
                allowed_origins: vec!["https://a.example".into(), "https://b.example".into()],
                trusted_proxies: vec![
                    "127.0.0.1".parse().unwrap(),
                    "10.0.0.0/8".parse().unwrap(),
                    "fd00::/8".parse().unwrap(),
                ],
                max_connections_per_address: 8,
                max_upgrade_rate: 9,
                auth_secret_file: Some("/etc/tunegate/token secret".into()),
                auth_public_key: Some("/etc/tunegate/issuer.pem".into()),
                auth_leeway_s: 10,
                tls_cert: Some("/etc/tunegate/cert chain.pem".into()),
                tls_key: Some("/etc/tunegate/key.pem".into()),
                message_rate: 11,
                message_burst: Some(12),
                deflate: Toggle::On,
                echo: true,
            },
        };
        assert_eq!(parse(&all.to_args()), all);
    }

    #[test]
    fn the_yaml_keys_are_the_field_names_and_unknown_ones_are_refused() {
        let o: Options = serde_yaml::from_str("ping_interval_ms: 100\nmax_rooms: 2\n").unwrap();
        assert_eq!(
            o,
            Options {
                ping_interval_ms: 100,
                max_rooms: 2,
                ..Options::default()
            }
        );
        let o: Options =
            serde_yaml::from_str("trusted_proxies: [127.0.0.1, 10.0.0.0/8]\n").unwrap();
        assert_eq!(o.trusted_proxies[1].to_string(), "10.0.0.0/8");
        let e = serde_yaml::from_str::<Options>("trusted_proxies: [10.0.0.5/8]\n").unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/8"), "{e}");
        let e = serde_yaml::from_str::<Options>("ping_interval: 100\n").unwrap_err();
        assert!(
            e.to_string().contains("unknown field `ping_interval`"),
            "{e}"
        );
    }
}
