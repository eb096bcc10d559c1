//! Spares: body log segment files kept to be written over, so that a commit's fdatasync never
//! waits for the file to grow.
//!
//! On the disks measured, an fdatasync of a file that grew is one more request to the disk (the
//! inode, for the new size) than one of a file written over. So a full segment nothing refers
//! to any more is renamed `<number>.spare` ([`retire`]) instead of deleted, up to
//! `storage.spare_segments`, and a new young head is a spare renamed to its new number
//! ([`reused_head`]). What the file held before never reads as a record of the new segment:
//! the checksums are salted with the number, and a new number is above every number the file
//! had. When no spare is left and the young head is a new file that fills slowly, a thread
//! zero-fills one ([`BodyLog::prepare_spare`]).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::{
    head, number_of, register, remove_segment, write_in_pages, BodyLog, Head, Lane, Segments, END,
    FIRST, PAGE, SALTED,
};

/// A spare: a segment nothing refers to any more, kept under the number it last had, to be
/// written over as a new segment.
pub(super) fn spare_name(seg: u64) -> String {
    format!("{seg:016x}.spare")
}

pub(super) fn spare_of(name: &str) -> Option<u64> {
    number_of(name.strip_suffix(".spare")?)
}

/// A young head that would take this long or more to fill at the rate it is written gets a
/// zero-filled spare (see [`BodyLog::prepare_spare`]): 32 MiB in 4 s is 8 MiB/s.
const SLOW_FILL: Duration = Duration::from_secs(4);

/// The name ending of a spare being zero-filled.
pub(super) const ZEROING: &str = ".zeroing";

/// The first page of an empty segment: the mark, then the end record.
fn first_page() -> Vec<u8> {
    let mut page = SALTED.to_vec();
    page.extend_from_slice(&END);
    page.resize(PAGE as usize, 0);
    page
}

/// Writes spare `number` in `dir`: the mark, an end record, zeros up to `bytes`, all synced
/// (written blocks, not holes: writing over a hole or an unwritten extent changes the file's
/// block map, which is the second write a commit should not need), then renamed to its name.
fn zero_filled(dir: &Path, number: u64, bytes: u64) -> io::Result<u64> {
    let zeroing = dir.join(format!("{number:016x}{ZEROING}"));
    let result = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&zeroing)?;
        let start = first_page();
        write_in_pages(&file, &start, 0)?;
        let zeros = vec![0u8; 1 << 20];
        let mut at = start.len() as u64;
        while at < bytes {
            let n = usize::try_from(bytes - at).map_or(zeros.len(), |n| n.min(zeros.len()));
            write_in_pages(&file, &zeros[..n], at)?;
            // A megabyte at a time: the commits' fdatasyncs never queue behind 32 MiB of zeros.
            file.sync_data()?;
            at += n as u64;
        }
        file.sync_all()?;
        fs::rename(&zeroing, dir.join(spare_name(number)))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&zeroing);
    }
    result.map(|()| number)
}

/// A new head for segment `seg` that writes over a spare when there is one (a commit that does
/// not make its file longer costs one write to the disk less), else a new file.
pub(super) fn reused_head(
    segs: &Segments,
    seg: u64,
    spares: &mut Vec<u64>,
    fsync: bool,
) -> io::Result<Head> {
    while let Some(spare) = spares.pop() {
        match reuse(segs, spare, seg, fsync) {
            Ok(file) => {
                debug!(segment = seg, spare, "body log: a spare is the new segment");
                return Ok(Head {
                    seg,
                    file,
                    len: FIRST,
                    pending: Vec::new(),
                    unsynced: false,
                    grows: false,
                    since: Instant::now(),
                    direct: super::direct::open(&segs.path(seg)),
                    tail: super::direct::Tail::with(&SALTED),
                    sent_to: None,
                });
            }
            Err(e) => {
                warn!(spare, error = %e, "body log: a spare segment could not be reused; it is deleted");
                for path in [segs.spare_path(spare), segs.path(seg)] {
                    let _ = fs::remove_file(path);
                }
            }
        }
    }
    head(segs, seg)
}

