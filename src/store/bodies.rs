//! The body log: message bodies in append-only segment files of the store's own, beside sled,
//! so that sled holds only a short reference per message.
//!
//! sled writes a record many times over (its log, leaf rewrites every few updates, segment
//! cleaning, the journal), and a message body is most of what the store writes: a 256 B message
//! cost about 3.7 KB of disk writes when its body sat in the tree. Here a body is written once,
//! appended to `<data_dir>/bodies/<segment>.seg` as `[len u32 LE][crc32 u32 LE][body]`, and the
//! message chunk (see `chunks`) holds a [`BodyRef`] in its place. A segment starts with a mark
//! ([`SALTED`]) saying that its checksums cover its number before the body; every write ends
//! with a record of length zero ([`END`]), which the next write starts over. Segments from
//! before the mark have plain checksums and no end record, and read as they are. A publish to many subscribers
//! writes its body once; every outbox's chunk refers to the same place.
//!
//! Durability: the writer writes the bodies of a group and fdatasyncs them before any reference
//! to them reaches sled ([`BodyLog::sync`]), so a reference that sled recovers always has its
//! body on disk. The group's journal record (see `journal`) follows its bodies in the young
//! head and is synced with them; its length carries [`JOURNAL_FLAG`], so no reference names it
//! and [`scan_journal`] finds it. A crash may leave bodies no reference names (a group that was
//! never committed): they are garbage, never read.
//!
//! Space: the writer counts the references into each segment. A reference leaves with its
//! message (ack, purge, delete, expiry); the count drops only after that removal is durable in
//! sled ([`BodyLog::release`], applied at the next checkpoint by [`BodyLog::free`], when no
//! journal record before it is needed either), and a segment with no reference left, other than
//! the ones being appended to, is given up. Every open starts new heads and gives up the
//! segments nothing refers to. A full segment given up is kept as a spare to be written over by
//! a later young head (see [`spares`]); others are deleted. Writes go around the page cache
//! (see [`direct`]).
//!
//! A segment keeps its space while any of its messages is stored; the retention sweep moves the
//! bodies still stored out of old, mostly dead segments, and at once out of nearly dead ones
//! (idempotency key runs outlive the messages beside them; [`BodyLog::compaction`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::StoreError;
use crate::codec::CodecError;

mod direct;
mod refs;
mod spares;

pub(super) use refs::{decode_place, encode_place, is_ref, BodyRef, Facts};
use spares::{retire, reused_head, spare_name, spare_of, ZEROING};

/// The directory of the segments, inside the data dir.
pub(super) const DIR: &str = "bodies";
/// A new segment is started once the current one reaches this size (at a commit: one group's
/// bodies always go to one segment).
pub(super) const SEGMENT_BYTES: u64 = 32 << 20;
/// A record's length and checksum before its body.
const HEADER: usize = 8;
/// The first bytes of a segment whose checksums are salted with its number (every segment
/// written since; older ones start with their first record, whose length is never all ones).
pub(super) const SALTED: [u8; 8] = [0xFF, 0xFF, 0xFF, 0xFF, b'o', b'b', b'x', 2];
/// Where the first record of a salted segment starts.
const FIRST: u64 = SALTED.len() as u64;
/// Written after the last record of every write: a record header of zero length, which no
/// record has, so a scan stops there and never reads what the file held before (a recycled
/// segment) as records.
pub(super) const END: [u8; HEADER] = [0; HEADER];
/// Set in the length of a commit journal's record (see `journal`): a body's length never has it,
/// so a reference never names a journal record, and a scan tells the two apart.
pub(super) const JOURNAL_FLAG: u32 = 1 << 31;

/// Where the bodies of references come from: the writer's [`BodyLog`] (which also holds the
/// bodies of the group not yet written) or the [`Segments`] every reader shares.
pub(super) trait Bodies {
    /// The body `r` names; None when its segment was deleted since the reference was read
    /// (the message is no longer stored). A body that is missing or damaged otherwise is
    /// [`StoreError::Corrupt`].
    fn body(&self, r: BodyRef) -> Result<Option<Vec<u8>>, StoreError>;
}

/// No body log: every body is inline (tests, and chunks from before the body log).
#[cfg(test)]
pub(super) struct Inline;

#[cfg(test)]
impl Bodies for Inline {
    fn body(&self, r: BodyRef) -> Result<Option<Vec<u8>>, StoreError> {
        Err(damaged(r, "no body log here"))
    }
}

fn damaged(r: BodyRef, why: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        key: format!("body log segment {:016x} at {}", r.seg, r.off),
        source: CodecError::Body(why.into()),
    }
}

fn segment_name(seg: u64) -> String {
    format!("{seg:016x}.seg")
}

fn segment_of(name: &str) -> Option<u64> {
    number_of(name.strip_suffix(".seg")?)
}

