//! The client's errors: why it could not start, why it stopped for good, why a request failed.

use std::time::Duration;

use thiserror::Error;

use super::position::PositionError;
use crate::model::NameError;

/// Why the client stopped and will not reconnect. Every other failure (a dropped connection,
/// a silent broker, a broker restart) is retried with backoff.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StopReason {
    /// The application closed the client (or dropped every handle).
    #[error("the client was closed")]
    Closed,
    #[error("replaced by a newer connection with the same client id (close 4000)")]
    Replaced,
    #[error("the broker refused the client: {code}: {message}")]
    Refused { code: String, message: String },
    /// The broker closed with a code that says reconnecting would not help (1002, 1008).
    #[error(
        "the broker closed the connection with {code} ({reason}); reconnecting would not help"
    )]
    Terminated { code: u16, reason: String },
    #[error("the broker refused the WebSocket upgrade: {0}")]
    Upgrade(String),
    /// The first connection attempt failed and the client was told not to retry it
    /// ([`ClientBuilder::fail_fast`](super::ClientBuilder::fail_fast)). Names the URL and the
    /// cause (such as the operating system's "Connection refused").
    #[error("{0}")]
    Unreachable(String),
    /// The broker's TLS certificate was rejected. Never retried: asking again gets the same
    /// certificate, checked against the same trusted roots.
    #[error("the TLS certificate of {url} was rejected: {reason}")]
    Certificate { url: String, reason: String },
}

/// Why [`ClientBuilder::connect`](super::ClientBuilder::connect) failed.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error(transparent)]
    ClientId(#[from] NameError),
    #[error("invalid broker url {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot load the saved position: {0}")]
    Position(#[from] PositionError),
    /// A `--ca` file (see `ClientBuilder::tls_ca_file`) cannot be read or used.
    #[error("{0}")]
    Tls(String),
    #[error("no session with the broker within {after:?}; last error: {last}")]
    ConnectTimeout { after: Duration, last: String },
    #[error(transparent)]
    Stopped(#[from] StopReason),
}

/// Why a publish, subscribe or unsubscribe was not confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    /// Refused before sending: the request can never succeed.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The broker answered `error`: nothing was written.
    #[error("refused by the broker: {code}: {message}")]
    Refused { code: String, message: String },
    /// No confirmation in time. The message may or may not have been written: publishing it
    /// again with the same key (within the broker's dedup window) writes it at most once.
    #[error("not confirmed within {after:?}{}", key.as_ref().map(|k| format!(" (key {k})")).unwrap_or_default())]
    Timeout {
        after: Duration,
        key: Option<String>,
    },
    /// The client stopped before the broker answered.
    #[error("the client stopped before confirmation: {0}")]
    Stopped(StopReason),
}

/// An ack that could not be recorded because the client has stopped. The message stays
/// unacked in the outbox and is delivered again to the next client with this id.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("the client has stopped; the message stays in the outbox and comes again")]
pub struct AckError;
