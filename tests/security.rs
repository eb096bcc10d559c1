//! Who may connect, publish and subscribe, and abuse that cannot hurt others: JWT checks at
//! hello, grants on publish and subscribe, token expiry and refresh, the Origin allow-list, the
//! per-address cap, the publish rate limit, the subscription cap, slowloris sockets, and tokens
//! kept out of the logs.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::{assert_error, Broker, Client, Opts, QUIET};
use outboxd::auth::{mint_hs256, Claims};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const SECRET: &str = "test-secret-test-secret-test-secret!";

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn claims(sub: &str, ttl_s: u64) -> Claims {
    Claims {
        sub: sub.into(),
        exp: now_s() + ttl_s,
        nbf: None,
        publish: None,
        subscribe: None,
    }
}

fn token(c: &Claims) -> String {
    mint_hs256(SECRET, c).expect("mint")
}

fn jwt_opts() -> Opts {
    Opts::new()
        .set("auth", "mode", "jwt")
        .set("auth", "hmac_secret", SECRET)
}

/// Sends a hello with `token` and returns the connection and the first frame.
async fn hello_with(broker: &Broker, id: &str, token: Option<&str>) -> (Client, serde_json::Value) {
    let mut c = Client::connect(&broker.url).await;
    let mut frame = json!({"type": "hello", "client_id": id});
    if let Some(t) = token {
        frame["token"] = json!(t);
    }
    c.send(frame).await;
    let first = c.recv_skip_pings().await;
    (c, first)
}