fn number_of(hex: &str) -> Option<u64> {
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

/// A segment file open for reading.
struct Seg {
    file: File,
    /// Whether its checksums are salted with its number (it starts with [`SALTED`]).
    salted: bool,
}

impl Seg {
    /// The salt of the checksums in segment `seg`.
    fn salt(&self, seg: u64) -> Option<u64> {
        self.salted.then_some(seg)
    }
}

/// A record's checksum: the CRC-32 of its bytes, after the segment's number when `salt` is
/// given. The salt makes a record written into a segment file under an earlier number (a
/// recycled one) fail its check under the file's new number.
fn checksum(salt: Option<u64>, bytes: &[u8]) -> u32 {
    match salt {
        Some(seg) => {
            let mut h = crc32fast::Hasher::new();
            h.update(&seg.to_le_bytes());
            h.update(bytes);
            h.finalize()
        }
        None => crc32fast::hash(bytes),
    }
}

/// Whether a segment's first bytes say its checksums are salted. A file shorter than the mark
/// holds no record yet (the mark goes with the first write), so it is taken as salted.
fn is_salted(head: &[u8]) -> bool {
    head.len() < SALTED.len() || head.starts_with(&SALTED)
}

/// The segment files, open for reading: shared by the writer (which adds and removes them) and
/// every reader.
pub(super) struct Segments {
    dir: PathBuf,
    files: RwLock<HashMap<u64, Arc<Seg>>>,
    /// Whether a writer owns the directory: then a segment missing from `files` was deleted
    /// because nothing refers to it any longer. Without one (an offline view), a missing
    /// segment is damage.
    written: bool,
}

impl Segments {
    /// Opens every segment in `data_dir`'s body log for reading (none when it has no body log).
    pub(super) fn open(data_dir: &Path, written: bool) -> Result<Arc<Segments>, StoreError> {
        let dir = data_dir.join(DIR);
        let mut files = HashMap::new();
        match fs::read_dir(&dir) {
            Ok(entries) => {
                for e in entries {
                    let e = e?;
                    if let Some(seg) = e.file_name().to_str().and_then(segment_of) {
                        let file = File::open(e.path())?;
                        let mut head = [0u8; SALTED.len()];
                        let n = file.read_at(&mut head, 0)?;
                        let salted = is_salted(&head[..n]);
                        files.insert(seg, Arc::new(Seg { file, salted }));
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Arc::new(Segments {
            dir,
            files: RwLock::new(files),
            written,
        }))
    }

    fn file(&self, seg: u64) -> Option<Arc<Seg>> {
        self.files
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&seg)
            .cloned()
    }

    /// Reads every body `refs` names (with the outbox and seq each belongs to) and checks it:
    /// the open check. Each segment is read once, start to end. Err with the first reference
    /// whose body is missing or damaged, and what is wrong with it.
    pub(super) fn check(
        &self,
        mut refs: Vec<(BodyRef, u64, u64)>,
    ) -> Result<(), (u64, u64, String)> {
        refs.sort_unstable_by_key(|(r, _, _)| (r.seg, r.off));
        let mut stage = direct::Stage::default();
        let mut at = 0;
        while at < refs.len() {
            let seg = refs[at].0.seg;
            let end = refs[at..]
                .iter()
                .position(|(r, _, _)| r.seg != seg)
                .map_or(refs.len(), |n| at + n);
            let group = &refs[at..end];
            at = end;
            let (_, cid, seq) = group[0];
            let Some(file) = self.file(seg) else {
                return Err((
                    cid,
                    seq,
                    format!("is in body log segment {seg:016x}, which is missing"),
                ));
            };
            let salt = file.salt(seg);
            let bytes = file
                .file
                .metadata()
                .and_then(|m| {
                    let read = direct::read_whole(&self.path(seg), m.len(), &mut stage);
                    if let Some(read) = read {
                        return read.map(std::borrow::Cow::Borrowed);
                    }
                    let mut bytes = vec![0u8; usize::try_from(m.len()).unwrap_or(usize::MAX)];
                    file.file
                        .read_exact_at(&mut bytes, 0)
                        .map(|()| std::borrow::Cow::Owned(bytes))
                })
                .map_err(|e| {
                    (
                        cid,
                        seq,
                        format!("cannot be read from segment {seg:016x}: {e}"),
                    )
                })?;
            for (r, cid, seq) in group {
                let record = usize::try_from(r.off)
                    .ok()
                    .and_then(|off| bytes.get(off..off + HEADER + r.len as usize))
                    .ok_or_else(|| {
                        (
                            *cid,
                            *seq,
                            format!(
                                "is past the end of body log segment {seg:016x} ({} bytes)",
                                bytes.len()
                            ),
                        )
                    })?;
                check_record(*r, record, salt).map_err(|e| (*cid, *seq, e.to_string()))?;
            }
        }
        Ok(())
    }

    fn path(&self, seg: u64) -> PathBuf {
        self.dir.join(segment_name(seg))
    }

    fn spare_path(&self, seg: u64) -> PathBuf {
        self.dir.join(spare_name(seg))
    }

    /// Whether `f` is still the file of segment `seg` (a spare reused under a new number since a
    /// reader took it no longer is).
    fn holds(&self, seg: u64, f: &Arc<Seg>) -> bool {
        self.file(seg).is_some_and(|now| Arc::ptr_eq(&now, f))
    }

    /// Stops reading segment `seg`.
    fn forget(&self, seg: u64) {
        self.files
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&seg);
    }

    /// Reads `r` from `f`, the file segment `r.seg` had when the reader looked it up.
    fn read_from(&self, f: &Arc<Seg>, r: BodyRef) -> Result<Option<Vec<u8>>, StoreError> {
        match read_record(f, r) {
            // The segment was emptied and its file reused while this was read: the body's
            // message is no longer stored.
            Err(StoreError::Corrupt { .. }) if self.written && !self.holds(r.seg, f) => Ok(None),
            read => read.map(Some),
        }
    }
}

impl Bodies for Segments {
    fn body(&self, r: BodyRef) -> Result<Option<Vec<u8>>, StoreError> {
        match self.file(r.seg) {
            Some(f) => self.read_from(&f, r),
            None if self.written => Ok(None),
            None => Err(damaged(r, "its segment file is missing")),
        }
    }
}

/// Reads and checks the record `r` names.
fn read_record(f: &Seg, r: BodyRef) -> Result<Vec<u8>, StoreError> {
    let mut buf = vec![0u8; HEADER + r.len as usize];
    f.file.read_exact_at(&mut buf, r.off).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            damaged(r, "the segment file ends before the body")
        } else {
            StoreError::Io(e)
        }
    })?;
    check_record(r, &buf, f.salt(r.seg))?;
    buf.drain(..HEADER);
    Ok(buf)
}

