//! The per-connection delivery state machines, free of I/O and clocks: the caller passes `now`.
//!
//! [`Window`] decides what may be sent (never more than `max_inflight` unacked), what an ack
//! releases, and what is due again after the ack timeout. [`Liveness`] decides when to ping and
//! when a silent peer is dead. The connection task only executes their decisions, so every
//! rule here is unit-tested without sockets or sleeping.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::model::Ack;

/// The in-flight window of one connection.
#[derive(Debug)]
pub struct Window {
    max: usize,
    /// Unacked sent seqs and when each was last sent.
    inflight: BTreeMap<u64, Instant>,
    /// The same, ordered by send time: the next resend is its first entry, found without a
    /// scan of the window on every turn of the session loop.
    by_time: BTreeSet<(Instant, u64)>,
    /// Highest seq considered for sending (sent, or found already gone).
    cursor: u64,
}

impl Window {
    /// A window that starts sending after `start_after`.
    pub fn new(max: usize, start_after: u64) -> Self {
        Self {
            max,
            inflight: BTreeMap::new(),
            by_time: BTreeSet::new(),
            cursor: start_after,
        }
    }

    /// How many more messages may be sent now.
    pub fn room(&self) -> usize {
        self.max.saturating_sub(self.inflight.len())
    }

    /// Every seq at or below this has been considered; the next read starts after it.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Records a first send of `seq`.
    pub fn sent(&mut self, seq: u64, now: Instant) {
        if let Some(old) = self.inflight.insert(seq, now) {
            self.by_time.remove(&(old, seq));
        }
        self.by_time.insert((now, seq));
        self.cursor = self.cursor.max(seq);
    }

    /// Moves the cursor past seqs that turned out to be gone from the store.
    pub fn skip_to(&mut self, seq: u64) {
        self.cursor = self.cursor.max(seq);
    }

    /// Releases what an ack covers. `last_stored` is the highest seq assigned and durable in
    /// the outbox when the ack arrives (the durable frontier minus one): an ack covers only
    /// seqs that exist, so a cumulative ack moves the cursor no further than that, and the
    /// messages stored after it are still sent. (The store applies the same rule when it
    /// deletes.) A cursor moved past seqs not yet stored would skip them for good on this
    /// connection: confirmed to their publisher, never sent, and deleted by the client's next
    /// cumulative ack.
    pub fn ack(&mut self, ack: Ack, last_stored: u64) -> Acked {
        match ack {
            Ack::Seq(s) => Acked {
                released: usize::from(self.forget_one(s)),
                beyond: (s > last_stored).then_some(s),
            },
            Ack::Upto(u) => {
                let keep = self.inflight.split_off(&u.saturating_add(1));
                let released = std::mem::replace(&mut self.inflight, keep);
                for (seq, at) in &released {
                    self.by_time.remove(&(*at, *seq));
                }
                self.cursor = self.cursor.max(u.min(last_stored));
                Acked {
                    released: released.len(),
                    beyond: (u > last_stored).then_some(u),
                }
            }
        }
    }

    /// Seqs unacked for at least `timeout`, oldest send first.
    pub fn due(&self, now: Instant, timeout: Duration) -> Vec<u64> {
        self.by_time
            .iter()
            .take_while(|(at, _)| now.saturating_duration_since(*at) >= timeout)
            .map(|(_, s)| *s)
            .collect()
    }

    /// Records a resend of `seq`.
    pub fn resent(&mut self, seq: u64, now: Instant) {
        if let Some(at) = self.inflight.get_mut(&seq) {
            self.by_time.remove(&(*at, seq));
            *at = now;
            self.by_time.insert((now, seq));
        }
    }

    /// Drops `seq` from the window: it is gone from the store (acked elsewhere, expired).
    pub fn forget(&mut self, seq: u64) {
        self.forget_one(seq);
    }

    fn forget_one(&mut self, seq: u64) -> bool {
        match self.inflight.remove(&seq) {
            Some(at) => {
                self.by_time.remove(&(at, seq));
                true
            }
            None => false,
        }
    }

    /// When the oldest in-flight message becomes due, if any.
    pub fn next_due(&self, timeout: Duration) -> Option<Instant> {
        self.by_time.first().map(|(at, _)| *at + timeout)
    }
}

