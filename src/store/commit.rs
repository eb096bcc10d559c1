//! The durability barrier, and the latch that every write passes through.
//!
//! [`Disk`] owns the db, its trees, sled's log file, the body log, the commit seal and the
//! group of writes not yet applied. A commit numbers the group (record `C`), appends its
//! journal record to the body log after the group's bodies, writes and fdatasyncs them at once
//! (see `journal`), applies the writes to the tree and only then advances the seal. Nothing is
//! confirmed before that sequence returns. A checkpoint (every 50 ms while anything was
//! written, started by [`Disk::checkpoint_if_due`]) flushes sled and fdatasyncs its log (and
//! sled's blob files, see `blobs`) on a thread of its own (`checkpoint`); only once it has
//! finished are the body log segments emptied before its start deleted.
//!
//! A failed write, flush or fsync latches the store: after a failed fsync the kernel may have
//! dropped the dirty pages, so a retry could confirm what is not on disk. The latch lives here
//! and nowhere else (redb's `CheckedBackend` is the model): the writer reaches the group for
//! writing only through [`Disk::group_mut`] and writes the trees only through [`Disk`]'s own
//! methods ([`Disk::insert`], [`Disk::remove`], [`Disk::apply_batch`], [`Disk::name_client`]),
//! each of which refuses with [`StoreError::Latched`] once the latch is set; a group taken
//! after it is dropped, and a commit is refused. The trees are handed out only to be read.
//! The commands decide only what the latch means for them: a publish, purge or subscribe is
//! refused whole ([`Disk::writable`]), a hello still answers from what is durable, an ack is
//! dropped, retention pauses.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, error};

use super::bodies::{self, BodyLog, BodyRef, ChunkKey, Facts, Lane};
use super::checkpoint::{Checkpoints, Flusher, Mark};
use super::clients::Clients;
use super::records::{encode, encode_dedup};
use super::{blobs, chunks, dedup, group, integrity, journal, keys, StoreError, StoreOptions};
use crate::codec::{self, DedupEntry, StoredMessage};
use crate::config::Durability;
use crate::faults::Faults;
use crate::metrics::Metrics;
use crate::model::ClientId;

/// The store's files and the writes on their way to them. Only the writer thread holds one.
pub(super) struct Disk {
    db: sled::Db,
    clients: sled::Tree,
    outbox: sled::Tree,
    /// The checkpoint's thread, with sled's log and blob files it syncs.
    checkpoints: Checkpoints,
    /// The commit seal (see `integrity`), advanced after each commit's fdatasync.
    seal: integrity::Seal,
    /// The number of the last commit group written (record `C`).
    commit_no: u64,
    /// Message bodies, written and synced before any reference to them reaches the tree.
    bodies: BodyLog,
    /// The group's writes, applied as one batch at its commit.
    group: group::Group,
    /// The run records of idempotency keys the tree holds, and the greatest `K` record of each
    /// scope looked at (see `dedup`): every write of the tree below notes the ones it makes.
    runs: dedup::Runs,
    /// When the group was last applied to the tree.
    applied_at: Instant,
    /// Successful fsync commits.
    commits: u64,
    /// Writes applied to the trees outside a commit since the last one: they go into the next
    /// journal record (see `journal`).
    carried: Vec<journal::Entry>,
    /// How many times a commit has emptied `carried` (see `checkpoint::Mark`).
    carried_clears: u64,
    /// Journal bytes written since the last checkpoint.
    journaled: u64,
    /// When the last checkpoint was made.
    checkpointed_at: Instant,
    /// How often a checkpoint is made ([`CHECKPOINT_EVERY`] unless a test sets another).
    checkpoint_every: Duration,
    /// Why writes are refused, once they are.
    latch: Option<String>,
    /// The latch as the rest of the broker sees it ([`super::Store::is_latched`]).
    latched: Arc<AtomicBool>,
    durability: Durability,
    faults: Faults,
    metrics: Arc<Metrics>,
}

/// A checkpoint is made this often while anything was written since the last one.
///
/// Short, so that each one writes little: with a checkpoint once a second (a second of sled's
/// writes flushed and synced at once), the p99 at 5k msg/s was 4 to 27 ms while the commits
/// themselves stayed fast (99 % under 0.4 ms); every 50 ms it was 1.3 to 2.1 ms, at the same
/// CPU (bench/analysis.md).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);
/// ... and as soon as this many journal bytes or carried writes wait for one (a bound on what
/// an open replays and on what the writer holds).
const CHECKPOINT_BYTES: u64 = 64 << 20;
const CHECKPOINT_CARRIED: usize = 100_000;