fn check_record(r: BodyRef, record: &[u8], salt: Option<u64>) -> Result<(), StoreError> {
    let len = u32::from_le_bytes([record[0], record[1], record[2], record[3]]);
    let crc = u32::from_le_bytes([record[4], record[5], record[6], record[7]]);
    if len != r.len {
        return Err(damaged(r, "the record's length is not the reference's"));
    }
    if checksum(salt, &record[HEADER..]) != crc {
        return Err(damaged(
            r,
            "checksum mismatch: the stored bytes are damaged",
        ));
    }
    Ok(())
}

/// Where an append goes. The young head takes what is written now; the cold head takes what a
/// compaction moves (message bodies and key runs that outlived their segment), so the young
/// head's segments tend to die whole and what is long-lived is moved about once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lane {
    Young = 0,
    Cold = 1,
}

/// A segment being appended to.
struct Head {
    seg: u64,
    file: File,
    /// Its length on disk (written, maybe not yet synced).
    len: u64,
    /// Records appended since the last write, to go at `len`.
    pending: Vec<u8>,
    /// Whether `file` has writes not yet fdatasynced.
    unsynced: bool,
    /// Whether it is a new file, which every write makes longer (not a spare written over).
    grows: bool,
    /// When it became the head.
    since: Instant,
    /// The file opened for direct writes, which every write takes (see [`direct`]); None where
    /// the filesystem has none.
    direct: Option<Arc<File>>,
    /// The bytes of the file's last, part-written page, while `direct` is open.
    tail: direct::Tail,
    /// Where the chunks of the records not yet written that went to the flusher end, if any did.
    sent_to: Option<u64>,
}

impl Head {
    /// Where the next direct write starts: after the chunks the flusher has, or else at the
    /// page boundary before the file's end (the tail's page).
    fn unsent(&self) -> u64 {
        self.sent_to.unwrap_or(self.len - self.tail.len())
    }
}

