//! Direct writes: every commit goes from the writer's memory to the disk (`O_DIRECT`), not
//! through the page cache, and a large one's first megabytes go while the writer is still
//! gathering it.
//!
//! A commit of megabytes written through the page cache cost the writer a copy into pages the
//! kernel had to find and map for it, the filesystem's bookkeeping of each page, and a wait in
//! the fdatasync for their writeback. A direct write skips the cache; the disk reads the bytes
//! from memory the writer keeps ([`Stage`]). The wait for the disk stays, so it is spent while
//! the writer works: once a head's new records fill a chunk ([`CHUNK`]), the chunk goes to the
//! flusher thread ([`Flusher`]), which writes it as the group goes on; the commit writes the
//! rest, waits for the flusher, and fdatasyncs. Nothing is committed earlier: a crash leaves
//! bodies no reference names, which is allowed (see `bodies`).
//!
//! Alignment: a direct write starts and ends on a page boundary, from page-aligned memory. The
//! writer keeps the bytes of the file's last, part-written page ([`Tail`]) and writes that page
//! again with the next commit; the commit's last write is padded with zeros after its end
//! record. The fdatasync stays: it makes the file's new length durable and flushes the disk's
//! cache. A filesystem without direct writes (tmpfs before Linux 6.6) fails the open, and a
//! device whose blocks are larger than a page fails the write with `EINVAL`: that head then
//! writes through the page cache, the commit's whole records again. The open check reads the
//! segments the same way ([`read_whole`]), since nothing it reads is in the cache any more.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use super::PAGE;

/// A head's new records go to the flusher a chunk of this many bytes at a time (256 KiB
/// measured slower at 16 KiB messages, 2 MiB no faster).
pub(super) const CHUNK: u64 = 1 << 20;

/// Stages kept for the next chunks once written; a larger group's others are freed. Groups of
/// 16 KiB messages at full speed average 3.6 MiB (41k messages a second, 191 syncs): with four
/// kept, the larger groups allocated (and zeroed) their other stages anew, measurably.
const KEPT: usize = 8;

/// Opens `path` a second time, for direct writes; None where the filesystem has none.
pub(super) fn open(path: &Path) -> Option<Arc<File>> {
    open_with(OpenOptions::new().write(true), path).map(Arc::new)
}

/// Opens `path` with `options` and `O_DIRECT`; None where the filesystem has none.
fn open_with(options: &mut OpenOptions, path: &Path) -> Option<File> {
    let direct = rustix::fs::OFlags::DIRECT.bits();
    options
        .custom_flags(i32::try_from(direct).ok()?)
        .open(path)
        .ok()
}

/// Reads all of the file at `path` (`len` bytes) into `stage` around the page cache, for the
/// open check, which reads every segment a reference points into once: through the page cache
/// that filled it with the whole body log (on the machines measured, 1M stored 256 B messages
/// were ready 0.73–0.87 s after a SIGKILL this way, 0.48–0.53 s with direct reads). None where the filesystem has no direct reads, or
/// the file turned out shorter than `len`.
pub(super) fn read_whole<'a>(
    path: &Path,
    len: u64,
    stage: &'a mut Stage,
) -> Option<io::Result<&'a [u8]>> {
    let file = open_with(OpenOptions::new().read(true), path)?;
    let len = usize::try_from(len).ok()?;
    let window = stage.window(len.next_multiple_of(PAGE as usize));
    let mut done = 0;
    while done < len {
        // Each read starts at a page boundary; the last one asks for whole pages past the end.
        let want = (window.len() - done).min(READ_PIECE);
        match file.read_at(&mut window[done..done + want], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if refused(&e) => return None,
            Err(e) => return Some(Err(e)),
        }
        if done % PAGE as usize != 0 {
            break;
        }
    }
    // Short of what the file's length says: the reads through the page cache tell why.
    (done >= len).then(|| Ok(&window[..len]))
}

/// The most bytes one direct read of [`read_whole`] asks for.
const READ_PIECE: usize = 4 << 20;

/// Whether `e` is a refusal of a direct write as such (alignment, or no direct writes here).
pub(super) fn refused(e: &io::Error) -> bool {
    rustix::io::Errno::from_io_error(e) == Some(rustix::io::Errno::INVAL)
}

