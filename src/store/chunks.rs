//! Message records: the messages one commit group wrote to one outbox, in one sled record.
//!
//! A key per message cost the writer a sled insert per message and a delete per ack, and
//! sled's per-operation cost was two thirds of the writer's time. So a record (a *chunk*) under
//! `O cid first_seq` holds consecutive messages of one outbox, each with its seq: the writer
//! appends a group's messages for one outbox to one chunk (up to [`MAX_MESSAGES`] and
//! [`MAX_BYTES`]), and an ack rewrites or deletes whole chunks. The invariants every reader
//! relies on:
//!
//! - a chunk is made under the seq of its first message, and every message in it stays at or
//!   above its key and below the next chunk's key (seqs only grow; a chunk that loses messages
//!   is rewritten under the same key);
//! - a chunk is never empty (the last message leaving it deletes it).
//!
//! So the one chunk that can hold seq `s` is the one with the greatest key at or below `s`.
//! Records written one message per key, before chunks, read as chunks of one.

use std::ops::Bound;

use sled::IVec;

use super::bodies::{self, Bodies, BodyRef, Facts, Stored};
use super::records::corrupt;
use super::{keys, StoreError};
use crate::codec::{self, CodecError, StoredMessage};

/// The most messages one chunk holds.
pub(super) const MAX_MESSAGES: usize = 64;
/// A chunk takes no further message once its bodies reach this size. A chunk is thus at most
/// this plus one message, so a sled leaf of them stays well below a quarter of a segment (see
/// [`super::SEGMENT_BYTES`]).
pub(super) const MAX_BYTES: usize = 32 << 10;

/// The messages of one chunk: seq and encoded body, in seq order.
pub(super) type Entries = Vec<(u64, IVec)>;

/// The messages in the chunk stored under `key` (bodies share the record's buffer).
pub(super) fn split(key: &[u8], value: &IVec) -> Result<Entries, StoreError> {
    let seq = keys::seq_of(key).ok_or_else(|| corrupt(key, CodecError::Empty))?;
    let parts = codec::split_chunk(seq, value).map_err(|e| corrupt(key, e))?;
    if parts.first().is_some_and(|(first, _)| *first < seq) {
        return Err(corrupt(key, CodecError::Chunk(0)));
    }
    Ok(parts
        .into_iter()
        .map(|(s, r)| (s, value.subslice(r.start, r.len())))
        .collect())
}

/// The record for `entries` (not empty, seqs ascending).
pub(super) fn encode(entries: &[(u64, IVec)]) -> Vec<u8> {
    codec::encode_chunk(entries.iter().map(|(s, b)| (*s, b.as_ref())))
}

/// Decodes one message out of the chunk under `key`: its body inline, or where its reference
/// points in the body log. None when the body log no longer holds it (its segment was deleted
/// since the chunk was read: the message is no longer stored).
pub(super) fn message(
    key: &[u8],
    entry: &[u8],
    bodies: &dyn Bodies,
) -> Result<Option<StoredMessage>, StoreError> {
    match BodyRef::decode(entry) {
        None => codec::decode_body(entry)
            .map(Some)
            .map_err(|e| corrupt(key, e)),
        Some((r, _)) => match bodies.body(r)? {
            Some(body) => codec::decode_body(&body)
                .map(Some)
                .map_err(|e| corrupt(key, e)),
            None => Ok(None),
        },
    }
}

/// [`message`] where the message must be there: the writer's own reads, whose body log deletes
/// nothing the tree still refers to.
pub(super) fn stored_message(
    key: &[u8],
    entry: &[u8],
    bodies: &dyn Bodies,
) -> Result<StoredMessage, StoreError> {
    message(key, entry, bodies)?
        .ok_or_else(|| corrupt(key, CodecError::Body("its body is gone".into())))
}

/// The body `r` (in the chunk under `key`) where it must be there: the writer's own reads.
pub(super) fn stored_body(
    key: &[u8],
    r: BodyRef,
    bodies: &dyn Bodies,
) -> Result<Vec<u8>, StoreError> {
    bodies
        .body(r)?
        .ok_or_else(|| corrupt(key, CodecError::Body("its body is gone".into())))
}

