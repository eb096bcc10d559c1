//! What publishers and subscribers count while a case runs, shared between tasks.
//!
//! Every subscriber keeps a bitmap of the seqs it has seen, so "zero lost" is checked per
//! message (every confirmed seq delivered at least once), not just by comparing two counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;
use tokio::sync::{Notify, Semaphore};

use crate::msg;

/// Latencies are recorded in microseconds, from 1 µs to 10 minutes, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| Histogram::new(3).unwrap())
}

/// One subscriber's counts.
pub struct SubStats {
    /// Every delivery, duplicates included.
    pub received: AtomicU64,
    /// Distinct seqs delivered.
    pub unique: AtomicU64,
    pub duplicates: AtomicU64,
    /// Bodies the bench did not make (should stay 0).
    pub foreign: AtomicU64,
    /// Latency is recorded only for messages intended at or after this time (after warm-up)
    /// and before `record_until_ns`.
    pub record_from_ns: AtomicU64,
    pub record_until_ns: AtomicU64,
    /// When the first delivery arrived (0: none yet).
    pub first_ns: AtomicU64,
    /// When the latest new seq arrived.
    pub last_ns: AtomicU64,
    // std mutexes: held for a few instructions, never across an await.
    seen: Mutex<Vec<u64>>,
    /// This subscriber's own, or one shared by many (see [`SubStats::sharing`]).
    hist: Arc<Mutex<Histogram<u64>>>,
    notify: Arc<Notify>,
}

impl SubStats {
    pub fn new(notify: Arc<Notify>) -> Arc<SubStats> {
        SubStats::sharing(notify, Arc::new(Mutex::new(new_histogram())))
    }

    /// A subscriber that records its latencies into `hist`, which other subscribers may share:
    /// a histogram is about 170 KiB, too much to keep one per subscriber when there are
    /// thousands of them each receiving a message a second.
    pub fn sharing(notify: Arc<Notify>, hist: Arc<Mutex<Histogram<u64>>>) -> Arc<SubStats> {
        Arc::new(SubStats {
            received: AtomicU64::new(0),
            unique: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            record_from_ns: AtomicU64::new(u64::MAX),
            record_until_ns: AtomicU64::new(u64::MAX),
            first_ns: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            seen: Mutex::new(Vec::new()),
            hist,
            notify,
        })
    }

    /// Called by an adapter for each delivery, before it acks.
    pub fn on_delivery(&self, body: &[u8]) {
        let now = msg::now_ns();
        self.received.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .first_ns
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        let Some((intended, seq)) = msg::parse(body) else {
            self.foreign.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let fresh = {
            let Ok(mut seen) = self.seen.lock() else {
                return;
            };
            let word = usize::try_from(seq / 64).unwrap_or(usize::MAX);
            if word >= seen.len() {
                seen.resize(word + 1 + word / 2, 0);
            }
            let bit = 1u64 << (seq % 64);
            let fresh = seen[word] & bit == 0;
            seen[word] |= bit;
            fresh
        };
        if !fresh {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if intended >= self.record_from_ns.load(Ordering::Relaxed)
            && intended < self.record_until_ns.load(Ordering::Relaxed)
        {
            let us = now.saturating_sub(intended) / 1_000;
            if let Ok(mut h) = self.hist.lock() {
                h.saturating_record(us.max(1));
            }
        }
        self.last_ns.store(now, Ordering::Relaxed);
        self.unique.fetch_add(1, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Seqs below `published` never delivered.
    pub fn missing_below(&self, published: u64) -> u64 {
        let Ok(seen) = self.seen.lock() else {
            return published;
        };
        (0..published)
            .filter(|s| {
                let word = usize::try_from(s / 64).unwrap_or(usize::MAX);
                seen.get(word).is_none_or(|w| w & (1u64 << (s % 64)) == 0)
            })
            .count() as u64
    }

    /// A copy of the latencies recorded so far (shared ones included, see
    /// [`SubStats::sharing`]).
    pub fn histogram(&self) -> Histogram<u64> {
        self.hist
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|_| new_histogram())
    }
}

/// One publisher's counts, and its window of unconfirmed publishes.
pub struct PubStats {
    pub sent: AtomicU64,
    pub confirmed: AtomicU64,
    pub errors: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// One permit per publish that may be unconfirmed; taken (forgotten) before a send,
    /// returned when its confirmation (or error) arrives.
    pub window: Arc<Semaphore>,
}

impl PubStats {
    pub fn new(window: usize) -> Arc<PubStats> {
        Arc::new(PubStats {
            sent: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
            window: Arc::new(Semaphore::new(window)),
        })
    }

    pub fn confirm(&self) {
        self.confirmed.fetch_add(1, Ordering::Relaxed);
        self.window.add_permits(1);
    }

    pub fn fail(&self, error: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error);
        }
        self.window.add_permits(1);
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
}

/// Holds a closed-loop publisher back while `published - slowest subscriber` reaches the
/// end-to-end window, so saturation runs measure delivery, not an ever-growing backlog.
pub struct Gate {
    pub subs: Vec<Arc<SubStats>>,
    pub notify: Arc<Notify>,
}

impl Gate {
    pub fn slowest(&self) -> u64 {
        self.subs
            .iter()
            .map(|s| s.unique.load(Ordering::Acquire))
            .min()
            .unwrap_or(0)
    }

    /// Returns once fewer than `window` published messages are undelivered to some subscriber.
    /// Cancel-safe.
    pub async fn wait_below(&self, published: u64, window: u64) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if published.saturating_sub(self.slowest()) < window {
                return;
            }
            notified.await;
        }
    }
}
