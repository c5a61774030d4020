//! Paced rollouts: which agents get an `update` message, and when.
//!
//! An operator makes a binary the desired version of its os/arch (optionally for agents
//! with a label, or a percentage of them). An agent whose `hello` reports an older
//! version (any other version, for a rollback) is sent an `update` if the rollout has a
//! free slot: at most `max_concurrent` agents of a rollout are updating at once. A slot is
//! freed when the agent comes back reporting the new version, reports the update failed
//! (`update_result`, protocol version 2), or after ROLLOUT_UPDATE_TIMEOUT. Failures and
//! timeouts feed the rollout's failure brake, which pauses it; a paused rollout offers
//! its build to nobody until an operator resumes it.
//!
//! Slots are claimed in the store (see `store/rollouts.rs`), so replicas agree. Each
//! replica offers free slots to its own connected agents: at once after a hello, and on
//! each tick of its rollout task (ROLLOUT_CHECK_INTERVAL, or sooner when a slot is freed
//! here). Like commands, an update is never pushed through the hub: the task claims a
//! slot in the store and wakes the session, which reads it from the store and sends it.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Storage;
use crate::config::Config;
use crate::error::error_chain;
use crate::hub::Hub;
use crate::ids::{MAX_LABEL_LEN, MAX_LABELS, check_label};
use crate::metrics::{Metrics, UpdateOutcome};
use crate::store::{
    Claim, CurrentRollout, FailureRecord, RolloutRow, RolloutStatus, Store, StoreError,
    UpdateFailure, now_ms,
};

/// What an agent said about itself in its hello, as far as rollouts care.
#[derive(Debug, Clone, Default)]
pub(crate) struct AgentFacts {
    pub version: Option<String>,
    pub os: Option<String>,
    pub arch: Option<String>,
    /// `None`: the hello carried no labels (the stored ones stay).
    pub labels: Option<Vec<String>>,
}

/// An `update` to send: everything an agent needs to fetch and check the binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Offer {
    pub rollout_id: String,
    pub binary_id: String,
    pub name: String,
    pub version: String,
    pub os: String,
    pub arch: String,
    /// Absolute download URL, under SERVER_URL.
    pub url: String,
    pub sha256: String,
    pub size: i64,
    /// A rollback: the agent may install an older version than it runs.
    pub allow_downgrade: bool,
}

#[derive(Debug, Default)]
pub(crate) struct HelloOutcome {
    /// Send this update now.
    pub offer: Option<Offer>,
    /// Part of the hello was refused (invalid labels); tell the agent.
    pub problem: Option<String>,
}

/// Keeps the valid labels (`ids::check_label`, deduplicated, at most [`MAX_LABELS`]) and
/// describes the invalid ones.
pub(crate) fn check_labels(reported: Vec<String>) -> (Vec<String>, Option<String>) {
    let mut valid = Vec::new();
    let mut refused = Vec::new();
    for label in reported {
        if valid.contains(&label) {
            continue;
        }
        if check_label(&label).is_ok() && valid.len() < MAX_LABELS {
            valid.push(label);
        } else {
            refused.push(label);
        }
    }
    let problem = (!refused.is_empty()).then(|| {
        format!(
            "labels ignored: {refused:?}; a hello may carry up to {MAX_LABELS} labels of 1 to {MAX_LABEL_LEN} letters, digits, '.', '_', ':', '/' or '-'"
        )
    });
    (valid, problem)
}

/// How old a temporary upload file must be before it counts as abandoned.
const STALE_UPLOAD_AGE: Duration = Duration::from_secs(24 * 3600);

/// Whether `agent` is within the first `percentage` of agents for this binary. The hash
/// is stable, so raising the percentage of a rollout of the same binary only adds agents.
pub fn selected(binary_id: &str, agent: &str, percentage: i32) -> bool {
    if percentage >= 100 {
        return true;
    }
    let digest = Sha256::new()
        .chain_update(binary_id.as_bytes())
        .chain_update(b"\n")
        .chain_update(agent.as_bytes())
        .finalize();
    let bucket = u64::from_be_bytes(digest[..8].try_into().unwrap_or_default()) % 100;
    (bucket as i64) < i64::from(percentage)
}

/// This replica's rollout service: the cache of active rollouts, the offers to sessions
/// and the task that hands out free slots. A cheap handle (an `Arc`).
#[derive(Clone)]
pub(crate) struct Rollouts(Arc<Inner>);

