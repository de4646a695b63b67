//! Who connects from where and joins which room: a pure function of the connection's global
//! index, so every load process computes the same plan without talking to the others.

use std::net::Ipv4Addr;

/// Room sizes by share of the connections, e.g. "2:50,10:40,100:10".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spread {
    /// (room size, connections in rooms of that size)
    buckets: Vec<(u64, u64)>,
}

impl Spread {
    /// Parses "SIZE" or "SIZE:PERCENT,..." for `n` connections. Percentages must add up to
    /// 100; the last bucket takes the rounding remainder.
    pub fn parse(text: &str, n: u64) -> Result<Spread, String> {
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        let mut sized = Vec::new();
        for part in &parts {
            let (size, pct) = match part.split_once(':') {
                Some((s, p)) => (s, p),
                None if parts.len() == 1 => (*part, "100"),
                None => return Err(format!("--rooms: {part:?} needs SIZE:PERCENT in a spread")),
            };
            let size: u64 =
                size.parse().ok().filter(|&s| s >= 1).ok_or_else(|| {
                    format!("--rooms: room size {size:?} is not a whole number >= 1")
                })?;
            let pct: f64 = pct
                .parse()
                .ok()
                .filter(|p: &f64| *p > 0.0 && *p <= 100.0)
                .ok_or_else(|| format!("--rooms: percentage {pct:?} is not in (0, 100]"))?;
            sized.push((size, pct));
        }
        let total: f64 = sized.iter().map(|s| s.1).sum();
        if (total - 100.0).abs() > 0.01 {
            return Err(format!("--rooms: percentages add up to {total}, not 100"));
        }
        let mut buckets = Vec::new();
        let mut given = 0;
        for (i, (size, pct)) in sized.iter().enumerate() {
            let count = if i + 1 == sized.len() {
                n - given
            } else {
                ((n as f64) * pct / 100.0).round() as u64
            }
            .min(n - given);
            given += count;
            buckets.push((*size, count));
        }
        Ok(Spread { buckets })
    }

    /// The room of connection `index` and how many members it has.
    pub fn room_of(&self, index: u64) -> (String, u64) {
        let mut start = 0;
        for &(size, count) in &self.buckets {
            if index < start + count {
                let offset = index - start;
                let room_start = offset / size * size;
                let members = size.min(count - room_start);
                return (format!("s{size}-{}", offset / size), members);
            }
            start += count;
        }
        unreachable!("index {index} beyond the plan")
    }
}

/// The source address of connection `index`: `base` for the first `per_source`, then the next.
pub fn source_of(base: Ipv4Addr, per_source: u64, index: u64) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base).wrapping_add((index / per_source.max(1)) as u32))
}

/// Shard `i` of `k` takes this range of global indices.
pub fn shard_range(n: u64, i: u64, k: u64) -> std::ops::Range<u64> {
    (n * i / k)..(n * (i + 1) / k)
}

/// `--stages 30s:10000,60s:100000,30s:0`: the connections the run holds over time, as k6's
/// stages: each stage moves linearly from the target before it (0 at the start) to its own
/// over its duration.
#[derive(Clone, Debug, PartialEq)]
pub struct Stages(Vec<(std::time::Duration, u64)>);

impl Stages {
    pub fn parse(text: &str) -> Result<Stages, String> {
        let mut stages = Vec::new();
        for part in text.split(',').map(str::trim) {
            let bad = |why: &str| Err(format!("--stages: {part:?}: {why}"));
            let Some((length, target)) = part.split_once(':') else {
                return bad("expected DURATION:CONNECTIONS (30s:10000)");
            };
            let Some(length) = duration(length.trim()) else {
                return bad("the duration needs a unit: 500ms, 30s, 2m, 1h");
            };
            let Ok(target) = target.trim().parse::<u64>() else {
                return bad("the target is a whole number of connections");
            };
            stages.push((length, target));
        }
        if stages.iter().all(|&(_, t)| t == 0) {
            return Err(format!("--stages {text:?}: no stage holds a connection"));
        }
        Ok(Stages(stages))
    }

    /// The most connections any stage holds: the run's connection count.
    pub fn peak(&self) -> u64 {
        self.0.iter().map(|&(_, t)| t).max().unwrap_or(0)
    }

