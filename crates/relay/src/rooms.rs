//! Rooms held by one event loop: which of its connections are members of which room.
//!
//! Membership lives on the room side, so a connection pays nothing per room beyond its own
//! short list of room ids; leaving is O(1) whatever the room's size. The table is sized for a
//! worker among many: with 51 workers, a room of 10 has about one member on each, so most rooms
//! here hold a single member. Such a room costs its 40-byte entry, its name (shared with the
//! bus, which keeps the same `Arc`) and a 4-byte id in the index. With room affinity
//! (`?affinity=ROOM`) a room's members all live on its home instead, ten of a room of ten in
//! one table: up to [`FEW`] members are kept in a vector grown four at a time (48 bytes for
//! ten, where a hash set took 160 with its box), a set only beyond.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use hashbrown::HashTable;
use rustc_hash::FxHashSet;

/// A room's index in this loop's table.
pub type RoomId = u32;

struct Room {
    name: Arc<str>,
    members: Members,
}

/// A room's members here: one inline, a few in a vector (scanning 16 slots costs less than
/// hashing, and each takes 4 bytes), a set for more.
enum Members {
    One(u32),
    Few(Vec<u32>),
    Many(Box<FxHashSet<u32>>),
}

/// The most members kept in a vector; a set from one more, a vector again at half of it.
pub const FEW: usize = 16;

impl Members {
    /// Adds `slot`; whether it is new here.
    fn insert(&mut self, slot: u32) -> bool {
        match self {
            Members::One(only) if *only == slot => false,
            Members::One(only) => {
                let mut few = Vec::with_capacity(4);
                few.extend([*only, slot]);
                *self = Members::Few(few);
                true
            }
            Members::Few(few) if few.contains(&slot) => false,
            Members::Few(few) if few.len() < FEW => {
                if few.len() == few.capacity() {
                    few.reserve_exact(4);
                }
                few.push(slot);
                true
            }
            Members::Few(few) => {
                let set: FxHashSet<u32> = few.iter().copied().chain([slot]).collect();
                *self = Members::Many(Box::new(set));
                true
            }
            Members::Many(set) => set.insert(slot),
        }
    }

    /// Removes `slot`; whether it was here. A room left with one member keeps it inline.
    fn remove(&mut self, slot: u32) -> bool {
        let removed = match self {
            Members::One(only) => return *only == slot,
            Members::Few(few) => match few.iter().position(|&m| m == slot) {
                Some(i) => {
                    few.swap_remove(i);
                    if few.capacity() >= few.len() + 8 {
                        few.shrink_to(few.len() + 4);
                    }
                    true
                }
                None => false,
            },
            Members::Many(set) => {
                let removed = set.remove(&slot);
                if set.len() <= FEW / 2 {
                    *self = Members::Few(set.iter().copied().collect());
                } else if set.capacity() > 4 * set.len() + 16 {
                    set.shrink_to_fit();
                }
                removed
            }
        };
        if let Members::Few(few) = self
            && let [only] = few[..]
        {
            *self = Members::One(only);
        }
        removed
    }
}

/// The rooms, by id, and an index from name to id: ids only, hashed by the name they point at
/// with a hasher keyed per process (`names.rs` says why room names need one).
#[derive(Default)]
pub struct Rooms {
    index: HashTable<RoomId>,
    hasher: RandomState,
    rooms: Vec<Option<Room>>,
    free: Vec<RoomId>,
}

impl Rooms {
    pub fn lookup(&self, name: &str) -> Option<RoomId> {
        let hash = self.hasher.hash_one(name);
        self.index
            .find(hash, |&id| &*self.room(id).name == name)
            .copied()
    }

    pub fn name(&self, id: RoomId) -> &Arc<str> {
        &self.room(id).name
    }

    fn room(&self, id: RoomId) -> &Room {
        self.rooms[id as usize].as_ref().expect("live room id")
    }

    /// Adds `slot` to the room, creating it. Returns the room and whether `slot` is new there.
    pub fn join(&mut self, name: &str, slot: u32) -> (RoomId, bool) {
        let Some(id) = self.lookup(name) else {
            let room = Room {
                name: Arc::from(name),
                members: Members::One(slot),
            };
            let id = match self.free.pop() {
                Some(id) => {
                    self.rooms[id as usize] = Some(room);
                    id
                }
                None => {
                    self.rooms.push(Some(room));
                    (self.rooms.len() - 1) as RoomId
                }
            };
            let (hasher, rooms) = (&self.hasher, &self.rooms);
            let name_of = |id: &RoomId| &*rooms[*id as usize].as_ref().expect("live room id").name;
            self.index
                .insert_unique(hasher.hash_one(name), id, |id| hasher.hash_one(name_of(id)));
            return (id, true);
        };
        let room = self.rooms[id as usize].as_mut().expect("live room id");
        (id, room.members.insert(slot))
    }

    /// Removes `slot`; a room left empty is forgotten. Returns whether `slot` was a member.
    pub fn leave(&mut self, id: RoomId, slot: u32) -> bool {
        let room = self.rooms[id as usize].as_mut().expect("live room id");
        let empty = matches!(room.members, Members::One(only) if only == slot);
        let removed = room.members.remove(slot);
        if empty {
            let room = self.rooms[id as usize].take().expect("live room id");
            let hash = self.hasher.hash_one(&*room.name);
            self.index
                .find_entry(hash, |&other| other == id)
                .expect("an indexed room")
                .remove();
            self.free.push(id);
        }
        removed
    }