struct Inner {
    store: Store,
    hub: Hub,
    metrics: Arc<Metrics>,
    /// BINARY_STORAGE_PATH, swept of abandoned uploads when the task starts.
    storage: Storage,
    /// SERVER_URL without a trailing slash: offers carry absolute download URLs.
    server_url: String,
    /// This replica's POD_ID: each replica offers slots to its own agents.
    pod_id: String,
    /// ROLLOUT_UPDATE_TIMEOUT.
    update_timeout: Duration,
    /// ROLLOUT_CHECK_INTERVAL.
    check_interval: Duration,
    /// Current rollouts (active or paused) as last read from the store (at most one
    /// ROLLOUT_CHECK_INTERVAL old): with none, which is the usual case, a session's hello
    /// costs no query. Paused ones are kept so that an agent coming back on their
    /// version still completes its update.
    current: RwLock<Arc<Vec<CurrentRollout>>>,
    /// Wakes the rollout task before its next tick: a slot was freed or a rollout was
    /// started here.
    kick: Notify,
}

impl Rollouts {
    /// The service, with an empty cache until its first round.
    pub(crate) fn new(
        config: &Config,
        store: Store,
        hub: Hub,
        metrics: Arc<Metrics>,
        storage: Storage,
    ) -> Self {
        Rollouts(Arc::new(Inner {
            store,
            hub,
            metrics,
            storage,
            server_url: config.server_url.trim_end_matches('/').to_string(),
            pod_id: config.pod_id.clone(),
            update_timeout: config.releases.rollout_update_timeout,
            check_interval: config.releases.rollout_check_interval,
            current: RwLock::default(),
            kick: Notify::new(),
        }))
    }

