//! Keyed rate limits (one budget per client address, per student token),
//! on `governor`'s GCRA limiter.
//!
//! The limiter keeps one small entry per key. Entries that are back to a
//! full budget carry no information and are dropped by [`KeyedRate::prune`],
//! which the gateway runs every few seconds; a key therefore lives at most
//! `burst / rate` after its last use, so a flood of distinct keys costs
//! memory in proportion to the flood's rate, not its total.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// How long to wait before the next request would be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Whole seconds, rounded up, at least 1 (the `Retry-After` header).
    pub fn seconds(self) -> u64 {
        let secs = self.0.as_secs() + u64::from(self.0.subsec_nanos() > 0);
        secs.max(1)
    }
}

/// A budget of `per_minute` requests per key, of which up to `burst` may
/// come at once; `per_minute == 0` turns the limit off.
pub struct KeyedRate<K: Hash + Eq + Clone> {
    limiter: Option<DefaultKeyedRateLimiter<K>>,
    clock: DefaultClock,
}

impl<K: Hash + Eq + Clone> KeyedRate<K> {
    /// A limit of `per_minute` per key with bursts of `burst` (at least 1).
    pub fn new(per_minute: u32, burst: u32) -> Self {
        let limiter = NonZeroU32::new(per_minute).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            RateLimiter::keyed(Quota::per_minute(rate).allow_burst(burst))
        });
        KeyedRate {
            limiter,
            clock: DefaultClock::default(),
        }
    }

    /// Spends one request of `key`'s budget, or says when to come back.
    pub fn check(&self, key: &K) -> Result<(), RetryAfter> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(key)
            .map_err(|not_until| RetryAfter(not_until.wait_time_from(self.clock.now())))
    }

    /// Drops the keys whose budget is full again; returns how many remain.
    pub fn prune(&self) -> usize {
        let Some(limiter) = &self.limiter else {
            return 0;
        };
        limiter.retain_recent();
        limiter.shrink_to_fit();
        limiter.len()
    }

    /// Keys held now.
    pub fn tracked(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_allowed_then_the_key_waits_and_others_do_not() {
        let rate = KeyedRate::new(60, 3);
        for _ in 0..3 {
            assert_eq!(rate.check(&"a"), Ok(()));
        }
        let wait = rate.check(&"a").unwrap_err();
        assert!(wait.0 <= Duration::from_secs(1), "{wait:?}");
        assert_eq!(wait.seconds(), 1);
        assert_eq!(rate.check(&"b"), Ok(()), "another key has its own budget");
    }

    #[test]
    fn zero_turns_the_limit_off() {
        let rate = KeyedRate::new(0, 0);
        for _ in 0..10_000 {
            assert_eq!(rate.check(&1u32), Ok(()));
        }
        assert_eq!(rate.tracked(), 0);
    }

    #[test]
    fn keys_back_to_a_full_budget_are_dropped() {
        // One request per 10 ms, bursts of 1: a key is fresh again 10 ms
        // after its last use.
        let rate = KeyedRate::new(6_000, 1);
        for key in 0..1_000u32 {
            rate.check(&key).unwrap();
        }
        assert_eq!(rate.tracked(), 1_000);
        std::thread::sleep(Duration::from_millis(30));
        rate.check(&7).unwrap();
        assert_eq!(rate.prune(), 1, "only the key used just now is kept");
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(RetryAfter(Duration::from_millis(1)).seconds(), 1);
        assert_eq!(RetryAfter(Duration::from_millis(2_001)).seconds(), 3);
        assert_eq!(RetryAfter(Duration::from_secs(4)).seconds(), 4);
    }
}
