//! Read-only views of the stored outboxes, for the admin API and `outboxd inspect`.
//!
//! The views are the store's own values ([`OutboxSummary`], [`OutboxListing`],
//! [`TopicSubscribers`], [`StoreStats`]); what an operator is shown of them, and how, is
//! `crate::views`'s business.
//!
//! An [`Inspector`] reads the same trees the writer writes, and never writes. A running broker
//! hands one out over its open db ([`super::Store::inspector`]). Offline, on a data directory no
//! broker holds, [`Inspector::open_offline`] first proves the directory is free (sled's own
//! lock, tested without taking it for writing), then opens a private copy: sled has no
//! read-only mode and may rewrite files while it recovers, so opening the original could change
//! it. The copy is removed when the inspector is dropped.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, info};

use super::bodies::{self, Segments};
use super::engine::{remove_stale_snapshots, sled_config};
use super::records::decode;
use super::records::delivery;
pub use super::summary::{OutboxListing, OutboxSummary, StoreStats, TopicSubscribers};
use super::{chunks, keys, StoreError};
use crate::codec::{ClientMeta, StoredMessage, FORMAT_VERSION};

/// A read-only view of the stored outboxes: of one sled data directory, or of a PostgreSQL
/// database through a running broker's read connections.
pub struct Inspector(Source);

enum Source {
    Sled(SledView),
    /// A broker's read connections, or (offline) the tool's own, on a runtime of its own.
    Postgres(super::pg::Reads, Option<tokio::runtime::Runtime>),
}

/// Runs a read of the PostgreSQL engine from blocking code (the inspector's callers run it off
/// the runtime, on a blocking thread).
fn wait<T>(
    own: &Option<tokio::runtime::Runtime>,
    read: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match own {
        Some(rt) => rt.block_on(read),
        None => match tokio::runtime::Handle::try_current() {
            Ok(rt) => rt.block_on(read),
            Err(_) => Err(StoreError::Closed),
        },
    }
}

impl Inspector {
    pub(super) fn over(
        dir: PathBuf,
        db: sled::Db,
        clients: sled::Tree,
        outbox: sled::Tree,
        bodies: Arc<Segments>,
    ) -> Self {
        Inspector(Source::Sled(SledView {
            dir,
            clients,
            outbox,
            bodies,
            _db: db,
            _copy: None,
        }))
    }

    pub(super) fn over_postgres(reads: super::pg::Reads) -> Self {
        Inspector(Source::Postgres(reads, None))
    }

    /// Opens the PostgreSQL database of `opts` for reading, without a broker (`outboxd
    /// inspect` with `storage.backend = "postgres"`). Never writes to it.
    pub fn open_postgres(opts: &super::StoreOptions) -> Result<Inspector, StoreError> {
        let (reads, rt) = super::pg::offline(opts)?;
        Ok(Inspector(Source::Postgres(reads, Some(rt))))
    }

    /// Opens `data_dir` for reading while no broker runs on it. Never writes to `data_dir`.
    ///
    /// Errors: [`StoreError::Locked`] when a running broker holds it, [`StoreError::Open`] when
    /// it is not an outboxd data directory.
    pub fn open_offline(data_dir: &Path) -> Result<Inspector, StoreError> {
        SledView::open_offline(data_dir).map(|v| Inspector(Source::Sled(v)))
    }

    /// Every client with an outbox, in name order.
    pub fn clients(&self) -> Result<Vec<OutboxSummary>, StoreError> {
        match &self.0 {
            Source::Sled(v) => v.clients(),
            Source::Postgres(r, rt) => wait(rt, r.clients(None)),
        }
    }

    /// One client, or None when it has no outbox.
    pub fn client(&self, client: &str) -> Result<Option<OutboxSummary>, StoreError> {
        match &self.0 {
            Source::Sled(v) => v.client(client),
            Source::Postgres(r, rt) => Ok(wait(rt, r.clients(Some(client)))?.pop()),
        }
    }

    /// Up to `limit` stored messages of `client` with seq >= `from`, in seq order; None when the
    /// client has no outbox.
    pub fn outbox(
        &self,
        client: &str,
        from: u64,
        limit: usize,
    ) -> Result<Option<OutboxListing>, StoreError> {
        match &self.0 {
            Source::Sled(v) => v.outbox(client, from, limit),
            Source::Postgres(r, rt) => wait(rt, r.outbox(client, from, limit)),
        }
    }

