//! Per-connection state, kept small: an idle WebSocket costs one 32-byte slot in its loop's
//! slab, the application's few bytes (`D`, the handler's `Data`) included. Everything that
//! exists only while something is in flight — a frame split across reads, a fragmented
//! message, output the socket could not take (`outq.rs`), an unfinished HTTP request — lives
//! in `Busy`, boxed, and is freed as soon as it is empty again.

use std::ops::Range;
use std::os::fd::OwnedFd;

use super::frame::{self, Decoder, Fail, Header, Piece};
use super::metrics::CloseReason;
use super::outq::OutQueue;
use super::utf8::Utf8Stream;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Free,
    /// Reading the HTTP request; `mark` is the handshake deadline.
    Handshake,
    /// A WebSocket; `mark` is when the outstanding ping was sent (with `AWAIT_PONG`).
    Open,
    /// We sent Close and wait for the peer's Close or EOF until `mark`.
    Closing,
    /// Our last bytes are queued; after they are flushed we half-close and wait for EOF until
    /// `mark`, so the peer reads everything before the connection goes.
    Lingering,
    /// The socket is closed; the slot waits for the application to hear that the connection
    /// ended (its `Data` is still intact) before it is freed.
    Closed,
}

/// `flags` bits.
/// Served where it is: it came from another loop, or its room's home did not take it
/// (`handoff.rs`).
pub const STAYS: u8 = 1;
pub const AWAIT_PONG: u8 = 2;
pub const WEBSOCKET: u8 = 4;
/// The write side was shut down (after our final bytes were flushed).
pub const WRITE_SHUT: u8 = 8;
/// The application was told the connection opened, and not yet that it ended.
pub const APP_OPEN: u8 = 16;
/// permessage-deflate was negotiated: compressed messages (RSV1) are accepted.
pub const DEFLATE: u8 = 32;
/// ... and the server may send compressed messages (the client allows a full window).
pub const DEFLATE_OUT: u8 = 64;

pub struct Conn<D> {
    pub fd: Option<OwnedFd>,
    pub generation: u16,
    pub state: State,
    pub flags: u8,
    /// Tick of the last bytes received.
    pub last_rx: u32,
    /// Deadline or timestamp, by state (see `State`).
    pub mark: u32,
    /// Why the connection is ending, once it is (index into `CloseReason::ALL`).
    pub why: u8,
    /// The application's own state for this connection.
    pub data: D,
    pub busy: Option<Box<Busy>>,
}

impl<D: Default> Conn<D> {
    pub fn free(generation: u16) -> Conn<D> {
        Conn {
            fd: None,
            generation,
            state: State::Free,
            flags: 0,
            last_rx: 0,
            mark: 0,
            why: 0,
            data: D::default(),
            busy: None,
        }
    }
}

impl<D> Conn<D> {
    pub fn busy(&mut self) -> &mut Busy {
        self.busy.get_or_insert_with(Box::default)
    }

    pub fn pending_out(&self) -> usize {
        self.busy.as_ref().map_or(0, |b| b.out.pending())
    }

    /// Drops `Busy` when nothing in it is worth keeping.
    pub fn settle(&mut self) {
        if self.busy.as_ref().is_some_and(|b| b.is_idle()) {
            self.busy = None;
        }
    }

    pub fn set_why(&mut self, reason: CloseReason) {
        self.why = CloseReason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("listed") as u8;
    }

    pub fn why(&self) -> CloseReason {
        CloseReason::ALL[self.why as usize]
    }

    /// A socket is attached (not free, not closed).
    pub fn live(&self) -> bool {
        !matches!(self.state, State::Free | State::Closed)
    }
}

#[derive(Default)]
pub struct Busy {
    pub reader: Reader,
    /// Output the socket has not taken yet.
    pub out: OutQueue,
    pub request: Vec<u8>,
}

impl Busy {
    fn is_idle(&self) -> bool {
        self.reader.is_idle() && self.out.is_empty() && self.request.is_empty()
    }
}

/// A data message being assembled from fragments (or from one frame over several reads).
pub struct Message {
    pub opcode: u8,
    /// permessage-deflate: the data is compressed (UTF-8 is checked once it is inflated).
    pub compressed: bool,
    pub data: Vec<u8>,
    utf8: Utf8Stream,
}

/// The read side of a WebSocket between reads.
#[derive(Default)]
pub struct Reader {
    decoder: Decoder,
    assembly: Assembly,
}

