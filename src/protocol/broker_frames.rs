//! The frames the broker sends: `welcome`, `msg`, `ok`, `error`, `ping` and `pong`.
//!
//! The broker writes them with the `encode_*` functions; the Rust client reads them with
//! [`parse_broker_frame`]. The reader is lenient where the client always was (fields it does
//! not need may be absent, unknown fields and unknown frame types are ignored: a newer broker
//! may say more) and strict about the type of every field it knows.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use thiserror::Error;

use super::{present_borrowed, read_body, write_body, BodyError, ErrorCode, Split};
use crate::model::Payload;

/// What the broker tells a client after `hello`, as the broker writes it (the client reads it
/// as a [`WelcomeFrame`]).
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

/// A subscriber a topic publish skipped, and why (e.g. `outbox_full`): the `refused` of an
/// `ok`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub client_id: String,
    pub code: String,
}

#[derive(Serialize)]
struct OkBody<'a> {
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
    serde_json::to_string(&OkBody {
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
    serde_json::to_string(&OkBody {
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
struct ErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a RawValue>,
    code: &'static str,
    message: &'a str,
}

pub fn encode_error(reference: Option<&RawValue>, code: ErrorCode, message: &str) -> String {
    serde_json::to_string(&ErrorBody {
        kind: "error",
        reference,
        code: code.as_str(),
        message,
    })
    .unwrap_or_else(|_| String::from(r#"{"type":"error","code":"internal","message":""}"#))
}

pub const PING: &str = r#"{"type":"ping"}"#;

/// The parts of a `msg` frame, as the broker writes it (the client reads it as a
/// [`MsgFrame`]).
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
    out.push(',');
    write_body(&mut out, m.payload);
    out.push('}');
    out
}

/// A frame from the broker, as the client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerFrame {
    Welcome(WelcomeFrame),
    Msg(MsgFrame),
    Ok(OkFrame),
    Error(ErrorFrame),
    Ping,
    Pong,
    /// A type this codec does not know, e.g. from a newer broker: nothing in v1 requires an
    /// answer to it.
    Unknown(String),
}

/// A `welcome` as read: what the broker accepted of the `hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WelcomeFrame {
    /// Absent only from a broken broker; the client checks it names itself.
    pub client_id: Option<String>,
    pub epoch: String,
    pub resumed: bool,
    pub reason: Option<String>,
    pub last_seq: u64,
    /// 0 when absent.
    pub pending: u64,
    /// 0 when absent.
    pub missed: u64,
    pub heartbeat_ms: u64,
    /// 1 when absent.
    pub max_inflight: u64,
}

/// A `msg` as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsgFrame {
    pub seq: u64,
    /// Empty when absent.
    pub id: String,
    /// 0 when absent.
    pub ts: u64,
    pub from: Option<String>,
    pub topic: Option<String>,
    pub redelivered: bool,
    /// The body, or why it cannot be read. Not an error of the frame: the client drops a
    /// duplicate without looking at its body, and refuses only a body it would hand out.
    pub payload: Result<Payload, String>,
}

/// An `ok` as read. `id` and `recipients` answer a publish; a subscribe's `ok` has neither.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OkFrame {
    /// The request's `ref`; a JSON `null` reads as absent.
    pub reference: Option<Value>,
    pub id: Option<String>,
    pub recipients: Option<u64>,
    pub duplicate: bool,
    pub refused: Vec<Refused>,
}

/// An `error` as read. `code` is kept as sent: a client treats a code it does not know like
/// `internal`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// The refused frame's `ref`; a JSON `null` reads as absent.
    pub reference: Option<Value>,
    pub code: Option<String>,
    pub message: Option<String>,
}

/// A broker frame the client cannot read; the client drops the connection.
#[derive(Debug, Error)]
pub enum BrokerFrameError {
    /// Not a JSON object with a string `type`, or a field of the wrong type (in a frame of any
    /// type: every field the codec knows is checked).
    #[error("the broker sent a frame that is not valid: {0}")]
    Invalid(#[from] serde_json::Error),
    #[error("welcome without epoch, resumed, last_seq or heartbeat_ms")]
    IncompleteWelcome,
    #[error("msg without seq")]
    MsgWithoutSeq,
}

/// Every field of every broker frame, so that each is type-checked whatever the frame's type.
#[derive(Deserialize)]
struct RawBrokerFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(rename = "ref")]
    reference: Option<Value>,
    client_id: Option<String>,
    epoch: Option<String>,
    resumed: Option<bool>,
    reason: Option<String>,
    last_seq: Option<u64>,
    pending: Option<u64>,
    missed: Option<u64>,
    heartbeat_ms: Option<u64>,
    max_inflight: Option<u64>,
    seq: Option<u64>,
    id: Option<String>,
    ts: Option<u64>,
    from: Option<String>,
    topic: Option<String>,
    #[serde(borrow, default, deserialize_with = "present_borrowed")]
    payload: Option<&'a RawValue>,
    payload_b64: Option<String>,
    redelivered: Option<bool>,
    recipients: Option<u64>,
    duplicate: Option<bool>,
    #[serde(default)]
    refused: Vec<Refused>,
    code: Option<String>,
    message: Option<String>,
}