/// Renames spare `spare` to segment `seg` and marks it empty: the end record at its start goes
/// to disk before anything refers to the segment, so what the file held before is never read.
fn reuse(segs: &Segments, spare: u64, seg: u64, fsync: bool) -> io::Result<File> {
    let path = segs.path(seg);
    fs::rename(segs.spare_path(spare), &path)?;
    let file = OpenOptions::new().read(true).write(true).open(&path)?;
    write_in_pages(&file, &first_page(), 0)?;
    if fsync {
        file.sync_data()?;
    }
    register(segs, seg, &file)?;
    Ok(file)
}

/// Gives up segment `seg`, which nothing refers to: kept as a spare while fewer than `max`
/// are kept and it is full size (`segment_bytes`, so a head that writes over it never makes it
/// longer), else deleted. Segments from before the salted checksums are always deleted: their
/// records would pass their checks under any number.
pub(super) fn retire(
    segs: &Segments,
    seg: u64,
    spares: &mut Vec<u64>,
    max: usize,
    segment_bytes: u64,
) -> io::Result<()> {
    let reusable = spares.len() < max
        && segs
            .file(seg)
            .is_some_and(|f| f.salted && f.file.metadata().is_ok_and(|m| m.len() >= segment_bytes));
    if !reusable {
        return remove_segment(segs, seg);
    }
    segs.forget(seg);
    fs::rename(segs.path(seg), segs.spare_path(seg))?;
    spares.push(seg);
    debug!(
        segment = seg,
        "body log: segment kept as a spare, nothing refers to it"
    );
    Ok(())
}

impl Drop for BodyLog {
    /// Waits for the spare being zero-filled, so no thread outlives the store.
    fn drop(&mut self) {
        if let Some(thread) = self.preparing.take() {
            let _ = thread.join();
        }
    }
}

impl BodyLog {
    /// Starts zero-filling a spare off the writer's thread when the young head is a new file,
    /// no spare is left, and the head fills slowly (in [`SLOW_FILL`] or more at the rate it
    /// has been written so far): then commits are small, and the second write to the disk that
    /// a longer file needs is a large part of each one's wait. A fast writer (its commits are
    /// large, and the segments it empties come back as spares soon) and a relaxed store (no
    /// fdatasync) do without, as the zeros would double the bytes written.
    pub(super) fn prepare_spare(&mut self) {
        let h = &self.heads[Lane::Young as usize];
        let filled = h.len.saturating_mul(SLOW_FILL.as_millis() as u64) / self.segment_bytes.max(1);
        let slow = h.since.elapsed().as_millis() as u64 >= filled;
        let worth_it = self.fsync
            && self.max_spares > 0
            && self.spares.is_empty()
            && self.preparing.is_none()
            && h.grows
            && h.len >= self.segment_bytes / 32
            && slow
            && self.prepare_after.is_none_or(|t| Instant::now() >= t);
        if !worth_it {
            return;
        }
        let number = self.next_seg;
        self.next_seg += 1;
        let dir = self.segs.dir.clone();
        let bytes = self.segment_bytes;
        match std::thread::Builder::new()
            .name("outboxd-spare".into())
            .spawn(move || zero_filled(&dir, number, bytes))
        {
            Ok(thread) => self.preparing = Some(thread),
            Err(e) => self.spare_failed(&e),
        }
    }

    /// Adds the spare zero-filled off the writer's thread, once it is done.
    pub(super) fn take_prepared(&mut self) {
        if !self.preparing.as_ref().is_some_and(|t| t.is_finished()) {
            return;
        }
        match self.preparing.take().map(|t| t.join()) {
            Some(Ok(Ok(number))) => {
                debug!(spare = number, "body log: a new spare is ready");
                self.spares.push(number);
            }
            Some(Ok(Err(e))) => self.spare_failed(&e),
            Some(Err(_)) => self.spare_failed(&"the thread panicked"),
            None => {}
        }
    }

