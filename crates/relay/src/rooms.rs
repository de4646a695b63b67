//! Rooms held by one event loop: which of its connections are members of which room.
//!
//! Membership lives on the room side (a hash set of slot numbers), so a connection pays nothing
//! per room beyond its own short list of room ids; leaving is O(1) whatever the room's size.

use crate::names::NameMap;
use std::sync::Arc;

use rustc_hash::FxHashSet;

/// A room's index in this loop's table.
pub type RoomId = u32;

struct Room {
    name: Arc<str>,
    members: FxHashSet<u32>,
}

#[derive(Default)]
pub struct Rooms {
    by_name: NameMap<RoomId>,
    rooms: Vec<Option<Room>>,
    free: Vec<RoomId>,
}

impl Rooms {
    pub fn lookup(&self, name: &str) -> Option<RoomId> {
        self.by_name.get(name).copied()
    }

    pub fn name(&self, id: RoomId) -> &Arc<str> {
        &self.room(id).name
    }

    fn room(&self, id: RoomId) -> &Room {
        self.rooms[id as usize].as_ref().expect("live room id")
    }

    /// Adds `slot` to the room, creating it. Returns the room and whether `slot` is new there.
    pub fn join(&mut self, name: &str, slot: u32) -> (RoomId, bool) {
        let id = match self.by_name.get(name) {
            Some(&id) => id,
            None => {
                let name: Arc<str> = Arc::from(name);
                let room = Room {
                    name: name.clone(),
                    members: FxHashSet::default(),
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
                self.by_name.insert(name, id);
                id
            }
        };
        let added = self.rooms[id as usize]
            .as_mut()
            .expect("live room id")
            .members
            .insert(slot);
        (id, added)
    }

    /// Removes `slot`; a room left empty is forgotten. Returns whether `slot` was a member.
    pub fn leave(&mut self, id: RoomId, slot: u32) -> bool {
        let room = self.rooms[id as usize].as_mut().expect("live room id");
        let removed = room.members.remove(&slot);
        if room.members.is_empty() {
            let room = self.rooms[id as usize].take().expect("live room id");
            self.by_name.remove(&room.name);
            self.free.push(id);
        }
        removed
    }

    /// Members of a room, copied into `out` (so the caller can write to them while iterating).
    pub fn members_into(&self, id: RoomId, out: &mut Vec<u32>) {
        out.clear();
        out.extend(self.room(id).members.iter().copied());
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
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
