//! Messages just committed, kept in memory for the live connection of their outbox, which
//! sends them without reading them back from the trees and the body log.
//!
//! Without it, every delivery read its message back right after the writer had written it: a
//! lookup in the outbox tree, a chunk decoded, a `pread` of the body, its checksum, a copy.
//! Now the writer, once a commit has made a group durable and before it moves the outboxes'
//! frontiers, hands each message the group stored for an outbox with a connection waiting to
//! its [`Fresh`] list; the connection's next read takes them from there. Everything else is read
//! from the store as before, so the list may drop anything at any time and lose nothing:
//!
//! - it holds consecutive seqs only: a message that cannot join (the list would no longer be
//!   consecutive, or it is full, or the broker's budget is spent) empties it;
//! - a read uses it only when its first seq is the one the read starts at; what lies below
//!   the read's start was sent already and is dropped;
//! - the writer takes out whatever an ack, an expiry, a purge or a deletion removes from the
//!   store, so the list never holds a message the store no longer has.
//!
//! Its bytes are bounded over all outboxes by `storage.delivery_cache_bytes` ([`Budget`]);
//! an outbox with no connection gets nothing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::Delivery;

/// What a list holds: the message as the writer stored it, shared by every outbox of one topic
/// publish; its `seq` is set as it is handed out.
type Shared = Arc<Delivery>;

/// The delivery of `seq`: the message itself when this outbox was its only one (nothing
/// copied), else a copy of it.
fn delivery(m: Shared, seq: u64) -> Delivery {
    let mut d = Arc::try_unwrap(m).unwrap_or_else(|shared| (*shared).clone());
    d.seq = seq;
    d
}

/// What an entry counts against the budget: its payload and a little for the rest.
fn cost(m: &Delivery) -> u64 {
    m.payload.len() as u64 + 128
}

/// The bytes every outbox's list may hold together.
#[derive(Debug)]
pub(super) struct Budget {
    limit: u64,
    used: AtomicU64,
}

impl Budget {
    pub(super) fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: AtomicU64::new(0),
        })
    }

    fn take(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                u.checked_add(n).filter(|t| *t <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            });
    }

    #[cfg(test)]
    fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// Most messages one list holds: more than any in-flight window takes at once.
const MAX_ENTRIES: usize = 4096;

/// One outbox's list (see the module docs). Lives in its [`super::OutboxHandle`].
#[derive(Debug)]
pub(super) struct Fresh {
    /// The seq of `items[0]`.
    first: u64,
    items: VecDeque<Shared>,
    bytes: u64,
    budget: Arc<Budget>,
}

