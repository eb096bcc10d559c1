//! The loss checker: compares what publishers were told with what applications received, in
//! Jepsen's vocabulary. Pure bookkeeping, no I/O, unit-tested.
//!
//! Every publish carries a unique message number in its payload. A publish is *confirmed* when
//! the broker answered `ok`; *unconfirmed* when the publisher gave up or never heard back (the
//! broker may or may not have stored it). Per recipient:
//! - **lost**: confirmed, never delivered (a violation);
//! - **lost-middle**: lost, and below the highest number delivered from the same publisher to
//!   the same recipient (a gap, not just a tail the run ended before draining; a violation);
//! - **unexpected**: delivered, never published (a violation);
//! - **duplicates**: handed to the application more than once (a violation: the client library
//!   must hide redeliveries); wire redeliveries are counted separately and are fine;
//! - **reorders**: within one epoch, a seq not above the one before it (a violation);
//! - **recovered**: delivered although its publish was unconfirmed (fine: the broker stored it
//!   and the answer was lost).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

/// One publish attempt's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Confirmed,
    Unconfirmed,
}

#[derive(Debug, Default)]
pub struct Checker {
    /// (number, recipient) -> (publisher, outcome); a topic publish has one entry per
    /// subscriber.
    published: HashMap<(u64, String), (String, Outcome)>,
    /// recipient -> number -> times handed to the application
    delivered: HashMap<String, BTreeMap<u64, u32>>,
    /// recipient -> (epoch, last seq) for the reorder check
    last_seq: HashMap<String, (String, u64)>,
    reorders: HashMap<String, u64>,
    /// recipient -> seq gaps seen within one epoch: (last seq handed out, the next one).
    gaps: HashMap<String, Vec<(u64, u64)>>,
    wire_redeliveries: HashMap<String, u64>,
}

/// The verdict for one recipient.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct RecipientReport {
    pub recipient: String,
    pub published_confirmed: u64,
    pub published_unconfirmed: u64,
    pub delivered: u64,
    pub lost: u64,
    pub lost_middle: u64,
    pub unexpected: u64,
    pub duplicates: u64,
    pub reorders: u64,
    pub recovered: u64,
    pub wire_redeliveries: u64,
    /// A few lost numbers, for the investigation.
    pub lost_examples: Vec<u64>,
    /// Seqs skipped within an epoch (last handed out, next handed out): where a loss happened
    /// on the way to the application. Only the first few.
    pub seq_gaps: Vec<(u64, u64)>,
}

impl RecipientReport {
    pub fn violations(&self) -> u64 {
        self.lost + self.unexpected + self.duplicates + self.reorders
    }
}

impl Checker {
    /// Records the final outcome of the publish of `number` (call once per number; a later
    /// call for the same number upgrades Unconfirmed to Confirmed).
    pub fn published(&mut self, number: u64, publisher: &str, recipient: &str, outcome: Outcome) {
        let entry = self
            .published
            .entry((number, recipient.to_string()))
            .or_insert_with(|| (publisher.to_string(), outcome));
        if outcome == Outcome::Confirmed {
            entry.1 = Outcome::Confirmed;
        }
    }

    /// Records that the application of `recipient` was handed `number` at (`epoch`, `seq`).
    pub fn delivered(&mut self, recipient: &str, epoch: &str, seq: u64, number: u64) {
        *self
            .delivered
            .entry(recipient.to_string())
            .or_default()
            .entry(number)
            .or_insert(0) += 1;
        let last = self.last_seq.get(recipient);
        if let Some((e, s)) = last {
            if e == epoch && seq <= *s {
                *self.reorders.entry(recipient.to_string()).or_insert(0) += 1;
            }
            if e == epoch && seq > s + 1 {
                self.gaps
                    .entry(recipient.to_string())
                    .or_default()
                    .push((*s, seq));
            }
        }
        self.last_seq
            .insert(recipient.to_string(), (epoch.to_string(), seq));
    }

    /// Counts a frame the broker re-sent (flagged `redelivered`), whether or not the client
    /// library handed it on.
    pub fn wire_redelivery(&mut self, recipient: &str) {
        *self
            .wire_redeliveries
            .entry(recipient.to_string())
            .or_insert(0) += 1;
    }

