//! The PostgreSQL writer: this broker's one owner of writes to the database. It gathers the
//! commands queued while the last commit ran into a group, applies them in arrival order in one
//! transaction, commits, and only then answers each command and moves the durable frontiers of
//! the outboxes it wrote.
//!
//! > a publish is confirmed, and a message is sent, only after the COMMIT that wrote it.
//!
//! A group first locks the meta row of every outbox it will touch, in one statement and in
//! client-number order, so writers of several brokers wait for one another but never deadlock
//! (each statement of a group locking in order is not enough). A run of publishes is then
//! written with a handful of prepared statements whatever its size (arrays through `unnest`).
//! Acks are applied at their place in the group; a group of acks alone commits with
//! `synchronous_commit = off` (a lost ack only means a redelivery). Retention (TTL, dedup
//! window) runs every [`SWEEP_EVERY`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::{Client, Statement, Transaction};
use tracing::{debug, info, warn};

use super::schema::{check_cluster, migrate, ID_BLOCK};
use super::{connect, failed, i, u, Live, OnMessage, Target};
use crate::model::{now_ms, Ack, ClientId, Payload, Resume, Target as To, Topic};
use crate::store::records::fingerprint;
use crate::store::writer::{Command, Reply};
use crate::store::{Handles, HelloOutcome, PublishOutcome, PublishRequest};
use crate::store::{PurgeOutcome, ResumeRefused, StoreError, StoreOptions};

/// How often retention looks for expired messages (as often as sled's); idempotency keys are
/// forgotten every [`DEDUP_SWEEP_EVERY`] passes.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
const DEDUP_SWEEP_EVERY: u32 = 10;
/// The most commands one commit group takes.
const MAX_GROUP: usize = 4096;
/// A group stops taking commands once it wrote this many messages (as sled's does), so a
/// pipelined fan-out never piles up into one huge transaction; the rest waits for the next.
const MAX_WRITES: u64 = 50_000;
/// Publishes written with one set of statements.
const PUBLISH_CHUNK: usize = 256;
/// The most messages (or idempotency keys) one retention pass removes.
const SWEEP_BATCH: i64 = 10_000;
/// How long the writer waits before it tries an unreachable database again.
const RECONNECT_AFTER: Duration = Duration::from_millis(200);

type Pg = tokio_postgres::Error;

/// An answer held back until the commit that covers it.
enum Pending {
    Hello(Reply<HelloOutcome>, Result<HelloDone, StoreError>),
    Publish(Reply<PublishOutcome>, Result<PublishOutcome, StoreError>),
    Subscribe(Reply<()>, Result<(), StoreError>),
    Purge(
        Reply<Option<PurgeOutcome>>,
        Result<Option<Purged>, StoreError>,
    ),
    Delete(Reply<Option<u64>>, Result<Option<Deleted>, StoreError>),
    Forget(Reply<bool>, Result<Option<Deleted>, StoreError>),
    Settle(Reply<()>),
}

/// A hello as the transaction left it; the handle is made once it committed.
struct HelloDone {
    cid: u64,
    name: ClientId,
    epoch: String,
    resumed: bool,
    reason: Option<ResumeRefused>,
    last_seq: u64,
    next_seq: u64,
    pending: u64,
    missed: u64,
    generation: u64,
    /// The broker that held the client before, when another one: it is told to let go.
    previous: Option<String>,
    /// Whether any broker ever served this client before.
    ever_connected: bool,
}

struct Purged {
    cid: u64,
    outcome: PurgeOutcome,
    /// The broker that last held the client's connection, and the generation that ends it.
    holder: Option<String>,
    generation: u64,
}

/// A delete as the transaction left it.
struct Deleted {
    cid: u64,
    name: ClientId,
    removed: u64,
    holder: Option<String>,
    generation: u64,
}

/// What a commit group did that others must learn of once it committed.
#[derive(Default)]
struct Effects {
    /// Outboxes written, with their new `next_seq`.
    advanced: BTreeMap<u64, u64>,
    /// Wake-ups for other brokers: node → (client number → next_seq).
    wake: HashMap<String, BTreeMap<u64, u64>>,
    /// Publishes, messages stored and duplicates, for the metrics.
    published: u64,
    stored: u64,
    duplicates: u64,
}

/// What a commit group will touch, read from its commands before the transaction begins.
#[derive(Default)]
struct Touches {
    /// Names whose outbox the group makes when missing (hello, subscribe, direct publish).
    make: Vec<ClientId>,
    /// Names the group only acts on when they have an outbox (purge, delete, forget).
    find: BTreeSet<ClientId>,
    /// Topics the group publishes to.
    topics: BTreeSet<Topic>,
    /// Client numbers known already (acks).
    cids: BTreeSet<u64>,
}

impl Touches {
    fn of(work: &[Command]) -> Touches {
        let mut t = Touches::default();
        let mut make = BTreeSet::new();
        for cmd in work {
            match cmd {
                Command::Hello { client, .. } | Command::Subscribe { client, .. } => {
                    make.insert(client.clone());
                }
                Command::Publish { req, .. } => match &req.to {
                    To::Client(n) => {
                        make.insert(n.clone());
                    }
                    To::Topic(topic) => {
                        t.topics.insert(topic.clone());
                    }
                },
                Command::Purge { client, .. }
                | Command::Delete { client, .. }
                | Command::Forget { client, .. } => {
                    t.find.insert(client.clone());
                }
                Command::Ack { cid, .. } => {
                    t.cids.insert(*cid);
                }
                Command::Backup { .. } | Command::Settle { .. } => {}
            }
        }
        t.make = make.into_iter().collect();
        t
    }
}

/// Acks of one outbox waiting for the next ack transaction.
struct AckBatch {
    generation: u64,
    durable_next: u64,
    upto: Option<u64>,
    seqs: Vec<u64>,
}

/// The writer's state; lives on its own thread's runtime.
pub(super) struct PgWriter {
    target: Target,
    client: Option<Client>,
    /// The hot statements, prepared on `client` (once the schema is there).
    prepared: Option<Arc<Prepared>>,
    /// The schema is migrated: statements on it can be prepared.
    migrated: bool,
    opts: StoreOptions,
    live: Arc<Live>,
    handles: Handles,
    latched: Arc<AtomicBool>,
    unavailable: Arc<AtomicBool>,
    /// Client numbers by name (a name's number never changes).
    cids: HashMap<ClientId, u64>,
    /// Commands a full group left for the next one, in arrival order.
    carry: Vec<Command>,
    /// Message ids left in the block this broker took.
    ids: std::ops::Range<u64>,
    /// Retention passes so far.
    sweeps: u32,
}

impl PgWriter {
    pub(super) fn new(
        target: Target,
        opts: StoreOptions,
        live: Arc<Live>,
        handles: Handles,
        latched: Arc<AtomicBool>,
        unavailable: Arc<AtomicBool>,
    ) -> Self {
        PgWriter {
            target,
            client: None,
            prepared: None,
            migrated: false,
            opts,
            live,
            handles,
            latched,
            unavailable,
            cids: HashMap::new(),
            carry: Vec::new(),
            ids: 0..0,
            sweeps: 0,
        }
    }

