//! The one table a worker's bus keeps under its lock (`Peers`): the links, every worker's
//! counter snapshots, and the room directory: the rooms homed on this worker with each
//! worker's member count, and for rooms homed elsewhere the holders their homes named.

use std::sync::Arc;

use super::link::Link;
use super::wire::{Wire, encode};
use crate::config::MAX_WORKERS;
use crate::metrics::History;
use crate::names::NameMap;

/// A worker's number in the room directory: one byte, as there are at most 256 workers. A
/// worker among many holds one member of most rooms, so each byte here counts.
pub(super) type Worker = u8;
const _: () = assert!(MAX_WORKERS <= Worker::MAX as usize + 1);

/// A worker's number from the wire or the table, if it names one of `workers`.
pub(super) fn worker_no(w: impl TryInto<Worker>, workers: usize) -> Option<Worker> {
    w.try_into().ok().filter(|&w| usize::from(w) < workers)
}

/// The workers holding members of a room homed here, and how many each.
pub(super) type Counts = smallvec::SmallVec<[(Worker, u32); 2]>;

/// What this worker knows about its peers; one lock, so a count can never be applied from, or
/// a message routed to, a link that has been replaced.
pub(super) struct Peers {
    pub(super) links: Vec<Option<Link>>,
    /// Each worker's last few snapshots, this one's too; once a peer's link is gone, their
    /// counters alone (kept so the whole server's sums never go down when a worker dies),
    /// until its successor reports.
    pub(super) metrics: Vec<History>,
    /// Whether `metrics[w]` came over the current link to `w`.
    pub(super) reported: Vec<bool>,
    /// Rooms this worker is home to: the members each worker (this one too) holds, only
    /// workers with members listed; up to two inline (with room affinity every member of a
    /// room is on its home, so the home alone: no allocation per room).
    pub(super) homed: NameMap<Counts>,
    /// Rooms homed elsewhere that this worker holds members of: the workers holding members,
    /// as the home last said; keyed by the name the local bus keeps (`LocalBus::shared_name`).
    pub(super) holders: NameMap<Box<[Worker]>>,
    pub(super) generations: u64,
}

impl Peers {
    pub(super) fn new(workers: usize) -> Peers {
        Peers {
            links: (0..workers).map(|_| None).collect(),
            metrics: (0..workers).map(|_| History::default()).collect(),
            reported: vec![false; workers],
            homed: NameMap::default(),
            holders: NameMap::default(),
            generations: 0,
        }
    }

    /// Whether link `generation` is still the live link to `worker`.
    pub(super) fn is_current(&self, worker: usize, generation: u64) -> bool {
        self.links[worker]
            .as_ref()
            .is_some_and(|l| l.generation == generation)
    }

    /// The link to `worker` is gone: its members stop counting in the rooms homed here (the
    /// holders of each are told). The sets of holders that homes elsewhere sent are left as
    /// they are: they say what those homes know (a publish skips a worker without a link),
    /// and a home tells them anew when it loses the worker. (Dropping it here lost a worker
    /// for good when the link to it was replaced after the home had said it holds members.)
    pub(super) fn forget(&mut self, worker: usize, me: usize) {
        self.links[worker] = None;
        self.metrics[worker].keep_counters_only();
        self.reported[worker] = false;
        let changed: Vec<Arc<str>> = self
            .homed
            .iter()
            .filter(|(_, per)| per.iter().any(|&(w, _)| usize::from(w) == worker))
            .map(|(room, _)| room.clone())
            .collect();
        for room in changed {
            self.set_count(&room, worker, 0);
            self.tell_holders(&room, me);
        }
    }

    /// At a room's home: `worker` now holds `count` members. Whether the set of holders changed.
    pub(super) fn set_count(&mut self, room: &Arc<str>, worker: usize, count: u64) -> bool {
        let Some(w) = worker_no(worker, self.links.len()) else {
            return false;
        };
        // A worker's members of one room are far below 2^32 (its descriptors are).
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        let per = self.homed.entry(room.clone()).or_default();
        let at = per.iter().position(|&(x, _)| x == w);
        let changed = match (at, count) {
            (Some(i), 0) => {
                per.swap_remove(i);
                true
            }
            (Some(i), c) => {
                per[i].1 = c;
                false
            }
            (None, 0) => false,
            (None, c) => {
                per.push((w, c));
                true
            }
        };
        if per.is_empty() {
            self.homed.remove(room);
        } else if per.capacity() > 2 * per.len() + 4 {
            per.shrink_to_fit();
        }
        changed
    }

