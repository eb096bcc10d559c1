//! The writer thread: the one owner of every write. It gathers a group of commands (whatever
//! queued while the last commit ran, up to [`MAX_GROUP`] commands or `group::MAX_WRITES`
//! writes, plus `storage.group_commit_max_delay_us`), applies them in arrival order, commits
//! the group (`commit`) and only then answers each command and advances the durable frontier
//! of each outbox it wrote.
//!
//! > a publish is confirmed, and a message is sent, only after an fsync covers its write.
//!
//! That order lives here: [`Pending`] holds every answer until the commit that covers it, and a
//! failed commit turns them into refusals. A group nobody waits on (acks, retention) is held
//! back ([`ACK_APPLY_EVERY`]) and joins the next one. What each command does to the outboxes is
//! in `outboxes` and `retention`.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::clients::Clients;
use super::commit::{Disk, Files};
use super::records::{encode, fresh_meta};
use super::{backup, fresh, group, integrity, keys, Handles, StoreError, StoreOptions};
use super::{BackupOutcome, HelloOutcome, PublishOutcome, PublishRequest, PurgeOutcome};
use crate::codec::CodecError;
use crate::model::{Ack, ClientId, Resume, Target, Topic};

/// How often retention (TTL and dedup expiry) runs when the writer is idle.
pub(super) const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// How many commands the writer queue holds before senders wait.
pub(super) const QUEUE_DEPTH: usize = 8192;
/// The most commands applied before one commit.
const MAX_GROUP: usize = 4096;

/// A commit delay (`storage.group_commit_max_delay_us`) longer than this waits on tokio's
/// timer for all but its last millisecond.
const COARSE_WAIT: Duration = Duration::from_millis(2);

/// How often the writer looks for more writes during the rest of a commit delay.
const DELAY_POLL: Duration = Duration::from_micros(50);

/// A group nobody waits on (acks, retention) is held back and joins the next one until it is
/// this old or this large. Every sled batch costs two log writes on sled's I/O threads, so
/// applying each small group of acks while a reader drains a backlog spent more CPU on those
/// threads than the writer itself. An ack is not durable before a commit anyway.
const ACK_APPLY_EVERY: Duration = Duration::from_millis(10);
const ACK_APPLY_WRITES: usize = 8192;

/// Where the writer sends one command's answer.
pub(super) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// What [`super::Store`] queues for the writer: one operation of the boundary each.
pub(super) enum Command {
    Hello {
        client: ClientId,
        resume: Option<Resume>,
        reply: Reply<HelloOutcome>,
    },
    Publish {
        req: PublishRequest,
        reply: Reply<PublishOutcome>,
    },
    Ack {
        cid: u64,
        /// The acking connection's generation (`HelloOutcome::generation`).
        generation: u64,
        /// The outbox's durable frontier as the acking connection saw it: nothing at or above
        /// it can have been sent.
        durable_next: u64,
        ack: Ack,
    },
    Subscribe {
        client: ClientId,
        topic: Topic,
        on: bool,
        reply: Reply<()>,
    },
    Purge {
        client: ClientId,
        reply: Reply<Option<PurgeOutcome>>,
    },
    /// Deletes a client's outbox if nothing is stored for it and no newer connection exists.
    Forget {
        client: ClientId,
        generation: u64,
        reply: Reply<bool>,
    },
    /// Deletes a client's outbox; answers with the messages removed unacked.
    Delete {
        client: ClientId,
        reply: Reply<Option<u64>>,
    },
    /// A read barrier: answers once every command queued before it is applied and visible to
    /// reads (the acks held back for batching included), so a view the admin API reads next
    /// shows them.
    Settle { reply: Reply<()> },
    Backup {
        to: PathBuf,
        /// The store's own directory, which the copy must stay out of.
        data_dir: PathBuf,
        reply: Reply<BackupOutcome>,
    },
}

/// Replies held back until the commit that covers them.
enum Pending {
    Hello(Reply<HelloOutcome>, Result<HelloOutcome, StoreError>),
    Publish(Reply<PublishOutcome>, Result<PublishOutcome, StoreError>),
    Subscribe(Reply<()>, Result<(), StoreError>),
    Purge(
        Reply<Option<PurgeOutcome>>,
        Result<Option<PurgeOutcome>, StoreError>,
    ),
    Delete(Reply<Option<u64>>, Result<Option<u64>, StoreError>),
    Forget(Reply<bool>, Result<bool, StoreError>),
    Settle(Reply<()>),
}

