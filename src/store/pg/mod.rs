//! The PostgreSQL engine behind the store's boundary (`storage.backend = "postgres"`): several
//! brokers share one database, and a confirmed message is as safe as the database's commit
//! (with a synchronous standby: on two machines).
//!
//! The same promise as sled's, with COMMIT as the barrier: a publish is confirmed, and a
//! message is sent, only after the COMMIT that wrote it returned. One writer per broker
//! (`writer`) gathers commands into commit groups, one transaction each, locking the outboxes'
//! meta rows at once in client-number order so brokers never deadlock one another. Groups of
//! acks alone commit with `synchronous_commit = off`: a lost ack only means a redelivery.
//!
//! What sled keeps in memory for one process is shared state here, so each broker learns of
//! the others' writes (`wake`): after a commit the writer sends every other broker that serves
//! a recipient one notification (outside the data transaction), and every broker also re-reads
//! the outboxes of its connected clients every `postgres.recheck_ms`, so a lost notification
//! only delays. A hello takes the outbox over: it raises the outbox's connection generation
//! (`conn_gen`) in the database; reads and acks of an older generation are refused, and the
//! broker that held the older connection is told to close it.
//!
//! The one hole PostgreSQL leaves: a wait for the synchronous standby that is cancelled leaves
//! the commit on the primary alone, and the server only warns. The writer never cancels its
//! statements, and treats that warning like a failed fsync: the store latches.
//!
//! Inside: `schema` (tables and migrations), `writer` (the commit groups), `wake` (wake-ups
//! and takeovers between brokers); this file holds the connections and the reads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls, Statement};
use tracing::{error, info, warn};

use super::summary::{OutboxListing, OutboxSummary, StoreStats, TopicSubscribers};
use super::writer::QUEUE_DEPTH;
use super::{Delivery, Engine, Handles, OutboxHandle, OutboxTotals, Store, StoreError};
use super::{StoreOptions, Writer};
use crate::model::{ClientId, Payload};

mod acks;
mod hello;
mod locks;
mod pending;
mod prepared;
mod publish;
mod purge;
mod retention;
mod schema;
mod wake;
mod writer;

pub(super) use schema::SCHEMA_VERSION;

/// The outboxes this broker has live handles for, by client number (the listener's and the
/// writer's way from a notification or a commit to the handle).
#[derive(Default)]
pub(super) struct Live {
    by_cid: Mutex<HashMap<u64, Arc<OutboxHandle>>>,
}

impl Live {
    fn get(&self, cid: u64) -> Option<Arc<OutboxHandle>> {
        self.by_cid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&cid)
            .cloned()
    }

    /// The handle of `cid`, made (and listed in `handles`) when this broker has none yet, with
    /// every seq up to `sent` counted as possibly sent before.
    fn get_or_make(
        &self,
        handles: &Handles,
        cid: u64,
        name: &ClientId,
        next_seq: u64,
        sent: u64,
    ) -> Arc<OutboxHandle> {
        let mut by_cid = self.by_cid.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = by_cid.get(&cid) {
            return Arc::clone(h);
        }
        // The writer here does not hand over fresh messages: an empty budget.
        let h = OutboxHandle::new(cid, name.clone(), next_seq, super::fresh::Budget::new(0));
        h.sent.store(sent, Ordering::Relaxed);
        let h = Arc::new(h);
        by_cid.insert(cid, Arc::clone(&h));
        handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), Arc::clone(&h));
        h
    }

    /// Forgets the handle of a deleted outbox.
    fn remove(&self, handles: &Handles, cid: u64, name: &ClientId) {
        self.by_cid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&cid);
        handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// Handles some connection of this broker watches now.
    fn watched(&self) -> Vec<Arc<OutboxHandle>> {
        self.by_cid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|h| h.durable.receiver_count() > 0)
            .cloned()
            .collect()
    }
}

/// The database's address and this broker's name in it, shared by every connection.
#[derive(Clone)]
pub(super) struct Target {
    pub(super) config: tokio_postgres::Config,
    /// This broker's name in the database (`outboxd_clients.node`, its notification channel).
    pub(super) node: Arc<str>,
}

