//! The client end of RFC 6455, as little as a load generator needs: the upgrade request and
//! the check of its answer, masked frames out, unmasked frames in. Written apart from the
//! server's codec (crates/relay/src/frame.rs), so a load run is a second opinion on the server.

use base64::Engine;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

pub const TEXT: u8 = 1;
pub const BINARY: u8 = 2;
pub const CLOSE: u8 = 8;
pub const PING: u8 = 9;
pub const PONG: u8 = 10;

/// A cheap generator for masking keys and handshake nonces (xorshift64*). RFC 6455 asks for
/// unpredictable masks to protect intermediaries from cache poisoning by browser scripts; a
/// load generator talking to a server its operator runs has no such adversary.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// The upgrade request, and the Sec-WebSocket-Accept the server must answer with.
/// What the upgrade offers besides the basics.
pub struct Offer<'a> {
    /// Extra header lines, each ending in CRLF (`headers.rs`).
    pub headers: &'a str,
    pub deflate: bool,
}

/// The permessage-deflate offer: no context takeover either way, so the load generator, like
/// the server, holds no compression state per connection.
const DEFLATE_OFFER: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// A query value with every byte outside RFC 3986's unreserved set written `%XX` (as
/// `encodeURIComponent` does).
pub fn percent_encoded(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn request(host: &str, path: &str, offer: &Offer<'_>, rng: &mut Rng) -> (Vec<u8>, String) {
    let mut nonce = [0u8; 16];
    nonce[..8].copy_from_slice(&rng.next().to_le_bytes());
    nonce[8..].copy_from_slice(&rng.next().to_le_bytes());
    let key = base64::engine::general_purpose::STANDARD.encode(nonce);
    let mut auth = offer.headers.to_string();
    if offer.deflate {
        auth.push_str(&format!("Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n"));
    }
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
    );
    (req.into_bytes(), accept_for(&key))
}

pub fn accept_for(key: &str) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes())
}

/// Checks a complete response head (through the blank line): `Ok` for a 101 with the right
/// accept value, else the cause ("http 503", "bad accept").
pub fn check_response(head: &[u8], accept: &str, deflate: bool) -> Result<(), String> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or("");
    let code = status.split(' ').nth(1).unwrap_or("?");
    if code != "101" {
        return Err(format!("http {code}"));
    }
    let (mut ok, mut agreed) = (false, false);
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let k = k.trim();
            ok |= k.eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == accept;
            agreed |= k.eq_ignore_ascii_case("sec-websocket-extensions")
                && v.trim().starts_with("permessage-deflate");
        }
    }
    if !ok {
        return Err("bad accept".into());
    }
    if deflate && !agreed {
        return Err("permessage-deflate not agreed".into());
    }
    Ok(())
}

/// Appends one masked frame (FIN set) to `out`.
pub fn frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: u32) {
    out.push(0x80 | opcode);
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    let key = mask.to_be_bytes();
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
}

/// One frame from the server at the start of `buf`: (fin, opcode, payload range, frame
/// length), `Ok(None)` if incomplete, `Err` if the server masked it or it is too large.
#[allow(clippy::type_complexity)]
/// One frame at the start of `buf`: (rsv1, opcode, payload range, frame length), or `None`
/// while it is incomplete.
pub fn parse(
    buf: &[u8],
    max: usize,
) -> Result<Option<(bool, u8, std::ops::Range<usize>, usize)>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let rsv1 = buf[0] & 0x40 != 0;
    let opcode = buf[0] & 0x0f;
    if buf[1] & 0x80 != 0 {
        return Err("masked frame from the server".into());
    }
    let (len, head) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        126 | 127 => return Ok(None),
        n => (n as usize, 2),
    };
    if len > max {
        return Err(format!("frame of {len} bytes"));
    }
    if buf.len() < head + len {
        return Ok(None);
    }
    Ok(Some((rsv1, opcode, head..head + len, head + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names_are_escaped_as_encode_uri_component_does() {
        assert_eq!(percent_encoded("s10-7"), "s10-7");
        assert_eq!(percent_encoded("team/7 a+b"), "team%2F7%20a%2Bb");
        assert_eq!(percent_encoded("café"), "caf%C3%A9");
    }

    #[test]
    fn rfc_6455_accept_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn frames_round_trip_and_lengths() {
        let mut out = Vec::new();
        frame(&mut out, TEXT, b"Hello", 0x37fa213d);
        // RFC 6455 section 5.7: a masked "Hello".
        assert_eq!(
            out,
            [
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58
            ]
        );
        let server = [0x81, 0x05, b'H', b'e', b'l', b'l', b'o'];
        assert_eq!(parse(&server, 100), Ok(Some((false, TEXT, 2..7, 7))));
        let compressed = [0xc1, 0x02, 0xf2, 0x00];
        assert_eq!(parse(&compressed, 100), Ok(Some((true, TEXT, 2..4, 4))));
        assert_eq!(parse(&server[..4], 100), Ok(None));
        let mut big = vec![0x82, 126, 0x01, 0x00];
        big.extend(std::iter::repeat_n(0u8, 256));
        assert_eq!(parse(&big, 1000), Ok(Some((false, BINARY, 4..260, 260))));
        assert!(parse(&big, 100).is_err());
        assert!(
            parse(&out, 100).is_err(),
            "masked frames from a server are refused"
        );
    }

    #[test]
    fn responses() {
        let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: abc\r\n\r\n";
        assert_eq!(check_response(ok.as_bytes(), "abc", false), Ok(()));
        assert_eq!(
            check_response(ok.as_bytes(), "xyz", false),
            Err("bad accept".into())
        );
        let busy = "HTTP/1.1 503 Service Unavailable\r\n\r\n";
        assert_eq!(
            check_response(busy.as_bytes(), "abc", false),
            Err("http 503".into())
        );
        assert_eq!(
            check_response(ok.as_bytes(), "abc", true),
            Err("permessage-deflate not agreed".into())
        );
        let agreed = ok.replace(
            "\r\n\r\n",
            "\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n\r\n",
        );
        assert_eq!(check_response(agreed.as_bytes(), "abc", true), Ok(()));
    }
}
