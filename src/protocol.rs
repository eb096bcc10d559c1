//! The v1 wire format: JSON text frames in, JSON text frames out. No I/O.
//!
//! Parsing turns a frame into a typed [`ClientFrame`] or a [`FrameError`] carrying the stable
//! error code the peer is told; encoding turns broker events into frame text. Keeping this free
//! of sockets and storage lets every rule of `docs/protocol.md` be unit-tested here.

use std::fmt::Write as _;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::model::{Ack, ClientId, NameError, Payload, Resume, Target, TargetError, Topic};

/// The subprotocol the broker speaks (and answers with when the client offers none).
pub const SUBPROTOCOL: &str = "outboxd.v1.json";
/// Longest idempotency key in bytes.
pub const MAX_KEY_LEN: usize = 256;

/// Stable, snake_case error codes: clients branch on these, so they never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadFrame,
    /// An ack naming a seq the outbox has not assigned (extension of the v1 contract).
    BadAck,
    UnknownType,
    BadClientId,
    BadTopic,
    Unauthorized,
    Forbidden,
    OutboxFull,
    PayloadTooLarge,
    RateLimited,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::BadAck => "bad_ack",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadClientId => "bad_client_id",
            ErrorCode::BadTopic => "bad_topic",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::OutboxFull => "outbox_full",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
        }
    }
}

/// WebSocket close codes of the contract.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame that is not UTF-8 (RFC 6455: data inconsistent with its type).
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const REPLACED: u16 = 4000;
    pub const HEARTBEAT_TIMEOUT: u16 = 4001;
    /// An operator purged the client's outbox (extension of the v1 contract).
    pub const PURGED: u16 = 4002;
    pub const NO_HELLO: u16 = 4008;
    pub const TOO_SLOW: u16 = 4029;
}

/// A frame the broker could not accept, with what to tell the peer.
#[derive(Debug)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    /// The frame's `ref`, when it could be read, so the peer can match the error.
    pub reference: Option<Box<RawValue>>,
}

impl FrameError {
    fn new(code: ErrorCode, message: impl Into<String>, reference: Option<Box<RawValue>>) -> Self {
        Self {
            code,
            message: message.into(),
            reference,
        }
    }
}

#[derive(Debug)]
pub struct Publish {
    pub reference: Option<Box<RawValue>>,
    pub to: Target,
    pub payload: Payload,
    pub key: Option<String>,
    pub ttl_ms: Option<u64>,
}

/// The error code a refused target is answered with.
pub fn target_error_code(e: &TargetError) -> ErrorCode {
    match e {
        TargetError::Client(_) => ErrorCode::BadClientId,
        TargetError::Topic(_) => ErrorCode::BadTopic,
        TargetError::Kind(_) => ErrorCode::BadFrame,
    }
}

/// A frame from a client, validated.
#[derive(Debug)]
pub enum ClientFrame {
    Hello {
        client_id: ClientId,
        token: Option<String>,
        resume: Option<Resume>,
    },
    Ack(Ack),
    Publish(Publish),
    Subscribe {
        reference: Option<Box<RawValue>>,
        topic: Topic,
    },
    Unsubscribe {
        reference: Option<Box<RawValue>>,
        topic: Topic,
    },
    Ping,
    Pong,
    /// A fresh token for the running session (auth mode "jwt"), before the old one expires.
    Refresh {
        reference: Option<Box<RawValue>>,
        token: String,
    },
}

/// Keeps an explicit JSON `null` as a value (plain `Option` would turn it into "absent").
fn present<'de, D>(d: D) -> Result<Option<Box<RawValue>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Box::<RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct RawFrame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(rename = "ref", default, deserialize_with = "present")]
    reference: Option<Box<RawValue>>,
    client_id: Option<String>,
    token: Option<String>,
    resume: Option<Resume>,
    seq: Option<u64>,
    upto: Option<u64>,
    to: Option<String>,
    #[serde(default, deserialize_with = "present")]
    payload: Option<Box<RawValue>>,
    payload_b64: Option<String>,
    key: Option<String>,
    ttl_ms: Option<u64>,
    topic: Option<String>,
}

#[derive(Deserialize)]
struct RefOnly {
    #[serde(rename = "ref", default, deserialize_with = "present")]
    reference: Option<Box<RawValue>>,
}

