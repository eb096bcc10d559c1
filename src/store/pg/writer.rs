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
//!
//! This module owns the loop and the writer's state; what each command does in the transaction
//! lives beside it: `locks` (client numbers, the group's row locks), `publish`, `acks`, `hello`
//! (hello and subscribe), `purge` (purge, delete, forget), `retention`, `pending` (the answers
//! held back until the commit) and `prepared` (the hot statements); `wake` tells other brokers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::Client;
use tracing::{info, warn};

use super::acks::{add_ack, apply_acks, AckBatch};
use super::pending::{latched_error, work_into_pending, Pending};
use super::prepared::Prepared;
use super::schema::{check_cluster, migrate};
use super::{connect, failed, Live, OnMessage, Pg, Target};
use crate::model::{Ack, ClientId, Target as To, Topic};
use crate::store::writer::Command;
use crate::store::{Handles, HelloOutcome, StoreError, StoreOptions};

/// How often retention looks for expired messages (as often as sled's); idempotency keys are
/// forgotten every `retention::DEDUP_SWEEP_EVERY` passes.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// The most commands one commit group takes.
const MAX_GROUP: usize = 4096;
/// A group stops taking commands once it wrote this many messages (as sled's does), so a
/// pipelined fan-out never piles up into one huge transaction; the rest waits for the next.
const MAX_WRITES: u64 = 50_000;
/// Publishes written with one set of statements.
const PUBLISH_CHUNK: usize = 256;
/// How long the writer waits before it tries an unreachable database again.
const RECONNECT_AFTER: Duration = Duration::from_millis(200);

/// What a commit group did that others must learn of once it committed.
#[derive(Default)]
pub(super) struct Effects {
    /// Outboxes written, with their new `next_seq`.
    pub(super) advanced: BTreeMap<u64, u64>,
    /// Wake-ups for other brokers: node → (client number → next_seq).
    pub(super) wake: HashMap<String, BTreeMap<u64, u64>>,
    /// Publishes, messages stored and duplicates, for the metrics.
    pub(super) published: u64,
    pub(super) stored: u64,
    pub(super) duplicates: u64,
}

/// What a commit group will touch, read from its commands before the transaction begins.
#[derive(Default)]
pub(super) struct Touches {
    /// Names whose outbox the group makes when missing (hello, subscribe, direct publish).
    pub(super) make: Vec<ClientId>,
    /// Names the group only acts on when they have an outbox (purge, delete, forget).
    pub(super) find: BTreeSet<ClientId>,
    /// Topics the group publishes to.
    pub(super) topics: BTreeSet<Topic>,
    /// Client numbers known already (acks).
    pub(super) cids: BTreeSet<u64>,
}

impl Touches {
    pub(super) fn of(work: &[Command]) -> Touches {
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

/// The writer's state; lives on its own thread's runtime.
pub(super) struct PgWriter {
    pub(super) target: Target,
    client: Option<Client>,
    /// The hot statements, prepared on `client` (once the schema is there).
    prepared: Option<Arc<Prepared>>,
    /// The schema is migrated: statements on it can be prepared.
    migrated: bool,
    pub(super) opts: StoreOptions,
    live: Arc<Live>,
    handles: Handles,
    pub(super) latched: Arc<AtomicBool>,
    unavailable: Arc<AtomicBool>,
    /// Client numbers by name (a name's number never changes).
    pub(super) cids: HashMap<ClientId, u64>,
    /// Commands a full group left for the next one, in arrival order.
    carry: Vec<Command>,
    /// Message ids left in the block this broker took.
    pub(super) ids: std::ops::Range<u64>,
    /// Retention passes so far.
    pub(super) sweeps: u32,
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
    pub(super) async fn connection(&mut self) -> Result<&mut Client, StoreError> {
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
    pub(super) fn broke(&mut self, e: &Pg) {
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
        // What a kill of this broker now would undo: the group, until its transaction ends.
        self.opts.metrics.writes_not_durable.set(work.len() as u64);
        let result = match self.connection().await {
            Ok(_) => self.transaction(work, latched, relaxed, &mut fx).await,
            // Nothing was applied: every command is refused with the reason.
            Err(e) => Err((e, work_into_pending(work))),
        };
        self.opts.metrics.writes_not_durable.set(0);
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
        let Some(client) = self.client.as_ref() else {
            return;
        };
        super::wake::notify(client, fx.wake, kicks).await;
    }
}
