//! The failure brake: once enough results are in, a job whose failed ÷ finished exceeds
//! its `max_failure_ratio` is paused (by `Store::pace_job`, in the pacer's transaction)
//! and releases nothing more until an operator resumes or cancels it.
//!
//! Finished means a result arrived (`succeeded` or `failed`); expired commands are not
//! results and judge nothing. After a resume the sample starts again: the job's row
//! keeps the counts already judged (`brake_failed`, `brake_finished`).

use crate::store::{JobCounts, JobPacing, JobRow};

/// The reason to pause the job, if the brake trips.
pub(crate) fn verdict(job: &JobRow, pacing: &JobPacing, counts: &JobCounts) -> Option<String> {
    let max = job.max_failure_ratio?;
    let failed = counts.failed - pacing.brake_failed;
    let finished = counts.finished() - pacing.brake_finished;
    if finished < job.min_sample.max(1) {
        return None;
    }
    let ratio = failed as f64 / finished as f64;
    (ratio > max).then(|| {
        format!(
            "failure brake: {failed} of {finished} results failed (ratio {ratio:.3}), above max_failure_ratio {max}"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::pacing::tests::job;

    fn results(succeeded: i64, failed: i64) -> JobCounts {
        JobCounts {
            succeeded,
            failed,
            ..JobCounts::default()
        }
    }

    #[test]
    fn brake_waits_for_the_minimum_sample() {
        let p = JobPacing::default();
        let mut j = job(10, None, 0);
        j.max_failure_ratio = Some(0.2);
        j.min_sample = 10;
        assert_eq!(verdict(&j, &p, &results(0, 9)), None);
        let reason = verdict(&j, &p, &results(1, 9)).expect("trips at the sample");
        assert!(reason.contains("9 of 10 results failed"), "{reason}");
    }

    #[test]
    fn brake_trips_only_above_the_ratio() {
        let p = JobPacing::default();
        let mut j = job(10, None, 0);
        j.max_failure_ratio = Some(0.25);
        j.min_sample = 4;
        assert_eq!(
            verdict(&j, &p, &results(3, 1)),
            None,
            "exactly at the ratio"
        );
        assert!(verdict(&j, &p, &results(5, 2)).is_some());
    }

    #[test]
    fn after_a_resume_only_new_results_count() {
        let mut j = job(10, None, 0);
        j.max_failure_ratio = Some(0.5);
        j.min_sample = 4;
        let p = JobPacing {
            brake_failed: 8,
            brake_finished: 10,
            ..JobPacing::default()
        };
        assert_eq!(verdict(&j, &p, &results(4, 9)), None, "3 new results");
        assert_eq!(verdict(&j, &p, &results(6, 9)), None, "1 of 5 new failed");
        assert!(
            verdict(&j, &p, &results(3, 12)).is_some(),
            "4 of 5 new failed"
        );
    }

    #[test]
    fn no_ratio_means_no_brake() {
        assert_eq!(
            verdict(&job(10, None, 0), &JobPacing::default(), &results(0, 1000)),
            None
        );
    }
}
