//! The durable outboxes: the only module that knows sled, and the one owner of every write.
//!
//! This file is the store's boundary, what the broker calls and nothing else: [`Store`] and its
//! operations (hello, publish, ack, subscribe, read, purge, backup, totals), each with request
//! and outcome types of its own, [`OutboxHandle`] (the live side of one outbox that sessions
//! watch and read), [`StoreOptions`] and [`StoreError`]. They speak the domain's types
//! (`crate::model`), never the wire's or the disk's, so another engine could stand behind the
//! same operations. The writes (hello, publish, ack, subscribe, purge, backup) are queued
//! commands answered after their commit, async already; `read` and `get` read below the durable
//! frontier without the writer, and `inspector` and `outbox_totals` are blocking scans.
//!
//! All writes go through one writer thread that applies commands in arrival order, then makes
//! a whole group of them durable with a single commit: the group's bodies and its journal
//! record appended to the body log, one `fdatasync` (see `commit` and `journal`). Only after
//! that commit are replies sent and the new messages made visible to sessions. That ordering
//! is the broker's promise:
//!
//! > a publish is confirmed, and a message is sent, only after an fsync covers its write.
//!
//! Sessions read messages (from the outbox's list of those just committed, `fresh`, else from
//! the tree and the body log), but never past an outbox's *durable frontier* (a `watch`
//! channel the writer advances after each commit), so they cannot send what a crash could
//! still take back. Acks are written by the same thread without waiting
//! for a commit: losing an ack in a crash only means a redelivery, which the contract allows.
//!
//! A failed write, flush or fsync latches the store: every later write is refused with
//! [`StoreError::Latched`] and nothing more is confirmed, because after a failed fsync the
//! state of the file is unknown (the lesson of "fsyncgate").
//!
//! Inside, one concept a module:
//! - `writer`: the writer thread's loop (gather, apply, commit, answer);
//! - `commit`: the durability barrier, and the latch every write passes through; `checkpoint`:
//!   sled's flush and fdatasync on a thread of their own;
//! - `outboxes`: what hello, publish, ack, purge and subscribe do to the outboxes;
//! - `retention`: TTL expiry and the dedup window;
//! - `group`, `journal`, `chunks`, `dedup`, `blobs`: how a commit group's writes, messages and
//!   idempotency keys are laid out in sled, and sled's blob files made durable;
//! - `clients`: the writer's copy of every outbox's meta and live handle; `fresh`: the messages
//!   just committed, kept in the handle for the connection's next read;
//! - `keys` (the key layout of the tree), `records` (the values under it);
//! - `engine`, `open`, `integrity`: sled's config and crash leftovers, opening a data dir, the
//!   seal and the open check, `outboxd repair`;
//! - `inspect`, `backup`: read-only views and consistent copies.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::error;

use crate::codec::{ClientMeta, CodecError};
use crate::config::{Backend, Config, Durability, Postgres};
use crate::faults::Faults;
use crate::metrics::Metrics;
use crate::model::{Ack, ClientId, Payload, Resume, Target, Topic};
use writer::{Command, Reply};

mod backup;
mod blobs;
mod bodies;
mod checkpoint;
mod chunks;
mod clients;
mod commit;
mod dedup;
mod engine;
mod fresh;
mod group;
mod inspect;
pub mod integrity;
mod journal;
mod keys;
mod open;
mod outboxes;
pub mod pg;
mod records;
mod retention;
mod summary;
mod writer;
pub use inspect::{Inspector, OutboxListing, OutboxSummary, StoreStats, TopicSubscribers};

#[cfg(test)]
mod tests;

