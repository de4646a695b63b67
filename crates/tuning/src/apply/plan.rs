//! Findings -> plan: which writes apply will make (raise-only), and what it must leave to the
//! host because it cannot be changed from here.

use serde::Serialize;

use crate::preflight::{Finding, Report, Subject, Verdict};
use crate::tunables::{Shape, SysctlKey, Value};

/// One sysctl write.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    #[serde(serialize_with = "display")]
    pub key: SysctlKey,
    #[serde(skip)]
    pub shape: Shape,
    /// Exactly what the kernel printed before (what revert and rollback write back).
    #[serde(skip)]
    pub from_raw: String,
    #[serde(serialize_with = "display")]
    pub from: Value,
    #[serde(serialize_with = "display")]
    pub to: Value,
    /// What the profile asks for: `to` is the smallest raise of `from` that satisfies it, and
    /// apply recomputes `to` from this if the live value moved before it held the lock.
    #[serde(skip)]
    pub wanted: Value,
    pub source: Option<String>,
}

fn display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// A failing check apply cannot fix from here.
#[derive(Clone, Debug, Serialize)]
pub struct Blocked {
    pub id: String,
    pub key: String,
    pub current: Option<String>,
    pub wanted: String,
    pub reason: String,
    pub fix: String,
}

/// The RLIMIT_NOFILE change apply will attempt for this process.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct NofileChange {
    pub soft: u64,
    pub hard: u64,
    pub wanted: u64,
}

/// A profile key this host can set: what `--persist` writes to the drop-in, whether or not
/// this run changes it, so that the drop-in alone makes the host pass after a reboot.
#[derive(Clone, Debug)]
pub struct Persistable {
    pub key: SysctlKey,
    pub shape: Shape,
    pub wanted: Value,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub blocked: Vec<Blocked>,
    pub nofile: Option<NofileChange>,
    #[serde(skip)]
    pub persistable: Vec<Persistable>,
}

impl Plan {
    pub fn from_report(report: &Report) -> Plan {
        let mut plan = Plan::default();
        for f in &report.findings {
            if let Subject::Sysctl {
                key, shape, wanted, ..
            } = &f.subject
                && f.changeable
            {
                plan.persistable.push(Persistable {
                    key: key.clone(),
                    shape: *shape,
                    wanted: wanted.clone(),
                });
            }
            match &f.subject {
                Subject::Sysctl {
                    key,
                    shape,
                    live_raw,
                    live,
                    wanted,
                } if f.verdict == Verdict::Fail && f.changeable => {
                    plan.steps.push(Step {
                        key: key.clone(),
                        shape: *shape,
                        from_raw: live_raw.clone(),
                        from: live.clone(),
                        to: shape.raised(live, wanted),
                        wanted: wanted.clone(),
                        source: f.source.clone(),
                    });
                }
                Subject::Nofile { soft, hard, wanted } => {
                    if (*soft < *wanted || *hard < *wanted) && plan.nofile.is_none() {
                        plan.nofile = Some(NofileChange {
                            soft: *soft,
                            hard: *hard,
                            wanted: *wanted,
                        });
                    }
                    if f.verdict != Verdict::Pass && !f.changeable {
                        plan.blocked.push(blocked(f));
                    }
                }
                _ if f.verdict == Verdict::Fail
                    || f.blocked_by.is_some() && f.verdict != Verdict::Pass =>
                {
                    plan.blocked.push(blocked(f))
                }
                _ => {}
            }
        }
        plan
    }
}

fn blocked(f: &Finding) -> Blocked {
    Blocked {
        id: f.id.clone(),
        key: f.key.clone(),
        current: f.current.clone(),
        wanted: f.wanted.clone(),
        reason: f
            .blocked_by
            .clone()
            .or_else(|| f.detail.clone())
            .unwrap_or_else(|| "needs a change tunegate does not make".into()),
        fix: f.fix.clone(),
    }
}
