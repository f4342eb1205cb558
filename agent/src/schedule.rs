//! When to upload: pure logic, driven by the caller's clock and randomness.
//!
//! - The first upload comes after a random fraction of the interval (a fleet that boots
//!   together does not upload together).
//! - After a success: the interval ± jitter.
//! - After any failure (no network, refused, timeout, 5xx, 503): back off, doubling from
//!   `min_backoff`, but never waiting longer than the normal interval, with up to a quarter of
//!   random spread (below the cap, spread down from it). A server's Retry-After is honoured
//!   within that same cap.

/// Upload timing state. All times in milliseconds.
#[derive(Debug, Clone)]
pub struct Schedule {
    interval_ms: u64,
    jitter_ms: u64,
    min_backoff_ms: u64,
    backoff_ms: u64,
}

impl Schedule {
    /// `interval_ms` between uploads, ± `jitter_ms`, failures backing off from `min_backoff_ms`.
    pub fn new(interval_ms: u64, jitter_ms: u64, min_backoff_ms: u64) -> Self {
        let interval_ms = interval_ms.max(1);
        let min_backoff_ms = min_backoff_ms.clamp(1, interval_ms);
        Self {
            interval_ms,
            jitter_ms: jitter_ms.min(interval_ms / 2),
            min_backoff_ms,
            backoff_ms: 0,
        }
    }

    /// The normal interval, which is also the longest any wait can be (plus jitter).
    pub fn interval_ms(&self) -> u64 {
        self.interval_ms
    }

    /// Delay before the first upload: a random fraction of the interval. `r` is uniform random.
    pub fn first_delay(&self, r: u32) -> u64 {
        scale(self.interval_ms, r)
    }

    /// Delay after a successful upload: interval ± jitter. Resets the backoff.
    pub fn after_success(&mut self, r: u32) -> u64 {
        self.backoff_ms = 0;
        self.interval_ms - self.jitter_ms + scale(2 * self.jitter_ms, r)
    }

    /// Delay after a failed upload; `retry_after_ms` is the server's Retry-After, if any.
    pub fn after_failure(&mut self, retry_after_ms: Option<u64>, r: u32) -> u64 {
        self.backoff_ms = if self.backoff_ms == 0 {
            self.min_backoff_ms
        } else {
            self.backoff_ms.saturating_mul(2).min(self.interval_ms)
        };
        // Up to a quarter of the backoff as random spread, still within the cap: added below
        // the cap, taken off at it. (Clipping it at the cap would make every device of a fleet
        // that lost the network together retry in the same instant, outage after outage.)
        let spread = scale(self.backoff_ms / 4, r);
        let wait = if self.backoff_ms + spread <= self.interval_ms {
            self.backoff_ms + spread
        } else {
            self.interval_ms - spread
        };
        wait.max(retry_after_ms.unwrap_or(0)).min(self.interval_ms)
    }
}

fn scale(range: u64, r: u32) -> u64 {
    ((u128::from(range) * u128::from(r)) >> 32) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped_by_the_interval() {
        let mut s = Schedule::new(60_000, 5_000, 1_000);
        let waits: alloc::vec::Vec<u64> = (0..10).map(|_| s.after_failure(None, 0)).collect();
        assert_eq!(
            waits,
            [
                1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000, 60_000, 60_000
            ]
        );
        // Retry-After is honoured, but within the cap.
        assert_eq!(s.after_failure(Some(300_000), 0), 60_000);
        let mut s = Schedule::new(60_000, 5_000, 1_000);
        assert_eq!(s.after_failure(Some(7_000), 0), 7_000);
        // Success resets.
        assert!((55_000..=65_000).contains(&s.after_success(u32::MAX)));
        assert_eq!(s.after_failure(None, 0), 1_000);
    }

    /// A fleet that failed together (an outage) and sits at the cap does not retry in
    /// lockstep: the spread is taken off the cap, so the waits still differ.
    #[test]
    fn at_the_cap_waits_still_spread() {
        let mut s = Schedule::new(60_000, 5_000, 1_000);
        for _ in 0..20 {
            s.after_failure(None, 0);
        }
        let waits: alloc::vec::Vec<u64> = [0, u32::MAX / 2, u32::MAX]
            .iter()
            .map(|r| s.after_failure(None, *r))
            .collect();
        assert_eq!(waits[0], 60_000);
        assert!((52_000..=53_000).contains(&waits[1]), "{waits:?}");
        assert!((45_000..=45_100).contains(&waits[2]), "{waits:?}");
    }

    proptest::proptest! {
        #[test]
        fn waits_never_exceed_the_interval(interval in 1u64..1_000_000, jitter: u64, min in 0u64..100_000,
                                            rs in proptest::collection::vec((proptest::option::of(0u64..10_000_000), proptest::bool::ANY, proptest::num::u32::ANY), 1..50)) {
            let mut s = Schedule::new(interval, jitter, min);
            proptest::prop_assert!(s.first_delay(u32::MAX) <= interval);
            for (ra, ok, r) in rs {
                let w = if ok { s.after_success(r) } else { s.after_failure(ra, r) };
                proptest::prop_assert!(w <= interval + interval / 2);
                if !ok { proptest::prop_assert!(w <= interval); }
            }
        }
    }
}
