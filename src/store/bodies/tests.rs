//! Unit tests of the body log: records, segments, references, compaction and the folios its
//! writes make.

use super::*;

const FACTS: Facts = Facts {
    ts: 1_796_000_000_000,
    expires_at: 0,
    size: 256,
};

#[test]
fn a_reference_round_trips_and_is_told_from_an_inline_body() {
    let r = BodyRef {
        seg: 7,
        off: 1 << 40,
        len: 300,
    };
    let facts = Facts {
        expires_at: u64::MAX,
        ..FACTS
    };
    assert_eq!(BodyRef::decode(&r.encode(facts)), Some((r, facts)));
    assert!(is_ref(&r.encode(facts)));
    let small = BodyRef {
        seg: 1,
        off: 70_000,
        len: 290,
    };
    assert!(small.encode(FACTS).len() <= 18, "{:?}", small.encode(FACTS));
    let mut long = small.encode(FACTS);
    long.push(0);
    assert_eq!(BodyRef::decode(&long), None, "trailing bytes");
    assert_eq!(BodyRef::decode(&long[..5]), None, "cut short");
    let inline = crate::codec::encode_body(&(u64::MAX, 1u8)).unwrap();
    assert!(!is_ref(&inline), "a varint's first byte is never the mark");
    assert_eq!(BodyRef::decode(&inline), None);
}

/// The references `t` holds, as the store's open reads them.
pub(super) fn stored(t: &sled::Tree) -> Stored {
    super::super::chunks::stored_refs(t).unwrap()
}

/// The writer's body log of `dir`, opened over what `t` refers to.
fn open_log(
    dir: &Path,
    t: &sled::Tree,
    fsync: bool,
    segment_bytes: Option<u64>,
    compact_after: Option<Duration>,
) -> BodyLog {
    open_with_spares(dir, t, fsync, segment_bytes, compact_after, 0)
}

pub(super) fn open_with_spares(
    dir: &Path,
    t: &sled::Tree,
    fsync: bool,
    segment_bytes: Option<u64>,
    compact_after: Option<Duration>,
    spares: usize,
) -> BodyLog {
    let segs = Segments::open(dir, true).unwrap();
    let settings = Settings {
        fsync,
        segment_bytes,
        compact_after,
        spares,
    };
    BodyLog::open(segs, stored(t), settings).unwrap()
}

pub(super) fn tree() -> (sled::Db, sled::Tree) {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let t = db.open_tree("o").unwrap();
    (db, t)
}

#[test]
fn bodies_read_back_before_and_after_they_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, t) = tree();
    let mut log = open_log(dir.path(), &t, true, None, None);
    let a = log.append(Lane::Young, b"first body");
    let b = log.append(Lane::Young, b"second");
    assert_eq!(log.body(a).unwrap().unwrap(), b"first body");
    log.sync().unwrap();
    let c = log.append(Lane::Young, b"third");
    assert_eq!(log.body(b).unwrap().unwrap(), b"second");
    assert_eq!(log.body(c).unwrap().unwrap(), b"third");
    let readers = log.segments();
    assert_eq!(readers.body(a).unwrap().unwrap(), b"first body");
}

#[test]
fn a_body_built_in_the_buffer_reads_back_and_a_failed_build_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, t) = tree();
    let mut log = open_log(dir.path(), &t, true, None, None);
    let a = log.append(Lane::Young, b"copied in");
    let failed: Result<BodyRef, &str> = log.append_with(Lane::Young, |buf| {
        buf.extend_from_slice(b"half a bo");
        Err("encoding failed")
    });
    assert_eq!(failed, Err("encoding failed"));
    let b = log
        .append_with(Lane::Young, |buf| {
            buf.extend_from_slice(b"built in place");
            Ok::<(), &str>(())
        })
        .unwrap();
    let c = log.append(Lane::Young, b"after it");
    assert_eq!(
        b.off,
        a.off + (HEADER + 9) as u64,
        "the failed body took no room"
    );
    assert_eq!(b.len, 14);
    log.sync().unwrap();
    let readers = log.segments();
    for (r, want) in [
        (a, &b"copied in"[..]),
        (b, b"built in place"),
        (c, b"after it"),
    ] {
        assert_eq!(readers.body(r).unwrap().unwrap(), want, "{r:?}");
    }
}

