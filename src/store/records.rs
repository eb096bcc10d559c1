//! The records under the store's keys, as the store's code handles them: values encoded and
//! decoded through `codec` with an error that names the key of a record that does not read
//! back, the meta of a new outbox, a payload as it is stored and counted, and a stored message
//! as the [`Delivery`] the store hands out (model types: the record never leaves the store).

use std::hash::{BuildHasher, Hasher};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Delivery, StoreError};
use crate::codec::{self, ClientMeta, CodecError, StoredMessage, StoredPayload};
use crate::model::{ClientId, Payload, Target};

/// The error for the record under `key` that does not read back.
pub(super) fn corrupt(key: &[u8], source: CodecError) -> StoreError {
    StoreError::Corrupt {
        key: format!("{key:02x?}"),
        source,
    }
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    codec::decode(bytes).map_err(|source| corrupt(key, source))
}

/// [`decode`] for the records of idempotency keys, which read in every version.
pub(super) fn decode_dedup<T: codec::DedupRecord>(
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    codec::decode_dedup(bytes).map_err(|source| corrupt(key, source))
}

pub(super) fn encode_dedup<T: codec::DedupRecord>(value: &T) -> Result<Vec<u8>, StoreError> {
    codec::encode_dedup(value).map_err(StoreError::Encode)
}

pub(super) fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    codec::encode(value).map_err(StoreError::Encode)
}

/// The fingerprint an idempotency key keeps of the publish that named it: a CRC-32 of the
/// target and the payload, never 0 (0 means a key stored before fingerprints).
pub(crate) fn fingerprint(to: &Target, payload: &Payload) -> u32 {
    let mut h = crc32fast::Hasher::new();
    // The bytes of `to.wire()`, without building the string on the publish path.
    match to {
        Target::Client(c) => {
            h.update(b"client:");
            h.update(c.as_str().as_bytes());
        }
        Target::Topic(t) => {
            h.update(b"topic:");
            h.update(t.as_str().as_bytes());
        }
    }
    match payload {
        Payload::Json(s) => {
            h.update(b"\0j");
            h.update(s.as_bytes());
        }
        Payload::Binary(b) => {
            h.update(b"\0b");
            h.update(b);
        }
    }
    h.finalize().max(1)
}

/// A new, random epoch for outbox `cid`.
pub(super) fn new_epoch(cid: u64) -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.write_u64(cid);
    format!("{:016x}", h.finish())
}

/// The meta of a new, empty outbox.
pub(super) fn fresh_meta(name: &ClientId, cid: u64) -> ClientMeta {
    ClientMeta {
        name: name.as_str().to_owned(),
        epoch: new_epoch(cid),
        next_seq: 1,
        acked: 0,
        pending: 0,
        bytes: 0,
        last_seen: 0,
    }
}

/// A payload's size as outbox quotas count it.
pub(super) fn payload_len(p: &StoredPayload) -> u64 {
    let n = match p {
        StoredPayload::Json(s) => s.len(),
        StoredPayload::Binary(b) => b.len(),
    };
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// A payload as it is stored.
pub(super) fn stored_payload(p: Payload) -> StoredPayload {
    match p {
        Payload::Json(s) => StoredPayload::Json(s),
        Payload::Binary(b) => StoredPayload::Binary(b),
    }
}

/// The stored message `m` under `seq`, as the store hands it out.
pub(super) fn delivery(seq: u64, m: StoredMessage) -> Delivery {
    Delivery {
        seq,
        id: format!("{:x}", m.id),
        ts: m.ts,
        from: m.from,
        topic: m.topic,
        payload: match m.payload {
            StoredPayload::Json(s) => Payload::Json(s),
            StoredPayload::Binary(b) => Payload::Binary(b),
        },
        expires_at: (m.expires_at > 0).then_some(m.expires_at),
    }
}