/// What a connection does with what the server sends on its own.
#[derive(Clone)]
enum OnMessage {
    /// A warning that a wait for synchronous replication was cancelled latches the store.
    Writer(Arc<AtomicBool>),
    /// Notifications go to the listener.
    Listener(mpsc::UnboundedSender<String>),
    Reader,
}

/// True for the server's warning that a commit did not wait for its synchronous standby.
fn unreplicated(notice: &tokio_postgres::error::DbError) -> bool {
    notice.message().contains("synchronous replication")
}

/// Opens one connection and drives it on the current runtime.
async fn connect(target: &Target, on: OnMessage) -> Result<Client, tokio_postgres::Error> {
    let (client, mut conn) = target.config.connect(NoTls).await?;
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notice(n))) => match &on {
                    OnMessage::Writer(latched) if unreplicated(&n) => {
                        latched.store(true, Ordering::Release);
                        error!(
                            notice = n.message(),
                            detail = n.detail().unwrap_or(""),
                            "a commit was not confirmed by the synchronous standby: it may be on \
                             the primary alone. The store refuses writes from now on; restart \
                             the broker once the database is sound"
                        );
                    }
                    _ => info!(notice = n.message(), "database notice"),
                },
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if let OnMessage::Listener(tx) = &on {
                        let _ = tx.send(n.payload().to_owned());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    warn!(error = %e, "database connection lost");
                    break;
                }
                None => break,
            }
        }
    });
    Ok(client)
}

/// A database error as the store reports it.
pub(super) fn failed(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Database(format!("{} ({})", db.message(), db.code().code())),
        None => StoreError::Database(e.to_string()),
    }
}

/// One read connection and its prepared statements.
struct ReadConn {
    client: Client,
    read: Statement,
}

/// A few read connections, used in turn, each reopened when it broke. A connection serves
/// many reads at once (tokio-postgres pipelines them).
struct Pool {
    target: Target,
    slots: Vec<tokio::sync::Mutex<Option<Arc<ReadConn>>>>,
    next: AtomicUsize,
    read_timeout_ms: u64,
}

/// Messages of one outbox from `$2` up to before `$3`, at most `$4`, with the outbox's
/// connection generation (one row with NULL message columns when none is stored).
const READ: &str = "SELECT c.conn_gen, m.seq, m.id, m.ts, m.sender, m.topic, m.is_json, m.body, \
       m.expires_at \
     FROM outboxd_clients c LEFT JOIN LATERAL ( \
       SELECT * FROM outboxd_messages WHERE cid = c.cid AND seq >= $2 AND seq < $3 \
       ORDER BY seq LIMIT $4) m ON true \
     WHERE c.cid = $1";

impl Pool {
    async fn get(&self) -> Result<Arc<ReadConn>, StoreError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len().max(1);
        let Some(slot) = self.slots.get(i) else {
            return Err(StoreError::Closed);
        };
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.client.is_closed()) {
            return Ok(Arc::clone(c));
        }
        let client = connect(&self.target, OnMessage::Reader)
            .await
            .map_err(failed)?;
        if self.read_timeout_ms > 0 {
            client
                .batch_execute(&format!("SET statement_timeout = {}", self.read_timeout_ms))
                .await
                .map_err(failed)?;
        }
        let read = client.prepare(READ).await.map_err(failed)?;
        let c = Arc::new(ReadConn { client, read });
        *slot = Some(Arc::clone(&c));
        Ok(c)
    }
}

/// What the store's reads need of the database; cheap to clone.
#[derive(Clone)]
pub(super) struct Reads {
    pool: Arc<Pool>,
    unavailable: Arc<AtomicBool>,
}

