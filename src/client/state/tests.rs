use super::*;
use serde_json::json;

fn machine(position: Option<(&str, u64)>) -> Machine {
    Machine::new(
        ClientId::new("bob").unwrap(),
        None,
        position.map(|(e, s)| Position {
            epoch: Epoch::new(e),
            last_seq: s,
        }),
    )
}

fn welcome(epoch: &str, resumed: bool, last_seq: u64) -> Value {
    json!({"type":"welcome","client_id":"bob","epoch":epoch,"resumed":resumed,
           "last_seq":last_seq,"next_seq":last_seq + 1,"pending":0,"missed":0,
           "heartbeat_ms":1000,"max_inflight":2})
}

fn msg(seq: u64) -> String {
    json!({"type":"msg","seq":seq,"id":format!("m{seq}"),"ts":1,"payload":seq}).to_string()
}

fn feed(m: &mut Machine, frame: &Value) {
    m.on_text(&frame.to_string()).unwrap();
}

fn drain(m: &mut Machine) -> Vec<Action> {
    std::iter::from_fn(|| m.poll()).collect()
}

fn connect(m: &mut Machine, w: Value) -> Vec<Action> {
    m.hello();
    feed(m, &w);
    drain(m)
}

fn sends(actions: &[Action]) -> Vec<Value> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(t) => Some(serde_json::from_str(t.as_str()).unwrap()),
            _ => None,
        })
        .collect()
}

fn delivered(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver(m, _) => Some(m.seq),
            _ => None,
        })
        .collect()
}

fn events(actions: &[Action]) -> Vec<Event> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Event(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

fn saves(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Save(p) => Some(p.last_seq),
            _ => None,
        })
        .collect()
}

fn receive(m: &mut Machine, seqs: &[u64]) -> Vec<Action> {
    for s in seqs {
        m.on_text(&msg(*s)).unwrap();
    }
    drain(m)
}

fn ack(m: &mut Machine, seq: u64) -> Vec<Action> {
    let e = m.epoch.clone().unwrap();
    let g = m.generation;
    m.ack(&e, g, seq);
    drain(m)
}

#[test]
fn hello_resumes_from_the_saved_position_and_carries_the_token() {
    let mut m = Machine::new(
        ClientId::new("bob").unwrap(),
        Some("t0k".into()),
        Some(Position {
            epoch: Epoch::new("E"),
            last_seq: 41,
        }),
    );
    let hello: Value = serde_json::from_str(&m.hello()).unwrap();
    assert_eq!(
        hello,
        json!({"type":"hello","client_id":"bob","token":"t0k","resume":{"epoch":"E","last_seq":41}})
    );
    let mut fresh = machine(None);
    let hello: Value = serde_json::from_str(&fresh.hello()).unwrap();
    assert_eq!(hello, json!({"type":"hello","client_id":"bob"}));
}

#[test]
fn first_welcome_adopts_the_brokers_watermark_and_saves_the_epoch() {
    let mut m = machine(None);
    let a = connect(&mut m, welcome("E", false, 4));
    assert_eq!(saves(&a), vec![4]);
    assert!(matches!(
        events(&a)[..],
        [Event::Connected { resumed: false, .. }]
    ));
    assert_eq!(delivered(&receive(&mut m, &[5, 6])), vec![5, 6]);
}

#[test]
fn duplicate_of_a_held_message_is_dropped_and_of_an_acked_one_is_acked_again() {
    let mut m = machine(Some(("E", 0)));
    connect(&mut m, welcome("E", true, 0));
    assert_eq!(delivered(&receive(&mut m, &[1, 2])), vec![1, 2]);
    ack(&mut m, 1);
    // Both come again (an ack-timeout resend, or a reconnect).
    let a = receive(&mut m, &[1, 2]);
    assert!(delivered(&a).is_empty(), "handed twice: {a:?}");
    assert_eq!(sends(&a), vec![json!({"type":"ack","seq":1})]);
}