    /// At a room's home: tells every other holder of `room` who holds members now.
    pub(super) fn tell_holders(&self, room: &str, me: usize) {
        let Some(per) = self.homed.get(room) else {
            return;
        };
        let workers: Vec<u32> = per.iter().map(|&(w, _)| u32::from(w)).collect();
        let bytes = encode(&Wire::Holders {
            room: room.to_string(),
            workers: workers.clone(),
        });
        for w in workers {
            if w as usize != me
                && let Some(link) = &self.links[w as usize]
            {
                link.send(bytes.clone());
            }
        }
    }

    /// At a room's home: its members on the whole server.
    pub(super) fn homed_members(&self, room: &str) -> u64 {
        self.homed
            .get(room)
            .map_or(0, |per| per.iter().map(|&(_, c)| u64::from(c)).sum())
    }
}

/// The worker that is home to `room` among `workers`: FNV-1a of the name, the same in every
/// process (a keyed hash would differ between them).
pub(super) fn home_of(room: &str, workers: usize) -> usize {
    (fnv1a(room) % workers as u64) as usize
}

/// The loop of `room`'s home worker (among its `loops`) that its members are handed to
/// (`Bus::place`): the hash's next digit, so the loops of a worker share its rooms evenly.
pub(super) fn home_loop_of(room: &str, workers: usize, loops: usize) -> usize {
    (fnv1a(room) / workers as u64 % loops.max(1) as u64) as usize
}

fn fnv1a(room: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in room.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A room homed here costs its name and these counts in the map's bucket, no more: two
    /// holders fit inline in what a `Vec` header took.
    #[test]
    fn a_rooms_counts_fit_in_a_vec_header() {
        assert_eq!(
            std::mem::size_of::<Counts>(),
            std::mem::size_of::<Vec<u8>>()
        );
        let mut c = Counts::new();
        c.extend([(0, 10), (1, 1)]);
        assert!(!c.spilled(), "two holders inline");
    }

    /// Every process must pick the same home for a room: a fixed hash, not a keyed one.
    #[test]
    fn a_room_has_the_same_home_in_every_process_and_homes_spread() {
        assert_eq!(home_of("", 51), (0xcbf2_9ce4_8422_2325u64 % 51) as usize);
        assert_eq!(home_of("all", 3), home_of(&String::from("all"), 3));
        let mut per = [0u32; 51];
        for i in 0..51_000 {
            per[home_of(&format!("s10-{i}"), 51)] += 1;
        }
        // Each of 51 workers is home to its share of rooms named as the load names them.
        assert!(per.iter().all(|&n| (700..1_300).contains(&n)), "{per:?}");
    }

    /// The home's table changes the set of holders only when a worker gains its first member
    /// or loses its last, and a worker whose link ends stops counting.
    #[test]
    fn the_home_counts_per_worker_and_says_when_the_holders_change() {
        let mut p = Peers::new(4);
        let room: Arc<str> = Arc::from("call");
        assert!(p.set_count(&room, 1, 1));
        assert!(!p.set_count(&room, 1, 5));
        assert!(p.set_count(&room, 3, 2));
        assert!(!p.set_count(&room, 2, 0));
        assert_eq!(p.homed_members("call"), 7);
        p.forget(1, 0);
        assert_eq!(p.homed_members("call"), 2);
        assert!(p.set_count(&room, 3, 0));
        assert!(p.homed.is_empty(), "an empty room is no longer kept");
        // A holder's view is its home's: a link replaced here changes nothing in it.
        p.holders
            .insert(Arc::from("elsewhere"), vec![0, 2, 3].into());
        p.forget(2, 0);
        assert_eq!(&*p.holders["elsewhere"], &[0, 2, 3]);
    }
}
