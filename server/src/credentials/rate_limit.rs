//! A per-source-address token bucket for unauthenticated routes (enrollment).
//!
//! In-process and per replica: a client spread over N replicas gets N times the rate,
//! which is fine for its purpose (making secret guessing slow, not exact quotas).
//! Memory is bounded: at most `max_addresses` buckets; when full, buckets that have
//! refilled are forgotten, and if none has, newcomers share one overflow bucket.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Token buckets keyed by client address: a burst of attempts at once, then a steady rate
/// per second (see [`RateLimiter::new`]).
pub struct RateLimiter {
    /// Tokens added per second.
    rate: f64,
    /// Bucket size: how many requests a quiet address may make at once.
    burst: f64,
    max_addresses: usize,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// The key newcomers share once the table is full of active addresses.
const OVERFLOW: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

impl RateLimiter {
    /// `burst` requests at once, then `per_second`; state for at most `max_addresses`.
    pub fn new(burst: u32, per_second: f64, max_addresses: usize) -> Self {
        RateLimiter {
            rate: per_second.max(f64::MIN_POSITIVE),
            burst: f64::from(burst.max(1)),
            max_addresses: max_addresses.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `addr`, or says how long until one is available.
    pub fn check(&self, addr: IpAddr) -> Result<(), Duration> {
        self.check_at(addr, Instant::now())
    }

    pub(crate) fn check_at(&self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut key = normalise(addr);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(&key) && buckets.len() >= self.max_addresses {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| refill(b, now, rate, burst) < burst);
            if buckets.len() >= self.max_addresses {
                key = OVERFLOW;
            }
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        let tokens = refill(bucket, now, self.rate, self.burst);
        bucket.updated = now;
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            Ok(())
        } else {
            bucket.tokens = tokens;
            Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
        }
    }

    /// Addresses currently tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

fn refill(bucket: &Bucket, now: Instant, rate: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
    (bucket.tokens + elapsed * rate).min(burst)
}

/// One bucket per IPv4 address and per IPv6 /64 (a host usually owns a whole /64, so
/// per-address buckets would be free to multiply).
fn normalise(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn burst_then_refused_with_a_retry_delay_then_refilled() {
        let limiter = RateLimiter::new(3, 1.0, 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check_at(ip("10.0.0.1"), t0).is_ok());
        }
        let wait = limiter.check_at(ip("10.0.0.1"), t0).unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1));
        assert!(
            limiter.check_at(ip("10.0.0.2"), t0).is_ok(),
            "other addresses unaffected"
        );
        assert!(
            limiter
                .check_at(ip("10.0.0.1"), t0 + Duration::from_secs(1))
                .is_ok()
        );
    }

    #[test]
    fn ipv6_addresses_of_one_slash_64_share_a_bucket() {
        let limiter = RateLimiter::new(1, 1.0, 100);
        let t0 = Instant::now();
        assert!(limiter.check_at(ip("2001:db8:1:2::1"), t0).is_ok());
        assert!(limiter.check_at(ip("2001:db8:1:2::ffff"), t0).is_err());
        assert!(limiter.check_at(ip("2001:db8:1:3::1"), t0).is_ok());
    }

    #[test]
    fn memory_stays_bounded_under_many_addresses() {
        let limiter = RateLimiter::new(2, 1.0, 50);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let _ = limiter.check_at(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(limiter.tracked() <= 51, "{}", limiter.tracked());
        // Once they have refilled, the table makes room for newcomers.
        let later = t0 + Duration::from_secs(5);
        assert!(limiter.check_at(ip("192.0.2.1"), later).is_ok());
        assert!(limiter.tracked() <= 51);
    }
}
