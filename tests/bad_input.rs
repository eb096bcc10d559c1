//! Bad input: every malformed frame gets its error code and leaves the connection usable;
//! too many of them, or one too big, end only that connection and touch no stored message.

mod common;

use common::{assert_error, seqs, Broker, Client, Opts, QUIET};
use serde_json::{json, Value};

/// The connection still works after a bad frame: a ping is answered and a publish confirmed.
async fn assert_usable(c: &mut Client, reference: &str) {
    assert!(
        c.sync().await.is_empty(),
        "unexpected frames after an error"
    );
    c.publish_ok(reference, "client:sink", json!("after")).await;
}

/// Sends one bad text frame and returns the single answer.
async fn answer_to(c: &mut Client, text: &str) -> Value {
    c.send_text(text).await;
    c.recv_skip_pings().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_json_frame_gets_bad_frame_and_the_connection_stays_usable() {
    // Catches a parser error that kills the connection (or the broker) instead of answering it.
    let broker = Broker::start(Opts::new());
    let (mut bob, _) = broker.client("bob").await;
    for (i, junk) in ["not json", "{\"type\":", "[1,2,3]", "\"hello\"", ""]
        .iter()
        .enumerate()
    {
        let e = answer_to(&mut bob, junk).await;
        assert_error(&e, "bad_frame");
        assert_usable(&mut bob, &format!("after{i}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_with_missing_or_invalid_fields_gets_bad_frame_with_its_ref() {
    // Catches frames with holes being acted on with defaults, or errors the publisher cannot match.
    let broker = Broker::start(Opts::new());
    let (mut bob, _) = broker.client("bob").await;
    let cases = [
        json!({"ref": "r0", "to": "client:sink", "payload": 1}), // no type
        json!({"type": "publish", "ref": "r1", "payload": 1}),   // no to
        json!({"type": "publish", "ref": "r2", "to": "client:sink"}), // no payload
        json!({"type": "publish", "ref": "r3", "to": "nowhere:sink", "payload": 1}),
        json!({"type": "publish", "ref": "r4", "to": "client:sink", "payload_b64": "***"}),
        json!({"type": "subscribe", "ref": "r5"}), // no topic
        json!({"type": "publish", "ref": "r6", "to": 42, "payload": 1}),
    ];
    for (i, frame) in cases.iter().enumerate() {
        let e = answer_to(&mut bob, &frame.to_string()).await;
        assert_error(&e, "bad_frame");
        if frame.get("ref").is_some() && frame.get("type").is_some() {
            assert_eq!(
                e["ref"], frame["ref"],
                "error without the frame's ref: {e} for {frame}"
            );
        }
        assert_usable(&mut bob, &format!("after{i}")).await;
    }
    for frame in [json!({"type": "ack"}), json!({"type": "ack", "seq": "one"})] {
        let e = answer_to(&mut bob, &frame.to_string()).await;
        assert_error(&e, "bad_frame");
    }
    assert_usable(&mut bob, "after-acks").await;

    // None of the bad publishes wrote anything: sink has exactly the good ones.
    let (mut sink, welcome) = broker.client("sink").await;
    assert_eq!(welcome["pending"], 8, "{welcome}");
    assert!(sink
        .recv_msgs(8)
        .await
        .iter()
        .all(|m| m["payload"] == "after"));
    sink.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frame_gets_bad_frame_and_the_connection_stays_usable() {
    // Catches binary frames being parsed as JSON or ending the connection.
    let broker = Broker::start(Opts::new());
    let (mut bob, _) = broker.client("bob").await;
    bob.send_binary(br#"{"type":"ping"}"#.to_vec()).await;
    let e = bob.recv_skip_pings().await;
    assert_error(&e, "bad_frame");
    assert_usable(&mut bob, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_type_gets_unknown_type_and_the_connection_stays_usable() {
    // Catches unknown frame types being ignored silently or treated as fatal.
    let broker = Broker::start(Opts::new());
    let (mut bob, _) = broker.client("bob").await;
    let e = bob
        .request(json!({"type": "frobnicate", "ref": "f1", "extra": true}))
        .await;
    assert_error(&e, "unknown_type");
    assert_usable(&mut bob, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_ignored() {
    // Catches a strict parser that would break every client as soon as the protocol grows a field.
    let broker = Broker::start(Opts::new());
    let (mut bob, _) = broker.client("bob").await;
    let ok = bob
        .request(json!({"type": "publish", "ref": "u1", "to": "client:sink", "payload": 1, "future": {"x": 1}}))
        .await;
    assert_eq!(ok["type"], "ok", "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_topic_is_refused_with_bad_topic_and_the_connection_stays_usable() {
    // Catches topic names that could escape their keyspace (or a file name) being accepted.
    let broker = Broker::start(Opts::new());
    let (mut bob, _) = broker.client("bob").await;
    let too_long = "t".repeat(256);
    for (i, topic) in ["has space", "", "semi;colon", "ünïcode", too_long.as_str()]
        .iter()
        .enumerate()
    {
        let e = bob.subscribe(&format!("s{i}"), topic).await;
        assert_error(&e, "bad_topic");
        let e = bob
            .publish(&format!("p{i}"), &format!("topic:{topic}"), json!(1))
            .await;
        assert_error(&e, "bad_topic");
        assert_usable(&mut bob, &format!("after{i}")).await;
    }
    // The longest legal name and the slash are fine.
    let ok = bob
        .subscribe("s-ok", &format!("a/b/{}", "t".repeat(251)))
        .await;
    assert_eq!(ok["type"], "ok", "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_over_max_payload_bytes_gets_payload_too_large_and_nothing_is_written() {
    // Catches oversized payloads being stored (or the frame killing the connection).
    let broker = Broker::start(Opts::new().set("limits", "max_payload_bytes", 1000));
    let (mut bob, _) = broker.client("bob").await;
    let e = bob
        .publish("big", "client:sink", json!("x".repeat(2000)))
        .await;
    assert_error(&e, "payload_too_large");
    let e = bob
        .request(
            json!({"type": "publish", "ref": "big64", "to": "client:sink",
                        "payload_b64": "A".repeat(2000)}),
        )
        .await;
    assert_error(&e, "payload_too_large");
    assert_usable(&mut bob, "after").await;
    bob.publish_ok("small", "client:sink", json!("x".repeat(500)))
        .await;

    let (mut sink, welcome) = broker.client("sink").await;
    assert_eq!(welcome["pending"], 2, "{welcome}");
    assert_eq!(seqs(&sink.recv_msgs(2).await), vec![1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_id_in_hello_gets_bad_client_id_and_close_1008() {
    // Catches client ids that are unsafe as storage keys and file names being accepted.
    let broker = Broker::start(Opts::new());
    let too_long = "a".repeat(129);
    for id in [
        "has space",
        "",
        "slash/y",
        "ünï",
        "semi;colon",
        too_long.as_str(),
    ] {
        let mut c = Client::connect(&broker.url).await;
        c.send(json!({"type": "hello", "client_id": id})).await;
        let before = c.expect_close(1008).await;
        assert_eq!(before.len(), 1, "client id {id:?}: {before:?}");
        assert_error(&before[0], "bad_client_id");
    }
    // Every allowed character, at the longest allowed length.
    let id = format!("Az09._:@-{}", "x".repeat(119));
    assert_eq!(id.len(), 128);
    let (mut ok, _) = broker.client(&id).await;
    assert!(ok.sync().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_bad_frames_close_with_1002_and_leave_stored_messages_alone() {
    // Catches a peer that can spam errors forever, or a protocol close that damages its outbox.
    let broker = Broker::start(Opts::new().set("server", "max_bad_frames", 3));
    let (mut alice, _) = broker.client("alice").await;
    alice.publish_ok("p1", "client:bob", json!(1)).await;
    alice.publish_ok("p2", "client:bob", json!(2)).await;

    let (mut bob, _) = broker.client("bob").await;
    assert_eq!(seqs(&bob.recv_msgs(2).await), vec![1, 2]);
    bob.ack(1).await;
    bob.send_text("junk 1").await;
    bob.send_text("junk 2").await;
    bob.send_text("junk 3").await;
    let before = bob.expect_close(1002).await;
    let errors: Vec<_> = before.iter().filter(|f| f["type"] != "ping").collect();
    assert_eq!(errors.len(), 3, "one error per bad frame: {before:?}");
    for e in errors {
        assert_error(e, "bad_frame");
    }

    // Only that connection ended: the broker and bob's outbox are intact.
    alice.publish_ok("p3", "client:bob", json!(3)).await;
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 2, "{welcome}");
    assert_eq!(seqs(&bob.recv_msgs(2).await), vec![2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_over_max_frame_bytes_closes_with_1009() {
    // Catches unbounded frames: a peer must not make the broker buffer arbitrary amounts.
    // The frame limit must leave room for a full payload plus framing, so both are lowered.
    let broker = Broker::start(Opts::new().set("server", "max_frame_bytes", 4096).set(
        "limits",
        "max_payload_bytes",
        1024,
    ));
    let (mut alice, _) = broker.client("alice").await;
    alice.publish_ok("p1", "client:bob", json!(1)).await;

    let (mut bob, _) = broker.client("bob").await;
    assert_eq!(bob.recv_msg().await["seq"], 1);
    let huge = json!({"type": "publish", "ref": "huge", "to": "client:sink", "payload": "x".repeat(10_000)});
    bob.send(huge).await;
    let before = bob.expect_close(1009).await;
    assert!(before.iter().all(|f| f["type"] == "ping"), "{before:?}");

    // The broker goes on, nothing was written for sink, bob's message is still there.
    let (mut sink, welcome) = broker.client("sink").await;
    assert_eq!(welcome["pending"], 0, "{welcome}");
    sink.expect_quiet(QUIET).await;
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 1, "{welcome}");
    assert_eq!(bob.recv_msg().await["seq"], 1);
}

/// A WebSocket client frame built by hand: `head` is the first byte (FIN, RSV bits, opcode);
/// the payload is masked unless `masked` is false (which a client must never do).
fn raw_frame(head: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    assert!(payload.len() < 126, "short frames only");
    let len = u8::try_from(payload.len()).expect("short");
    let mut f = vec![head];
    if masked {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        f.push(0x80 | len);
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        f.push(len);
        f.extend_from_slice(payload);
    }
    f
}

/// A TCP connection upgraded to WebSocket by hand, so a test can send frames no WebSocket
/// library would.
async fn raw_upgrade(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .expect("write the upgrade");
    // Byte by byte up to the blank line, so no frame after the answer is swallowed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.expect("read the upgrade answer"));
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp
}

/// One frame from the broker: its opcode and payload.
async fn raw_read_frame(tcp: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let read = async {
        let b0 = tcp.read_u8().await.expect("frame header");
        let b1 = tcp.read_u8().await.expect("frame header");
        assert_eq!(b1 & 0x80, 0, "the broker masked a frame");
        let len = match b1 & 0x7f {
            126 => u64::from(tcp.read_u16().await.expect("length")),
            127 => tcp.read_u64().await.expect("length"),
            n => u64::from(n),
        };
        let mut payload = vec![0; usize::try_from(len).expect("length fits")];
        tcp.read_exact(&mut payload).await.expect("payload");
        (b0 & 0x0f, payload)
    };
    tokio::time::timeout(common::RECV_TIMEOUT, read)
        .await
        .expect("a frame from the broker in time")
}

/// Reads frames up to the broker's close frame; returns its code (None for an empty close)
/// and reason, and checks that the broker then ends the connection.
async fn raw_expect_close(tcp: &mut tokio::net::TcpStream) -> (Option<u16>, String) {
    use tokio::io::AsyncReadExt;
    loop {
        let (opcode, payload) = raw_read_frame(tcp).await;
        if opcode != 8 {
            continue;
        }
        let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).into_owned();
        let mut rest = Vec::new();
        let end = tokio::time::timeout(common::RECV_TIMEOUT, tcp.read_to_end(&mut rest)).await;
        assert!(
            matches!(end, Ok(Ok(0))),
            "after its close frame the broker sent {rest:?} / {end:?}"
        );
        return (code, reason);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_protocol_errors_close_with_1002_or_1007_and_count_as_protocol_errors() {
    // Catches frames that break RFC 6455 being answered with an empty close frame (no code) and
    // counted as a client that left, as if nothing had been wrong.
    let broker = Broker::start(Opts::new());
    let cases: [(&str, Vec<u8>, u16); 6] = [
        (
            "text that is not UTF-8",
            raw_frame(0x81, &[b'"', 0xff, 0xfe, b'"'], true),
            1007,
        ),
        ("RSV1 set", raw_frame(0xc1, b"{}", true), 1002),
        ("unknown opcode", raw_frame(0x83, b"{}", true), 1002),
        ("unmasked frame", raw_frame(0x81, b"{}", false), 1002),
        (
            "continuation with nothing to continue",
            raw_frame(0x80, b"{}", true),
            1002,
        ),
        ("fragmented ping", raw_frame(0x09, b"", true), 1002),
    ];
    let hello = json!({"type": "hello", "client_id": "raw"}).to_string();
    let mut closed = 0.0;
    for (what, frame, want) in &cases {
        for after_hello in [false, true] {
            let mut tcp = raw_upgrade(broker.addr).await;
            use tokio::io::AsyncWriteExt;
            if after_hello {
                tcp.write_all(&raw_frame(0x81, hello.as_bytes(), true))
                    .await
                    .expect("send hello");
                let (opcode, welcome) = raw_read_frame(&mut tcp).await;
                assert_eq!(opcode, 1, "{what}: {welcome:?}");
                let welcome: Value = serde_json::from_slice(&welcome).expect("welcome is JSON");
                assert_eq!(welcome["type"], "welcome", "{welcome}");
            }
            tcp.write_all(frame).await.expect("send the bad frame");
            let (code, reason) = raw_expect_close(&mut tcp).await;
            assert_eq!(
                code,
                Some(*want),
                "{what} (after hello: {after_hello}): reason {reason:?}"
            );
            assert!(!reason.is_empty(), "{what}: a close without a reason");
            closed += 1.0;
        }
    }

    // Each connection is counted once it has ended (after its close frame went out).
    let deadline = std::time::Instant::now() + common::RECV_TIMEOUT;
    loop {
        let m = broker.metrics().await;
        let counted = |reason: &str| {
            m.get(&format!(
                "outboxd_connections_closed_total{{reason=\"{reason}\"}}"
            ))
            .copied()
        };
        if counted("protocol_error") == Some(closed) {
            assert_eq!(counted("peer_closed"), Some(0.0), "{m:?}");
            assert_eq!(m.get("outboxd_connections"), Some(&0.0), "{m:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never counted {closed} protocol errors: {m:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