#[test]
fn a_damaged_body_is_corrupt_and_a_deleted_segment_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, t) = tree();
    let mut log = open_log(dir.path(), &t, true, None, None);
    let a = log.append(Lane::Young, b"a body of some length");
    log.sync().unwrap();
    let path = dir.path().join(DIR).join(segment_name(a.seg));
    let mut bytes = fs::read(&path).unwrap();
    bytes[a.off as usize + HEADER + 3] ^= 0x40;
    fs::write(&path, &bytes).unwrap();
    assert!(matches!(log.body(a), Err(StoreError::Corrupt { .. })));
    let short = BodyRef { len: 4000, ..a };
    assert!(matches!(log.body(short), Err(StoreError::Corrupt { .. })));
    // Offline, a missing segment is damage; with a writer, it was deleted.
    let offline = Segments::open(dir.path(), false).unwrap();
    let elsewhere = BodyRef { seg: 99, ..a };
    assert!(matches!(
        offline.body(elsewhere),
        Err(StoreError::Corrupt { .. })
    ));
    assert!(log.segments().body(elsewhere).unwrap().is_none());
}

/// A body of 600 KiB: two fill a segment of 1 MiB.
static BIG: [u8; 600 << 10] = [7u8; 600 << 10];

/// Two bodies that fill the young head (of a log with 1 MiB segments), written: the head rolls.
fn fill_a_segment(log: &mut BodyLog) -> (BodyRef, BodyRef) {
    let a = log.append(Lane::Young, &BIG);
    let b = log.append(Lane::Young, &BIG);
    log.sync().unwrap();
    (a, b)
}

#[test]
fn a_segment_is_deleted_once_its_last_reference_is_durably_released() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, t) = tree();
    let mut log = open_log(dir.path(), &t, false, Some(1 << 20), None);
    let (a, b) = fill_a_segment(&mut log);
    assert_ne!(log.heads[0].seg, a.seg, "a full segment rolls over");
    // The group's references are counted after its bodies are written (and the roll).
    log.add(&KEY_A, a);
    log.add(&KEY_B, b);
    log.free();
    assert_eq!(
        log.counts(),
        (3, 2),
        "a rolled segment that is referred to stays (beside the two heads)"
    );
    log.release(&KEY_A, a);
    assert_eq!(
        log.counts(),
        (3, 2),
        "nothing is freed before the removal is durable"
    );
    log.free();
    assert_eq!(log.counts(), (3, 1));
    log.release(&KEY_B, b);
    log.free();
    assert_eq!(log.counts(), (2, 0), "only the two heads are left");
    assert!(log.segments().body(a).unwrap().is_none());
}

#[test]
fn a_checkpoint_frees_only_what_was_released_before_it_started() {
    // Catches a checkpoint that ran while the writer went on deleting a segment emptied
    // after its flush started: sled may not have that removal, and after a crash the tree
    // would refer to a body in a segment that is gone.
    let dir = tempfile::tempdir().unwrap();
    let (_db, t) = tree();
    let mut log = open_log(dir.path(), &t, false, Some(1 << 20), None);
    let (a, b) = fill_a_segment(&mut log);
    let (c, d) = fill_a_segment(&mut log);
    for (key, r) in [(&KEY_A, a), (&KEY_B, b), (&KEY_C, c), (&KEY_D, d)] {
        log.add(key, r);
    }
    log.free();
    assert_eq!(
        log.counts(),
        (4, 4),
        "two full segments beside the two heads"
    );
    log.release(&KEY_A, a);
    log.release(&KEY_B, b);
    let started = log.mark();
    // Released while the checkpoint's flush runs.
    log.release(&KEY_C, c);
    log.release(&KEY_D, d);
    log.free_to(started);
    assert_eq!(
        log.counts(),
        (3, 2),
        "only the segment emptied before the start goes"
    );
    assert!(log.segments().body(a).unwrap().is_none());
    assert_eq!(log.body(c).unwrap().unwrap(), BIG);
    log.free_to(log.mark());
    assert_eq!(log.counts(), (2, 0), "the next checkpoint frees the other");
}

pub(super) const KEY_A: ChunkKey = [b'O', 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
const KEY_C: ChunkKey = [b'O', 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 1];
const KEY_D: ChunkKey = [b'O', 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 1];
const KEY_B: ChunkKey = [b'O', 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1];

#[test]
fn a_segment_that_fills_while_nothing_else_in_it_is_stored_keeps_the_group_just_written() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, t) = tree();
    let mut log = open_log(dir.path(), &t, true, Some(1 << 10), None);
    let a = log.append(Lane::Young, &[1u8; 2000]);
    log.sync().unwrap();
    assert_ne!(log.heads[0].seg, a.seg);
    log.add(&KEY_A, a);
    log.free();
    assert_eq!(log.body(a).unwrap().unwrap(), vec![1u8; 2000]);
}