/// Parses one text frame. `max_payload` bounds the payload's size in bytes.
///
/// Errors carry the code to answer with; they never depend on stored state.
pub fn parse_client_frame(text: &str, max_payload: usize) -> Result<ClientFrame, FrameError> {
    let raw: RawFrame = match serde_json::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let reference = serde_json::from_str::<RefOnly>(text)
                .ok()
                .and_then(|r| r.reference);
            let msg = match serde_json::from_str::<serde_json::Value>(text) {
                Err(_) => format!("frame is not JSON: {e}"),
                Ok(v) if !v.is_object() => {
                    "frame must be a JSON object with a \"type\"".to_string()
                }
                Ok(_) => format!("invalid frame: {e}"),
            };
            return Err(FrameError::new(ErrorCode::BadFrame, msg, reference));
        }
    };
    let reference = raw.reference;
    let bad = |msg: &str, reference: Option<Box<RawValue>>| {
        FrameError::new(ErrorCode::BadFrame, msg, reference)
    };
    match raw.kind.as_str() {
        "hello" => {
            let Some(id) = raw.client_id else {
                return Err(bad("hello needs a client_id", reference));
            };
            let client_id = ClientId::new(&id).map_err(|e: NameError| {
                FrameError::new(ErrorCode::BadClientId, e.to_string(), reference)
            })?;
            Ok(ClientFrame::Hello {
                client_id,
                token: raw.token,
                resume: raw.resume,
            })
        }
        "ack" => match (raw.seq, raw.upto) {
            (Some(seq), None) => Ok(ClientFrame::Ack(Ack::Seq(seq))),
            (None, Some(upto)) => Ok(ClientFrame::Ack(Ack::Upto(upto))),
            (Some(_), Some(_)) => Err(bad("ack takes `seq` or `upto`, not both", reference)),
            (None, None) => Err(bad("ack needs `seq` or `upto`", reference)),
        },
        "publish" => {
            let Some(to) = raw.to else {
                return Err(bad("publish needs `to`", reference));
            };
            let to = match Target::parse(&to) {
                Ok(t) => t,
                Err(e) => {
                    return Err(FrameError::new(
                        target_error_code(&e),
                        e.to_string(),
                        reference,
                    ))
                }
            };
            let payload = match (raw.payload, raw.payload_b64) {
                (Some(json), None) => Payload::Json(json.get().to_owned()),
                (None, Some(b64)) => {
                    match base64::engine::general_purpose::STANDARD.decode(b64.as_bytes()) {
                        Ok(bytes) => Payload::Binary(bytes),
                        Err(e) => {
                            return Err(bad(&format!("payload_b64 is not base64: {e}"), reference))
                        }
                    }
                }
                (Some(_), Some(_)) => {
                    return Err(bad(
                        "publish takes `payload` or `payload_b64`, not both",
                        reference,
                    ))
                }
                (None, None) => {
                    return Err(bad("publish needs `payload` or `payload_b64`", reference))
                }
            };
            if payload.len() > max_payload {
                return Err(FrameError::new(
                    ErrorCode::PayloadTooLarge,
                    format!(
                        "payload is {} bytes, the limit is {max_payload}",
                        payload.len()
                    ),
                    reference,
                ));
            }
            if let Some(key) = &raw.key {
                if key.is_empty() || key.len() > MAX_KEY_LEN {
                    return Err(bad(
                        &format!("`key` must be 1 to {MAX_KEY_LEN} bytes"),
                        reference,
                    ));
                }
            }
            Ok(ClientFrame::Publish(Publish {
                reference,
                to,
                payload,
                key: raw.key,
                ttl_ms: raw.ttl_ms,
            }))
        }
        "refresh" => match raw.token {
            Some(token) => Ok(ClientFrame::Refresh { reference, token }),
            None => Err(bad("refresh needs `token`", reference)),
        },
        kind @ ("subscribe" | "unsubscribe") => {
            let Some(topic) = raw.topic else {
                return Err(bad(&format!("{kind} needs `topic`"), reference));
            };
            let topic = match Topic::new(&topic) {
                Ok(t) => t,
                Err(e) => {
                    return Err(FrameError::new(
                        ErrorCode::BadTopic,
                        e.to_string(),
                        reference,
                    ))
                }
            };
            if kind == "subscribe" {
                Ok(ClientFrame::Subscribe { reference, topic })
            } else {
                Ok(ClientFrame::Unsubscribe { reference, topic })
            }
        }
        "ping" => Ok(ClientFrame::Ping),
        "pong" => Ok(ClientFrame::Pong),
        other => Err(FrameError::new(
            ErrorCode::UnknownType,
            format!("unknown frame type {other:?}"),
            reference,
        )),
    }
}

