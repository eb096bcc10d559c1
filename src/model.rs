//! The domain values every layer shares, free of I/O and of any wire or disk format: client ids
//! and topics (validated names that double as storage keys), who a publish is for, a resume
//! position, an ack, a payload.
//!
//! Names travel on the wire and end up in keys on disk, so they are validated once, in their
//! constructors, and every other module takes the typed value. The alphabet is the one
//! `docs/protocol.md` fixes: it is safe in file names, URLs and log lines.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Longest client id in bytes.
pub const MAX_CLIENT_ID_LEN: usize = 128;
/// Longest topic name in bytes.
pub const MAX_TOPIC_LEN: usize = 255;

/// Why a name was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("client_id must be 1 to {MAX_CLIENT_ID_LEN} bytes, got {0}")]
    ClientIdLength(usize),
    #[error("client_id may only contain A-Z a-z 0-9 . _ : @ - (found {0:?})")]
    ClientIdChar(char),
    #[error("topic must be 1 to {MAX_TOPIC_LEN} bytes, got {0}")]
    TopicLength(usize),
    #[error("topic may only contain A-Z a-z 0-9 . _ : @ - / (found {0:?})")]
    TopicChar(char),
}

fn id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '-')
}

/// A client's name: 1 to 128 bytes of `[A-Za-z0-9._:@-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(String);

impl ClientId {
    /// Validates `s`; returns the reason when it is not a client id.
    pub fn new(s: &str) -> Result<Self, NameError> {
        if s.is_empty() || s.len() > MAX_CLIENT_ID_LEN {
            return Err(NameError::ClientIdLength(s.len()));
        }
        if let Some(c) = s.chars().find(|c| !id_char(*c)) {
            return Err(NameError::ClientIdChar(c));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A topic name: the client-id alphabet plus `/`, 1 to 255 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(String);

impl Topic {
    /// Validates `s`; returns the reason when it is not a topic name.
    pub fn new(s: &str) -> Result<Self, NameError> {
        if s.is_empty() || s.len() > MAX_TOPIC_LEN {
            return Err(NameError::TopicLength(s.len()));
        }
        if let Some(c) = s.chars().find(|c| !(id_char(*c) || *c == '/')) {
            return Err(NameError::TopicChar(c));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The wall clock in Unix milliseconds: the unit of every timestamp the broker stores, sends
/// and checks (publish times, expiries, last seen, token lifetimes). 0 before 1970.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Where a client says it stands: its last acked seq within an epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    pub epoch: String,
    pub last_seq: u64,
}

/// A message body as stored and sent: JSON text kept verbatim, or raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Json(String),
    Binary(Vec<u8>),
}

impl Payload {
    /// Size counted against `max_payload_bytes` and outbox byte quotas.
    pub fn len(&self) -> usize {
        match self {
            Payload::Json(s) => s.len(),
            Payload::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a target was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("{0}")]
    Client(NameError),
    #[error("{0}")]
    Topic(NameError),
    #[error("`to` must be \"client:ID\" or \"topic:NAME\", got {0:?}")]
    Kind(String),
}

/// Who a publish is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Client(ClientId),
    Topic(Topic),
}

impl Target {
    /// The target as written on the wire: `client:ID` or `topic:NAME`.
    pub fn wire(&self) -> String {
        match self {
            Target::Client(c) => format!("client:{}", c.as_str()),
            Target::Topic(t) => format!("topic:{}", t.as_str()),
        }
    }

    /// Parses `client:ID` or `topic:NAME`.
    pub fn parse(s: &str) -> Result<Target, TargetError> {
        if let Some(id) = s.strip_prefix("client:") {
            ClientId::new(id)
                .map(Target::Client)
                .map_err(TargetError::Client)
        } else if let Some(t) = s.strip_prefix("topic:") {
            Topic::new(t).map(Target::Topic).map_err(TargetError::Topic)
        } else {
            Err(TargetError::Kind(s.to_owned()))
        }
    }
}

/// A client's statement that it processed messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// One message.
    Seq(u64),
    /// Every message up to and including this seq.
    Upto(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_accepts_the_documented_alphabet() {
        assert!(ClientId::new("alice").is_ok());
        assert!(ClientId::new("a.b_c:d@e-f9").is_ok());
        assert!(ClientId::new(&"x".repeat(128)).is_ok());
    }

    #[test]
    fn client_id_refuses_empty_long_and_foreign_characters() {
        assert_eq!(ClientId::new(""), Err(NameError::ClientIdLength(0)));
        assert_eq!(
            ClientId::new(&"x".repeat(129)),
            Err(NameError::ClientIdLength(129))
        );
        assert_eq!(ClientId::new("a/b"), Err(NameError::ClientIdChar('/')));
        assert_eq!(ClientId::new("a b"), Err(NameError::ClientIdChar(' ')));
        assert_eq!(ClientId::new("é"), Err(NameError::ClientIdChar('é')));
        assert_eq!(ClientId::new("a\0"), Err(NameError::ClientIdChar('\0')));
    }

    #[test]
    fn topic_allows_slash_and_refuses_the_rest() {
        assert!(Topic::new("news/eu").is_ok());
        assert!(Topic::new(&"t".repeat(255)).is_ok());
        assert_eq!(
            Topic::new(&"t".repeat(256)),
            Err(NameError::TopicLength(256))
        );
        assert_eq!(Topic::new("a#"), Err(NameError::TopicChar('#')));
        assert_eq!(Topic::new(""), Err(NameError::TopicLength(0)));
    }
}
