//! Reconnecting: `ack upto`, `resume` positions, epoch mismatch, positions from the future, and
//! a connection that died without a close.

mod common;

use common::{redelivered, seqs, Broker, Client, Opts, Proxy, QUIET};
use serde_json::json;

/// Has `alice` publish `n` messages (payloads 1..=n) to `to`, each confirmed.
async fn publish_n(broker: &Broker, to: &str, n: u64) {
    let (mut alice, _) = broker.client("alice").await;
    for i in 1..=n {
        alice.publish_ok(&format!("p{i}"), to, json!(i)).await;
    }
    alice.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_upto_deletes_everything_up_to_it_and_the_rest_is_replayed_in_order() {
    // Catches a cumulative ack that deletes too much or too little, or a replay out of order.
    let broker = Broker::start(Opts::new());
    publish_n(&broker, "client:bob", 6).await;

    let (mut bob, welcome) = broker.client("bob").await;
    let epoch = welcome["epoch"].as_str().expect("epoch").to_string();
    assert_eq!(welcome["next_seq"], 7, "{welcome}");
    assert_eq!(seqs(&bob.recv_msgs(6).await), vec![1, 2, 3, 4, 5, 6]);
    bob.ack_upto(4).await;
    assert!(bob.sync().await.is_empty());
    bob.close().await;

    // Without resume: whatever is still stored, in order.
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(
        welcome["epoch"],
        epoch.as_str(),
        "the epoch changed without a purge: {welcome}"
    );
    assert_eq!(welcome["resumed"], false, "{welcome}");
    assert!(
        welcome.get("reason").is_none(),
        "no resume, no reason: {welcome}"
    );
    assert_eq!(welcome["last_seq"], 4, "acked watermark: {welcome}");
    assert_eq!(welcome["pending"], 2, "{welcome}");
    let rest = bob.recv_msgs(2).await;
    assert_eq!(seqs(&rest), vec![5, 6]);
    assert_eq!(rest[0]["payload"], 5);
    assert!(rest.iter().all(redelivered), "{rest:?}");
    bob.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_last_seq_counts_as_ack_and_only_the_gap_is_replayed() {
    // Catches a resume that replays from the start, skips part of the gap, or keeps what it acked.
    let broker = Broker::start(Opts::new());
    publish_n(&broker, "client:bob", 5).await;

    let (mut bob, welcome) = broker.client("bob").await;
    let epoch = welcome["epoch"].as_str().expect("epoch").to_string();
    assert_eq!(seqs(&bob.recv_msgs(5).await), vec![1, 2, 3, 4, 5]);
    bob.close().await; // nothing acked on the wire

    let mut bob = Client::connect(&broker.url).await;
    let welcome = bob.hello("bob", Some((&epoch, 3))).await;
    assert_eq!(welcome["resumed"], true, "{welcome}");
    assert!(welcome.get("reason").is_none(), "{welcome}");
    assert_eq!(welcome["epoch"], epoch.as_str(), "{welcome}");
    assert_eq!(welcome["last_seq"], 3, "{welcome}");
    assert_eq!(welcome["next_seq"], 6, "{welcome}");
    assert_eq!(welcome["pending"], 2, "{welcome}");
    assert_eq!(welcome["missed"], 0, "{welcome}");
    let gap = bob.recv_msgs(2).await;
    assert_eq!(seqs(&gap), vec![4, 5]);
    assert!(gap.iter().all(redelivered), "{gap:?}");
    bob.expect_quiet(QUIET).await;
    bob.close().await;

    // The resume position was an ack: 1..=3 are gone for good.
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 2, "{welcome}");
    assert_eq!(seqs(&bob.recv_msgs(2).await), vec![4, 5]);
    bob.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_another_epoch_is_refused_as_epoch_mismatch_and_everything_is_sent() {
    // Catches a broker that applies a position from another incarnation (deleting unacked messages).
    let broker = Broker::start(Opts::new());
    publish_n(&broker, "client:bob", 3).await;

    let mut bob = Client::connect(&broker.url).await;
    let welcome = bob.hello("bob", Some(("not-this-outbox", 2))).await;
    assert_eq!(welcome["resumed"], false, "{welcome}");
    assert_eq!(welcome["reason"], "epoch_mismatch", "{welcome}");
    assert_ne!(welcome["epoch"], "not-this-outbox", "{welcome}");
    assert_eq!(
        welcome["last_seq"], 0,
        "the foreign position must not count as an ack: {welcome}"
    );
    assert_eq!(welcome["pending"], 3, "{welcome}");
    let all = bob.recv_msgs(3).await;
    assert_eq!(seqs(&all), vec![1, 2, 3]);
    assert_eq!(all[0]["payload"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_beyond_next_seq_is_refused_as_ahead_and_everything_is_sent() {
    // Catches a broker that trusts a position it never assigned and silently skips real messages.
    let broker = Broker::start(Opts::new());
    let (bob, welcome) = broker.client("bob").await;
    let epoch = welcome["epoch"].as_str().expect("epoch").to_string();
    bob.close().await;
    publish_n(&broker, "client:bob", 2).await;

    let mut bob = Client::connect(&broker.url).await;
    let welcome = bob.hello("bob", Some((&epoch, 100))).await;
    assert_eq!(welcome["resumed"], false, "{welcome}");
    assert_eq!(welcome["reason"], "ahead", "{welcome}");
    assert_eq!(welcome["epoch"], epoch.as_str(), "{welcome}");
    assert_eq!(welcome["next_seq"], 3, "{welcome}");
    assert_eq!(welcome["pending"], 2, "{welcome}");
    assert_eq!(seqs(&bob.recv_msgs(2).await), vec![1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_without_close_loses_nothing_and_resume_gets_the_gap() {
    // Catches messages marked delivered when written to a socket that then died (no close frame).
    let broker = Broker::start(Opts::new());
    let proxy = Proxy::start(broker.addr).await;
    let mut bob = Client::connect(&proxy.url).await;
    let welcome = bob.hello("bob", None).await;
    let epoch = welcome["epoch"].as_str().expect("epoch").to_string();
    publish_n(&broker, "client:bob", 4).await;
    assert_eq!(seqs(&bob.recv_msgs(4).await), vec![1, 2, 3, 4]);
    bob.ack(1).await;
    assert!(bob.sync().await.is_empty());
    proxy.cut();
    drop(bob);

    let mut bob = Client::connect(&broker.url).await;
    let welcome = bob.hello("bob", Some((&epoch, 1))).await;
    assert_eq!(welcome["resumed"], true, "{welcome}");
    assert_eq!(welcome["pending"], 3, "{welcome}");
    let gap = bob.recv_msgs(3).await;
    assert_eq!(seqs(&gap), vec![2, 3, 4]);
    assert!(gap.iter().all(redelivered), "{gap:?}");
}