/// A database error as the driver reports it.
type Pg = tokio_postgres::Error;

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored message row (columns `seq, id, ts, sender, topic, is_json, body, expires_at`
/// from `at`) as the store hands it out; None when the row holds no message.
fn delivery(row: &tokio_postgres::Row, at: usize) -> Result<Option<Delivery>, StoreError> {
    let get = |e: tokio_postgres::Error| failed(e);
    let Some(seq) = row.try_get::<_, Option<i64>>(at).map_err(get)? else {
        return Ok(None);
    };
    let body: Vec<u8> = row.try_get(at + 6).map_err(get)?;
    let payload = if row.try_get::<_, bool>(at + 5).map_err(get)? {
        Payload::Json(String::from_utf8(body).map_err(|_| StoreError::Corrupt {
            key: format!("outboxd_messages seq {seq}"),
            source: crate::codec::CodecError::Empty,
        })?)
    } else {
        Payload::Binary(body)
    };
    let expires: i64 = row.try_get(at + 7).map_err(get)?;
    Ok(Some(Delivery {
        seq: u(seq),
        id: format!("{:x}", u(row.try_get(at + 1).map_err(get)?)),
        ts: u(row.try_get(at + 2).map_err(get)?),
        from: row.try_get(at + 3).map_err(get)?,
        topic: row.try_get(at + 4).map_err(get)?,
        payload,
        expires_at: (expires > 0).then_some(u(expires)),
    }))
}

impl Reads {
    /// Messages of outbox `cid` from `start` up to before `end`, at most `limit`, for the
    /// connection of `generation`.
    pub(super) async fn read(
        &self,
        cid: u64,
        generation: u64,
        start: u64,
        end: u64,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        let c = self.pool.get().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = c
            .client
            .query(&c.read, &[&i(cid), &i(start), &i(end), &limit])
            .await
            .map_err(failed)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let current: i64 = row.try_get(0).map_err(failed)?;
            if u(current) > generation {
                return Err(StoreError::Superseded);
            }
            if let Some(d) = delivery(row, 1)? {
                out.push(d);
            }
        }
        Ok(out)
    }

    pub(super) async fn totals(&self) -> Result<OutboxTotals, StoreError> {
        let c = self.pool.get().await?;
        let row = c
            .client
            .query_one(
                "SELECT count(*), coalesce(sum(pending), 0)::bigint, \
                   coalesce(sum(bytes), 0)::bigint, coalesce(max(pending), 0), \
                   coalesce(max(bytes), 0) FROM outboxd_clients",
                &[],
            )
            .await
            .map_err(failed)?;
        Ok(OutboxTotals {
            outboxes: u(row.try_get(0).map_err(failed)?),
            pending_messages: u(row.try_get(1).map_err(failed)?),
            pending_bytes: u(row.try_get(2).map_err(failed)?),
            max_pending_messages: u(row.try_get(3).map_err(failed)?),
            max_pending_bytes: u(row.try_get(4).map_err(failed)?),
        })
    }

    pub(super) fn is_unavailable(&self) -> bool {
        self.unavailable.load(Ordering::Acquire)
    }

    /// Every client with an outbox (or one, by name), in name order.
    pub(super) async fn clients(
        &self,
        one: Option<&str>,
    ) -> Result<Vec<OutboxSummary>, StoreError> {
        let c = self.pool.get().await?;
        let rows = c
            .client
            .query(
                "SELECT c.name, c.epoch, c.pending, c.bytes, c.next_seq, c.acked, c.last_seen, \
                   (SELECT min(ts) FROM outboxd_messages m WHERE m.cid = c.cid), \
                   coalesce((SELECT array_agg(topic ORDER BY topic) FROM outboxd_subs s \
                     WHERE s.cid = c.cid), '{}') \
                 FROM outboxd_clients c WHERE $1::text IS NULL OR c.name = $1 ORDER BY c.name",
                &[&one],
            )
            .await
            .map_err(failed)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let last_seen: i64 = r.try_get(6).map_err(failed)?;
            out.push(OutboxSummary {
                client_id: r.try_get(0).map_err(failed)?,
                epoch: r.try_get(1).map_err(failed)?,
                pending: u(r.try_get(2).map_err(failed)?),
                bytes: u(r.try_get(3).map_err(failed)?),
                next_seq: u(r.try_get(4).map_err(failed)?),
                acked: u(r.try_get(5).map_err(failed)?),
                oldest_unacked_ts: r.try_get::<_, Option<i64>>(7).map_err(failed)?.map(u),
                last_seen: (last_seen > 0).then_some(u(last_seen)),
                subscriptions: r.try_get(8).map_err(failed)?,
            });
        }
        Ok(out)
    }

    /// Up to `limit` stored messages of `client` from `from`; None when it has no outbox.
    pub(super) async fn outbox(
        &self,
        client: &str,
        from: u64,
        limit: usize,
    ) -> Result<Option<OutboxListing>, StoreError> {
        let c = self.pool.get().await?;
        let Some(row) = c
            .client
            .query_opt(
                "SELECT cid, epoch FROM outboxd_clients WHERE name = $1",
                &[&client],
            )
            .await
            .map_err(failed)?
        else {
            return Ok(None);
        };
        let cid: i64 = row.try_get(0).map_err(failed)?;
        let epoch: String = row.try_get(1).map_err(failed)?;
        let take = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
        let rows = c
            .client
            .query(&c.read, &[&cid, &i(from), &i64::MAX, &take])
            .await
            .map_err(failed)?;
        let mut messages = Vec::new();
        for r in &rows {
            if let Some(d) = delivery(r, 1)? {
                messages.push(d);
            }
        }
        let next_from = (messages.len() > limit).then(|| messages[limit].seq);
        messages.truncate(limit);
        Ok(Some(OutboxListing {
            client_id: client.to_owned(),
            epoch,
            messages,
            next_from,
        }))
    }

    /// Every topic with a subscriber, in name order.
    pub(super) async fn topics(&self) -> Result<Vec<TopicSubscribers>, StoreError> {
        let c = self.pool.get().await?;
        let rows = c
            .client
            .query(
                "SELECT s.topic, array_agg(c.name ORDER BY c.name) FROM outboxd_subs s \
                 JOIN outboxd_clients c USING (cid) GROUP BY s.topic ORDER BY s.topic",
                &[],
            )
            .await
            .map_err(failed)?;
        rows.iter()
            .map(|r| {
                Ok(TopicSubscribers {
                    topic: r.try_get(0).map_err(failed)?,
                    subscribers: r.try_get(1).map_err(failed)?,
                })
            })
            .collect()
    }

    /// Totals over the database's outboxes.
    pub(super) async fn stats(&self) -> Result<StoreStats, StoreError> {
        let clients = self.clients(None).await?;
        let topics = self.topics().await?;
        let c = self.pool.get().await?;
        let row = c
            .client
            .query_one(
                "SELECT current_database(), \
                   (SELECT coalesce(sum(pg_total_relation_size(oid)), 0)::bigint \
                      FROM pg_class WHERE relname LIKE 'outboxd\\_%' AND relkind IN ('r', 'm')), \
                   (SELECT coalesce(sum(octet_length(body)), 0)::bigint FROM outboxd_messages)",
                &[],
            )
            .await
            .map_err(failed)?;
        let db: String = row.try_get(0).map_err(failed)?;
        Ok(StoreStats {
            data_dir: format!("postgres:{db}").into(),
            format_version: SCHEMA_VERSION,
            clients: clients.len() as u64,
            topics: topics.len() as u64,
            subscriptions: topics.iter().map(|t| t.subscribers.len() as u64).sum(),
            pending_messages: clients.iter().map(|c| c.pending).sum(),
            pending_bytes: clients.iter().map(|c| c.bytes).sum(),
            max_pending_messages: clients.iter().map(|c| c.pending).max().unwrap_or(0),
            max_pending_bytes: clients.iter().map(|c| c.bytes).max().unwrap_or(0),
            oldest_message_ts: clients.iter().filter_map(|c| c.oldest_unacked_ts).min(),
            live_bytes: u(row.try_get(2).map_err(failed)?),
            disk_bytes: u(row.try_get(1).map_err(failed)?),
        })
    }
}

