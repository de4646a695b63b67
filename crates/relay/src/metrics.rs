//! Counters, one set per event loop (written only by that loop, relaxed atomics, no contention),
//! summed when /metrics is asked for, whichever loop answers.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

mod history;
pub use history::{History, SETTLED_MS, monotonic_ms, publish_interval_ms};

/// Why a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent Close.
    ClientClose,
    /// The peer went away without a Close (EOF, reset).
    PeerGone,
    ProtocolError,
    InvalidUtf8,
    MessageTooBig,
    HeartbeatTimeout,
    HandshakeTimeout,
    HandshakeRejected,
    /// Slow reader: pending output over the cap.
    Backpressure,
    Shutdown,
    /// A plain HTTP request, answered.
    HttpDone,
    IoError,
    /// Refused with 429: its client address already had --max-connections-per-address open.
    AddressLimit,
    /// Refused with 429: its client address upgraded faster than --max-upgrade-rate.
    UpgradeRate,
    /// Refused with 401: no valid token (`tunegate_auth_refused_total` says why).
    Unauthorized,
    /// Closed with 4001: its token expired and no refresh came.
    TokenExpired,
    /// Closed with 1008: it went on publishing or sending past its rate limit.
    RateLimited,
    /// The TLS handshake or a record failed (not TLS, an old version, a bad record).
    TlsError,
}

impl CloseReason {
    pub const ALL: [CloseReason; CLOSE_REASONS] = [
        CloseReason::ClientClose,
        CloseReason::PeerGone,
        CloseReason::ProtocolError,
        CloseReason::InvalidUtf8,
        CloseReason::MessageTooBig,
        CloseReason::HeartbeatTimeout,
        CloseReason::HandshakeTimeout,
        CloseReason::HandshakeRejected,
        CloseReason::Backpressure,
        CloseReason::Shutdown,
        CloseReason::HttpDone,
        CloseReason::IoError,
        CloseReason::AddressLimit,
        CloseReason::UpgradeRate,
        CloseReason::Unauthorized,
        CloseReason::TokenExpired,
        CloseReason::RateLimited,
        CloseReason::TlsError,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CloseReason::ClientClose => "client_close",
            CloseReason::PeerGone => "peer_gone",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::MessageTooBig => "message_too_big",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::HandshakeRejected => "handshake_rejected",
            CloseReason::Backpressure => "backpressure",
            CloseReason::Shutdown => "shutdown",
            CloseReason::HttpDone => "http_done",
            CloseReason::IoError => "io_error",
            CloseReason::AddressLimit => "address_limit",
            CloseReason::UpgradeRate => "upgrade_rate",
            CloseReason::Unauthorized => "unauthorized",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::RateLimited => "rate_limited",
            CloseReason::TlsError => "tls_error",
        }
    }

    fn index(self) -> usize {
        CloseReason::ALL
            .iter()
            .position(|r| *r == self)
            .expect("listed")
    }
}

pub const CLOSE_REASONS: usize = 18;
const AUTH_REFUSALS: usize = crate::auth::Refusal::ALL.len();

/// A counter array as a snapshot file or a peer of another build wrote it: shorter (an older
/// build, before a reason was added) is padded with zeros, longer is cut.
fn padded<'de, D: serde::Deserializer<'de>, const N: usize>(d: D) -> Result<[u64; N], D::Error> {
    let v: Vec<u64> = serde::Deserialize::deserialize(d)?;
    Ok(std::array::from_fn(|i| v.get(i).copied().unwrap_or(0)))
}

/// Accept errors we count by errno.
pub const ACCEPT_ERRNOS: [&str; 3] = ["EMFILE", "ENFILE", "other"];