    /// Members of a room, copied into `out` (so the caller can write to them while iterating).
    pub fn members_into(&self, id: RoomId, out: &mut Vec<u32>) {
        out.clear();
        match &self.room(id).members {
            Members::One(only) => out.push(*only),
            Members::Few(few) => out.extend_from_slice(few),
            Members::Many(set) => out.extend(set.iter().copied()),
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a room costs in the table: its entry, whichever way its members are kept.
    #[test]
    fn a_room_entry_is_40_bytes() {
        assert_eq!(std::mem::size_of::<Option<Room>>(), 40);
    }

    /// A room's members cross from inline to a vector to a set and back as it grows and shrinks.
    #[test]
    fn members_change_form_with_the_room_size() {
        let mut m = Members::One(0);
        let form = |m: &Members| match m {
            Members::One(_) => "one",
            Members::Few(_) => "few",
            Members::Many(_) => "many",
        };
        for slot in 1..FEW as u32 {
            assert!(m.insert(slot));
            assert_eq!(form(&m), "few", "{slot}");
        }
        assert!(!m.insert(3));
        assert!(m.insert(FEW as u32));
        assert_eq!(form(&m), "many");
        for slot in (FEW / 2..=FEW).rev() {
            assert!(m.remove(slot as u32));
        }
        assert_eq!(form(&m), "few", "back at half");
        for slot in 1..FEW / 2 {
            assert!(m.remove(slot as u32));
        }
        assert!(!m.remove(1));
        assert_eq!(form(&m), "one");
        assert!(m.remove(0));
    }

    #[test]
    fn join_leave_and_reuse() {
        let mut r = Rooms::default();
        let (a, new) = r.join("a", 1);
        assert!(new);
        assert!(!r.join("a", 1).1);
        r.join("a", 2);
        let mut m = Vec::new();
        r.members_into(a, &mut m);
        m.sort();
        assert_eq!(m, [1, 2]);
        assert!(r.leave(a, 1));
        assert!(r.leave(a, 2));
        assert!(r.lookup("a").is_none() && r.is_empty());
        let (b, _) = r.join("b", 3);
        assert_eq!(a, b, "freed ids are reused");
        assert_eq!(&**r.name(b), "b");
    }

    /// The table against a plain map of sets, over any sequence of joins and leaves: a room's
    /// members go from one inline to a vector to a set and back, ids are reused, and the index
    /// finds exactly the rooms with members.
    #[test]
    fn the_table_agrees_with_a_map_of_sets() {
        use proptest::prelude::*;
        use std::collections::{BTreeMap, BTreeSet};
        // Joins twice as likely as leaves, 3 rooms and 40 slots: rooms cross FEW both ways.
        let ops = proptest::collection::vec((0u8..3, 0u8..3, 0u32..40), 0..400).prop_map(|ops| {
            ops.into_iter()
                .map(|(j, r, s)| (j > 0, r, s))
                .collect::<Vec<_>>()
        });
        proptest!(|(ops in ops)| {
            let mut r = Rooms::default();
            let mut model: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
            for (join, room, slot) in ops {
                let name = format!("room-{room}");
                if join {
                    let (id, added) = r.join(&name, slot);
                    prop_assert_eq!(added, model.entry(name.clone()).or_default().insert(slot));
                    prop_assert_eq!(&**r.name(id), name.as_str());
                } else if let Some(id) = r.lookup(&name) {
                    let set = model.get_mut(&name).expect("modelled");
                    prop_assert_eq!(r.leave(id, slot), set.remove(&slot));
                    if set.is_empty() {
                        model.remove(&name);
                    }
                } else {
                    prop_assert!(!model.contains_key(&name));
                }
                prop_assert_eq!(r.len(), model.len());
                for (name, set) in &model {
                    let id = r.lookup(name).expect("a room with members is indexed");
                    let mut m = Vec::new();
                    r.members_into(id, &mut m);
                    m.sort();
                    prop_assert_eq!(m, set.iter().copied().collect::<Vec<_>>());
                }
            }
        });
    }

    /// Names built to collide under the hasher rooms used before (FxHash) join as fast as
    /// ordinary ones. The same names in an FxHash map show what they are built for: there every
    /// insert walks all earlier ones. The bounds are loose, for a machine shared with other tests:
    /// the quadratic case is hundreds of times slower, the keyed one within noise.
    #[test]
    fn adversarial_room_names_join_as_fast_as_ordinary_ones() {
        let n = 8_000;
        let evil = crate::names::adversarial::names(n);
        let plain: Vec<String> = (0..n).map(|i| format!("room-{i:027}")).collect();
        let rooms = |names: &[String]| {
            let mut r = Rooms::default();
            let t = std::time::Instant::now();
            for (i, name) in names.iter().enumerate() {
                r.join(name, i as u32);
            }
            assert_eq!(r.len(), names.len());
            t.elapsed()
        };
        let fx = |names: &[String]| {
            let mut m: rustc_hash::FxHashMap<Arc<str>, u32> = Default::default();
            let t = std::time::Instant::now();
            for (i, name) in names.iter().enumerate() {
                m.insert(Arc::from(name.as_str()), i as u32);
            }
            t.elapsed()
        };
        let (fx_plain, fx_evil) = (fx(&plain), fx(&evil));
        assert!(
            fx_evil > fx_plain * 20,
            "not adversarial: {fx_evil:?} vs {fx_plain:?} under FxHash"
        );
        let (plain_t, evil_t) = (rooms(&plain), rooms(&evil));
        eprintln!(
            "{n} joins: FxHash {fx_plain:?} ordinary, {fx_evil:?} adversarial; \
             rooms {plain_t:?} ordinary, {evil_t:?} adversarial"
        );
        assert!(
            evil_t < plain_t * 5 + std::time::Duration::from_millis(20),
            "adversarial {evil_t:?} against ordinary {plain_t:?} (FxHash: {fx_evil:?})"
        );
    }
}