    /// The verdict, one report per recipient, in name order.
    pub fn report(&self) -> Vec<RecipientReport> {
        let mut recipients: BTreeSet<&str> = self.delivered.keys().map(|s| s.as_str()).collect();
        recipients.extend(self.published.keys().map(|(_, r)| r.as_str()));
        let empty = BTreeMap::new();
        recipients
            .into_iter()
            .map(|r| {
                let got = self.delivered.get(r).unwrap_or(&empty);
                let mut rep = RecipientReport {
                    recipient: r.to_string(),
                    reorders: self.reorders.get(r).copied().unwrap_or(0),
                    wire_redeliveries: self.wire_redeliveries.get(r).copied().unwrap_or(0),
                    seq_gaps: self
                        .gaps
                        .get(r)
                        .map(|g| g.iter().take(10).copied().collect())
                        .unwrap_or_default(),
                    ..RecipientReport::default()
                };
                // Highest number delivered per publisher, for lost-middle.
                let mut highest: HashMap<&str, u64> = HashMap::new();
                for (&n, &times) in got {
                    rep.delivered += 1;
                    rep.duplicates += u64::from(times.saturating_sub(1));
                    match self.published.get(&(n, r.to_string())) {
                        None => rep.unexpected += 1,
                        Some((p, outcome)) => {
                            if *outcome == Outcome::Unconfirmed {
                                rep.recovered += 1;
                            }
                            let h = highest.entry(p.as_str()).or_insert(0);
                            *h = (*h).max(n);
                        }
                    }
                }
                let mut lost: Vec<u64> = Vec::new();
                for ((n, to), (p, outcome)) in &self.published {
                    let n = *n;
                    if to != r {
                        continue;
                    }
                    match outcome {
                        Outcome::Confirmed => rep.published_confirmed += 1,
                        Outcome::Unconfirmed => rep.published_unconfirmed += 1,
                    }
                    if *outcome == Outcome::Confirmed && !got.contains_key(&n) {
                        rep.lost += 1;
                        lost.push(n);
                        if highest.get(p.as_str()).is_some_and(|&h| n < h) {
                            rep.lost_middle += 1;
                        }
                    }
                }
                lost.sort_unstable();
                lost.truncate(10);
                rep.lost_examples = lost;
                rep
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_run_has_no_violations_and_counts_recovered() {
        let mut c = Checker::default();
        c.published(1, "p", "bob", Outcome::Confirmed);
        c.published(2, "p", "bob", Outcome::Unconfirmed);
        c.published(3, "p", "bob", Outcome::Unconfirmed);
        c.delivered("bob", "e1", 1, 1);
        c.delivered("bob", "e1", 2, 2);
        c.wire_redelivery("bob");
        let r = &c.report()[0];
        assert_eq!(r.violations(), 0, "{r:?}");
        assert_eq!(r.recovered, 1);
        assert_eq!(r.published_confirmed, 1);
        assert_eq!(r.published_unconfirmed, 2);
        assert_eq!(r.wire_redeliveries, 1);
    }

    #[test]
    fn every_kind_of_violation_is_counted() {
        let mut c = Checker::default();
        for n in 1..=4 {
            c.published(n, "p", "bob", Outcome::Confirmed);
        }
        c.delivered("bob", "e1", 1, 1);
        c.delivered("bob", "e1", 3, 3); // 2 lost in the middle
        c.delivered("bob", "e1", 3, 3); // duplicate, and seq did not grow: a reorder
        c.delivered("bob", "e1", 5, 99); // never published
        let r = &c.report()[0];
        assert_eq!(r.lost, 2, "{r:?}"); // 2 and 4
        assert_eq!(r.lost_middle, 1, "{r:?}"); // only 2 is below the highest delivered
        assert_eq!(r.duplicates, 1);
        assert_eq!(r.reorders, 1);
        assert_eq!(r.unexpected, 1);
        assert_eq!(r.lost_examples, vec![2, 4]);
    }

    #[test]
    fn a_new_epoch_restarts_the_order_check_and_a_retry_upgrades_the_outcome() {
        let mut c = Checker::default();
        c.published(1, "p", "bob", Outcome::Unconfirmed);
        c.published(1, "p", "bob", Outcome::Confirmed);
        c.delivered("bob", "e1", 5, 1);
        c.delivered("bob", "e2", 1, 2);
        c.published(2, "p", "bob", Outcome::Confirmed);
        let r = &c.report()[0];
        assert_eq!(r.reorders, 0);
        assert_eq!(r.recovered, 0);
        assert_eq!(r.violations(), 0);
    }
}
