//! Per-app rate limiting: two token buckets, as the original `logos` tool had.
//!
//! A chatty app must not flush the kernel's log (and the ring behind it) of everything else.
//! Each app gets an [`AppLimiter`]: a **burst** bucket (default 1 MiB per 5 minutes) lets it
//! log quickly for a while, a **daily** bucket (default 5 MiB per day) caps what it can log in
//! the long run. A line goes out only when both buckets hold its length; otherwise it is
//! dropped and counted, and the next line that goes out is preceded by one report line saying
//! how many lines and bytes were lost since when ([`DropReport::format`]).
//!
//! Everything is integer arithmetic on a monotonic clock in µs that the caller passes in
//! (`CLOCK_MONOTONIC` in the Linux layer, a plain counter in tests). No input overflows:
//! the token count is kept in `u128` units of byte·µs, so refill is exact (no rounding
//! drift) for any `u64` capacity, period and time.

use core::fmt;

/// A token bucket of `capacity_bytes` that refills continuously at `capacity_bytes` per
/// `period_us`, starting half full.
///
/// Time comes from the caller (`now_us`, monotonic µs); a `now_us` earlier than one seen
/// before counts as no time passing (the bucket keeps the latest time it saw). A bucket whose
/// period is 0 refills instantly: it always holds `capacity_bytes`. A line longer than the
/// capacity never fits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    capacity_bytes: u64,
    period_us: u64,
    /// Tokens held, in bytes × `period_us` (so a refill of `elapsed × capacity` is exact).
    scaled: u128,
    last_us: u64,
}

impl TokenBucket {
    /// A bucket holding half its capacity at `now_us`.
    pub const fn new(capacity_bytes: u64, period_us: u64, now_us: u64) -> Self {
        Self {
            capacity_bytes,
            period_us,
            scaled: capacity_bytes as u128 * period_us as u128 / 2,
            last_us: now_us,
        }
    }

    /// The capacity in bytes.
    pub const fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// The time in µs it takes to refill the whole capacity.
    pub const fn period_us(&self) -> u64 {
        self.period_us
    }

    const fn full(&self) -> u128 {
        self.capacity_bytes as u128 * self.period_us as u128
    }

    /// Adds what flowed in since the last call (nothing if `now_us` is not later).
    pub fn refill(&mut self, now_us: u64) {
        if now_us > self.last_us {
            let elapsed = u128::from(now_us - self.last_us);
            self.last_us = now_us;
            let inflow = elapsed * u128::from(self.capacity_bytes);
            self.scaled = self.scaled.saturating_add(inflow).min(self.full());
        }
    }

    /// Whole bytes held now (as of the last [`refill`](Self::refill)).
    pub fn available(&self) -> u64 {
        if self.period_us == 0 {
            return self.capacity_bytes;
        }
        u64::try_from(self.scaled / u128::from(self.period_us)).unwrap_or(u64::MAX)
    }

    /// Whether the bucket holds `len` bytes (as of the last [`refill`](Self::refill)).
    pub fn holds(&self, len: u64) -> bool {
        if self.period_us == 0 {
            return len <= self.capacity_bytes;
        }
        u128::from(len) * u128::from(self.period_us) <= self.scaled
    }

    /// Takes `len` bytes out if the bucket holds them; returns whether it did.
    pub fn take(&mut self, len: u64) -> bool {
        if !self.holds(len) {
            return false;
        }
        let cost = u128::from(len) * u128::from(self.period_us);
        self.scaled = self.scaled.saturating_sub(cost);
        true
    }
}

/// The two buckets' sizes. Byte counts are whatever the caller charges per line (see
/// [`AppLimiter::admit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limits {
    /// Capacity of the burst bucket.
    pub burst_bytes: u64,
    /// Time for the burst bucket to refill completely, µs.
    pub burst_period_us: u64,
    /// Capacity of the daily (long-term) bucket.
    pub daily_bytes: u64,
    /// Time for the daily bucket to refill completely, µs.
    pub daily_period_us: u64,
}

impl Limits {
    /// 1 MiB per 5 minutes, 5 MiB per day.
    pub const DEFAULT: Self = Self {
        burst_bytes: 1 << 20,
        burst_period_us: 5 * 60 * 1_000_000,
        daily_bytes: 5 << 20,
        daily_period_us: 24 * 60 * 60 * 1_000_000,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Which bucket ran dry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// The burst bucket ([`Limits::burst_bytes`]).
    Burst,
    /// The daily bucket ([`Limits::daily_bytes`]).
    Daily,
}

impl fmt::Display for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Burst => "burst",
            Self::Daily => "daily",
        })
    }
}