    /// Connects and migrates (telling `started` how that went), then serves the queue until
    /// every sender is gone. Returns true when the store ended latched.
    pub(super) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        started: std::sync::mpsc::Sender<Result<(), StoreError>>,
    ) -> bool {
        let first = match self.connection().await {
            Ok(client) => match migrate(client).await {
                Ok(()) => match check_cluster(client).await {
                    Ok(()) => Prepared::on(client).await.map_err(failed),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let first = first.map(|p| {
            self.prepared = Some(Arc::new(p));
            self.migrated = true;
        });
        let ok = first.is_ok();
        let _ = started.send(first);
        if !ok {
            return false;
        }
        let listener = tokio::spawn(super::wake::listen(
            self.target.clone(),
            Arc::clone(&self.live),
            self.opts.postgres.recheck_ms,
        ));
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut group = std::mem::take(&mut self.carry);
            if group.is_empty() {
                let first = tokio::select! {
                    cmd = rx.recv() => match cmd {
                        Some(c) => c,
                        None => break,
                    },
                    _ = sweep.tick() => {
                        self.sweep().await;
                        continue;
                    }
                };
                group.push(first);
            }
            let delay = Duration::from_micros(self.opts.group_commit_max_delay.as_micros() as u64);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(c) => group.push(c),
                    Err(_) => break,
                }
            }
            self.apply(group).await;
        }
        listener.abort();
        let latched = self.latched.load(Ordering::Acquire);
        info!(latched, "PostgreSQL writer stopped");
        latched
    }

    /// The writer's connection, opened when there is none (or it broke).
    async fn connection(&mut self) -> Result<&mut Client, StoreError> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
            self.prepared = None;
        }
        if self.client.is_none() {
            let on = OnMessage::Writer(Arc::clone(&self.latched));
            match connect(&self.target, on).await {
                Ok(c) => {
                    // Never a timeout on the writer's statements, whatever the role's defaults
                    // say: a cancelled wait for the synchronous standby leaves the commit on
                    // the primary alone.
                    if let Err(e) = c
                        .batch_execute(
                            "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0",
                        )
                        .await
                    {
                        tokio::time::sleep(RECONNECT_AFTER).await;
                        return Err(failed(e));
                    }
                    if self.migrated {
                        match Prepared::on(&c).await {
                            Ok(p) => self.prepared = Some(Arc::new(p)),
                            Err(e) => {
                                tokio::time::sleep(RECONNECT_AFTER).await;
                                return Err(failed(e));
                            }
                        }
                    }
                    if self.unavailable.swap(false, Ordering::AcqRel) {
                        info!("database reachable again");
                    }
                    self.client = Some(c);
                }
                Err(e) => {
                    if !self.unavailable.swap(true, Ordering::AcqRel) {
                        warn!(error = %e, "cannot reach the database: nothing is confirmed until it is back");
                    }
                    tokio::time::sleep(RECONNECT_AFTER).await;
                    return Err(failed(e));
                }
            }
        }
        self.client.as_mut().ok_or(StoreError::Closed)
    }

    /// A statement failed: a broken connection is dropped (and reopened for the next group).
    fn broke(&mut self, e: &Pg) {
        if e.as_db_error().is_none() || self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
            self.prepared = None;
            if !self.unavailable.swap(true, Ordering::AcqRel) {
                warn!(error = %e, "lost the database connection: nothing is confirmed until it is back");
            }
        }
    }

    /// Applies one group in one transaction, then answers.
    async fn apply(&mut self, group: Vec<Command>) {
        let mut work = Vec::with_capacity(group.len());
        for cmd in group {
            match cmd {
                Command::Backup { reply, .. } => {
                    let _ = reply.send(Err(StoreError::Unsupported {
                        what: "a backup by outboxd",
                        backend: "postgres",
                        instead: "back up the database with pg_dump (or your PostgreSQL \
                                  setup's base backups and WAL archive); see docs/scale-out.md",
                    }));
                }
                other => work.push(other),
            }
        }
        if work.is_empty() {
            return;
        }
        // A group of acks alone commits without waiting for the disk or a standby: a lost ack
        // only means a redelivery.
        let relaxed = work.iter().all(|c| matches!(c, Command::Ack { .. }));
        let latched = self.latched.load(Ordering::Acquire);
        let mut fx = Effects::default();
        let result = match self.connection().await {
            Ok(_) => self.transaction(work, latched, relaxed, &mut fx).await,
            // Nothing was applied: every command is refused with the reason.
            Err(e) => Err((e, work_into_pending(work))),
        };
        let (pending, outcome) = match result {
            Ok(p) => (p, Ok(())),
            Err((e, p)) => (p, Err(e)),
        };
        // A commit that did not wait for its standby latched the store on the way.
        let latched_now = self.latched.load(Ordering::Acquire);
        match outcome {
            Ok(()) if relaxed => {}
            // Latched before this group: its writes were refused already, and its hellos are
            // answered from what is committed.
            Ok(()) if !latched_now || latched => self.committed(pending, fx).await,
            Ok(()) => {
                let why = "a commit was not confirmed by the synchronous standby".to_string();
                for p in pending {
                    p.fail(&StoreError::Latched(why.clone()));
                }
            }
            Err(e) => {
                self.opts.metrics.store_errors.inc();
                warn!(error = %e, commands = pending.len(), "commit group failed: nothing of it is confirmed");
                for p in pending {
                    p.fail(&e);
                }
            }
        }
    }

    /// Runs the group's commands in one transaction and commits it. On a failure nothing is
    /// confirmed: the error comes back with every answer, to be refused.
    async fn transaction(
        &mut self,
        work: Vec<Command>,
        latched: bool,
        relaxed: bool,
        fx: &mut Effects,
    ) -> Result<Vec<Pending>, (StoreError, Vec<Pending>)> {
        // Taken out so the transaction can borrow it while `self` is used too.
        let (Some(mut client), Some(prepared)) = (self.client.take(), self.prepared.clone()) else {
            return Err((StoreError::Closed, work_into_pending(work)));
        };
        let result = self
            .in_transaction(&mut client, &prepared, work, latched, relaxed, fx)
            .await;
        self.client = Some(client);
        match result {
            Ok(p) => Ok(p),
            Err((e, p)) => {
                self.broke(&e);
                // Names learnt in a rolled-back transaction may not exist.
                self.cids.clear();
                Err((failed(e), p))
            }
        }
    }

    async fn in_transaction(
        &mut self,
        client: &mut Client,
        prepared: &Prepared,
        work: Vec<Command>,
        latched: bool,
        relaxed: bool,
        fx: &mut Effects,
    ) -> Result<Vec<Pending>, (Pg, Vec<Pending>)> {
        let mut pending = Vec::with_capacity(work.len());
        let touches = Touches::of(&work);
        let mut cmds = work.into_iter().peekable();
        let mut failure: Option<Pg> = None;
        let tx = match client.transaction().await {
            Ok(tx) => tx,
            Err(e) => return Err((e, work_into_pending(cmds.collect()))),
        };
        if relaxed {
            if let Err(e) = tx.batch_execute("SET LOCAL synchronous_commit = off").await {
                return Err((e, Vec::new()));
            }
        }
        // Every outbox the group will touch is locked at once, in client-number order, before
        // anything else: the group's later statements then wait for no other broker's writer,
        // and writers of several brokers never deadlock (each statement locking in order is
        // not enough: a group runs several).
        if !latched {
            if let Err(e) = self.lock_all(&tx, prepared, touches).await {
                drop(tx);
                return Err((e, work_into_pending(cmds.collect())));
            }
        }
        while let Some(cmd) = cmds.next() {
            if fx.stored >= MAX_WRITES {
                self.carry.push(cmd);
                self.carry.extend(cmds.by_ref());
                break;
            }
            let step: Result<(), Pg> = match cmd {
                Command::Publish { req, reply } => {
                    let mut reqs = vec![(req, reply)];
                    while reqs.len() < PUBLISH_CHUNK
                        && matches!(cmds.peek(), Some(Command::Publish { .. }))
                    {
                        if let Some(Command::Publish { req, reply }) = cmds.next() {
                            reqs.push((req, reply));
                        }
                    }
                    let (reqs, replies): (Vec<_>, Vec<_>) = reqs.into_iter().unzip();
                    if latched {
                        for r in replies {
                            pending.push(Pending::Publish(r, Err(latched_error())));
                        }
                        Ok(())
                    } else {
                        match self.publish(&tx, prepared, reqs, fx).await {
                            Ok(outcomes) => {
                                for (r, o) in replies.into_iter().zip(outcomes) {
                                    pending.push(Pending::Publish(r, o));
                                }
                                Ok(())
                            }
                            Err(e) => {
                                for r in replies {
                                    pending.push(Pending::Publish(r, Err(StoreError::Closed)));
                                }
                                Err(e)
                            }
                        }
                    }
                }
                Command::Hello {
                    client: name,
                    resume,
                    reply,
                } => match self.hello(&tx, prepared, &name, resume, latched).await {
                    Ok(h) => {
                        pending.push(Pending::Hello(reply, Ok(h)));
                        Ok(())
                    }
                    Err(e) => {
                        pending.push(Pending::Hello(reply, Err(StoreError::Closed)));
                        Err(e)
                    }
                },
                Command::Subscribe {
                    client: name,
                    topic,
                    on,
                    reply,
                } => {
                    if latched {
                        pending.push(Pending::Subscribe(reply, Err(latched_error())));
                        Ok(())
                    } else {
                        match self.subscribe(&tx, &name, &topic, on).await {
                            Ok(r) => {
                                pending.push(Pending::Subscribe(reply, r));
                                Ok(())
                            }
                            Err(e) => {
                                pending.push(Pending::Subscribe(reply, Err(StoreError::Closed)));
                                Err(e)
                            }
                        }
                    }
                }
                Command::Forget {
                    client: name,
                    generation,
                    reply,
                } => {
                    if latched {
                        pending.push(Pending::Forget(reply, Err(latched_error())));
                        Ok(())
                    } else {
                        match self.forget_if_idle(&tx, &name, generation).await {
                            Ok(r) => {
                                pending.push(Pending::Forget(reply, Ok(r)));
                                Ok(())
                            }
                            Err(e) => {
                                pending.push(Pending::Forget(reply, Err(StoreError::Closed)));
                                Err(e)
                            }
                        }
                    }
                }
                Command::Delete {
                    client: name,
                    reply,
                } => {
                    if latched {
                        pending.push(Pending::Delete(reply, Err(latched_error())));
                        Ok(())
                    } else {
                        match self.delete(&tx, &name).await {
                            Ok(r) => {
                                pending.push(Pending::Delete(reply, Ok(r)));
                                Ok(())
                            }
                            Err(e) => {
                                pending.push(Pending::Delete(reply, Err(StoreError::Closed)));
                                Err(e)
                            }
                        }
                    }
                }
                Command::Purge {
                    client: name,
                    reply,
                } => {
                    if latched {
                        pending.push(Pending::Purge(reply, Err(latched_error())));
                        Ok(())
                    } else {
                        match self.purge(&tx, &name).await {
                            Ok(r) => {
                                pending.push(Pending::Purge(reply, Ok(r)));
                                Ok(())
                            }
                            Err(e) => {
                                pending.push(Pending::Purge(reply, Err(StoreError::Closed)));
                                Err(e)
                            }
                        }
                    }
                }
                Command::Ack {
                    cid,
                    generation,
                    durable_next,
                    ack,
                } => {
                    // A run of acks is applied at its place in the group: after the commands
                    // before it (a hello that took the outbox over), before those after it.
                    let mut acks: BTreeMap<u64, AckBatch> = BTreeMap::new();
                    add_ack(&mut acks, cid, generation, durable_next, ack);
                    while let Some(Command::Ack { .. }) = cmds.peek() {
                        if let Some(Command::Ack {
                            cid,
                            generation,
                            durable_next,
                            ack,
                        }) = cmds.next()
                        {
                            add_ack(&mut acks, cid, generation, durable_next, ack);
                        }
                    }
                    if latched {
                        Ok(())
                    } else {
                        apply_acks(&tx, prepared, acks, &self.opts).await
                    }
                }
                Command::Settle { reply } => {
                    pending.push(Pending::Settle(reply));
                    Ok(())
                }
                Command::Backup { .. } => Ok(()),
            };
            if let Err(e) = step {
                failure = Some(e);
                break;
            }
        }
        let result = match failure {
            Some(e) => {
                drop(tx);
                Err(e)
            }
            None => {
                let started = std::time::Instant::now();
                let r = tx.commit().await;
                self.opts
                    .metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                r
            }
        };
        match result {
            Ok(()) => Ok(pending),
            Err(e) => {
                pending.extend(work_into_pending(cmds.collect()));
                Err((e, pending))
            }
        }
    }

    /// After the commit: frontiers advance, answers go out, other brokers are woken.
    async fn committed(&mut self, pending: Vec<Pending>, fx: Effects) {
        for (cid, next) in &fx.advanced {
            if let Some(h) = self.live.get(*cid) {
                h.advance(*next);
            }
        }
        let m = &self.opts.metrics;
        m.published.add(fx.published);
        m.stored.add(fx.stored);
        m.duplicates.add(fx.duplicates);
        m.commit_groups.inc();
        if fx.published > 0 {
            m.commit_group_publishes.observe(fx.published as f64);
        }
        // Other brokers to tell: `k` (a newer connection) or `p` (purged or deleted), per
        // client, with the generation that ends the older connection there.
        let mut kicks: HashMap<String, Vec<(char, u64, u64)>> = HashMap::new();
        for p in pending {
            match p {
                Pending::Hello(reply, Ok(h)) => {
                    // A client that never connected to any broker was never sent anything;
                    // otherwise whatever is stored may have been sent (by another broker, or
                    // before a restart).
                    let sent = if h.ever_connected {
                        h.next_seq.saturating_sub(1)
                    } else {
                        0
                    };
                    let handle =
                        self.live
                            .get_or_make(&self.handles, h.cid, &h.name, h.next_seq, sent);
                    handle.advance(h.next_seq);
                    handle.note_generation(h.generation);
                    // A purge before this hello is not this connection's end.
                    handle.take_purged();
                    if let Some(prev) = h.previous {
                        kicks
                            .entry(prev)
                            .or_default()
                            .push(('k', h.cid, h.generation));
                    }
                    let _ = reply.send(Ok(HelloOutcome {
                        epoch: h.epoch,
                        resumed: h.resumed,
                        reason: h.reason,
                        last_seq: h.last_seq,
                        next_seq: h.next_seq,
                        pending: h.pending,
                        missed: h.missed,
                        handle,
                        generation: h.generation,
                    }));
                }
                Pending::Purge(reply, Ok(Some(p))) => {
                    if let Some(h) = self.live.get(p.cid) {
                        h.forget_sends(Ack::Upto(u64::MAX));
                    }
                    match p.holder {
                        // Here: the registry closes the connection (4002).
                        Some(n) if *n == *self.target.node => {
                            if let Some(h) = self.live.get(p.cid) {
                                h.mark_purged();
                            }
                        }
                        Some(n) => kicks.entry(n).or_default().push(('p', p.cid, p.generation)),
                        None => {}
                    }
                    let _ = reply.send(Ok(Some(p.outcome)));
                }
                Pending::Forget(reply, Ok(Some(d))) => {
                    self.live.remove(&self.handles, d.cid, &d.name);
                    let _ = reply.send(Ok(true));
                }
                Pending::Delete(reply, Ok(Some(d))) => {
                    if let Some(h) = self.live.get(d.cid) {
                        h.mark_purged();
                    }
                    self.live.remove(&self.handles, d.cid, &d.name);
                    if let Some(n) = d.holder.filter(|n| **n != *self.target.node) {
                        kicks.entry(n).or_default().push(('p', d.cid, d.generation));
                    }
                    let _ = reply.send(Ok(Some(d.removed)));
                }
                other => other.send(),
            }
        }
        if fx.wake.is_empty() && kicks.is_empty() {
            return;
        }
        let mut notes: Vec<(String, String)> = Vec::new();
        for (node, cids) in fx.wake {
            let items: Vec<String> = cids.iter().map(|(c, n)| format!("w{c}:{n}")).collect();
            notes.extend(payloads(&node, items));
        }
        for (node, taken) in kicks {
            let items: Vec<String> = taken
                .iter()
                .map(|(kind, c, g)| format!("{kind}{c}:{g}"))
                .collect();
            notes.extend(payloads(&node, items));
        }
        let Some(client) = self.client.as_ref() else {
            return;
        };
        for (channel, payload) in notes {
            // Best effort: the other broker's periodic re-check covers a lost one.
            if let Err(e) = client
                .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
                .await
            {
                debug!(error = %e, "wake-up not sent");
            }
        }
    }

    /// The client number of `name`, its outbox made when new.
    async fn ensure(&mut self, tx: &Transaction<'_>, name: &ClientId) -> Result<u64, Pg> {
        if let Some(c) = self.cids.get(name) {
            return Ok(*c);
        }
        let made = tx
            .query_opt(
                "INSERT INTO outboxd_clients (name, epoch) \
                   VALUES ($1, substr(md5(random()::text || clock_timestamp()::text || $1), 1, 16)) \
                 ON CONFLICT (name) DO NOTHING RETURNING cid, epoch",
                &[&name.as_str()],
            )
            .await?;
        let cid = match made {
            Some(row) => {
                let cid = u(row.try_get(0)?);
                let epoch: String = row.try_get(1)?;
                info!(client = %name, cid, epoch = %epoch, "outbox created");
                cid
            }
            None => u(tx
                .query_one(
                    "SELECT cid FROM outboxd_clients WHERE name = $1",
                    &[&name.as_str()],
                )
                .await?
                .try_get(0)?),
        };
        self.cids.insert(name.clone(), cid);
        Ok(cid)
    }

    /// Locks the meta rows of every outbox `touches` names, in client-number order, making the
    /// outboxes of new names the group's hellos, subscribes and direct publishes need.
    async fn lock_all(
        &mut self,
        tx: &Transaction<'_>,
        prepared: &Prepared,
        touches: Touches,
    ) -> Result<(), Pg> {
        let Touches {
            make,
            find,
            topics,
            mut cids,
        } = touches;
        // Numbers learnt before may name rows deleted since: the lock below finds out, and the
        // commands make them anew (`lock_client`, `publish`).
        self.ensure_all(tx, &make).await?;
        for n in &make {
            if let Some(c) = self.cids.get(n) {
                cids.insert(*c);
            }
        }
        if !find.is_empty() {
            let names: Vec<&str> = find.iter().map(|n| n.as_str()).collect();
            for row in tx
                .query(
                    "SELECT cid FROM outboxd_clients WHERE name = ANY($1)",
                    &[&names],
                )
                .await?
            {
                cids.insert(u(row.try_get(0)?));
            }
        }
        if !topics.is_empty() {
            let topics: Vec<&str> = topics.iter().map(|t| t.as_str()).collect();
            for row in tx
                .query(
                    "SELECT cid FROM outboxd_subs WHERE topic = ANY($1)",
                    &[&topics],
                )
                .await?
            {
                cids.insert(u(row.try_get(0)?));
            }
        }
        if !cids.is_empty() {
            let all: Vec<i64> = cids.into_iter().map(i).collect();
            tx.query(&prepared.lock_metas, &[&all]).await?;
        }
        Ok(())
    }

    /// The client number of `name` with its row locked, its outbox made when new, also when a
    /// number learnt before names a row that is gone (deleted through another broker).
    async fn lock_client(&mut self, tx: &Transaction<'_>, name: &ClientId) -> Result<u64, Pg> {
        for _ in 0..2 {
            let cid = self.ensure(tx, name).await?;
            let held = tx
                .query_opt(
                    "SELECT 1 FROM outboxd_clients WHERE cid = $1 FOR UPDATE",
                    &[&i(cid)],
                )
                .await?;
            if held.is_some() {
                return Ok(cid);
            }
            self.cids.remove(name);
        }
        // Made in this very transaction: it is there.
        self.ensure(tx, name).await
    }

    /// Client numbers of `names`, outboxes made for the new ones.
    async fn ensure_all(&mut self, tx: &Transaction<'_>, names: &[ClientId]) -> Result<(), Pg> {
        let missing: BTreeSet<&str> = names
            .iter()
            .filter(|n| !self.cids.contains_key(*n))
            .map(|n| n.as_str())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let missing: Vec<&str> = missing.into_iter().collect();
        let made = tx
            .query(
                "INSERT INTO outboxd_clients (name, epoch) \
                   SELECT n, substr(md5(random()::text || clock_timestamp()::text || n), 1, 16) \
                   FROM unnest($1::text[]) AS n \
                 ON CONFLICT (name) DO NOTHING RETURNING name, cid, epoch",
                &[&missing],
            )
            .await?;
        for row in &made {
            let name: String = row.try_get(0)?;
            let epoch: String = row.try_get(2)?;
            info!(client = %name, cid = u(row.try_get(1)?), epoch = %epoch, "outbox created");
        }
        let rows = tx
            .query(
                "SELECT name, cid FROM outboxd_clients WHERE name = ANY($1)",
                &[&missing],
            )
            .await?;
        for row in &rows {
            let name: String = row.try_get(0)?;
            if let Ok(n) = ClientId::new(&name) {
                self.cids.insert(n, u(row.try_get(1)?));
            }
        }
        Ok(())
    }

    /// The next message id, from this broker's block (a new block when it ran out).
    async fn next_id(&mut self, tx: &Transaction<'_>) -> Result<u64, Pg> {
        if self.ids.is_empty() {
            let start: i64 = tx
                .query_one("SELECT nextval('outboxd_message_id')", &[])
                .await?
                .try_get(0)?;
            let start = u(start);
            self.ids = start..start.saturating_add(ID_BLOCK);
        }
        let id = self.ids.start;
        self.ids.start += 1;
        Ok(id)
    }

    /// Writes a run of publishes: dedup, recipients, quotas, messages, metas.
    async fn publish(
        &mut self,
        tx: &Transaction<'_>,
        prepared: &Prepared,
        reqs: Vec<PublishRequest>,
        fx: &mut Effects,
    ) -> Result<Vec<Result<PublishOutcome, StoreError>>, Pg> {
        let now = now_ms();
        let window = self.opts.dedup_window_ms;
        // Idempotency keys: each claimed in the table (a fresh entry there makes it a
        // duplicate); the same key twice in the run answers like its first.
        let dkeys: Vec<Option<Vec<u8>>> = reqs
            .iter()
            .map(|r| {
                r.key.as_ref().map(|k| {
                    let mut b = r
                        .from
                        .as_ref()
                        .map(|c| c.as_str())
                        .unwrap_or("")
                        .as_bytes()
                        .to_vec();
                    b.push(0);
                    b.extend_from_slice(k.as_bytes());
                    b
                })
            })
            .collect();
        // What each key is claimed with: the fingerprint of the first publish naming it.
        let fps: Vec<i64> = reqs
            .iter()
            .map(|r| i64::from(fingerprint(&r.to, &r.payload)))
            .collect();
        let mut unique: BTreeMap<&Vec<u8>, i64> = BTreeMap::new();
        for (k, fp) in dkeys.iter().zip(&fps) {
            if let Some(k) = k {
                unique.entry(k).or_insert(*fp);
            }
        }
        // A key stored before: the answer of its publish and that publish's fingerprint.
        let mut earlier: HashMap<Vec<u8>, (PublishOutcome, i64)> = HashMap::new();
        if !unique.is_empty() {
            let keys: Vec<&[u8]> = unique.keys().map(|k| k.as_slice()).collect();
            let key_fps: Vec<i64> = unique.values().copied().collect();
            let horizon = i(now.saturating_sub(window));
            let claimed: HashSet<Vec<u8>> = tx
                .query(
                    "INSERT INTO outboxd_dedup (dkey, id, ts, recipients, fp) \
                       SELECT k, 0, $2, 0, fp FROM unnest($1::bytea[], $4::bigint[]) AS v(k, fp) \
                     ON CONFLICT (dkey) DO UPDATE SET id = 0, ts = EXCLUDED.ts, recipients = 0, \
                       fp = EXCLUDED.fp \
                       WHERE outboxd_dedup.ts <= $3 \
                     RETURNING dkey",
                    &[&keys, &i(now), &horizon, &key_fps],
                )
                .await?
                .iter()
                .map(|r| r.try_get::<_, Vec<u8>>(0))
                .collect::<Result<_, _>>()?;
            let taken: Vec<&[u8]> = keys
                .iter()
                .copied()
                .filter(|k| !claimed.contains(*k))
                .collect();
            if !taken.is_empty() {
                for row in tx
                    .query(
                        "SELECT dkey, id, recipients, fp FROM outboxd_dedup WHERE dkey = ANY($1)",
                        &[&taken],
                    )
                    .await?
                {
                    earlier.insert(
                        row.try_get(0)?,
                        (
                            PublishOutcome {
                                id: format!("{:x}", u(row.try_get(1)?)),
                                recipients: u(row.try_get(2)?),
                                duplicate: true,
                                full: Vec::new(),
                            },
                            row.try_get(3)?,
                        ),
                    );
                }
            }
        }
        // Recipients: direct ones by name, topics' subscribers from the table.
        let names: Vec<ClientId> = reqs
            .iter()
            .filter_map(|r| match &r.to {
                To::Client(n) => Some(n.clone()),
                To::Topic(_) => None,
            })
            .collect();
        self.ensure_all(tx, &names).await?;
        let topics: BTreeSet<&str> = reqs
            .iter()
            .filter_map(|r| match &r.to {
                To::Topic(t) => Some(t.as_str()),
                To::Client(_) => None,
            })
            .collect();
        let mut subscribers: HashMap<String, Vec<u64>> = HashMap::new();
        if !topics.is_empty() {
            let topics: Vec<&str> = topics.into_iter().collect();
            for row in tx
                .query(
                    "SELECT topic, cid FROM outboxd_subs WHERE topic = ANY($1) ORDER BY cid",
                    &[&topics],
                )
                .await?
            {
                subscribers
                    .entry(row.try_get(0)?)
                    .or_default()
                    .push(u(row.try_get(1)?));
            }
        }
        let recipients_of = |r: &PublishRequest, cids: &HashMap<ClientId, u64>| -> Vec<u64> {
            match &r.to {
                To::Client(n) => cids.get(n).copied().into_iter().collect(),
                To::Topic(t) => subscribers.get(t.as_str()).cloned().unwrap_or_default(),
            }
        };
        // Lock every recipient's meta row, in client-number order.
        let all: BTreeSet<u64> = reqs
            .iter()
            .flat_map(|r| recipients_of(r, &self.cids))
            .collect();
        let all: Vec<i64> = all.into_iter().map(i).collect();
        struct Meta {
            name: String,
            next_seq: u64,
            pending: u64,
            bytes: u64,
            node: Option<String>,
            changed: bool,
        }
        let mut metas: BTreeMap<u64, Meta> = BTreeMap::new();
        let lock = |cids: Vec<i64>| async move { tx.query(&prepared.lock_metas, &[&cids]).await };
        let mut locked = if all.is_empty() {
            Vec::new()
        } else {
            lock(all).await?
        };
        // A direct recipient whose row is gone was deleted through another broker since its
        // number was learnt: its outbox is made anew, as for any new name.
        let found: BTreeSet<u64> = locked
            .iter()
            .map(|r| r.try_get::<_, i64>(0).map(u))
            .collect::<Result<_, _>>()?;
        let gone: Vec<ClientId> = names
            .iter()
            .filter(|n| self.cids.get(*n).is_none_or(|c| !found.contains(c)))
            .cloned()
            .collect();
        if !gone.is_empty() {
            for n in &gone {
                self.cids.remove(n);
            }
            self.ensure_all(tx, &gone).await?;
            let again: Vec<i64> = gone
                .iter()
                .filter_map(|n| self.cids.get(n).map(|c| i(*c)))
                .collect();
            locked.extend(lock(again).await?);
        }
        for row in locked {
            metas.insert(
                u(row.try_get(0)?),
                Meta {
                    name: row.try_get(1)?,
                    next_seq: u(row.try_get(2)?),
                    pending: u(row.try_get(3)?),
                    bytes: u(row.try_get(4)?),
                    node: row.try_get(5)?,
                    changed: false,
                },
            );
        }
        let (max_msgs, max_bytes) = (self.opts.max_outbox_messages, self.opts.max_outbox_bytes);
        let mut rows = MessageRows::default();
        let mut outcomes = Vec::with_capacity(reqs.len());
        let mut dedup_rows: Vec<(Vec<u8>, i64, i64)> = Vec::new();
        let mut unclaim: Vec<Vec<u8>> = Vec::new();
        for ((req, dkey), fp) in reqs.into_iter().zip(dkeys).zip(fps) {
            if let Some((o, first_fp)) = dkey.as_ref().and_then(|k| earlier.get(k)) {
                if *first_fp != 0 && *first_fp != fp {
                    outcomes.push(Err(StoreError::KeyReused {
                        key: req.key.unwrap_or_default(),
                    }));
                } else {
                    fx.duplicates += 1;
                    outcomes.push(Ok(o.clone()));
                }
                continue;
            }
            let recipients = recipients_of(&req, &self.cids);
            let id = self.next_id(tx).await?;
            let ttl = req
                .ttl_ms
                .filter(|t| *t > 0)
                .or((self.opts.message_ttl_ms > 0).then_some(self.opts.message_ttl_ms));
            let expires_at = ttl.map(|t| now.saturating_add(t)).unwrap_or(0);
            let topic = match &req.to {
                To::Topic(t) => Some(t.as_str().to_owned()),
                To::Client(_) => None,
            };
            let (is_json, body) = match req.payload {
                Payload::Json(s) => (true, s.into_bytes()),
                Payload::Binary(b) => (false, b),
            };
            let size = body.len() as u64;
            let mut written = 0u64;
            let mut full = Vec::new();
            for cid in recipients {
                let Some(m) = metas.get_mut(&cid) else {
                    continue;
                };
                let over = (max_msgs > 0 && m.pending >= max_msgs)
                    || (max_bytes > 0 && m.bytes.saturating_add(size) > max_bytes);
                if over {
                    if let Ok(n) = ClientId::new(&m.name) {
                        full.push(n);
                    }
                    continue;
                }
                let seq = m.next_seq;
                m.next_seq += 1;
                m.pending += 1;
                m.bytes += size;
                m.changed = true;
                rows.push(
                    cid,
                    seq,
                    id,
                    now,
                    req.from.as_ref(),
                    topic.as_deref(),
                    is_json,
                    &body,
                    expires_at,
                );
                written += 1;
            }
            fx.stored += written;
            // A direct publish refused (outbox_full) is counted where the refusal is answered.
            if topic.is_some() || full.is_empty() {
                fx.published += 1;
            }
            let outcome = PublishOutcome {
                id: format!("{id:x}"),
                recipients: written,
                duplicate: false,
                full,
            };
            if let Some(k) = dkey {
                if written > 0 || topic.is_some() {
                    dedup_rows.push((k.clone(), i(id), i(written)));
                } else {
                    unclaim.push(k.clone());
                }
                let mut again = outcome.clone();
                again.duplicate = true;
                again.full = Vec::new();
                earlier.insert(k, (again, fp));
            }
            outcomes.push(Ok(outcome));
        }
        if !rows.cid.is_empty() {
            let changed: Vec<(&u64, &Meta)> = metas.iter().filter(|(_, m)| m.changed).collect();
            let cids: Vec<i64> = changed.iter().map(|(c, _)| i(**c)).collect();
            let next: Vec<i64> = changed.iter().map(|(_, m)| i(m.next_seq)).collect();
            let pending: Vec<i64> = changed.iter().map(|(_, m)| i(m.pending)).collect();
            let bytes: Vec<i64> = changed.iter().map(|(_, m)| i(m.bytes)).collect();
            // Both at once: the connection pipelines them, one round trip instead of two.
            let message_params: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
                &rows.cid,
                &rows.seq,
                &rows.id,
                &rows.ts,
                &rows.sender,
                &rows.topic,
                &rows.is_json,
                &rows.body,
                &rows.expires,
            ];
            let meta_params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
                [&cids, &next, &pending, &bytes];
            let insert = tx.execute(&prepared.insert_messages, &message_params);
            let update = tx.execute(&prepared.update_metas, &meta_params);
            futures_util::future::try_join(insert, update).await?;
            for (cid, m) in changed {
                fx.advanced.insert(*cid, m.next_seq);
                if let Some(node) = m.node.as_ref().filter(|n| **n != *self.target.node) {
                    fx.wake
                        .entry(node.clone())
                        .or_default()
                        .insert(*cid, m.next_seq);
                }
            }
        }
        if !dedup_rows.is_empty() {
            let keys: Vec<&[u8]> = dedup_rows.iter().map(|(k, _, _)| k.as_slice()).collect();
            let ids: Vec<i64> = dedup_rows.iter().map(|(_, id, _)| *id).collect();
            let counts: Vec<i64> = dedup_rows.iter().map(|(_, _, n)| *n).collect();
            tx.execute(
                "UPDATE outboxd_dedup d SET id = v.id, recipients = v.n \
                 FROM unnest($1::bytea[], $2::bigint[], $3::bigint[]) AS v(k, id, n) \
                 WHERE d.dkey = v.k",
                &[&keys, &ids, &counts],
            )
            .await?;
        }
        if !unclaim.is_empty() {
            let keys: Vec<&[u8]> = unclaim.iter().map(|k| k.as_slice()).collect();
            tx.execute("DELETE FROM outboxd_dedup WHERE dkey = ANY($1)", &[&keys])
                .await?;
        }
        Ok(outcomes)
    }

    /// Takes the outbox over for a new connection and applies its resume position.
    async fn hello(
        &mut self,
        tx: &Transaction<'_>,
        prepared: &Prepared,
        name: &ClientId,
        resume: Option<Resume>,
        latched: bool,
    ) -> Result<HelloDone, Pg> {
        let cid = self.lock_client(tx, name).await?;
        let row = tx
            .query_one(
                "SELECT epoch, next_seq, acked, node, conn_gen FROM outboxd_clients \
                 WHERE cid = $1 FOR UPDATE",
                &[&i(cid)],
            )
            .await?;
        let epoch: String = row.try_get(0)?;
        let next_seq = u(row.try_get(1)?);
        let acked = u(row.try_get(2)?);
        let node: Option<String> = row.try_get(3)?;
        let mut generation = u(row.try_get(4)?);
        // Everything below next_seq is committed, so it may have been sent.
        let (resumed, reason, last_seq) = match resume {
            Some(r) if r.epoch != epoch => (false, Some(ResumeRefused::EpochMismatch), acked),
            Some(r) if r.last_seq >= next_seq => (false, Some(ResumeRefused::Ahead), acked),
            Some(r) => {
                if !latched {
                    if r.last_seq > acked {
                        ack_one(
                            tx,
                            prepared,
                            cid,
                            Ack::Upto(r.last_seq),
                            acked,
                            next_seq,
                            &self.opts,
                        )
                        .await?;
                    } else {
                        tx.execute(
                            "DELETE FROM outboxd_missed WHERE cid = $1 AND seq <= $2",
                            &[&i(cid), &i(r.last_seq)],
                        )
                        .await?;
                    }
                }
                (true, None, r.last_seq)
            }
            None => (false, None, acked),
        };
        let after = if resumed { last_seq } else { 0 };
        let missed: i64 = tx
            .query_one(
                "SELECT count(*) FROM outboxd_missed WHERE cid = $1 AND seq > $2",
                &[&i(cid), &i(after)],
            )
            .await?
            .try_get(0)?;
        let pending = if latched {
            u(tx.query_one(
                "SELECT pending FROM outboxd_clients WHERE cid = $1",
                &[&i(cid)],
            )
            .await?
            .try_get(0)?)
        } else {
            let row = tx
                .query_one(
                    "UPDATE outboxd_clients SET last_seen = $2, conn_gen = conn_gen + 1, \
                       node = $3 WHERE cid = $1 RETURNING conn_gen, pending",
                    &[&i(cid), &i(now_ms()), &&*self.target.node],
                )
                .await?;
            generation = u(row.try_get(0)?);
            u(row.try_get(1)?)
        };
        Ok(HelloDone {
            cid,
            name: name.clone(),
            epoch,
            resumed,
            reason,
            last_seq,
            next_seq,
            pending,
            missed: u(missed),
            generation,
            ever_connected: node.is_some(),
            previous: node.filter(|n| **n != *self.target.node),
        })
    }

    /// Adds or removes a durable subscription (limited by `limits.max_subscriptions`).
    async fn subscribe(
        &mut self,
        tx: &Transaction<'_>,
        name: &ClientId,
        topic: &Topic,
        on: bool,
    ) -> Result<Result<(), StoreError>, Pg> {
        let cid = i(self.lock_client(tx, name).await?);
        if !on {
            tx.execute(
                "DELETE FROM outboxd_subs WHERE topic = $1 AND cid = $2",
                &[&topic.as_str(), &cid],
            )
            .await?;
            return Ok(Ok(()));
        }
        let limit = self.opts.max_subscriptions;
        if limit > 0 {
            let row = tx
                .query_one(
                    "SELECT count(*), count(*) FILTER (WHERE topic = $2) FROM outboxd_subs \
                     WHERE cid = $1",
                    &[&cid, &topic.as_str()],
                )
                .await?;
            let (held, already): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
            if already == 0 && u(held) >= u64::from(limit) {
                return Ok(Err(StoreError::TooManySubscriptions { limit }));
            }
        }
        tx.execute(
            "INSERT INTO outboxd_subs (topic, cid) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&topic.as_str(), &cid],
        )
        .await?;
        Ok(Ok(()))
    }

    /// Deletes the outbox of `name` when nothing is stored for it (no message, no subscription,
    /// no tombstone) and its newest connection is the one of `generation`.
    async fn forget_if_idle(
        &mut self,
        tx: &Transaction<'_>,
        name: &ClientId,
        generation: u64,
    ) -> Result<Option<Deleted>, Pg> {
        let idle = tx
            .query_opt(
                "SELECT 1 FROM outboxd_clients c WHERE c.name = $1 AND c.pending = 0 \
                   AND c.conn_gen = $2 \
                   AND NOT EXISTS (SELECT 1 FROM outboxd_subs s WHERE s.cid = c.cid) \
                   AND NOT EXISTS (SELECT 1 FROM outboxd_missed m WHERE m.cid = c.cid) \
                 FOR UPDATE",
                &[&name.as_str(), &i(generation)],
            )
            .await?;
        if idle.is_none() {
            return Ok(None);
        }
        self.delete(tx, name).await
    }

    /// Deletes the outbox of `name` and everything under it; returns the messages removed
    /// unacked, None when it has no outbox.
    async fn delete(
        &mut self,
        tx: &Transaction<'_>,
        name: &ClientId,
    ) -> Result<Option<Deleted>, Pg> {
        let Some(row) = tx
            .query_opt(
                "SELECT cid, node, conn_gen FROM outboxd_clients WHERE name = $1 FOR UPDATE",
                &[&name.as_str()],
            )
            .await?
        else {
            return Ok(None);
        };
        let cid: i64 = row.try_get(0)?;
        let node: Option<String> = row.try_get(1)?;
        let generation = u(row.try_get(2)?).saturating_add(1);
        let removed = tx
            .execute("DELETE FROM outboxd_messages WHERE cid = $1", &[&cid])
            .await?;
        tx.execute("DELETE FROM outboxd_missed WHERE cid = $1", &[&cid])
            .await?;
        tx.execute("DELETE FROM outboxd_subs WHERE cid = $1", &[&cid])
            .await?;
        tx.execute("DELETE FROM outboxd_clients WHERE cid = $1", &[&cid])
            .await?;
        self.cids.remove(name);
        info!(client = %name, cid, removed, "outbox deleted");
        Ok(Some(Deleted {
            cid: u(cid),
            name: name.clone(),
            removed,
            holder: node,
            generation,
        }))
    }

    /// Removes every stored message of `name` (leaving tombstones) and gives its outbox a new
    /// epoch; None when it has no outbox.
    async fn purge(&mut self, tx: &Transaction<'_>, name: &ClientId) -> Result<Option<Purged>, Pg> {
        let Some(row) = tx
            .query_opt(
                "SELECT cid FROM outboxd_clients WHERE name = $1 FOR UPDATE",
                &[&name.as_str()],
            )
            .await?
        else {
            return Ok(None);
        };
        let cid: i64 = row.try_get(0)?;
        let removed: i64 = tx
            .query_one(
                "WITH d AS (DELETE FROM outboxd_messages WHERE cid = $1 RETURNING seq), \
                   t AS (INSERT INTO outboxd_missed SELECT $1, seq FROM d ON CONFLICT DO NOTHING) \
                 SELECT count(*) FROM d",
                &[&cid],
            )
            .await?
            .try_get(0)?;
        let epoch = tx
            .query_one(
                "UPDATE outboxd_clients SET pending = 0, bytes = 0, acked = next_seq - 1, \
                   conn_gen = conn_gen + 1, \
                   epoch = substr(md5(random()::text || clock_timestamp()::text || name), 1, 16) \
                 WHERE cid = $1 RETURNING epoch, node, conn_gen",
                &[&cid],
            )
            .await?;
        let node: Option<String> = epoch.try_get(1)?;
        let generation = u(epoch.try_get(2)?);
        let epoch: String = epoch.try_get(0)?;
        Ok(Some(Purged {
            cid: u(cid),
            outcome: PurgeOutcome {
                removed: u(removed),
                epoch,
            },
            // The purge also fences the connection: its reads and acks are refused from now.
            holder: node,
            generation,
        }))
    }

    /// Retention: messages past their TTL are removed unacked (a tombstone tells the client,
    /// in `missed`), and idempotency keys older than the dedup window are forgotten.
    async fn sweep(&mut self) {
        if self.latched.load(Ordering::Acquire) {
            return;
        }
        let now = i(now_ms());
        let horizon = i(now_ms().saturating_sub(self.opts.dedup_window_ms));
        let metrics = Arc::clone(&self.opts.metrics);
        self.sweeps = self.sweeps.wrapping_add(1);
        let dedup_pass = self.sweeps.is_multiple_of(DEDUP_SWEEP_EVERY);
        let Ok(client) = self.connection().await else {
            return;
        };
        let result: Result<u64, Pg> = async {
            let due = client
                .query(
                    "SELECT cid, seq FROM outboxd_messages WHERE expires_at > 0 \
                     AND expires_at <= $1 ORDER BY expires_at LIMIT $2",
                    &[&now, &SWEEP_BATCH],
                )
                .await?;
            let mut expired = 0u64;
            if !due.is_empty() {
                let mut cids = Vec::with_capacity(due.len());
                let mut seqs = Vec::with_capacity(due.len());
                for r in &due {
                    cids.push(r.try_get::<_, i64>(0)?);
                    seqs.push(r.try_get::<_, i64>(1)?);
                }
                let mut lock: Vec<i64> = cids.clone();
                lock.sort_unstable();
                lock.dedup();
                let tx = client.transaction().await?;
                tx.execute(
                    "SELECT 1 FROM outboxd_clients WHERE cid = ANY($1) ORDER BY cid FOR UPDATE",
                    &[&lock],
                )
                .await?;
                let rows = tx
                    .query(
                        "WITH d AS (DELETE FROM outboxd_messages m \
                           USING unnest($1::bigint[], $2::bigint[]) AS v(cid, seq) \
                           WHERE m.cid = v.cid AND m.seq = v.seq AND m.expires_at > 0 \
                             AND m.expires_at <= $3 \
                           RETURNING m.cid, m.seq, octet_length(m.body) AS len), \
                         t AS (INSERT INTO outboxd_missed SELECT cid, seq FROM d \
                           ON CONFLICT DO NOTHING), \
                         s AS (SELECT cid, count(*) AS n, sum(len) AS b FROM d GROUP BY cid) \
                         UPDATE outboxd_clients c SET pending = c.pending - s.n, \
                           bytes = c.bytes - s.b::bigint FROM s WHERE c.cid = s.cid \
                         RETURNING c.cid, s.n",
                        &[&cids, &seqs, &now],
                    )
                    .await?;
                tx.commit().await?;
                for r in &rows {
                    let (cid, n): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
                    info!(
                        cid,
                        messages = n,
                        "messages expired unacked (TTL); the client will see them in `missed`"
                    );
                    expired += u(n);
                }
            }
            if dedup_pass {
                client
                    .execute(
                        "DELETE FROM outboxd_dedup WHERE dkey IN \
                           (SELECT dkey FROM outboxd_dedup WHERE ts <= $1 LIMIT $2)",
                        &[&horizon, &SWEEP_BATCH],
                    )
                    .await?;
            }
            Ok(expired)
        }
        .await;
        match result {
            Ok(n) => metrics.expired.add(n),
            Err(e) => {
                warn!(error = %e, "retention pass failed; it runs again shortly");
                self.broke(&e);
            }
        }
    }
}

