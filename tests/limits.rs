//! Retention and quotas: full outboxes refuse (and say so), expired messages are counted as
//! missed and never delivered.

mod common;

use std::time::Duration;

use common::{assert_error, seqs, Broker, Opts, QUIET};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_publish_to_a_full_outbox_gets_outbox_full_and_writes_nothing() {
    // Catches a quota that is not enforced, or a refused publish that is stored anyway.
    let broker = Broker::start(Opts::new().set("limits", "max_outbox_messages", 2));
    let (mut alice, _) = broker.client("alice").await;
    alice.publish_ok("p1", "client:bob", json!(1)).await;
    alice.publish_ok("p2", "client:bob", json!(2)).await;
    let e = alice.publish("p3", "client:bob", json!(3)).await;
    assert_error(&e, "outbox_full");
    assert_eq!(e["ref"], "p3", "{e}");

    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 2, "{welcome}");
    let msgs = bob.recv_msgs(2).await;
    assert_eq!(seqs(&msgs), vec![1, 2]);
    bob.expect_quiet(QUIET).await;

    // Acks free the quota.
    bob.ack_upto(2).await;
    assert!(bob.sync().await.is_empty());
    alice.publish_ok("p4", "client:bob", json!(4)).await;
    assert_eq!(bob.recv_msg().await["payload"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_publish_reports_refused_recipients_whose_outbox_is_full() {
    // Catches fan-out that silently skips a full subscriber, or fails everyone because of one.
    let broker = Broker::start(Opts::new().set("limits", "max_outbox_messages", 1));
    let (mut bob, _) = broker.client("bob").await;
    let (mut carol, _) = broker.client("carol").await;
    assert_eq!(bob.subscribe("s", "t").await["type"], "ok");
    assert_eq!(carol.subscribe("s", "t").await["type"], "ok");
    let (mut alice, _) = broker.client("alice").await;
    alice.publish_ok("d1", "client:bob", json!("direct")).await; // bob is now full
    assert_eq!(bob.recv_msg().await["payload"], "direct");

    let ok = alice.publish_ok("t1", "topic:t", json!("fan-out")).await;
    assert_eq!(ok["recipients"], 1, "{ok}");
    assert_eq!(
        ok["refused"],
        json!([{"client_id": "bob", "code": "outbox_full"}]),
        "{ok}"
    );
    assert_eq!(carol.recv_msg().await["payload"], "fan-out");
    bob.expect_quiet(QUIET).await;
    bob.close().await;
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 1, "only the direct message: {welcome}");
    assert_eq!(bob.recv_msg().await["payload"], "direct");
    bob.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_counted_as_missed_and_not_delivered() {
    // Catches retention that drops messages without telling the client, or delivers expired ones.
    let broker = Broker::start(Opts::new().set("limits", "message_ttl_ms", 300));
    let (mut alice, _) = broker.client("alice").await;
    for i in 0..3 {
        alice
            .publish_ok(&format!("p{i}"), "client:bob", json!(i))
            .await;
    }
    // Expiry is a matter of time: wait well past the TTL.
    tokio::time::sleep(Duration::from_millis(900)).await;

    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["missed"], 3, "{welcome}");
    assert_eq!(welcome["pending"], 0, "{welcome}");
    bob.expect_quiet(QUIET).await;

    // A fresh message is still delivered.
    alice.publish_ok("p3", "client:bob", json!("fresh")).await;
    assert_eq!(bob.recv_msg().await["payload"], "fresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_ttl_ms_expires_only_that_message() {
    // Catches a per-message ttl_ms that is ignored or applied to its neighbours.
    let broker = Broker::start(Opts::new());
    let (mut alice, _) = broker.client("alice").await;
    let ok = alice
        .request(json!({"type": "publish", "ref": "short", "to": "client:bob", "payload": "short", "ttl_ms": 200}))
        .await;
    assert_eq!(ok["type"], "ok", "{ok}");
    alice.publish_ok("long", "client:bob", json!("long")).await;
    tokio::time::sleep(Duration::from_millis(700)).await;

    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["missed"], 1, "{welcome}");
    assert_eq!(welcome["pending"], 1, "{welcome}");
    let m = bob.recv_msg().await;
    assert_eq!(m["payload"], "long");
    assert_eq!(m["seq"], 2);
    bob.expect_quiet(QUIET).await;
}

/// Publishes three messages to bob; the second lives 200 ms.
async fn publish_a_short_lived_second(alice: &mut common::Client) {
    alice.publish_ok("a", "client:bob", json!("first")).await;
    let ok = alice
        .request(json!({"type": "publish", "ref": "b", "to": "client:bob", "payload": "short", "ttl_ms": 200}))
        .await;
    assert_eq!(ok["type"], "ok", "{ok}");
    alice.publish_ok("c", "client:bob", json!("third")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_expires_while_a_live_connection_holds_it_back_is_not_sent() {
    // Catches a message sent after retention removed it when the connection was already there
    // as it was published: such a message waits in memory for the connection's next read (the
    // outbox's list of fresh messages), and the expiry must take it out of there too.
    let broker = Broker::start(Opts::new().set("delivery", "max_inflight", 1));
    let (mut bob, _) = broker.client("bob").await;
    let (mut alice, _) = broker.client("alice").await;
    publish_a_short_lived_second(&mut alice).await;
    // The window of one holds seqs 2 and 3 back until seq 1 is acked.
    assert_eq!(bob.recv_msg().await["seq"], 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while broker.metrics().await["outboxd_expired_total"] < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "seq 2 did not expire within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bob.ack(1).await;
    let third = bob.recv_msg().await;
    assert_eq!(
        third["seq"], 3,
        "the expired message must not be delivered: {third}"
    );
    bob.ack(3).await;
    bob.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_expiring_while_connected_is_still_missed_after_per_seq_acks_pass_it() {
    // Catches a tombstone dropped when per-seq acks move the watermark over an expired message
    // the client never received: a resume from before it must still count it in `missed`.
    let broker = Broker::start(Opts::new().set("delivery", "max_inflight", 1));
    let (mut alice, _) = broker.client("alice").await;
    publish_a_short_lived_second(&mut alice).await;

    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["missed"], 0, "{welcome}");
    let epoch = welcome["epoch"].as_str().unwrap_or_default().to_owned();
    // The window of one holds seq 2 back until seq 1 is acked; by then seq 2 has expired.
    let first = bob.recv_msg().await;
    assert_eq!(first["seq"], 1);
    tokio::time::sleep(Duration::from_millis(700)).await;
    bob.ack(1).await;
    let third = bob.recv_msg().await;
    assert_eq!(
        third["seq"], 3,
        "the expired message must not be delivered: {third}"
    );
    bob.ack(3).await;
    bob.sync().await;
    bob.close().await;

    let mut again = common::Client::connect(&broker.url).await;
    let welcome = again.hello("bob", Some((&epoch, 1))).await;
    assert_eq!(welcome["resumed"], true, "{welcome}");
    assert_eq!(welcome["missed"], 1, "{welcome}");
}
