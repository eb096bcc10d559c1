//! The durable outboxes: the only module that knows sled, and the one owner of every write.
//!
//! All writes go through one writer thread ([`writer`](self::Writer)) that applies commands in
//! arrival order, then makes a whole group of them durable with a single commit: sled's
//! `flush()` followed by our own `fdatasync` of sled's log file (sled's flush alone issues
//! `sync_file_range`, which is not a durability barrier). Only after that commit are replies
//! sent and the new messages made visible to sessions. That ordering is the broker's promise:
//!
//! > a publish is confirmed, and a message is sent, only after an fsync covers its write.
//!
//! Sessions read messages straight from the tree, but never past an outbox's *durable
//! frontier* (a `watch` channel the writer advances after each commit), so they cannot send
//! what a crash could still take back. Acks are written by the same thread without waiting
//! for a commit: losing an ack in a crash only means a redelivery, which the contract allows.
//!
//! A failed write, flush or fsync latches the store: every later write is refused with
//! [`StoreError::Latched`] and nothing more is confirmed, because after a failed fsync the
//! state of the file is unknown (the lesson of "fsyncgate").
//!
//! Layout (one sled db in the data dir):
//! - tree `clients`: client name -> client number (u64 big-endian), fixed width so no client's
//!   keys are a prefix of another's;
//! - tree `outbox`, keys by a one-byte kind:
//!   `M cid` -> [`ClientMeta`]; `O cid seq` -> a chunk of messages from `seq` on (see
//!   `chunks`; a record of one [`StoredMessage`] before chunks); `X cid seq` -> () a message
//!   that retention removed unacked (counted in `missed`); `E expires cid seq` -> () the expiry
//!   index; `S len topic cid` -> () a subscription; `R len scope key` -> a run of
//!   idempotency keys of one scope up to `key` (see `dedup`); `K len scope key` ->
//!   [`DedupEntry`], a key not stored in a run; `G ts id` -> the (time, scope + key) of each `K`
//!   one group stored, `ts` the newest, and `H ts id` the same for its runs: the dedup expiry
//!   index (data dirs from before hold `D ts len scope key` -> (), one per key, still read);
//!   `J` -> the writes of the last small commit group, present only
//!   until they reach the tree (see `journal`). All integers big-endian, so one range scan
//!   reads an outbox in seq order.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::codec::{self, ClientMeta, CodecError, DedupEntry, StoredMessage, StoredPayload};
use crate::config::{Config, Durability};
use crate::faults::Faults;
use crate::metrics::Metrics;
use crate::model::{now_ms, Ack, Payload, Resume, Target};
use crate::model::{ClientId, Topic};
use chunks::Entries;

mod backup;
mod blobs;
mod chunks;
mod dedup;
mod group;
mod inspect;
pub mod integrity;
mod journal;
pub use inspect::Inspector;

/// How many commands the writer queue holds before senders wait.
const QUEUE_DEPTH: usize = 8192;
/// The most commands applied before one commit.
const MAX_GROUP: usize = 4096;
/// sled's segment size for a new data dir. sled writes any log record over a quarter of a
/// segment to a separate blob file that it never fsyncs; with its default 512 KiB segments a
/// consolidated leaf (up to 16 values) of 16 KiB messages is already one. A quarter of 8 MiB
/// holds a leaf of sixteen message chunks, each at most `chunks::MAX_BYTES` plus one message
/// at the payload cap, so no record the broker writes becomes a blob. An existing data dir keeps the size it was created with
/// (sled refuses to open it with another); see [`sled_config`].
pub const SEGMENT_BYTES: usize = 8 << 20;

/// How often retention (TTL and dedup expiry) runs when the writer is idle.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// The most messages, or idempotency keys, one retention sweep removes: a backlog of expired
/// records is worked off over several sweeps instead of stalling the writer in one.
const SWEEP_BATCH: usize = 10_000;
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
    #[error("this client already holds limits.max_subscriptions = {limit} subscriptions; unsubscribe from one first")]
    TooManySubscriptions { limit: u32 },
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
    pub data_dir: PathBuf,
    pub durability: Durability,
    pub group_commit_max_delay: Duration,
    pub cache_capacity_bytes: u64,
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
            data_dir: cfg.storage.data_dir.clone(),
            durability: cfg.storage.durability,
            group_commit_max_delay: Duration::from_micros(cfg.storage.group_commit_max_delay_us),
            cache_capacity_bytes: cfg.storage.cache_capacity_bytes,
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
}

/// Every outbox's live handle by client id, shared by the writer (which creates them) and the
/// admin side (which reads delivery counts).
type Handles = Arc<std::sync::RwLock<HashMap<ClientId, Arc<OutboxHandle>>>>;

