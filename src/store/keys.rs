//! The key layout of the `outbox` tree: a one-byte kind, then big-endian integers and
//! length-prefixed names, so that one range scan reads an outbox in seq order and no client's
//! or topic's keys are a prefix of another's. Every module that reads or writes a record builds
//! its key here.
//!
//! Layout (one sled db in the data dir):
//! - tree `clients`: client name -> client number (u64 big-endian), fixed width so no client's
//!   keys are a prefix of another's;
//! - tree `outbox`, keys by a one-byte kind:
//!   `M cid` -> `ClientMeta`; `O cid seq` -> a chunk of messages from `seq` on (see
//!   `chunks`; a record of one `StoredMessage` before chunks); `X cid seq` -> () a message
//!   that retention removed unacked (counted in `missed`); `E expires cid seq` -> () the expiry
//!   index; `S len topic cid` -> () a subscription; `R len scope key` -> a run of
//!   idempotency keys of one scope up to `key` (see `dedup`): where the run is in the body log
//!   and its first key, or (written before the body log) the run itself; `K len scope key` ->
//!   `DedupEntry`, a key not stored in a run; `G ts id` -> the (time, scope + key) of each `K`
//!   one group stored, `ts` the newest, and `H ts id` the same for its runs: the dedup expiry
//!   index (data dirs from before hold `D ts len scope key` -> (), one per key, still read);
//!   `J` -> the writes of the last small commit group, present only until they reached the
//!   tree (data dirs from before the body log journal; see `journal`); `C` -> the number of the
//!   last commit group (see `integrity`); `P` -> the body log position from which the commit
//!   journal's records may not be in the tree yet (see `journal`).

pub const META: u8 = b'M';
pub const MSG: u8 = b'O';
pub const MISSED: u8 = b'X';
pub const EXPIRY: u8 = b'E';
pub const SUB: u8 = b'S';
pub const DEDUP: u8 = b'K';
pub const DEDUP_EXPIRY: u8 = b'D';
pub const DEDUP_LIST: u8 = b'G';
/// Several idempotency keys of one scope in one record (see `dedup`).
pub const DEDUP_RUN: u8 = b'R';
/// The dedup runs one group stored, for retention (as `DEDUP_LIST` for `K` records).
pub const DEDUP_RUN_LIST: u8 = b'H';
/// The one journal record (`journal::KEY`).
pub const JOURNAL: u8 = b'J';
/// The number of the last commit group (see `integrity`).
pub const COMMIT: u8 = b'C';
/// Where the commit journal's records not yet known durable in the tree start (see `journal`).
pub const CHECKPOINT: u8 = b'P';

pub fn commit() -> [u8; 1] {
    [COMMIT]
}

pub fn checkpoint() -> [u8; 1] {
    [CHECKPOINT]
}

pub fn meta(cid: u64) -> [u8; 9] {
    let mut k = [META; 9];
    k[1..].copy_from_slice(&cid.to_be_bytes());
    k
}