impl Reader {
    pub fn is_idle(&self) -> bool {
        self.decoder.is_idle() && self.assembly.frame.is_none() && self.assembly.message.is_none()
    }
}

/// Where the decoded pieces are put together: the frame being read, the message being
/// assembled, the control frame's payload.
#[derive(Default)]
struct Assembly {
    frame: Option<Header>,
    message: Option<Message>,
    /// The current data frame may be handed on straight from the receive buffer.
    direct: bool,
    /// Payload of the current control frame (at most 125 bytes).
    control: Vec<u8>,
}

/// A complete message or control frame, ready for the loop.
pub enum Incoming {
    /// Payload in the loop's receive buffer, or assembled.
    Data {
        opcode: u8,
        payload: Payload,
        /// permessage-deflate: to be inflated (and, if text, checked) before it is handed on.
        compressed: bool,
    },
    Ping(Vec<u8>),
    Pong,
    /// The peer's Close, validated; the code to echo.
    Close(u16),
}

pub enum Payload {
    Buf(Range<usize>),
    Owned(Vec<u8>),
}

impl Payload {
    pub fn bytes<'a>(&'a self, buf: &'a [u8]) -> &'a [u8] {
        match self {
            Payload::Buf(r) => &buf[r.clone()],
            Payload::Owned(v) => v,
        }
    }
}

/// Decodes `buf[range]` into `out`. Complete single-frame messages that arrived whole are
/// referenced in `buf` (no copy); everything else is assembled. Text is validated as it
/// arrives, so invalid UTF-8 fails the connection as soon as it is seen (compressed text once
/// inflated, by the loop). `deflate`: permessage-deflate was negotiated (RSV1 allowed).
pub fn decode(
    reader: &mut Reader,
    buf: &mut [u8],
    range: Range<usize>,
    max_message: usize,
    deflate: bool,
    out: &mut Vec<Incoming>,
) -> Result<(), Fail> {
    let base = buf.as_ptr() as usize;
    let max = max_message as u64;
    let Reader { decoder, assembly } = reader;
    decoder.feed(&mut buf[range], max, deflate, &mut |piece| match piece {
        Piece::Start(h) => assembly.start(h, max),
        Piece::Data(chunk) => assembly.data(chunk, base, out),
        Piece::End => assembly.end(out),
    })
}

impl Assembly {
    /// A frame header: checks it fits the message in progress.
    fn start(&mut self, h: Header, max: u64) -> Result<(), Fail> {
        if h.is_control() {
            self.control.clear();
        } else if h.opcode == frame::OP_CONTINUATION {
            let Some(m) = self.message.as_ref() else {
                return Err(Fail::protocol("continuation frame without a message"));
            };
            if m.data.len() as u64 + h.len > max {
                return Err(too_big());
            }
        } else {
            if self.message.is_some() {
                return Err(Fail::protocol("new message inside a fragmented one"));
            }
            self.direct = h.fin;
            if !h.fin {
                self.message = Some(Message {
                    opcode: h.opcode,
                    compressed: h.rsv1,
                    data: Vec::new(),
                    utf8: Utf8Stream::default(),
                });
            }
        }
        self.frame = Some(h);
        Ok(())
    }

    /// Payload bytes (already unmasked, in the receive buffer whose start is `base`).
    fn data(&mut self, chunk: &[u8], base: usize, out: &mut Vec<Incoming>) -> Result<(), Fail> {
        let h = self.frame.expect("data follows a header");
        if h.is_control() {
            self.control.extend_from_slice(chunk);
        } else if self.direct && chunk.len() as u64 == h.len {
            // A whole single-frame message in the buffer: handed on without a copy.
            if h.opcode == frame::OP_TEXT && !h.rsv1 && std::str::from_utf8(chunk).is_err() {
                return Err(bad_utf8());
            }
            let start = chunk.as_ptr() as usize - base;
            out.push(Incoming::Data {
                opcode: h.opcode,
                payload: Payload::Buf(start..start + chunk.len()),
                compressed: h.rsv1,
            });
            self.direct = false;
            self.frame = Some(Header { len: 0, ..h });
        } else {
            if self.direct {
                self.direct = false;
                self.message = Some(Message {
                    opcode: h.opcode,
                    compressed: h.rsv1,
                    data: Vec::with_capacity(h.len.min(1 << 16) as usize),
                    utf8: Utf8Stream::default(),
                });
            }
            let m = self.message.as_mut().expect("a message is being assembled");
            if m.opcode == frame::OP_TEXT && !m.compressed && m.utf8.feed(chunk).is_err() {
                return Err(bad_utf8());
            }
            m.data.extend_from_slice(chunk);
        }
        Ok(())
    }

