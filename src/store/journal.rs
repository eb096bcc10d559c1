//! The commit journal: each commit group's writes go to the body log as one record, in the same
//! write and under the same fdatasync as the group's bodies, so a commit costs one fdatasync;
//! the trees take the writes afterwards and reach the disk at the next checkpoint.
//!
//! Before, a commit flushed sled and fdatasynced its log after the body log's own fdatasync: two
//! waits on the disk per commit. Now the group's record (`[FORMAT][commit u64][n u32]`, then per
//! write `[tree u8][key len u32][key][value len u32, u32::MAX for a removal][value]`) is
//! appended to the body log's young head after the group's bodies, both are written and synced
//! at once, and only then are the writes applied to the trees, the commit number (`C`) last.
//! sled's own background flush is off; the writer makes a checkpoint every 50 ms while
//! anything was written (`Disk::checkpoint_if_due`): it records the body log position from
//! which nothing is yet known durable in sled (record `P`), flushes and fdatasyncs sled (on the
//! checkpoint's own thread, while commits go on after `P`), and only then may segments emptied
//! before `P` be deleted.
//!
//! Writes that reach the trees outside a commit (acks applied between commits, a purge, a new
//! client's name) are applied at once and also go into the next record, before the group's own
//! writes: the record holds everything applied since the last checkpoint that later writes may
//! depend on.
//!
//! Recovery ([`recover`]): sled recovers a prefix of its log, so its tree is as of some commit
//! `C` (every write of a group comes before its `C`) plus maybe part of the next one. The records
//! from `P` on with a number above `C` are applied again, in order; their writes are absolute
//! values, so applying a write twice leaves what once did. A record cut short at the log's end
//! is a commit that was never confirmed; a missing number between two records is damage.
//!
//! Data directories from before this journal may hold a record `J` in the tree (the writes of
//! one small group, kept in sled until they were applied): it is finished first.

use std::path::Path;

use sled::IVec;
use tracing::{info, warn};

use super::bodies;
use super::{keys, records, StoreError};
use crate::codec::{self, CodecError, JournalRecord};

/// The key of the journal record of data dirs from before the body log journal.
pub(super) const KEY: &[u8] = &[super::keys::JOURNAL];

/// The format of a journal record in the body log.
const FORMAT: u8 = 1;
/// A write's value length that marks a removal.
const REMOVAL: u32 = u32::MAX;

/// The tree a journaled write goes to.
pub(super) const OUTBOX: u8 = 0;
pub(super) const CLIENTS: u8 = 1;

/// One write: its tree, its key, its value (None: a removal).
pub(super) type Entry = (u8, IVec, Option<IVec>);