/// The bytes of a file's last, part-written page: what the next direct write starts with.
/// Empty when the file ends on a page boundary.
#[derive(Debug, Default)]
pub(super) struct Tail(Vec<u8>);

impl Tail {
    /// The tail of a file whose last page holds `bytes` so far.
    pub(super) fn with(bytes: &[u8]) -> Tail {
        Tail(bytes.to_vec())
    }

    pub(super) fn len(&self) -> u64 {
        self.0.len() as u64
    }

    /// The tail once the first `written` bytes of `bytes` went to the file after it, which
    /// then ends at `end`.
    pub(super) fn advance(&mut self, bytes: &[u8], written: usize, end: u64) {
        let keep = usize::try_from(end % PAGE).unwrap_or(0);
        if keep <= written {
            self.0.clear();
            self.0.extend_from_slice(&bytes[written - keep..written]);
        } else {
            // The commit ended in the page it started in.
            self.0.extend_from_slice(&bytes[..written]);
            let drop = self.0.len().saturating_sub(keep);
            self.0.drain(..drop);
        }
    }
}

/// Page-aligned memory for direct writes, kept from one commit to the next (memory the machine
/// has to map back costs more than the copy into it).
#[derive(Debug, Default)]
pub(super) struct Stage {
    buf: Vec<u8>,
    len: usize,
}

impl Stage {
    /// Fills the stage with the file's bytes from the page boundary `start` on, up to `end`
    /// (not included), then zeros to a page: those before `at` from `tail`, the rest from
    /// `bytes`, which go to the file at `at`.
    /// A page-aligned window of `len` bytes (a multiple of the page), what the next write
    /// takes.
    fn window(&mut self, len: usize) -> &mut [u8] {
        let page = PAGE as usize;
        if self.buf.len() < len + page {
            // A page more than the window, for the alignment.
            self.buf = vec![0u8; len.next_multiple_of(CHUNK as usize) + page];
        }
        let skew = self.buf.as_ptr().align_offset(page);
        self.len = len;
        &mut self.buf[skew..skew + len]
    }

    pub(super) fn fill(&mut self, tail: &Tail, bytes: &[u8], at: u64, start: u64, end: u64) {
        let data = usize::try_from(end - start).unwrap_or(usize::MAX);
        let w = self.window(data.next_multiple_of(PAGE as usize));
        let mut filled = 0;
        if start < at {
            // The tail is the file's bytes from `at - tail.len()` to `at`.
            let from = usize::try_from(start - (at - tail.len())).unwrap_or(0);
            let t = &tail.0[from..];
            w[..t.len()].copy_from_slice(t);
            filled = t.len();
        }
        let from = usize::try_from(start.max(at) - at).unwrap_or(0);
        let rest = data - filled;
        w[filled..data].copy_from_slice(&bytes[from..from + rest]);
        w[data..].fill(0);
    }

    fn bytes(&self) -> &[u8] {
        let skew = self.buf.as_ptr().align_offset(PAGE as usize);
        &self.buf[skew..skew + self.len]
    }

    /// Writes what [`Stage::fill`] put here at `start`.
    pub(super) fn write(&self, file: &File, start: u64) -> io::Result<()> {
        file.write_all_at(self.bytes(), start)
    }
}

struct Job {
    file: Arc<File>,
    stage: Stage,
    start: u64,
}

/// The thread that writes chunks while the writer gathers the rest of the group.
pub(super) struct Flusher {
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<(Stage, io::Result<()>)>,
    thread: Option<JoinHandle<()>>,
    /// Stages free to be filled.
    free: Vec<Stage>,
    /// Chunks sent and not yet waited for.
    outstanding: usize,
    /// Whether a chunk could not be sent (the thread is gone).
    lost: bool,
}

