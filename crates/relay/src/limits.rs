//! Rate limits. `Bucket`, a token bucket in 8 bytes: `rate` events per second on average,
//! `burst` at once, for the per-connection message rate (the relay) and the per-address
//! upgrade rate (`client_addr::Admission`). Time is milliseconds on a clock the owner keeps
//! (`Clock`), so a bucket holds no `Instant`. `Throttle`: at most one log line a second about
//! one kind of event, whatever a flood does.

use std::time::Instant;

/// Milliseconds since the owner's start, wrapping after 49 days (differences stay right).
#[derive(Clone, Copy, Debug)]
pub struct Clock(Instant);

impl Default for Clock {
    fn default() -> Clock {
        Clock(Instant::now())
    }
}

impl Clock {
    pub fn now_ms(&self) -> u32 {
        self.0.elapsed().as_millis() as u32
    }
}

/// One log line per second at most: when the last one was written, and how many events were
/// not logged since (the next line says how many it stands for).
#[derive(Clone, Copy, Debug, Default)]
pub struct Throttle {
    at_ms: Option<u32>,
    unlogged: u64,
}

impl Throttle {
    /// `Some(events not logged since the last line)` when a line may be written now.
    pub fn ready(&mut self, now_ms: u32) -> Option<u64> {
        if let Some(at) = self.at_ms
            && now_ms.wrapping_sub(at) < 1000
        {
            self.unlogged += 1;
            return None;
        }
        self.at_ms = Some(now_ms);
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    tokens: f32,
    at_ms: u32,
}

impl Bucket {
    /// A bucket with its whole burst available.
    pub fn full(burst: u32, now_ms: u32) -> Bucket {
        Bucket {
            tokens: burst as f32,
            at_ms: now_ms,
        }
    }

    fn refill(&mut self, rate: u32, burst: u32, now_ms: u32) {
        let elapsed = now_ms.wrapping_sub(self.at_ms) as f32 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate as f32).min(burst as f32);
        self.at_ms = now_ms;
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, rate: u32, burst: u32, now_ms: u32) -> bool {
        self.refill(rate, burst, now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket has refilled entirely: keeping it would change nothing, so its
    /// owner may forget it.
    pub fn is_full(&self, rate: u32, burst: u32, now_ms: u32) -> bool {
        let mut b = *self;
        b.refill(rate, burst, now_ms);
        b.tokens >= burst as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_burst_then_the_rate() {
        let mut b = Bucket::full(3, 0);
        assert!((0..3).all(|_| b.take(10, 3, 0)));
        assert!(!b.take(10, 3, 0));
        assert!(!b.take(10, 3, 50), "half a token after 50 ms at 10/s");
        assert!(b.take(10, 3, 100));
        assert!(!b.is_full(10, 3, 200));
        assert!(b.is_full(10, 3, 400));
        assert!(
            b.take(10, 3, u32::MAX / 2),
            "a long pause refills to the burst, not beyond"
        );
        assert!(b.take(10, 3, u32::MAX / 2) && b.take(10, 3, u32::MAX / 2));
        assert!(!b.take(10, 3, u32::MAX / 2));
    }

    #[test]
    fn a_throttle_says_one_line_a_second_and_how_many_it_stands_for() {
        let mut t = Throttle::default();
        assert_eq!(t.ready(0), Some(0));
        assert_eq!(t.ready(10), None);
        assert_eq!(t.ready(999), None);
        assert_eq!(t.ready(1000), Some(2));
        assert_eq!(t.ready(5000), Some(0));
    }

    proptest! {
        /// Over any sequence of attempts, what is taken never exceeds the burst plus the rate
        /// times the time passed.
        #[test]
        fn never_more_than_burst_plus_rate_times_time(
            rate in 1u32..1000, burst in 1u32..100,
            steps in proptest::collection::vec(0u32..50, 1..400),
        ) {
            let mut b = Bucket::full(burst, 0);
            let (mut now, mut taken) = (0u32, 0u64);
            for step in steps {
                now += step;
                if b.take(rate, burst, now) {
                    taken += 1;
                }
            }
            let allowed = burst as u64 + (rate as u64 * now as u64).div_ceil(1000);
            prop_assert!(taken <= allowed, "{taken} > {allowed}");
        }
    }
}
