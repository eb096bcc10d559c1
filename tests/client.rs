//! The Rust client (`outboxd::client`) against the real broker: reconnects through crashes,
//! cut and silent connections, resumes from a saved position, publishes idempotently, and
//! tells the application about losses and resets. In every scenario the application must get
//! each message once, in order.

mod common;

use std::time::{Duration, Instant};

use common::{Broker, Opts, Relay, QUIET};
use outboxd::client::{
    Client, ClientBuilder, ClientError, Event, FilePositionStore, Incoming, MemoryPositionStore,
    PositionStore, RequestError, StopReason,
};
use outboxd::model::ClientId;
use serde_json::json;
use tokio::sync::mpsc;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A broker that pings every 200 ms and gives silent clients 10 s, so the client's watchdog
/// (200 ms + 300 ms grace) always acts first.
fn fast_heartbeat() -> Opts {
    Opts::new()
        .set("heartbeat", "interval_ms", 200)
        .set("heartbeat", "timeout_ms", 10_000)
}

/// Settings that make a test fast: quick backoff, a short grace.
fn builder(url: &str, id: &str) -> ClientBuilder {
    Client::builder(url, id)
        .backoff(ms(20), ms(300))
        .heartbeat_grace(ms(300))
        .handshake_timeout(Duration::from_secs(5))
        .connect_timeout(Some(Duration::from_secs(15)))
}

/// What a consuming client saw, in order.
#[derive(Debug)]
enum Seen {
    Msg { seq: u64, value: u64 },
    Ev(Event),
}

/// Runs `client` in a task that acks every delivery after reporting it.
fn consume(client: Client) -> mpsc::UnboundedReceiver<Seen> {
    consume_acking_after(client, Duration::ZERO)
}

/// Like [`consume`], but each ack comes `delay` after the delivery, from another task, as in
/// an application that processes messages concurrently. So when a connection drops, some
/// messages are handed out but not acked: the broker sends them again, and only the client's
/// dedup keeps them from reaching the application twice.
fn consume_acking_after(mut client: Client, delay: Duration) -> mpsc::UnboundedReceiver<Seen> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(item) = client.next().await {
            match item {
                Incoming::Delivery(d) => {
                    let value = d.payload.to_json::<u64>().unwrap_or(u64::MAX);
                    let _ = tx.send(Seen::Msg { seq: d.seq, value });
                    if delay.is_zero() {
                        d.ack().expect("ack while running");
                    } else {
                        let ack = d.ack_handle();
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = ack.ack();
                        });
                    }
                }
                Incoming::Event(e) => {
                    let _ = tx.send(Seen::Ev(e));
                }
            }
        }
    });
    rx
}

/// Collects message values until `n` arrived; fails after `wait`. Events go to `events`.
async fn values(
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    n: usize,
    wait: Duration,
    events: &mut Vec<Event>,
) -> Vec<u64> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Seen::Msg { value, .. })) => out.push(value),
            Ok(Some(Seen::Ev(e))) => events.push(e),
            Ok(None) => panic!("the client stopped after {out:?}; events {events:?}"),
            Err(_) => panic!(
                "only {} of {n} messages in {wait:?}: {out:?}; events {events:?}",
                out.len()
            ),
        }
    }
    out
}

/// Sessions the client has opened, by its `Connected` events.
fn connects(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::Connected { .. }))
        .count()
}

/// Asserts that no further message arrives within `wait` (events are collected).
async fn no_more_messages(
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    wait: Duration,
    events: &mut Vec<Event>,
) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => return,
            Ok(Some(Seen::Ev(e))) => events.push(e),
            Ok(Some(Seen::Msg { seq, value })) => {
                panic!("message handed to the application again: seq {seq} value {value}")
            }
            Ok(None) => return,
        }
    }
}