#[derive(Default)]
pub struct LoopMetrics {
    pub open: AtomicI64,
    pub websockets: AtomicI64,
    /// Output waiting in the server for slow readers, in bytes (all this loop's connections).
    pub queued: AtomicI64,
    pub accepted: AtomicU64,
    closed: [AtomicU64; CLOSE_REASONS],
    auth_refused: [AtomicU64; AUTH_REFUSALS],
    /// Joins, publishes, sends and counts a token's claims did not allow.
    pub forbidden: AtomicU64,
    /// Publishes and sends refused by the per-connection rate limit.
    pub rate_limited: AtomicU64,
    /// Tokens replaced by a `refresh`.
    pub refreshed: AtomicU64,
    /// Messages received compressed (permessage-deflate) and inflated.
    pub inflated_in: AtomicU64,
    /// Messages sent compressed (a shared room frame counts once per receiver).
    pub deflated_out: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    accept_errors: [AtomicU64; 3],
    /// Connections accepted and closed at once because descriptors ran out.
    pub shed: AtomicU64,
    /// Connections handed over before their upgrade to the loop home to the room their
    /// `affinity` names (`handoff.rs`), and taken from other loops.
    pub moved_out: AtomicU64,
    pub moved_in: AtomicU64,
    /// Connections that asked for their room's home but were served where they arrived: the
    /// home did not take them (down, or its queue full for longer than the wait).
    pub move_failed: AtomicU64,
    pub pings: AtomicU64,
    /// Connections whose heartbeat timeout came while something from them (an answer, a Close,
    /// a hang-up) waited unread: read and handled, not closed for the heartbeat (the loop had
    /// fallen behind in reading them).
    pub heartbeat_late_reads: AtomicU64,
    /// Times this loop gave the allocator's free pages back to the kernel (`heap.rs`), and how
    /// much that took off the process's resident memory.
    pub heap_trims: AtomicU64,
    pub heap_trimmed_bytes: AtomicU64,
    /// Slow readers cut off (counted when cut; the close itself follows when the Close frame
    /// has gone out or the wait ran out).
    pub backpressure_cutoffs: AtomicU64,
    pub protocol_errors_replied: AtomicU64,
    /// Upgrades whose client address a trusted proxy forwarded.
    pub forwarded: AtomicU64,
    /// Upgrades with X-Forwarded-For or X-Real-IP from a peer not trusted (headers ignored).
    pub forwarded_ignored: AtomicU64,
}

/// The counters as plain numbers: summed over loops, written to the bus directory for the
/// other workers, summed again for /metrics.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub pid: u32,
    pub open: i64,
    pub websockets: i64,
    #[serde(default)]
    pub queued: i64,
    /// Gauge: the rooms this worker answers for (`Bus::rooms`), summed into the server's.
    #[serde(default)]
    pub rooms: i64,
    pub accepted: u64,
    #[serde(deserialize_with = "padded")]
    pub closed: [u64; CLOSE_REASONS],
    #[serde(default, deserialize_with = "padded")]
    pub auth_refused: [u64; AUTH_REFUSALS],
    #[serde(default)]
    pub forbidden: u64,
    #[serde(default)]
    pub rate_limited: u64,
    #[serde(default)]
    pub refreshed: u64,
    #[serde(default)]
    pub inflated_in: u64,
    #[serde(default)]
    pub deflated_out: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub accept_errors: [u64; 3],
    pub shed: u64,
    #[serde(default)]
    pub moved_out: u64,
    #[serde(default)]
    pub moved_in: u64,
    #[serde(default)]
    pub move_failed: u64,
    pub pings: u64,
    #[serde(default)]
    pub heartbeat_late_reads: u64,
    #[serde(default)]
    pub heap_trims: u64,
    #[serde(default)]
    pub heap_trimmed_bytes: u64,
    pub backpressure_cutoffs: u64,
    pub protocol_errors_replied: u64,
    #[serde(default)]
    pub forwarded: u64,
    #[serde(default)]
    pub forwarded_ignored: u64,
    pub worker: usize,
    pub bus_routed: u64,
    pub bus_broadcast_equivalent: u64,
    pub bus_received: u64,
    #[serde(default)]
    pub remote: RemoteStats,
    /// When it was taken (CLOCK_MONOTONIC, milliseconds: one clock for every process on the
    /// host), so that every worker picks the same snapshot of each worker ([`History`]).
    #[serde(default)]
    pub sent_ms: u64,
}