/// The database's address from `postgres.url`, with the settings every connection shares.
fn target(opts: &StoreOptions) -> Result<Target, StoreError> {
    let mut config: tokio_postgres::Config = opts
        .postgres
        .url
        .parse()
        .map_err(|e| StoreError::BadUrl(format!("{e}")))?;
    config.connect_timeout(Duration::from_millis(opts.postgres.connect_timeout_ms));
    config.application_name("outboxd");
    let node: Arc<str> = format!("{:016x}", fastrand::u64(..)).into();
    Ok(Target { config, node })
}

/// Read connections for a tool without a broker (inspect), on a runtime of their own; checks
/// that the database holds outboxd's tables.
pub(super) fn offline(opts: &StoreOptions) -> Result<(Reads, tokio::runtime::Runtime), StoreError> {
    let target = target(opts)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reads = Reads {
        pool: Arc::new(Pool {
            target,
            slots: vec![tokio::sync::Mutex::new(None)],
            next: AtomicUsize::new(0),
            read_timeout_ms: opts.postgres.read_timeout_ms,
        }),
        unavailable: Arc::new(AtomicBool::new(false)),
    };
    rt.block_on(async {
        let c = reads.pool.get().await?;
        let found: Option<String> = c
            .client
            .query_one("SELECT to_regclass('outboxd_clients')::text", &[])
            .await
            .map_err(failed)?
            .try_get(0)
            .map_err(failed)?;
        match found {
            Some(_) => Ok(()),
            None => Err(StoreError::Database(
                "this database holds no outboxd store (no outboxd_clients table); check \
                 postgres.url"
                    .into(),
            )),
        }
    })?;
    Ok((reads, rt))
}