    /// The tombstones of `client`'s outbox: seqs removed unacked (expired, purged) that its
    /// client has not been told of yet; empty when it has no outbox.
    pub fn missed(&self, client: &str) -> Result<Vec<u64>, StoreError> {
        match &self.0 {
            Source::Sled(v) => v.missed(client),
            Source::Postgres(..) => Err(StoreError::Unsupported {
                what: "listing tombstones",
                backend: "postgres",
                instead: "read outboxd_missed",
            }),
        }
    }

    /// Every topic with at least one subscriber, in name order.
    pub fn topics(&self) -> Result<Vec<TopicSubscribers>, StoreError> {
        match &self.0 {
            Source::Sled(v) => v.topics(),
            Source::Postgres(r, rt) => wait(rt, r.topics()),
        }
    }

    /// Writes a copy of what this inspector sees to the new directory `to`, which must lie
    /// outside the directory it reads ([`StoreError::BackupInsideDataDir`]).
    pub fn backup(&self, to: &Path) -> Result<super::BackupOutcome, StoreError> {
        match &self.0 {
            Source::Sled(v) => v.backup(to),
            Source::Postgres(..) => Err(StoreError::Unsupported {
                what: "a backup by outboxd",
                backend: "postgres",
                instead: "back up the database with pg_dump; see docs/scale-out.md",
            }),
        }
    }

    /// Totals over the store.
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        match &self.0 {
            Source::Sled(v) => v.stats(),
            Source::Postgres(r, rt) => wait(rt, r.stats()),
        }
    }
}

/// A read-only view of one sled data directory.
struct SledView {
    dir: PathBuf,
    clients: sled::Tree,
    outbox: sled::Tree,
    /// The body log's segments.
    bodies: Arc<Segments>,
    /// Kept open for the trees' sake.
    _db: sled::Db,
    /// The private copy an offline inspector reads; removed on drop.
    _copy: Option<tempfile::TempDir>,
}

