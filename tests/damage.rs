//! A damaged data directory is refused or served whole, never served as if whole with less.
//!
//! sled recovers its log up to the first record that does not check out. For a torn tail after
//! a crash that is right; for damage in the middle (a cut file, a flipped bit) it silently drops
//! every later write: the broker used to start with fewer messages, the same epoch, `missed 0`,
//! and then assign the lost seqs again. These tests damage copies of a known store at many
//! places in every file and start the real broker on each.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{seqs, Broker, Client, Opts};
use serde_json::{json, Value};

const NEWS: u64 = 100;

/// What the known store holds: bob's and carol's epochs, and how bob's messages look.
struct Known {
    dir: tempfile::TempDir,
    bob_epoch: String,
    carol_epoch: String,
    shape: Shape,
}

/// Bob gets `sent` messages and acks the first `acked`; `big` makes each 16 KiB, which in a
/// data dir of sled's old 512 KiB segments puts leaves in blob files.
#[derive(Clone, Copy)]
struct Shape {
    sent: u64,
    acked: u64,
    big: bool,
}

const SMALL: Shape = Shape {
    sent: 400,
    acked: 100,
    big: false,
};
const BLOBS: Shape = Shape {
    sent: 80,
    acked: 20,
    big: true,
};

fn bob_payload(n: u64, big: bool) -> Value {
    let pad = if big {
        16_000
    } else {
        150 + (n as usize % 7) * 20
    };
    json!({"n": n, "pad": "b".repeat(pad)})
}

fn news_payload(n: u64) -> Value {
    json!({"news": n})
}

/// Bob has seqs 101..=400 pending (1..=100 acked), carol 100 topic messages; stopped cleanly.
async fn known_store(shape: Shape) -> Known {
    let opts = if shape.big {
        // A data dir as written before the body log, with sled's old segment size.
        Opts::new()
            .env("OUTBOXD_FAULT_SEGMENT_BYTES", 512 * 1024)
            .env("OUTBOXD_FAULT_INLINE_BODIES", 1)
    } else {
        Opts::new()
    };
    let mut broker = Broker::start(opts);
    let (mut carol, w) = broker.client("carol").await;
    let carol_epoch = w["epoch"].as_str().expect("epoch").to_string();
    carol.subscribe("s", "news").await;
    carol.close().await;
    let (mut alice, _) = broker.client("alice").await;
    for n in 1..=shape.sent {
        alice
            .publish_ok(&format!("b{n}"), "client:bob", bob_payload(n, shape.big))
            .await;
        if n <= NEWS {
            alice
                .publish_ok(&format!("n{n}"), "topic:news", news_payload(n))
                .await;
        }
    }
    let (mut bob, w) = broker.client("bob").await;
    let bob_epoch = w["epoch"].as_str().expect("epoch").to_string();
    let got = bob.recv_msgs(shape.acked as usize).await;
    assert_eq!(got.len() as u64, shape.acked);
    bob.ack_upto(shape.acked).await;
    bob.sync().await;
    bob.close().await;
    alice.close().await;
    assert!(broker.sigterm().success(), "{}", broker.stderr());
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(&broker.data_dir(), &dir.path().join("data"));
    Known {
        dir,
        bob_epoch,
        carol_epoch,
        shape,
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}

/// Every file of a data dir, relative to it.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        for e in std::fs::read_dir(dir.join(&rel)).expect("read_dir") {
            let e = e.expect("entry");
            let r = rel.join(e.file_name());
            if e.file_type().expect("type").is_dir() {
                todo.push(r);
            } else {
                out.push(r);
            }
        }
    }
    out.sort();
    out
}

/// How a start on a damaged copy ended.
enum Start {
    Refused(i32, String),
    Serving(std::process::Child, String),
}

fn start_on(dir: &Path) -> Start {
    let mut child = common::serve_command(dir)
        .env("OUTBOXD_SERVER__ADMIN_LISTEN", "127.0.0.1:0")
        .spawn()
        .expect("spawn outboxd");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("outboxd ready: ") {
                let _ = tx.send(url.to_string());
            }
        }
    });
    match rx.recv_timeout(common::START_TIMEOUT) {
        Ok(url) => Start::Serving(child, url),
        Err(_) => {
            let deadline = Instant::now() + Duration::from_secs(10);
            let status = loop {
                if let Some(s) = child.try_wait().expect("wait") {
                    break s;
                }
                assert!(
                    Instant::now() < deadline,
                    "outboxd neither ready nor exited"
                );
                std::thread::sleep(Duration::from_millis(20));
            };
            Start::Refused(status.code().unwrap_or(-1), err.join().unwrap_or_default())
        }
    }
}