/// sled's segment size for a new data dir. sled writes any log record over a quarter of a
/// segment to a separate blob file that it never fsyncs; with its default 512 KiB segments a
/// consolidated leaf (up to 16 values) of 16 KiB messages is already one. A quarter of 8 MiB
/// holds a leaf of sixteen message chunks, each at most `chunks::MAX_BYTES` plus one message
/// at the payload cap, so no record the broker writes becomes a blob. An existing data dir
/// keeps the size it was created with (sled refuses to open it with another); see
/// `engine::sled_config`.
pub const SEGMENT_BYTES: usize = 8 << 20;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("storage engine error: {0}")]
    Sled(#[from] sled::Error),
    #[error("I/O error on the data directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("stored record under {key} is unreadable: {source}")]
    Corrupt { key: String, source: CodecError },
    #[error("record does not encode: {0}")]
    Encode(CodecError),
    #[error("the store refuses writes since an earlier failure: {0}")]
    Latched(String),
    #[error("cannot open the data directory {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    /// The data directory cannot be created, read or written (a file in the way, no permission,
    /// a read-only file system): a matter of configuration, not of what is stored.
    #[error("cannot use the data directory {}: {source}", .path.display())]
    Unusable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the store is shut down")]
    Closed,
    /// A newer connection of the same client said hello (on this broker or another sharing
    /// the store): this one may no longer read or ack.
    #[error("a newer connection of this client took over")]
    Superseded,
    /// The database cannot be reached, or a statement failed: nothing of the operation is
    /// confirmed (a publish may still have been committed; its `ok` was not sent).
    #[error("the database failed: {0}")]
    Database(String),
    /// `postgres.url` is not a connection string.
    #[error("postgres.url does not parse: {0}")]
    BadUrl(String),
    /// What the operation needs is not there on this backend.
    #[error("{what} is not available on the {backend} backend: {instead}")]
    Unsupported {
        what: &'static str,
        backend: &'static str,
        instead: &'static str,
    },
    #[error("this client already holds limits.max_subscriptions = {limit} subscriptions; unsubscribe from one first")]
    TooManySubscriptions { limit: u32 },
    /// An idempotency key named again within the dedup window for another message (another
    /// target or payload): answered `key_reused`, nothing written.
    #[error(
        "key {key:?} was already used within the dedup window for another message (another \
         recipient or payload); nothing was written: give each message its own key"
    )]
    KeyReused { key: String },
    #[error(
        "the store in {path} is damaged: {damage}. It is not served as if whole: its clients \
         would never learn of the lost messages, and their seqs would be assigned again. Either \
         restore the last backup (`outboxd restore --from BACKUP --data NEW_DIR`), or accept \
         the loss with `outboxd repair --data {path} --accept-loss`, which gives every outbox a \
         new epoch so that each client is told at its next connect"
    )]
    Damaged {
        path: PathBuf,
        damage: integrity::Damage,
    },
    #[error(
        "the data directory {path} is in use by a running outboxd; inspect it through that broker \
         (--admin URL), or stop the broker first"
    )]
    Locked { path: PathBuf },
    #[error(
        "the backup target {} is inside the data directory {} it would copy{}; pick a \
         directory outside it",
        .to.display(),
        .data_dir.display(),
        if .to == .resolved { String::new() } else { format!(" (it resolves to {})", .resolved.display()) }
    )]
    BackupInsideDataDir {
        to: PathBuf,
        /// `to` with `..` and symlinks resolved.
        resolved: PathBuf,
        data_dir: PathBuf,
    },
}

/// What the store needs from the configuration.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub backend: Backend,
    /// The PostgreSQL backend's settings (`backend = Postgres`).
    pub postgres: Postgres,
    pub data_dir: PathBuf,
    pub durability: Durability,
    pub group_commit_max_delay: Duration,
    pub cache_capacity_bytes: u64,
    /// Emptied body log segments kept for reuse.
    pub spare_segments: usize,
    /// Bytes of just-committed messages kept in memory for their connections (see [`fresh`]).
    pub delivery_cache_bytes: u64,
    pub max_outbox_messages: u64,
    pub max_outbox_bytes: u64,
    /// Durable subscriptions one client may hold (0 = no limit).
    pub max_subscriptions: u32,
    pub message_ttl_ms: u64,
    pub dedup_window_ms: u64,
    /// Test hooks (`OUTBOXD_FAULT_*`); none by default.
    pub faults: Faults,
    /// Where the writer counts commits, acks and errors (shared with the rest of the broker).
    pub metrics: Arc<Metrics>,
}