/// Adds one ack to the run being gathered; a newer connection's acks replace an older one's.
fn add_ack(
    acks: &mut BTreeMap<u64, AckBatch>,
    cid: u64,
    generation: u64,
    durable_next: u64,
    ack: Ack,
) {
    let b = acks.entry(cid).or_insert(AckBatch {
        generation,
        durable_next,
        upto: None,
        seqs: Vec::new(),
    });
    if generation > b.generation {
        *b = AckBatch {
            generation,
            durable_next,
            upto: None,
            seqs: Vec::new(),
        };
    } else if generation < b.generation {
        return;
    }
    b.durable_next = b.durable_next.max(durable_next);
    match ack {
        Ack::Upto(n) => b.upto = Some(b.upto.map_or(n, |m| m.max(n))),
        Ack::Seq(s) => b.seqs.push(s),
    }
}

/// Applies a run of acks, the outboxes locked in client-number order; acks of a connection
/// that was taken over (its generation is no longer the outbox's) are dropped.
async fn apply_acks(
    tx: &Transaction<'_>,
    prepared: &Prepared,
    acks: BTreeMap<u64, AckBatch>,
    opts: &StoreOptions,
) -> Result<(), Pg> {
    let cids: Vec<i64> = acks.keys().map(|c| i(*c)).collect();
    let rows = tx
        .query(
            "SELECT cid, acked, conn_gen FROM outboxd_clients WHERE cid = ANY($1) \
             ORDER BY cid FOR UPDATE",
            &[&cids],
        )
        .await?;
    for row in rows {
        let cid = u(row.try_get(0)?);
        let mut acked = u(row.try_get(1)?);
        let current = u(row.try_get(2)?);
        let Some(b) = acks.get(&cid) else { continue };
        if current != b.generation {
            debug!(cid, "acks of a connection that was taken over dropped");
            continue;
        }
        if let Some(upto) = b.upto {
            acked = ack_one(
                tx,
                prepared,
                cid,
                Ack::Upto(upto),
                acked,
                b.durable_next,
                opts,
            )
            .await?
            .max(acked);
        }
        for s in &b.seqs {
            acked = ack_one(tx, prepared, cid, Ack::Seq(*s), acked, b.durable_next, opts)
                .await?
                .max(acked);
        }
    }
    Ok(())
}

