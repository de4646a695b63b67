//! `--fail-if`: pass/fail thresholds on a run's outcome, so a pipeline can gate on a load run
//! (`--fail-if 'p99<50ms' --fail-if 'lost==0' --fail-if 'open_ratio>=0.999'`). Each names a
//! metric of the outcome, a comparison and a value; the run fails (exit 1) when any is not met,
//! and says which, with the value measured. Parsed before the run starts: a threshold that does
//! not parse is bad input (exit 2), and nothing is run.

use serde::Serialize;

use crate::report::Outcome;

/// A metric a threshold can name: what it reads from the outcome, and whether it is a time
/// (milliseconds, written with a unit: `50ms`, `0.5s`, `800us`).
struct Metric {
    name: &'static str,
    time: bool,
    read: fn(&Outcome) -> f64,
}

const METRICS: &[Metric] = &[
    Metric {
        name: "p50",
        time: true,
        read: |o| o.latency.p50_ms,
    },
    Metric {
        name: "p99",
        time: true,
        read: |o| o.latency.p99_ms,
    },
    Metric {
        name: "p999",
        time: true,
        read: |o| o.latency.p999_ms,
    },
    Metric {
        name: "max",
        time: true,
        read: |o| o.latency.max_ms,
    },
    Metric {
        name: "service_p50",
        time: true,
        read: |o| o.service_time.p50_ms,
    },
    Metric {
        name: "service_p99",
        time: true,
        read: |o| o.service_time.p99_ms,
    },
    Metric {
        name: "service_max",
        time: true,
        read: |o| o.service_time.max_ms,
    },
    Metric {
        name: "lag_max",
        time: true,
        read: |o| o.schedule_lag.max_ms,
    },
    Metric {
        name: "connect_p99",
        time: true,
        read: |o| o.connect_time.p99_ms,
    },
    Metric {
        name: "late",
        time: false,
        read: |o| o.schedule_lag.late as f64,
    },
    Metric {
        name: "lost",
        time: false,
        read: |o| o.lost as f64,
    },
    Metric {
        name: "opened",
        time: false,
        read: |o| o.tally.opened as f64,
    },
    Metric {
        name: "open_at_end",
        time: false,
        read: |o| o.open_at_end as f64,
    },
    Metric {
        name: "open_ratio",
        time: false,
        read: |o| o.open_at_end as f64 / o.connections.max(1) as f64,
    },
    Metric {
        name: "connect_errors",
        time: false,
        read: |o| o.tally.connect_errors.values().sum::<u64>() as f64,
    },
    Metric {
        name: "disconnects",
        time: false,
        read: |o| o.tally.disconnects.values().sum::<u64>() as f64,
    },
    Metric {
        name: "server_errors",
        time: false,
        read: |o| o.tally.server_errors as f64,
    },
    Metric {
        name: "sent",
        time: false,
        read: |o| o.tally.sent as f64,
    },
    Metric {
        name: "received",
        time: false,
        read: |o| o.tally.received as f64,
    },
    Metric {
        name: "rate",
        time: false,
        read: |o| o.publish_rate_achieved,
    },
    Metric {
        name: "connects_per_second",
        time: false,
        read: |o| o.connects_per_second,
    },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Op {
    /// Longest first, so `<=` is not read as `<` and `=...`.
    const ALL: [(&'static str, Op); 6] = [
        ("<=", Op::Le),
        (">=", Op::Ge),
        ("==", Op::Eq),
        ("!=", Op::Ne),
        ("<", Op::Lt),
        (">", Op::Gt),
    ];

    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Op::Lt => a < b,
            Op::Le => a <= b,
            Op::Gt => a > b,
            Op::Ge => a >= b,
            Op::Eq => a == b,
            Op::Ne => a != b,
        }
    }
}

/// One parsed `--fail-if`.
#[derive(Debug)]
pub struct Threshold {
    /// As written.
    text: String,
    metric: usize,
    op: Op,
    /// In the metric's unit (milliseconds for times).
    value: f64,
}

/// A threshold checked against a run: in the JSON report, and named in its problems when not
/// met.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Checked {
    pub threshold: String,
    pub metric: String,
    /// What the run measured, in `unit`.
    pub measured: f64,
    /// `ms` for times, empty for counts and ratios.
    pub unit: String,
    pub ok: bool,
}

