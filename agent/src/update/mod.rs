//! Self-update: what the agent does with an `update` message (`docs/protocol.md`,
//! "Updates").
//!
//! 1. Refuse what it must not install: another os/arch, an older version unless the
//!    update allows a downgrade, a build it cannot replace itself with.
//! 2. Download the build from its own server with its own token, resuming after a cut,
//!    and check its size and sha256 ([`download`]); run it with `--self-check`, which
//!    must print the expected version ([`install::self_check`]).
//! 3. Once no command runs, close the connection, record the trial, rename the build
//!    over its own executable (keeping the previous one), start the [`watchdog`] and
//!    `exec` the new build, which must reach `welcome` within `update_welcome_timeout`,
//!    or the previous build is restored and run.
//! 4. Whichever build runs afterwards reports `update_result` right after `welcome`
//!    until the server acknowledges it ([`state`] keeps it across the `exec`).

pub mod download;
pub mod install;
pub mod state;
pub mod watchdog;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_protocol::{AgentMessage, ServerMessage, UpdateStatus, version};

use crate::VERSION;
use crate::config::{Config, Secret};
use crate::net::Net;
use state::{Outcome, Record, Trial};

/// After the deadline, the new build rolls itself back if the watchdog has not (after a
/// reboot during the trial there is no watchdog).
const SELF_ROLLBACK_GRACE: Duration = Duration::from_secs(5);

/// An `update` message, owned.
#[derive(Clone, Debug)]
pub struct Offer {
    pub rollout_id: String,
    pub version: String,
    pub os: String,
    pub arch: String,
    pub url: String,
    pub sha256: String,
    pub size: i64,
    pub allow_downgrade: bool,
}

impl Offer {
    pub fn from_message(msg: &ServerMessage<'_>) -> Option<Offer> {
        match msg {
            ServerMessage::Update {
                rollout_id,
                version,
                os,
                arch,
                url,
                sha256,
                size,
                allow_downgrade,
                ..
            } => Some(Offer {
                rollout_id: rollout_id.to_string(),
                version: version.to_string(),
                os: os.to_string(),
                arch: arch.to_string(),
                url: url.to_string(),
                sha256: sha256.to_ascii_lowercase(),
                size: *size,
                allow_downgrade: *allow_downgrade,
            }),
            _ => None,
        }
    }

    /// The download's path on the agent's own server: the token never goes to another
    /// host, whatever host the URL names.
    fn path(&self) -> Result<String, String> {
        let uri: http::Uri = self
            .url
            .parse()
            .map_err(|e| format!("the update's url `{}` is not a URL: {e}", self.url))?;
        uri.path_and_query()
            .map(|p| p.as_str().to_string())
            .filter(|p| p.starts_with('/'))
            .ok_or_else(|| format!("the update's url `{}` has no path", self.url))
    }
}

/// What to do with an offer.
pub enum Decision {
    /// Nothing: this update (or another) is being prepared, or this build is on trial.
    Ignore,
    /// Send this `update_result` (already recorded).
    Report(AgentMessage),
    /// Download and check it ([`prepare`]); the updater is busy with it until
    /// [`Updater::failed`] or [`Updater::switch`].
    Prepare(Offer),
}

/// How the trial of a new build ended on `welcome`.
pub enum Confirmation {
    /// This build reached `welcome` in time: the update is complete.
    Confirmed,
    /// The watchdog rolled back meanwhile and is about to stop this process.
    RolledBack,
}

/// The agent's update state within one process.
pub struct Updater {
    state_dir: PathBuf,
    /// This process's executable, or why it cannot be replaced.
    exe: Result<PathBuf, String>,
    /// The agent's arguments (without the program name), for the self-check and `exec`.
    args: Vec<OsString>,
    welcome_timeout: Duration,
    /// This process is a new build on trial: it must reach `welcome` by this deadline
    /// (milliseconds since the Unix epoch).
    trial_deadline: Option<i64>,
    /// The watchdog to reap once the trial settles.
    watchdog: Option<u32>,
    /// The rollout whose update is being prepared.
    busy: Option<String>,
}