/// What an ack did to the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    /// In-flight messages it released.
    pub released: usize,
    /// The seq it named when that was never assigned (beyond the last stored seq): a client
    /// bug worth telling the client about. The ack still covers what does exist.
    pub beyond: Option<u64>,
}

/// What the heartbeat asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    Nothing,
    SendPing,
    /// Nothing heard for the whole timeout.
    Dead,
}

/// Heartbeats: "nothing received for `timeout`" means dead; a ping goes out every `interval`.
#[derive(Debug)]
pub struct Liveness {
    interval: Duration,
    timeout: Duration,
    last_heard: Instant,
    last_ping: Instant,
}

impl Liveness {
    pub fn new(interval: Duration, timeout: Duration, now: Instant) -> Self {
        Self {
            interval,
            timeout,
            last_heard: now,
            last_ping: now,
        }
    }

    /// Any frame from the peer is a sign of life.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// What to do at `now`. Records the ping when it asks for one.
    pub fn poll(&mut self, now: Instant) -> Beat {
        if now.saturating_duration_since(self.last_heard) >= self.timeout {
            Beat::Dead
        } else if now.saturating_duration_since(self.last_ping) >= self.interval {
            self.last_ping = now;
            Beat::SendPing
        } else {
            Beat::Nothing
        }
    }

    /// The next moment [`Liveness::poll`] could answer something new.
    pub fn next_deadline(&self) -> Instant {
        (self.last_ping + self.interval).min(self.last_heard + self.timeout)
    }
}

