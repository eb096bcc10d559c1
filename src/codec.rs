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
//! still read. The records of idempotency keys ([`DedupEntry`], [`DedupRun`]) are written in
//! [`DEDUP_VERSION`] = `[4][crc32][body]`, whose entries carry the fingerprint of the publish
//! that named the key; the same records of version 1 or 2 have none, and read with a
//! fingerprint of 0 ([`decode_dedup`]).
//!
//! Messages are stored several to a record (a *chunk*, see `store::chunks`), in their own
//! version: [`CHUNK_VERSION`] = `[3][crc32 of the rest, little-endian]` then, per message,
//! `[seq u64 LE][length u32 LE][message body in bincode]`. A message record written one per key
//! (version 1 or 2) reads as a chunk of one whose seq is its key's ([`split_chunk`]).

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use thiserror::Error;

/// The record format written today.
pub const FORMAT_VERSION: u8 = 2;
/// The first format: no checksum. Read, never written.
const FORMAT_V1: u8 = 1;
/// A record of several messages of one outbox.
pub const CHUNK_VERSION: u8 = 3;
/// A record of idempotency keys whose entries carry fingerprints ([`encode_dedup`]).
pub const DEDUP_VERSION: u8 = 4;
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
    #[error("message record is malformed at byte {0}")]
    Chunk(usize),
    #[error("message body in the body log is damaged or missing: {0}")]
    Body(String),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_RECORD>()
}

/// Encodes `value` with the current version byte and the body's checksum in front.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    framed(FORMAT_VERSION, value)
}

fn framed<T: Serialize>(version: u8, value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![version, 0, 0, 0, 0];
    bincode::serde::encode_into_std_write(value, &mut out, config())?;
    let crc = crc32fast::hash(&out[5..]);
    out[1..5].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decodes a record written by [`encode`]. A record of idempotency keys is refused here (its
/// layout depends on its version): read it with [`decode_dedup`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match checked_body(bytes)? {
        (DEDUP_VERSION, _) => Err(CodecError::Version(DEDUP_VERSION)),
        (_, body) => decode_body(body),
    }
}

/// The version and bincode body of a record written by [`encode`] or [`encode_dedup`], once
/// its version and checksum are good.
fn checked_body(bytes: &[u8]) -> Result<(u8, &[u8]), CodecError> {
    let (&version, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
    match version {
        FORMAT_VERSION | DEDUP_VERSION => {
            let (crc, body) = rest.split_at_checked(4).ok_or(CodecError::Checksum)?;
            let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
            if crc32fast::hash(body) != crc {
                return Err(CodecError::Checksum);
            }
            Ok((version, body))
        }
        FORMAT_V1 => Ok((version, rest)),
        other => Err(CodecError::Version(other)),
    }
}

/// Decodes the leading fields of a record written by [`encode`] or [`encode_dedup`]: `T` is a
/// struct made of the record's first fields (see [`DedupRunHead`]). The version and the
/// checksum are checked as in [`decode`]; the rest of the record is left unread.
pub fn decode_head<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    Ok(bincode::serde::decode_from_slice(checked_body(bytes)?.1, config())?.0)
}

/// A record of idempotency keys, and its layout before fingerprints.
pub trait DedupRecord: Serialize + DeserializeOwned {
    type Before: DeserializeOwned + Into<Self>;
}

/// Encodes a record of idempotency keys in [`DEDUP_VERSION`].
pub fn encode_dedup<T: DedupRecord>(value: &T) -> Result<Vec<u8>, CodecError> {
    framed(DEDUP_VERSION, value)
}

/// Decodes a record of idempotency keys of any version; one written before fingerprints has
/// `fp` 0 in every entry.
pub fn decode_dedup<T: DedupRecord>(bytes: &[u8]) -> Result<T, CodecError> {
    match checked_body(bytes)? {
        (DEDUP_VERSION, body) => decode_body(body),
        (_, body) => decode_body::<T::Before>(body).map(Into::into),
    }
}

/// Encodes a message's body alone (no version byte, no checksum): what a chunk holds per
/// message, see [`encode_chunk`].
pub fn encode_body<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(bincode::serde::encode_to_vec(value, config())?)
}

/// Appends what [`encode_body`] returns to `out` (the body log's buffer): a body is written
/// where it is stored, not built apart and copied there.
pub fn encode_body_into<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    bincode::serde::encode_into_std_write(value, out, config())?;
    Ok(())
}

/// Decodes a body written by [`encode_body`] (or split out of a record by [`split_chunk`]).
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(body, config())?;
    if used != body.len() {
        return Err(CodecError::Trailing(body.len() - used));
    }
    Ok(value)
}

/// Bytes a chunk spends per message besides its body.
const CHUNK_ENTRY_HEADER: usize = 12;