impl Updater {
    /// Looks at what a previous process left: a trial this build is on, or an outcome to
    /// report.
    pub fn open(cfg: &Config) -> Updater {
        let mut updater = Updater {
            state_dir: cfg.state_dir.clone(),
            exe: install::current_exe(),
            args: std::env::args_os().skip(1).collect(),
            welcome_timeout: cfg.update_welcome_timeout,
            trial_deadline: None,
            watchdog: None,
            busy: None,
        };
        let record = state::peek(&cfg.state_dir);
        if let Some(Record {
            trial: Some(trial),
            outcome: None,
            version: target,
            ..
        }) = &record
        {
            if version::compare(VERSION, target).is_eq() {
                tracing::info!(
                    version = VERSION,
                    deadline_ms = trial.deadline_ms,
                    "running a new build on trial: it must reach welcome in time"
                );
                updater.trial_deadline = Some(trial.deadline_ms);
                updater.watchdog = trial.watchdog;
            } else {
                // Not the new build: the switch was cut short, or the watchdog's own
                // record was lost. Either way this build runs, so the update failed.
                let reason =
                    format!("the agent started again on {VERSION} before {target} reached welcome");
                let _ = state::with(&cfg.state_dir, |r| {
                    if let Some(r) = r.as_mut().filter(|r| r.outcome.is_none()) {
                        r.outcome = Some(Outcome {
                            status: UpdateStatus::Failed,
                            error: Some(reason.clone()),
                        });
                    }
                });
            }
        }
        updater
    }

    /// The deadline by which this build must reach `welcome`, and after which it rolls
    /// itself back ([`Updater::guard`]), when it is a new build on trial.
    pub fn trial_deadline(&self) -> Option<i64> {
        self.trial_deadline
    }

    /// Rolls back once the trial's deadline (plus a grace for the watchdog) passes
    /// without `welcome`; cancelled when the trial settles. Does not return when it rolls
    /// back: the previous build replaces this process.
    pub async fn guard(state_dir: PathBuf, deadline_ms: i64) {
        let left = deadline_ms - crate::journal::now_ms();
        tokio::time::sleep(Duration::from_millis(left.max(0) as u64) + SELF_ROLLBACK_GRACE).await;
        let reason = "the new build did not reach welcome in time";
        if let Some(trial) = watchdog::roll_back(&state_dir, reason) {
            let args: Vec<OsString> = trial.args.iter().map(OsString::from).collect();
            let e = install::exec(&trial.exe, &args);
            tracing::error!(error = %e, "cannot run the previous build");
            std::process::exit(1);
        }
    }