#[test]
fn a_full_segment_the_tree_hardly_refers_to_is_compacted_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, t) = tree();
    let mut log = open_log(
        dir.path(),
        &t,
        true,
        Some(40_000),
        Some(Duration::from_secs(3600)),
    );
    let kept = log.append(Lane::Young, &[1u8; 1000]);
    let gone: Vec<BodyRef> = (0..39)
        .map(|_| log.append(Lane::Young, &[2u8; 1000]))
        .collect();
    log.sync().unwrap();
    assert_ne!(log.heads[0].seg, kept.seg, "the segment is full");
    log.add(&KEY_A, kept);
    for r in &gone {
        log.add(&KEY_B, *r);
    }
    assert_eq!(log.compaction(), None, "its bodies are all stored");
    for r in &gone[..20] {
        log.release(&KEY_B, *r);
    }
    assert_eq!(log.compaction(), None, "half of it is stored: it waits");
    for r in &gone[20..] {
        log.release(&KEY_B, *r);
    }
    assert_eq!(
        log.compaction(),
        Some((kept.seg, vec![KEY_A.to_vec()])),
        "a 40th of it is stored"
    );
}

#[test]
fn compaction_picks_the_oldest_mostly_dead_segment_once_it_has_waited() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, t) = tree();
    let mut log = open_log(dir.path(), &t, true, Some(10_000), Some(Duration::ZERO));
    let kept = log.append(Lane::Young, &[1u8; 1000]);
    let gone: Vec<BodyRef> = (0..9)
        .map(|_| log.append(Lane::Young, &[2u8; 1000]))
        .collect();
    log.sync().unwrap();
    log.add(&KEY_A, kept);
    for r in &gone {
        log.add(&KEY_B, *r);
    }
    assert_eq!(
        log.compaction(),
        None,
        "a segment whose bodies are all stored"
    );
    for r in &gone {
        log.release(&KEY_B, *r);
    }
    assert_eq!(log.compaction(), Some((kept.seg, vec![KEY_A.to_vec()])));
    log.compact_after = Duration::from_secs(3600);
    assert_eq!(
        log.compaction(),
        None,
        "a segment that filled a moment ago waits"
    );
}

#[test]
fn an_open_keeps_the_segments_the_tree_refers_to_and_starts_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, t) = tree();
    let mut log = open_log(dir.path(), &t, true, None, None);
    let kept = log.append(Lane::Young, b"kept");
    log.sync().unwrap();
    drop(log);
    let entry = kept.encode(FACTS);
    t.insert(
        super::super::keys::seq_key(super::super::keys::MSG, 1, 1),
        crate::codec::encode_chunk([(1u64, &entry[..])]),
    )
    .unwrap();
    // A second segment that nothing refers to (a group a crash cut short).
    let mut log = open_log(dir.path(), &t, true, None, None);
    let orphan = log.append(Lane::Young, b"orphan");
    log.sync().unwrap();
    drop(log);
    let log = open_log(dir.path(), &t, true, None, None);
    assert_eq!(log.body(kept).unwrap().unwrap(), b"kept");
    assert!(matches!(log.body(orphan), Err(StoreError::Corrupt { .. })));
    assert_eq!(
        log.counts(),
        (3, 1),
        "the kept segment and the two new heads"
    );
    assert!(log.heads[0].seg > orphan.seg);
}

/// Bytes this thread has caused to be written to storage (`write_bytes` of
/// `/proc/thread-self/io`): the kernel counts a folio's whole size when a write dirties it.
fn dirtied_by_this_thread() -> u64 {
    io_of_this_thread("write_bytes")
}

/// A count of `/proc/thread-self/io` (`read_bytes`: bytes read from storage, not the cache).
fn io_of_this_thread(field: &str) -> u64 {
    std::fs::read_to_string("/proc/thread-self/io")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(": "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A new, empty file in `dir`, read and written as the body log does.
fn new_file(dir: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join("seg"))
        .unwrap()
}

#[test]
fn a_few_bytes_written_over_a_large_write_dirty_one_page() {
    // Catches a segment written in one large write: its pages then sit in large folios, and
    // a later commit's few bytes among them make the fdatasync write the whole folio.
    let dir = tempfile::tempdir().unwrap();
    let file = new_file(dir.path());
    let start = dirtied_by_this_thread();
    write_in_pages(&file, &vec![7u8; 4 << 20], 0).unwrap();
    if dirtied_by_this_thread() == start {
        // A file system without writeback (tmpfs) counts nothing: nothing to tell apart.
        eprintln!("skipped: the temp dir's file system does not count dirtied bytes");
        return;
    }
    file.sync_data().unwrap();
    let before = dirtied_by_this_thread();
    file.write_all_at(&[1u8; 600], (2 << 20) + 100).unwrap();
    let dirtied = dirtied_by_this_thread() - before;
    assert_eq!(dirtied, PAGE, "600 bytes dirtied {dirtied} bytes");
    file.sync_data().unwrap();
    let mut back = vec![0u8; 4 << 20];
    file.read_exact_at(&mut back, 0).unwrap();
    assert!(back[..(2 << 20) + 100].iter().all(|&b| b == 7));
    assert!(back[(2 << 20) + 100..(2 << 20) + 700]
        .iter()
        .all(|&b| b == 1));
    assert!(back[(2 << 20) + 700..].iter().all(|&b| b == 7));
}

/// Whether `dir` is on tmpfs, the one file system here that may take no direct I/O.
pub(super) fn on_tmpfs(dir: &Path) -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    rustix::fs::statfs(dir).is_ok_and(|s| u64::try_from(s.f_type).is_ok_and(|t| t == TMPFS_MAGIC))
}