/// A worker's link to other hosts (the Redis bus); all zero without one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteStats {
    /// 1 while the worker reaches the cluster (summed: workers connected).
    pub connected: u64,
    /// Messages (room, direct, bounce) Redis accepted from this worker.
    pub published: u64,
    /// Room messages this worker received from other processes through Redis.
    pub received: u64,
    /// Messages for other processes lost: not sent (Redis out of reach, queue full), failed,
    /// or arrived unreadable or too late to be kept. Pub/sub is at-most-once.
    pub dropped: u64,
}

impl RemoteStats {
    fn add(&mut self, o: &RemoteStats) {
        self.connected += o.connected;
        self.published += o.published;
        self.received += o.received;
        self.dropped += o.dropped;
    }
}

impl Snapshot {
    pub fn add(&mut self, o: &Snapshot) {
        self.open += o.open;
        self.websockets += o.websockets;
        self.queued += o.queued;
        self.rooms += o.rooms;
        self.accepted += o.accepted;
        for i in 0..self.closed.len() {
            self.closed[i] += o.closed[i];
        }
        for i in 0..self.auth_refused.len() {
            self.auth_refused[i] += o.auth_refused[i];
        }
        self.forbidden += o.forbidden;
        self.rate_limited += o.rate_limited;
        self.refreshed += o.refreshed;
        self.inflated_in += o.inflated_in;
        self.deflated_out += o.deflated_out;
        self.messages_in += o.messages_in;
        self.messages_out += o.messages_out;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        for i in 0..self.accept_errors.len() {
            self.accept_errors[i] += o.accept_errors[i];
        }
        self.shed += o.shed;
        self.moved_out += o.moved_out;
        self.moved_in += o.moved_in;
        self.move_failed += o.move_failed;
        self.pings += o.pings;
        self.heartbeat_late_reads += o.heartbeat_late_reads;
        self.heap_trims += o.heap_trims;
        self.heap_trimmed_bytes += o.heap_trimmed_bytes;
        self.backpressure_cutoffs += o.backpressure_cutoffs;
        self.protocol_errors_replied += o.protocol_errors_replied;
        self.forwarded += o.forwarded;
        self.forwarded_ignored += o.forwarded_ignored;
        self.bus_routed += o.bus_routed;
        self.bus_broadcast_equivalent += o.bus_broadcast_equivalent;
        self.bus_received += o.bus_received;
        self.remote.add(&o.remote);
    }

    /// Only the counters, the gauges zeroed: what outlives the process that counted them (a
    /// restarted worker carries its predecessor's; its peers keep a dead one's).
    pub fn counters(&self) -> Snapshot {
        Snapshot {
            open: 0,
            websockets: 0,
            queued: 0,
            rooms: 0,
            remote: RemoteStats {
                connected: 0,
                ..self.remote
            },
            ..self.clone()
        }
    }

    /// Each counter raised to at least `o`'s: a worker's counters as its peers see them never
    /// go down, even when a restarted worker starts from a carried figure a little behind the
    /// last one they saw of its predecessor. Gauges are left as they are.
    pub fn max_counters(&mut self, o: &Snapshot) {
        let m = |a: &mut u64, b: u64| *a = (*a).max(b);
        m(&mut self.accepted, o.accepted);
        for i in 0..self.closed.len() {
            m(&mut self.closed[i], o.closed[i]);
        }
        for i in 0..self.auth_refused.len() {
            m(&mut self.auth_refused[i], o.auth_refused[i]);
        }
        m(&mut self.forbidden, o.forbidden);
        m(&mut self.rate_limited, o.rate_limited);
        m(&mut self.refreshed, o.refreshed);
        m(&mut self.inflated_in, o.inflated_in);
        m(&mut self.deflated_out, o.deflated_out);
        m(&mut self.messages_in, o.messages_in);
        m(&mut self.messages_out, o.messages_out);
        m(&mut self.bytes_in, o.bytes_in);
        m(&mut self.bytes_out, o.bytes_out);
        for i in 0..self.accept_errors.len() {
            m(&mut self.accept_errors[i], o.accept_errors[i]);
        }
        m(&mut self.shed, o.shed);
        m(&mut self.moved_out, o.moved_out);
        m(&mut self.moved_in, o.moved_in);
        m(&mut self.move_failed, o.move_failed);
        m(&mut self.pings, o.pings);
        m(&mut self.heartbeat_late_reads, o.heartbeat_late_reads);
        m(&mut self.heap_trims, o.heap_trims);
        m(&mut self.heap_trimmed_bytes, o.heap_trimmed_bytes);
        m(&mut self.backpressure_cutoffs, o.backpressure_cutoffs);
        m(&mut self.protocol_errors_replied, o.protocol_errors_replied);
        m(&mut self.forwarded, o.forwarded);
        m(&mut self.forwarded_ignored, o.forwarded_ignored);
        m(&mut self.bus_routed, o.bus_routed);
        m(
            &mut self.bus_broadcast_equivalent,
            o.bus_broadcast_equivalent,
        );
        m(&mut self.bus_received, o.bus_received);
        m(&mut self.remote.published, o.remote.published);
        m(&mut self.remote.received, o.remote.received);
        m(&mut self.remote.dropped, o.remote.dropped);
    }

