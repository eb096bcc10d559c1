//! The workloads. Each case starts its broker on a fresh temp data dir, connects durable
//! subscribers and one publisher, runs, waits for every confirmed message to be delivered, and
//! checks per seq that none was lost.
//!
//! - Closed loop (saturation, fan-out): the publisher keeps at most `PUBLISH_WINDOW` publishes
//!   unconfirmed and at most `E2E_WINDOW` messages undelivered to the slowest subscriber, so the
//!   figure is delivered messages per second, not a growing backlog.
//! - Open loop (latency): message i is due at `start + i / rate`; its body carries that
//!   intended time and latency is measured from it, so a stalled publisher or broker shows up
//!   in the latency instead of silently lowering the offered rate (no coordinated omission).
//!   A pacer thread sleeps until each message is due and records how late it was (`send_lag`).
//! - Open loop, many pairs (pairs): N publishers, each with its own durable subscriber, each
//!   sending one message per `PAIR_PERIOD`, their schedules spread evenly over the period, so
//!   the broker sees N connections' worth of small, steady traffic at N msg/s in total.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::adapters::{self, Publisher, Route, Subscriber};
use crate::brokers::{self, Deployment, FsyncCounter, Paths, Protocol, System, Tuning};
use crate::msg;
use crate::pg;
use crate::stats::{new_histogram, Gate, PubStats, SubStats};

/// Unconfirmed publishes a closed-loop publisher may have (outboxd's client pipelines freely;
/// this keeps every system's client alike).
pub const PUBLISH_WINDOW: usize = 1024;
/// Published-but-undelivered messages (to the slowest subscriber) a closed-loop publisher may have.
pub const E2E_WINDOW: u64 = 10_000;
/// How long to wait for stragglers after the publisher stops, without progress.
const DRAIN_STALL: Duration = Duration::from_secs(15);
/// In the pairs workload, each publisher sends one message per period.
pub const PAIR_PERIOD: Duration = Duration::from_secs(1);
/// The pairs workload's offered load, msg/s, for `pairs` pairs.
pub fn pairs_offered_rate(pairs: usize) -> u64 {
    (pairs as f64 / PAIR_PERIOD.as_secs_f64()).round() as u64
}

/// Connections being set up at once in the pairs workload.
const CONNECT_CONCURRENCY: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Saturation,
    Latency,
    Fanout,
    /// N publisher → subscriber pairs, one message per pair per [`PAIR_PERIOD`], open loop.
    Pairs,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseSpec {
    pub workload: Workload,
    pub size: usize,
    /// Offered rate for open-loop cases; `None`: as fast as the window allows.
    pub rate: Option<u64>,
    pub subscribers: usize,
    pub warmup_s: f64,
    pub measure_s: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// The broker process over the measured window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BrokerUse {
    /// Percent of one core (200 = both cores of this machine).
    pub cpu_pct: f64,
    pub rss_max_mib: f64,
    pub write_mib_per_s: f64,
    /// Bytes the broker wrote to disk (/proc/PID/io write_bytes) per delivered message.
    pub write_bytes_per_delivery: f64,
    /// fsync + fdatasync calls per second (perf stat on the syscall tracepoints), if counted.
    pub fsyncs_per_s: Option<f64>,
    /// outboxd only: commit groups per second (each one fdatasync), from its /metrics
    /// (summed over the brokers).
    pub commit_groups_per_s: Option<f64>,
    /// outboxd on PostgreSQL: CPU of both PostgreSQL servers' processes, percent of one core.
    #[serde(default)]
    pub db_cpu_pct: Option<f64>,
    /// outboxd on PostgreSQL: fsync + fdatasync calls per second of both servers' processes.
    #[serde(default)]
    pub db_fsyncs_per_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseResult {
    pub system: System,
    #[serde(flatten)]
    pub spec: CaseSpec,
    pub rep: usize,
    /// Deliveries per second to all subscribers together, in the measured window.
    pub delivered_per_s: f64,
    /// Confirmed publishes per second in the measured window.
    pub confirmed_per_s: f64,
    pub published: u64,
    pub confirmed: u64,
    pub errors: u64,
    /// Distinct messages delivered, summed over subscribers (should be published x subscribers).
    pub delivered: u64,
    pub duplicates: u64,
    /// Confirmed messages some subscriber never got (summed over subscribers).
    pub lost: u64,
    pub latency: Latency,
    /// Fixed-rate cases: how late the pacer handed each message to the client, after its
    /// intended send time (already part of `latency`; shows what the load generator adds).
    #[serde(default)]
    pub send_lag: Option<Latency>,
    pub broker: BrokerUse,
    /// Pairs workload: client connections (publishers and subscribers) that were established.
    #[serde(default)]
    pub connections: Option<usize>,
    pub failure: Option<String>,
}

impl CaseResult {
    pub fn ok(&self) -> bool {
        self.failure.is_none() && self.lost == 0 && self.errors == 0
    }
}

pub struct Env {
    pub paths: Paths,
    pub clk_tck: u64,
    pub perf: bool,
    /// The PostgreSQL the `outboxd-pg` systems store in, when the run has one of them.
    pub pg: Option<pg::Cluster>,
}

impl Env {
    /// Starts `system` on `dir` (a PostgreSQL system on a fresh database of the run's cluster).
    fn deploy(&self, system: System, dir: &Path, tuning: &Tuning) -> Result<Deployment<'_>> {
        Deployment::start(system, dir, &self.paths, tuning, self.pg.as_ref())
    }

    /// The PostgreSQL servers' postmasters, when `system` stores in them.
    fn postmasters(&self, system: System) -> Vec<u32> {
        match &self.pg {
            Some(c) if system.uses_postgres() => c.postmasters(),
            _ => Vec::new(),
        }
    }
}

