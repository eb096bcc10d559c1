//! Topics: durable subscriptions, fan-out on write, unsubscribe.

mod common;

use common::{Broker, Opts, QUIET};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_survive_a_crash_and_a_topic_publish_reaches_every_subscriber() {
    // Catches subscriptions kept only in memory, or fan-out that skips an offline subscriber.
    let mut broker = Broker::start(Opts::new());
    for who in ["bob", "carol"] {
        let (mut c, _) = broker.client(who).await;
        let ok = c.subscribe("s1", "news/eu").await;
        assert_eq!(ok["type"], "ok", "{ok}");
        c.close().await;
    }
    broker.kill9();
    broker.restart();

    let (mut alice, _) = broker.client("alice").await;
    let ok = alice
        .publish_ok("p1", "topic:news/eu", json!({"headline": "hi"}))
        .await;
    assert_eq!(ok["recipients"], 2, "{ok}");
    assert!(ok.get("refused").is_none(), "{ok}");
    // Subscribers are offline: the message waits in both outboxes.
    for who in ["bob", "carol"] {
        let (mut c, welcome) = broker.client(who).await;
        assert_eq!(welcome["pending"], 1, "{who}: {welcome}");
        let m = c.recv_msg().await;
        assert_eq!(m["topic"], "news/eu", "{m}");
        assert_eq!(m["from"], "alice", "{m}");
        assert_eq!(m["payload"], json!({"headline": "hi"}), "{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_topic_delivery_for_that_subscriber_only() {
    // Catches an unsubscribe that is ignored, or that removes every subscriber of the topic.
    let broker = Broker::start(Opts::new());
    let (mut bob, _) = broker.client("bob").await;
    let (mut carol, _) = broker.client("carol").await;
    assert_eq!(bob.subscribe("s1", "chat").await["type"], "ok");
    assert_eq!(carol.subscribe("s1", "chat").await["type"], "ok");
    let (mut alice, _) = broker.client("alice").await;

    assert_eq!(
        alice.publish_ok("p1", "topic:chat", json!(1)).await["recipients"],
        2
    );
    assert_eq!(bob.recv_msg().await["payload"], 1);
    assert_eq!(carol.recv_msg().await["payload"], 1);

    let ok = bob.unsubscribe("u1", "chat").await;
    assert_eq!(ok["type"], "ok", "{ok}");
    assert_eq!(
        alice.publish_ok("p2", "topic:chat", json!(2)).await["recipients"],
        1
    );
    let m = carol.recv_msg().await;
    assert_eq!(m["payload"], 2);
    assert_eq!(m["topic"], "chat");
    bob.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_publish_without_subscribers_is_ok_with_zero_recipients() {
    // Catches a publish to an empty topic reported as an error (or as written somewhere).
    let broker = Broker::start(Opts::new());
    let (mut alice, _) = broker.client("alice").await;
    let ok = alice
        .publish_ok("p1", "topic:nobody-listens", json!(1))
        .await;
    assert_eq!(ok["recipients"], 0, "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_messages_come_before_the_ok_of_a_subscribe_sent_right_after_hello() {
    // Guards what docs/protocol.md promises clients ("Messages are not ordered against the
    // answers"): a client that waits for its subscribe `ok` before it handles `msg` frames
    // would see these first. Catches a broker that starts answering requests before it has
    // sent the stored gap.
    let broker = Broker::start(Opts::new());
    let (mut alice, _) = broker.client("alice").await;
    for i in 1..=2 {
        alice
            .publish_ok(&format!("p{i}"), "client:bob", json!(i))
            .await;
    }
    let mut bob = common::Client::connect(&broker.url).await;
    // Both frames go out before any answer is read.
    bob.send(json!({"type": "hello", "client_id": "bob"})).await;
    bob.send(json!({"type": "subscribe", "ref": "s1", "topic": "news"}))
        .await;
    let mut kinds = Vec::new();
    while kinds.len() < 4 {
        let f = bob.recv_skip_pings().await;
        kinds.push(match f["type"].as_str() {
            Some("msg") => format!("msg {}", common::seq(&f)),
            Some(t) => t.to_string(),
            None => panic!("a frame without a type: {f}"),
        });
    }
    assert_eq!(kinds, ["welcome", "msg 1", "msg 2", "ok"], "{kinds:?}");
}
