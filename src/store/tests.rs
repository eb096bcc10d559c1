//! The store as its callers use it: publishes, acks, reads and retention against a model,
//! and data dirs written by brokers from before.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::engine::sled_config;
use super::records::delivery;
use super::records::payload_len;
use super::*;
use crate::codec::{self, StoredMessage, StoredPayload};

fn options(dir: &Path) -> StoreOptions {
    StoreOptions {
        backend: crate::config::Backend::Sled,
        postgres: Default::default(),
        data_dir: dir.to_path_buf(),
        durability: Durability::Fsync,
        group_commit_max_delay: Duration::ZERO,
        cache_capacity_bytes: 16 << 20,
        spare_segments: 4,
        delivery_cache_bytes: 64 << 20,
        max_outbox_messages: 0,
        max_outbox_bytes: 0,
        max_subscriptions: 0,
        message_ttl_ms: 0,
        dedup_window_ms: 50,
        faults: Faults::default(),
        metrics: Arc::new(Metrics::default()),
    }
}

fn old_message(seq: u64) -> StoredMessage {
    StoredMessage {
        id: seq,
        ts: 1,
        from: None,
        topic: None,
        payload: StoredPayload::Json(format!("\"old {seq}\"")),
        expires_at: 0,
    }
}

/// A data dir as brokers wrote it before chunks: bob (client 1) with messages 1..=3 stored
/// one per key, and an idempotency key with its own `D` expiry record.
fn write_data_dir_of_one_record_per_message(dir: &Path) {
    let db = sled_config(dir).open().unwrap();
    let clients = db.open_tree("clients").unwrap();
    let outbox = db.open_tree("outbox").unwrap();
    clients.insert("bob", &1u64.to_be_bytes()).unwrap();
    let meta = ClientMeta {
        name: "bob".into(),
        epoch: "e0".into(),
        next_seq: 4,
        acked: 0,
        pending: 3,
        bytes: 3 * payload_len(&old_message(1).payload),
        last_seen: 0,
    };
    outbox
        .insert(keys::meta(1), codec::encode(&meta).unwrap())
        .unwrap();
    for seq in 1..=3 {
        let m = codec::encode(&old_message(seq)).unwrap();
        outbox.insert(keys::seq_key(keys::MSG, 1, seq), m).unwrap();
    }
    let body = keys::dedup_body("", "k-old");
    // A key as stored before fingerprints (record version 2, no `fp`).
    #[derive(serde::Serialize)]
    struct EntryBefore {
        id: u64,
        ts: u64,
        recipients: u64,
    }
    let entry = EntryBefore {
        id: 1,
        ts: 1,
        recipients: 1,
    };
    outbox
        .insert(keys::dedup(&body), codec::encode(&entry).unwrap())
        .unwrap();
    outbox.insert(keys::dedup_expiry(1, &body), &[]).unwrap();
    db.flush().unwrap();
}

/// Asserts that the outbox holds exactly the seqs in `model`, and that they read back.
async fn check(
    store: &Store,
    h: &OutboxHandle,
    model: &std::collections::BTreeSet<u64>,
    pending: u64,
) {
    let want: Vec<u64> = model.iter().copied().collect();
    assert_eq!(pending, want.len() as u64);
    assert_eq!(seqs(store.read(h, 0, 0, 100_000).await.unwrap()), want);
    for s in want.iter().take(3).chain(want.iter().rev().take(3)) {
        let m = store
            .get(h, 0, *s)
            .await
            .unwrap()
            .expect("a stored seq reads back");
        assert_eq!(m.payload, Payload::Json(format!("{s}")));
    }
}

fn seqs(b: ReadBatch) -> Vec<u64> {
    b.items.iter().map(|d| d.seq).collect()
}

fn kinds(store: &Store, kind: u8) -> usize {
    match &store.engine {
        super::Engine::Sled(f) => f.outbox.scan_prefix([kind]).count(),
        super::Engine::Postgres(_) => 0,
    }
}