/// Errors, deliveries and duplicates of a case, from its publishers and subscribers.
fn tally(r: &mut CaseResult, pubs: &PubStats, stats: &[Arc<SubStats>]) {
    r.errors = pubs.errors.load(Ordering::Relaxed);
    r.delivered = stats.iter().map(|s| s.unique.load(Ordering::Relaxed)).sum();
    r.duplicates = stats
        .iter()
        .map(|s| s.duplicates.load(Ordering::Relaxed))
        .sum();
}

/// Marks a case failed on a publish error or a delivery the bench did not send.
fn note_failures(r: &mut CaseResult, pubs: &PubStats, stats: &[Arc<SubStats>]) {
    if let Some(e) = pubs.last_error() {
        r.failure = Some(format!("publish error: {e}"));
    }
    let foreign: u64 = stats
        .iter()
        .map(|s| s.foreign.load(Ordering::Relaxed))
        .sum();
    if foreign > 0 {
        r.failure = Some(format!("{foreign} deliveries the bench did not send"));
    }
}

fn latency_of(subs: &[Arc<SubStats>]) -> Latency {
    let mut h = new_histogram();
    for s in subs {
        let _ = h.add(s.histogram());
    }
    latency_from(&h)
}

fn latency_from(h: &Histogram<u64>) -> Latency {
    Latency {
        count: h.len(),
        p50_us: h.value_at_quantile(0.5),
        p90_us: h.value_at_quantile(0.9),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
    }
}

async fn sleep_until_ns(t: u64) {
    let now = msg::now_ns();
    if t > now {
        tokio::time::sleep(Duration::from_nanos(t - now)).await;
    }
}

/// Connects `n` subscribers, a few at a time, subscriber i to the deployment's broker for it.
async fn connect_subscribers(
    system: System,
    brokers: &Deployment<'_>,
    stats: &[Arc<SubStats>],
    route: Route,
) -> Result<Vec<Subscriber>> {
    let mut subs = Vec::with_capacity(stats.len());
    for chunk in stats.chunks(16).enumerate() {
        let (c, group) = chunk;
        let mut joins = Vec::new();
        for (i, s) in group.iter().enumerate() {
            let name = format!("sub-{}", c * 16 + i);
            let endpoint = brokers.subscriber_endpoint(c * 16 + i).to_string();
            let s = Arc::clone(s);
            joins.push(tokio::spawn(async move {
                adapters::subscriber(system, &endpoint, &name, route, s).await
            }));
        }
        for j in joins {
            subs.push(j.await??);
        }
    }
    Ok(subs)
}

/// Waits until every confirmed message reached every subscriber, or progress stops.
async fn drain(pubs: &PubStats, gate: &Gate, sent: u64) {
    wait_for_drain(|| {
        let answered = pubs.confirmed.load(Ordering::Relaxed) + pubs.errors.load(Ordering::Relaxed);
        let slowest = gate.slowest();
        (answered >= sent && slowest >= sent, (answered, slowest))
    })
    .await;
}

