//! Assembly: builds the shared state, binds the listener, runs the background tasks and
//! the drain sequence.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Tokens;
use crate::binaries::Fleet;
use crate::config::{Config, Secret, SecretKeySource, load_or_create_secret};
use crate::http::error::error_chain;
use crate::http::ui::UiState;
use crate::hub::cluster::Cluster;
use crate::hub::{Hub, rebalance};
use crate::metrics::Metrics;
use crate::store::{CommandStatus, Store, StoreError, now_ms};
use crate::ws::protocol;

/// Everything a request or session needs; cloned per connection (an `Arc`).
pub type AppState = Arc<State>;

pub struct State {
    pub config: Arc<Config>,
    pub store: Store,
    pub hub: Hub,
    pub tokens: Tokens,
    pub metrics: Arc<Metrics>,
    /// Set at SIGTERM: readiness fails and new WebSocket upgrades get 503.
    pub draining: AtomicBool,
    /// Every WebSocket session and background task; shutdown waits for them.
    pub tasks: TaskTracker,
    /// Cancelled at the end of shutdown to stop background tasks.
    pub stop: CancellationToken,
    /// Binaries on the shared volume and the rollouts of new versions.
    pub fleet: Fleet,
    /// The web UI's sign-in and event streams.
    pub ui: UiState,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not read or create the signing key: {0}")]
    Secret(#[source] std::io::Error),
    #[error("could not read or create the web UI's admin password: {0}")]
    AdminPassword(#[source] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid Redis settings: {0}")]
    Redis(#[source] redis::RedisError),
    #[error("could not listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Resolves the signing key: SECRET_KEY, or the embedded default's generated file.
pub fn signing_key(config: &Config) -> Result<Secret, StartError> {
    match &config.secret_key {
        SecretKeySource::Given(secret) => Ok(secret.clone()),
        SecretKeySource::DataDir(path) => load_or_create_secret(path).map_err(StartError::Secret),
    }
}

pub struct Application {
    listener: TcpListener,
    state: AppState,
}

impl Application {
    /// Opens the store (running migrations) and binds the listener; port 0 picks a free port.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let secret = signing_key(&config)?;
        let store = {
            let (url, size) = (config.database.clone(), config.database_pool_size);
            tokio::task::spawn_blocking(move || Store::open(&url, size))
                .await
                .map_err(|_| StoreError::Task)??
        };
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let metrics = Arc::new(Metrics::new());
        let cluster = match &config.redis {
            None => None,
            Some(redis) => Some(Arc::new(
                Cluster::new(
                    redis,
                    config.pod_id.clone(),
                    config.heartbeat_interval,
                    config.offline_timeout,
                    metrics.clone(),
                )
                .map_err(StartError::Redis)?,
            )),
        };
        let ui = UiState::new(&config).map_err(StartError::AdminPassword)?;
        let state = Arc::new(State {
            fleet: Fleet::new(&config),
            ui,
            tokens: Tokens::new(&secret, config.jwt_algorithm),
            hub: Hub::new(metrics.clone(), cluster),
            config: Arc::new(config),
            store,
            metrics,
            draining: AtomicBool::new(false),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        });
        Ok(Application { listener, state })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then drains: readiness fails at once, agents are
    /// closed with 1012 over DRAIN_WINDOW, in-flight requests finish, all within
    /// SHUTDOWN_TIMEOUT. Returns whether everything finished in time.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> bool {
        let Application { listener, state } = self;
        spawn_background(&state);

        let stop_accepting = CancellationToken::new();
        let server = tokio::spawn(crate::http::serve(
            listener,
            state.clone(),
            stop_accepting.clone(),
        ));

        shutdown.await;
        let started = Instant::now();
        let deadline = started + state.config.shutdown_timeout;
        tracing::info!(
            agents = state.hub.len(),
            timeout = ?state.config.shutdown_timeout,
            "shutdown requested; draining"
        );
        state.draining.store(true, Ordering::SeqCst);
        state.metrics.draining.set(1);
        if let Some(cluster) = state.hub.cluster() {
            // Out of the counts at once, so no replica sheds agents toward this one.
            cluster.leave().await;
        }

        // Requests keep being served while agents leave: in Kubernetes the endpoint is
        // being removed concurrently, and in-flight API calls must still succeed.
        tokio::time::sleep(state.config.drain_delay).await;
        close_sessions_gradually(&state, state.config.drain_window).await;

        stop_accepting.cancel();
        let connections = server.await.ok();
        state.stop.cancel();
        state.tasks.close();
        let finished = tokio::time::timeout_at(deadline, async {
            if let Some(connections) = connections {
                connections.wait().await;
            }
            state.tasks.wait().await;
        })
        .await
        .is_ok();
        if finished {
            tracing::info!(elapsed = ?started.elapsed(), "drained; exiting");
        } else {
            tracing::warn!(
                sessions = state.hub.len(),
                "shutdown timeout reached with work still in flight; exiting anyway"
            );
        }
        finished
    }
}

/// Closes every session with 1012, spread evenly over `window` so agents do not all
/// reconnect in the same second. Sessions that arrive meanwhile (an upgrade that passed
/// the draining check just before it was set) are closed at the end.
async fn close_sessions_gradually(state: &AppState, window: Duration) {
    let sessions = state.hub.sessions();
    let start = Instant::now();
    let n = sessions.len().max(1) as u32;
    for (i, session) in sessions.iter().enumerate() {
        tokio::time::sleep_until(start + window * i as u32 / n).await;
        session.close(protocol::DRAINING);
    }
    for session in state.hub.sessions() {
        session.close(protocol::DRAINING);
    }
}

/// The periodic tasks, all stopped by `state.stop`: presence, the sweep, the cluster's,
/// rollouts (`binaries::rollout`) and the UI's housekeeping (`http::ui`).
fn spawn_background(state: &AppState) {
    crate::binaries::rollout::spawn(state);
    crate::http::ui::spawn(state);
    let config = &state.config;
    spawn_periodic(state, config.heartbeat_interval, false, |s| async move {
        refresh_presence(&s).await
    });
    // After a Redis outage or resubscription, wake-ups may have been lost: sweep at once.
    let sweep_period = config.command_sweep_interval.min(config.offline_timeout);
    spawn_periodic(
        state,
        sweep_period,
        true,
        |s| async move { sweep(&s).await },
    );
    if let Some(cluster) = state.hub.cluster() {
        state.tasks.spawn(cluster.clone().run_subscriber(
            state.hub.clone(),
            state.store.clone(),
            state.stop.clone(),
        ));
        state.tasks.spawn(
            cluster
                .clone()
                .forward_changes(state.store.clone(), state.stop.clone()),
        );
        // Re-claiming every entry is also how a flushed or restarted Redis is repopulated
        // within one heartbeat interval.
        spawn_periodic(state, config.heartbeat_interval, true, |s| async move {
            refresh_registry(&s).await
        });
        spawn_periodic(state, Duration::from_secs(1), false, |s| async move {
            rebalance::tick(&s).await
        });
    }
}

/// Runs `work` every `period` — and at once on a cluster resync when `on_resync` — until
/// the app stops.
fn spawn_periodic<F, Fut>(state: &AppState, period: Duration, on_resync: bool, work: F)
where
    F: Fn(AppState) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let s = state.clone();
    state.tasks.spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = s.stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = resynced(&s), if on_resync => {}
            }
            work(s.clone()).await;
        }
    });
}

