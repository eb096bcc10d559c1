//! Graceful shutdown: SIGTERM tells clients to reconnect, exits cleanly, and keeps everything.

mod common;

use std::time::Duration;

use common::{Broker, Opts, QUIET};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_clients_with_1001_exits_0_and_keeps_confirmed_messages() {
    // Catches a shutdown that drops clients without a close, fails, or loses confirmed writes.
    let mut broker = Broker::start(Opts::new());
    let (mut alice, _) = broker.client("alice").await;
    let (mut bob, _) = broker.client("bob").await;
    for i in 1..=3 {
        alice
            .publish_ok(&format!("p{i}"), "client:carol", json!(i))
            .await;
    }

    broker.send_sigterm();
    bob.expect_close(1001).await;
    alice.expect_close(1001).await;
    let status = broker.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status after SIGTERM: {status:?}");

    broker.restart();
    let (mut carol, welcome) = broker.client("carol").await;
    assert_eq!(welcome["pending"], 3, "{welcome}");
    let payloads: Vec<_> = carol
        .recv_msgs(3)
        .await
        .iter()
        .map(|m| m["payload"].clone())
        .collect();
    assert_eq!(payloads, vec![json!(1), json!(2), json!(3)]);
    carol.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_before_a_graceful_shutdown_are_kept() {
    // Catches acks held only in memory: after a clean restart acked messages must not come back.
    let mut broker = Broker::start(Opts::new());
    let (mut alice, _) = broker.client("alice").await;
    for i in 1..=3 {
        alice
            .publish_ok(&format!("p{i}"), "client:bob", json!(i))
            .await;
    }
    let (mut bob, _) = broker.client("bob").await;
    bob.recv_msgs(3).await;
    bob.ack_upto(2).await;
    assert!(bob.sync().await.is_empty());

    let status = broker.sigterm();
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    broker.restart();
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 1, "{welcome}");
    assert_eq!(bob.recv_msg().await["seq"], 3);
    bob.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_a_half_open_handshake() {
    // Catches a shutdown that waits out server.hello_timeout_ms for sockets that never finish
    // their upgrade.
    use tokio::io::AsyncWriteExt;
    let mut broker = Broker::start(Opts::new().set("server", "hello_timeout_ms", 30000));
    let mut half = tokio::net::TcpStream::connect(broker.addr)
        .await
        .expect("connect");
    half.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let (_ready, _) = broker.client("ready").await;
    let started = std::time::Instant::now();
    let status = broker.sigterm();
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_second_broker_on_a_held_data_dir_refuses_with_a_clear_message() {
    // Catches a raw lock error, or two brokers writing one store.
    let broker = Broker::start(Opts::new());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(broker.data_dir())
        .env("OUTBOXD_SERVER__ADMIN_LISTEN", "")
        .output()
        .expect("run outboxd");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another process (a running outboxd?) holds it"),
        "{err}"
    );
    assert!(!err.contains("WouldBlock"), "{err}");
}
