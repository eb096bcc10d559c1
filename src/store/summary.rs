//! What the store reports about itself, whichever engine holds it: one outbox's summary, a page
//! of its messages, the topics and their subscribers, totals. The store's own values;
//! `crate::views` makes what operators see of them. Filled by `inspect` (sled) and `pg`.

use std::path::PathBuf;

use super::Delivery;

/// One client's outbox, from its stored meta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxSummary {
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
    pub subscriptions: Vec<String>,
}

/// A page of one outbox's stored messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxListing {
    pub client_id: String,
    pub epoch: String,
    pub messages: Vec<Delivery>,
    /// The seq to pass as `from` for the next page; None at the end.
    pub next_from: Option<u64>,
}

/// A topic and its durable subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSubscribers {
    pub topic: String,
    pub subscribers: Vec<String>,
}

/// Totals over the whole data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStats {
    pub data_dir: PathBuf,
    /// `codec::FORMAT_VERSION` of the records this broker writes.
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