#[test]
fn reconnect_resumes_from_the_acked_prefix_and_hands_nothing_twice() {
    let mut m = machine(None);
    connect(&mut m, welcome("E", false, 0));
    receive(&mut m, &[1, 2, 3]);
    ack(&mut m, 1);
    ack(&mut m, 3); // 2 is still being processed
    m.on_lost();
    let hello: Value = serde_json::from_str(&m.hello()).unwrap();
    assert_eq!(hello["resume"], json!({"epoch":"E","last_seq":1}));
    feed(&mut m, &welcome("E", true, 1));
    drain(&mut m);
    let a = receive(&mut m, &[2, 3, 4]);
    assert_eq!(delivered(&a), vec![4]);
    // 3 was acked on the old connection, which may not have got there.
    assert_eq!(sends(&a), vec![json!({"type":"ack","seq":3})]);
    // The late ack of 2 goes out on the new connection and covers 3.
    let a = ack(&mut m, 2);
    assert_eq!(saves(&a), vec![3]);
    assert_eq!(sends(&a), vec![json!({"type":"ack","upto":3})]);
}

#[test]
fn an_ack_upto_goes_out_only_after_the_save_that_covers_it() {
    let mut m = machine(None);
    connect(&mut m, welcome("E", false, 0));
    receive(&mut m, &[1, 2]);
    let e = m.epoch.clone().unwrap();
    m.ack(&e, m.generation, 1);
    m.ack(&e, m.generation, 2);
    match (m.poll(), m.poll(), m.poll()) {
        (Some(Action::Save(p)), Some(Action::Send(s)), None) => {
            assert_eq!(p.last_seq, 2, "one save covers both acks");
            assert_eq!(s, r#"{"type":"ack","upto":2}"#);
        }
        other => panic!("expected save then ack, got {other:?}"),
    }
}

#[test]
fn out_of_order_ack_is_sent_at_once_but_does_not_move_the_position() {
    let mut m = machine(None);
    connect(&mut m, welcome("E", false, 0));
    receive(&mut m, &[1, 2]);
    let a = ack(&mut m, 2);
    assert!(saves(&a).is_empty());
    assert_eq!(sends(&a), vec![json!({"type":"ack","seq":2})]);
    assert_eq!(m.position().unwrap().last_seq, 0);
    assert_eq!(saves(&ack(&mut m, 1)), vec![2]);
}

#[test]
fn not_resumed_welcome_resets_dedup_so_the_new_epochs_seq_1_is_delivered() {
    let mut m = machine(Some(("OLD", 7)));
    m.hello();
    feed(
        &mut m,
        &json!({"type":"welcome","client_id":"bob","epoch":"NEW","resumed":false,
                "reason":"epoch_mismatch","last_seq":0,"next_seq":3,"pending":2,"missed":0,
                "heartbeat_ms":1000,"max_inflight":8}),
    );
    let a = drain(&mut m);
    assert!(
        events(&a)
            .iter()
            .any(|e| matches!(e, Event::Reset { previous, epoch, reason }
            if previous.last_seq == 7 && epoch.as_str() == "NEW" && reason == "epoch_mismatch")),
        "{a:?}"
    );
    assert_eq!(m.position().unwrap().epoch.as_str(), "NEW");
    assert_eq!(delivered(&receive(&mut m, &[1, 2])), vec![1, 2]);
}

#[test]
fn ack_of_a_delivery_from_before_a_reset_is_ignored() {
    let mut m = machine(None);
    connect(&mut m, welcome("E", false, 0));
    receive(&mut m, &[1]);
    let (old_epoch, old_gen) = (m.epoch.clone().unwrap(), m.generation);
    m.on_lost();
    m.hello();
    // Same epoch string, but the position was refused ("ahead"): a new generation.
    feed(
        &mut m,
        &json!({"type":"welcome","client_id":"bob","epoch":"E","resumed":false,"reason":"ahead",
                "last_seq":0,"next_seq":1,"pending":0,"missed":0,"heartbeat_ms":1000,"max_inflight":8}),
    );
    drain(&mut m);
    receive(&mut m, &[1]);
    m.ack(&old_epoch, old_gen, 1);
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.outstanding.len(), 1, "the new seq 1 is still unacked");
}

#[test]
fn acks_made_while_the_hello_was_in_flight_are_stated_after_the_welcome() {
    let mut m = machine(None);
    connect(&mut m, welcome("E", false, 0));
    receive(&mut m, &[1, 2]);
    m.on_lost();
    m.hello(); // resumes from 0
    ack(&mut m, 1);
    ack(&mut m, 2);
    feed(&mut m, &welcome("E", true, 0));
    let a = drain(&mut m);
    assert!(sends(&a).contains(&json!({"type":"ack","upto":2})), "{a:?}");
}

