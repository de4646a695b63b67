//! What a load run measured: each process's `Tally`, merged into one `Outcome`, printed for
//! people or as JSON (docs/load.md lists every field).

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::thresholds::{Checked, Threshold};

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
    /// Of those, the rooms whose last count was never answered (a server or a load too busy
    /// to answer within the check, rather than a member missing).
    #[serde(default)]
    pub rooms_unanswered: u64,
    pub sent: u64,
    /// Deliveries the sent messages should make: each to every other member of its room.
    pub expected: u64,
    pub received: u64,
    pub pings_answered: u64,
    /// Connections closed and opened again by `--churn` (back in their rooms).
    #[serde(default)]
    pub churned: u64,
    /// Messages that arrived compressed (permessage-deflate, with --deflate).
    #[serde(default)]
    pub inflated: u64,
    /// Histogram buckets (µs, count), carried from a shard to the coordinator only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connect_us: Vec<(u64, u64)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency_us: Vec<(u64, u64)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_us: Vec<(u64, u64)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lag_us: Vec<(u64, u64)>,
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
        self.rooms_unanswered += o.rooms_unanswered;
        self.sent += o.sent;
        self.expected += o.expected;
        self.received += o.received;
        self.pings_answered += o.pings_answered;
        self.churned += o.churned;
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

/// A message counts as sent late when its publisher wrote it this long after its scheduled
/// time (the timer alone makes up to about 1 ms; anything past 10 ms is the load falling
/// behind).
pub const LATE_US: u64 = 10_000;

/// How far the publishers fell behind their schedule: from each message's scheduled time to
/// the moment its connection wrote it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Lag {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Messages written more than `LATE_US` after their scheduled time.
    pub late: u64,
}

impl Lag {
    pub fn of(h: &Histogram<u64>) -> Lag {
        let p = Percentiles::of(h);
        Lag {
            p50_ms: p.p50_ms,
            p99_ms: p.p99_ms,
            max_ms: p.max_ms,
            late: h.count_between(LATE_US + 1, u64::MAX),
        }
    }
}

/// A histogram of microseconds in HdrHistogram's percentile-distribution text (`.hgrm`: what
/// its `HistogramLogProcessor` writes and its plotter reads), in milliseconds, five ticks per
/// half distance to 100 %.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let ms = |us: f64| us / 1000.0;
    let mut out = format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let value = ms(v.value_iterated_to() as f64);
        if q < 1.0 {
            out.push_str(&format!(
                "{value:12.3} {q:2.12} {total:10} {:14.2}\n",
                1.0 / (1.0 - q)
            ));
        } else {
            out.push_str(&format!("{value:12.3} {q:2.12} {total:10}\n"));
        }
    }
    let sub_buckets = (2.0 * 10f64.powi(i32::from(h.sigfig())))
        .log2()
        .ceil()
        .exp2() as u64;
    out.push_str(&format!(
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]\n",
        ms(h.mean()),
        ms(h.stdev())
    ));
    out.push_str(&format!(
        "#[Max     = {:12.3}, Total count    = {:12}]\n",
        ms(h.max() as f64),
        h.len()
    ));
    out.push_str(&format!(
        "#[Buckets = {:12}, SubBuckets     = {:12}]\n",
        h.buckets(),
        sub_buckets
    ));
    out
}

/// The JSON report's schema identifier; bumped on an incompatible change.
pub const LOAD_SCHEMA: &str = "tunegate.load/1";

/// The whole run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Outcome {
    pub schema: String,
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
    /// Delivery latency from each message's scheduled send time (as wrk2 measures: a publisher
    /// that fell behind its schedule does not hide the wait).
    pub latency: Percentiles,
    /// Delivery latency from the moment the message was actually written (the service time).
    pub service_time: Percentiles,
    pub schedule_lag: Lag,
    /// Deliveries missing after the drain (expected - received, if positive).
    pub lost: u64,
    /// Every `--fail-if`, with what the run measured.
    pub thresholds: Vec<Checked>,
    /// True when every connection opened, none dropped, every message arrived and every
    /// threshold held.
    pub ok: bool,
    pub problems: Vec<String>,
}

impl Outcome {
    pub fn judge(&mut self, thresholds: &[Threshold]) {
        self.schema = LOAD_SCHEMA.to_string();
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
                "{} of {} rooms checked never counted their planned members ({} of them unanswered)",
                t.rooms_short, t.rooms_checked, t.rooms_unanswered
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
        self.problems = p;
        self.thresholds = thresholds.iter().map(|t| t.check(self)).collect();
        for c in self.thresholds.iter().filter(|c| !c.ok) {
            self.problems.push(format!(
                "--fail-if {:?} not met: {} was {}",
                c.threshold,
                c.metric,
                c.shown()
            ));
        }
        self.ok = self.problems.is_empty();
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
        if t.churned > 0 {
            s.push_str(&format!(
                "churn: {} connections closed and opened again during the hold\n",
                t.churned
            ));
        }
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
                "delivery latency from the scheduled send: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms ({} samples)\n",
                self.latency.p50_ms,
                self.latency.p99_ms,
                self.latency.p999_ms,
                self.latency.max_ms,
                self.latency.samples
            ));
            s.push_str(&format!(
                "service time from the actual send: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms\n",
                self.service_time.p50_ms,
                self.service_time.p99_ms,
                self.service_time.p999_ms,
                self.service_time.max_ms
            ));
            s.push_str(&format!(
                "publishers behind schedule: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; {} of {} messages sent more than {} ms late\n",
                self.schedule_lag.p50_ms,
                self.schedule_lag.p99_ms,
                self.schedule_lag.max_ms,
                self.schedule_lag.late,
                t.sent,
                LATE_US / 1000
            ));
        }
        for c in &self.thresholds {
            s.push_str(&format!(
                "threshold {:?}: {} ({} {})\n",
                c.threshold,
                if c.ok { "met" } else { "NOT met" },
                c.metric,
                c.shown()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The `.hgrm` text as HdrHistogram's plotter reads it: a header, one line per percentile
    /// step with the cumulative count (the last at 100 % without the 1/(1-p) column), and the
    /// summary lines; values in milliseconds.
    #[test]
    fn hgrm_is_the_percentile_distribution_hdrhistogram_writes() {
        let mut h = histogram();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap(); // 1 to 1,000 ms
        }
        let text = hgrm(&h);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
        );
        assert_eq!(lines[1], "");
        let rows: Vec<Vec<&str>> = lines[2..]
            .iter()
            .take_while(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows[0][..3], ["1.000", "0.000000000000", "1"]);
        let last = rows.last().unwrap();
        assert_eq!(last.len(), 3, "{last:?}");
        assert_eq!(last[1], "1.000000000000");
        assert_eq!(last[2], "1000");
        let at = |p: f64| {
            let row = rows
                .iter()
                .find(|r| r[1].parse::<f64>().unwrap() >= p)
                .unwrap();
            row[0].parse::<f64>().unwrap()
        };
        assert!((495.0..=505.0).contains(&at(0.5)), "{text}");
        let counts: Vec<u64> = rows.iter().map(|r| r[2].parse().unwrap()).collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "cumulative");
        // The maximum as HdrHistogram reports it: the top of its bucket (3 digits).
        assert!(
            text.contains("#[Max     =     1000.447, Total count    =         1000]"),
            "{text}"
        );
        assert!(text.ends_with("#[Buckets =           22, SubBuckets     =         2048]\n"));
    }
}