/// The copy is either refused with the damage named, or served exactly as it was stored.
async fn refused_or_whole(known: &Known, case: &str, damage: impl FnOnce(&Path)) -> bool {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(&known.dir.path().join("data"), &dir.path().join("data"));
    damage(&dir.path().join("data"));
    match start_on(dir.path()) {
        Start::Refused(code, stderr) => {
            assert_eq!(
                code, 4,
                "{case}: refused with status {code}, not 4 (store damaged):\n{stderr}"
            );
            assert!(
                stderr.contains("is damaged") && stderr.contains("outboxd repair"),
                "{case}: the refusal names neither the damage nor the way out:\n{stderr}"
            );
            // sled panics on some damaged records while it recovers; the broker catches that
            // and refuses (status 4 above). A panic of the broker's own code is a bug.
            assert!(
                !stderr.contains("panicked at src/"),
                "{case}: a panic:\n{stderr}"
            );
            true
        }
        Start::Serving(mut child, url) => {
            let mut bob = Client::connect(&url).await;
            let w = bob.hello("bob", None).await;
            assert_eq!(w["epoch"], known.bob_epoch.as_str(), "{case}: {w}");
            // Acks are not confirmed: one lost with the damage only brings messages back.
            let Shape { sent, acked, big } = known.shape;
            let pending = w["pending"].as_u64().expect("pending");
            assert!(
                (sent - acked..=sent).contains(&pending),
                "{case}: served with less: {w}"
            );
            assert_eq!(w["missed"], 0, "{case}: {w}");
            let msgs = bob.recv_msgs(pending as usize).await;
            let first = sent - pending + 1;
            assert_eq!(seqs(&msgs), (first..=sent).collect::<Vec<_>>(), "{case}");
            for m in &msgs {
                let n = m["seq"].as_u64().expect("seq");
                assert_eq!(m["payload"], bob_payload(n, big), "{case}: garbage served");
            }
            let mut carol = Client::connect(&url).await;
            let w = carol.hello("carol", None).await;
            assert_eq!(w["epoch"], known.carol_epoch.as_str(), "{case}: {w}");
            assert_eq!(w["pending"], NEWS, "{case}: served with less: {w}");
            let msgs = carol.recv_msgs(NEWS as usize).await;
            for (i, m) in msgs.iter().enumerate() {
                assert_eq!(
                    m["payload"],
                    news_payload(i as u64 + 1),
                    "{case}: garbage served"
                );
            }
            let _ = child.kill();
            let _ = child.wait();
            false
        }
    }
}

fn truncate(file: &Path, len: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .expect("open");
    f.set_len(len).expect("truncate");
}

