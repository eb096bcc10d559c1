//! outboxd-bench: one driver, five adapters (outboxd, Mosquitto, NATS JetStream, Redis
//! Streams, RabbitMQ; Mosquitto and NATS over TCP or over their WebSocket listeners), the workloads of
//! issue 7, and the report. outboxd runs on its sled store, or on PostgreSQL (`outboxd-pg`,
//! `outboxd-pg3`) beside it.
//! `bench/run.sh` installs the peers, builds, and runs this; see docs/benchmarks.md for the
//! method and the latest figures.

mod adapters;
mod brokers;
mod msg;
mod pg;
mod report;
mod resp;
mod stats;
mod workloads;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;

use brokers::{Paths, System};
use workloads::{CaseSpec, Env, Workload};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Which {
    Saturation,
    Latency,
    Fanout,
    /// N publisher → subscriber pairs at 1 msg/s each.
    Pairs,
    Idle,
    Backlog,
}

#[derive(Parser, Debug)]
#[command(
    name = "outboxd-bench",
    about = "Side-by-side benchmark: outboxd, Mosquitto, NATS JetStream, Redis Streams, RabbitMQ"
)]
struct Args {
    /// Systems to measure, in this order within each repetition.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "outboxd,mosquitto,nats,redis,rabbitmq,mosquitto-ws,nats-ws"
    )]
    systems: Vec<System>,
    /// Workloads to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "saturation,latency,fanout,pairs,idle,backlog"
    )]
    workloads: Vec<Which>,
    /// The workloads (of those run) the peers' WebSocket variants, mosquitto-ws and nats-ws,
    /// take part in; they skip the others.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "saturation,latency"
    )]
    ws_workloads: Vec<Which>,
    /// A short check: saturation 1→1 at 256 B, one repetition, 1 s + 3 s; fails unless every
    /// message arrived.
    #[arg(long)]
    smoke: bool,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long, default_value_t = 1.0)]
    warmup_s: f64,
    #[arg(long, default_value_t = 5.0)]
    measure_s: f64,
    /// Payload sizes for saturation, bytes.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024,16384")]
    sizes: Vec<usize>,
    /// Offered rates for the latency workload, msg/s.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    rates: Vec<u64>,
    /// Subscriber counts for fan-out.
    #[arg(long, value_delimiter = ',', default_value = "10,100")]
    fanout: Vec<usize>,
    /// Pair counts for the pairs workload: N publishers, each sending 1 msg/s to its own
    /// durable subscriber (2 N client connections).
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    pairs: Vec<usize>,
    /// Connections for the idle workload.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    #[arg(long, default_value_t = 15.0)]
    idle_hold_s: f64,
    /// Messages for the backlog workload.
    #[arg(long, default_value_t = 1_000_000)]
    backlog: u64,
    /// How the broker is stopped in the backlog workload.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "kill")]
    backlog_stop: Vec<Stop>,
    #[arg(long, default_value = "target/release/outboxd")]
    outboxd_bin: PathBuf,
    /// The script that starts the PostgreSQL primary and synchronous standby the outboxd-pg
    /// systems store in (started once per run, when one of them is in `--systems`).
    #[arg(long, default_value = "tools/pg-cluster.sh")]
    pg_cluster: PathBuf,
    /// Where to write the JSON results.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where to write the markdown report.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Where to write the SVG plot.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Hand-written analysis appended to the markdown report, if the file exists.
    #[arg(long)]
    analysis: Option<PathBuf>,
    /// Writes only the section "outboxd on PostgreSQL beside sled" into this markdown file:
    /// it replaces the file's earlier copy of that section (between its marker comments) or
    /// is appended, and the rest of the file stays as it is.
    #[arg(long)]
    markdown_section: Option<PathBuf>,
    /// Hand-written reading of the PostgreSQL figures, put at the end of that section, if the
    /// file exists.
    #[arg(long)]
    pg_analysis: Option<PathBuf>,
    /// Only re-render the markdown and SVG from a results file written earlier (for example
    /// after editing bench/analysis.md); runs nothing.
    #[arg(long)]
    render: Option<PathBuf>,
    /// The command line to print in the report.
    #[arg(long, default_value = "bench/run.sh")]
    command: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Stop {
    Kill,
    Term,
}

/// The largest payload the peers' WebSocket variants are measured with.
const WS_MAX_SIZE: usize = 1024;