/// Encodes messages of one outbox (seq and body from [`encode_body`], seqs ascending) as one
/// chunk record.
pub fn encode_chunk<'a>(entries: impl IntoIterator<Item = (u64, &'a [u8])>) -> Vec<u8> {
    let mut out = vec![CHUNK_VERSION, 0, 0, 0, 0];
    for (seq, body) in entries {
        out.reserve(CHUNK_ENTRY_HEADER + body.len());
        out.extend_from_slice(&seq.to_le_bytes());
        // A body is far below 4 GiB (payloads are capped at 64 KiB, records at 1 MiB).
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(body);
    }
    let crc = crc32fast::hash(&out[5..]);
    out[1..5].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Where each message of a stored message record is: `(seq, byte range of its body)`, in seq
/// order. A chunk ([`encode_chunk`]) yields each of its messages; a record of one message
/// (written by [`encode`]) yields that one with seq `key_seq`. The checksum, the lengths and
/// the seq order are checked; decode each body with [`decode_body`].
pub fn split_chunk(
    key_seq: u64,
    bytes: &[u8],
) -> Result<Vec<(u64, std::ops::Range<usize>)>, CodecError> {
    let (&version, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
    let body_at = match version {
        FORMAT_V1 => 1,
        FORMAT_VERSION | CHUNK_VERSION => {
            let (crc, body) = rest.split_at_checked(4).ok_or(CodecError::Checksum)?;
            let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
            if crc32fast::hash(body) != crc {
                return Err(CodecError::Checksum);
            }
            5
        }
        other => return Err(CodecError::Version(other)),
    };
    if version != CHUNK_VERSION {
        return Ok(vec![(key_seq, body_at..bytes.len())]);
    }
    let mut out = Vec::new();
    let mut at = body_at;
    while at < bytes.len() {
        let header = bytes
            .get(at..at + CHUNK_ENTRY_HEADER)
            .ok_or(CodecError::Chunk(at))?;
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&header[..8]);
        let seq = u64::from_le_bytes(seq);
        let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        let start = at + CHUNK_ENTRY_HEADER;
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| start.checked_add(l))
            .filter(|e| *e <= bytes.len())
            .ok_or(CodecError::Chunk(at))?;
        if out.last().is_some_and(|(prev, _)| *prev >= seq) {
            return Err(CodecError::Chunk(at));
        }
        out.push((seq, start..end));
        at = end;
    }
    if out.is_empty() {
        return Err(CodecError::Empty);
    }
    Ok(out)
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

/// The writes of one small commit group, logged as one record before they reach the tree
/// (see `store::journal`): (key, value), no value = remove.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalRecord {
    pub writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// What an idempotency key remembers about the publish it first named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupEntry {
    pub id: u64,
    pub ts: u64,
    pub recipients: u64,
    /// A checksum of the publish's target and payload, so the key named again for another
    /// message is told from a retry; 0 when not known (a key stored before fingerprints).
    pub fp: u32,
}

/// A [`DedupEntry`] as written before fingerprints (version 1 or 2).
#[derive(Deserialize)]
pub struct DedupEntryBefore {
    id: u64,
    ts: u64,
    recipients: u64,
}

impl From<DedupEntryBefore> for DedupEntry {
    fn from(e: DedupEntryBefore) -> Self {
        DedupEntry {
            id: e.id,
            ts: e.ts,
            recipients: e.recipients,
            fp: 0,
        }
    }
}

impl DedupRecord for DedupEntry {
    type Before = DedupEntryBefore;
}

/// The idempotency keys of one scope that one commit group stored together (see
/// `store::dedup`): the scope's keys from `first` to the key the record is stored under, sorted,
/// each with its entry (keys without the scope).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupRun {
    pub first: Vec<u8>,
    pub entries: Vec<(Vec<u8>, DedupEntry)>,
}

/// A [`DedupRun`] as written before fingerprints (version 1 or 2).
#[derive(Deserialize)]
pub struct DedupRunBefore {
    first: Vec<u8>,
    entries: Vec<(Vec<u8>, DedupEntryBefore)>,
}

impl From<DedupRunBefore> for DedupRun {
    fn from(r: DedupRunBefore) -> Self {
        DedupRun {
            first: r.first,
            entries: r.entries.into_iter().map(|(k, e)| (k, e.into())).collect(),
        }
    }
}

impl DedupRecord for DedupRun {
    type Before = DedupRunBefore;
}