/// Applies one ack to outbox `cid` (its row locked by the caller, `acked` its watermark) and
/// returns the new watermark. Mirrors the sled store's rules: nothing at or past
/// `durable_next` can have been sent, so an ack reaches no further; only a cumulative ack
/// drops tombstones.
async fn ack_one(
    tx: &Transaction<'_>,
    prepared: &Prepared,
    cid: u64,
    ack: Ack,
    acked: u64,
    durable_next: u64,
    opts: &StoreOptions,
) -> Result<u64, Pg> {
    let last_sent = durable_next.saturating_sub(1);
    let (lo, hi) = match ack {
        Ack::Seq(s) if s > acked && s <= last_sent => (s, s),
        Ack::Upto(n) if n > acked => (acked + 1, n.min(last_sent)),
        _ => return Ok(acked),
    };
    if lo > hi {
        return Ok(acked);
    }
    let (base, tombstones) = match ack {
        Ack::Upto(_) => (hi, i(hi)),
        Ack::Seq(_) => (acked, -1),
    };
    let row = tx
        .query_one(
            &prepared.ack,
            &[
                &i(cid),
                &i(lo),
                &i(hi),
                &tombstones,
                &i(base),
                &i(durable_next),
            ],
        )
        .await?;
    let published: Vec<i64> = row.try_get(1)?;
    let m = &opts.metrics;
    m.acked.add(published.len() as u64);
    let now = now_ms();
    for ts in published {
        m.publish_to_ack_seconds
            .observe(now.saturating_sub(u(ts)) as f64 / 1000.0);
    }
    Ok(u(row.try_get(0)?))
}

