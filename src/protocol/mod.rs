//! The v1 wire format: JSON text frames, in both directions, for both ends. No I/O.
//!
//! The broker and the Rust client speak through this one codec, so the two can never disagree
//! about a field: `client_frames` holds the frames a client sends (the client encodes them,
//! the broker parses and validates them), `broker_frames` the frames the broker sends (the
//! broker encodes them, the client decodes them). Keeping this free of sockets and storage
//! lets every rule of `docs/protocol.md` be unit-tested here, each frame in a round trip.

mod broker_frames;
mod client_frames;
pub(crate) mod json;

use std::fmt::Write as _;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::model::Payload;

pub use broker_frames::{
    encode_error, encode_msg, encode_ok, encode_publish_ok, encode_welcome, parse_broker_frame,
    BrokerFrame, BrokerFrameError, ErrorFrame, MsgFrame, MsgView, OkFrame, Refused, Welcome,
    WelcomeFrame, PING,
};
pub use client_frames::{
    encode_ack, encode_hello, encode_publish, encode_refresh, encode_subscribe, encode_unsubscribe,
    parse_client_frame, target_error_code, ClientFrame, FrameError, Publish,
};

/// The subprotocol the broker speaks (and answers with when the client offers none).
pub const SUBPROTOCOL: &str = "outboxd.v1.json";
/// Longest idempotency key in bytes.
pub const MAX_KEY_LEN: usize = 256;
/// The largest payload a broker may accept (`limits.max_payload_bytes` is at most this). The
/// store sizes sled's segments so that a tree leaf of sixteen such messages stays a record in
/// sled's log; anything bigger would be written to a separate blob file, which sled never
/// syncs (`store::SEGMENT_BYTES`).
pub const PAYLOAD_CEILING: u64 = 65_536;
/// `pong`, sent by either side to answer a `ping`.
pub const PONG: &str = r#"{"type":"pong"}"#;

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
    /// An idempotency key named again for another message (extension of the v1 contract).
    KeyReused,
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
            ErrorCode::KeyReused => "key_reused",
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

/// Keeps an explicit JSON `null` as a value (plain `Option` would turn it into "absent"): a
/// `null` payload is a payload, and a `null` ref is echoed back.
fn present<'de, D>(d: D) -> Result<Option<Box<RawValue>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Box::<RawValue>::deserialize(d).map(Some)
}

/// [`present`], borrowing the value's text from the frame instead of copying it.
fn present_borrowed<'de, D>(d: D) -> Result<Option<&'de RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    <&'de RawValue>::deserialize(d).map(Some)
}

/// Why a frame's body (`payload` or `payload_b64`) could not be read. Each side words it for
/// the frame it was reading.
#[derive(Debug)]
enum BodyError {
    Both,
    Neither,
    Base64(base64::DecodeError),
}

/// The body of a `publish` or `msg`: exactly one of `payload` (JSON, kept verbatim: its text
/// copied once, out of the frame) and `payload_b64` (bytes in standard base64).
fn read_body(json: Option<&str>, b64: Option<&str>) -> Result<Payload, BodyError> {
    match (json, b64) {
        (Some(json), None) => Ok(Payload::Json(json.to_owned())),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map(Payload::Binary)
            .map_err(BodyError::Base64),
        (Some(_), Some(_)) => Err(BodyError::Both),
        (None, None) => Err(BodyError::Neither),
    }
}

/// Frames longer than this have their `payload` found by [`json::member`] (see [`Split`]);
/// shorter ones are read by serde_json alone: the split pays for its extra walk and copy only
/// over a long payload.
const SPLIT_ABOVE: usize = 512;

/// A frame whose `payload` member was found and checked by [`json::member`], which scans a
/// long payload several times faster than serde_json: serde_json then reads the rest of the
/// frame, the payload's value replaced by `0` (any value would do: the field is a `RawValue`).
/// Only a frame all of which `json::member` found valid is split; anything else, and any
/// frame serde_json refuses once split, is read whole by serde_json, so what a frame means and
/// how a bad one is refused never depends on the split.
struct Split<'t> {
    rest: String,
    payload: &'t str,
}

impl<'t> Split<'t> {
    /// `text` split, when it is long and holds a payload `json::member` can find.
    fn of(text: &'t str) -> Option<Split<'t>> {
        if text.len() <= SPLIT_ABOVE {
            return None;
        }
        Split::always(text)
    }

    fn always(text: &'t str) -> Option<Split<'t>> {
        let r = json::member(text, "payload")?;
        let mut rest = String::with_capacity(text.len() - r.len() + 1);
        rest.push_str(&text[..r.start]);
        rest.push('0');
        rest.push_str(&text[r.end..]);
        Some(Split {
            rest,
            payload: &text[r],
        })
    }
}

/// Appends the body member of a `publish` or `msg`: `"payload":` and the JSON text as stored
/// (copied once, never re-serialized), or `"payload_b64":"…"`.
fn write_body(out: &mut String, payload: &Payload) {
    match payload {
        Payload::Json(raw) => {
            out.push_str(r#""payload":"#);
            out.push_str(raw);
        }
        Payload::Binary(bytes) => {
            out.push_str(r#""payload_b64":""#);
            base64::engine::general_purpose::STANDARD.encode_string(bytes, out);
            out.push('"');
        }
    }
}

/// Appends `s` as a JSON string, escaped. Names, keys and tokens need no escape: they are
/// copied as they are, and only a string that needs one goes through serde_json.
fn write_json_string(out: &mut String, s: &str) {
    if json::plain_run(s.as_bytes()) == s.len() {
        out.reserve(s.len() + 2);
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        let _ = write!(out, "{}", serde_json::Value::String(s.to_owned()));
    }
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

    #[test]
    fn binary_round_trips_through_the_frame_member() {
        let p = Payload::Binary(vec![0u8, 255, 1]);
        let mut member = String::new();
        write_body(&mut member, &p);
        assert_eq!(member, r#""payload_b64":"AP8B""#);
        assert_eq!(read_body(None, Some("AP8B")).unwrap(), p);
        assert!(read_body(None, Some("!!")).is_err());
    }

    #[test]
    fn a_body_is_exactly_one_of_payload_and_payload_b64() {
        let json = || Some("null");
        assert_eq!(
            read_body(json(), None).unwrap(),
            Payload::Json("null".into())
        );
        assert!(matches!(
            read_body(json(), Some("AA==")),
            Err(BodyError::Both)
        ));
        assert!(matches!(read_body(None, None), Err(BodyError::Neither)));
    }

    #[test]
    fn strings_are_escaped() {
        let mut out = String::new();
        write_json_string(&mut out, "a\"b\\c\n");
        assert_eq!(out, r#""a\"b\\c\n""#);
        // Whether copied as it is or escaped, the text is what serde_json writes.
        for s in [
            "",
            "client:bob",
            "k-00ff",
            "é ü \u{7f}",
            "tab\there",
            "\u{1}",
            "q\"",
            "b\\",
        ] {
            let mut out = String::new();
            write_json_string(&mut out, s);
            assert_eq!(out, serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }
}
