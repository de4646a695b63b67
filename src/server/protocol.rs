//! The relay protocol (docs/protocol.md): what clients ask (join, leave, publish, send, count)
//! and what the server answers, in JSON over text frames or MsgPack over binary frames.
//!
//! Messages are decoded once into `Request`; `data` is kept as a MsgPack value, which both
//! encodings map into. Anything sent to many receivers is an `Outgoing` that encodes itself at
//! most once per encoding, lazily, and is shared (`Arc`) across every receiver and loop.

use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use super::frame::{self, OP_BINARY, OP_TEXT};

/// How a connection's messages are encoded: the frame type it last sent, or `?encoding=msgpack`
/// in the URL before it has sent anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Json,
    MsgPack,
}

/// Longest room name, in bytes.
pub const MAX_ROOM_NAME: usize = 128;

/// A client request.
#[derive(Debug, Deserialize)]
pub struct Request {
    pub op: String,
    #[serde(default)]
    pub room: Option<String>,
    #[serde(default)]
    pub to: Option<u64>,
    #[serde(default)]
    pub data: Option<rmpv::Value>,
    /// Echoed back in the reply so clients can match replies to requests.
    #[serde(default, rename = "ref")]
    pub reference: Option<rmpv::Value>,
    /// publish: also deliver to the sender (default false).
    #[serde(default)]
    pub echo: bool,
}

/// What the server sends. One shape for all messages; absent fields are omitted.
#[derive(Debug, Default, Serialize)]
pub struct Reply {
    pub op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub members: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<rmpv::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<rmpv::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ping_interval: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ping_timeout: Option<u64>,
}

impl Reply {
    pub fn error(
        code: &'static str,
        message: impl Into<String>,
        reference: Option<rmpv::Value>,
    ) -> Reply {
        Reply {
            op: "error",
            code: Some(code),
            message: Some(message.into()),
            reference,
            ..Reply::default()
        }
    }

    /// The whole WebSocket frame for this reply in `enc`.
    pub fn frame(&self, enc: Encoding) -> Vec<u8> {
        match enc {
            Encoding::Json => frame::frame(
                OP_TEXT,
                &serde_json::to_vec(self).expect("replies serialise to JSON"),
            ),
            Encoding::MsgPack => frame::frame(
                OP_BINARY,
                &rmp_serde::to_vec_named(self).expect("replies serialise to MsgPack"),
            ),
        }
    }
}

/// A reply sent to many receivers: encoded at most once per encoding.
#[derive(Debug)]
pub struct Outgoing {
    pub reply: Reply,
    json: OnceLock<Vec<u8>>,
    msgpack: OnceLock<Vec<u8>>,
}

impl Outgoing {
    pub fn new(reply: Reply) -> Arc<Outgoing> {
        Arc::new(Outgoing {
            reply,
            json: OnceLock::new(),
            msgpack: OnceLock::new(),
        })
    }

    pub fn frame(&self, enc: Encoding) -> &[u8] {
        match enc {
            Encoding::Json => self.json.get_or_init(|| self.reply.frame(enc)),
            Encoding::MsgPack => self.msgpack.get_or_init(|| self.reply.frame(enc)),
        }
    }
}

/// Decodes a request from a text (JSON) or binary (MsgPack) message.
pub fn decode(payload: &[u8], enc: Encoding) -> Result<Request, String> {
    let req: Request = match enc {
        Encoding::Json => serde_json::from_slice(payload).map_err(|e| format!("bad JSON: {e}"))?,
        Encoding::MsgPack => {
            rmp_serde::from_slice(payload).map_err(|e| format!("bad MsgPack: {e}"))?
        }
    };
    if let Some(room) = &req.room
        && (room.is_empty() || room.len() > MAX_ROOM_NAME)
    {
        return Err(format!("room names are 1 to {MAX_ROOM_NAME} bytes"));
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(frame: &[u8]) -> &[u8] {
        let len = frame[1] & 0x7F;
        match len {
            126 => &frame[4..],
            127 => &frame[10..],
            _ => &frame[2..],
        }
    }

    #[test]
    fn json_and_msgpack_decode_to_the_same_request() {
        let j = decode(
            br#"{"op":"publish","room":"lobby","data":{"sdp":"x","n":[1,2]},"ref":7}"#,
            Encoding::Json,
        )
        .unwrap();
        let map = |kv: Vec<(&str, rmpv::Value)>| {
            rmpv::Value::Map(kv.into_iter().map(|(k, v)| (k.into(), v)).collect())
        };
        let value = map(vec![
            ("op", "publish".into()),
            ("room", "lobby".into()),
            (
                "data",
                map(vec![
                    ("sdp", "x".into()),
                    ("n", rmpv::Value::Array(vec![1.into(), 2.into()])),
                ]),
            ),
            ("ref", 7.into()),
        ]);
        let mut mp = Vec::new();
        rmpv::encode::write_value(&mut mp, &value).unwrap();
        let m = decode(&mp, Encoding::MsgPack).unwrap();
        assert_eq!(j.op, m.op);
        assert_eq!(j.room, m.room);
        assert_eq!(j.data, m.data);
        assert_eq!(j.reference, m.reference);
    }

    #[test]
    fn bad_requests_say_why() {
        assert!(
            decode(b"{", Encoding::Json)
                .unwrap_err()
                .contains("bad JSON")
        );
        assert!(
            decode(b"\xc1", Encoding::MsgPack)
                .unwrap_err()
                .contains("bad MsgPack")
        );
        let long = format!(r#"{{"op":"join","room":"{}"}}"#, "r".repeat(200));
        assert!(decode(long.as_bytes(), Encoding::Json).is_err());
    }

    #[test]
    fn msgpack_is_smaller_than_json_for_a_signaling_message() {
        let reply = Reply {
            op: "message",
            room: Some("call-42".into()),
            from: Some(123456),
            data: Some(rmpv::Value::Map(vec![
                ("type".into(), "offer".into()),
                ("sdp".into(), "v=0 o=- 46117317 2 IN IP4 127.0.0.1".into()),
            ])),
            ..Reply::default()
        };
        let out = Outgoing::new(reply);
        let j = payload(out.frame(Encoding::Json)).len();
        let m = payload(out.frame(Encoding::MsgPack)).len();
        assert!(m < j, "msgpack {m} >= json {j}");
        let text: serde_json::Value =
            serde_json::from_slice(payload(out.frame(Encoding::Json))).unwrap();
        assert_eq!(text["data"]["type"], "offer");
        assert!(text.get("id").is_none(), "absent fields are omitted");
    }
}