/// The writer's hot statements, prepared once per connection (a statement given as text is
/// parsed again, one more round trip, every time it runs).
pub(super) struct Prepared {
    lock_metas: Statement,
    insert_messages: Statement,
    update_metas: Statement,
    ack: Statement,
}

impl Prepared {
    async fn on(client: &Client) -> Result<Prepared, Pg> {
        Ok(Prepared {
            lock_metas: client
                .prepare(
                    "SELECT cid, name, next_seq, pending, bytes, node FROM outboxd_clients \
                     WHERE cid = ANY($1) ORDER BY cid FOR UPDATE",
                )
                .await?,
            insert_messages: client
                .prepare(
                    "INSERT INTO outboxd_messages \
                       (cid, seq, id, ts, sender, topic, is_json, body, expires_at) \
                     SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], \
                       $4::bigint[], $5::text[], $6::text[], $7::boolean[], $8::bytea[], \
                       $9::bigint[])",
                )
                .await?,
            update_metas: client
                .prepare(
                    "UPDATE outboxd_clients c SET next_seq = v.n, pending = v.p, bytes = v.b \
                     FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[]) \
                       AS v(cid, n, p, b) WHERE c.cid = v.cid",
                )
                .await?,
            ack: client.prepare(ACK).await?,
        })
    }
}