/// The writer's side of the body log: appends, syncs, counts references, deletes segments.
pub(super) struct BodyLog {
    segs: Arc<Segments>,
    heads: [Head; 2],
    /// The number the next new segment gets.
    next_seg: u64,
    /// References into each segment, as the tree holds them (counted up as a group is taken,
    /// down only once a removal is durable).
    refs: HashMap<u64, u64>,
    /// References removed from the tree, not yet durably.
    released: Vec<u64>,
    /// Segments left behind by a roll, deleted at the next [`BodyLog::free`] if nothing refers
    /// to them then.
    rolled: Vec<u64>,
    /// The records (keys: message chunks, key runs) that refer to each segment now, with how
    /// many references each: what [`BodyLog::compaction`] moves.
    holders: HashMap<u64, HashMap<Vec<u8>, u32>>,
    /// Bytes of the records the tree refers to in each segment (a body shared by several
    /// chunks counts once per chunk).
    live: HashMap<u64, u64>,
    /// Sizes of the segments no longer appended to, and since when they are full.
    sizes: HashMap<u64, (u64, Instant)>,
    /// A full segment is compacted no sooner than this after it filled: a subscriber that is
    /// draining it acks its messages first, and nothing is copied for nothing.
    compact_after: Duration,
    /// A segment is full at this size ([`SEGMENT_BYTES`] unless a test sets another).
    segment_bytes: u64,
    /// fdatasync the segments (false with `durability = "relaxed"`).
    fsync: bool,
    /// Spares on disk, by the number each last had: what a new young head writes over.
    spares: Vec<u64>,
    /// How many spares are kept (`storage.spare_segments`).
    max_spares: usize,
    /// The spare being zero-filled off the writer's thread, if any: its number once done.
    preparing: Option<std::thread::JoinHandle<io::Result<u64>>>,
    /// No spare is prepared before this (after one failed).
    prepare_after: Option<Instant>,
    /// The memory the writer's own direct writes are made from.
    stage: direct::Stage,
    /// The thread that writes chunks of a large group while it is gathered.
    flusher: Option<direct::Flusher>,
}

/// How the writer's body log is run.
pub(super) struct Settings {
    /// fdatasync the segments (false with `durability = "relaxed"`).
    pub fsync: bool,
    /// A segment is full at this size ([`SEGMENT_BYTES`] unless a test sets another).
    pub segment_bytes: Option<u64>,
    /// How long a full segment waits before a compaction ([`COMPACT_AFTER`] unless a test sets
    /// another).
    pub compact_after: Option<Duration>,
    /// How many emptied segments are kept to be written over (`storage.spare_segments`).
    pub spares: usize,
}

/// The references the tree holds: each record's key and its references.
pub(super) type Stored = Vec<(Vec<u8>, Vec<BodyRef>)>;

/// How many of the body log's removals and full segments a checkpoint covers
/// ([`BodyLog::mark`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct FreeMark {
    rolled: usize,
    released: usize,
}

/// A message chunk's key (`O cid seq`).
pub(super) type ChunkKey = [u8; 17];

/// The most body bytes one compaction step moves (the rest moves at the next sweep).
const COMPACT_BYTES: u64 = 4 << 20;
/// How long after it filled a segment may be compacted (unless a test sets another).
const COMPACT_AFTER: Duration = Duration::from_secs(60);
/// A full segment the tree refers to at most one part in this many of is compacted with no
/// wait. What keeps such a segment is mostly idempotency key runs, which live for the dedup
/// window while the messages beside them are acked in moments: moving them costs at most a
/// 32nd of what the segment cost to write, and frees it to be written over (or its memory to
/// be used again) at once. Without it, a broker writing large messages kept the whole stream
/// on disk for the first minute.
const NEARLY_DEAD: u64 = 32;

/// The page size: a direct write starts and ends at its boundaries (see [`direct`]); a write
/// through the page cache ends its pieces at them ([`write_in_pages`]), and one to a spare is
/// padded to one.
const PAGE: u64 = 4096;

/// Writes `bytes` at `at` through the page cache (where the filesystem has no direct writes, and
/// for spares being zero-filled), in pieces that each end at a page boundary. The kernel holds a
/// file's pages in folios as large as the write that made them, and a commit of a few hundred
/// bytes into a folio of a megabyte makes its fdatasync write the whole megabyte: pages made
/// one at a time keep every later commit's write to the pages it touched.
fn write_in_pages(file: &File, bytes: &[u8], at: u64) -> io::Result<()> {
    let mut done = 0;
    while done < bytes.len() {
        let pos = at + done as u64;
        let to_page_end = usize::try_from(PAGE - pos % PAGE).unwrap_or(usize::MAX);
        let n = to_page_end.min(bytes.len() - done);
        file.write_all_at(&bytes[done..done + n], pos)?;
        done += n;
    }
    Ok(())
}

/// A new head for segment `seg`: a new file.
fn head(segs: &Segments, seg: u64) -> io::Result<Head> {
    let file = create_segment(segs, seg)?;
    Ok(Head {
        seg,
        file,
        direct: direct::open(&segs.path(seg)),
        tail: direct::Tail::default(),
        sent_to: None,
        len: 0,
        // The mark goes to disk with the first records.
        pending: SALTED.to_vec(),
        unsynced: false,
        grows: true,
        since: Instant::now(),
    })
}

/// Appends a record of `bytes` to `pending`, its length `len` (with [`JOURNAL_FLAG`] for a
/// journal record), its checksum salted with the segment `seg`.
pub(super) fn put_record(pending: &mut Vec<u8>, seg: u64, len: u32, bytes: &[u8]) {
    pending.extend_from_slice(&len.to_le_bytes());
    pending.extend_from_slice(&checksum(Some(seg), bytes).to_le_bytes());
    pending.extend_from_slice(bytes);
}

