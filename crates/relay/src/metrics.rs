//! Counters, one set per event loop (written only by that loop, relaxed atomics, no contention),
//! summed when /metrics is asked for, whichever loop answers.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

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
}

impl CloseReason {
    pub const ALL: [CloseReason; 12] = [
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
        }
    }

    fn index(self) -> usize {
        CloseReason::ALL
            .iter()
            .position(|r| *r == self)
            .expect("listed")
    }
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
    closed: [AtomicU64; 12],
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    accept_errors: [AtomicU64; 3],
    /// Connections accepted and closed at once because descriptors ran out.
    pub shed: AtomicU64,
    pub pings: AtomicU64,
    /// Slow readers cut off (counted when cut; the close itself follows when the Close frame
    /// has gone out or the wait ran out).
    pub backpressure_cutoffs: AtomicU64,
    pub protocol_errors_replied: AtomicU64,
}

/// The counters as plain numbers: summed over loops, written to the bus directory for the
/// other workers, summed again for /metrics.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub pid: u32,
    pub open: i64,
    pub websockets: i64,
    #[serde(default)]
    pub queued: i64,
    pub accepted: u64,
    pub closed: [u64; 12],
    pub messages_in: u64,
    pub messages_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub accept_errors: [u64; 3],
    pub shed: u64,
    pub pings: u64,
    pub backpressure_cutoffs: u64,
    pub protocol_errors_replied: u64,
    pub worker: usize,
    pub bus_routed: u64,
    pub bus_broadcast_equivalent: u64,
    pub bus_received: u64,
}

impl Snapshot {
    pub fn add(&mut self, o: &Snapshot) {
        self.open += o.open;
        self.websockets += o.websockets;
        self.queued += o.queued;
        self.accepted += o.accepted;
        for i in 0..self.closed.len() {
            self.closed[i] += o.closed[i];
        }
        self.messages_in += o.messages_in;
        self.messages_out += o.messages_out;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        for i in 0..self.accept_errors.len() {
            self.accept_errors[i] += o.accept_errors[i];
        }
        self.shed += o.shed;
        self.pings += o.pings;
        self.backpressure_cutoffs += o.backpressure_cutoffs;
        self.protocol_errors_replied += o.protocol_errors_replied;
        self.bus_routed += o.bus_routed;
        self.bus_broadcast_equivalent += o.bus_broadcast_equivalent;
        self.bus_received += o.bus_received;
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
            messages_in: self.messages_in.load(Relaxed),
            messages_out: self.messages_out.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            accept_errors: std::array::from_fn(|i| self.accept_errors[i].load(Relaxed)),
            shed: self.shed.load(Relaxed),
            pings: self.pings.load(Relaxed),
            backpressure_cutoffs: self.backpressure_cutoffs.load(Relaxed),
            protocol_errors_replied: self.protocol_errors_replied.load(Relaxed),
            ..Snapshot::default()
        }
    }

    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason.index()].fetch_add(1, Relaxed);
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
}

/// Prometheus text exposition of the whole server's counters.
pub fn render(total: &Snapshot, global: &Global) -> String {
    let sum = |f: &dyn Fn(&Snapshot) -> u64| f(total);
    let mut s = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, u64)>| {
        let _ = writeln!(
            s,
            "# HELP tunegate_{name} {help}\n# TYPE tunegate_{name} {kind}"
        );
        for (labels, v) in lines {
            let _ = writeln!(s, "tunegate_{name}{labels} {v}");
        }
    };
    let one = |v: u64| vec![(String::new(), v)];
    let gauge = |f: &dyn Fn(&Snapshot) -> i64| f(total).max(0) as u64;
    metric(
        "connections_open",
        "gauge",
        "Open TCP connections (WebSocket and HTTP).",
        one(gauge(&|m| m.open)),
    );
    metric(
        "websockets_open",
        "gauge",
        "Open WebSocket connections.",
        one(gauge(&|m| m.websockets)),
    );
    metric(
        "output_queued_bytes",
        "gauge",
        "Output waiting in the server for readers slower than their messages (all connections; each is capped by --max-pending-output).",
        one(gauge(&|m| m.queued)),
    );
    metric(
        "connections_accepted_total",
        "counter",
        "Connections accepted.",
        one(sum(&|m| m.accepted)),
    );
    metric(
        "connections_closed_total",
        "counter",
        "Connections closed, by reason.",
        CloseReason::ALL
            .iter()
            .map(|r| {
                (
                    format!("{{reason=\"{}\"}}", r.label()),
                    sum(&|m| m.closed[r.index()]),
                )
            })
            .collect(),
    );
    metric(
        "backpressure_closes_total",
        "counter",
        "Slow readers cut off because their pending output passed the cap (closed with 1008).",
        one(sum(&|m| m.backpressure_cutoffs)),
    );
    metric(
        "messages_in_total",
        "counter",
        "WebSocket messages received.",
        one(sum(&|m| m.messages_in)),
    );
    metric(
        "messages_out_total",
        "counter",
        "WebSocket messages sent.",
        one(sum(&|m| m.messages_out)),
    );
    metric(
        "bytes_in_total",
        "counter",
        "Bytes received.",
        one(sum(&|m| m.bytes_in)),
    );
    metric(
        "bytes_out_total",
        "counter",
        "Bytes sent.",
        one(sum(&|m| m.bytes_out)),
    );
    metric(
        "accept_errors_total",
        "counter",
        "accept4 failures, by errno.",
        ACCEPT_ERRNOS
            .iter()
            .enumerate()
            .map(|(i, e)| (format!("{{errno=\"{e}\"}}"), sum(&|m| m.accept_errors[i])))
            .collect(),
    );
    metric(
        "connections_shed_total",
        "counter",
        "Connections accepted and closed at once because descriptors ran out.",
        one(sum(&|m| m.shed)),
    );
    metric(
        "pings_sent_total",
        "counter",
        "Heartbeat pings sent.",
        one(sum(&|m| m.pings)),
    );
    metric(
        "protocol_errors_total",
        "counter",
        "Relay requests answered with an error message.",
        one(sum(&|m| m.protocol_errors_replied)),
    );
    metric(
        "rooms",
        "gauge",
        "Rooms with at least one member.",
        one(global.rooms),
    );
    metric(
        "accepting",
        "gauge",
        "1 while the server accepts new connections.",
        one(global.accepting as u64),
    );
    metric(
        "workers",
        "gauge",
        "Worker processes the server is configured with.",
        one(global.workers as u64),
    );
    metric(
        "workers_up",
        "gauge",
        "Worker processes up: the one answering and every one its bus links reach.",
        one(global.workers_up as u64),
    );
    metric(
        "bus_room_deliveries_total",
        "counter",
        "Room messages handed to other loops or workers (routed by interest).",
        one(total.bus_routed),
    );
    metric(
        "bus_broadcast_equivalent_total",
        "counter",
        "Room messages a send-to-all bus would have handed to other loops or workers.",
        one(total.bus_broadcast_equivalent),
    );
    metric(
        "bus_room_messages_received_total",
        "counter",
        "Room messages each worker received from other workers (interest routing: a worker with no member of a room receives none of its messages).",
        global
            .received_by_worker
            .iter()
            .map(|(w, n)| (format!("{{worker=\"{w}\"}}"), *n))
            .collect(),
    );
    s
}