/// Polls `check` (done, progress) until it says done or its progress stops changing for
/// `DRAIN_STALL`.
async fn wait_for_drain(mut check: impl FnMut() -> (bool, (u64, u64))) {
    let mut last = (u64::MAX, u64::MAX);
    let mut since = tokio::time::Instant::now();
    loop {
        let (done, progress) = check();
        if done {
            return;
        }
        if progress != last {
            last = progress;
            since = tokio::time::Instant::now();
        } else if since.elapsed() > DRAIN_STALL {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Window {
    delivered: u64,
    confirmed: u64,
    /// The brokers' processes, summed.
    proc_: brokers::ProcSample,
    commits: Option<u64>,
    /// The PostgreSQL servers' processes (empty when the system does not use them).
    db_ticks: BTreeMap<u32, u64>,
}

pub async fn run_case(env: &Env, system: System, spec: &CaseSpec, rep: usize) -> CaseResult {
    let mut result = CaseResult {
        system,
        spec: spec.clone(),
        rep,
        delivered_per_s: 0.0,
        confirmed_per_s: 0.0,
        published: 0,
        confirmed: 0,
        errors: 0,
        delivered: 0,
        duplicates: 0,
        lost: 0,
        latency: Latency::default(),
        send_lag: None,
        broker: BrokerUse::default(),
        connections: None,
        failure: None,
    };
    let body = match spec.workload {
        Workload::Pairs => pairs_body(env, system, spec, &mut result).await,
        Workload::Saturation | Workload::Latency | Workload::Fanout => {
            case_body(env, system, spec, &mut result).await
        }
    };
    if let Err(e) = body {
        result.failure = Some(format!("{e:#}"));
    }
    result
}

/// The broker and the deliveries at the two edges of the measured window, and in between.
struct Measured {
    a: Window,
    b: Window,
    rss_max_kib: u64,
    fsyncs: Option<u64>,
    db_fsyncs: Option<u64>,
}

impl Measured {
    /// The window's length as the samples saw it (`fallback_s` if they have no time).
    fn secs(&self, fallback_s: f64) -> f64 {
        self.a
            .proc_
            .at
            .zip(self.b.proc_.at)
            .map(|(x, y)| y.duration_since(x).as_secs_f64())
            .unwrap_or(fallback_s)
            .max(1e-3)
    }

    /// Fills in the per-second figures of `r` and its broker's use.
    fn fill(&self, env: &Env, r: &mut CaseResult) {
        let (a, b) = (&self.a, &self.b);
        let secs = self.secs(r.spec.measure_s);
        r.delivered_per_s = (b.delivered - a.delivered) as f64 / secs;
        r.confirmed_per_s = (b.confirmed - a.confirmed) as f64 / secs;
        let delivered_in_window = (b.delivered - a.delivered).max(1) as f64;
        let written = b.proc_.write_bytes.saturating_sub(a.proc_.write_bytes) as f64;
        r.broker = BrokerUse {
            cpu_pct: 100.0 * b.proc_.cpu_ticks.saturating_sub(a.proc_.cpu_ticks) as f64
                / env.clk_tck as f64
                / secs,
            rss_max_mib: self.rss_max_kib as f64 / 1024.0,
            write_mib_per_s: written / secs / (1024.0 * 1024.0),
            write_bytes_per_delivery: written / delivered_in_window,
            fsyncs_per_s: self.fsyncs.map(|n| n as f64 / secs),
            commit_groups_per_s: a
                .commits
                .zip(b.commits)
                .map(|(x, y)| y.saturating_sub(x) as f64 / secs),
            // A process that started inside the window spent all its time in it.
            db_cpu_pct: (!b.db_ticks.is_empty()).then(|| {
                let ticks: u64 = b
                    .db_ticks
                    .iter()
                    .map(|(pid, t)| t.saturating_sub(a.db_ticks.get(pid).copied().unwrap_or(0)))
                    .sum();
                100.0 * ticks as f64 / env.clk_tck as f64 / secs
            }),
            db_fsyncs_per_s: self.db_fsyncs.map(|n| n as f64 / secs),
        };
    }
}

/// Starts the measuring task: snapshots at the window's edges (`warm_end`, `end`), the
/// broker's RSS peak in between, its fsync calls if perf can count them.
#[allow(clippy::too_many_arguments)]
fn measure(
    env: &Env,
    brokers: &Deployment<'_>,
    dir: &Path,
    stats: &[Arc<SubStats>],
    pubs: &Arc<PubStats>,
    warm_end: u64,
    end: u64,
) -> tokio::task::JoinHandle<Measured> {
    let stats = stats.to_vec();
    let pubs = Arc::clone(pubs);
    let pids = brokers.pids();
    let admins = brokers.admins();
    let postmasters = env.postmasters(brokers.system);
    let perf = env.perf;
    let fsync_out = dir.join("perf-fsync.csv");
    let db_fsync_out = dir.join("perf-fsync-db.csv");
    tokio::spawn(async move {
        // The servers' processes are listed at each edge: a backend started inside the window
        // spent all its time in it.
        let snap = |stats: &[Arc<SubStats>], db_pids: &[u32]| Window {
            delivered: stats.iter().map(|s| s.unique.load(Ordering::Relaxed)).sum(),
            confirmed: pubs.confirmed.load(Ordering::Relaxed),
            proc_: brokers::sample_all(&pids),
            commits: admins
                .iter()
                .map(|a| commit_groups(a))
                .sum::<Option<u64>>()
                .filter(|_| !admins.is_empty()),
            db_ticks: brokers::cpu_ticks_by_pid(db_pids),
        };
        sleep_until_ns(warm_end).await;
        let db_pids = pg::processes_of(&postmasters);
        let (counter, db_counter) = if perf {
            (
                FsyncCounter::start(&pids, fsync_out),
                FsyncCounter::start(&db_pids, db_fsync_out),
            )
        } else {
            (None, None)
        };
        let a = snap(&stats, &db_pids);
        let mut rss_max = a.proc_.rss_kib;
        while msg::now_ns() + 200_000_000 < end {
            tokio::time::sleep(Duration::from_millis(200)).await;
            rss_max = rss_max.max(brokers::sample_all(&pids).rss_kib);
        }
        sleep_until_ns(end).await;
        let b = snap(&stats, &pg::processes_of(&postmasters));
        let fsyncs = counter.and_then(|c| c.finish());
        let db_fsyncs = db_counter.and_then(|c| c.finish());
        let rss_max_kib = rss_max.max(b.proc_.rss_kib);
        Measured {
            a,
            b,
            rss_max_kib,
            fsyncs,
            db_fsyncs,
        }
    })
}

async fn case_body(env: &Env, system: System, spec: &CaseSpec, r: &mut CaseResult) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("outboxd-bench-")
        .tempdir()?;
    let broker = env.deploy(system, dir.path(), &Tuning::default())?;
    adapters::setup(system, broker.endpoint()).await?;

    let notify = Arc::new(Notify::new());
    let stats: Vec<Arc<SubStats>> = (0..spec.subscribers)
        .map(|_| SubStats::new(Arc::clone(&notify)))
        .collect();
    let route = if spec.subscribers == 1 {
        Route::One
    } else {
        Route::All
    };
    let subs = connect_subscribers(system, &broker, &stats, route).await?;
    let window = if spec.rate.is_some() {
        // Open loop never waits for confirmations.
        1 << 30
    } else {
        PUBLISH_WINDOW
    };
    let pubs = PubStats::new(window);
    let publisher = Publisher::connect(
        system,
        broker.publisher_endpoint(0),
        "bench-pub",
        route,
        Arc::clone(&pubs),
    )
    .await?;
    let gate = Gate {
        subs: stats.clone(),
        notify,
    };

    let t0 = msg::now_ns();
    let warm_end = t0 + (spec.warmup_s * 1e9) as u64;
    let end = warm_end + (spec.measure_s * 1e9) as u64;
    for s in &stats {
        s.record_from_ns.store(warm_end, Ordering::Relaxed);
        s.record_until_ns.store(end, Ordering::Relaxed);
    }

    let measuring = measure(env, &broker, dir.path(), &stats, &pubs, warm_end, end);

    let mut send_lag = new_histogram();
    let sent = send_loop(
        &publisher,
        &pubs,
        &gate,
        spec,
        (t0, warm_end, end),
        &mut send_lag,
    )
    .await;
    r.published = sent;
    if spec.rate.is_some() {
        r.send_lag = Some(latency_from(&send_lag));
    }
    let measured = measuring.await?;

    drain(&pubs, &gate, sent).await;
    r.confirmed = pubs.confirmed.load(Ordering::Relaxed);
    tally(r, &pubs, &stats);
    r.lost = stats.iter().map(|s| s.missing_below(sent)).sum();
    r.latency = latency_of(&stats);
    measured.fill(env, r);

    note_failures(r, &pubs, &stats);
    drop(publisher);
    drop(subs);
    broker.stop(true)?;
    Ok(())
}

fn commit_groups(admin: &str) -> Option<u64> {
    // Blocking HTTP on loopback, a few hundred microseconds: acceptable at the window's edges.
    tokio::task::block_in_place(|| brokers::commit_groups_at(admin))
}

/// Publishes until `end`; returns how many messages were handed to the client. At a fixed rate,
/// records in `send_lag` how late each message due from `record_from` on left the pacer.
async fn send_loop(
    publisher: &Publisher,
    pubs: &PubStats,
    gate: &Gate,
    spec: &CaseSpec,
    (t0, record_from, end): (u64, u64, u64),
    send_lag: &mut Histogram<u64>,
) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_nanos(end - msg::now_ns());
    let mut seq = 0u64;
    match spec.rate {
        None => loop {
            if msg::now_ns() >= end {
                break;
            }
            if seq.saturating_sub(gate.slowest()) >= E2E_WINDOW {
                tokio::select! {
                    _ = gate.wait_below(seq, E2E_WINDOW) => {}
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            let permit = match pubs.window.try_acquire() {
                Ok(p) => p,
                Err(_) => tokio::select! {
                    p = pubs.window.acquire() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                },
            };
            permit.forget();
            if let Err(e) = publisher
                .send(msg::make(spec.size, msg::now_ns(), seq))
                .await
            {
                pubs.fail(e.to_string());
                break;
            }
            seq += 1;
            pubs.sent.store(seq, Ordering::Relaxed);
        },
        Some(rate) => {
            // tokio's timer has a 1 ms resolution: woken by it, a message due 0.2 ms after a
            // tick leaves up to a millisecond late, and that lateness would count against every
            // system alike. The pacer sleeps on this thread instead (nanosleep, tens of
            // microseconds late), with the runtime's other tasks moved off it meanwhile.
            let interval = 1e9 / rate as f64;
            let handle = tokio::runtime::Handle::current();
            tokio::task::block_in_place(|| loop {
                let intended = t0 + (seq as f64 * interval) as u64;
                if intended >= end {
                    break;
                }
                let now = msg::now_ns();
                if intended > now {
                    std::thread::sleep(Duration::from_nanos(intended - now));
                }
                if intended >= record_from {
                    let lag_us = msg::now_ns().saturating_sub(intended) / 1_000;
                    let _ = send_lag.record(lag_us.max(1));
                }
                if let Err(e) = handle.block_on(publisher.send(msg::make(spec.size, intended, seq)))
                {
                    pubs.fail(e.to_string());
                    break;
                }
                seq += 1;
                pubs.sent.store(seq, Ordering::Relaxed);
            });
        }
    }
    seq
}

// ---------------------------------------------------------------------------------------------
// Many point-to-point pairs

/// Runs `connect(i)` for every `i` in `0..n`, [`CONNECT_CONCURRENCY`] at a time. Returns what
/// connected, in index order (`None` where it failed), and the first failure.
async fn connect_many<T, F, Fut>(n: usize, connect: F) -> (Vec<Option<T>>, Option<anyhow::Error>)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let results: Vec<Result<T>> = futures_util::stream::iter(0..n)
        .map(connect)
        .buffered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    let mut first = None;
    let mut out = Vec::with_capacity(n);
    for r in results {
        match r {
            Ok(t) => out.push(Some(t)),
            Err(e) => {
                first.get_or_insert(e);
                out.push(None);
            }
        }
    }
    (out, first)
}

/// Waits until every publish is answered and every subscriber has every message its
/// publisher sent (`sent[i]` for pair `i`), or progress stops.
async fn drain_pairs(pubs: &PubStats, stats: &[Arc<SubStats>], sent: &[u64]) {
    let total: u64 = sent.iter().sum();
    wait_for_drain(|| {
        let answered = pubs.confirmed.load(Ordering::Relaxed) + pubs.errors.load(Ordering::Relaxed);
        let delivered: u64 = stats.iter().map(|s| s.unique.load(Ordering::Acquire)).sum();
        let complete = stats
            .iter()
            .zip(sent)
            .all(|(s, k)| s.unique.load(Ordering::Acquire) >= *k);
        (answered >= total && complete, (answered, delivered))
    })
    .await;
}

/// `spec.subscribers` pairs: publisher `pub-i` sends only to its durable subscriber `sub-i`,
/// one message per [`PAIR_PERIOD`], open loop; pair i's schedule is offset by i/N of the
/// period, so the offered load is N evenly spaced messages per period. Each message carries
/// its intended send time (no coordinated omission) and its pair's seq; loss is checked per
/// pair.
async fn pairs_body(env: &Env, system: System, spec: &CaseSpec, r: &mut CaseResult) -> Result<()> {
    let n = spec.subscribers;
    let dir = tempfile::Builder::new()
        .prefix("outboxd-bench-")
        .tempdir()?;
    let broker = env.deploy(system, dir.path(), &Tuning::default())?;
    adapters::setup(system, broker.endpoint()).await?;

    let notify = Arc::new(Notify::new());
    let hist = Arc::new(Mutex::new(new_histogram()));
    let stats: Vec<Arc<SubStats>> = (0..n)
        .map(|_| SubStats::sharing(Arc::clone(&notify), Arc::clone(&hist)))
        .collect();
    // Open loop never waits for confirmations.
    let pubs = PubStats::new(1 << 30);
    let brokers = &broker;
    // Subscribers first, so each durable subscription exists before its publisher sends.
    let (subs, sub_failure) = connect_many(n, |i| {
        let s = Arc::clone(&stats[i]);
        async move {
            let endpoint = brokers.subscriber_endpoint(i);
            adapters::subscriber(system, endpoint, &format!("sub-{i}"), Route::Pair(i), s).await
        }
    })
    .await;
    let (publishers, pub_failure) = connect_many(n, |i| {
        let p = Arc::clone(&pubs);
        async move {
            let endpoint = brokers.publisher_endpoint(i);
            Publisher::connect(system, endpoint, &format!("pub-{i}"), Route::Pair(i), p).await
        }
    })
    .await;
    let established = subs.iter().flatten().count() + publishers.iter().flatten().count();
    r.connections = Some(established);
    if let Some(e) = sub_failure.or(pub_failure) {
        bail!(
            "{established} of {} connections established; the first failure: {e:#}",
            2 * n
        );
    }

    let period_ns = u64::try_from(PAIR_PERIOD.as_nanos()).unwrap_or(u64::MAX);
    let pairs = u64::try_from(n.max(1))?;
    // A little lead, so the first messages are not late before their tasks even start.
    let t0 = msg::now_ns() + 20_000_000;
    let warm_end = t0 + (spec.warmup_s * 1e9) as u64;
    let end = warm_end + (spec.measure_s * 1e9) as u64;
    for s in &stats {
        s.record_from_ns.store(warm_end, Ordering::Relaxed);
        s.record_until_ns.store(end, Ordering::Relaxed);
    }
    let measuring = measure(env, &broker, dir.path(), &stats, &pubs, warm_end, end);

    // One task per publisher, as each pair is its own application: a stalled publisher delays
    // only its own messages (and their latency shows it).
    let mut senders = Vec::with_capacity(n);
    for (i, publisher) in (0u64..).zip(publishers.into_iter().flatten()) {
        let pubs = Arc::clone(&pubs);
        let offset = period_ns / pairs * i;
        let size = spec.size;
        senders.push(tokio::spawn(async move {
            let mut seq = 0u64;
            loop {
                let intended = t0 + offset + seq * period_ns;
                if intended >= end {
                    break;
                }
                sleep_until_ns(intended).await;
                if let Err(e) = publisher.send(msg::make(size, intended, seq)).await {
                    pubs.fail(e.to_string());
                    break;
                }
                seq += 1;
                pubs.sent.fetch_add(1, Ordering::Relaxed);
            }
            (publisher, seq)
        }));
    }
    let mut sent = Vec::with_capacity(n);
    let mut publishers = Vec::with_capacity(n);
    for t in senders {
        let (p, k) = t.await?;
        publishers.push(p);
        sent.push(k);
    }
    r.published = sent.iter().sum();
    let measured = measuring.await?;

    drain_pairs(&pubs, &stats, &sent).await;
    r.confirmed = pubs.confirmed.load(Ordering::Relaxed);
    tally(r, &pubs, &stats);
    r.lost = stats
        .iter()
        .zip(&sent)
        .map(|(s, k)| s.missing_below(*k))
        .sum();
    r.latency = hist.lock().map(|h| latency_from(&h)).unwrap_or_default();
    measured.fill(env, r);

    note_failures(r, &pubs, &stats);
    drop(publishers);
    drop(subs);
    broker.stop(true)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Idle connections

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdleResult {
    pub system: System,
    pub connections: usize,
    pub heartbeat_ms: u64,
    pub hold_s: f64,
    pub connected: usize,
    pub handshakes_per_s: f64,
    pub rss_before_mib: f64,
    pub rss_after_mib: f64,
    pub rss_per_connection_kib: f64,
    /// Broker CPU while idle (heartbeats only), percent of one core.
    pub idle_cpu_pct: f64,
    /// Connections that dropped during the hold (should be 0).
    pub dropped: usize,
    pub failure: Option<String>,
}

pub async fn run_idle(env: &Env, system: System, n: usize, hold: Duration) -> IdleResult {
    let heartbeat_ms = 5_000;
    let mut r = IdleResult {
        system,
        connections: n,
        heartbeat_ms,
        hold_s: hold.as_secs_f64(),
        ..IdleResult::default()
    };
    wait_for_ports(n).await;
    if let Err(e) = idle_body(env, system, n, hold, heartbeat_ms, &mut r).await {
        r.failure = Some(format!("{e:#}"));
    }
    r
}

/// Waits (up to 90 s) until the local port range has room for `n` more loopback connections
/// beside the sockets still in TIME-WAIT from the cases before: closed connections hold their
/// client port for a minute, and an idle case of many connections would otherwise run out.
async fn wait_for_ports(n: usize) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|x| x.parse::<usize>().ok());
            Some(it.next()??..=it.next()??)
        })
        .map_or(28_232, |r| r.count());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let waiting = time_wait_sockets();
        // Room to spare for the harness's own other connections and for sockets that enter
        // TIME-WAIT between this check and the last connect (1 000 was not enough after the
        // pairs workload).
        if waiting + n + 3_000 <= range || tokio::time::Instant::now() >= deadline {
            return;
        }
        eprintln!(
            "    waiting for {waiting} sockets in TIME-WAIT to clear before {n} idle connections"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Sockets in TIME-WAIT on this host (state 06 in /proc/net/tcp and tcp6).
fn time_wait_sockets() -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|t| {
            t.lines()
                .skip(1)
                .filter(|l| l.split_whitespace().nth(3) == Some("06"))
                .count()
        })
        .sum()
}