/// Whether `dir`'s file system takes direct writes, as every disk file system does; tmpfs
/// took none before Linux 6.6. Where it does, a head without them is a failure.
pub(super) fn has_direct_writes(dir: &Path, log: &BodyLog) -> bool {
    let direct = log.heads.iter().all(|h| h.direct.is_some());
    assert!(
        direct || on_tmpfs(dir),
        "no direct writes on a disk file system"
    );
    if !direct {
        eprintln!("skipped: the temp dir's file system has no direct writes");
    }
    direct
}

#[test]
fn a_commit_goes_to_the_disk_around_the_page_cache_and_the_next_reads_nothing_back() {
    // Catches a commit written through the page cache (the cache grows by the whole stream),
    // and a next commit that reads its first, part-written page back from the disk rather than
    // from the tail the log keeps.
    let dir = tempfile::tempdir().unwrap();
    let (_db, t) = tree();
    let mut log = open_log(dir.path(), &t, true, Some(64 << 20), None);
    if !has_direct_writes(dir.path(), &log) {
        return;
    }
    let big = log.append(Lane::Young, &vec![3u8; 2 << 20]);
    log.sync().unwrap();
    let before = io_of_this_thread("read_bytes");
    let small = log.append(Lane::Young, &[4u8; 600]);
    log.sync().unwrap();
    assert_eq!(
        io_of_this_thread("read_bytes"),
        before,
        "the next commit read its page from the disk"
    );
    let readers = log.segments();
    assert_eq!(readers.body(small).unwrap().unwrap(), vec![4u8; 600]);
    assert_eq!(readers.body(big).unwrap().unwrap(), vec![3u8; 2 << 20]);
    let read = io_of_this_thread("read_bytes") - before;
    assert!(
        read >= 2 << 20,
        "the large commit was read back from memory ({read} bytes from the disk)"
    );
}

#[test]
fn a_large_group_goes_to_the_disk_while_it_is_gathered_and_reads_back_whole() {
    // Catches chunks not sent before the commit, and chunks written at the wrong place or
    // with the wrong bytes (the tail page, the pages after it, the commit's last one).
    let dir = tempfile::tempdir().unwrap();
    let (_db, t) = tree();
    let mut log = open_log(dir.path(), &t, true, Some(64 << 20), None);
    if !has_direct_writes(dir.path(), &log) {
        return;
    }
    let mut written = Vec::new();
    let put = |log: &mut BodyLog, written: &mut Vec<(BodyRef, Vec<u8>)>, body: Vec<u8>| {
        written.push((log.append(Lane::Young, &body), body));
    };
    // A small commit first, so the large group starts in a part-written page.
    put(&mut log, &mut written, vec![9u8; 100]);
    log.sync().unwrap();
    for i in 0..200usize {
        put(
            &mut log,
            &mut written,
            vec![(i % 251) as u8; (16 << 10) + i],
        );
    }
    let sent = log.heads[Lane::Young as usize]
        .sent_to
        .expect("chunks went to the flusher before the commit");
    assert!(sent >= 2 << 20, "only {sent} bytes sent");
    log.flusher.as_mut().unwrap().wait().unwrap();
    let seg = written[0].0.seg;
    let path = dir.path().join(DIR).join(segment_name(seg));
    assert!(fs::metadata(&path).unwrap().len() >= sent);
    log.sync().unwrap();
    put(&mut log, &mut written, vec![7u8; 5000]);
    log.sync().unwrap();
    for i in 0..100usize {
        put(&mut log, &mut written, vec![(i % 13) as u8; 20_000 + i]);
    }
    log.sync().unwrap();
    // A reader that opens the files afresh, as after a restart.
    let readers = Segments::open(dir.path(), false).unwrap();
    for (r, body) in &written {
        assert_eq!(readers.body(*r).unwrap().unwrap(), *body, "{r:?}");
    }
}
