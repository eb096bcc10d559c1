//! On-disk record encoding: one format-version byte, a CRC-32 of the body, then the record in
//! bincode.
//!
//! This is the only module that knows bincode. Every value the store writes passes through
//! [`encode`] and every value it reads through [`decode`], so a later format (another encoder,
//! a new field) is a new version byte here and nothing else moves. Decoding never trusts the
//! bytes: the version, the checksum, a size limit and the exact length consumed are all
//! checked, and a bad record is an error, never a panic or a silently different value (a
//! flipped bit can turn bincode into another valid record; the checksum catches it).
//!
//! Versions: 2 (written today) = `[2][crc32 of body, little-endian][body]`; 1 = `[1][body]`,
//! still read.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use thiserror::Error;

/// The record format written today.
pub const FORMAT_VERSION: u8 = 2;
/// The first format: no checksum. Read, never written.
const FORMAT_V1: u8 = 1;
/// Records larger than this are refused on decode (the largest payload is 64 KiB).
const MAX_RECORD: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum CodecError {
    #[error("empty record")]
    Empty,
    #[error("record format version {0} is not one this build reads (it reads {FORMAT_VERSION})")]
    Version(u8),
    #[error("record does not decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("record has {0} trailing bytes")]
    Trailing(usize),
    #[error("record checksum mismatch: the stored bytes are damaged")]
    Checksum,
    #[error("record does not encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_RECORD>()
}

/// Encodes `value` with the current version byte and the body's checksum in front.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![FORMAT_VERSION, 0, 0, 0, 0];
    bincode::serde::encode_into_std_write(value, &mut out, config())?;
    let crc = crc32fast::hash(&out[5..]);
    out[1..5].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decodes a record written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
    let body = match version {
        FORMAT_VERSION => {
            let (crc, body) = rest.split_at_checked(4).ok_or(CodecError::Checksum)?;
            let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
            if crc32fast::hash(body) != crc {
                return Err(CodecError::Checksum);
            }
            body
        }
        FORMAT_V1 => rest,
        other => return Err(CodecError::Version(other)),
    };
    let (value, used) = bincode::serde::decode_from_slice(body, config())?;
    if used != body.len() {
        return Err(CodecError::Trailing(body.len() - used));
    }
    Ok(value)
}

/// Per-client state, stored next to the client's messages so each change to it is written in
/// the same atomic batch as the messages it describes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientMeta {
    pub name: String,
    /// Names this incarnation of the outbox; changes when the outbox is recreated.
    pub epoch: String,
    /// The seq the next message gets.
    pub next_seq: u64,
    /// Cumulative acked position: nothing at or below it is stored.
    pub acked: u64,
    /// Stored messages and their payload bytes (kept here because counting is a full scan).
    pub pending: u64,
    pub bytes: u64,
    /// Unix ms of the last hello, 0 when the client never connected.
    pub last_seen: u64,
}

/// A stored message body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredPayload {
    Json(String),
    Binary(Vec<u8>),
}

/// One message in one outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Shared by every outbox a single publish wrote.
    pub id: u64,
    /// Publish time, Unix ms.
    pub ts: u64,
    pub from: Option<String>,
    pub topic: Option<String>,
    pub payload: StoredPayload,
    /// Unix ms after which retention removes it unacked; 0 = never.
    pub expires_at: u64,
}

/// What an idempotency key remembers about the publish it first named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupEntry {
    pub id: u64,
    pub ts: u64,
    pub recipients: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message() -> impl Strategy<Value = StoredMessage> {
        (
            any::<u64>(),
            any::<u64>(),
            proptest::option::of("[a-z]{1,12}"),
            proptest::option::of("[a-z/]{1,12}"),
            prop_oneof![
                ".{0,64}".prop_map(StoredPayload::Json),
                proptest::collection::vec(any::<u8>(), 0..64).prop_map(StoredPayload::Binary)
            ],
            any::<u64>(),
        )
            .prop_map(|(id, ts, from, topic, payload, expires_at)| StoredMessage {
                id,
                ts,
                from,
                topic,
                payload,
                expires_at,
            })
    }

    proptest! {
        #[test]
        fn message_records_round_trip(m in message()) {
            let bytes = encode(&m).unwrap();
            prop_assert_eq!(bytes[0], FORMAT_VERSION);
            prop_assert_eq!(decode::<StoredMessage>(&bytes).unwrap(), m);
        }

        #[test]
        fn truncated_records_are_errors_not_panics(m in message(), cut in 0usize..200) {
            let bytes = encode(&m).unwrap();
            let cut = cut.min(bytes.len().saturating_sub(1));
            prop_assert!(decode::<StoredMessage>(&bytes[..cut]).is_err());
        }

        #[test]
        fn flipped_bits_are_always_detected(m in message(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = encode(&m).unwrap();
            let i = pos.index(bytes.len());
            bytes[i] ^= 1 << bit;
            // Always an error: the checksum catches every single-bit flip in the body, and a
            // flipped version byte names no format this build reads.
            prop_assert!(decode::<StoredMessage>(&bytes).is_err());
        }

        #[test]
        fn meta_records_round_trip(name in "[a-z]{1,20}", n in any::<u64>(), a in any::<u64>()) {
            let meta = ClientMeta { name, epoch: "e1".into(), next_seq: n, acked: a, pending: 3, bytes: 9, last_seen: 1 };
            prop_assert_eq!(decode::<ClientMeta>(&encode(&meta).unwrap()).unwrap(), meta);
        }
    }

    #[test]
    fn unknown_version_and_trailing_bytes_are_refused() {
        let entry = DedupEntry {
            id: 1,
            ts: 2,
            recipients: 3,
        };
        let mut bytes = encode(&entry).unwrap();
        bytes[0] = 9;
        assert!(matches!(
            decode::<DedupEntry>(&bytes),
            Err(CodecError::Version(9))
        ));
        let mut bytes = encode(&entry).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<DedupEntry>(&bytes),
            Err(CodecError::Checksum)
        ));
        // Version 1 (no checksum) is still read, and its length is still checked.
        let mut v1 = vec![FORMAT_V1];
        v1.extend_from_slice(&encode(&entry).unwrap()[5..]);
        assert_eq!(decode::<DedupEntry>(&v1).unwrap(), entry);
        v1.push(0);
        assert!(matches!(
            decode::<DedupEntry>(&v1),
            Err(CodecError::Trailing(1))
        ));
        assert!(matches!(decode::<DedupEntry>(&[]), Err(CodecError::Empty)));
    }
}
