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
    // RUST_LOG pinned: the info events below must be there whatever the caller's shell says.
    let mut b = Broker::start(
        Opts::new()
            .set("log", "format", "json")
            .env("RUST_LOG", "info"),
    );
    assert!(b.url.starts_with("ws://127.0.0.1:"), "{}", b.url);
    let (mut c, _) = b.client("alice").await;
    // To another client: a message to itself could arrive before the publish's answer.
    c.publish_ok("r1", "client:bob", json!("hello")).await;
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
    let mut b = Broker::start(Opts::new().env("RUST_LOG", "info"));
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

/// Runs `outboxd serve` with `env` and without `RUST_LOG` until its ready line, stops it with
/// SIGTERM and returns what it wrote to stderr.
fn serve_without_rust_log(env: &[(&str, &str)]) -> String {
    use std::io::{BufRead as _, BufReader, Read as _};
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = common::serve_command(dir.path());
    cmd.env_remove("RUST_LOG")
        .env("OUTBOXD_SERVER__ADMIN_LISTEN", "")
        .envs(env.iter().copied());
    let mut child = cmd.spawn().expect("spawn outboxd");
    let stdout = child.stdout.take().expect("stdout piped");
    let ready = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.starts_with("outboxd ready: "));
    assert!(ready, "no ready line");
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) on the child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = child.wait().expect("wait for outboxd");
    assert!(status.success(), "{status:?}");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr piped")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    stderr
}

#[test]
fn log_level_from_the_config_filters_events_by_level_and_target() {
    // Without RUST_LOG the broker logs at log.level: "warn" hides the info events...
    let stderr = serve_without_rust_log(&[("OUTBOXD_LOG__LEVEL", "warn")]);
    assert!(!stderr.contains("INFO"), "{stderr}");
    // ...and a target=level pair lets one module's info events through (the signal is
    // reported by outboxd::cli, the start line by outboxd::net).
    let stderr = serve_without_rust_log(&[("OUTBOXD_LOG__LEVEL", "warn,outboxd::cli=info")]);
    assert!(stderr.contains("shutdown requested"), "{stderr}");
    assert!(!stderr.contains("outboxd serving"), "{stderr}");
    // The default is info.
    let stderr = serve_without_rust_log(&[]);
    assert!(stderr.contains("outboxd serving"), "{stderr}");
}