impl StoreOptions {
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            backend: cfg.storage.backend,
            postgres: cfg.postgres.clone(),
            data_dir: cfg.storage.data_dir.clone(),
            durability: cfg.storage.durability,
            group_commit_max_delay: Duration::from_micros(cfg.storage.group_commit_max_delay_us),
            cache_capacity_bytes: cfg.storage.cache_capacity_bytes,
            spare_segments: cfg.storage.spare_segments as usize,
            delivery_cache_bytes: cfg.storage.delivery_cache_bytes,
            max_outbox_messages: cfg.limits.max_outbox_messages,
            max_outbox_bytes: cfg.limits.max_outbox_bytes,
            max_subscriptions: cfg.limits.max_subscriptions,
            message_ttl_ms: cfg.limits.message_ttl_ms,
            dedup_window_ms: cfg.limits.dedup_window_ms,
            faults: Faults::default(),
            metrics: Arc::new(Metrics::default()),
        }
    }
}

/// The live, shared side of one outbox: what sessions watch and read.
#[derive(Debug)]
pub struct OutboxHandle {
    cid: u64,
    name: ClientId,
    /// Every seq below this is durable and may be sent.
    durable: watch::Sender<u64>,
    /// Highest seq possibly sent to the client (by any connection, or before a restart).
    sent: AtomicU64,
    /// How often this process sent each unacked seq (for operators; bounded by what is in
    /// flight, since acked seqs are forgotten).
    sends: std::sync::Mutex<std::collections::BTreeMap<u64, u32>>,
    /// The newest connection generation known for this client (see
    /// [`HelloOutcome::generation`]); a connection with an older one has been taken over.
    generation: watch::Sender<u64>,
    /// Set with a newer generation when an operator purged or deleted the outbox on another
    /// broker: the older connection ends as purged (4002), not as replaced.
    purged: AtomicBool,
    /// Messages just committed, for the connection's next read (sled backend).
    fresh: std::sync::Mutex<fresh::Fresh>,
}

/// Every outbox's live handle by client id, shared by the writer (which creates them) and the
/// admin side (which reads delivery counts).
type Handles = Arc<std::sync::RwLock<HashMap<ClientId, Arc<OutboxHandle>>>>;

impl OutboxHandle {
    fn new(cid: u64, name: ClientId, next_seq: u64, budget: Arc<fresh::Budget>) -> OutboxHandle {
        OutboxHandle {
            cid,
            name,
            durable: watch::channel(next_seq).0,
            // Whatever was stored before may have been sent before.
            sent: AtomicU64::new(next_seq.saturating_sub(1)),
            sends: Default::default(),
            generation: watch::channel(0).0,
            purged: AtomicBool::new(false),
            fresh: std::sync::Mutex::new(fresh::Fresh::new(budget)),
        }
    }