/// `outboxd migrate`: brings the database of `opts` to this broker's schema (what every broker
/// also does at start). Returns the version it is at now.
pub fn migrate(opts: &StoreOptions) -> Result<u8, StoreError> {
    with_migrated(opts, |_| async { Ok(SCHEMA_VERSION) })
}

/// Runs `work` for a tool without a broker, on a runtime of its own, with one connection to
/// the database of `opts` whose schema is migrated first.
fn with_migrated<T, F>(opts: &StoreOptions, work: impl FnOnce(Client) -> F) -> Result<T, StoreError>
where
    F: std::future::Future<Output = Result<T, StoreError>>,
{
    let target = target(opts)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut client = connect(&target, OnMessage::Reader).await.map_err(failed)?;
        schema::migrate(&mut client).await?;
        work(client).await
    })
}

/// `outboxd repair --accept-loss` on PostgreSQL: every outbox moves to a new epoch (after a
/// loss the broker cannot see: a point-in-time recovery, a failover to a standby that was not
/// synchronous). Returns how many outboxes moved.
pub fn accept_loss(opts: &StoreOptions) -> Result<u64, StoreError> {
    with_migrated(opts, |mut client| async move {
        schema::new_epochs(&mut client).await
    })
}

/// What `outboxd import` copied.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Imported {
    pub outboxes: u64,
    pub messages: u64,
    pub tombstones: u64,
    pub subscriptions: u64,
}

