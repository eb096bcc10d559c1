//! Small commit groups reach the log as one record, then the tree one write at a time.
//!
//! A sled batch is atomic in recovery, but sled pays for that on every batch, however small: it
//! seals its log buffer around the batch's manifest, and each sealed buffer is one more write,
//! one more `sync_file_range` and one more job for sled's I/O threads, which wake all of their
//! idle threads for each job. At low load nearly every publish is a commit group of its own,
//! and that overhead is most of what the publish waits for.
//!
//! So a group of few writes ([`fits`]) is written as a single record under the key `J` (one
//! insert, atomic by itself), the commit's flush + fdatasync covers it, and only then do its
//! writes go to the tree, one plain insert or remove each, followed by the removal of `J`. The
//! writer thread does all of this in order and nothing else writes the tree, so in sled's log
//! the record comes before its own writes, they come before the record's removal, and every
//! later write comes after that removal. Sled recovers a prefix of its log, so after a crash
//! either `J` is gone (its group was applied in full, or never written) or `J` survived with
//! some prefix of its writes and nothing later: [`replay`] then applies the record again, which
//! leaves the tree exactly as the group left it.
//!
//! Larger groups (a fan-out to many outboxes, large payloads) keep the sled batch: there, one
//! batch per group is cheap per write, and writing every byte twice is not. A 1→1 group at
//! saturation (a few hundred small messages: a chunk per 64 of them, a run or two of their
//! idempotency keys, a meta, a list) fits and is journaled; a 16 KiB limit, which sent those
//! groups to a batch instead, measured the same.

use sled::IVec;

use super::group::Writes;
use super::records::encode;
use super::StoreError;
use crate::codec::{self, JournalRecord};

/// The key of the one journal record; no other key in the outbox tree starts with its byte.
pub(super) const KEY: &[u8] = &[super::keys::JOURNAL];

/// The most writes a journaled group holds.
const MAX_WRITES: usize = 64;
/// The most key and value bytes a journaled group holds (the codec refuses records over 1 MiB).
const MAX_BYTES: usize = 256 << 10;

/// Whether `writes` is small enough to be journaled rather than written as a sled batch.
pub(super) fn fits(writes: &Writes) -> bool {
    if writes.len() > MAX_WRITES {
        return false;
    }
    let bytes: usize = writes
        .iter()
        .map(|(k, v)| k.len() + v.as_ref().map_or(0, |v| v.len()))
        .sum();
    bytes <= MAX_BYTES
}

/// Writes the group as the journal record: one insert. Not durable until the commit's sync.
pub(super) fn write(tree: &sled::Tree, writes: &Writes) -> Result<(), StoreError> {
    let record = JournalRecord {
        writes: writes
            .iter()
            .map(|(k, v)| (k.to_vec(), v.as_ref().map(|v| v.to_vec())))
            .collect(),
    };
    tree.insert(KEY, encode(&record)?)?;
    Ok(())
}

/// Applies a journaled group to the tree, once its record is durable, and removes the record.
pub(super) fn apply(tree: &sled::Tree, writes: Writes) -> Result<(), StoreError> {
    for (key, value) in writes {
        match value {
            Some(v) => tree.insert(key, v)?,
            None => tree.remove(key)?,
        };
    }
    tree.remove(KEY)?;
    Ok(())
}

/// Applies the journal record a crash left, if any, and removes it, in one sled batch. Returns
/// how many writes it applied (None when there was no record).
pub(super) fn replay(tree: &sled::Tree) -> Result<Option<usize>, StoreError> {
    let Some(bytes) = tree.get(KEY)? else {
        return Ok(None);
    };
    let record: JournalRecord = codec::decode(&bytes).map_err(|source| StoreError::Corrupt {
        key: "J (the journal of the last commit group)".into(),
        source,
    })?;
    let n = record.writes.len();
    let mut batch = to_batch(
        record
            .writes
            .into_iter()
            .map(|(k, v)| (IVec::from(k), v.map(IVec::from)))
            .collect(),
    );
    batch.remove(KEY);
    tree.apply_batch(batch)?;
    Ok(Some(n))
}

/// The writes as one sled batch (the path of groups too large to journal).
pub(super) fn to_batch(writes: Writes) -> sled::Batch {
    let mut batch = sled::Batch::default();
    for (key, value) in writes {
        match value {
            Some(v) => batch.insert(key, v),
            None => batch.remove(key),
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writes(pairs: &[(&str, Option<&str>)]) -> Writes {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    IVec::from(k.as_bytes()),
                    v.map(|v| IVec::from(v.as_bytes())),
                )
            })
            .collect()
    }

    fn contents(tree: &sled::Tree) -> Vec<(String, String)> {
        tree.iter()
            .map(|r| {
                let (k, v) = r.unwrap();
                (
                    String::from_utf8_lossy(&k).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                )
            })
            .collect()
    }

    fn tree() -> sled::Tree {
        let db = sled::Config::new().temporary(true).open().unwrap();
        db.open_tree("outbox").unwrap()
    }

    #[test]
    fn an_applied_group_leaves_its_writes_and_no_record() {
        let t = tree();
        t.insert("gone", "x").unwrap();
        let w = writes(&[("a", Some("1")), ("gone", None)]);
        write(&t, &w).unwrap();
        assert!(t.get(KEY).unwrap().is_some());
        apply(&t, w).unwrap();
        assert_eq!(contents(&t), [("a".to_string(), "1".to_string())]);
        assert_eq!(replay(&t).unwrap(), None, "nothing is left to replay");
    }

    #[test]
    fn replay_finishes_a_group_a_crash_cut_short() {
        let t = tree();
        t.insert("b", "old").unwrap();
        t.insert("gone", "x").unwrap();
        let w = writes(&[("a", Some("1")), ("b", Some("2")), ("gone", None)]);
        write(&t, &w).unwrap();
        // The crash came after the record and the first of its writes.
        t.insert("a", "1").unwrap();
        assert_eq!(replay(&t).unwrap(), Some(3));
        assert_eq!(
            contents(&t),
            [
                ("a".to_string(), "1".to_string()),
                ("b".to_string(), "2".to_string())
            ]
        );
    }

    #[test]
    fn a_damaged_record_is_reported_and_left_in_place() {
        let t = tree();
        t.insert(KEY, &b"\x02garbage"[..]).unwrap();
        assert!(matches!(replay(&t), Err(StoreError::Corrupt { .. })));
        assert!(t.get(KEY).unwrap().is_some());
    }

    #[test]
    fn only_small_groups_are_journaled() {
        assert!(fits(&writes(&[("a", Some("1"))])));
        let many: Writes = (0..=MAX_WRITES)
            .map(|i| (IVec::from(&(i as u64).to_be_bytes()[..]), None))
            .collect();
        assert!(!fits(&many));
        let big: Writes = [(
            IVec::from(&b"k"[..]),
            Some(IVec::from(vec![0u8; MAX_BYTES])),
        )]
        .into_iter()
        .collect();
        assert!(!fits(&big));
    }
}