/// The journal record of commit `number`: `carried` (writes applied since the last checkpoint
/// outside a commit), then `group`, whose `C` goes last.
pub(super) fn encode(number: u64, carried: &[Entry], group: Option<&Writes>) -> Vec<u8> {
    let n = carried.len() + group.map_or(0, |g| g.len());
    let mut out = Vec::with_capacity(16 + n * 64);
    out.push(FORMAT);
    out.extend_from_slice(&number.to_le_bytes());
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
    let commit = keys::commit();
    let mut put = |tree: u8, k: &[u8], v: Option<&[u8]>| {
        out.push(tree);
        out.extend_from_slice(&u32::try_from(k.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(k);
        match v {
            Some(v) => {
                out.extend_from_slice(&u32::try_from(v.len()).unwrap_or(u32::MAX).to_le_bytes());
                out.extend_from_slice(v);
            }
            None => out.extend_from_slice(&REMOVAL.to_le_bytes()),
        }
    };
    for (tree, k, v) in carried {
        put(*tree, k, v.as_deref());
    }
    if let Some(g) = group {
        for (k, v) in g.iter().filter(|(k, _)| k.as_ref() != commit) {
            put(OUTBOX, k, v.as_deref());
        }
        if let Some((k, v)) = g.get_key_value(&commit[..]) {
            put(OUTBOX, k, v.as_deref());
        }
    }
    out
}

/// The number and the writes of a record written by [`encode`].
pub(super) fn decode(body: &[u8]) -> Result<(u64, Vec<Entry>), String> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if b.len() < n {
            return Err("the record ends in the middle of a write".into());
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    fn u32_of(b: &mut &[u8]) -> Result<u32, String> {
        let v = take(b, 4)?;
        Ok(u32::from_le_bytes([v[0], v[1], v[2], v[3]]))
    }
    let mut b = body;
    let format = take(&mut b, 1)?[0];
    if format != FORMAT {
        return Err(format!(
            "journal record format {format} is not one this build reads"
        ));
    }
    let number = take(&mut b, 8)?;
    let number = u64::from_le_bytes(number.try_into().map_err(|_| "short number")?);
    let n = u32_of(&mut b)?;
    let mut entries = Vec::with_capacity(usize::try_from(n).unwrap_or(0).min(1 << 16));
    for _ in 0..n {
        let tree = take(&mut b, 1)?[0];
        if tree != OUTBOX && tree != CLIENTS {
            return Err(format!(
                "a write to tree {tree}, which the store does not have"
            ));
        }
        let klen = u32_of(&mut b)? as usize;
        let key = IVec::from(take(&mut b, klen)?);
        let value = match u32_of(&mut b)? {
            REMOVAL => None,
            vlen => Some(IVec::from(take(&mut b, vlen as usize)?)),
        };
        entries.push((tree, key, value));
    }
    if !b.is_empty() {
        return Err(format!("{} bytes after the record's last write", b.len()));
    }
    Ok((number, entries))
}

/// Applies a group's writes to the tree once its record is durable, its `C` last: sled keeps the
/// order of one thread's writes, so a tree that recovered a group's `C` holds all of the group.
pub(super) fn apply(tree: &sled::Tree, writes: Writes) -> Result<(), StoreError> {
    let commit = keys::commit();
    let mut last = None;
    for (key, value) in writes {
        if key.as_ref() == commit {
            last = Some(value);
            continue;
        }
        match value {
            Some(v) => tree.insert(key, v)?,
            None => tree.remove(key)?,
        };
    }
    if let Some(Some(v)) = last {
        tree.insert(commit, v)?;
    }
    Ok(())
}

/// Where the records not yet known durable in sled start: `P` -> `[seg u64 LE][off u64 LE]`.
pub(super) fn encode_checkpoint(seg: u64, off: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&seg.to_le_bytes());
    v.extend_from_slice(&off.to_le_bytes());
    v
}

pub(super) fn decode_checkpoint(v: &[u8]) -> Option<(u64, u64)> {
    let seg = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let off = u64::from_le_bytes(v.get(8..16)?.try_into().ok()?);
    (v.len() == 16).then_some((seg, off))
}

/// What [`recover`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Recovered {
    /// Writes of a `J` record (data dirs from before) applied again.
    pub old_record: Option<usize>,
    /// Commit groups applied again from the body log.
    pub groups: u64,
    /// The last commit number the trees hold now.
    pub commit: u64,
}

