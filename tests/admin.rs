//! The admin HTTP API against the real binary: every endpoint, its statuses and error codes,
//! bearer-token authentication, the refusal to listen beyond loopback without a token, an HTTP
//! publish that survives SIGKILL once confirmed, and a purge that ends the client's session.

mod common;

use std::time::{Duration, Instant};

use common::{http, Broker, Client, Opts, QUIET};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FAULT: &str = "OUTBOXD_FAULT_FSYNC_FAIL_AFTER";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_answer_200_on_a_healthy_broker() {
    // Catches a probe endpoint that is missing, slow to come up, or not JSON.
    let broker = Broker::start(Opts::new());
    let r = broker.admin_get("/healthz").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), json!({"status": "ok"}));
    let r = broker.admin_get("/readyz").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), json!({"status": "ready"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_endpoints_show_the_stored_outboxes_and_who_is_connected() {
    // Catches a live view that disagrees with what was published, acked and subscribed.
    let broker = Broker::start(Opts::new());
    let (mut carol, _) = broker.client("carol").await;
    carol.subscribe("s1", "news").await;
    let (mut alice, _) = broker.client("alice").await;
    for i in 1..=3 {
        alice
            .publish_ok(&format!("p{i}"), "client:bob", json!({"n": i}))
            .await;
    }
    alice
        .publish_ok("t1", "topic:news", json!("headline"))
        .await;

    let list = broker.admin_get("/v1/clients?sort=pending").await;
    assert_eq!(list.status, 200, "{list:?}");
    let list = list.json();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client_id"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["bob", "carol", "alice"], "{list}");
    assert_eq!(list[0]["pending"], 3, "{list}");
    assert_eq!(list[0]["connected"], false, "bob never connected: {list}");
    assert_eq!(list[1]["connected"], true, "carol is connected: {list}");
    assert_eq!(list[1]["subscriptions"], json!(["news"]), "{list}");
    let top = broker
        .admin_get("/v1/clients?sort=pending&limit=1")
        .await
        .json();
    assert_eq!(top.as_array().unwrap().len(), 1, "{top}");
    assert_eq!(top[0]["client_id"], "bob", "{top}");

    let bob = broker.admin_get("/v1/clients/bob").await;
    assert_eq!(bob.status, 200, "{bob:?}");
    let bob = bob.json();
    assert_eq!(bob["pending"], 3, "{bob}");
    assert_eq!(bob["next_seq"], 4, "{bob}");
    assert_eq!(bob["acked"], 0, "{bob}");
    assert!(bob["oldest_unacked_ts"].is_u64(), "{bob}");

    let page = broker
        .admin_get("/v1/clients/bob/outbox?from=2&limit=1")
        .await;
    assert_eq!(page.status, 200, "{page:?}");
    let page = page.json();
    assert_eq!(page["messages"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["messages"][0]["seq"], 2, "{page}");
    assert_eq!(page["messages"][0]["payload"], json!({"n": 2}), "{page}");
    assert_eq!(page["messages"][0]["from"], "alice", "{page}");
    assert_eq!(page["next_from"], 3, "{page}");
    assert_eq!(page["epoch"], bob["epoch"], "{page}");
    let all = broker.admin_get("/v1/clients/bob/outbox").await.json();
    assert_eq!(all["messages"].as_array().unwrap().len(), 3, "{all}");
    assert!(all["next_from"].is_null(), "{all}");

    let topics = broker.admin_get("/v1/topics").await;
    assert_eq!(topics.status, 200, "{topics:?}");
    assert_eq!(
        topics.json(),
        json!([{"topic": "news", "subscribers": ["carol"]}])
    );

    let stats = broker.admin_get("/v1/stats").await;
    assert_eq!(stats.status, 200, "{stats:?}");
    let stats = stats.json();
    assert_eq!(stats["clients"], 3, "{stats}");
    assert_eq!(stats["topics"], 1, "{stats}");
    assert_eq!(stats["pending_messages"], 4, "{stats}");
    assert_eq!(stats["max_pending_messages"], 3, "{stats}");
    assert!(stats["disk_bytes"].as_u64().unwrap() > 0, "{stats}");

    // Bob connects and acks two: the view follows.
    let (mut bob_ws, _) = broker.client("bob").await;
    let msgs = bob_ws.recv_msgs(3).await;
    bob_ws.ack_upto(common::seq(&msgs[1])).await;
    bob_ws.sync().await;
    // The writer holds acks back to batch them; the admin view must not show that.
    let v = broker.admin_get("/v1/clients/bob").await.json();
    assert_eq!(
        v["pending"], 1,
        "an ack the broker has read shows at once: {v}"
    );
    assert_eq!(v["acked"], 2, "{v}");
    assert_eq!(v["connected"], true, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors_with_their_status() {
    // Catches plain-text or HTML errors, and 200s for requests that make no sense.
    let broker = Broker::start(Opts::new());
    broker
        .admin_post("/v1/publish", json!({"to": "client:bob", "payload": 1}))
        .await;
    broker
        .admin_get("/v1/clients/nobody")
        .await
        .assert_error(404, "not_found");
    broker
        .admin_get("/v1/clients/nobody/outbox")
        .await
        .assert_error(404, "not_found");
    broker
        .admin_delete("/v1/clients/nobody/outbox")
        .await
        .assert_error(404, "not_found");
    broker
        .admin_get("/v1/clients/a%20b")
        .await
        .assert_error(400, "bad_client_id");
    broker
        .admin_get("/v1/clients/bob/outbox?limit=0")
        .await
        .assert_error(400, "bad_frame");
    broker
        .admin_get("/v1/clients/bob/outbox?from=minus")
        .await
        .assert_error(400, "bad_frame");
    broker
        .admin_get("/v1/clients?sort=size")
        .await
        .assert_error(400, "bad_frame");
    broker
        .admin_get("/v1/nothing-here")
        .await
        .assert_error(404, "not_found");
    http(broker.admin_addr(), "PUT", "/v1/stats", None, Some("{}"))
        .await
        .assert_error(405, "method_not_allowed");
    // Client ids with URL-special characters are percent-encoded in the path.
    broker
        .admin_post("/v1/publish", json!({"to": "client:svc:a@b", "payload": 1}))
        .await;
    let r = broker.admin_get("/v1/clients/svc%3Aa%40b").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["client_id"], "svc:a@b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_confirmed_before_sigkill_is_delivered_after_restart() {
    // Catches an HTTP publish answered before its fsync, or written somewhere a crash loses.
    let mut broker = Broker::start(Opts::new());
    let r = broker
        .admin_post(
            "/v1/publish",
            json!({"to": "client:bob", "payload": {"order": 17, "total": 2.5}, "key": "order-17", "from": "backend"}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let ok = r.json();
    assert_eq!(ok["type"], "ok", "{ok}");
    assert_eq!(ok["recipients"], 1, "{ok}");
    assert!(ok.get("duplicate").is_none(), "{ok}");
    let id = ok["id"].clone();
    // Without `from`: no publisher, its own key scope.
    let r = broker
        .admin_post(
            "/v1/publish",
            json!({"to": "client:bob", "payload_b64": "AP8B"}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");

    broker.kill9();
    broker.restart();

    // The retry after the crash is recognised by its key (scope: `from`).
    let retry = broker
        .admin_post(
            "/v1/publish",
            json!({"to": "client:bob", "payload": {"order": 17, "total": 2.5}, "key": "order-17", "from": "backend"}),
        )
        .await;
    assert_eq!(retry.status, 200, "{retry:?}");
    let retry = retry.json();
    assert_eq!(retry["duplicate"], true, "{retry}");
    assert_eq!(retry["id"], id, "{retry}");
    // The key named again for another payload: 409 key_reused, nothing written.
    let reused = broker
        .admin_post(
            "/v1/publish",
            json!({"to": "client:bob", "payload": {"order": 18}, "key": "order-17", "from": "backend"}),
        )
        .await;
    assert_eq!(reused.status, 409, "{reused:?}");
    assert_eq!(reused.json()["error"]["code"], "key_reused", "{reused:?}");

    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 2, "{welcome}");
    let m = bob.recv_msg().await;
    assert_eq!(m["payload"], json!({"order": 17, "total": 2.5}), "{m}");
    assert_eq!(m["from"], "backend", "{m}");
    assert_eq!(m["id"], id, "{m}");
    let m = bob.recv_msg().await;
    assert_eq!(m["payload_b64"], "AP8B", "{m}");
    assert!(m.get("from").is_none(), "{m}");
    bob.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_refusals_use_protocol_codes_and_http_statuses() {
    // Catches an HTTP publish that accepts what a WebSocket publish refuses, or answers 200.
    let broker = Broker::start(Opts::new().set("limits", "max_outbox_messages", 1).set(
        "limits",
        "max_payload_bytes",
        1000,
    ));
    let publish = |body: Value| broker.admin_post("/v1/publish", body);
    publish(json!({"to": "queue:x", "payload": 1}))
        .await
        .assert_error(400, "bad_frame");
    publish(json!({"to": "client:a b", "payload": 1}))
        .await
        .assert_error(400, "bad_client_id");
    publish(json!({"to": "topic:a#b", "payload": 1}))
        .await
        .assert_error(400, "bad_topic");
    publish(json!({"to": "client:bob"}))
        .await
        .assert_error(400, "bad_frame");
    publish(json!({"to": "client:bob", "payload": 1, "from": "x y"}))
        .await
        .assert_error(400, "bad_client_id");
    publish(json!({"to": "client:bob", "payload": 1, "ttl": 5}))
        .await
        .assert_error(400, "bad_frame");
    publish(json!({"to": "client:bob", "payload": "x".repeat(2000)}))
        .await
        .assert_error(413, "payload_too_large");
    http(
        broker.admin_addr(),
        "POST",
        "/v1/publish",
        None,
        Some("not json"),
    )
    .await
    .assert_error(400, "bad_frame");
    // A body over server.max_frame_bytes is refused before it is read whole.
    let huge = format!(
        r#"{{"to":"client:bob","payload":"{}"}}"#,
        "x".repeat(200_000)
    );
    http(
        broker.admin_addr(),
        "POST",
        "/v1/publish",
        None,
        Some(&huge),
    )
    .await
    .assert_error(413, "payload_too_large");

    // Nothing above was written.
    broker
        .admin_get("/v1/clients/bob")
        .await
        .assert_error(404, "not_found");

    // outbox_full: 409, nothing written; a topic publish names the full subscriber instead.
    let (mut bob, _) = broker.client("bob").await;
    bob.subscribe("s", "news").await;
    let r = publish(json!({"to": "client:bob", "payload": 1})).await;
    assert_eq!(r.status, 200, "{r:?}");
    publish(json!({"to": "client:bob", "payload": 2}))
        .await
        .assert_error(409, "outbox_full");
    let r = publish(json!({"to": "topic:news", "payload": 3})).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json()["refused"],
        json!([{"client_id": "bob", "code": "outbox_full"}]),
        "{r:?}"
    );
    assert_eq!(r.json()["recipients"], 0, "{r:?}");
    let v = broker.admin_get("/v1/clients/bob").await.json();
    assert_eq!(v["pending"], 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latched_store_makes_readyz_and_publish_answer_503() {
    // Catches a broker that reports ready, or confirms over HTTP, after a failed fsync.
    let broker = Broker::start(Opts::new().env(FAULT, 0));
    broker
        .admin_post("/v1/publish", json!({"to": "client:bob", "payload": 1}))
        .await
        .assert_error(503, "internal");
    broker
        .admin_get("/readyz")
        .await
        .assert_error(503, "internal");
    broker
        .admin_post("/v1/publish", json!({"to": "client:bob", "payload": 2}))
        .await
        .assert_error(503, "internal");
    broker
        .admin_delete("/v1/clients/bob/outbox")
        .await
        .assert_error(503, "internal");
    // Liveness is not readiness: the process is up.
    assert_eq!(broker.admin_get("/healthz").await.status, 200);
    let m = broker.metrics().await;
    assert_eq!(m["outboxd_store_latched"], 1.0);
    assert!(m["outboxd_store_errors_total"] >= 1.0, "{m:?}");
    assert_eq!(m["outboxd_refused_total{code=\"internal\"}"], 2.0, "{m:?}");
    assert_eq!(m["outboxd_published_total"], 0.0, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_closes_the_session_with_4002_and_the_next_hello_reports_missed() {
    // Catches a purge that leaves the client reading a dead epoch, or drops messages silently.
    let broker = Broker::start(Opts::new());
    let (mut alice, _) = broker.client("alice").await;
    for i in 1..=3 {
        alice
            .publish_ok(&format!("p{i}"), "client:bob", json!(i))
            .await;
    }
    let (mut bob, welcome) = broker.client("bob").await;
    let old_epoch = welcome["epoch"].as_str().unwrap().to_string();
    let msgs = bob.recv_msgs(3).await;
    assert_eq!(common::seqs(&msgs), [1, 2, 3]);

    let r = broker.admin_delete("/v1/clients/bob/outbox").await;
    assert_eq!(r.status, 200, "{r:?}");
    let purged = r.json();
    assert_eq!(purged["client_id"], "bob", "{purged}");
    assert_eq!(purged["removed"], 3, "{purged}");
    assert_eq!(purged["disconnected"], true, "{purged}");
    let new_epoch = purged["epoch"].as_str().unwrap().to_string();
    assert_ne!(new_epoch, old_epoch);
    bob.expect_close(4002).await;

    let mut bob = Client::connect(&broker.url).await;
    let w = bob.hello("bob", Some((&old_epoch, 0))).await;
    assert_eq!(w["resumed"], false, "{w}");
    assert_eq!(w["reason"], "epoch_mismatch", "{w}");
    assert_eq!(w["epoch"], new_epoch.as_str(), "{w}");
    assert_eq!(w["missed"], 3, "{w}");
    assert_eq!(w["pending"], 0, "{w}");
    // The new epoch does not restart the numbering: the position in force is the last purged
    // seq, and the next message gets the seq after it (docs/protocol.md, after resumed:false).
    assert_eq!(w["last_seq"], 3, "{w}");
    assert_eq!(w["next_seq"], 4, "{w}");
    bob.expect_quiet(QUIET).await;

    // New messages go on after the purged seqs.
    alice.publish_ok("p4", "client:bob", json!(4)).await;
    let m = bob.recv_msg().await;
    assert_eq!(common::seq(&m), 4, "{m}");
    let v = broker.admin_get("/v1/clients/bob").await.json();
    assert_eq!(v["epoch"], new_epoch.as_str(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_endpoint_writes_a_new_data_directory_and_refuses_an_occupied_one() {
    // Catches a backup that overwrites an existing directory or accepts a relative path.
    let broker = Broker::start(Opts::new());
    broker
        .admin_post("/v1/publish", json!({"to": "client:bob", "payload": 1}))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("copy");
    let r = broker
        .admin_post("/v1/backup", json!({"to": to.to_str().unwrap()}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert!(v["records"].as_u64().unwrap() >= 2, "{v}");
    assert!(v["bytes"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["to"], to.to_str().unwrap(), "{v}");
    assert!(to.join("db").is_file(), "no sled db in {}", to.display());
    broker
        .admin_post("/v1/backup", json!({"to": to.to_str().unwrap()}))
        .await
        .assert_error(409, "conflict");
    broker
        .admin_post("/v1/backup", json!({"to": "relative/dir"}))
        .await
        .assert_error(400, "bad_frame");
    broker
        .admin_post("/v1/backup", json!({"dir": "/tmp/x"}))
        .await
        .assert_error(400, "bad_frame");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_into_the_live_data_dir_is_refused_also_through_dotdot_or_a_symlink() {
    // Catches a backup written into the store it copies: it would sit among sled's files, be
    // copied again by every later backup, and die with the disk it was meant to survive.
    let broker = Broker::start(Opts::new());
    broker
        .admin_post("/v1/publish", json!({"to": "client:bob", "payload": 1}))
        .await;
    let data = broker.data_dir();
    let name = data.file_name().unwrap().to_str().unwrap().to_string();
    let outside = tempfile::tempdir().unwrap();
    let link = outside.path().join("link-to-data");
    std::os::unix::fs::symlink(&data, &link).unwrap();
    let link_parent = outside.path().join("link-to-parent");
    std::os::unix::fs::symlink(data.parent().unwrap(), &link_parent).unwrap();
    let targets = [
        data.join("backup"),
        data.clone(),
        data.join("new/deeper"),
        data.join("..").join(&name).join("backup"),
        data.join("missing/../backup"),
        outside.path().join("missing/../link-to-data/backup"),
        link.clone(),
        link.join("backup"),
        link_parent.join(&name).join("backup"),
    ];
    for to in &targets {
        let to = to.to_str().unwrap();
        let r = broker.admin_post("/v1/backup", json!({"to": to})).await;
        r.assert_error(400, "bad_frame");
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(
            message.contains("inside the data directory") && message.contains(to),
            "{to}: {message}"
        );
    }
    for created in ["backup", "new", "missing"] {
        assert!(
            !data.join(created).exists(),
            "a refused backup created {created} in the data directory"
        );
    }
    // A sibling whose name starts with the data directory's is outside it.
    let sibling = data.with_file_name(format!("{name}-backup"));
    let r = broker
        .admin_post("/v1/backup", json!({"to": sibling.to_str().unwrap()}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");

    // The offline command refuses the same targets, and creates nothing either.
    let mut broker = broker;
    assert!(broker.sigterm().success());
    for to in &targets {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
            .args(["backup", "--data"])
            .arg(&data)
            .arg("--to")
            .arg(to)
            .current_dir(outside.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: {stderr}", to.display());
        assert!(
            stderr.contains("inside the data directory"),
            "{}: {stderr}",
            to.display()
        );
    }
    for created in ["backup", "new", "missing"] {
        assert!(
            !data.join(created).exists(),
            "a refused offline backup created {created} in the data directory"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_every_endpoint_but_healthz_needs_the_bearer_token() {
    // Catches an endpoint left open, or a wrong token accepted.
    let broker = Broker::start(Opts::new().set("admin", "token", "s3cret-token"));
    let addr = broker.admin_addr();
    let r = http(addr, "GET", "/healthz", None, None).await;
    assert_eq!(r.status, 200, "healthz stays open for probes: {r:?}");
    let publish = r#"{"to":"client:bob","payload":1}"#;
    let backup = r#"{"to":"/nonexistent/outboxd-backup"}"#;
    let endpoints: [(&str, &str, Option<&str>); 10] = [
        ("GET", "/readyz", None),
        ("GET", "/metrics", None),
        ("GET", "/v1/clients", None),
        ("GET", "/v1/clients/bob", None),
        ("GET", "/v1/clients/bob/outbox", None),
        ("GET", "/v1/topics", None),
        ("GET", "/v1/stats", None),
        ("POST", "/v1/publish", Some(publish)),
        ("DELETE", "/v1/clients/bob/outbox", None),
        ("POST", "/v1/backup", Some(backup)),
    ];
    for (method, path, body) in endpoints {
        for token in [None, Some("wrong"), Some("s3cret-token-longer"), Some("")] {
            let r = http(addr, method, path, token, body).await;
            r.assert_error(401, "unauthorized");
            assert!(
                r.header("www-authenticate")
                    .is_some_and(|h| h.starts_with("Bearer")),
                "{method} {path}: {r:?}"
            );
        }
    }
    // Nothing got through.
    let r = http(addr, "GET", "/v1/clients", Some("s3cret-token"), None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), json!([]));
    let r = http(
        addr,
        "POST",
        "/v1/publish",
        Some("s3cret-token"),
        Some(publish),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = http(addr, "GET", "/metrics", Some("s3cret-token"), None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let m = common::parse_metrics(&r.body);
    assert_eq!(m["outboxd_admin_unauthorized_total"], 40.0);
    assert_eq!(m["outboxd_published_total"], 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_beyond_loopback_without_a_token_refuses_to_start() {
    // Catches a broker that exposes purge and publish to the network without authentication.
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = common::serve_command(dir.path());
    cmd.env("OUTBOXD_SERVER__ADMIN_LISTEN", "0.0.0.0:0");
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("admin.token") && stderr.contains("server.admin_listen"),
        "the refusal must name both keys: {stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("outboxd ready"),
        "it must not have started"
    );
    assert!(
        !dir.path().join("data").exists(),
        "nothing may be created before the refusal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_admin_listen_turns_the_admin_api_off() {
    // Catches a broker that cannot run without an admin port (e.g. where 9090 is taken).
    let broker = Broker::start(Opts::new().set("server", "admin_listen", ""));
    assert!(broker.admin.is_none(), "no admin line expected");
    let (mut bob, _) = broker.client("bob").await;
    bob.send(json!({"type": "ping"})).await;
    assert_eq!(bob.recv().await, json!({"type": "pong"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_admin_api_even_with_an_idle_keep_alive_connection() {
    // Catches an HTTP connection that keeps the store (and so the process) alive after SIGTERM.
    let mut broker = Broker::start(Opts::new());
    let mut tcp = tokio::net::TcpStream::connect(broker.admin_addr())
        .await
        .unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    // The connection stays open (keep-alive) while the broker is told to stop.
    let t0 = Instant::now();
    let status = broker.sigterm();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "shutdown waited {:?} on an idle HTTP connection",
        t0.elapsed()
    );
}

/// 200 nested arrays around a string: deeper than serde_json's default nesting limit (128),
/// and well within what a publish accepts.
fn deep_json() -> String {
    format!("{}\"deep\"{}", "[".repeat(200), "]".repeat(200))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_view_shows_a_deeply_nested_json_payload_as_json_not_as_a_string() {
    // Catches a view that parses the stored payload again, with a nesting limit, and past the
    // limit shows the JSON text as a string: the same as a string payload with that text.
    let broker = Broker::start(Opts::new());
    let (mut alice, _) = broker.client("alice").await;
    let deep = deep_json();
    alice
        .send_text(&format!(
            r#"{{"type":"publish","ref":"deep","to":"client:bob","payload":{deep}}}"#
        ))
        .await;
    let ok = alice.recv_skip_pings().await;
    assert_eq!(ok["type"], "ok", "{ok}");
    // The same text as a string payload, which the view must keep telling apart.
    alice.publish_ok("text", "client:bob", json!(deep)).await;

    let page = broker.admin_get("/v1/clients/bob/outbox").await;
    assert_eq!(page.status, 200, "{page:?}");
    assert!(
        page.body.contains(&format!(r#""payload":{deep},"#)),
        "seq 1 not shown as JSON: {:.600}",
        page.body
    );
    let as_string = serde_json::to_string(&deep).expect("a string");
    assert!(
        page.body.contains(&format!(r#""payload":{as_string},"#)),
        "seq 2 not shown as a string: {:.600}",
        page.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_client_removes_its_outbox_and_subscriptions_and_closes_it_with_4002() {
    // Catches a delete that leaves messages, subscriptions or the old epoch behind (a client
    // coming back must be told its position is gone), or that does not last a restart.
    let mut broker = Broker::start(Opts::new());
    let (mut bob, welcome) = broker.client("bob").await;
    let epoch = welcome["epoch"].as_str().expect("epoch").to_string();
    assert_eq!(bob.subscribe("s", "news").await["type"], "ok");
    let (mut alice, _) = broker.client("alice").await;
    alice.publish_ok("p1", "client:bob", json!(1)).await;
    alice.publish_ok("p2", "topic:news", json!(2)).await;
    bob.recv_msgs(2).await;

    let r = broker.admin_delete("/v1/clients/bob").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["removed"], 2, "{r:?}");
    assert_eq!(r.json()["disconnected"], true, "{r:?}");
    bob.expect_close(4002).await;
    assert_eq!(broker.admin_get("/v1/clients/bob").await.status, 404);
    assert_eq!(broker.admin_delete("/v1/clients/bob").await.status, 404);
    let ok = alice.publish_ok("p3", "topic:news", json!(3)).await;
    assert_eq!(
        ok["recipients"], 0,
        "the subscription went with the client: {ok}"
    );

    broker.restart();
    assert_eq!(broker.admin_get("/v1/clients/bob").await.status, 404);
    let mut bob = Client::connect(&broker.url).await;
    let w = bob.hello("bob", Some((&epoch, 2))).await;
    assert_eq!(w["reason"], "epoch_mismatch", "{w}");
    assert_eq!(w["pending"], 0, "{w}");
    bob.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_subscription_stops_that_topic_only() {
    // Catches an operator's unsubscribe that misses, ends every subscription, or answers 200
    // for a subscription that does not exist.
    let broker = Broker::start(Opts::new());
    let (mut carol, _) = broker.client("carol").await;
    assert_eq!(carol.subscribe("a", "typo").await["type"], "ok");
    assert_eq!(carol.subscribe("b", "news").await["type"], "ok");
    let r = broker
        .admin_delete("/v1/clients/carol/subscriptions/typo")
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        broker
            .admin_delete("/v1/clients/carol/subscriptions/typo")
            .await
            .status,
        404
    );
    assert_eq!(
        broker
            .admin_delete("/v1/clients/nobody/subscriptions/news")
            .await
            .status,
        404
    );
    let (mut alice, _) = broker.client("alice").await;
    assert_eq!(
        alice.publish_ok("p1", "topic:typo", json!(1)).await["recipients"],
        0
    );
    assert_eq!(
        alice.publish_ok("p2", "topic:news", json!(2)).await["recipients"],
        1
    );
    assert_eq!(carol.recv_msg().await["payload"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outboxd_client_deletes_purges_and_unsubscribes_through_the_admin_api() {
    // Catches a CLI that changes a client without confirmation in a script, or reports a
    // change the broker did not make.
    let broker = Broker::start(Opts::new());
    let admin = format!("http://{}", broker.admin.expect("admin API on"));
    let (mut bob, _) = broker.client("bob").await;
    assert_eq!(bob.subscribe("s", "typo").await["type"], "ok");
    bob.close().await;
    let (mut alice, _) = broker.client("alice").await;
    alice.publish_ok("p1", "client:bob", json!(1)).await;
    let run = |args: &[&str]| {
        let dir = tempfile::tempdir().expect("temp dir");
        std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
            .arg("client")
            .arg("--admin")
            .arg(&admin)
            .args(args)
            .current_dir(dir.path())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run outboxd client")
    };
    // No terminal to ask, no --yes: refused, nothing changed.
    let out = run(&["delete", "bob"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--yes"),
        "{out:?}"
    );
    assert_eq!(broker.admin_get("/v1/clients/bob").await.status, 200);

    let out = run(&["unsubscribe", "bob", "typo"]);
    assert!(out.status.success(), "{out:?}");
    let view = broker.admin_get("/v1/clients/bob").await.json();
    assert_eq!(view["subscriptions"], json!([]), "{view}");

    let out = run(&["purge", "bob", "--yes", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["removed"], 1, "{v}");

    let out = run(&["delete", "bob", "--yes"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("deleted client bob"));
    assert_eq!(broker.admin_get("/v1/clients/bob").await.status, 404);
    let out = run(&["delete", "bob", "--yes"]);
    assert_eq!(out.status.code(), Some(3), "no such client: {out:?}");
}

/// Whether `id`'s outbox is gone within the receive timeout (a forget follows a connection's
/// end a moment later).
async fn forgotten(broker: &Broker, id: &str) -> bool {
    let url = format!("/v1/clients/{id}");
    let deadline = Instant::now() + common::RECV_TIMEOUT;
    loop {
        let s = broker.admin_get(&url).await.status;
        if s == 404 || Instant::now() > deadline {
            return s == 404;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_client_is_forgotten_at_its_end_only_when_nothing_is_stored_for_it() {
    // Catches a transient hello that forgets a client with messages, subscriptions or a newer
    // connection (a loss), or one that forgets nothing.
    let broker = Broker::start(Opts::new());
    let transient = |id: &str| json!({"type": "hello", "client_id": id, "transient": true});
    // Only published: forgotten.
    let mut p = Client::connect(&broker.url).await;
    p.send(transient("p")).await;
    assert_eq!(p.recv_skip_pings().await["type"], "welcome");
    p.publish_ok("1", "client:bob", json!(1)).await;
    p.close().await;
    assert!(forgotten(&broker, "p").await, "the publisher was kept");
    // Subscribed: kept.
    let mut s = Client::connect(&broker.url).await;
    s.send(transient("s")).await;
    assert_eq!(s.recv_skip_pings().await["type"], "welcome");
    assert_eq!(s.subscribe("r", "news").await["type"], "ok");
    s.close().await;
    // Sent a message while connected, not acked: kept.
    let mut m = Client::connect(&broker.url).await;
    m.send(transient("m")).await;
    assert_eq!(m.recv_skip_pings().await["type"], "welcome");
    let (mut alice, _) = broker.client("alice").await;
    alice.publish_ok("2", "client:m", json!(2)).await;
    assert_eq!(m.recv_msg().await["payload"], 2);
    m.close().await;
    // Taken over by a newer connection: the newer one is not forgotten by the older's end.
    let mut old = Client::connect(&broker.url).await;
    old.send(transient("t")).await;
    assert_eq!(old.recv_skip_pings().await["type"], "welcome");
    let (_newer, _) = broker.client("t").await;
    old.expect_close(4000).await;
    tokio::time::sleep(QUIET).await;
    for id in ["s", "m", "t"] {
        let r = broker.admin_get(&format!("/v1/clients/{id}")).await;
        assert_eq!(r.status, 200, "{id} must be kept: {r:?}");
    }
    assert_eq!(broker.admin_get("/v1/clients/m").await.json()["pending"], 1);
}