impl Flusher {
    /// Starts the thread; None when it cannot be started (then every write is the writer's).
    pub(super) fn start() -> Option<Flusher> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("outboxd-flusher".into())
            .spawn(move || {
                for job in rx {
                    let written = job.stage.write(&job.file, job.start);
                    if tx.send((job.stage, written)).is_err() {
                        break;
                    }
                }
            })
            .ok()?;
        Some(Flusher {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            free: Vec::new(),
            outstanding: 0,
            lost: false,
        })
    }

    /// A stage to fill for [`Flusher::send`].
    pub(super) fn stage(&mut self) -> Stage {
        self.free.pop().unwrap_or_default()
    }

    /// Has `stage` written to `file` at `start` off the caller's thread; an error shows at the
    /// next [`Flusher::wait`].
    pub(super) fn send(&mut self, file: &Arc<File>, stage: Stage, start: u64) {
        let job = Job {
            file: Arc::clone(file),
            stage,
            start,
        };
        match &self.jobs {
            Some(jobs) if jobs.send(job).is_ok() => self.outstanding += 1,
            _ => self.lost = true,
        }
    }

    /// Waits for every chunk sent so far; the first error of any.
    pub(super) fn wait(&mut self) -> io::Result<()> {
        let mut result = if std::mem::take(&mut self.lost) {
            Err(io::Error::other("the body log's flusher thread is gone"))
        } else {
            Ok(())
        };
        while self.outstanding > 0 {
            let Ok((stage, written)) = self.done.recv() else {
                self.outstanding = 0;
                return Err(io::Error::other("the body log's flusher thread is gone"));
            };
            self.outstanding -= 1;
            if self.free.len() < KEPT {
                self.free.push(stage);
            }
            if result.is_ok() {
                result = written;
            }
        }
        result
    }
}

impl Drop for Flusher {
    /// Ends the thread once it has written what it was given, so none outlives the store.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_is_what_the_last_page_holds_after_each_write() {
        let mut tail = Tail::default();
        let page = PAGE as usize;
        // 100 bytes into an empty file: all of them.
        let a = vec![1u8; 100];
        tail.advance(&a, 100, 100);
        assert_eq!(tail.0, a);
        // 50 more, still in the first page: the two together.
        tail.advance(&[2u8; 60], 50, 150);
        assert_eq!(tail.0.len(), 150);
        assert_eq!(&tail.0[100..], &[2u8; 50]);
        // Past the page's end: only what reaches into the next page.
        let b: Vec<u8> = (0..page as u32 + 10).map(|i| i as u8).collect();
        tail.advance(&b, b.len(), 150 + b.len() as u64);
        let end = 150 + b.len();
        assert_eq!(tail.len(), (end % page) as u64);
        assert_eq!(tail.0, b[b.len() - end % page..]);
        // Ending on a page boundary: nothing.
        let c = vec![3u8; page - end % page];
        tail.advance(&c, c.len(), end.next_multiple_of(page) as u64);
        assert!(tail.0.is_empty());
    }

    #[test]
    fn a_whole_file_reads_back_around_the_page_cache_and_a_short_one_is_left_to_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..(READ_PIECE + 3 * PAGE as usize + 100))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &bytes).unwrap();
        let mut stage = Stage::default();
        let Some(read) = read_whole(&path, bytes.len() as u64, &mut stage) else {
            assert!(
                super::super::tests::on_tmpfs(dir.path()),
                "no direct reads on a disk file system"
            );
            eprintln!("skipped: the temp dir's file system has no direct reads");
            return;
        };
        assert!(read.unwrap() == &bytes[..]);
        // A file shorter than its length said: the caller reads it through the cache, which
        // says what is wrong.
        assert!(read_whole(&path, bytes.len() as u64 + 1, &mut stage).is_none());
    }

    #[test]
    fn a_stage_holds_the_tail_then_the_bytes_then_zeros_from_page_aligned_memory() {
        let page = PAGE as usize;
        let tail = Tail::with(&[5u8; 10]);
        let bytes: Vec<u8> = (0..3 * page as u32).map(|i| (i % 7) as u8).collect();
        let at = 2 * PAGE + 10;
        let mut stage = Stage::default();
        // From the tail's page to past the bytes' end.
        stage.fill(&tail, &bytes, at, 2 * PAGE, at + 1000);
        let w = stage.bytes();
        assert_eq!(w.as_ptr() as usize % page, 0);
        assert_eq!(w.len(), page);
        assert_eq!(&w[..10], &[5u8; 10]);
        assert_eq!(&w[10..1010], &bytes[..1000]);
        assert!(w[1010..].iter().all(|&b| b == 0));
        // A chunk that starts within the bytes.
        stage.fill(&tail, &bytes, at, 3 * PAGE, 4 * PAGE);
        let w = stage.bytes();
        assert_eq!(w.len(), page);
        assert_eq!(w, &bytes[page - 10..2 * page - 10]);
    }
}