    /// The sum over this process's loops.
    pub fn of(loops: &[std::sync::Arc<LoopMetrics>]) -> Snapshot {
        let mut total = Snapshot {
            pid: std::process::id(),
            ..Snapshot::default()
        };
        for m in loops {
            total.add(&m.snapshot());
        }
        total
    }
}

impl LoopMetrics {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            pid: std::process::id(),
            open: self.open.load(Relaxed),
            websockets: self.websockets.load(Relaxed),
            queued: self.queued.load(Relaxed),
            accepted: self.accepted.load(Relaxed),
            closed: std::array::from_fn(|i| self.closed[i].load(Relaxed)),
            auth_refused: std::array::from_fn(|i| self.auth_refused[i].load(Relaxed)),
            forbidden: self.forbidden.load(Relaxed),
            rate_limited: self.rate_limited.load(Relaxed),
            refreshed: self.refreshed.load(Relaxed),
            inflated_in: self.inflated_in.load(Relaxed),
            deflated_out: self.deflated_out.load(Relaxed),
            messages_in: self.messages_in.load(Relaxed),
            messages_out: self.messages_out.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            accept_errors: std::array::from_fn(|i| self.accept_errors[i].load(Relaxed)),
            shed: self.shed.load(Relaxed),
            moved_out: self.moved_out.load(Relaxed),
            moved_in: self.moved_in.load(Relaxed),
            move_failed: self.move_failed.load(Relaxed),
            pings: self.pings.load(Relaxed),
            heartbeat_late_reads: self.heartbeat_late_reads.load(Relaxed),
            heap_trims: self.heap_trims.load(Relaxed),
            heap_trimmed_bytes: self.heap_trimmed_bytes.load(Relaxed),
            backpressure_cutoffs: self.backpressure_cutoffs.load(Relaxed),
            protocol_errors_replied: self.protocol_errors_replied.load(Relaxed),
            forwarded: self.forwarded.load(Relaxed),
            forwarded_ignored: self.forwarded_ignored.load(Relaxed),
            ..Snapshot::default()
        }
    }

    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason.index()].fetch_add(1, Relaxed);
    }

    /// Connections closed, for every reason.
    pub fn closed_total(&self) -> u64 {
        self.closed.iter().map(|c| c.load(Relaxed)).sum()
    }

    pub fn auth_refused(&self, why: crate::auth::Refusal) {
        self.auth_refused[why.index()].fetch_add(1, Relaxed);
    }

    pub fn accept_error(&self, errno: nix::errno::Errno) {
        let i = match errno {
            nix::errno::Errno::EMFILE => 0,
            nix::errno::Errno::ENFILE => 1,
            _ => 2,
        };
        self.accept_errors[i].fetch_add(1, Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}

/// Server-wide figures that are not per loop.
pub struct Global {
    pub rooms: u64,
    pub accepting: bool,
    /// Worker processes up (this one, and every other one its bus link reaches), of `workers`.
    pub workers_up: usize,
    pub workers: usize,
    /// (worker, room messages it received from other workers), one entry per live worker.
    pub received_by_worker: Vec<(usize, u64)>,
    /// Whether the server runs the Redis bus (its families are shown only then).
    pub redis: bool,
}

/// One metric family: name (after `tunegate_`), type, help, and its samples (labels, value).
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(String, u64)>,
}

