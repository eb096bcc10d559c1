//! Heartbeats: the broker's pings, the answer to a client's ping, and the close of a peer that
//! went silent (without disturbing one that did not).

mod common;

use std::time::{Duration, Instant};

use common::{redelivered, Broker, Client, Opts, Proxy};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_sends_ping_every_interval_ms() {
    // Catches a broker that never pings (browsers cannot see dead links) or pings in a tight loop.
    let broker = Broker::start(Opts::new().set("heartbeat", "interval_ms", 200).set(
        "heartbeat",
        "timeout_ms",
        10_000,
    ));
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["heartbeat_ms"], 200, "{welcome}");

    let t0 = Instant::now();
    let mut gaps = Vec::new();
    let mut last = t0;
    for _ in 0..4 {
        let ping = bob.recv().await;
        assert_eq!(
            ping,
            json!({"type": "ping"}),
            "an idle client should get only pings"
        );
        bob.send(json!({"type": "pong"})).await;
        gaps.push(last.elapsed());
        last = Instant::now();
    }
    let total = t0.elapsed();
    // Four pings take about 800 ms; allow timer slack below and a slow machine above.
    assert!(
        total >= Duration::from_millis(600),
        "4 pings in {total:?} ({gaps:?}): too often"
    );
    assert!(
        total <= Duration::from_secs(4),
        "4 pings took {total:?} ({gaps:?}): too rarely"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ping_is_answered_with_pong() {
    // Catches a broker that ignores the protocol-level ping a browser client relies on.
    let broker = Broker::start(Opts::new());
    let (mut bob, _) = broker.client("bob").await;
    for _ in 0..3 {
        bob.send(json!({"type": "ping"})).await;
        assert_eq!(bob.recv().await, json!({"type": "pong"}));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_is_closed_with_4001_while_a_responsive_peer_stays_connected() {
    // Catches dead peers that hold their session forever, or a timeout that also hits live peers.
    let broker = Broker::start(Opts::new().set("heartbeat", "interval_ms", 100).set(
        "heartbeat",
        "timeout_ms",
        600,
    ));
    let proxy = Proxy::start(broker.addr).await;
    let mut silent = Client::connect(&proxy.url).await;
    silent.hello("silent", None).await;
    let (mut responsive, _) = broker.client("responsive").await;
    responsive
        .publish_ok("p1", "client:silent", json!("unacked"))
        .await;
    let m = silent.recv_msg().await;
    assert_eq!(m["seq"], 1);

    // A round trip first, so the broker's last sign of life from `silent` is "now".
    assert!(silent.sync().await.is_empty());
    // From now on the broker hears nothing from `silent`, though it can still talk to it.
    proxy.pause_to_broker();
    let paused = Instant::now();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    let silent_closed = async {
        let before = silent.expect_close(4001).await;
        let after = paused.elapsed();
        let _ = closed_tx.send(());
        (before, after)
    };
    let keep_alive = responsive.stay_responsive_until(async {
        let _ = closed_rx.await;
    });
    let ((before, after), pings) = tokio::join!(silent_closed, keep_alive);
    assert!(
        before.iter().all(|f| f["type"] == "ping"),
        "only pings expected before the close: {before:?}"
    );
    assert!(
        after >= Duration::from_millis(500),
        "closed {after:?} after going silent: too early"
    );
    assert!(pings >= 1, "the responsive peer was never pinged");

    // The responsive peer outlives another full timeout and still works.
    responsive.stay_responsive(Duration::from_millis(900)).await;
    assert!(responsive.sync().await.is_empty());
    // A publish to itself: the `msg` and the `ok` may come in either order.
    responsive
        .send(json!({"type": "publish", "ref": "p2", "to": "client:responsive", "payload": "still here"}))
        .await;
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let f = responsive.recv_skip_pings().await;
        if f["type"] == "msg" {
            assert_eq!(f["payload"], "still here", "{f}");
        }
        kinds.push(f["type"].as_str().unwrap_or_default().to_string());
    }
    kinds.sort();
    assert_eq!(kinds, ["msg", "ok"]);

    // The dead peer's unacked message is still stored.
    let (mut silent, welcome) = broker.client("silent").await;
    assert_eq!(welcome["pending"], 1, "{welcome}");
    let again = silent.recv_msg().await;
    assert_eq!(again["seq"], 1);
    assert!(redelivered(&again), "{again}");
}