/// The chunk `value` (under `key`) with every body inline: what a copy of the store holds, so it
/// stands without the body log. None when none of its messages is stored any more.
pub(super) fn inline(
    key: &[u8],
    value: &IVec,
    bodies: &dyn Bodies,
) -> Result<Option<IVec>, StoreError> {
    let entries = split(key, value)?;
    if !entries.iter().any(|(_, e)| bodies::is_ref(e)) {
        return Ok(Some(value.clone()));
    }
    let mut out = Vec::with_capacity(entries.len());
    for (seq, e) in entries {
        match BodyRef::decode(&e) {
            None => out.push((seq, e)),
            Some((r, _)) => {
                if let Some(body) = bodies.body(r)? {
                    out.push((seq, IVec::from(body)));
                }
            }
        }
    }
    Ok((!out.is_empty()).then(|| IVec::from(encode(&out))))
}

/// The body log references the chunk `value` holds.
pub(super) fn refs(key: &[u8], value: &[u8]) -> Result<Vec<BodyRef>, StoreError> {
    let seq = keys::seq_of(key).ok_or_else(|| corrupt(key, CodecError::Empty))?;
    let parts = codec::split_chunk(seq, value).map_err(|e| corrupt(key, e))?;
    Ok(parts
        .into_iter()
        .filter_map(|(_, r)| value.get(r).and_then(BodyRef::decode).map(|(r, _)| r))
        .collect())
}

/// Every body log reference `tree` holds, by record: the message chunks' and the key runs'
/// (what the body log counts when it opens).
pub(super) fn stored_refs(tree: &sled::Tree) -> Result<Stored, StoreError> {
    let mut out = Vec::new();
    for item in tree.scan_prefix([keys::MSG]) {
        let (k, v) = item?;
        let refs = refs(&k, &v)?;
        if !refs.is_empty() {
            out.push((k.to_vec(), refs));
        }
    }
    for item in tree.scan_prefix([keys::DEDUP_RUN]) {
        let (k, v) = item?;
        if let Some((r, _)) = bodies::decode_place(&v) {
            out.push((k.to_vec(), vec![r]));
        }
    }
    Ok(out)
}

/// What the writer needs of the message `entry` (in the chunk under `key`) without its body:
/// from the reference, or from the inline body.
pub(super) fn facts(key: &[u8], entry: &[u8]) -> Result<Facts, StoreError> {
    if let Some((_, f)) = BodyRef::decode(entry) {
        return Ok(f);
    }
    if bodies::is_ref(entry) {
        return Err(corrupt(
            key,
            CodecError::Body("a malformed reference".into()),
        ));
    }
    let m: StoredMessage = codec::decode_body(entry).map_err(|e| corrupt(key, e))?;
    Ok(Facts {
        ts: m.ts,
        expires_at: m.expires_at,
        size: super::records::payload_len(&m.payload),
    })
}

/// The stored chunk of `cid` that can hold `seq`: the greatest key at or below it.
pub(super) fn holding(
    tree: &sled::Tree,
    cid: u64,
    seq: u64,
) -> Result<Option<(IVec, IVec)>, StoreError> {
    let lo = keys::seq_key(keys::MSG, cid, 0);
    let hi = keys::seq_key(keys::MSG, cid, seq);
    Ok(tree.range(lo..=hi).next_back().transpose()?)
}

/// Up to `limit` stored messages of `cid` with seq in `from..to`, in seq order, as the tree
/// holds them now.
pub(super) fn read(
    tree: &sled::Tree,
    bodies: &dyn Bodies,
    cid: u64,
    from: u64,
    to: u64,
    limit: usize,
) -> Result<Vec<(u64, StoredMessage)>, StoreError> {
    let mut out = Vec::new();
    if from >= to || limit == 0 {
        return Ok(out);
    }
    let take = |key: &[u8], value: &IVec, out: &mut Vec<_>| -> Result<bool, StoreError> {
        for (seq, body) in split(key, value)? {
            if seq < from {
                continue;
            }
            if seq >= to || out.len() >= limit {
                return Ok(false);
            }
            if let Some(m) = message(key, &body, bodies)? {
                out.push((seq, m));
            }
        }
        Ok(out.len() < limit)
    };
    let after = match holding(tree, cid, from)? {
        Some((k, v)) => {
            if !take(&k, &v, &mut out)? {
                return Ok(out);
            }
            Bound::Excluded(k.to_vec())
        }
        None => Bound::Included(keys::seq_key(keys::MSG, cid, from).to_vec()),
    };
    let end = Bound::Excluded(keys::seq_key(keys::MSG, cid, to).to_vec());
    for item in tree.range::<Vec<u8>, _>((after, end)) {
        let (k, v) = item?;
        if !take(&k, &v, &mut out)? {
            break;
        }
    }
    Ok(out)
}