/// One ack: deletes what it covers, drops tombstones up to `$4` (-1: none), and moves the
/// watermark to just below the first message still stored above `$5` and below `$6` (the
/// durable frontier), all from one snapshot (hence `NOT IN d`).
const ACK: &str =
    "WITH d AS (DELETE FROM outboxd_messages WHERE cid = $1 AND seq BETWEEN $2 AND $3 \
       RETURNING seq, ts, octet_length(body) AS len), \
     t AS (DELETE FROM outboxd_missed WHERE cid = $1 AND seq <= $4) \
     UPDATE outboxd_clients SET \
       pending = pending - (SELECT count(*) FROM d), \
       bytes = bytes - (SELECT coalesce(sum(len), 0) FROM d)::bigint, \
       acked = greatest(acked, coalesce((SELECT min(seq) FROM outboxd_messages \
         WHERE cid = $1 AND seq > $5 AND seq < $6 \
           AND seq NOT IN (SELECT seq FROM d)) - 1, $6 - 1)) \
     WHERE cid = $1 \
     RETURNING acked, coalesce((SELECT array_agg(ts) FROM d), '{}')";

/// The rows of a run's messages, as arrays for one `unnest` insert.
#[derive(Default)]
struct MessageRows {
    cid: Vec<i64>,
    seq: Vec<i64>,
    id: Vec<i64>,
    ts: Vec<i64>,
    sender: Vec<Option<String>>,
    topic: Vec<Option<String>>,
    is_json: Vec<bool>,
    body: Vec<Vec<u8>>,
    expires: Vec<i64>,
}