impl BodyLog {
    /// Opens the body log for the writer: counts the references the tree holds (`stored`: each
    /// record's key and references, see `chunks::stored_refs`), deletes the segments none
    /// refers to and starts new heads. The open check has made sure every reference points into
    /// a segment that holds it.
    pub(super) fn open(
        segs: Arc<Segments>,
        stored: Stored,
        settings: Settings,
    ) -> Result<BodyLog, StoreError> {
        let existing: Vec<u64> = segs
            .files
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        fs::create_dir_all(&segs.dir)?;
        let mut spares = Vec::new();
        for e in fs::read_dir(&segs.dir)? {
            let e = e?;
            let name = e.file_name();
            let name = name.to_str().unwrap_or_default();
            if let Some(spare) = spare_of(name) {
                spares.push(spare);
            } else if name.ends_with(ZEROING) {
                // A spare a crash stopped in the middle of its zero-filling.
                fs::remove_file(e.path())?;
            }
        }
        spares.sort_unstable();
        while spares.len() > settings.spares {
            if let Some(spare) = spares.pop() {
                fs::remove_file(segs.spare_path(spare))?;
            }
        }
        // A new segment's number is above every number a file here ever had, so no record a
        // reused file holds from before passes its checksum.
        let next = existing.iter().chain(&spares).max().map_or(1, |m| m + 1);
        let segment_bytes = settings.segment_bytes.unwrap_or(SEGMENT_BYTES);
        let referred: std::collections::HashSet<u64> = stored
            .iter()
            .flat_map(|(_, refs)| refs.iter().map(|r| r.seg))
            .collect();
        let mut sizes = HashMap::new();
        let mut removed = 0;
        for seg in existing {
            if referred.contains(&seg) {
                if let Some(f) = segs.file(seg) {
                    sizes.insert(seg, (f.file.metadata()?.len(), Instant::now()));
                }
            } else {
                retire(&segs, seg, &mut spares, settings.spares, segment_bytes)?;
                removed += 1;
            }
        }
        let mut log = BodyLog {
            heads: [
                reused_head(&segs, next, &mut spares, settings.fsync)?,
                head(&segs, next + 1)?,
            ],
            next_seg: next + 2,
            segs: Arc::clone(&segs),
            refs: HashMap::new(),
            released: Vec::new(),
            rolled: Vec::new(),
            holders: HashMap::new(),
            live: HashMap::new(),
            sizes,
            compact_after: settings.compact_after.unwrap_or(COMPACT_AFTER),
            segment_bytes,
            fsync: settings.fsync,
            spares,
            max_spares: settings.spares,
            preparing: None,
            prepare_after: None,
            stage: direct::Stage::default(),
            flusher: direct::Flusher::start(),
        };
        for (key, refs) in stored {
            for r in refs {
                log.add(&key, r);
            }
        }
        if removed > 0 || !log.refs.is_empty() {
            info!(
                segments = log.refs.len(),
                references = log.refs.values().sum::<u64>(),
                removed,
                spares = log.spares.len(),
                "body log opened"
            );
        }
        if log.heads.iter().any(|h| h.direct.is_none()) {
            warn!(
                dir = %log.segs.dir.display(),
                "body log: this file system takes no direct writes; segments are written through the page cache, which costs more CPU and memory with large messages"
            );
        }
        Ok(log)
    }

    /// Whether `seg` is being appended to.
    fn is_head(&self, seg: u64) -> bool {
        self.heads.iter().any(|h| h.seg == seg)
    }

    /// The segments, for readers.
    pub(super) fn segments(&self) -> Arc<Segments> {
        Arc::clone(&self.segs)
    }

