//! What the Redis bus puts in Redis: the names of its channels and keys, and the bytes of its
//! messages. Pure functions, so the layout is tested without a server.
//!
//! Every name carries a hash tag (`{...}`): what is read or written together lands in one slot,
//! so one shard serves it and a Lua script may touch both keys.
//!
//! | name | what | lives |
//! |------|------|-------|
//! | `tg:r:{ROOM}` | sharded channel of a room's messages | while a process holds members |
//! | `tg:n:{ROOM}` | hash: process -> its member count; counted only while that process's `tg:a` lives | 30 min after its last write; every process writes its rooms again every 10 min |
//! | `tg:p:{NODE.INC}` | sharded channel of one process's direct messages | the process |
//! | `tg:a:{NODE.INC}` | the process is alive | lease, refreshed every 5 s |
//! | `tg:node:{NODE}` | which host holds node id NODE | lease, refreshed every 5 s |

use serde::{Deserialize, Serialize};

use crate::id::ProcessId;

const ROOM_CHANNEL: &str = "tg:r:{";
const PROCESS_CHANNEL: &str = "tg:p:{";

pub fn room_channel(room: &str) -> String {
    format!("{ROOM_CHANNEL}{room}}}")
}

pub fn room_counts(room: &str) -> String {
    format!("tg:n:{{{room}}}")
}

pub fn process_channel(p: ProcessId) -> String {
    format!("{PROCESS_CHANNEL}{p}}}")
}

pub fn process_alive(p: ProcessId) -> String {
    format!("tg:a:{{{p}}}")
}

pub fn node_claim(node: u8) -> String {
    format!("tg:node:{{{node}}}")
}

/// The field of a process in a room's count hash.
pub fn field(p: ProcessId) -> String {
    p.to_string()
}

/// The alive key of the process whose field in a count hash is `field`.
pub fn alive_of_field(field: &str) -> String {
    format!("tg:a:{{{field}}}")
}

/// What a channel is about.
#[derive(Debug, PartialEq, Eq)]
pub enum Channel<'a> {
    Room(&'a str),
    Process,
    Other,
}

pub fn parse_channel(name: &str) -> Channel<'_> {
    if let Some(room) = name
        .strip_prefix(ROOM_CHANNEL)
        .and_then(|r| r.strip_suffix('}'))
    {
        Channel::Room(room)
    } else if name.starts_with(PROCESS_CHANNEL) {
        Channel::Process
    } else {
        Channel::Other
    }
}

/// A message on a channel, MessagePack-encoded. Changing it needs every host upgraded at once:
/// `VERSION` makes a host of another build drop, and count, what it cannot read.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum Wire {
    /// A room message from process `node.incarnation`; `skip` is the publisher's id unless it
    /// asked for its own message back. `msg` is the reply frame, MessagePack.
    Room {
        version: u8,
        node: u8,
        incarnation: u16,
        skip: Option<u64>,
        #[serde(with = "serde_bytes")]
        msg: Vec<u8>,
    },
    /// A direct message for connection `to`, from `from`.
    Direct {
        version: u8,
        to: u64,
        from: u64,
        reference: Option<rmpv::Value>,
        #[serde(with = "serde_bytes")]
        msg: Vec<u8>,
    },
    /// Connection `to` sent a direct message to `target`, which does not exist.
    Bounce {
        version: u8,
        to: u64,
        target: u64,
        reference: Option<rmpv::Value>,
    },
}

pub const VERSION: u8 = 1;

impl Wire {
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec(self).expect("bus messages serialise")
    }

    /// `None` for bytes that are not a message of this version.
    pub fn decode(bytes: &[u8]) -> Option<Wire> {
        let w: Wire = rmp_serde::from_slice(bytes).ok()?;
        let version = match &w {
            Wire::Room { version, .. } | Wire::Direct { version, .. } => *version,
            Wire::Bounce { version, .. } => *version,
        };
        (version == VERSION).then_some(w)
    }
}

/// Where the node-id search starts for a host called `identity`: a stable hash (FNV-1a), so a
/// restarted host comes back to the number it had.
pub fn preferred_node(identity: &str) -> u8 {
    let mut h: u32 = 0x811c_9dc5;
    for b in identity.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    (h ^ (h >> 8) ^ (h >> 16) ^ (h >> 24)) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_one_hash_tag_shared_by_what_is_used_together() {
        assert_eq!(room_channel("lobby"), "tg:r:{lobby}");
        assert_eq!(room_counts("lobby"), "tg:n:{lobby}");
        let p = ProcessId::new(3, 77);
        assert_eq!(process_channel(p), "tg:p:{3.77}");
        assert_eq!(process_alive(p), "tg:a:{3.77}");
        assert_eq!(alive_of_field(&field(p)), process_alive(p));
        assert_eq!(node_claim(9), "tg:node:{9}");
        assert_eq!(parse_channel(&room_channel("a}b{")), Channel::Room("a}b{"));
        assert_eq!(parse_channel(&process_channel(p)), Channel::Process);
        assert_eq!(parse_channel("elsewhere"), Channel::Other);
    }

    #[test]
    fn messages_round_trip_and_other_versions_are_refused() {
        let w = Wire::Direct {
            version: VERSION,
            to: 1 << 52,
            from: 7,
            reference: Some(rmpv::Value::from("r1")),
            msg: vec![0x81, 0xa1, 0x61, 0x01],
        };
        assert_eq!(Wire::decode(&w.encode()), Some(w));
        let old = Wire::Bounce {
            version: VERSION + 1,
            to: 1,
            target: 2,
            reference: None,
        };
        assert_eq!(Wire::decode(&old.encode()), None);
        assert_eq!(Wire::decode(b"\xc1 not msgpack"), None);
    }

    #[test]
    fn the_preferred_node_is_stable_and_spreads() {
        assert_eq!(
            preferred_node("web-1/10.0.0.1:8080"),
            preferred_node("web-1/10.0.0.1:8080")
        );
        let distinct: std::collections::HashSet<u8> = (0..64)
            .map(|i| preferred_node(&format!("host-{i}/127.0.0.1:9000")))
            .collect();
        assert!(distinct.len() > 40, "{} distinct of 64", distinct.len());
    }
}