pub fn seq_key(kind: u8, cid: u64, seq: u64) -> [u8; 17] {
    let mut k = [kind; 17];
    k[1..9].copy_from_slice(&cid.to_be_bytes());
    k[9..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub fn seq_prefix(kind: u8, cid: u64) -> [u8; 9] {
    let mut k = [kind; 9];
    k[1..].copy_from_slice(&cid.to_be_bytes());
    k
}

pub fn seq_of(key: &[u8]) -> Option<u64> {
    key.get(9..17)?.try_into().ok().map(u64::from_be_bytes)
}

pub fn expiry(at: u64, cid: u64, seq: u64) -> [u8; 25] {
    let mut k = [EXPIRY; 25];
    k[1..9].copy_from_slice(&at.to_be_bytes());
    k[9..17].copy_from_slice(&cid.to_be_bytes());
    k[17..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// `(at, cid, seq)` of an expiry key.
pub fn parse_expiry(key: &[u8]) -> Option<(u64, u64, u64)> {
    let at = u64::from_be_bytes(key.get(1..9)?.try_into().ok()?);
    let cid = u64::from_be_bytes(key.get(9..17)?.try_into().ok()?);
    let seq = u64::from_be_bytes(key.get(17..25)?.try_into().ok()?);
    Some((at, cid, seq))
}

fn push_name(k: &mut Vec<u8>, name: &str) {
    // Names are at most 255 bytes (validated types), so the length fits one byte.
    k.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
    k.extend_from_slice(name.as_bytes());
}

pub fn sub_prefix(topic: &str) -> Vec<u8> {
    let mut k = vec![SUB];
    push_name(&mut k, topic);
    k
}

pub fn sub(topic: &str, cid: u64) -> Vec<u8> {
    let mut k = sub_prefix(topic);
    k.extend_from_slice(&cid.to_be_bytes());
    k
}

/// `(topic, cid)` of a subscription key.
pub fn parse_sub(key: &[u8]) -> Option<(String, u64)> {
    let len = usize::from(*key.get(1)?);
    let topic = std::str::from_utf8(key.get(2..2 + len)?).ok()?.to_owned();
    let cid = u64::from_be_bytes(key.get(2 + len..2 + len + 8)?.try_into().ok()?);
    Some((topic, cid))
}

/// The part of a dedup key after the kind byte: scope and key.
pub fn dedup_body(scope: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + scope.len() + key.len());
    push_name(&mut k, scope);
    k.extend_from_slice(key.as_bytes());
    k
}

/// `kind` followed by `body`.
fn kind_and(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + body.len());
    k.push(kind);
    k.extend_from_slice(body);
    k
}

pub fn dedup(body: &[u8]) -> Vec<u8> {
    kind_and(DEDUP, body)
}

/// The key of a dedup run: the scope and the greatest key it holds.
pub fn dedup_run(body: &[u8]) -> Vec<u8> {
    kind_and(DEDUP_RUN, body)
}

/// The key of one group's record listing, for retention, the `K` records
/// (`kind` = [`DEDUP_LIST`]) or the runs ([`DEDUP_RUN_LIST`]) it stored: the newest time it
/// lists, then the group's first message id (unique across restarts).
pub fn group_list(kind: u8, ts: u64, id: u64) -> Vec<u8> {
    let mut k = vec![kind];
    k.extend_from_slice(&ts.to_be_bytes());
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub fn dedup_expiry(ts: u64, body: &[u8]) -> Vec<u8> {
    let mut k = vec![DEDUP_EXPIRY];
    k.extend_from_slice(&ts.to_be_bytes());
    k.extend_from_slice(body);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_keys_sort_by_client_then_seq() {
        let a = seq_key(MSG, 1, 255);
        let b = seq_key(MSG, 1, 256);
        let c = seq_key(MSG, 2, 0);
        assert!(a < b && b < c);
        assert_eq!(seq_of(&b), Some(256));
    }

    #[test]
    fn no_client_prefix_is_a_prefix_of_another() {
        // Fixed-width numbers: client 1's range never contains client 256's keys.
        let p1 = seq_prefix(MSG, 1);
        let k256 = seq_key(MSG, 256, 1);
        assert!(!k256.starts_with(&p1));
    }

    #[test]
    fn subscription_keys_round_trip_and_do_not_collide() {
        let k = sub("news", 7);
        assert_eq!(parse_sub(&k), Some(("news".into(), 7)));
        // "news" and "news/eu" differ in the length byte, so one is no prefix of the other.
        assert!(!sub("news/eu", 7).starts_with(&sub_prefix("news")));
    }

    #[test]
    fn expiry_keys_sort_by_time() {
        let a = expiry(10, 9, 9);
        let b = expiry(11, 1, 1);
        assert!(a < b);
        assert_eq!(parse_expiry(&a), Some((10, 9, 9)));
    }
}
