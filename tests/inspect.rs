//! `outboxd inspect`, `backup` and `restore` run as subprocesses on data directories a real
//! broker wrote: the numbers match what was published and acked, a directory a running broker
//! holds is refused with advice and left alone, inspection never changes the data, and a
//! restored backup delivers what was pending.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

use common::{Broker, Opts, TlsFiles};
use serde_json::{json, Value};

/// Runs `outboxd ARGS` in an empty directory (no ./config.toml) and returns its output.
fn outboxd(args: &[&str]) -> Output {
    let cwd = tempfile::tempdir().expect("temp dir");
    Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(args)
        .current_dir(cwd.path())
        .env_remove("RUST_LOG")
        .output()
        .expect("run outboxd")
}

fn ok_stdout(args: &[&str]) -> String {
    let out = outboxd(args);
    assert!(
        out.status.success(),
        "outboxd {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn json_of(args: &[&str]) -> Value {
    let text = ok_stdout(args);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{args:?} printed non-JSON {text:?}: {e}"))
}

/// Every file under `dir` with its size and modification time.
fn fingerprint(dir: &Path) -> BTreeMap<PathBuf, (u64, SystemTime, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let entry = entry.expect("dir entry");
        let meta = entry.metadata().expect("metadata");
        if meta.is_dir() {
            out.extend(fingerprint(&entry.path()));
        } else {
            let bytes = std::fs::read(entry.path()).expect("read file");
            out.insert(
                entry.path(),
                (meta.len(), meta.modified().expect("mtime"), bytes),
            );
        }
    }
    out
}