/// Brings the trees of `db` (the store in `dir`, or a private copy of its sled files whose body
/// log is `dir`'s) up to the last commit group whose record is on disk, then flushes them.
///
/// Errors: [`StoreError::Corrupt`] when a record that must be applied does not read, or a
/// commit between two records is missing (damage: the caller refuses the store).
pub(super) fn recover(dir: &Path, db: &sled::Db) -> Result<Recovered, StoreError> {
    let outbox = db.open_tree("outbox")?;
    let clients = db.open_tree("clients")?;
    let mut done = Recovered {
        old_record: replay_old_record(&outbox)?,
        ..Recovered::default()
    };
    done.commit = match outbox.get(keys::commit())? {
        Some(v) => records::decode(&keys::commit(), &v)?,
        None => 0,
    };
    let Some(from) = outbox.get(keys::checkpoint())? else {
        return Ok(done);
    };
    let (seg, off) = decode_checkpoint(&from).ok_or_else(|| StoreError::Corrupt {
        key: "P (where the body log's journal starts)".into(),
        source: CodecError::Body("not a position".into()),
    })?;
    let damaged = |why: String| StoreError::Corrupt {
        key: "the body log's commit journal".into(),
        source: CodecError::Body(why),
    };
    let mut next = done.commit + 1;
    let cut = bodies::scan_journal(dir, seg, off, |at, body| {
        let (number, entries) =
            decode(body).map_err(|e| damaged(format!("the record at {at} does not read: {e}")))?;
        if number < next {
            return Ok(());
        }
        if number > next {
            return Err(damaged(format!(
                "commit {next} is missing: the records go on with commit {number} (at {at})"
            )));
        }
        for (tree, key, value) in entries {
            let tree = if tree == CLIENTS { &clients } else { &outbox };
            match value {
                Some(v) => tree.insert(key, v)?,
                None => tree.remove(key)?,
            };
        }
        next += 1;
        done.groups += 1;
        Ok(())
    })?;
    done.commit = next - 1;
    if let Some(at) = cut {
        warn!(at = %at, commit = done.commit, "the body log ends in a record cut short: a crash during its write, so the commit group in it was never confirmed");
    }
    if done.groups > 0 {
        db.flush()?;
        info!(
            groups = done.groups,
            commit = done.commit,
            "finished the commit groups a crash had kept from the trees"
        );
    }
    Ok(done)
}

/// Applies the `J` record a crash left in a data dir from before the body log journal, if any,
/// and removes it, in one sled batch. Returns how many writes it applied.
fn replay_old_record(tree: &sled::Tree) -> Result<Option<usize>, StoreError> {
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
            .map(|(k, v)| (IVec::from(k), v.map(IVec::from))),
    );
    batch.remove(KEY);
    tree.apply_batch(batch)?;
    Ok(Some(n))
}

/// The writes as one sled batch.
pub(super) fn to_batch(writes: impl IntoIterator<Item = (IVec, Option<IVec>)>) -> sled::Batch {
    let mut batch = sled::Batch::default();
    for (key, value) in writes {
        match value {
            Some(v) => batch.insert(key, v),
            None => batch.remove(key),
        }
    }
    batch
}