impl MessageRows {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        cid: u64,
        seq: u64,
        id: u64,
        ts: u64,
        from: Option<&ClientId>,
        topic: Option<&str>,
        is_json: bool,
        body: &[u8],
        expires: u64,
    ) {
        self.cid.push(i(cid));
        self.seq.push(i(seq));
        self.id.push(i(id));
        self.ts.push(i(ts));
        self.sender.push(from.map(|c| c.as_str().to_owned()));
        self.topic.push(topic.map(str::to_owned));
        self.is_json.push(is_json);
        self.body.push(body.to_vec());
        self.expires.push(i(expires));
    }
}

/// The channel and payloads that tell `node` of `items`, each payload under PostgreSQL's limit.
fn payloads(node: &str, items: Vec<String>) -> Vec<(String, String)> {
    let channel = super::wake::channel(node);
    let mut out = Vec::new();
    let mut payload = String::new();
    for item in items {
        if !payload.is_empty() && payload.len() + item.len() + 1 > 7000 {
            out.push((channel.clone(), std::mem::take(&mut payload)));
        }
        if !payload.is_empty() {
            payload.push(',');
        }
        payload.push_str(&item);
    }
    if !payload.is_empty() {
        out.push((channel, payload));
    }
    out
}

fn latched_error() -> StoreError {
    StoreError::Latched("a commit was not confirmed by the synchronous standby".into())
}