#[test]
fn a_data_dir_of_one_record_per_message_is_served_acked_and_swept_beside_chunks() {
    let dir = tempfile::tempdir().unwrap();
    write_data_dir_of_one_record_per_message(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (store, writer) = Store::open(options(dir.path())).unwrap();
        let bob = ClientId::new("bob").unwrap();
        let hello = store.hello(bob.clone(), None).await.unwrap();
        assert_eq!((hello.pending, hello.next_seq), (3, 4));
        let h = &hello.handle;
        assert_eq!(seqs(store.read(h, 0, 0, 10).await.unwrap()), vec![1, 2, 3]);
        assert_eq!(
            store.get(h, 0, 2).await.unwrap(),
            Some(delivery(2, old_message(2)))
        );

        // New messages go to one chunk beside the old records; acks reach both kinds.
        let publish = |key: &str| PublishRequest {
            from: None,
            to: Target::Client(bob.clone()),
            payload: Payload::Json(format!("\"{key}\"")),
            key: Some(key.to_owned()),
            ttl_ms: None,
        };
        let mut waits = Vec::new();
        for key in ["n4", "n5", "n6", "n7"] {
            waits.push(store.submit_publish(publish(key)).await.unwrap());
        }
        for w in waits {
            assert!(!w.await.unwrap().unwrap().duplicate);
        }
        assert_eq!(
            seqs(store.read(h, 0, 0, 10).await.unwrap()),
            vec![1, 2, 3, 4, 5, 6, 7]
        );
        for seq in [2, 4, 5, 7] {
            store.ack(h, 0, Ack::Seq(seq)).await.unwrap();
        }
        // A hello settles the client's acks before it answers.
        let again = store.hello(bob.clone(), None).await.unwrap();
        // 1 is still unacked, so the acked watermark stays put.
        assert_eq!((again.pending, again.last_seq), (3, 0));
        let h = &again.handle;
        assert_eq!(seqs(store.read(h, 0, 0, 10).await.unwrap()), vec![1, 3, 6]);
        assert_eq!(
            store.get(h, 0, 6).await.unwrap().map(|m| m.id != "0"),
            Some(true)
        );
        assert_eq!(store.get(h, 0, 5).await.unwrap(), None);
        assert_eq!(store.read(h, 0, 3, 10).await.unwrap().items[0].seq, 6);

        // Retention forgets idempotency keys of both record kinds once the window passes.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            kinds(&store, keys::DEDUP),
            0,
            "every idempotency key expired"
        );
        assert_eq!(kinds(&store, keys::DEDUP_EXPIRY), 0);
        assert_eq!(kinds(&store, keys::DEDUP_LIST), 0);
        assert_eq!(kinds(&store, keys::DEDUP_RUN), 0);
        assert_eq!(kinds(&store, keys::DEDUP_RUN_LIST), 0);

        store.ack(h, 0, Ack::Upto(6)).await.unwrap();
        let last = store.hello(bob, None).await.unwrap();
        // 7 was acked alone before, so nothing is left and the watermark passes it.
        assert_eq!((last.pending, last.last_seq), (0, 7));
        assert!(store
            .read(&last.handle, 0, 0, 10)
            .await
            .unwrap()
            .items
            .is_empty());
        let totals = store.outbox_totals().await.unwrap();
        assert_eq!((totals.pending_messages, totals.pending_bytes), (0, 0));
        // The hello's commit applied the acks: no message record is left behind.
        assert_eq!(kinds(&store, keys::MSG), 0);
        drop(store);
        assert!(!writer.join());
    });
}

