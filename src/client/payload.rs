//! A message body as the client sends and receives it: JSON text, kept verbatim, or bytes.
//!
//! JSON stays text so that what a publisher sent reaches the subscriber byte for byte (key
//! order, number spelling); parse it with [`Payload::to_json`] when you need a value.

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A message body: a JSON value (as text) or binary data (`payload_b64` on the wire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload(Body);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Body {
    /// Always valid JSON text: every constructor checks or produces it.
    Json(String),
    Binary(Vec<u8>),
}

impl Payload {
    /// A JSON payload from text; refuses text that is not one JSON value.
    pub fn json_text(text: impl Into<String>) -> Result<Payload, serde_json::Error> {
        let text = text.into();
        serde_json::from_str::<serde::de::IgnoredAny>(&text)?;
        Ok(Payload(Body::Json(text)))
    }

    /// A JSON payload from any serializable value.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Payload, serde_json::Error> {
        Ok(Payload(Body::Json(serde_json::to_string(value)?)))
    }

    /// A binary payload.
    pub fn binary(bytes: impl Into<Vec<u8>>) -> Payload {
        Payload(Body::Binary(bytes.into()))
    }

    /// The JSON text, or `None` for a binary payload.
    pub fn as_json_text(&self) -> Option<&str> {
        match &self.0 {
            Body::Json(t) => Some(t),
            Body::Binary(_) => None,
        }
    }

    /// The bytes, or `None` for a JSON payload.
    pub fn as_binary(&self) -> Option<&[u8]> {
        match &self.0 {
            Body::Json(_) => None,
            Body::Binary(b) => Some(b),
        }
    }

    /// Parses a JSON payload into `T`. A binary payload is an error.
    pub fn to_json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        match &self.0 {
            Body::Json(t) => serde_json::from_str(t),
            Body::Binary(_) => Err(serde::de::Error::custom("the payload is binary, not JSON")),
        }
    }

    /// Size in bytes as the broker counts it (JSON text, or the decoded bytes).
    pub fn len(&self) -> usize {
        match &self.0 {
            Body::Json(t) => t.len(),
            Body::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The JSON text without whitespace outside strings, so it fits on one line (pretty-printed
    /// JSON keeps its key order, unlike a round trip through `serde_json::Value`).
    pub fn compact_json_text(&self) -> Option<String> {
        self.as_json_text().map(crate::protocol::compact_json)
    }

    /// The `"payload":…` or `"payload_b64":"…"` member of a frame.
    pub(crate) fn frame_member(&self) -> String {
        match &self.0 {
            Body::Json(t) => format!(r#""payload":{t}"#),
            Body::Binary(b) => format!(
                r#""payload_b64":"{}""#,
                base64::engine::general_purpose::STANDARD.encode(b)
            ),
        }
    }

    /// From the frame's fields, as the broker sent them.
    pub(crate) fn from_frame(
        json: Option<&serde_json::value::RawValue>,
        b64: Option<&str>,
    ) -> Result<Payload, String> {
        match (json, b64) {
            (Some(raw), None) => Ok(Payload(Body::Json(raw.get().to_owned()))),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b.as_bytes())
                .map(Payload::binary)
                .map_err(|e| format!("payload_b64 is not base64: {e}")),
            (Some(_), Some(_)) => Err("msg has both payload and payload_b64".into()),
            (None, None) => Err("msg has no payload".into()),
        }
    }
}

impl From<serde_json::Value> for Payload {
    fn from(v: serde_json::Value) -> Self {
        Payload(Body::Json(v.to_string()))
    }
}

/// A JSON string payload.
impl From<&str> for Payload {
    fn from(s: &str) -> Self {
        Payload::from(serde_json::Value::String(s.to_owned()))
    }
}

/// A JSON string payload.
impl From<String> for Payload {
    fn from(s: String) -> Self {
        Payload::from(serde_json::Value::String(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_text_is_kept_verbatim_and_invalid_text_refused() {
        let p = Payload::json_text(r#"{"b": 1, "a": 2.50}"#).unwrap();
        assert_eq!(p.as_json_text(), Some(r#"{"b": 1, "a": 2.50}"#));
        assert!(Payload::json_text("{nope").is_err());
        assert!(Payload::json_text("1 2").is_err());
    }

    #[test]
    fn strings_become_json_strings() {
        assert_eq!(
            Payload::from("hi \"x\"").as_json_text(),
            Some(r#""hi \"x\"""#)
        );
        assert_eq!(
            Payload::from(json!({"a":[1]}))
                .to_json::<serde_json::Value>()
                .unwrap(),
            json!({"a":[1]})
        );
    }

    #[test]
    fn compact_removes_whitespace_outside_strings_only() {
        let p = Payload::json_text("{\n  \"z\": \"a b\\\" c\",\n  \"a\": [1, 2]\n}").unwrap();
        assert_eq!(
            p.compact_json_text().unwrap(),
            r#"{"z":"a b\" c","a":[1,2]}"#
        );
    }

    #[test]
    fn binary_round_trips_through_the_frame_member() {
        let p = Payload::binary(vec![0u8, 255, 1]);
        assert_eq!(p.frame_member(), r#""payload_b64":"AP8B""#);
        assert_eq!(Payload::from_frame(None, Some("AP8B")).unwrap(), p);
        assert!(Payload::from_frame(None, Some("!!")).is_err());
        assert!(p.to_json::<u8>().is_err());
    }
}