fn counter(name: &'static str, help: &'static str, value: u64) -> Family {
    Family {
        name,
        kind: "counter",
        help,
        samples: vec![(String::new(), value)],
    }
}

fn gauge(name: &'static str, help: &'static str, value: i64) -> Family {
    Family {
        name,
        kind: "gauge",
        help,
        samples: vec![(String::new(), value.max(0) as u64)],
    }
}

/// Prometheus text exposition of the whole server's counters.
pub fn render(total: &Snapshot, global: &Global) -> String {
    let mut s = String::new();
    for f in connection_families(total)
        .into_iter()
        .chain(server_families(total, global))
    {
        let name = f.name;
        let _ = writeln!(
            s,
            "# HELP tunegate_{name} {}\n# TYPE tunegate_{name} {}",
            f.help, f.kind
        );
        for (labels, v) in f.samples {
            let _ = writeln!(s, "tunegate_{name}{labels} {v}");
        }
    }
    s
}

/// What happens to connections and the bytes and messages on them.
fn connection_families(t: &Snapshot) -> Vec<Family> {
    let closed = CloseReason::ALL
        .iter()
        .map(|r| (format!("{{reason=\"{}\"}}", r.label()), t.closed[r.index()]))
        .collect();
    let auth_refused = crate::auth::Refusal::ALL
        .iter()
        .map(|r| {
            (
                format!("{{reason=\"{}\"}}", r.label()),
                t.auth_refused[r.index()],
            )
        })
        .collect();
    let accept_errors = ACCEPT_ERRNOS
        .iter()
        .enumerate()
        .map(|(i, e)| (format!("{{errno=\"{e}\"}}"), t.accept_errors[i]))
        .collect();
    vec![
        gauge(
            "connections_open",
            "Open TCP connections (WebSocket and HTTP).",
            t.open,
        ),
        gauge(
            "websockets_open",
            "Open WebSocket connections.",
            t.websockets,
        ),
        gauge(
            "output_queued_bytes",
            "Output waiting in the server for readers slower than their messages (all connections; each is capped by --max-pending-output).",
            t.queued,
        ),
        counter(
            "connections_accepted_total",
            "Connections accepted.",
            t.accepted,
        ),
        Family {
            name: "connections_closed_total",
            kind: "counter",
            help: "Connections closed, by reason.",
            samples: closed,
        },
        counter(
            "backpressure_closes_total",
            "Slow readers cut off because their pending output passed the cap (closed with 1008).",
            t.backpressure_cutoffs,
        ),
        counter(
            "messages_in_total",
            "WebSocket messages received.",
            t.messages_in,
        ),
        counter(
            "messages_out_total",
            "WebSocket messages sent.",
            t.messages_out,
        ),
        counter("bytes_in_total", "Bytes received.", t.bytes_in),
        counter("bytes_out_total", "Bytes sent.", t.bytes_out),
        Family {
            name: "accept_errors_total",
            kind: "counter",
            help: "accept4 failures, by errno.",
            samples: accept_errors,
        },
        counter(
            "connections_shed_total",
            "Connections accepted and closed at once because descriptors ran out.",
            t.shed,
        ),
        counter(
            "connections_moved_out_total",
            "Connections handed, before their upgrade, to the worker and loop home to the room their URL's affinity names.",
            t.moved_out,
        ),
        counter(
            "connections_moved_in_total",
            "Connections taken from another worker or loop because this one is home to the room their URL's affinity names.",
            t.moved_in,
        ),
        counter(
            "connection_moves_failed_total",
            "Connections whose URL named an affinity but which were served where they arrived: the room's home did not take them (down, holding its share of descriptors, or its queue stayed full), or lost on the way (no descriptor left to receive them with).",
            t.move_failed,
        ),
        counter("pings_sent_total", "Heartbeat pings sent.", t.pings),
        counter(
            "heartbeat_late_reads_total",
            "Connections whose heartbeat timeout came while something from them (an answer, a Close, a hang-up) waited unread: read and handled, not closed for the heartbeat (the worker had fallen behind in reading them).",
            t.heartbeat_late_reads,
        ),
        counter(
            "heap_trims_total",
            "Times an event loop gave the allocator's free pages back to the kernel: after a burst of at least 1,000 connections coming or going was over (or a minute into one that did not pause).",
            t.heap_trims,
        ),
        counter(
            "heap_trimmed_bytes_total",
            "Resident memory those trims gave back to the kernel, in bytes.",
            t.heap_trimmed_bytes,
        ),
        counter(
            "protocol_errors_total",
            "Relay requests answered with an error message.",
            t.protocol_errors_replied,
        ),
        counter(
            "upgrades_forwarded_total",
            "WebSocket upgrades whose client address came from a --trusted-proxy's X-Forwarded-For or X-Real-IP.",
            t.forwarded,
        ),
        counter(
            "forwarded_headers_ignored_total",
            "WebSocket upgrades carrying X-Forwarded-For or X-Real-IP from a peer not in --trusted-proxy (the headers were ignored; a proxy missing from the list makes every client look like the proxy).",
            t.forwarded_ignored,
        ),
        Family {
            name: "auth_refused_total",
            kind: "counter",
            help: "WebSocket upgrades refused with 401 for want of a valid token, by reason.",
            samples: auth_refused,
        },
        counter(
            "forbidden_total",
            "Joins, publishes, direct messages and counts a connection's token did not allow (answered with error forbidden).",
            t.forbidden,
        ),
        counter(
            "rate_limited_total",
            "Publishes and direct messages refused by the per-connection rate limit (answered with error rate_limited).",
            t.rate_limited,
        ),
        counter(
            "token_refreshes_total",
            "Connections that presented a fresh token with the refresh op.",
            t.refreshed,
        ),
        counter(
            "messages_inflated_total",
            "Messages received compressed (permessage-deflate).",
            t.inflated_in,
        ),
        counter(
            "messages_deflated_total",
            "Messages sent compressed (permessage-deflate); a room message is compressed once per encoding and counted per receiver.",
            t.deflated_out,
        ),
    ]
}

