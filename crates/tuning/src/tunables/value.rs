//! Values of tunables: their shapes, how the kernel prints them, and how two of them compare.
//!
//! The kernel prints multi-field values tab-separated (`4096\t131072\t6291456`) and accepts any
//! whitespace on write, so every comparison happens on parsed values, never on raw text.
//! Each shape carries its own compare rule, and `raised` computes the raise-only target: the
//! smallest change that makes the live value satisfy the wanted one without lowering anything.

use std::fmt;

/// What a tunable's value looks like, which also fixes how it compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// One integer; satisfied when live >= wanted.
    Int { max: u64 },
    /// Several integers (e.g. tcp_rmem min/default/max); satisfied when each live field >=
    /// the wanted one. `ordered` requires the fields to be non-decreasing.
    Fields {
        count: usize,
        max: u64,
        ordered: bool,
    },
    /// A port range `start end`; satisfied when the live range covers the wanted one.
    PortRange,
    /// A set of ports and port ranges (`3000,8000-8010`); satisfied when the live set
    /// includes every wanted port.
    PortSet,
    /// Anything else, compared exactly after whitespace is normalised.
    Text,
}

/// A tunable's value, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Numbers(Vec<u64>),
    Ports(PortSet),
    Text(String),
}

/// A value as it came out of a profile, before it is checked against a shape.
#[derive(Clone, Debug)]
pub enum RawValue {
    /// One or more integers (a YAML integer or a YAML list of integers).
    Ints(Vec<i128>),
    /// A YAML string.
    Text(String),
}

