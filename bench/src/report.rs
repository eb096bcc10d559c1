//! Turns the runs into bench/results/latest.json, docs/benchmarks.md and an SVG plot, and the
//! runs of outboxd on PostgreSQL beside sled into a section of their own in that markdown
//! ([`pg_section`], kept between marker comments so the rest of the file is left alone).
//!
//! Every figure in the markdown comes from the JSON written next to it; medians over the
//! repetitions, with the range (min–max) beside them.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::brokers::System;
use crate::workloads::{
    pairs_offered_rate, BacklogResult, CaseResult, IdleResult, Workload, E2E_WINDOW, PAIR_PERIOD,
    PUBLISH_WINDOW,
};

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Stat> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub system: System,
    pub workload: Workload,
    pub size: usize,
    pub rate: Option<u64>,
    pub subscribers: usize,
    pub reps: usize,
    pub delivered_per_s: Option<Stat>,
    pub confirmed_per_s: Option<Stat>,
    pub p50_us: Option<Stat>,
    pub p99_us: Option<Stat>,
    pub p999_us: Option<Stat>,
    /// Fixed-rate cases: p99 of how late the pacer sent a message after its intended time.
    #[serde(default)]
    pub send_lag_p99_us: Option<Stat>,
    pub cpu_pct: Option<Stat>,
    pub rss_max_mib: Option<Stat>,
    pub write_mib_per_s: Option<Stat>,
    pub write_bytes_per_delivery: Option<Stat>,
    pub fsyncs_per_s: Option<Stat>,
    pub commit_groups_per_s: Option<Stat>,
    /// outboxd on PostgreSQL: both servers' CPU, percent of one core.
    #[serde(default)]
    pub db_cpu_pct: Option<Stat>,
    /// outboxd on PostgreSQL: both servers' fsync + fdatasync calls per second.
    #[serde(default)]
    pub db_fsyncs_per_s: Option<Stat>,
    /// Pairs workload: the fewest client connections established in any repetition.
    #[serde(default)]
    pub connections: Option<usize>,
    /// Latencies recorded, summed over the repetitions.
    #[serde(default)]
    pub latency_samples: u64,
    /// Summed over the repetitions.
    pub published: u64,
    pub lost: u64,
    pub errors: u64,
    pub duplicates: u64,
    pub failures: Vec<String>,
}

pub fn summarize(cases: &[CaseResult]) -> Vec<Summary> {
    let mut groups: BTreeMap<(u8, usize, u64, usize, u8), Vec<&CaseResult>> = BTreeMap::new();
    for c in cases {
        let w = c.spec.workload as u8;
        let key = (
            w,
            c.spec.size,
            c.spec.rate.unwrap_or(0),
            c.spec.subscribers,
            c.system as u8,
        );
        groups.entry(key).or_default().push(c);
    }
    groups
        .into_values()
        .map(|g| {
            let ok: Vec<&&CaseResult> = g.iter().filter(|c| c.failure.is_none()).collect();
            let stat = |f: &dyn Fn(&CaseResult) -> f64| {
                Stat::of(&ok.iter().map(|c| f(c)).collect::<Vec<_>>())
            };
            let opt = |f: &dyn Fn(&CaseResult) -> Option<f64>| {
                Stat::of(&ok.iter().filter_map(|c| f(c)).collect::<Vec<_>>())
            };
            let first = g[0];
            Summary {
                system: first.system,
                workload: first.spec.workload,
                size: first.spec.size,
                rate: first.spec.rate,
                subscribers: first.spec.subscribers,
                reps: g.len(),
                delivered_per_s: stat(&|c| c.delivered_per_s),
                confirmed_per_s: stat(&|c| c.confirmed_per_s),
                p50_us: stat(&|c| c.latency.p50_us as f64),
                p99_us: stat(&|c| c.latency.p99_us as f64),
                p999_us: stat(&|c| c.latency.p999_us as f64),
                send_lag_p99_us: opt(&|c| c.send_lag.as_ref().map(|l| l.p99_us as f64)),
                cpu_pct: stat(&|c| c.broker.cpu_pct),
                rss_max_mib: stat(&|c| c.broker.rss_max_mib),
                write_mib_per_s: stat(&|c| c.broker.write_mib_per_s),
                write_bytes_per_delivery: stat(&|c| c.broker.write_bytes_per_delivery),
                fsyncs_per_s: opt(&|c| c.broker.fsyncs_per_s),
                commit_groups_per_s: opt(&|c| c.broker.commit_groups_per_s),
                db_cpu_pct: opt(&|c| c.broker.db_cpu_pct),
                db_fsyncs_per_s: opt(&|c| c.broker.db_fsyncs_per_s),
                connections: g.iter().filter_map(|c| c.connections).min(),
                latency_samples: g.iter().map(|c| c.latency.count).sum(),
                published: g.iter().map(|c| c.published).sum(),
                lost: g.iter().map(|c| c.lost).sum(),
                errors: g.iter().map(|c| c.errors).sum(),
                duplicates: g.iter().map(|c| c.duplicates).sum(),
                failures: g.iter().filter_map(|c| c.failure.clone()).collect(),
            }
        })
        .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub nproc: usize,
    pub mem_total: String,
    pub kernel: String,
    pub os: String,
    pub data_fs: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub reps: usize,
    pub warmup_s: f64,
    pub measure_s: f64,
    pub publish_window: usize,
    pub e2e_window: u64,
    pub delivery_window: usize,
    pub fsync_counting: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub generated_unix: u64,
    pub command: String,
    pub smoke: bool,
    pub machine: Machine,
    pub versions: BTreeMap<String, String>,
    pub fsync_before_confirm: BTreeMap<String, String>,
    pub settings: Settings,
    pub summary: Vec<Summary>,
    pub idle: Vec<IdleResult>,
    pub backlog: Vec<BacklogResult>,
    pub not_measured: Vec<String>,
    pub cases: Vec<CaseResult>,
    /// True when every case, idle and backlog run finished with zero lost and zero errors
    /// (SIGKILL backlog runs of systems that do not persist before confirming excluded).
    pub all_ok: bool,
}

fn fmt_rate(x: f64) -> String {
    if x >= 10_000.0 {
        format!("{:.1}k", x / 1000.0)
    } else if x >= 1000.0 {
        format!("{:.2}k", x / 1000.0)
    } else {
        format!("{x:.0}")
    }
}

fn fmt_us(x: f64) -> String {
    if x >= 1_000_000.0 {
        format!("{:.2} s", x / 1e6)
    } else if x >= 1000.0 {
        format!("{:.2} ms", x / 1000.0)
    } else {
        format!("{x:.0} µs")
    }
}

fn rate_cell(s: &Option<Stat>) -> String {
    match s {
        Some(s) => format!(
            "**{}** ({}–{})",
            fmt_rate(s.median),
            fmt_rate(s.min),
            fmt_rate(s.max)
        ),
        None => "failed".into(),
    }
}

fn us_cell(s: &Option<Stat>) -> String {
    match s {
        Some(s) => format!("{} ({}–{})", fmt_us(s.median), fmt_us(s.min), fmt_us(s.max)),
        None => "–".into(),
    }
}

fn med(s: &Option<Stat>, digits: usize) -> String {
    s.map(|s| format!("{:.*}", digits, s.median))
        .unwrap_or_else(|| "–".into())
}