impl Fresh {
    pub(super) fn new(budget: Arc<Budget>) -> Fresh {
        Fresh {
            first: 0,
            items: VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    /// Adds the durable message `seq`; empties the list instead when it cannot join.
    pub(super) fn push(&mut self, seq: u64, m: &Shared) {
        let follows = self.items.is_empty() || self.first + self.items.len() as u64 == seq;
        let cost = cost(m);
        if !follows || self.items.len() >= MAX_ENTRIES || !self.budget.take(cost) {
            self.clear();
            return;
        }
        if self.items.is_empty() {
            self.first = seq;
        }
        self.items.push_back(Arc::clone(m));
        self.bytes += cost;
    }

    /// Up to `limit` messages from seq `after + 1` on, below `frontier`, taken out of the list;
    /// None when the list does not start there (the caller reads the store instead).
    pub(super) fn take(
        &mut self,
        after: u64,
        frontier: u64,
        limit: usize,
    ) -> Option<Vec<Delivery>> {
        self.drop_through(after);
        if self.items.is_empty() || self.first != after.saturating_add(1) {
            return None;
        }
        let n = (frontier.saturating_sub(self.first) as usize)
            .min(limit)
            .min(self.items.len());
        if n == 0 {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let Some(m) = self.pop_front() else { break };
            out.push(delivery(m, self.first - 1));
        }
        Some(out)
    }

    /// Takes out the messages `lo..=hi` the store no longer has: from the front when the range
    /// starts there, else everything (a hole would break the list's run of seqs).
    pub(super) fn remove(&mut self, lo: u64, hi: u64) {
        let last = self.first + self.items.len() as u64;
        if self.items.is_empty() || hi < self.first || lo >= last {
            return;
        }
        if lo <= self.first {
            self.drop_through(hi);
        } else {
            self.clear();
        }
    }

    pub(super) fn clear(&mut self) {
        self.items.clear();
        self.budget.give(self.bytes);
        self.bytes = 0;
    }

    /// Drops every message at or below `seq`.
    fn drop_through(&mut self, seq: u64) {
        while !self.items.is_empty() && self.first <= seq {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) -> Option<Shared> {
        let m = self.items.pop_front()?;
        let cost = cost(&m);
        self.bytes -= cost;
        self.budget.give(cost);
        self.first += 1;
        Some(m)
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Payload;

    fn msg(text: &str) -> Shared {
        Arc::new(Delivery {
            seq: 0,
            id: "1".into(),
            ts: 0,
            from: None,
            topic: None,
            payload: Payload::Json(text.into()),
            expires_at: None,
        })
    }

    fn seqs(d: Option<Vec<Delivery>>) -> Option<Vec<u64>> {
        d.map(|v| v.into_iter().map(|d| d.seq).collect())
    }

    fn filled(budget: &Arc<Budget>, range: std::ops::RangeInclusive<u64>) -> Fresh {
        let mut f = Fresh::new(Arc::clone(budget));
        for s in range {
            f.push(s, &msg("\"x\""));
        }
        f
    }

    #[test]
    fn a_read_takes_consecutive_messages_from_its_start_up_to_the_frontier_and_the_limit() {
        let budget = Budget::new(1 << 20);
        let mut f = filled(&budget, 5..=9);
        assert_eq!(seqs(f.take(4, 8, 10)), Some(vec![5, 6, 7]));
        assert_eq!(seqs(f.take(7, 100, 1)), Some(vec![8]));
        assert_eq!(seqs(f.take(8, 100, 10)), Some(vec![9]));
        assert_eq!(seqs(f.take(9, 100, 10)), None);
        assert_eq!(budget.used(), 0, "what was taken is given back");
    }

    #[test]
    fn a_read_that_starts_before_the_list_reads_the_store() {
        // Seqs 3 and 4 are not in the list: sending 5 first would skip them.
        let budget = Budget::new(1 << 20);
        let mut f = filled(&budget, 5..=9);
        assert_eq!(seqs(f.take(2, 100, 10)), None);
        // What the read of the store sent is dropped at the next read.
        assert_eq!(seqs(f.take(6, 100, 10)), Some(vec![7, 8, 9]));
    }

    #[test]
    fn a_message_that_does_not_follow_the_last_empties_the_list() {
        let budget = Budget::new(1 << 20);
        let mut f = filled(&budget, 5..=6);
        f.push(8, &msg("1"));
        assert_eq!(seqs(f.take(4, 100, 10)), None, "5 and 6 went with the gap");
        assert_eq!(seqs(f.take(7, 100, 10)), None);
        f.push(8, &msg("1"));
        f.push(9, &msg("1"));
        assert_eq!(seqs(f.take(7, 100, 10)), Some(vec![8, 9]));
    }

    #[test]
    fn a_spent_budget_empties_the_list_instead_of_growing_it() {
        let budget = Budget::new(3 * (3 + 128));
        let mut a = filled(&budget, 1..=3);
        let mut b = Fresh::new(Arc::clone(&budget));
        b.push(1, &msg("\"x\""));
        assert_eq!(seqs(b.take(0, 100, 10)), None, "no room left");
        a.push(4, &msg("\"x\""));
        assert_eq!(
            seqs(a.take(0, 100, 10)),
            None,
            "no room for 4: 1 to 3 dropped"
        );
        assert_eq!(budget.used(), 0);
        b.push(1, &msg("\"x\""));
        assert_eq!(seqs(b.take(0, 100, 10)), Some(vec![1]));
    }

    #[test]
    fn a_message_one_list_holds_is_handed_over_without_a_copy() {
        fn text_at(p: &Payload) -> *const u8 {
            match p {
                Payload::Json(s) => s.as_ptr(),
                Payload::Binary(b) => b.as_ptr(),
            }
        }
        let budget = Budget::new(1 << 20);
        let (mut only, mut one, mut other) = (
            Fresh::new(Arc::clone(&budget)),
            Fresh::new(Arc::clone(&budget)),
            Fresh::new(Arc::clone(&budget)),
        );
        let direct = msg("\"direct\"");
        let at = text_at(&direct.payload);
        only.push(1, &direct);
        drop(direct);
        let got = only.take(0, 10, 10).unwrap_or_default();
        assert_eq!(got.len(), 1);
        assert_eq!(text_at(&got[0].payload), at, "moved, not copied");
        // A topic publish: two outboxes share the message; each gets it whole.
        let shared = msg("\"shared\"");
        one.push(1, &shared);
        other.push(7, &shared);
        drop(shared);
        let (a, b) = (one.take(0, 10, 10), other.take(6, 10, 10));
        assert_eq!(
            a.map(|v| v[0].payload.clone()),
            Some(Payload::Json("\"shared\"".into()))
        );
        assert_eq!(
            b.map(|v| v[0].payload.clone()),
            Some(Payload::Json("\"shared\"".into()))
        );
    }

    #[test]
    fn what_the_store_removes_leaves_the_list() {
        let budget = Budget::new(1 << 20);
        let mut acked = filled(&budget, 5..=9);
        acked.remove(1, 6);
        assert_eq!(seqs(acked.take(6, 100, 1)), Some(vec![7]));
        let mut expired = filled(&budget, 5..=9);
        expired.remove(7, 7);
        assert_eq!(
            seqs(expired.take(4, 100, 10)),
            None,
            "a hole at 7 empties it"
        );
        let mut beyond = filled(&budget, 5..=9);
        beyond.remove(10, 12);
        assert_eq!(seqs(beyond.take(4, 100, 10)), Some(vec![5, 6, 7, 8, 9]));
        beyond.push(10, &msg("1"));
        assert!(budget.used() > 0);
        drop((acked, expired, beyond));
        assert_eq!(budget.used(), 0, "a dropped list gives its bytes back");
    }
}
