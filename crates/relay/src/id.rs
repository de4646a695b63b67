//! Connection ids: what a client is called by itself (`hello`) and by everyone who sends to it.
//!
//! An id must never name two connections, not even across a crash or across hosts: a signaling
//! relay that hands a dead peer's id to a newcomer delivers offers, answers and chat lines to a
//! stranger. Ids are 53 bits (exact in JavaScript numbers) and need no coordination per
//! connection:
//!
//! ```text
//!  52    45 44         33 32       24 23  19 18                0
//! | node   | incarnation | generation | loop | slot              |
//! | 8 bits |   12 bits   |   9 bits   |5 bits|  19 bits          |
//! ```
//!
//! - **node**: which host of the service. 0 on a server without a cross-host bus; with the
//!   Redis bus, `--node N` or a number derived from the host's name and address and claimed in
//!   Redis at start (`redis_bus/claim.rs`), so two hosts never share one.
//! - **incarnation**: which start of which server process on that host. `tunegate run` hands
//!   every worker it starts the next number of a counter it keeps in its state directory
//!   (`incarnation.rs` in the daemon), so a restarted worker, or a restarted daemon, never
//!   repeats a number until 4,096 starts later. A `tunegate serve` started by hand takes the
//!   wall clock's next whole second (waiting for it, so the previous run, which handed out ids
//!   only after its own second began, cannot have the same one): unique while the clock does
//!   not step back and restarts are less than 4,096 s (68 min) apart.
//! - **loop / slot**: where the connection lives in that process: an index, so a lookup is one
//!   array access and no map is needed.
//! - **generation**: how often that slot has been used. Slots are reused first-in first-out,
//!   and only while at least [`REUSE_DISTANCE`] other slots wait free, so an id comes back only
//!   after its slot has been used [`GENERATIONS`] more times, which takes at least
//!   512 x 8,192 = 4,194,304 connections closed on that loop.

/// Bits of each field, low to high.
pub const SLOT_BITS: u32 = 19;
pub const LOOP_BITS: u32 = 5;
pub const GENERATION_BITS: u32 = 9;
pub const INCARNATION_BITS: u32 = 12;
pub const NODE_BITS: u32 = 8;
/// Every id is below 2^53.
pub const ID_BITS: u32 = SLOT_BITS + LOOP_BITS + GENERATION_BITS + INCARNATION_BITS + NODE_BITS;
/// Where the process (node and incarnation) starts in an id.
const PROCESS_SHIFT: u32 = GENERATION_BITS + LOOP_BITS + SLOT_BITS;

/// Connections one event loop can hold.
pub const MAX_SLOTS: usize = 1 << SLOT_BITS;
/// Event loops one process can have.
pub const MAX_LOOPS: usize = 1 << LOOP_BITS;
/// How many times a slot is used before its ids repeat.
pub const GENERATIONS: u16 = 1 << GENERATION_BITS;
/// Incarnations before the numbers of one host repeat.
pub const INCARNATIONS: u32 = 1 << INCARNATION_BITS;
/// Hosts one service can have.
pub const NODES: u32 = 1 << NODE_BITS;
/// A freed slot is handed out again only after this many others were freed after it.
pub const REUSE_DISTANCE: usize = 8192;

const _: () = assert!(ID_BITS == 53);

/// Which process handed an id out: its host's node and its incarnation there. Unique among
/// the live processes of a service; the unit the buses route direct messages by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProcessId {
    pub node: u8,
    /// Below [`INCARNATIONS`].
    pub incarnation: u16,
}

impl ProcessId {
    /// A process of node `node`; the incarnation is taken modulo [`INCARNATIONS`].
    pub fn new(node: u8, incarnation: u16) -> ProcessId {
        ProcessId {
            node,
            incarnation: incarnation % INCARNATIONS as u16,
        }
    }

    /// The process that handed out `id` (`None` above 2^53).
    pub fn of(id: u64) -> Option<ProcessId> {
        ConnId::decode(id).map(|c| c.process)
    }
}

impl std::fmt::Display for ProcessId {
    /// `node.incarnation`, as in logs and Redis channel names.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.node, self.incarnation)
    }
}

/// A connection id taken apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnId {
    pub process: ProcessId,
    pub generation: u16,
    pub loop_index: usize,
    pub slot: usize,
}

impl ConnId {
    pub fn encode(self) -> u64 {
        debug_assert!(self.generation < GENERATIONS && self.loop_index < MAX_LOOPS);
        debug_assert!(self.slot < MAX_SLOTS);
        debug_assert!(u32::from(self.process.incarnation) < INCARNATIONS);
        let process =
            (self.process.node as u64) << INCARNATION_BITS | self.process.incarnation as u64;
        process << PROCESS_SHIFT
            | (self.generation as u64) << (LOOP_BITS + SLOT_BITS)
            | (self.loop_index as u64) << SLOT_BITS
            | self.slot as u64
    }

