//! The writes of one commit group, gathered into a single sled batch.
//!
//! Every `apply_batch` in sled rolls its I/O buffer twice (one write to the log each), so one
//! batch per publish and per ack cost about four log writes per message. The writer instead
//! collects a whole group's publishes, acks and hellos here and applies them as one batch just
//! before the commit's flush + fdatasync. The batch is atomic in sled's recovery, and nothing in
//! the group is confirmed before the commit, so a crash loses the whole group or nothing.
//!
//! Until it is applied, the tree does not show the group's writes, so the writer looks here
//! first for what its own reads depend on: idempotency keys stored earlier in the group (which
//! reach the tree as `dedup` decides when the group is taken),
//! message chunks the group wrote, rewrote or deleted (see [`super::chunks`]), and tombstones
//! an earlier ack in the group deleted. Commands whose reads this overlay does not cover
//! (retention, purge, backup) apply the group first.
//!
//! Chunks are kept here decoded and encoded once, when the group is applied: a group's new
//! messages for one outbox are appended to the chunk the group opened for it, and several acks
//! in one group rewrite a chunk once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use sled::IVec;

use super::chunks::{self, Entries};
use super::keys;
use crate::codec::DedupEntry;

/// The most writes one group gathers before it is committed (a publish is never split: the
/// group closes after the command that crosses it).
pub(super) const MAX_WRITES: usize = 50_000;

/// Idempotency keys listed for expiry: (time stored, scope + key).
pub(super) type Expiring = Vec<(u64, Vec<u8>)>;

/// A group's writes by key, `None` = remove; the last write to a key wins, as in a sled batch.
pub(super) type Writes = BTreeMap<IVec, Option<IVec>>;

#[derive(Default)]
pub(super) struct Group {
    ops: Writes,
    /// Writes gathered (`ops` and chunks); zero means there is nothing to apply.
    writes: usize,
    /// Keys (`X cid seq`, fixed width) of tombstones deleted in this group (still in the tree
    /// until it is applied). Fixed-size, so an ack allocates nothing here.
    removed: HashSet<[u8; 17]>,
    /// Message chunks as this group leaves them, by key: `None` = deleted.
    chunks: BTreeMap<[u8; 17], Option<Entries>>,
    /// By client: the chunk this group opened for its new messages, and its body bytes.
    open: HashMap<u64, ([u8; 17], usize)>,
    /// Idempotency keys stored in this group, by scope + key (sorted, as `dedup::place`
    /// wants them), and the first one's message id (which makes the key of the group's dedup
    /// expiry records unique).
    dedup: BTreeMap<Vec<u8>, DedupEntry>,
    dedup_id: u64,
    /// Clients whose `ClientMeta` changed: written once per group, at apply time.
    dirty: BTreeSet<u64>,
}

impl Group {
    pub(super) fn insert(&mut self, key: impl AsRef<[u8]>, value: impl Into<sled::IVec>) {
        self.ops
            .insert(IVec::from(key.as_ref()), Some(value.into()));
        self.writes += 1;
    }