async fn idle_body(
    env: &Env,
    system: System,
    n: usize,
    hold: Duration,
    heartbeat_ms: u64,
    r: &mut IdleResult,
) -> Result<()> {
    use std::sync::atomic::AtomicUsize;
    let dir = tempfile::Builder::new()
        .prefix("outboxd-bench-")
        .tempdir()?;
    let tuning = Tuning {
        heartbeat_ms: Some(heartbeat_ms),
    };
    let broker = env.deploy(system, dir.path(), &tuning)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pids = broker.pids();
    let before = brokers::sample_all(&pids);
    let hb = Duration::from_millis(heartbeat_ms);
    let connected = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let permits = Arc::new(tokio::sync::Semaphore::new(64));
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let endpoint = broker.subscriber_endpoint(i).to_string();
        let connected = Arc::clone(&connected);
        let dropped = Arc::clone(&dropped);
        let permits = Arc::clone(&permits);
        tasks.push(tokio::spawn(async move {
            let name = format!("idle-{i}");
            let Ok(permit) = permits.acquire_owned().await else {
                return;
            };
            idle_client(system, &endpoint, &name, hb, permit, &connected, &dropped).await;
        }));
    }
    // Wait for every handshake (or a minute without progress).
    let mut last = 0;
    let mut since = tokio::time::Instant::now();
    while connected.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let c = connected.load(Ordering::Relaxed);
        if c != last {
            last = c;
            since = tokio::time::Instant::now();
        } else if since.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    let took = started.elapsed().as_secs_f64();
    r.connected = connected.load(Ordering::Relaxed);
    r.handshakes_per_s = r.connected as f64 / took;
    let mid = brokers::sample_all(&pids);
    tokio::time::sleep(hold).await;
    let after = brokers::sample_all(&pids);
    r.rss_before_mib = before.rss_kib as f64 / 1024.0;
    r.rss_after_mib = after.rss_kib as f64 / 1024.0;
    r.rss_per_connection_kib =
        after.rss_kib.saturating_sub(before.rss_kib) as f64 / r.connected.max(1) as f64;
    r.idle_cpu_pct = 100.0 * after.cpu_ticks.saturating_sub(mid.cpu_ticks) as f64
        / env.clk_tck as f64
        / hold.as_secs_f64();
    r.dropped = dropped.load(Ordering::Relaxed);
    if r.connected < n {
        r.failure = Some(format!("only {} of {n} connections were made", r.connected));
    }
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    broker.stop(true)?;
    Ok(())
}