impl Shape {
    /// The compare rule in words, for reports and documentation.
    pub fn rule(&self) -> &'static str {
        match self {
            Shape::Int { .. } => "at least",
            Shape::Fields { .. } => "each field at least",
            Shape::PortRange => "range covers",
            Shape::PortSet => "includes",
            Shape::Text => "exactly",
        }
    }

    /// Checks a profile's value against this shape. The message names the problem; the caller
    /// adds file, line and key.
    pub fn from_profile(&self, raw: &RawValue) -> Result<Value, String> {
        match (self, raw) {
            (Shape::Text, RawValue::Ints(n)) => Ok(Value::Text(
                n.iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
            )),
            (Shape::Text, RawValue::Text(t)) => {
                let norm = normalise(t);
                if norm.is_empty() {
                    return Err("value is empty".into());
                }
                Ok(Value::Text(norm))
            }
            (Shape::PortSet, RawValue::Text(t)) => PortSet::parse(t).map(Value::Ports),
            (Shape::PortSet, RawValue::Ints(n)) => {
                let mut set = PortSet::default();
                for v in n {
                    let p = port(*v)?;
                    set.insert(p, p);
                }
                Ok(Value::Ports(set))
            }
            (_, RawValue::Text(t)) => {
                let mut fields = Vec::new();
                for word in t.split_whitespace() {
                    let v: i128 = word
                        .parse()
                        .map_err(|_| format!("{word:?} is not a whole number"))?;
                    fields.push(v);
                }
                self.check_numbers(&fields)
            }
            (_, RawValue::Ints(n)) => self.check_numbers(n),
        }
    }

    fn check_numbers(&self, fields: &[i128]) -> Result<Value, String> {
        let (count, max) = match *self {
            Shape::Int { max } => (1, max),
            Shape::Fields { count, max, .. } => (count, max),
            Shape::PortRange => (2, 65535),
            Shape::PortSet | Shape::Text => unreachable!("handled by from_profile"),
        };
        if fields.len() != count {
            return Err(match count {
                1 => format!("expected one number, got {}", fields.len()),
                n => format!("expected {n} numbers, got {}", fields.len()),
            });
        }
        let min = if *self == Shape::PortRange { 1 } else { 0 };
        let mut out = Vec::with_capacity(count);
        for &v in fields {
            if v < min as i128 || v > max as i128 {
                return Err(format!("{v} is out of range (allowed {min}..={max})"));
            }
            out.push(v as u64);
        }
        match *self {
            Shape::PortRange if out[0] > out[1] => {
                return Err(format!(
                    "port range start {} is greater than its end {}",
                    out[0], out[1]
                ));
            }
            Shape::Fields { ordered: true, .. } if out.windows(2).any(|w| w[0] > w[1]) => {
                return Err(format!(
                    "fields must not decrease (min <= default <= max), got {}",
                    join(&out)
                ));
            }
            _ => {}
        }
        Ok(Value::Numbers(out))
    }

    /// Parses what the kernel printed for a tunable of this shape.
    pub fn parse_live(&self, text: &str) -> Result<Value, String> {
        match self {
            Shape::Text => Ok(Value::Text(normalise(text))),
            Shape::PortSet => PortSet::parse(text).map(Value::Ports),
            _ => {
                let fields = text
                    .split_whitespace()
                    .map(|w| {
                        w.parse::<u64>()
                            .map_err(|_| format!("kernel printed {w:?}, not a number"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let want = match self {
                    Shape::Int { .. } => 1,
                    Shape::Fields { count, .. } => *count,
                    _ => 2,
                };
                if fields.len() != want {
                    return Err(format!(
                        "kernel printed {} fields ({:?}), expected {want}",
                        fields.len(),
                        normalise(text)
                    ));
                }
                Ok(Value::Numbers(fields))
            }
        }
    }

    /// Whether the live value already satisfies the wanted one under this shape's rule.
    pub fn satisfied(&self, live: &Value, wanted: &Value) -> bool {
        match (self, live, wanted) {
            (Shape::PortRange, Value::Numbers(l), Value::Numbers(w)) => {
                l[0] <= w[0] && l[1] >= w[1]
            }
            (Shape::Int { .. } | Shape::Fields { .. }, Value::Numbers(l), Value::Numbers(w)) => {
                l.len() == w.len() && l.iter().zip(w).all(|(a, b)| a >= b)
            }
            (Shape::PortSet, Value::Ports(l), Value::Ports(w)) => l.includes(w),
            _ => live == wanted,
        }
    }

    /// The raise-only target: satisfies `wanted` and never lowers anything `live` has.
    /// For exact (unknown) keys a single live integer above a single wanted one is kept, since
    /// lowering an operator's higher value is never ours to do.
    pub fn raised(&self, live: &Value, wanted: &Value) -> Value {
        match (self, live, wanted) {
            (Shape::PortRange, Value::Numbers(l), Value::Numbers(w)) => {
                Value::Numbers(vec![l[0].min(w[0]), l[1].max(w[1])])
            }
            (Shape::Int { .. } | Shape::Fields { .. }, Value::Numbers(l), Value::Numbers(w))
                if l.len() == w.len() =>
            {
                Value::Numbers(l.iter().zip(w).map(|(a, b)| *a.max(b)).collect())
            }
            (Shape::PortSet, Value::Ports(l), Value::Ports(w)) => Value::Ports(l.union(w)),
            (Shape::Text, Value::Text(l), Value::Text(w)) => {
                match (l.parse::<i128>(), w.parse::<i128>()) {
                    (Ok(a), Ok(b)) if a > b => live.clone(),
                    _ => wanted.clone(),
                }
            }
            _ => wanted.clone(),
        }
    }
}

impl fmt::Display for Value {
    /// Space-separated, which the kernel accepts on write and people read easily.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Numbers(n) => f.write_str(&join(n)),
            Value::Ports(p) => write!(f, "{p}"),
            Value::Text(t) => f.write_str(t),
        }
    }
}

/// Collapses every run of whitespace (the kernel's tabs, trailing newline) into one space.
pub fn normalise(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn join(n: &[u64]) -> String {
    n.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
}

fn port(v: i128) -> Result<u16, String> {
    if (1..=65535).contains(&v) {
        Ok(v as u16)
    } else {
        Err(format!("{v} is not a port (allowed 1..=65535)"))
    }
}

/// A set of TCP ports kept as sorted, merged, inclusive ranges, printed the way the kernel
/// prints `ip_local_reserved_ports`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortSet {
    ranges: Vec<(u16, u16)>,
}

impl PortSet {
    /// Parses `3000,6379,8000-8010` (empty means no ports), as the kernel reads and prints it.
    pub fn parse(text: &str) -> Result<PortSet, String> {
        let mut set = PortSet::default();
        let text = normalise(text);
        if text.is_empty() {
            return Ok(set);
        }
        for part in text.split(',') {
            let part = part.trim();
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (part, part),
            };
            let parse = |s: &str| -> Result<u16, String> {
                let v: i128 = s
                    .parse()
                    .map_err(|_| format!("{s:?} is not a port number"))?;
                port(v)
            };
            let (lo, hi) = (parse(a)?, parse(b)?);
            if lo > hi {
                return Err(format!("port range {lo}-{hi} runs backwards"));
            }
            set.insert(lo, hi);
        }
        Ok(set)
    }

    /// Adds the inclusive range `lo..=hi`, merging with neighbours.
    pub fn insert(&mut self, lo: u16, hi: u16) {
        self.ranges.push((lo, hi));
        self.ranges.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(self.ranges.len());
        for &(a, b) in &self.ranges {
            match merged.last_mut() {
                Some(last) if a as u32 <= last.1 as u32 + 1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        self.ranges = merged;
    }

    pub fn contains(&self, port: u16) -> bool {
        self.ranges.iter().any(|&(a, b)| a <= port && port <= b)
    }

    pub fn includes(&self, other: &PortSet) -> bool {
        other
            .ranges
            .iter()
            .all(|&(a, b)| self.ranges.iter().any(|&(x, y)| x <= a && b <= y))
    }

    pub fn union(&self, other: &PortSet) -> PortSet {
        let mut out = self.clone();
        for &(a, b) in &other.ranges {
            out.insert(a, b);
        }
        out
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .ranges
            .iter()
            .map(|&(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRIPLE: Shape = Shape::Fields {
        count: 3,
        max: i32::MAX as u64,
        ordered: true,
    };

    #[test]
    fn kernel_tabs_compare_equal_to_profile_spaces() {
        let live = TRIPLE.parse_live("4096\t131072\t6291456\n").unwrap();
        let want = TRIPLE
            .from_profile(&RawValue::Text("4096 131072  6291456".into()))
            .unwrap();
        assert_eq!(live, want);
        assert!(TRIPLE.satisfied(&live, &want));
        assert_eq!(live.to_string(), "4096 131072 6291456");
    }

    #[test]
    fn fields_compare_one_by_one_and_raise_without_lowering() {
        let live = TRIPLE.parse_live("4096 131072 33554432").unwrap();
        let want = TRIPLE.parse_live("4096 262144 16777216").unwrap();
        assert!(!TRIPLE.satisfied(&live, &want));
        assert_eq!(
            TRIPLE.raised(&live, &want),
            Value::Numbers(vec![4096, 262144, 33554432])
        );
    }

    #[test]
    fn port_range_covers_and_widens() {
        let s = Shape::PortRange;
        let live = s.parse_live("32768\t60999").unwrap();
        let want = s
            .from_profile(&RawValue::Text("1024 65535".into()))
            .unwrap();
        assert!(!s.satisfied(&live, &want));
        assert_eq!(s.raised(&live, &want).to_string(), "1024 65535");
        let narrow = s.from_profile(&RawValue::Ints(vec![40000, 50000])).unwrap();
        assert!(s.satisfied(&live, &narrow));
        assert_eq!(s.raised(&live, &narrow), live);
    }

    #[test]
    fn bad_profile_numbers_are_refused_with_reasons() {
        let s = Shape::PortRange;
        let e = s
            .from_profile(&RawValue::Text("65535 1024".into()))
            .unwrap_err();
        assert!(e.contains("greater than its end"), "{e}");
        assert!(s.from_profile(&RawValue::Ints(vec![0, 10])).is_err());
        assert!(s.from_profile(&RawValue::Ints(vec![1, 70000])).is_err());
        let int = Shape::Int {
            max: i32::MAX as u64,
        };
        assert!(int.from_profile(&RawValue::Text("lots".into())).is_err());
        assert!(int.from_profile(&RawValue::Ints(vec![-1])).is_err());
        assert!(
            int.from_profile(&RawValue::Ints(vec![i32::MAX as i128 + 1]))
                .unwrap_err()
                .contains("out of range")
        );
        assert!(int.from_profile(&RawValue::Ints(vec![1, 2])).is_err());
        assert!(
            TRIPLE
                .from_profile(&RawValue::Text("4096 1 2".into()))
                .is_err()
        );
    }

    #[test]
    fn port_sets_merge_include_and_print_like_the_kernel() {
        let a = PortSet::parse("3000,6379,8000-8010").unwrap();
        let b = PortSet::parse("8005, 3001").unwrap();
        let u = a.union(&b);
        assert_eq!(u.to_string(), "3000-3001,6379,8000-8010");
        assert!(u.includes(&a) && u.includes(&b));
        assert!(!a.includes(&b));
        assert!(PortSet::parse("").unwrap().includes(&PortSet::default()));
        assert!(PortSet::parse("10-5").is_err());
        assert!(PortSet::parse("x").is_err());
        assert!(u.contains(6379) && !u.contains(6380));
    }

    #[test]
    fn exact_keys_are_never_lowered() {
        let live = Value::Text("60".into());
        let want = Value::Text("30".into());
        assert_eq!(Shape::Text.raised(&live, &want), live);
        assert!(!Shape::Text.satisfied(&live, &want));
        let up = Value::Text("90".into());
        assert_eq!(Shape::Text.raised(&live, &up), up);
    }
}