/// Lines dropped in one episode (from the first drop until a line is admitted again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DropReport {
    /// Lines dropped.
    pub lines: u64,
    /// Bytes dropped (as charged, see [`AppLimiter::admit`]); saturates at `u64::MAX`.
    pub bytes: u64,
    /// The time of the first drop, monotonic µs.
    pub since_us: u64,
    /// The bucket that ran dry: [`Bucket::Daily`] if the daily bucket refused any line of the
    /// episode (it is the one that takes long to recover), [`Bucket::Burst`] otherwise.
    pub bucket: Bucket,
    /// That bucket's capacity.
    pub limit_bytes: u64,
    /// That bucket's period, µs.
    pub limit_period_us: u64,
}

impl DropReport {
    /// Writes the report text (no line end); the caller writes it as a record of the app
    /// itself, so the line reads `NAME[PID]: logos: dropped …`:
    ///
    /// ```text
    /// logos: dropped 1234 lines (56789 bytes) since 12.345678 s (burst limit 1048576 bytes per 300 s)
    /// ```
    ///
    /// Exact integers, always the plural words; `since` is [`since_us`](Self::since_us) in
    /// seconds with six decimals (the monotonic clock, as kmsg timestamps); the period is in
    /// whole seconds, or with six decimals when it is not a whole number of seconds. The end
    /// of the episode is the time of the record the caller writes this line in.
    pub fn format(&self, out: &mut impl fmt::Write) -> fmt::Result {
        write!(
            out,
            "logos: dropped {} lines ({} bytes) since {}.{:06} s ({} limit {} bytes per ",
            self.lines,
            self.bytes,
            self.since_us / 1_000_000,
            self.since_us % 1_000_000,
            self.bucket,
            self.limit_bytes,
        )?;
        let (secs, frac) = (
            self.limit_period_us / 1_000_000,
            self.limit_period_us % 1_000_000,
        );
        if frac == 0 {
            write!(out, "{secs} s)")
        } else {
            write!(out, "{secs}.{frac:06} s)")
        }
    }
}

/// What to do with a line: see [`AppLimiter::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use]
pub enum Admit {
    /// Write the line.
    Admit,
    /// Lines were dropped before this one: write the report line (not charged to the
    /// buckets), then the line.
    AdmitAfterDrops(DropReport),
    /// Drop the line; it has been counted.
    Drop,
}

/// Running totals of an [`AppLimiter`] (saturating).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Totals {
    /// Lines admitted.
    pub admitted_lines: u64,
    /// Bytes admitted.
    pub admitted_bytes: u64,
    /// Lines dropped.
    pub dropped_lines: u64,
    /// Bytes dropped.
    pub dropped_bytes: u64,
}

/// One app's rate limit: a burst and a daily [`TokenBucket`], both starting half full.
///
/// Report lines are not charged to the buckets: there is one short line per episode of
/// drops, and charging it could only make the next episode start sooner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppLimiter {
    limits: Limits,
    burst: TokenBucket,
    daily: TokenBucket,
    pending: Option<DropReport>,
    totals: Totals,
}

impl AppLimiter {
    /// A limiter starting at `now_us`.
    pub const fn new(limits: Limits, now_us: u64) -> Self {
        Self {
            limits,
            burst: TokenBucket::new(limits.burst_bytes, limits.burst_period_us, now_us),
            daily: TokenBucket::new(limits.daily_bytes, limits.daily_period_us, now_us),
            pending: None,
            totals: Totals {
                admitted_lines: 0,
                admitted_bytes: 0,
                dropped_lines: 0,
                dropped_bytes: 0,
            },
        }
    }

    /// The limits this limiter was made with.
    pub const fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The counts so far.
    pub const fn totals(&self) -> &Totals {
        &self.totals
    }

    /// The burst bucket.
    pub const fn burst(&self) -> &TokenBucket {
        &self.burst
    }

    /// The daily bucket.
    pub const fn daily(&self) -> &TokenBucket {
        &self.daily
    }

