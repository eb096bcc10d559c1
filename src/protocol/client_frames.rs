//! The frames a client sends: `hello`, `ack`, `publish`, `subscribe`, `unsubscribe`,
//! `refresh`, `ping` and `pong`.
//!
//! The broker parses them into a validated [`ClientFrame`] or a [`FrameError`] carrying the
//! stable error code the peer is told; the Rust client writes them with the `encode_*`
//! functions, which only ever write what the parser accepts (the round trips below).

use std::borrow::Cow;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{
    present, present_borrowed, read_body, write_body, write_json_string, BodyError, ErrorCode,
    Split, MAX_KEY_LEN,
};
use crate::model::{Ack, ClientId, NameError, Payload, Resume, Target, TargetError, Topic};

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
        /// The client only publishes: when this connection ends, the broker forgets it if its
        /// outbox is empty and it holds no subscription.
        transient: bool,
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

/// A client frame as JSON has it. Strings borrow from the frame's text where they hold no
/// escape; the payload always does (it is copied once, into the [`Payload`]).
#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(rename = "ref", default, deserialize_with = "present")]
    reference: Option<Box<RawValue>>,
    client_id: Option<String>,
    token: Option<String>,
    resume: Option<Resume>,
    transient: Option<bool>,
    seq: Option<u64>,
    upto: Option<u64>,
    #[serde(borrow)]
    to: Option<Text<'a>>,
    #[serde(borrow, default, deserialize_with = "present_borrowed")]
    payload: Option<&'a RawValue>,
    #[serde(borrow)]
    payload_b64: Option<Text<'a>>,
    key: Option<String>,
    ttl_ms: Option<u64>,
    #[serde(borrow)]
    topic: Option<Text<'a>>,
}

/// A string field, borrowed from the frame's text unless it holds an escape. (An
/// `Option<Cow<str>>` field would always copy: serde borrows only a `Cow` it sees directly.)
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl Text<'_> {
    fn get(&self) -> &str {
        &self.0
    }
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
    read(text, Split::of(text), max_payload)
}

/// [`parse_client_frame`], reading the frame split when `split` is given (see [`Split`]).
fn read(text: &str, split: Option<Split>, max_payload: usize) -> Result<ClientFrame, FrameError> {
    if let Some(split) = split {
        if let Ok(raw) = serde_json::from_str::<RawFrame>(&split.rest) {
            return validate(raw, Some(split.payload), max_payload);
        }
    }
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
    let payload = raw.payload.map(RawValue::get);
    validate(raw, payload, max_payload)
}

