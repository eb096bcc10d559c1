//! How long to wait before the next connection attempt: exponential, capped, with jitter.
//!
//! Free of clocks and global randomness: the caller passes the random numbers, so every rule is
//! unit-tested. Jitter keeps a crowd of clients that lost the same broker from reconnecting in
//! lockstep when it comes back.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Reconnect delays: the first failed attempt waits about `initial`, each further one about
/// twice as long, never more than `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// `initial` is raised to 1 ms and `max` to `initial`, so the delay always grows and is
    /// never zero (a zero delay would turn a refusing broker into a hot loop).
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The ceiling for the coming attempt: `initial * 2^attempt`, capped at `max`.
    fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next attempt, and counts the attempt. "Equal jitter": a random
    /// point in the upper half of the ceiling, so the wait still grows but two clients rarely
    /// pick the same moment. `random` is any uniformly random number.
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let span = u64::try_from((ceiling - half).as_micros()).unwrap_or(u64::MAX);
        let extra = if span == 0 {
            0
        } else {
            random % span.saturating_add(1)
        };
        (half + Duration::from_micros(extra)).min(self.max)
    }

    /// Starts over after a connection that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A small, fast pseudo-random generator (SplitMix64). Not for secrets: it spreads reconnects
/// and makes idempotency keys unique, nothing more.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from the standard library's per-process random hash keys, the clock, the process
    /// id and a counter, so two generators (in one process or two) do not repeat each other.
    pub fn seeded() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut h = RandomState::new().build_hasher();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        h.write_u128(nanos);
        h.write_u32(std::process::id());
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        Rng(h.finish())
    }

    #[cfg(test)]
    pub fn from_seed(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// 128 random bits as 32 hex digits: an idempotency key no other publish will pick.
    pub fn key(&mut self) -> String {
        format!("auto-{:016x}{:016x}", self.next_u64(), self.next_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn delays_double_up_to_the_cap_and_stay_in_the_upper_half() {
        let mut b = Backoff::new(ms(100), ms(1000));
        let mut rng = Rng::from_seed(7);
        let ceilings = [100, 200, 400, 800, 1000, 1000, 1000];
        for c in ceilings {
            let d = b.next_delay(rng.next_u64());
            assert!(
                d >= ms(c / 2) && d <= ms(c),
                "delay {d:?} outside [{}ms, {c}ms]",
                c / 2
            );
        }
    }

    #[test]
    fn extreme_random_values_hit_both_ends_of_the_range() {
        let mut b = Backoff::new(ms(100), ms(1000));
        assert_eq!(b.next_delay(0), ms(50));
        let mut b = Backoff::new(ms(100), ms(1000));
        assert_eq!(b.next_delay(50_000), ms(100));
    }

    #[test]
    fn reset_starts_again_from_initial() {
        let mut b = Backoff::new(ms(100), ms(10_000));
        for _ in 0..6 {
            b.next_delay(0);
        }
        assert_eq!(b.next_delay(0), ms(3200));
        b.reset();
        assert_eq!(b.next_delay(0), ms(50));
    }

    #[test]
    fn many_attempts_never_overflow_and_never_exceed_the_cap() {
        let mut b = Backoff::new(ms(1), ms(30_000));
        let mut rng = Rng::from_seed(1);
        for _ in 0..10_000 {
            assert!(b.next_delay(rng.next_u64()) <= ms(30_000));
        }
    }

    #[test]
    fn zero_settings_are_raised_so_the_loop_never_spins() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert!(b.next_delay(u64::MAX) >= Duration::from_micros(500));
    }

    #[test]
    fn jitter_spreads_clients_that_failed_together() {
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..50 {
            let mut b = Backoff::new(ms(1000), ms(1000));
            seen.insert(b.next_delay(Rng::from_seed(seed).next_u64()));
        }
        assert!(seen.len() > 40, "only {} distinct delays", seen.len());
    }

    #[test]
    fn generated_keys_differ_between_generators() {
        let a = Rng::seeded().key();
        let b = Rng::seeded().key();
        assert_ne!(a, b);
        assert_eq!(a.len(), "auto-".len() + 32);
    }
}
