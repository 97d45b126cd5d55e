//! The arithmetic of an agent's rate limit: GCRA (the generic cell rate algorithm, a
//! leaky bucket written as one *theoretical arrival time*, TAT, per agent). Pure and
//! unit-tested; [`super::Store::claim_rated`] keeps the TAT in the agent's `rate_limits`
//! row and applies this under that row's lock, with the database's clock, in the claim's
//! transaction.
//!
//! With `rate = N/P` and `burst = B` (1 ≤ B ≤ N): the emission interval is
//! `T = ⌈P / N⌉` (in microseconds, the clock's resolution; rounding up keeps the bound)
//! and the tolerance `τ = (B − 1)·T`. A start at time `t` conforms when `t ≥ TAT − τ`,
//! and moves `TAT` to `max(TAT, t) + T`. So at most B start at one instant, one more
//! every T after that, and in any window of length P at most `N + B − 1` start — with
//! the default `B = 1`, at most N: the limit holds in every window of the period, not
//! only in windows aligned to a clock. (Proof sketch, checked by the property test
//! below: the m-th start of a window opened at `s` by a first start at `a ≥ s` needs
//! `t ≥ a + (m − 1)·T − τ`, and `t < s + P ≤ a + P`, so `m < P/T + B ≤ N + B`.)

use std::time::Duration;

use crate::config::Rate;

/// One agent's rate as GCRA's constants, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// Emission interval T.
    interval: i64,
    /// Tolerance τ = (burst − 1)·T.
    tolerance: i64,
}

/// What a claim may take now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    /// The schedule the starts taken now extend: `max(TAT, now)`.
    base: i64,
    /// How many may start at `now` (0..=B).
    pub count: i64,
}

impl Gcra {
    /// `burst` is clamped to `1..=rate.count` (the config refuses anything else).
    pub fn new(rate: Rate, burst: u32) -> Gcra {
        let count = i64::from(rate.count.max(1));
        // Rounded up to the microsecond: a truncated period would space starts a little
        // closer than it.
        let period = i64::try_from(rate.window.as_nanos().div_ceil(1000)).unwrap_or(i64::MAX);
        let interval = (period.saturating_add(count - 1) / count).max(1);
        let burst = i64::from(burst.clamp(1, rate.count.max(1)));
        Gcra {
            interval,
            tolerance: (burst - 1).saturating_mul(interval),
        }
    }

    /// What may start at `now` (µs since the epoch) given the stored `tat`.
    pub fn allowance(&self, tat: i64, now: i64) -> Allowance {
        let base = tat.max(now);
        let slack = now.saturating_add(self.tolerance).saturating_sub(base);
        let count = if slack < 0 {
            0
        } else {
            slack / self.interval + 1
        };
        Allowance { base, count }
    }

    /// The TAT after `taken` (≤ the allowance's count) started at the allowance's `now`.
    pub fn after(&self, a: Allowance, taken: i64) -> i64 {
        a.base
            .saturating_add(taken.clamp(0, a.count).saturating_mul(self.interval))
    }

    /// How long after `now` one more start conforms, given the TAT then (zero: now).
    pub fn wait(&self, tat: i64, now: i64) -> Duration {
        let next = tat.saturating_sub(self.tolerance);
        Duration::from_micros(u64::try_from(next.saturating_sub(now)).unwrap_or(0))
    }

    /// A TAT kept under other constants (a reload changed the rate or burst), brought
    /// within one interval of these: a schedule an earlier, slower rate left hours ahead
    /// does not hold the new one back. Under unchanged constants a TAT far ahead is left
    /// alone (only the database's clock stepping back makes one), since moving it back
    /// could let starts it already counted be counted again.
    pub fn rebase(&self, tat: i64, now: i64) -> i64 {
        tat.min(
            now.saturating_add(self.tolerance)
                .saturating_add(self.interval),
        )
    }

