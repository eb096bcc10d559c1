//! What operators see of the stored state: one set of shapes for the admin API's JSON and for
//! `outboxd inspect --json`, so the online and the offline view of a data directory read alike.
//!
//! These are plain data: made from what the store reads ([`crate::store::Inspector`]), the
//! admin API adds what only a running broker knows (who is connected, delivery counts), and
//! the inspect command prints them.

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::model::Payload;
use crate::store::{Delivery, OutboxListing, OutboxSummary, StoreStats, TopicSubscribers};

/// One client's outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientView {
    pub client_id: String,
    pub epoch: String,
    /// Stored (unacked) messages and their payload bytes.
    pub pending: u64,
    pub bytes: u64,
    /// The seq the next message gets.
    pub next_seq: u64,
    /// Cumulative acked position: nothing at or below it is stored.
    pub acked: u64,
    /// Publish time (Unix ms) of the oldest stored message, if any.
    pub oldest_unacked_ts: Option<u64>,
    /// Unix ms of the client's last hello; None when it never connected.
    pub last_seen: Option<u64>,
    /// Whether a connection holds this client now; None when not known (offline inspection).
    pub connected: Option<bool>,
    pub subscriptions: Vec<String>,
}

impl From<OutboxSummary> for ClientView {
    fn from(o: OutboxSummary) -> Self {
        ClientView {
            client_id: o.client_id,
            epoch: o.epoch,
            pending: o.pending,
            bytes: o.bytes,
            next_seq: o.next_seq,
            acked: o.acked,
            oldest_unacked_ts: o.oldest_unacked_ts,
            last_seen: o.last_seen,
            connected: None,
            subscriptions: o.subscriptions,
        }
    }
}

/// One stored message, with the fields of a `msg` frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageView {
    pub seq: u64,
    pub id: String,
    pub ts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<JsonText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_b64: Option<String>,
    /// A stored JSON payload whose text is not JSON, shown as the text it is. Publishes are
    /// checked, so only damage the record's checksum missed or a bug puts one here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_text: Option<String>,
    /// Payload size in bytes (JSON text or binary).
    pub size: u64,
    /// Unix ms at which retention removes it unacked; None when it never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Times the running broker has sent it since it started; None offline (not stored).
    pub deliveries: Option<u64>,
}

impl From<Delivery> for MessageView {
    fn from(m: Delivery) -> Self {
        let size = u64::try_from(m.payload.len()).unwrap_or(u64::MAX);
        let (payload, payload_b64, payload_text) = match m.payload {
            Payload::Json(text) => match JsonText::from_stored(text) {
                Ok(json) => (Some(json), None, None),
                // Stored payloads were valid JSON when published; the text otherwise, marked so.
                Err(text) => (None, None, Some(text)),
            },
            Payload::Binary(b) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(b)),
                None,
            ),
        };
        MessageView {
            seq: m.seq,
            id: m.id,
            ts: m.ts,
            from: m.from,
            topic: m.topic,
            payload,
            payload_b64,
            payload_text,
            size,
            expires_at: m.expires_at,
            deliveries: None,
        }
    }
}

/// A JSON payload in a view: the stored text, embedded as the JSON it is. It is never parsed
/// into a tree: a tree parser stops at a nesting depth (serde_json's is 128) that a publish
/// does not limit, and a view must show what is delivered. The whitespace between tokens is
/// dropped, so a view stays on one line (`inspect --json outbox` prints one per line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JsonText(Box<RawValue>);

