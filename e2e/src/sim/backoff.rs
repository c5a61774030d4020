//! Full-jitter exponential backoff (`docs/protocol.md`): a random delay between zero and
//! `min(cap, base × 2^attempt)`, so that a fleet cut off at the same instant does not come
//! back in lockstep.

use std::time::Duration;

use rand::Rng;

#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// Ceiling of the first delay.
    pub base: Duration,
    /// Ceiling of every delay.
    pub cap: Duration,
}

impl Backoff {
    /// The ceiling for this attempt (0 for the first retry).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A random delay in `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        uniform(self.ceiling(attempt))
    }
}

/// A random duration in `[0, max]`, at millisecond resolution.
pub fn uniform(max: Duration) -> Duration {
    let ms = max.as_millis().min(u128::from(u64::MAX)) as u64;
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_from_base_up_to_cap() {
        let b = Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
        };
        assert_eq!(b.ceiling(0), Duration::from_secs(1));
        assert_eq!(b.ceiling(3), Duration::from_secs(8));
        assert_eq!(b.ceiling(6), Duration::from_secs(60));
        assert_eq!(b.ceiling(200), Duration::from_secs(60));
    }

    #[test]
    fn delays_stay_within_the_ceiling() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
        };
        for attempt in 0..20 {
            assert!(b.delay(attempt) <= b.ceiling(attempt));
        }
    }
}
