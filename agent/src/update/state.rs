//! What the agent remembers about an update across processes: one small JSON file,
//! `<state_dir>/update/update.json`, read and written under an exclusive `flock` on
//! `<state_dir>/update/lock` because three processes may act on it (the build that
//! switched, the new build on trial, and the watchdog).
//!
//! Its life: absent normally; written with a `trial` just before a switch (the new build
//! must reach `welcome` by `deadline_ms`); given an `outcome` when the trial settles (the
//! new build reached `welcome`, or the previous build was restored), or at once when an
//! update fails before any switch; removed when the server acknowledges the
//! `update_result`. Writes go to a temporary file, synced, then renamed.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use agent_protocol::UpdateStatus;
use serde::{Deserialize, Serialize};

/// One update's record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub rollout_id: String,
    /// The version the update installs.
    pub version: String,
    /// The version of the build that received the update.
    pub from_version: String,
    /// Present once the agent switched builds.
    #[serde(default)]
    pub trial: Option<Trial>,
    /// How it ended; `None` while the new build is on trial.
    #[serde(default)]
    pub outcome: Option<Outcome>,
}

/// A switch to a new build, until it settles.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    /// The agent's executable, which now holds the new build.
    pub exe: PathBuf,
    /// The previous build, kept beside it.
    pub previous: PathBuf,
    /// The agent's process id (the same across `exec`).
    pub pid: u32,
    /// Milliseconds since the Unix epoch by which the new build must reach `welcome`.
    pub deadline_ms: i64,
    /// The bound, for messages (seconds).
    pub timeout_secs: u64,
    /// The watchdog process (a child of `pid`), once started.
    #[serde(default)]
    pub watchdog: Option<u32>,
    /// The arguments the agent runs with, to run the previous build the same way.
    pub args: Vec<String>,
}

/// How an update ended, as `update_result` reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub status: UpdateStatus,
    #[serde(default)]
    pub error: Option<String>,
}

/// The update directory under the state directory.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("update")
}

fn path(state_dir: &Path) -> PathBuf {
    dir(state_dir).join("update.json")
}

/// Reads the record without the lock (for a quick look; decisions take the lock).
pub fn peek(state_dir: &Path) -> Option<Record> {
    let bytes = std::fs::read(path(state_dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Runs `f` on the record under the lock, then stores what `f` left (removing the file
/// for `None`) if it changed.
pub fn with<T>(state_dir: &Path, f: impl FnOnce(&mut Option<Record>) -> T) -> std::io::Result<T> {
    let dir = dir(state_dir);
    std::fs::create_dir_all(&dir)?;
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    // SAFETY: flock on a descriptor we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = peek(state_dir);
    let mut record = before.clone();
    let out = f(&mut record);
    if record != before {
        write(state_dir, record.as_ref())?;
    }
    drop(lock);
    Ok(out)
}

fn write(state_dir: &Path, record: Option<&Record>) -> std::io::Result<()> {
    let path = path(state_dir);
    match record {
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        },
        Some(record) => {
            let tmp = path.with_extension("tmp");
            let mut f = File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
        }
    }
    File::open(dir(state_dir))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_and_is_removed_with_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(peek(dir.path()), None);
        let record = Record {
            rollout_id: "r".into(),
            version: "1.1.0".into(),
            from_version: "1.0.0".into(),
            trial: None,
            outcome: Some(Outcome {
                status: UpdateStatus::Failed,
                error: Some("no".into()),
            }),
        };
        with(dir.path(), |r| *r = Some(record.clone())).unwrap();
        assert_eq!(peek(dir.path()), Some(record));
        with(dir.path(), |r| *r = None).unwrap();
        assert_eq!(peek(dir.path()), None);
    }
}
