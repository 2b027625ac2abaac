//! Token buckets for per-peer rate limits, in integer micro-tokens so the arithmetic is exact
//! and identical on every machine.

use std::time::{Duration, Instant};

use crate::config::RateLimit;

const TOKEN: u64 = 1_000_000;

/// One bucket. Starts full.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    micro_tokens: u64,
    last: Instant,
}

impl Bucket {
    pub(crate) fn full(limit: RateLimit, now: Instant) -> Self {
        Self {
            micro_tokens: u64::from(limit.burst) * TOKEN,
            last: now,
        }
    }

    /// Adds what accrued since the last call, up to the burst.
    fn refill(&mut self, limit: RateLimit, now: Instant) {
        let capacity = u64::from(limit.burst) * TOKEN;
        let elapsed = now.saturating_duration_since(self.last);
        // micro-tokens per microsecond equals tokens per second.
        let refill = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .saturating_mul(u64::from(limit.per_second));
        self.micro_tokens = self.micro_tokens.saturating_add(refill).min(capacity);
        self.last = now;
    }

    /// Gives one token back (what it paid for turned out well), up to the burst.
    pub(crate) fn give_back(&mut self, limit: RateLimit, now: Instant) {
        self.refill(limit, now);
        let capacity = u64::from(limit.burst) * TOKEN;
        self.micro_tokens = self.micro_tokens.saturating_add(TOKEN).min(capacity);
    }

    /// Whether it is full (so forgetting it changes nothing).
    pub(crate) fn is_full(&mut self, limit: RateLimit, now: Instant) -> bool {
        self.refill(limit, now);
        self.micro_tokens >= u64::from(limit.burst) * TOKEN
    }

    /// Takes one token, or says how long until one is available.
    pub(crate) fn take(&mut self, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        self.refill(limit, now);
        if self.micro_tokens >= TOKEN {
            self.micro_tokens -= TOKEN;
            Ok(())
        } else {
            let missing = TOKEN - self.micro_tokens;
            Err(Duration::from_micros(
                missing.div_ceil(u64::from(limit.per_second.max(1))),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_given_back_refills_up_to_the_burst_and_full_is_full() {
        let limit = RateLimit {
            burst: 2,
            per_second: 1,
        };
        let t0 = Instant::now();
        let mut b = Bucket::full(limit, t0);
        assert!(b.is_full(limit, t0));
        b.take(limit, t0).unwrap();
        assert!(!b.is_full(limit, t0));
        b.give_back(limit, t0);
        assert!(b.is_full(limit, t0));
        // Never beyond the burst.
        b.give_back(limit, t0);
        b.take(limit, t0).unwrap();
        b.take(limit, t0).unwrap();
        assert!(b.take(limit, t0).is_err());
        // Refill counts towards full: a token and a bit is not two.
        assert!(!b.is_full(limit, t0 + Duration::from_micros(1_000_002)));
        assert!(b.is_full(limit, t0 + Duration::from_secs(2)));
    }

    #[test]
    fn burst_then_steady_rate() {
        let limit = RateLimit {
            burst: 3,
            per_second: 2,
        };
        let t0 = Instant::now();
        let mut b = Bucket::full(limit, t0);
        for _ in 0..3 {
            assert_eq!(b.take(limit, t0), Ok(()));
        }
        assert_eq!(b.take(limit, t0), Err(Duration::from_millis(500)));
        assert_eq!(
            b.take(limit, t0 + Duration::from_millis(250)),
            Err(Duration::from_millis(250))
        );
        assert_eq!(b.take(limit, t0 + Duration::from_millis(500)), Ok(()));
        // Refill is capped at the burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(b.take(limit, later), Ok(()));
        }
        assert!(b.take(limit, later).is_err());
    }
}
