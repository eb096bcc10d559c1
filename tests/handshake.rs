//! The opening of a session: the subprotocol, the hello deadline, and hello as the first frame.

mod common;

use std::time::{Duration, Instant};

use common::{assert_error, Broker, Client, Opts};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offered_subprotocol_outboxd_v1_json_is_selected() {
    // Catches a broker that drops the subprotocol a browser client offers (the browser then fails).
    let broker = Broker::start(Opts::new());
    let mut req = broker.url.as_str().into_client_request().expect("request");
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("outboxd.v1.json"),
    );
    let (_ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    assert_eq!(
        resp.headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.as_bytes()),
        Some(&b"outboxd.v1.json"[..]),
        "{resp:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_without_hello_is_closed_with_4008_after_hello_timeout() {
    // Catches sockets that never speak holding a connection slot forever.
    let broker = Broker::start(Opts::new().set("server", "hello_timeout_ms", 400));
    let t0 = Instant::now();
    let mut mute = Client::connect(&broker.url).await;
    mute.expect_close(4008).await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "closed after {took:?}: before the deadline"
    );

    // The broker still serves everyone else.
    let (mut bob, _) = broker.client("bob").await;
    assert!(bob.sync().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_frame_other_than_hello_gets_bad_frame_and_close_1002() {
    // Catches a broker that acts on frames from a connection that never said who it is.
    let broker = Broker::start(Opts::new());
    let mut anon = Client::connect(&broker.url).await;
    anon.send(json!({"type": "publish", "ref": "p1", "to": "client:bob", "payload": 1}))
        .await;
    let before = anon.expect_close(1002).await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_error(&before[0], "bad_frame");

    // Nothing was written for bob.
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 0, "{welcome}");
    bob.expect_quiet(common::QUIET).await;
}
