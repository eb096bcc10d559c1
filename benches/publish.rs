//! Confirmed publishes per second, durability "fsync" against "relaxed", measured in one run.
//!
//! One publisher pipelines 256-byte publishes to one client's outbox (at most `WINDOW`
//! unconfirmed at once) against the real `outboxd` binary on a temp data dir. Each mode runs
//! `REPS` times, alternating, and the report gives medians, the fsync/relaxed ratio, and how
//! many publishes shared one fsync (from the broker's own shutdown report).
//!
//! Run: `cargo bench --bench publish` (env BENCH_MESSAGES, BENCH_REPS to change the size).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

const WINDOW: usize = 1024;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Run {
    per_sec: f64,
    per_commit: f64,
}

fn run_once(durability: &str, messages: usize) -> Result<Run, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("data"))
        .current_dir(dir.path())
        .env("OUTBOXD_STORAGE__DURABILITY", durability)
        // No admin API: its "outboxd admin:" line would come before the ready line read below.
        .env("OUTBOXD_SERVER__ADMIN_LISTEN", "")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let log = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let url = line
        .trim()
        .strip_prefix("outboxd ready: ")
        .ok_or_else(|| format!("unexpected first line {line:?}"))?
        .to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let elapsed = rt.block_on(publish_all(&url, messages))?;
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    let lines = log.join().map_err(|_| "log reader failed")?;
    let per_commit = lines
        .iter()
        .find_map(|l| {
            let rest = l.split("publishes_per_commit=").nth(1)?;
            rest.split_whitespace()
                .next()?
                .trim_matches('"')
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(f64::NAN);
    Ok(Run {
        per_sec: messages as f64 / elapsed.as_secs_f64(),
        per_commit,
    })
}

async fn publish_all(url: &str, messages: usize) -> Result<Duration, String> {
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| e.to_string())?;
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::text(r#"{"type":"hello","client_id":"bench-pub"}"#))
        .await
        .map_err(|e| e.to_string())?;
    let _welcome = rx.next().await;
    let payload = "x".repeat(254); // a JSON string of 256 bytes with its quotes
    let window = Arc::new(Semaphore::new(WINDOW));
    let started = Instant::now();
    let reader = {
        let window = Arc::clone(&window);
        tokio::spawn(async move {
            let mut oks = 0usize;
            while oks < messages {
                match rx.next().await {
                    Some(Ok(Message::Text(t))) if t.contains(r#""type":"ok""#) => {
                        oks += 1;
                        window.add_permits(1);
                    }
                    Some(Ok(Message::Text(t))) if t.contains(r#""type":"error""#) => {
                        window.close();
                        return Err(format!("publish refused: {t}"));
                    }
                    Some(Ok(_)) => {}
                    other => {
                        window.close();
                        return Err(format!("connection ended: {other:?}"));
                    }
                }
            }
            Ok(())
        })
    };
    for i in 0..messages {
        if window.acquire().await.map(|p| p.forget()).is_err() {
            // The reader stopped: its error says why.
            break;
        }
        let frame = format!(
            r#"{{"type":"publish","ref":{i},"to":"client:bench-sink","payload":"{payload}"}}"#
        );
        tx.feed(Message::text(frame))
            .await
            .map_err(|e| e.to_string())?;
        if window.available_permits() == 0 || i + 1 == messages {
            tx.flush().await.map_err(|e| e.to_string())?;
        }
    }
    reader.await.map_err(|e| e.to_string())??;
    Ok(started.elapsed())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let messages = env_num("BENCH_MESSAGES", 20_000);
    let reps = env_num("BENCH_REPS", 5);
    let mut fsync = Vec::new();
    let mut relaxed = Vec::new();
    let mut group = Vec::new();
    for rep in 0..reps {
        for mode in ["fsync", "relaxed"] {
            match run_once(mode, messages) {
                Ok(r) => {
                    println!(
                        "rep {rep} {mode:>7}: {:>9.0} confirmed publishes/s, {:.1} publishes per commit",
                        r.per_sec, r.per_commit
                    );
                    if mode == "fsync" {
                        fsync.push(r.per_sec);
                        group.push(r.per_commit);
                    } else {
                        relaxed.push(r.per_sec);
                    }
                }
                Err(e) => {
                    eprintln!("rep {rep} {mode}: failed: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    let (f, r) = (median(fsync.clone()), median(relaxed.clone()));
    println!(
        "\none publisher, {messages} publishes of 256 B per rep, window {WINDOW}, {reps} reps"
    );
    println!(
        "fsync:   median {f:.0}/s (min {:.0}, max {:.0})",
        fsync.iter().cloned().fold(f64::INFINITY, f64::min),
        fsync.iter().cloned().fold(0.0, f64::max)
    );
    println!(
        "relaxed: median {r:.0}/s (min {:.0}, max {:.0})",
        relaxed.iter().cloned().fold(f64::INFINITY, f64::min),
        relaxed.iter().cloned().fold(0.0, f64::max)
    );
    println!("fsync / relaxed = {:.2}", f / r);
    println!("publishes per fsync (median) = {:.1}", median(group));
}
