//! `/metrics` after a known workload: the counters must tell an operator exactly what the
//! broker did (published, delivered, acked, pending, refused, closed and why).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Broker, Client, Opts};
use serde_json::json;

/// Scrapes until every `(name, value)` in `want` holds: counters the writer thread updates
/// (acks) land a moment after the client's frame. Returns the last scrape.
async fn scrape_until(broker: &Broker, want: &[(&str, f64)]) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + common::RECV_TIMEOUT;
    loop {
        let m = broker.metrics().await;
        let wrong: Vec<String> = want
            .iter()
            .filter(|(k, v)| m.get(*k) != Some(v))
            .map(|(k, v)| format!("{k} = {:?}, want {v}", m.get(*k)))
            .collect();
        if wrong.is_empty() {
            return m;
        }
        if Instant::now() > deadline {
            panic!("metrics never matched: {wrong:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_publish_deliver_ack_and_pending_after_a_known_workload() {
    // Catches counters that miss, double-count, or count before the fsync.
    let broker = Broker::start(Opts::new());
    let r = broker.admin_get("/metrics").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "{r:?}"
    );

    let (mut alice, _) = broker.client("alice").await;
    for i in 1..=5 {
        alice
            .publish_ok(&format!("p{i}"), "client:bob", json!({"n": i}))
            .await;
    }
    // A repeated key: answered, but not a new publish.
    for r in ["k1", "k2"] {
        let a = alice
            .request(json!({"type": "publish", "ref": r, "to": "client:carol", "payload": 1, "key": "same"}))
            .await;
        assert_eq!(a["type"], "ok", "{a}");
    }
    let (mut bob, _) = broker.client("bob").await;
    let msgs = bob.recv_msgs(5).await;
    for m in &msgs[..3] {
        bob.ack(common::seq(m)).await;
    }
    bob.sync().await;

    let m = scrape_until(
        &broker,
        &[
            ("outboxd_published_total", 6.0),
            ("outboxd_stored_messages_total", 6.0),
            ("outboxd_publish_duplicates_total", 1.0),
            ("outboxd_delivered_total", 5.0),
            ("outboxd_redelivered_total", 0.0),
            ("outboxd_acked_total", 3.0),
            ("outboxd_outbox_pending_messages", 3.0),
            ("outboxd_outbox_max_pending_messages", 2.0),
            ("outboxd_outboxes", 3.0),
            ("outboxd_connections", 2.0),
            ("outboxd_connections_total", 2.0),
            ("outboxd_sessions", 2.0),
            ("outboxd_publish_to_ack_seconds_count", 3.0),
            ("outboxd_takeovers_total", 0.0),
            ("outboxd_store_latched", 0.0),
        ],
    )
    .await;
    // Each payload {"n":i} is 7 bytes; bob keeps 2, carol 1 (the payload `1`).
    assert_eq!(m["outboxd_outbox_pending_bytes"], 15.0, "{m:?}");
    assert_eq!(m["outboxd_outbox_max_pending_bytes"], 14.0, "{m:?}");
    // Every publish went through a commit; the histogram accounts for all of them.
    assert!(m["outboxd_commit_groups_total"] >= 1.0, "{m:?}");
    assert_eq!(m["outboxd_commit_group_publishes_sum"], 6.0, "{m:?}");
    assert!(m["outboxd_commit_duration_seconds_count"] >= 1.0, "{m:?}");
    assert_eq!(
        m["outboxd_commit_duration_seconds_bucket{le=\"+Inf\"}"],
        m["outboxd_commit_duration_seconds_count"]
    );
    assert_eq!(m["outboxd_publish_to_ack_seconds_bucket{le=\"+Inf\"}"], 3.0);

    // A takeover: bob's second connection replaces the first and gets the 2 unacked again.
    let (mut bob2, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 2, "{welcome}");
    bob.expect_close(4000).await;
    let again = bob2.recv_msgs(2).await;
    assert!(again.iter().all(common::redelivered), "{again:?}");
    // A bad frame and an outbox refusal are counted by code.
    bob2.send_text("not json").await;
    let e = bob2.recv_skip_pings().await;
    common::assert_error(&e, "bad_frame");
    scrape_until(
        &broker,
        &[
            ("outboxd_takeovers_total", 1.0),
            ("outboxd_connections_closed_total{reason=\"replaced\"}", 1.0),
            ("outboxd_delivered_total", 7.0),
            ("outboxd_redelivered_total", 2.0),
            ("outboxd_refused_total{code=\"bad_frame\"}", 1.0),
            ("outboxd_connections", 2.0),
            ("outboxd_connections_total", 3.0),
        ],
    )
    .await;

    // Clients leaving are counted as peer_closed.
    alice.close().await;
    bob2.close().await;
    scrape_until(
        &broker,
        &[
            ("outboxd_connections", 0.0),
            ("outboxd_sessions", 0.0),
            (
                "outboxd_connections_closed_total{reason=\"peer_closed\"}",
                2.0,
            ),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_expiry_and_purge_are_counted() {
    // Catches losses and refusals that leave no trace in the metrics.
    let broker = Broker::start(Opts::new().set("limits", "max_outbox_messages", 2));
    let (mut carol, _) = broker.client("carol").await;
    carol.subscribe("s", "news").await;
    let (mut alice, _) = broker.client("alice").await;
    alice.publish_ok("a", "client:bob", json!(1)).await;
    alice.publish_ok("b", "client:bob", json!(2)).await;
    let full = alice.publish("c", "client:bob", json!(3)).await;
    common::assert_error(&full, "outbox_full");
    let r = broker
        .admin_post("/v1/publish", json!({"to": "client:bob", "payload": 4}))
        .await;
    r.assert_error(409, "outbox_full");
    alice.publish_ok("t1", "topic:news", json!("x")).await;
    alice.publish_ok("t2", "topic:news", json!("y")).await;
    let skipped = alice.publish_ok("t3", "topic:news", json!("z")).await;
    assert_eq!(skipped["recipients"], 0, "{skipped}");
    // A message that expires unacked.
    let a = alice
        .request(json!({"type": "publish", "ref": "ttl", "to": "client:dave", "payload": 1, "ttl_ms": 50}))
        .await;
    assert_eq!(a["type"], "ok", "{a}");
    let purged = broker.admin_delete("/v1/clients/bob/outbox").await;
    assert_eq!(purged.status, 200, "{purged:?}");

    scrape_until(
        &broker,
        &[
            // 2 direct refusals + 1 skipped topic recipient.
            ("outboxd_refused_total{code=\"outbox_full\"}", 3.0),
            ("outboxd_published_total", 6.0),
            ("outboxd_stored_messages_total", 5.0),
            ("outboxd_purged_total", 2.0),
            ("outboxd_expired_total", 1.0),
            ("outboxd_outbox_pending_messages", 2.0),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_timeouts_and_missing_hellos_are_counted_by_reason() {
    // Catches dead peers that vanish from the metrics instead of showing why they were closed.
    let broker = Broker::start(
        Opts::new()
            .set("heartbeat", "interval_ms", 100)
            .set("heartbeat", "timeout_ms", 300)
            .set("server", "hello_timeout_ms", 300),
    );
    let (mut silent, _) = broker.client("silent").await;
    silent.expect_close(4001).await;
    let mut mute = Client::connect(&broker.url).await;
    mute.expect_close(4008).await;
    scrape_until(
        &broker,
        &[
            ("outboxd_heartbeat_timeouts_total", 1.0),
            (
                "outboxd_connections_closed_total{reason=\"heartbeat_timeout\"}",
                1.0,
            ),
            ("outboxd_connections_closed_total{reason=\"no_hello\"}", 1.0),
            ("outboxd_connections", 0.0),
        ],
    )
    .await;
}