/// What the broker tells a client after `hello`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Welcome {
    pub client_id: String,
    pub epoch: String,
    pub resumed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    pub last_seq: u64,
    pub next_seq: u64,
    pub pending: u64,
    pub missed: u64,
    pub heartbeat_ms: u64,
    pub max_inflight: u32,
}

#[derive(Serialize)]
struct Tagged<'a, T> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(flatten)]
    body: T,
}

pub fn encode_welcome(w: &Welcome) -> String {
    serde_json::to_string(&Tagged {
        kind: "welcome",
        body: w,
    })
    .unwrap_or_else(|_| String::from(r#"{"type":"welcome"}"#))
}

/// One recipient a topic publish could not be written for.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Refused {
    pub client_id: String,
    pub code: &'static str,
}

#[derive(Serialize)]
struct OkFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recipients: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
    #[serde(skip_serializing_if = "<[Refused]>::is_empty")]
    refused: &'a [Refused],
}

/// `ok` for subscribe / unsubscribe.
pub fn encode_ok(reference: Option<&RawValue>) -> String {
    serde_json::to_string(&OkFrame {
        kind: "ok",
        reference,
        id: None,
        recipients: None,
        duplicate: false,
        refused: &[],
    })
    .unwrap_or_else(|_| String::from(r#"{"type":"ok"}"#))
}

/// `ok` for a publish that is durable in every recipient's outbox it names.
pub fn encode_publish_ok(
    reference: Option<&RawValue>,
    id: &str,
    recipients: u64,
    duplicate: bool,
    refused: &[Refused],
) -> String {
    serde_json::to_string(&OkFrame {
        kind: "ok",
        reference,
        id: Some(id),
        recipients: Some(recipients),
        duplicate,
        refused,
    })
    .unwrap_or_else(|_| String::from(r#"{"type":"ok"}"#))
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a RawValue>,
    code: &'static str,
    message: &'a str,
}

pub fn encode_error(reference: Option<&RawValue>, code: ErrorCode, message: &str) -> String {
    serde_json::to_string(&ErrorFrame {
        kind: "error",
        reference,
        code: code.as_str(),
        message,
    })
    .unwrap_or_else(|_| String::from(r#"{"type":"error","code":"internal","message":""}"#))
}

pub const PING: &str = r#"{"type":"ping"}"#;
pub const PONG: &str = r#"{"type":"pong"}"#;

/// The parts of a `msg` frame.
pub struct MsgView<'a> {
    pub seq: u64,
    pub id: &'a str,
    pub ts: u64,
    pub from: Option<&'a str>,
    pub topic: Option<&'a str>,
    pub payload: &'a Payload,
    pub redelivered: bool,
}

/// Encodes a `msg` frame. Written by hand because it is the hot path: the JSON payload is
/// stored verbatim and copied once, and `id`, `from` and `topic` come from alphabets that need
/// no escaping (checked in debug builds).
pub fn encode_msg(m: &MsgView<'_>) -> String {
    debug_assert!(m.id.bytes().all(|b| b.is_ascii_alphanumeric()));
    let mut out = String::with_capacity(96 + m.payload.len() * 4 / 3);
    let _ = write!(
        out,
        r#"{{"type":"msg","seq":{},"id":"{}","ts":{}"#,
        m.seq, m.id, m.ts
    );
    if let Some(from) = m.from {
        let _ = write!(out, r#","from":"{from}""#);
    }
    if let Some(topic) = m.topic {
        let _ = write!(out, r#","topic":"{topic}""#);
    }
    if m.redelivered {
        out.push_str(r#","redelivered":true"#);
    }
    match m.payload {
        Payload::Json(raw) => {
            out.push_str(r#","payload":"#);
            out.push_str(raw);
        }
        Payload::Binary(bytes) => {
            out.push_str(r#","payload_b64":""#);
            base64::engine::general_purpose::STANDARD.encode_string(bytes, &mut out);
            out.push('"');
        }
    }
    out.push('}');
    out
}

/// JSON text without the whitespace between its tokens (inside strings everything stays).
/// Strings cannot hold raw control characters, so the result has no line breaks: one line of
/// NDJSON. Meant for valid JSON; it does not check.
pub fn compact_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in text.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn parse(s: &str) -> Result<ClientFrame, FrameError> {
        parse_client_frame(s, 1024)
    }

    fn code(s: &str) -> ErrorCode {
        match parse(s) {
            Err(e) => e.code,
            Ok(f) => panic!("expected an error for {s}, got {f:?}"),
        }
    }

    #[test]
    fn hello_with_resume_parses() {
        let f = parse(r#"{"type":"hello","client_id":"alice","resume":{"epoch":"E","last_seq":41},"extra":1}"#)
            .unwrap();
        match f {
            ClientFrame::Hello {
                client_id,
                resume,
                token,
            } => {
                assert_eq!(client_id.as_str(), "alice");
                assert_eq!(
                    resume,
                    Some(Resume {
                        epoch: "E".into(),
                        last_seq: 41
                    })
                );
                assert_eq!(token, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hello_with_bad_client_id_is_bad_client_id() {
        assert_eq!(
            code(r#"{"type":"hello","client_id":"a b"}"#),
            ErrorCode::BadClientId
        );
        assert_eq!(code(r#"{"type":"hello"}"#), ErrorCode::BadFrame);
    }

    #[test]
    fn not_json_and_wrong_field_types_are_bad_frame_keeping_ref() {
        assert_eq!(code("nope"), ErrorCode::BadFrame);
        assert_eq!(code("[1,2]"), ErrorCode::BadFrame);
        let e = parse(r#"{"type":"ack","seq":"x","ref":7}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadFrame);
        assert_eq!(e.reference.unwrap().get(), "7");
        assert_eq!(code(r#"{"seq":1}"#), ErrorCode::BadFrame);
        assert_eq!(code(r#"{"type":"ack","seq":-1}"#), ErrorCode::BadFrame);
    }

    #[test]
    fn ack_needs_exactly_one_of_seq_and_upto() {
        assert!(matches!(
            parse(r#"{"type":"ack","seq":3}"#),
            Ok(ClientFrame::Ack(Ack::Seq(3)))
        ));
        assert!(matches!(
            parse(r#"{"type":"ack","upto":9}"#),
            Ok(ClientFrame::Ack(Ack::Upto(9)))
        ));
        assert_eq!(code(r#"{"type":"ack"}"#), ErrorCode::BadFrame);
        assert_eq!(
            code(r#"{"type":"ack","seq":1,"upto":2}"#),
            ErrorCode::BadFrame
        );
    }

    #[test]
    fn publish_keeps_json_payload_verbatim_including_null() {
        match parse(r#"{"type":"publish","ref":"r1","to":"client:bob","payload":{"a": [1, 2]}}"#)
            .unwrap()
        {
            ClientFrame::Publish(p) => {
                assert_eq!(p.payload, Payload::Json(r#"{"a": [1, 2]}"#.into()));
                assert_eq!(p.reference.unwrap().get(), r#""r1""#);
                assert_eq!(p.to, Target::Client(ClientId::new("bob").unwrap()));
            }
            other => panic!("{other:?}"),
        }
        match parse(r#"{"type":"publish","to":"topic:t","payload":null}"#).unwrap() {
            ClientFrame::Publish(p) => assert_eq!(p.payload, Payload::Json("null".into())),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn publish_errors_carry_their_codes() {
        assert_eq!(
            code(r#"{"type":"publish","to":"client:a b","payload":1}"#),
            ErrorCode::BadClientId
        );
        assert_eq!(
            code(r#"{"type":"publish","to":"topic:a#","payload":1}"#),
            ErrorCode::BadTopic
        );
        assert_eq!(
            code(r#"{"type":"publish","to":"queue:x","payload":1}"#),
            ErrorCode::BadFrame
        );
        assert_eq!(
            code(r#"{"type":"publish","to":"client:b"}"#),
            ErrorCode::BadFrame
        );
        assert_eq!(
            code(r#"{"type":"publish","to":"client:b","payload_b64":"!!"}"#),
            ErrorCode::BadFrame
        );
        let big = format!(
            r#"{{"type":"publish","to":"client:b","payload":"{}"}}"#,
            "x".repeat(2000)
        );
        assert_eq!(code(&big), ErrorCode::PayloadTooLarge);
        assert_eq!(
            code(r#"{"type":"publish","to":"client:b","payload":1,"key":""}"#),
            ErrorCode::BadFrame
        );
    }

    #[test]
    fn unknown_type_is_its_own_code() {
        assert_eq!(code(r#"{"type":"shout","ref":1}"#), ErrorCode::UnknownType);
    }

    #[test]
    fn msg_frame_is_valid_json_with_the_contract_fields() {
        let p = Payload::Json(r#"{"hi":"there"}"#.into());
        let s = encode_msg(&MsgView {
            seq: 5,
            id: "00ab",
            ts: 77,
            from: Some("alice"),
            topic: Some("news/eu"),
            payload: &p,
            redelivered: true,
        });
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["type"], "msg");
        assert_eq!(v["seq"], 5);
        assert_eq!(v["id"], "00ab");
        assert_eq!(v["from"], "alice");
        assert_eq!(v["topic"], "news/eu");
        assert_eq!(v["redelivered"], true);
        assert_eq!(v["payload"]["hi"], "there");
        let b = Payload::Binary(vec![0, 255, 1]);
        let s = encode_msg(&MsgView {
            seq: 1,
            id: "1",
            ts: 0,
            from: None,
            topic: None,
            payload: &b,
            redelivered: false,
        });
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["payload_b64"], "AP8B");
        assert!(v.get("redelivered").is_none() && v.get("from").is_none());
    }

    #[test]
    fn ok_and_error_frames_echo_the_ref() {
        let r = RawValue::from_string("\"x\"".into()).unwrap();
        let v: Value =
            serde_json::from_str(&encode_publish_ok(Some(&r), "9", 2, true, &[])).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"ok","ref":"x","id":"9","recipients":2,"duplicate":true})
        );
        let v: Value =
            serde_json::from_str(&encode_error(None, ErrorCode::OutboxFull, "full")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"error","code":"outbox_full","message":"full"})
        );
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// JSON built from the protocol's own field names and every kind of value, so the
        /// generator reaches deep into the decoder rather than failing at the first key.
        fn frame_like() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(
                    |f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
                ),
                prop_oneof![
                    Just("hello"),
                    Just("publish"),
                    Just("ack"),
                    Just("subscribe"),
                    Just("unsubscribe"),
                    Just("ping"),
                    Just("pong"),
                    Just("client:bob"),
                    Just("topic:news"),
                    Just("topic:"),
                    Just("client:"),
                    Just("AAEC"),
                    Just("=="),
                ]
                .prop_map(|s| Value::String(s.to_string())),
                ".{0,40}".prop_map(Value::String),
            ];
            let keys = prop_oneof![
                Just("type"),
                Just("ref"),
                Just("to"),
                Just("payload"),
                Just("payload_b64"),
                Just("key"),
                Just("ttl_ms"),
                Just("seq"),
                Just("upto"),
                Just("client_id"),
                Just("resume"),
                Just("epoch"),
                Just("last_seq"),
                Just("topic"),
                Just("token"),
            ];
            leaf.prop_recursive(4, 48, 8, move |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map(keys.clone(), inner, 0..8).prop_map(|m| {
                        Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
                    }),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn any_text_is_a_frame_or_a_clear_error(s in "\\PC{0,200}") {
                if let Err(e) = parse_client_frame(&s, 64) {
                    prop_assert!(!e.message.is_empty());
                }
            }

            #[test]
            fn any_frame_shaped_json_is_a_frame_or_a_clear_error(v in frame_like()) {
                if let Err(e) = parse_client_frame(&v.to_string(), 64) {
                    prop_assert!(!e.message.is_empty());
                }
            }

            #[test]
            fn truncated_valid_frames_are_errors(cut in 0usize..60) {
                let full = r#"{"type":"publish","ref":7,"to":"client:bob","payload":{"a":[1,2]}}"#;
                let cut = cut.min(full.len() - 1);
                prop_assert!(parse_client_frame(&full[..cut], 1024).is_err());
            }
        }
    }
}