    fn current(&self) -> Arc<Vec<CurrentRollout>> {
        self.0
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Asks the rollout task to run now (coalesces).
    pub(crate) fn kick(&self) {
        self.0.kick.notify_one();
    }

    /// Refreshes the cache and offers free slots at once; other replicas follow within
    /// ROLLOUT_CHECK_INTERVAL.
    pub(crate) async fn apply_now(&self) -> Result<(), StoreError> {
        self.refresh().await?;
        self.kick();
        Ok(())
    }

    fn offer_for(&self, target: &CurrentRollout) -> Offer {
        let r = &target.rollout;
        Offer {
            rollout_id: r.id.clone(),
            binary_id: r.binary_id.clone(),
            name: target.name.clone(),
            version: r.version.clone(),
            os: r.os.clone(),
            arch: r.arch.clone(),
            url: format!(
                "{}/api/v1/binaries/{}/download",
                self.0.server_url, r.binary_id
            ),
            sha256: target.sha256.clone(),
            size: target.size_bytes,
            allow_downgrade: r.allow_downgrade,
        }
    }

    /// Called by a session once its hello is stored: records the labels, notices an agent
    /// that came back updated (freeing its slot), and decides whether to send an update now.
    pub(crate) async fn after_hello(
        &self,
        agent: &str,
        epoch: i64,
        facts: AgentFacts,
    ) -> HelloOutcome {
        let mut outcome = HelloOutcome::default();
        let mut labels = None;
        if let Some(reported) = facts.labels {
            let (valid, problem) = check_labels(reported);
            outcome.problem = problem;
            match self
                .0
                .store
                .set_agent_labels(agent.to_string(), valid.clone())
                .await
            {
                // Reported and enrolled labels together, as rollouts target them.
                Ok(all) => labels = Some(all),
                Err(e) => {
                    self.0.metrics.store_errors.inc();
                    tracing::error!(agent, error = %error_chain(&e), "could not store labels");
                    labels = Some(valid);
                }
            }
        }
        let (Some(current), Some(os), Some(arch)) = (facts.version, facts.os, facts.arch) else {
            return outcome;
        };
        let current_rollouts = self.current();
        let (os, arch) = (os.to_lowercase(), arch.to_lowercase());
        let Some(target) = current_rollouts
            .iter()
            .find(|r| r.rollout.os == os && r.rollout.arch == arch)
        else {
            return outcome;
        };
        match self.decide(target, agent, epoch, &current, labels).await {
            Ok(offer) => outcome.offer = offer,
            Err(e) => {
                self.0.metrics.store_errors.inc();
                tracing::error!(agent, error = %error_chain(&e), "could not check the agent's rollout");
            }
        }
        outcome
    }

    async fn decide(
        &self,
        target: &CurrentRollout,
        agent: &str,
        epoch: i64,
        current: &str,
        labels: Option<Vec<String>>,
    ) -> Result<Option<Offer>, StoreError> {
        let r = &target.rollout;
        if !r.wants(current) {
            if self
                .0
                .store
                .finish_update(r.id.clone(), agent.to_string(), now_ms())
                .await?
            {
                self.0.metrics.update_outcome(UpdateOutcome::Updated);
                tracing::info!(agent, version = current, rollout = %r.id, "agent updated");
                self.kick();
            }
            return Ok(None);
        }
        if r.status != RolloutStatus::Active.as_str() {
            return Ok(None);
        }
        if let Some(label) = &r.label {
            let labels = match labels {
                Some(l) => l,
                None => self.0.store.agent_labels(agent.to_string()).await?,
            };
            if !labels.contains(label) {
                return Ok(None);
            }
        }
        if !selected(&r.binary_id, agent, r.percentage) {
            return Ok(None);
        }
        let claim = self
            .0
            .store
            .claim_update(
                r.id.clone(),
                agent.to_string(),
                epoch,
                Some(current.to_string()),
                now_ms(),
            )
            .await?;
        if let Claim::Braked(reason) = &claim {
            self.braked(&r.id, reason);
        }
        Ok((claim == Claim::Offer).then(|| self.offered(target, agent)))
    }

    /// The brake paused rollout `id`: the cache learns it at once.
    fn braked(&self, id: &str, reason: &str) {
        tracing::warn!(rollout = %id, %reason, "rollout paused by its failure brake; resume it with POST /api/v1/rollouts/{id}/resume once the cause is understood");
        self.kick();
    }

    fn offered(&self, target: &CurrentRollout, agent: &str) -> Offer {
        self.0.metrics.updates_offered.inc();
        tracing::info!(agent, version = %target.rollout.version, rollout = %target.rollout.id, "update offered");
        self.offer_for(target)
    }

    /// Called by a session when woken: the update this agent holds a slot for, if it has
    /// not been sent on this connection yet.
    pub(crate) async fn pending_offer(&self, agent: &str, epoch: i64) -> Option<Offer> {
        let current = self.current();
        if !current
            .iter()
            .any(|r| r.rollout.status == RolloutStatus::Active.as_str())
        {
            return None;
        }
        match self.0.store.pending_update(agent.to_string(), epoch).await {
            Ok(Some(rollout_id)) => current
                .iter()
                .find(|r| r.rollout.id == rollout_id)
                .map(|target| self.offered(target, agent)),
            Ok(None) => None,
            Err(e) => {
                self.0.metrics.store_errors.inc();
                tracing::error!(agent, error = %error_chain(&e), "could not check for a pending update");
                None
            }
        }
    }

    /// Re-reads the current rollouts into the cache.
    pub(crate) async fn refresh(&self) -> Result<(), StoreError> {
        let current = self.0.store.current_rollouts().await?;
        *self.0.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(current);
        Ok(())
    }

    /// Called by a session for an `update_result`: `ok` completes the update like a
    /// hello on the new version; `failed` records the agent's reason, frees the slot and
    /// feeds the failure brake. Errors only when the store failed (the agent sends the
    /// report again).
    pub(crate) async fn update_result(
        &self,
        agent: &str,
        rollout_id: &str,
        version: &str,
        status: agent_protocol::UpdateStatus,
        error: Option<String>,
    ) -> Result<(), StoreError> {
        let store = &self.0.store;
        match status {
            agent_protocol::UpdateStatus::Ok => {
                if store
                    .finish_update(rollout_id.to_string(), agent.to_string(), now_ms())
                    .await?
                {
                    self.0.metrics.update_outcome(UpdateOutcome::Updated);
                    tracing::info!(agent, version, rollout = rollout_id, "agent updated");
                    self.kick();
                }
            }
            agent_protocol::UpdateStatus::Failed => {
                let error = error
                    .map(|e| truncate(e.trim(), MAX_ERROR_CHARS))
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "the agent gave no reason".into());
                let record = store
                    .fail_update(
                        rollout_id.to_string(),
                        agent.to_string(),
                        error.clone(),
                        now_ms(),
                    )
                    .await?;
                match record {
                    FailureRecord::Recorded { braked } => {
                        self.0.metrics.update_outcome(UpdateOutcome::Failed);
                        tracing::warn!(agent, version, rollout = rollout_id, %error, "update failed");
                        if let Some(reason) = braked {
                            self.braked(rollout_id, &reason);
                        }
                        self.kick();
                    }
                    FailureRecord::Ignored => {
                        tracing::info!(agent, version, rollout = rollout_id, %error, "update failure reported for an update this agent was not doing; ignored");
                    }
                }
            }
        }
        Ok(())
    }

