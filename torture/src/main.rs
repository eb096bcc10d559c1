//! `outboxd-torture`: runs the real broker under faults and checks that no confirmed message is
//! lost, invented, reordered or handed to an application twice.
//!
//! For a duration and a seed it runs publishers (direct and topic publishes with idempotency
//! keys, retried by the client library across reconnects) and consumers (resuming, acking, some
//! acking late, some dying before they ack) through a fault proxy ([`proxy`]), while a fault
//! schedule switches toxics on and off, SIGKILLs and restarts the broker (and sometimes stops
//! it with SIGTERM). At the end it heals everything, drains every outbox and hands the record
//! to the [`checker`]. A summary table goes to stdout, the same as JSON to `--report`; the exit
//! status is 1 on any violation. The seed reproduces the schedule (timing on a shared machine
//! does not repeat exactly, so the run is reproducible in its faults, not to the microsecond).
//!
//! With `--backend postgres --nodes N` it starts a PostgreSQL primary and synchronous standby
//! ([`pg`]) and N brokers on one database, each behind its own fault proxy. Every client comes
//! in through a door of its own ([`door`]) that hands each new connection to the next broker,
//! so a client whose connection broke resumes on another broker. A kill then hits one broker
//! (the others keep serving), and each run fails the primary over once: kill -9, then the
//! standby promoted.

mod checker;
mod door;
mod pg;
mod proxy;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use outboxd::client::{
    Client, Event, FilePositionStore, Incoming, Payload, RequestError, StopReason,
};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};

use checker::{Checker, Outcome, RecipientReport};
use door::{Door, Handed};
use proxy::{DirectionToxics, Proxy, Toxics};

/// Torture the broker: faults, kill -9, restarts; then check for lost messages.
#[derive(Debug, Parser)]
#[command(name = "outboxd-torture", version, about, long_about = None)]
struct Args {
    /// How long to run the fault phase, in seconds (then heal and drain).
    #[arg(long, default_value_t = 120)]
    duration: u64,
    /// Seed for the fault schedule and the workload [default: random, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// Publishing clients.
    #[arg(long, default_value_t = 3)]
    publishers: usize,
    /// Consuming clients (each also subscribes to the shared topic).
    #[arg(long, default_value_t = 3)]
    consumers: usize,
    /// Publishes per second per publisher.
    #[arg(long, default_value_t = 50)]
    rate: u64,
    /// Broker kills (SIGKILL or SIGTERM, then restart) at least this many; the schedule is
    /// spread over the duration.
    #[arg(long, default_value_t = 20)]
    kills: u64,
    /// The broker binary [default: `outboxd` next to this program].
    #[arg(long)]
    broker: Option<PathBuf>,
    /// Write the summary as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Keep the data directory and broker logs here instead of a temporary directory.
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Extra environment for the broker, KEY=VALUE (repeatable), e.g.
    /// OUTBOXD_STORAGE__DURABILITY=relaxed to watch the checker catch what that loses.
    #[arg(long = "broker-env", value_name = "KEY=VALUE")]
    broker_env: Vec<String>,
    /// Only kill and restart the broker; no network toxics (to narrow a failure down).
    #[arg(long)]
    no_toxics: bool,
    /// Run the broker inside this network namespace (`ip netns exec NAME`), for real packet
    /// loss; see tools/netns-loss.sh.
    #[arg(long, value_name = "NAME")]
    netns: Option<String>,
    /// The broker's listen address (port 0: any); beyond loopback it runs with --insecure.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    listen: String,
    /// Where the outboxes live: sled (one broker, its own data directory) or postgres (a
    /// primary and a synchronous standby started with tools/pg-cluster.sh, one database for
    /// every broker, one primary failover per run). Without PostgreSQL's programs a postgres
    /// run is skipped, saying so, unless OUTBOXD_REQUIRE_POSTGRES is set.
    #[arg(long, value_enum, default_value_t = Backend::Sled)]
    backend: Backend,
    /// Brokers on the shared database (more than one needs --backend postgres), each behind its
    /// own fault proxy; a client's next connection goes to the next broker.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// The script that starts PostgreSQL [default: tools/pg-cluster.sh of this checkout].
    #[arg(long, value_name = "PATH")]
    pg_cluster: Option<PathBuf>,
}

