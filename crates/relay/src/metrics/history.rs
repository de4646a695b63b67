//! What /metrics sums with several workers: each worker's last few counter snapshots, and the
//! rule that makes every worker pick the same one of each (`History::settled`).

use super::Snapshot;

/// How old a worker's snapshot must be before /metrics sums it: longer than the bus takes to
/// carry a snapshot to every worker, so that at any moment every worker holds the same newest
/// settled snapshot of each worker and answers with the same sums. Counters are thus 1 s plus
/// at most one publish interval behind (1 to 1.5 s up to 22 workers), and never lower than an
/// earlier scrape saw, whichever worker answers.
pub const SETTLED_MS: u64 = 1_000;

/// Snapshots the bus carries per second at most, all workers together. Every worker sends each
/// snapshot to every other, W x (W - 1) a round: at 57 workers a round every half second was
/// 6,400 messages a second and as many wake-ups of the bus threads, a fifth of a core while a
/// million connections' heartbeats changed the counters all the time.
const SNAPSHOTS_PER_SECOND: u64 = 1_000;

/// How often a worker shares its counters: every half second up to 22 workers, less often
/// beyond, so that the bus carries at most [`SNAPSHOTS_PER_SECOND`] (57 workers: every 3.2 s).
/// /metrics is then at most SETTLED_MS plus one interval behind.
pub fn publish_interval_ms(workers: usize) -> u64 {
    let w = workers as u64;
    (w * w.saturating_sub(1) * 1000 / SNAPSHOTS_PER_SECOND).max(500)
}

/// [`Snapshot::sent_ms`] of counters that will not change any more (a process that is gone).
const FINAL: u64 = 0;

/// Snapshots kept per worker: published every half second or less often, so a few cover
/// SETTLED_MS with room for a publisher or a reader delayed by a loaded CPU.
const KEPT: usize = 6;

/// The last few snapshots of one worker, oldest first, each counter at least the one before.
#[derive(Debug, Default)]
pub struct History {
    kept: std::collections::VecDeque<Snapshot>,
    /// The process whose counters file began this history, while that is all it holds.
    seeded_by: Option<u32>,
}

impl History {
    /// Begins the history with counters a process left in its file: final (settled at once),
    /// as a process that is gone reaches no further. A process still running replaces them
    /// with its own snapshots when it first reports ([`History::push`]).
    pub fn seed(&mut self, mut counters: Snapshot) {
        if self.kept.is_empty() {
            counters.sent_ms = FINAL;
            self.seeded_by = Some(counters.pid);
            self.kept.push_back(counters);
        }
    }

    pub fn push(&mut self, mut snap: Snapshot) {
        if self.seeded_by.take() == Some(snap.pid) {
            // Its own history (sent on link-up) says the same as every other worker's copy.
            self.kept.clear();
        }
        if let Some(last) = self.kept.back() {
            // A restarted worker may start from a carried figure a little behind the last one
            // seen of its predecessor: its counters as seen here never go down.
            snap.max_counters(last);
            snap.sent_ms = snap.sent_ms.max(last.sent_ms);
        }
        self.kept.push_back(snap);
        if self.kept.len() > KEPT {
            self.kept.pop_front();
        }
    }

    /// The newest snapshot sent at least SETTLED_MS before `now_ms`; none while none is that
    /// old (a worker that has just started without a predecessor: it counts from then on).
    pub fn settled(&self, now_ms: u64) -> Option<&Snapshot> {
        self.kept
            .iter()
            .rev()
            .find(|s| s.sent_ms == FINAL || s.sent_ms.saturating_add(SETTLED_MS) <= now_ms)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Snapshot> {
        self.kept.iter()
    }

    /// The worker is gone: only its counters stay (its gauges no longer hold anything), and
    /// its last snapshot is final, settled at once: its successor starts from the counters it
    /// left in its file, written as that snapshot was shared.
    pub fn keep_counters_only(&mut self) {
        for s in &mut self.kept {
            *s = s.counters();
            s.sent_ms = FINAL;
        }
    }
}

/// Milliseconds on CLOCK_MONOTONIC, the time base of [`Snapshot::sent_ms`].
pub fn monotonic_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(accepted: u64, sent_ms: u64) -> Snapshot {
        Snapshot {
            accepted,
            open: accepted as i64,
            sent_ms,
            ..Snapshot::default()
        }
    }