    /// `None` for a number no server ever hands out (2^53 and above).
    pub fn decode(id: u64) -> Option<ConnId> {
        if id >> ID_BITS != 0 {
            return None;
        }
        let process = id >> PROCESS_SHIFT;
        Some(ConnId {
            process: ProcessId {
                node: (process >> INCARNATION_BITS) as u8,
                incarnation: (process & (INCARNATIONS as u64 - 1)) as u16,
            },
            generation: ((id >> (LOOP_BITS + SLOT_BITS)) & (GENERATIONS as u64 - 1)) as u16,
            loop_index: ((id >> SLOT_BITS) & (MAX_LOOPS as u64 - 1)) as usize,
            slot: (id & (MAX_SLOTS as u64 - 1)) as usize,
        })
    }
}

/// The generation a slot gets when the connection holding it closes.
pub fn next_generation(generation: u16) -> u16 {
    (generation + 1) % GENERATIONS
}

/// The incarnation of a `tunegate serve` started without `--incarnation`: the wall clock's next
/// whole second (mod 2^12), after waiting for that second to begin. The previous run of the same
/// server handed out ids only after its own second had begun and died before this one started,
/// so this one's second is later: the numbers differ unless the clock stepped back, or a
/// multiple of 2^12 seconds (68 min) passed between the two starts.
pub fn incarnation_from_clock() -> u16 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let next = since_epoch.as_secs() + 1;
    std::thread::sleep(std::time::Duration::from_secs(next) - since_epoch);
    (next % INCARNATIONS as u64) as u16
}

/// The free slots of one event loop's slab, first-in first-out, never handing one back out
/// while fewer than [`REUSE_DISTANCE`] others wait behind it (the slab grows instead). That
/// distance is what bounds how soon an id can repeat (see the module docs); it costs at most
/// `REUSE_DISTANCE` idle slab entries (32 bytes each) per loop.
#[derive(Debug, Default)]
pub struct FreeSlots {
    queue: std::collections::VecDeque<u32>,
}

impl FreeSlots {
    /// A slot to reuse, or `None` when the slab should grow.
    pub fn take(&mut self) -> Option<usize> {
        if self.queue.len() > REUSE_DISTANCE {
            self.queue.pop_front().map(|s| s as usize)
        } else {
            None
        }
    }

    /// A slot whose connection has closed.
    pub fn put(&mut self, slot: usize) {
        self.queue.push_back(slot as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_stay_below_2_pow_53() {
        let max = ConnId {
            process: ProcessId {
                node: u8::MAX,
                incarnation: INCARNATIONS as u16 - 1,
            },
            generation: GENERATIONS - 1,
            loop_index: MAX_LOOPS - 1,
            slot: MAX_SLOTS - 1,
        };
        assert_eq!(max.encode(), (1 << 53) - 1);
        for id in [
            max,
            ConnId {
                process: ProcessId::new(3, 7),
                generation: 3,
                loop_index: 1,
                slot: 12345,
            },
            ConnId {
                process: ProcessId::default(),
                generation: 0,
                loop_index: 0,
                slot: 0,
            },
        ] {
            assert_eq!(ConnId::decode(id.encode()), Some(id));
        }
        assert_eq!(ConnId::decode(1 << 53), None);
        assert_eq!(ConnId::decode(u64::MAX), None);
        // The documented example (docs/protocol.md): node 3, incarnation 5, loop 1, slot 2,
        // first use.
        assert_eq!(
            ConnId {
                process: ProcessId::new(3, 5),
                generation: 0,
                loop_index: 1,
                slot: 2
            }
            .encode(),
            3 * (1 << 45) + 5 * (1 << 33) + (1 << 19) + 2
        );
        assert_eq!(ProcessId::new(3, 4096 + 5), ProcessId::new(3, 5));
        assert_eq!(ProcessId::new(3, 5).to_string(), "3.5");
    }

    #[test]
    fn generations_wrap_within_their_bits() {
        assert_eq!(next_generation(0), 1);
        assert_eq!(next_generation(GENERATIONS - 1), 0);
    }

    /// The property the id bound rests on: between two uses of a slot, at least
    /// REUSE_DISTANCE other connections closed on that loop, however the loop churns.
    #[test]
    fn a_freed_slot_waits_until_reuse_distance_others_were_freed_after_it() {
        let mut free = FreeSlots::default();
        let mut slab = 0usize;
        let mut open: std::collections::VecDeque<usize> = Default::default();
        // When each slot was last freed, counted in frees.
        let mut freed_at: Vec<Option<u64>> = Vec::new();
        let mut frees = 0u64;
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..200_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            // Mostly churn at a small, steady population (the worst case for reuse).
            if open.len() < 50 || (rng.is_multiple_of(2) && open.len() < 60) {
                let slot = free.take().unwrap_or_else(|| {
                    slab += 1;
                    freed_at.push(None);
                    slab - 1
                });
                if let Some(at) = freed_at[slot] {
                    assert!(
                        frees - at >= REUSE_DISTANCE as u64,
                        "slot {slot} reused early"
                    );
                }
                open.push_back(slot);
            } else {
                let i = (rng >> 32) as usize % open.len();
                let slot = open.remove(i).unwrap();
                free.put(slot);
                frees += 1;
                freed_at[slot] = Some(frees);
            }
        }
        assert!(slab <= 60 + REUSE_DISTANCE + 1, "the slab grew to {slab}");
    }
}