    /// Appends `body` at the head of `lane`; the reference is good once [`BodyLog::sync`] has
    /// returned.
    pub(super) fn append(&mut self, lane: Lane, body: &[u8]) -> BodyRef {
        let copied = self.append_with(lane, |buf| {
            buf.extend_from_slice(body);
            Ok::<(), Infallible>(())
        });
        match copied {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }

    /// Appends at the head of `lane` the body `encode` writes into the head's buffer: a record
    /// built in place, without a copy. An error leaves the buffer as it was.
    pub(super) fn append_with<E>(
        &mut self,
        lane: Lane,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<BodyRef, E> {
        let h = &mut self.heads[lane as usize];
        let start = h.pending.len();
        h.pending.extend_from_slice(&[0; HEADER]);
        if let Err(e) = encode(&mut h.pending) {
            h.pending.truncate(start);
            return Err(e);
        }
        let body = &h.pending[start + HEADER..];
        // Bodies are far below 4 GiB (payloads are capped at 64 KiB, key runs at 48 KiB).
        let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
        let crc = checksum(Some(h.seg), body);
        h.pending[start..start + 4].copy_from_slice(&len.to_le_bytes());
        h.pending[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
        let r = BodyRef {
            seg: h.seg,
            off: h.len + start as u64,
            len,
        };
        self.stream(lane);
        Ok(r)
    }

    /// Sends the whole chunks of `lane`'s records not yet written to the flusher (see `direct`).
    fn stream(&mut self, lane: Lane) {
        let h = &mut self.heads[lane as usize];
        let (Some(flusher), Some(file)) = (self.flusher.as_mut(), &h.direct) else {
            return;
        };
        let mut start = h.unsent();
        let end = h.len + h.pending.len() as u64;
        while end - start >= direct::CHUNK {
            let mut stage = flusher.stage();
            stage.fill(&h.tail, &h.pending, h.len, start, start + direct::CHUNK);
            flusher.send(file, stage, start);
            start += direct::CHUNK;
            h.sent_to = Some(start);
        }
    }

    /// Appends a commit group's journal record (see `journal`) at the young head, after the
    /// group's bodies: the next [`BodyLog::sync`] writes and syncs both at once.
    pub(super) fn append_journal(&mut self, record: &[u8]) {
        let h = &mut self.heads[Lane::Young as usize];
        // A record is far below 2 GiB (a group holds at most 50 000 writes of small values).
        let len = u32::try_from(record.len()).unwrap_or(u32::MAX) | JOURNAL_FLAG;
        put_record(&mut h.pending, h.seg, len, record);
    }

    /// Where the next journal record goes: the young head's segment and end.
    pub(super) fn journal_end(&self) -> (u64, u64) {
        let h = &self.heads[Lane::Young as usize];
        (h.seg, h.len + h.pending.len() as u64)
    }

    /// Writes the records appended so far and fdatasyncs them: called before any reference to
    /// them reaches sled, and before a journal record is taken as durable. The cold head goes
    /// first: a journal record in the young head may refer to bodies a compaction moved there.
    /// Then starts a new segment for a head that is full.
    pub(super) fn sync(&mut self) -> io::Result<()> {
        for h in self.heads.iter_mut().rev() {
            if !h.pending.is_empty() {
                let records = h.pending.len();
                // The end mark goes after the records; the next write starts over it. In a spare,
                // zeros fill the last page: a write through the page cache that covers a page
                // whole need not read it first should its page have left the cache. A new file
                // has nothing to read past its end, and the padding would only add to the pages
                // each sync writes.
                h.pending.extend_from_slice(&END);
                if !h.grows {
                    let end = h.len + h.pending.len() as u64;
                    let pad = end.next_multiple_of(PAGE) - end;
                    h.pending.resize(h.pending.len() + pad as usize, 0);
                }
                let start = h.unsent();
                h.sent_to = None;
                let written = h.direct.as_ref().map(|file| {
                    let end = h.len + h.pending.len() as u64;
                    self.stage.fill(&h.tail, &h.pending, h.len, start, end);
                    let mine = self.stage.write(file, start);
                    let theirs = self.flusher.as_mut().map_or(Ok(()), direct::Flusher::wait);
                    mine.and(theirs)
                });
                match written {
                    Some(Ok(())) => h.tail.advance(&h.pending, records, h.len + records as u64),
                    Some(Err(e)) if !direct::refused(&e) => return Err(e),
                    refused => {
                        if let Some(Err(e)) = refused {
                            warn!(segment = h.seg, error = %e, "body log: the disk refuses direct writes; this segment is written through the page cache");
                            h.direct = None;
                        }
                        write_in_pages(&h.file, &h.pending, h.len)?;
                    }
                }
                h.len += records as u64;
                h.pending.clear();
                h.unsynced = true;
            }
            if h.unsynced && self.fsync {
                h.file.sync_data()?;
            }
            h.unsynced = false;
        }
        self.take_prepared();
        for i in 0..self.heads.len() {
            if self.heads[i].len >= self.segment_bytes {
                self.roll(i)?;
            }
        }
        let young = Lane::Young as usize;
        if self.heads[young].grows && !self.spares.is_empty() {
            // A spare is ready: the next commits write over it rather than grow this file.
            self.roll(young)?;
        }
        self.prepare_spare();
        Ok(())
    }

    /// Starts a new segment for head `i`. The old one is never deleted here: the group just
    /// written may refer to it before its references are counted; [`BodyLog::free`] decides
    /// after the commit.
    fn roll(&mut self, i: usize) -> io::Result<()> {
        // Compactions write in steps of megabytes: the cold head does not need a spare.
        let new = if i == Lane::Young as usize {
            reused_head(&self.segs, self.next_seg, &mut self.spares, self.fsync)?
        } else {
            head(&self.segs, self.next_seg)?
        };
        self.next_seg += 1;
        let mut old = std::mem::replace(&mut self.heads[i], new);
        // The new head's records go into the old head's buffer (empty since the sync, its
        // memory kept): a new one grew from nothing at every segment, by copies into memory
        // the machine maps back, 3 % of the broker's time at 16 KiB saturation.
        let head = &mut self.heads[i];
        old.pending.clear();
        old.pending.extend_from_slice(&head.pending);
        std::mem::swap(&mut head.pending, &mut old.pending);
        self.sizes.insert(old.seg, (old.len, Instant::now()));
        self.rolled.push(old.seg);
        debug!(segment = self.heads[i].seg, "body log: new segment");
        Ok(())
    }

    /// Counts a reference the tree now holds in the record under `key`.
    pub(super) fn add(&mut self, key: &[u8], r: BodyRef) {
        *self.refs.entry(r.seg).or_default() += 1;
        *self
            .holders
            .entry(r.seg)
            .or_default()
            .entry(key.to_vec())
            .or_default() += 1;
        *self.live.entry(r.seg).or_default() += HEADER as u64 + u64::from(r.len);
    }

    /// Notes a reference the chunk under `key` no longer holds; its count drops at
    /// [`BodyLog::free`], once the removal is durable.
    pub(super) fn release(&mut self, key: &[u8], r: BodyRef) {
        self.released.push(r.seg);
        if let Some(h) = self.holders.get_mut(&r.seg) {
            if let Some(n) = h.get_mut(key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    h.remove(key);
                }
            }
            if h.is_empty() {
                self.holders.remove(&r.seg);
            }
        }
        if let Some(b) = self.live.get_mut(&r.seg) {
            *b = b.saturating_sub(HEADER as u64 + u64::from(r.len));
        }
    }

    /// The next compaction step, if one is due: the oldest segment, full for
    /// [`COMPACT_AFTER`] at least, less than half of whose bytes the tree still refers to, or
    /// at once when at most [`NEARLY_DEAD`] of them, and the chunks that refer to it, up to about
    /// [`COMPACT_BYTES`] of bodies. The writer rewrites those chunks with their bodies appended
    /// again ([`BodyLog::append`]); once that is durable the segment goes.
    pub(super) fn compaction(&self) -> Option<(u64, Vec<Vec<u8>>)> {
        let seg = self
            .holders
            .keys()
            .copied()
            .filter(|seg| !self.is_head(*seg))
            .filter(|seg| {
                let Some((size, full_since)) = self.sizes.get(seg) else {
                    return false;
                };
                let live = self.live.get(seg).copied().unwrap_or(0);
                let due = full_since.elapsed() >= self.compact_after
                    || live.saturating_mul(NEARLY_DEAD) <= *size;
                live.saturating_mul(2) < *size && due
            })
            .min()?;
        let holders = self.holders.get(&seg)?;
        // Chunks hold at most 64 references; a step takes enough chunks for its budget.
        let per_chunk =
            (self.live.get(&seg).copied().unwrap_or(0) / holders.len().max(1) as u64).max(1);
        let take = usize::try_from(COMPACT_BYTES / per_chunk)
            .unwrap_or(usize::MAX)
            .max(1);
        let mut keys: Vec<Vec<u8>> = holders.keys().cloned().collect();
        keys.sort_unstable();
        keys.truncate(take);
        Some((seg, keys))
    }

    /// Whether removals wait for a durable commit.
    pub(super) fn has_released(&self) -> bool {
        !self.released.is_empty()
    }

    /// How far the removals and the full segments go now: a checkpoint started now makes
    /// those durable, and [`BodyLog::free_to`] acts on no later ones.
    pub(super) fn mark(&self) -> FreeMark {
        FreeMark {
            rolled: self.rolled.len(),
            released: self.released.len(),
        }
    }

    /// [`BodyLog::free_to`] everything so far (a checkpoint made on the caller's thread).
    #[cfg(test)]
    pub(super) fn free(&mut self) {
        self.free_to(self.mark());
    }

    /// After a checkpoint made every removal up to `mark` durable in sled (and no journal record
    /// in a segment full before it is needed any more): drops their counts and deletes the
    /// segments no reference is left in (never a head). Removals after the mark wait for the
    /// next checkpoint: sled may not have them yet, and a segment deleted under a reference a
    /// crash brings back would be a lost body.
    pub(super) fn free_to(&mut self, mark: FreeMark) {
        let rolled: Vec<u64> = self
            .rolled
            .drain(..mark.rolled.min(self.rolled.len()))
            .collect();
        for seg in rolled {
            if !self.refs.contains_key(&seg) && !self.is_head(seg) {
                self.delete(seg);
            }
        }
        let released: Vec<u64> = self
            .released
            .drain(..mark.released.min(self.released.len()))
            .collect();
        for seg in released {
            let Some(n) = self.refs.get_mut(&seg) else {
                warn!(segment = seg, "body log: a reference was released twice");
                continue;
            };
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.refs.remove(&seg);
                if !self.is_head(seg) {
                    self.delete(seg);
                }
            }
        }
    }

    fn delete(&mut self, seg: u64) {
        self.sizes.remove(&seg);
        self.live.remove(&seg);
        self.holders.remove(&seg);
        if let Err(e) = retire(
            &self.segs,
            seg,
            &mut self.spares,
            self.max_spares,
            self.segment_bytes,
        ) {
            warn!(segment = seg, error = %e, "body log: removing a segment failed; it is removed at the next start");
        }
    }

    /// Segments on disk and references counted (for tests and metrics).
    #[cfg(test)]
    pub(super) fn counts(&self) -> (usize, u64) {
        (
            self.segs
                .files
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .len(),
            self.refs.values().sum(),
        )
    }
}

impl Bodies for BodyLog {
    fn body(&self, r: BodyRef) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(h) = self.heads.iter().find(|h| h.seg == r.seg && r.off >= h.len) {
            let at = usize::try_from(r.off - h.len).unwrap_or(usize::MAX);
            let record = at
                .checked_add(HEADER + r.len as usize)
                .and_then(|end| h.pending.get(at..end))
                .ok_or_else(|| damaged(r, "past the end of the group's bodies"))?;
            check_record(r, record, Some(h.seg))?;
            return Ok(Some(record[HEADER..].to_vec()));
        }
        match self.segs.file(r.seg) {
            Some(f) => read_record(&f, r).map(Some),
            None => Err(damaged(r, "its segment file is missing")),
        }
    }
}