    /// The last stage's target: what is held when the stages end.
    pub fn last(&self) -> u64 {
        self.0.last().map_or(0, |&(_, t)| t)
    }

    pub fn length(&self) -> std::time::Duration {
        self.0.iter().map(|&(d, _)| d).sum()
    }

    /// How many connections the run holds `at` into the stages (rounded down while rising, up
    /// while falling, so a stage's own target is reached exactly at its end).
    pub fn target_at(&self, at: std::time::Duration) -> u64 {
        let (mut from, mut start) = (0u64, std::time::Duration::ZERO);
        for &(length, to) in &self.0 {
            if at < start + length {
                let f = (at - start).as_secs_f64() / length.as_secs_f64();
                let v = from as f64 + (to as f64 - from as f64) * f;
                return if to >= from { v.floor() } else { v.ceil() } as u64;
            }
            (from, start) = (to, start + length);
        }
        from
    }
}

/// `500ms`, `30s`, `2m`, `1h` (fractions allowed).
fn duration(text: &str) -> Option<std::time::Duration> {
    let (number, scale) = [("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)]
        .iter()
        .find_map(|&(unit, scale)| Some((text.strip_suffix(unit)?, scale)))?;
    let n: f64 = number.parse().ok()?;
    (n.is_finite() && n >= 0.0).then(|| std::time::Duration::from_secs_f64(n * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_move_linearly_from_one_target_to_the_next() {
        use std::time::Duration;
        let s = Stages::parse("30s:10000, 60s:100000,30s:0").unwrap();
        assert_eq!(
            (s.peak(), s.last(), s.length()),
            (100_000, 0, Duration::from_secs(120))
        );
        let at = |secs: f64| s.target_at(Duration::from_secs_f64(secs));
        assert_eq!(at(0.0), 0);
        assert_eq!(at(15.0), 5_000);
        assert_eq!(at(30.0), 10_000);
        assert_eq!(at(60.0), 55_000);
        assert_eq!(at(89.999), 99_998);
        assert_eq!(at(90.0), 100_000);
        assert_eq!(at(105.0), 50_000);
        assert_eq!(
            at(119.9999),
            1,
            "rounded up while falling: the last leaves at the end"
        );
        assert_eq!(at(500.0), 0);
        let hold = Stages::parse("500ms:10,2m:10").unwrap();
        assert_eq!(hold.target_at(Duration::from_secs(60)), 10);
        for (text, why) in [
            ("30s", "DURATION:CONNECTIONS"),
            ("30:100", "needs a unit"),
            ("30s:-1", "whole number"),
            ("10s:0", "no stage holds"),
        ] {
            let e = Stages::parse(text).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn spreads_cover_every_connection_once() {
        let s = Spread::parse("2:50,10:40,100:10", 1000).unwrap();
        assert_eq!(s.room_of(0), ("s2-0".into(), 2));
        assert_eq!(s.room_of(499), ("s2-249".into(), 2));
        assert_eq!(s.room_of(500), ("s10-0".into(), 10));
        assert_eq!(s.room_of(999), ("s100-0".into(), 100));
        // A remainder room is smaller, and says so.
        let s = Spread::parse("3", 10).unwrap();
        assert_eq!(s.room_of(9), ("s3-3".into(), 1));
        let members: u64 = (0..10).filter(|&i| s.room_of(i).0 == "s3-1").count() as u64;
        assert_eq!(members, s.room_of(4).1);
        assert!(
            Spread::parse("2:50,10:40", 10)
                .unwrap_err()
                .contains("add up")
        );
        assert!(Spread::parse("0", 10).is_err());
        assert!(Spread::parse("2,3", 10).is_err());
    }

    #[test]
    fn sources_and_shards() {
        let base = Ipv4Addr::new(127, 0, 0, 2);
        assert_eq!(source_of(base, 100, 99), base);
        assert_eq!(source_of(base, 100, 100), Ipv4Addr::new(127, 0, 0, 3));
        assert_eq!(source_of(base, 100, 100 * 254), Ipv4Addr::new(127, 0, 1, 0));
        let ranges: Vec<_> = (0..3).map(|i| shard_range(10, i, 3)).collect();
        assert_eq!(ranges, vec![0..3, 3..6, 6..10]);
    }
}