    pub(super) fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.ops.insert(IVec::from(key.as_ref()), None);
        self.writes += 1;
    }

    /// Deletes a stored tombstone; later reads in this group must skip it.
    pub(super) fn remove_tombstone(&mut self, key: [u8; 17]) {
        self.remove(key);
        self.removed.insert(key);
    }

    /// Adds a new message (its encoded body) to `cid`'s outbox: to the chunk this group opened
    /// for it while that has room, else to a new one.
    pub(super) fn append(&mut self, cid: u64, seq: u64, body: IVec) {
        self.writes += 1;
        let len = body.len();
        if let Some((key, bytes)) = self.open.get_mut(&cid) {
            if let Some(Some(entries)) = self.chunks.get_mut(key) {
                if entries.len() < chunks::MAX_MESSAGES && *bytes < chunks::MAX_BYTES {
                    entries.push((seq, body));
                    *bytes += len;
                    return;
                }
            }
        }
        let key = keys::seq_key(keys::MSG, cid, seq);
        self.chunks.insert(key, Some(vec![(seq, body)]));
        self.open.insert(cid, (key, len));
    }

    /// The group's version of the chunk under `key`: `Some(None)` when it deleted it, `None`
    /// when it did not touch it.
    pub(super) fn chunk(&self, key: &[u8]) -> Option<Option<&Entries>> {
        let key = <[u8; 17]>::try_from(key).ok()?;
        self.chunks.get(&key).map(Option::as_ref)
    }

    /// The live chunk of `cid` this group holds with the greatest key in `lo..=hi`.
    pub(super) fn last_chunk_in(&self, cid: u64, lo: u64, hi: u64) -> Option<([u8; 17], &Entries)> {
        let range = keys::seq_key(keys::MSG, cid, lo)..=keys::seq_key(keys::MSG, cid, hi);
        self.chunks
            .range(range)
            .rev()
            .find_map(|(k, e)| e.as_ref().map(|e| (*k, e)))
    }

    /// The live chunk of `cid` this group holds with the least key in `lo..=hi`.
    pub(super) fn first_chunk_in(
        &self,
        cid: u64,
        lo: u64,
        hi: u64,
    ) -> Option<([u8; 17], &Entries)> {
        let range = keys::seq_key(keys::MSG, cid, lo)..=keys::seq_key(keys::MSG, cid, hi);
        self.chunks
            .range(range)
            .find_map(|(k, e)| e.as_ref().map(|e| (*k, e)))
    }

    /// The group's writes (`Some`) and removals (`None`) of records of `kind` (a key's first
    /// byte).
    pub(super) fn ops_of(&self, kind: u8) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
        self.ops
            .range(IVec::from(&[kind][..])..IVec::from(&[kind + 1][..]))
            .map(|(k, v)| (k.as_ref(), v.as_deref()))
    }

    /// The chunks the group wrote, rewrote (`Some`) or deleted (`None`), by key.
    pub(super) fn chunks(&self) -> impl Iterator<Item = (&[u8; 17], Option<&Entries>)> {
        self.chunks.iter().map(|(k, e)| (k, e.as_ref()))
    }

    /// Leaves the chunk stored under `key` holding `entries` (deleted when they are none). It
    /// keeps its key when its first messages leave: every message in it is still at or above
    /// the key and below the next chunk's.
    pub(super) fn put_chunk(&mut self, key: [u8; 17], entries: Entries) {
        self.writes += 1;
        self.chunks
            .insert(key, (!entries.is_empty()).then_some(entries));
    }

    /// Writes gathered so far: the writer closes a group at [`MAX_WRITES`], so a fan-out to
    /// many subscribers does not pile a million writes into one batch.
    pub(super) fn writes(&self) -> usize {
        self.writes
    }

    pub(super) fn is_removed(&self, key: &[u8]) -> bool {
        <[u8; 17]>::try_from(key).is_ok_and(|k| self.removed.contains(&k))
    }

    /// Stores an idempotency key (`body` = scope + key). Where it goes (a run or a record of
    /// its own) is decided when the group is taken ([`Group::take_dedup`]).
    pub(super) fn store_dedup(&mut self, body: &[u8], entry: DedupEntry) {
        if self.dedup.is_empty() {
            self.dedup_id = entry.id;
        }
        self.writes += 1;
        self.dedup.insert(body.to_vec(), entry);
    }

    /// The idempotency keys this group stored, and the first one's message id. None when it
    /// stored none.
    pub(super) fn take_dedup(&mut self) -> Option<(BTreeMap<Vec<u8>, DedupEntry>, u64)> {
        if self.dedup.is_empty() {
            return None;
        }
        Some((std::mem::take(&mut self.dedup), self.dedup_id))
    }

    /// The entry this group stored for `body` (scope + key).
    pub(super) fn dedup(&self, body: &[u8]) -> Option<&DedupEntry> {
        self.dedup.get(body)
    }

    pub(super) fn touch_meta(&mut self, cid: u64) {
        self.dirty.insert(cid);
    }

    /// Hands over the writes and the clients whose meta the caller must add to them, and
    /// resets the overlay. None when the group wrote nothing.
    pub(super) fn take(&mut self) -> Option<(Writes, BTreeSet<u64>)> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut ops = std::mem::take(&mut self.ops);
        let writes = std::mem::take(&mut self.writes);
        for (key, entries) in std::mem::take(&mut self.chunks) {
            let value = entries.map(|e| IVec::from(chunks::encode(&e)));
            ops.insert(IVec::from(&key[..]), value);
        }
        self.open.clear();
        self.removed.clear();
        self.dedup.clear();
        if writes == 0 && dirty.is_empty() {
            return None;
        }
        Some((ops, dirty))
    }

    /// Drops everything gathered (the store latched: none of it will be confirmed).
    pub(super) fn discard(&mut self) {
        *self = Group::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_group_has_nothing_to_apply() {
        let mut g = Group::default();
        assert!(g.take().is_none());
    }

    #[test]
    fn taking_the_group_clears_its_overlay() {
        let mut g = Group::default();
        g.remove_tombstone([b'X'; 17]);
        g.store_dedup(
            b"1",
            DedupEntry {
                id: 1,
                ts: 2,
                recipients: 1,
                fp: 7,
            },
        );
        g.touch_meta(3);
        assert!(g.is_removed(&[b'X'; 17]));
        assert!(g.dedup(b"1").is_some());
        let (_, dirty) = g.take().expect("writes were gathered");
        assert_eq!(dirty.into_iter().collect::<Vec<_>>(), vec![3]);
        assert!(!g.is_removed(&[b'X'; 17]));
        assert!(g.dedup(b"1").is_none());
        assert!(g.take().is_none());
    }

    fn body(n: u8) -> IVec {
        IVec::from(vec![n; 100])
    }

    #[test]
    fn a_groups_messages_for_one_outbox_share_a_chunk_until_it_is_full() {
        let mut g = Group::default();
        for seq in 1..=chunks::MAX_MESSAGES as u64 + 1 {
            g.append(4, seq, body(1));
        }
        g.append(5, 1, body(2));
        let first = g.chunk(&keys::seq_key(keys::MSG, 4, 1)).flatten().unwrap();
        assert_eq!(first.len(), chunks::MAX_MESSAGES);
        let next = keys::seq_key(keys::MSG, 4, chunks::MAX_MESSAGES as u64 + 1);
        assert_eq!(g.chunk(&next).flatten().unwrap().len(), 1);
        assert_eq!(
            g.chunk(&keys::seq_key(keys::MSG, 5, 1))
                .flatten()
                .unwrap()
                .len(),
            1
        );
        assert_eq!(g.writes(), chunks::MAX_MESSAGES + 2);
    }

    #[test]
    fn a_rewritten_chunk_keeps_its_key_and_an_emptied_one_is_deleted() {
        let mut g = Group::default();
        let k3 = keys::seq_key(keys::MSG, 1, 3);
        let k9 = keys::seq_key(keys::MSG, 1, 9);
        g.put_chunk(k3, vec![(5, body(5)), (6, body(6))]);
        g.put_chunk(k9, vec![(9, body(9))]);
        assert_eq!(g.chunk(&k3).flatten().map(Vec::len), Some(2));
        assert_eq!(g.last_chunk_in(1, 0, 8).map(|(k, _)| k), Some(k3));
        assert_eq!(g.first_chunk_in(1, 4, 9).map(|(k, _)| k), Some(k9));
        g.put_chunk(k9, Vec::new());
        assert_eq!(g.chunk(&k9), Some(None));
        assert_eq!(g.last_chunk_in(1, 0, 20).map(|(k, _)| k), Some(k3));
        let (writes, _) = g.take().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        db.insert(k9, &b"old"[..]).unwrap();
        db.apply_batch(super::super::journal::to_batch(writes))
            .unwrap();
        assert_eq!(
            db.len(),
            1,
            "the emptied chunk is deleted once the group is applied"
        );
        assert!(db.get(k3).unwrap().is_some());
        assert!(
            g.chunk(&k3).is_none(),
            "nothing is left over for the next group"
        );
    }

    #[test]
    fn a_groups_idempotency_keys_are_handed_over_sorted_with_the_first_id() {
        let mut g = Group::default();
        assert!(g.take_dedup().is_none());
        for (id, key) in [(7, "k9"), (8, "k1"), (9, "k5")] {
            let entry = DedupEntry {
                id,
                ts: 100,
                recipients: 1,
                fp: 7,
            };
            g.store_dedup(key.as_bytes(), entry);
        }
        assert_eq!(g.writes(), 3);
        let (keys, id) = g.take_dedup().expect("keys were stored");
        assert_eq!(id, 7);
        let order: Vec<&[u8]> = keys.keys().map(Vec::as_slice).collect();
        assert_eq!(order, [&b"k1"[..], b"k5", b"k9"]);
        assert!(g.take_dedup().is_none());
    }

    #[test]
    fn a_meta_change_alone_is_something_to_apply() {
        let mut g = Group::default();
        g.touch_meta(9);
        assert!(g.take().is_some());
    }
}