impl Pending {
    fn send(self) {
        // A dropped receiver means the connection went away; nothing to tell.
        match self {
            Pending::Hello(tx, r) => drop(tx.send(r)),
            Pending::Publish(tx, r) => drop(tx.send(r)),
            Pending::Subscribe(tx, r) => drop(tx.send(r)),
            Pending::Purge(tx, r) => drop(tx.send(r)),
            Pending::Delete(tx, r) => drop(tx.send(r)),
            Pending::Forget(tx, r) => drop(tx.send(r)),
            Pending::Settle(tx) => drop(tx.send(Ok(()))),
        }
    }

    /// The commit failed: nothing in it is confirmed. A hello still gets its answer, since a
    /// client must be able to read what is already durable while the store refuses writes.
    fn fail(self, err: &str) {
        fn latched<T>(r: Result<T, StoreError>, err: &str) -> Result<T, StoreError> {
            r.and_then(|_| Err(StoreError::Latched(err.to_string())))
        }
        match self {
            Pending::Hello(tx, r) => drop(tx.send(r)),
            Pending::Publish(tx, r) => drop(tx.send(latched(r, err))),
            Pending::Subscribe(tx, r) => drop(tx.send(latched(r, err))),
            Pending::Purge(tx, r) => drop(tx.send(latched(r, err))),
            Pending::Delete(tx, r) => drop(tx.send(latched(r, err))),
            Pending::Forget(tx, r) => drop(tx.send(latched(r, err))),
            // A failed commit changes nothing a reader sees: the barrier is passed all the same.
            Pending::Settle(tx) => drop(tx.send(Ok(()))),
        }
    }
}

/// Everything the writer thread owns. Nothing else writes to the db.
pub(super) struct WriterState {
    /// The files, the group on its way to them, and the latch.
    pub(super) disk: Disk,
    pub(super) opts: StoreOptions,
    pub(super) handles: Handles,
    pub(super) clients: Clients,
    pub(super) subscribers: HashMap<Topic, BTreeSet<u64>>,
    pub(super) next_cid: u64,
    /// Publishes applied (for the shutdown report and the write fault).
    pub(super) published: u64,
    /// Clients whose durable frontier must advance at the next commit.
    pub(super) touched: Vec<u64>,
    /// The group's messages for outboxes a connection watches, handed to their lists of fresh
    /// messages once the commit has made them durable: (client, seq, message).
    pub(super) fresh: Vec<(u64, u64, Arc<super::Delivery>)>,
    pending: Vec<Pending>,
    last_sweep: Instant,
    /// Publishes applied since the last commit, counted in the metrics only once it succeeds.
    tally: GroupTally,
    /// Cumulative acks not yet applied, by client: a reader acks every message with an `upto`,
    /// and the highest one in a group does the work of them all.
    pub(super) uptos: HashMap<u64, u64>,
}

/// What the group being committed confirms, for the metrics.
#[derive(Debug, Default)]
struct GroupTally {
    published: u64,
    stored: u64,
    duplicates: u64,
}