/// Reads one text frame from the broker.
///
/// Errors: [`BrokerFrameError`] for text that is not a frame, a field of the wrong type, or a
/// `welcome` or `msg` without the fields that give it a meaning.
pub fn parse_broker_frame(text: &str) -> Result<BrokerFrame, BrokerFrameError> {
    read(text, Split::of(text))
}

/// [`parse_broker_frame`], reading the frame split when `split` is given (see [`Split`]).
fn read(text: &str, split: Option<Split>) -> Result<BrokerFrame, BrokerFrameError> {
    if let Some(split) = split {
        if let Ok(f) = serde_json::from_str::<RawBrokerFrame>(&split.rest) {
            return interpret(f, Some(split.payload));
        }
    }
    let f: RawBrokerFrame = serde_json::from_str(text)?;
    let payload = f.payload.map(RawValue::get);
    interpret(f, payload)
}

/// A frame serde_json read, given its meaning; `payload` is its payload's JSON text.
fn interpret(
    f: RawBrokerFrame<'_>,
    payload: Option<&str>,
) -> Result<BrokerFrame, BrokerFrameError> {
    Ok(match f.kind.as_ref() {
        "welcome" => {
            let (Some(epoch), Some(resumed), Some(last_seq), Some(heartbeat_ms)) =
                (f.epoch, f.resumed, f.last_seq, f.heartbeat_ms)
            else {
                return Err(BrokerFrameError::IncompleteWelcome);
            };
            BrokerFrame::Welcome(WelcomeFrame {
                client_id: f.client_id,
                epoch,
                resumed,
                reason: f.reason,
                last_seq,
                pending: f.pending.unwrap_or(0),
                missed: f.missed.unwrap_or(0),
                heartbeat_ms,
                max_inflight: f.max_inflight.unwrap_or(1),
            })
        }
        "msg" => {
            let Some(seq) = f.seq else {
                return Err(BrokerFrameError::MsgWithoutSeq);
            };
            let payload = read_body(payload, f.payload_b64.as_deref()).map_err(|e| match e {
                BodyError::Base64(e) => format!("payload_b64 is not base64: {e}"),
                BodyError::Both => "msg has both payload and payload_b64".to_owned(),
                BodyError::Neither => "msg has no payload".to_owned(),
            });
            BrokerFrame::Msg(MsgFrame {
                seq,
                id: f.id.unwrap_or_default(),
                ts: f.ts.unwrap_or(0),
                from: f.from,
                topic: f.topic,
                redelivered: f.redelivered.unwrap_or(false),
                payload,
            })
        }
        "ok" => BrokerFrame::Ok(OkFrame {
            reference: f.reference,
            id: f.id,
            recipients: f.recipients,
            duplicate: f.duplicate.unwrap_or(false),
            refused: f.refused,
        }),
        "error" => BrokerFrame::Error(ErrorFrame {
            reference: f.reference,
            code: f.code,
            message: f.message,
        }),
        "ping" => BrokerFrame::Ping,
        "pong" => BrokerFrame::Pong,
        _ => BrokerFrame::Unknown(f.kind.into_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(s: &str) -> BrokerFrame {
        parse_broker_frame(s).unwrap()
    }

    #[test]
    fn a_long_frame_means_the_same_read_split_or_whole() {
        let long = "x".repeat(2000);
        let payloads = [
            format!(r#"{{"text":"{long}","n":[1,2.5e3,null,true]}}"#),
            format!(r#""{long}\"\u00e9""#),
            "null".to_owned(),
        ];
        for payload in &payloads {
            let p = Payload::Json(payload.clone());
            let text = encode_msg(&MsgView {
                seq: 9,
                id: "0a",
                ts: 1,
                from: Some("alice"),
                topic: None,
                payload: &p,
                redelivered: false,
            });
            let split = read(&text, Split::always(&text)).unwrap();
            assert_eq!(split, parse(&text));
            let BrokerFrame::Msg(m) = split else {
                panic!("not a msg: {text}")
            };
            assert_eq!(m.payload, Ok(p));
        }
        // A bad field beside a long payload is refused as it is without the split.
        for text in [
            format!(r#"{{"type":"msg","seq":"9","payload":"{long}"}}"#),
            format!(r#"{{"type":"msg","seq":9,"payload":"{long}","payload_b64":"AA=="}}"#),
            format!(r#"{{"type":"msg","payload":"{long}"}}"#),
        ] {
            assert_eq!(
                format!("{:?}", read(&text, Split::always(&text))),
                format!("{:?}", parse_broker_frame(&text))
            );
        }
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

    #[test]
    fn welcome_round_trips() {
        let w = Welcome {
            client_id: "bob".into(),
            epoch: "E1".into(),
            resumed: false,
            reason: Some("epoch_mismatch"),
            last_seq: 4,
            next_seq: 9,
            pending: 4,
            missed: 1,
            heartbeat_ms: 15_000,
            max_inflight: 64,
        };
        assert_eq!(
            parse(&encode_welcome(&w)),
            BrokerFrame::Welcome(WelcomeFrame {
                client_id: Some("bob".into()),
                epoch: "E1".into(),
                resumed: false,
                reason: Some("epoch_mismatch".into()),
                last_seq: 4,
                pending: 4,
                missed: 1,
                heartbeat_ms: 15_000,
                max_inflight: 64,
            })
        );
    }

    #[test]
    fn a_welcome_needs_its_position_and_heartbeat_and_nothing_else() {
        assert!(matches!(
            parse_broker_frame(r#"{"type":"welcome","epoch":"E","resumed":true,"last_seq":1}"#),
            Err(BrokerFrameError::IncompleteWelcome)
        ));
        match parse(
            r#"{"type":"welcome","epoch":"E","resumed":true,"last_seq":1,"heartbeat_ms":5}"#,
        ) {
            BrokerFrame::Welcome(w) => {
                assert_eq!((w.client_id, w.pending, w.missed), (None, 0, 0));
                assert_eq!(w.max_inflight, 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn msg_round_trips_json_verbatim_and_binary() {
        for (payload, from, topic, redelivered) in [
            (
                Payload::Json(r#"{"b": 1, "a": 2.50}"#.into()),
                Some("alice"),
                Some("news/eu"),
                true,
            ),
            (Payload::Binary(vec![0, 255, 1]), None, None, false),
            (Payload::Json("null".into()), Some("a"), None, false),
        ] {
            let text = encode_msg(&MsgView {
                seq: 5,
                id: "00ab",
                ts: 77,
                from,
                topic,
                payload: &payload,
                redelivered,
            });
            assert_eq!(
                parse(&text),
                BrokerFrame::Msg(MsgFrame {
                    seq: 5,
                    id: "00ab".into(),
                    ts: 77,
                    from: from.map(str::to_owned),
                    topic: topic.map(str::to_owned),
                    redelivered,
                    payload: Ok(payload),
                })
            );
        }
    }

    #[test]
    fn a_msg_needs_a_seq_and_its_body_is_checked_apart() {
        assert!(matches!(
            parse_broker_frame(r#"{"type":"msg","payload":1}"#),
            Err(BrokerFrameError::MsgWithoutSeq)
        ));
        let body = |text: &str| match parse(text) {
            BrokerFrame::Msg(m) => m.payload,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            body(r#"{"type":"msg","seq":1}"#),
            Err("msg has no payload".to_owned())
        );
        assert_eq!(
            body(r#"{"type":"msg","seq":1,"payload":1,"payload_b64":"AA=="}"#),
            Err("msg has both payload and payload_b64".to_owned())
        );
        assert!(body(r#"{"type":"msg","seq":1,"payload_b64":"!!"}"#).is_err());
    }

    #[test]
    fn ok_and_error_round_trip() {
        let r = RawValue::from_string("7".into()).unwrap();
        let refused = vec![Refused {
            client_id: "carol".into(),
            code: "outbox_full".into(),
        }];
        assert_eq!(
            parse(&encode_publish_ok(Some(&r), "1e8", 3, false, &refused)),
            BrokerFrame::Ok(OkFrame {
                reference: Some(json!(7)),
                id: Some("1e8".into()),
                recipients: Some(3),
                duplicate: false,
                refused,
            })
        );
        assert_eq!(
            parse(&encode_publish_ok(None, "9", 1, true, &[])),
            BrokerFrame::Ok(OkFrame {
                reference: None,
                id: Some("9".into()),
                recipients: Some(1),
                duplicate: true,
                refused: vec![],
            })
        );
        assert_eq!(
            parse(&encode_ok(Some(&r))),
            BrokerFrame::Ok(OkFrame {
                reference: Some(json!(7)),
                id: None,
                recipients: None,
                duplicate: false,
                refused: vec![],
            })
        );
        assert_eq!(
            parse(&encode_error(Some(&r), ErrorCode::OutboxFull, "full")),
            BrokerFrame::Error(ErrorFrame {
                reference: Some(json!(7)),
                code: Some("outbox_full".into()),
                message: Some("full".into()),
            })
        );
    }

    #[test]
    fn ping_pong_and_unknown_types_read_and_ill_typed_fields_do_not() {
        assert_eq!(parse(PING), BrokerFrame::Ping);
        assert_eq!(parse(super::super::PONG), BrokerFrame::Pong);
        assert_eq!(
            parse(r#"{"type":"news","extra":[1]}"#),
            BrokerFrame::Unknown("news".into())
        );
        // A null ref reads as absent.
        assert!(matches!(
            parse(r#"{"type":"error","ref":null,"code":"x"}"#),
            BrokerFrame::Error(ErrorFrame {
                reference: None,
                ..
            })
        ));
        for bad in [
            "nope",
            "[1]",
            r#"{"seq":1}"#,
            r#"{"type":"news","seq":"x"}"#,
        ] {
            assert!(
                matches!(parse_broker_frame(bad), Err(BrokerFrameError::Invalid(_))),
                "{bad}"
            );
        }
    }
}