    /// The list of messages just committed (see [`fresh`]).
    fn fresh(&self) -> std::sync::MutexGuard<'_, fresh::Fresh> {
        // The list is only ever a copy of what the store holds: whatever a panic left is
        // still a list of stored messages.
        self.fresh.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection of this outbox ended: the messages kept for its next read go (a later
    /// connection reads them from the store), so they hold none of the budget meanwhile.
    pub fn connection_ended(&self) {
        self.fresh().clear();
    }

    /// Whether a connection waits on this outbox's frontier.
    fn is_watched(&self) -> bool {
        self.durable.receiver_count() > 0
    }

    /// Moves the durable frontier up to `next_seq` (never down); true when it moved.
    fn advance(&self, next_seq: u64) -> bool {
        self.durable.send_if_modified(|v| {
            let moved = next_seq > *v;
            if moved {
                *v = next_seq;
            }
            moved
        })
    }

    /// Records `generation` as the newest connection of this client without waking the older
    /// ones: a takeover on this broker is the registry's to tell (it closes the older
    /// connection and counts the takeover). Returns the newest generation.
    fn note_generation(&self, generation: u64) -> u64 {
        let mut newest = generation;
        self.generation.send_if_modified(|v| {
            *v = (*v).max(generation);
            newest = *v;
            false
        });
        newest
    }

    /// Records `generation`, taken by a connection on another broker, as the newest of this
    /// client: the older connections here close. True when it is newer.
    fn supersede(&self, generation: u64) -> bool {
        self.generation.send_if_modified(|v| {
            let newer = generation > *v;
            if newer {
                *v = generation;
            }
            newer
        })
    }

    /// Ends the connections here as purged: an operator purged or deleted the outbox on
    /// another broker (which raised the generation to `generation`).
    pub(super) fn end_purged(&self, generation: u64) {
        self.purged.store(true, Ordering::Release);
        self.supersede(generation);
    }

    /// Marks the outbox purged or deleted on this broker, whose registry closes the connection
    /// (4002); a read that the new generation refuses first ends the same way.
    pub(super) fn mark_purged(&self) {
        self.purged.store(true, Ordering::Release);
    }

    /// True (once) when the generation moved because the outbox was purged or deleted
    /// elsewhere, rather than taken over.
    pub fn take_purged(&self) -> bool {
        self.purged.swap(false, Ordering::AcqRel)
    }

    /// A receiver that changes when a newer connection of this client (on any broker sharing
    /// the store) takes over; compare with the connection's own [`HelloOutcome::generation`].
    pub fn watch_generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// A receiver that changes whenever new messages become durable.
    pub fn watch_durable(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    /// The highest seq assigned and durable in this outbox (0 when none): what an ack can
    /// cover now.
    pub fn last_durable(&self) -> u64 {
        self.durable.borrow().saturating_sub(1)
    }

    /// Records that every seq up to `seq` may have reached the client.
    pub fn mark_sent(&self, seq: u64) {
        self.sent.fetch_max(seq, Ordering::Relaxed);
    }

    /// True when `seq` may have been sent before.
    pub fn was_sent(&self, seq: u64) -> bool {
        seq <= self.sent.load(Ordering::Relaxed)
    }

    /// Counts one send of `seq` by this process.
    pub fn count_send(&self, seq: u64) {
        let mut sends = self.sends.lock().unwrap_or_else(|p| p.into_inner());
        *sends.entry(seq).or_insert(0) += 1;
    }

    /// Forgets the send counts of what `ack` acknowledges.
    pub fn forget_sends(&self, ack: Ack) {
        let mut sends = self.sends.lock().unwrap_or_else(|p| p.into_inner());
        match ack {
            Ack::Seq(s) => {
                sends.remove(&s);
            }
            Ack::Upto(u) => *sends = sends.split_off(&u.saturating_add(1)),
        }
    }

    /// How often this process has sent `seq` (0 when never, or not since it started).
    pub fn sends_of(&self, seq: u64) -> u32 {
        let sends = self.sends.lock().unwrap_or_else(|p| p.into_inner());
        sends.get(&seq).copied().unwrap_or(0)
    }
}

/// The answer to a hello.
#[derive(Debug, Clone)]
pub struct HelloOutcome {
    pub epoch: String,
    pub resumed: bool,
    /// Why a resume position was not taken (None when it was, or none was given).
    pub reason: Option<ResumeRefused>,
    /// The position in force for this connection.
    pub last_seq: u64,
    pub next_seq: u64,
    pub pending: u64,
    pub missed: u64,
    pub handle: Arc<OutboxHandle>,
    /// This connection's generation: every hello of a client gets a higher one. Where several
    /// brokers share the store, reads and acks of an older generation are refused
    /// ([`StoreError::Superseded`]) once a newer connection said hello.
    pub generation: u64,
}

/// Why a hello's resume position does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeRefused {
    /// The outbox has another epoch (it was purged or repaired, or the client is confused):
    /// the seqs the client holds mean nothing here.
    EpochMismatch,
    /// The position is at or past the durable frontier: nothing there was ever sent.
    Ahead,
}

/// A publish as the store sees it.
#[derive(Debug)]
pub struct PublishRequest {
    pub from: Option<ClientId>,
    pub to: Target,
    pub payload: Payload,
    pub key: Option<String>,
    pub ttl_ms: Option<u64>,
}

/// What a durable publish wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOutcome {
    /// The message id, shared by every outbox written.
    pub id: String,
    /// Outboxes written (for a duplicate: the number the first publish wrote).
    pub recipients: u64,
    pub duplicate: bool,
    /// Recipients refused because they were over quota.
    pub full: Vec<ClientId>,
}

/// Messages read for delivery, and the last seq the read covered.
#[derive(Debug)]
pub struct ReadBatch {
    pub items: Vec<Delivery>,
    pub covered_to: u64,
}

/// A stored message, as the store hands it out for delivery or inspection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub seq: u64,
    /// The message id, shared by every outbox one publish wrote (as in [`PublishOutcome`]).
    pub id: String,
    /// Publish time, Unix ms.
    pub ts: u64,
    pub from: Option<String>,
    pub topic: Option<String>,
    pub payload: Payload,
    /// Unix ms at which retention removes it unacked; None when it never expires.
    pub expires_at: Option<u64>,
}