    /// Half a second while the bus carries little; beyond that, never more than the budget of
    /// snapshots a second, however many workers.
    #[test]
    fn the_publish_interval_keeps_the_bus_within_its_budget() {
        assert_eq!(publish_interval_ms(1), 500);
        assert_eq!(publish_interval_ms(6), 500);
        assert_eq!(publish_interval_ms(22), 500);
        assert_eq!(publish_interval_ms(57), 3_192);
        for w in 1..200u64 {
            let per_second = (w * (w - 1)) as f64 * 1000.0 / publish_interval_ms(w as usize) as f64;
            assert!(
                per_second <= SNAPSHOTS_PER_SECOND as f64 + 0.5,
                "{w} workers: {per_second}/s"
            );
            assert!(KEPT as u64 * publish_interval_ms(w as usize) > SETTLED_MS);
        }
    }

    /// Two workers, one of which has not yet read the newest snapshot: both pick the same one
    /// (the bug this replaced: the publisher summed its own newest, a peer the one before).
    #[test]
    fn workers_that_received_different_amounts_pick_the_same_settled_snapshot() {
        let (mut ahead, mut behind) = (History::default(), History::default());
        for (i, t) in [0, 500, 1_000, 1_500].into_iter().enumerate() {
            ahead.push(snap(10 * i as u64, t));
            if t < 1_500 {
                behind.push(snap(10 * i as u64, t));
            }
        }
        for now in [1_600, 2_000, 2_400] {
            assert_eq!(
                ahead.settled(now).unwrap().accepted,
                behind.settled(now).unwrap().accepted,
                "at {now}"
            );
        }
        assert_eq!(ahead.settled(2_499).unwrap().accepted, 20);
        assert_eq!(ahead.settled(2_500).unwrap().accepted, 30);
    }

    #[test]
    fn a_new_worker_counts_once_settled_and_its_counters_never_go_down() {
        let mut h = History::default();
        assert!(h.settled(5).is_none());
        h.push(snap(7, 100));
        assert!(h.settled(1_099).is_none());
        assert_eq!(h.settled(1_100).unwrap().accepted, 7);
        // A successor starting from a carried figure a little behind.
        h.push(snap(5, 600));
        assert_eq!(h.settled(1_700).unwrap().accepted, 7);
        h.keep_counters_only();
        assert_eq!(h.settled(700).unwrap().open, 0);
        assert_eq!(h.settled(700).unwrap().accepted, 7);
        for i in 0..20 {
            h.push(snap(8 + i, 1_000 + 500 * i));
        }
        assert_eq!(h.kept.len(), KEPT);
    }

    /// A successor's own history and its peers' copy of it agree from the start: both begin
    /// from the predecessor's final counters; a live process's file is replaced by its own.
    #[test]
    fn seeds_are_final_and_give_way_to_the_process_that_wrote_them() {
        let mut successor_own = History::default();
        successor_own.seed(Snapshot {
            pid: 1,
            ..snap(40, 9_800)
        });
        // Its own counters are what it counted plus what it carries.
        successor_own.push(Snapshot {
            pid: 2,
            ..snap(3 + 40, 10_000)
        });
        let mut peers_copy = History::default();
        peers_copy.push(Snapshot {
            pid: 1,
            ..snap(40, 9_800)
        });
        peers_copy.keep_counters_only();
        peers_copy.push(Snapshot {
            pid: 2,
            ..snap(43, 10_000)
        });
        for now in [10_100, 10_900, 11_000, 11_600] {
            assert_eq!(
                successor_own.settled(now).unwrap().accepted,
                peers_copy.settled(now).unwrap().accepted,
                "at {now}"
            );
        }
        let mut live = History::default();
        live.seed(Snapshot {
            pid: 5,
            ..snap(90, 9_000)
        });
        for (a, t) in [(60, 7_500), (80, 8_500), (90, 9_000)] {
            live.push(Snapshot {
                pid: 5,
                ..snap(a, t)
            });
        }
        assert_eq!(live.settled(9_600).unwrap().accepted, 80);
    }
}
