//! Several brokers on one PostgreSQL database (`storage.backend = "postgres"`): any client may
//! connect to any broker, and the promises hold across them and across a failover of the
//! database. Real brokers, a real PostgreSQL (tools/pg-cluster.sh), real WebSockets; the
//! failover test SIGKILLs the primary and promotes the standby.
//!
//! Skipped, saying so, where PostgreSQL's programs are missing (unless OUTBOXD_REQUIRE_POSTGRES
//! is set, as in CI).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{on_postgres, postgres, postgres_available, seq, Broker, Client, PgCluster, QUIET};
use serde_json::{json, Value};

/// A broker on `db` that re-checks its clients' outboxes only every minute, so what reaches
/// it sooner came by a wake-up from the broker that wrote it.
fn node(db: &str) -> Broker {
    Broker::start(on_postgres(db).set("postgres", "recheck_ms", 60_000))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_on_one_broker_reaches_its_client_on_another() {
    // Catches a broker that only learns of its own writes.
    if !postgres_available() {
        return;
    }
    let db = postgres().database();
    let (a, b) = (node(&db), node(&db));
    let (mut bob, _) = b.client("bob").await;
    let (mut alice, _) = a.client("alice").await;
    for i in 1..=3 {
        alice
            .publish_ok(&format!("p{i}"), "client:bob", json!(i))
            .await;
    }
    for i in 1..=3u64 {
        let m = bob.recv_msg().await;
        assert_eq!((seq(&m), m["payload"].clone()), (i, json!(i)), "{m}");
        assert_eq!(m["from"], "alice");
    }
    bob.ack_upto(3).await;
    bob.sync().await;
    bob.close().await;
    // The ack made on B holds on A once B's transaction has ended (acks are held back to share
    // one: until then A may still count the messages pending).
    b.until_acks_durable(3).await;
    let (mut bob, welcome) = a.client("bob").await;
    assert_eq!(welcome["pending"], 0, "{welcome}");
    assert_eq!(welcome["next_seq"], 4, "{welcome}");
    bob.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_wake_up_only_delays_the_message_until_the_re_check() {
    // Catches a broker that relies on notifications alone: here the writer wakes a broker
    // that does not exist, and only B's periodic re-check can find the message.
    if !postgres_available() {
        return;
    }
    let pg = postgres();
    let db = pg.database();
    let a = node(&db);
    let b = Broker::start(on_postgres(&db).set("postgres", "recheck_ms", 200));
    let (mut bob, _) = b.client("bob").await;
    pg.psql_on(
        &db,
        "UPDATE outboxd_clients SET node = 'nowhere' WHERE name = 'bob'",
    );
    let (mut alice, _) = a.client("alice").await;
    alice.publish_ok("p1", "client:bob", json!("late")).await;
    let m = bob.recv_msg().await;
    assert_eq!(m["payload"], "late", "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_publish_reaches_subscribers_spread_over_three_brokers() {
    // Catches fan-out that only wakes the publisher's broker, or loses order across brokers.
    if !postgres_available() {
        return;
    }
    let db = postgres().database();
    let nodes = [node(&db), node(&db), node(&db)];
    let mut subs = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let (mut s, _) = n.client(&format!("sub-{i}")).await;
        let ok = s.subscribe("s", "news").await;
        assert_eq!(ok["type"], "ok", "{ok}");
        subs.push(s);
    }
    let (mut alice, _) = nodes[0].client("alice").await;
    for i in 1..=20 {
        let ok = alice
            .publish_ok(&format!("p{i}"), "topic:news", json!(i))
            .await;
        assert_eq!(ok["recipients"], 3, "{ok}");
    }
    for s in &mut subs {
        let got: Vec<(u64, Value)> = s
            .recv_msgs(20)
            .await
            .iter()
            .map(|m| (seq(m), m["payload"].clone()))
            .collect();
        let want: Vec<(u64, Value)> = (1..=20u64).map(|i| (i, json!(i))).collect();
        assert_eq!(got, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_connection_on_another_broker_closes_the_older_with_4000() {
    // Catches two live connections for one client (each would be sent and ack the same
    // messages), and a takeover that waits for the minute-long re-check.
    if !postgres_available() {
        return;
    }
    let db = postgres().database();
    let (a, b) = (node(&db), node(&db));
    let (mut old, _) = a.client("bob").await;
    let (mut alice, _) = a.client("alice").await;
    alice.publish_ok("p1", "client:bob", json!(1)).await;
    assert_eq!(seq(&old.recv_msg().await), 1);
    let started = std::time::Instant::now();
    let (mut new, welcome) = b.client("bob").await;
    assert_eq!(welcome["pending"], 1, "{welcome}");
    old.expect_close(4000).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the older connection was closed only after {:?}",
        started.elapsed()
    );
    // The new connection is sent what the old one never acked, marked as maybe seen.
    let m = new.recv_msg().await;
    assert_eq!(seq(&m), 1);
    assert_eq!(m["redelivered"], true, "{m}");
    new.ack(1).await;
    new.sync().await;
    alice.publish_ok("p2", "client:bob", json!(2)).await;
    assert_eq!(seq(&new.recv_msg().await), 2);
}

/// Publishes `n` messages to `to` through `url`, each with its own idempotency key, retrying
/// (on a new connection when the old one broke) until each is confirmed. Returns the payloads
/// confirmed, in order.
async fn publish_all(urls: Vec<String>, to: &str, n: u64, pause: Duration) -> Vec<u64> {
    let mut confirmed = Vec::new();
    let mut turn = 0usize;
    let mut conn: Option<Client> = None;
    for i in 1..=n {
        loop {
            let mut c = match conn.take() {
                Some(c) => c,
                None => {
                    let url = &urls[turn % urls.len()];
                    turn += 1;
                    match Client::try_connect(url).await {
                        Some(mut c) => {
                            if c.try_hello("publisher").await.is_none() {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                            c
                        }
                        None => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    }
                }
            };
            let frame = json!({"type": "publish", "ref": format!("p{i}"), "to": to,
                               "payload": i, "key": format!("k{i}")});
            match c.try_request(frame).await {
                Some(a) if a["type"] == "ok" => {
                    confirmed.push(i);
                    conn = Some(c);
                    break;
                }
                // Refused (the database is away): the same key again, soon.
                Some(_) => {
                    conn = Some(c);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        tokio::time::sleep(pause).await;
    }
    confirmed
}

/// Receives as `client` until every payload in `1..=n` has been seen, acking each, moving to
/// the next broker in `urls` whenever the connection breaks, resuming from the last ack.
/// Returns the payloads in the order they came, with their seqs.
async fn receive_all(urls: Vec<String>, client: &str, n: u64) -> Vec<(u64, u64)> {
    let mut got: Vec<(u64, u64)> = Vec::new();
    let mut position: Option<(String, u64)> = None;
    let mut turn = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while got
        .iter()
        .map(|(_, p)| *p)
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        < n as usize
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every message arrived: {got:?}"
        );
        let url = &urls[turn % urls.len()];
        turn += 1;
        let Some(mut c) = Client::try_connect(url).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let resume = position.as_ref().map(|(e, s)| (e.as_str(), *s));
        let Some(welcome) = c.try_hello_resume(client, resume).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let epoch = welcome["epoch"].as_str().unwrap_or_default().to_string();
        if let Some((e, _)) = &position {
            assert_eq!(*e, epoch, "the outbox changed epoch: {welcome}");
            assert_eq!(welcome["resumed"], true, "{welcome}");
        }
        while let Some(m) = c.try_recv_msg(Duration::from_secs(5)).await {
            let (s, p) = (seq(&m), m["payload"].as_u64().unwrap_or(0));
            got.push((s, p));
            c.ack(s).await;
            position = Some((epoch.clone(), s));
            if got
                .iter()
                .map(|(_, p)| *p)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                >= n as usize
            {
                break;
            }
        }
    }
    got
}

/// What a run must show: every confirmed payload received, nothing that was not published, and
/// seqs that only go up (a repeat is a redelivery of the same seq and payload).
fn check(confirmed: &[u64], got: &[(u64, u64)], n: u64) {
    let mut by_seq: BTreeMap<u64, u64> = BTreeMap::new();
    let mut last = 0;
    for (s, p) in got {
        assert!((1..=n).contains(p), "unexpected payload {p} at seq {s}");
        if let Some(earlier) = by_seq.insert(*s, *p) {
            assert_eq!(earlier, *p, "seq {s} carried {earlier}, then {p}");
        } else {
            assert!(*s > last, "seq {s} came after {last}: {got:?}");
            last = *s;
        }
    }
    let received: std::collections::BTreeSet<u64> = by_seq.values().copied().collect();
    let lost: Vec<u64> = confirmed
        .iter()
        .filter(|p| !received.contains(p))
        .copied()
        .collect();
    assert!(lost.is_empty(), "confirmed and lost: {lost:?}");
    // Payloads reach the outbox in publish order: seqs order them as the publisher did.
    let order: Vec<u64> = by_seq.values().copied().collect();
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(order, sorted, "reordered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_killed_mid_stream_loses_nothing_its_clients_resume_on_another() {
    // Catches state a broker kept to itself: after kill -9 its clients must find every
    // confirmed message, exactly once per seq, through another broker.
    if !postgres_available() {
        return;
    }
    const N: u64 = 300;
    let db = postgres().database();
    let mut a = node(&db);
    let b = node(&db);
    let c = node(&db);
    let publisher = tokio::spawn(publish_all(
        vec![c.url.clone()],
        "client:bob",
        N,
        Duration::from_millis(5),
    ));
    let receiver = tokio::spawn(receive_all(vec![a.url.clone(), b.url.clone()], "bob", N));
    tokio::time::sleep(Duration::from_millis(600)).await;
    a.kill9();
    let confirmed = publisher.await.expect("publisher");
    let got = receiver.await.expect("receiver");
    assert_eq!(confirmed.len() as u64, N);
    check(&confirmed, &got, N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_the_primary_and_a_promoted_standby_lose_no_confirmed_message() {
    // Catches an `ok` sent before the standby had the commit, and brokers that cannot find
    // the new primary.
    if !postgres_available() {
        return;
    }
    const N: u64 = 300;
    let pg = PgCluster::start(true);
    let standby = pg.standby.clone().expect("a standby");
    let name = "failover";
    pg.psql(&format!("CREATE DATABASE {name}"));
    // Both servers, the primary found by target_session_attrs, as in production.
    let host = |url: &str| {
        url.trim_start_matches("postgres://postgres@")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let url = format!(
        "postgres://postgres@{},{}/{name}?target_session_attrs=read-write",
        host(&pg.primary),
        host(&standby)
    );
    let nodes = [
        Broker::start(on_postgres(&url).set("postgres", "connect_timeout_ms", 2000)),
        Broker::start(on_postgres(&url).set("postgres", "connect_timeout_ms", 2000)),
    ];
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    let publisher = tokio::spawn(publish_all(
        vec![urls[0].clone(), urls[1].clone()],
        "client:bob",
        N,
        Duration::from_millis(5),
    ));
    let receiver = tokio::spawn(receive_all(
        vec![urls[1].clone(), urls[0].clone()],
        "bob",
        N,
    ));
    tokio::time::sleep(Duration::from_millis(800)).await;
    pg.run("kill-primary", &[]);
    pg.run("promote", &[]);
    let confirmed = publisher.await.expect("publisher");
    let got = receiver.await.expect("receiver");
    assert_eq!(confirmed.len() as u64, N);
    check(&confirmed, &got, N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_synchronous_standby_down_a_publish_waits_and_no_ok_is_sent() {
    // Catches an `ok` for a commit only the primary holds.
    if !postgres_available() {
        return;
    }
    let pg = PgCluster::start(true);
    let db = pg.database();
    let broker = Broker::start(on_postgres(&db));
    let (mut alice, _) = broker.client("alice").await;
    alice.publish_ok("p0", "client:bob", json!(0)).await;
    pg.run("stop", &["standby"]);
    alice
        .send(json!({"type": "publish", "ref": "p1", "to": "client:bob", "payload": 1}))
        .await;
    alice.expect_quiet(Duration::from_secs(2)).await;
    pg.run("restart", &["standby"]);
    let ok = alice.recv_skip_pings().await;
    assert_eq!(
        (ok["type"].clone(), ok["ref"].clone()),
        (json!("ok"), json!("p1")),
        "{ok}"
    );
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 2, "{welcome}");
    assert_eq!(bob.recv_msgs(2).await.len(), 2);
}

/// `outboxd ARGS` with the PostgreSQL store at `url`, run in an empty directory.
fn tool(url: &str, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"));
    for (k, _) in std::env::vars() {
        if k.starts_with("OUTBOXD_") {
            cmd.env_remove(&k);
        }
    }
    cmd.args(args)
        .current_dir(dir.path())
        .env("OUTBOXD_STORAGE__BACKEND", "postgres")
        .env("OUTBOXD_POSTGRES__URL", url)
        .output()
        .expect("run outboxd")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_reads_a_postgres_store_with_no_broker_running() {
    // Catches an inspect that only knows data directories.
    if !postgres_available() {
        return;
    }
    let db = postgres().database();
    let mut broker = node(&db);
    let (mut alice, _) = broker.client("alice").await;
    alice.publish_ok("p1", "client:bob", json!("one")).await;
    alice.publish_ok("p2", "client:bob", json!("two")).await;
    alice.close().await;
    broker.sigterm();
    let out = tool(&db, &["inspect", "--json", "clients"]);
    assert!(out.status.success(), "{out:?}");
    let clients: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let bob = clients
        .as_array()
        .and_then(|a| a.iter().find(|c| c["client_id"] == "bob"))
        .unwrap_or_else(|| panic!("no bob in {clients}"));
    assert_eq!(bob["pending"], 2, "{bob}");
    let out = tool(&db, &["inspect", "--json", "outbox", "bob"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"one\"") && text.contains("\"two\""),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_accept_loss_on_postgres_moves_every_outbox_to_a_new_epoch() {
    // Catches a loss the broker cannot see (a lossy failover) going untold: after repair
    // --accept-loss a client's old position must not be taken.
    if !postgres_available() {
        return;
    }
    let db = postgres().database();
    let broker = node(&db);
    let (bob, welcome) = broker.client("bob").await;
    let epoch = welcome["epoch"].as_str().expect("epoch").to_string();
    bob.close().await;
    let out = tool(&db, &["repair", "--accept-loss", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["outboxes"], 1, "{report}");
    let mut bob = Client::connect(&broker.url).await;
    let w = bob.hello("bob", Some((&epoch, 0))).await;
    assert_eq!(w["resumed"], false, "{w}");
    assert_eq!(w["reason"], "epoch_mismatch", "{w}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restored_into_another_cluster_moves_every_outbox_to_a_new_epoch() {
    // Catches positions kept across a restore from a copy, which may have lost what was
    // confirmed after it: the client must be told, not resumed as if nothing happened.
    if !postgres_available() {
        return;
    }
    let first = postgres();
    let db = first.database();
    let mut broker = node(&db);
    let (bob, welcome) = broker.client("bob").await;
    let epoch = welcome["epoch"].as_str().expect("epoch").to_string();
    bob.close().await;
    let (mut alice, _) = broker.client("alice").await;
    alice.publish_ok("p1", "client:bob", json!("kept")).await;
    alice.close().await;
    broker.sigterm();
    // A logical copy into another PostgreSQL cluster.
    let second = PgCluster::start(false);
    second.psql("CREATE DATABASE restored");
    let target = second.url_of(&second.primary, "restored");
    let dump = std::process::Command::new(first.bindir.join("pg_dump"))
        .args(["-d", &db])
        .output()
        .expect("pg_dump");
    assert!(dump.status.success(), "{dump:?}");
    let mut psql = std::process::Command::new(second.bindir.join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &target])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("psql");
    {
        use std::io::Write;
        let mut stdin = psql.stdin.take().expect("stdin");
        stdin.write_all(&dump.stdout).expect("restore");
    }
    assert!(psql.wait().expect("psql").success());
    let restored = node(&target);
    let mut bob = Client::connect(&restored.url).await;
    let w = bob.hello("bob", Some((&epoch, 0))).await;
    assert_eq!(w["reason"], "epoch_mismatch", "{w}");
    assert_eq!(w["pending"], 1, "what the copy holds is still there: {w}");
    assert_eq!(bob.recv_msg().await["payload"], "kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_moves_a_sled_store_to_postgres_and_clients_resume_there() {
    // Catches a move to PostgreSQL that loses messages, positions, epochs, tombstones or
    // subscriptions: the client must resume on PostgreSQL exactly where it was on sled.
    if !postgres_available() {
        return;
    }
    let mut sled = Broker::start(common::Opts::new());
    let (mut bob, welcome) = sled.client("bob").await;
    let epoch = welcome["epoch"].as_str().expect("epoch").to_string();
    assert_eq!(bob.subscribe("s", "news").await["type"], "ok");
    let (mut alice, _) = sled.client("alice").await;
    let mut ids = Vec::new();
    for i in 1..=3 {
        let ok = alice
            .publish_ok(&format!("p{i}"), "client:bob", json!(i))
            .await;
        ids.push(ok["id"].clone());
    }
    // One that expires unacked: a tombstone, told as `missed`.
    let ok = alice
        .request(
            json!({"type": "publish", "ref": "t", "to": "client:bob", "payload": "gone",
                        "ttl_ms": 1}),
        )
        .await;
    assert_eq!(ok["type"], "ok", "{ok}");
    assert_eq!(seq(&bob.recv_msg().await), 1);
    bob.ack(1).await;
    bob.sync().await;
    bob.close().await;
    alice.close().await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    sled.sigterm();

    let db = postgres().database();
    let out = tool(
        &db,
        &[
            "import",
            "--json",
            "--from",
            sled.data_dir().to_str().expect("utf-8 path"),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let done: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(done["messages"], 2, "{done}");
    assert_eq!(done["tombstones"], 1, "{done}");
    assert_eq!(done["subscriptions"], 1, "{done}");
    // A second import into the same database is refused.
    let again = tool(
        &db,
        &[
            "import",
            "--from",
            sled.data_dir().to_str().expect("utf-8 path"),
        ],
    );
    assert!(!again.status.success(), "{again:?}");

    let pg = node(&db);
    let mut bob = Client::connect(&pg.url).await;
    let w = bob.hello("bob", Some((&epoch, 1))).await;
    assert_eq!(w["resumed"], true, "{w}");
    assert_eq!(w["missed"], 1, "{w}");
    assert_eq!(w["pending"], 2, "{w}");
    for (i, want) in [(2u64, json!(2)), (3, json!(3))] {
        let m = bob.recv_msg().await;
        assert_eq!((seq(&m), m["payload"].clone()), (i, want), "{m}");
        assert_eq!(m["id"], ids[i as usize - 1], "{m}");
    }
    bob.ack_upto(3).await;
    // The subscription came along, and seqs go on after the copied ones.
    let (mut carol, _) = pg.client("carol").await;
    let ok = carol.publish_ok("n", "topic:news", json!("hi")).await;
    assert_eq!(ok["recipients"], 1, "{ok}");
    assert_ne!(ok["id"], ids[0], "{ok}");
    let m = bob.recv_msg().await;
    assert_eq!((seq(&m), m["payload"].clone()), (5, json!("hi")), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_loses_its_database_answers_503_and_confirms_nothing_until_it_is_back() {
    // Catches an `ok` the database never committed, and a broker that stays away after the
    // database came back.
    if !postgres_available() {
        return;
    }
    let pg = PgCluster::start(false);
    let db = pg.database();
    let broker = Broker::start(on_postgres(&db).set("postgres", "connect_timeout_ms", 1000));
    let (mut alice, _) = broker.client("alice").await;
    alice.publish_ok("p0", "client:bob", json!(0)).await;
    assert_eq!(broker.admin_get("/readyz").await.status, 200);
    pg.run("stop", &["primary"]);
    let a = alice.publish("p1", "client:bob", json!(1)).await;
    assert_eq!(a["type"], "error", "no ok without the database: {a}");
    assert_eq!(broker.admin_get("/readyz").await.status, 503);
    pg.run("restart", &["primary"]);
    // Back: the same connection publishes again (the node reconnects by itself).
    let mut n = 2;
    loop {
        let a = alice
            .publish(&format!("p{n}"), "client:bob", json!(n))
            .await;
        if a["type"] == "ok" {
            break;
        }
        assert!(n < 100, "the broker never got its database back: {a}");
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(broker.admin_get("/readyz").await.status, 200);
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(
        welcome["pending"], 2,
        "p0 and the last one, nothing refused: {welcome}"
    );
    let got: Vec<Value> = bob
        .recv_msgs(2)
        .await
        .iter()
        .map(|m| m["payload"].clone())
        .collect();
    assert_eq!(got, vec![json!(0), json!(n)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_wait_for_the_standby_latches_the_store_and_sends_no_ok() {
    // Catches the hole PostgreSQL leaves: a cancelled wait for the synchronous standby commits
    // on the primary alone, with only a warning. That commit must not be confirmed, and the
    // broker must refuse further writes.
    if !postgres_available() {
        return;
    }
    let pg = PgCluster::start(true);
    let db = pg.database();
    let broker = Broker::start(on_postgres(&db));
    let (mut alice, _) = broker.client("alice").await;
    alice.publish_ok("p0", "client:bob", json!(0)).await;
    pg.run("stop", &["standby"]);
    alice
        .send(json!({"type": "publish", "ref": "p1", "to": "client:bob", "payload": 1}))
        .await;
    // The writer's COMMIT now waits for the standby; cancel that wait.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let cancelled = pg.psql(
            "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'outboxd' AND wait_event = 'SyncRep'",
        );
        if cancelled == "1" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no commit waited for the standby"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = alice.recv_skip_pings().await;
    assert_eq!(
        (a["type"].clone(), a["ref"].clone()),
        (json!("error"), json!("p1")),
        "{a}"
    );
    assert_eq!(broker.admin_get("/readyz").await.status, 503);
    assert!(broker.stderr_shows(
        "not confirmed by the synchronous standby",
        Duration::from_secs(5)
    ));
    pg.run("restart", &["standby"]);
    let a = alice.publish("p2", "client:bob", json!(2)).await;
    assert_eq!(a["type"], "error", "a latched store refuses writes: {a}");
    // ...but still serves what is committed: a client can connect and read.
    let (mut bob, welcome) = broker.client("bob").await;
    assert!(welcome["pending"].as_u64() >= Some(1), "{welcome}");
    assert_eq!(bob.recv_msg().await["payload"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_or_delete_through_one_broker_closes_the_client_on_another_with_4002() {
    // Catches an operator's purge that leaves the client connected elsewhere in the old epoch
    // (it would never learn what it missed), or that tells it not to reconnect (4000).
    if !postgres_available() {
        return;
    }
    let db = postgres().database();
    let (a, b) = (node(&db), node(&db));
    let (mut bob, welcome) = b.client("bob").await;
    let epoch = welcome["epoch"].as_str().expect("epoch").to_string();
    let (mut alice, _) = a.client("alice").await;
    alice.publish_ok("p1", "client:bob", json!(1)).await;
    alice.publish_ok("p2", "client:bob", json!(2)).await;
    bob.recv_msgs(2).await;
    let r = a.admin_delete("/v1/clients/bob/outbox").await;
    assert_eq!(r.status, 200, "{r:?}");
    bob.expect_close(4002).await;
    let mut bob = Client::connect(&b.url).await;
    let w = bob.hello("bob", Some((&epoch, 0))).await;
    assert_eq!(w["reason"], "epoch_mismatch", "{w}");
    assert_eq!(w["missed"], 2, "{w}");
    let r = a.admin_delete("/v1/clients/bob").await;
    assert_eq!(r.status, 200, "{r:?}");
    bob.expect_close(4002).await;
    assert_eq!(b.admin_get("/v1/clients/bob").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_deleted_through_another_broker_gets_a_new_outbox_here() {
    // Catches a broker that remembers a deleted client's number and writes to (or answers
    // `ok` for) an outbox that no longer exists: a message confirmed into nothing.
    if !postgres_available() {
        return;
    }
    let db = postgres().database();
    let (a, b) = (node(&db), node(&db));
    let (mut alice, _) = a.client("alice").await;
    alice.publish_ok("p1", "client:bob", json!(1)).await;
    let (mut carol, _) = a.client("carol").await;
    assert_eq!(carol.subscribe("s1", "news").await["type"], "ok");
    for id in ["bob", "carol"] {
        let r = b.admin_delete(&format!("/v1/clients/{id}")).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    carol.expect_close(4002).await;
    let ok = alice.publish_ok("p2", "client:bob", json!(2)).await;
    assert_eq!(ok["recipients"], 1, "{ok}");
    let (mut carol, _) = a.client("carol").await;
    assert_eq!(carol.subscribe("s2", "news").await["type"], "ok");
    let ok = alice.publish_ok("p3", "topic:news", json!(3)).await;
    assert_eq!(ok["recipients"], 1, "{ok}");
    assert_eq!(carol.recv_msg().await["payload"], 3);
    let (mut bob, welcome) = b.client("bob").await;
    assert_eq!(welcome["pending"], 1, "{welcome}");
    let m = bob.recv_msg().await;
    assert_eq!((seq(&m), m["payload"].clone()), (1, json!(2)), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_makes_the_schema_once_and_a_broker_then_serves_on_it() {
    // Catches a schema only a broker's start can make (a role that may not create tables),
    // and a migration that fails when run again.
    if !postgres_available() {
        return;
    }
    let pg = postgres();
    let db = pg.database();
    for _ in 0..2 {
        let out = tool(&db, &["migrate", "--json"]);
        assert!(out.status.success(), "{out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(v["schema_version"], 3, "{v}");
    }
    assert_eq!(
        pg.psql_on(&db, "SELECT count(*) FROM outboxd_schema"),
        "3",
        "each migration recorded once"
    );
    let broker = node(&db);
    let (mut alice, _) = broker.client("alice").await;
    alice.publish_ok("p", "client:bob", json!(1)).await;
}