    /// The emission interval T and tolerance τ, in µs, as stored beside the TAT.
    pub fn constants(&self) -> (i64, i64) {
        (self.interval, self.tolerance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rate(count: u32, secs: u64) -> Rate {
        Rate {
            count,
            window: Duration::from_secs(secs),
        }
    }

    /// The most of `times` (sorted) within any half-open window of length `period`.
    fn most_in_any_window(times: &[i64], period: i64) -> usize {
        let (mut most, mut lo) = (0, 0);
        for hi in 0..times.len() {
            while times[hi] - times[lo] >= period {
                lo += 1;
            }
            most = most.max(hi - lo + 1);
        }
        most
    }

    #[test]
    fn a_burst_of_one_spaces_starts_by_the_interval() {
        let g = Gcra::new(rate(20, 5), 1);
        let now = 1_000_000_000;
        let a = g.allowance(0, now);
        assert_eq!(a.count, 1);
        let tat = g.after(a, 1);
        assert_eq!(tat, now + 250_000);
        assert_eq!(g.allowance(tat, now + 249_999).count, 0);
        assert_eq!(g.wait(tat, now + 100_000), Duration::from_micros(150_000));
        assert_eq!(g.allowance(tat, now + 250_000).count, 1);
        // Idle for long: still one at once, no saved-up burst.
        assert_eq!(g.allowance(tat, now + 3_600_000_000).count, 1);
    }

    #[test]
    fn a_burst_allows_that_many_at_once_then_one_per_interval() {
        let g = Gcra::new(rate(60, 60), 10);
        let now = 5_000_000;
        let a = g.allowance(now - 1, now);
        assert_eq!(a.count, 10);
        let tat = g.after(a, 10);
        assert_eq!(g.allowance(tat, now).count, 0);
        assert_eq!(g.wait(tat, now), Duration::from_secs(1));
        assert_eq!(g.allowance(tat, now + 1_000_000).count, 1);
        assert_eq!(g.allowance(tat, now + 3_000_000).count, 3);
        // Taking fewer than allowed moves the TAT by what was taken only.
        assert_eq!(g.after(a, 4), now + 4_000_000);
    }

    #[test]
    fn a_tat_far_ahead_is_waited_for_unless_the_rate_changed() {
        // A TAT an hour ahead under the same rate (the database's clock stepped back):
        // waited for, not polled every interval.
        let g = Gcra::new(rate(10, 1), 2);
        let now = 10_000_000;
        let tat = now + 3_600_000_000;
        assert_eq!(g.allowance(tat, now).count, 0);
        assert_eq!(
            g.wait(tat, now),
            Duration::from_micros(3_600_000_000 - 100_000)
        );
        // Left by another rate (a reload): brought back to one interval, and the claim
        // after that wait gets a start.
        let tat = g.rebase(tat, now);
        assert_eq!(g.wait(tat, now), Duration::from_millis(100));
        assert_eq!(g.allowance(tat, now + 100_000).count, 1);
        // Rebasing never moves a schedule forward.
        assert_eq!(g.rebase(now - 5, now), now - 5);
    }

    #[test]
    fn the_wait_is_zero_exactly_when_a_start_conforms() {
        let g = Gcra::new(rate(20, 5), 3);
        let now = 7_000_000;
        for tat in [
            0,
            now - 1,
            now,
            now + 250_000,
            now + 500_000,
            now + 750_000,
            now + 10_000_000,
        ] {
            assert_eq!(
                g.wait(tat, now).is_zero(),
                g.allowance(tat, now).count > 0,
                "tat {tat}"
            );
        }
    }

    #[test]
    fn intervals_round_up_and_never_reach_zero() {
        assert_eq!(Gcra::new(rate(7, 60), 1).interval, 8_571_429);
        assert_eq!(Gcra::new(rate(1_000_000, 1), 1).interval, 1);
        assert_eq!(Gcra::new(rate(3, 1), 99).tolerance, 2 * 333_334);
        // A period with nanoseconds rounds up: "1/1s 1ns" spaces starts 1.000001 s apart.
        let odd = Rate {
            count: 1,
            window: Duration::new(1, 1),
        };
        assert_eq!(Gcra::new(odd, 1).interval, 1_000_001);
    }

    proptest! {
        /// Claims at arbitrary moments asking for arbitrary numbers: within any window of
        /// the period at most N + B − 1 start (N with B = 1), and a claim that asks when
        /// `wait` says zero gets at least one.
        #[test]
        fn no_window_of_the_period_holds_more_than_n_plus_b_minus_one(
            count in 1u32..40,
            secs in 1u64..4,
            burst_pick in 0u32..40,
            steps in proptest::collection::vec((0i64..400_000, 0i64..8), 1..300),
        ) {
            let burst = burst_pick % count + 1;
            let g = Gcra::new(rate(count, secs), burst);
            let mut tat = 0;
            let mut now = 1_000_000_000;
            let mut starts = Vec::new();
            for (dt, want) in steps {
                now += dt;
                let conforming_now = g.wait(tat, now).is_zero();
                let a = g.allowance(tat, now);
                let taken = want.min(a.count);
                if conforming_now && want > 0 {
                    prop_assert!(taken >= 1);
                }
                tat = g.after(a, taken);
                starts.extend(std::iter::repeat_n(now, taken as usize));
            }
            let most = most_in_any_window(&starts, secs as i64 * 1_000_000);
            prop_assert!(most <= (count + burst - 1) as usize, "{most} > {count} + {burst} - 1");
        }
    }
}
