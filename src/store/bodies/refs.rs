//! References: what a message chunk (or a key run's `R` record) holds in place of a body that
//! lives in the body log, and the facts an ack, an expiry or a purge needs without reading the
//! body.

/// The first byte of a reference. A body in a chunk starts with its message id as a bincode
/// varint, whose first byte is never 255.
const MARK: u8 = 0xFF;

/// Where a body is: its segment, the offset of its record, its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(in crate::store) struct BodyRef {
    pub seg: u64,
    pub off: u64,
    pub len: u32,
}

/// What the writer needs of a message without reading its body: an ack, an expiry or a purge
/// reads these from the chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::store) struct Facts {
    /// Publish time, Unix ms.
    pub ts: u64,
    /// Unix ms after which retention removes it, 0 = never.
    pub expires_at: u64,
    /// Payload bytes, as the outbox quotas count them.
    pub size: u64,
}

impl BodyRef {
    /// The chunk entry for a body stored here: the mark, then the place and the facts as
    /// LEB128 varints (about 17 bytes for a message today).
    pub(in crate::store) fn encode(&self, facts: Facts) -> Vec<u8> {
        let mut out = Vec::with_capacity(24);
        out.push(MARK);
        for v in [
            self.seg,
            self.off,
            u64::from(self.len),
            facts.ts,
            facts.expires_at,
            facts.size,
        ] {
            put_varint(&mut out, v);
        }
        out
    }

    /// The reference and facts a chunk entry holds, None when the entry holds its body itself
    /// (or is not a well-formed reference).
    pub(in crate::store) fn decode(entry: &[u8]) -> Option<(BodyRef, Facts)> {
        let (&mark, mut rest) = entry.split_first()?;
        if mark != MARK {
            return None;
        }
        let mut v = [0u64; 6];
        for slot in &mut v {
            *slot = take_varint(&mut rest)?;
        }
        if !rest.is_empty() {
            return None;
        }
        Some((
            BodyRef {
                seg: v[0],
                off: v[1],
                len: u32::try_from(v[2]).ok()?,
            },
            Facts {
                ts: v[3],
                expires_at: v[4],
                size: v[5],
            },
        ))
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn take_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            *bytes = &bytes[i + 1..];
            return Some(v);
        }
    }
    None
}

/// A reference to a record other than a message body (a run of idempotency keys) followed by
/// `rest`: the mark, segment, offset and length as varints, then `rest` as it is.
pub(in crate::store) fn encode_place(r: BodyRef, rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + rest.len());
    out.push(MARK);
    for v in [r.seg, r.off, u64::from(r.len)] {
        put_varint(&mut out, v);
    }
    out.extend_from_slice(rest);
    out
}

/// The reference and the rest of a value written by [`encode_place`]; None for any other
/// value (a record of the codec starts with its format version, never with the mark).
pub(in crate::store) fn decode_place(value: &[u8]) -> Option<(BodyRef, &[u8])> {
    let (&mark, mut rest) = value.split_first()?;
    if mark != MARK {
        return None;
    }
    let seg = take_varint(&mut rest)?;
    let off = take_varint(&mut rest)?;
    let len = u32::try_from(take_varint(&mut rest)?).ok()?;
    Some((BodyRef { seg, off, len }, rest))
}

/// Whether a chunk entry is a reference (or a body stored inline, as before the body log).
pub(in crate::store) fn is_ref(entry: &[u8]) -> bool {
    entry.first() == Some(&MARK)
}
