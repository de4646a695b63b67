//! A connection's output that the socket has not taken yet, holding no byte longer than needed.
//!
//! The queue is a deque of chunks, each starting on a frame boundary: a frame shared with every
//! other receiver of the same room or direct message (an `Arc`, never copied per receiver), or
//! bytes only this connection gets (replies, pongs, Close), small ones coalesced. A chunk is
//! dropped the moment its last byte is written, so what a connection pins is its unsent bytes,
//! which the loop caps (`--max-pending-output`), plus the written head of the chunk in flight
//! (at most one frame, or [`COALESCE`] bytes of small ones). A reader that keeps up but stays a
//! few megabytes behind therefore costs a few megabytes, not everything written since its queue
//! was last empty.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;

use super::protocol::{Encoding, Outgoing};

/// Small owned frames are appended to the last owned chunk up to this size (one allocation per
/// burst of replies rather than one per reply).
pub const COALESCE: usize = 16 * 1024;
/// Chunks handed to one writev(2).
pub const MAX_IOV: usize = 64;

enum Chunk {
    /// One frame shared with other receivers (only the frame: the message it came from, with
    /// its decoded data, is freed once every receiver has it or queued it).
    Shared(Arc<[u8]>),
    /// Whole frames only this connection gets.
    Owned(Vec<u8>),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Shared(frame) => frame,
            Chunk::Owned(v) => v,
        }
    }
}

/// What to send: bytes to copy, or a frame to share.
#[derive(Clone, Copy)]
pub enum Out<'a> {
    Bytes(&'a [u8]),
    Shared(&'a Arc<Outgoing>, Encoding),
    /// A frame already encoded and shared (a room message's compressed form).
    Frame(&'a Arc<[u8]>),
}

impl Out<'_> {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Out::Bytes(b) => b,
            Out::Shared(msg, enc) => msg.frame(*enc),
            Out::Frame(f) => f,
        }
    }
}

#[derive(Default)]
pub struct OutQueue {
    chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    offset: usize,
    /// Bytes not yet written, in all chunks.
    pending: usize,
}

impl OutQueue {
    pub fn is_empty(&self) -> bool {
        self.pending == 0
    }

    /// Bytes not yet written.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Queues `out`, of which the first `written` bytes already went out (a direct write the
    /// socket took only part of; only valid on an empty queue).
    pub fn push(&mut self, out: Out<'_>, written: usize) {
        let len = out.bytes().len();
        debug_assert!(written == 0 || self.chunks.is_empty());
        debug_assert!(written <= len);
        if written == len {
            return;
        }
        match out {
            Out::Shared(msg, enc) => self
                .chunks
                .push_back(Chunk::Shared(msg.shared(enc).clone())),
            Out::Frame(f) => self.chunks.push_back(Chunk::Shared(f.clone())),
            Out::Bytes(b) => {
                // Never append to the chunk being written: its written head would stay pinned.
                let writing_front = self.chunks.len() == 1 && self.offset > 0;
                match self.chunks.back_mut() {
                    Some(Chunk::Owned(v))
                        if !writing_front && written == 0 && v.len() + b.len() <= COALESCE =>
                    {
                        v.extend_from_slice(b)
                    }
                    _ => self.chunks.push_back(Chunk::Owned(b.to_vec())),
                }
            }
        }
        if written > 0 {
            self.offset = written;
        }
        self.pending += len - written;
    }

    /// The unwritten bytes, front first, as at most `MAX_IOV` slices for one writev(2).
    pub fn slices(&self) -> Vec<IoSlice<'_>> {
        self.chunks
            .iter()
            .enumerate()
            .take(MAX_IOV)
            .map(|(i, c)| {
                IoSlice::new(if i == 0 {
                    &c.bytes()[self.offset..]
                } else {
                    c.bytes()
                })
            })
            .collect()
    }

    /// `n` more bytes were written: drop every chunk that is now entirely out.
    pub fn consume(&mut self, mut n: usize) {
        debug_assert!(n <= self.pending);
        self.pending -= n;
        while n > 0 {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let left = front.bytes().len() - self.offset;
            if n < left {
                self.offset += n;
                return;
            }
            n -= left;
            self.chunks.pop_front();
            self.offset = 0;
        }
    }

    /// Drops every frame the peer has not started to receive, keeping the rest of the one in
    /// flight, so what is queued next still starts on a frame boundary.
    pub fn drop_unsent_frames(&mut self) {
        let offset = self.offset;
        let in_flight = match self.chunks.front() {
            Some(_) if offset == 0 => 0,
            Some(Chunk::Shared(frame)) => frame.len() - offset,
            Some(Chunk::Owned(v)) => {
                let mut end = 0;
                while end < offset {
                    end += frame_len(&v[end..]);
                }
                end.min(v.len()) - offset
            }
            None => 0,
        };
        if in_flight == 0 {
            self.chunks.clear();
            self.offset = 0;
            self.pending = 0;
            return;
        }
        self.chunks.truncate(1);
        if let Some(Chunk::Owned(v)) = self.chunks.front_mut() {
            v.truncate(offset + in_flight);
        }
        self.pending = in_flight;
    }

    /// Bytes this queue keeps alive that only it references: unsent ones plus the written head
    /// of the front chunk (a shared frame is counted whole, as if no one else held it).
    pub fn held(&self) -> usize {
        self.pending + self.offset
    }
}