    /// Candidates read per query.
    const PAGE: i64 = 500;

    /// Offers each active rollout's free slots to agents connected to this replica, and
    /// wakes agents here that hold a slot but were not sent the update on their current
    /// connection. Returns how many slots were claimed.
    pub(crate) async fn dispatch(&self) -> Result<usize, StoreError> {
        let mut claimed = 0;
        let pod = self.0.pod_id.clone();
        for target in self.current().iter() {
            let r = &target.rollout;
            if r.status != RolloutStatus::Active.as_str() {
                continue;
            }
            let counts = self.0.store.update_counts(r.id.clone()).await?;
            for agent in &counts.updating_agents {
                if let Some(session) = self.0.hub.get(agent) {
                    session.wake();
                }
            }
            let mut free = i64::from(r.max_concurrent) - counts.updating;
            let mut after = None;
            'pages: while free > 0 {
                let page = self
                    .0
                    .store
                    .rollout_candidates(r.clone(), pod.clone(), after.clone(), Self::PAGE)
                    .await?;
                after = page.last().map(|(id, _)| id.clone());
                for (agent, current) in &page {
                    if !r.wants(current) || !selected(&r.binary_id, agent, r.percentage) {
                        continue;
                    }
                    let Some(session) = self.0.hub.get(agent) else {
                        continue;
                    };
                    let claim = self
                        .0
                        .store
                        .claim_update(
                            r.id.clone(),
                            agent.clone(),
                            0,
                            Some(current.clone()),
                            now_ms(),
                        )
                        .await?;
                    match claim {
                        Claim::Offer => {
                            session.wake();
                            claimed += 1;
                            free -= 1;
                            if free == 0 {
                                break 'pages;
                            }
                        }
                        Claim::Braked(reason) => {
                            self.braked(&r.id, &reason);
                            break 'pages;
                        }
                        Claim::Full | Claim::Inactive => break 'pages,
                        Claim::AlreadySent | Claim::Finished => {}
                    }
                }
                if (page.len() as i64) < Self::PAGE {
                    break;
                }
            }
        }
        Ok(claimed)
    }

    /// One round of the rollout task: time out stuck updates, refresh the cache, dispatch.
    async fn run_once(&self) -> Result<(), StoreError> {
        let now = now_ms();
        let timeout = self.0.update_timeout.as_millis() as i64;
        let expiry = self.0.store.expire_updates(now - timeout, now).await?;
        for _ in 0..expiry.timed_out {
            self.0.metrics.update_outcome(UpdateOutcome::TimedOut);
        }
        if expiry.timed_out > 0 {
            tracing::warn!(
                agents = expiry.timed_out,
                "updates timed out (agents did not come back with the new version); their slots are free"
            );
        }
        for (id, reason) in &expiry.braked {
            self.braked(id, reason);
        }
        self.refresh().await?;
        self.dispatch().await?;
        Ok(())
    }

    /// The rollout task: a round every ROLLOUT_CHECK_INTERVAL, or at once when kicked,
    /// until `stop`.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let removed = self.0.storage.remove_stale_uploads(STALE_UPLOAD_AGE).await;
        if removed > 0 {
            tracing::info!(files = removed, "removed abandoned temporary upload files");
        }
        let mut tick = tokio::time::interval(self.0.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.0.kick.notified() => {}
            }
            if let Err(e) = self.run_once().await {
                self.0.metrics.store_errors.inc();
                tracing::error!(error = %error_chain(&e), "rollout round failed");
            }
        }
    }

    /// Counts the rollout's agents. Reads every agent of the rollout's os/arch in pages:
    /// this is for operators, not for hot paths.
    pub(crate) async fn progress(&self, r: &RolloutRow) -> Result<Progress, StoreError> {
        let state = &self.0;
        let counts = state.store.update_counts(r.id.clone()).await?;
        let mut p = Progress {
            updating: counts.updating,
            updated: counts.updated,
            timed_out: counts.timed_out,
            failed: counts.failed,
            updating_agents: counts.updating_agents,
            recent_failures: counts
                .recent_failures
                .into_iter()
                .map(RecentFailure::from)
                .collect(),
            ..Progress::default()
        };
        let mut older = 0;
        let mut after = None;
        loop {
            let page = state
                .store
                .agents_for_target(
                    r.os.clone(),
                    r.arch.clone(),
                    r.label.clone(),
                    after.clone(),
                    1000,
                )
                .await?;
            after = page.last().map(|(id, _)| id.clone());
            for (agent, current) in &page {
                if !selected(&r.binary_id, agent, r.percentage) {
                    continue;
                }
                p.targeted += 1;
                match current {
                    Some(v) if !r.wants(v) => p.up_to_date += 1,
                    Some(_) => older += 1,
                    None => p.unknown_version += 1,
                }
            }
            if page.len() < 1000 {
                break;
            }
        }
        p.waiting = (older - p.updating - p.timed_out - p.failed).max(0);
        p.complete =
            r.status == RolloutStatus::Active.as_str() && p.waiting == 0 && p.updating == 0;
        Ok(p)
    }
}