/// `outboxd import`: copies what `from` (a sled data directory) holds into the empty
/// PostgreSQL database of `opts`, in one transaction, keeping every outbox's epoch, seqs,
/// acked position, stored messages, tombstones and subscriptions, so clients resume there.
///
/// Errors: the database already holds outboxes; a read of `from` or a statement fails.
pub fn import(
    opts: &StoreOptions,
    from: &super::Inspector,
    progress: &mut dyn FnMut(&Imported),
) -> Result<Imported, StoreError> {
    with_migrated(opts, |mut client| async move {
        let tx = client.transaction().await.map_err(failed)?;
        tx.execute("LOCK TABLE outboxd_clients IN EXCLUSIVE MODE", &[])
            .await
            .map_err(failed)?;
        let held: i64 = tx
            .query_one("SELECT count(*) FROM outboxd_clients", &[])
            .await
            .map_err(failed)?
            .try_get(0)
            .map_err(failed)?;
        if held > 0 {
            return Err(StoreError::Database(format!(
                "the database already holds {held} outboxes: import only into an empty one"
            )));
        }
        let mut done = Imported::default();
        let mut max_id = 0u64;
        for c in from.clients()? {
            let cid: i64 = tx
                .query_one(
                    "INSERT INTO outboxd_clients                        (name, epoch, next_seq, acked, pending, bytes, last_seen)                      VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING cid",
                    &[
                        &c.client_id,
                        &c.epoch,
                        &i(c.next_seq),
                        &i(c.acked),
                        &i(c.pending),
                        &i(c.bytes),
                        &i(c.last_seen.unwrap_or(0)),
                    ],
                )
                .await
                .map_err(failed)?
                .try_get(0)
                .map_err(failed)?;
            let mut from_seq = 0;
            loop {
                let Some(page) = from.outbox(&c.client_id, from_seq, 1000)? else {
                    break;
                };
                let mut rows = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                let mut more = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for m in &page.messages {
                    let id = u64::from_str_radix(&m.id, 16).unwrap_or(0);
                    max_id = max_id.max(id);
                    let (is_json, body) = match &m.payload {
                        Payload::Json(s) => (true, s.as_bytes().to_vec()),
                        Payload::Binary(b) => (false, b.clone()),
                    };
                    rows.0.push(i(m.seq));
                    rows.1.push(i(id));
                    rows.2.push(i(m.ts));
                    rows.3.push(m.from.clone());
                    more.0.push(m.topic.clone());
                    more.1.push(is_json);
                    more.2.push(body);
                    more.3.push(i(m.expires_at.unwrap_or(0)));
                    more.4.push(cid);
                }
                tx.execute(
                    "INSERT INTO outboxd_messages                        (cid, seq, id, ts, sender, topic, is_json, body, expires_at)                      SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[],                        $4::bigint[], $5::text[], $6::text[], $7::boolean[], $8::bytea[],                        $9::bigint[])",
                    &[
                        &more.4, &rows.0, &rows.1, &rows.2, &rows.3, &more.0, &more.1,
                        &more.2, &more.3,
                    ],
                )
                .await
                .map_err(failed)?;
                done.messages += page.messages.len() as u64;
                progress(&done);
                match page.next_from {
                    Some(n) => from_seq = n,
                    None => break,
                }
            }
            let missed: Vec<i64> = from.missed(&c.client_id)?.into_iter().map(i).collect();
            done.tombstones += missed.len() as u64;
            tx.execute(
                "INSERT INTO outboxd_missed SELECT $1, unnest($2::bigint[])",
                &[&cid, &missed],
            )
            .await
            .map_err(failed)?;
            done.subscriptions += c.subscriptions.len() as u64;
            tx.execute(
                "INSERT INTO outboxd_subs SELECT unnest($2::text[]), $1",
                &[&cid, &c.subscriptions],
            )
            .await
            .map_err(failed)?;
            done.outboxes += 1;
            progress(&done);
        }
        // New message ids stay above every copied one.
        tx.execute(
            "SELECT setval('outboxd_message_id', $1)",
            &[&i(max_id.saturating_add(1))],
        )
        .await
        .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        Ok(done)
    })
}

/// Connects, applies the schema's migrations, and starts the writer thread (which also runs
/// the listener for wake-ups). Blocking: it waits for the writer's first connection.
pub(super) fn open(opts: StoreOptions) -> Result<(Store, Writer), StoreError> {
    let target = target(&opts)?;
    let latched = Arc::new(AtomicBool::new(false));
    let unavailable = Arc::new(AtomicBool::new(false));
    let handles = Handles::default();
    let live = Arc::new(Live::default());
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let writer = writer::PgWriter::new(
        target.clone(),
        opts.clone(),
        Arc::clone(&live),
        Arc::clone(&handles),
        Arc::clone(&latched),
        Arc::clone(&unavailable),
    );
    let thread = std::thread::Builder::new()
        .name("outboxd-writer".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = started_tx.send(Err(StoreError::Io(e)));
                    return true;
                }
            };
            rt.block_on(writer.run(rx, started_tx))
        })?;
    match started_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(e);
        }
        Err(_) => {
            let _ = thread.join();
            return Err(StoreError::Closed);
        }
    }
    info!(node = %target.node, "PostgreSQL store open");
    let pool = Pool {
        target,
        slots: (0..opts.postgres.pool_size.max(1))
            .map(|_| tokio::sync::Mutex::new(None))
            .collect(),
        next: AtomicUsize::new(0),
        read_timeout_ms: opts.postgres.read_timeout_ms,
    };
    Ok((
        Store {
            tx,
            latched,
            handles,
            engine: Engine::Postgres(Reads {
                pool: Arc::new(pool),
                unavailable,
            }),
        },
        Writer {
            thread: Some(thread),
        },
    ))
}
