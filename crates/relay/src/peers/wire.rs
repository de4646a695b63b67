//! What workers say to each other on a link (`Wire`) and how: a 4-byte little-endian length,
//! then the message in MessagePack.

use std::io::Read;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Snapshot;

/// Largest bus frame accepted (a room message carries at most one client message).
pub(super) const MAX_WIRE: usize = 64 << 20;
/// Bumped whenever `Wire` changes, so workers of different builds refuse each other loudly.
pub(super) const PROTOCOL: u32 = 5;

#[derive(Serialize, Deserialize)]
pub(super) enum Wire {
    Hello {
        protocol: u32,
        worker: u32,
        workers: u32,
        /// The sender's node and incarnation: direct messages for ids that carry them come to
        /// the sender.
        node: u8,
        incarnation: u16,
    },
    /// To a room's home: the sender now holds `count` members of `room`.
    Count { room: String, count: u64 },
    /// From a room's home: the workers holding members of `room` now.
    Holders { room: String, workers: Vec<u32> },
    /// To a room's home: how many members `room` has, for connection `to`.
    Ask {
        to: u64,
        op: String,
        room: String,
        reference: Option<rmpv::Value>,
    },
    /// The home's answer to `Ask`.
    Members {
        to: u64,
        op: String,
        room: String,
        reference: Option<rmpv::Value>,
        members: u64,
    },
    /// A room message; `forward`: to the room's home, which hands it to the holders (the
    /// publisher's worker holds no member, so it does not know them).
    Room {
        room: String,
        skip: Option<u64>,
        forward: bool,
        #[serde(with = "serde_bytes")]
        msg: Vec<u8>,
    },
    Direct {
        to: u64,
        from: u64,
        reference: Option<rmpv::Value>,
        #[serde(with = "serde_bytes")]
        msg: Vec<u8>,
    },
    Bounce {
        to: u64,
        target: u64,
        reference: Option<rmpv::Value>,
    },
    /// The sender's counters, every half second (summed into /metrics by whoever answers).
    Metrics(Box<Snapshot>),
}

/// An `Ask`'s reply op, as the relay names it (`bus::Ask::op` is static).
pub(super) fn reply_op(op: &str) -> Option<&'static str> {
    ["joined", "left", "count"].into_iter().find(|o| *o == op)
}

pub(super) fn encode(w: &Wire) -> Arc<Vec<u8>> {
    let body = rmp_serde::to_vec(w).expect("bus messages serialise");
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Arc::new(out)
}

/// Reads one length-prefixed message; `None` at the end of the stream or on garbage.
pub(super) fn read_wire(input: &mut impl Read) -> Option<Wire> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len).ok()?;
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_WIRE {
        return None;
    }
    let mut body = vec![0u8; n];
    input.read_exact(&mut body).ok()?;
    rmp_serde::from_slice(&body).ok()
}
