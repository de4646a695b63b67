//! What a load run measured: each process's `Tally`, merged into one `Outcome`, printed for
//! people or as JSON (docs/load.md lists every field).

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// A histogram in microseconds, 1 µs to 1 hour, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds")
}

/// A histogram's recorded values as (value, count) pairs, to cross a process boundary.
pub fn buckets(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// One load process's counts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Tally {
    pub attempted: u64,
    pub opened: u64,
    /// Connects that never opened, by cause (errno name, "timeout", "http 503", ...).
    pub connect_errors: BTreeMap<String, u64>,
    /// Open connections that ended before the run did, by cause ("eof", "close 1001", ...).
    pub disconnects: BTreeMap<String, u64>,
    pub joined: u64,
    /// `error` replies from the server (to joins, publishes, counts).
    pub server_errors: u64,
    pub rooms_checked: u64,
    /// Rooms whose member count never reached the planned size.
    pub rooms_short: u64,
    pub sent: u64,
    /// Deliveries the sent messages should make: each to every other member of its room.
    pub expected: u64,
    pub received: u64,
    pub pings_answered: u64,
    /// Messages that arrived compressed (permessage-deflate, with --deflate).
    #[serde(default)]
    pub inflated: u64,
    /// Histogram buckets (µs, count), carried from a shard to the coordinator only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connect_us: Vec<(u64, u64)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency_us: Vec<(u64, u64)>,
}

impl Tally {
    pub fn add(&mut self, o: &Tally) {
        self.attempted += o.attempted;
        self.opened += o.opened;
        for (k, v) in &o.connect_errors {
            *self.connect_errors.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.disconnects {
            *self.disconnects.entry(k.clone()).or_default() += v;
        }
        self.joined += o.joined;
        self.server_errors += o.server_errors;
        self.rooms_checked += o.rooms_checked;
        self.rooms_short += o.rooms_short;
        self.sent += o.sent;
        self.expected += o.expected;
        self.received += o.received;
        self.pings_answered += o.pings_answered;
        self.inflated += o.inflated;
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub samples: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            samples: h.len(),
        }
    }
}

/// The whole run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Outcome {
    pub target: String,
    pub connections: u64,
    pub processes: usize,
    #[serde(flatten)]
    pub tally: Tally,
    /// Still open when the run ended.
    pub open_at_end: u64,
    /// From the first connect to the last connection open.
    pub connect_seconds: f64,
    pub connects_per_second: f64,
    pub connect_time: Percentiles,
    pub held_seconds: f64,
    pub publish_seconds: f64,
    pub publish_rate_achieved: f64,
    pub latency: Percentiles,
    /// Deliveries missing after the drain (expected - received, if positive).
    pub lost: u64,
    /// True when every connection opened, none dropped, and every message arrived.
    pub ok: bool,
    pub problems: Vec<String>,
}

impl Outcome {
    pub fn judge(&mut self) {
        let t = &self.tally;
        let mut p = Vec::new();
        if t.opened < self.connections {
            p.push(format!(
                "{} of {} connections opened; errors: {:?}",
                t.opened, self.connections, t.connect_errors
            ));
        }
        let dropped: u64 = t.disconnects.values().sum();
        if dropped > 0 {
            p.push(format!(
                "{dropped} unexpected disconnects: {:?}",
                t.disconnects
            ));
        }
        if t.server_errors > 0 {
            p.push(format!("{} error replies from the server", t.server_errors));
        }
        if t.rooms_short > 0 {
            p.push(format!(
                "{} of {} rooms checked never counted their planned members",
                t.rooms_short, t.rooms_checked
            ));
        }
        self.lost = t.expected.saturating_sub(t.received);
        if self.lost > 0 {
            p.push(format!(
                "{} of {} deliveries missing",
                self.lost, t.expected
            ));
        }
        if t.received > t.expected {
            p.push(format!(
                "{} deliveries more than expected (duplicates)",
                t.received - t.expected
            ));
        }
        self.ok = p.is_empty();
        self.problems = p;
    }

    pub fn human(&self) -> String {
        let t = &self.tally;
        let mut s = format!(
            "tunegate load: {} -> {} ({} process(es))\n",
            self.connections, self.target, self.processes
        );
        s.push_str(&format!(
            "connect: {} of {} open in {:.2} s ({:.0}/s); connect time p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms\n",
            t.opened,
            self.connections,
            self.connect_seconds,
            self.connects_per_second,
            self.connect_time.p50_ms,
            self.connect_time.p99_ms,
            self.connect_time.max_ms
        ));
        if !t.connect_errors.is_empty() {
            s.push_str(&format!("connect errors: {:?}\n", t.connect_errors));
        }
        s.push_str(&format!(
            "held {:.1} s; {} still open at the end; pings answered {}; unexpected disconnects {}\n",
            self.held_seconds,
            self.open_at_end,
            t.pings_answered,
            t.disconnects.values().sum::<u64>()
        ));
        if t.inflated > 0 {
            s.push_str(&format!(
                "permessage-deflate: {} messages arrived compressed\n",
                t.inflated
            ));
        }
        if t.sent > 0 {
            s.push_str(&format!(
                "messages: {} sent in {:.1} s ({:.0}/s); deliveries {} of {} ({} lost)\n",
                t.sent,
                self.publish_seconds,
                self.publish_rate_achieved,
                t.received,
                t.expected,
                self.lost
            ));
            s.push_str(&format!(
                "delivery latency: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms ({} samples)\n",
                self.latency.p50_ms,
                self.latency.p99_ms,
                self.latency.p999_ms,
                self.latency.max_ms,
                self.latency.samples
            ));
        }
        if self.ok {
            s.push_str("result: ok\n");
        } else {
            for p in &self.problems {
                s.push_str(&format!("PROBLEM: {p}\n"));
            }
        }
        s
    }
}
