//! What operators see of the stored state: one set of shapes for the admin API's JSON and for
//! `outboxd inspect --json`, so the online and the offline view of a data directory read alike.
//!
//! These are plain data: the store fills them ([`crate::store::Inspector`]), the admin API adds
//! what only a running broker knows (who is connected, delivery counts), and the inspect
//! command prints them.

use serde::{Deserialize, Serialize};

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
    pub payload: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_b64: Option<String>,
    /// Payload size in bytes (JSON text or binary).
    pub size: u64,
    /// Unix ms at which retention removes it unacked; None when it never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Times the running broker has sent it since it started; None offline (not stored).
    pub deliveries: Option<u64>,
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

/// A topic and its durable subscribers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicView {
    pub topic: String,
    pub subscribers: Vec<String>,
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