/// How far a rollout has come.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
#[schema(as = RolloutProgress)]
pub(crate) struct Progress {
    /// Agents this rollout concerns: its os/arch (and label), within its percentage.
    pub targeted: i64,
    /// Of those, how many report the target version or newer.
    pub up_to_date: i64,
    /// Sent the update, not back yet; each holds a slot.
    pub updating: i64,
    /// Came back on the new version after this rollout's update.
    pub updated: i64,
    /// Did not come back within ROLLOUT_UPDATE_TIMEOUT; not asked again by this rollout.
    pub timed_out: i64,
    /// Reported the update failed (refused, failed its check, rolled back); not asked
    /// again by this rollout.
    pub failed: i64,
    /// On an older version (another one, for a rollback) and not sent the update yet
    /// (offline, waiting for a slot, or the rollout is paused).
    pub waiting: i64,
    /// Report no version, so cannot be compared.
    pub unknown_version: i64,
    /// Active, and every targeted agent is up to date, failed or timed out.
    pub complete: bool,
    /// Some of the agents updating now (up to 100).
    pub updating_agents: Vec<String>,
    /// The latest failures, newest first (up to 10), with each agent's reason.
    pub recent_failures: Vec<RecentFailure>,
}

/// One failed update as progress shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct RecentFailure {
    /// The agent's `client_id`.
    pub agent_id: String,
    /// The version the agent ran (and, after a rollback, runs again).
    pub from_version: Option<String>,
    /// The agent's reason, up to [`MAX_ERROR_CHARS`] characters.
    pub error: Option<String>,
    /// RFC 3339 UTC.
    pub at: Option<String>,
}

impl From<UpdateFailure> for RecentFailure {
    fn from(f: UpdateFailure) -> Self {
        RecentFailure {
            agent_id: f.agent_id,
            from_version: f.from_version,
            error: f.error,
            at: f.finished_at.map(crate::ids::rfc3339),
        }
    }
}

/// Longest reason kept from an `update_result` (characters).
pub(crate) const MAX_ERROR_CHARS: usize = 500;

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentage_selection_is_stable_and_grows_monotonically() {
        let agents: Vec<String> = (0..2000).map(|i| format!("host-{i}")).collect();
        let count = |pct| agents.iter().filter(|a| selected("bin-1", a, pct)).count();
        let ten = count(10);
        assert!((140..=260).contains(&ten), "about 10% of 2000: {ten}");
        assert_eq!(count(100), 2000);
        for a in &agents {
            if selected("bin-1", a, 10) {
                assert!(selected("bin-1", a, 50), "raising the percentage keeps {a}");
            }
        }
    }

    #[test]
    fn invalid_labels_are_dropped_with_a_reason() {
        let (valid, problem) = check_labels(vec![
            "canary".into(),
            "region:eu-west/1".into(),
            "canary".into(),
            "has space".into(),
            String::new(),
        ]);
        assert_eq!(valid, vec!["canary", "region:eu-west/1"]);
        let problem = problem.unwrap();
        assert!(problem.contains("has space"), "{problem}");
        let (_, none) = check_labels(vec!["ok".into()]);
        assert!(none.is_none());
    }
}
