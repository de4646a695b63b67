//! What arrives from Redis: room messages for the rooms this process holds members of, and
//! direct messages and bounces on its own channel. Each goes to the loops the way the unix bus
//! hands things over (`LocalBus`), so the loops cannot tell where it came from.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use fred::types::Message;
use tokio::sync::broadcast::{Receiver, error::RecvError};

use super::keys::{self, Channel, Wire};
use super::{Bounce, Outbound, Pending};
use crate::bus::{Bus, Item, LocalBus};
use crate::id::{ConnId, ProcessId};
use crate::protocol::Outgoing;

pub(crate) async fn run(
    mut rx: Receiver<Message>,
    me: ProcessId,
    local: Arc<LocalBus>,
    pending: Arc<Pending>,
) {
    loop {
        match rx.recv().await {
            Ok(m) => dispatch(&m, me, &local, &pending),
            Err(RecvError::Lagged(n)) => {
                // Fell behind the client's buffer (64 Ki messages): those are lost.
                pending.stats.dropped.fetch_add(n, Ordering::Relaxed);
            }
            Err(RecvError::Closed) => return,
        }
    }
}

fn dispatch(m: &Message, me: ProcessId, local: &LocalBus, pending: &Pending) {
    let Some(bytes) = m.value.as_bytes() else {
        return;
    };
    let Some(wire) = Wire::decode(bytes) else {
        pending.stats.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    };
    match (keys::parse_channel(&m.channel), wire) {
        (
            Channel::Room(room),
            Wire::Room {
                node,
                incarnation,
                skip,
                msg,
                ..
            },
        ) => {
            if ProcessId::new(node, incarnation) == me {
                return; // ours: the loops of this process had it already
            }
            pending.stats.received.fetch_add(1, Ordering::Relaxed);
            let room: Arc<str> = Arc::from(room);
            local.deliver(&room, &Outgoing::from_msgpack(msg), skip);
        }
        (
            Channel::Process,
            Wire::Direct {
                to,
                from,
                reference,
                msg,
                ..
            },
        ) => {
            let item = Item::Direct {
                to,
                from,
                msg: Outgoing::from_msgpack(msg),
                reference,
            };
            let gone = match ConnId::decode(to) {
                Some(target) => local.route(target, item).err(),
                None => Some(item),
            };
            if let Some(Item::Direct {
                to,
                from,
                reference,
                ..
            }) = gone
            {
                // The process lives but the connection does not: tell the sender.
                bounce_back(
                    Bounce {
                        sender: from,
                        target: to,
                        reference,
                    },
                    pending,
                );
            }
        }
        (
            Channel::Process,
            Wire::Bounce {
                to,
                target,
                reference,
                ..
            },
        ) => {
            if let Some(sender) = ConnId::decode(to) {
                let _ = local.route(
                    sender,
                    Item::Bounce {
                        to,
                        target,
                        reference,
                    },
                );
            }
        }
        _ => {
            pending.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends a bounce to the sender's process (a sender that is gone too needs no answer).
fn bounce_back(b: Bounce, pending: &Pending) {
    let Some(sender) = ProcessId::of(b.sender) else {
        return;
    };
    let wire = Wire::Bounce {
        version: keys::VERSION,
        to: b.sender,
        target: b.target,
        reference: b.reference,
    };
    pending.send(Outbound::Direct {
        to: sender,
        bytes: wire.encode().into(),
        bounce: None,
        tries: 0,
    });
}