impl Checked {
    /// The measured value with its unit, for people.
    pub fn shown(&self) -> String {
        if self.unit.is_empty() {
            self.measured.to_string()
        } else {
            format!("{} {}", self.measured, self.unit)
        }
    }
}

impl Threshold {
    /// `METRIC OP VALUE`, spaces allowed around each: `p99<50ms`, `lost == 0`.
    pub fn parse(text: &str) -> Result<Threshold, String> {
        let bad = |why: String| Err(format!("--fail-if {text:?}: {why}"));
        let Some((at, sym, op)) = Op::ALL
            .iter()
            .filter_map(|&(sym, op)| text.find(sym).map(|at| (at, sym, op)))
            .min_by_key(|&(at, sym, _)| (at, std::cmp::Reverse(sym.len())))
        else {
            return bad("expected METRIC OP VALUE with OP one of < <= > >= == !=".into());
        };
        let (name, value) = (text[..at].trim(), text[at + sym.len()..].trim());
        let Some(metric) = METRICS.iter().position(|m| m.name == name) else {
            let names: Vec<&str> = METRICS.iter().map(|m| m.name).collect();
            return bad(format!(
                "unknown metric {name:?}; one of {}",
                names.join(", ")
            ));
        };
        let value = if METRICS[metric].time {
            parse_ms(value)
        } else {
            value.parse::<f64>().ok().filter(|v| v.is_finite())
        };
        let Some(value) = value else {
            let want = if METRICS[metric].time {
                "a time with its unit (50ms, 0.5s, 800us)"
            } else {
                "a number"
            };
            return bad(format!("{name} needs {want}"));
        };
        Ok(Threshold {
            text: text.to_string(),
            metric,
            op,
            value,
        })
    }

    pub fn check(&self, outcome: &Outcome) -> Checked {
        let m = &METRICS[self.metric];
        let measured = (m.read)(outcome);
        Checked {
            threshold: self.text.clone(),
            metric: m.name.to_string(),
            measured,
            unit: if m.time { "ms" } else { "" }.to_string(),
            ok: self.op.holds(measured, self.value),
        }
    }
}

/// `50ms`, `0.5s`, `800us` as milliseconds.
fn parse_ms(v: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    let n: f64 = number.trim().parse().ok()?;
    n.is_finite().then_some(n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome() -> Outcome {
        let mut o = Outcome {
            connections: 1000,
            open_at_end: 999,
            lost: 0,
            ..Outcome::default()
        };
        o.latency.p99_ms = 73.2;
        o
    }

    #[test]
    fn thresholds_parse_compare_and_name_what_failed() {
        let o = outcome();
        let check = |t: &str| Threshold::parse(t).unwrap().check(&o);
        assert!(!check("p99<50ms").ok);
        assert_eq!(check("p99<50ms").measured, 73.2);
        assert!(check("p99 < 0.1s").ok);
        assert!(check("p99<=73.2ms").ok);
        assert!(!check("p99<73200us").ok);
        assert!(check("p99<73201us").ok);
        assert!(check("lost==0").ok);
        assert!(!check("lost!=0").ok);
        assert!(check("open_ratio>=0.999").ok);
        assert!(!check("open_ratio>0.999").ok);
        assert!(!check("open_at_end >= 1000").ok);
        assert_eq!(check("open_ratio>=0.999").metric, "open_ratio");
    }

    #[test]
    fn a_threshold_that_does_not_parse_says_why() {
        for (text, why) in [
            ("p99", "expected METRIC OP VALUE"),
            ("p98<5ms", "unknown metric \"p98\""),
            ("p99<50", "a time with its unit"),
            ("p99<fast", "a time with its unit"),
            ("lost==none", "a number"),
            ("lost==inf", "a number"),
            ("<5", "unknown metric \"\""),
        ] {
            let e = Threshold::parse(text).unwrap_err();
            assert!(e.starts_with(&format!("--fail-if {text:?}: ")), "{e}");
            assert!(e.contains(why), "{text}: {e}");
        }
    }
}
