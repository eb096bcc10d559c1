//! The checkpoint's wait on the disk (sled's flush, then the fdatasync of its log and blob
//! files), on a thread of its own so that commits go on meanwhile.
//!
//! A checkpoint took from under a millisecond to over 50 ms on the machines measured. Made on
//! the writer's thread, it held every publish that arrived meanwhile, which was much of the
//! latency's upper percentiles at a few thousand messages a second. What a checkpoint makes
//! durable is fixed when it starts: the position `P` the writer inserted and every write applied
//! to the trees before it (sled's flush covers all of those, whatever comes after). The writer
//! goes on applying and committing; once the checkpoint has finished it forgets the carried
//! writes and deletes the segments of before the start only ([`Mark`]). A checkpoint that fails
//! latches the store, as it did on the writer's thread.

use std::fs::File;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use tracing::warn;

use super::blobs::BlobSync;
use super::bodies::FreeMark;
use crate::metrics::Metrics;

/// What a checkpoint syncs: sled's db, its log file and its blob files.
pub(super) struct Flusher {
    pub db: sled::Db,
    /// sled's log file, opened read-only: sled's flush issues `sync_file_range`, which is not a
    /// durability barrier, so the checkpoint calls `fdatasync` on it itself.
    pub log: File,
    pub blobs: BlobSync,
    /// `durability = "fsync"`: without it a checkpoint only flushes.
    pub fsync: bool,
    pub metrics: Arc<Metrics>,
}

impl Flusher {
    /// sled's flush, then (with fsync) the fdatasync of its blob files and its log; its time
    /// goes to the metrics.
    fn flush(&mut self) -> Result<(), String> {
        let started = Instant::now();
        self.flush_and_sync()?;
        self.metrics
            .checkpoint_seconds
            .observe_duration(started.elapsed());
        Ok(())
    }

    fn flush_and_sync(&mut self) -> Result<(), String> {
        self.db.flush().map_err(|e| format!("flush failed: {e}"))?;
        if !self.fsync {
            return Ok(());
        }
        self.blobs
            .sync_new()
            .map_err(|e| format!("fsync of the store's blob files failed: {e}"))?;
        self.log
            .sync_data()
            .map_err(|e| format!("fsync of the store log failed: {e}"))?;
        // Blobs another thread wrote while the log was syncing (see store::blobs).
        self.blobs
            .sync_new()
            .map_err(|e| format!("fsync of the store's blob files failed: {e}"))?;
        Ok(())
    }
}

/// What the writer had when a checkpoint started: it acts on no more than this once the
/// checkpoint has finished.
pub(super) struct Mark {
    /// Writes carried (applied outside a commit) before the start, and how many times a commit
    /// had emptied the carried list then: if one has since, they are in a journal record already.
    pub carried: usize,
    pub carried_clears: u64,
    /// Journal bytes written before the start.
    pub journaled: u64,
    /// Removals and full segments before the start.
    pub bodies: FreeMark,
    pub started: Instant,
}

/// A finished checkpoint: its mark and its outcome.
pub(super) type Finished = (Mark, Result<(), String>);

/// The checkpoint thread, at most one at a time. Owned by [`super::commit::Disk`].
pub(super) struct Checkpoints {
    /// Locked by the checkpoint thread while it runs, by the writer's only when none does.
    flusher: Arc<Mutex<Flusher>>,
    running: Option<(JoinHandle<Result<(), String>>, Mark)>,
}

impl Checkpoints {
    pub(super) fn new(flusher: Flusher) -> Self {
        Checkpoints {
            flusher: Arc::new(Mutex::new(flusher)),
            running: None,
        }
    }

    pub(super) fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Starts a checkpoint on a thread of its own (none may be running). When no thread can
    /// be started it runs here, and its outcome is returned at once.
    pub(super) fn start(&mut self, mark: Mark) -> Option<Finished> {
        let flusher = Arc::clone(&self.flusher);
        let spawned = std::thread::Builder::new()
            .name("outboxd-checkpoint".into())
            .spawn(move || lock(&flusher).flush());
        match spawned {
            Ok(thread) => {
                self.running = Some((thread, mark));
                None
            }
            Err(e) => {
                warn!(error = %e, "cannot start a checkpoint thread; checkpointing on the writer's");
                Some((mark, self.run_here()))
            }
        }
    }

    /// The running checkpoint, once it has finished; never waits.
    pub(super) fn finished(&mut self) -> Option<Finished> {
        if self.running.as_ref()?.0.is_finished() {
            self.wait()
        } else {
            None
        }
    }

    /// Waits for the running checkpoint, if any, to finish.
    pub(super) fn wait(&mut self) -> Option<Finished> {
        let (thread, mark) = self.running.take()?;
        let r = thread.join().unwrap_or_else(|_| {
            Err("the checkpoint thread panicked: nothing after the last checkpoint is known durable in sled".into())
        });
        Some((mark, r))
    }

    /// Runs a checkpoint on the caller's thread (none may be running).
    pub(super) fn run_here(&mut self) -> Result<(), String> {
        lock(&self.flusher).flush()
    }
}

fn lock(flusher: &Mutex<Flusher>) -> MutexGuard<'_, Flusher> {
    // A panic in a flush is answered by a latch (`wait`); the files are still the files.
    flusher.lock().unwrap_or_else(|e| e.into_inner())
}
