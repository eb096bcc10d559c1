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

/// How one busy client's connection ended at the broker's shutdown.
#[derive(Debug, PartialEq)]
enum Ending {
    /// A close frame with this code, then the end of the stream without an error.
    Clean(Option<u16>),
    /// A close frame, then a failure instead of the end of the stream.
    CloseThenError(Option<u16>, String),
    /// No close frame: the stream failed or ended first.
    NoClose(String),
}

/// Reads until the close frame and on to the end of the stream; the library answers the close
/// on the way.
async fn read_to_the_end(
    mut rx: futures_util::stream::SplitStream<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    >,
) -> Ending {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let code = loop {
        match rx.next().await {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Ending::NoClose(e.to_string()),
            None => return Ending::NoClose("stream ended".into()),
        }
    };
    loop {
        match rx.next().await {
            None => return Ending::Clean(code),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Ending::CloseThenError(code, e.to_string()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_close_handshake_with_clients_that_keep_sending() {
    // Catches a shutdown that drops the TCP connection while frames from the client are still
    // unread: the kernel then answers with a reset instead of a FIN, and a reset can destroy
    // the 1001 close frame before the client reads it (WebSocket clients then report 1006).
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    const CLIENTS: usize = 24;
    // Room for every pong the clients' pings ask for, however slowly a loaded machine runs the
    // readers: this test is about the close handshake, not about a client too slow to read
    // (closed with 4029, which the write-queue tests check).
    let mut broker = Broker::start(Opts::new().set("server", "write_queue_frames", 1_000_000));
    let mut readers = Vec::new();
    let mut busy = Vec::new();
    for i in 0..CLIENTS {
        let (c, _) = broker.client(&format!("busy-{i}")).await;
        let (mut tx, rx) = c.into_inner().split();
        // Sends a protocol ping every millisecond until the broker's close ends the sink;
        // signals once the first one is out.
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut started = Some(started_tx);
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            loop {
                tick.tick().await;
                if tx
                    .send(Message::text(json!({"type": "ping"}).to_string()))
                    .await
                    .is_err()
                {
                    return;
                }
                if let Some(s) = started.take() {
                    let _ = s.send(());
                }
            }
        });
        busy.push(started_rx);
        readers.push(tokio::spawn(read_to_the_end(rx)));
    }
    for started in busy {
        started.await.expect("a client started sending");
    }

    broker.send_sigterm();
    let mut endings = Vec::new();
    for r in readers {
        let ending = tokio::time::timeout(common::RECV_TIMEOUT, r)
            .await
            .expect("every connection ends")
            .expect("reader task");
        endings.push(ending);
    }
    let unclean: Vec<_> = endings
        .iter()
        .filter(|e| **e != Ending::Clean(Some(1001)))
        .collect();
    assert!(
        unclean.is_empty(),
        "{} of {CLIENTS} connections did not end with a close handshake of 1001: {unclean:?}",
        unclean.len()
    );
    let status = broker.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
}
