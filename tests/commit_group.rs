//! Writes that share one commit group. The store gathers a group's publishes and acks into one
//! batch that reaches the tree only at the commit, so reads made while the group is open must
//! see what the group already did. A long `group_commit_max_delay_us` holds the group open
//! while a test lines commands up in it.

mod common;

use common::{seq, seqs, Broker, Opts, QUIET};
use serde_json::{json, Value};

/// Holds each group open this long after its first command.
const GROUP_US: u64 = 300_000;

fn broker() -> Broker {
    Broker::start(Opts::new().set("storage", "group_commit_max_delay_us", GROUP_US))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_published_twice_in_one_group_is_stored_once() {
    // Catches a dedup lookup that only reads the tree, where the first publish is not yet.
    let broker = broker();
    let (mut alice, _) = broker.client("alice").await;
    let frame = |r: &str| json!({"type": "publish", "ref": r, "to": "client:bob", "payload": "once", "key": "k-1"});
    alice.send(frame("a1")).await;
    alice.send(frame("a2")).await;
    let first = alice.recv_skip_pings().await;
    let second = alice.recv_skip_pings().await;
    assert_eq!(first["ref"], "a1", "{first}");
    assert_eq!(second["ref"], "a2", "{second}");
    assert!(first.get("duplicate").is_none(), "{first}");
    assert_eq!(second["duplicate"], true, "{second}");
    assert_eq!(
        first["id"], second["id"],
        "a duplicate names the first publish's id"
    );

    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 1, "{welcome}");
    let m = bob.recv_msg().await;
    assert_eq!(m["payload"], "once");
    bob.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_sharing_a_group_with_a_new_publish_leaves_that_publish_pending() {
    // Catches an ack that moves the watermark past a message its own group is still writing.
    let broker = broker();
    let (mut alice, _) = broker.client("alice").await;
    alice.publish_ok("a1", "client:bob", json!("m1")).await;
    let (mut bob, _) = broker.client("bob").await;
    let m1 = bob.recv_msg().await;
    assert_eq!(seq(&m1), 1);

    // The publish opens a group; the ack joins it.
    alice
        .send(json!({"type": "publish", "ref": "a2", "to": "client:bob", "payload": "m2"}))
        .await;
    bob.ack_upto(1).await;
    let ok = alice.recv_skip_pings().await;
    assert_eq!(ok["type"], "ok", "{ok}");
    bob.close().await;

    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 1, "m2 is still owed: {welcome}");
    let m2 = bob.recv_msg().await;
    assert_eq!((seq(&m2), m2["payload"].clone()), (2, json!("m2")));
    // A watermark already past m2 would make this ack a no-op, and m2 would come back forever.
    bob.ack(2).await;
    bob.sync().await;
    bob.close().await;
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 0, "m2 was acked: {welcome}");
    bob.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_in_one_group_free_each_message_once() {
    // Catches a message deleted by one ack of a group and counted again by the next.
    let broker = broker();
    let (mut alice, _) = broker.client("alice").await;
    for i in 1..=4 {
        alice
            .publish_ok(&format!("a{i}"), "client:bob", json!(format!("m{i}")))
            .await;
    }
    let (mut bob, _) = broker.client("bob").await;
    let got: Vec<Value> = bob.recv_msgs(4).await;
    assert_eq!(seqs(&got), vec![1, 2, 3, 4]);
    // The first ack opens a group (held open GROUP_US); the second joins it. m4 stays unacked.
    bob.ack(2).await;
    bob.ack_upto(3).await;
    bob.sync().await;
    bob.close().await;

    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 1, "only m4 is left: {welcome}");
    let m4 = bob.recv_msg().await;
    assert_eq!((seq(&m4), m4["payload"].clone()), (4, json!("m4")));
    bob.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cumulative_acks_in_one_group_settle_at_the_highest() {
    // Catches cumulative acks merged by arrival order instead of by position.
    let broker = broker();
    let (mut alice, _) = broker.client("alice").await;
    for i in 1..=5 {
        alice
            .publish_ok(&format!("a{i}"), "client:bob", json!(format!("m{i}")))
            .await;
    }
    let (mut bob, _) = broker.client("bob").await;
    assert_eq!(seqs(&bob.recv_msgs(5).await), vec![1, 2, 3, 4, 5]);
    // One group: the first ack opens it, the others join it, the highest is not the last.
    bob.ack_upto(2).await;
    bob.ack_upto(4).await;
    bob.ack_upto(3).await;
    bob.sync().await;
    bob.close().await;

    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 1, "only m5 is left: {welcome}");
    let m5 = bob.recv_msg().await;
    assert_eq!((seq(&m5), m5["payload"].clone()), (5, json!("m5")));
    bob.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_burst_is_committed_in_groups_of_bounded_size() {
    // Catches a group that gathers every queued fan-out write into one batch: a publisher
    // pipelining to 1000 subscribers once piled a million writes (2.7 GiB) into one commit.
    const SUBSCRIBERS: usize = 100;
    const PUBLISHES: usize = 1000;
    // Subscriptions first, one commit each without the group delay; they are durable.
    let mut broker = Broker::start(Opts::new());
    for i in 0..SUBSCRIBERS {
        let (mut s, _) = broker.client(&format!("sub-{i}")).await;
        let ok = s.subscribe("s1", "news").await;
        assert_eq!(ok["type"], "ok", "{ok}");
    }
    broker.restart_with(Opts::new().set("storage", "group_commit_max_delay_us", GROUP_US));
    let (mut alice, _) = broker.client("alice").await;
    for i in 0..PUBLISHES {
        alice
            .send(json!({"type": "publish", "ref": format!("p{i}"), "to": "topic:news", "payload": i}))
            .await;
    }
    for _ in 0..PUBLISHES {
        let ok = alice.recv_skip_pings().await;
        assert_eq!(ok["type"], "ok", "{ok}");
        assert_eq!(ok["recipients"], SUBSCRIBERS, "{ok}");
    }
    // 100 writes a publish and 50 000 a group: no group holds more than 500 publishes. Without
    // the bound the 300 ms group window takes all 1000 at once.
    let m = broker.metrics().await;
    let groups = m["outboxd_commit_group_publishes_count"];
    let within_512 = m["outboxd_commit_group_publishes_bucket{le=\"512\"}"];
    assert!(groups >= 2.0, "{groups} commit groups");
    assert_eq!(
        within_512, groups,
        "a group held more than 512 publishes: {m:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_acks_reach_the_disk_without_further_traffic() {
    // Catches acks held back to share a batch and never made durable when nothing else comes:
    // they must reach the tree within the hold (10 ms) and the disk with the next checkpoint
    // (within 50 ms), so a crash after that brings nothing back. The broker's metrics tell
    // when: the acks counted, then no write left that is not durable.
    let mut broker = Broker::start(Opts::new());
    let (mut alice, _) = broker.client("alice").await;
    for i in 1..=3 {
        alice
            .publish_ok(&format!("a{i}"), "client:bob", json!(i))
            .await;
    }
    let (mut bob, _) = broker.client("bob").await;
    assert_eq!(seqs(&bob.recv_msgs(3).await), vec![1, 2, 3]);
    bob.ack_upto(3).await;
    assert!(bob.sync().await.is_empty());
    // Nothing else reaches the store from here on (a scrape of /metrics does not).
    broker.until_acks_durable(3).await;
    broker.kill9();
    broker.restart();
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 0, "the acks were lost: {welcome}");
    bob.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_seq_acks_and_an_expiry_inside_one_groups_record_survive_a_restart() {
    // One group's messages to one outbox share a stored record. Catches a per-seq ack or an
    // expiry that loses (or brings back) the record's other messages, and a record whose first
    // message left that readers then no longer find.
    let mut broker = broker();
    let (mut alice, _) = broker.client("alice").await;
    for i in 1..=8 {
        let mut frame = json!({"type": "publish", "ref": format!("a{i}"), "to": "client:bob",
                               "payload": format!("m{i}")});
        if i == 6 {
            frame["ttl_ms"] = json!(2_000);
        }
        alice.send(frame).await;
    }
    for _ in 1..=8 {
        let ok = alice.recv_skip_pings().await;
        assert_eq!(ok["type"], "ok", "{ok}");
    }
    let (mut bob, _) = broker.client("bob").await;
    assert_eq!(seqs(&bob.recv_msgs(8).await), (1..=8).collect::<Vec<u64>>());
    bob.ack(1).await;
    bob.ack(4).await;
    bob.ack(8).await;
    bob.sync().await;
    bob.close().await;
    // m6 expires unacked.
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    assert!(broker.sigterm().success());
    broker.restart();

    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(
        welcome["pending"], 4,
        "m2, m3, m5 and m7 are left: {welcome}"
    );
    assert_eq!(welcome["missed"], 1, "m6 expired: {welcome}");
    let got = bob.recv_msgs(4).await;
    assert_eq!(seqs(&got), vec![2, 3, 5, 7]);
    for m in &got {
        assert_eq!(m["payload"], json!(format!("m{}", seq(m))), "{m}");
    }
    bob.expect_quiet(QUIET).await;
}