impl JsonText {
    /// The stored payload `text` as JSON. Gives the text back when it is not one JSON value.
    pub fn from_stored(text: String) -> Result<JsonText, String> {
        // Checked before compacting: dropping the space in `1 2` would make it valid.
        if serde_json::from_str::<&RawValue>(&text).is_err() {
            return Err(text);
        }
        match RawValue::from_string(crate::protocol::compact_json(&text)) {
            Ok(raw) => Ok(JsonText(raw)),
            Err(_) => Err(text),
        }
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for JsonText {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

/// A page of one outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxPage {
    pub client_id: String,
    pub epoch: String,
    pub messages: Vec<MessageView>,
    /// The seq to pass as `from` for the next page; None at the end.
    pub next_from: Option<u64>,
}

impl From<OutboxListing> for OutboxPage {
    fn from(l: OutboxListing) -> Self {
        OutboxPage {
            client_id: l.client_id,
            epoch: l.epoch,
            messages: l.messages.into_iter().map(MessageView::from).collect(),
            next_from: l.next_from,
        }
    }
}

/// A topic and its durable subscribers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicView {
    pub topic: String,
    pub subscribers: Vec<String>,
}

impl From<TopicSubscribers> for TopicView {
    fn from(t: TopicSubscribers) -> Self {
        TopicView {
            topic: t.topic,
            subscribers: t.subscribers,
        }
    }
}

/// Totals over the whole data directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsView {
    pub data_dir: String,
    pub format_version: u8,
    pub clients: u64,
    pub topics: u64,
    pub subscriptions: u64,
    pub pending_messages: u64,
    /// Payload bytes of the stored messages.
    pub pending_bytes: u64,
    pub max_pending_messages: u64,
    pub max_pending_bytes: u64,
    /// Publish time (Unix ms) of the oldest stored message, if any.
    pub oldest_message_ts: Option<u64>,
    /// Keys and values held by the store now.
    pub live_bytes: u64,
    /// What the data directory takes on disk.
    pub disk_bytes: u64,
}

impl From<StoreStats> for StatsView {
    fn from(s: StoreStats) -> Self {
        StatsView {
            data_dir: s.data_dir.display().to_string(),
            format_version: s.format_version,
            clients: s.clients,
            topics: s.topics,
            subscriptions: s.subscriptions,
            pending_messages: s.pending_messages,
            pending_bytes: s.pending_bytes,
            max_pending_messages: s.max_pending_messages,
            max_pending_bytes: s.max_pending_bytes,
            oldest_message_ts: s.oldest_message_ts,
            live_bytes: s.live_bytes,
            disk_bytes: s.disk_bytes,
        }
    }
}

/// How a list of clients is ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortBy {
    Name,
    Pending,
    Bytes,
    Age,
}

impl SortBy {
    /// The names accepted on the command line and in `?sort=`.
    pub const NAMES: [&'static str; 4] = ["name", "pending", "bytes", "age"];

    pub fn parse(s: &str) -> Option<SortBy> {
        match s {
            "name" => Some(SortBy::Name),
            "pending" => Some(SortBy::Pending),
            "bytes" => Some(SortBy::Bytes),
            "age" => Some(SortBy::Age),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SortBy::Name => "name",
            SortBy::Pending => "pending",
            SortBy::Bytes => "bytes",
            SortBy::Age => "age",
        }
    }

    /// Largest first for pending and bytes; oldest unacked message first for age (outboxes
    /// with nothing stored last); ties in name order.
    pub fn sort(self, list: &mut [ClientView]) {
        match self {
            SortBy::Name => list.sort_by(|a, b| a.client_id.cmp(&b.client_id)),
            SortBy::Pending => list.sort_by(|a, b| {
                b.pending
                    .cmp(&a.pending)
                    .then_with(|| a.client_id.cmp(&b.client_id))
            }),
            SortBy::Bytes => list.sort_by(|a, b| {
                b.bytes
                    .cmp(&a.bytes)
                    .then_with(|| a.client_id.cmp(&b.client_id))
            }),
            SortBy::Age => list.sort_by(|a, b| {
                a.oldest_unacked_ts
                    .unwrap_or(u64::MAX)
                    .cmp(&b.oldest_unacked_ts.unwrap_or(u64::MAX))
                    .then_with(|| a.client_id.cmp(&b.client_id))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_payload_deeper_than_a_tree_parser_allows_is_shown_as_json() {
        let deep = format!("{}1{}", "[".repeat(500), "]".repeat(500));
        let view = JsonText::from_stored(deep.clone()).unwrap();
        assert_eq!(view.as_str(), deep);
        let out = serde_json::to_string(&view).unwrap();
        assert_eq!(out, deep);
        let back: JsonText = serde_json::from_str(&out).unwrap();
        assert_eq!(back, view);
    }

    #[test]
    fn whitespace_between_tokens_is_dropped_and_inside_strings_kept() {
        let view =
            JsonText::from_stored("{ \"a b\" :\n [1, 2.50, \"x \\\" y\\\\\" ] }\n".into()).unwrap();
        assert_eq!(view.as_str(), r#"{"a b":[1,2.50,"x \" y\\"]}"#);
    }

    #[test]
    fn text_that_is_not_json_is_given_back() {
        for bad in ["1 2", "", "[1,", "\"open"] {
            assert_eq!(JsonText::from_stored(bad.into()), Err(bad.to_string()));
        }
    }
}
