//! Rooms held by one event loop: which of its connections are members of which room.
//!
//! Membership lives on the room side, so a connection pays nothing per room beyond its own
//! short list of room ids; leaving is O(1) whatever the room's size. The table is sized for a
//! worker among many: with 51 workers, a room of 10 has about one member on each, so most rooms
//! here hold a single member. Such a room costs its 32-byte entry, its name (shared with the
//! bus, which keeps the same `Arc`) and a 4-byte id in the index; a set of members is made only
//! for the second one.

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

/// A room's members here: one inline, a set from the second.
enum Members {
    One(u32),
    Many(Box<FxHashSet<u32>>),
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
        let added = match &mut room.members {
            Members::One(only) if *only == slot => false,
            Members::One(only) => {
                let set: FxHashSet<u32> = [*only, slot].into_iter().collect();
                room.members = Members::Many(Box::new(set));
                true
            }
            Members::Many(set) => set.insert(slot),
        };
        (id, added)
    }

    /// Removes `slot`; a room left empty is forgotten. Returns whether `slot` was a member.
    pub fn leave(&mut self, id: RoomId, slot: u32) -> bool {
        let room = self.rooms[id as usize].as_mut().expect("live room id");
        let (removed, empty) = match &mut room.members {
            Members::One(only) => (*only == slot, *only == slot),
            Members::Many(set) => {
                let removed = set.remove(&slot);
                if set.len() == 1 {
                    let only = *set.iter().next().expect("one member");
                    room.members = Members::One(only);
                } else if set.capacity() > 4 * set.len() + 16 {
                    set.shrink_to_fit();
                }
                (removed, false)
            }
        };
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
    /// members go from one inline to a set and back, ids are reused, and the index finds
    /// exactly the rooms with members.
    #[test]
    fn the_table_agrees_with_a_map_of_sets() {
        use proptest::prelude::*;
        use std::collections::{BTreeMap, BTreeSet};
        let ops = proptest::collection::vec((any::<bool>(), 0u8..6, 0u32..5), 0..200);
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