    /// Decides about a line of `line_len` bytes at `now_us`. The caller chooses what a line
    /// costs; the bytes actually written to kmsg (the formatted record) is the natural choice.
    ///
    /// The line is admitted only if both buckets hold `line_len`; then both are charged.
    /// Otherwise it is dropped and counted in the pending report. The first line admitted
    /// after drops comes as [`Admit::AdmitAfterDrops`] with the report, and the count starts
    /// over.
    pub fn admit(&mut self, now_us: u64, line_len: usize) -> Admit {
        let len = u64::try_from(line_len).unwrap_or(u64::MAX);
        self.burst.refill(now_us);
        self.daily.refill(now_us);
        let daily_ok = self.daily.holds(len);
        if daily_ok && self.burst.holds(len) {
            self.burst.take(len);
            self.daily.take(len);
            let t = &mut self.totals;
            t.admitted_lines = t.admitted_lines.saturating_add(1);
            t.admitted_bytes = t.admitted_bytes.saturating_add(len);
            return match self.pending.take() {
                Some(report) => Admit::AdmitAfterDrops(report),
                None => Admit::Admit,
            };
        }
        let t = &mut self.totals;
        t.dropped_lines = t.dropped_lines.saturating_add(1);
        t.dropped_bytes = t.dropped_bytes.saturating_add(len);
        let (bucket, limit_bytes, limit_period_us) = if daily_ok {
            (
                Bucket::Burst,
                self.limits.burst_bytes,
                self.limits.burst_period_us,
            )
        } else {
            (
                Bucket::Daily,
                self.limits.daily_bytes,
                self.limits.daily_period_us,
            )
        };
        let report = self.pending.get_or_insert(DropReport {
            lines: 0,
            bytes: 0,
            since_us: now_us,
            bucket,
            limit_bytes,
            limit_period_us,
        });
        report.lines = report.lines.saturating_add(1);
        report.bytes = report.bytes.saturating_add(len);
        if bucket == Bucket::Daily {
            report.bucket = bucket;
            report.limit_bytes = limit_bytes;
            report.limit_period_us = limit_period_us;
        }
        Admit::Drop
    }

    /// The drops not reported yet, if any, and the count starts over: for EOF or the app's
    /// exit, so no count is lost.
    pub fn take_pending_report(&mut self) -> Option<DropReport> {
        self.pending.take()
    }

