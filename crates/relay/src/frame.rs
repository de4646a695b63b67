//! WebSocket framing (RFC 6455 section 5): a streaming decoder for client frames and the
//! encoder for server frames.
//!
//! The decoder never buffers payload: it unmasks bytes in place in the loop's receive buffer and
//! hands them on as they arrive, so a connection between frames needs no buffer at all, and one
//! in the middle of a frame keeps only its header state (a few dozen bytes).

/// Opcodes.
pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Close codes we send (section 7.4.1).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
}

/// Why a connection must be failed, with the close code to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fail {
    pub code: u16,
    pub reason: &'static str,
}

impl Fail {
    pub const fn protocol(reason: &'static str) -> Fail {
        Fail {
            code: close::PROTOCOL_ERROR,
            reason,
        }
    }
}

/// A frame's header, after validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    /// RSV1: with permessage-deflate, the message is compressed (first frame only).
    pub rsv1: bool,
    pub opcode: u8,
    pub len: u64,
}

impl Header {
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// What the decoder hands on, in order: a header, its payload in zero or more pieces
/// (unmasked), then the end of the frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    Start(Header),
    Data(&'a [u8]),
    End,
}

/// Decoder state between reads. `Default` is "between frames", which costs nothing to keep.
#[derive(Clone, Debug, Default)]
pub struct Decoder {
    head: [u8; 14],
    have: u8,
    in_payload: bool,
    len: u64,
    remaining: u64,
    mask: [u8; 4],
}

impl Decoder {
    /// Between frames, with no partial header: nothing worth keeping.
    pub fn is_idle(&self) -> bool {
        !self.in_payload && self.have == 0
    }