/// What a purge removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeOutcome {
    /// Messages removed unacked; the client sees them in `missed`.
    pub removed: u64,
    /// The outbox's new epoch.
    pub epoch: String,
}

/// What a backup wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupOutcome {
    pub records: u64,
    pub bytes: u64,
}

/// Totals over every outbox, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxTotals {
    pub outboxes: u64,
    pub pending_messages: u64,
    pub pending_bytes: u64,
    pub max_pending_messages: u64,
    pub max_pending_bytes: u64,
}

/// A cheap, cloneable handle to the store, whichever engine stands behind it.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Command>,
    latched: Arc<AtomicBool>,
    handles: Handles,
    engine: Engine,
}

/// What reads need of the engine; writes all go through the writer's queue.
#[derive(Clone)]
enum Engine {
    Sled(Arc<SledFiles>),
    Postgres(pg::Reads),
}

/// The sled handles reads use. Never dropped (`ManuallyDrop`): dropping sled's last handle
/// flushes, and after a disk failure that flush can wait forever, which would hang the shutdown
/// of a latched broker. The writer makes the final flush itself; the handles live as long as
/// the process anyway.
struct SledFiles {
    db: std::mem::ManuallyDrop<sled::Db>,
    clients: std::mem::ManuallyDrop<sled::Tree>,
    outbox: std::mem::ManuallyDrop<sled::Tree>,
    /// The body log's segments (the writer adds and removes them).
    bodies: Arc<bodies::Segments>,
    dir: PathBuf,
}

/// The writer thread; join it after every [`Store`] clone is dropped to finish the last commit.
pub struct Writer {
    thread: Option<std::thread::JoinHandle<bool>>,
}

impl Writer {
    /// Waits until the writer has committed everything queued and stopped. Blocking.
    /// Returns true when the store ended latched (writes were refused after a failure).
    pub fn join(mut self) -> bool {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(latched)) => latched,
            Some(Err(_)) => {
                error!("the store writer thread panicked");
                true
            }
            None => false,
        }
    }
}

impl Store {
    /// Opens (or creates) the store in `opts.data_dir` and starts its writer thread.
    ///
    /// Errors: [`StoreError::Unusable`] when the directory cannot be created or used (the
    /// broker reports it as a configuration error); [`StoreError::Open`] when another process
    /// holds it or sled cannot recover it; a stored record that does not decode.
    pub fn open(opts: StoreOptions) -> Result<(Store, Writer), StoreError> {
        match opts.backend {
            Backend::Sled => open::open(opts),
            Backend::Postgres => pg::open(opts),
        }
    }

    /// Registers a connecting client: creates its outbox when new, applies its resume position.
    /// Answers after the position is applied. Cancel-safe (an abandoned hello changes nothing
    /// the contract cares about).
    pub async fn hello(
        &self,
        client: ClientId,
        resume: Option<Resume>,
    ) -> Result<HelloOutcome, StoreError> {
        self.call(|reply| Command::Hello {
            client,
            resume,
            reply,
        })
        .await
    }

