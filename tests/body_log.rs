//! The body log (`<data_dir>/bodies`): message bodies written once, beside sled, their space
//! given back once every message in a segment is gone, and a damaged body refused at start,
//! never served.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{seqs, Broker, Client, Opts};
use serde_json::{json, Value};

/// The body log's files whose names end in `suffix` (`.seg` for its segments, `.spare` for the
/// emptied ones kept to be written over), with their metadata. The broker deletes and renames
/// files while it runs: if one goes between the listing and its `stat`, the directory is listed
/// again, so the answer is one moment's contents, never a file missed under both names.
fn body_log_files(data: &Path, suffix: &str) -> Vec<(String, std::fs::Metadata)> {
    'again: loop {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(data.join("bodies")).expect("the data dir has a body log") {
            let entry = entry.expect("entry");
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.ends_with(suffix) {
                continue;
            }
            match entry.metadata() {
                Ok(meta) => files.push((name, meta)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue 'again,
                Err(e) => panic!("stat {name}: {e}"),
            }
        }
        return files;
    }
}

/// Bytes of the body log's files (segments, and spares if any are kept).
fn body_log_bytes(data: &Path) -> u64 {
    body_log_files(data, "").iter().map(|(_, m)| m.len()).sum()
}

/// The inodes of the body log's files whose names end in `suffix`.
fn inodes(data: &Path, suffix: &str) -> std::collections::HashSet<u64> {
    use std::os::unix::fs::MetadataExt;
    body_log_files(data, suffix)
        .iter()
        .map(|(_, m)| m.ino())
        .collect()
}

fn big(n: u64) -> Value {
    json!({"n": n, "pad": format!("{n:>8}").repeat(2000)})
}

/// The offset of a byte in the middle of the middle message body of a body log segment. A
/// segment starts with an 8-byte mark, then its records are `[len u32 LE][crc32 u32 LE][bytes]`
/// up to one of length zero; a commit journal's record has the top bit of its length set, and
/// once a checkpoint follows it nothing needs it, so damage there is no loss (the middle of the
/// file often falls into one between two groups).
fn middle_of_a_body(segment: &[u8]) -> usize {
    let mut bodies = Vec::new();
    let mut at = 8;
    while at + 8 <= segment.len() {
        let len = u32::from_le_bytes(segment[at..at + 4].try_into().expect("4 bytes"));
        if len == 0 {
            break;
        }
        let n = (len & !(1 << 31)) as usize;
        if len & (1 << 31) == 0 {
            bodies.push(at + 8 + n / 2);
        }
        at += 8 + n;
    }
    assert!(!bodies.is_empty(), "no body in the segment");
    bodies[bodies.len() / 2]
}

/// Publishes `count` messages made by `payload` to `to`, `window` at a time, each answered `ok`.
async fn publish_many(
    alice: &mut Client,
    to: &str,
    count: u64,
    window: u64,
    payload: impl Fn(u64) -> Value,
) {
    publish_many_with(alice, to, count, window, payload, false).await;
}