/// Where the brokers keep the outboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Backend {
    Sled,
    Postgres,
}

impl Backend {
    /// The name as on the command line and in the broker's `storage.backend`.
    fn name(self) -> &'static str {
        match self {
            Backend::Sled => "sled",
            Backend::Postgres => "postgres",
        }
    }
}

const TOPIC: &str = "torture";

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    println!("outboxd-torture: seed {seed} (rerun with --seed {seed})");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outboxd-torture: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // On SIGINT or SIGTERM the run is dropped where it stands, so every broker is killed and
    // a PostgreSQL this run started is stopped.
    let outcome = rt.block_on(async {
        tokio::select! {
            r = run(args, seed) => r,
            s = interrupted() => Err(format!("stopped by {s}")),
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("outboxd-torture: {e}");
            ExitCode::from(2)
        }
    }
}

/// Resolves with the signal's name at the first SIGINT or SIGTERM (never, when neither can be
/// watched).
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        _ => std::future::pending().await,
    }
}

/// The broker process, restarted on the same data directory.
struct Broker {
    bin: PathBuf,
    env: Vec<(String, String)>,
    netns: Option<String>,
    listen: String,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    addr: Option<SocketAddr>,
    incarnation: u64,
}

impl Broker {
    async fn start(&mut self) -> Result<SocketAddr, String> {
        self.incarnation += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("broker log {}: {e}", self.log.display()))?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.args(["serve", "--listen", &self.listen, "--data"])
            .arg(&self.data);
        if self
            .listen
            .parse::<SocketAddr>()
            .is_ok_and(|a| !a.ip().is_loopback())
        {
            cmd.arg("--insecure");
        }
        let mut child = cmd
            .env("OUTBOXD_SERVER__ADMIN_LISTEN", "")
            .env("OUTBOXD_HEARTBEAT__INTERVAL_MS", "500")
            .env("OUTBOXD_HEARTBEAT__TIMEOUT_MS", "2000")
            .env("OUTBOXD_DELIVERY__ACK_TIMEOUT_MS", "3000")
            .env("OUTBOXD_LIMITS__PUBLISH_RATE_PER_SEC", "0")
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        self.child = Some(child);
        let stdout = tokio::process::ChildStdout::from_std(stdout).map_err(|e| e.to_string())?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix("outboxd ready: ws://") {
                    return rest.trim_end_matches("/ws").parse::<SocketAddr>().ok();
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| format!("broker did not start; see {}", self.log.display()))?;
        self.addr = Some(ready);
        Ok(ready)
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL after 10 s.
    async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[derive(Debug, Default, Serialize)]
struct FaultCounts {
    kill9: u64,
    sigterm: u64,
    toxics: u64,
    /// Kills (kill -9 or SIGTERM) of each broker.
    kills_per_node: Vec<u64>,
    /// PostgreSQL primary failovers: kill -9 of the primary, then the standby promoted.
    failovers: u64,
    /// When the failover happened, in seconds into the run. From then on the promoted standby
    /// ran alone: every later commit was on one server.
    failover_at_s: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Summary {
    seed: u64,
    duration_s: u64,
    backend: Backend,
    nodes: usize,
    publishers: usize,
    consumers: usize,
    faults: FaultCounts,
    /// Connections the clients' doors handed to each broker (empty with one broker: no doors).
    connections_per_node: Vec<u64>,
    /// Clients the broker stopped for good with 4000 (a newer connection took over); not a
    /// violation, but only a client's own newer connection should do that.
    clients_replaced: u64,
    publishes_confirmed: u64,
    publishes_unconfirmed: u64,
    drained: bool,
    recipients: Vec<RecipientReport>,
    violations: u64,
}

fn sibling_broker() -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let dir = me.parent()?;
    let candidate = dir.join("outboxd");
    candidate.exists().then_some(candidate)
}

/// One broker and the fault proxy in front of it.
struct Node {
    broker: Broker,
    proxy: Proxy,
}

/// The URL client number `k` connects to. With several brokers every client comes in through
/// a door of its own (kept in `doors`), and the first connections are spread over the brokers.
async fn client_url(
    proxies: &[SocketAddr],
    k: usize,
    handed: &Arc<Handed>,
    doors: &mut Vec<Door>,
) -> Result<String, String> {
    if let [only] = proxies {
        return Ok(format!("ws://{only}/ws"));
    }
    let door = Door::start(
        proxies.to_vec(),
        k % proxies.len().max(1),
        Arc::clone(handed),
    )
    .await
    .map_err(|e| format!("a client's door: {e}"))?;
    let url = format!("ws://{}/ws", door.addr);
    doors.push(door);
    Ok(url)
}

/// Starts the PostgreSQL of a `--backend postgres` run and creates its database; the URL the
/// brokers get. `Ok(None)`: PostgreSQL's programs are missing and the run is skipped.
async fn start_postgres(args: &Args, work: &Path) -> Result<Option<(pg::Cluster, String)>, String> {
    let script = pg::script(args.pg_cluster.as_deref())?;
    if let Err(why) = pg::check(&script).await {
        if std::env::var_os("OUTBOXD_REQUIRE_POSTGRES").is_some() {
            return Err(format!(
                "--backend postgres: PostgreSQL's programs are missing, and \
                 OUTBOXD_REQUIRE_POSTGRES is set: {why}"
            ));
        }
        println!(
            "outboxd-torture: SKIPPED: --backend postgres needs PostgreSQL's programs \
             (apt-get install postgresql, or PG_BINDIR); set OUTBOXD_REQUIRE_POSTGRES to make \
             this a failure. {why}"
        );
        return Ok(None);
    }
    let keep_logs = args.workdir.is_some().then(|| work.to_path_buf());
    let cluster = pg::Cluster::start(script, keep_logs).await?;
    let url = cluster.create_database().await?;
    println!(
        "outboxd-torture: PostgreSQL primary and synchronous standby in {}; brokers use {url}",
        cluster.dir().display()
    );
    Ok(Some((cluster, url)))
}

async fn run(args: Args, seed: u64) -> Result<bool, String> {
    if args.nodes == 0 {
        return Err("--nodes: at least 1".into());
    }
    if args.netns.is_some() && args.backend == Backend::Postgres {
        return Err(
            "--netns with --backend postgres: brokers in the namespace cannot reach the \
             PostgreSQL this program starts on the host's 127.0.0.1"
                .into(),
        );
    }
    if args.nodes > 1 && args.backend == Backend::Sled {
        return Err(format!(
            "--nodes {}: several brokers need --backend postgres (a sled data directory is one \
             broker's)",
            args.nodes
        ));
    }
    let bin = args
        .broker
        .clone()
        .or_else(sibling_broker)
        .ok_or("cannot find the outboxd binary: pass --broker PATH")?;
    let tmp;
    let work: &Path = match &args.workdir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
            d
        }
        None => {
            tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
            // Leak-free: `tmp` lives until the end of `run`.
            tmp.path()
        }
    };
    let mut env = args
        .broker_env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("--broker-env {kv:?}: write KEY=VALUE"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Declared before the brokers, so it is dropped (stopped) after them.
    let cluster = match args.backend {
        Backend::Sled => None,
        Backend::Postgres => {
            let Some((cluster, url)) = start_postgres(&args, work).await? else {
                return Ok(true);
            };
            // First, so a --broker-env of the same key wins.
            let pg_env = [
                ("OUTBOXD_STORAGE__BACKEND", "postgres".to_string()),
                ("OUTBOXD_POSTGRES__URL", url),
                ("OUTBOXD_POSTGRES__CONNECT_TIMEOUT_MS", "2000".to_string()),
            ];
            env.splice(0..0, pg_env.map(|(k, v)| (k.to_string(), v)));
            Some(cluster)
        }
    };
    let mut nodes: Vec<Node> = Vec::new();
    for i in 0..args.nodes {
        let (data, log) = if args.nodes == 1 {
            (work.join("data"), work.join("broker.log"))
        } else {
            (
                work.join(format!("data-{i}")),
                work.join(format!("broker-{i}.log")),
            )
        };
        let mut broker = Broker {
            bin: bin.clone(),
            env: env.clone(),
            netns: args.netns.clone(),
            listen: args.listen.clone(),
            data,
            log,
            child: None,
            addr: None,
            incarnation: 0,
        };
        // One after the other: the first creates the schema in a fresh database.
        let upstream = broker.start().await?;
        let proxy = Proxy::start(upstream).await.map_err(|e| e.to_string())?;
        let data = match args.backend {
            Backend::Sled => format!(", data {}", broker.data.display()),
            Backend::Postgres => String::new(),
        };
        println!(
            "outboxd-torture: broker {i} at {upstream} behind proxy {}{data}, log {}",
            proxy.addr,
            broker.log.display()
        );
        nodes.push(Node { broker, proxy });
    }

    let proxies: Vec<SocketAddr> = nodes.iter().map(|n| n.proxy.addr).collect();
    let handed = Handed::new(nodes.len());
    let mut doors: Vec<Door> = Vec::new();

    let checker = Arc::new(Mutex::new(Checker::default()));
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let stop_consuming = Arc::new(AtomicBool::new(false));
    let replaced = Arc::new(AtomicU64::new(0));
    let counter = Arc::new(AtomicU64::new(1));
    let consumers: Vec<String> = (0..args.consumers).map(|i| format!("cons-{i}")).collect();

    // Consumers first, so their topic subscriptions exist before the first topic publish.
    let mut consumer_tasks = Vec::new();
    for (i, name) in consumers.iter().enumerate() {
        let ready = Arc::new(tokio::sync::Notify::new());
        consumer_tasks.push(tokio::spawn(consume(
            client_url(&proxies, i, &handed, &mut doors).await?,
            name.clone(),
            work.join(format!("{name}.position")),
            seed.wrapping_add(1000 + i as u64),
            Arc::clone(&checker),
            Arc::clone(&stop_consuming),
            Arc::clone(&ready),
            Arc::clone(&replaced),
        )));
        ready.notified().await;
    }
    let mut publisher_tasks = Vec::new();
    for i in 0..args.publishers {
        publisher_tasks.push(tokio::spawn(publish(
            client_url(&proxies, args.consumers + i, &handed, &mut doors).await?,
            format!("pub-{i}"),
            consumers.clone(),
            args.rate,
            seed.wrapping_add(i as u64),
            Arc::clone(&counter),
            Arc::clone(&checker),
            Arc::clone(&stop_publishing),
            Arc::clone(&replaced),
        )));
    }

    // The fault schedule. `rng` draws what a one-broker run always drew, in the same order, so
    // a seed replays the same schedule as before there were several brokers; `node_rng` draws
    // which broker a fault hits, how long it stays down, and when the primary fails over.
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut node_rng = fastrand::Rng::with_seed(seed.wrapping_add(7_000));
    let mut faults = FaultCounts {
        kills_per_node: vec![0; nodes.len()],
        ..FaultCounts::default()
    };
    let started = Instant::now();
    let total = Duration::from_secs(args.duration.max(1));
    let at = || started.elapsed().as_secs_f64();
    // Kill i happens somewhere in the middle of slot i of `kills` equal slots.
    let kills = args.kills.max(1);
    let kill_at = |i: u64, rng: &mut fastrand::Rng| {
        started + total.mul_f64((i as f64 + 0.2 + rng.f64() * 0.6) / kills as f64)
    };
    // The failover, once, between 30 % and 70 % of the run.
    let mut failover_at = cluster
        .as_ref()
        .map(|_| started + total.mul_f64(0.3 + node_rng.f64() * 0.4));
    let mut done_kills = 0u64;
    let mut next_kill = kill_at(0, &mut rng);
    while started.elapsed() < total {
        let now = Instant::now();
        if let (Some(c), Some(when)) = (&cluster, failover_at) {
            if now >= when {
                let killed_at = at();
                println!("[{killed_at:>6.1}s] PostgreSQL: kill -9 of the primary");
                c.kill_primary().await?;
                tokio::time::sleep(Duration::from_millis(node_rng.u64(200..2000))).await;
                c.promote().await?;
                println!(
                    "[{:>6.1}s] PostgreSQL: standby promoted; it runs alone from now on (no \
                     standby: every later commit is on one server)",
                    at()
                );
                faults.failovers += 1;
                faults.failover_at_s = Some(killed_at);
                failover_at = None;
                continue;
            }
        }
        if done_kills < kills && now >= next_kill {
            let several = nodes.len() > 1;
            let i = node_rng.usize(..nodes.len());
            let node = &mut nodes[i];
            let term = rng.u8(..).is_multiple_of(5);
            let stopping = Instant::now();
            if term {
                node.broker.stop().await;
                faults.sigterm += 1;
            } else {
                node.broker.kill9();
                faults.kill9 += 1;
            }
            let stopped_in = stopping.elapsed();
            faults.kills_per_node[i] += 1;
            // One broker comes back at once; of several, the killed one stays away a while
            // and its clients move to the others.
            let down = Duration::from_millis(if several {
                node_rng.u64(500..5000)
            } else {
                rng.u64(50..800)
            });
            println!(
                "[{:>6.1}s] broker {i}: {} (gone in {stopped_in:.1?}), restarted after {down:?}",
                at(),
                if term { "SIGTERM" } else { "kill -9" }
            );
            tokio::time::sleep(down).await;
            let addr = node.broker.start().await?;
            node.proxy.set_upstream(addr);
            done_kills += 1;
            next_kill = kill_at(done_kills, &mut rng);
            continue;
        }
        let t = if args.no_toxics {
            Toxics::default()
        } else {
            random_toxics(&mut rng)
        };
        // With several brokers a toxic period hits one of them, or (one time in four) all.
        let hit = (nodes.len() > 1 && !node_rng.u8(..).is_multiple_of(4))
            .then(|| node_rng.usize(..nodes.len()));
        faults.toxics += 1;
        let whom = match (nodes.len(), hit) {
            (1, _) => String::new(),
            (_, Some(i)) => format!(" on broker {i}"),
            (_, None) => " on every broker".into(),
        };
        println!("[{:>6.1}s] toxics{whom}: {}", at(), t.describe());
        for (i, n) in nodes.iter().enumerate() {
            if hit.is_none_or(|h| h == i) {
                n.proxy.set(t.clone());
            }
        }
        let next_event = match failover_at {
            Some(f) => next_kill.min(f),
            None => next_kill,
        };
        tokio::time::sleep(
            Duration::from_millis(rng.u64(300..2500)).min(
                next_event.saturating_duration_since(Instant::now()) + Duration::from_millis(1),
            ),
        )
        .await;
        for n in &nodes {
            n.proxy.set(Toxics::default());
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(100..1000))).await;
    }

    // Heal, stop publishing, drain.
    println!(
        "outboxd-torture: fault phase over after {:?}; healing and draining",
        started.elapsed()
    );
    for n in &mut nodes {
        n.proxy.set(Toxics::default());
        if n.broker.child.is_none() {
            let addr = n.broker.start().await?;
            n.proxy.set_upstream(addr);
        }
    }
    stop_publishing.store(true, Ordering::SeqCst);
    for t in publisher_tasks {
        let _ = t.await;
    }
    let drained = drain(&checker, Duration::from_secs(240)).await;
    stop_consuming.store(true, Ordering::SeqCst);
    for t in consumer_tasks {
        let _ = t.await;
    }
    for d in &doors {
        d.stop().await;
    }
    for n in &mut nodes {
        n.proxy.stop().await;
        n.broker.stop().await;
    }

    let recipients = checker.lock().map(|c| c.report()).unwrap_or_default();
    let violations: u64 = recipients.iter().map(|r| r.violations()).sum();
    let summary = Summary {
        seed,
        duration_s: args.duration,
        backend: args.backend,
        nodes: nodes.len(),
        publishers: args.publishers,
        consumers: args.consumers,
        publishes_confirmed: recipients.iter().map(|r| r.published_confirmed).sum(),
        publishes_unconfirmed: recipients.iter().map(|r| r.published_unconfirmed).sum(),
        faults,
        connections_per_node: if doors.is_empty() {
            Vec::new()
        } else {
            handed.counts()
        },
        clients_replaced: replaced.load(Ordering::SeqCst),
        drained,
        recipients,
        violations,
    };
    print_summary(&summary);
    if let Some(path) = &args.report {
        let json = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("outboxd-torture: report written to {}", path.display());
    }
    let failed_over = cluster.is_none() || summary.faults.failovers == 1;
    let ok = violations == 0
        && drained
        && failed_over
        && summary.faults.kill9 + summary.faults.sigterm >= args.kills;
    println!(
        "outboxd-torture: {}",
        if ok { "PASS: no violations" } else { "FAIL" }
    );
    Ok(ok)
}