/// The server as a whole: rooms, accepting, workers, and the bus between loops and workers.
fn server_families(t: &Snapshot, g: &Global) -> Vec<Family> {
    let received = g
        .received_by_worker
        .iter()
        .map(|(w, n)| (format!("{{worker=\"{w}\"}}"), *n))
        .collect();
    let mut families = vec![
        gauge("rooms", "Rooms with at least one member.", g.rooms as i64),
        gauge(
            "accepting",
            "1 while the server accepts new connections.",
            g.accepting as i64,
        ),
        gauge(
            "workers",
            "Worker processes the server is configured with.",
            g.workers as i64,
        ),
        gauge(
            "workers_up",
            "Worker processes up: the one answering and every one its bus links reach.",
            g.workers_up as i64,
        ),
        counter(
            "bus_room_deliveries_total",
            "Room messages handed to other loops or workers (routed by interest).",
            t.bus_routed,
        ),
        counter(
            "bus_broadcast_equivalent_total",
            "Room messages a send-to-all bus would have handed to other loops or workers.",
            t.bus_broadcast_equivalent,
        ),
        Family {
            name: "bus_room_messages_received_total",
            kind: "counter",
            help: "Room messages each worker received from other workers (interest routing: a worker with no member of a room receives none of its messages).",
            samples: received,
        },
    ];
    if g.redis {
        families.extend(redis_families(&t.remote));
    }
    families
}

/// The Redis bus between hosts.
fn redis_families(r: &RemoteStats) -> Vec<Family> {
    vec![
        gauge(
            "bus_redis_connected",
            "Workers that reach the Redis Cluster (and own their node id).",
            r.connected as i64,
        ),
        counter(
            "bus_redis_published_total",
            "Messages (room, direct, bounce) the Redis Cluster accepted from the workers.",
            r.published,
        ),
        counter(
            "bus_redis_received_total",
            "Room messages the workers received from other processes through Redis.",
            r.received,
        ),
        counter(
            "bus_redis_dropped_total",
            "Messages for other processes lost: Redis out of reach, queue full, a failed command, or fallen behind (pub/sub is at-most-once).",
            r.dropped,
        ),
    ]
}
