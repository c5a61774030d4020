//! The failure brake, shared by fleet jobs and rollouts: once enough outcomes are in,
//! work whose failed ÷ finished exceeds its `max_failure_ratio` is paused, and goes no
//! further until an operator resumes (or cancels) it.
//!
//! The store applies it in the same transaction that would release more work (a job's
//! pacer turn, a rollout's slot claim) or that records a failure, so replicas agree. After
//! a resume the sample starts again: the row keeps the counts already judged (the
//! baseline), and only outcomes since then count.

/// A brake's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Brake {
    /// Pause when failed ÷ finished exceeds this (0 to 1); `None`: never.
    pub max_failure_ratio: Option<f64>,
    /// Outcomes needed (since the last resume) before the brake may trip; at least 1.
    pub min_sample: i64,
}

/// Outcomes counted so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub failed: i64,
    /// Failed and succeeded together.
    pub finished: i64,
}

/// The reason to pause, if the brake trips on `total` outcomes of which `judged` were
/// already judged before the last resume. `what` names the outcomes in the reason
/// (`results`, `updates`).
pub(crate) fn verdict(brake: Brake, total: Tally, judged: Tally, what: &str) -> Option<String> {
    let max = brake.max_failure_ratio?;
    let failed = total.failed - judged.failed;
    let finished = total.finished - judged.finished;
    if finished < brake.min_sample.max(1) {
        return None;
    }
    let ratio = failed as f64 / finished as f64;
    (ratio > max).then(|| {
        format!(
            "failure brake: {failed} of {finished} {what} failed (ratio {ratio:.3}), above max_failure_ratio {max}"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brake(max: f64, min_sample: i64) -> Brake {
        Brake {
            max_failure_ratio: Some(max),
            min_sample,
        }
    }

    fn outcomes(succeeded: i64, failed: i64) -> Tally {
        Tally {
            failed,
            finished: succeeded + failed,
        }
    }

    const NONE: Tally = Tally {
        failed: 0,
        finished: 0,
    };

    #[test]
    fn brake_waits_for_the_minimum_sample() {
        let b = brake(0.2, 10);
        assert_eq!(verdict(b, outcomes(0, 9), NONE, "results"), None);
        let reason = verdict(b, outcomes(1, 9), NONE, "results").expect("trips at the sample");
        assert!(reason.contains("9 of 10 results failed"), "{reason}");
    }

    #[test]
    fn brake_trips_only_above_the_ratio() {
        let b = brake(0.25, 4);
        assert_eq!(
            verdict(b, outcomes(3, 1), NONE, "updates"),
            None,
            "exactly at the ratio"
        );
        assert!(verdict(b, outcomes(5, 2), NONE, "updates").is_some());
    }

    #[test]
    fn after_a_resume_only_new_outcomes_count() {
        let b = brake(0.5, 4);
        let judged = Tally {
            failed: 8,
            finished: 10,
        };
        assert_eq!(verdict(b, outcomes(4, 9), judged, "x"), None, "3 new");
        assert_eq!(
            verdict(b, outcomes(6, 9), judged, "x"),
            None,
            "1 of 5 new failed"
        );
        assert!(
            verdict(b, outcomes(3, 12), judged, "x").is_some(),
            "4 of 5 new failed"
        );
    }

    #[test]
    fn no_ratio_means_no_brake() {
        let b = Brake {
            max_failure_ratio: None,
            min_sample: 1,
        };
        assert_eq!(verdict(b, outcomes(0, 1000), NONE, "results"), None);
    }
}
