//! The relay protocol (docs/protocol.md): what clients ask (join, leave, publish, send, count)
//! and what the server answers, in JSON over text frames or MsgPack over binary frames.
//!
//! Messages are decoded once into `Request`; `data` is kept as a MsgPack value, which both
//! encodings map into. Anything sent to many receivers is an `Outgoing` that encodes itself at
//! most once per encoding, lazily, and is shared (`Arc`) across every receiver and loop.

use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use super::deflate::{Codec, THRESHOLD};
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
    /// refresh: the connection's new token.
    #[serde(default)]
    pub token: Option<String>,
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
    /// The sender's user (its token's `sub`) on a server that requires tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<u64>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_data"
    )]
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
    /// hello and refreshed: when the connection's token ends (seconds since the epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
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

    /// The whole WebSocket frame for this reply in `enc`. Never fails: `data` is made
    /// JSON-safe for JSON receivers (see `json_safe`), and should encoding still fail, the
    /// receiver gets an error message instead of the server losing a loop.
    pub fn frame(&self, enc: Encoding) -> Vec<u8> {
        let encoded = match enc {
            Encoding::Json => serde_json::to_vec(self).map_err(|e| e.to_string()),
            Encoding::MsgPack => rmp_serde::to_vec_named(self).map_err(|e| e.to_string()),
        };
        let payload = encoded.unwrap_or_else(|e| {
            let fallback = Reply::error(
                "encoding_failed",
                format!("cannot encode a {} message: {e}", self.op),
                None,
            );
            match enc {
                Encoding::Json => serde_json::to_vec(&fallback).unwrap_or_default(),
                Encoding::MsgPack => rmp_serde::to_vec_named(&fallback).unwrap_or_default(),
            }
        });
        let opcode = if enc == Encoding::Json {
            OP_TEXT
        } else {
            OP_BINARY
        };
        frame::frame(opcode, &payload)
    }
}

/// `data` as MsgPack natively, and as JSON-safe JSON for text receivers (serde_json is the
/// only human-readable serializer we use).
fn serialize_data<S: serde::Serializer>(v: &Option<rmpv::Value>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) if s.is_human_readable() => json_safe(v).serialize(s),
        Some(v) => v.serialize(s),
        None => s.serialize_none(),
    }
}

/// MsgPack values have no JSON form when map keys are not strings, bytes are binary, or
/// floats are not finite. JSON receivers get: non-string keys as their JSON text (`1`, `true`,
/// `[1,2]`), binary as an array of byte values, extension types as `{"ext": type, "data":
/// [bytes]}`, NaN and infinities as null.
pub fn json_safe(v: &rmpv::Value) -> serde_json::Value {
    use rmpv::Value as M;
    use serde_json::Value as J;
    match v {
        M::Nil => J::Null,
        M::Boolean(b) => J::Bool(*b),
        M::Integer(i) => i
            .as_u64()
            .map(J::from)
            .or_else(|| i.as_i64().map(J::from))
            .unwrap_or(J::Null),
        M::F32(f) => serde_json::Number::from_f64(*f as f64).map_or(J::Null, J::Number),
        M::F64(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        M::String(s) => J::String(match s.as_str() {
            Some(s) => s.to_string(),
            None => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        }),
        M::Binary(b) => J::Array(b.iter().map(|x| J::from(*x)).collect()),
        M::Array(a) => J::Array(a.iter().map(json_safe).collect()),
        M::Map(m) => J::Object(
            m.iter()
                .map(|(k, v)| {
                    let key = match k {
                        M::String(s) if s.as_str().is_some() => {
                            s.as_str().unwrap_or_default().to_string()
                        }
                        other => json_safe(other).to_string(),
                    };
                    (key, json_safe(v))
                })
                .collect(),
        ),
        M::Ext(t, data) => serde_json::json!({ "ext": t, "data": data }),
    }
}

/// A reply sent to many receivers: encoded at most once per encoding, lazily. One that came
/// from another worker holds only its MsgPack form; JSON is derived from it when needed.
#[derive(Debug)]
pub struct Outgoing {
    pub reply: Option<Reply>,
    /// The encoded frames, shared (a connection that cannot take a frame at once queues the
    /// `Arc`, not a copy, and not this whole message with its decoded data).
    json: OnceLock<Arc<[u8]>>,
    msgpack: OnceLock<Arc<[u8]>>,
    /// The permessage-deflate frames (RSV1), compressed at most once per encoding by the
    /// first loop that needs one; `None` when compressing would not make it shorter.
    json_deflated: OnceLock<Option<Arc<[u8]>>>,
    msgpack_deflated: OnceLock<Option<Arc<[u8]>>>,
}

impl Outgoing {
    pub fn new(reply: Reply) -> Arc<Outgoing> {
        Arc::new(Outgoing {
            reply: Some(reply),
            json: OnceLock::new(),
            msgpack: OnceLock::new(),
            json_deflated: OnceLock::new(),
            msgpack_deflated: OnceLock::new(),
        })
    }

    /// A message received from another worker as the MsgPack payload of a reply.
    pub fn from_msgpack(payload: Vec<u8>) -> Arc<Outgoing> {
        let msgpack = OnceLock::new();
        let _ = msgpack.set(Arc::from(frame::frame(OP_BINARY, &payload)));
        Arc::new(Outgoing {
            reply: None,
            json: OnceLock::new(),
            msgpack,
            json_deflated: OnceLock::new(),
            msgpack_deflated: OnceLock::new(),
        })
    }

    pub fn frame(&self, enc: Encoding) -> &[u8] {
        self.shared(enc)
    }

    /// The permessage-deflate frame for `enc`, compressed with `codec` on first use and
    /// shared by every receiver that negotiated the extension; `None` for a message under
    /// the threshold or one that does not shrink.
    pub fn deflated(&self, enc: Encoding, codec: &mut Codec) -> Option<&Arc<[u8]>> {
        let cell = match enc {
            Encoding::Json => &self.json_deflated,
            Encoding::MsgPack => &self.msgpack_deflated,
        };
        cell.get_or_init(|| deflate_frame(self.frame(enc), codec).map(Arc::from))
            .as_ref()
    }

    /// The frame for `enc`, encoded on first use, as a shared buffer.
    pub fn shared(&self, enc: Encoding) -> &Arc<[u8]> {
        static EMPTY: OnceLock<Arc<[u8]>> = OnceLock::new();
        match (enc, &self.reply) {
            (Encoding::Json, Some(r)) => self.json.get_or_init(|| Arc::from(r.frame(enc))),
            (Encoding::MsgPack, Some(r)) => self.msgpack.get_or_init(|| Arc::from(r.frame(enc))),
            (Encoding::Json, None) => self.json.get_or_init(|| {
                let value = rmpv::decode::read_value(&mut self.payload(Encoding::MsgPack))
                    .unwrap_or(rmpv::Value::Nil);
                Arc::from(frame::frame(
                    OP_TEXT,
                    &serde_json::to_vec(&json_safe(&value)).unwrap_or_default(),
                ))
            }),
            (Encoding::MsgPack, None) => self
                .msgpack
                .get()
                .unwrap_or_else(|| EMPTY.get_or_init(|| Arc::from(Vec::new()))),
        }
    }

    /// The frame's payload, without the WebSocket header.
    pub fn payload(&self, enc: Encoding) -> &[u8] {
        frame::server_payload(self.frame(enc))
    }
}

/// A whole unmasked frame of ours, compressed (RSV1 set), or `None` when it is under the
/// threshold, not a single-frame data message, or does not shrink.
pub fn deflate_frame(frame: &[u8], codec: &mut Codec) -> Option<Vec<u8>> {
    let b0 = *frame.first()?;
    let opcode = b0 & 0x0F;
    let payload = frame::server_payload(frame);
    if b0 & 0x80 == 0 || !(opcode == OP_TEXT || opcode == OP_BINARY) || payload.len() < THRESHOLD {
        return None;
    }
    let compressed = codec.compress(payload)?;
    let mut out = frame::frame(opcode, &compressed);
    out[0] |= 0x40;
    Some(out)
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
        && !is_room_name(room)
    {
        return Err(format!("room names are 1 to {MAX_ROOM_NAME} bytes"));
    }
    Ok(req)
}

/// Whether `name` may name a room: 1 to `MAX_ROOM_NAME` bytes.
pub fn is_room_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_ROOM_NAME
}