    fn spare_failed(&mut self, e: &dyn std::fmt::Display) {
        warn!(error = %e, "body log: preparing a spare segment failed; commits go on making the segment longer, the next try is in a minute");
        self.prepare_after = Some(Instant::now() + Duration::from_secs(60));
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::tests::{open_with_spares, tree, KEY_A};
    use super::super::{segment_name, Bodies, BodyLog, BodyRef, Lane, Segments, DIR, FIRST};
    use super::*;

    /// The names of the files in `dir`'s body log, sorted.
    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.join(DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn inode(dir: &Path, name: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(dir.join(DIR).join(name)).unwrap().ino()
    }

    #[test]
    fn an_emptied_full_segment_is_written_over_as_a_later_young_head() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, t) = tree();
        let mut log = open_with_spares(dir.path(), &t, true, Some(4 << 10), None, 2);
        let a = log.append(Lane::Young, &[1u8; 5000]);
        log.sync().unwrap();
        log.add(&KEY_A, a);
        log.free();
        let ino = inode(dir.path(), &segment_name(a.seg));
        let reader = log.segments();
        let held = reader.file(a.seg).unwrap();
        log.release(&KEY_A, a);
        log.free();
        assert!(
            files_in(dir.path()).contains(&spare_name(a.seg)),
            "{:?}",
            files_in(dir.path())
        );
        assert!(reader.body(a).unwrap().is_none(), "its message is gone");
        // The young head fills and rolls over onto the spare.
        let b = log.append(Lane::Young, &[2u8; 5000]);
        log.sync().unwrap();
        let new = log.heads[Lane::Young as usize].seg;
        assert!(new > b.seg);
        assert_eq!(inode(dir.path(), &segment_name(new)), ino, "the same file");
        assert!(!files_in(dir.path()).contains(&spare_name(a.seg)));
        let c = log.append(Lane::Young, b"written over the old bytes");
        log.sync().unwrap();
        assert_eq!(c.off, FIRST);
        assert_eq!(
            reader.body(c).unwrap().unwrap(),
            b"written over the old bytes"
        );
        // A reader that took the file before it was reused reads nothing, not damage.
        assert!(reader.read_from(&held, a).unwrap().is_none());
        // Segments opened offline read the reused file under its new number only.
        let offline = Segments::open(dir.path(), false).unwrap();
        assert_eq!(
            offline.body(c).unwrap().unwrap(),
            b"written over the old bytes"
        );
    }