/// The next command queued before `deadline`; None once it has passed or the queue closed.
/// tokio's timer ticks in whole milliseconds, so it waits for all but the last one, and short
/// sleeps of the calling thread keep the rest to the microsecond.
fn recv_before(
    rt: &tokio::runtime::Runtime,
    rx: &mut mpsc::Receiver<Command>,
    deadline: Instant,
) -> Option<Command> {
    loop {
        match rx.try_recv() {
            Ok(cmd) => return Some(cmd),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        if left > COARSE_WAIT {
            let coarse = left - Duration::from_millis(1);
            // The timer must be made inside the runtime, or tokio panics.
            if let Ok(got) = rt.block_on(async { tokio::time::timeout(coarse, rx.recv()).await }) {
                return got;
            }
        } else {
            std::thread::sleep(left.min(DELAY_POLL));
        }
    }
}

impl WriterState {
    /// The writer's state over the opened `files`, from what the open check read of them
    /// (`checked`: the client table and every outbox's meta) and the subscription table.
    pub(super) fn load(
        files: Files,
        checked: integrity::Checked,
        opts: StoreOptions,
        latched: Arc<AtomicBool>,
        handles: Handles,
    ) -> Result<Self, StoreError> {
        let integrity::Checked { clients, mut metas } = checked;
        let disk = Disk::new(files, &opts, latched)?;
        let budget = fresh::Budget::new(opts.delivery_cache_bytes);
        let mut st = WriterState {
            disk,
            opts,
            handles,
            clients: Clients::new(budget),
            fresh: Vec::new(),
            subscribers: HashMap::new(),
            next_cid: 1,
            published: 0,
            touched: Vec::new(),
            pending: Vec::new(),
            last_sweep: Instant::now(),
            tally: GroupTally::default(),
            uptos: HashMap::new(),
        };
        let mut orphans = Vec::new();
        for (k, cid) in clients {
            let Some(name) = std::str::from_utf8(&k)
                .ok()
                .and_then(|s| ClientId::new(s).ok())
            else {
                return Err(StoreError::Corrupt {
                    key: format!("clients/{k:02x?}"),
                    source: CodecError::Empty,
                });
            };
            st.next_cid = st.next_cid.max(cid + 1);
            let meta = match metas.remove(&cid) {
                Some(m) => m,
                None => {
                    // Named before a crash, but its first write never became durable.
                    orphans.push(cid);
                    fresh_meta(&name, cid)
                }
            };
            st.clients.install(&st.handles, name, cid, meta);
        }
        for cid in orphans {
            let meta = encode(st.clients.meta_of(cid)?)?;
            st.disk.insert(keys::meta(cid), meta)?;
        }
        for item in st.disk.tree().scan_prefix([keys::SUB]) {
            let (k, _) = item?;
            if let Some((topic, cid)) = keys::parse_sub(&k) {
                if let Ok(topic) = Topic::new(&topic) {
                    st.subscribers.entry(topic).or_default().insert(cid);
                }
            }
        }
        info!(
            clients = st.clients.len(),
            pending = st.clients.pending(),
            topics = st.subscribers.len(),
            // sled's `was_recovered` is true for any data dir that existed, clean shutdown or
            // not: it says the store was read from disk, not that a crash was recovered from.
            existing = st.disk.db().was_recovered(),
            "store opened"
        );
        Ok(st)
    }

    /// Applies the group gathered so far to the tree (not yet durable).
    pub(super) fn apply_group(&mut self) -> Result<(), StoreError> {
        self.disk.apply_group(&self.clients)
    }

    /// The writer loop: gather a group, apply it, commit it, answer it. Returns whether the
    /// store ended latched.
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Command>) -> bool {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                self.disk
                    .latch(&format!("store writer cannot start its timer: {e}"));
                return true;
            }
        };
        loop {
            let wait = if self.disk.group().writes() > 0 {
                ACK_APPLY_EVERY
                    .saturating_sub(self.disk.applied_at().elapsed())
                    .min(SWEEP_EVERY)
            } else {
                SWEEP_EVERY
            };
            let first = rt.block_on(async { tokio::time::timeout(wait, rx.recv()).await });
            let mut group = 0usize;
            match first {
                Ok(Some(cmd)) => {
                    self.apply(cmd);
                    group += 1;
                }
                Ok(None) => break,
                Err(_) => {}
            }
            if group > 0 {
                // Whatever queued while the last commit ran joins this one.
                while group < MAX_GROUP && self.disk.group().writes() < group::MAX_WRITES {
                    match rx.try_recv() {
                        Ok(cmd) => {
                            self.apply(cmd);
                            group += 1;
                        }
                        Err(_) => break,
                    }
                }
                let delay = self.opts.group_commit_max_delay;
                if !delay.is_zero() && group < MAX_GROUP {
                    let deadline = Instant::now() + delay;
                    while group < MAX_GROUP && self.disk.group().writes() < group::MAX_WRITES {
                        let Some(cmd) = recv_before(&rt, &mut rx, deadline) else {
                            break;
                        };
                        self.apply(cmd);
                        group += 1;
                    }
                }
            }
            self.settle_acks();
            if self.last_sweep.elapsed() >= SWEEP_EVERY {
                self.last_sweep = Instant::now();
                if let Err(e) = self.sweep() {
                    self.opts.metrics.store_errors.inc();
                    self.disk.latch(&format!("retention sweep failed: {e}"));
                }
                if let Err(e) = self.compact_bodies() {
                    // Nothing is lost: the bodies stay where they are; a write that failed
                    // latches the store at the commit.
                    self.opts.metrics.store_errors.inc();
                    warn!(error = %e, "body log compaction failed; the segment stays");
                }
            }
            self.commit();
            self.disk.checkpoint_if_due();
        }
        self.settle_acks();
        self.commit();
        if let Err(e) = self.apply_group() {
            self.opts.metrics.store_errors.inc();
            self.disk.latch(&format!("writing acks failed: {e}"));
        }
        self.disk.close();
        let commits = self.disk.commits();
        let per_commit = if commits > 0 {
            self.published as f64 / commits as f64
        } else {
            0.0
        };
        info!(
            commits,
            publishes = self.published,
            publishes_per_commit = format!("{per_commit:.1}"),
            "store closed"
        );
        if self.disk.is_latched() {
            // Dropping sled's handles flushes, which after a disk failure can wait forever.
            std::mem::forget(self);
            return true;
        }
        false
    }

    /// Makes everything applied so far durable, then answers and wakes sessions.
    fn commit(&mut self) {
        if self.pending.is_empty() && self.touched.is_empty() {
            // Nobody waits on this group: acks and retention only. Their writes are held until
            // the group is ACK_APPLY_EVERY old or ACK_APPLY_WRITES large (or join the next
            // commit), then go to the tree and reach the disk with the next commit or the next
            // checkpoint; a crash before that means a redelivery, which the contract allows.
            if self.disk.group().writes() >= ACK_APPLY_WRITES
                || self.disk.applied_at().elapsed() >= ACK_APPLY_EVERY
            {
                if let Err(e) = self.apply_group() {
                    self.opts.metrics.store_errors.inc();
                    self.disk.latch(&format!("writing acks failed: {e}"));
                }
            }
            return;
        }
        let tally = std::mem::take(&mut self.tally);
        match self.disk.commit(&self.clients) {
            Ok(()) => {
                // Counted before the replies go out, so a publisher that has its `ok` (or a
                // scrape after it) sees its publish in the metrics.
                let m = &self.opts.metrics;
                m.commit_groups.inc();
                m.published.add(tally.published);
                m.stored.add(tally.stored);
                m.duplicates.add(tally.duplicates);
                if tally.published > 0 {
                    m.commit_group_publishes.observe(tally.published as f64);
                }
                // Into the lists before the frontiers move: a reader woken by the move finds
                // them there.
                for (cid, seq, m) in self.fresh.drain(..) {
                    if let Some(c) = self.clients.by_cid(cid) {
                        c.handle.fresh().push(seq, &m);
                    }
                }
                for cid in self.touched.drain(..) {
                    if let Some(c) = self.clients.by_cid(cid) {
                        c.handle.durable.send_replace(c.meta.next_seq);
                    }
                }
                for p in self.pending.drain(..) {
                    p.send();
                }
            }
            Err(reason) => {
                self.fresh.clear();
                self.touched.clear();
                for p in self.pending.drain(..) {
                    p.fail(&reason);
                }
            }
        }
    }

    /// Takes the messages `lo..=hi` of `cid`, which the store no longer has, out of its list of
    /// fresh messages and out of what this group would add to it.
    pub(super) fn forget_fresh(&mut self, cid: u64, lo: u64, hi: u64) {
        self.fresh
            .retain(|(c, seq, _)| *c != cid || !(lo..=hi).contains(seq));
        if let Some(c) = self.clients.by_cid(cid) {
            c.handle.fresh().remove(lo, hi);
        }
    }

    /// Applies the cumulative acks gathered for `cid`.
    pub(super) fn settle_acks_of(&mut self, cid: u64) {
        if let Some(u) = self.uptos.remove(&cid) {
            self.ack_or_latch(cid, Ack::Upto(u));
        }
    }

    /// Applies every cumulative ack gathered so far.
    fn settle_acks(&mut self) {
        let uptos: Vec<(u64, u64)> = self.uptos.drain().collect();
        for (cid, u) in uptos {
            self.ack_or_latch(cid, Ack::Upto(u));
        }
    }

    fn ack_or_latch(&mut self, cid: u64, ack: Ack) {
        // A latched store drops acks: they are not needed for anything it still confirms.
        if self.disk.is_latched() {
            return;
        }
        if let Err(e) = self.ack(cid, ack) {
            error!(cid, error = %e, "ack failed in the store");
            self.maybe_latch(&e);
        }
    }

    fn apply(&mut self, cmd: Command) {
        // What a hello, a quota check or a scan of the tree reads, acks must have settled first.
        match &cmd {
            // A publish settles its recipients' acks before its quota check (`publish`).
            Command::Ack { .. } | Command::Publish { .. } => {}
            Command::Hello { client, .. } => {
                if let Some(cid) = self.clients.get(client).map(|c| c.handle.cid) {
                    self.settle_acks_of(cid);
                }
            }
            _ => self.settle_acks(),
        }
        match cmd {
            Command::Hello {
                client,
                resume,
                reply,
            } => {
                let r = self.hello(&client, resume);
                if let Err(e) = &r {
                    warn!(client = %client, error = %e, "hello failed in the store");
                    self.count_error(e);
                }
                self.pending.push(Pending::Hello(reply, r));
            }
            Command::Publish { req, reply } => {
                self.published += 1;
                let direct = matches!(req.to, Target::Client(_));
                let r = self.publish(req);
                match &r {
                    Ok(o) if o.duplicate => self.tally.duplicates += 1,
                    // Refused (outbox_full): counted where the refusal is answered.
                    Ok(o) if direct && !o.full.is_empty() => {}
                    Ok(o) => {
                        self.tally.published += 1;
                        self.tally.stored += o.recipients;
                    }
                    Err(e) => self.maybe_latch(e),
                }
                self.pending.push(Pending::Publish(reply, r));
            }
            Command::Ack { cid, ack, .. } => match ack {
                Ack::Upto(u) => {
                    let at = self.uptos.entry(cid).or_insert(u);
                    *at = (*at).max(u);
                }
                Ack::Seq(_) => {
                    self.settle_acks_of(cid);
                    self.ack_or_latch(cid, ack);
                }
            },
            Command::Subscribe {
                client,
                topic,
                on,
                reply,
            } => {
                let r = self.subscribe(&client, &topic, on);
                if let Err(e) = &r {
                    self.maybe_latch(e);
                }
                self.pending.push(Pending::Subscribe(reply, r));
            }
            Command::Forget {
                client,
                generation,
                reply,
            } => {
                let r = self.forget_if_idle(&client, generation);
                if let Err(e) = &r {
                    self.maybe_latch(e);
                }
                self.pending.push(Pending::Forget(reply, r));
            }
            Command::Delete { client, reply } => {
                let r = self.delete(&client);
                if let Err(e) = &r {
                    self.maybe_latch(e);
                }
                self.pending.push(Pending::Delete(reply, r));
            }
            Command::Purge { client, reply } => {
                let r = self.purge(&client);
                match &r {
                    Ok(Some(o)) => warn!(client = %client, removed = o.removed, epoch = %o.epoch,
                                         "outbox purged by an operator; the client will see the removed messages in `missed`"),
                    Ok(None) => {}
                    Err(e) => self.maybe_latch(e),
                }
                self.pending.push(Pending::Purge(reply, r));
            }
            // Acks were settled above. When nothing waits on a commit, what the group holds
            // (acks, retention) is applied now and the barrier passed without one; otherwise it
            // is answered after the commit.
            Command::Settle { reply } if self.pending.is_empty() && self.touched.is_empty() => {
                if let Err(e) = self.apply_group() {
                    self.maybe_latch(&e);
                }
                let _ = reply.send(Ok(()));
            }
            Command::Settle { reply } => self.pending.push(Pending::Settle(reply)),
            Command::Backup {
                to,
                data_dir,
                reply,
            } => {
                // Between two writes: the copy is one consistent moment.
                let r = match self.apply_group() {
                    Ok(()) => backup::copy_trees(
                        self.disk.clients_tree(),
                        self.disk.tree(),
                        self.disk.bodies(),
                        &data_dir,
                        &to,
                    ),
                    Err(e) => {
                        self.maybe_latch(&e);
                        Err(e)
                    }
                };
                if let Err(e) = &r {
                    warn!(to = %to.display(), error = %e, "backup failed");
                    self.count_error(e);
                }
                let _ = reply.send(r);
            }
        }
    }

    /// Counts a failed store operation; refusals because of an earlier failure or a shutdown
    /// are not new errors.
    fn count_error(&self, e: &StoreError) {
        // A key named for another message is the publisher's mistake, not the store's.
        if !matches!(
            e,
            StoreError::Latched(_) | StoreError::Closed | StoreError::KeyReused { .. }
        ) {
            self.opts.metrics.store_errors.inc();
        }
    }

    /// Storage-engine failures latch; refusals that are about the request do not.
    fn maybe_latch(&mut self, e: &StoreError) {
        self.count_error(e);
        if matches!(e, StoreError::Sled(_) | StoreError::Io(_)) {
            self.disk.latch(&e.to_string());
        }
    }
}