async fn expect_refused(broker: &Broker, id: &str, token: Option<&str>, why: &str) {
    let (mut c, first) = hello_with(broker, id, token).await;
    assert_error(&first, "unauthorized");
    c.expect_close(1008).await;
    // Nothing was created for the refused client.
    let r = broker.admin_get(&format!("/v1/clients/{id}")).await;
    assert_eq!(
        r.status, 404,
        "{why}: the refused hello created an outbox: {}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_early_foreign_and_wrong_algorithm_tokens_are_refused() {
    // Catches any token check that can be skipped or fooled.
    let broker = Broker::start(jwt_opts());
    let good = token(&claims("alice", 60));
    let (_alice, w) = hello_with(&broker, "alice", Some(&good)).await;
    assert_eq!(w["type"], "welcome", "{w}");

    expect_refused(&broker, "mallory", None, "no token").await;
    let forged = mint_hs256(
        "another-secret-another-secret-12345",
        &claims("mallory", 60),
    )
    .expect("mint");
    expect_refused(&broker, "mallory", Some(&forged), "forged").await;
    let mut expired = claims("mallory", 0);
    expired.exp = now_s() - 10;
    expect_refused(&broker, "mallory", Some(&token(&expired)), "expired").await;
    let mut early = claims("mallory", 600);
    early.nbf = Some(now_s() + 300);
    expect_refused(&broker, "mallory", Some(&token(&early)), "not yet valid").await;
    // alice's valid token presented as bob.
    expect_refused(&broker, "bob", Some(&good), "another client's token").await;
    // alg "none".
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let body = serde_json::to_vec(&claims("mallory", 60)).expect("json");
    let none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(body)
    );
    expect_refused(&broker, "mallory", Some(&none), "alg none").await;
    expect_refused(&broker, "mallory", Some("garbage"), "garbage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_broker_refuses_an_hs256_token_signed_with_its_public_key() {
    // Catches HS/RS key confusion: the public key used as an HMAC secret.
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let broker = Broker::start(Opts::new().set("auth", "mode", "jwt").set(
        "auth",
        "public_key_file",
        fixtures.join("test-rsa.pub.pem").display(),
    ));
    let public = std::fs::read_to_string(fixtures.join("test-rsa.pub.pem")).expect("key");
    let confused = mint_hs256(&public, &claims("mallory", 60)).expect("mint");
    expect_refused(
        &broker,
        "mallory",
        Some(&confused),
        "HS256 with the public key",
    )
    .await;

    let private = std::fs::read(fixtures.join("test-rsa.key.pem")).expect("key");
    let rs = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims("alice", 60),
        &jsonwebtoken::EncodingKey::from_rsa_pem(&private).expect("pem"),
    )
    .expect("sign");
    let (_c, w) = hello_with(&broker, "alice", Some(&rs)).await;
    assert_eq!(w["type"], "welcome", "{w}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_subscribe_outside_the_claims_are_forbidden_and_write_nothing() {
    // Catches grants that are parsed but not enforced.
    let broker = Broker::start(jwt_opts());
    let mut c = claims("alice", 60);
    c.publish = Some(vec!["client:bob".into(), "topic:news/*".into()]);
    c.subscribe = Some(vec!["alerts".into()]);
    let (mut alice, w) = hello_with(&broker, "alice", Some(&token(&c))).await;
    assert_eq!(w["type"], "welcome", "{w}");

    let ok = alice.publish("a", "client:bob", json!(1)).await;
    assert_eq!(ok["type"], "ok", "{ok}");
    let ok = alice.publish("b", "topic:news/eu", json!(2)).await;
    assert_eq!(ok["type"], "ok", "{ok}");
    let no = alice.publish("c", "client:carol", json!(3)).await;
    assert_error(&no, "forbidden");
    assert_eq!(no["ref"], "c");
    let no = alice.publish("d", "topic:sports", json!(4)).await;
    assert_error(&no, "forbidden");
    let no = alice.subscribe("e", "news").await;
    assert_error(&no, "forbidden");
    let ok = alice.subscribe("f", "alerts").await;
    assert_eq!(ok["type"], "ok", "{ok}");

    // carol got nothing; the connection is still usable.
    let r = broker.admin_get("/v1/clients/carol").await;
    assert_eq!(r.status, 404, "{}", r.body);
    let topics = broker.admin_get("/v1/topics").await.json();
    assert_eq!(
        topics,
        json!([{"topic": "alerts", "subscribers": ["alice"]}])
    );
    let ok = alice.publish("g", "client:bob", json!(5)).await;
    assert_eq!(ok["type"], "ok", "{ok}");
}

/// Signs arbitrary claims, for tokens `Claims` cannot express (`"publish": null`).
fn token_json(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("mint")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_claim_of_the_wrong_type_null_included_refuses_the_token() {
    // Catches `"publish": null` read as an absent claim, which allows every target.
    let broker = Broker::start(jwt_opts());
    let exp = now_s() + 60;
    let wrong = [
        ("publish", json!(null)),
        ("subscribe", json!(null)),
        ("publish", json!("client:carol")),
        ("subscribe", json!({"topic": "news"})),
        ("publish", json!(["client:carol", 1])),
        ("nbf", json!(null)),
    ];
    for (claim, value) in &wrong {
        let mut body = json!({"sub": "mallory", "exp": exp});
        body[*claim] = value.clone();
        let why = format!("{claim}: {value}");
        expect_refused(&broker, "mallory", Some(&token_json(body)), &why).await;
    }

    // A refresh carrying such a token is refused and leaves the session's grants as they were.
    let mut c = claims("alice", 60);
    c.publish = Some(vec!["client:bob".into()]);
    c.subscribe = Some(vec!["alerts".into()]);
    let (mut alice, w) = hello_with(&broker, "alice", Some(&token(&c))).await;
    assert_eq!(w["type"], "welcome", "{w}");
    for (n, (claim, value)) in wrong.iter().enumerate() {
        let mut body = json!({"sub": "alice", "exp": exp});
        body[*claim] = value.clone();
        alice
            .send(json!({"type": "refresh", "ref": n, "token": token_json(body)}))
            .await;
        let no = alice.recv_skip_pings().await;
        assert_error(&no, "unauthorized");
        assert_eq!(no["ref"], n, "{claim}: {value}: {no}");
    }
    assert_error(
        &alice.publish("p", "client:carol", json!(1)).await,
        "forbidden",
    );
    assert_error(&alice.subscribe("s", "news").await, "forbidden");
    let ok = alice.publish("q", "client:bob", json!(2)).await;
    assert_eq!(ok["type"], "ok", "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ends_at_token_expiry_unless_refreshed() {
    // Catches a token checked only at hello: a stolen token must not buy a session forever.
    let broker = Broker::start(jwt_opts().set("heartbeat", "interval_ms", 200).set(
        "heartbeat",
        "timeout_ms",
        60000,
    ));
    let (mut short, w) = hello_with(&broker, "alice", Some(&token(&claims("alice", 2)))).await;
    assert_eq!(w["type"], "welcome", "{w}");
    let (mut refreshed, w) = hello_with(&broker, "bob", Some(&token(&claims("bob", 2)))).await;
    assert_eq!(w["type"], "welcome", "{w}");
    // A bad refresh is refused and changes nothing.
    refreshed
        .send(json!({"type": "refresh", "ref": 1, "token": token(&claims("alice", 600))}))
        .await;
    let no = refreshed.recv_skip_pings().await;
    assert_error(&no, "unauthorized");
    refreshed
        .send(json!({"type": "refresh", "ref": 2, "token": token(&claims("bob", 600))}))
        .await;
    let ok = refreshed.recv_skip_pings().await;
    assert_eq!(ok["type"], "ok", "{ok}");
    assert_eq!(ok["ref"], 2);

    let frames = short.expect_close(1008).await;
    assert!(frames.iter().all(|f| f["type"] == "ping"), "{frames:?}");
    // bob outlives his first token's expiry (2 s + 1 s of slack).
    let answered = refreshed.stay_responsive(Duration::from_secs(2)).await;
    assert!(answered > 0);
    let ok = refreshed
        .publish("p", "client:carol", json!("still here"))
        .await;
    assert_eq!(ok["type"], "ok", "{ok}");
}

/// An HTTP upgrade request with the given headers; returns the status line's code.
async fn upgrade_status(addr: SocketAddr, extra: &str) -> u16 {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("an answer")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_not_listed_are_refused_before_the_upgrade() {
    // Catches a broker that lets any web page connect on a user's behalf.
    let broker =
        Broker::start(Opts::new().set("server", "allowed_origins", "https://app.example.com"));
    assert_eq!(
        upgrade_status(broker.addr, "Origin: https://app.example.com\r\n").await,
        101
    );
    assert_eq!(
        upgrade_status(broker.addr, "Origin: https://evil.example.com\r\n").await,
        403
    );
    assert_eq!(
        upgrade_status(broker.addr, "").await,
        101,
        "non-browser clients send no Origin"
    );

    let strict = Broker::start(
        Opts::new()
            .set("server", "allowed_origins", "https://app.example.com")
            .set("server", "require_origin", true),
    );
    assert_eq!(upgrade_status(strict.addr, "").await, 403);
    assert_eq!(
        upgrade_status(strict.addr, "Origin: https://app.example.com\r\n").await,
        101
    );
}

/// A TCP connection from 127.0.0.2, a loopback address other than the well-behaved clients'.
async fn from_other_address(to: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind("127.0.0.2:0".parse().expect("addr"))
        .expect("bind 127.0.0.2");
    sock.connect(to).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_cap_refuses_the_excess_while_others_connect_and_lose_nothing() {
    // Catches one address exhausting the broker's connections.
    let broker = Broker::start(Opts::new().set("server", "max_connections_per_ip", 3));
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(from_other_address(broker.addr).await);
    }
    let mut extra = from_other_address(broker.addr).await;
    extra
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 512];
    let n = extra.read(&mut buf).await.expect("read");
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 429"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );

    // 127.0.0.1 is another address: its clients work as ever.
    let (mut alice, _) = broker.client("alice").await;
    let (mut bob, _) = broker.client("bob").await;
    for i in 0..20 {
        alice
            .publish_ok(&format!("p{i}"), "client:bob", json!(i))
            .await;
    }
    let seqs: Vec<u64> = bob.recv_msgs(20).await.iter().map(common::seq).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    let metrics = broker.admin_get("/metrics").await.body;
    assert!(
        metrics.contains("outboxd_connections_closed_total{reason=\"over_ip_limit\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_rate_limit_refuses_the_excess_with_rate_limited_and_spares_others() {
    // Catches a flooding publisher that can fill outboxes or starve other connections.
    let broker = Broker::start(Opts::new().set("limits", "publish_rate_per_sec", 2).set(
        "limits",
        "publish_burst",
        5,
    ));
    let (mut flood, _) = broker.client("flood").await;
    let mut ok = 0;
    let mut limited = 0;
    for i in 0..20 {
        let r = flood
            .publish(&format!("f{i}"), "client:sink", json!(i))
            .await;
        match r["type"].as_str() {
            Some("ok") => ok += 1,
            _ => {
                assert_error(&r, "rate_limited");
                assert_eq!(r["ref"], format!("f{i}"));
                limited += 1;
            }
        }
    }
    assert!((5..=7).contains(&ok), "{ok} publishes passed a burst of 5");
    assert_eq!(ok + limited, 20);
    let sink = broker.admin_get("/v1/clients/sink").await.json();
    assert_eq!(
        sink["pending"], ok,
        "refused publishes were written: {sink}"
    );
    // Another connection has its own budget.
    let (mut calm, _) = broker.client("calm").await;
    for i in 0..5 {
        calm.publish_ok(&format!("c{i}"), "client:sink", json!(i))
            .await;
    }
    let metrics = broker.admin_get("/metrics").await.body;
    assert!(metrics.contains("code=\"rate_limited\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_beyond_the_cap_are_forbidden() {
    // Catches a client that can grow the subscription table without bound.
    let broker = Broker::start(Opts::new().set("limits", "max_subscriptions", 2));
    let (mut c, _) = broker.client("alice").await;
    assert_eq!(c.subscribe("a", "t1").await["type"], "ok");
    assert_eq!(c.subscribe("b", "t2").await["type"], "ok");
    assert_eq!(
        c.subscribe("again", "t2").await["type"],
        "ok",
        "re-subscribing is free"
    );
    let no = c.subscribe("c", "t3").await;
    assert_error(&no, "forbidden");
    assert_eq!(c.unsubscribe("d", "t1").await["type"], "ok");
    assert_eq!(c.subscribe("e", "t3").await["type"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_slowloris_sockets_do_not_stop_new_clients() {
    // Catches a handshake without a deadline, or one that a slow socket can block.
    let broker = Broker::start(Opts::new().set("server", "hello_timeout_ms", 2000).set(
        "server",
        "max_connections_per_ip",
        2000,
    ));
    let mut slow = Vec::new();
    for _ in 0..1000 {
        let mut s = from_other_address(broker.addr).await;
        // Headers trickled: the first few bytes only.
        s.write_all(b"GET /ws HTTP/1.1\r\nHo").await.expect("write");
        slow.push(s);
    }
    let started = std::time::Instant::now();
    let (mut alice, _) = broker.client("alice").await;
    let (mut bob, _) = broker.client("bob").await;
    alice.publish_ok("p", "client:bob", json!("through")).await;
    assert_eq!(bob.recv_msg().await["payload"], "through");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "new clients waited {:?}",
        started.elapsed()
    );
    // The deadline closes the slow sockets.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let mut closed = 0;
    for s in &mut slow {
        let mut b = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(5), s.read(&mut b)).await
        {
            closed += 1;
        }
    }
    assert_eq!(
        closed, 1000,
        "slow sockets outlived server.hello_timeout_ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_the_logs() {
    // Catches a refusal or a request line logged with the secret in it.
    let broker = Broker::start(jwt_opts().env("RUST_LOG", "debug"));
    let good = token(&claims("alice", 60));
    let (_a, w) = hello_with(&broker, "alice", Some(&good)).await;
    assert_eq!(w["type"], "welcome");
    let wrong = token(&claims("alice", 60)).replace('.', ".x");
    let (_b, first) = hello_with(&broker, "bob", Some(&wrong)).await;
    assert_error(&first, "unauthorized");
    // A token in a query string (some clients put it there) is not logged either.
    let mut q = Client::connect(&format!("{}?token=QUERYSECRET123", broker.url)).await;
    q.send(json!({"type": "hello", "client_id": "carol", "token": good}))
        .await;
    let _ = q.next_event(QUIET).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = broker.stderr();
    assert!(
        log.contains("authentication failed"),
        "the refusal is logged: {log}"
    );
    for secret in [good.as_str(), wrong.as_str(), "QUERYSECRET123", SECRET] {
        assert!(!log.contains(secret), "the log holds a secret: {secret}");
    }
}

#[test]
fn auth_none_beyond_loopback_needs_insecure() {
    // Catches a broker that silently serves unauthenticated clients on a public address.
    let dir = tempfile::tempdir().expect("temp dir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data"])
        .arg(dir.path().join("data"))
        .env("OUTBOXD_SERVER__ADMIN_LISTEN", "")
        .current_dir(dir.path())
        .output()
        .expect("run outboxd");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--insecure") && err.contains("auth.mode"),
        "{err}"
    );
    assert!(
        !dir.path().join("data").exists(),
        "refused start created the data dir"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outboxd_token_mints_a_token_the_broker_accepts_with_its_claims() {
    // Catches a development token command whose tokens the broker refuses or whose claims it
    // ignores.
    let dir = tempfile::tempdir().expect("temp dir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args([
            "token",
            "--client",
            "alice",
            "--ttl",
            "10m",
            "--pub",
            "client:bob",
        ])
        .env("OUTBOXD_AUTH__MODE", "jwt")
        .env("OUTBOXD_AUTH__HMAC_SECRET", SECRET)
        .current_dir(dir.path())
        .output()
        .expect("run outboxd token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let minted = String::from_utf8(out.stdout).expect("utf-8");
    let broker = Broker::start(jwt_opts());
    let (mut alice, w) = hello_with(&broker, "alice", Some(minted.trim())).await;
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(
        alice.publish("a", "client:bob", json!(1)).await["type"],
        "ok"
    );
    assert_error(
        &alice.publish("b", "client:carol", json!(2)).await,
        "forbidden",
    );

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["token", "--client", "alice", "--ttl", "soon"])
        .env("OUTBOXD_AUTH__HMAC_SECRET", SECRET)
        .current_dir(dir.path())
        .output()
        .expect("run outboxd token");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--ttl"));

    // A secret `serve` refuses mints nothing: its tokens would never be accepted.
    let short = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["token", "--client", "alice"])
        .env("OUTBOXD_AUTH__HMAC_SECRET", "too-short")
        .current_dir(dir.path())
        .output()
        .expect("run outboxd token");
    assert_eq!(short.status.code(), Some(2), "{short:?}");
    assert!(short.stdout.is_empty(), "{short:?}");
    assert!(
        String::from_utf8_lossy(&short.stderr).contains("under 32 bytes"),
        "{short:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_renews_its_token_in_time_and_without_a_source_it_stops_at_expiry() {
    // Catches a client with a token source that lets the broker end its session at the
    // token's expiry (it must send `refresh` in time), and one without a source that keeps
    // reconnecting with a token that cannot work.
    use outboxd::client::{Client as RustClient, Event, Incoming, StopReason};
    let broker = Broker::start(jwt_opts().set("heartbeat", "interval_ms", 500));
    let url = broker.url.clone();
    // Tokens live 3 s; the session must outlast several of them.
    let mut bob = RustClient::builder(url.clone(), "bob")
        .token_source(|| Some(token(&claims("bob", 3))))
        .connect()
        .await
        .expect("bob connects");
    let mut carol = RustClient::builder(url, "carol")
        .token(token(&claims("carol", 2)))
        .connect()
        .await
        .expect("carol connects");

    let until = tokio::time::Instant::now() + Duration::from_secs(8);
    let mut bob_events = Vec::new();
    while let Ok(Some(item)) = tokio::time::timeout_at(until, bob.next()).await {
        if let Incoming::Event(e) = item {
            bob_events.push(e);
        }
    }
    let connects = bob_events
        .iter()
        .filter(|e| matches!(e, Event::Connected { .. }))
        .count();
    assert_eq!(connects, 1, "bob kept his one session: {bob_events:?}");
    assert!(
        !bob_events
            .iter()
            .any(|e| matches!(e, Event::Disconnected { .. } | Event::Stopped { .. })),
        "{bob_events:?}"
    );

    // carol's token ran out 6 s ago: the broker ended her session and she stopped for good.
    let mut carol_stop = None;
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_secs(2), carol.next()).await {
        if let Incoming::Event(Event::Stopped { reason }) = item {
            carol_stop = Some(reason);
        }
    }
    assert!(
        matches!(carol_stop, Some(StopReason::Terminated { code: 1008, .. })),
        "{carol_stop:?}"
    );

    // bob's session still works: a message to him arrives on it.
    let (mut alice, w) = hello_with(&broker, "alice", Some(&token(&claims("alice", 600)))).await;
    assert_eq!(w["type"], "welcome", "{w}");
    let ok = alice.publish("p", "client:bob", json!("renewed")).await;
    assert_eq!(ok["type"], "ok", "{ok}");
    match tokio::time::timeout(Duration::from_secs(5), bob.next()).await {
        Ok(Some(Incoming::Delivery(d))) => {
            assert_eq!(d.payload.to_json::<String>().unwrap(), "renewed")
        }
        other => panic!("expected the delivery on bob's session, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outboxd_sub_with_a_token_file_outlives_its_first_token() {
    // Catches --token-file read only at the start: the session would end with the first token.
    use std::process::{Command, Stdio};
    let broker = Broker::start(jwt_opts());
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("token");
    std::fs::write(&file, token(&claims("bob", 3))).expect("write the token");
    let child = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args([
            "sub",
            "--url",
            &broker.url,
            "--client",
            "bob",
            "--no-position",
        ])
        .args(["--count", "1", "-v", "--token-file"])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn outboxd sub");
    // Something else renews the file every second, as a token agent would.
    for _ in 0..7 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        std::fs::write(&file, token(&claims("bob", 3))).expect("renew the token");
    }
    let (mut alice, w) = hello_with(&broker, "alice", Some(&token(&claims("alice", 600)))).await;
    assert_eq!(w["type"], "welcome", "{w}");
    let ok = alice.publish("p", "client:bob", json!("late")).await;
    assert_eq!(ok["type"], "ok", "{ok}");
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .expect("sub exits after its one message")
    .expect("join")
    .expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("late"), "{stdout}");
    assert_eq!(
        stderr.matches("connected as bob").count(),
        1,
        "one session for the whole run: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_with_a_token_publishes_as_the_tokens_subject() {
    // Catches `outboxd pub --token` inventing a `pub-<hex>` id the token was not issued for
    // (the broker refuses it, or a stray client is left behind).
    let broker = Broker::start(jwt_opts());
    let dir = tempfile::tempdir().expect("temp dir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["pub", "--url", &broker.url, "--to", "client:bob", "--token"])
        .arg(token(&claims("alice", 600)))
        .arg("hello")
        .current_dir(dir.path())
        .output()
        .expect("run outboxd pub");
    assert!(out.status.success(), "{out:?}");
    let (mut bob, _) = hello_with(&broker, "bob", Some(&token(&claims("bob", 600)))).await;
    let m = bob.recv_msg().await;
    assert_eq!(
        (m["from"].clone(), m["payload"].clone()),
        (json!("alice"), json!("hello")),
        "{m}"
    );
}
