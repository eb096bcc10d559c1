//! `log.format = "json"`: log collectors parse the broker's stderr line by line, so every line
//! must be a JSON object carrying the level, the message and the event's fields; the ready line
//! on stdout, which supervisors and these tests wait for, stays the plain text it always was.

mod common;

use std::time::Duration;

use common::{Broker, Opts};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_and_the_ready_line_is_unchanged() {
    // Broker::start waits for "outboxd ready: ws://ADDR/ws" on stdout and fails without it.
    let mut b = Broker::start(Opts::new().set("log", "format", "json"));
    assert!(b.url.starts_with("ws://127.0.0.1:"), "{}", b.url);
    let (mut c, _) = b.client("alice").await;
    c.publish_ok("r1", "client:alice", json!("hello")).await;
    c.close().await;
    assert!(b.sigterm().success());
    assert!(
        b.stderr_shows("shutdown requested", Duration::from_secs(5)),
        "{}",
        b.stderr()
    );

    let stderr = b.stderr();
    let mut events = Vec::new();
    for line in stderr.lines() {
        // The harness's own marker between incarnations.
        if line.starts_with("--- outboxd pid ") {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line:?}\n{stderr}"));
        assert!(v.is_object(), "{line}");
        assert!(v["level"].is_string(), "no level: {line}");
        assert!(v["fields"]["message"].is_string(), "no message: {line}");
        events.push(v);
    }
    assert!(events.len() >= 4, "{stderr}");
    // The start line keeps its fields as fields, not folded into the message.
    let serving = events
        .iter()
        .find(|e| e["fields"]["message"] == "outboxd serving")
        .unwrap_or_else(|| panic!("no start line:\n{stderr}"));
    assert_eq!(serving["level"], "INFO");
    assert!(
        serving["fields"]["listen"]
            .as_str()
            .is_some_and(|l| b.url.contains(l)),
        "{serving}"
    );
    assert!(
        events.iter().any(|e| e["fields"]["signal"] == "SIGTERM"),
        "{stderr}"
    );
}

#[test]
fn text_logs_stay_the_default() {
    let mut b = Broker::start(Opts::new());
    assert!(b.sigterm().success());
    assert!(
        b.stderr_shows("shutdown requested", Duration::from_secs(5)),
        "{}",
        b.stderr()
    );
    let stderr = b.stderr();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("INFO") && l.contains("outboxd serving")),
        "{stderr}"
    );
    assert!(!stderr.lines().any(|l| l.starts_with('{')), "{stderr}");
}
