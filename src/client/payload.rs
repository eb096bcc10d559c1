//! A message body as the client sends and receives it: JSON text, kept verbatim, or bytes.
//!
//! JSON stays text so that what a publisher sent reaches the subscriber byte for byte (key
//! order, number spelling); parse it with [`Payload::to_json`] when you need a value.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::model::Payload as Body;

/// A message body: a JSON value (as text) or binary data (`payload_b64` on the wire).
///
/// Its JSON text is always valid JSON: every constructor checks or produces it (the codec
/// reads it from a frame that parsed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload(Body);

impl Payload {
    /// A JSON payload from text; refuses text that is not one JSON value.
    pub fn json_text(text: impl Into<String>) -> Result<Payload, serde_json::Error> {
        let text = text.into();
        // The fast check first; serde_json, which accepts the same text, words a refusal.
        if !crate::protocol::json::is_value(&text) {
            serde_json::from_str::<serde::de::IgnoredAny>(&text)?;
        }
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
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The JSON text without whitespace outside strings, so it fits on one line (pretty-printed
    /// JSON keeps its key order, unlike a round trip through `serde_json::Value`).
    pub fn compact_json_text(&self) -> Option<String> {
        self.as_json_text().map(crate::protocol::compact_json)
    }

    /// A body the codec read from a frame.
    pub(crate) fn from_wire(body: Body) -> Payload {
        Payload(body)
    }

    /// The body as the codec writes it.
    pub(crate) fn wire(&self) -> &Body {
        &self.0
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
    fn a_binary_payload_is_not_json() {
        let p = Payload::binary(vec![0u8, 255, 1]);
        assert!(p.to_json::<u8>().is_err());
    }
}