/// What [`Disk::new`] takes: the opened db, its trees, sled's log file and the seal.
pub(super) struct Files {
    pub db: sled::Db,
    pub clients: sled::Tree,
    pub outbox: sled::Tree,
    pub log: File,
    pub seal: integrity::Seal,
    pub bodies: BodyLog,
}

impl Disk {
    pub(super) fn new(
        files: Files,
        opts: &StoreOptions,
        latched: Arc<AtomicBool>,
    ) -> Result<Disk, StoreError> {
        Ok(Disk {
            runs: dedup::Runs::load(&files.outbox)?,
            checkpoints: Checkpoints::new(Flusher {
                db: files.db.clone(),
                log: files.log,
                blobs: blobs::BlobSync::new(&opts.data_dir),
                fsync: opts.durability == Durability::Fsync,
                metrics: Arc::clone(&opts.metrics),
            }),
            db: files.db,
            clients: files.clients,
            outbox: files.outbox,
            commit_no: files.seal.sealed(),
            seal: files.seal,
            bodies: files.bodies,
            group: group::Group::default(),
            applied_at: Instant::now(),
            commits: 0,
            carried: Vec::new(),
            carried_clears: 0,
            journaled: 0,
            checkpointed_at: Instant::now(),
            checkpoint_every: opts.faults.checkpoint_every().unwrap_or(CHECKPOINT_EVERY),
            latch: None,
            latched,
            durability: opts.durability,
            faults: opts.faults,
            metrics: Arc::clone(&opts.metrics),
        })
    }

    /// The outbox tree, to read. Writes go through [`Disk::insert`], [`Disk::remove`],
    /// [`Disk::apply_batch`] or the group.
    pub(super) fn tree(&self) -> &sled::Tree {
        &self.outbox
    }

    pub(super) fn clients_tree(&self) -> &sled::Tree {
        &self.clients
    }

    pub(super) fn db(&self) -> &sled::Db {
        &self.db
    }

    /// The run records of idempotency keys the tree holds, to look keys up in.
    pub(super) fn runs(&self) -> &dedup::Runs {
        &self.runs
    }

    /// Whether the tree may hold the `K` record of idempotency key `body` (see
    /// [`dedup::Runs::may_hold_single`]): when not, a lookup skips reading it.
    pub(super) fn may_hold_single(&mut self, body: &[u8]) -> Result<bool, StoreError> {
        self.runs.may_hold_single(&self.outbox, body)
    }

    /// The body log, to read bodies (the group's own ones too).
    pub(super) fn bodies(&self) -> &BodyLog {
        &self.bodies
    }

    /// Appends a message body to the body log; the returned entry (its reference and `facts`)
    /// goes into the group's chunks in its place.
    pub(super) fn append_body(
        &mut self,
        record: &StoredMessage,
        facts: Facts,
    ) -> Result<Vec<u8>, StoreError> {
        self.writable()?;
        let r = self.bodies.append_with(Lane::Young, |buf| {
            codec::encode_body_into(record, buf).map_err(StoreError::Encode)
        })?;
        Ok(r.encode(facts))
    }

    /// Notes references removed from the tree outside the group (purge, delete): the chunk
    /// under each key, with its references.
    pub(super) fn release_bodies(&mut self, chunks: Vec<(ChunkKey, Vec<BodyRef>)>) {
        for (key, refs) in chunks {
            for r in refs {
                self.bodies.release(&key, r);
            }
        }
    }

    /// Appends a body again for a compaction (see [`BodyLog::compaction`]).
    pub(super) fn body_log_mut(&mut self) -> Result<&mut BodyLog, StoreError> {
        self.writable()?;
        Ok(&mut self.bodies)
    }

    /// The group gathered so far, to read (the writer's reads look at it before the tree).
    pub(super) fn group(&self) -> &group::Group {
        &self.group
    }

    /// Successful fsync commits so far.
    pub(super) fn commits(&self) -> u64 {
        self.commits
    }