    /// The end of a frame: a control frame, or the end of a message, is handed on.
    fn end(&mut self, out: &mut Vec<Incoming>) -> Result<(), Fail> {
        let h = self.frame.take().expect("end follows a header");
        match h.opcode {
            frame::OP_PING => out.push(Incoming::Ping(std::mem::take(&mut self.control))),
            frame::OP_PONG => out.push(Incoming::Pong),
            frame::OP_CLOSE => out.push(Incoming::Close(frame::check_close(&self.control)?)),
            _ if self.direct => {
                // A whole message with an empty payload.
                self.direct = false;
                out.push(Incoming::Data {
                    opcode: h.opcode,
                    payload: Payload::Owned(Vec::new()),
                    compressed: h.rsv1,
                });
            }
            _ if h.fin && self.message.is_some() => {
                let m = self.message.take().expect("checked");
                if m.opcode == frame::OP_TEXT && !m.compressed && !m.utf8.complete() {
                    return Err(bad_utf8());
                }
                out.push(Incoming::Data {
                    opcode: m.opcode,
                    payload: Payload::Owned(m.data),
                    compressed: m.compressed,
                });
            }
            _ => {}
        }
        Ok(())
    }
}

fn too_big() -> Fail {
    Fail {
        code: frame::close::TOO_BIG,
        reason: "message too big",
    }
}

fn bad_utf8() -> Fail {
    Fail {
        code: frame::close::INVALID_DATA,
        reason: "text message is not valid UTF-8",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::tests::client_frame;
    use crate::frame::{OP_BINARY, OP_CONTINUATION, OP_PING, OP_TEXT};

    fn client(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
        client_frame(fin, op, payload, [9, 8, 7, 6])
    }

    fn run(wire: &[u8], cut: usize) -> Result<Vec<(u8, Vec<u8>)>, Fail> {
        let mut r = Reader::default();
        let mut buf = wire.to_vec();
        let mut got = Vec::new();
        let mut out = Vec::new();
        let mut at = 0;
        while at < buf.len() {
            let end = (at + cut).min(buf.len());
            decode(&mut r, &mut buf, at..end, 1 << 20, false, &mut out)?;
            for inc in out.drain(..) {
                match inc {
                    Incoming::Data {
                        opcode, payload, ..
                    } => got.push((opcode, payload.bytes(&buf).to_vec())),
                    Incoming::Ping(p) => got.push((OP_PING, p)),
                    _ => {}
                }
            }
            at = end;
        }
        assert!(r.is_idle());
        Ok(got)
    }

    #[test]
    fn fragments_and_interleaved_pings_assemble_in_order() {
        let mut wire = client(false, OP_TEXT, "Hé".as_bytes());
        wire.extend(client(true, OP_PING, b"p"));
        wire.extend(client(false, OP_CONTINUATION, b"llo "));
        wire.extend(client(true, OP_CONTINUATION, b"world"));
        wire.extend(client(true, OP_BINARY, &[1, 2, 3]));
        wire.extend(client(true, OP_TEXT, b""));
        for cut in [1, 2, 3, 7, 1000] {
            let got = run(&wire, cut).unwrap();
            assert_eq!(
                got,
                vec![
                    (OP_PING, b"p".to_vec()),
                    (OP_TEXT, "Héllo world".as_bytes().to_vec()),
                    (OP_BINARY, vec![1, 2, 3]),
                    (OP_TEXT, vec![]),
                ],
                "cut {cut}"
            );
        }
    }

    #[test]
    fn bad_sequences_fail_with_the_right_code() {
        assert_eq!(
            run(&client(true, OP_CONTINUATION, b"x"), 100)
                .unwrap_err()
                .code,
            1002
        );
        let mut two = client(false, OP_TEXT, b"a");
        two.extend(client(true, OP_TEXT, b"b"));
        assert_eq!(run(&two, 100).unwrap_err().code, 1002);
        assert_eq!(
            run(&client(true, OP_TEXT, &[0xff]), 100).unwrap_err().code,
            1007
        );
        let mut split = client(false, OP_TEXT, &[0xe2, 0x82]);
        split.extend(client(true, OP_CONTINUATION, &[]));
        assert_eq!(run(&split, 100).unwrap_err().code, 1007);
    }
}
