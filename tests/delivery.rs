//! Delivery on one broker: order, acks, the in-flight window, ack-timeout resends, takeover,
//! and binary payloads.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{redelivered, seqs, Broker, Opts, QUIET};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_messages_arrive_in_publish_order_with_seq_id_ts_and_sender() {
    // Catches live delivery that reorders, drops fields, reuses ids or marks first sends redelivered.
    let broker = Broker::start(Opts::new());
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["resumed"], false, "{welcome}");
    assert_eq!(welcome["pending"], 0, "{welcome}");
    assert_eq!(welcome["missed"], 0, "{welcome}");
    let (mut alice, _) = broker.client("alice").await;

    for i in 0..5 {
        let ok = alice
            .publish_ok(
                &format!("p{i}"),
                "client:bob",
                json!({"n": i, "text": "héllo"}),
            )
            .await;
        assert_eq!(ok["recipients"], 1, "{ok}");
        assert!(ok["id"].is_string(), "publish ok without an id: {ok}");
        assert!(
            ok.get("duplicate").is_none(),
            "a first publish is no duplicate: {ok}"
        );
    }
    let msgs = bob.recv_msgs(5).await;
    let first = msgs[0]["seq"].as_u64().expect("seq");
    assert_eq!(
        seqs(&msgs),
        (first..first + 5).collect::<Vec<_>>(),
        "{msgs:?}"
    );
    let mut ids = HashSet::new();
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m["payload"], json!({"n": i, "text": "héllo"}), "{m}");
        assert_eq!(m["from"], "alice", "{m}");
        assert!(
            m["ts"].as_u64().is_some_and(|t| t > 1_600_000_000_000),
            "ts in ms: {m}"
        );
        assert!(
            ids.insert(m["id"].as_str().expect("string id").to_string()),
            "id reused: {m}"
        );
        assert!(!redelivered(m), "first send marked redelivered: {m}");
        assert!(m.get("topic").is_none(), "direct message with a topic: {m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_message_is_never_sent_again_after_reconnect() {
    // Catches acks that do not delete: an acked message coming back on the next connection.
    let broker = Broker::start(Opts::new());
    let (mut alice, _) = broker.client("alice").await;
    for i in 1..=3 {
        alice
            .publish_ok(&format!("p{i}"), "client:bob", json!(i))
            .await;
    }

    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 3, "{welcome}");
    let msgs = bob.recv_msgs(3).await;
    assert_eq!(seqs(&msgs), vec![1, 2, 3]);
    // Ack the first and the third only, one by one.
    bob.ack(1).await;
    bob.ack(3).await;
    assert!(bob.sync().await.is_empty());
    bob.close().await;

    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 1, "{welcome}");
    let again = bob.recv_msg().await;
    assert_eq!(again["seq"], 2, "{again}");
    assert_eq!(again["payload"], 2, "{again}");
    assert!(
        redelivered(&again),
        "a message sent on an earlier connection must say so: {again}"
    );
    bob.ack(2).await;
    bob.expect_quiet(QUIET).await;
    bob.close().await;

    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 0, "{welcome}");
    bob.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_max_inflight_unacked_messages_are_sent_until_an_ack_frees_a_slot() {
    // Catches a broker that ignores the in-flight window and floods a client with unacked messages.
    let broker = Broker::start(Opts::new().set("delivery", "max_inflight", 3));
    let (mut alice, _) = broker.client("alice").await;
    for i in 1..=6 {
        alice
            .publish_ok(&format!("p{i}"), "client:bob", json!(i))
            .await;
    }

    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["max_inflight"], 3, "{welcome}");
    assert_eq!(seqs(&bob.recv_msgs(3).await), vec![1, 2, 3]);
    bob.expect_quiet(QUIET).await;

    bob.ack(1).await;
    assert_eq!(bob.recv_msg().await["seq"], 4);
    bob.expect_quiet(QUIET).await;

    bob.ack_upto(4).await;
    assert_eq!(seqs(&bob.recv_msgs(2).await), vec![5, 6]);
    bob.expect_quiet(QUIET).await;

    // Live messages obey the same window.
    alice.publish_ok("p7", "client:bob", json!(7)).await;
    alice.publish_ok("p8", "client:bob", json!(8)).await;
    assert_eq!(bob.recv_msg().await["seq"], 7);
    bob.expect_quiet(QUIET).await;
    bob.ack(5).await;
    assert_eq!(bob.recv_msg().await["seq"], 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_message_is_resent_with_the_same_seq_after_ack_timeout() {
    // Catches a lost message on a live but stuck client: no resend, or a resend under a new seq.
    let broker = Broker::start(Opts::new().set("delivery", "ack_timeout_ms", 300));
    let (mut bob, _) = broker.client("bob").await;
    let (mut alice, _) = broker.client("alice").await;
    alice.publish_ok("p1", "client:bob", json!("x")).await;

    let first = bob.recv_msg().await;
    assert!(!redelivered(&first), "{first}");
    let again = bob.recv_msg().await;
    assert_eq!(
        again["seq"], first["seq"],
        "resend must keep the seq: {again}"
    );
    assert_eq!(again["id"], first["id"], "resend must keep the id: {again}");
    assert_eq!(again["payload"], "x");
    assert_eq!(again["redelivered"], true, "{again}");

    bob.ack(common::seq(&first)).await;
    assert!(bob.sync().await.iter().all(|m| m["seq"] == first["seq"]));
    // Acked: no more resends, even after several timeouts.
    bob.expect_quiet(Duration::from_millis(1000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_connection_takes_over_and_the_older_is_closed_with_4000() {
    // Catches two live connections for one client (split delivery) or a takeover that loses messages.
    let broker = Broker::start(Opts::new());
    let (mut alice, _) = broker.client("alice").await;
    let (mut old, _) = broker.client("bob").await;
    alice.publish_ok("p1", "client:bob", json!(1)).await;
    let m1 = old.recv_msg().await;
    assert_eq!(m1["seq"], 1);

    let (mut new, welcome) = broker.client("bob").await;
    old.expect_close(4000).await;
    assert_eq!(welcome["pending"], 1, "{welcome}");
    let again = new.recv_msg().await;
    assert_eq!(again["seq"], 1);
    assert!(redelivered(&again), "{again}");

    alice.publish_ok("p2", "client:bob", json!(2)).await;
    let m2 = new.recv_msg().await;
    assert_eq!(m2["seq"], 2);
    assert_eq!(m2["payload"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_payload_round_trips_as_payload_b64() {
    // Catches binary payloads that get decoded, re-encoded differently or turned into JSON.
    let broker = Broker::start(Opts::new());
    let (mut alice, _) = broker.client("alice").await;
    let (mut bob, _) = broker.client("bob").await;
    // Bytes 00 01 02 ff 10 (padded) and de ad be (a full group, no padding).
    for (r, b64) in [("b1", "AAEC/xA="), ("b2", "3q2+")] {
        let ok = alice
            .request(json!({"type": "publish", "ref": r, "to": "client:bob", "payload_b64": b64}))
            .await;
        assert_eq!(ok["type"], "ok", "{ok}");
        let m = bob.recv_msg().await;
        assert_eq!(m["payload_b64"], b64, "{m}");
        assert!(
            m.get("payload").is_none(),
            "binary message also has a JSON payload: {m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_bigger_than_the_write_queue_reaches_a_prompt_reader() {
    // Catches a broker that pushes a whole in-flight window into a shorter write queue at once
    // and then blames a client that reads promptly for being too slow (close 4029).
    let broker = Broker::start(Opts::new().set("server", "write_queue_frames", 16));
    let (mut alice, _) = broker.client("alice").await;
    for i in 0..64 {
        alice
            .publish_ok(&format!("p{i}"), "client:bob", json!(i))
            .await;
    }
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 64, "{welcome}");
    for expected in 1..=64 {
        let m = bob.recv_msg().await;
        assert_eq!(m["seq"], expected, "{m}");
        bob.ack(expected).await;
    }
    bob.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_that_stops_reading_is_closed_with_4029_and_keeps_its_messages() {
    // Catches a broker that buffers without bound for a peer that does not read, or that loses
    // the messages of the peer it disconnects for being too slow.
    let broker = Broker::start(
        Opts::new()
            .set("server", "write_queue_frames", 4)
            .set("storage", "durability", "relaxed")
            .set("heartbeat", "interval_ms", 100)
            .set("heartbeat", "timeout_ms", 60000),
    );
    let (mut alice, _) = broker.client("alice").await;
    // Far more than the kernel's socket buffers hold, so the broker's writer gets stuck.
    let big = "x".repeat(60_000);
    let n = 300u64;
    for i in 0..n {
        alice
            .publish_ok(&format!("p{i}"), "client:bob", json!(big))
            .await;
    }
    let (stuck, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], n, "{welcome}");
    let epoch = welcome["epoch"].as_str().unwrap_or_default().to_owned();
    // Bob reads nothing but keeps asking (app-level pings): the pongs pile up in the queue's
    // reserve until it is full.
    let mut stuck = stuck;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !broker.stderr().contains("code=4029") {
        assert!(
            std::time::Instant::now() < deadline,
            "a peer that reads nothing was never closed with 4029"
        );
        stuck.send_text(r#"{"type":"ping"}"#).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stuck);

    let mut bob = common::Client::connect(&broker.url).await;
    let welcome = bob.hello("bob", Some((&epoch, 0))).await;
    assert_eq!(welcome["resumed"], true, "{welcome}");
    assert_eq!(welcome["pending"], n, "{welcome}");
    for expected in 1..=n {
        let m = bob.recv_msg().await;
        assert_eq!(m["seq"], expected);
        bob.ack(expected).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_publisher_gets_every_ok_even_with_a_short_write_queue() {
    // Catches replies pushed into the write queue faster than the writer drains it, which
    // closed a publisher that reads its replies with 4029.
    let broker = Broker::start(Opts::new().set("server", "write_queue_frames", 8));
    let (mut alice, _) = broker.client("alice").await;
    let n = 600;
    for i in 0..n {
        alice
            .send(json!({"type": "publish", "ref": i, "to": "client:bob", "payload": i}))
            .await;
    }
    for i in 0..n {
        let ok = alice.recv().await;
        assert_eq!(ok["type"], "ok", "{ok}");
        assert_eq!(ok["ref"], i, "{ok}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_ahead_of_the_outbox_covers_only_stored_seqs_and_is_refused_as_bad_ack() {
    // Catches an ack beyond the last assigned seq moving the live delivery cursor past
    // messages stored after it: they were confirmed to their publisher, never sent, and the
    // client's next cumulative ack deleted them unreported.
    let broker = Broker::start(Opts::new());
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["next_seq"], 1, "{welcome}");
    let epoch = welcome["epoch"].as_str().expect("epoch").to_string();
    let (mut alice, _) = broker.client("alice").await;

    // Nothing assigned yet: the ack names seq 1, which does not exist.
    bob.ack_upto(1).await;
    let before = bob.sync().await;
    assert_eq!(before.len(), 1, "one error for the ack: {before:?}");
    common::assert_error(&before[0], "bad_ack");
    for i in 1..=3 {
        alice
            .publish_ok(&format!("m{i}"), "client:bob", json!({"m": i}))
            .await;
    }
    let msgs = bob.recv_msgs(3).await;
    assert_eq!(seqs(&msgs), vec![1, 2, 3], "{msgs:?}");

    // Far ahead, after some delivered: 1..3 acked, nothing later skipped.
    bob.ack_upto(1_000_000).await;
    let before = bob.sync().await;
    assert_eq!(before.len(), 1, "{before:?}");
    common::assert_error(&before[0], "bad_ack");
    // A per-seq ack of an unassigned seq is reported the same way and removes nothing.
    bob.ack(7).await;
    let before = bob.sync().await;
    assert_eq!(before.len(), 1, "{before:?}");
    common::assert_error(&before[0], "bad_ack");
    for i in 4..=7 {
        alice
            .publish_ok(&format!("m{i}"), "client:bob", json!({"m": i}))
            .await;
    }
    let msgs = bob.recv_msgs(4).await;
    assert_eq!(seqs(&msgs), vec![4, 5, 6, 7], "{msgs:?}");
    bob.ack_upto(5).await;
    assert!(
        bob.sync().await.is_empty(),
        "an ack of stored seqs is no error"
    );
    bob.close().await;

    // The position the client states after processing 1..=5: 6 and 7 are still there.
    let mut bob = common::Client::connect(&broker.url).await;
    let welcome = bob.hello("bob", Some((&epoch, 5))).await;
    assert_eq!(welcome["resumed"], true, "{welcome}");
    assert_eq!(welcome["pending"], 2, "{welcome}");
    assert_eq!(welcome["missed"], 0, "{welcome}");
    let msgs = bob.recv_msgs(2).await;
    assert_eq!(seqs(&msgs), vec![6, 7], "{msgs:?}");
}