impl OutboxHandle {
    pub fn client_id(&self) -> &ClientId {
        &self.name
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
    pub reason: Option<&'static str>,
    /// The position in force for this connection.
    pub last_seq: u64,
    pub next_seq: u64,
    pub pending: u64,
    pub missed: u64,
    pub handle: Arc<OutboxHandle>,
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

/// A message read back for delivery.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub seq: u64,
    pub message: StoredMessage,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Command {
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
    Backup {
        to: PathBuf,
        /// The store's own directory, which the copy must stay out of.
        data_dir: PathBuf,
        reply: Reply<BackupOutcome>,
    },
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

/// A cheap, cloneable handle to the store.
///
/// Its sled handles are never dropped (`ManuallyDrop`): dropping sled's last handle flushes,
/// and after a disk failure that flush can wait forever, which would hang the shutdown of a
/// latched broker. The writer makes the final flush itself; the handles live as long as the
/// process anyway.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Command>,
    db: std::mem::ManuallyDrop<sled::Db>,
    clients: std::mem::ManuallyDrop<sled::Tree>,
    outbox: std::mem::ManuallyDrop<sled::Tree>,
    dir: PathBuf,
    latched: Arc<AtomicBool>,
    handles: Handles,
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

fn new_epoch(cid: u64) -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.write_u64(cid);
    format!("{:016x}", h.finish())
}

mod keys {
    pub const META: u8 = b'M';
    pub const MSG: u8 = b'O';
    pub const MISSED: u8 = b'X';
    pub const EXPIRY: u8 = b'E';
    pub const SUB: u8 = b'S';
    pub const DEDUP: u8 = b'K';
    pub const DEDUP_EXPIRY: u8 = b'D';
    pub const DEDUP_LIST: u8 = b'G';
    /// Several idempotency keys of one scope in one record (see `dedup`).
    pub const DEDUP_RUN: u8 = b'R';
    /// The dedup runs one group stored, for retention (as `DEDUP_LIST` for `K` records).
    pub const DEDUP_RUN_LIST: u8 = b'H';
    /// The one journal record (`journal::KEY`).
    pub const JOURNAL: u8 = b'J';
    /// The number of the last commit group (see `integrity`).
    pub const COMMIT: u8 = b'C';

    pub fn commit() -> [u8; 1] {
        [COMMIT]
    }

    pub fn meta(cid: u64) -> [u8; 9] {
        let mut k = [META; 9];
        k[1..].copy_from_slice(&cid.to_be_bytes());
        k
    }

    pub fn seq_key(kind: u8, cid: u64, seq: u64) -> [u8; 17] {
        let mut k = [kind; 17];
        k[1..9].copy_from_slice(&cid.to_be_bytes());
        k[9..].copy_from_slice(&seq.to_be_bytes());
        k
    }

    pub fn seq_prefix(kind: u8, cid: u64) -> [u8; 9] {
        let mut k = [kind; 9];
        k[1..].copy_from_slice(&cid.to_be_bytes());
        k
    }

    pub fn seq_of(key: &[u8]) -> Option<u64> {
        key.get(9..17)?.try_into().ok().map(u64::from_be_bytes)
    }

    pub fn expiry(at: u64, cid: u64, seq: u64) -> [u8; 25] {
        let mut k = [EXPIRY; 25];
        k[1..9].copy_from_slice(&at.to_be_bytes());
        k[9..17].copy_from_slice(&cid.to_be_bytes());
        k[17..].copy_from_slice(&seq.to_be_bytes());
        k
    }

    /// `(at, cid, seq)` of an expiry key.
    pub fn parse_expiry(key: &[u8]) -> Option<(u64, u64, u64)> {
        let at = u64::from_be_bytes(key.get(1..9)?.try_into().ok()?);
        let cid = u64::from_be_bytes(key.get(9..17)?.try_into().ok()?);
        let seq = u64::from_be_bytes(key.get(17..25)?.try_into().ok()?);
        Some((at, cid, seq))
    }

    fn push_name(k: &mut Vec<u8>, name: &str) {
        // Names are at most 255 bytes (validated types), so the length fits one byte.
        k.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
        k.extend_from_slice(name.as_bytes());
    }

    pub fn sub_prefix(topic: &str) -> Vec<u8> {
        let mut k = vec![SUB];
        push_name(&mut k, topic);
        k
    }

    pub fn sub(topic: &str, cid: u64) -> Vec<u8> {
        let mut k = sub_prefix(topic);
        k.extend_from_slice(&cid.to_be_bytes());
        k
    }

    /// `(topic, cid)` of a subscription key.
    pub fn parse_sub(key: &[u8]) -> Option<(String, u64)> {
        let len = usize::from(*key.get(1)?);
        let topic = std::str::from_utf8(key.get(2..2 + len)?).ok()?.to_owned();
        let cid = u64::from_be_bytes(key.get(2 + len..2 + len + 8)?.try_into().ok()?);
        Some((topic, cid))
    }

    /// The part of a dedup key after the kind byte: scope and key.
    pub fn dedup_body(scope: &str, key: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(2 + scope.len() + key.len());
        push_name(&mut k, scope);
        k.extend_from_slice(key.as_bytes());
        k
    }

    /// `kind` followed by `body`.
    fn kind_and(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(1 + body.len());
        k.push(kind);
        k.extend_from_slice(body);
        k
    }

    pub fn dedup(body: &[u8]) -> Vec<u8> {
        kind_and(DEDUP, body)
    }

    /// The key of a dedup run: the scope and the greatest key it holds.
    pub fn dedup_run(body: &[u8]) -> Vec<u8> {
        kind_and(DEDUP_RUN, body)
    }

    /// The key of one group's record listing, for retention, the `K` records
    /// (`kind` = [`DEDUP_LIST`]) or the runs ([`DEDUP_RUN_LIST`]) it stored: the newest time it
    /// lists, then the group's first message id (unique across restarts).
    pub fn group_list(kind: u8, ts: u64, id: u64) -> Vec<u8> {
        let mut k = vec![kind];
        k.extend_from_slice(&ts.to_be_bytes());
        k.extend_from_slice(&id.to_be_bytes());
        k
    }

    pub fn dedup_expiry(ts: u64, body: &[u8]) -> Vec<u8> {
        let mut k = vec![DEDUP_EXPIRY];
        k.extend_from_slice(&ts.to_be_bytes());
        k.extend_from_slice(body);
        k
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    codec::decode(bytes).map_err(|source| StoreError::Corrupt {
        key: format!("{key:02x?}"),
        source,
    })
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    codec::encode(value).map_err(StoreError::Encode)
}

/// Removes `snap.*.generating` files a crash during a snapshot left behind: sled refuses to
/// open with them present although the data is intact.
/// The segment size recorded in an existing sled data dir (its `conf` file: text lines such as
/// `segment_size: 524288`, then a checksum); None for a new one.
pub(crate) fn existing_segment_bytes(dir: &Path) -> Option<usize> {
    let raw = std::fs::read(dir.join("conf")).ok()?;
    String::from_utf8_lossy(&raw)
        .lines()
        .find_map(|l| l.strip_prefix("segment_size:"))
        .and_then(|v| v.trim().parse().ok())
}

/// sled's config for a data dir: its own segment size if it exists, else [`SEGMENT_BYTES`].
pub(crate) fn sled_config(dir: &Path) -> sled::Config {
    sled::Config::new()
        .path(dir)
        .segment_size(existing_segment_bytes(dir).unwrap_or(SEGMENT_BYTES))
}

/// The error for a store that lost what it confirmed.
fn damaged(dir: &Path, what: impl std::fmt::Display) -> StoreError {
    StoreError::Damaged {
        path: dir.to_path_buf(),
        damage: integrity::Damage(what.to_string()),
    }
}

fn remove_stale_snapshots(dir: &Path) -> Result<(), StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            warn!(file = %entry.path().display(), "removing an unfinished snapshot left by a crash");
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

impl Store {
    /// Opens (or creates) the store in `opts.data_dir` and starts its writer thread.
    ///
    /// Errors: [`StoreError::Unusable`] when the directory cannot be created or used (the
    /// broker reports it as a configuration error); [`StoreError::Open`] when another process
    /// holds it or sled cannot recover it; a stored record that does not decode.
    pub fn open(opts: StoreOptions) -> Result<(Store, Writer), StoreError> {
        let dir = opts.data_dir.clone();
        let unusable = |source| StoreError::Unusable {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(unusable)?;
        remove_stale_snapshots(&dir).map_err(|e| match e {
            StoreError::Io(source) => unusable(source),
            other => other,
        })?;
        integrity::check_conf(&dir).map_err(|d| damaged(&dir, d))?;
        let segment = existing_segment_bytes(&dir)
            .or(opts.faults.segment_bytes())
            .unwrap_or(SEGMENT_BYTES);
        if segment * 4 < SEGMENT_BYTES {
            warn!(
                dir = %dir.display(),
                segment_bytes = segment,
                "this data dir was created with small sled segments: a leaf of large messages is \
                 stored as a blob file, which the commit fsyncs but sled's own flush does not. \
                 To move it to the current layout, stop the broker, `outboxd backup --to NEW` \
                 and `outboxd restore` from NEW into an empty data dir"
            );
        }
        let opened = integrity::guarded("recovering it", || {
            sled::Config::new()
                .path(&dir)
                .segment_size(segment)
                .cache_capacity(opts.cache_capacity_bytes)
                .flush_every_ms(Some(500))
                .open()
        })
        .map_err(|d| damaged(&dir, d))?;
        let db = opened.map_err(|e| match e {
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("could not acquire lock") =>
                {
                    StoreError::Open {
                        path: dir.clone(),
                        reason: "another process (a running outboxd?) holds it; stop it or pick another data_dir".to_string(),
                    }
                }
                sled::Error::Io(io) => unusable(io),
                sled::Error::Corruption { .. } => damaged(&dir, format!("sled cannot recover it: {e}")),
                other => StoreError::Open {
                    path: dir.clone(),
                    reason: other.to_string(),
                },
            })?;
        let clients = db.open_tree("clients")?;
        let outbox = db.open_tree("outbox")?;
        match journal::replay(&outbox) {
            Ok(Some(writes)) => info!(
                writes,
                "finished the last commit group, which a crash had cut short"
            ),
            Ok(None) => {}
            Err(e @ StoreError::Corrupt { .. }) => return Err(damaged(&dir, e)),
            Err(e) => return Err(e),
        }
        let commit = integrity::check_seal(&dir, &outbox)?.map_err(|d| damaged(&dir, d))?;
        let checked = Instant::now();
        integrity::verify(&clients, &outbox).map_err(|d| damaged(&dir, d))?;
        info!(
            took_ms = checked.elapsed().as_millis() as u64,
            commit, "store checked: every record reads back and every outbox is whole"
        );
        // Our own handle on sled's log, for the fdatasync its flush does not do.
        let log = File::open(dir.join("db"))?;
        // What sled recovered may so far be only in the page cache (a crash between a write and
        // its fsync): make it durable before the seal vouches for it.
        log.sync_data()?;
        let seal = integrity::Seal::open(&dir, commit)?;
        let latched = Arc::new(AtomicBool::new(false));
        let handles = Handles::default();
        let state = WriterState::load(
            db.clone(),
            clients.clone(),
            outbox.clone(),
            (log, seal),
            opts,
            Arc::clone(&latched),
            Arc::clone(&handles),
        )?;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let thread = std::thread::Builder::new()
            .name("outboxd-writer".into())
            .spawn(move || state.run(rx))?;
        Ok((
            Store {
                tx,
                db: std::mem::ManuallyDrop::new(db),
                clients: std::mem::ManuallyDrop::new(clients),
                outbox: std::mem::ManuallyDrop::new(outbox),
                dir,
                latched,
                handles,
            },
            Writer {
                thread: Some(thread),
            },
        ))
    }

    /// Removes every stored message of `client` and gives its outbox a new epoch; the removed
    /// messages count in `missed` at the client's next hello. Answers after the commit; None
    /// when the client has no outbox.
    pub async fn purge(&self, client: ClientId) -> Result<Option<PurgeOutcome>, StoreError> {
        self.call(|reply| Command::Purge { client, reply }).await
    }

    /// Writes a consistent copy of the store to the new directory `to`, between two writes:
    /// a broker started on `to` serves what was stored at that moment.
    ///
    /// Errors: [`StoreError::BackupInsideDataDir`] when `to` lies inside the store's directory
    /// (checked with [`Store::check_backup_target`]); `to` exists and is not empty; I/O.
    pub async fn backup(&self, to: PathBuf) -> Result<BackupOutcome, StoreError> {
        let data_dir = self.dir.clone();
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
        backup::check_target(&self.dir, to)
    }

    /// How often this process has sent each of `client`'s messages in `page` (see
    /// [`OutboxHandle::sends_of`]); fills `deliveries`.
    pub fn fill_deliveries(&self, page: &mut crate::views::OutboxPage) {
        let Ok(id) = ClientId::new(&page.client_id) else {
            return;
        };
        let handle = self
            .handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        for m in &mut page.messages {
            m.deliveries = Some(handle.as_ref().map_or(0, |h| u64::from(h.sends_of(m.seq))));
        }
    }

    /// A read-only view of the stored outboxes, as they are now.
    pub fn inspector(&self) -> Inspector {
        Inspector::over(
            self.dir.clone(),
            sled::Db::clone(&self.db),
            sled::Tree::clone(&self.clients),
            sled::Tree::clone(&self.outbox),
        )
    }

    /// Pending messages and bytes over every outbox, from the client records alone (one scan
    /// of a record per client, no message is read). Blocking: call it off the async runtime.
    ///
    /// Errors: the storage engine fails, or a client record does not decode.
    pub fn outbox_totals(&self) -> Result<OutboxTotals, StoreError> {
        let mut t = OutboxTotals::default();
        for item in self.outbox.scan_prefix([keys::META]) {
            let (k, v) = item?;
            let meta: ClientMeta = decode(&k, &v)?;
            t.outboxes += 1;
            t.pending_messages += meta.pending;
            t.pending_bytes += meta.bytes;
            t.max_pending_messages = t.max_pending_messages.max(meta.pending);
            t.max_pending_bytes = t.max_pending_bytes.max(meta.bytes);
        }
        Ok(t)
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

    /// Publishes and waits until it is durable.
    pub async fn publish(&self, req: PublishRequest) -> Result<PublishOutcome, StoreError> {
        self.submit_publish(req)
            .await?
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Queues an ack. Not waited on: a lost ack only causes a redelivery.
    pub async fn ack(&self, handle: &OutboxHandle, ack: Ack) -> Result<(), StoreError> {
        self.enqueue(Command::Ack {
            cid: handle.cid,
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

    /// Reads up to `limit` durable messages with seq greater than `after`, in seq order.
    /// `covered_to` tells how far the read looked, so the caller skips seqs that are gone.
    pub fn read(
        &self,
        handle: &OutboxHandle,
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
        batch.items = chunks::read(&self.outbox, handle.cid, start, frontier, limit)?
            .into_iter()
            .map(|(seq, message)| Delivery { seq, message })
            .collect();
        batch.covered_to = match batch.items.last() {
            Some(last) if batch.items.len() == limit => last.seq,
            _ => frontier - 1,
        };
        Ok(batch)
    }

    /// Reads one durable message, `None` when it is gone (acked or expired).
    pub fn get(
        &self,
        handle: &OutboxHandle,
        seq: u64,
    ) -> Result<Option<StoredMessage>, StoreError> {
        if seq >= *handle.durable.borrow() {
            return Ok(None);
        }
        chunks::get(&self.outbox, handle.cid, seq)
    }
}

/// Stored payload <-> wire payload.
pub fn to_wire(p: &StoredPayload) -> Payload {
    match p {
        StoredPayload::Json(s) => Payload::Json(s.clone()),
        StoredPayload::Binary(b) => Payload::Binary(b.clone()),
    }
}

struct ClientState {
    meta: ClientMeta,
    handle: Arc<OutboxHandle>,
}

impl ClientState {
    /// `next_seq` as of the last commit: everything below it is durable and may have been sent;
    /// nothing at or above it has been.
    fn durable_next(&self) -> u64 {
        *self.handle.durable.borrow()
    }
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
}

impl Pending {
    fn send(self) {
        // A dropped receiver means the connection went away; nothing to tell.
        match self {
            Pending::Hello(tx, r) => drop(tx.send(r)),
            Pending::Publish(tx, r) => drop(tx.send(r)),
            Pending::Subscribe(tx, r) => drop(tx.send(r)),
            Pending::Purge(tx, r) => drop(tx.send(r)),
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
        }
    }
}

/// Everything the writer thread owns. Nothing else writes to the db.
struct WriterState {
    db: sled::Db,
    clients_tree: sled::Tree,
    outbox: sled::Tree,
    log: File,
    /// The commit seal (see `integrity`), advanced after each commit's fdatasync.
    seal: integrity::Seal,
    /// The number of the last commit group written (record `C`).
    commit_no: u64,
    opts: StoreOptions,
    latched: Arc<AtomicBool>,
    latch_reason: Option<String>,
    handles: Handles,
    clients: HashMap<ClientId, ClientState>,
    by_cid: HashMap<u64, ClientId>,
    subscribers: HashMap<Topic, BTreeSet<u64>>,
    next_cid: u64,
    /// Successful fsync commits, and the publishes they covered (for the shutdown report).
    commits: u64,
    published: u64,
    /// Clients whose durable frontier must advance at the next commit.
    touched: Vec<u64>,
    pending: Vec<Pending>,
    last_sweep: Instant,
    /// When the group was last applied to the tree (see [`ACK_APPLY_EVERY`]).
    applied_at: Instant,
    /// Publishes applied since the last commit, counted in the metrics only once it succeeds.
    tally: GroupTally,
    /// The group's writes, applied as one batch at its commit.
    group: group::Group,
    /// sled's blob files, which the commit must fsync besides the log.
    blobs: blobs::BlobSync,
    /// Cumulative acks not yet applied, by client: a reader acks every message with an `upto`,
    /// and the highest one in a group does the work of them all.
    uptos: HashMap<u64, u64>,
}

/// What the group being committed confirms, for the metrics.
#[derive(Debug, Default)]
struct GroupTally {
    published: u64,
    stored: u64,
    duplicates: u64,
}

impl WriterState {
    fn load(
        db: sled::Db,
        clients_tree: sled::Tree,
        outbox: sled::Tree,
        (log, seal): (File, integrity::Seal),
        opts: StoreOptions,
        latched: Arc<AtomicBool>,
        handles: Handles,
    ) -> Result<Self, StoreError> {
        let mut metas: HashMap<u64, ClientMeta> = HashMap::new();
        for item in outbox.scan_prefix([keys::META]) {
            let (k, v) = item?;
            let cid = k
                .get(1..9)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| StoreError::Corrupt {
                    key: format!("{k:02x?}"),
                    source: CodecError::Empty,
                })?;
            metas.insert(cid, decode(&k, &v)?);
        }
        let opts_dir = opts.data_dir.clone();
        let mut st = WriterState {
            db,
            clients_tree,
            outbox,
            log,
            commit_no: seal.sealed(),
            seal,
            opts,
            latched,
            latch_reason: None,
            clients: HashMap::new(),
            by_cid: HashMap::new(),
            subscribers: HashMap::new(),
            next_cid: 1,
            commits: 0,
            published: 0,
            touched: Vec::new(),
            pending: Vec::new(),
            last_sweep: Instant::now(),
            applied_at: Instant::now(),
            handles,
            tally: GroupTally::default(),
            group: group::Group::default(),
            blobs: blobs::BlobSync::new(&opts_dir),
            uptos: HashMap::new(),
        };
        let mut orphans = Vec::new();
        for item in st.clients_tree.iter() {
            let (k, v) = item?;
            let name = std::str::from_utf8(&k)
                .ok()
                .and_then(|s| ClientId::new(s).ok());
            let cid: Option<u64> = v.as_ref().try_into().ok().map(u64::from_be_bytes);
            let (Some(name), Some(cid)) = (name, cid) else {
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
            st.install(name, cid, meta);
        }
        for cid in orphans {
            st.write_meta(cid)?;
        }
        for item in st.outbox.scan_prefix([keys::SUB]) {
            let (k, _) = item?;
            if let Some((topic, cid)) = keys::parse_sub(&k) {
                if let Ok(topic) = Topic::new(&topic) {
                    st.subscribers.entry(topic).or_default().insert(cid);
                }
            }
        }
        let pending: u64 = st.clients.values().map(|c| c.meta.pending).sum();
        info!(
            clients = st.clients.len(),
            pending,
            topics = st.subscribers.len(),
            recovered = st.db.was_recovered(),
            "store opened"
        );
        Ok(st)
    }

    fn install(&mut self, name: ClientId, cid: u64, meta: ClientMeta) {
        let (durable, _) = watch::channel(meta.next_seq);
        // Whatever was stored before this start may have been sent before it.
        let handle = Arc::new(OutboxHandle {
            cid,
            name: name.clone(),
            durable,
            sent: AtomicU64::new(meta.next_seq.saturating_sub(1)),
            sends: Default::default(),
        });
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), Arc::clone(&handle));
        self.by_cid.insert(cid, name.clone());
        self.clients.insert(name, ClientState { meta, handle });
    }

    fn write_meta(&mut self, cid: u64) -> Result<(), StoreError> {
        let meta = self.meta_of(cid)?;
        self.outbox.insert(keys::meta(cid), encode(meta)?)?;
        Ok(())
    }

    fn meta_of(&self, cid: u64) -> Result<&ClientMeta, StoreError> {
        self.by_cid
            .get(&cid)
            .and_then(|n| self.clients.get(n))
            .map(|c| &c.meta)
            .ok_or_else(|| StoreError::Corrupt {
                key: format!("client #{cid}"),
                source: CodecError::Empty,
            })
    }

    fn state_mut(&mut self, cid: u64) -> Option<&mut ClientState> {
        let name = self.by_cid.get(&cid)?;
        self.clients.get_mut(name)
    }

    /// Finds or creates the client's outbox. Creation writes the name first, so a client number
    /// on disk always has its name.
    fn ensure_client(&mut self, name: &ClientId) -> Result<u64, StoreError> {
        if let Some(c) = self.clients.get(name) {
            return Ok(c.handle.cid);
        }
        self.check_writable()?;
        let cid = self.next_cid;
        self.next_cid += 1;
        self.clients_tree
            .insert(name.as_str().as_bytes(), &cid.to_be_bytes())?;
        let meta = fresh_meta(name, cid);
        self.outbox.insert(keys::meta(cid), encode(&meta)?)?;
        info!(client = %name, cid, epoch = %meta.epoch, "outbox created");
        self.install(name.clone(), cid, meta);
        self.touched.push(cid);
        Ok(cid)
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        match &self.latch_reason {
            Some(r) => Err(StoreError::Latched(r.clone())),
            None => Ok(()),
        }
    }

    /// The writer loop: gather a group, apply it, commit it, answer it. Returns whether the
    /// store ended latched.
    fn run(mut self, mut rx: mpsc::Receiver<Command>) -> bool {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                error!(error = %e, "store writer cannot start its timer; the store is latched");
                self.latched.store(true, Ordering::Release);
                return true;
            }
        };
        loop {
            let wait = if self.group.writes() > 0 {
                ACK_APPLY_EVERY
                    .saturating_sub(self.applied_at.elapsed())
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
                while group < MAX_GROUP && self.group.writes() < group::MAX_WRITES {
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
                    while group < MAX_GROUP && self.group.writes() < group::MAX_WRITES {
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
                    self.latch(&format!("retention sweep failed: {e}"));
                }
            }
            self.commit();
        }
        self.settle_acks();
        self.commit();
        if self.latch_reason.is_none() {
            if let Err(e) = self.apply_group() {
                self.opts.metrics.store_errors.inc();
                self.latch(&format!("writing acks failed: {e}"));
            }
        }
        if let Some(reason) = &self.latch_reason {
            // After a failed write sled's flush can wait forever (it waits for a write that
            // never completes); nothing after the latch was confirmed, so there is nothing to
            // make durable.
            warn!(reason = %reason, "store latched: skipping the final flush");
        } else if let Err(e) = self.db.flush() {
            error!(error = %e, "final flush failed");
        } else if let Err(e) = self.blobs.sync_new().and_then(|_| self.log.sync_data()) {
            error!(error = %e, "final fsync failed");
        } else if let Err(e) = self
            .seal
            .advance(self.commit_no)
            .and_then(|()| self.seal.sync())
        {
            error!(error = %e, "writing the commit seal failed");
        }
        let per_commit = if self.commits > 0 {
            self.published as f64 / self.commits as f64
        } else {
            0.0
        };
        info!(
            commits = self.commits,
            publishes = self.published,
            publishes_per_commit = format!("{per_commit:.1}"),
            "store closed"
        );
        if self.latch_reason.is_some() {
            // Dropping sled's handles flushes, which after a disk failure can wait forever.
            std::mem::forget(self);
            return true;
        }
        false
    }

    fn latch(&mut self, reason: &str) {
        if self.latch_reason.is_none() {
            error!(
                reason,
                "STORE LATCHED: refusing every write from now on; nothing further is confirmed. \
                 Check the disk, then restart the broker: everything confirmed so far is on disk."
            );
            self.latch_reason = Some(reason.to_string());
            self.latched.store(true, Ordering::Release);
        }
    }

    /// Makes everything applied so far durable, then answers and wakes sessions.
    fn commit(&mut self) {
        if self.pending.is_empty() && self.touched.is_empty() {
            // Nobody waits on this group: acks and retention only. Their writes are held until
            // the group is ACK_APPLY_EVERY old or ACK_APPLY_WRITES large (or join the next
            // commit), then go to the tree and reach the disk with the next commit or sled's
            // background flush; a crash before that means a redelivery, which the contract
            // allows.
            if self.latch_reason.is_some() {
                self.group.discard();
            } else if self.group.writes() >= ACK_APPLY_WRITES
                || self.applied_at.elapsed() >= ACK_APPLY_EVERY
            {
                if let Err(e) = self.apply_group() {
                    self.opts.metrics.store_errors.inc();
                    self.latch(&format!("writing acks failed: {e}"));
                }
            }
            return;
        }
        let tally = std::mem::take(&mut self.tally);
        let result = match &self.latch_reason {
            Some(r) => {
                self.group.discard();
                Err(r.clone())
            }
            None => self
                .number_group()
                .and_then(|()| self.write_group())
                .map_err(|e| format!("writing the commit group failed: {e}"))
                .and_then(|journaled| {
                    if self.opts.durability == Durability::Fsync {
                        self.sync()?;
                    }
                    if journaled.is_some() && self.opts.faults.crash_before_apply(self.commits) {
                        error!("injected crash (OUTBOXD_FAULT_CRASH_BEFORE_APPLY_AFTER)");
                        std::process::abort();
                    }
                    if let Some(writes) = journaled {
                        journal::apply(&self.outbox, writes)
                            .map_err(|e| format!("applying the commit group failed: {e}"))?;
                    }
                    if self.opts.durability == Durability::Fsync {
                        // Only now is commit `commit_no` on disk: the seal may say so.
                        self.seal
                            .advance(self.commit_no)
                            .map_err(|e| format!("writing the commit seal failed: {e}"))?;
                    }
                    Ok(())
                })
                .inspect_err(|_| {
                    self.opts.metrics.store_errors.inc();
                }),
        };
        match result {
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
                for cid in self.touched.drain(..) {
                    if let Some(name) = self.by_cid.get(&cid) {
                        if let Some(c) = self.clients.get(name) {
                            c.handle.durable.send_replace(c.meta.next_seq);
                        }
                    }
                }
                for p in self.pending.drain(..) {
                    p.send();
                }
            }
            Err(reason) => {
                self.latch(&reason);
                self.touched.clear();
                for p in self.pending.drain(..) {
                    p.fail(&reason);
                }
            }
        }
    }

    /// Writes the group gathered so far to the tree as one batch (not yet durable), with the
    /// meta of every client it changed.
    /// Numbers the group about to be committed: record `C` changes with its writes, so the
    /// seal can tell at the next open whether sled recovered it (see `integrity`).
    fn number_group(&mut self) -> Result<(), StoreError> {
        self.commit_no += 1;
        self.group.insert(keys::commit(), encode(&self.commit_no)?);
        Ok(())
    }

    fn apply_group(&mut self) -> Result<(), StoreError> {
        if let Some(writes) = self.take_group()? {
            self.outbox.apply_batch(journal::to_batch(writes))?;
        }
        Ok(())
    }

    /// The commit's write: a small group goes to the journal, and is returned to be applied to
    /// the tree once the commit has synced it; a large one is applied as one batch (see
    /// `journal`). Neither is durable before the sync.
    fn write_group(&mut self) -> Result<Option<group::Writes>, StoreError> {
        let Some(writes) = self.take_group()? else {
            return Ok(None);
        };
        if journal::fits(&writes) {
            journal::write(&self.outbox, &writes)?;
            Ok(Some(writes))
        } else {
            self.outbox.apply_batch(journal::to_batch(writes))?;
            Ok(None)
        }
    }

    /// Adds to the group the idempotency keys it stored, as `dedup::place` puts them, and the
    /// records that list them for retention: `G` for the keys stored one per record, `H` for
    /// the runs, each under the newest time it lists and the group's first message id.
    fn store_dedup_keys(
        &mut self,
        new: std::collections::BTreeMap<Vec<u8>, DedupEntry>,
        id: u64,
    ) -> Result<(), StoreError> {
        let placed = dedup::place(&self.outbox, new)?;
        let mut singles: group::Expiring = Vec::with_capacity(placed.singles.len());
        for (body, entry) in placed.singles {
            self.group.insert(keys::dedup(&body), encode(&entry)?);
            singles.push((entry.ts, body));
        }
        let mut runs: group::Expiring = Vec::with_capacity(placed.runs.len());
        for (body, run) in placed.runs {
            self.group.insert(keys::dedup_run(&body), encode(&run)?);
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

    /// Hands over the group gathered so far, with the meta of every client it changed.
    fn take_group(&mut self) -> Result<Option<group::Writes>, StoreError> {
        self.applied_at = Instant::now();
        if let Some((new, id)) = self.group.take_dedup() {
            if let Err(e) = self.store_dedup_keys(new, id) {
                // The group's messages must not be committed without their keys (a retry would
                // be written twice), and the keys are gone from the group: stop writing.
                self.latch(&format!("storing the group's idempotency keys failed: {e}"));
                return Err(e);
            }
        }
        let Some((mut writes, dirty)) = self.group.take() else {
            return Ok(None);
        };
        for cid in dirty {
            let meta = encode(self.meta_of(cid)?)?;
            writes.insert(sled::IVec::from(&keys::meta(cid)[..]), Some(meta.into()));
        }
        Ok(Some(writes))
    }

    fn sync(&mut self) -> Result<(), String> {
        let started = Instant::now();
        if let Some(e) = self.opts.faults.flush_error(self.commits) {
            return Err(e);
        }
        self.db.flush().map_err(|e| format!("flush failed: {e}"))?;
        if let Some(e) = self.opts.faults.fsync_error(self.commits) {
            return Err(e);
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
        self.opts.metrics.commit_seconds.observe_duration(took);
        debug!(took_us = took.as_micros() as u64, "commit");
        Ok(())
    }

    /// Applies the cumulative acks gathered for `cid`.
    fn settle_acks_of(&mut self, cid: u64) {
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
        if self.latch_reason.is_some() {
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
            Command::Ack { cid, ack } => {
                if self.latch_reason.is_some() {
                    return;
                }
                match ack {
                    Ack::Upto(u) => {
                        let at = self.uptos.entry(cid).or_insert(u);
                        *at = (*at).max(u);
                    }
                    Ack::Seq(_) => {
                        self.settle_acks_of(cid);
                        self.ack_or_latch(cid, ack);
                    }
                }
            }
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
            Command::Backup {
                to,
                data_dir,
                reply,
            } => {
                // Between two writes: the copy is one consistent moment.
                let r = match self.apply_group() {
                    Ok(()) => backup::copy_trees(&self.clients_tree, &self.outbox, &data_dir, &to),
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
        if !matches!(e, StoreError::Latched(_) | StoreError::Closed) {
            self.opts.metrics.store_errors.inc();
        }
    }

    /// Storage-engine failures latch; refusals that are about the request do not.
    fn maybe_latch(&mut self, e: &StoreError) {
        self.count_error(e);
        if matches!(e, StoreError::Sled(_) | StoreError::Io(_)) {
            self.latch(&e.to_string());
        }
    }

    fn count_missed(&self, cid: u64, after: u64) -> Result<u64, StoreError> {
        let lo = keys::seq_key(keys::MISSED, cid, after.saturating_add(1));
        let hi = keys::seq_key(keys::MISSED, cid, u64::MAX);
        let mut n = 0;
        for k in self.outbox.range(lo..=hi).keys() {
            if !self.group.is_removed(&k?) {
                n += 1;
            }
        }
        Ok(n)
    }

    fn hello(
        &mut self,
        client: &ClientId,
        resume: Option<Resume>,
    ) -> Result<HelloOutcome, StoreError> {
        let cid = self.ensure_client(client)?;
        let (epoch, durable_next, acked) = {
            let c = self.state_mut(cid).ok_or(StoreError::Closed)?;
            (c.meta.epoch.clone(), c.durable_next(), c.meta.acked)
        };
        let (resumed, reason, last_seq) = match resume {
            Some(r) if r.epoch != epoch => (false, Some("epoch_mismatch"), acked),
            // Nothing at or past the durable frontier has been sent to anyone.
            Some(r) if r.last_seq >= durable_next => (false, Some("ahead"), acked),
            Some(r) => {
                if self.latch_reason.is_none() {
                    if r.last_seq > acked {
                        self.ack(cid, Ack::Upto(r.last_seq))?;
                    } else {
                        self.drop_tombstones(cid, r.last_seq)?;
                    }
                }
                (true, None, r.last_seq)
            }
            None => (false, None, acked),
        };
        let missed = self.count_missed(cid, if resumed { last_seq } else { 0 })?;
        if self.latch_reason.is_none() {
            if let Some(c) = self.state_mut(cid) {
                c.meta.last_seen = now_ms();
            }
            self.group.touch_meta(cid);
        }
        let c = self.state_mut(cid).ok_or(StoreError::Closed)?;
        Ok(HelloOutcome {
            epoch,
            resumed,
            reason,
            last_seq,
            next_seq: c.meta.next_seq,
            pending: c.meta.pending,
            missed,
            handle: Arc::clone(&c.handle),
        })
    }

    fn publish(&mut self, req: PublishRequest) -> Result<PublishOutcome, StoreError> {
        self.check_writable()?;
        // `published` already counts this publish.
        if let Some(e) = self.opts.faults.write_error(self.published) {
            return Err(StoreError::Io(e));
        }
        let now = now_ms();
        let dedup_body = req
            .key
            .as_ref()
            .map(|k| keys::dedup_body(req.from.as_ref().map(|c| c.as_str()).unwrap_or(""), k));
        if let Some(body) = &dedup_body {
            if let Some(entry) = self.find_dedup(body, now)? {
                return Ok(PublishOutcome {
                    id: format!("{:x}", entry.id),
                    recipients: entry.recipients,
                    duplicate: true,
                    full: Vec::new(),
                });
            }
        }
        let (recipients, topic): (Vec<u64>, Option<String>) = match &req.to {
            Target::Client(name) => (vec![self.ensure_client(name)?], None),
            Target::Topic(t) => (
                self.subscribers
                    .get(t)
                    .map(|s| s.iter().copied().collect())
                    .unwrap_or_default(),
                Some(t.as_str().to_owned()),
            ),
        };
        let id = self.db.generate_id()?;
        let ttl = req
            .ttl_ms
            .filter(|t| *t > 0)
            .or((self.opts.message_ttl_ms > 0).then_some(self.opts.message_ttl_ms));
        let expires_at = ttl.map(|t| now.saturating_add(t)).unwrap_or(0);
        let size = u64::try_from(req.payload.len()).unwrap_or(u64::MAX);
        let record = StoredMessage {
            id,
            ts: now,
            from: req.from.as_ref().map(|c| c.as_str().to_owned()),
            topic,
            payload: match req.payload {
                Payload::Json(s) => StoredPayload::Json(s),
                Payload::Binary(b) => StoredPayload::Binary(b),
            },
            expires_at,
        };
        let body = sled::IVec::from(codec::encode_body(&record).map_err(StoreError::Encode)?);
        let (max_msgs, max_bytes) = (self.opts.max_outbox_messages, self.opts.max_outbox_bytes);
        if max_msgs > 0 || max_bytes > 0 {
            for cid in &recipients {
                self.settle_acks_of(*cid);
            }
        }
        let mut written = 0u64;
        let mut full = Vec::new();
        for cid in recipients {
            let Some(c) = self.state_mut(cid) else {
                continue;
            };
            let m = &mut c.meta;
            let over = (max_msgs > 0 && m.pending >= max_msgs)
                || (max_bytes > 0 && m.bytes.saturating_add(size) > max_bytes);
            if over {
                full.push(c.handle.name.clone());
                continue;
            }
            let seq = m.next_seq;
            m.next_seq += 1;
            m.pending += 1;
            m.bytes += size;
            self.group.append(cid, seq, body.clone());
            if expires_at > 0 {
                self.group.insert(keys::expiry(expires_at, cid, seq), &[]);
            }
            self.group.touch_meta(cid);
            self.touched.push(cid);
            written += 1;
        }
        if written > 0 || matches!(req.to, Target::Topic(_)) {
            if let Some(body) = &dedup_body {
                let entry = DedupEntry {
                    id,
                    ts: now,
                    recipients: written,
                };
                self.group.store_dedup(body, entry);
            }
        }
        // The messages, their metas and the dedup key land in the group's one batch, so they
        // are durable all-or-nothing.
        Ok(PublishOutcome {
            id: format!("{id:x}"),
            recipients: written,
            duplicate: false,
            full,
        })
    }

    /// The entry of an idempotency key (scope + key) stored within the dedup window, from this
    /// group, a record of its own or a run. A key named again after its window has a newer
    /// record of its own beside its old entry, which only retention has yet to delete.
    fn find_dedup(&self, body: &[u8], now: u64) -> Result<Option<DedupEntry>, StoreError> {
        let fresh = |e: &DedupEntry| e.ts.saturating_add(self.opts.dedup_window_ms) > now;
        if let Some(e) = self.group.dedup(body) {
            return Ok(Some(e.clone()));
        }
        let k = keys::dedup(body);
        if let Some(v) = self.outbox.get(&k)? {
            let e: DedupEntry = decode(&k, &v)?;
            if fresh(&e) {
                return Ok(Some(e));
            }
        }
        Ok(dedup::find(&self.outbox, body)?.filter(fresh))
    }

    /// Adds to the group the removal of the tombstones at or below `upto`.
    fn drop_tombstones(&mut self, cid: u64, upto: u64) -> Result<(), StoreError> {
        let range = keys::seq_key(keys::MISSED, cid, 0)..=keys::seq_key(keys::MISSED, cid, upto);
        let found: Vec<sled::IVec> = self.outbox.range(range).keys().collect::<Result<_, _>>()?;
        for k in found {
            if let (Some(seq), false) = (keys::seq_of(&k), self.group.is_removed(&k)) {
                self.group
                    .remove_tombstone(keys::seq_key(keys::MISSED, cid, seq));
            }
        }
        Ok(())
    }

    /// Deletes acked messages and advances the acked watermark. Tombstones of expired messages
    /// are dropped only up to a cumulative position the client stated (`upto`).
    ///
    /// Only messages below the durable frontier can have been sent, so an ack reaches no
    /// further; that also keeps it off the group's own publishes, which the tree does not
    /// show yet. Messages an earlier ack in this group deleted are skipped the same way.
    fn ack(&mut self, cid: u64, ack: Ack) -> Result<(), StoreError> {
        let (acked, durable_next) = match self.state_mut(cid) {
            Some(c) => (c.meta.acked, c.durable_next()),
            None => return Ok(()),
        };
        let last_sent = durable_next.saturating_sub(1);
        let (lo, hi) = match ack {
            Ack::Seq(s) if s > acked && s <= last_sent => (s, s),
            Ack::Upto(u) if u > acked => (acked + 1, u.min(last_sent)),
            _ => return Ok(()),
        };
        if lo > hi {
            return Ok(());
        }
        let mut freed = 0u64;
        let mut freed_bytes = 0u64;
        // Publish times of the deleted messages, for the publish-to-ack histogram.
        let mut published_at = Vec::new();
        let mut next = self.chunk_holding(cid, lo)?;
        while let Some((key, entries)) = next {
            let (gone, keep): (Entries, Entries) = entries
                .into_iter()
                .partition(|(s, _)| (lo..=hi).contains(s));
            if !gone.is_empty() {
                for (seq, body) in &gone {
                    let m = chunks::message(&key, body)?;
                    if m.expires_at > 0 {
                        self.group.remove(keys::expiry(m.expires_at, cid, *seq));
                    }
                    freed_bytes += payload_len(&m.payload);
                    freed += 1;
                    published_at.push(m.ts);
                }
                self.group.put_chunk(key, keep);
            }
            next = match keys::seq_of(&key) {
                Some(at) if at < hi => self.chunk_after(cid, at, hi)?,
                _ => None,
            };
        }
        // The new watermark: just below the first message still stored once the group lands.
        let base = if matches!(ack, Ack::Upto(_)) {
            hi
        } else {
            acked
        };
        let first_left = self.first_stored_after(cid, base, durable_next)?;
        let watermark = first_left
            .map_or(last_sent, |s| s.saturating_sub(1))
            .max(acked);
        // Only a position the client stated (`upto`) says it has moved past a removed message;
        // a watermark that jumps over one after per-seq acks must keep it, or `missed` would
        // never report it.
        if let Ack::Upto(u) = ack {
            self.drop_tombstones(cid, u.min(last_sent))?;
        }
        let Some(c) = self.state_mut(cid) else {
            return Ok(());
        };
        c.meta.pending = c.meta.pending.saturating_sub(freed);
        c.meta.bytes = c.meta.bytes.saturating_sub(freed_bytes);
        c.meta.acked = watermark;
        self.group.touch_meta(cid);
        let m = &self.opts.metrics;
        m.acked.add(freed);
        let now = now_ms();
        for ts in published_at {
            m.publish_to_ack_seconds
                .observe(now.saturating_sub(ts) as f64 / 1000.0);
        }
        Ok(())
    }

    /// The chunk of `cid` that can hold `seq` (greatest key at or below it), as the tree will
    /// hold it once the group is applied.
    fn chunk_holding(&self, cid: u64, seq: u64) -> Result<Option<([u8; 17], Entries)>, StoreError> {
        // A stored chunk the group deleted cannot hold `seq`: any chunk before it ends below it.
        let stored = match chunks::holding(&self.outbox, cid, seq)? {
            Some((k, v)) => self.as_grouped(&k, &v)?,
            None => None,
        };
        let grouped = self.group.last_chunk_in(cid, 0, seq);
        Ok(match (stored, grouped) {
            (Some(s), Some((gk, _))) if s.0 >= gk => Some(s),
            (_, Some((gk, e))) => Some((gk, e.clone())),
            (s, None) => s,
        })
    }

    /// The stored chunk `key` → `value` as the group leaves it: None when the group deleted it.
    fn as_grouped(
        &self,
        key: &[u8],
        value: &sled::IVec,
    ) -> Result<Option<([u8; 17], Entries)>, StoreError> {
        let Ok(k) = <[u8; 17]>::try_from(key) else {
            return Ok(None);
        };
        Ok(match self.group.chunk(key) {
            Some(None) => None,
            Some(Some(e)) => Some((k, e.clone())),
            None => Some((k, chunks::split(key, value)?)),
        })
    }

    /// The first chunk of `cid` with a key in `after+1..=to`, as the tree will hold it once the
    /// group is applied.
    fn chunk_after(
        &self,
        cid: u64,
        after: u64,
        to: u64,
    ) -> Result<Option<([u8; 17], Entries)>, StoreError> {
        if after >= to {
            return Ok(None);
        }
        let lo = keys::seq_key(keys::MSG, cid, after + 1);
        let hi = keys::seq_key(keys::MSG, cid, to);
        let mut stored = None;
        for item in self.outbox.range(lo..=hi) {
            let (k, v) = item?;
            stored = self.as_grouped(&k, &v)?;
            if stored.is_some() {
                break;
            }
        }
        let grouped = self.group.first_chunk_in(cid, after + 1, to);
        Ok(match (stored, grouped) {
            (Some(s), Some((gk, _))) if s.0 <= gk => Some(s),
            (_, Some((gk, e))) => Some((gk, e.clone())),
            (s, None) => s,
        })
    }

    /// The first seq of `cid` stored above `base` and below `end`, once the group is applied.
    fn first_stored_after(&self, cid: u64, base: u64, end: u64) -> Result<Option<u64>, StoreError> {
        let Some(from) = base.checked_add(1).filter(|f| *f < end) else {
            return Ok(None);
        };
        if let Some((_, entries)) = self.chunk_holding(cid, from)? {
            if let Some((s, _)) = entries.iter().find(|(s, _)| *s >= from) {
                return Ok(Some(*s).filter(|s| *s < end));
            }
        }
        // Every message of a later chunk is above `from`: its first is the one.
        Ok(self
            .chunk_after(cid, from, end - 1)?
            .and_then(|(_, e)| e.first().map(|(s, _)| *s))
            .filter(|s| *s < end))
    }

    fn purge(&mut self, client: &ClientId) -> Result<Option<PurgeOutcome>, StoreError> {
        self.check_writable()?;
        let Some(cid) = self.clients.get(client).map(|c| c.handle.cid) else {
            return Ok(None);
        };
        // The scan below must see every message, including this group's.
        self.apply_group()?;
        let mut batch = sled::Batch::default();
        let mut removed = 0u64;
        for item in self.outbox.scan_prefix(keys::seq_prefix(keys::MSG, cid)) {
            let (k, v) = item?;
            for (seq, body) in chunks::split(&k, &v)? {
                let m = chunks::message(&k, &body)?;
                if m.expires_at > 0 {
                    batch.remove(&keys::expiry(m.expires_at, cid, seq));
                }
                batch.insert(&keys::seq_key(keys::MISSED, cid, seq), &[]);
                removed += 1;
            }
            batch.remove(k);
        }
        let Some(c) = self.state_mut(cid) else {
            return Ok(None);
        };
        c.handle.forget_sends(Ack::Upto(u64::MAX));
        c.meta.epoch = new_epoch(cid);
        c.meta.pending = 0;
        c.meta.bytes = 0;
        c.meta.acked = c.meta.next_seq.saturating_sub(1);
        let epoch = c.meta.epoch.clone();
        batch.insert(&keys::meta(cid), encode(&c.meta)?);
        self.outbox.apply_batch(batch)?;
        self.touched.push(cid);
        Ok(Some(PurgeOutcome { removed, epoch }))
    }

    fn subscribe(&mut self, client: &ClientId, topic: &Topic, on: bool) -> Result<(), StoreError> {
        self.check_writable()?;
        let cid = self.ensure_client(client)?;
        let key = keys::sub(topic.as_str(), cid);
        if on {
            let limit = self.opts.max_subscriptions;
            let already = self
                .subscribers
                .get(topic)
                .is_some_and(|s| s.contains(&cid));
            if limit > 0 && !already {
                let held = self
                    .subscribers
                    .values()
                    .filter(|s| s.contains(&cid))
                    .count();
                if held >= usize::try_from(limit).unwrap_or(usize::MAX) {
                    return Err(StoreError::TooManySubscriptions { limit });
                }
            }
            self.outbox.insert(key, &[])?;
            self.subscribers
                .entry(topic.clone())
                .or_default()
                .insert(cid);
        } else {
            self.outbox.remove(key)?;
            if let Some(set) = self.subscribers.get_mut(topic) {
                set.remove(&cid);
                if set.is_empty() {
                    self.subscribers.remove(topic);
                }
            }
        }
        // Any write needs the next commit before the reply.
        self.touched.push(cid);
        Ok(())
    }

    /// Retention: expire messages past their TTL (leaving a tombstone so the client is told)
    /// and forget idempotency keys older than the dedup window. Its writes join the group.
    fn sweep(&mut self) -> Result<(), StoreError> {
        if self.latch_reason.is_some() {
            return Ok(());
        }
        let now = now_ms();
        let horizon = now.saturating_sub(self.opts.dedup_window_ms);
        if self.due_expiries(now)?.is_empty() && !self.any_stale_dedup(horizon)? {
            return Ok(());
        }
        // The scans must not see what this group's acks already deleted.
        self.apply_group()?;
        for (at, cid, seq) in self.due_expiries(now)? {
            self.group.remove(keys::expiry(at, cid, seq));
            let Some((key, mut entries)) = self.chunk_holding(cid, seq)? else {
                continue;
            };
            let Some(i) = entries.iter().position(|(s, _)| *s == seq) else {
                continue;
            };
            let (_, body) = entries.remove(i);
            let m = chunks::message(&key, &body)?;
            self.group.put_chunk(key, entries);
            self.group
                .insert(keys::seq_key(keys::MISSED, cid, seq), &[][..]);
            if let Some(c) = self.state_mut(cid) {
                c.meta.pending = c.meta.pending.saturating_sub(1);
                c.meta.bytes = c.meta.bytes.saturating_sub(payload_len(&m.payload));
                self.group.touch_meta(cid);
            }
            self.opts.metrics.expired.inc();
            info!(
                cid,
                seq, "message expired unacked (TTL); the client will see it in `missed`"
            );
        }
        for (record, listed) in self.stale_dedups(horizon)? {
            for (ts, body) in listed {
                let dk = keys::dedup(&body);
                if let Some(v) = self.outbox.get(&dk)? {
                    let e: DedupEntry = decode(&dk, &v)?;
                    // A later publish under the same key (after the window) owns it now.
                    if e.ts == ts {
                        self.group.remove(dk);
                    }
                }
            }
            self.group.remove(record);
        }
        for (record, listed) in self.stale_lists(keys::DEDUP_RUN_LIST, horizon)?.0 {
            // A run is never rewritten, and no other run can take its key while it exists (that
            // key is inside its range), so the run a list names is the one it listed.
            for (_, body) in listed {
                self.group.remove(keys::dedup_run(&body));
            }
            self.group.remove(record);
        }
        // The tombstones just written must be in the tree for the next hello's `missed` count
        // (the overlay does not show inserts), so this group is not held back.
        self.apply_group()
    }

    /// Expiry entries due at `now`, oldest first (at most [`SWEEP_BATCH`] per sweep).
    fn due_expiries(&self, now: u64) -> Result<Vec<(u64, u64, u64)>, StoreError> {
        let mut due = Vec::new();
        for item in self
            .outbox
            .range([keys::EXPIRY].as_slice()..keys::expiry(now, 0, 0).as_slice())
            .keys()
        {
            if let Some(e) = keys::parse_expiry(&item?) {
                due.push(e);
            }
            if due.len() >= SWEEP_BATCH {
                break;
            }
        }
        Ok(due)
    }

    /// True when some dedup expiry record is older than `horizon`.
    fn any_stale_dedup(&self, horizon: u64) -> Result<bool, StoreError> {
        let mut legacy = vec![keys::DEDUP_EXPIRY];
        legacy.extend_from_slice(&0u64.to_be_bytes());
        let stale = |kind| keys::group_list(kind, 0, 0)..keys::group_list(kind, horizon, 0);
        Ok(self
            .outbox
            .range(stale(keys::DEDUP_LIST))
            .next()
            .transpose()?
            .is_some()
            || self
                .outbox
                .range(stale(keys::DEDUP_RUN_LIST))
                .next()
                .transpose()?
                .is_some()
            || self
                .outbox
                .range(legacy..keys::dedup_expiry(horizon, &[]))
                .next()
                .transpose()?
                .is_some())
    }

    /// A group's dedup lists of one kind (`G` or `H`, see [`keys::group_list`]) older than
    /// `horizon`, listing at most about [`SWEEP_BATCH`] entries and at least one list: each
    /// list's key and what it lists, and how many entries that is. A list names many records,
    /// so the bound is on the entries and one sweep stays short.
    fn stale_lists(
        &self,
        kind: u8,
        horizon: u64,
    ) -> Result<(Vec<(sled::IVec, group::Expiring)>, usize), StoreError> {
        let mut stale = Vec::new();
        let mut listed = 0usize;
        let range = keys::group_list(kind, 0, 0)..keys::group_list(kind, horizon, 0);
        for item in self.outbox.range(range) {
            let (k, v) = item?;
            let entries: group::Expiring = decode(&k, &v)?;
            listed += entries.len();
            stale.push((k, entries));
            if listed >= SWEEP_BATCH {
                break;
            }
        }
        Ok((stale, listed))
    }

    /// Dedup expiry records older than `horizon` (listing at most about [`SWEEP_BATCH`] keys
    /// per sweep, and at least one record): each record's key
    /// and the (time, scope + key) of the idempotency keys it lists. A group's record (`G`)
    /// lists all the keys it stored; data dirs from before hold one `D` record per key.
    fn stale_dedups(&self, horizon: u64) -> Result<Vec<(sled::IVec, group::Expiring)>, StoreError> {
        let (mut stale, keys_listed) = self.stale_lists(keys::DEDUP_LIST, horizon)?;
        if keys_listed >= SWEEP_BATCH {
            return Ok(stale);
        }
        let mut lo = vec![keys::DEDUP_EXPIRY];
        lo.extend_from_slice(&0u64.to_be_bytes());
        let hi = keys::dedup_expiry(horizon, &[]);
        for item in self.outbox.range(lo..hi).keys() {
            let k = item?;
            let ts = k
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes);
            if let (Some(ts), Some(body)) = (ts, k.get(9..)) {
                let listed = vec![(ts, body.to_vec())];
                stale.push((k, listed));
            }
            if keys_listed + stale.len() >= SWEEP_BATCH {
                break;
            }
        }
        Ok(stale)
    }
}

fn payload_len(p: &StoredPayload) -> u64 {
    let n = match p {
        StoredPayload::Json(s) => s.len(),
        StoredPayload::Binary(b) => b.len(),
    };
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn fresh_meta(name: &ClientId, cid: u64) -> ClientMeta {
    ClientMeta {
        name: name.as_str().to_owned(),
        epoch: new_epoch(cid),
        next_seq: 1,
        acked: 0,
        pending: 0,
        bytes: 0,
        last_seen: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_keys_sort_by_client_then_seq() {
        let a = keys::seq_key(keys::MSG, 1, 255);
        let b = keys::seq_key(keys::MSG, 1, 256);
        let c = keys::seq_key(keys::MSG, 2, 0);
        assert!(a < b && b < c);
        assert_eq!(keys::seq_of(&b), Some(256));
    }

    #[test]
    fn no_client_prefix_is_a_prefix_of_another() {
        // Fixed-width numbers: client 1's range never contains client 256's keys.
        let p1 = keys::seq_prefix(keys::MSG, 1);
        let k256 = keys::seq_key(keys::MSG, 256, 1);
        assert!(!k256.starts_with(&p1));
    }

    #[test]
    fn subscription_keys_round_trip_and_do_not_collide() {
        let k = keys::sub("news", 7);
        assert_eq!(keys::parse_sub(&k), Some(("news".into(), 7)));
        // "news" and "news/eu" differ in the length byte, so one is no prefix of the other.
        assert!(!keys::sub("news/eu", 7).starts_with(&keys::sub_prefix("news")));
    }

    fn options(dir: &Path) -> StoreOptions {
        StoreOptions {
            data_dir: dir.to_path_buf(),
            durability: Durability::Fsync,
            group_commit_max_delay: Duration::ZERO,
            cache_capacity_bytes: 16 << 20,
            max_outbox_messages: 0,
            max_outbox_bytes: 0,
            max_subscriptions: 0,
            message_ttl_ms: 0,
            dedup_window_ms: 50,
            faults: Faults::default(),
            metrics: Arc::new(Metrics::default()),
        }
    }

    fn old_message(seq: u64) -> StoredMessage {
        StoredMessage {
            id: seq,
            ts: 1,
            from: None,
            topic: None,
            payload: StoredPayload::Json(format!("\"old {seq}\"")),
            expires_at: 0,
        }
    }

    /// A data dir as brokers wrote it before chunks: bob (client 1) with messages 1..=3 stored
    /// one per key, and an idempotency key with its own `D` expiry record.
    fn write_data_dir_of_one_record_per_message(dir: &Path) {
        let db = sled_config(dir).open().unwrap();
        let clients = db.open_tree("clients").unwrap();
        let outbox = db.open_tree("outbox").unwrap();
        clients.insert("bob", &1u64.to_be_bytes()).unwrap();
        let meta = ClientMeta {
            name: "bob".into(),
            epoch: "e0".into(),
            next_seq: 4,
            acked: 0,
            pending: 3,
            bytes: 3 * payload_len(&old_message(1).payload),
            last_seen: 0,
        };
        outbox
            .insert(keys::meta(1), codec::encode(&meta).unwrap())
            .unwrap();
        for seq in 1..=3 {
            let m = codec::encode(&old_message(seq)).unwrap();
            outbox.insert(keys::seq_key(keys::MSG, 1, seq), m).unwrap();
        }
        let body = keys::dedup_body("", "k-old");
        let entry = DedupEntry {
            id: 1,
            ts: 1,
            recipients: 1,
        };
        outbox
            .insert(keys::dedup(&body), codec::encode(&entry).unwrap())
            .unwrap();
        outbox.insert(keys::dedup_expiry(1, &body), &[]).unwrap();
        db.flush().unwrap();
    }

    fn seqs(b: ReadBatch) -> Vec<u64> {
        b.items.iter().map(|d| d.seq).collect()
    }

    fn kinds(store: &Store, kind: u8) -> usize {
        store.outbox.scan_prefix([kind]).count()
    }

    #[test]
    fn a_data_dir_of_one_record_per_message_is_served_acked_and_swept_beside_chunks() {
        let dir = tempfile::tempdir().unwrap();
        write_data_dir_of_one_record_per_message(dir.path());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (store, writer) = Store::open(options(dir.path())).unwrap();
            let bob = ClientId::new("bob").unwrap();
            let hello = store.hello(bob.clone(), None).await.unwrap();
            assert_eq!((hello.pending, hello.next_seq), (3, 4));
            let h = &hello.handle;
            assert_eq!(seqs(store.read(h, 0, 10).unwrap()), vec![1, 2, 3]);
            assert_eq!(store.get(h, 2).unwrap(), Some(old_message(2)));

            // New messages go to one chunk beside the old records; acks reach both kinds.
            let publish = |key: &str| PublishRequest {
                from: None,
                to: Target::Client(bob.clone()),
                payload: Payload::Json(format!("\"{key}\"")),
                key: Some(key.to_owned()),
                ttl_ms: None,
            };
            let mut waits = Vec::new();
            for key in ["n4", "n5", "n6", "n7"] {
                waits.push(store.submit_publish(publish(key)).await.unwrap());
            }
            for w in waits {
                assert!(!w.await.unwrap().unwrap().duplicate);
            }
            assert_eq!(
                seqs(store.read(h, 0, 10).unwrap()),
                vec![1, 2, 3, 4, 5, 6, 7]
            );
            for seq in [2, 4, 5, 7] {
                store.ack(h, Ack::Seq(seq)).await.unwrap();
            }
            // A hello settles the client's acks before it answers.
            let again = store.hello(bob.clone(), None).await.unwrap();
            // 1 is still unacked, so the acked watermark stays put.
            assert_eq!((again.pending, again.last_seq), (3, 0));
            let h = &again.handle;
            assert_eq!(seqs(store.read(h, 0, 10).unwrap()), vec![1, 3, 6]);
            assert_eq!(store.get(h, 6).unwrap().map(|m| m.id > 0), Some(true));
            assert_eq!(store.get(h, 5).unwrap(), None);
            assert_eq!(store.read(h, 3, 10).unwrap().items[0].seq, 6);

            // Retention forgets idempotency keys of both record kinds once the window passes.
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert_eq!(
                kinds(&store, keys::DEDUP),
                0,
                "every idempotency key expired"
            );
            assert_eq!(kinds(&store, keys::DEDUP_EXPIRY), 0);
            assert_eq!(kinds(&store, keys::DEDUP_LIST), 0);
            assert_eq!(kinds(&store, keys::DEDUP_RUN), 0);
            assert_eq!(kinds(&store, keys::DEDUP_RUN_LIST), 0);

            store.ack(h, Ack::Upto(6)).await.unwrap();
            let last = store.hello(bob, None).await.unwrap();
            // 7 was acked alone before, so nothing is left and the watermark passes it.
            assert_eq!((last.pending, last.last_seq), (0, 7));
            assert!(store.read(&last.handle, 0, 10).unwrap().items.is_empty());
            let totals = store.outbox_totals().unwrap();
            assert_eq!((totals.pending_messages, totals.pending_bytes), (0, 0));
            // The hello's commit applied the acks: no message record is left behind.
            assert_eq!(kinds(&store, keys::MSG), 0);
            drop(store);
            assert!(!writer.join());
        });
    }

    #[test]
    fn idempotency_keys_in_runs_and_records_answer_retries_until_their_window_passes() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut opts = options(dir.path());
            opts.dedup_window_ms = 300;
            let (store, writer) = Store::open(opts).unwrap();
            let bob = ClientId::new("bob").unwrap();
            let alice = ClientId::new("alice").unwrap();
            let publish = |key: &str| PublishRequest {
                from: Some(alice.clone()),
                to: Target::Client(bob.clone()),
                payload: Payload::Json(format!("\"{key}\"")),
                key: Some(key.to_owned()),
                ttl_ms: None,
            };
            let send_all = |keys: Vec<String>| {
                let store = &store;
                let publish = &publish;
                async move {
                    let mut waits = Vec::new();
                    for k in &keys {
                        waits.push(store.submit_publish(publish(k)).await.unwrap());
                    }
                    let mut out = Vec::new();
                    for w in waits {
                        out.push(w.await.unwrap().unwrap());
                    }
                    out
                }
            };
            // Numbered keys, queued together: runs, not a record per key.
            let numbered: Vec<String> = (10..60).map(|i| format!("k{i}")).collect();
            let first = send_all(numbered.clone()).await;
            assert!(first.iter().all(|o| !o.duplicate));
            assert!(kinds(&store, keys::DEDUP_RUN) >= 1);
            assert!(
                kinds(&store, keys::DEDUP_RUN) < 50,
                "numbered keys share records"
            );
            assert_eq!(kinds(&store, keys::DEDUP), 0);
            // Keys inside a run's range that it does not hold get records of their own.
            let between: Vec<String> = store
                .outbox
                .scan_prefix([keys::DEDUP_RUN])
                .map(|r| {
                    let (k, v) = r.unwrap();
                    codec::decode::<codec::DedupRun>(&v)
                        .map(|run| (k, run))
                        .unwrap()
                })
                .filter(|(_, run)| run.entries.len() >= 2)
                .map(|(_, run)| format!("{}a", String::from_utf8(run.first).unwrap()))
                .collect();
            assert!(!between.is_empty(), "some run holds several keys");
            let inside = send_all(between.clone()).await;
            assert!(inside.iter().all(|o| !o.duplicate));
            assert_eq!(kinds(&store, keys::DEDUP), between.len());
            // Every retry, from a run or a record, is answered with the first publish's id.
            let mut retry = numbered.clone();
            retry.extend(between.iter().cloned());
            let again = send_all(retry).await;
            let mut was = first.clone();
            was.extend(inside);
            for (a, b) in again.iter().zip(&was) {
                assert!(a.duplicate, "retry of {} was not a duplicate", b.id);
                assert_eq!((&a.id, a.recipients), (&b.id, 1));
            }
            let w = store.hello(bob.clone(), None).await.unwrap();
            assert_eq!(
                w.pending,
                (numbered.len() + between.len()) as u64,
                "nothing was written twice"
            );

            // Once the window has passed, retention forgets them all and a key is new again.
            tokio::time::sleep(Duration::from_millis(800)).await;
            for kind in [
                keys::DEDUP,
                keys::DEDUP_LIST,
                keys::DEDUP_RUN,
                keys::DEDUP_RUN_LIST,
            ] {
                assert_eq!(kinds(&store, kind), 0, "kind {}", kind as char);
            }
            let late = send_all(vec!["k20".into()]).await;
            assert!(!late[0].duplicate);
            assert_ne!(late[0].id, first[10].id);
            drop(store);
            assert!(!writer.join());
        });
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Publishes this many messages to bob at once (they share commit groups and records).
        Publish(usize),
        /// Acks one seq / everything up to a seq, picked among those published so far.
        AckSeq(usize),
        AckUpto(usize),
        /// A hello (which settles bob's acks), then a comparison with the model.
        Check,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (1usize..150).prop_map(Op::Publish),
            any::<usize>().prop_map(Op::AckSeq),
            any::<usize>().prop_map(Op::AckUpto),
            Just(Op::Check),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// The store against a model (a set of seqs): whatever the order of per-seq and
        /// cumulative acks, and however the messages fall into records, what is stored,
        /// counted and read back is exactly what was published and not acked.
        #[test]
        fn stored_messages_are_exactly_those_published_and_not_acked(
            ops in proptest::collection::vec(op(), 1..30)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (store, writer) = Store::open(options(dir.path())).unwrap();
                let bob = ClientId::new("bob").unwrap();
                let mut h = store.hello(bob.clone(), None).await.unwrap().handle;
                let mut model = std::collections::BTreeSet::new();
                let mut next = 1u64;
                let check = |store: &Store, h: &OutboxHandle, model: &std::collections::BTreeSet<u64>, pending: u64| {
                    let want: Vec<u64> = model.iter().copied().collect();
                    assert_eq!(pending, want.len() as u64);
                    assert_eq!(seqs(store.read(h, 0, 100_000).unwrap()), want);
                    for s in want.iter().take(3).chain(want.iter().rev().take(3)) {
                        let m = store.get(h, *s).unwrap().expect("a stored seq reads back");
                        assert_eq!(m.payload, StoredPayload::Json(format!("{s}")));
                    }
                };
                for op in ops {
                    match op {
                        Op::Publish(n) => {
                            let mut waits = Vec::new();
                            for _ in 0..n {
                                let req = PublishRequest {
                                    from: None,
                                    to: Target::Client(bob.clone()),
                                    payload: Payload::Json(format!("{next}")),
                                    key: None,
                                    ttl_ms: None,
                                };
                                model.insert(next);
                                next += 1;
                                waits.push(store.submit_publish(req).await.unwrap());
                            }
                            for w in waits {
                                w.await.unwrap().unwrap();
                            }
                        }
                        Op::AckSeq(i) if next > 1 => {
                            let s = 1 + (i as u64) % (next - 1);
                            model.remove(&s);
                            store.ack(&h, Ack::Seq(s)).await.unwrap();
                        }
                        Op::AckUpto(i) if next > 1 => {
                            let u = 1 + (i as u64) % (next - 1);
                            model.retain(|s| *s > u);
                            store.ack(&h, Ack::Upto(u)).await.unwrap();
                        }
                        Op::AckSeq(_) | Op::AckUpto(_) => {}
                        Op::Check => {
                            let w = store.hello(bob.clone(), None).await.unwrap();
                            h = w.handle;
                            check(&store, &h, &model, w.pending);
                        }
                    }
                }
                let w = store.hello(bob.clone(), None).await.unwrap();
                check(&store, &w.handle, &model, w.pending);
                assert_eq!(kinds(&store, keys::JOURNAL), 0, "no journal record outlives its commit");
                drop(store);
                assert!(!writer.join());
            });
        }
    }

    #[test]
    fn expiry_keys_sort_by_time() {
        let a = keys::expiry(10, 9, 9);
        let b = keys::expiry(11, 1, 1);
        assert!(a < b);
        assert_eq!(keys::parse_expiry(&a), Some((10, 9, 9)));
    }
}