impl SledView {
    fn open_offline(data_dir: &Path) -> Result<SledView, StoreError> {
        let db_file = data_dir.join("db");
        if !db_file.is_file() {
            return Err(StoreError::Open {
                path: data_dir.to_path_buf(),
                reason: "no outboxd store here (no `db` file); check --data or storage.data_dir"
                    .into(),
            });
        }
        if held_by_another_process(&db_file)? {
            return Err(StoreError::Locked {
                path: data_dir.to_path_buf(),
            });
        }
        let started = Instant::now();
        let copy = tempfile::Builder::new()
            .prefix("outboxd-inspect-")
            .tempdir()?;
        // sled's files only: the body log is append-only and read in place.
        let bytes = copy_dir(data_dir, copy.path(), Some(bodies::DIR))?;
        debug!(
            bytes,
            took_ms = started.elapsed().as_millis() as u64,
            "data dir copied for inspection"
        );
        remove_stale_snapshots(copy.path())?;
        super::integrity::check_conf(copy.path()).map_err(|d| StoreError::Damaged {
            path: data_dir.to_path_buf(),
            damage: d,
        })?;
        let opened = super::integrity::guarded("recovering it", || sled_config(copy.path()).open())
            .map_err(|d| StoreError::Damaged {
                path: data_dir.to_path_buf(),
                damage: d,
            })?;
        let db = opened.map_err(|e| match e {
            sled::Error::Corruption { .. } => StoreError::Damaged {
                path: data_dir.to_path_buf(),
                damage: super::integrity::Damage(format!("sled cannot recover it: {e}")),
            },
            e => StoreError::Open {
                path: data_dir.to_path_buf(),
                reason: e.to_string(),
            },
        })?;
        let clients = db.open_tree("clients")?;
        let outbox = db.open_tree("outbox")?;
        let damaged = |d: super::integrity::Damage| StoreError::Damaged {
            path: data_dir.to_path_buf(),
            damage: d,
        };
        // Into the private copy: the body log is only read.
        match super::journal::recover(data_dir, &db) {
            Err(e @ StoreError::Corrupt { .. }) => {
                return Err(damaged(super::integrity::Damage(e.to_string())))
            }
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        // Counts from a store that lost records would be shown as if true.
        super::integrity::check_seal(copy.path(), &outbox)?.map_err(damaged)?;
        // The bodies are read where they are: no broker runs, so nothing deletes them.
        let bodies = Segments::open(data_dir, false)?;
        super::integrity::verify(&clients, &outbox, &bodies).map_err(damaged)?;
        info!(dir = %data_dir.display(), "data dir opened read-only (a private copy)");
        Ok(SledView {
            dir: data_dir.to_path_buf(),
            clients,
            outbox,
            bodies,
            _db: db,
            _copy: Some(copy),
        })
    }

    fn cid_of(&self, client: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .clients
            .get(client.as_bytes())?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes))
    }

    fn meta(&self, cid: u64) -> Result<Option<ClientMeta>, StoreError> {
        let k = keys::meta(cid);
        match self.outbox.get(k)? {
            Some(v) => Ok(Some(decode(&k, &v)?)),
            None => Ok(None),
        }
    }

    fn oldest(&self, cid: u64) -> Result<Option<StoredMessage>, StoreError> {
        match self
            .outbox
            .scan_prefix(keys::seq_prefix(keys::MSG, cid))
            .next()
        {
            Some(item) => {
                let (k, v) = item?;
                match chunks::split(&k, &v)?.first() {
                    Some((_, body)) => chunks::message(&k, body, &*self.bodies),
                    None => Ok(None),
                }
            }
            None => Ok(None),
        }
    }

    fn missed(&self, client: &str) -> Result<Vec<u64>, StoreError> {
        let Some(cid) = self.cid_of(client)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for k in self
            .outbox
            .scan_prefix(keys::seq_prefix(keys::MISSED, cid))
            .keys()
        {
            if let Some(seq) = keys::seq_of(&k?) {
                out.push(seq);
            }
        }
        Ok(out)
    }

    /// Every subscription, as client number -> topics.
    fn subscriptions(&self) -> Result<HashMap<u64, Vec<String>>, StoreError> {
        let mut by_cid: HashMap<u64, Vec<String>> = HashMap::new();
        for item in self.outbox.scan_prefix([keys::SUB]).keys() {
            if let Some((topic, cid)) = keys::parse_sub(&item?) {
                by_cid.entry(cid).or_default().push(topic);
            }
        }
        Ok(by_cid)
    }

    fn view(
        &self,
        name: String,
        cid: u64,
        subs: &mut HashMap<u64, Vec<String>>,
    ) -> Result<Option<OutboxSummary>, StoreError> {
        let Some(meta) = self.meta(cid)? else {
            return Ok(None);
        };
        let oldest = self.oldest(cid)?;
        Ok(Some(OutboxSummary {
            client_id: name,
            epoch: meta.epoch,
            pending: meta.pending,
            bytes: meta.bytes,
            next_seq: meta.next_seq,
            acked: meta.acked,
            oldest_unacked_ts: oldest.map(|m| m.ts),
            last_seen: (meta.last_seen > 0).then_some(meta.last_seen),
            subscriptions: subs.remove(&cid).unwrap_or_default(),
        }))
    }

    /// Every client with an outbox, in name order.
    fn clients(&self) -> Result<Vec<OutboxSummary>, StoreError> {
        let mut subs = self.subscriptions()?;
        let mut out = Vec::new();
        for item in self.clients.iter() {
            let (k, v) = item?;
            let (Ok(name), Ok(cid)) = (std::str::from_utf8(&k), <[u8; 8]>::try_from(v.as_ref()))
            else {
                continue;
            };
            if let Some(view) = self.view(name.to_owned(), u64::from_be_bytes(cid), &mut subs)? {
                out.push(view);
            }
        }
        Ok(out)
    }

    /// One client, or None when it has no outbox.
    fn client(&self, client: &str) -> Result<Option<OutboxSummary>, StoreError> {
        let Some(cid) = self.cid_of(client)? else {
            return Ok(None);
        };
        let mut subs = self.subscriptions()?;
        self.view(client.to_owned(), cid, &mut subs)
    }

    /// Up to `limit` stored messages of `client` with seq >= `from`, in seq order; None when the
    /// client has no outbox.
    fn outbox(
        &self,
        client: &str,
        from: u64,
        limit: usize,
    ) -> Result<Option<OutboxListing>, StoreError> {
        let Some(cid) = self.cid_of(client)? else {
            return Ok(None);
        };
        let Some(meta) = self.meta(cid)? else {
            return Ok(None);
        };
        let mut found = chunks::read(
            &self.outbox,
            &*self.bodies,
            cid,
            from,
            u64::MAX,
            limit.saturating_add(1),
        )?;
        let next_from = (found.len() > limit).then(|| found[limit].0);
        found.truncate(limit);
        let messages = found.into_iter().map(|(seq, m)| delivery(seq, m)).collect();
        Ok(Some(OutboxListing {
            client_id: client.to_owned(),
            epoch: meta.epoch,
            messages,
            next_from,
        }))
    }

    /// Every topic with at least one subscriber, in name order.
    fn topics(&self) -> Result<Vec<TopicSubscribers>, StoreError> {
        let mut names: HashMap<u64, String> = HashMap::new();
        for item in self.clients.iter() {
            let (k, v) = item?;
            if let (Ok(name), Ok(cid)) = (std::str::from_utf8(&k), <[u8; 8]>::try_from(v.as_ref()))
            {
                names.insert(u64::from_be_bytes(cid), name.to_owned());
            }
        }
        let mut topics: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for item in self.outbox.scan_prefix([keys::SUB]).keys() {
            if let Some((topic, cid)) = keys::parse_sub(&item?) {
                let who = names
                    .get(&cid)
                    .cloned()
                    .unwrap_or_else(|| format!("#{cid}"));
                topics.entry(topic).or_default().push(who);
            }
        }
        Ok(topics
            .into_iter()
            .map(|(topic, mut subscribers)| {
                subscribers.sort();
                TopicSubscribers { topic, subscribers }
            })
            .collect())
    }

    /// Writes a copy of what this inspector sees to the new directory `to`, which must lie
    /// outside the directory it reads ([`StoreError::BackupInsideDataDir`]).
    fn backup(&self, to: &Path) -> Result<super::BackupOutcome, StoreError> {
        super::backup::copy_trees(&self.clients, &self.outbox, &*self.bodies, &self.dir, to)
    }

    /// Totals over the directory.
    fn stats(&self) -> Result<StoreStats, StoreError> {
        let clients = self.clients()?;
        let topics = self.topics()?;
        let mut live_bytes = 0u64;
        for tree in [&self.clients, &self.outbox] {
            for item in tree.iter() {
                let (k, v) = item?;
                live_bytes += (k.len() + v.len()) as u64;
                // What the record refers to in the body log (a body once per outbox holding it).
                let refs = match k.first() {
                    Some(&keys::MSG) => chunks::refs(&k, &v)?,
                    Some(&keys::DEDUP_RUN) => bodies::decode_place(&v)
                        .map(|(r, _)| r)
                        .into_iter()
                        .collect(),
                    _ => Vec::new(),
                };
                live_bytes += refs.iter().map(|r| u64::from(r.len)).sum::<u64>();
            }
        }
        Ok(StoreStats {
            data_dir: self.dir.clone(),
            format_version: FORMAT_VERSION,
            clients: clients.len() as u64,
            topics: topics.len() as u64,
            subscriptions: topics.iter().map(|t| t.subscribers.len() as u64).sum(),
            pending_messages: clients.iter().map(|c| c.pending).sum(),
            pending_bytes: clients.iter().map(|c| c.bytes).sum(),
            max_pending_messages: clients.iter().map(|c| c.pending).max().unwrap_or(0),
            max_pending_bytes: clients.iter().map(|c| c.bytes).max().unwrap_or(0),
            oldest_message_ts: clients.iter().filter_map(|c| c.oldest_unacked_ts).min(),
            live_bytes,
            disk_bytes: dir_size(&self.dir)?,
        })
    }
}

/// True when another open file description holds sled's lock on `db_file`. Opens the file
/// read-only and only probes the lock, so the directory is not changed.
fn held_by_another_process(db_file: &Path) -> Result<bool, StoreError> {
    let f = std::fs::File::open(db_file)?;
    match f.try_lock() {
        Ok(()) => {
            f.unlock()?;
            Ok(false)
        }
        Err(std::fs::TryLockError::WouldBlock) => Ok(true),
        Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
    }
}

/// Copies the files under `from` into `to`; returns the bytes copied.
fn copy_dir(from: &Path, to: &Path, skip: Option<&str>) -> Result<u64, StoreError> {
    let mut total = 0;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if skip.is_some_and(|s| entry.file_name() == s) {
            continue;
        }
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            std::fs::create_dir_all(&target)?;
            total += copy_dir(&entry.path(), &target, None)?;
        } else if kind.is_file() {
            total += std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(total)
}

/// Bytes the files under `dir` take.
pub(crate) fn dir_size(dir: &Path) -> Result<u64, StoreError> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            total += dir_size(&entry.path())?;
        } else if kind.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}