/// Waits for an event matching `pred`; fails after `wait`.
async fn wait_event(
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    wait: Duration,
    pred: impl Fn(&Event) -> bool,
) -> Event {
    let deadline = tokio::time::Instant::now() + wait;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Seen::Ev(e))) if pred(&e) => return e,
            Ok(Some(other)) => seen.push(other),
            Ok(None) => panic!("the client stopped; saw {seen:?}"),
            Err(_) => panic!("no such event within {wait:?}; saw {seen:?}"),
        }
    }
}

fn count(n: u64) -> Vec<u64> {
    (1..=n).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_arrives_once_in_order_through_a_broker_sigkill_and_restart() {
    // Catches a client that loses messages confirmed before a crash, replays acked ones after
    // the restart, or gives up on a publish whose answer died with the broker.
    let mut broker = Broker::start(fast_heartbeat());
    let relay = Relay::start(broker.addr).await;
    let bob = builder(&relay.url, "bob")
        .connect()
        .await
        .expect("bob connects");
    let mut rx = consume_acking_after(bob, ms(2000));
    let alice = builder(&relay.url, "alice")
        .connect()
        .await
        .expect("alice connects");

    const N: u64 = 60;
    let publisher = alice.publisher();
    let publishing = tokio::spawn(async move {
        for i in 1..=N {
            publisher
                .publish("client:bob", json!(i))
                .timeout(Duration::from_secs(30))
                .await
                .unwrap_or_else(|e| panic!("publish {i}: {e}"));
            tokio::time::sleep(ms(10)).await;
        }
    });

    let mut events = Vec::new();
    let mut got = values(&mut rx, 20, Duration::from_secs(20), &mut events).await;
    broker.kill9();
    tokio::time::sleep(ms(300)).await;
    broker.restart();
    relay.set_upstream(broker.addr);
    got.extend(
        values(
            &mut rx,
            (N - 20) as usize,
            Duration::from_secs(30),
            &mut events,
        )
        .await,
    );
    publishing.await.expect("every publish was confirmed");
    no_more_messages(&mut rx, QUIET, &mut events).await;

    assert_eq!(
        got,
        count(N),
        "lost, duplicated or reordered; events {events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Disconnected { .. })),
        "the crash went unnoticed: {events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::Reset { .. } | Event::Missed { .. })),
        "a restart on the same data is neither a reset nor a loss: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_stream_lose_nothing_and_hand_nothing_twice() {
    // Catches a client that skips the gap after a reconnect, or hands the application the
    // messages the broker redelivers because their acks died with the connection.
    let broker = Broker::start(fast_heartbeat());
    let relay = Relay::start(broker.addr).await;
    let bob = builder(&relay.url, "bob")
        .connect()
        .await
        .expect("bob connects");
    let mut rx = consume_acking_after(bob, ms(400));
    let alice = builder(&relay.url, "alice")
        .connect()
        .await
        .expect("alice connects");

    const N: u64 = 300;
    let publisher = alice.publisher();
    let publishing = tokio::spawn(async move {
        for batch in 0..N / 25 {
            // 25 publishes in flight at once, so cuts also hit unanswered ones; start() queues
            // each at once, so the outbox order is the order of i.
            let publishes: Vec<_> = (batch * 25 + 1..=batch * 25 + 25)
                .map(|i| {
                    publisher
                        .publish("client:bob", json!(i))
                        .key(format!("p{i}"))
                        .timeout(Duration::from_secs(30))
                        .start()
                })
                .collect();
            for p in publishes {
                p.await.expect("publish confirmed");
            }
        }
    });

    let mut events = Vec::new();
    let mut got = Vec::new();
    for cut in 1..=4 {
        // Messages also arrive while the clients reconnect (below), so on a slow run fewer than
        // 50 may be left for the last cuts.
        let want = 50.min((N as usize).saturating_sub(got.len()));
        got.extend(values(&mut rx, want, Duration::from_secs(20), &mut events).await);
        // Messages of the last connection may still be queued to the application while the
        // clients reconnect: a cut then would hit no connection. Cut only once bob's session
        // is up and alice has connected again too.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while connects(&events) < cut || relay.connections() < 2 * cut as u64 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no reconnect before cut {cut}: {} connections, events {events:?}",
                relay.connections()
            );
            match tokio::time::timeout(ms(50), rx.recv()).await {
                Ok(Some(Seen::Msg { value, .. })) => got.push(value),
                Ok(Some(Seen::Ev(e))) => events.push(e),
                Ok(None) => panic!("the client stopped; events {events:?}"),
                Err(_) => {}
            }
        }
        relay.cut_all();
    }
    let left = (N as usize).saturating_sub(got.len());
    got.extend(values(&mut rx, left, Duration::from_secs(30), &mut events).await);
    publishing.await.expect("publisher");
    no_more_messages(&mut rx, QUIET, &mut events).await;

    assert_eq!(got, count(N), "events {events:?}");
    let disconnects = events
        .iter()
        .filter(|e| matches!(e, Event::Disconnected { .. }))
        .count();
    assert!(
        disconnects >= 4,
        "bob noticed {disconnects} of 4 cuts: {events:?}"
    );
    assert!(
        relay.connections() >= 10,
        "only {} connections",
        relay.connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_broker_is_declared_dead_after_heartbeat_plus_grace_and_the_client_resumes() {
    // Catches a client that waits for ever on a half-open connection (no close, no data), or
    // one that reconnects before the heartbeat interval plus its grace has passed.
    let broker = Broker::start(fast_heartbeat());
    let relay = Relay::start(broker.addr).await;
    let bob = builder(&relay.url, "bob")
        .connect()
        .await
        .expect("bob connects");
    let mut rx = consume(bob);
    let alice = builder(&broker.url, "alice")
        .connect()
        .await
        .expect("alice connects");

    alice
        .publish("client:bob", json!(1))
        .await
        .expect("publish 1");
    let mut events = Vec::new();
    assert_eq!(
        values(&mut rx, 1, Duration::from_secs(10), &mut events).await,
        vec![1]
    );

    relay.go_silent();
    let silent_at = Instant::now();
    // Sent to the dead connection: lost on the way, still in the outbox.
    alice
        .publish("client:bob", json!(2))
        .await
        .expect("publish 2");
    let dead = wait_event(&mut rx, Duration::from_secs(10), |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await;
    let after = silent_at.elapsed();
    // The last frame was heard at most one ping interval (200 ms) before the silence began,
    // so the 500 ms limit runs out at least 300 ms into it.
    assert!(
        after >= ms(300),
        "declared dead {after:?} after the silence began: too early"
    );
    assert!(
        after <= ms(3000),
        "declared dead only {after:?} after the silence began"
    );
    match dead {
        Event::Disconnected { reason } => assert!(reason.contains("nothing heard"), "{reason}"),
        other => panic!("{other:?}"),
    }

    assert_eq!(
        values(&mut rx, 1, Duration::from_secs(10), &mut events).await,
        vec![2]
    );
    alice
        .publish("client:bob", json!(3))
        .await
        .expect("publish 3");
    assert_eq!(
        values(&mut rx, 1, Duration::from_secs(10), &mut events).await,
        vec![3]
    );
    no_more_messages(&mut rx, QUIET, &mut events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_resent_after_the_ack_timeout_is_not_handed_out_again() {
    // Catches a client that passes the broker's ack-timeout resends (same seq) to the
    // application as new messages.
    let broker = Broker::start(Opts::new().set("delivery", "ack_timeout_ms", 150));
    let alice = builder(&broker.url, "alice")
        .connect()
        .await
        .expect("alice");
    let bob = builder(&broker.url, "bob").connect().await.expect("bob");
    let mut rx = consume_acking_after(bob, ms(800));
    alice
        .publish("client:bob", json!(1))
        .await
        .expect("publish");
    let mut events = Vec::new();
    assert_eq!(
        values(&mut rx, 1, Duration::from_secs(10), &mut events).await,
        vec![1]
    );
    // Several resends happen before the ack; then nothing more may come.
    no_more_messages(&mut rx, ms(1500), &mut events).await;
    alice
        .publish("client:bob", json!(2))
        .await
        .expect("publish");
    assert_eq!(
        values(&mut rx, 1, Duration::from_secs(10), &mut events).await,
        vec![2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_whose_ok_was_lost_is_retried_with_the_same_key_and_written_once() {
    // Catches a publisher that gives up on a silent connection, or retries without the key (the
    // recipient would get the message twice).
    let broker = Broker::start(fast_heartbeat());
    let relay = Relay::start(broker.addr).await;
    let alice = builder(&relay.url, "alice")
        .connect()
        .await
        .expect("alice connects");
    let mut bob = common::Client::connect(&broker.url).await;
    bob.hello("bob", None).await;

    // The broker hears alice, but nothing it says reaches her: the write happens, the ok is lost.
    relay.silence_to_client();
    let published = alice
        .publish("client:bob", json!("once"))
        .timeout(Duration::from_secs(15))
        .await
        .expect("confirmed after a reconnect");
    assert!(published.duplicate, "the retry wrote again: {published:?}");
    assert!(published.key.starts_with("auto-"), "{published:?}");
    assert!(relay.connections() >= 2, "no reconnect happened");

    let m = bob.recv_msg().await;
    assert_eq!(m["payload"], "once");
    assert_eq!(m["id"], published.id.as_str());
    bob.expect_quiet(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_client_resumes_from_its_position_file_without_duplicates() {
    // Catches a position store that loses acks made just before a crash: the acks never
    // reached the broker, so without the saved position the new process gets them again.
    let broker = Broker::start(fast_heartbeat());
    let relay = Relay::start(broker.addr).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("positions/bob.json");
    let alice = builder(&broker.url, "alice")
        .connect()
        .await
        .expect("alice connects");
    for i in 1..=3 {
        alice
            .publish("client:bob", json!(i))
            .await
            .expect("publish");
    }

    let mut bob = builder(&relay.url, "bob")
        .position_store(FilePositionStore::new(&path))
        .connect()
        .await
        .expect("bob connects");
    let mut held = Vec::new();
    while held.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(10), bob.next()).await {
            Ok(Some(Incoming::Delivery(d))) => held.push(d),
            Ok(Some(Incoming::Event(_))) => {}
            other => panic!("expected deliveries, got {other:?}"),
        }
    }
    // The link dies; the acks are saved, then written into the void.
    relay.go_silent();
    for d in &held {
        d.ack().expect("ack");
    }
    let store = FilePositionStore::new(&path);
    let bob_id = ClientId::new("bob").expect("id");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let p = store.load(&bob_id).expect("position file readable");
        if p.as_ref().is_some_and(|p| p.last_seq == 3) {
            break;
        }
        assert!(Instant::now() < deadline, "position never saved: {p:?}");
        tokio::time::sleep(ms(20)).await;
    }
    // The process dies.
    drop(held);
    drop(bob);
    relay.cut_all();

    // The broker never heard the acks: all three are still stored.
    let mut peek = common::Client::connect(&broker.url).await;
    let welcome = peek.hello("bob", None).await;
    assert_eq!(welcome["pending"], 3, "{welcome}");
    peek.close().await;

    alice
        .publish("client:bob", json!(4))
        .await
        .expect("publish 4");
    let bob = builder(&broker.url, "bob")
        .position_store(FilePositionStore::new(&path))
        .connect()
        .await
        .expect("bob restarts");
    let mut rx = consume(bob);
    let mut events = Vec::new();
    assert_eq!(
        values(&mut rx, 1, Duration::from_secs(10), &mut events).await,
        vec![4]
    );
    no_more_messages(&mut rx, QUIET, &mut events).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Connected { resumed: true, .. })),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_client_sharing_a_memory_store_resumes_where_the_old_one_stopped() {
    // Catches a close that does not save the final position or send the last acks.
    let broker = Broker::start(Opts::new());
    let store = MemoryPositionStore::new();
    let alice = builder(&broker.url, "alice")
        .connect()
        .await
        .expect("alice");
    for i in 1..=2 {
        alice
            .publish("client:bob", json!(i))
            .await
            .expect("publish");
    }
    let mut bob = builder(&broker.url, "bob")
        .position_store(store.clone())
        .connect()
        .await
        .expect("bob");
    let mut n = 0;
    while n < 2 {
        if let Some(Incoming::Delivery(d)) = bob.next().await {
            d.ack().expect("ack");
            n += 1;
        }
    }
    bob.close().await;
    let saved = store
        .load(&ClientId::new("bob").expect("id"))
        .expect("load");
    assert_eq!(saved.map(|p| p.last_seq), Some(2));

    alice
        .publish("client:bob", json!(3))
        .await
        .expect("publish");
    let bob = builder(&broker.url, "bob")
        .position_store(store)
        .connect()
        .await
        .expect("bob again");
    let mut rx = consume(bob);
    let mut events = Vec::new();
    assert_eq!(
        values(&mut rx, 1, Duration::from_secs(10), &mut events).await,
        vec![3]
    );
    no_more_messages(&mut rx, QUIET, &mut events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_removed_by_retention_are_reported_as_missed() {
    // Catches a client that hides losses from the application.
    let broker = Broker::start(Opts::new().set("limits", "message_ttl_ms", 300));
    let alice = builder(&broker.url, "alice")
        .connect()
        .await
        .expect("alice");
    for i in 1..=3 {
        alice
            .publish("client:bob", json!(i))
            .await
            .expect("publish");
    }
    tokio::time::sleep(ms(900)).await;
    let bob = builder(&broker.url, "bob").connect().await.expect("bob");
    let mut rx = consume(bob);
    let missed = wait_event(&mut rx, Duration::from_secs(5), |e| {
        matches!(e, Event::Missed { .. })
    })
    .await;
    assert!(
        matches!(missed, Event::Missed { count: 3, .. }),
        "{missed:?}"
    );
    alice
        .publish("client:bob", json!(4))
        .await
        .expect("publish");
    let mut events = Vec::new();
    assert_eq!(
        values(&mut rx, 1, Duration::from_secs(10), &mut events).await,
        vec![4]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_broker_loses_its_data_the_client_resets_and_gets_the_new_seq_1() {
    // Catches dedup that survives an epoch change: the new outbox starts at seq 1 again, and a
    // client still comparing with the old epoch's seqs would drop those messages silently.
    let mut broker = Broker::start(fast_heartbeat());
    let relay = Relay::start(broker.addr).await;
    let bob = builder(&relay.url, "bob").connect().await.expect("bob");
    let mut rx = consume(bob);
    let alice = builder(&broker.url, "alice")
        .connect()
        .await
        .expect("alice");
    for i in 1..=3 {
        alice
            .publish("client:bob", json!(i))
            .await
            .expect("publish");
    }
    let mut events = Vec::new();
    assert_eq!(
        values(&mut rx, 3, Duration::from_secs(10), &mut events).await,
        count(3)
    );
    drop(alice);

    broker.kill9();
    std::fs::remove_dir_all(broker.data_dir()).expect("remove the data");
    broker.restart();
    relay.set_upstream(broker.addr);

    let reset = wait_event(&mut rx, Duration::from_secs(15), |e| {
        matches!(e, Event::Reset { .. })
    })
    .await;
    match reset {
        Event::Reset {
            previous, reason, ..
        } => {
            assert_eq!(previous.last_seq, 3);
            assert_eq!(reason, "epoch_mismatch");
        }
        other => panic!("{other:?}"),
    }
    let alice = builder(&broker.url, "alice")
        .connect()
        .await
        .expect("alice again");
    alice
        .publish("client:bob", json!(101))
        .await
        .expect("publish");
    let got = values(&mut rx, 1, Duration::from_secs(10), &mut events).await;
    assert_eq!(got, vec![101], "the new epoch's first message was dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_publish_returns_the_brokers_code_and_is_not_retried() {
    // Catches a publisher that retries a refusal for ever, or reports success for it.
    let broker = Broker::start(Opts::new().set("limits", "max_outbox_messages", 1));
    let alice = builder(&broker.url, "alice")
        .connect()
        .await
        .expect("alice");
    alice
        .publish("client:bob", json!(1))
        .await
        .expect("first fits");
    let e = alice
        .publish("client:bob", json!(2))
        .timeout(Duration::from_secs(5))
        .await
        .expect_err("the outbox is full");
    assert!(
        matches!(&e, RequestError::Refused { code, .. } if code == "outbox_full"),
        "{e}"
    );
    let e = alice
        .publish("queue:x", json!(3))
        .await
        .expect_err("not a target");
    assert!(matches!(e, RequestError::Invalid(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_then_topic_messages_arrive_as_deliveries() {
    // Catches a subscribe that is not confirmed or not durable for the client.
    let broker = Broker::start(Opts::new());
    let bob = builder(&broker.url, "bob").connect().await.expect("bob");
    bob.subscribe("news/eu").await.expect("subscribed");
    let mut bob_rx = consume(bob);
    let alice = builder(&broker.url, "alice")
        .connect()
        .await
        .expect("alice");
    let p = alice
        .publish("topic:news/eu", json!(7))
        .await
        .expect("publish");
    assert_eq!(p.recipients, 1);
    let mut events = Vec::new();
    assert_eq!(
        values(&mut bob_rx, 1, Duration::from_secs(10), &mut events).await,
        vec![7]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_client_stops_instead_of_fighting_for_its_id() {
    // Catches two processes with one client id taking the connection from each other for ever.
    let broker = Broker::start(Opts::new());
    let first = builder(&broker.url, "bob").connect().await.expect("first");
    let mut rx = consume(first);
    let _second = builder(&broker.url, "bob").connect().await.expect("second");
    let stopped = wait_event(&mut rx, Duration::from_secs(10), |e| {
        matches!(e, Event::Stopped { .. })
    })
    .await;
    assert_eq!(
        stopped,
        Event::Stopped {
            reason: StopReason::Replaced
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_gives_up_after_the_connect_timeout_when_nothing_listens() {
    // Catches a connect that hangs for ever, or fails without saying why.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let started = Instant::now();
    let e = builder(&format!("ws://127.0.0.1:{port}/ws"), "bob")
        .connect_timeout(Some(ms(600)))
        .connect()
        .await
        .err()
        .expect("nothing listens");
    assert!(started.elapsed() < Duration::from_secs(5));
    match e {
        ClientError::ConnectTimeout { last, .. } => {
            assert!(last.contains("cannot connect"), "{last}")
        }
        other => panic!("{other}"),
    }
    let e = builder("http://127.0.0.1:1/ws", "bob")
        .connect()
        .await
        .err();
    assert!(matches!(e, Some(ClientError::Url { .. })), "{e:?}");
    let e = builder("ws://127.0.0.1:1/ws", "no spaces")
        .connect()
        .await
        .err();
    assert!(matches!(e, Some(ClientError::ClientId(_))), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_acks_a_delivery_only_after_the_handler_returns_ok() {
    // Catches auto-ack before processing (a handler that fails would lose the message).
    let broker = Broker::start(Opts::new());
    let alice = builder(&broker.url, "alice")
        .connect()
        .await
        .expect("alice");
    for i in 1..=3 {
        alice
            .publish("client:bob", json!(i))
            .await
            .expect("publish");
    }
    let mut bob = builder(&broker.url, "bob").connect().await.expect("bob");
    let mut seen = Vec::new();
    let r = bob
        .run(|item| {
            let value = match &item {
                Incoming::Delivery(d) => d.payload.to_json::<u64>().ok(),
                Incoming::Event(_) => None,
            };
            if let Some(v) = value {
                seen.push(v);
            }
            let len = seen.len();
            async move {
                if len == 3 {
                    Err("cannot process the third")
                } else {
                    Ok(())
                }
            }
        })
        .await;
    assert_eq!(r, Err("cannot process the third"));
    assert_eq!(seen, count(3));
    bob.close().await;

    let mut peek = common::Client::connect(&broker.url).await;
    let welcome = peek.hello("bob", None).await;
    assert_eq!(
        welcome["pending"], 1,
        "only the failed one stays: {welcome}"
    );
    assert_eq!(peek.recv_msg().await["payload"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_publishes_go_out_before_anyone_awaits_them() {
    // Catches a `start()` that only queues the publish at its first poll, which turns a
    // pipeline awaited in order into one publish per round trip.
    let broker = Broker::start(Opts::new());
    let client = outboxd::client::Client::builder(broker.url.clone(), "alice")
        .connect()
        .await
        .expect("connect");
    let pending: Vec<_> = (0..200)
        .map(|i| client.publish("client:bob", serde_json::json!(i)).start())
        .collect();
    // Nobody polls them; they must reach the broker anyway.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let bob = broker.admin_get("/v1/clients/bob").await;
        if bob.status == 200 && bob.json()["pending"] == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "started publishes were not sent: {}",
            bob.body
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for p in pending {
        p.await.expect("confirmed");
    }
}

/// A [`MemoryPositionStore`] that counts its saves.
#[derive(Clone, Default)]
struct CountingStore {
    inner: MemoryPositionStore,
    saves: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl CountingStore {
    fn saves(&self) -> u64 {
        self.saves.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl PositionStore for CountingStore {
    fn load(
        &self,
        client: &ClientId,
    ) -> Result<Option<outboxd::client::Position>, outboxd::client::PositionError> {
        self.inner.load(client)
    }

    fn save(
        &self,
        client: &ClientId,
        position: &outboxd::client::Position,
    ) -> Result<(), outboxd::client::PositionError> {
        self.saves.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.save(client, position)
    }
}

// One thread: the application's acks below all queue before the client's task runs again.
#[tokio::test(flavor = "current_thread")]
async fn a_burst_of_acks_costs_one_position_save() {
    // Catches a client that saves its position (a blocking call, often an fsync) and sends an
    // `ack upto` frame once per acked message instead of once per burst of acks.
    let broker = Broker::start(Opts::new());
    let (mut alice, _) = broker.client("alice").await;
    const N: u64 = 200;
    for i in 1..=N {
        alice
            .publish_ok(&format!("p{i}"), "client:bob", json!(i))
            .await;
    }
    let store = CountingStore::default();
    let mut bob = builder(&broker.url, "bob")
        .position_store(store.clone())
        .connect()
        .await
        .expect("bob");
    let mut held = Vec::new();
    while (held.len() as u64) < N {
        match tokio::time::timeout(Duration::from_secs(10), bob.next()).await {
            Ok(Some(Incoming::Delivery(d))) => held.push(d),
            Ok(Some(Incoming::Event(_))) => {}
            other => panic!("after {} deliveries: {other:?}", held.len()),
        }
    }
    let before = store.saves();
    for d in &held {
        d.ack().expect("ack");
    }
    bob.close().await;
    let saved = store
        .load(&ClientId::new("bob").expect("id"))
        .expect("load")
        .map(|p| p.last_seq);
    assert_eq!(saved, Some(N), "the position covers every ack");
    let saves = store.saves() - before;
    assert!(
        (1..=2).contains(&saves),
        "{N} acks in one burst took {saves} saves"
    );
    // The broker got the acks: nothing is owed any more.
    let (_, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], 0, "{welcome}");
}