/// Waits until every confirmed message was handed to its application, or `limit` passes.
async fn drain(checker: &Arc<Mutex<Checker>>, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let outstanding: u64 = checker
            .lock()
            .map(|c| c.report().iter().map(|r| r.lost).sum())
            .unwrap_or(u64::MAX);
        if outstanding == 0 {
            // Let unconfirmed-but-stored messages arrive too, so `recovered` is complete.
            tokio::time::sleep(Duration::from_secs(3)).await;
            return true;
        }
        if Instant::now() >= deadline {
            println!("outboxd-torture: {outstanding} confirmed messages still undelivered after {limit:?}");
            return false;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn random_toxics(rng: &mut fastrand::Rng) -> Toxics {
    let mut t = Toxics::default();
    let dir = |rng: &mut fastrand::Rng| -> DirectionToxics {
        let mut d = DirectionToxics::default();
        match rng.u8(..) % 6 {
            0 => {
                d.latency = Duration::from_millis(rng.u64(5..200));
                d.jitter = Duration::from_millis(rng.u64(0..100));
            }
            1 => d.bandwidth = rng.u64(2_000..200_000),
            2 => {
                d.slice = rng.usize(1..16);
                d.slice_delay = Duration::from_micros(rng.u64(0..2000));
            }
            3 => d.blackhole = true,
            4 => d.limit_data = rng.u64(1..20_000),
            _ => {}
        }
        d
    };
    match rng.u8(..) % 8 {
        0 => t.reset_peer = true,
        1 => t.slow_close = Duration::from_millis(rng.u64(100..2000)),
        2 | 3 => t.upstream = dir(rng),
        4 | 5 => t.downstream = dir(rng),
        _ => {
            t.upstream = dir(rng);
            t.downstream = dir(rng);
        }
    }
    t
}

/// Prints why a client stopped for good, and counts the stops by a newer connection (4000).
fn client_stopped(name: &str, reason: &StopReason, replaced: &AtomicU64) {
    println!("           {name}: client stopped: {reason}");
    if *reason == StopReason::Replaced {
        replaced.fetch_add(1, Ordering::SeqCst);
    }
}

#[allow(clippy::too_many_arguments)]
async fn publish(
    url: String,
    name: String,
    consumers: Vec<String>,
    rate: u64,
    seed: u64,
    counter: Arc<AtomicU64>,
    checker: Arc<Mutex<Checker>>,
    stop: Arc<AtomicBool>,
    replaced: Arc<AtomicU64>,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut inflight = tokio::task::JoinSet::new();
    let gap = Duration::from_micros(1_000_000 / rate.max(1));
    // A client that stopped for good (the broker closed it with 4000) is replaced by a new
    // one, as an application would; its unanswered publishes count as unconfirmed.
    while !stop.load(Ordering::SeqCst) {
        let client = loop {
            match Client::builder(url.clone(), name.clone())
                .backoff(Duration::from_millis(50), Duration::from_secs(1))
                .connect()
                .await
            {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let publisher = client.publisher();
        // The client must keep running to retry; its deliveries (none expected) are drained.
        let mut client = client;
        let gone = Arc::new(AtomicBool::new(false));
        let drain = {
            let (gone, name, replaced) = (Arc::clone(&gone), name.clone(), Arc::clone(&replaced));
            tokio::spawn(async move {
                while let Some(item) = client.next().await {
                    if let Incoming::Event(Event::Stopped { reason }) = item {
                        client_stopped(&name, &reason, &replaced);
                    }
                }
                gone.store(true, Ordering::SeqCst);
            })
        };
        while !stop.load(Ordering::SeqCst) && !gone.load(Ordering::SeqCst) {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let topic = rng.u8(..).is_multiple_of(4);
            let to = if topic {
                format!("topic:{TOPIC}")
            } else {
                format!("client:{}", consumers[rng.usize(..consumers.len())])
            };
            let recipients: Vec<String> = if topic {
                consumers.clone()
            } else {
                vec![to.trim_start_matches("client:").to_string()]
            };
            let req = publisher
                .publish(
                    to,
                    Payload::json(&serde_json::json!({ "n": n }))
                        .unwrap_or_else(|_| Payload::binary(n.to_be_bytes().to_vec())),
                )
                .key(format!("{name}-{n}"))
                .timeout(Duration::from_secs(60))
                .start();
            let checker = Arc::clone(&checker);
            let name = name.clone();
            inflight.spawn(async move {
                let outcome = match req.await {
                    Ok(p) => {
                        // Skipped topic subscribers (full outbox) got nothing: not confirmed.
                        let refused: Vec<String> =
                            p.refused.iter().map(|r| r.client_id.clone()).collect();
                        (Outcome::Confirmed, refused)
                    }
                    Err(RequestError::Refused { .. }) | Err(_) => (Outcome::Unconfirmed, vec![]),
                };
                if let Ok(mut c) = checker.lock() {
                    for r in &recipients {
                        let o = if outcome.1.contains(r) {
                            Outcome::Unconfirmed
                        } else {
                            outcome.0
                        };
                        c.published(n, &name, r, o);
                    }
                }
            });
            while inflight.len() > 64 {
                let _ = inflight.join_next().await;
            }
            tokio::time::sleep(gap).await;
        }
        if stop.load(Ordering::SeqCst) {
            // The client keeps retrying until every publish has its answer.
            while inflight.join_next().await.is_some() {}
        }
        drop(publisher);
        drain.abort();
    }
}

#[allow(clippy::too_many_arguments)]
async fn consume(
    url: String,
    name: String,
    position: PathBuf,
    seed: u64,
    checker: Arc<Mutex<Checker>>,
    stop: Arc<AtomicBool>,
    ready: Arc<tokio::sync::Notify>,
    replaced: Arc<AtomicU64>,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut first = true;
    // Each loop is one application process: it may die before acking, and the next one
    // resumes from the position file.
    while !stop.load(Ordering::SeqCst) {
        tracing::debug!(consumer = %name, "new process: connecting");
        let mut client = match Client::builder(url.clone(), name.clone())
            .backoff(Duration::from_millis(50), Duration::from_secs(1))
            .position_store(FilePositionStore::new(&position))
            .connect()
            .await
        {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if first {
            while client.subscribe(TOPIC).await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ready.notify_one();
            first = false;
        }
        // This process lives for a while, then "crashes" (sometimes with a delivery unacked).
        let life = Instant::now() + Duration::from_millis(rng.u64(2_000..15_000));
        loop {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let next = tokio::time::timeout(Duration::from_millis(200), client.next()).await;
            let item = match next {
                Err(_) => {
                    if Instant::now() > life {
                        break;
                    }
                    continue;
                }
                Ok(None) => break,
                Ok(Some(item)) => item,
            };
            let d = match item {
                Incoming::Delivery(d) => d,
                Incoming::Event(Event::Stopped { reason }) => {
                    client_stopped(&name, &reason, &replaced);
                    continue;
                }
                Incoming::Event(e) => {
                    if !matches!(
                        e,
                        Event::Connected { .. }
                            | Event::Disconnected { .. }
                            | Event::ConnectFailed { .. }
                    ) {
                        println!("           {name}: {e:?}");
                    }
                    continue;
                }
            };
            if Instant::now() > life && rng.bool() {
                // Dies holding this delivery, unacked: it must come again to the next process.
                break;
            }
            if rng.u16(..).is_multiple_of(400) {
                // A slow handler: the broker may resend meanwhile (ack timeout).
                tokio::time::sleep(Duration::from_millis(rng.u64(100..800))).await;
            }
            let n = d
                .payload
                .to_json::<serde_json::Value>()
                .ok()
                .and_then(|v| v.get("n").and_then(|n| n.as_u64()));
            if let Ok(mut c) = checker.lock() {
                if d.redelivered {
                    c.wire_redelivery(&name);
                }
                match n {
                    Some(n) => c.delivered(&name, d.epoch.as_str(), d.seq, n),
                    // Not a message of this run: counted as unexpected.
                    None => c.delivered(&name, d.epoch.as_str(), d.seq, u64::MAX),
                }
            }
            let _ = d.ack();
        }
        tracing::debug!(consumer = %name, "process ends; closing the client");
        client.close().await;
        tracing::debug!(consumer = %name, "client closed");
    }
}

fn print_summary(s: &Summary) {
    println!();
    println!(
        "faults: {} kill -9, {} SIGTERM, {} toxic periods; publishes confirmed {}, unconfirmed {} (per recipient)",
        s.faults.kill9, s.faults.sigterm, s.faults.toxics, s.publishes_confirmed, s.publishes_unconfirmed
    );
    if s.nodes > 1 || s.backend == Backend::Postgres {
        println!(
            "backend {}, {} brokers; kills per broker {:?}; connections per broker {:?}",
            s.backend.name(),
            s.nodes,
            s.faults.kills_per_node,
            s.connections_per_node
        );
    }
    match s.faults.failover_at_s {
        Some(t) => println!(
            "PostgreSQL: {} primary failover at {t:.1}s (kill -9, standby promoted); from then on \
             no standby: later commits were on one server",
            s.faults.failovers
        ),
        None if s.backend == Backend::Postgres => {
            println!("PostgreSQL: no failover (the run ended before it was due)")
        }
        None => {}
    }
    if s.clients_replaced > 0 {
        println!(
            "clients stopped by a newer connection (4000): {}",
            s.clients_replaced
        );
    }
    println!(
        "{:<10} {:>9} {:>9} {:>6} {:>11} {:>10} {:>10} {:>8} {:>9} {:>10}",
        "recipient",
        "confirmed",
        "delivered",
        "lost",
        "lost-middle",
        "unexpected",
        "duplicates",
        "reorders",
        "recovered",
        "redeliv."
    );
    for r in &s.recipients {
        println!(
            "{:<10} {:>9} {:>9} {:>6} {:>11} {:>10} {:>10} {:>8} {:>9} {:>10}",
            r.recipient,
            r.published_confirmed,
            r.delivered,
            r.lost,
            r.lost_middle,
            r.unexpected,
            r.duplicates,
            r.reorders,
            r.recovered,
            r.wire_redeliveries
        );
        if !r.lost_examples.is_empty() {
            println!(
                "           lost numbers (first ones): {:?}",
                r.lost_examples
            );
        }
        if !r.seq_gaps.is_empty() {
            println!("           seqs skipped (last, next): {:?}", r.seq_gaps);
        }
    }
    println!(
        "violations: {}{}",
        s.violations,
        if s.drained {
            ""
        } else {
            " (drain did not finish)"
        }
    );
}