fn first_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> report::Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let mem_total = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0))
        .unwrap_or_default();
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_default();
    let tmp = std::env::temp_dir();
    let data_fs = first_line(
        "df",
        &["-T", "--output=fstype,source", &tmp.display().to_string()],
    )
    .lines()
    .last()
    .unwrap_or("")
    .split_whitespace()
    .collect::<Vec<_>>()
    .join(" ");
    report::Machine {
        cpu_model,
        nproc: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        mem_total,
        kernel: first_line("uname", &["-sr"]),
        os,
        data_fs: format!("{} ({})", tmp.display(), data_fs),
    }
}

fn write_views(args: &Args, rep: &report::Report, systems: &[System]) -> Result<()> {
    let pg_analysis = args
        .pg_analysis
        .as_ref()
        .and_then(|a| std::fs::read_to_string(a).ok());
    let section = report::pg_section(rep, systems, pg_analysis.as_deref());
    if let Some(p) = &args.svg {
        std::fs::write(p, report::svg(rep, systems))?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = &args.markdown {
        let analysis = args
            .analysis
            .as_ref()
            .and_then(|a| std::fs::read_to_string(a).ok());
        let mut text = report::markdown(rep, systems, analysis.as_deref());
        // A run without the PostgreSQL systems keeps the section an earlier one wrote.
        let old = std::fs::read_to_string(p).unwrap_or_default();
        let keep = section
            .clone()
            .or_else(|| report::find_pg_section(&old).map(str::to_string));
        if let Some(sec) = keep {
            text = report::put_pg_section(&text, &sec);
        }
        std::fs::write(p, text)?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = &args.markdown_section {
        match &section {
            Some(sec) => {
                let old = std::fs::read_to_string(p).unwrap_or_default();
                std::fs::write(p, report::put_pg_section(&old, sec))?;
                eprintln!("wrote the PostgreSQL section of {}", p.display());
            }
            None => eprintln!(
                "{}: not changed: no outboxd-pg or outboxd-pg3 results beside outboxd's",
                p.display()
            ),
        }
    }
    Ok(())
}

fn render(args: &Args, from: &std::path::Path) -> Result<bool> {
    let rep: report::Report = serde_json::from_str(&std::fs::read_to_string(from)?)?;
    // The systems asked for, then the PostgreSQL ones the results hold (they are not in the
    // default list, and their section needs them).
    let mut systems: Vec<System> = args.systems.clone();
    for s in [System::OutboxdPg, System::OutboxdPg3] {
        if !systems.contains(&s) {
            systems.push(s);
        }
    }
    systems.retain(|s| rep.versions.contains_key(s.name()));
    write_views(args, &rep, &systems)?;
    Ok(rep.all_ok)
}

async fn run(args: Args) -> Result<bool> {
    if let Some(from) = &args.render {
        return render(&args, from);
    }
    let env = Env {
        paths: Paths {
            // Absolute: each broker runs in its own temp dir.
            outboxd_bin: std::fs::canonicalize(&args.outboxd_bin)
                .unwrap_or_else(|_| args.outboxd_bin.clone()),
        },
        clk_tck: brokers::clock_ticks_per_sec(),
        perf: brokers::perf_works(),
        pg: if args.systems.iter().any(|s| s.uses_postgres()) {
            Some(pg::Cluster::start(&args.pg_cluster)?)
        } else {
            None
        },
    };
    let (reps, warmup_s, measure_s) = if args.smoke {
        (1, 1.0, 3.0)
    } else {
        (args.reps, args.warmup_s, args.measure_s)
    };
    let workloads: Vec<Which> = if args.smoke {
        vec![Which::Saturation]
    } else {
        args.workloads.clone()
    };
    let sizes = if args.smoke {
        vec![256]
    } else {
        args.sizes.clone()
    };
    let systems = args.systems.clone();
    // Whether `sys` takes part in workload `w`.
    let takes_part =
        |sys: System, w: Which| !sys.is_peer_over_websocket() || args.ws_workloads.contains(&w);
    let mut cases = Vec::new();
    let mut idle = Vec::new();
    let mut backlog = Vec::new();

    let mut specs = Vec::new();
    for w in &workloads {
        match w {
            Which::Saturation => {
                for size in &sizes {
                    specs.push((
                        *w,
                        CaseSpec {
                            workload: Workload::Saturation,
                            size: *size,
                            rate: None,
                            subscribers: 1,
                            warmup_s,
                            measure_s,
                        },
                    ));
                }
            }
            Which::Latency => {
                for rate in &args.rates {
                    specs.push((
                        *w,
                        CaseSpec {
                            workload: Workload::Latency,
                            size: 256,
                            rate: Some(*rate),
                            subscribers: 1,
                            warmup_s,
                            measure_s,
                        },
                    ));
                }
            }
            Which::Fanout => {
                for n in &args.fanout {
                    specs.push((
                        *w,
                        CaseSpec {
                            workload: Workload::Fanout,
                            size: 256,
                            rate: None,
                            subscribers: *n,
                            warmup_s,
                            measure_s,
                        },
                    ));
                }
            }
            Which::Pairs => {
                for n in &args.pairs {
                    specs.push((
                        *w,
                        CaseSpec {
                            workload: Workload::Pairs,
                            size: 256,
                            rate: Some(workloads::pairs_offered_rate(*n)),
                            subscribers: *n,
                            warmup_s,
                            measure_s,
                        },
                    ));
                }
            }
            Which::Idle | Which::Backlog => {}
        }
    }
    for (which, spec) in &specs {
        for rep in 0..reps {
            // rumqttc's WebSocket subscriber stalls on 16 KiB messages (its pings go
            // unanswered and it reconnects in a loop), so the WebSocket variants stop at 1 KiB.
            for sys in systems.iter().filter(|s| {
                takes_part(**s, *which) && !(s.is_peer_over_websocket() && spec.size > WS_MAX_SIZE)
            }) {
                let r = workloads::run_case(&env, *sys, spec, rep).await;
                eprintln!(
                    "{:>12} {:?} size={} rate={:?} subs={} rep={}: {:.0} delivered/s, p50 {} µs, p99 {} µs, p99.9 {} µs, cpu {:.0}%, rss {:.0} MiB, fsyncs/s {:?}, published {}, lost {}, errors {}, dup {}{}{}",
                    sys.name(),
                    spec.workload,
                    spec.size,
                    spec.rate,
                    spec.subscribers,
                    rep,
                    r.delivered_per_s,
                    r.latency.p50_us,
                    r.latency.p99_us,
                    r.latency.p999_us,
                    r.broker.cpu_pct,
                    r.broker.rss_max_mib,
                    r.broker.fsyncs_per_s.map(|v| v.round()),
                    r.published,
                    r.lost,
                    r.errors,
                    r.duplicates,
                    r.connections
                        .map(|c| format!(", connections {c}"))
                        .unwrap_or_default(),
                    r.failure.as_ref().map(|f| format!(", FAILED: {f}")).unwrap_or_default()
                );
                cases.push(r);
            }
        }
    }
    if workloads.contains(&Which::Idle) {
        for sys in systems.iter().filter(|s| takes_part(**s, Which::Idle)) {
            let r = workloads::run_idle(
                &env,
                *sys,
                args.idle_connections,
                Duration::from_secs_f64(args.idle_hold_s),
            )
            .await;
            eprintln!("{r:?}");
            idle.push(r);
        }
    }
    if workloads.contains(&Which::Backlog) {
        for stop in &args.backlog_stop {
            for sys in systems.iter().filter(|s| takes_part(**s, Which::Backlog)) {
                let r = workloads::run_backlog(&env, *sys, args.backlog, 256, *stop == Stop::Kill)
                    .await;
                eprintln!("{r:?}");
                backlog.push(r);
            }
        }
    }

    let mut not_measured = vec![
        "50k idle connections: this sandbox caps open files at 20,000 per process (hard limit), and one source address gives about 28k loopback ports; 50k needs a higher limit and several 127.0.0.x source addresses, which the project client cannot bind".to_string(),
        "fsync counts for power-loss safety are not a crash test: a SIGKILL keeps the page cache, so NATS keeps its data after one; only a power cut shows what the missing fsync costs".to_string(),
    ];
    if !workloads.contains(&Which::Idle) {
        not_measured.push("idle connections (not in this run)".into());
    }
    if !workloads.contains(&Which::Backlog) {
        not_measured.push("offline backlog and restart (not in this run)".into());
    }
    if !args.fanout.contains(&1000) || !workloads.contains(&Which::Fanout) {
        not_measured.push("fan-out 1 → 1000 subscribers".into());
    }
    if !workloads.contains(&Which::Pairs) {
        not_measured.push("1000 × 1000 point to point at 1 msg/s each (not in this run)".into());
    } else if !args.pairs.contains(&1000) {
        not_measured.push(format!(
            "1000 × 1000 point to point at 1 msg/s each (this run: {} pairs)",
            args.pairs
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for (sys, what, why_small) in [
        (
            System::MosquittoWs,
            "MQTT over WebSocket (mosquitto-ws)",
            "rumqttc's WebSocket subscriber stalled on 16 KiB messages: unanswered pings, reconnecting in a loop",
        ),
        (
            System::NatsWs,
            "NATS over WebSocket (nats-ws)",
            "kept to the sizes the MQTT peer over WebSocket is measured at",
        ),
    ] {
        if !systems.contains(&sys) {
            not_measured.push(format!("{what}: not in this run"));
            continue;
        }
        let skipped: Vec<String> = workloads
            .iter()
            .filter(|w| !args.ws_workloads.contains(w))
            .map(|w| format!("{w:?}").to_lowercase())
            .collect();
        if sizes.iter().any(|s| *s > WS_MAX_SIZE) && workloads.contains(&Which::Saturation) {
            not_measured.push(format!(
                "{what} with payloads over {WS_MAX_SIZE} B ({why_small})"
            ));
        }
        if !skipped.is_empty() {
            not_measured.push(format!(
                "{what} in {} (only in {})",
                skipped.join(", "),
                args.ws_workloads
                    .iter()
                    .filter(|w| workloads.contains(w))
                    .map(|w| format!("{w:?}").to_lowercase())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }

    let summary = report::summarize(&cases);
    // outboxd must lose nothing, anywhere. A peer's loss in a live case (no crash) is its own
    // or its adapter's problem, not outboxd's: it is said loudly and kept in the report, but it
    // does not fail the run (a crash case still fails any system that fsyncs before confirming).
    for c in cases
        .iter()
        .filter(|c| !c.system.is_outboxd() && c.lost > 0 && c.failure.is_none())
    {
        eprintln!(
            "outboxd-bench: WARNING: the peer {} lost {} messages in {:?} (rep {}): a problem of \
             that broker or of its adapter here, reported, not counted as a failure",
            c.system.name(),
            c.lost,
            c.spec.workload,
            c.rep
        );
    }
    let all_ok = cases.iter().all(|c| {
        if c.system.is_outboxd() {
            c.ok()
        } else {
            c.failure.is_none() && c.errors == 0
        }
    }) && idle.iter().all(|i| i.failure.is_none())
        && backlog.iter().all(|b| {
            b.failure.is_none()
                && (b.lost == 0 || (b.restart == "SIGKILL" && !b.system.fsyncs_before_confirm()))
        });
    let mut versions = BTreeMap::new();
    let mut fsync = BTreeMap::new();
    for sys in &systems {
        versions.insert(sys.name().to_string(), brokers::version(*sys, &env.paths));
        fsync.insert(
            sys.name().to_string(),
            sys.fsync_before_confirm().to_string(),
        );
    }
    if let Some(c) = &env.pg {
        versions.insert("postgresql".into(), c.version.clone());
    }
    versions.insert("rustc".into(), first_line("rustc", &["--version"]));
    // The broker's source: the commit, and whether the tree had changes on top of it.
    versions.insert(
        "outboxd source".into(),
        first_line("git", &["describe", "--always", "--dirty"]),
    );
    let rep = report::Report {
        generated_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        command: args.command.clone(),
        smoke: args.smoke,
        machine: machine(),
        versions,
        fsync_before_confirm: fsync,
        settings: report::Settings {
            reps,
            warmup_s,
            measure_s,
            publish_window: workloads::PUBLISH_WINDOW,
            e2e_window: workloads::E2E_WINDOW,
            delivery_window: adapters::DELIVERY_WINDOW,
            fsync_counting: if env.perf {
                "perf stat on the sys_enter_fsync and sys_enter_fdatasync tracepoints of the broker's pid".into()
            } else {
                "not counted: perf with syscall tracepoints is not available here".into()
            },
        },
        summary,
        idle,
        backlog,
        not_measured,
        cases,
        all_ok,
    };
    if let Some(p) = &args.json {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(p, serde_json::to_string_pretty(&rep)?)?;
        eprintln!("wrote {}", p.display());
    }
    write_views(&args, &rep, &systems)?;
    Ok(all_ok)
}

/// Waits for SIGINT or SIGTERM; names the one that came.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // Without handlers the default actions stay: nothing to wait for here.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// The load generator allocates per message for every system (frames, bodies, futures); with
/// glibc's malloc that was about a fifth of its CPU, on the cores the brokers use too.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outboxd-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // On SIGINT or SIGTERM the run is dropped, and with it every broker (killed) and the
    // PostgreSQL cluster (stopped, its directory removed): the servers are detached from this
    // terminal and would outlive the driver. A pacer inside `block_in_place` holds this up by
    // at most the measured window.
    let outcome = rt.block_on(async {
        tokio::select! {
            r = run(args) => r,
            s = interrupted() => Err(anyhow::anyhow!("stopped by {s}")),
        }
    });
    match outcome {
        Ok(true) => {
            eprintln!(
                "outboxd-bench: every run completed, and outboxd lost no message (a peer's loss, \
                 if any, is warned of above)"
            );
            ExitCode::SUCCESS
        }
        Ok(false) => {
            eprintln!("outboxd-bench: FAILED: some run lost messages, had errors or did not complete (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("outboxd-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
