//! How many held commands a job may release now: the pure part of a pacer's turn, given
//! the job's row and its commands in flight as read in the turn's transaction
//! (`Store::pace_job`), or as they are when the job is stored (`Store::create_job`
//! releases the first batch itself).
//!
//! Three bounds, all of which hold:
//! - in flight: released commands without a final status stay at or below
//!   `max_in_flight` (released but not yet delivered ones count too, so the bound holds
//!   whatever the sessions are doing);
//! - rate: a token bucket kept as a virtual clock on the job's row (GCRA): after an idle
//!   second at most `rate_per_second` at once, then `rate_per_second` per second, so by
//!   any time t at most `rate · (t − start) + rate` commands were released;
//! - canary: the first `canary` releases go alone; the rest start once every one of them
//!   has a final status.

use crate::store::{JobPacing, JobRow};

/// The rate's credit never covers more than this much idle time.
const BURST_MS: i64 = 1000;

/// Whether [`budget`] depends on the commands in flight: without an in-flight bound and a
/// canary it does not, and a turn need not count them.
pub(crate) fn counts_in_flight(job: &JobRow) -> bool {
    job.max_in_flight != super::UNBOUNDED || job.canary > 0
}

/// Commands the job may release now (never negative), given how many it has released
/// that have no final status yet (`JobCounts::in_flight`).
pub(crate) fn budget(job: &JobRow, pacing: &JobPacing, in_flight: i64, now: i64) -> i64 {
    let mut budget = job.max_in_flight.saturating_sub(in_flight);
    if job.canary > 0 {
        if pacing.released < job.canary {
            budget = budget.min(job.canary - pacing.released);
        } else if pacing.released == job.canary && in_flight > 0 {
            // The canary is out and not finished: the rest wait.
            budget = 0;
        }
    }
    if let Some(rate) = job.rate_per_second {
        budget = budget.min(credit(pacing.release_clock, rate, now));
    }
    budget.max(0)
}

/// Releases the rate allows at `now`, given the clock on the job's row.
fn credit(clock: i64, rate: i64, now: i64) -> i64 {
    let start = clock.max(now - BURST_MS);
    (now - start).max(0).saturating_mul(rate) / 1000
}

/// The job's clock after releasing `n` commands at `now`.
pub(crate) fn advance_clock(job: &JobRow, pacing: &JobPacing, now: i64, n: i64) -> i64 {
    match job.rate_per_second {
        None => now,
        Some(rate) => {
            let start = pacing.release_clock.max(now - BURST_MS);
            // Rounded up, so that the clock never runs ahead of the releases it paid for.
            start + (n * 1000 + rate - 1) / rate
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(max_in_flight: i64, rate: Option<i64>, canary: i64) -> JobRow {
        JobRow {
            id: "j".into(),
            name: "n".into(),
            args: "{}".into(),
            target: "{}".into(),
            status: "running".into(),
            reason: None,
            targeted: 1000,
            canary,
            max_in_flight,
            rate_per_second: rate,
            max_failure_ratio: None,
            min_sample: 10,
            expires_at: None,
            created_at: 0,
            ended_at: None,
            cancelled: 0,
        }
    }

    #[test]
    fn in_flight_bound_leaves_only_the_free_slots() {
        let (j, p) = (job(10, None, 0), JobPacing::default());
        assert_eq!(budget(&j, &p, 0, 5_000), 10);
        assert_eq!(budget(&j, &p, 6, 5_000), 4);
        assert_eq!(budget(&j, &p, 10, 5_000), 0);
    }

    #[test]
    fn canary_goes_alone_and_the_rest_waits_until_it_finished() {
        let j = job(100, None, 5);
        let mut p = JobPacing::default();
        assert_eq!(budget(&j, &p, 0, 0), 5);
        p.released = 5;
        assert_eq!(budget(&j, &p, 3, 0), 0, "canary still running");
        assert_eq!(budget(&j, &p, 0, 0), 100, "canary finished");
        p.released = 105;
        assert_eq!(budget(&j, &p, 40, 0), 60);
    }

    #[test]
    fn rate_allows_one_seconds_burst_then_an_even_pace() {
        let j = job(i64::MAX, Some(10), 0);
        let mut p = JobPacing::default();
        let now = 100_000;
        assert_eq!(budget(&j, &p, 0, now), 10);
        p.release_clock = advance_clock(&j, &p, now, 10);
        assert_eq!(budget(&j, &p, 0, now), 0);
        assert_eq!(budget(&j, &p, 0, now + 250), 2);
        p.release_clock = advance_clock(&j, &p, now + 250, 2);
        assert_eq!(budget(&j, &p, 0, now + 250), 0);
        assert_eq!(budget(&j, &p, 0, now + 350), 1);
    }

    #[test]
    fn rate_releases_never_outrun_rate_times_elapsed_plus_one_burst() {
        let rate = 7;
        let j = job(i64::MAX, Some(rate), 0);
        let mut p = JobPacing::default();
        let start = 50_000;
        let mut released = 0;
        for step in 0..500 {
            let now = start + step * 37;
            let n = budget(&j, &p, 0, now);
            p.release_clock = advance_clock(&j, &p, now, n);
            released += n;
            assert!(
                released <= rate * (now - start) / 1000 + rate,
                "{released} at {now}"
            );
        }
        assert!(
            released >= rate * (500 * 37) / 1000,
            "the rate is used, not starved"
        );
    }
}