    /// Queues a publish and returns a receiver that answers once it is durable (or refused).
    /// Waiting on the queue is the publisher's backpressure.
    pub async fn submit_publish(
        &self,
        req: PublishRequest,
    ) -> Result<oneshot::Receiver<Result<PublishOutcome, StoreError>>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.enqueue(Command::Publish { req, reply }).await?;
        Ok(rx)
    }

    /// Publishes and waits until it is durable.
    pub async fn publish(&self, req: PublishRequest) -> Result<PublishOutcome, StoreError> {
        self.submit_publish(req)
            .await?
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Queues an ack of the connection of `generation`. Not waited on: a lost ack only causes
    /// a redelivery (and an ack of a connection that was taken over is dropped).
    pub async fn ack(
        &self,
        handle: &OutboxHandle,
        generation: u64,
        ack: Ack,
    ) -> Result<(), StoreError> {
        let durable_next = *handle.durable.borrow();
        self.enqueue(Command::Ack {
            cid: handle.cid,
            generation,
            durable_next,
            ack,
        })
        .await
    }

    /// Adds or removes a durable subscription; answers once durable.
    pub async fn subscribe(
        &self,
        client: ClientId,
        topic: Topic,
        on: bool,
    ) -> Result<(), StoreError> {
        self.call(|reply| Command::Subscribe {
            client,
            topic,
            on,
            reply,
        })
        .await
    }

    /// Reads up to `limit` durable messages with seq greater than `after`, in seq order, for
    /// the connection of `generation`. `covered_to` tells how far the read looked, so the
    /// caller skips seqs that are gone.
    ///
    /// Errors: [`StoreError::Superseded`] when a newer connection of the client took over.
    pub async fn read(
        &self,
        handle: &OutboxHandle,
        generation: u64,
        after: u64,
        limit: usize,
    ) -> Result<ReadBatch, StoreError> {
        let frontier = *handle.durable.borrow();
        let start = after.saturating_add(1);
        let mut batch = ReadBatch {
            items: Vec::new(),
            covered_to: after,
        };
        if start >= frontier || limit == 0 {
            return Ok(batch);
        }
        if let Some(items) = handle.fresh().take(after, frontier, limit) {
            // Taken in seq order from `start` on, without a gap: the next read goes on after
            // the last of them.
            batch.covered_to = items.last().map_or(after, |d| d.seq);
            batch.items = items;
            return Ok(batch);
        }
        batch.items = match &self.engine {
            Engine::Sled(f) => {
                chunks::read(&f.outbox, &*f.bodies, handle.cid, start, frontier, limit)?
                    .into_iter()
                    .map(|(seq, m)| records::delivery(seq, m))
                    .collect()
            }
            // Boxed: a connection's future holds room for this one only while it reads.
            Engine::Postgres(r) => {
                Box::pin(r.read(handle.cid, generation, start, frontier, limit)).await?
            }
        };
        batch.covered_to = match batch.items.last() {
            Some(last) if batch.items.len() == limit => last.seq,
            _ => frontier - 1,
        };
        Ok(batch)
    }

    /// Reads one durable message, `None` when it is gone (acked or expired).
    pub async fn get(
        &self,
        handle: &OutboxHandle,
        generation: u64,
        seq: u64,
    ) -> Result<Option<Delivery>, StoreError> {
        if seq >= *handle.durable.borrow() {
            return Ok(None);
        }
        match &self.engine {
            Engine::Sled(f) => Ok(chunks::get(&f.outbox, &*f.bodies, handle.cid, seq)?
                .map(|m| records::delivery(seq, m))),
            Engine::Postgres(r) => {
                let mut found = Box::pin(r.read(handle.cid, generation, seq, seq + 1, 1)).await?;
                Ok(found.pop())
            }
        }
    }

    /// Removes every stored message of `client` and gives its outbox a new epoch; the removed
    /// messages count in `missed` at the client's next hello. Answers after the commit; None
    /// when the client has no outbox.
    pub async fn purge(&self, client: ClientId) -> Result<Option<PurgeOutcome>, StoreError> {
        self.call(|reply| Command::Purge { client, reply }).await
    }

    /// Deletes `client`'s outbox and everything under it (stored messages, tombstones,
    /// subscriptions); its next hello makes a new outbox with a new epoch, so a client that
    /// comes back is told its position no longer holds. Answers after the commit with the
    /// messages removed unacked; None when the client has no outbox.
    pub async fn delete(&self, client: ClientId) -> Result<Option<u64>, StoreError> {
        self.call(|reply| Command::Delete { client, reply }).await
    }

    /// Forgets `client` (deletes its outbox) when nothing is stored for it: no message, no
    /// subscription, no tombstone to tell, and no connection newer than `generation`. For
    /// clients that said `transient` in hello. Returns whether it was forgotten.
    pub async fn forget_if_idle(
        &self,
        client: ClientId,
        generation: u64,
    ) -> Result<bool, StoreError> {
        self.call(|reply| Command::Forget {
            client,
            generation,
            reply,
        })
        .await
    }

    /// Waits until every command queued before this call is applied and visible to reads: the
    /// acks a connection has received and queued are then in what an [`Inspector`] reads.
    pub async fn settle(&self) -> Result<(), StoreError> {
        self.call(|reply| Command::Settle { reply }).await
    }

    /// Writes a consistent copy of the store to the new directory `to`, between two writes:
    /// a broker started on `to` serves what was stored at that moment.
    ///
    /// Errors: [`StoreError::BackupInsideDataDir`] when `to` lies inside the store's directory
    /// (checked with [`Store::check_backup_target`]); `to` exists and is not empty; I/O.
    pub async fn backup(&self, to: PathBuf) -> Result<BackupOutcome, StoreError> {
        let data_dir = self.sled("a backup by outboxd")?.dir.clone();
        self.call(|reply| Command::Backup {
            to,
            data_dir,
            reply,
        })
        .await
    }

    /// Refuses a backup target inside the store's directory, also when `..` or a symlink
    /// leads there. Touches the file system (it resolves paths): call it off the runtime.
    pub fn check_backup_target(&self, to: &Path) -> Result<(), StoreError> {
        backup::check_target(&self.sled("a backup by outboxd")?.dir, to)
    }

    /// The sled files, or the refusal of `what` on another backend.
    fn sled(&self, what: &'static str) -> Result<&SledFiles, StoreError> {
        match &self.engine {
            Engine::Sled(f) => Ok(f),
            Engine::Postgres(_) => Err(StoreError::Unsupported {
                what,
                backend: "postgres",
                instead: "back up the database with pg_dump (or the base backups and WAL \
                          archive of your PostgreSQL setup); see docs/scale-out.md",
            }),
        }
    }

    /// The live handle of `client`'s outbox (for its send counts, see
    /// [`OutboxHandle::sends_of`]); None when it has no outbox.
    pub fn outbox(&self, client: &ClientId) -> Option<Arc<OutboxHandle>> {
        self.handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(client)
            .cloned()
    }

    /// A read-only view of the stored outboxes, as they are now.
    pub fn inspector(&self) -> Inspector {
        match &self.engine {
            Engine::Sled(f) => Inspector::over(
                f.dir.clone(),
                sled::Db::clone(&f.db),
                sled::Tree::clone(&f.clients),
                sled::Tree::clone(&f.outbox),
                Arc::clone(&f.bodies),
            ),
            Engine::Postgres(r) => Inspector::over_postgres(r.clone()),
        }
    }

    /// Pending messages and bytes over every outbox, from the client records alone (no
    /// message is read).
    ///
    /// Errors: the storage engine fails, or a client record does not decode.
    pub async fn outbox_totals(&self) -> Result<OutboxTotals, StoreError> {
        match &self.engine {
            Engine::Sled(f) => {
                let f = Arc::clone(f);
                tokio::task::spawn_blocking(move || sled_totals(&f.outbox))
                    .await
                    .map_err(|_| StoreError::Closed)?
            }
            Engine::Postgres(r) => r.totals().await,
        }
    }

    /// True while the store cannot confirm writes for a reason that may pass (the database is
    /// unreachable); see [`Store::is_latched`] for the one that does not.
    pub fn is_unavailable(&self) -> bool {
        match &self.engine {
            Engine::Sled(_) => false,
            Engine::Postgres(r) => r.is_unavailable(),
        }
    }

    /// True after a failed write or fsync: the store refuses writes.
    pub fn is_latched(&self) -> bool {
        self.latched.load(Ordering::Acquire)
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.enqueue(make(reply)).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues a command for the writer, waiting while the queue is full. The wait is boxed:
    /// a queued command is the common case, and the futures of connection tasks (which every
    /// idle connection holds) need not carry room for a parked send.
    async fn enqueue(&self, cmd: Command) -> Result<(), StoreError> {
        match self.tx.try_send(cmd) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(cmd)) => Box::pin(self.tx.send(cmd))
                .await
                .map_err(|_| StoreError::Closed),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(StoreError::Closed),
        }
    }
}

/// [`Store::outbox_totals`] over sled: one scan of the client records. Blocking.
fn sled_totals(outbox: &sled::Tree) -> Result<OutboxTotals, StoreError> {
    let mut t = OutboxTotals::default();
    for item in outbox.scan_prefix([keys::META]) {
        let (k, v) = item?;
        let meta: ClientMeta = records::decode(&k, &v)?;
        t.outboxes += 1;
        t.pending_messages += meta.pending;
        t.pending_bytes += meta.bytes;
        t.max_pending_messages = t.max_pending_messages.max(meta.pending);
        t.max_pending_bytes = t.max_pending_bytes.max(meta.bytes);
    }
    Ok(t)
}