    /// The drops not reported yet, left in place.
    pub const fn pending_report(&self) -> Option<&DropReport> {
        self.pending.as_ref()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use alloc::string::String;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    #[test]
    fn bucket_refills_exactly() {
        // 10 bytes per 3 µs: 3.333... bytes per µs, fractions kept.
        let mut b = TokenBucket::new(10, 3, 100);
        assert_eq!(b.available(), 5);
        assert!(b.take(5));
        assert_eq!(b.available(), 0);
        assert!(!b.take(1));
        b.refill(101); // +3.33
        assert_eq!(b.available(), 3);
        b.refill(102); // +3.33 = 6.67
        assert_eq!(b.available(), 6);
        b.refill(103); // 10
        assert_eq!(b.available(), 10);
        b.refill(1_000); // capped
        assert_eq!(b.available(), 10);
        assert!(!b.holds(11));
        assert!(b.take(10));
        // Backwards is no time; forwards again counts from the latest time seen.
        b.refill(0);
        assert_eq!(b.available(), 0);
        b.refill(1_001);
        assert_eq!(b.available(), 3);
    }

    #[test]
    fn odd_buckets() {
        let mut b = TokenBucket::new(7, 0, 0);
        assert!(b.take(7) && b.take(7) && !b.take(8));
        let mut b = TokenBucket::new(0, 1_000, 0);
        assert!(b.take(0) && !b.take(1));
        b.refill(u64::MAX);
        assert!(!b.take(1));
        let mut b = TokenBucket::new(u64::MAX, u64::MAX, 0);
        assert_eq!(b.available(), u64::MAX / 2);
        b.refill(u64::MAX);
        assert_eq!(b.available(), u64::MAX);
        assert!(b.take(u64::MAX));
        assert_eq!(b.available(), 0);
        let mut l = AppLimiter::new(
            Limits {
                burst_bytes: u64::MAX,
                burst_period_us: u64::MAX,
                daily_bytes: u64::MAX,
                daily_period_us: 1,
            },
            u64::MAX,
        );
        assert_eq!(l.admit(u64::MAX, usize::MAX), Admit::Drop);
        assert_eq!(
            l.admit(0, 1),
            Admit::AdmitAfterDrops(DropReport {
                lines: 1,
                bytes: usize::MAX as u64,
                since_us: u64::MAX,
                bucket: Bucket::Daily,
                limit_bytes: u64::MAX,
                limit_period_us: 1,
            })
        );
    }

    #[test]
    fn default_limits_exact() {
        let mut l = AppLimiter::new(Limits::DEFAULT, 5_000_000);
        assert_eq!(l.burst().available(), 524_288);
        assert_eq!(l.daily().available(), 2_621_440);
        assert_eq!(l.admit(5_000_000, 524_288), Admit::Admit);
        assert_eq!(l.admit(5_000_000, 1), Admit::Drop);
        assert_eq!(l.admit(5_000_100, 100), Admit::Drop); // +0.35 bytes
        // One second refills 1048576 / 300 = 3495.25 bytes of burst.
        assert_eq!(l.admit(6_000_000, 3_496), Admit::Drop);
        let report = DropReport {
            lines: 3,
            bytes: 3_597,
            since_us: 5_000_000,
            bucket: Bucket::Burst,
            limit_bytes: 1_048_576,
            limit_period_us: 300_000_000,
        };
        assert_eq!(l.pending_report(), Some(&report));
        assert_eq!(l.admit(6_000_000, 3_495), Admit::AdmitAfterDrops(report));
        assert_eq!(l.pending_report(), None);
        assert_eq!(l.burst().available(), 0);
        // Daily: 2621440 - 524288 - 3495 + 1 s of 5242880 / 86400 (60.68 bytes).
        assert_eq!(l.daily().available(), 2_093_717);
        assert_eq!(
            *l.totals(),
            Totals {
                admitted_lines: 2,
                admitted_bytes: 527_783,
                dropped_lines: 3,
                dropped_bytes: 3_597
            }
        );
        let mut line = String::new();
        report.format(&mut line).unwrap();
        assert_eq!(
            line,
            "logos: dropped 3 lines (3597 bytes) since 5.000000 s \
             (burst limit 1048576 bytes per 300 s)"
        );
    }

    #[test]
    fn daily_limit_wins_the_report() {
        let limits = Limits {
            burst_bytes: 100,
            burst_period_us: 1_000,
            daily_bytes: 200,
            daily_period_us: 1_000_500,
        };
        let mut l = AppLimiter::new(limits, 0);
        assert_eq!(l.admit(0, 50), Admit::Admit); // burst 0, daily 50
        assert_eq!(l.admit(1, 10), Admit::Drop); // burst ran dry
        assert_eq!(l.admit(1_000, 60), Admit::Drop); // burst 100, daily 50: daily ran dry
        assert_eq!(
            l.take_pending_report()
                .map(|r| (r.lines, r.bytes, r.bucket)),
            Some((2, 70, Bucket::Daily))
        );
        assert_eq!(l.take_pending_report(), None);
        assert_eq!(l.admit(1_000, 50), Admit::Admit);
        assert_eq!(l.admit(1_000, 1), Admit::Drop);
        let mut line = String::new();
        l.take_pending_report().unwrap().format(&mut line).unwrap();
        assert_eq!(
            line,
            "logos: dropped 1 lines (1 bytes) since 0.001000 s \
             (daily limit 200 bytes per 1.000500 s)"
        );
    }

    proptest! {
        #[test]
        fn never_more_than_the_buckets_allow(
            burst_bytes in 1u64..2_000,
            burst_period_us in 1u64..100_000,
            daily_bytes in 1u64..10_000,
            daily_period_us in 1u64..1_000_000,
            start in 0u64..1_000_000_000,
            steps in proptest::collection::vec((-2_000i64..20_000, 0usize..600), 1..150),
        ) {
            let limits = Limits { burst_bytes, burst_period_us, daily_bytes, daily_period_us };
            let mut l = AppLimiter::new(limits, start);
            let (mut now, mut latest) = (start, start);
            // (effective time, bytes) of each admitted line.
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            let (mut dropped, mut reported_lines, mut reported_bytes, mut dropped_bytes) =
                (0u64, 0u64, 0u64, 0u64);
            for &(step, len) in &steps {
                now = now.saturating_add_signed(step);
                latest = latest.max(now);
                match l.admit(now, len) {
                    Admit::Admit => admitted.push((latest, len as u64)),
                    Admit::AdmitAfterDrops(r) => {
                        reported_lines += r.lines;
                        reported_bytes += r.bytes;
                        admitted.push((latest, len as u64));
                    }
                    Admit::Drop => {
                        dropped += 1;
                        dropped_bytes += len as u64;
                    }
                }
            }
            if let Some(r) = l.take_pending_report() {
                reported_lines += r.lines;
                reported_bytes += r.bytes;
            }
            prop_assert_eq!(l.take_pending_report(), None);
            prop_assert_eq!(dropped + admitted.len() as u64, steps.len() as u64);
            prop_assert_eq!((reported_lines, reported_bytes), (dropped, dropped_bytes));
            let t = *l.totals();
            prop_assert_eq!((t.dropped_lines, t.dropped_bytes), (dropped, dropped_bytes));
            prop_assert_eq!(t.admitted_lines, admitted.len() as u64);

            for (cap, period) in [(burst_bytes, burst_period_us), (daily_bytes, daily_period_us)] {
                let (cap, period) = (u128::from(cap), u128::from(period));
                // From the start: half the capacity plus the refill.
                let mut sum = 0u128;
                for &(t, len) in &admitted {
                    sum += u128::from(len);
                    let refill = u128::from(t - start) * cap;
                    prop_assert!(2 * sum * period <= cap * period + 2 * refill);
                }
                // Any window [a, b] of admissions: at most a full bucket plus the refill.
                for i in 0..admitted.len() {
                    let mut sum = 0u128;
                    for &(t, len) in &admitted[i..] {
                        sum += u128::from(len);
                        let refill = u128::from(t - admitted[i].0) * cap;
                        prop_assert!(sum * period <= cap * period + refill);
                    }
                }
            }
        }
    }
}