/// Calls `f` with the place and body of every commit journal record in `data_dir`'s body log
/// from segment `seg`, offset `off` on, in the order they were written (segments in number
/// order; records of other kinds are stepped over). A record that fails its checksum is stepped
/// over too (its length still says where the next one starts: a damaged body nothing needs must
/// not hide the journal records after it; a journal record it was shows as a gap in the commit
/// numbers); a segment is read up to its end mark (a record of length zero), or up to a record
/// cut short by its end. The first place that failed after the last record that read is
/// returned for the caller to judge: at the log's end it is a write a crash cut short.
pub(super) fn scan_journal(
    data_dir: &Path,
    seg: u64,
    off: u64,
    mut f: impl FnMut(&str, &[u8]) -> Result<(), StoreError>,
) -> Result<Option<String>, StoreError> {
    let dir = data_dir.join(DIR);
    let mut segs: Vec<u64> = match fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(segment_of))
            .filter(|s| *s >= seg)
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    segs.sort_unstable();
    let mut cut = None;
    for s in segs {
        let bytes = fs::read(dir.join(segment_name(s)))?;
        let salt = is_salted(bytes.get(..SALTED.len()).unwrap_or(&bytes)).then_some(s);
        let first = if salt.is_some() { FIRST } else { 0 };
        let mut at =
            usize::try_from(if s == seg { off.max(first) } else { first }).unwrap_or(usize::MAX);
        while at < bytes.len() {
            let place = format!("segment {s:016x} offset {at}");
            let Some(header) = bytes.get(at..at + HEADER) else {
                cut = cut.or(Some(place));
                break;
            };
            let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
            if len == 0 {
                break;
            }
            let body_len = (len & !JOURNAL_FLAG) as usize;
            let Some(body) = bytes.get(at + HEADER..at + HEADER + body_len) else {
                cut = cut.or(Some(place));
                break;
            };
            if checksum(salt, body) != crc {
                cut = cut.or(Some(place));
            } else {
                cut = None;
                if len & JOURNAL_FLAG != 0 {
                    f(&place, body)?;
                }
            }
            at += HEADER + body_len;
        }
    }
    Ok(cut)
}

fn create_segment(segs: &Segments, seg: u64) -> io::Result<File> {
    let path = segs.path(seg);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    register(segs, seg, &file)?;
    Ok(file)
}

/// Makes segment `seg`'s name durable (before any reference to it is) and opens it to readers.
fn register(segs: &Segments, seg: u64, file: &File) -> io::Result<()> {
    File::open(&segs.dir)?.sync_all()?;
    segs.files
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            seg,
            Arc::new(Seg {
                file: file.try_clone()?,
                salted: true,
            }),
        );
    Ok(())
}

fn remove_segment(segs: &Segments, seg: u64) -> io::Result<()> {
    segs.files
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&seg);
    match fs::remove_file(segs.path(seg)) {
        Ok(()) => {
            debug!(
                segment = seg,
                "body log: segment removed, nothing refers to it"
            );
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests;