/// A frame serde_json read, checked field by field; `payload` is its payload's JSON text.
fn validate(
    raw: RawFrame<'_>,
    payload: Option<&str>,
    max_payload: usize,
) -> Result<ClientFrame, FrameError> {
    let reference = raw.reference;
    let bad = |msg: &str, reference: Option<Box<RawValue>>| {
        FrameError::new(ErrorCode::BadFrame, msg, reference)
    };
    match raw.kind.as_ref() {
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
                transient: raw.transient.unwrap_or(false),
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
            let to = match Target::parse(to.get()) {
                Ok(t) => t,
                Err(e) => {
                    return Err(FrameError::new(
                        target_error_code(&e),
                        e.to_string(),
                        reference,
                    ))
                }
            };
            let payload = match read_body(payload, raw.payload_b64.as_ref().map(Text::get)) {
                Ok(payload) => payload,
                Err(BodyError::Base64(e)) => {
                    return Err(bad(&format!("payload_b64 is not base64: {e}"), reference))
                }
                Err(BodyError::Both) => {
                    return Err(bad(
                        "publish takes `payload` or `payload_b64`, not both",
                        reference,
                    ))
                }
                Err(BodyError::Neither) => {
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
            let topic = match Topic::new(topic.get()) {
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

/// `hello`: who the client is, its token, and the position it resumes from.
///
/// Its keys go out in alphabetical order, the order the Rust client has always written them.
pub fn encode_hello(
    client_id: &ClientId,
    token: Option<&str>,
    resume: Option<&Resume>,
    transient: bool,
) -> String {
    #[derive(Serialize)]
    struct Hello<'a> {
        client_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        resume: Option<&'a Resume>,
        #[serde(skip_serializing_if = "Option::is_none")]
        token: Option<&'a str>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        transient: bool,
        #[serde(rename = "type")]
        kind: &'static str,
    }
    serde_json::to_string(&Hello {
        client_id: client_id.as_str(),
        resume,
        token,
        transient,
        kind: "hello",
    })
    .unwrap_or_else(|_| String::from(r#"{"type":"hello"}"#))
}

/// `ack` of one seq, or of every seq up to one.
pub fn encode_ack(ack: Ack) -> String {
    match ack {
        Ack::Seq(seq) => format!(r#"{{"type":"ack","seq":{seq}}}"#),
        Ack::Upto(upto) => format!(r#"{{"type":"ack","upto":{upto}}}"#),
    }
}

/// `publish`, numbered `reference`. Written by hand, like `msg`: the JSON payload is copied
/// once, as it is.
pub fn encode_publish(
    reference: u64,
    to: &Target,
    key: Option<&str>,
    ttl_ms: Option<u64>,
    payload: &Payload,
) -> String {
    let mut out = String::with_capacity(80 + payload.len() * 4 / 3);
    let _ = write!(out, r#"{{"type":"publish","ref":{reference},"to":"#);
    write_json_string(&mut out, &to.wire());
    if let Some(key) = key {
        out.push_str(r#","key":"#);
        write_json_string(&mut out, key);
    }
    if let Some(ttl) = ttl_ms {
        let _ = write!(out, r#","ttl_ms":{ttl}"#);
    }
    out.push(',');
    write_body(&mut out, payload);
    out.push('}');
    out
}

#[derive(Serialize)]
struct TopicRequest<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "ref")]
    reference: u64,
    topic: &'a str,
}

fn encode_topic_request(kind: &'static str, reference: u64, topic: &Topic) -> String {
    serde_json::to_string(&TopicRequest {
        kind,
        reference,
        topic: topic.as_str(),
    })
    .unwrap_or_else(|_| format!(r#"{{"type":"{kind}"}}"#))
}

/// `subscribe` to `topic`, numbered `reference`.
pub fn encode_subscribe(reference: u64, topic: &Topic) -> String {
    encode_topic_request("subscribe", reference, topic)
}

/// `unsubscribe` from `topic`, numbered `reference`.
pub fn encode_unsubscribe(reference: u64, topic: &Topic) -> String {
    encode_topic_request("unsubscribe", reference, topic)
}

/// `refresh` with a new token, without a `ref` (the Rust client needs no answer to it).
pub fn encode_refresh(token: &str) -> String {
    let mut out = String::from(r#"{"type":"refresh","token":"#);
    write_json_string(&mut out, token);
    out.push('}');
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
                transient,
            } => {
                assert!(!transient);
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
    fn escaped_strings_read_as_their_text() {
        // The parser borrows strings from the frame where it can; one with an escape must still
        // read as the text it stands for.
        let frame = r#"{"type":"publi\u0073h","to":"client:b\u006fb","payload":"\"x\""}"#;
        match parse(frame).unwrap() {
            ClientFrame::Publish(p) => {
                assert_eq!(p.to, Target::Client(ClientId::new("bob").unwrap()));
                assert_eq!(p.payload, Payload::Json(r#""\"x\"""#.into()));
            }
            other => panic!("{other:?}"),
        }
        match parse(r#"{"type":"subscribe","topic":"a\/b"}"#).unwrap() {
            ClientFrame::Subscribe { topic, .. } => assert_eq!(topic.as_str(), "a/b"),
            other => panic!("{other:?}"),
        }
        let b64 = r#"{"type":"publish","to":"client:bob","payload_b64":"AP8B\/w=="}"#;
        match parse(b64).unwrap() {
            ClientFrame::Publish(p) => assert_eq!(p.payload, Payload::Binary(vec![0, 255, 1, 255])),
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
    fn hello_round_trips_with_and_without_token_and_resume() {
        let bob = ClientId::new("bob").unwrap();
        let resume = Resume {
            epoch: "E".into(),
            last_seq: 41,
        };
        for (token, resume, transient) in [
            (None, None, false),
            (Some("t\"0k"), Some(&resume), false),
            (None, None, true),
        ] {
            match parse(&encode_hello(&bob, token, resume, transient)).unwrap() {
                ClientFrame::Hello {
                    client_id,
                    token: t,
                    resume: r,
                    transient: tr,
                } => {
                    assert_eq!(client_id, bob);
                    assert_eq!(t.as_deref(), token);
                    assert_eq!(r.as_ref(), resume);
                    assert_eq!(tr, transient);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            encode_hello(&bob, Some("t"), Some(&resume), false),
            r#"{"client_id":"bob","resume":{"epoch":"E","last_seq":41},"token":"t","type":"hello"}"#
        );
    }

    #[test]
    fn acks_round_trip() {
        for ack in [Ack::Seq(3), Ack::Upto(u64::MAX)] {
            assert!(matches!(parse(&encode_ack(ack)), Ok(ClientFrame::Ack(a)) if a == ack));
        }
        assert_eq!(encode_ack(Ack::Upto(2)), r#"{"type":"ack","upto":2}"#);
    }

    #[test]
    fn publish_round_trips_json_verbatim_and_binary() {
        let to = Target::parse("topic:news/eu").unwrap();
        for (key, ttl_ms, payload) in [
            (
                Some("k\"1"),
                Some(5),
                Payload::Json(r#"{"b": 1, "a": [2.50]}"#.into()),
            ),
            (None, None, Payload::Binary(vec![0, 255, 1])),
            (Some("k"), None, Payload::Json("null".into())),
        ] {
            let text = encode_publish(7, &to, key, ttl_ms, &payload);
            match parse(&text).unwrap() {
                ClientFrame::Publish(p) => {
                    assert_eq!(p.reference.unwrap().get(), "7");
                    assert_eq!(p.to, to);
                    assert_eq!(p.key.as_deref(), key);
                    assert_eq!(p.ttl_ms, ttl_ms);
                    assert_eq!(p.payload, payload);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            encode_publish(1, &to, Some("k"), Some(9), &Payload::Json("1".into())),
            r#"{"type":"publish","ref":1,"to":"topic:news/eu","key":"k","ttl_ms":9,"payload":1}"#
        );
    }

    #[test]
    fn subscribe_unsubscribe_refresh_and_pong_round_trip() {
        let t = Topic::new("news/eu").unwrap();
        match parse(&encode_subscribe(3, &t)).unwrap() {
            ClientFrame::Subscribe { reference, topic } => {
                assert_eq!(reference.unwrap().get(), "3");
                assert_eq!(topic, t);
            }
            other => panic!("{other:?}"),
        }
        match parse(&encode_unsubscribe(4, &t)).unwrap() {
            ClientFrame::Unsubscribe { reference, topic } => {
                assert_eq!(reference.unwrap().get(), "4");
                assert_eq!(topic, t);
            }
            other => panic!("{other:?}"),
        }
        match parse(&encode_refresh("t\"2")).unwrap() {
            ClientFrame::Refresh { reference, token } => {
                assert!(reference.is_none());
                assert_eq!(token, "t\"2");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse(super::super::PONG), Ok(ClientFrame::Pong)));
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
            fn a_frame_means_the_same_read_split_or_whole(v in frame_like(), pad in 0usize..3) {
                let text = v.to_string();
                let whole = format!("{:?}", read(&text, None, 64));
                prop_assert_eq!(format!("{:?}", read(&text, Split::always(&text), 64)), whole);
                // The value as the payload of a publish that is valid.
                let text = format!(r#"{{"type":"publish","to":"client:bob","payload": {text} }}"#);
                let whole = read(&text, None, 1 << 16);
                prop_assert!(whole.is_ok());
                let whole = format!("{whole:?}");
                prop_assert_eq!(format!("{:?}", read(&text, Split::always(&text), 1 << 16)), whole);
                // The same frame with a payload long enough to be split by the public parser.
                let mut long = v;
                if let Some(m) = long.as_object_mut() {
                    m.insert("payload".into(), Value::String("é\"".repeat(pad * 300)));
                }
                let text = long.to_string();
                prop_assert_eq!(
                    format!("{:?}", parse_client_frame(&text, 1 << 16)),
                    format!("{:?}", read(&text, None, 1 << 16))
                );
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
