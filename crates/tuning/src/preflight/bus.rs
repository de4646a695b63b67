//! The cross-host bus, checked before a server relies on it: the Redis Cluster that
//! `redis://[USER@]HOST:PORT[,HOST:PORT...]` (`rediss://` for TLS) names (its seed nodes) must
//! answer, run Redis 7.0 or later (sharded pub/sub: SSUBSCRIBE/SPUBLISH), be in cluster mode,
//! and have every slot served. One finding, `bus.redis`, with each seed's answer in its detail.

use std::path::Path;

use super::{Finding, Subject, Verdict};
use crate::host::redis::{self, Access, NodeFacts};
use crate::tunables::Scope;

/// Sharded pub/sub arrived in Redis 7.0.
pub const MIN_VERSION: (u32, u32) = (7, 0);

/// A bus to check: its URL, its seeds, and how to reach them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bus {
    pub url: String,
    pub seeds: Vec<String>,
    pub access: Access,
}

impl Bus {
    /// The seeds of a bus URL, or why it is not one (a password in it is refused: it belongs
    /// in a file).
    pub fn parse(url: &str) -> Result<Bus, String> {
        let (rest, tls) = match url.split_once("://") {
            Some(("redis", rest)) => (rest, false),
            Some(("rediss", rest)) => (rest, true),
            _ => {
                return Err(format!(
                    "{url}: expected redis://HOST:PORT[,HOST:PORT...] (or rediss:// for TLS)"
                ));
            }
        };
        let (username, hosts) = match rest.rsplit_once('@') {
            Some((user, _)) if user.is_empty() || user.contains(':') => {
                return Err(format!(
                    "{url}: a user name may come before @, a password may not (give it in a file)"
                ));
            }
            Some((user, hosts)) => (Some(user.to_string()), hosts),
            None => (None, rest),
        };
        let seeds: Vec<String> = hosts
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
        let access = Access {
            tls,
            username,
            ..Access::default()
        };
        Ok(Bus {
            url: url.to_string(),
            seeds,
            access,
        })
    }

    /// The password: the first line of `file`.
    pub fn password_from(mut self, file: &Path) -> Result<Bus, String> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            format!(
                "cannot read the Redis password from {}: {e}",
                file.display()
            )
        })?;
        self.access.password = Some(text.lines().next().unwrap_or("").to_string());
        Ok(self)
    }

    /// With TLS: the CA certificates to trust instead of the system's.
    pub fn ca_file(mut self, file: &Path) -> Bus {
        self.access.ca_file = Some(file.to_path_buf());
        self
    }
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

/// Probes every seed of the bus.
pub fn check(bus: &Bus) -> Finding {
    let (url, seeds) = (&bus.url, &bus.seeds);
    let answers: Vec<(String, Result<NodeFacts, String>)> = seeds
        .iter()
        .map(|s| (s.clone(), redis::probe(s, &bus.access)))
        .collect();
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
        Verdict::Fail => "start a Redis 7 Cluster and name its nodes (docs/deployment.md)".into(),
    };
    let current = good.first().map(|f| {
        format!(
            "Redis {}, cluster ok ({} of {} seeds answered as cluster nodes)",
            f.version,
            good.len(),
            seeds.len()
        )
    });
    finding(url, verdict, current, fix, lines.join("; "))
}

/// A bus that cannot even be tried (its password file unreadable): a failing `bus.redis`.
pub fn unusable(url: &str, why: String) -> Finding {
    let fix = "make the bus's password and CA files readable by tunegate".to_string();
    finding(url, Verdict::Fail, None, fix, why)
}

fn finding(
    url: &str,
    verdict: Verdict,
    current: Option<String>,
    fix: String,
    detail: String,
) -> Finding {
    Finding {
        id: "bus.redis".into(),
        key: url.to_string(),
        current,
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
        detail: Some(detail),
        source: None,
        subject: Subject::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_urls_name_their_seeds_or_say_why_not() {
        let seeds = |url: &str| Bus::parse(url).map(|b| b.seeds);
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
        assert!(seeds("redis://u:pw@x:1").unwrap_err().contains("password"));
        let b = Bus::parse("rediss://relay@x:1").unwrap();
        assert_eq!(b.seeds, ["x:1"]);
        assert!(b.access.tls);
        assert_eq!(b.access.username.as_deref(), Some("relay"));
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