/// The first field of a [`DedupRun`], read without its entries ([`decode_head`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupRunHead {
    pub first: Vec<u8>,
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

    fn chunk_of(msgs: &[StoredMessage]) -> Vec<u8> {
        let bodies: Vec<(u64, Vec<u8>)> = msgs
            .iter()
            .enumerate()
            .map(|(i, m)| (10 + 2 * i as u64, encode_body(m).unwrap()))
            .collect();
        encode_chunk(bodies.iter().map(|(s, b)| (*s, b.as_slice())))
    }

    fn read_chunk(bytes: &[u8]) -> Result<Vec<(u64, StoredMessage)>, CodecError> {
        split_chunk(0, bytes)?
            .into_iter()
            .map(|(seq, r)| Ok((seq, decode_body(&bytes[r])?)))
            .collect()
    }

    proptest! {
        #[test]
        fn chunks_round_trip(msgs in proptest::collection::vec(message(), 1..20)) {
            let bytes = chunk_of(&msgs);
            prop_assert_eq!(bytes[0], CHUNK_VERSION);
            let back = read_chunk(&bytes).unwrap();
            prop_assert_eq!(back.len(), msgs.len());
            for (i, ((seq, m), want)) in back.iter().zip(&msgs).enumerate() {
                prop_assert_eq!(*seq, 10 + 2 * i as u64);
                prop_assert_eq!(m, want);
            }
        }

        #[test]
        fn damaged_chunks_are_errors_not_panics(
            msgs in proptest::collection::vec(message(), 1..5),
            pos in any::<prop::sample::Index>(),
            bit in 0u8..8,
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = chunk_of(&msgs);
            let i = pos.index(bytes.len());
            bytes[i] ^= 1 << bit;
            prop_assert!(read_chunk(&bytes).is_err());
            let bytes = chunk_of(&msgs);
            prop_assert!(read_chunk(&bytes[..cut.index(bytes.len())]).is_err());
        }

        #[test]
        fn a_single_message_record_reads_as_a_chunk_of_one(m in message(), seq in any::<u64>()) {
            let bytes = encode(&m).unwrap();
            let parts = split_chunk(seq, &bytes).unwrap();
            prop_assert_eq!(parts.len(), 1);
            prop_assert_eq!(parts[0].0, seq);
            prop_assert_eq!(decode_body::<StoredMessage>(&bytes[parts[0].1.clone()]).unwrap(), m);
        }
    }

    #[test]
    fn chunks_with_unordered_seqs_or_nothing_in_them_are_refused() {
        let body = encode_body(&DedupEntry {
            id: 1,
            ts: 2,
            recipients: 3,
            fp: 7,
        })
        .unwrap();
        let twice = encode_chunk([(5, body.as_slice()), (5, body.as_slice())]);
        assert!(matches!(split_chunk(0, &twice), Err(CodecError::Chunk(_))));
        let down = encode_chunk([(6, body.as_slice()), (5, body.as_slice())]);
        assert!(matches!(split_chunk(0, &down), Err(CodecError::Chunk(_))));
        let empty = encode_chunk([]);
        assert!(matches!(split_chunk(0, &empty), Err(CodecError::Empty)));
    }

    #[test]
    fn unknown_version_and_trailing_bytes_are_refused() {
        let entry = DedupEntry {
            id: 1,
            ts: 2,
            recipients: 3,
            fp: 7,
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

    #[test]
    fn key_records_from_before_fingerprints_read_with_fp_0_and_todays_keep_theirs() {
        #[derive(Serialize)]
        struct EntryBefore {
            id: u64,
            ts: u64,
            recipients: u64,
        }
        #[derive(Serialize)]
        struct RunBefore {
            first: Vec<u8>,
            entries: Vec<(Vec<u8>, EntryBefore)>,
        }
        let old = encode(&EntryBefore {
            id: 1,
            ts: 2,
            recipients: 3,
        })
        .unwrap();
        let e: DedupEntry = decode_dedup(&old).unwrap();
        assert_eq!((e.id, e.ts, e.recipients, e.fp), (1, 2, 3, 0));
        let old_run = encode(&RunBefore {
            first: b"k-1".to_vec(),
            entries: vec![
                (
                    b"k-1".to_vec(),
                    EntryBefore {
                        id: 4,
                        ts: 5,
                        recipients: 6,
                    },
                ),
                (
                    b"k-2".to_vec(),
                    EntryBefore {
                        id: 7,
                        ts: 8,
                        recipients: 9,
                    },
                ),
            ],
        })
        .unwrap();
        let run: DedupRun = decode_dedup(&old_run).unwrap();
        assert_eq!(run.entries.len(), 2);
        assert_eq!((run.entries[1].1.id, run.entries[1].1.fp), (7, 0));
        let head: DedupRunHead = decode_head(&old_run).unwrap();
        assert_eq!(head.first, b"k-1");

        let today = DedupEntry {
            id: 1,
            ts: 2,
            recipients: 3,
            fp: 0xdead_beef,
        };
        let bytes = encode_dedup(&today).unwrap();
        assert_eq!(bytes[0], DEDUP_VERSION);
        assert_eq!(decode_dedup::<DedupEntry>(&bytes).unwrap(), today);
        // Read without knowing its version, today's layout would be misread: refused instead.
        assert!(matches!(
            decode::<DedupEntry>(&bytes),
            Err(CodecError::Version(DEDUP_VERSION))
        ));
    }

    #[test]
    fn a_runs_first_key_reads_without_its_entries_and_a_damaged_run_is_refused() {
        let entry = DedupEntry {
            id: 1,
            ts: 2,
            recipients: 3,
            fp: 7,
        };
        let run = DedupRun {
            first: b"k-01".to_vec(),
            entries: vec![(b"k-01".to_vec(), entry.clone()), (b"k-02".to_vec(), entry)],
        };
        let mut bytes = encode(&run).unwrap();
        let head: DedupRunHead = decode_head(&bytes).unwrap();
        assert_eq!(head.first, b"k-01");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(
            decode_head::<DedupRunHead>(&bytes),
            Err(CodecError::Checksum)
        ));
    }
}
