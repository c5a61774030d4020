//! Periodic background tasks. Each task is a struct built from the narrow handles it uses
//! (store, hub, metrics, its own settings), never the whole application, so it can be
//! built and run on its own. The assembly (`app.rs`) spawns them on the lifecycle's
//! tracker with [`spawn_periodic`], the way `Cluster::run_subscriber` is spawned.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::credentials::RevocationRefresh;
use crate::error::error_chain;
use crate::hub::Hub;
use crate::hub::cluster::Cluster;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::store::{CommandStatus, Store, StoreError, now_ms};
use crate::ws::protocol;

/// One round of a periodic job.
pub(crate) trait Task: Send + Sync + 'static {
    /// Does one round's work; failures are counted and logged inside.
    fn run_once(&self) -> impl Future<Output = ()> + Send;
}

/// Runs `job` every `period` (the first round at once) until the lifecycle stops; with
/// `resync`, also at once whenever the cluster asks for a resync (wake-ups may have been
/// lost while Redis was away).
pub(crate) fn spawn_periodic<J: Task>(
    lifecycle: &Lifecycle,
    period: Duration,
    resync: Option<Arc<Cluster>>,
    job: J,
) {
    let stop = lifecycle.stop().clone();
    lifecycle.tasks().spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = resynced(resync.as_deref()) => {}
            }
            job.run_once().await;
        }
    });
}

/// Resolves when the cluster asks for a resync; never without one.
async fn resynced(cluster: Option<&Cluster>) {
    match cluster {
        Some(cluster) => cluster.resync.notified().await,
        None => std::future::pending().await,
    }
}

/// Writes `last_seen` for the agents heard from since the last round.
pub(crate) struct PresenceRefresh {
    pub(crate) store: Store,
    pub(crate) hub: Hub,
    pub(crate) metrics: Arc<Metrics>,
}

impl Task for PresenceRefresh {
    async fn run_once(&self) {
        let ids: Vec<String> = self
            .hub
            .sessions()
            .into_iter()
            .filter(|s| s.take_active())
            .map(|s| s.client_id.clone())
            .collect();
        if let Err(e) = self.store.touch_agents(ids, now_ms()).await {
            self.metrics.store_errors.inc();
            tracing::error!(error = %error_chain(&e), "presence refresh failed");
        }
    }
}

/// Marks agents of dead replicas offline, expires commands past their TTL, and wakes
/// local sessions that still have pending commands (a wake-up may have been lost).
pub(crate) struct Sweep {
    pub(crate) store: Store,
    pub(crate) hub: Hub,
    pub(crate) metrics: Arc<Metrics>,
    /// An agent not refreshed for this long is offline: OFFLINE_TIMEOUT plus one
    /// HEARTBEAT_INTERVAL, so one late refresh does not flap it.
    pub(crate) grace: Duration,
}

impl Sweep {
    async fn sweep(&self) -> Result<(), StoreError> {
        let now = now_ms();
        let offline = self
            .store
            .mark_stale_offline(now - self.grace.as_millis() as i64)
            .await?;
        if offline > 0 {
            tracing::info!(
                agents = offline,
                "marked agents offline after missed presence refreshes"
            );
        }
        let expired = self.store.expire_commands(now).await?;
        if expired > 0 {
            self.metrics.command(CommandStatus::Expired, expired as u64);
            tracing::info!(commands = expired, "expired commands past their TTL");
        }
        for client_id in pending_here(&self.hub, &self.store).await? {
            self.hub.wake(&client_id);
        }
        Ok(())
    }
}

/// The agents connected to this replica that have commands waiting for them.
async fn pending_here(hub: &Hub, store: &Store) -> Result<Vec<String>, StoreError> {
    let local = hub.sessions().iter().map(|s| s.client_id.clone()).collect();
    store.agents_with_pending(local).await
}

impl Task for Sweep {
    async fn run_once(&self) {
        if let Err(e) = self.sweep().await {
            self.metrics.store_errors.inc();
            tracing::error!(error = %error_chain(&e), "sweep failed");
        }
    }
}

/// While Redis is unreachable, wakes this replica's sessions that have pending commands:
/// a command queued through another replica cannot be announced then, and without this
/// it would wait for the next sweep. Does nothing while Redis answers.
pub(crate) struct OutagePoll {
    pub(crate) store: Store,
    pub(crate) hub: Hub,
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) metrics: Arc<Metrics>,
}

impl Task for OutagePoll {
    async fn run_once(&self) {
        if self.cluster.is_healthy() {
            return;
        }
        match pending_here(&self.hub, &self.store).await {
            Ok(pending) => pending.iter().for_each(|id| {
                self.hub.wake(id);
            }),
            Err(e) => {
                // The sweep logs a failing store; this runs too often to log each time.
                self.metrics.store_errors.inc();
                tracing::debug!(error = %error_chain(&e), "outage poll failed");
            }
        }
    }
}

/// Re-claims this replica's registry entries and closes sessions a newer connection
/// replaced. Re-claiming every entry is also how a flushed or restarted Redis is
/// repopulated within one heartbeat interval.
pub(crate) struct RegistryRefresh {
    pub(crate) hub: Hub,
    pub(crate) cluster: Arc<Cluster>,
}

impl Task for RegistryRefresh {
    async fn run_once(&self) {
        for stale in self.cluster.refresh(&self.hub.sessions()).await {
            stale.close(protocol::REPLACED);
        }
    }
}

/// Removes expired web UI sessions.
pub(crate) struct UiSessionSweep {
    pub(crate) store: Store,
    pub(crate) metrics: Arc<Metrics>,
}

impl Task for UiSessionSweep {
    async fn run_once(&self) {
        if let Err(e) = self.store.delete_expired_ui_sessions(now_ms()).await {
            self.metrics.store_errors.inc();
            tracing::error!(error = %error_chain(&e), "could not remove expired UI sessions");
        }
    }
}

impl Task for RevocationRefresh {
    async fn run_once(&self) {
        if let Err(e) = self.refresh().await {
            // Sessions watch again at their next ping; until the database answers,
            // the cache's entries age out and lost revocations wait.
            tracing::warn!(error = %error_chain(&e), "could not refresh the credentials live sessions hold");
        }
    }
}
