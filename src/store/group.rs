//! The writes of one commit group, gathered into a single sled batch.
//!
//! Every `apply_batch` in sled rolls its I/O buffer twice (one write to the log each), so one
//! batch per publish and per ack cost about four log writes per message. The writer instead
//! collects a whole group's publishes, acks and hellos here and applies them as one batch just
//! before the commit's flush + fdatasync. The batch is atomic in sled's recovery, and nothing in
//! the group is confirmed before the commit, so a crash loses the whole group or nothing.
//!
//! Until it is applied, the tree does not show the group's writes, so the writer looks here
//! first for what its own reads depend on: idempotency keys stored earlier in the group and
//! messages and tombstones an earlier ack in the group deleted. Commands whose reads this
//! overlay does not cover (retention, purge, backup) apply the group first.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::codec::DedupEntry;

/// The most writes one group gathers before it is committed (a publish is never split: the
/// group closes after the command that crosses it).
pub(super) const MAX_WRITES: usize = 50_000;

#[derive(Default)]
pub(super) struct Group {
    batch: sled::Batch,
    /// Writes in `batch`; zero means there is nothing to apply.
    writes: usize,
    /// Keys (`O`/`X cid seq`, fixed width) of messages and tombstones deleted in this group
    /// (still in the tree until it is applied). Fixed-size, so an ack allocates nothing here.
    removed: HashSet<[u8; 17]>,
    /// Idempotency keys stored in this group, by their `K` key.
    dedup: HashMap<Vec<u8>, DedupEntry>,
    /// Clients whose `ClientMeta` changed: written once per group, at apply time.
    dirty: BTreeSet<u64>,
}

impl Group {
    pub(super) fn insert(&mut self, key: impl AsRef<[u8]>, value: impl Into<sled::IVec>) {
        self.batch.insert(key.as_ref(), value.into());
        self.writes += 1;
    }

    pub(super) fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.batch.remove(key.as_ref());
        self.writes += 1;
    }

    /// Deletes a stored message or tombstone; later reads in this group must skip it.
    pub(super) fn remove_seq(&mut self, key: [u8; 17]) {
        self.remove(key);
        self.removed.insert(key);
    }

    /// Writes gathered so far: the writer closes a group at [`MAX_WRITES`], so a fan-out to
    /// many subscribers does not pile a million writes into one batch.
    pub(super) fn writes(&self) -> usize {
        self.writes
    }

    pub(super) fn is_removed(&self, key: &[u8]) -> bool {
        <[u8; 17]>::try_from(key).is_ok_and(|k| self.removed.contains(&k))
    }

    pub(super) fn store_dedup(&mut self, key: Vec<u8>, entry: DedupEntry, value: Vec<u8>) {
        self.insert(&key, value);
        self.dedup.insert(key, entry);
    }

    pub(super) fn dedup(&self, key: &[u8]) -> Option<&DedupEntry> {
        self.dedup.get(key)
    }

    pub(super) fn touch_meta(&mut self, cid: u64) {
        self.dirty.insert(cid);
    }

    /// Hands over the batch and the clients whose meta the caller must add to it, and resets
    /// the overlay. None when the group wrote nothing.
    pub(super) fn take(&mut self) -> Option<(sled::Batch, BTreeSet<u64>)> {
        let dirty = std::mem::take(&mut self.dirty);
        let batch = std::mem::take(&mut self.batch);
        let writes = std::mem::take(&mut self.writes);
        self.removed.clear();
        self.dedup.clear();
        if writes == 0 && dirty.is_empty() {
            return None;
        }
        Some((batch, dirty))
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
        g.remove_seq([b'O'; 17]);
        g.store_dedup(
            b"K1".to_vec(),
            DedupEntry {
                id: 1,
                ts: 2,
                recipients: 1,
            },
            vec![0],
        );
        g.touch_meta(3);
        assert!(g.is_removed(&[b'O'; 17]));
        assert!(g.dedup(b"K1").is_some());
        let (_, dirty) = g.take().expect("writes were gathered");
        assert_eq!(dirty.into_iter().collect::<Vec<_>>(), vec![3]);
        assert!(!g.is_removed(&[b'O'; 17]));
        assert!(g.dedup(b"K1").is_none());
        assert!(g.take().is_none());
    }

    #[test]
    fn a_meta_change_alone_is_something_to_apply() {
        let mut g = Group::default();
        g.touch_meta(9);
        assert!(g.take().is_some());
    }
}
