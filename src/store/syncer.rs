//! The second half of a commit: making an applied group durable, then answering it.
//!
//! The writer applies a group's batch to the tree and hands it here. This thread runs sled's
//! flush and the fdatasync of the log (and of blob files, see [`super::blobs`]), then counts the
//! group in the metrics, advances the durable frontier of every outbox the group wrote to and
//! sends the replies. While it does, the writer gathers the next group in memory; it applies
//! that group only once this one is answered, so at most one group waits for an fsync and each
//! group is still one sled batch. Under load that overlaps the fsync with the writer's work on
//! the next group instead of leaving the writer idle for it.
//!
//! The frontiers a job advances are the outboxes' `next_seq` when the group was applied, not
//! when the fsync ends: the writer may have gathered more by then, which this fsync covers
//! only partly.
//!
//! A failed flush or fsync fails every reply of the job (nothing in it is confirmed), sets the
//! shared latch at once and tells the writer why, which then refuses every later write.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::{debug, error};

use super::blobs::BlobSync;
use super::{GroupTally, OutboxHandle, Pending};
use crate::config::Durability;
use crate::metrics::Metrics;

/// One applied group, waiting for its fsync.
pub(super) struct Job {
    pub pending: Vec<Pending>,
    /// Each outbox the group wrote to, with its `next_seq` as of the group's apply.
    pub frontiers: Vec<(Arc<OutboxHandle>, u64)>,
    pub tally: GroupTally,
}

/// What the sync thread owns: the files it syncs and the test hooks that make it fail.
pub(super) struct Syncer {
    pub db: sled::Db,
    pub log: File,
    pub blobs: BlobSync,
    pub durability: Durability,
    pub fail_flush_after: Option<u64>,
    pub fail_fsync_after: Option<u64>,
    pub metrics: Arc<Metrics>,
    pub latched: Arc<AtomicBool>,
    /// Successful fsync commits.
    pub commits: u64,
}

impl Syncer {
    /// Syncs and answers each job in arrival order, reporting each outcome to the writer
    /// (`Err` carries the latch reason). Ends when the writer drops its sender; returns itself
    /// so the writer can make the final flush.
    pub(super) fn run(
        mut self,
        jobs: std::sync::mpsc::Receiver<Job>,
        done: mpsc::UnboundedSender<Result<(), String>>,
    ) -> Self {
        while let Ok(job) = jobs.recv() {
            let outcome = if self.latched.load(Ordering::Acquire) {
                Err("the store is latched".to_string())
            } else {
                match self.durability {
                    Durability::Relaxed => Ok(()),
                    Durability::Fsync => self.sync(),
                }
            };
            match &outcome {
                Ok(()) => self.confirm(job),
                Err(reason) => {
                    self.metrics.store_errors.inc();
                    self.latched.store(true, Ordering::Release);
                    for p in job.pending {
                        p.fail(reason);
                    }
                }
            }
            // The writer may be gone already (shutdown): nothing left to tell it.
            let _ = done.send(outcome);
        }
        self
    }

    fn confirm(&self, job: Job) {
        // Counted before the replies go out, so a publisher that has its `ok` (or a scrape
        // after it) sees its publish in the metrics.
        let m = &self.metrics;
        m.commit_groups.inc();
        m.published.add(job.tally.published);
        m.stored.add(job.tally.stored);
        m.duplicates.add(job.tally.duplicates);
        if job.tally.published > 0 {
            m.commit_group_publishes.observe(job.tally.published as f64);
        }
        for (handle, next) in job.frontiers {
            handle.durable.send_modify(|d| *d = (*d).max(next));
        }
        for p in job.pending {
            p.send();
        }
    }

    /// sled's flush (which only issues `sync_file_range`), then the fdatasync that makes the
    /// log durable, with sled's blob files synced around it.
    pub(super) fn sync(&mut self) -> Result<(), String> {
        let started = Instant::now();
        if self.fail_flush_after.is_some_and(|n| self.commits >= n) {
            return Err("flush failed: injected fault (OUTBOXD_FAULT_FLUSH_FAIL_AFTER)".into());
        }
        self.db.flush().map_err(|e| format!("flush failed: {e}"))?;
        if self.fail_fsync_after.is_some_and(|n| self.commits >= n) {
            return Err("fsync failed: injected fault (OUTBOXD_FAULT_FSYNC_FAIL_AFTER)".into());
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
        self.commits += 1;
        let took = started.elapsed();
        self.metrics.commit_seconds.observe_duration(took);
        debug!(took_us = took.as_micros() as u64, "commit");
        Ok(())
    }

    /// The last flush at shutdown, after every job is answered.
    pub(super) fn final_flush(&mut self) {
        if let Err(e) = self.db.flush() {
            error!(error = %e, "final flush failed");
        } else if let Err(e) = self.blobs.sync_new().and_then(|_| self.log.sync_data()) {
            error!(error = %e, "final fsync failed");
        }
    }
}