/// One stored message of `cid`, None when it is not stored.
pub(super) fn get(
    tree: &sled::Tree,
    bodies: &dyn Bodies,
    cid: u64,
    seq: u64,
) -> Result<Option<StoredMessage>, StoreError> {
    let Some((k, v)) = holding(tree, cid, seq)? else {
        return Ok(None);
    };
    match split(&k, &v)?.into_iter().find(|(s, _)| *s == seq) {
        Some((_, body)) => message(&k, &body, bodies),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::StoredPayload;

    fn msg(n: u64) -> StoredMessage {
        StoredMessage {
            id: n,
            ts: n,
            from: None,
            topic: None,
            payload: StoredPayload::Json(format!("\"m{n}\"")),
            expires_at: 0,
        }
    }

    fn put(tree: &sled::Tree, cid: u64, seqs: &[u64]) {
        let entries: Entries = seqs
            .iter()
            .map(|s| (*s, IVec::from(codec::encode_body(&msg(*s)).unwrap())))
            .collect();
        tree.insert(keys::seq_key(keys::MSG, cid, seqs[0]), encode(&entries))
            .unwrap();
    }

    fn seqs(v: Vec<(u64, StoredMessage)>) -> Vec<u64> {
        v.into_iter()
            .map(|(s, m)| {
                assert_eq!(m, msg(s), "the body read is the one stored under {s}");
                s
            })
            .collect()
    }

    #[test]
    fn reads_start_inside_a_chunk_and_cross_into_the_next() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let t = db.open_tree("o").unwrap();
        put(&t, 7, &[1, 2, 3]);
        put(&t, 7, &[5, 6]);
        put(&t, 7, &[9]);
        // Another client's chunks on both sides must not show.
        put(&t, 6, &[4]);
        put(&t, 8, &[1]);
        assert_eq!(
            seqs(read(&t, &bodies::Inline, 7, 2, 100, 100).unwrap()),
            vec![2, 3, 5, 6, 9]
        );
        assert_eq!(
            seqs(read(&t, &bodies::Inline, 7, 4, 100, 100).unwrap()),
            vec![5, 6, 9]
        );
        assert_eq!(
            seqs(read(&t, &bodies::Inline, 7, 0, 6, 100).unwrap()),
            vec![1, 2, 3, 5]
        );
        assert_eq!(
            seqs(read(&t, &bodies::Inline, 7, 3, 100, 2).unwrap()),
            vec![3, 5]
        );
        assert!(read(&t, &bodies::Inline, 7, 10, 100, 100)
            .unwrap()
            .is_empty());
        assert!(read(&t, &bodies::Inline, 9, 0, 100, 100)
            .unwrap()
            .is_empty());
        assert_eq!(get(&t, &bodies::Inline, 7, 6).unwrap(), Some(msg(6)));
        assert_eq!(get(&t, &bodies::Inline, 7, 4).unwrap(), None);
        assert_eq!(get(&t, &bodies::Inline, 7, 0).unwrap(), None);
    }

    #[test]
    fn a_record_of_one_message_reads_as_a_chunk() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let t = db.open_tree("o").unwrap();
        t.insert(
            keys::seq_key(keys::MSG, 1, 4),
            codec::encode(&msg(4)).unwrap(),
        )
        .unwrap();
        put(&t, 1, &[5, 6]);
        assert_eq!(
            seqs(read(&t, &bodies::Inline, 1, 0, 10, 10).unwrap()),
            vec![4, 5, 6]
        );
    }

    #[test]
    fn a_chunk_holding_seqs_below_its_key_is_corrupt() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let t = db.open_tree("o").unwrap();
        let body = IVec::from(codec::encode_body(&msg(2)).unwrap());
        t.insert(keys::seq_key(keys::MSG, 1, 3), encode(&[(2, body)]))
            .unwrap();
        assert!(matches!(
            read(&t, &bodies::Inline, 1, 0, 10, 10),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
