//! permessage-deflate (RFC 7692) without per-connection state.
//!
//! The usual implementation keeps a zlib stream per connection (hundreds of KB with a full
//! window), which would dwarf an idle connection's 32 bytes here. RFC 7692 lets the server
//! answer with `server_no_context_takeover` and `client_no_context_takeover`, even when the
//! client did not offer the latter (section 7.1.1.2): every message is then compressed and
//! decompressed on its own, so one compressor and one decompressor per event loop (`Codec`)
//! serve every connection, and a connection with the extension negotiated holds two bits.
//!
//! `negotiate` reads the offers and picks the first one it can honour, answering only with
//! parameters the RFC lets a server send for that offer; an offer it cannot honour (unknown or
//! repeated parameters, a bad window size) is declined, and the next one tried. Messages are
//! compressed with a 32 KiB window (15 bits); a client that asks for a smaller server window
//! gets every message uncompressed instead (RFC 7692 compresses per message, at the sender's
//! choice), which keeps one compressed frame per room message shareable by every receiver.
//!
//! The library is flate2 on its zlib-rs backend: raw deflate with window-bit control (which
//! miniz_oxide, flate2's default, lacks), the output and speed of zlib, and memory-safe Rust
//! (no C toolchain, no unsafe of ours); libdeflater was the other candidate, but it compresses
//! whole buffers only, without the sync flush and streamed inflate that cut a bomb at the
//! limit.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::frame::{Fail, close};

/// Messages shorter than this go uncompressed: deflate's block overhead eats what a short
/// message could save, and compressing costs CPU per message.
pub const THRESHOLD: usize = 256;
/// The window the compressor uses (the RFC's default and maximum).
const WINDOW_BITS: u8 = 15;
/// The tail every sync-flushed message ends with, which the sender removes and the receiver
/// puts back (RFC 7692 section 7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// Inflated output is produced this much at a time, the limit checked in between: a
/// compression bomb is cut at `--max-message-size`, never allocated whole.
const INFLATE_STEP: usize = 64 * 1024;

/// What an upgrade agreed to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agreed {
    /// The `Sec-WebSocket-Extensions` value of the 101.
    pub response: String,
    /// Whether this server may send compressed messages (the client allows a 15-bit window).
    pub compress: bool,
}

/// The first permessage-deflate offer among `values` (every `Sec-WebSocket-Extensions` header
/// of the request, in order) that this server can honour, and what to answer; `None` when
/// there is none (the connection then goes without the extension).
pub fn negotiate<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Option<Agreed> {
    let text: Vec<String> = values
        .into_iter()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    let joined = text.join(",");
    for offer in split_outside_quotes(&joined, ',') {
        let mut parts = split_outside_quotes(offer, ';').into_iter();
        let name = parts.next().unwrap_or("").trim();
        if !name.eq_ignore_ascii_case("permessage-deflate") {
            continue;
        }
        if let Some(agreed) = accept(parts) {
            return Some(agreed);
        }
    }
    None
}

/// The answer to one permessage-deflate offer, or `None` to decline it.
fn accept<'a>(params: impl Iterator<Item = &'a str>) -> Option<Agreed> {
    let mut seen: Vec<String> = Vec::new();
    let mut server_window: Option<u8> = None;
    for p in params {
        let (key, value) = match p.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim().trim_matches('"'))),
            None => (p.trim(), None),
        };
        let key = key.to_ascii_lowercase();
        if seen.contains(&key) {
            return None; // a parameter twice: the offer is invalid (section 7)
        }
        match (key.as_str(), value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            ("server_max_window_bits", Some(v)) => server_window = Some(window_bits(v)?),
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(v)) => {
                window_bits(v)?;
            }
            _ => return None, // unknown, or a value where none belongs (or none where one does)
        }
        seen.push(key);
    }
    let mut response =
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover".to_string();
    if let Some(bits) = server_window {
        // The client limits our window: say we keep to it (we do, by never compressing with a
        // window it did not allow).
        response.push_str(&format!("; server_max_window_bits={bits}"));
    }
    Some(Agreed {
        response,
        compress: server_window.is_none_or(|b| b >= WINDOW_BITS),
    })
}

/// A window size parameter: 8 to 15, digits only (section 7.1.2).
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.len() > 2 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

/// `s` split at `sep`, except inside double quotes.
fn split_outside_quotes(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in s.char_indices() {
        if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            parts.push(&s[start..i]);
            start = i + 1;
        }
    }
    parts.push(&s[start..]);
    parts
}

/// One event loop's compressor and decompressor, shared by all its connections: every message
/// stands alone (no context takeover either way), so both are reset per message.
pub struct Codec {
    deflate: Compress,
    inflate: Decompress,
}

impl Default for Codec {
    fn default() -> Codec {
        Codec {
            deflate: Compress::new_with_window_bits(Compression::default(), false, WINDOW_BITS),
            inflate: Decompress::new_with_window_bits(false, WINDOW_BITS),
        }
    }
}

impl Codec {
    /// `payload` compressed as one message (the sync tail removed), or `None` when that
    /// would not be shorter.
    pub fn compress(&mut self, payload: &[u8]) -> Option<Vec<u8>> {
        self.deflate.reset();
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        loop {
            let before_in = self.deflate.total_in() as usize;
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(1024));
            }
            let status = self
                .deflate
                .compress_vec(&payload[before_in..], &mut out, FlushCompress::Sync)
                .ok()?;
            let done = self.deflate.total_in() as usize == payload.len();
            // Sync flush is complete once all input is in and the output did not fill up.
            if done && out.len() < out.capacity() && status != Status::BufError {
                break;
            }
            if out.len() > payload.len() + 64 {
                return None;
            }
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        (out.len() < payload.len()).then_some(out)
    }

    /// Inflates one compressed message into `out` (cleared first). Past `max` bytes: 1009,
    /// with at most `max` + 64 KiB ever allocated; corrupt data: 1007.
    pub fn inflate(&mut self, data: &[u8], max: usize, out: &mut Vec<u8>) -> Result<(), Fail> {
        self.inflate.reset(false);
        out.clear();
        let mut ended = false;
        for input in [data, &TAIL[..]] {
            let start = self.inflate.total_in();
            while !ended {
                let consumed = (self.inflate.total_in() - start) as usize;
                if out.capacity() - out.len() < INFLATE_STEP {
                    out.reserve(INFLATE_STEP);
                }
                let before_out = out.len();
                let status = self
                    .inflate
                    .decompress_vec(&input[consumed..], out, FlushDecompress::Sync)
                    .map_err(|_| Fail {
                        code: close::INVALID_DATA,
                        reason: "invalid compressed data",
                    })?;
                if out.len() > max {
                    out.clear();
                    out.shrink_to(INFLATE_STEP);
                    return Err(Fail {
                        code: close::TOO_BIG,
                        reason: "message too big",
                    });
                }
                // A final block ends the stream: what follows (the tail) is not read.
                ended = status == Status::StreamEnd;
                let all_in = (self.inflate.total_in() - start) as usize == input.len();
                if all_in && (out.len() < out.capacity() || out.len() == before_out) {
                    break;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