    /// Small commits to the young head until it writes over a spare; the references made.
    fn small_commits_until_a_spare_is_taken(log: &mut BodyLog) -> Vec<BodyRef> {
        let mut refs = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while log.heads[Lane::Young as usize].grows {
            assert!(Instant::now() < deadline, "no spare was prepared");
            refs.push(log.append(Lane::Young, &[refs.len() as u8; 100]));
            log.sync().unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        refs
    }

    #[test]
    fn small_commits_to_a_new_file_get_a_zero_filled_spare_to_write_over() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, t) = tree();
        let mut log = open_with_spares(dir.path(), &t, true, Some(1 << 20), None, 2);
        let before = small_commits_until_a_spare_is_taken(&mut log);
        let h = &log.heads[Lane::Young as usize];
        assert!(h.seg > before[0].seg);
        let size = h.file.metadata().unwrap().len();
        assert_eq!(size, 1 << 20, "zero-filled to the segment's size");
        let after: Vec<BodyRef> = (0..50u8)
            .map(|i| {
                let r = log.append(Lane::Young, &[i; 100]);
                log.sync().unwrap();
                r
            })
            .collect();
        let h = &log.heads[Lane::Young as usize];
        assert_eq!(
            h.file.metadata().unwrap().len(),
            size,
            "no write made it longer"
        );
        let readers = log.segments();
        for (i, r) in before.iter().enumerate() {
            assert_eq!(readers.body(*r).unwrap().unwrap(), vec![i as u8; 100]);
        }
        for (i, r) in after.iter().enumerate() {
            assert_eq!(readers.body(*r).unwrap().unwrap(), vec![i as u8; 100]);
        }
        assert!(!files_in(dir.path()).iter().any(|n| n.ends_with(ZEROING)));
    }

    #[test]
    fn a_segment_of_large_commits_is_kept_as_a_spare_and_written_over_directly() {
        // Catches a spare's direct writes misplaced (its tail starts after the mark, not at the
        // file's start) and a segment of large commits deleted rather than kept.
        let dir = tempfile::tempdir().unwrap();
        let (_db, t) = tree();
        let mut log = open_with_spares(dir.path(), &t, true, Some(1 << 20), None, 2);
        if !super::super::tests::has_direct_writes(dir.path(), &log) {
            return;
        }
        let big: Vec<BodyRef> = (0..17)
            .map(|i| log.append(Lane::Young, &[i; 64 << 10]))
            .collect();
        log.sync().unwrap();
        let seg = big[0].seg;
        assert_ne!(log.heads[Lane::Young as usize].seg, seg, "it is full");
        for r in &big {
            log.add(&KEY_A, *r);
        }
        log.free();
        for r in &big {
            log.release(&KEY_A, *r);
        }
        log.free();
        let files = files_in(dir.path());
        assert!(files.contains(&spare_name(seg)), "{files:?}");
        let mut after = Vec::new();
        for i in 0..12u8 {
            let body = vec![i; 30_000 + usize::from(i)];
            after.push((log.append(Lane::Young, &body), body));
            log.sync().unwrap();
        }
        let h = &log.heads[Lane::Young as usize];
        assert!(
            !h.grows && h.direct.is_some(),
            "the young head is the spare"
        );
        let readers = Segments::open(dir.path(), false).unwrap();
        for (r, body) in &after {
            assert_eq!(readers.body(*r).unwrap().unwrap(), *body, "{r:?}");
        }
    }

    #[test]
    fn no_spare_is_zero_filled_for_a_fast_writer_or_without_fdatasync() {
        for (fsync, body) in [(true, 80 << 10), (false, 100)] {
            let dir = tempfile::tempdir().unwrap();
            let (_db, t) = tree();
            let mut log = open_with_spares(dir.path(), &t, fsync, Some(1 << 20), None, 2);
            for _ in 0..30 {
                log.append(Lane::Young, &vec![1u8; body]);
                log.sync().unwrap();
                assert!(
                    log.preparing.is_none(),
                    "fsync {fsync}, {body} bytes a commit"
                );
            }
            assert!(log.spares.is_empty());
        }
    }

    #[test]
    fn spares_outlast_a_restart_up_to_their_number_and_new_numbers_pass_them() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, t) = tree();
        let mut log = open_with_spares(dir.path(), &t, true, Some(4 << 10), None, 3);
        let mut full = Vec::new();
        for i in 0..3u8 {
            full.push(log.append(Lane::Young, &[i; 5000]));
            log.sync().unwrap();
        }
        let last = log.heads[Lane::Young as usize].seg;
        drop(log);
        // Nothing refers to the three full segments: the next open keeps them as spares (a
        // short one, the heads', is deleted), and the young head writes over one of them.
        let log = open_with_spares(dir.path(), &t, true, Some(4 << 10), None, 3);
        let spares: Vec<String> = files_in(dir.path())
            .into_iter()
            .filter(|n| n.ends_with(".spare"))
            .collect();
        assert_eq!(spares.len(), 2, "{:?}", files_in(dir.path()));
        assert!(log.heads.iter().all(|h| h.seg > last));
        assert_eq!(log.heads[Lane::Young as usize].len, FIRST, "a spare");
        drop(log);
        // Fewer spares allowed: the rest are deleted.
        let log = open_with_spares(dir.path(), &t, true, Some(4 << 10), None, 1);
        let spares = files_in(dir.path())
            .iter()
            .filter(|n| n.ends_with(".spare"))
            .count();
        assert_eq!(spares, 0, "one kept, then taken by the young head");
        assert_eq!(log.heads[Lane::Young as usize].len, FIRST);
        assert!(full.iter().all(|r| log.segs.file(r.seg).is_none()));
    }
}
