//! The command journal: effectively-once execution over the server's at-least-once
//! delivery.
//!
//! One small JSON file per command in `<state_dir>/journal/`, written (to a temporary file,
//! synced, renamed) *before* the command runs and again with its result *after*. So:
//! - a command delivered again is never run again: its stored result is sent instead;
//! - one that was running when the agent died is reported failed as `interrupted`,
//!   not re-run (it may have had effects);
//! - a result survives `kill -9` until the server acknowledges it; then the file goes.
//!
//! Bounded: entries older than [`MAX_AGE`] are pruned, and at most [`MAX_ENTRIES`] are kept
//! (the oldest finished ones go first).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agent_protocol::ResultStatus;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Results the server never acknowledged are given up after a week.
pub const MAX_AGE: Duration = Duration::from_secs(7 * 86_400);
pub const MAX_ENTRIES: usize = 10_000;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Outcome {
    pub status: ResultStatus,
    pub output: Value,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub name: String,
    /// Milliseconds since the Unix epoch.
    pub started_at: i64,
    /// `None` while the command runs.
    pub outcome: Option<Outcome>,
}

pub struct Journal {
    dir: PathBuf,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Journal {
    /// Opens (creating) the journal and returns the entries it holds, each finished:
    /// entries left running by a previous process are recorded as interrupted.
    pub fn open(state_dir: &Path) -> std::io::Result<(Journal, Vec<Entry>)> {
        let dir = state_dir.join("journal");
        // Directories created here are the agent's alone, like systemd's StateDirectory:
        // the state directory also holds an enrolled agent's token.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let journal = Journal { dir };
        let mut entries = Vec::new();
        for file in std::fs::read_dir(&journal.dir)? {
            let path = file?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                // A write cut short; its previous version (if any) is intact.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let entry = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Entry>(&b).ok());
            match entry {
                Some(mut entry) => {
                    if entry.outcome.is_none() {
                        tracing::warn!(command = %entry.id, name = %entry.name, "command was interrupted by the agent's exit; reporting it failed");
                        entry.outcome = Some(interrupted());
                        journal.write(&entry)?;
                    }
                    entries.push(entry);
                }
                None => {
                    tracing::warn!(path = %path.display(), "unreadable journal entry removed");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let entries = journal.prune(entries, now_ms());
        Ok((journal, entries))
    }

    /// Drops entries past [`MAX_AGE`] and the oldest beyond [`MAX_ENTRIES`].
    fn prune(&self, mut entries: Vec<Entry>, now: i64) -> Vec<Entry> {
        entries.sort_by_key(|e| e.started_at);
        let too_many = entries.len().saturating_sub(MAX_ENTRIES);
        let oldest_kept = now - MAX_AGE.as_millis() as i64;
        let (gone, kept): (Vec<_>, Vec<_>) = entries
            .into_iter()
            .enumerate()
            .partition(|(i, e)| *i < too_many || e.started_at < oldest_kept);
        for (_, e) in gone {
            tracing::warn!(command = %e.id, "result never acknowledged; dropped from the journal");
            self.remove(&e.id);
        }
        kept.into_iter().map(|(_, e)| e).collect()
    }

    /// Records that command `id` is about to run. Must succeed before it runs.
    pub fn begin(&self, id: &str, name: &str) -> std::io::Result<()> {
        self.write(&Entry {
            id: id.into(),
            name: name.into(),
            started_at: now_ms(),
            outcome: None,
        })
    }

    /// Records the result of a command recorded by [`Journal::begin`].
    pub fn finish(&self, entry: &Entry) -> std::io::Result<()> {
        self.write(entry)
    }

    /// The server stored the result: forget the command.
    pub fn remove(&self, id: &str) {
        let _ = std::fs::remove_file(self.path(id));
    }

    fn path(&self, id: &str) -> PathBuf {
        // Server ids are UUIDs; anything else is hex-encoded so it is a safe file name.
        let name = if agent_protocol::check_client_id(id).is_ok() && !id.starts_with('.') {
            id.to_string()
        } else {
            id.bytes().map(|b| format!("{b:02x}")).collect::<String>()
        };
        self.dir.join(format!("{name}.json"))
    }

    fn write(&self, entry: &Entry) -> std::io::Result<()> {
        let path = self.path(&entry.id);
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(entry).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        // The rename itself must reach the disk for the entry to survive a power loss.
        std::fs::File::open(&self.dir)?.sync_all()
    }
}

pub fn interrupted() -> Outcome {
    Outcome {
        status: ResultStatus::Error,
        output: serde_json::json!({
            "error": "interrupted",
            "message": "the agent stopped while this command ran; it was not run again",
        }),
    }
}

/// Finished entries by id, as the agent keeps them until they are acknowledged.
pub fn by_id(entries: Vec<Entry>) -> HashMap<String, Entry> {
    entries.into_iter().map(|e| (e.id.clone(), e)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_running_when_the_agent_died_reopens_as_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let (j, entries) = Journal::open(dir.path()).unwrap();
        assert!(entries.is_empty());
        j.begin("c1", "exec").unwrap();
        j.begin("c2", "ping").unwrap();
        j.finish(&Entry {
            id: "c2".into(),
            name: "ping".into(),
            started_at: now_ms(),
            outcome: Some(Outcome {
                status: ResultStatus::Ok,
                output: serde_json::json!({"pong": true}),
            }),
        })
        .unwrap();
        drop(j);

        let (j, entries) = Journal::open(dir.path()).unwrap();
        let entries = by_id(entries);
        let c1 = entries["c1"].outcome.as_ref().unwrap();
        assert_eq!(c1.status, ResultStatus::Error);
        assert_eq!(c1.output["error"], "interrupted");
        assert_eq!(entries["c2"].outcome.as_ref().unwrap().output["pong"], true);

        j.remove("c1");
        j.remove("c2");
        let (_, entries) = Journal::open(dir.path()).unwrap();
        assert!(entries.is_empty());
    }

    #[test]
    fn old_entries_are_pruned_and_odd_ids_get_safe_file_names() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path()).unwrap();
        let old = Entry {
            id: "../../etc/passwd".into(),
            name: "x".into(),
            started_at: now_ms() - MAX_AGE.as_millis() as i64 - 1,
            outcome: Some(interrupted()),
        };
        j.finish(&old).unwrap();
        assert!(j.path(&old.id).starts_with(dir.path().join("journal")));
        let (_, entries) = Journal::open(dir.path()).unwrap();
        assert!(entries.is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path().join("journal"))
                .unwrap()
                .count(),
            0
        );
    }
}