    /// When the group was last applied to the tree.
    pub(super) fn applied_at(&self) -> Instant {
        self.applied_at
    }

    /// Ok while writes are accepted; [`StoreError::Latched`] after a failure.
    pub(super) fn writable(&self) -> Result<(), StoreError> {
        match &self.latch {
            Some(r) => Err(StoreError::Latched(r.clone())),
            None => Ok(()),
        }
    }

    pub(super) fn is_latched(&self) -> bool {
        self.latch.is_some()
    }

    /// The group, to add writes to; refused once latched.
    pub(super) fn group_mut(&mut self) -> Result<&mut group::Group, StoreError> {
        self.writable()?;
        Ok(&mut self.group)
    }

    /// Inserts into the outbox tree at once (durable with the next commit).
    pub(super) fn insert(
        &mut self,
        key: impl AsRef<[u8]>,
        value: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.writable()?;
        let (key, value) = (sled::IVec::from(key.as_ref()), sled::IVec::from(value));
        self.outbox.insert(&key, &value)?;
        self.runs.note(&key, Some(&value));
        self.carry([(journal::OUTBOX, key, Some(value))]);
        Ok(())
    }

    /// Removes from the outbox tree at once (durable with the next commit).
    pub(super) fn remove(&mut self, key: impl AsRef<[u8]>) -> Result<(), StoreError> {
        self.writable()?;
        let key = sled::IVec::from(key.as_ref());
        self.outbox.remove(&key)?;
        self.runs.note(&key, None);
        self.carry([(journal::OUTBOX, key, None)]);
        Ok(())
    }