/// A token bucket: `rate` publishes per second sustained, `burst` at once.
#[derive(Debug, Clone)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    /// None when `rate` is 0 (no limit).
    pub fn new(rate: u32, burst: u32, now: Instant) -> Option<Self> {
        (rate > 0).then(|| RateLimit {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: now,
        })
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn window_never_has_more_than_max_in_flight() {
        let t = Instant::now();
        let mut w = Window::new(3, 0);
        for s in 1..=3 {
            assert!(w.room() > 0);
            w.sent(s, t);
        }
        assert_eq!(w.room(), 0);
        assert_eq!(w.ack(Ack::Seq(2), 3).released, 1);
        assert_eq!(w.room(), 1);
        assert_eq!(w.cursor(), 3);
    }

    #[test]
    fn ack_of_unknown_seq_releases_nothing() {
        let mut w = Window::new(2, 0);
        w.sent(1, Instant::now());
        let acked = w.ack(Ack::Seq(7), 1);
        assert_eq!(acked.released, 0);
        assert_eq!(acked.beyond, Some(7), "seq 7 was never assigned");
        assert_eq!(w.inflight(), 1);
        assert_eq!(w.ack(Ack::Seq(1), 1).beyond, None);
    }

    #[test]
    fn cumulative_ack_releases_everything_up_to_it_and_moves_the_cursor() {
        let t = Instant::now();
        let mut w = Window::new(10, 0);
        for s in 1..=5 {
            w.sent(s, t);
        }
        assert_eq!(w.ack(Ack::Upto(3), 9).released, 3);
        assert_eq!(w.inflight(), 2);
        assert_eq!(w.ack(Ack::Upto(9), 9).released, 2);
        assert_eq!(
            w.cursor(),
            9,
            "stored seqs up to 9 count as acked and must not be sent"
        );
    }

    #[test]
    fn cumulative_ack_ahead_of_the_outbox_does_not_skip_messages_stored_later() {
        let t = Instant::now();
        // Nothing stored yet; the client acks upto 1000.
        let mut w = Window::new(10, 0);
        let acked = w.ack(Ack::Upto(1000), 0);
        assert_eq!(acked.beyond, Some(1000));
        assert_eq!(w.cursor(), 0, "seqs not yet assigned must still be sent");
        // Two delivered, then an ack of 4 while only 2 exist: 3 must still go out.
        w.sent(1, t);
        w.sent(2, t);
        assert_eq!(w.ack(Ack::Upto(4), 2).released, 2);
        assert_eq!(w.cursor(), 2);
        assert_eq!(w.inflight(), 0);
    }

    #[test]
    fn unacked_messages_become_due_after_the_timeout_oldest_first() {
        let t = Instant::now();
        let mut w = Window::new(10, 0);
        w.sent(2, t);
        w.sent(1, t + ms(5));
        assert!(w.due(t + ms(99), ms(100)).is_empty());
        assert_eq!(w.due(t + ms(105), ms(100)), vec![2, 1]);
        w.resent(2, t + ms(105));
        assert_eq!(w.due(t + ms(110), ms(100)), vec![1]);
        assert_eq!(w.next_due(ms(100)), Some(t + ms(105)));
        w.forget(1);
        w.forget(2);
        assert_eq!(w.next_due(ms(100)), None);
    }

    #[test]
    fn acks_take_messages_out_of_the_resend_order() {
        let t = Instant::now();
        let mut w = Window::new(10, 0);
        for s in 1..=4 {
            w.sent(s, t + ms(s));
        }
        w.resent(1, t + ms(10));
        assert_eq!(w.ack(Ack::Upto(2), 4).released, 2);
        assert_eq!(w.next_due(ms(100)), Some(t + ms(103)));
        assert_eq!(w.ack(Ack::Seq(3), 4).released, 1);
        assert_eq!(w.due(t + ms(200), ms(100)), vec![4]);
        assert_eq!(w.ack(Ack::Seq(4), 4).released, 1);
        assert_eq!(w.next_due(ms(100)), None);
        assert!(w.due(t + ms(500), ms(100)).is_empty());
    }

    #[test]
    fn liveness_pings_every_interval_and_declares_silence_dead() {
        let t = Instant::now();
        let mut l = Liveness::new(ms(100), ms(300), t);
        assert_eq!(l.poll(t + ms(50)), Beat::Nothing);
        assert_eq!(l.poll(t + ms(100)), Beat::SendPing);
        assert_eq!(l.poll(t + ms(150)), Beat::Nothing);
        assert_eq!(l.poll(t + ms(200)), Beat::SendPing);
        assert_eq!(l.poll(t + ms(300)), Beat::Dead);
    }

    #[test]
    fn any_frame_heard_keeps_the_peer_alive() {
        let t = Instant::now();
        let mut l = Liveness::new(ms(100), ms(300), t);
        l.heard(t + ms(250));
        assert_ne!(l.poll(t + ms(400)), Beat::Dead);
        assert_eq!(l.poll(t + ms(550)), Beat::Dead);
        assert!(l.next_deadline() <= t + ms(550));
    }

    #[test]
    fn rate_limit_allows_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10, 3, t0).unwrap();
        assert!(r.try_take(t0) && r.try_take(t0) && r.try_take(t0));
        assert!(!r.try_take(t0), "the burst is spent");
        assert!(
            !r.try_take(t0 + Duration::from_millis(50)),
            "half a token is not one"
        );
        assert!(r.try_take(t0 + Duration::from_millis(100)));
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        assert!(r.try_take(later) && r.try_take(later) && r.try_take(later));
        assert!(!r.try_take(later));
        assert!(RateLimit::new(0, 5, t0).is_none());
    }

    mod model {
        //! The window against a model of one outbox: whatever a client acks, and whenever it
        //! reconnects, every stored message is delivered or was removed by an ack that
        //! covered it while it existed, or by retention (counted in `missed`).
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeSet;

        #[derive(Debug, Clone)]
        enum Op {
            /// A publish commits: the next seq becomes durable.
            Append,
            /// The connection sends what the window allows.
            Fill,
            /// The client acks what it has received (a correct client).
            AckReceived,
            /// The client acks any value, assigned or not.
            Ack(Ack),
            /// Retention removes the oldest stored message.
            Expire,
            /// The connection drops; the next resumes from the acked watermark.
            Reconnect,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => Just(Op::Append),
                4 => Just(Op::Fill),
                2 => Just(Op::AckReceived),
                1 => (0u64..40).prop_map(|s| Op::Ack(Ack::Seq(s))),
                1 => (0u64..40).prop_map(|u| Op::Ack(Ack::Upto(u))),
                1 => Just(Op::Expire),
                1 => Just(Op::Reconnect),
            ]
        }

        /// The store's side: which seqs exist, and the rule it applies to an ack (only seqs
        /// that exist when the ack is applied).
        #[derive(Default)]
        struct Outbox {
            next: u64,
            stored: BTreeSet<u64>,
            acked: u64,
        }

        impl Outbox {
            fn last(&self) -> u64 {
                self.next.saturating_sub(1)
            }
            fn ack(&mut self, ack: Ack) -> Vec<u64> {
                let last = self.last();
                let gone: Vec<u64> = match ack {
                    Ack::Seq(s) => self.stored.iter().copied().filter(|x| *x == s).collect(),
                    Ack::Upto(u) => self.stored.range(..=u.min(last)).copied().collect(),
                };
                for s in &gone {
                    self.stored.remove(s);
                }
                if let Ack::Upto(u) = ack {
                    self.acked = self.acked.max(u.min(last));
                }
                gone
            }
        }

        /// As `Conn::fill` reads the store: stored seqs after the cursor, below the frontier,
        /// as many as the window has room for; `covered_to` as `Store::read` gives it.
        fn fill(w: &mut Window, outbox: &Outbox, received: &mut BTreeSet<u64>, t: Instant) {
            while w.room() > 0 {
                let limit = w.room();
                let batch: Vec<u64> = outbox
                    .stored
                    .range(w.cursor() + 1..)
                    .take(limit)
                    .copied()
                    .collect();
                for s in &batch {
                    w.sent(*s, t);
                    received.insert(*s);
                }
                let covered = match batch.last() {
                    Some(last) if batch.len() == limit => *last,
                    _ => outbox.last(),
                };
                w.skip_to(covered);
                if batch.is_empty() {
                    break;
                }
            }
        }

        proptest! {
            #[test]
            fn every_stored_message_is_delivered_or_accounted_for(
                ops in proptest::collection::vec(op(), 1..200),
                max in 1usize..6,
            ) {
                let t = Instant::now();
                let mut outbox = Outbox { next: 1, ..Outbox::default() };
                let mut w = Window::new(max, 0);
                let mut received: BTreeSet<u64> = BTreeSet::new();
                // Removed by retention, or by an ack that named them while they existed.
                let mut accounted: BTreeSet<u64> = BTreeSet::new();
                for op in ops {
                    match op {
                        Op::Append => {
                            outbox.stored.insert(outbox.next);
                            outbox.next += 1;
                        }
                        Op::Fill => fill(&mut w, &outbox, &mut received, t),
                        Op::AckReceived => {
                            // Cumulative, as a client that processed everything it got: it
                            // must never remove a message the client did not get.
                            if let Some(&top) = received.last() {
                                w.ack(Ack::Upto(top), outbox.last());
                                for s in outbox.ack(Ack::Upto(top)) {
                                    prop_assert!(received.contains(&s), "seq {} acked unseen", s);
                                }
                            }
                        }
                        Op::Ack(a) => {
                            let acked = w.ack(a, outbox.last());
                            let named = match a { Ack::Seq(s) | Ack::Upto(s) => s };
                            prop_assert_eq!(acked.beyond.is_some(), named > outbox.last());
                            accounted.extend(outbox.ack(a));
                        }
                        Op::Expire => {
                            if let Some(s) = outbox.stored.pop_first() {
                                accounted.insert(s);
                            }
                        }
                        Op::Reconnect => w = Window::new(max, outbox.acked),
                    }
                }
                // Drain on the current connection: ack what arrived, send what that made room
                // for, until a fill sends nothing new.
                loop {
                    if let Some(&top) = received.last() {
                        w.ack(Ack::Upto(top), outbox.last());
                        for s in outbox.ack(Ack::Upto(top)) {
                            prop_assert!(received.contains(&s), "seq {} acked unseen", s);
                        }
                    }
                    let before = received.len();
                    fill(&mut w, &outbox, &mut received, t);
                    if received.len() == before {
                        break;
                    }
                }
                prop_assert!(
                    outbox.stored.is_empty(),
                    "stored but never sent on the last connection: {:?}", outbox.stored
                );
                for s in 1..outbox.next {
                    prop_assert!(
                        received.contains(&s) || accounted.contains(&s),
                        "seq {} was stored, never sent and never accounted for", s
                    );
                }
            }
        }
    }
}