/// The `ref` of a request that did not decode (a field of the wrong type, a bad room name), so
/// its error can still be matched to it.
pub fn salvage_ref(payload: &[u8], enc: Encoding) -> Option<rmpv::Value> {
    let value: rmpv::Value = match enc {
        Encoding::Json => serde_json::from_slice(payload).ok()?,
        Encoding::MsgPack => rmpv::decode::read_value(&mut &payload[..]).ok()?,
    };
    let map = value.as_map()?;
    map.iter()
        .find(|(k, _)| k.as_str() == Some("ref"))
        .map(|(_, v)| v.clone())
        .filter(|v| !v.is_nil())
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn msgpack_only_values_still_reach_json_receivers() {
        use rmpv::Value as M;
        let data = M::Map(vec![
            (M::Boolean(true), "t".into()),
            (M::Nil, "n".into()),
            (M::F64(1.5), "f".into()),
            (M::Array(vec![1.into(), 2.into()]), "a".into()),
            ("bin".into(), M::Binary(vec![0, 255])),
            ("inf".into(), M::F64(f64::INFINITY)),
            ("ext".into(), M::Ext(5, vec![1])),
        ]);
        let reply = Reply {
            op: "message",
            data: Some(data.clone()),
            ..Reply::default()
        };
        let json: serde_json::Value =
            serde_json::from_slice(frame::server_payload(&reply.frame(Encoding::Json))).unwrap();
        assert_eq!(json["data"]["true"], "t");
        assert_eq!(json["data"]["null"], "n");
        assert_eq!(json["data"]["1.5"], "f");
        assert_eq!(json["data"]["[1,2]"], "a");
        assert_eq!(json["data"]["bin"], serde_json::json!([0, 255]));
        assert!(json["data"]["inf"].is_null());
        assert_eq!(json["data"]["ext"]["ext"], 5);
        // MsgPack receivers get the value untouched.
        let mp = reply.frame(Encoding::MsgPack);
        let back = rmpv::decode::read_value(&mut frame::server_payload(&mp)).unwrap();
        assert_eq!(back["data"], data);
    }

    #[test]
    fn a_bad_request_keeps_its_ref() {
        let bad = br#"{"op":"join","room":5,"ref":"r1"}"#;
        assert!(decode(bad, Encoding::Json).is_err());
        assert_eq!(salvage_ref(bad, Encoding::Json), Some("r1".into()));
        assert_eq!(salvage_ref(b"{", Encoding::Json), None);
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
        let j = frame::server_payload(out.frame(Encoding::Json)).len();
        let m = frame::server_payload(out.frame(Encoding::MsgPack)).len();
        assert!(m < j, "msgpack {m} >= json {j}");
        let text: serde_json::Value =
            serde_json::from_slice(frame::server_payload(out.frame(Encoding::Json))).unwrap();
        assert_eq!(text["data"]["type"], "offer");
        assert!(text.get("id").is_none(), "absent fields are omitted");
    }
}