use super::group::Writes;

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

    fn db() -> sled::Db {
        sled::Config::new().temporary(true).open().unwrap()
    }

    /// A data dir for a body log, and trees whose journal starts at segment `seg`.
    fn store_from(seg: u64) -> (tempfile::TempDir, sled::Db, sled::Tree) {
        let db = db();
        let outbox = db.open_tree("outbox").unwrap();
        outbox
            .insert(keys::checkpoint(), encode_checkpoint(seg, 0))
            .unwrap();
        (tempfile::tempdir().unwrap(), db, outbox)
    }

    /// Writes one segment of a body log in `dir` as the writer lays it out: the mark of salted
    /// checksums, then each journal record after a body record, then the end mark.
    fn segment(dir: &Path, seg: u64, records: &[Vec<u8>]) {
        let mut bytes = bodies::SALTED.to_vec();
        bytes.extend(records_of(seg, records));
        bytes.extend_from_slice(&bodies::END);
        std::fs::create_dir_all(dir.join(bodies::DIR)).unwrap();
        std::fs::write(segment_path(dir, seg), bytes).unwrap();
    }

    /// Journal records, each after a body record, salted with segment `seg`.
    fn records_of(seg: u64, records: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            let body = b"a message body";
            bodies::put_record(&mut out, seg, body.len() as u32, body);
            bodies::put_record(&mut out, seg, r.len() as u32 | bodies::JOURNAL_FLAG, r);
        }
        out
    }

    /// A store whose journal starts in segment 1, which holds commit 1 (`a` = 1) and commit 2
    /// (`b` = 2), each after a body.
    fn two_commits_in_segment_1() -> (tempfile::TempDir, sled::Db, sled::Tree) {
        let (dir, db, outbox) = store_from(1);
        segment(
            dir.path(),
            1,
            &[
                commit(1, &[("a", Some("1"))]),
                commit(2, &[("b", Some("2"))]),
            ],
        );
        (dir, db, outbox)
    }

    fn segment_path(dir: &Path, seg: u64) -> std::path::PathBuf {
        dir.join(bodies::DIR).join(format!("{seg:016x}.seg"))
    }

    fn commit(n: u64, pairs: &[(&str, Option<&str>)]) -> Vec<u8> {
        let mut w = writes(pairs);
        w.insert(IVec::from(&keys::commit()[..]), Some(encode_u64(n)));
        encode(n, &[], Some(&w))
    }

    fn encode_u64(n: u64) -> IVec {
        IVec::from(crate::store::records::encode(&n).unwrap())
    }

    #[test]
    fn a_record_reads_back_with_carried_writes_first_and_the_commit_last() {
        let carried = vec![
            (
                CLIENTS,
                IVec::from(&b"bob"[..]),
                Some(IVec::from(&b"7"[..])),
            ),
            (OUTBOX, IVec::from(&b"gone"[..]), None),
        ];
        let mut w = writes(&[("a", Some("1")), ("z", None)]);
        w.insert(IVec::from(&keys::commit()[..]), Some(encode_u64(9)));
        let (n, entries) = decode(&encode(9, &carried, Some(&w))).unwrap();
        assert_eq!(n, 9);
        let keys: Vec<&[u8]> = entries.iter().map(|(_, k, _)| k.as_ref()).collect();
        assert_eq!(keys, [&b"bob"[..], b"gone", b"a", b"z", b"C"]);
        assert_eq!(entries[0].0, CLIENTS);
        assert!(decode(&encode(9, &carried, Some(&w))[..20]).is_err());
    }

    #[test]
    fn applying_a_group_writes_its_commit_number_last() {
        let t = db().open_tree("outbox").unwrap();
        t.insert("gone", "x").unwrap();
        let mut w = writes(&[("a", Some("1")), ("gone", None), ("Z", Some("z"))]);
        w.insert(IVec::from(&keys::commit()[..]), Some(encode_u64(1)));
        let mut events = t.watch_prefix(vec![]);
        apply(&t, w).unwrap();
        let mut order = Vec::new();
        while let Ok(e) = events.next_timeout(std::time::Duration::ZERO) {
            match e {
                sled::Event::Insert { key, .. } | sled::Event::Remove { key } => order.push(key),
            }
        }
        assert_eq!(order.last().map(|k| k.as_ref()), Some(&keys::commit()[..]));
        assert_eq!(order.len(), 4);
    }

    #[test]
    fn recovery_applies_the_records_after_the_trees_commit_in_order() {
        let (dir, db, outbox) = store_from(4);
        // The tree has commit 1 (and part of commit 2); the log holds 1, 2 and 3.
        outbox.insert(keys::commit(), encode_u64(1)).unwrap();
        outbox.insert("b", "stale").unwrap();
        segment(
            dir.path(),
            4,
            &[
                commit(1, &[("a", Some("old"))]),
                commit(2, &[("a", Some("1")), ("b", Some("2"))]),
            ],
        );
        segment(
            dir.path(),
            6,
            &[commit(3, &[("b", None), ("c", Some("3"))])],
        );
        let r = recover(dir.path(), &db).unwrap();
        assert_eq!((r.groups, r.commit), (2, 3));
        let mut got = contents(&outbox);
        got.retain(|(k, _)| k != "C" && k != "P");
        assert_eq!(
            got,
            [
                ("a".to_string(), "1".to_string()),
                ("c".to_string(), "3".to_string())
            ]
        );
        // Nothing is applied twice the next time.
        assert_eq!(recover(dir.path(), &db).unwrap().groups, 0);
    }

    #[test]
    fn a_record_cut_short_at_the_end_is_a_commit_never_confirmed() {
        let (dir, db, outbox) = two_commits_in_segment_1();
        let path = segment_path(dir.path(), 1);
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - bodies::END.len() as u64 - 3).unwrap();
        let r = recover(dir.path(), &db).unwrap();
        assert_eq!((r.groups, r.commit), (1, 1));
        assert!(outbox.get("b").unwrap().is_none());
    }

    #[test]
    fn a_damaged_body_between_two_records_does_not_hide_the_second() {
        let (dir, db, outbox) = two_commits_in_segment_1();
        // The second body (between the two records) loses a bit.
        let path = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        let second = bytes.len() - bodies::END.len() - commit(2, &[("b", Some("2"))]).len() - 8 - 4;
        bytes[second] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let r = recover(dir.path(), &db).unwrap();
        assert_eq!((r.groups, r.commit), (2, 2));
        assert_eq!(outbox.get("b").unwrap().as_deref(), Some(&b"2"[..]));
    }

    #[test]
    fn a_missing_commit_between_two_records_is_damage() {
        let (dir, db, _) = store_from(1);
        segment(dir.path(), 1, &[commit(1, &[("a", Some("1"))])]);
        segment(dir.path(), 2, &[commit(3, &[("c", Some("3"))])]);
        let e = recover(dir.path(), &db).unwrap_err();
        assert!(e.to_string().contains("commit 2 is missing"), "{e}");
    }

    #[test]
    fn a_recycled_segment_s_records_from_its_earlier_number_are_never_replayed() {
        // Segment 5 held commits 4, 5 and 6; recycled as segment 9, it was written over from
        // its start with a new commit 4 of the same length, and the crash took the end mark.
        let (dir, db, outbox) = store_from(9);
        outbox.insert(keys::commit(), encode_u64(3)).unwrap();
        segment(
            dir.path(),
            5,
            &[
                commit(4, &[("a", Some("old"))]),
                commit(5, &[("b", Some("5"))]),
                commit(6, &[("c", Some("6"))]),
            ],
        );
        std::fs::rename(segment_path(dir.path(), 5), segment_path(dir.path(), 9)).unwrap();
        let new = records_of(9, &[commit(4, &[("a", Some("new"))])]);
        let mut bytes = std::fs::read(segment_path(dir.path(), 9)).unwrap();
        let first = bodies::SALTED.len();
        bytes[first..first + new.len()].copy_from_slice(&new);
        std::fs::write(segment_path(dir.path(), 9), &bytes).unwrap();
        let r = recover(dir.path(), &db).unwrap();
        assert_eq!((r.groups, r.commit), (1, 4));
        assert_eq!(outbox.get("a").unwrap().as_deref(), Some(&b"new"[..]));
        assert!(
            outbox.get("b").unwrap().is_none(),
            "a stale record was replayed"
        );
        assert!(
            outbox.get("c").unwrap().is_none(),
            "a stale record was replayed"
        );
    }

    #[test]
    fn a_segment_from_before_salted_checksums_still_replays() {
        let (dir, db, outbox) = store_from(1);
        let mut bytes = Vec::new();
        for (n, k) in [(1, "a"), (2, "b")] {
            let r = commit(n, &[(k, Some("1"))]);
            bytes.extend_from_slice(&(r.len() as u32 | bodies::JOURNAL_FLAG).to_le_bytes());
            bytes.extend_from_slice(&crc32fast::hash(&r).to_le_bytes());
            bytes.extend_from_slice(&r);
        }
        std::fs::create_dir_all(dir.path().join(bodies::DIR)).unwrap();
        std::fs::write(segment_path(dir.path(), 1), bytes).unwrap();
        let r = recover(dir.path(), &db).unwrap();
        assert_eq!((r.groups, r.commit), (2, 2));
        assert_eq!(outbox.get("b").unwrap().as_deref(), Some(&b"1"[..]));
    }

    #[test]
    fn an_old_j_record_is_finished_and_removed() {
        let db = db();
        let t = db.open_tree("outbox").unwrap();
        t.insert("b", "old").unwrap();
        let record = JournalRecord {
            writes: vec![(b"a".to_vec(), Some(b"1".to_vec())), (b"b".to_vec(), None)],
        };
        t.insert(KEY, codec::encode(&record).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(recover(dir.path(), &db).unwrap().old_record, Some(2));
        assert_eq!(contents(&t), [("a".to_string(), "1".to_string())]);
        t.insert(KEY, &b"\x02garbage"[..]).unwrap();
        assert!(matches!(
            recover(dir.path(), &db),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