/// One idle client: connects (holding `permit` for the handshake only), then keeps the
/// connection alive with heartbeats until aborted.
async fn idle_client(
    system: System,
    endpoint: &str,
    name: &str,
    hb: Duration,
    permit: tokio::sync::OwnedSemaphorePermit,
    connected: &std::sync::atomic::AtomicUsize,
    dropped: &std::sync::atomic::AtomicUsize,
) {
    use outboxd::client::{Event as OEvent, Incoming};
    match system.protocol() {
        Protocol::Outboxd => {
            let Ok(mut client) = Client::builder(endpoint, name)
                .connect_timeout(Some(Duration::from_secs(60)))
                .connect()
                .await
            else {
                return;
            };
            connected.fetch_add(1, Ordering::Relaxed);
            drop(permit);
            while let Some(item) = client.next().await {
                if let Incoming::Event(OEvent::Disconnected { .. }) = item {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Protocol::Mqtt => {
            let Ok(mut opts) = adapters::mqtt_connect_options(endpoint, name) else {
                return;
            };
            opts.set_keep_alive(hb);
            let (_client, mut ev) = rumqttc::AsyncClient::new(opts, 8);
            let mut permit = Some(permit);
            let mut up = false;
            loop {
                match ev.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        if !up {
                            up = true;
                            connected.fetch_add(1, Ordering::Relaxed);
                        }
                        permit.take();
                    }
                    Ok(_) => {}
                    Err(_) => {
                        if up {
                            dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
        Protocol::Nats => {
            let Ok(client) = async_nats::ConnectOptions::new()
                .ping_interval(hb)
                .connect(endpoint)
                .await
            else {
                return;
            };
            connected.fetch_add(1, Ordering::Relaxed);
            drop(permit);
            loop {
                tokio::time::sleep(hb).await;
                if client.connection_state() != async_nats::connection::State::Connected {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Protocol::Redis => {
            // RESP has no heartbeat of its own: the client PINGs every interval.
            let Ok(mut conn) = crate::resp::Conn::open(endpoint).await else {
                return;
            };
            if conn.call(&["PING"]).await.is_err() {
                return;
            }
            connected.fetch_add(1, Ordering::Relaxed);
            drop(permit);
            loop {
                tokio::time::sleep(hb).await;
                if conn.call(&["PING"]).await.is_err() {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        Protocol::Amqp => {
            // AMQP heartbeats at the interval asked for in the URI (lapin sends them from its
            // connection's own I/O thread); small frames, as lapin's buffers are 32 frames.
            let uri =
                adapters::amqp_small_uri(endpoint, &format!("heartbeat={}", hb.as_secs().max(1)));
            let Ok(conn) =
                lapin::Connection::connect(&uri, lapin::ConnectionProperties::default()).await
            else {
                return;
            };
            connected.fetch_add(1, Ordering::Relaxed);
            drop(permit);
            loop {
                tokio::time::sleep(hb).await;
                if !conn.status().connected() {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

use outboxd::client::Client;

// ---------------------------------------------------------------------------------------------
// Offline backlog, restart, drain

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BacklogResult {
    pub system: System,
    pub messages: u64,
    pub size: usize,
    /// How the broker was stopped between publishing and draining.
    pub restart: String,
    pub publish_per_s: f64,
    pub disk_mib: f64,
    /// From spawning the restarted broker to it accepting connections.
    pub ready_ms: f64,
    /// From spawning the restarted broker to the first delivery (subscriber connecting as soon
    /// as the broker accepts).
    pub first_delivery_ms: Option<f64>,
    pub drain_s: f64,
    pub drain_per_s: f64,
    pub delivered: u64,
    pub lost: u64,
    pub rss_after_restart_mib: f64,
    pub failure: Option<String>,
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_size(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

pub async fn run_backlog(
    env: &Env,
    system: System,
    n: u64,
    size: usize,
    kill: bool,
) -> BacklogResult {
    let mut r = BacklogResult {
        system,
        messages: n,
        size,
        restart: if kill { "SIGKILL" } else { "SIGTERM" }.into(),
        ..BacklogResult::default()
    };
    if let Err(e) = backlog_body(env, system, n, size, kill, &mut r).await {
        r.failure = Some(format!("{e:#}"));
    }
    r
}

async fn backlog_body(
    env: &Env,
    system: System,
    n: u64,
    size: usize,
    kill: bool,
    r: &mut BacklogResult,
) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("outboxd-bench-")
        .tempdir()?;
    let mut broker = env.deploy(system, dir.path(), &Tuning::default())?;
    adapters::setup(system, broker.endpoint()).await?;
    adapters::register_offline(system, broker.subscriber_endpoint(0), "sub-0", Route::One).await?;

    let pubs = PubStats::new(PUBLISH_WINDOW);
    let publisher = Publisher::connect(
        system,
        broker.publisher_endpoint(0),
        "bench-pub",
        Route::One,
        Arc::clone(&pubs),
    )
    .await?;
    let t = msg::now_ns();
    for seq in 0..n {
        pubs.window.acquire().await?.forget();
        publisher.send(msg::make(size, msg::now_ns(), seq)).await?;
    }
    // Every publish confirmed (or failed).
    let until = tokio::time::Instant::now() + Duration::from_secs(120);
    while pubs.confirmed.load(Ordering::Relaxed) + pubs.errors.load(Ordering::Relaxed) < n {
        if tokio::time::Instant::now() > until {
            return Err(anyhow!("publishes not confirmed within 120 s"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    r.publish_per_s = n as f64 / ((msg::now_ns() - t) as f64 / 1e9);
    if let Some(e) = pubs.last_error() {
        return Err(anyhow!("publish error: {e}"));
    }
    drop(publisher);
    r.disk_mib = dir_size(dir.path()) as f64 / (1024.0 * 1024.0);
    broker.stop_brokers(kill)?;

    let t0 = msg::now_ns();
    broker.start_again(dir.path(), &env.paths, &Tuning::default())?;
    r.ready_ms = broker.ready_after().as_secs_f64() * 1e3;
    let notify = Arc::new(Notify::new());
    let stats = SubStats::new(notify);
    let sub = adapters::subscriber(
        system,
        broker.subscriber_endpoint(0),
        "sub-0",
        Route::One,
        Arc::clone(&stats),
    )
    .await?;
    // Drain until all arrived or nothing new for a while.
    let mut last = 0;
    let mut since = tokio::time::Instant::now();
    loop {
        let got = stats.unique.load(Ordering::Relaxed);
        if got >= n {
            break;
        }
        if got != last {
            last = got;
            since = tokio::time::Instant::now();
        } else if since.elapsed() > Duration::from_secs(10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r.rss_after_restart_mib = brokers::sample_all(&broker.pids()).rss_kib as f64 / 1024.0;
    r.delivered = stats.unique.load(Ordering::Relaxed);
    r.lost = stats.missing_below(n);
    let first = stats.first_ns.load(Ordering::Relaxed);
    let lastd = stats.last_ns.load(Ordering::Relaxed);
    if first > 0 {
        r.first_delivery_ms = Some((first - t0) as f64 / 1e6);
        r.drain_s = (lastd.saturating_sub(first)) as f64 / 1e9;
        r.drain_per_s = r.delivered as f64 / r.drain_s.max(1e-3);
    }
    drop(sub);
    broker.stop(true)?;
    Ok(())
}
