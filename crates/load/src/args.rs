//! What `tunegate load` can be told: the binary's CLI takes this struct as the `load`
//! subcommand's arguments, so the flags and their help live with the code that reads them.

use clap::Args;

/// Bad arguments: the binary maps this to exit code 2.
#[derive(Debug)]
pub struct BadArguments(pub String);

impl std::fmt::Display for BadArguments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadArguments {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadProtocol {
    /// tunegate's relay protocol (docs/protocol.md): hello, join, publish, message. Needed for
    /// the room and message phases.
    Relay,
    /// Plain WebSocket: connect and hold, nothing else (any server, e.g. an echo server).
    Plain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadEncoding {
    Json,
    Msgpack,
}

#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Target, ws://HOST:PORT/PATH or wss:// (an IP address, IPv6 in brackets, or a name,
    /// resolved once when each process starts); several, comma-separated, for the
    /// hosts of one service (joined by `serve --bus`): connections are spread over them as a
    /// load balancer would.
    pub url: String,
    /// Read options from this YAML file first (docs/load.md, "Scenario files"): every option
    /// by its long name, and url; the command line's own win.
    #[arg(long, value_name = "FILE")]
    pub scenario: Option<std::path::PathBuf>,
    /// Connections to open.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub connections: u64,
    /// Connections over time instead of -n: DURATION:TARGET,... (30s:10000,60s:100000,30s:0),
    /// each stage moving linearly from the target before it (0 at the start) to its own, as
    /// k6's stages do. The highest target is the run's connection count.
    #[arg(long, value_name = "STAGES", conflicts_with = "connections")]
    pub stages: Option<String>,
    /// Connects started per second, all processes together.
    #[arg(long, default_value_t = 20_000, value_name = "PER_SECOND")]
    pub connect_rate: u64,
    /// Connects (TCP + upgrade) in flight at once, all processes together, so the server's
    /// accept queue never overflows into SYN retransmits.
    #[arg(long, default_value_t = 1000)]
    pub max_inflight: u64,
    /// First source address; each next --per-source connections bind the next address. The
    /// default for a loopback target is 127.0.0.2 (then .3, ...), so ephemeral ports never
    /// run out; other targets use the kernel's choice unless this is given.
    #[arg(long, value_name = "IPV4")]
    pub source: Option<std::net::Ipv4Addr>,
    /// Connections per source address. Keep it under half of net.ipv4.ip_local_port_range:
    /// past that, every connect() from the same address to the same destination scans the
    /// whole range in the kernel (measured here with 28,232 ports: 20,000/s up to ~14,000 per
    /// address, under 1,000/s beyond).
    #[arg(long, default_value_t = 10_000)]
    pub per_source: u64,
    #[arg(long, value_enum, default_value = "relay")]
    pub protocol: LoadProtocol,
    /// Offer permessage-deflate (without context takeover) on every connection, and inflate
    /// what the server sends compressed; a connection whose server does not agree fails.
    #[arg(long)]
    pub deflate: bool,
    /// Ask for each connection's room in its URL (`?affinity=ROOM`), so that a server of
    /// several workers serves every member of a room from the room's home worker
    /// (docs/protocol.md).
    #[arg(long)]
    pub affinity: bool,
    /// With wss:// targets: the CA certificates (PEM) to trust instead of the system's (the
    /// certificate must name the target: its IP address, or the name in the URL).
    #[arg(long, visible_alias = "ca", value_name = "FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// An extra header on every upgrade request, 'Name: value' (Origin, Authorization,
    /// Cookie, ...); repeatable. 'Host: ...' replaces the URL's host. The handshake's own
    /// headers are refused.
    #[arg(short = 'H', long = "header", value_name = "HEADER")]
    pub headers: Vec<String>,
    /// Read the token (see --token) from the first line of this file: kept out of the
    /// process list and the shell's history.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// A token every connection presents (`Authorization: Bearer`), for a server started with
    /// --auth-secret-file or --auth-public-key (`tunegate token` mints one; its claims must
    /// allow the rooms of --rooms).
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Room sizes: one size ("10": every connection in a room of 10) or a spread of
    /// SIZE:PERCENT of the connections ("2:50,10:40,100:10").
    #[arg(long, default_value = "10", value_name = "SPREAD")]
    pub rooms: String,
    /// During the hold, close this many connections a second (all processes together,
    /// evenly spaced) and open each again at once, back in its room: clients that come and
    /// go, as on a real service. Needs --hold.
    #[arg(long, default_value_t = 0.0, value_name = "PER_SECOND")]
    pub churn: f64,
    /// Room messages published per second, all processes together, evenly spaced (0.5: one
    /// every two seconds); 0 skips the message phase.
    #[arg(long, default_value_t = 0.0, value_name = "PER_SECOND")]
    pub publish_rate: f64,
    /// How long the message phase publishes.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub publish_seconds: f64,
    /// Bytes of padding in each message's data.
    #[arg(long, default_value_t = 64, value_name = "BYTES")]
    pub payload: usize,
    #[arg(long, value_enum, default_value = "json")]
    pub encoding: LoadEncoding,
    /// Write the run's histograms here (created if missing): latency.hgrm (from each message's
    /// scheduled send), service.hgrm (from its actual write) and lag.hgrm (how late the
    /// publishers wrote), in HdrHistogram's percentile-distribution format; and
    /// timeseries.csv, the run second by second (open, sent, delivered, p50, p99).
    #[arg(long, value_name = "DIR")]
    pub out: Option<std::path::PathBuf>,
    /// Hold every connection open this long after all are up (and rooms joined), before the
    /// message phase: long enough to cross heartbeat rounds.
    #[arg(long, default_value_t = 0.0, value_name = "SECONDS")]
    pub hold: f64,
    /// Give up on connections not open within this long after the ramp started.
    #[arg(long, default_value_t = 120.0, value_name = "SECONDS")]
    pub connect_timeout: f64,
    /// Processes to spread the connections over; default: as few as this process's
    /// RLIMIT_NOFILE allows.
    #[arg(long)]
    pub processes: Option<usize>,
    /// The summary on stdout for people (`human`) or as JSON (`json`, docs/load.md lists
    /// every field); progress goes to stderr either way.
    #[arg(long, value_enum, default_value = "human")]
    pub format: LoadFormat,
    /// Same as --format json.
    #[arg(long)]
    pub json: bool,
    /// A threshold the run must meet, or it fails (exit 1, the threshold named): METRIC OP
    /// VALUE, e.g. 'p99<50ms', 'lost==0', 'open_ratio>=0.999' (docs/load.md lists the metrics).
    /// Repeatable.
    #[arg(long = "fail-if", value_name = "THRESHOLD")]
    pub fail_if: Vec<String>,
    /// Hard cap on the whole run; everything stops then, whatever the phase.
    #[arg(long, default_value_t = 900.0, value_name = "SECONDS")]
    pub max_time: f64,
    /// Internal: run as shard I of K (the processes the first one starts).
    #[arg(long, hide = true, value_name = "I/K")]
    pub shard: Option<String>,
}