/// Commands not applied, as answers to refuse.
fn work_into_pending(cmds: Vec<Command>) -> Vec<Pending> {
    let mut out = Vec::new();
    for cmd in cmds {
        match cmd {
            Command::Hello { reply, .. } => {
                out.push(Pending::Hello(reply, Err(StoreError::Closed)))
            }
            Command::Publish { reply, .. } => {
                out.push(Pending::Publish(reply, Err(StoreError::Closed)))
            }
            Command::Subscribe { reply, .. } => {
                out.push(Pending::Subscribe(reply, Err(StoreError::Closed)))
            }
            Command::Purge { reply, .. } => {
                out.push(Pending::Purge(reply, Err(StoreError::Closed)))
            }
            Command::Delete { reply, .. } => {
                out.push(Pending::Delete(reply, Err(StoreError::Closed)))
            }
            Command::Forget { reply, .. } => {
                out.push(Pending::Forget(reply, Err(StoreError::Closed)))
            }
            Command::Settle { reply } => out.push(Pending::Settle(reply)),
            Command::Ack { .. } | Command::Backup { .. } => {}
        }
    }
    out
}

impl Pending {
    fn send(self) {
        match self {
            Pending::Hello(tx, r) => {
                // Only reached for a refused hello: a done one is answered with its handle.
                let _ = tx.send(r.and(Err(StoreError::Closed)));
            }
            Pending::Publish(tx, r) => drop(tx.send(r)),
            Pending::Subscribe(tx, r) => drop(tx.send(r)),
            Pending::Purge(tx, r) => drop(tx.send(r.map(|p| p.map(|p| p.outcome)))),
            Pending::Delete(tx, r) => drop(tx.send(r.map(|d| d.map(|d| d.removed)))),
            Pending::Forget(tx, r) => drop(tx.send(r.map(|d| d.is_some()))),
            Pending::Settle(tx) => drop(tx.send(Ok(()))),
        }
    }

    /// Nothing of the group is confirmed: every answer is `err`.
    fn fail(self, err: &StoreError) {
        let e = || match err {
            StoreError::Latched(s) => StoreError::Latched(s.clone()),
            other => StoreError::Database(other.to_string()),
        };
        match self {
            Pending::Hello(tx, _) => drop(tx.send(Err(e()))),
            Pending::Publish(tx, _) => drop(tx.send(Err(e()))),
            Pending::Subscribe(tx, _) => drop(tx.send(Err(e()))),
            Pending::Purge(tx, _) => drop(tx.send(Err(e()))),
            Pending::Delete(tx, _) => drop(tx.send(Err(e()))),
            Pending::Forget(tx, _) => drop(tx.send(Err(e()))),
            // Nothing of the group is visible: the barrier is passed all the same.
            Pending::Settle(tx) => drop(tx.send(Ok(()))),
        }
    }
}