/// Re-claims this replica's registry entries; closes sessions a newer connection replaced.
async fn refresh_registry(state: &AppState) {
    if let Some(cluster) = state.hub.cluster() {
        for stale in cluster.refresh(&state.hub.sessions()).await {
            stale.close(protocol::REPLACED);
        }
    }
}

/// Resolves when the cluster asks for a resync; never in single-replica mode.
async fn resynced(state: &AppState) {
    match state.hub.cluster() {
        Some(cluster) => cluster.resync.notified().await,
        None => std::future::pending().await,
    }
}

/// Writes `last_seen` for the agents heard from since the last refresh.
async fn refresh_presence(state: &AppState) {
    let ids: Vec<String> = state
        .hub
        .sessions()
        .into_iter()
        .filter(|s| s.take_active())
        .map(|s| s.client_id.clone())
        .collect();
    if let Err(e) = state.store.touch_agents(ids, now_ms()).await {
        state.metrics.store_errors.inc();
        tracing::error!(error = %error_chain(&e), "presence refresh failed");
    }
}

/// Marks agents of dead pods offline, expires commands past their TTL, and wakes local
/// sessions that still have pending commands (a wake-up may have been lost).
async fn sweep(state: &AppState) {
    let now = now_ms();
    let grace = (state.config.offline_timeout + state.config.heartbeat_interval).as_millis() as i64;
    let result = async {
        let offline = state.store.mark_stale_offline(now - grace).await?;
        if offline > 0 {
            tracing::info!(
                agents = offline,
                "marked agents offline after missed presence refreshes"
            );
        }
        let expired = state.store.expire_commands(now).await?;
        if expired > 0 {
            state
                .metrics
                .command(CommandStatus::Expired, expired as u64);
            tracing::info!(commands = expired, "expired commands past their TTL");
        }
        let local: Vec<String> = state
            .hub
            .sessions()
            .iter()
            .map(|s| s.client_id.clone())
            .collect();
        for id in state.store.agents_with_pending(local).await? {
            state.hub.wake(&id);
        }
        Ok::<_, StoreError>(())
    }
    .await;
    if let Err(e) = result {
        state.metrics.store_errors.inc();
        tracing::error!(error = %error_chain(&e), "sweep failed");
    }
}