/// alice publishes 5 messages to bob and 2 to topic news (subscribed by bob and carol);
/// bob acks seq 1 and 2. Leaves bob with 5 pending (3..=7), carol with 2.
async fn workload(broker: &Broker) {
    let (mut bob, _) = broker.client("bob").await;
    bob.subscribe("s1", "news").await;
    let (mut carol, _) = broker.client("carol").await;
    carol.subscribe("s2", "news").await;
    let (mut alice, _) = broker.client("alice").await;
    for i in 0..5 {
        alice
            .publish_ok(&format!("p{i}"), "client:bob", json!({ "n": i }))
            .await;
    }
    for i in 0..2 {
        alice
            .publish_ok(
                &format!("t{i}"),
                "topic:news",
                json!(format!("headline {i}")),
            )
            .await;
    }
    for seq in 1..=2 {
        let m = bob.recv_msg().await;
        assert_eq!(m["seq"], seq);
        bob.ack(seq).await;
    }
    bob.sync().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_inspection_reports_what_was_published_and_acked_and_changes_nothing() {
    // Catches views that miscount, and an offline open that writes to the directory.
    let mut broker = Broker::start(Opts::new());
    workload(&broker).await;
    assert!(broker.sigterm().success());
    let dir = broker.data_dir();
    let data = dir.to_str().expect("utf-8 path");
    let before = fingerprint(&dir);

    let clients = json_of(&["inspect", "--data", data, "--json", "clients"]);
    let by_id: BTreeMap<String, Value> = clients
        .as_array()
        .expect("clients is an array")
        .iter()
        .map(|c| {
            (
                c["client_id"].as_str().unwrap_or_default().to_string(),
                c.clone(),
            )
        })
        .collect();
    assert_eq!(by_id.len(), 3, "{clients}");
    let bob = &by_id["bob"];
    assert_eq!(bob["pending"], 5, "{bob}");
    assert_eq!(bob["acked"], 2, "{bob}");
    assert_eq!(bob["next_seq"], 8, "{bob}");
    assert_eq!(bob["subscriptions"], json!(["news"]), "{bob}");
    assert!(bob["oldest_unacked_ts"].as_u64().is_some(), "{bob}");
    assert!(bob["last_seen"].as_u64().is_some(), "{bob}");
    assert_eq!(by_id["carol"]["pending"], 2);
    assert_eq!(by_id["alice"]["pending"], 0);
    // Sorted by pending, most first.
    assert_eq!(clients[0]["client_id"], "bob");

    let dump = ok_stdout(&["inspect", "--data", data, "--json", "outbox", "bob"]);
    let msgs: Vec<Value> = dump
        .lines()
        .map(|l| serde_json::from_str(l).expect("NDJSON line"))
        .collect();
    let seqs: Vec<u64> = msgs
        .iter()
        .map(|m| m["seq"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(seqs, [3, 4, 5, 6, 7]);
    assert_eq!(msgs[0]["payload"], json!({ "n": 2 }));
    assert_eq!(msgs[0]["from"], "alice");
    assert_eq!(msgs[3]["topic"], "news");
    assert_eq!(msgs[3]["payload"], "headline 0");

    let page = ok_stdout(&[
        "inspect", "--data", data, "--json", "outbox", "bob", "--from", "5", "--limit", "2",
    ]);
    let seqs = ndjson_seqs(&page);
    assert_eq!(seqs, [5, 6]);

    let topics = json_of(&["inspect", "--data", data, "--json", "topics"]);
    assert_eq!(
        topics,
        json!([{ "topic": "news", "subscribers": ["bob", "carol"] }])
    );

    let stats = json_of(&["inspect", "--data", data, "--json", "stats"]);
    assert_eq!(stats["clients"], 3, "{stats}");
    assert_eq!(stats["pending_messages"], 7, "{stats}");
    assert_eq!(stats["max_pending_messages"], 5, "{stats}");
    assert_eq!(stats["subscriptions"], 2, "{stats}");
    assert_eq!(stats["format_version"], 2, "{stats}");
    assert!(stats["disk_bytes"].as_u64().unwrap_or(0) > 0, "{stats}");
    assert!(stats["live_bytes"].as_u64().unwrap_or(0) > 0, "{stats}");

    let human = ok_stdout(&["inspect", "--data", data, "clients"]);
    assert!(human.starts_with("CLIENT"), "{human}");
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("bob ") && l.contains("news")),
        "{human}"
    );

    let missing = outboxd(&["inspect", "--data", data, "outbox", "nobody"]);
    assert_eq!(missing.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nobody"));

    assert!(
        before == fingerprint(&dir),
        "inspection changed the data directory"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_inspection_of_a_directory_a_running_broker_holds_says_so_and_what_to_do() {
    // Catches a raw lock error, or an inspection that opens a live store behind the broker.
    let broker = Broker::start(Opts::new());
    workload(&broker).await;
    let data = broker.data_dir();
    let out = outboxd(&["inspect", "--data", data.to_str().expect("path"), "stats"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by a running outboxd"), "{err}");
    assert!(err.contains("--admin"), "{err}");
    assert!(
        !err.contains("WouldBlock") && !err.contains("os error"),
        "{err}"
    );
    // The broker is unaffected.
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 5, "{welcome}");
    assert_eq!(bob.recv_msg().await["seq"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_backup_delivers_what_was_pending() {
    // Catches a backup that misses records or is not a usable data directory.
    let mut broker = Broker::start(Opts::new());
    workload(&broker).await;
    assert!(broker.sigterm().success());
    let scratch = tempfile::tempdir().expect("temp dir");
    let backup = scratch.path().join("backup");
    let out = ok_stdout(&[
        "backup",
        "--data",
        broker.data_dir().to_str().expect("path"),
        "--to",
        backup.to_str().expect("path"),
    ]);
    assert!(out.contains("records"), "{out}");
    // A second backup into the same place is refused: it is not empty.
    let again = outboxd(&[
        "backup",
        "--data",
        broker.data_dir().to_str().expect("path"),
        "--to",
        backup.to_str().expect("path"),
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));

    // A --from that holds no backup is named as the argument to check.
    let wrong = outboxd(&[
        "restore",
        "--from",
        backup.join("no-such").to_str().expect("path"),
        "--data",
        backup.join("new").to_str().expect("path"),
    ]);
    assert!(!wrong.status.success());
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        said.contains("check --from") && !said.contains("check --data"),
        "{said}"
    );

    // Lose the original, restore into its place, start a broker on it.
    std::fs::remove_dir_all(broker.data_dir()).expect("remove data dir");
    let restored = json_of(&[
        "restore",
        "--from",
        backup.to_str().expect("path"),
        "--data",
        broker.data_dir().to_str().expect("path"),
        "--json",
    ]);
    assert!(restored["records"].as_u64().unwrap_or(0) > 0, "{restored}");
    broker.restart();
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 5, "{welcome}");
    let seqs: Vec<u64> = bob.recv_msgs(5).await.iter().map(common::seq).collect();
    assert_eq!(seqs, [3, 4, 5, 6, 7]);
    let (mut carol, _) = broker.client("carol").await;
    assert_eq!(carol.recv_msg().await["payload"], "headline 0");
    // The subscription survived too: a new topic publish reaches carol.
    let (mut alice, _) = broker.client("alice").await;
    alice
        .publish_ok("t9", "topic:news", json!("after restore"))
        .await;
    assert_eq!(carol.recv_msg().await["payload"], "headline 1");
    let m = carol.recv_msg().await;
    assert_eq!(m["payload"], "after restore", "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_inspection_through_the_admin_api_matches_the_offline_view_and_sees_connections() {
    // Catches an online view that differs from the stored state, or that misses who is
    // connected; and an online backup that cannot be served.
    let mut broker = Broker::start(Opts::new());
    workload(&broker).await;
    let (_bob, _) = broker.client("bob").await; // bob is connected while we look
    let admin = format!("http://{}", broker.admin_addr());

    let clients = json_of(&[
        "inspect", "--admin", &admin, "--json", "clients", "--sort", "name",
    ]);
    let names: Vec<&str> = clients
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["client_id"].as_str())
        .collect();
    assert_eq!(names, ["alice", "bob", "carol"]);
    assert_eq!(clients[1]["pending"], 5, "{clients}");
    assert_eq!(clients[1]["connected"], true, "{clients}");
    assert_eq!(clients[2]["connected"], false, "{clients}");

    let dump = ok_stdout(&[
        "inspect", "--admin", &admin, "--json", "outbox", "bob", "--limit", "0",
    ]);
    let seqs = ndjson_seqs(&dump);
    assert_eq!(seqs, [3, 4, 5, 6, 7]);
    let stats = json_of(&["inspect", "--admin", &admin, "--json", "stats"]);
    assert_eq!(stats["pending_messages"], 7, "{stats}");

    let missing = outboxd(&["inspect", "--admin", &admin, "outbox", "nobody"]);
    assert_eq!(missing.status.code(), Some(3));
    let down = outboxd(&["inspect", "--admin", "http://127.0.0.1:9", "stats"]);
    assert!(!down.status.success());
    assert!(String::from_utf8_lossy(&down.stderr).contains("is the broker running"));

    // Online backup, then serve it.
    let scratch = tempfile::tempdir().expect("temp dir");
    let backup = scratch.path().join("online-backup");
    let out = json_of(&[
        "backup",
        "--admin",
        &admin,
        "--to",
        backup.to_str().expect("path"),
        "--json",
    ]);
    assert!(out["records"].as_u64().unwrap_or(0) > 0, "{out}");
    assert!(broker.sigterm().success());
    std::fs::remove_dir_all(broker.data_dir()).expect("remove data dir");
    std::fs::rename(&backup, broker.data_dir()).expect("move the backup in place");
    broker.restart();
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 5, "{welcome}");
    assert_eq!(bob.recv_msg().await["seq"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_view_counts_how_often_each_message_was_sent() {
    // Catches a delivery count that misses resends or survives the ack.
    let broker = Broker::start(Opts::new());
    let (mut alice, _) = broker.client("alice").await;
    for i in 0..3 {
        alice
            .publish_ok(&format!("p{i}"), "client:bob", json!(i))
            .await;
    }
    let deliveries = |page: &Value| -> Vec<u64> {
        page["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m["deliveries"].as_u64().expect("deliveries online"))
            .collect()
    };
    let page = broker.admin_get("/v1/clients/bob/outbox").await.json();
    assert_eq!(deliveries(&page), [0, 0, 0], "{page}");
    let (mut bob, _) = broker.client("bob").await;
    bob.recv_msgs(3).await;
    bob.ack(1).await;
    bob.sync().await;
    // Acks are applied by the store without a reply: wait until seq 1 is gone.
    let mut page = broker.admin_get("/v1/clients/bob/outbox").await.json();
    for _ in 0..100 {
        if page["messages"].as_array().is_some_and(|m| m.len() == 2) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        page = broker.admin_get("/v1/clients/bob/outbox").await.json();
    }
    assert_eq!(deliveries(&page), [1, 1], "{page}");
    // A new connection gets seqs 2 and 3 again.
    let (mut again, _) = broker.client("bob").await;
    again.recv_msgs(2).await;
    let page = broker.admin_get("/v1/clients/bob/outbox").await.json();
    assert_eq!(deliveries(&page), [2, 2], "{page}");
    let human = ok_stdout(&[
        "inspect",
        "--admin",
        &format!("http://{}", broker.admin_addr()),
        "outbox",
        "bob",
    ]);
    assert!(human.contains("SENT"), "{human}");
}

/// The `seq` of each line of NDJSON output (0 where a line has none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_shows_a_deeply_nested_json_payload_as_json_online_and_offline() {
    // Catches a view that parses the stored payload again, with a nesting limit, and past the
    // limit prints the JSON text as a string: the same as a string payload with that text.
    let mut broker = Broker::start(Opts::new());
    let deep = format!("{}\"deep\"{}", "[".repeat(200), "]".repeat(200));
    let (mut alice, _) = broker.client("alice").await;
    alice
        .send_text(&format!(
            r#"{{"type":"publish","ref":"deep","to":"client:bob","payload":{deep}}}"#
        ))
        .await;
    let ok = alice.recv_skip_pings().await;
    assert_eq!(ok["type"], "ok", "{ok}");
    let as_json = format!(r#""payload":{deep},"#);

    let admin = format!("http://{}", broker.admin_addr());
    let online = ok_stdout(&["inspect", "--admin", &admin, "--json", "outbox", "bob"]);
    assert_eq!(online.lines().count(), 1, "{online:.300}");
    assert!(online.contains(&as_json), "online: {online:.600}");

    assert!(broker.sigterm().success());
    let dir = broker.data_dir();
    let data = dir.to_str().expect("utf-8 path");
    let offline = ok_stdout(&["inspect", "--data", data, "--json", "outbox", "bob"]);
    assert_eq!(offline.lines().count(), 1, "{offline:.300}");
    assert!(offline.contains(&as_json), "offline: {offline:.600}");
    let table = ok_stdout(&["inspect", "--data", data, "outbox", "bob"]);
    assert!(
        table.contains(&format!("{}\"deep", "[".repeat(40))),
        "table: {table:.600}"
    );
}

fn ndjson_seqs(out: &str) -> Vec<u64> {
    out.lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("NDJSON")["seq"]
                .as_u64()
                .unwrap_or(0)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_admin_before_the_subcommand_asks_the_broker_of_the_config() {
    // Catches `inspect --admin stats` failing with "requires a subcommand": the optional URL
    // of --admin took `stats`.
    let broker = Broker::start(Opts::new());
    workload(&broker).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("[server]\nadmin_listen = \"{}\"\n", broker.admin_addr()),
    )
    .expect("write config");
    let config = config.display().to_string();
    let bare = json_of(&["inspect", "--config", &config, "--admin", "--json", "stats"]);
    let before = json_of(&["inspect", "--config", &config, "--json", "--admin", "stats"]);
    let url = format!("http://{}", broker.admin_addr());
    let with_url = json_of(&["inspect", "--admin", &url, "--json", "stats"]);
    // The same broker answered: its data dir names it. (Pending counts may still move
    // between the queries while the workload's acks settle.)
    for v in [&bare, &before] {
        assert_eq!(v["data_dir"], with_url["data_dir"], "{v}");
        assert_eq!(v["clients"], with_url["clients"], "{v}");
    }
    assert!(
        with_url["clients"].as_u64().is_some_and(|n| n > 0),
        "{with_url}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_and_backup_reach_an_https_admin_api_trusting_ca_or_the_configs_certificate() {
    // Catches an admin client built without TLS ("TLS required, but transport is
    // unsecured"), a --ca that is ignored, and a certificate rejection not said in words.
    let tls = TlsFiles::new();
    let (cert_file, key_file) = (&tls.cert, &tls.key);
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = Broker::start(tls.opts().set("tls", "admin", true));
    let url = format!("https://{}", broker.admin_addr());
    let ca = cert_file.display().to_string();
    // wss:// for the WebSocket too: publish with the CLI, trusting the same certificate.
    ok_stdout(&[
        "pub",
        "--url",
        &broker.url,
        "--ca",
        &ca,
        "--to",
        "client:bob",
        "1",
    ]);

    let stats = json_of(&["inspect", "--admin", &url, "--ca", &ca, "--json", "stats"]);
    assert!(stats["clients"].as_u64().is_some_and(|n| n > 0), "{stats}");

    let untrusted = outboxd(&["inspect", "--admin", &url, "stats"]);
    assert_eq!(untrusted.status.code(), Some(1));
    let err = String::from_utf8_lossy(&untrusted.stderr);
    assert!(err.contains(&url), "{err}");
    assert!(err.contains("not signed by a trusted"), "{err}");

    // A bare --admin with the broker's own config: https://, its certificate trusted.
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nadmin_listen = \"{}\"\n[tls]\ncert_file = {:?}\nkey_file = {:?}\nadmin = true\n",
            broker.admin_addr(),
            cert_file.display().to_string(),
            key_file.display().to_string(),
        ),
    )
    .expect("write config");
    let config = config.display().to_string();
    let same = json_of(&["inspect", "--config", &config, "--admin", "--json", "stats"]);
    assert_eq!(same["clients"], stats["clients"], "{same}");

    let backup = dir.path().join("https-backup");
    let out = json_of(&[
        "backup",
        "--admin",
        &url,
        "--ca",
        &ca,
        "--to",
        backup.to_str().expect("path"),
        "--json",
    ]);
    assert!(out["records"].as_u64().unwrap_or(0) > 0, "{out}");
}
