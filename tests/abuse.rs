//! Bad input at scale against a live broker: thousands of malformed, truncated, oversized and
//! out-of-order frames from many connections, while well-behaved clients keep exchanging
//! messages. Nothing is lost, nothing is invented, the broker stays up.

mod common;

use std::time::Duration;

use common::{Broker, Client, Event, Opts};
use serde_json::json;

/// Frames a broken or hostile client might send, valid JSON or not.
fn bad_frames() -> Vec<String> {
    let big = "x".repeat(70_000);
    vec![
        "".into(),
        "{".into(),
        "null".into(),
        "[]".into(),
        "\"hello\"".into(),
        "{}".into(),
        r#"{"type":7}"#.into(),
        r#"{"type":"nope"}"#.into(),
        r#"{"type":"publish"}"#.into(),
        r#"{"type":"publish","ref":1,"to":"client:","payload":1}"#.into(),
        r#"{"type":"publish","ref":2,"to":"queue:bob","payload":1}"#.into(),
        r#"{"type":"publish","ref":3,"to":"client:bob"}"#.into(),
        r#"{"type":"publish","ref":4,"to":"client:bob","payload_b64":"!!!"}"#.into(),
        r#"{"type":"publish","ref":5,"to":"client:bob","payload":1,"payload_b64":"AA=="}"#.into(),
        format!(r#"{{"type":"publish","ref":6,"to":"client:bob","payload":"{big}"}}"#),
        r#"{"type":"publish","ref":7,"to":"topic:","payload":1}"#.into(),
        r#"{"type":"ack"}"#.into(),
        r#"{"type":"ack","seq":-1}"#.into(),
        r#"{"type":"ack","seq":"1"}"#.into(),
        r#"{"type":"subscribe","ref":8}"#.into(),
        r#"{"type":"subscribe","ref":9,"topic":""}"#.into(),
        r#"{"type":"hello","client_id":"again"}"#.into(),
        r#"{"type":"publish","ref":10,"to":"client:bob","payload":1,"ttl_ms":-5}"#.into(),
        "\u{0}\u{1}\u{2}".into(),
        r#"{"type":"publish","ref":{"deep":[[[[[]]]]]},"to":"client:bob","payload":"#.into(),
    ]
}

/// One abusive connection: hello as its own id, then bad frames until the broker closes it or
/// `max` were sent. Returns how many it sent.
async fn abuse_once(url: &str, id: &str, start: usize, max: usize) -> usize {
    let frames = bad_frames();
    let mut c = Client::connect(url).await;
    c.hello(id, None).await;
    let mut sent = 0;
    for i in 0..max {
        let f = &frames[(start + i) % frames.len()];
        if (start + i).is_multiple_of(7) {
            c.send_binary(f.as_bytes().to_vec()).await;
        } else {
            c.send_text(f).await;
        }
        sent += 1;
        // Every answer is an error frame (never a msg, never an ok), or the close.
        match c.next_event(Duration::from_secs(10)).await {
            Event::Frame(v) => {
                assert_eq!(v["type"], "error", "a bad frame got {v}");
                assert!(v["code"].as_str().is_some_and(|c| !c.is_empty()), "{v}");
                assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
            }
            Event::Close(code, _) => {
                assert!(
                    matches!(code, Some(1002) | Some(1009)),
                    "closed with {code:?}"
                );
                return sent;
            }
            Event::Ended(why) => panic!("connection ended without a close frame: {why}"),
            Event::Timeout => panic!("no answer to a bad frame"),
        }
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_bad_frames_hurt_no_one_and_lose_nothing() {
    // Catches a decoder panic, a bad frame that writes something, and abuse on one connection
    // that delays or drops messages on another.
    let broker = Broker::start(Opts::new());
    let url = broker.url.clone();

    // Frames sent before any hello end that connection with bad_frame and 1002.
    for f in [
        r#"{"type":"ack","seq":1}"#,
        r#"{"type":"publish","ref":1,"to":"client:bob","payload":1}"#,
        "garbage",
    ] {
        let mut c = Client::connect(&url).await;
        c.send_text(f).await;
        let before = c.expect_close(1002).await;
        assert!(
            before.iter().any(|v| v["code"] == "bad_frame"),
            "{before:?}"
        );
    }

    let abusers: Vec<_> = (0..4)
        .map(|a| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut total = 0;
                let mut round = 0;
                while total < 1000 {
                    total += abuse_once(&url, &format!("abuser-{a}"), a * 31 + round * 5, 40).await;
                    round += 1;
                }
                total
            })
        })
        .collect();

    let n = 300u64;
    let (mut bob, _) = broker.client("bob").await;
    let consumer = tokio::spawn(async move {
        let mut seqs = Vec::new();
        while (seqs.len() as u64) < n {
            let m = bob.recv_msg().await;
            let seq = m["seq"].as_u64().unwrap_or(0);
            assert_eq!(m["payload"]["n"].as_u64(), Some(seq - 1), "{m}");
            seqs.push(seq);
            bob.ack(seq).await;
        }
        seqs
    });
    let (mut alice, _) = broker.client("alice").await;
    for i in 0..n {
        alice
            .publish_ok(&format!("p{i}"), "client:bob", json!({ "n": i }))
            .await;
    }
    let seqs = tokio::time::timeout(Duration::from_secs(60), consumer)
        .await
        .expect("bob got every message in time")
        .expect("consumer task");
    assert_eq!(
        seqs,
        (1..=n).collect::<Vec<_>>(),
        "lost, duplicated or reordered"
    );

    let mut bad = 0;
    for a in abusers {
        bad += a.await.expect("abuser task");
    }
    assert!(bad >= 4000, "only {bad} bad frames were sent");

    // Nothing the abusers sent was stored: their outboxes and bob's are empty.
    let (mut check, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 0, "{welcome}");
    check.expect_quiet(common::QUIET).await;
    for a in 0..4 {
        let (_c, w) = broker.client(&format!("abuser-{a}")).await;
        assert_eq!(w["pending"], 0, "{w}");
    }
}