    /// Consumes all of `input` (unmasking it in place), calling `on` for each piece. A data
    /// frame longer than `max_len` fails with 1009 before any of its payload is read; RSV1 is
    /// refused unless `rsv1_allowed` (permessage-deflate was negotiated).
    pub fn feed<F>(
        &mut self,
        mut input: &mut [u8],
        max_len: u64,
        rsv1_allowed: bool,
        on: &mut F,
    ) -> Result<(), Fail>
    where
        F: FnMut(Piece<'_>) -> Result<(), Fail>,
    {
        while !input.is_empty() {
            if !self.in_payload {
                let before = self.have;
                let want = self.header_len_needed(input);
                let take = (want - self.have as usize).min(input.len());
                self.head[self.have as usize..self.have as usize + take]
                    .copy_from_slice(&input[..take]);
                self.have += take as u8;
                input = &mut input[take..];
                if (self.have as usize) < 2 {
                    return Ok(());
                }
                // The first two bytes decide the rest: refuse early, before waiting for more.
                if before < 2 {
                    self.check_first_two(rsv1_allowed)?;
                }
                let need = self.header_len();
                if (self.have as usize) < need {
                    // Got more of the header bytes this call? Loop to take them.
                    if input.is_empty() {
                        return Ok(());
                    }
                    continue;
                }
                let header = self.parse_header(max_len)?;
                self.have = 0;
                on(Piece::Start(header))?;
                if header.len == 0 {
                    on(Piece::End)?;
                    continue;
                }
                self.in_payload = true;
                self.len = header.len;
                self.remaining = header.len;
                continue;
            }
            let n = (self.remaining.min(input.len() as u64)) as usize;
            let (chunk, rest) = input.split_at_mut(n);
            let offset = (self.len - self.remaining) as usize;
            unmask(chunk, self.mask, offset);
            self.remaining -= n as u64;
            on(Piece::Data(chunk))?;
            if self.remaining == 0 {
                self.in_payload = false;
                on(Piece::End)?;
            }
            input = rest;
        }
        Ok(())
    }

    /// How many header bytes to gather before we can know more: 2, then the full length.
    fn header_len_needed(&self, input: &[u8]) -> usize {
        if self.have < 2 {
            // Enough to read byte 1 (length marker), possibly from the input.
            let b1 = if self.have == 1 {
                input[0]
            } else if input.len() >= 2 {
                input[1]
            } else {
                return 2;
            };
            return Self::full_len(b1);
        }
        self.header_len()
    }

    fn full_len(b1: u8) -> usize {
        let ext = match b1 & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
    }

    fn header_len(&self) -> usize {
        Self::full_len(self.head[1])
    }

    fn check_first_two(&self, rsv1_allowed: bool) -> Result<(), Fail> {
        let (b0, b1) = (self.head[0], self.head[1]);
        if b0 & 0x30 != 0 || (b0 & 0x40 != 0 && !rsv1_allowed) {
            return Err(Fail::protocol("reserved bits set without an extension"));
        }
        if b0 & 0x40 != 0 && (b0 & 0x08 != 0 || b0 & 0x0F == OP_CONTINUATION) {
            // RFC 7692 section 6: RSV1 only on the first frame of a data message.
            return Err(Fail::protocol(
                "compressed bit on a control or continuation frame",
            ));
        }
        let opcode = b0 & 0x0F;
        if !matches!(
            opcode,
            OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
        ) {
            return Err(Fail::protocol("unknown opcode"));
        }
        if b1 & 0x80 == 0 {
            return Err(Fail::protocol("client frames must be masked"));
        }
        if opcode & 0x8 != 0 {
            if b0 & 0x80 == 0 {
                return Err(Fail::protocol("control frames must not be fragmented"));
            }
            if b1 & 0x7F > 125 {
                return Err(Fail::protocol("control frame payload over 125 bytes"));
            }
        }
        Ok(())
    }

    fn parse_header(&mut self, max_len: u64) -> Result<Header, Fail> {
        let h = &self.head;
        let fin = h[0] & 0x80 != 0;
        let opcode = h[0] & 0x0F;
        let (len, at) = match h[1] & 0x7F {
            126 => (u16::from_be_bytes([h[2], h[3]]) as u64, 4),
            127 => {
                let v = u64::from_be_bytes(h[2..10].try_into().expect("8 bytes"));
                if v >> 63 != 0 {
                    return Err(Fail::protocol("payload length has its top bit set"));
                }
                (v, 10)
            }
            n => (n as u64, 2),
        };
        self.mask.copy_from_slice(&h[at..at + 4]);
        if opcode & 0x8 == 0 && len > max_len {
            return Err(Fail {
                code: close::TOO_BIG,
                reason: "message too big",
            });
        }
        let rsv1 = h[0] & 0x40 != 0;
        Ok(Header {
            fin,
            rsv1,
            opcode,
            len,
        })
    }
}

/// XORs `data` with the mask, starting `offset` bytes into the frame's payload. Works a word at
/// a time; the mask repeats every 4 bytes, so a rotated mask repeated twice is an 8-byte key.
fn unmask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let r = offset % 4;
    let m = [
        mask[r],
        mask[(r + 1) % 4],
        mask[(r + 2) % 4],
        mask[(r + 3) % 4],
    ];
    let key = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes((&*c).try_into().expect("8 bytes")) ^ key;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i % 4];
    }
}

/// Appends an unmasked server frame header.
pub fn put_header(out: &mut Vec<u8>, fin: bool, opcode: u8, len: usize) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    match len {
        0..=125 => out.push(len as u8),
        126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// A whole unfragmented server frame.
pub fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    put_header(&mut out, true, opcode, payload.len());
    out.extend_from_slice(payload);
    out
}

/// The payload of one whole unmasked frame this server wrote (header complete, no mask).
pub fn server_payload(frame: &[u8]) -> &[u8] {
    let at = match frame.get(1).map(|b| b & 0x7F) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return &[],
    };
    frame.get(at..).unwrap_or(&[])
}

/// A Close frame with a code and reason (reason cut to fit the 125-byte control limit).
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    frame(OP_CLOSE, &payload)
}