    /// Called on `welcome` while on trial: the update is complete, unless the watchdog
    /// settled it first.
    pub fn confirm(&mut self) -> Confirmation {
        if self.trial_deadline.take().is_none() {
            return Confirmation::Confirmed;
        }
        let settled = state::with(&self.state_dir, |r| match r.as_mut() {
            Some(r) if r.outcome.is_none() => {
                r.outcome = Some(Outcome {
                    status: UpdateStatus::Ok,
                    error: None,
                });
                Confirmation::Confirmed
            }
            Some(Record {
                outcome:
                    Some(Outcome {
                        status: UpdateStatus::Failed,
                        ..
                    }),
                ..
            }) => Confirmation::RolledBack,
            _ => Confirmation::Confirmed,
        });
        let confirmation = match settled {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot record the update's outcome in the state directory");
                Confirmation::Confirmed
            }
        };
        if let Confirmation::Confirmed = confirmation {
            tracing::info!(
                version = VERSION,
                "the new build reached welcome: update complete"
            );
            if let Some(pid) = self.watchdog.take() {
                // The watchdog exits now; it is this process's child since the exec.
                std::thread::spawn(move || {
                    // SAFETY: waits for our own child; no memory is shared.
                    unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0) };
                });
            }
        }
        confirmation
    }

    /// The `update_result` to send after `welcome`, until the server acknowledges it.
    pub fn report(&self) -> Option<AgentMessage> {
        let record = state::peek(&self.state_dir)?;
        let outcome = record.outcome?;
        Some(AgentMessage::UpdateResult {
            rollout_id: record.rollout_id,
            version: record.version,
            status: outcome.status,
            error: outcome.error,
        })
    }

    /// The server acknowledged the `update_result` of `rollout_id`: forget it. Returns
    /// whether `id` was one.
    pub fn acknowledged(&mut self, id: &str) -> bool {
        state::with(&self.state_dir, |r| {
            let ours = r
                .as_ref()
                .is_some_and(|r| r.rollout_id == id && r.outcome.is_some());
            if ours {
                *r = None;
            }
            ours
        })
        .unwrap_or(false)
    }

    /// The server speaks protocol version 1 and cannot take an `update_result`: the
    /// hello on the new version is all it needs.
    pub fn forget_report(&mut self) {
        let _ = state::with(&self.state_dir, |r| {
            if r.as_ref().is_some_and(|r| r.outcome.is_some()) {
                *r = None;
            }
        });
    }

    /// Decides what to do with an `update`.
    pub fn decide(&mut self, offer: &Offer) -> Decision {
        if self.busy.as_deref() == Some(offer.rollout_id.as_str()) {
            return Decision::Ignore;
        }
        if let Some(record) = state::peek(&self.state_dir)
            && record.rollout_id == offer.rollout_id
            && record.outcome.is_some()
            && let Some(report) = self.report()
        {
            // Offered again before the server stored the outcome: say it again.
            return Decision::Report(report);
        }
        if self.busy.is_some() || self.trial_deadline.is_some() {
            tracing::info!(rollout = %offer.rollout_id, version = %offer.version, "update offered while another one is under way; ignored for now");
            return Decision::Ignore;
        }
        let (os, arch) = (std::env::consts::OS, std::env::consts::ARCH);
        if !offer.os.eq_ignore_ascii_case(os) || !offer.arch.eq_ignore_ascii_case(arch) {
            return self.refuse(
                offer,
                format!(
                    "refused: the build is for {}/{}, this host is {os}/{arch}",
                    offer.os, offer.arch
                ),
            );
        }
        match version::compare(VERSION, &offer.version) {
            std::cmp::Ordering::Equal => {
                return self.record(offer, UpdateStatus::Ok, None);
            }
            std::cmp::Ordering::Greater if !offer.allow_downgrade => {
                return self.refuse(
                    offer,
                    format!(
                        "refused: {} is older than {VERSION}, and the rollout does not allow a downgrade",
                        offer.version
                    ),
                );
            }
            _ => {}
        }
        if let Err(e) = &self.exe {
            return self.refuse(offer, format!("refused: {e}"));
        }
        let valid_sha =
            offer.sha256.len() == 64 && offer.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !valid_sha || offer.size <= 0 {
            return self.refuse(
                offer,
                "refused: the update's sha256 or size is not valid".into(),
            );
        }
        self.busy = Some(offer.rollout_id.clone());
        tracing::info!(rollout = %offer.rollout_id, version = %offer.version, bytes = offer.size, "update offered: downloading");
        Decision::Prepare(offer.clone())
    }

    fn refuse(&mut self, offer: &Offer, error: String) -> Decision {
        self.record(offer, UpdateStatus::Failed, Some(error))
    }

    fn record(&mut self, offer: &Offer, status: UpdateStatus, error: Option<String>) -> Decision {
        match &error {
            Some(e) => {
                tracing::warn!(rollout = %offer.rollout_id, version = %offer.version, error = %e, "update failed")
            }
            None => {
                tracing::info!(rollout = %offer.rollout_id, version = %offer.version, "this build already is the update's version")
            }
        }
        let record = Record {
            rollout_id: offer.rollout_id.clone(),
            version: offer.version.clone(),
            from_version: VERSION.into(),
            trial: None,
            outcome: Some(Outcome {
                status,
                error: error.clone(),
            }),
        };
        if let Err(e) = state::with(&self.state_dir, |r| *r = Some(record)) {
            tracing::error!(error = %e, "cannot record the update's outcome in the state directory; reporting it once");
        }
        Decision::Report(AgentMessage::UpdateResult {
            rollout_id: offer.rollout_id.clone(),
            version: offer.version.clone(),
            status,
            error,
        })
    }

    /// Preparing the update failed: record it; returns the report.
    pub fn failed(&mut self, offer: &Offer, error: String) -> AgentMessage {
        self.busy = None;
        match self.refuse(offer, error) {
            Decision::Report(msg) => msg,
            _ => unreachable!("refuse reports"),
        }
    }

    /// The arguments the self-check runs with.
    pub fn args(&self) -> Vec<OsString> {
        self.args.clone()
    }

    pub fn download_dir(&self) -> PathBuf {
        state::dir(&self.state_dir).join("download")
    }

    /// Switches to the checked `build` and runs it: records the trial, renames the build
    /// over the executable, starts the watchdog and `exec`s. Returns only on failure,
    /// with the previous build in place and the failure recorded.
    pub fn switch(&mut self, offer: &Offer, build: &Path) -> String {
        self.busy = None;
        let exe = match &self.exe {
            Ok(exe) => exe.clone(),
            Err(e) => return self.failed_switch(offer, e.clone(), None),
        };
        let previous = install::previous_of(&exe);
        let trial = Trial {
            exe: exe.clone(),
            previous: previous.clone(),
            pid: std::process::id(),
            deadline_ms: crate::journal::now_ms() + self.welcome_timeout.as_millis() as i64,
            timeout_secs: self.welcome_timeout.as_secs(),
            watchdog: None,
            args: self
                .args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
        };
        let record = Record {
            rollout_id: offer.rollout_id.clone(),
            version: offer.version.clone(),
            from_version: VERSION.into(),
            trial: Some(trial),
            outcome: None,
        };
        if let Err(e) = state::with(&self.state_dir, |r| *r = Some(record)) {
            return self.failed_switch(
                offer,
                format!("cannot record the switch in the state directory: {e}"),
                None,
            );
        }
        if let Err(e) = install::switch(build, &exe) {
            return self.failed_switch(offer, e, None);
        }
        let watchdog = std::process::Command::new(&previous)
            .arg("--update-watchdog")
            .arg(&self.state_dir)
            .stdin(std::process::Stdio::null())
            .spawn();
        match watchdog {
            Ok(child) => {
                let pid = child.id();
                let _ = state::with(&self.state_dir, |r| {
                    if let Some(t) = r.as_mut().and_then(|r| r.trial.as_mut()) {
                        t.watchdog = Some(pid);
                    }
                });
            }
            Err(e) => {
                return self.failed_switch(
                    offer,
                    format!("cannot start the update watchdog: {e}"),
                    Some((&exe, &previous)),
                );
            }
        }
        tracing::info!(version = %offer.version, exe = %exe.display(), previous = %previous.display(), "switched builds; running the new one");
        let e = install::exec(&exe, &self.args);
        self.failed_switch(offer, e, Some((&exe, &previous)))
    }

    fn failed_switch(
        &mut self,
        offer: &Offer,
        error: String,
        restore: Option<(&Path, &Path)>,
    ) -> String {
        let error = match restore.map(|(exe, previous)| install::restore(exe, previous)) {
            Some(Err(e)) => format!("{error}; and {e}"),
            _ => error,
        };
        let _ = self.failed(offer, error.clone());
        error
    }
}

/// Downloads and checks the offered build; returns its path.
pub async fn prepare(
    net: &Net,
    token: &Secret,
    dir: &Path,
    args: &[OsString],
    offer: &Offer,
) -> Result<PathBuf, String> {
    let wanted = download::Wanted {
        path: offer.path()?,
        sha256: offer.sha256.clone(),
        size: offer.size as u64,
    };
    let build = download::fetch(net, token, dir, &wanted).await?;
    install::self_check(&build, args, &offer.version).await?;
    tracing::info!(version = %offer.version, "the new build passed its self-check");
    Ok(build)
}