fn flip(file: &Path, at: u64, bit: u8) {
    let mut bytes = std::fs::read(file).expect("read");
    let i = usize::try_from(at).expect("offset");
    bytes[i] ^= 1 << bit;
    std::fs::write(file, bytes).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_file_anywhere_in_the_data_dir_is_refused_or_served_whole() {
    // Catches a store served with fewer messages, the same epoch and missed 0 after a file of
    // its data dir was cut (the seqs would then be assigned again).
    let known = known_store(SMALL).await;
    let data = known.dir.path().join("data");
    let mut refused = 0;
    let mut cases = 0;
    for rel in files(&data) {
        let len = std::fs::metadata(data.join(&rel)).expect("meta").len();
        let mut cuts: Vec<u64> = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9]
            .iter()
            .map(|f| (len as f64 * f) as u64)
            .collect();
        cuts.push(len.saturating_sub(1));
        cuts.dedup();
        for cut in cuts.into_iter().filter(|c| *c < len) {
            let case = format!("{} cut to {cut} of {len} bytes", rel.display());
            let r = rel.clone();
            cases += 1;
            if refused_or_whole(&known, &case, |d| truncate(&d.join(&r), cut)).await {
                refused += 1;
            }
        }
    }
    eprintln!("{refused} of {cases} cuts refused, the rest served whole");
    assert!(refused > 0, "no cut was refused: the check sees nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_anywhere_in_the_data_dir_is_refused_or_served_whole() {
    // Catches a bit flip in the middle of sled's log that made it recover a prefix silently,
    // and a damaged record served as garbage.
    let known = known_store(SMALL).await;
    let data = known.dir.path().join("data");
    let mut refused = 0;
    let mut cases = 0;
    for rel in files(&data) {
        let len = std::fs::metadata(data.join(&rel)).expect("meta").len();
        let spots: u64 = if rel == Path::new("db") { 12 } else { 4 };
        for i in 1..=spots {
            let at = len * i / (spots + 1);
            if at >= len {
                continue;
            }
            let bit = (i % 8) as u8;
            let case = format!("{} bit {bit} flipped at {at} of {len}", rel.display());
            let r = rel.clone();
            cases += 1;
            if refused_or_whole(&known, &case, |d| flip(&d.join(&r), at, bit)).await {
                refused += 1;
            }
        }
    }
    eprintln!("{refused} of {cases} flips refused, the rest served whole");
    assert!(refused > 0, "no flip was refused: the check sees nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repaired_store_moves_every_outbox_to_a_new_epoch_and_never_reuses_a_seq_in_one() {
    // Catches the loss being accepted silently: after `repair --accept-loss` a client that
    // resumes at its old position must hear resumed:false, and inspect must not show the
    // damaged store's counts as if true.
    let known = known_store(SMALL).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    copy_dir(&known.dir.path().join("data"), &data);
    // Both logs lose their second half: sled's, and the body log's, whose commit journal
    // could otherwise finish what sled lost.
    for rel in files(&data) {
        if rel == Path::new("db") || rel.starts_with("bodies") {
            let len = std::fs::metadata(data.join(&rel)).expect("meta").len();
            truncate(&data.join(&rel), len / 2);
        }
    }

    let bin = env!("CARGO_BIN_EXE_outboxd");
    let run = |args: &[&str]| {
        let out = Command::new(bin)
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("run outboxd");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let d = data.to_str().expect("utf-8 path");
    let (code, _, err) = run(&["inspect", "--data", d, "clients"]);
    assert_eq!(code, 4, "inspect of a damaged store: {err}");
    assert!(err.contains("is damaged"), "{err}");
    let (code, _, err) = run(&["repair", "--data", d]);
    assert_eq!(
        code, 4,
        "a check without --accept-loss reports the damage: {err}"
    );
    let (code, out, err) = run(&["repair", "--data", d, "--accept-loss", "--json"]);
    assert_eq!(code, 0, "repair: {out}{err}");
    let report: Value = serde_json::from_str(out.trim()).expect("repair --json");
    assert!(report["damage"].is_string(), "{report}");
    let (code, out, err) = run(&["repair", "--data", d]);
    assert_eq!(code, 0, "the repaired store checks out: {out}{err}");

    let Start::Serving(mut child, url) = start_on(dir.path()) else {
        panic!("the repaired store was refused");
    };
    let mut bob = Client::connect(&url).await;
    let w = bob
        .hello("bob", Some((known.bob_epoch.as_str(), SMALL.sent)))
        .await;
    assert_eq!(w["resumed"], false, "told of the loss: {w}");
    assert_ne!(w["epoch"], known.bob_epoch.as_str(), "{w}");
    let epoch = w["epoch"].as_str().expect("epoch").to_string();
    let next = w["next_seq"].as_u64().expect("next_seq");
    let pending = w["pending"].as_u64().expect("pending");
    let old = bob.recv_msgs(pending as usize).await;
    let last_old = old.last().map_or(0, common::seq);
    let mut alice = Client::connect(&url).await;
    alice.hello("alice", None).await;
    for n in 0..5 {
        alice
            .publish_ok(&format!("after{n}"), "client:bob", json!({"after": n}))
            .await;
    }
    let new = bob.recv_msgs(5).await;
    assert_eq!(seqs(&new), (next..next + 5).collect::<Vec<_>>());
    assert!(
        seqs(&new).iter().all(|s| *s > last_old),
        "a seq of the new epoch was assigned twice"
    );
    assert!(
        old.iter().chain(&new).all(|m| m["payload"].is_object()),
        "garbage served"
    );
    bob.ack_upto(next + 4).await;
    bob.sync().await;
    drop(bob);
    let _ = child.kill();
    let _ = child.wait();
    // After a crash of the repaired broker, the new epoch holds.
    let Start::Serving(mut child, url) = start_on(dir.path()) else {
        panic!("refused after the repair");
    };
    let mut bob = Client::connect(&url).await;
    let w = bob.hello("bob", Some((&epoch, next + 4))).await;
    assert_eq!(w["resumed"], true, "{w}");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_blob_file_is_refused_or_served_whole() {
    // Catches damage in the files sled keeps large leaves in (data dirs of its old 512 KiB
    // segments), which the log's own recovery does not read.
    let known = known_store(BLOBS).await;
    let data = known.dir.path().join("data");
    let blobs: Vec<PathBuf> = files(&data)
        .into_iter()
        .filter(|f| f.starts_with("blobs"))
        .collect();
    assert!(!blobs.is_empty(), "the store has no blob file to damage");
    let mut refused = 0;
    let mut cases = 0;
    for rel in blobs.iter().take(4) {
        let len = std::fs::metadata(data.join(rel)).expect("meta").len();
        for (i, at) in [len / 3, len * 2 / 3].into_iter().enumerate() {
            let r = rel.clone();
            let case = format!("{} bit flipped at {at} of {len}", rel.display());
            cases += 1;
            if refused_or_whole(&known, &case, |d| flip(&d.join(&r), at, i as u8 + 3)).await {
                refused += 1;
            }
            let r = rel.clone();
            let case = format!("{} cut to {at} of {len}", rel.display());
            cases += 1;
            if refused_or_whole(&known, &case, |d| truncate(&d.join(&r), at)).await {
                refused += 1;
            }
        }
    }
    eprintln!("{refused} of {cases} blob damages refused, the rest served whole");
    assert!(
        refused > 0,
        "no damaged blob was refused: the check sees nothing"
    );
}