/// [`publish_many`], each publish with an idempotency key when `keyed`.
async fn publish_many_with(
    alice: &mut Client,
    to: &str,
    count: u64,
    window: u64,
    payload: impl Fn(u64) -> Value,
    keyed: bool,
) {
    let mut n = 0;
    while n < count {
        let batch = window.min(count - n);
        for i in n..n + batch {
            let mut frame =
                json!({"type": "publish", "ref": format!("p{i}"), "to": to, "payload": payload(i)});
            if keyed {
                frame["key"] = json!(format!("k{i}"));
            }
            alice.send(frame).await;
        }
        for _ in 0..batch {
            let a = alice.recv_skip_pings().await;
            assert_eq!(a["type"], "ok", "publish refused: {a}");
        }
        n += batch;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_give_their_body_log_space_back() {
    // Catches segments kept after every message in them was acked (the disk fills up), and a
    // segment deleted while a message in it is still stored (that message lost). No spares:
    // every emptied segment is deleted (spares are bounded in the test of their reuse).
    acked_messages_give_their_space_back(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_give_their_space_back_at_once_though_their_keys_are_remembered() {
    // Catches segments kept for the minute a mostly dead segment waits before its compaction
    // because the runs of idempotency keys in them are remembered for the dedup window: a
    // broker streaming large messages then kept the whole stream on disk and in the page cache.
    acked_messages_give_their_space_back(true).await;
}

/// 2,600 bodies of 16 KB (more than one 32 MiB segment), with idempotency keys when `keyed`,
/// acked one by one: the body log gives the space back within seconds, and the one message
/// left survives a SIGKILL.
async fn acked_messages_give_their_space_back(keyed: bool) {
    let mut broker = Broker::start(Opts::new().env("OUTBOXD_STORAGE__SPARE_SEGMENTS", 0));
    let data = broker.data_dir();
    let (mut alice, _) = broker.client("alice").await;
    const SENT: u64 = 2_600;
    publish_many_with(&mut alice, "client:bob", SENT, 200, big, keyed).await;
    let written = body_log_bytes(&data);
    assert!(written > 40_000_000, "bodies written: {written} bytes");

    let (mut bob, w) = broker.client("bob").await;
    assert_eq!(w["pending"], SENT, "{w}");
    let mut got = Vec::new();
    while (got.len() as u64) < SENT {
        let m = bob.recv_msg().await;
        let seq = common::seq(&m);
        assert_eq!(
            m["payload"],
            big(seq - 1),
            "the body served is the one stored"
        );
        bob.ack(seq).await;
        got.push(m);
    }
    bob.sync().await;
    // The acks are durable with the next commit; then the segments go.
    alice
        .publish_ok("after", "client:bob", json!({"after": 1}))
        .await;
    let last = bob.recv_msg().await;
    assert_eq!(last["payload"], json!({"after": 1}));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = body_log_bytes(&data);
        if now < written / 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the body log still holds {now} of {written} bytes after every message was acked"
        );
        alice.sync().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(bob);
    // The message still stored survives a crash, its segment with it.
    broker.kill9();
    broker.restart();
    let (mut bob, w) = broker.client("bob").await;
    assert_eq!(w["pending"], 1, "{w}");
    let m = bob.recv_msg().await;
    assert_eq!(m["payload"], json!({"after": 1}));
    assert_eq!(common::seq(&m), SENT + 1);
    assert!(body_log_bytes(&data) < written / 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_many_subscribers_has_its_body_written_once() {
    // Catches a topic publish writing its body once per subscriber.
    let broker = Broker::start(Opts::new());
    let data = broker.data_dir();
    const SUBS: usize = 40;
    const SENT: u64 = 20;
    let mut subs = Vec::new();
    for i in 0..SUBS {
        let (mut c, _) = broker.client(&format!("sub{i}")).await;
        let a = c.subscribe("s", "news").await;
        assert_eq!(a["type"], "ok", "{a}");
        subs.push(c);
    }
    let (mut alice, _) = broker.client("alice").await;
    let before = body_log_bytes(&data);
    publish_many(&mut alice, "topic:news", SENT, 5, big).await;
    let grew = body_log_bytes(&data) - before;
    let one = serde_json::to_string(&big(0)).expect("json").len() as u64;
    assert!(
        grew >= SENT * one && grew < 2 * SENT * one,
        "{SENT} publishes of {one} bytes to {SUBS} subscribers grew the body log by {grew} bytes"
    );
    for c in &mut subs {
        let msgs = c.recv_msgs(SENT as usize).await;
        assert_eq!(seqs(&msgs), (1..=SENT).collect::<Vec<_>>());
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(m["payload"], big(i as u64));
        }
    }
}

fn outboxd(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run outboxd");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_body_is_refused_at_start_and_its_loss_reported_after_repair() {
    // Catches a body whose bytes changed on disk being served (garbage) or dropped silently.
    let mut broker = Broker::start(Opts::new());
    let data = broker.data_dir();
    let (mut alice, _) = broker.client("alice").await;
    publish_many(&mut alice, "client:bob", 10, 10, big).await;
    let (_, w) = broker.client("bob").await;
    let epoch = w["epoch"].as_str().expect("epoch").to_string();
    assert_eq!(broker.sigterm().code(), Some(0));

    let seg = std::fs::read_dir(data.join("bodies"))
        .expect("bodies")
        .map(|e| e.expect("entry").path())
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("a segment");
    let mut bytes = std::fs::read(&seg).expect("read");
    let at = middle_of_a_body(&bytes);
    bytes[at] ^= 0x10;
    std::fs::write(&seg, bytes).expect("write");

    let d = data.to_str().expect("utf-8 path");
    let root = data.parent().expect("parent");
    let (code, out) = outboxd(root, &["inspect", "--data", d, "clients"]);
    assert_eq!(code, 4, "inspect of a damaged body log: {out}");
    assert!(out.contains("is damaged") && out.contains("body"), "{out}");
    let (code, out) = outboxd(root, &["repair", "--data", d, "--accept-loss", "--json"]);
    assert_eq!(code, 0, "repair: {out}");

    broker.restart();
    let mut bob = Client::connect(&broker.url).await;
    let w = bob.hello("bob", Some((&epoch, 0))).await;
    assert_eq!(w["resumed"], false, "told of the loss: {w}");
    let pending = w["pending"].as_u64().expect("pending");
    let missed = w["missed"].as_u64().expect("missed");
    assert!(missed >= 1 && pending + missed == 10, "{w}");
    for m in bob.recv_msgs(pending as usize).await {
        assert_eq!(m["payload"], big(common::seq(&m) - 1), "garbage served");
    }
}

/// Small body log segments, so a test sees many of them.
/// Segments of 1 MiB, compacted as soon as they are mostly dead, none kept as a spare (so the
/// space the body log holds is what its stored messages need); the compactions logged (at
/// debug: they are routine).
fn small_segments() -> Opts {
    Opts::new()
        .env("RUST_LOG", "info,outboxd::store::retention=debug")
        .env("OUTBOXD_FAULT_BODY_SEGMENT_BYTES", 1 << 20)
        .env("OUTBOXD_FAULT_BODY_COMPACT_AFTER_MS", 0)
        .env("OUTBOXD_STORAGE__SPARE_SEGMENTS", 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_while_writing_over_reused_segments_loses_nothing() {
    // Catches a record a reused segment held under its earlier number read back as a message
    // or replayed as a commit after a crash, a reused segment's new records lost, and more
    // spares kept than storage.spare_segments allows.
    let mut broker = Broker::start(
        Opts::new()
            .env("OUTBOXD_FAULT_BODY_SEGMENT_BYTES", 1 << 20)
            .env("OUTBOXD_STORAGE__SPARE_SEGMENTS", 3),
    );
    let data = broker.data_dir();
    let (mut alice, _) = broker.client("alice").await;
    let (mut bob, _) = broker.client("bob").await;
    // Segments fill and are emptied by acks until some are kept as spares.
    let mut sent = 0u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while body_log_files(&data, ".spare").len() < 2 {
        assert!(Instant::now() < deadline, "no segment was kept as a spare");
        publish_many(&mut alice, "client:bob", 50, 50, |i| big(sent + i)).await;
        let msgs = bob.recv_msgs(50).await;
        for m in &msgs {
            assert_eq!(m["payload"], big(common::seq(m) - 1));
        }
        sent += 50;
        bob.ack_upto(sent).await;
        bob.sync().await;
    }
    let spares = inodes(&data, ".spare");
    assert!(spares.len() <= 3, "{} spares", spares.len());
    drop(bob);
    // 200 bodies of 16 KB for carol, never acked: the young head fills and goes on in the
    // spares, written over.
    publish_many(&mut alice, "client:carol", 200, 50, big).await;
    let reused = inodes(&data, ".seg").intersection(&spares).count();
    assert!(reused > 0, "no spare was written over");
    assert!(body_log_files(&data, ".spare").len() <= 3);
    drop(alice);
    broker.kill9();
    broker.restart();
    let (mut carol, w) = broker.client("carol").await;
    assert_eq!(w["pending"], 200, "{w}");
    let msgs = carol.recv_msgs(200).await;
    assert_eq!(seqs(&msgs), (1..=200).collect::<Vec<u64>>());
    for m in &msgs {
        assert_eq!(
            m["payload"],
            big(common::seq(m) - 1),
            "the body stored, not an old one"
        );
    }
    let (_bob, w) = broker.client("bob").await;
    assert_eq!(w["pending"], 0, "acked messages came back: {w}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_acked_one_by_one_survive_every_segment_change() {
    // Catches a segment deleted when it fills up while its last bodies (the group just
    // written) are not counted yet: the message is then skipped as if acked, silently lost.
    let mut broker = Broker::start(small_segments());
    let data = broker.data_dir();
    let (mut alice, _) = broker.client("alice").await;
    let (mut bob, _) = broker.client("bob").await;
    // 200 bodies of 16 KB, one at a time, each acked before the next: about three segments
    // fill up while nothing else in them is stored.
    for n in 0..200u64 {
        alice
            .publish_ok(&format!("p{n}"), "client:bob", big(n))
            .await;
        let m = bob.recv_msg().await;
        assert_eq!(common::seq(&m), n + 1);
        assert_eq!(m["payload"], big(n));
        bob.ack(n + 1).await;
        bob.sync().await;
        // A commit of its own (a topic nobody follows: no body) makes the ack durable, so
        // nothing in the segment is counted when the next body fills it.
        alice
            .publish_ok(&format!("t{n}"), "topic:nobody", json!("tick"))
            .await;
    }
    // Segments go at the next checkpoint (within 50 ms of the acks).
    let deadline = Instant::now() + Duration::from_secs(10);
    while body_log_bytes(&data) >= 3 << 20 {
        assert!(
            Instant::now() < deadline,
            "acked segments were kept: {} bytes",
            body_log_bytes(&data)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(bob);
    broker.kill9();
    broker.restart();
    // The last ack may be lost with the crash (a redelivery, which is allowed); the body of
    // what is still stored must be there.
    let (mut bob, w) = broker.client("bob").await;
    let pending = w["pending"].as_u64().expect("pending");
    assert!(pending <= 1, "{w}");
    for m in bob.recv_msgs(pending as usize).await {
        assert_eq!(m["payload"], big(common::seq(&m) - 1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_that_never_acks_does_not_keep_the_body_log_growing() {
    // Catches segments kept whole for the sake of one old message: the disk would fill with
    // everything published after it while any client stays away.
    let mut broker = Broker::start(small_segments());
    let data = broker.data_dir();
    let (mut alice, _) = broker.client("alice").await;
    let (mut bob, _) = broker.client("bob").await;
    let mut sent = 0u64;
    let mut idle_sent = 0u64;
    // 600 bodies of 16 KB (about 10 segments); every 100th also goes to `idle`, which is away.
    for round in 0..6u64 {
        alice
            .publish_ok(&format!("i{round}"), "client:idle", json!({"idle": round}))
            .await;
        idle_sent += 1;
        publish_many(&mut alice, "client:bob", 100, 50, |i| big(sent + i)).await;
        let msgs = bob.recv_msgs(100).await;
        for m in &msgs {
            assert_eq!(m["payload"], big(common::seq(m) - 1));
        }
        bob.ack_upto(sent + 100).await;
        bob.sync().await;
        sent += 100;
    }
    // Compaction runs with the retention sweep; a publish makes the acks durable.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        alice
            .publish_ok("tick", "client:carol", json!("tick"))
            .await;
        let now = body_log_bytes(&data);
        if now < 4 << 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the body log still holds {now} bytes for {idle_sent} small stored messages"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        broker.stderr_shows("moved the bodies still stored", Duration::from_secs(5)),
        "{}",
        broker.stderr()
    );
    drop(bob);
    broker.kill9();
    broker.restart();
    let (mut idle, w) = broker.client("idle").await;
    assert_eq!(w["pending"], idle_sent, "{w}");
    let msgs = idle.recv_msgs(idle_sent as usize).await;
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(
            m["payload"],
            json!({"idle": i}),
            "the moved body is the one stored"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_outlive_the_segments_their_messages_were_in() {
    // Catches a run of idempotency keys lost when the segment it was written to is compacted
    // or deleted with its acked messages: a retry would then be written twice.
    let mut broker = Broker::start(small_segments());
    let data = broker.data_dir();
    let (mut alice, _) = broker.client("alice").await;
    let (mut bob, _) = broker.client("bob").await;
    const SENT: u64 = 300;
    let mut ids = Vec::new();
    for n in 0..SENT {
        alice
            .send(
                json!({"type": "publish", "ref": n, "to": "client:bob", "payload": big(n),
                         "key": format!("order-{n:06}")}),
            )
            .await;
        if n % 50 == 49 {
            for _ in 0..50 {
                let a = alice.recv_skip_pings().await;
                assert_eq!(a["type"], "ok", "{a}");
                ids.push(a["id"].clone());
            }
        }
    }
    let msgs = bob.recv_msgs(SENT as usize).await;
    bob.ack_upto(common::seq(msgs.last().expect("msgs"))).await;
    bob.sync().await;
    // Every message is acked: their segments go, the key runs in them are moved first (one
    // segment per retention sweep; a publish makes each step durable).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        alice
            .publish_ok("tick", "topic:nobody", json!("tick"))
            .await;
        let now = body_log_bytes(&data);
        if now < 3 << 20 && broker.stderr().contains("moved the bodies still stored") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the body log still holds {now} bytes: {}",
            broker.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(alice);
    drop(bob);
    broker.kill9();
    broker.restart();
    let (mut alice, _) = broker.client("alice").await;
    for n in 0..SENT {
        let a = alice
            .request(
                json!({"type": "publish", "ref": n, "to": "client:bob", "payload": big(n),
                            "key": format!("order-{n:06}")}),
            )
            .await;
        assert_eq!(a["type"], "ok", "{a}");
        assert_eq!(a["duplicate"], true, "retry {n} written again: {a}");
        assert_eq!(
            a["id"], ids[n as usize],
            "retry {n} answered with another id"
        );
    }
    let (_, w) = broker.client("bob").await;
    assert_eq!(w["pending"], 0, "{w}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_run_of_idempotency_keys_is_refused_and_repair_drops_only_the_keys() {
    // Catches a run of keys whose bytes changed on disk being read as some other set of keys
    // (a retry answered with a wrong id, or a new message refused), or its damage passing the
    // open check unseen.
    // The writer waits for the whole burst, so one group stores the ten keys as one run.
    let mut broker =
        Broker::start(Opts::new().set("storage", "group_commit_max_delay_us", 200_000));
    let data = broker.data_dir();
    let (mut alice, _) = broker.client("alice").await;
    // Numbered keys published at once: one group stores them as one run in the body log.
    for i in 0..10u64 {
        alice
            .send(
                json!({"type": "publish", "ref": format!("p{i}"), "to": "client:bob",
                         "payload": {"n": i}, "key": format!("run-key-{i:04}")}),
            )
            .await;
    }
    for _ in 0..10 {
        let a = alice.recv_skip_pings().await;
        assert_eq!(a["type"], "ok", "{a}");
    }
    drop(alice);
    assert_eq!(broker.sigterm().code(), Some(0));

    // A key from the middle of the run is in the run's record only (the tree keeps the first
    // key, the expiry list the last).
    let needle = b"run-key-0005";
    let mut hits = Vec::new();
    for e in std::fs::read_dir(data.join("bodies")).expect("bodies") {
        let path = e.expect("entry").path();
        let bytes = std::fs::read(&path).expect("read");
        if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
            hits.push((path, bytes, at));
        }
    }
    assert_eq!(hits.len(), 1, "the run is in one segment, once");
    assert_eq!(
        hits[0]
            .1
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count(),
        1,
        "the key is in the run's record only"
    );
    let (path, mut bytes, at) = hits.pop().expect("one hit");
    bytes[at + 4] ^= 0x01;
    std::fs::write(&path, bytes).expect("write");

    let d = data.to_str().expect("utf-8 path");
    let root = data.parent().expect("parent");
    let (code, out) = outboxd(root, &["inspect", "--data", d, "clients"]);
    assert_eq!(code, 4, "inspect of a damaged key run: {out}");
    assert!(out.contains("idempotency keys"), "{out}");
    let (code, out) = outboxd(root, &["repair", "--data", d, "--accept-loss", "--json"]);
    assert_eq!(code, 0, "repair: {out}");
    let report: Value = serde_json::from_str(
        out.lines()
            .find(|l| l.trim_start().starts_with('{'))
            .expect("a JSON report"),
    )
    .expect("repair --json");
    assert!(report["removed_records"].as_u64() >= Some(1), "{report}");

    broker.restart();
    // Only the keys went: every message is still there, whole.
    let (mut bob, w) = broker.client("bob").await;
    assert_eq!(w["pending"], 10, "{w}");
    let got = bob.recv_msgs(10).await;
    let payloads: Vec<Value> = got.iter().map(|m| m["payload"].clone()).collect();
    let want: Vec<Value> = (0..10u64).map(|i| json!({"n": i})).collect();
    assert_eq!(payloads, want);
}