fn size_name(size: usize) -> String {
    if size >= 1024 && size.is_multiple_of(1024) {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

fn loss_cell(s: &Summary) -> String {
    let mut out = if s.lost == 0 && s.errors == 0 && s.failures.is_empty() {
        "0 lost".to_string()
    } else {
        format!("**{} lost, {} errors**", s.lost, s.errors)
    };
    if !s.failures.is_empty() {
        let _ = write!(out, " ({} failed: {})", s.failures.len(), s.failures[0]);
    }
    out
}

fn find(
    summary: &[Summary],
    system: System,
    workload: Workload,
    size: usize,
    rate: Option<u64>,
    subs: usize,
) -> Option<&Summary> {
    summary.iter().find(|s| {
        s.system == system
            && s.workload == workload
            && s.size == size
            && s.rate == rate
            && s.subscribers == subs
    })
}

/// Best peer's median for a metric, and which peer.
fn best_peer(values: &[(System, f64)], higher_is_better: bool) -> Option<(System, f64)> {
    best_peer_where(values, higher_is_better, |_| true)
}

/// Best median among the peers that fsync before confirming (the promise outboxd makes), and
/// which peer.
fn best_fsync_peer(values: &[(System, f64)], higher_is_better: bool) -> Option<(System, f64)> {
    best_peer_where(values, higher_is_better, System::fsyncs_before_confirm)
}

fn best_peer_where(
    values: &[(System, f64)],
    higher_is_better: bool,
    keep: impl Fn(System) -> bool,
) -> Option<(System, f64)> {
    values
        .iter()
        .filter(|(s, _)| !s.is_outboxd() && keep(*s))
        .copied()
        .reduce(|a, b| {
            let better = if higher_is_better {
                b.1 > a.1
            } else {
                b.1 < a.1
            };
            if better {
                b
            } else {
                a
            }
        })
}

/// "outboxd / best" as `0.86× (nats)`, from medians; `–` when either is missing.
fn ratio_cell(outboxd: Option<f64>, best: Option<(System, f64)>) -> String {
    match (outboxd, best) {
        (Some(o), Some((p, b))) if b > 0.0 => format!("{:.2}× ({})", o / b, p.name()),
        _ => "–".into(),
    }
}

pub fn markdown(r: &Report, systems: &[System], analysis: Option<&str>) -> String {
    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(
        w,
        "# Benchmarks: outboxd, Mosquitto, NATS JetStream, Redis Streams and RabbitMQ, side by side\n"
    );
    let _ = writeln!(
        w,
        "Generated by the harness (`bench/`, see [its README](../bench/README.md)); every figure \
         below is in `bench/results/latest.json`. Do not edit the tables by hand: run the \
         command again.\n"
    );
    let _ = writeln!(w, "```\n{}\n```\n", r.command);
    let _ = writeln!(w, "## Machine and versions\n");
    let m = &r.machine;
    let _ = writeln!(
        w,
        "- CPU: {} × {} (`nproc` = {}); memory {}; {}; kernel {}; data dirs on {}",
        m.nproc, m.cpu_model, m.nproc, m.mem_total, m.os, m.kernel, m.data_fs
    );
    let _ = writeln!(
        w,
        "- The machine is shared and noisy, and the brokers share its 2 cores with the load \
         generator (one process, tokio, mimalloc, all clients). Compare systems within this run, \
         by ratio; absolute numbers move from run to run."
    );
    for (k, v) in &r.versions {
        let _ = writeln!(w, "- {k}: `{v}`");
    }
    let s = &r.settings;
    let _ = writeln!(
        w,
        "- Each case: fresh broker on a fresh temp data dir, {} s warm-up, {} s measured, {} \
         repetition(s), systems interleaved within each repetition. Tables give the median and \
         (min–max).",
        s.warmup_s, s.measure_s, s.reps
    );
    let _ = writeln!(w, "\n## Does it fsync before it confirms?\n");
    let _ = writeln!(
        w,
        "| system | fsync before confirming a publish |\n| --- | --- |"
    );
    for sys in systems {
        if let Some(v) = r.fsync_before_confirm.get(sys.name()) {
            let _ = writeln!(w, "| {} | {} |", sys.name(), v);
        }
    }
    let _ = writeln!(
        w,
        "\nfsyncs/s below count fsync + fdatasync calls by the broker process in the measured \
         window ({}).",
        s.fsync_counting
    );

    // Saturation.
    let sat: Vec<&Summary> = r
        .summary
        .iter()
        .filter(|x| x.workload == Workload::Saturation)
        .collect();
    if !sat.is_empty() {
        let _ = writeln!(
            w,
            "\n## Saturation, 1 publisher → 1 durable subscriber (delivered msg/s)\n"
        );
        let _ = writeln!(
            w,
            "Closed loop: at most {PUBLISH_WINDOW} publishes unconfirmed and {E2E_WINDOW} \
             messages undelivered; the subscriber acks every message. Figure: messages \
             delivered per second in the measured window.\n"
        );
        let mut sizes: Vec<usize> = sat.iter().map(|x| x.size).collect();
        sizes.dedup();
        let _ = write!(w, "| payload |");
        for sys in systems {
            let _ = write!(w, " {} |", sys.name());
        }
        let _ = writeln!(
            w,
            " outboxd / best peer | outboxd / best fsync peer | loss |"
        );
        let _ = write!(w, "| --- |");
        for _ in systems {
            let _ = write!(w, " --- |");
        }
        let _ = writeln!(w, " --- | --- | --- |");
        for size in &sizes {
            let _ = write!(w, "| {} |", size_name(*size));
            let mut meds = Vec::new();
            let mut losses = Vec::new();
            for sys in systems {
                let x = find(&r.summary, *sys, Workload::Saturation, *size, None, 1);
                let _ = write!(
                    w,
                    " {} |",
                    x.map(|x| rate_cell(&x.delivered_per_s)).unwrap_or_default()
                );
                if let Some(x) = x {
                    if let Some(d) = x.delivered_per_s {
                        meds.push((*sys, d.median));
                    }
                    losses.push(format!("{}: {}", sys.name(), loss_cell(x)));
                }
            }
            let o = meds
                .iter()
                .find(|(s, _)| *s == System::Outboxd)
                .map(|m| m.1);
            let _ = writeln!(
                w,
                " {} | {} | {} |",
                ratio_cell(o, best_peer(&meds, true)),
                ratio_cell(o, best_fsync_peer(&meds, true)),
                losses.join("; ")
            );
        }
        let _ = writeln!(
            w,
            "\nRatios are of medians, outboxd over the best peer: of any kind, and of those that \
             fsync before confirming (\"yes\" under \"Does it fsync before it confirms?\")."
        );
        let _ = writeln!(
            w,
            "\nBroker process during the measured window (medians):\n"
        );
        let _ = writeln!(
            w,
            "| payload | system | CPU % (of one core) | RSS max MiB | disk write MiB/s | bytes written / msg | fsyncs/s | outboxd commit groups/s | p50 | p99 |"
        );
        let _ = writeln!(
            w,
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for size in &sizes {
            for sys in systems {
                if let Some(x) = find(&r.summary, *sys, Workload::Saturation, *size, None, 1) {
                    let _ = writeln!(
                        w,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        size_name(*size),
                        sys.name(),
                        med(&x.cpu_pct, 0),
                        med(&x.rss_max_mib, 0),
                        med(&x.write_mib_per_s, 1),
                        med(&x.write_bytes_per_delivery, 0),
                        med(&x.fsyncs_per_s, 0),
                        med(&x.commit_groups_per_s, 0),
                        x.p50_us.map(|s| fmt_us(s.median)).unwrap_or_default(),
                        x.p99_us.map(|s| fmt_us(s.median)).unwrap_or_default(),
                    );
                }
            }
        }
    }

    // Latency.
    let lat: Vec<&Summary> = r
        .summary
        .iter()
        .filter(|x| x.workload == Workload::Latency)
        .collect();
    if !lat.is_empty() {
        let size = lat[0].size;
        let _ = writeln!(
            w,
            "\n## Latency at fixed rates, 1 → 1, {} (open loop, from the intended send time)\n",
            size_name(size)
        );
        let _ = writeln!(
            w,
            "Message i is due at start + i/rate and carries that time; latency is delivery time \
             minus it (HdrHistogram, µs), so a stall counts against the system instead of \
             lowering the offered load. Only messages due in the measured window count. The \
             pacer is a thread that sleeps until each message is due; \"pacer p99\" is how late \
             it handed messages to the client (part of the latency, the same for every \
             system).\n"
        );
        let _ = writeln!(
            w,
            "| rate msg/s | system | delivered msg/s | p50 | p99 | p99.9 | pacer p99 | CPU % | fsyncs/s | loss |"
        );
        let _ = writeln!(
            w,
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        let mut rates: Vec<u64> = lat.iter().filter_map(|x| x.rate).collect();
        rates.sort();
        rates.dedup();
        for rate in &rates {
            for sys in systems {
                if let Some(x) = find(&r.summary, *sys, Workload::Latency, size, Some(*rate), 1) {
                    let _ = writeln!(
                        w,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        rate,
                        sys.name(),
                        med(&x.delivered_per_s, 0),
                        us_cell(&x.p50_us),
                        us_cell(&x.p99_us),
                        us_cell(&x.p999_us),
                        x.send_lag_p99_us
                            .map(|s| fmt_us(s.median))
                            .unwrap_or_else(|| "–".into()),
                        med(&x.cpu_pct, 0),
                        med(&x.fsyncs_per_s, 0),
                        loss_cell(x)
                    );
                }
            }
        }
        let _ = writeln!(
            w,
            "\np99, outboxd over the best peer (medians; below 1× outboxd is faster): of any \
             kind, and of those that fsync before confirming.\n"
        );
        let _ = writeln!(
            w,
            "| rate msg/s | outboxd p99 | outboxd / best peer | outboxd / best fsync peer |\n| --- | --- | --- | --- |"
        );
        for rate in &rates {
            let p99s: Vec<(System, f64)> = systems
                .iter()
                .filter_map(|sys| {
                    find(&r.summary, *sys, Workload::Latency, size, Some(*rate), 1)
                        .and_then(|x| x.p99_us)
                        .map(|p| (*sys, p.median))
                })
                .collect();
            let o = p99s
                .iter()
                .find(|(s, _)| *s == System::Outboxd)
                .map(|m| m.1);
            let _ = writeln!(
                w,
                "| {rate} | {} | {} | {} |",
                o.map(fmt_us).unwrap_or_else(|| "–".into()),
                ratio_cell(o, best_peer(&p99s, false)),
                ratio_cell(o, best_fsync_peer(&p99s, false)),
            );
        }
        let _ = writeln!(
            w,
            "\n![throughput and p99 against offered rate](../bench/results/latency.svg)\n"
        );
    }

    // Fan-out.
    let fan: Vec<&Summary> = r
        .summary
        .iter()
        .filter(|x| x.workload == Workload::Fanout)
        .collect();
    if !fan.is_empty() {
        let size = fan[0].size;
        let _ = writeln!(
            w,
            "\n## Fan-out, 1 publisher → N durable subscribers, {} (deliveries/s, all subscribers together)\n",
            size_name(size)
        );
        let _ = writeln!(
            w,
            "outboxd: a topic publish (one copy per subscriber's outbox, written before the \
             `ok`); Mosquitto: one QoS 1 topic, N persistent sessions; NATS: one stream, N \
             durable pull consumers (interest retention); Redis: one stream per subscriber, \
             the N XADDs of a message in one MULTI/EXEC; RabbitMQ: one quorum queue per \
             subscriber, each bound to one fanout exchange, so a publish is stored N times and \
             confirmed once every queue has it. Closed loop as in saturation, gated by the \
             slowest subscriber.\n"
        );
        let mut ns: Vec<usize> = fan.iter().map(|x| x.subscribers).collect();
        ns.sort();
        ns.dedup();
        let _ = write!(w, "| subscribers |");
        for sys in systems {
            let _ = write!(w, " {} |", sys.name());
        }
        let _ = writeln!(w, " outboxd / best peer | p99 (outboxd) | loss |");
        let _ = write!(w, "| --- |");
        for _ in systems {
            let _ = write!(w, " --- |");
        }
        let _ = writeln!(w, " --- | --- | --- |");
        for n in &ns {
            let _ = write!(w, "| {n} |");
            let mut meds = Vec::new();
            let mut losses = Vec::new();
            let mut p99 = String::from("–");
            for sys in systems {
                let x = find(&r.summary, *sys, Workload::Fanout, size, None, *n);
                let _ = write!(
                    w,
                    " {} |",
                    x.map(|x| rate_cell(&x.delivered_per_s)).unwrap_or_default()
                );
                if let Some(x) = x {
                    if let Some(d) = x.delivered_per_s {
                        meds.push((*sys, d.median));
                    }
                    if *sys == System::Outboxd {
                        p99 = x.p99_us.map(|s| fmt_us(s.median)).unwrap_or_default();
                    }
                    losses.push(format!("{}: {}", sys.name(), loss_cell(x)));
                }
            }
            let ratio = match (
                meds.iter().find(|(s, _)| *s == System::Outboxd),
                best_peer(&meds, true),
            ) {
                (Some((_, o)), Some((p, b))) if b > 0.0 => format!("{:.2}× ({})", o / b, p.name()),
                _ => "–".into(),
            };
            let _ = writeln!(w, " {ratio} | {p99} | {} |", losses.join("; "));
        }
    }

    // Many point-to-point pairs.
    let pairs: Vec<&Summary> = r
        .summary
        .iter()
        .filter(|x| x.workload == Workload::Pairs)
        .collect();
    if !pairs.is_empty() {
        let size = pairs[0].size;
        let period_s = PAIR_PERIOD.as_secs_f64();
        let _ = writeln!(
            w,
            "\n## Many point-to-point pairs, N × N at {} msg/s each, {} (open loop, from the intended send time)\n",
            1.0 / period_s,
            size_name(size)
        );
        let _ = writeln!(
            w,
            "N publishers, each on its own connection, each sending only to its own durable \
             subscriber on its own connection (outboxd: a direct publish to `client:sub-i`; \
             Mosquitto: topic `bench/t/i`, QoS 1, `clean_session = false`; NATS: subject \
             `bench.t.i` on the one stream, a durable pull consumer per subscriber filtered on \
             it; Redis: stream `bench:sub-i`, read through a consumer group; RabbitMQ: quorum \
             queue `bench.sub-i` through the default exchange). Each publisher sends one message every {period_s} s; the N schedules are \
             spread evenly over the period, so N msg/s are offered in total. Latency is from \
             the intended send time, as in the latency table; loss is checked per pair. \
             Connections: publishers + subscribers established, of 2 N.\n"
        );
        let _ = writeln!(
            w,
            "| pairs | system | fsync before confirm | connections | delivered msg/s | p50 | p99 | p99.9 | latencies recorded | CPU % | RSS max MiB | fsyncs/s | loss |"
        );
        let _ = writeln!(
            w,
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        let mut ns: Vec<usize> = pairs.iter().map(|x| x.subscribers).collect();
        ns.sort();
        ns.dedup();
        for n in &ns {
            for sys in systems {
                let rate = Some(pairs_offered_rate(*n));
                if let Some(x) = find(&r.summary, *sys, Workload::Pairs, size, rate, *n) {
                    let _ = writeln!(
                        w,
                        "| {} | {} | {} | {} of {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        n,
                        sys.name(),
                        if sys.fsyncs_before_confirm() {
                            "yes"
                        } else {
                            "no"
                        },
                        x.connections
                            .map(|c| c.to_string())
                            .unwrap_or_else(|| "–".into()),
                        2 * n,
                        med(&x.delivered_per_s, 0),
                        us_cell(&x.p50_us),
                        us_cell(&x.p99_us),
                        us_cell(&x.p999_us),
                        x.latency_samples,
                        med(&x.cpu_pct, 0),
                        med(&x.rss_max_mib, 0),
                        med(&x.fsyncs_per_s, 0),
                        loss_cell(x)
                    );
                }
            }
        }
    }

    if !r.idle.is_empty() {
        let _ = writeln!(w, "\n## Idle connections with heartbeats\n");
        let _ = writeln!(
            w,
            "N clients connect (64 handshakes in flight; outboxd: upgrade + hello + welcome, \
             which creates the client's outbox; MQTT: CONNECT/CONNACK; NATS: INFO/CONNECT; AMQP: \
             the connection handshake), then stay idle with a 5 s heartbeat (outboxd ping, MQTT \
             keepalive, NATS client ping, AMQP heartbeat) for \
             the hold time. RSS per connection = (broker RSS after the hold − RSS before) / N.\n"
        );
        let _ = writeln!(
            w,
            "| system | connections | connected | handshakes/s | RSS before → after MiB | RSS per connection | idle CPU % | dropped |"
        );
        let _ = writeln!(w, "| --- | --- | --- | --- | --- | --- | --- | --- |");
        for x in &r.idle {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {:.0} | {:.0} → {:.0} | {:.1} KiB | {:.1} | {}{} |",
                x.system.name(),
                x.connections,
                x.connected,
                x.handshakes_per_s,
                x.rss_before_mib,
                x.rss_after_mib,
                x.rss_per_connection_kib,
                x.idle_cpu_pct,
                x.dropped,
                x.failure
                    .as_ref()
                    .map(|f| format!(" ({f})"))
                    .unwrap_or_default()
            );
        }
    }

    if !r.backlog.is_empty() {
        let _ = writeln!(w, "\n## Offline backlog, restart, drain\n");
        let _ = writeln!(
            w,
            "A durable subscriber registers and disconnects; the publisher stores N messages for \
             it (closed loop, all confirmed); the broker is stopped as shown and started again on \
             the same data dir; the subscriber connects as soon as the broker accepts, and drains.\n"
        );
        let _ = writeln!(
            w,
            "| system | messages | stop | publish msg/s | data dir MiB | ready after restart | first delivery after restart | drain msg/s | delivered | lost |"
        );
        let _ = writeln!(
            w,
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for x in &r.backlog {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {:.0} | {:.0} ms | {} | {} | {} | {}{} |",
                x.system.name(),
                x.messages,
                x.restart,
                fmt_rate(x.publish_per_s),
                x.disk_mib,
                x.ready_ms,
                x.first_delivery_ms
                    .map(|v| format!("{v:.0} ms"))
                    .unwrap_or_else(|| "none".into()),
                if x.delivered > 0 {
                    fmt_rate(x.drain_per_s)
                } else {
                    "–".into()
                },
                x.delivered,
                if x.lost > 0 {
                    format!("**{}**", x.lost)
                } else {
                    "0".into()
                },
                x.failure
                    .as_ref()
                    .map(|f| format!(" ({f})"))
                    .unwrap_or_default()
            );
        }
    }

    let _ = writeln!(w, "\n## Targets (issue 7)\n");
    let _ = writeln!(w, "| target | measured | met? |\n| --- | --- | --- |");
    for line in targets(r) {
        let _ = writeln!(w, "{line}");
    }

    if !r.not_measured.is_empty() {
        let _ = writeln!(w, "\n## Not measured yet\n");
        for n in &r.not_measured {
            let _ = writeln!(w, "- {n}");
        }
    }

    let _ = writeln!(w, "\n## Settings that differ from each system's defaults\n");
    let _ = writeln!(
        w,
        "- outboxd: `durability = \"fsync\"` (the default); `limits.publish_rate_per_sec = 0` \
         (the default 5000/s per connection would refuse benchmark traffic), \
         `limits.max_outbox_messages = 0` and `max_outbox_bytes = 0` (no outbox cap), \
         `server.max_connections_per_ip = 0`, `server.max_connections = 60000`; heartbeat 5 s in \
         the idle case only. Client: the project's `outboxd::client` (idempotency key on every \
         publish, as it always sends one)."
    );
    let _ = writeln!(
        w,
        "- Mosquitto: `persistence true` in the temp dir (run with `user root` so it can write \
         there), `max_queued_messages 0`, `max_queued_bytes 0` (never drop), \
         `max_inflight_messages {}` (outboxd's window; the default is 20). Client: rumqttc, MQTT \
         3.1.1, QoS 1, `clean_session = false` for subscribers, manual acks, inflight {}.",
        crate::adapters::DELIVERY_WINDOW,
        crate::adapters::DELIVERY_WINDOW
    );
    let _ = writeln!(
        w,
        "- NATS: `nats-server -js -sd DIR`; stream `BENCH` (file storage, 1 replica, interest \
         retention so acked messages are removed, like an outbox); durable pull consumers with \
         explicit acks and `max_ack_pending {}`. Client: async-nats, publish acks awaited in \
         order.",
        crate::adapters::DELIVERY_WINDOW
    );
    if systems.contains(&System::Redis) {
        let _ = writeln!(
            w,
            "- Redis: `redis-server --appendonly yes --appendfsync always --save \"\"` (the AOF \
             only, fdatasync'd before each event-loop turn's replies; no RDB snapshots), \
             `--maxclients 60000`, AOF rewrite at its defaults. One stream per subscriber \
             (`bench:sub-N`, no MAXLEN: nothing is trimmed unread). Client: the bench's own \
             RESP2 client; the publisher pipelines `XADD` (at most {PUBLISH_WINDOW} \
             unconfirmed in the closed loop; the reply is the confirmation), N copies in one \
             `MULTI`/`EXEC` for fan-out; the subscriber reads through a consumer group \
             (`XREADGROUP COUNT 512 BLOCK 1000`) and sends `XACK` and `XDEL` for each batch \
             in the same write as its next read. A read that hands out entries changes the \
             group's state, which Redis appends to the AOF too (as XCLAIM records), so a \
             delivery is fsync'd in its event-loop turn like a publish."
        );
    }
    if systems.contains(&System::Rabbitmq) {
        let _ = writeln!(
            w,
            "- RabbitMQ: Debian's `rabbitmq-server` 3.10, one node per case started as a plain \
             process (its own epmd on a free port, Erlang cookie, node name, AMQP and \
             distribution ports on 127.0.0.1, `RABBITMQ_MNESIA_BASE` and `RABBITMQ_LOG_BASE` \
             in the temp dir; no plugins, so no management plugin; otherwise its defaults). \
             One durable quorum queue per subscriber (`x-queue-type = quorum`, one member; \
             `bench.sub-N`); fan-out through a durable fanout exchange every subscriber's \
             queue is bound to, so each publish is stored once per subscriber. A quorum queue \
             confirms a message once it is in its Raft log, whose WAL is fdatasync'd first. \
             Client: lapin (AMQP 0-9-1), one channel in confirm mode per publisher, \
             persistent messages (`delivery_mode` 2) published `mandatory` (a returned \
             message counts as a failure), at most {PUBLISH_WINDOW} unconfirmed in the closed \
             loop; subscribers consume with manual acks, one `basic.ack` per message, \
             `basic.qos` prefetch {}. Measured: the node's beam.smp process.",
            crate::adapters::DELIVERY_WINDOW
        );
    }
    if systems.contains(&System::MosquittoWs) {
        let _ = writeln!(
            w,
            "- mosquitto-ws: the Mosquitto settings above plus a second listener, \
             `listener PORT 127.0.0.1` with `protocol websockets` (libwebsockets, as built into \
             Debian's package; 2.0.11 does not start with WebSocket listeners only, so the plain \
             listener stays, unused). Client: rumqttc with its `websocket` transport \
             (async-tungstenite), otherwise as above; rumqttc leaves `TCP_NODELAY` off by \
             default, over TCP as over WebSocket."
        );
    }
    if systems.contains(&System::NatsWs) {
        let _ = writeln!(
            w,
            "- nats-ws: the NATS settings above plus `websocket {{ host: 127.0.0.1, port: PORT, \
             no_tls: true }}` in a config file. Client: async-nats with a `ws://` URL (its \
             `websockets` feature, tokio-websockets), otherwise as above. async-nats sets \
             `TCP_NODELAY` on its TCP sockets but not on its WebSocket one (tokio-websockets \
             opens that socket): there a pull consumer's next pull request waited under \
             Nagle's algorithm for the server's delayed ACK, 40 ms per batch of 200, about \
             5k msg/s. The harness sets `TCP_NODELAY` on the client's WebSocket sockets itself \
             once connected, as async-nats does over TCP."
        );
    }

    if let Some(a) = analysis {
        let _ = writeln!(w, "\n{}", a.trim_end());
    }
    o
}

/// Every system outboxd is compared with, over either transport.
const PEERS: [System; 6] = [
    System::Mosquitto,
    System::Nats,
    System::Redis,
    System::Rabbitmq,
    System::MosquittoWs,
    System::NatsWs,
];

fn targets(r: &Report) -> Vec<String> {
    let mut out = Vec::new();
    let sat = |sys| find(&r.summary, sys, Workload::Saturation, 256, None, 1);
    let peers: Vec<(System, f64)> = PEERS
        .into_iter()
        .filter_map(|s| {
            sat(s)
                .and_then(|x| x.delivered_per_s)
                .map(|d| (s, d.median))
        })
        .collect();
    match (
        sat(System::Outboxd).and_then(|x| x.delivered_per_s),
        best_peer(&peers, true),
    ) {
        (Some(o), Some((p, b))) => out.push(format!(
            "| saturation 1→1, 256 B: ≥ 2× the best peer | outboxd {} vs {} {} = {:.2}× | {} |",
            fmt_rate(o.median),
            p.name(),
            fmt_rate(b),
            o.median / b,
            if o.median >= 2.0 * b { "yes" } else { "**no**" }
        )),
        _ => out.push("| saturation 1→1, 256 B: ≥ 2× the best peer | not measured | – |".into()),
    }
    let lat5 = r.summary.iter().find(|x| {
        x.system == System::Outboxd && x.workload == Workload::Latency && x.rate == Some(5000)
    });
    match lat5.and_then(|x| x.p99_us) {
        Some(p) => out.push(format!(
            "| latency at 5k msg/s: p99 ≤ 2 ms | p99 {} (range {}–{}) | {} |",
            fmt_us(p.median),
            fmt_us(p.min),
            fmt_us(p.max),
            if p.median <= 2000.0 { "yes" } else { "**no**" }
        )),
        None => out.push("| latency at 5k msg/s: p99 ≤ 2 ms | not measured | – |".into()),
    }
    match r.idle.iter().find(|x| x.system == System::Outboxd) {
        Some(i) => {
            out.push(format!(
                "| idle: ≤ 8 KiB RSS per connection at 50k | {:.1} KiB at {} connections (50k not measured) | {} |",
                i.rss_per_connection_kib,
                i.connected,
                if i.rss_per_connection_kib <= 8.0 { "yes at this N" } else { "**no**" }
            ));
            out.push(format!(
                "| idle: ≥ 3,000 handshakes/s | {:.0}/s | {} |",
                i.handshakes_per_s,
                if i.handshakes_per_s >= 3000.0 {
                    "yes"
                } else {
                    "**no**"
                }
            ));
        }
        None => out.push("| idle connections | not measured | – |".into()),
    }
    match r.backlog.iter().find(|x| x.system == System::Outboxd) {
        Some(b) => {
            let serve = b.first_delivery_ms.unwrap_or(f64::INFINITY);
            out.push(format!(
                "| {} stored: serving within 1 s of a restart ({}) | first delivery {:.0} ms after spawn (ready {:.0} ms) | {} |",
                b.messages,
                b.restart,
                serve,
                b.ready_ms,
                if serve <= 1000.0 { "yes" } else { "**no**" }
            ));
            out.push(format!(
                "| {} stored: drained at ≥ 100k msg/s | {} msg/s | {} |",
                b.messages,
                fmt_rate(b.drain_per_s),
                if b.drain_per_s >= 100_000.0 {
                    "yes"
                } else {
                    "**no**"
                }
            ));
        }
        None => {
            out.push("| 1M stored: serve within 1 s, drain ≥ 100k/s | not measured | – |".into())
        }
    }
    let fan_max = r
        .summary
        .iter()
        .filter(|x| x.workload == Workload::Fanout)
        .map(|x| x.subscribers)
        .max();
    match fan_max {
        Some(n) => {
            let vals: Vec<(System, f64)> = std::iter::once(System::Outboxd)
                .chain(PEERS)
                .filter_map(|s| {
                    r.summary
                        .iter()
                        .find(|x| {
                            x.system == s && x.workload == Workload::Fanout && x.subscribers == n
                        })
                        .and_then(|x| x.delivered_per_s)
                        .map(|d| (s, d.median))
                })
                .collect();
            let o = vals
                .iter()
                .find(|(s, _)| *s == System::Outboxd)
                .map(|v| v.1);
            match (o, best_peer(&vals, true)) {
                (Some(o), Some((p, b))) => out.push(format!(
                    "| fan-out 1→1000: deliveries/s ≥ best peer | at 1→{n} (largest measured): outboxd {} vs {} {} = {:.2}× | {} |",
                    fmt_rate(o),
                    p.name(),
                    fmt_rate(b),
                    o / b,
                    if o >= b { if n >= 1000 { "yes" } else { "yes at this N" } } else { "**no**" }
                )),
                _ => out.push("| fan-out 1→1000 | not measured | – |".into()),
            }
        }
        None => out.push("| fan-out 1→1000 | not measured | – |".into()),
    }
    out
}

/// Two panels: delivered msg/s against offered rate, and p99 (log scale) against offered rate,
/// one line per system; saturation (256 B) drawn as a dashed line in the first panel.
pub fn svg(r: &Report, systems: &[System]) -> String {
    let colors = |s: System| match s {
        System::Outboxd => "#d62728",
        System::Mosquitto => "#1f77b4",
        System::Nats => "#2ca02c",
        System::MosquittoWs => "#9ecae1",
        System::NatsWs => "#98df8a",
        System::Redis => "#ff7f0e",
        System::OutboxdPg => "#9467bd",
        System::OutboxdPg3 => "#8c564b",
        System::Rabbitmq => "#e377c2",
    };
    let lat: Vec<&Summary> = r
        .summary
        .iter()
        .filter(|x| x.workload == Workload::Latency)
        .collect();
    let mut rates: Vec<u64> = lat.iter().filter_map(|x| x.rate).collect();
    rates.sort();
    rates.dedup();
    let (pw, ph, ml, mt, mb) = (360.0, 260.0, 70.0, 40.0, 50.0);
    let width = 2.0 * (ml + pw) + 40.0;
    // Below the panels: the legend (up to LEGEND_PER_ROW systems a line), then the note on the
    // dashed lines.
    const LEGEND_PER_ROW: usize = 5;
    let legend_rows = systems.len().div_ceil(LEGEND_PER_ROW).max(1);
    let height = mt + ph + mb + 32.0 + 16.0 * legend_rows as f64;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    if rates.is_empty() {
        let _ = writeln!(o, r#"<text x="20" y="40">no latency runs</text></svg>"#);
        return o;
    }
    let xmax = *rates.last().unwrap_or(&1) as f64 * 1.1;
    let sat_max = systems
        .iter()
        .filter_map(|s| find(&r.summary, *s, Workload::Saturation, 256, None, 1))
        .filter_map(|x| x.delivered_per_s.map(|d| d.median))
        .fold(0.0_f64, f64::max);
    let ymax1 = (xmax).max(sat_max * 1.1);
    let p99s: Vec<f64> = lat
        .iter()
        .filter_map(|x| x.p99_us.map(|p| p.median))
        .collect();
    let lo = p99s.iter().copied().fold(f64::INFINITY, f64::min).max(1.0);
    let hi = p99s.iter().copied().fold(1.0_f64, f64::max);
    let (l0, l1) = (
        lo.log10().floor(),
        hi.log10().ceil().max(lo.log10().floor() + 1.0),
    );
    for panel in 0..2 {
        let x0 = ml + panel as f64 * (ml + pw + 40.0);
        let title = if panel == 0 {
            "delivered msg/s vs offered rate (256 B, 1→1)"
        } else {
            "p99 latency vs offered rate (log scale)"
        };
        let _ = writeln!(
            o,
            r#"<text x="{}" y="20" text-anchor="middle" font-weight="bold">{title}</text>"#,
            x0 + pw / 2.0
        );
        let _ = writeln!(
            o,
            r#"<rect x="{x0}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
        );
        for rate in &rates {
            let x = x0 + *rate as f64 / xmax * pw;
            let _ = writeln!(
                o,
                r#"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="black"/><text x="{x}" y="{}" text-anchor="middle">{}</text>"#,
                mt + ph,
                mt + ph + 5.0,
                mt + ph + 18.0,
                fmt_rate(*rate as f64)
            );
        }
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" text-anchor="middle">offered msg/s</text>"#,
            x0 + pw / 2.0,
            mt + ph + 36.0
        );
        let ys: Vec<(f64, String)> = if panel == 0 {
            (0..=4)
                .map(|i| {
                    let v = ymax1 * i as f64 / 4.0;
                    (mt + ph - v / ymax1 * ph, fmt_rate(v))
                })
                .collect()
        } else {
            (l0 as i32..=l1 as i32)
                .map(|e| {
                    let v = 10f64.powi(e);
                    (mt + ph - (v.log10() - l0) / (l1 - l0) * ph, fmt_us(v))
                })
                .collect()
        };
        for (y, label) in ys {
            let _ = writeln!(
                o,
                r##"<line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{label}</text>"##,
                x0 + pw,
                x0 - 6.0,
                y + 4.0
            );
        }
        for (i, sys) in systems.iter().enumerate() {
            let pts: Vec<(f64, f64)> = rates
                .iter()
                .filter_map(|rate| {
                    let x = find(
                        &r.summary,
                        *sys,
                        Workload::Latency,
                        lat[0].size,
                        Some(*rate),
                        1,
                    )?;
                    let v = if panel == 0 {
                        x.delivered_per_s?.median
                    } else {
                        x.p99_us?.median
                    };
                    let px = x0 + *rate as f64 / xmax * pw;
                    let py = if panel == 0 {
                        mt + ph - v / ymax1 * ph
                    } else {
                        mt + ph - (v.max(1.0).log10() - l0) / (l1 - l0) * ph
                    };
                    Some((px, py))
                })
                .collect();
            let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let c = colors(*sys);
            let _ = writeln!(
                o,
                r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
                path.join(" ")
            );
            for (x, y) in &pts {
                let _ = writeln!(o, r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{c}"/>"#);
            }
            if panel == 0 {
                if let Some(d) = find(&r.summary, *sys, Workload::Saturation, 256, None, 1)
                    .and_then(|x| x.delivered_per_s)
                {
                    let y = mt + ph - d.median / ymax1 * ph;
                    let _ = writeln!(
                        o,
                        r#"<line x1="{x0}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="{c}" stroke-dasharray="5,4"/>"#,
                        x0 + pw
                    );
                }
            }
            let ly = height - 30.0 - 16.0 * (legend_rows - 1 - i / LEGEND_PER_ROW) as f64;
            let lx = 20.0 + (i % LEGEND_PER_ROW) as f64 * 170.0;
            let _ = writeln!(
                o,
                r#"<rect x="{lx}" y="{}" width="14" height="4" fill="{c}"/><text x="{}" y="{ly}">{} ({})</text>"#,
                ly - 6.0,
                lx + 20.0,
                sys.name(),
                if sys.fsyncs_before_confirm() {
                    "fsync"
                } else {
                    "no fsync"
                }
            );
        }
    }
    let _ = writeln!(
        o,
        r##"<text x="{}" y="{}" text-anchor="end" fill="#555">dashed: saturation throughput, 256 B</text>"##,
        width - 10.0,
        height - 8.0
    );
    let _ = writeln!(o, "</svg>");
    o
}

// ---------------------------------------------------------------------------------------------
// outboxd on PostgreSQL beside sled

/// The first line of the PostgreSQL section; the section runs to [`PG_END`].
const PG_BEGIN: &str = "<!-- outboxd-pg: generated by outboxd-bench (bench/run.sh --pg); this section is replaced as a whole when that runs again -->";
const PG_END: &str = "<!-- end of the outboxd-pg section -->";

/// The issue's targets for the PostgreSQL backend.
const PG_TARGET_1TO1: f64 = 15_000.0;
const PG_TARGET_FANOUT: f64 = 30_000.0;
const PG_TARGET_FANOUT_N: usize = 100;

/// The PostgreSQL section in `text`, markers included, if it has one.
pub fn find_pg_section(text: &str) -> Option<&str> {
    let from = text.find(PG_BEGIN)?;
    let to = from + text[from..].find(PG_END)? + PG_END.len();
    Some(&text[from..to])
}

/// `text` with its PostgreSQL section replaced by `section`, or with `section` appended.
pub fn put_pg_section(text: &str, section: &str) -> String {
    let section = section.trim_end();
    match find_pg_section(text) {
        Some(old) => text.replacen(old, section, 1),
        None if text.trim().is_empty() => format!("{section}\n"),
        None => format!("{}\n\n{section}\n", text.trim_end()),
    }
}

/// `x / base` as `0.42×`; `–` when either is missing.
fn over(x: Option<f64>, base: Option<f64>) -> String {
    match (x, base) {
        (Some(x), Some(b)) if b > 0.0 => format!("{:.2}×", x / b),
        _ => "–".into(),
    }
}

/// One row of a PostgreSQL table: each system's delivered/s, then each PostgreSQL system's
/// ratio to sled (`cols[0]`), then the loss.
fn pg_row<'a>(
    w: &mut String,
    cols: &[System],
    first: String,
    get: &dyn Fn(System) -> Option<&'a Summary>,
) {
    let _ = write!(w, "| {first} |");
    for c in cols {
        let _ = write!(
            w,
            " {} |",
            get(*c)
                .map(|x| rate_cell(&x.delivered_per_s))
                .unwrap_or_else(|| "–".into())
        );
    }
    let base = get(System::Outboxd).and_then(|x| x.delivered_per_s.map(|d| d.median));
    for c in cols.iter().skip(1) {
        let v = get(*c).and_then(|x| x.delivered_per_s.map(|d| d.median));
        let _ = write!(w, " {} |", over(v, base));
    }
    let losses: Vec<String> = cols
        .iter()
        .filter_map(|c| get(*c).map(|x| format!("{}: {}", c.name(), loss_cell(x))))
        .collect();
    let _ = writeln!(w, " {} |", losses.join("; "));
}

/// The section comparing outboxd on PostgreSQL (one broker, three brokers) with outboxd on
/// sled from the same run; `None` when the run has no PostgreSQL system beside sled's.
pub fn pg_section(r: &Report, systems: &[System], analysis: Option<&str>) -> Option<String> {
    let pg: Vec<System> = systems
        .iter()
        .copied()
        .filter(|s| s.uses_postgres())
        .collect();
    let has = |sys: System| r.summary.iter().any(|x| x.system == sys);
    if pg.iter().all(|s| !has(*s)) {
        return None;
    }
    let cols: Vec<System> = std::iter::once(System::Outboxd)
        .chain(pg.iter().copied())
        .filter(|s| has(*s))
        .collect();
    let sled = |w: Workload, size: usize, rate: Option<u64>, n: usize| {
        find(&r.summary, System::Outboxd, w, size, rate, n)
    };
    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(w, "{PG_BEGIN}\n");
    let _ = writeln!(w, "## outboxd on PostgreSQL beside sled\n");
    let _ = writeln!(
        w,
        "A run of its own, not the one of the tables above; every figure here comes from it, \
         and each ratio is of two medians of it (PostgreSQL over sled: above 1× PostgreSQL \
         delivers more, or for p99 waits longer). Regenerate with:\n"
    );
    let _ = writeln!(w, "```\n{}\n```\n", r.command);
    let m = &r.machine;
    let _ = writeln!(
        w,
        "- Machine: `nproc` = {}, CPU {} (from /proc/cpuinfo), memory {}, {}, kernel {}; data \
         dirs on {}. Everything runs on it at once: the brokers, both PostgreSQL servers and \
         the load generator.",
        m.nproc, m.cpu_model, m.mem_total, m.os, m.kernel, m.data_fs
    );
    for k in ["outboxd", "outboxd source", "postgresql", "rustc"] {
        if let Some(v) = r.versions.get(k) {
            let _ = writeln!(w, "- {k}: `{v}`");
        }
    }
    let s = &r.settings;
    let _ = writeln!(
        w,
        "- Each case: {} s warm-up, {} s measured, {} repetition(s), the systems interleaved \
         within each repetition; median and (min–max).",
        s.warmup_s, s.measure_s, s.reps
    );
    let _ = writeln!(
        w,
        "- `outboxd`: the sled store, `durability = \"fsync\"`, a fresh data dir per case. \
         `outboxd-pg`: one broker with `storage.backend = \"postgres\"` (`OUTBOXD_STORAGE__BACKEND`, \
         `OUTBOXD_POSTGRES__URL`, the `[postgres]` defaults otherwise) on a fresh database \
         (`CREATE DATABASE` per case, dropped after it) of a primary with a synchronous standby, \
         both on this machine, started once per run by `tools/pg-cluster.sh start DIR \
         --standby` (`fsync = on`, `synchronous_commit = on`, the standby named in \
         `synchronous_standby_names`): an `ok` follows a COMMIT the primary fsync'd and the \
         standby flushed. `outboxd-pg3`: three brokers on the same database; subscriber i \
         connects to broker i mod 3 and publisher i to broker (i + 1) mod 3, so in 1 → 1 every \
         message crosses from one broker to another (a NOTIFY wakes the subscriber's broker) \
         and a fan-out reaches subscribers on all three. Other settings as in the tables above."
    );

    let sat: Vec<usize> = {
        let mut v: Vec<usize> = r
            .summary
            .iter()
            .filter(|x| x.workload == Workload::Saturation && x.system.is_outboxd())
            .map(|x| x.size)
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let header = |w: &mut String, first: &str, extra: &[&str]| {
        let _ = write!(w, "| {first} |");
        for c in &cols {
            let _ = write!(w, " {} |", c.name());
        }
        for c in cols.iter().skip(1) {
            let _ = write!(w, " {} / sled |", c.name());
        }
        for e in extra {
            let _ = write!(w, " {e} |");
        }
        let _ = write!(w, "\n| --- |");
        for _ in 0..(2 * cols.len() - 1 + extra.len()) {
            let _ = write!(w, " --- |");
        }
        let _ = writeln!(w);
    };
    if !sat.is_empty() {
        let _ = writeln!(
            w,
            "\n### Saturation, 1 publisher → 1 durable subscriber (delivered msg/s)\n"
        );
        let _ = writeln!(
            w,
            "Closed loop as in the saturation table above ({PUBLISH_WINDOW} publishes \
             unconfirmed, {E2E_WINDOW} undelivered at most).\n"
        );
        header(w, "payload", &["loss"]);
        for size in &sat {
            pg_row(w, &cols, size_name(*size), &|sys| {
                find(&r.summary, sys, Workload::Saturation, *size, None, 1)
            });
        }
    }

    let lat: Vec<&Summary> = r
        .summary
        .iter()
        .filter(|x| x.workload == Workload::Latency && x.system.is_outboxd())
        .collect();
    if !lat.is_empty() {
        let size = lat[0].size;
        let mut rates: Vec<u64> = lat.iter().filter_map(|x| x.rate).collect();
        rates.sort();
        rates.dedup();
        let _ = writeln!(
            w,
            "\n### Latency at fixed rates, 1 → 1, {} (open loop, from the intended send time)\n",
            size_name(size)
        );
        let _ = writeln!(
            w,
            "| rate msg/s | system | delivered msg/s | p50 | p99 | p99.9 | p99 / sled's | pacer p99 | loss |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for rate in &rates {
            let base = sled(Workload::Latency, size, Some(*rate), 1)
                .and_then(|x| x.p99_us.map(|p| p.median));
            for c in &cols {
                if let Some(x) = find(&r.summary, *c, Workload::Latency, size, Some(*rate), 1) {
                    let ratio = if *c == System::Outboxd {
                        "1×".to_string()
                    } else {
                        over(x.p99_us.map(|p| p.median), base)
                    };
                    let _ = writeln!(
                        w,
                        "| {rate} | {} | {} | {} | {} | {} | {ratio} | {} | {} |",
                        c.name(),
                        med(&x.delivered_per_s, 0),
                        us_cell(&x.p50_us),
                        us_cell(&x.p99_us),
                        us_cell(&x.p999_us),
                        x.send_lag_p99_us
                            .map(|s| fmt_us(s.median))
                            .unwrap_or_else(|| "–".into()),
                        loss_cell(x)
                    );
                }
            }
        }
    }

    let mut fan: Vec<(usize, usize)> = r
        .summary
        .iter()
        .filter(|x| x.workload == Workload::Fanout && x.system.is_outboxd())
        .map(|x| (x.subscribers, x.size))
        .collect();
    fan.sort();
    fan.dedup();
    if !fan.is_empty() {
        let _ = writeln!(
            w,
            "\n### Fan-out, 1 publisher → N durable subscribers, a topic publish (deliveries/s, all subscribers together)\n"
        );
        header(w, "subscribers", &["loss"]);
        for (n, size) in &fan {
            pg_row(w, &cols, format!("{n} ({})", size_name(*size)), &|sys| {
                find(&r.summary, sys, Workload::Fanout, *size, None, *n)
            });
        }
    }

    let _ = writeln!(
        w,
        "\n### Where the CPU goes (medians over the measured window)\n"
    );
    let _ = writeln!(
        w,
        "Percent of one core ({} cores here). Brokers: all broker processes of the system \
         together; PostgreSQL: every process of both servers (backends, WAL writer, WAL \
         sender and receiver). Commit groups: the brokers' `outboxd_commit_groups_total` (one \
         COMMIT each on PostgreSQL, one fdatasync each on sled). fsyncs/s: fsync + fdatasync \
         calls of the brokers (sled) or of both servers (PostgreSQL), where perf counts them.\n",
        m.nproc
    );
    let _ = writeln!(
        w,
        "| case | system | brokers CPU % | PostgreSQL CPU % | commit groups/s | fsyncs/s | delivered per commit group | brokers RSS max MiB |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    let mut cases: Vec<(&Summary, String)> = Vec::new();
    for x in r.summary.iter().filter(|x| cols.contains(&x.system)) {
        let name = match x.workload {
            Workload::Saturation => format!("saturation {}", size_name(x.size)),
            Workload::Latency => format!("latency {} msg/s", x.rate.unwrap_or(0)),
            Workload::Fanout => format!("fan-out 1 → {}", x.subscribers),
            Workload::Pairs => format!("pairs {}", x.subscribers),
        };
        cases.push((x, name));
    }
    for (x, name) in &cases {
        let fsyncs = if x.system.uses_postgres() {
            &x.db_fsyncs_per_s
        } else {
            &x.fsyncs_per_s
        };
        let per_group = match (x.delivered_per_s, x.commit_groups_per_s) {
            (Some(d), Some(g)) if g.median > 0.0 => format!("{:.0}", d.median / g.median),
            _ => "–".into(),
        };
        let _ = writeln!(
            w,
            "| {name} | {} | {} | {} | {} | {} | {per_group} | {} |",
            x.system.name(),
            med(&x.cpu_pct, 0),
            med(&x.db_cpu_pct, 0),
            med(&x.commit_groups_per_s, 0),
            med(fsyncs, 0),
            med(&x.rss_max_mib, 0),
        );
    }

    let _ = writeln!(w, "\n### Targets for the PostgreSQL backend\n");
    let _ = writeln!(w, "| target | measured | met? |\n| --- | --- | --- |");
    let verdict = |v: f64, t: f64| if v >= t { "yes" } else { "**no**" };
    match find(
        &r.summary,
        System::OutboxdPg,
        Workload::Saturation,
        256,
        None,
        1,
    )
    .and_then(|x| x.delivered_per_s)
    {
        Some(d) => {
            let _ = writeln!(
                w,
                "| 1 → 1, 256 B, one broker, synchronous standby: ≥ {} msg/s | outboxd-pg {} ({}–{}); sled {} | {} |",
                fmt_rate(PG_TARGET_1TO1),
                fmt_rate(d.median),
                fmt_rate(d.min),
                fmt_rate(d.max),
                sled(Workload::Saturation, 256, None, 1)
                    .and_then(|x| x.delivered_per_s)
                    .map(|s| fmt_rate(s.median))
                    .unwrap_or_else(|| "–".into()),
                verdict(d.median, PG_TARGET_1TO1)
            );
        }
        None => {
            let _ = writeln!(
                w,
                "| 1 → 1, 256 B, one broker, synchronous standby: ≥ {} msg/s | not measured | – |",
                fmt_rate(PG_TARGET_1TO1)
            );
        }
    }
    for sys in &pg {
        let fan = r
            .summary
            .iter()
            .find(|x| {
                x.system == *sys
                    && x.workload == Workload::Fanout
                    && x.subscribers == PG_TARGET_FANOUT_N
            })
            .and_then(|x| x.delivered_per_s);
        let _ = match fan {
            Some(d) => writeln!(
                w,
                "| fan-out 1 → {PG_TARGET_FANOUT_N}, {}: ≥ {} deliveries/s | {} ({}–{}) | {} |",
                sys.name(),
                fmt_rate(PG_TARGET_FANOUT),
                fmt_rate(d.median),
                fmt_rate(d.min),
                fmt_rate(d.max),
                verdict(d.median, PG_TARGET_FANOUT)
            ),
            None => writeln!(
                w,
                "| fan-out 1 → {PG_TARGET_FANOUT_N}, {}: ≥ {} deliveries/s | not measured | – |",
                sys.name(),
                fmt_rate(PG_TARGET_FANOUT)
            ),
        };
    }
    if let Some(a) = analysis {
        let _ = writeln!(w, "\n{}", a.trim_end());
    }
    let _ = writeln!(w, "\n{PG_END}");
    Some(o)
}