fn publish(m: &mut Machine, id: u64, key: &str) {
    m.request(
        id,
        RequestKind::Publish {
            to: Target::parse("client:alice").unwrap(),
            payload: Payload::from(json!({"n": id})),
            key: key.into(),
            ttl_ms: None,
        },
    );
}

#[test]
fn a_jwt_expiry_is_read_and_anything_else_has_none() {
    use base64::Engine;
    let b64 = |j: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(j);
    let jwt = |claims: &str| format!("{}.{}.sig", b64(r#"{"alg":"HS256"}"#), b64(claims));
    assert_eq!(
        token_expiry(&jwt(r#"{"sub":"bob","exp":1700000000}"#)),
        Some(1_700_000_000)
    );
    assert_eq!(
        token_expiry(&jwt(r#"{"exp":1700000000.5}"#)),
        Some(1_700_000_000)
    );
    assert_eq!(token_expiry(&jwt(r#"{"sub":"bob"}"#)), None);
    assert_eq!(token_expiry(&jwt(r#"{"exp":"soon"}"#)), None);
    assert_eq!(token_expiry("opaque-api-key"), None);
    assert_eq!(token_expiry("a.!!!.c"), None);
    assert_eq!(
        token_subject(&jwt(r#"{"sub":"bob","exp":1}"#)).as_deref(),
        Some("bob")
    );
    assert_eq!(token_subject(&jwt(r#"{"exp":1}"#)), None);
    assert_eq!(token_subject("opaque-api-key"), None);
}

#[test]
fn a_new_token_goes_out_as_refresh_while_up_and_in_the_next_hello_always() {
    let mut m = machine(None);
    assert_eq!(
        m.renew_token("t1".into()),
        None,
        "no session: nothing to send"
    );
    let hello: Value = serde_json::from_str(&m.hello()).unwrap();
    assert_eq!(hello["token"], "t1");
    feed(&mut m, &welcome("E", false, 0));
    let frame = m.renew_token("t\"2".into()).expect("a refresh while up");
    let frame: Value = serde_json::from_str(&frame).unwrap();
    assert_eq!(frame, json!({"type": "refresh", "token": "t\"2"}));
    assert_eq!(m.token(), Some("t\"2"));
    m.on_lost();
    let hello: Value = serde_json::from_str(&m.hello()).unwrap();
    assert_eq!(hello["token"], "t\"2");
}

#[test]
fn an_expired_token_ends_the_client_unless_new_tokens_come() {
    let mut fixed = machine(None);
    let _ = connect(&mut fixed, welcome("E", false, 0));
    assert!(matches!(
        fixed.on_close(Some(1008), "token expired: send a refresh frame"),
        Ended::Stop(StopReason::Terminated { code: 1008, .. })
    ));
    let mut renewable = machine(None).with_renewable_token();
    let _ = connect(&mut renewable, welcome("E", false, 0));
    assert!(matches!(
        renewable.on_close(Some(1008), "token expired: send a refresh frame"),
        Ended::Reconnect(_)
    ));
    // Other policy closes still end it.
    let _ = connect(&mut renewable, welcome("E", true, 0));
    assert!(matches!(
        renewable.on_close(Some(1008), "origin not allowed"),
        Ended::Stop(StopReason::Terminated { code: 1008, .. })
    ));
}

#[test]
fn unanswered_publish_is_sent_again_with_the_same_key_after_a_reconnect() {
    let mut m = machine(None);
    publish(&mut m, 1, "k1");
    assert!(
        drain(&mut m).is_empty(),
        "nothing is sent before the welcome"
    );
    let first = sends(&connect(&mut m, welcome("E", false, 0)));
    assert_eq!(
        first,
        vec![json!({"type":"publish","ref":1,"to":"client:alice","key":"k1","payload":{"n":1}})]
    );
    m.on_lost();
    let again = sends(&connect(&mut m, welcome("E", true, 0)));
    assert_eq!(again, first);
    feed(
        &mut m,
        &json!({"type":"ok","ref":1,"id":"9","recipients":1,"duplicate":true}),
    );
    match &drain(&mut m)[..] {
        [Action::Complete(1, Ok(Reply::Published(p)))] => {
            assert!(p.duplicate);
            assert_eq!(p.key, "k1");
        }
        other => panic!("{other:?}"),
    }
    m.on_lost();
    assert!(sends(&connect(&mut m, welcome("E", true, 0))).is_empty());
}

#[test]
fn no_more_than_max_inflight_requests_wait_for_an_answer() {
    let mut m = machine(None);
    for id in 1..=5 {
        publish(&mut m, id, &format!("k{id}"));
    }
    let refs = |a: &[Action]| {
        sends(a)
            .iter()
            .map(|f| f["ref"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(refs(&connect(&mut m, welcome("E", false, 0))), vec![1, 2]);
    feed(
        &mut m,
        &json!({"type":"ok","ref":2,"id":"a","recipients":1}),
    );
    assert_eq!(refs(&drain(&mut m)), vec![3]);
    feed(
        &mut m,
        &json!({"type":"error","ref":1,"code":"outbox_full","message":"full"}),
    );
    let a = drain(&mut m);
    assert!(a.iter().any(|x| matches!(x, Action::Complete(1, Err(RequestError::Refused { code, .. })) if code == "outbox_full")));
    assert_eq!(refs(&a), vec![4]);
}

#[test]
fn cancelled_requests_are_never_sent_again() {
    let mut m = machine(None);
    publish(&mut m, 1, "k1");
    publish(&mut m, 2, "k2");
    m.cancel(1);
    let a = connect(&mut m, welcome("E", false, 0));
    assert_eq!(sends(&a).len(), 1);
    m.cancel(2); // sent already: forgotten once answered or lost
    m.on_lost();
    assert!(sends(&connect(&mut m, welcome("E", true, 0))).is_empty());
    assert!(m.requests.is_empty());
}

#[test]
fn sends_queued_for_a_lost_connection_never_reach_the_next_one() {
    let mut m = machine(None);
    connect(&mut m, welcome("E", false, 0));
    feed(&mut m, &json!({"type":"ping"}));
    m.on_lost();
    let hello = m.hello();
    assert!(hello.contains("hello"));
    assert!(drain(&mut m).is_empty());
}

#[test]
fn ping_is_answered_with_pong() {
    let mut m = machine(None);
    connect(&mut m, welcome("E", false, 0));
    feed(&mut m, &json!({"type":"ping"}));
    assert_eq!(sends(&drain(&mut m)), vec![json!({"type":"pong"})]);
}

#[test]
fn close_codes_decide_between_reconnecting_and_stopping() {
    let mut m = machine(None);
    assert_eq!(
        m.on_close(Some(4000), ""),
        Ended::Stop(StopReason::Replaced)
    );
    assert!(matches!(
        m.on_close(Some(1008), "no"),
        Ended::Stop(StopReason::Terminated { code: 1008, .. })
    ));
    for code in [1000, 1001, 1011, 4001, 4002, 4008, 4029] {
        assert!(
            matches!(m.on_close(Some(code), ""), Ended::Reconnect(_)),
            "{code}"
        );
    }
    assert!(matches!(m.on_close(None, ""), Ended::Reconnect(_)));
}

#[test]
fn hello_refusal_for_a_bad_client_id_stops_and_internal_retries() {
    let mut m = machine(None);
    m.hello();
    let e = m.on_text(r#"{"type":"error","code":"bad_client_id","message":"no"}"#);
    assert!(
        matches!(e, Err(Ended::Stop(StopReason::Refused { .. }))),
        "{e:?}"
    );
    m.on_lost();
    m.hello();
    let e = m.on_text(r#"{"type":"error","code":"internal","message":"disk"}"#);
    assert!(matches!(e, Err(Ended::Reconnect(_))), "{e:?}");
}

#[test]
fn close_1009_fails_the_largest_unanswered_request_and_retries_the_rest() {
    let mut m = machine(None);
    publish(&mut m, 1, "small");
    m.request(
        2,
        RequestKind::Publish {
            to: Target::parse("client:alice").unwrap(),
            payload: Payload::from("x".repeat(500)),
            key: "big".into(),
            ttl_ms: None,
        },
    );
    connect(&mut m, welcome("E", false, 0));
    assert!(matches!(m.on_close(Some(1009), ""), Ended::Reconnect(_)));
    let a = drain(&mut m);
    assert!(
        matches!(&a[..], [Action::Complete(2, Err(RequestError::Refused { code, .. }))] if code == "frame_too_large"),
        "{a:?}"
    );
    let again = sends(&connect(&mut m, welcome("E", true, 0)));
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["key"], "small");
}

#[test]
fn stop_fails_every_waiting_request() {
    let mut m = machine(None);
    publish(&mut m, 1, "k");
    m.stop(&StopReason::Closed);
    assert!(matches!(
        &drain(&mut m)[..],
        [Action::Complete(
            1,
            Err(RequestError::Stopped(StopReason::Closed))
        )]
    ));
}

fn missed_counts(a: &[Action]) -> Vec<u64> {
    events(a)
        .into_iter()
        .filter_map(|e| match e {
            Event::Missed { count, .. } => Some(count),
            _ => None,
        })
        .collect()
}

fn welcome_missed(epoch: &str, last_seq: u64, missed: u64) -> Value {
    let mut w = welcome(epoch, true, last_seq);
    w["missed"] = json!(missed);
    w
}

#[test]
fn missed_from_a_welcome_is_reported_once_across_reconnects() {
    let mut m = machine(Some(("E", 2)));
    assert_eq!(
        missed_counts(&connect(&mut m, welcome_missed("E", 2, 3))),
        vec![3]
    );
    m.on_lost();
    assert!(missed_counts(&connect(&mut m, welcome_missed("E", 2, 3))).is_empty());
    m.on_lost();
    // One more expired meanwhile.
    assert_eq!(
        missed_counts(&connect(&mut m, welcome_missed("E", 2, 4))),
        vec![1]
    );
}

#[test]
fn a_gap_in_seqs_is_reported_as_missed_and_not_again_by_the_next_welcome() {
    let mut m = machine(Some(("E", 0)));
    connect(&mut m, welcome("E", true, 0));
    let a = receive(&mut m, &[1, 4]);
    assert_eq!(delivered(&a), vec![1, 4]);
    assert_eq!(missed_counts(&a), vec![2]);
    m.on_lost();
    // The broker still has tombstones for 2 and 3 (our position is 0).
    assert!(missed_counts(&connect(&mut m, welcome_missed("E", 0, 2))).is_empty());
    // Redeliveries of what we hold make no gap.
    assert!(missed_counts(&receive(&mut m, &[1, 4])).is_empty());
}

#[test]
fn losses_a_welcome_reported_are_not_reported_again_when_the_gap_shows() {
    let mut m = machine(Some(("E", 1)));
    assert_eq!(
        missed_counts(&connect(&mut m, welcome_missed("E", 1, 2))),
        vec![2]
    );
    let a = receive(&mut m, &[4, 5]);
    assert_eq!(delivered(&a), vec![4, 5]);
    assert!(missed_counts(&a).is_empty(), "{a:?}");
    // A later removal while connected is news.
    assert_eq!(missed_counts(&receive(&mut m, &[7])), vec![1]);
}

#[test]
fn ack_timeout_resends_below_the_highest_seq_are_not_gaps() {
    let mut m = machine(None);
    connect(&mut m, welcome("E", false, 0));
    let a = receive(&mut m, &[1, 2, 3, 1, 2, 4]);
    assert_eq!(delivered(&a), vec![1, 2, 3, 4]);
    assert!(missed_counts(&a).is_empty());
}

#[test]
fn a_frame_out_of_turn_is_refused_for_that_before_its_missing_fields() {
    let mut m = machine(None);
    m.hello();
    assert_eq!(
        m.on_text(r#"{"type":"msg"}"#),
        Err(Ended::Reconnect("msg before welcome".into()))
    );
    m.on_lost();
    connect(&mut m, welcome("E", false, 0));
    assert_eq!(
        m.on_text(r#"{"type":"welcome"}"#),
        Err(Ended::Reconnect("welcome out of turn".into()))
    );
}

#[test]
fn a_duplicate_is_acked_again_without_reading_its_body() {
    let mut m = machine(None);
    connect(&mut m, welcome("E", false, 0));
    receive(&mut m, &[1]);
    ack(&mut m, 1);
    m.on_text(r#"{"type":"msg","seq":1,"payload_b64":"!!"}"#)
        .unwrap();
    assert_eq!(sends(&drain(&mut m)), vec![json!({"type":"ack","seq":1})]);
    assert!(matches!(
        m.on_text(r#"{"type":"msg","seq":2,"payload_b64":"!!"}"#),
        Err(Ended::Reconnect(_))
    ));
}

#[test]
fn msg_before_welcome_and_garbage_end_the_connection() {
    let mut m = machine(None);
    m.hello();
    assert!(matches!(m.on_text(&msg(1)), Err(Ended::Reconnect(_))));
    assert!(matches!(m.on_text("nope"), Err(Ended::Reconnect(_))));
    // Unknown frame types from a newer broker are ignored.
    assert!(m.on_text(r#"{"type":"news"}"#).is_ok());
}
