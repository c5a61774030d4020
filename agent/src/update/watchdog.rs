//! The watchdog: the previous build, started (`agent --update-watchdog STATE_DIR`) by the
//! agent just before it `exec`s into a new build. The new build's own code cannot be
//! trusted to roll itself back (it may hang or crash before it gets the chance), so the
//! code that ran before the switch stands guard: if the new build exits, or has not
//! reached `welcome` by the trial's deadline, the watchdog restores the previous build,
//! records the failure, stops the new build and runs the previous one in its place
//! (under systemd, the unit's restart does the same). It exits as soon as the trial
//! settles otherwise.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use agent_protocol::UpdateStatus;

use super::install;
use super::state::{self, Outcome, Trial};

/// How often the watchdog looks.
const POLL: Duration = Duration::from_millis(100);
/// Bound on the new build's exit after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Restores the previous build and records the update failed with `reason`, if the trial
/// is still unsettled. Returns the trial (to run the previous build) when it did.
/// Whoever calls it first (the watchdog, or the new build itself) acts; the lock makes
/// the others see the outcome.
pub fn roll_back(state_dir: &Path, reason: &str) -> Option<Trial> {
    let settled = state::with(state_dir, |record| {
        let record = record.as_mut()?;
        if record.outcome.is_some() {
            return None;
        }
        let trial = record.trial.clone()?;
        let error = match install::restore(&trial.exe, &trial.previous) {
            Ok(()) => format!("rolled back to {}: {reason}", record.from_version),
            Err(e) => format!("{reason}; and {e}"),
        };
        tracing::error!(version = %record.version, %error, "the update failed");
        record.outcome = Some(Outcome {
            status: UpdateStatus::Failed,
            error: Some(error),
        });
        Some(trial)
    });
    match settled {
        Ok(trial) => trial,
        Err(e) => {
            tracing::error!(error = %e, "cannot record the update's outcome in the state directory");
            None
        }
    }
}

/// Runs the watchdog until the trial settles. Returns an exit code, or does not return
/// when it runs the previous build.
pub fn run(state_dir: &Path) -> i32 {
    loop {
        let Some(record) = state::peek(state_dir) else {
            return 0;
        };
        let Some(trial) = record.trial.clone() else {
            return 0;
        };
        if record.outcome.is_some() {
            return 0;
        }
        let now = crate::journal::now_ms();
        // The new build is our parent (the agent that started us exec'd into it); when it
        // exits we are given another parent.
        let died = std::os::unix::process::parent_id() != trial.pid;
        let reason = if died {
            "the new build exited before it reached welcome".to_string()
        } else if now >= trial.deadline_ms {
            format!(
                "the new build did not reach welcome within {} s",
                trial.timeout_secs
            )
        } else {
            std::thread::sleep(POLL);
            continue;
        };
        tracing::warn!(version = %record.version, %reason, "update watchdog: restoring the previous build");
        let Some(trial) = roll_back(state_dir, &reason) else {
            continue;
        };
        if !died {
            stop(trial.pid);
        }
        let args: Vec<OsString> = trial.args.iter().map(OsString::from).collect();
        let e = install::exec(&trial.exe, &args);
        tracing::error!(error = %e, "update watchdog: cannot run the previous build");
        return 1;
    }
}

/// SIGKILLs the new build (the watchdog's parent) and waits until it is gone.
fn stop(pid: u32) {
    if std::os::unix::process::parent_id() == pid {
        // SAFETY: a plain kill(2). The process is our parent, so its id names no other
        // process (an exited parent is replaced as ours at once).
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
    let started = std::time::Instant::now();
    while std::os::unix::process::parent_id() == pid && started.elapsed() < KILL_WAIT {
        std::thread::sleep(Duration::from_millis(20));
    }
}