#[test]
fn idempotency_keys_in_runs_and_records_answer_retries_until_their_window_passes() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut opts = options(dir.path());
        opts.dedup_window_ms = 300;
        let (store, writer) = Store::open(opts).unwrap();
        let bob = ClientId::new("bob").unwrap();
        let alice = ClientId::new("alice").unwrap();
        let publish = |key: &str| PublishRequest {
            from: Some(alice.clone()),
            to: Target::Client(bob.clone()),
            payload: Payload::Json(format!("\"{key}\"")),
            key: Some(key.to_owned()),
            ttl_ms: None,
        };
        let send_all = |keys: Vec<String>| {
            let store = &store;
            let publish = &publish;
            async move {
                let mut waits = Vec::new();
                for k in &keys {
                    waits.push(store.submit_publish(publish(k)).await.unwrap());
                }
                let mut out = Vec::new();
                for w in waits {
                    out.push(w.await.unwrap().unwrap());
                }
                out
            }
        };
        // Numbered keys, queued together: runs, not a record per key.
        let numbered: Vec<String> = (10..60).map(|i| format!("k{i}")).collect();
        let first = send_all(numbered.clone()).await;
        assert!(first.iter().all(|o| !o.duplicate));
        assert!(kinds(&store, keys::DEDUP_RUN) >= 1);
        assert!(
            kinds(&store, keys::DEDUP_RUN) < 50,
            "numbered keys share records"
        );
        assert_eq!(kinds(&store, keys::DEDUP), 0);
        // Keys inside a run's range that it does not hold get records of their own.
        let super::Engine::Sled(files) = &store.engine else {
            unreachable!("a sled store")
        };
        let between: Vec<String> = files
            .outbox
            .scan_prefix([keys::DEDUP_RUN])
            .map(|r| {
                let (k, v) = r.unwrap();
                let run = super::dedup::run(&k, &v, &*files.bodies).unwrap();
                (k, run)
            })
            .filter(|(_, run)| run.entries.len() >= 2)
            .map(|(_, run)| format!("{}a", String::from_utf8(run.first).unwrap()))
            .collect();
        assert!(!between.is_empty(), "some run holds several keys");
        let inside = send_all(between.clone()).await;
        assert!(inside.iter().all(|o| !o.duplicate));
        assert_eq!(kinds(&store, keys::DEDUP), between.len());
        // Every retry, from a run or a record, is answered with the first publish's id.
        let mut retry = numbered.clone();
        retry.extend(between.iter().cloned());
        let again = send_all(retry).await;
        let mut was = first.clone();
        was.extend(inside);
        for (a, b) in again.iter().zip(&was) {
            assert!(a.duplicate, "retry of {} was not a duplicate", b.id);
            assert_eq!((&a.id, a.recipients), (&b.id, 1));
        }
        let w = store.hello(bob.clone(), None).await.unwrap();
        assert_eq!(
            w.pending,
            (numbered.len() + between.len()) as u64,
            "nothing was written twice"
        );

        // Once the window has passed, retention forgets them all and a key is new again.
        tokio::time::sleep(Duration::from_millis(800)).await;
        for kind in [
            keys::DEDUP,
            keys::DEDUP_LIST,
            keys::DEDUP_RUN,
            keys::DEDUP_RUN_LIST,
        ] {
            assert_eq!(kinds(&store, kind), 0, "kind {}", kind as char);
        }
        let late = send_all(vec!["k20".into()]).await;
        assert!(!late[0].duplicate);
        assert_ne!(late[0].id, first[10].id);
        drop(store);
        assert!(!writer.join());
    });
}

#[derive(Debug, Clone)]
enum Op {
    /// Publishes this many messages to bob at once (they share commit groups and records).
    Publish(usize),
    /// Acks one seq / everything up to a seq, picked among those published so far.
    AckSeq(usize),
    AckUpto(usize),
    /// A hello (which settles bob's acks), then a comparison with the model.
    Check,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        (1usize..150).prop_map(Op::Publish),
        any::<usize>().prop_map(Op::AckSeq),
        any::<usize>().prop_map(Op::AckUpto),
        Just(Op::Check),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// The store against a model (a set of seqs): whatever the order of per-seq and
    /// cumulative acks, and however the messages fall into records, what is stored,
    /// counted and read back is exactly what was published and not acked.
    #[test]
    fn stored_messages_are_exactly_those_published_and_not_acked(
        ops in proptest::collection::vec(op(), 1..30)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (store, writer) = Store::open(options(dir.path())).unwrap();
            let bob = ClientId::new("bob").unwrap();
            let mut h = store.hello(bob.clone(), None).await.unwrap().handle;
            let mut model = std::collections::BTreeSet::new();
            let mut next = 1u64;
            for op in ops {
                match op {
                    Op::Publish(n) => {
                        let mut waits = Vec::new();
                        for _ in 0..n {
                            let req = PublishRequest {
                                from: None,
                                to: Target::Client(bob.clone()),
                                payload: Payload::Json(format!("{next}")),
                                key: None,
                                ttl_ms: None,
                            };
                            model.insert(next);
                            next += 1;
                            waits.push(store.submit_publish(req).await.unwrap());
                        }
                        for w in waits {
                            w.await.unwrap().unwrap();
                        }
                    }
                    Op::AckSeq(i) if next > 1 => {
                        let s = 1 + (i as u64) % (next - 1);
                        model.remove(&s);
                        store.ack(&h, 0, Ack::Seq(s)).await.unwrap();
                    }
                    Op::AckUpto(i) if next > 1 => {
                        let u = 1 + (i as u64) % (next - 1);
                        model.retain(|s| *s > u);
                        store.ack(&h, 0, Ack::Upto(u)).await.unwrap();
                    }
                    Op::AckSeq(_) | Op::AckUpto(_) => {}
                    Op::Check => {
                        let w = store.hello(bob.clone(), None).await.unwrap();
                        h = w.handle;
                        check(&store, &h, &model, w.pending).await;
                    }
                }
            }
            let w = store.hello(bob.clone(), None).await.unwrap();
            check(&store, &w.handle, &model, w.pending).await;
            assert_eq!(kinds(&store, keys::JOURNAL), 0, "no journal record outlives its commit");
            drop(store);
            assert!(!writer.join());
        });
    }
}
