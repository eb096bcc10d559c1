//! What survives a crash: confirmed publishes under SIGKILL, idempotency keys across a
//! restart, and a store that stops confirming after a failed fsync.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{assert_error, Broker, Client, Event, Opts, QUIET, RECV_TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const FAULT: &str = "OUTBOXD_FAULT_FSYNC_FAIL_AFTER";

/// Drains `client`'s outbox: receives `pending` messages, acking as it goes so the in-flight
/// window never stalls, and returns them in arrival order.
async fn drain(client: &mut Client, pending: u64) -> Vec<Value> {
    let mut got = Vec::new();
    for _ in 0..pending {
        let m = client.recv_msg().await;
        client.ack(common::seq(&m)).await;
        got.push(m);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_with_same_key_is_written_once_even_across_a_crash() {
    // Catches a retried publish being stored twice, e.g. because the key memory died with the process.
    let broker_opts = Opts::new();
    let mut broker = Broker::start(broker_opts);
    let (mut alice, _) = broker.client("alice").await;
    let first = alice
        .request(json!({"type": "publish", "ref": "a1", "to": "client:bob", "payload": "once", "key": "k-1"}))
        .await;
    assert_eq!(first["type"], "ok", "{first}");
    assert_eq!(first["recipients"], 1, "{first}");
    assert!(first.get("duplicate").is_none(), "{first}");
    drop(alice);

    broker.kill9();
    broker.restart();

    let (mut alice, _) = broker.client("alice").await;
    let retry = alice
        .request(json!({"type": "publish", "ref": "a2", "to": "client:bob", "payload": "once", "key": "k-1"}))
        .await;
    assert_eq!(retry["type"], "ok", "{retry}");
    assert_eq!(retry["duplicate"], true, "a retry with a seen key: {retry}");
    assert_eq!(retry["ref"], "a2", "{retry}");
    // The same key for another message (payload or recipient) is refused, not answered as a
    // duplicate of the first: that would tell the publisher a message it never wrote is stored.
    for (r, to, payload) in [
        ("a4", "client:bob", "other"),
        ("a5", "client:carol", "once"),
    ] {
        let reused = alice
            .request(
                json!({"type": "publish", "ref": r, "to": to, "payload": payload, "key": "k-1"}),
            )
            .await;
        assert_error(&reused, "key_reused");
        assert_eq!(reused["ref"], r, "{reused}");
        let message = reused["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("k-1") && message.contains("nothing was written"),
            "{reused}"
        );
    }
    // Another key from the same publisher, and the same key from another publisher, are new.
    let other_key = alice
        .request(json!({"type": "publish", "ref": "a3", "to": "client:bob", "payload": "two", "key": "k-2"}))
        .await;
    assert_eq!(other_key["type"], "ok", "{other_key}");
    assert!(other_key.get("duplicate").is_none(), "{other_key}");
    let (mut carol, _) = broker.client("carol").await;
    let other_publisher = carol
        .request(json!({"type": "publish", "ref": "c1", "to": "client:bob", "payload": "three", "key": "k-1"}))
        .await;
    assert_eq!(other_publisher["type"], "ok", "{other_publisher}");
    assert!(
        other_publisher.get("duplicate").is_none(),
        "keys are scoped to their publisher: {other_publisher}"
    );

    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 3, "{welcome}");
    let got = bob.recv_msgs(3).await;
    let payloads: Vec<_> = got.iter().map(|m| m["payload"].clone()).collect();
    assert_eq!(payloads, vec![json!("once"), json!("two"), json!("three")]);
    bob.expect_quiet(QUIET).await;
    let (_carol, welcome) = broker.client("carol").await;
    assert_eq!(
        welcome["pending"], 0,
        "the refused publish wrote nothing: {welcome}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_pipelined_publishes_loses_no_confirmed_message() {
    // Catches an `ok` sent before the write is durable, or a crash that reorders or invents messages.
    const TOTAL: u64 = 2000;
    const KILL_AFTER_OKS: usize = 300;
    // A small window paces the replay by acks; backlog flow control has its own test in
    // delivery.rs, this one is about what the crash leaves on disk.
    let mut broker = Broker::start(Opts::new().set("delivery", "max_inflight", 64));
    // Bob's outbox exists before the stream starts.
    let (bob, _) = broker.client("bob").await;
    bob.close().await;

    let mut alice = Client::connect(&broker.url).await;
    alice.hello("alice", None).await;
    let (mut sink, mut stream) = alice.into_inner().split();
    let confirmed = Arc::new(Mutex::new(BTreeSet::new()));
    let (enough_tx, enough_rx) = tokio::sync::oneshot::channel::<()>();

    // Reader: records every ok until the connection dies.
    let reader = {
        let confirmed = Arc::clone(&confirmed);
        tokio::spawn(async move {
            let mut enough = Some(enough_tx);
            let mut errors = Vec::new();
            while let Some(Ok(frame)) = stream.next().await {
                let Message::Text(t) = frame else { continue };
                let v: Value = serde_json::from_str(t.as_str()).expect("JSON from the broker");
                match v["type"].as_str() {
                    Some("ok") => {
                        let n: u64 = v["ref"].as_str().and_then(|r| r.parse().ok()).expect("ref");
                        let mut c = confirmed.lock().expect("lock");
                        assert!(c.insert(n), "ok twice for {n}");
                        if c.len() >= KILL_AFTER_OKS {
                            if let Some(tx) = enough.take() {
                                let _ = tx.send(());
                            }
                        }
                    }
                    Some("ping") => {}
                    _ => errors.push(v),
                }
            }
            errors
        })
    };
    // Writer: pipelines every publish without waiting for answers.
    let writer = tokio::spawn(async move {
        for n in 0..TOTAL {
            let frame = json!({"type": "publish", "ref": n.to_string(), "to": "client:bob",
                               "payload": {"n": n}});
            if sink.feed(Message::text(frame.to_string())).await.is_err() {
                return n;
            }
            if n % 50 == 49 && sink.flush().await.is_err() {
                return n;
            }
        }
        let _ = sink.flush().await;
        TOTAL
    });

    // Crash in the middle of the stream.
    let _ = tokio::time::timeout(common::RECV_TIMEOUT, enough_rx).await;
    broker.kill9();
    let errors = reader.await.expect("reader task");
    let sent = writer.await.expect("writer task");
    assert!(errors.is_empty(), "publishes refused: {errors:?}");
    let confirmed = confirmed.lock().expect("lock").clone();
    assert!(
        confirmed.len() >= KILL_AFTER_OKS,
        "only {} publishes confirmed before the kill",
        confirmed.len()
    );
    eprintln!("sent {sent}, confirmed {} before SIGKILL", confirmed.len());

    broker.restart();
    let (mut bob, welcome) = broker.client("bob").await;
    let pending = welcome["pending"].as_u64().expect("pending");
    assert!(
        pending >= confirmed.len() as u64,
        "{pending} pending < {} confirmed: {welcome}",
        confirmed.len()
    );
    let got = drain(&mut bob, pending).await;
    bob.expect_quiet(QUIET).await;

    let mut last_seq = 0;
    let mut last_n = None;
    let mut delivered = BTreeSet::new();
    for m in &got {
        let seq = common::seq(m);
        assert!(seq > last_seq, "seq went from {last_seq} to {seq}");
        last_seq = seq;
        let n = m["payload"]["n"]
            .as_u64()
            .unwrap_or_else(|| panic!("foreign payload: {m}"));
        assert!(n < TOTAL, "a message that was never published: {m}");
        if let Some(l) = last_n {
            assert!(n > l, "out of publish order after {l}: {m}");
        }
        last_n = Some(n);
        assert_eq!(m["from"], "alice", "{m}");
        delivered.insert(n);
    }
    let lost: Vec<_> = confirmed.difference(&delivered).collect();
    assert!(
        lost.is_empty(),
        "{} confirmed messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}

/// Sends one keyed publish per key without waiting, then returns each one's answer, by key.
async fn publish_burst(client: &mut Client, keys: &[String]) -> Vec<Value> {
    for (i, key) in keys.iter().enumerate() {
        client
            .send(
                json!({"type": "publish", "ref": format!("r{i}"), "to": "client:bob",
                         "payload": i, "key": key}),
            )
            .await;
    }
    let mut answers = vec![Value::Null; keys.len()];
    for _ in 0..keys.len() {
        let a = client.recv_skip_pings().await;
        assert_eq!(a["type"], "ok", "{a}");
        let i: usize = a["ref"]
            .as_str()
            .and_then(|r| r[1..].parse().ok())
            .expect("our ref");
        answers[i] = a;
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_numbered_keys_is_written_once_even_across_a_crash() {
    // Catches keys the broker stores several to a record (a burst from one publisher shares
    // commit groups) being lost by a crash or not found by a retry.
    let mut broker = Broker::start(Opts::new());
    let (mut alice, _) = broker.client("alice").await;
    let keys: Vec<String> = (0..300).map(|i| format!("burst-{i:08}")).collect();
    let first = publish_burst(&mut alice, &keys).await;
    assert!(first.iter().all(|a| a.get("duplicate").is_none()));
    drop(alice);

    broker.kill9();
    broker.restart();

    let (mut alice, _) = broker.client("alice").await;
    let again = publish_burst(&mut alice, &keys).await;
    for (a, b) in again.iter().zip(&first) {
        assert_eq!(a["duplicate"], true, "a retry after the crash: {a}");
        assert_eq!(a["id"], b["id"], "the first publish's id: {a} vs {b}");
    }
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], keys.len(), "{welcome}");
    let got = drain(&mut bob, keys.len() as u64).await;
    let payloads: Vec<Value> = got.iter().map(|m| m["payload"].clone()).collect();
    let want: Vec<Value> = (0..keys.len()).map(|i| json!(i)).collect();
    assert_eq!(payloads, want, "every publish once, in order");
    bob.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_the_commit_and_the_tree_write_loses_nothing_and_stores_nothing_twice() {
    // Catches a commit group that is durable only in its journal record (in the body log) when
    // the broker dies and is not finished at the next start (the publish would be lost), or is
    // finished without its idempotency key (the retry would be stored a second time).
    let mut broker = Broker::start(Opts::new().env("OUTBOXD_FAULT_CRASH_BEFORE_APPLY_AFTER", 3));
    let (mut alice, _) = broker.client("alice").await;
    let mut confirmed = Vec::new();
    let mut in_flight = None;
    for i in 0..10u64 {
        alice
            .send(
                json!({"type": "publish", "ref": format!("a{i}"), "to": "client:bob",
                         "payload": i, "key": format!("k-{i}")}),
            )
            .await;
        match alice.next_event(RECV_TIMEOUT).await {
            Event::Frame(a) if a["type"] == "ok" => confirmed.push(i),
            Event::Frame(a) => panic!("publish {i} answered {a}"),
            _ => {
                in_flight = Some(i);
                break;
            }
        }
    }
    let in_flight = in_flight.expect("the injected crash came within ten publishes");
    assert!(
        !confirmed.is_empty(),
        "the crash came after a few confirmed commits"
    );
    let status = broker.wait_exit(Duration::from_secs(10));
    assert!(!status.success(), "the broker crashed: {status:?}");

    broker.restart_with(Opts::new());
    assert!(
        broker.stderr_shows("finished the commit groups", Duration::from_secs(5)),
        "the start after the crash found the journal record: {}",
        broker.stderr()
    );
    let (mut alice, _) = broker.client("alice").await;
    let retry = alice
        .request(
            json!({"type": "publish", "ref": "retry", "to": "client:bob",
                        "payload": in_flight, "key": format!("k-{in_flight}")}),
        )
        .await;
    assert_eq!(retry["type"], "ok", "{retry}");
    assert_eq!(
        retry["duplicate"], true,
        "the publish the crash cut off was durable, so its retry is a duplicate: {retry}"
    );

    let (mut bob, welcome) = broker.client("bob").await;
    let expected: Vec<Value> = (0..=in_flight).map(|i| json!(i)).collect();
    assert_eq!(welcome["pending"], expected.len(), "{welcome}");
    let got = bob.recv_msgs(expected.len()).await;
    let payloads: Vec<Value> = got.iter().map(|m| m["payload"].clone()).collect();
    assert_eq!(payloads, expected, "every publish once, in order");
    bob.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_fsync_latches_the_store_and_every_confirmed_message_survives() {
    // Catches a broker that confirms writes after a failed fsync (fsyncgate) or loses earlier ones.
    injected_failure_latches_and_keeps_what_was_confirmed(FAULT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_flush_latches_the_store_and_every_confirmed_message_survives() {
    // Catches a failed flush that is ignored, or answered by confirming anyway.
    injected_failure_latches_and_keeps_what_was_confirmed("OUTBOXD_FAULT_FLUSH_FAIL_AFTER").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_write_latches_the_store_and_every_confirmed_message_survives() {
    // Catches a failed write that only fails its own publish while later ones are confirmed
    // on a store in an unknown state.
    injected_failure_latches_and_keeps_what_was_confirmed("OUTBOXD_FAULT_WRITE_FAIL_AFTER").await;
}

/// With the test hook `fault` set to fail after 2 successes: publishes are confirmed until the
/// failure, refused (`internal`) from then on, and after a restart without the hook every
/// confirmed one is delivered, in order.
async fn injected_failure_latches_and_keeps_what_was_confirmed(fault: &str) {
    let faulty = Opts::new().env(fault, 2);
    let mut broker = Broker::start(faulty.clone());
    let (mut alice, _) = broker.client("alice").await;
    let mut answers = Vec::new();
    for i in 0..10 {
        answers.push(
            alice
                .publish(&format!("p{i}"), "client:bob", json!(i))
                .await,
        );
    }
    let first_error = answers
        .iter()
        .position(|a| a["type"] == "error")
        .unwrap_or_else(|| panic!("no publish failed with {fault} on: {answers:?}"));
    assert!(
        first_error <= 2,
        "more than 2 commits succeeded: {answers:?}"
    );
    for a in &answers[..first_error] {
        assert_eq!(a["type"], "ok", "{a}");
    }
    for a in &answers[first_error..] {
        assert_error(a, "internal"); // latched: no later publish is confirmed either
    }
    // Still answering, still refusing.
    assert!(alice.sync().await.is_empty());
    assert_error(
        &alice.publish("late", "client:bob", json!("late")).await,
        "internal",
    );

    broker.kill9();
    assert!(
        broker.stderr_shows("STORE LATCHED", Duration::from_secs(5)),
        "the latch is logged"
    );
    broker.restart_with(faulty.without_env(fault));
    let (mut bob, welcome) = broker.client("bob").await;
    let pending = welcome["pending"].as_u64().expect("pending");
    let got = drain(&mut bob, pending).await;
    let payloads: Vec<i64> = got
        .iter()
        .map(|m| m["payload"].as_i64().expect("int payload"))
        .collect();
    let confirmed: Vec<i64> = (0..first_error as i64).collect();
    assert!(
        payloads.starts_with(&confirmed),
        "confirmed {confirmed:?} must come first and in order, got {payloads:?}"
    );
    assert!(payloads.iter().all(|p| (0..10).contains(p)), "{payloads:?}");
    // The store works again without the fault.
    let (mut alice, _) = broker.client("alice").await;
    alice
        .publish_ok("again", "client:bob", json!("again"))
        .await;
    assert_eq!(bob.recv_msg().await["payload"], "again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_with_small_sled_segments_still_opens_and_serves_with_a_warning() {
    // Catches a broker that forces its own segment size on an older data dir (sled refuses to
    // open it) or loses what it held.
    let mut broker = Broker::start(Opts::new().env("OUTBOXD_FAULT_SEGMENT_BYTES", 524_288));
    let conf = String::from_utf8_lossy(&std::fs::read(broker.data_dir().join("conf")).unwrap())
        .into_owned();
    assert!(conf.contains("segment_size: 524288"), "{conf}");
    let (mut alice, _) = broker.client("alice").await;
    alice.publish_ok("a1", "client:bob", json!("kept")).await;
    drop(alice);

    broker.restart_with(Opts::new());
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 1, "{welcome}");
    assert_eq!(bob.recv_msg().await["payload"], "kept");
    let log = broker.stderr();
    assert!(
        log.contains("created with small sled segments"),
        "the operator is told: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_data_dir_gets_segments_too_big_for_blob_files() {
    // Catches a data dir created with sled's default segments, where leaves of big messages
    // become blob files sled never fsyncs.
    let broker = Broker::start(Opts::new());
    let (mut alice, _) = broker.client("alice").await;
    alice.publish_ok("a1", "client:bob", json!("x")).await;
    let conf = String::from_utf8_lossy(&std::fs::read(broker.data_dir().join("conf")).unwrap())
        .into_owned();
    assert!(conf.contains("segment_size: 8388608"), "{conf}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_before_any_checkpoint_recovers_every_commit_and_the_acks_applied_between_them() {
    // Catches a commit journal that holds a group's own writes but not those applied to the
    // trees between commits (acks, a new client's name): replayed alone after a crash, the last
    // group would leave an outbox whose count disagrees with its messages (the start refused),
    // or forget the acks and the names.
    let opts = || Opts::new().env("OUTBOXD_FAULT_CHECKPOINT_EVERY_MS", 3_600_000);
    let mut broker = Broker::start(opts());
    let (mut alice, _) = broker.client("alice").await;
    for i in 0..40u64 {
        alice
            .publish_ok(&format!("a{i}"), "client:bob", json!({"n": i}))
            .await;
    }
    let (mut bob, w) = broker.client("bob").await;
    assert_eq!(w["pending"], 40, "{w}");
    let got = bob.recv_msgs(40).await;
    bob.ack_upto(common::seq(&got[29])).await;
    bob.sync().await;
    // The acks are applied on their own (no commit waits on them), then a commit follows.
    tokio::time::sleep(Duration::from_millis(200)).await;
    alice
        .publish_ok("last", "client:carol", json!({"n": "last"}))
        .await;
    broker.kill9();

    broker.restart_with(opts());
    assert!(
        broker.stderr_shows("finished the commit groups", Duration::from_secs(5)),
        "nothing was replayed, so the test proves nothing: {}",
        broker.stderr()
    );
    let (mut bob, w) = broker.client("bob").await;
    assert_eq!(w["pending"], 10, "the acks were kept: {w}");
    let rest = bob.recv_msgs(10).await;
    assert_eq!(common::seqs(&rest), (31..=40).collect::<Vec<_>>());
    let (mut carol, w) = broker.client("carol").await;
    assert_eq!(
        w["pending"], 1,
        "the last commit, to a client named in it: {w}"
    );
    assert_eq!(carol.recv_msg().await["payload"], json!({"n": "last"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaxed_durability_loses_nothing_confirmed_when_only_the_broker_is_killed() {
    // Catches a "relaxed" store that confirms writes it still holds in its own memory: a
    // kill -9 of the broker (not of the machine) would then lose them.
    let opts = || Opts::new().set("storage", "durability", "relaxed");
    let mut broker = Broker::start(opts());
    let (mut alice, _) = broker.client("alice").await;
    for i in 0..200u64 {
        alice
            .publish_ok(&format!("r{i}"), "client:bob", json!({"n": i}))
            .await;
    }
    broker.kill9();
    broker.restart_with(opts());
    let (mut bob, w) = broker.client("bob").await;
    assert_eq!(w["pending"], 200, "{w}");
    let got = bob.recv_msgs(200).await;
    assert_eq!(common::seqs(&got), (1..=200).collect::<Vec<_>>());
}