/// Validates a received Close payload: empty, or a code we accept plus a UTF-8 reason.
/// Returns the code to echo (1000 when the peer sent none).
pub fn check_close(payload: &[u8]) -> Result<u16, Fail> {
    match payload.len() {
        0 => return Ok(close::NORMAL),
        1 => return Err(Fail::protocol("close payload of one byte")),
        _ => {}
    }
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    let valid = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
    if !valid {
        return Err(Fail::protocol("invalid close code"));
    }
    if std::str::from_utf8(&payload[2..]).is_err() {
        return Err(Fail {
            code: close::INVALID_DATA,
            reason: "close reason is not UTF-8",
        });
    }
    Ok(code)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A masked client frame, as a browser would send it.
    pub fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = Vec::new();
        put_header(&mut out, fin, opcode, payload.len());
        out[1] |= 0x80;
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// Decodes `bytes` fed in the given chunk sizes; returns the frames (header, payload).
    fn decode(bytes: &[u8], chunks: &[usize]) -> Result<Vec<(Header, Vec<u8>)>, Fail> {
        let mut d = Decoder::default();
        let mut frames: Vec<(Header, Vec<u8>)> = Vec::new();
        let mut data = bytes.to_vec();
        let mut rest: &mut [u8] = &mut data;
        let mut sizes = chunks.iter().copied().chain(std::iter::repeat(usize::MAX));
        while !rest.is_empty() {
            let n = sizes.next().unwrap().clamp(1, rest.len());
            let (now, later) = rest.split_at_mut(n);
            d.feed(now, 1 << 20, false, &mut |p| {
                match p {
                    Piece::Start(h) => frames.push((h, Vec::new())),
                    Piece::Data(b) => frames.last_mut().unwrap().1.extend_from_slice(b),
                    Piece::End => {}
                }
                Ok(())
            })?;
            rest = later;
        }
        assert!(d.is_idle(), "decoder left mid-frame");
        Ok(frames)
    }

    /// RSV1 (permessage-deflate's "compressed") only once negotiated, and only on the first
    /// frame of a data message; RSV2 and RSV3 never.
    #[test]
    fn rsv1_only_with_deflate_and_only_on_the_first_data_frame() {
        let feed = |wire: &mut Vec<u8>, allowed: bool| {
            let mut d = Decoder::default();
            let mut headers = Vec::new();
            d.feed(wire, 1 << 20, allowed, &mut |p| {
                if let Piece::Start(h) = p {
                    headers.push(h);
                }
                Ok(())
            })
            .map(|()| headers)
        };
        let with = |fin: bool, op: u8, bits: u8| {
            let mut f = client_frame(fin, op, b"xy", [1, 2, 3, 4]);
            f[0] |= bits;
            f
        };
        let h = feed(&mut with(true, OP_TEXT, 0x40), true).unwrap();
        assert!(h[0].rsv1);
        assert_eq!(
            feed(&mut with(true, OP_TEXT, 0x40), false)
                .unwrap_err()
                .code,
            1002
        );
        assert_eq!(
            feed(&mut with(true, OP_PING, 0x40), true).unwrap_err().code,
            1002
        );
        let mut frag = with(false, OP_BINARY, 0x40);
        frag.extend(with(true, OP_CONTINUATION, 0x40));
        assert_eq!(feed(&mut frag, true).unwrap_err().code, 1002);
        assert_eq!(
            feed(&mut with(true, OP_TEXT, 0x20), true).unwrap_err().code,
            1002
        );
        assert_eq!(
            feed(&mut with(true, OP_TEXT, 0x10), true).unwrap_err().code,
            1002
        );
        assert!(!feed(&mut with(true, OP_TEXT, 0), true).unwrap()[0].rsv1);
    }

    #[test]
    fn decodes_all_three_length_forms() {
        for len in [0usize, 5, 125, 126, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let f = client_frame(true, OP_BINARY, &payload, [1, 2, 3, 4]);
            let out = decode(&f, &[]).unwrap();
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].0.len, len as u64);
            assert_eq!(out[0].1, payload);
        }
    }

    #[test]
    fn refuses_what_the_rfc_forbids() {
        let mut unmasked = Vec::new();
        put_header(&mut unmasked, true, OP_TEXT, 1);
        unmasked.push(b'x');
        assert_eq!(decode(&unmasked, &[]).unwrap_err().code, 1002);
        let mut rsv = client_frame(true, OP_TEXT, b"x", [0; 4]);
        rsv[0] |= 0x40;
        assert_eq!(decode(&rsv, &[]).unwrap_err().code, 1002);
        let bad_op = client_frame(true, 0x3, b"", [0; 4]);
        assert_eq!(decode(&bad_op, &[]).unwrap_err().code, 1002);
        let frag_ping = client_frame(false, OP_PING, b"", [0; 4]);
        assert_eq!(decode(&frag_ping, &[]).unwrap_err().code, 1002);
        let big_ping = client_frame(true, OP_PING, &[0; 126], [0; 4]);
        assert_eq!(decode(&big_ping, &[]).unwrap_err().code, 1002);
        let big = client_frame(true, OP_BINARY, &vec![0; (1 << 20) + 1], [0; 4]);
        assert_eq!(decode(&big, &[]).unwrap_err().code, 1009);
    }

    #[test]
    fn close_payloads() {
        assert_eq!(check_close(&[]), Ok(1000));
        assert_eq!(check_close(&[0x03]).unwrap_err().code, 1002);
        assert_eq!(check_close(&1001u16.to_be_bytes()), Ok(1001));
        assert_eq!(check_close(&1005u16.to_be_bytes()).unwrap_err().code, 1002);
        assert_eq!(check_close(&999u16.to_be_bytes()).unwrap_err().code, 1002);
        assert_eq!(check_close(&4999u16.to_be_bytes()), Ok(4999));
        let mut bad = 1000u16.to_be_bytes().to_vec();
        bad.extend_from_slice(&[0xff, 0xfe]);
        assert_eq!(check_close(&bad).unwrap_err().code, 1007);
        let f = close_frame(1001, &"é".repeat(100));
        assert!(f.len() <= 127);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }

    proptest! {
        /// Any sequence of frames, cut into any chunks, decodes to the same frames.
        #[test]
        fn chunking_never_changes_the_result(
            frames in proptest::collection::vec(
                (any::<bool>(), prop_oneof![Just(OP_TEXT), Just(OP_BINARY), Just(OP_CONTINUATION)],
                 proptest::collection::vec(any::<u8>(), 0..300), any::<[u8; 4]>()), 1..6),
            chunks in proptest::collection::vec(1usize..40, 0..50),
        ) {
            let mut wire = Vec::new();
            for (fin, op, payload, mask) in &frames {
                wire.extend(client_frame(*fin, *op, payload, *mask));
            }
            let whole = decode(&wire, &[]).unwrap();
            let pieces = decode(&wire, &chunks).unwrap();
            prop_assert_eq!(&whole, &pieces);
            for ((fin, op, payload, _), (h, p)) in frames.iter().zip(&whole) {
                prop_assert_eq!(h.fin, *fin);
                prop_assert_eq!(h.opcode, *op);
                prop_assert_eq!(p, payload);
            }
        }

        /// Arbitrary bytes never panic the decoder; they decode or fail with a close code.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200),
                                chunks in proptest::collection::vec(1usize..20, 0..20)) {
            let mut d = Decoder::default();
            let mut data = bytes.clone();
            let mut rest: &mut [u8] = &mut data;
            let mut sizes = chunks.iter().copied().chain(std::iter::repeat(usize::MAX));
            while !rest.is_empty() {
                let n = sizes.next().unwrap().clamp(1, rest.len());
                let (now, later) = rest.split_at_mut(n);
                if let Err(f) = d.feed(now, 1 << 16, false, &mut |_| Ok(())) {
                    prop_assert!(f.code == 1002 || f.code == 1009);
                    break;
                }
                rest = later;
            }
        }

        #[test]
        fn unmask_matches_bytewise(data in proptest::collection::vec(any::<u8>(), 0..100),
                                   mask in any::<[u8; 4]>(), offset in 0usize..8) {
            let mut fast = data.clone();
            unmask(&mut fast, mask, offset);
            let slow: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ mask[(offset + i) % 4]).collect();
            prop_assert_eq!(fast, slow);
        }
    }
}
