//! The run second by second, for `--out DIR/timeseries.csv`: connections open, messages sent,
//! deliveries, and the latency percentiles of that second's deliveries. Built by the first
//! process from its shards' progress events (every 250 ms, each with the latency histogram of
//! the deliveries since the one before), so a stall, a ramp or a slow phase shows where in the
//! run it happened, which whole-run percentiles hide.
//!
//! One histogram is kept, the current second's: a second's row is final once an event of a
//! later second arrives (an HDR histogram of this range is ~360 KiB; one per second of a long
//! run would not be).

use std::time::Instant;

use hdrhistogram::Histogram;

use crate::report;

/// One second of the run.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Seconds since the run started: this row covers [second, second + 1).
    pub second: u64,
    /// Open at the end of the second.
    pub open: u64,
    /// Messages sent and deliveries received during the second.
    pub sent: u64,
    pub delivered: u64,
    /// Latency from the schedule of the second's deliveries, in ms (`None`: none arrived).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

pub struct TimeSeries {
    start: Instant,
    rows: Vec<Row>,
    current: Histogram<u64>,
    /// Totals at the end of the last finished row: (sent, delivered).
    before: (u64, u64),
    /// Totals at the last event: (open, sent, delivered).
    now: (u64, u64, u64),
}

impl TimeSeries {
    pub fn new(start: Instant) -> TimeSeries {
        TimeSeries {
            start,
            rows: Vec::new(),
            current: report::histogram(),
            before: (0, 0),
            now: (0, 0, 0),
        }
    }

    /// A progress event at `at`: the run's totals after it (open, sent, delivered) and the
    /// latency buckets of the deliveries it reports.
    pub fn event(&mut self, at: Instant, totals: (u64, u64, u64), latency_us: &[(u64, u64)]) {
        let second = at.saturating_duration_since(self.start).as_secs();
        while (self.rows.len() as u64) < second {
            self.finish_row();
        }
        for &(v, c) in latency_us {
            let _ = self.current.record_n(v, c);
        }
        self.now = totals;
    }

    /// Closes the current second with the totals of the last event.
    fn finish_row(&mut self) {
        let (open, sent, delivered) = self.now;
        let ms = |q: f64| {
            (!self.current.is_empty()).then(|| self.current.value_at_quantile(q) as f64 / 1000.0)
        };
        self.rows.push(Row {
            second: self.rows.len() as u64,
            open,
            sent: sent.saturating_sub(self.before.0),
            delivered: delivered.saturating_sub(self.before.1),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
        });
        self.before = (sent, delivered);
        self.current.reset();
    }

    /// Every second up to `end` (the last one partial), as CSV with a header line.
    pub fn csv(mut self, end: Instant) -> String {
        let last = end.saturating_duration_since(self.start).as_secs();
        while self.rows.len() as u64 <= last {
            self.finish_row();
        }
        let mut out = String::from("second,open,sent,delivered,p50_ms,p99_ms\n");
        let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.3}"));
        for r in &self.rows {
            out.push_str(&format!(
                "{},{},{},{},{},{}\n",
                r.second,
                r.open,
                r.sent,
                r.delivered,
                opt(r.p50_ms),
                opt(r.p99_ms)
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rows_hold_each_seconds_counts_and_percentiles() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut ts = TimeSeries::new(t0);
        ts.event(at(250), (10, 0, 0), &[]);
        ts.event(at(1_250), (20, 5, 40), &[(1_000, 40)]);
        ts.event(at(1_750), (20, 10, 90), &[(3_000, 50)]);
        // Nothing for a whole second (a stall): its row repeats the totals, with no latency.
        ts.event(at(3_100), (19, 12, 100), &[(2_000_000, 10)]);
        let csv = ts.csv(at(3_500));
        // Values are the top of their HDR bucket (3 digits: 3,000 us reads 3.001 ms).
        assert_eq!(
            csv,
            "second,open,sent,delivered,p50_ms,p99_ms\n\
             0,10,0,0,,\n\
             1,20,10,90,3.001,3.001\n\
             2,20,0,0,,\n\
             3,19,2,10,2000.895,2000.895\n"
        );
    }
}