    /// Applies `writes` to the outbox tree at once, as one batch (durable with the next commit).
    pub(super) fn apply_batch(&mut self, writes: group::Writes) -> Result<(), StoreError> {
        self.writable()?;
        let batch = journal::to_batch(writes.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.outbox.apply_batch(batch)?;
        self.runs.note_all(&writes);
        self.carry(writes.into_iter().map(|(k, v)| (journal::OUTBOX, k, v)));
        Ok(())
    }

    /// Writes a new client's name and number, before anything that uses the number.
    pub(super) fn name_client(&mut self, name: &ClientId, cid: u64) -> Result<(), StoreError> {
        self.writable()?;
        let key = sled::IVec::from(name.as_str().as_bytes());
        let value = sled::IVec::from(&cid.to_be_bytes()[..]);
        self.clients.insert(&key, &value)?;
        self.carry([(journal::CLIENTS, key, Some(value))]);
        Ok(())
    }

    /// Removes a client's name (after its outbox's records are gone).
    pub(super) fn unname_client(&mut self, name: &ClientId) -> Result<(), StoreError> {
        self.writable()?;
        let key = sled::IVec::from(name.as_str().as_bytes());
        self.clients.remove(&key)?;
        self.carry([(journal::CLIENTS, key, None)]);
        Ok(())
    }

    /// Notes writes applied to the trees outside a commit: the next journal record carries them.
    fn carry(&mut self, writes: impl IntoIterator<Item = journal::Entry>) {
        self.carried.extend(writes);
        self.show_pending();
    }

    /// Shows in the metrics what no checkpoint covers yet, and the writes not durable at all:
    /// those held in the group and those applied outside a commit since the last one.
    pub(super) fn show_pending(&self) {
        self.metrics.journal_bytes.set(self.journaled);
        self.metrics
            .writes_not_durable
            .set((self.carried.len() + self.group.writes()) as u64);
    }

    /// Refuses every write from now on; nothing further is confirmed.
    pub(super) fn latch(&mut self, reason: &str) {
        if self.latch.is_none() {
            error!(
                reason,
                "STORE LATCHED: refusing every write from now on; nothing further is confirmed. \
                 Check the disk, then restart the broker: everything confirmed so far is on disk."
            );
            self.latch = Some(reason.to_string());
            self.latched.store(true, Ordering::Release);
        }
    }

    /// Once latched, drops the group (it would never be applied) and returns true.
    fn drop_group_if_latched(&mut self) -> bool {
        if self.latch.is_some() {
            self.group.discard();
        }
        self.latch.is_some()
    }

    /// Makes everything applied so far durable: numbers the group, writes it, flushes and
    /// fsyncs (unless `durability = "relaxed"`), applies a journaled group to the tree and
    /// advances the seal. Err with the reason when any step fails (the store is then latched)
    /// or the store was latched before; nothing in the group is confirmed then.
    pub(super) fn commit(&mut self, clients: &Clients) -> Result<(), String> {
        if let Some(r) = &self.latch {
            self.group.discard();
            return Err(r.clone());
        }
        self.write_and_sync(clients).inspect_err(|reason| {
            self.metrics.store_errors.inc();
            self.latch(reason);
        })
    }

    fn write_and_sync(&mut self, clients: &Clients) -> Result<(), String> {
        let failed = |e: StoreError| format!("writing the commit group failed: {e}");
        self.number_group().map_err(failed)?;
        // Bodies stored inline (data dirs from before the body log, kept for a test of that
        // layout) make records too large to write twice: such a group is applied as one batch
        // and checkpointed at once.
        let journaled = !self.faults.inline_bodies();
        let writes = self.take_group(clients, !journaled).map_err(failed)?;
        if journaled {
            let record = journal::encode(self.commit_no, &self.carried, writes.as_ref());
            self.bodies.append_journal(&record);
            self.journaled += record.len() as u64;
            self.sync_journal()?;
            if self.faults.crash_before_apply(self.commits) {
                error!("injected crash (OUTBOXD_FAULT_CRASH_BEFORE_APPLY_AFTER)");
                std::process::abort();
            }
            // Carried writes are in the record now: a replay applies them again.
            self.carried.clear();
            self.carried_clears += 1;
            self.show_pending();
            if let Some(writes) = writes {
                self.runs.note_all(&writes);
                journal::apply(&self.outbox, writes)
                    .map_err(|e| format!("applying the commit group failed: {e}"))?;
            }
        } else {
            let started = Instant::now();
            if let Some(writes) = writes {
                self.runs.note_all(&writes);
                self.outbox
                    .apply_batch(journal::to_batch(writes))
                    .map_err(|e| format!("writing the commit group failed: {e}"))?;
            }
            self.checkpoint()?;
            if self.durability == Durability::Fsync {
                self.commits += 1;
                self.metrics
                    .commit_seconds
                    .observe_duration(started.elapsed());
            }
        }
        if self.durability == Durability::Fsync {
            // Only now is commit `commit_no` on disk: the seal may say so.
            self.seal
                .advance(self.commit_no)
                .map_err(|e| format!("writing the commit seal failed: {e}"))?;
        }
        Ok(())
    }

    /// Writes the body log's new records (the group's bodies and journal record) and
    /// fdatasyncs them: the commit's one wait on the disk.
    fn sync_journal(&mut self) -> Result<(), String> {
        let started = Instant::now();
        if self.durability == Durability::Fsync {
            if let Some(e) = self
                .faults
                .flush_error(self.commits)
                .or_else(|| self.faults.fsync_error(self.commits))
            {
                return Err(e);
            }
        }
        self.bodies
            .sync()
            .map_err(|e| format!("writing or fsyncing the body log failed: {e}"))?;
        if self.durability == Durability::Fsync {
            self.commits += 1;
            let took = started.elapsed();
            self.metrics.commit_seconds.observe_duration(took);
            debug!(took_us = took.as_micros() as u64, "commit");
        }
        Ok(())
    }

    /// Starts a checkpoint when one is due ([`CHECKPOINT_EVERY`] after the last, while anything
    /// was written since, or at once when much waits) and none runs; acts on one that has finished.
    /// A failure latches the store.
    pub(super) fn checkpoint_if_due(&mut self) {
        if self.latch.is_some() {
            return;
        }
        if let Some((mark, r)) = self.checkpoints.finished() {
            self.finish_checkpoint(mark, r);
        }
        if self.latch.is_some() || self.checkpoints.is_running() {
            return;
        }
        let waiting = self.journaled > 0 || !self.carried.is_empty() || self.bodies.has_released();
        let due = (waiting && self.checkpointed_at.elapsed() >= self.checkpoint_every)
            || self.journaled >= CHECKPOINT_BYTES
            || self.carried.len() >= CHECKPOINT_CARRIED;
        if !due {
            return;
        }
        match self.begin_checkpoint() {
            Ok(mark) => {
                if let Some((mark, r)) = self.checkpoints.start(mark) {
                    self.finish_checkpoint(mark, r);
                }
            }
            Err(reason) => {
                self.metrics.store_errors.inc();
                self.latch(&reason);
            }
        }
    }

    /// Acts on a finished checkpoint; a failed one latches the store.
    fn finish_checkpoint(&mut self, mark: Mark, r: Result<(), String>) {
        if let Err(reason) = self.checkpointed(mark, r) {
            self.metrics.store_errors.inc();
            self.latch(&reason);
        }
    }

    /// Makes a checkpoint on this thread, after the running one (if any) has finished.
    pub(super) fn checkpoint(&mut self) -> Result<(), String> {
        if let Some((mark, r)) = self.checkpoints.wait() {
            self.checkpointed(mark, r)?;
        }
        let mark = self.begin_checkpoint()?;
        let r = self.checkpoints.run_here();
        self.checkpointed(mark, r)
    }

    /// The start of a checkpoint: notes where in the body log the journal records from now on
    /// start (`P`); what the trees hold now is what the flush that follows makes durable.
    fn begin_checkpoint(&mut self) -> Result<Mark, String> {
        let (seg, off) = self.bodies.journal_end();
        self.outbox
            .insert(keys::checkpoint(), journal::encode_checkpoint(seg, off))
            .map_err(|e| format!("writing the checkpoint failed: {e}"))?;
        if self.durability == Durability::Fsync {
            if let Some(e) = self
                .faults
                .flush_error(self.commits)
                .or_else(|| self.faults.fsync_error(self.commits))
            {
                return Err(e);
            }
        }
        Ok(Mark {
            carried: self.carried.len(),
            carried_clears: self.carried_clears,
            journaled: self.journaled,
            bodies: self.bodies.mark(),
            started: Instant::now(),
        })
    }

    /// After sled's flush (and fdatasync) of a checkpoint: no journal record before its `P` is
    /// needed any more, so the writes carried before it are forgotten and the segments emptied
    /// before it that nothing refers to any more are deleted.
    fn checkpointed(&mut self, mark: Mark, r: Result<(), String>) -> Result<(), String> {
        r?;
        if self.carried_clears == mark.carried_clears {
            let n = mark.carried.min(self.carried.len());
            self.carried.drain(..n);
        }
        self.journaled = self.journaled.saturating_sub(mark.journaled);
        self.checkpointed_at = Instant::now();
        self.bodies.free_to(mark.bodies);
        self.show_pending();
        debug!(
            took_us = mark.started.elapsed().as_micros() as u64,
            journaled = mark.journaled,
            "checkpoint"
        );
        Ok(())
    }

    /// The last checkpoint at shutdown, and the seal's last word. Skipped once latched: after
    /// a failed write sled's flush can wait forever (it waits for a write that never
    /// completes), and nothing after the latch was confirmed.
    pub(super) fn close(&mut self) {
        if let Some(reason) = &self.latch {
            tracing::warn!(reason = %reason, "store latched: skipping the final flush");
        } else if let Err(e) = self.checkpoint() {
            error!(error = %e, "final checkpoint failed");
        } else if let Err(e) = self
            .seal
            .advance(self.commit_no)
            .and_then(|()| self.seal.sync())
        {
            error!(error = %e, "writing the commit seal failed");
        }
    }

    /// Numbers the group about to be committed: record `C` changes with its writes, so the
    /// seal can tell at the next open whether sled recovered it (see `integrity`).
    fn number_group(&mut self) -> Result<(), StoreError> {
        self.commit_no += 1;
        self.group.insert(keys::commit(), encode(&self.commit_no)?);
        Ok(())
    }

    /// Writes the group gathered so far to the tree as one batch (durable with the next
    /// commit, whose journal record carries it), with the meta of every client it changed.
    /// Once latched, the group is dropped instead: nothing reaches the tree after a failure,
    /// and nobody was told the group is stored.
    pub(super) fn apply_group(&mut self, clients: &Clients) -> Result<(), StoreError> {
        if self.drop_group_if_latched() {
            return Ok(());
        }
        if let Some(writes) = self.take_group(clients, true)? {
            self.apply_batch(writes)?;
        }
        Ok(())
    }

    /// Adds to the group the idempotency keys it stored, as `dedup::place` puts them, and the
    /// records that list them for retention: `G` for the keys stored one per record, `H` for
    /// the runs, each under the newest time it lists and the group's first message id.
    fn store_dedup_keys(
        &mut self,
        new: std::collections::BTreeMap<Vec<u8>, DedupEntry>,
        id: u64,
    ) -> Result<(), StoreError> {
        let placed = dedup::place(&self.runs, new)?;
        let mut singles: group::Expiring = Vec::with_capacity(placed.singles.len());
        for (body, entry) in placed.singles {
            self.group.insert(keys::dedup(&body), encode_dedup(&entry)?);
            singles.push((entry.ts, body));
        }
        let mut runs: group::Expiring = Vec::with_capacity(placed.runs.len());
        for (body, run) in placed.runs {
            // The run itself goes to the body log; its record in the tree says where, and
            // its first key, which a lookup reads without the run (see `dedup`).
            let at = self.bodies.append(Lane::Young, &encode_dedup(&run)?);
            self.group
                .insert(keys::dedup_run(&body), bodies::encode_place(at, &run.first));
            runs.push((dedup::newest(&run), body));
        }
        for (list, kind) in [(singles, keys::DEDUP_LIST), (runs, keys::DEDUP_RUN_LIST)] {
            if let Some(newest) = list.iter().map(|(ts, _)| *ts).max() {
                self.group
                    .insert(keys::group_list(kind, newest, id), encode(&list)?);
            }
        }
        Ok(())
    }

    /// Hands over the group gathered so far, with the meta of every client it changed. With
    /// `sync_bodies`, the bodies it refers to are written and fdatasynced first (a group that
    /// reaches the tree before its journal record); otherwise they go with the record.
    fn take_group(
        &mut self,
        clients: &Clients,
        sync_bodies: bool,
    ) -> Result<Option<group::Writes>, StoreError> {
        self.applied_at = Instant::now();
        if let Some((new, id)) = self.group.take_dedup() {
            if let Err(e) = self.store_dedup_keys(new, id) {
                // The group's messages must not be committed without their keys (a retry would
                // be written twice), and the keys are gone from the group: stop writing.
                self.latch(&format!("storing the group's idempotency keys failed: {e}"));
                return Err(e);
            }
        }
        // No reference may reach the tree (or sled's log, which sled may flush at any time)
        // before its body is on disk.
        if let Err(e) = sync_bodies.then(|| self.bodies.sync()).transpose() {
            let reason = format!("writing or fsyncing the body log failed: {e}");
            self.latch(&reason);
            return Err(StoreError::Io(e));
        }
        self.count_refs()?;
        let Some((mut writes, dirty)) = self.group.take() else {
            return Ok(None);
        };
        for cid in dirty {
            let meta = encode(clients.meta_of(cid)?)?;
            writes.insert(sled::IVec::from(&keys::meta(cid)[..]), Some(meta.into()));
        }
        Ok(Some(writes))
    }

    /// Counts the body references the group's chunks add to the tree and notes those they
    /// remove from it (their counts drop once the removal is durable).
    fn count_refs(&mut self) -> Result<(), StoreError> {
        for (key, entries) in self.group.chunks() {
            let old = match self.outbox.get(key)? {
                Some(v) => chunks::refs(key, &v)?,
                None => Vec::new(),
            };
            let new: Vec<BodyRef> = entries
                .map(|e| {
                    e.iter()
                        .filter_map(|(_, b)| BodyRef::decode(b).map(|(r, _)| r))
                        .collect()
                })
                .unwrap_or_default();
            for r in &new {
                if !old.contains(r) {
                    self.bodies.add(&key[..], *r);
                }
            }
            for r in old {
                if !new.contains(&r) {
                    self.bodies.release(&key[..], r);
                }
            }
        }
        // Runs of idempotency keys refer to the body log too (see `dedup`).
        for (key, value) in self.group.ops_of(keys::DEDUP_RUN) {
            let old = self
                .outbox
                .get(key)?
                .and_then(|v| bodies::decode_place(&v).map(|(r, _)| r));
            let new = value.and_then(|v| bodies::decode_place(v).map(|(r, _)| r));
            if old == new {
                continue;
            }
            if let Some(r) = new {
                self.bodies.add(key, r);
            }
            if let Some(r) = old {
                self.bodies.release(key, r);
            }
        }
        Ok(())
    }
}