/// Length of the server frame at the start of `b` (unmasked, header complete: we wrote it).
fn frame_len(b: &[u8]) -> usize {
    match b[1] & 0x7F {
        126 => 4 + u16::from_be_bytes([b[2], b[3]]) as usize,
        127 => 10 + u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")) as usize,
        n => 2 + n as usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{OP_TEXT, frame};
    use crate::protocol::Reply;

    fn drain(q: &mut OutQueue, at_most: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for s in q.slices() {
            let take = s.len().min(at_most - out.len());
            out.extend_from_slice(&s[..take]);
            if out.len() == at_most {
                break;
            }
        }
        q.consume(out.len());
        out
    }

    /// The bug of issue 14: a reader that takes about as much as is queued each time, but never
    /// everything, must not make the queue hold more than its unsent bytes plus one frame.
    #[test]
    fn a_reader_that_never_quite_catches_up_pins_only_what_is_unsent() {
        let msg = Outgoing::new(Reply {
            op: "message",
            data: Some(rmpv::Value::String("x".repeat(60_000).into())),
            ..Reply::default()
        });
        let len = msg.frame(Encoding::Json).len();
        let mut q = OutQueue::default();
        let mut sent = Vec::new();
        for _ in 0..40 {
            q.push(Out::Shared(&msg, Encoding::Json), 0);
        }
        for round in 0..2000 {
            q.push(Out::Shared(&msg, Encoding::Json), 0);
            q.push(Out::Bytes(&frame(OP_TEXT, b"{\"op\":\"published\"}")), 0);
            sent.extend(drain(&mut q, len + 20 - (round % 7)));
            assert!(q.held() <= q.pending() + len, "round {round}");
            assert!(
                q.chunks.len() < 100,
                "round {round}: {} chunks",
                q.chunks.len()
            );
        }
        while !q.is_empty() {
            let rest = q.pending();
            sent.extend(drain(&mut q, rest));
        }
        assert!(q.is_empty() && q.chunks.is_empty() && q.offset == 0);
        // Every byte came out once, in order: 2040 messages and 2000 replies.
        let mut want = Vec::new();
        for i in 0..2040 {
            want.extend_from_slice(msg.frame(Encoding::Json));
            if i >= 40 {
                want.extend_from_slice(&frame(OP_TEXT, b"{\"op\":\"published\"}"));
            }
        }
        assert_eq!(sent.len(), want.len());
        assert!(sent == want, "bytes out of order");
    }

    #[test]
    fn small_replies_coalesce_but_never_into_the_chunk_in_flight() {
        let mut q = OutQueue::default();
        let f = frame(OP_TEXT, b"0123456789");
        q.push(Out::Bytes(&f), 3); // a direct write took 3 bytes
        for _ in 0..10 {
            q.push(Out::Bytes(&f), 0);
        }
        assert_eq!(
            q.chunks.len(),
            2,
            "the rest coalesced behind the chunk in flight"
        );
        assert_eq!(q.pending(), 12 * 11 - 3);
        assert_eq!(q.held(), 12 * 11);
    }

    #[test]
    fn dropping_unsent_output_keeps_the_frame_in_flight() {
        let one = frame(OP_TEXT, &[b'a'; 300]);
        let two = frame(OP_TEXT, b"two");
        // 100 bytes of `one` went out directly, then 50 more from the queue.
        let mut q = OutQueue::default();
        q.push(Out::Bytes(&one), 100);
        q.push(Out::Bytes(&two), 0);
        q.consume(50);
        q.drop_unsent_frames();
        assert_eq!(drain(&mut q, usize::MAX), one[150..]);
        assert!(q.chunks.is_empty());
        // In the middle of the second of three coalesced frames.
        let mut q = OutQueue::default();
        q.push(Out::Bytes(&two), 0);
        q.push(Out::Bytes(&one), 0);
        q.push(Out::Bytes(&two), 0);
        q.consume(two.len() + 7);
        q.drop_unsent_frames();
        assert_eq!(drain(&mut q, usize::MAX), one[7..]);
        // On a boundary, or before anything went out: nothing is in flight, everything goes.
        let mut q = OutQueue::default();
        q.push(Out::Bytes(&two), 0);
        q.push(Out::Bytes(&two), 0);
        q.consume(two.len());
        q.drop_unsent_frames();
        assert!(q.is_empty() && q.chunks.is_empty() && q.offset == 0);
        q.push(Out::Bytes(&two), 0);
        q.drop_unsent_frames();
        assert!(q.is_empty() && q.chunks.is_empty());
        // A shared frame in flight keeps its rest.
        let msg = Outgoing::new(Reply {
            op: "message",
            ..Reply::default()
        });
        let len = msg.frame(Encoding::Json).len();
        q.push(Out::Shared(&msg, Encoding::Json), 5);
        q.push(Out::Bytes(&two), 0);
        q.drop_unsent_frames();
        assert_eq!(q.pending(), len - 5);
    }
}
