//! The cross-host bus, checked before a server relies on it: the Redis Cluster that
//! `redis://HOST:PORT[,HOST:PORT...]` names (its seed nodes) must answer, run Redis 7.0 or later
//! (sharded pub/sub: SSUBSCRIBE/SPUBLISH), be in cluster mode, and have every slot served. One
//! finding, `bus.redis`, with each seed's answer in its detail.

use super::{Finding, Subject, Verdict};
use crate::host::redis::{self, NodeFacts};
use crate::tunables::Scope;

/// Sharded pub/sub arrived in Redis 7.0.
pub const MIN_VERSION: (u32, u32) = (7, 0);

/// The seed nodes of a bus URL, or why it is not one.
pub fn seeds(url: &str) -> Result<Vec<String>, String> {
    let rest = match url.split_once("://") {
        Some(("redis", rest)) => rest,
        Some(("rediss", _)) => {
            return Err(format!(
                "{url}: rediss:// (TLS) is not checked by this preflight yet; check the plain port"
            ));
        }
        _ => return Err(format!("{url}: expected redis://HOST:PORT[,HOST:PORT...]")),
    };
    let seeds: Vec<String> = rest
        .trim_end_matches('/')
        .split(',')
        .map(str::to_string)
        .collect();
    for s in &seeds {
        let ok = s
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !ok {
            return Err(format!("{url}: {s:?} is not HOST:PORT"));
        }
    }
    Ok(seeds)
}

/// What is wrong with one node's answer for a sharded pub/sub bus, if anything.
fn fault(f: &NodeFacts) -> Option<String> {
    let mut v = f.version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    if version < MIN_VERSION {
        return Some(format!(
            "Redis {} has no sharded pub/sub (needs {}.{} or later)",
            f.version, MIN_VERSION.0, MIN_VERSION.1
        ));
    }
    if !f.cluster_enabled {
        return Some("not in cluster mode (cluster_enabled:0)".into());
    }
    match f.cluster_state.as_deref() {
        Some("ok") => None,
        state => Some(format!(
            "cluster_state:{} ({} of 16384 slots served)",
            state.unwrap_or("?"),
            f.slots_ok.unwrap_or(0)
        )),
    }
}

/// Probes every seed of `url` (already validated by `seeds`).
pub fn check(url: &str, seeds: &[String]) -> Finding {
    let answers: Vec<(String, Result<NodeFacts, String>)> =
        seeds.iter().map(|s| (s.clone(), redis::probe(s))).collect();
    let mut lines = Vec::new();
    let (mut good, mut bad) = (Vec::new(), 0);
    for (seed, answer) in &answers {
        match answer {
            Ok(f) => match fault(f) {
                None => {
                    lines.push(format!(
                        "{seed}: Redis {}, cluster ok, {} nodes",
                        f.version,
                        f.known_nodes.unwrap_or(0)
                    ));
                    good.push(f);
                }
                Some(why) => {
                    bad += 1;
                    lines.push(format!("{seed}: {why}"));
                }
            },
            Err(why) => {
                bad += 1;
                lines.push(format!("{seed}: {why}"));
            }
        }
    }
    let verdict = match (good.len(), bad) {
        (0, _) => Verdict::Fail,
        (_, 0) => Verdict::Pass,
        _ => Verdict::Warn,
    };
    let fix = match verdict {
        Verdict::Pass => "nothing to do".to_string(),
        Verdict::Warn => "fix or drop the seeds that did not answer as a cluster node".into(),
        Verdict::Fail => "start a Redis 7 Cluster and name its nodes (docs/daemon.md)".into(),
    };
    Finding {
        id: "bus.redis".into(),
        key: url.into(),
        current: good.first().map(|f| {
            format!(
                "Redis {}, cluster ok ({} of {} seeds answered as cluster nodes)",
                f.version,
                good.len(),
                seeds.len()
            )
        }),
        wanted: format!(
            "Redis {}.{} or later in cluster mode, every slot served",
            MIN_VERSION.0, MIN_VERSION.1
        ),
        rule: "reachable and whole".into(),
        verdict,
        scope: Scope::Service,
        changeable: false,
        blocked_by: None,
        why: "Hosts reach each other's rooms through Redis Cluster sharded pub/sub: a room's \
              messages go only to the servers subscribed to its channel."
            .into(),
        fix,
        detail: Some(lines.join("; ")),
        source: None,
        subject: Subject::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_urls_name_their_seeds_or_say_why_not() {
        assert_eq!(
            seeds("redis://127.0.0.1:7000,127.0.0.1:7001/").unwrap(),
            ["127.0.0.1:7000", "127.0.0.1:7001"]
        );
        assert!(
            seeds("http://x:1")
                .unwrap_err()
                .contains("expected redis://")
        );
        assert!(
            seeds("redis://x")
                .unwrap_err()
                .contains("\"x\" is not HOST:PORT")
        );
        assert!(seeds("redis://x:0").is_err());
        assert!(seeds("rediss://x:1").unwrap_err().contains("TLS"));
    }

    #[test]
    fn a_node_must_be_7_0_in_cluster_mode_with_every_slot_served() {
        let ok = NodeFacts {
            version: "7.0.15".into(),
            cluster_enabled: true,
            cluster_state: Some("ok".into()),
            slots_ok: Some(16384),
            known_nodes: Some(6),
        };
        assert_eq!(fault(&ok), None);
        let old = NodeFacts {
            version: "6.2.14".into(),
            ..ok.clone()
        };
        assert!(fault(&old).unwrap().contains("no sharded pub/sub"));
        let single = NodeFacts {
            cluster_enabled: false,
            ..ok.clone()
        };
        assert!(fault(&single).unwrap().contains("cluster_enabled:0"));
        let broken = NodeFacts {
            cluster_state: Some("fail".into()),
            slots_ok: Some(10923),
            ..ok
        };
        assert_eq!(
            fault(&broken).unwrap(),
            "cluster_state:fail (10923 of 16384 slots served)"
        );
    }
}
