//! Assembly: builds the shared state, binds the listener, spawns the background jobs and
//! runs the drain sequence. The only module that knows every other one.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::audit::AuditPruner;
use crate::auth::Tokens;
use crate::auth::ui_session::UiSignIn;
use crate::binaries::{Rollouts, Storage};
use crate::config::{Config, Secret, SecretKeySource};
use crate::credentials::cache::CACHE_TTL;
use crate::credentials::{Credentials, RevocationBus};
use crate::events::{EventHub, SummaryRefresh};
use crate::hub::Hub;
use crate::hub::cluster::Cluster;
use crate::hub::rebalance::Rebalancer;
use crate::jobs::Jobs;
use crate::jobs::pacer::Pacer;
use crate::lifecycle::{Lifecycle, close_sessions_gradually};
use crate::metrics::Metrics;
use crate::secrets::load_or_create_signing_key;
use crate::state::{AppState, State};
use crate::store::{PoolSettings, Store, StoreError};
use crate::tasks::{
    OutagePoll, PresenceRefresh, RegistryRefresh, Sweep, UiSessionSweep, spawn_periodic,
};
use crate::ws::session::SessionContext;

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
    #[error("TLS_CERT_FILE/TLS_KEY_FILE: {0}")]
    Tls(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("could not listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Resolves the signing key: SECRET_KEY, or the embedded default's generated file.
pub(crate) fn signing_key(config: &Config) -> Result<Secret, StartError> {
    match &config.secret_key {
        SecretKeySource::Given(secret) => Ok(secret.clone()),
        SecretKeySource::DataDir(path) => {
            load_or_create_signing_key(path).map_err(StartError::Secret)
        }
    }
}

/// A built server: its listeners are bound, nothing runs until `run_until_stopped`.
pub struct Application {
    listener: TcpListener,
    metrics_listener: TcpListener,
    state: AppState,
    tls: Option<(tokio_rustls::TlsAcceptor, crate::http::tls::CertReloader)>,
}

impl Application {
    /// Opens the store (running migrations) and binds the listener; port 0 picks a free port.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let secret = signing_key(&config)?;
        let store = {
            let url = config.database.clone();
            let settings = PoolSettings {
                size: config.database_pool_size,
                statement_timeout: config.database_statement_timeout,
                outage_timeout: config.database_outage_timeout,
            };
            tokio::task::spawn_blocking(move || Store::open(&url, settings))
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
        let metrics_listener =
            TcpListener::bind(config.metrics_listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.metrics_listen,
                    source,
                })?;
        let tls = match &config.tls {
            None => None,
            Some(files) => Some(
                crate::http::tls::acceptor(files.clone()).map_err(|e| StartError::Tls(e.into()))?,
            ),
        };
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
        let sign_in = UiSignIn::new(&config).map_err(StartError::AdminPassword)?;
        let hub = Hub::new(metrics.clone(), cluster);
        let tokens = Tokens::with_rotation(
            &secret,
            config.credentials.secret_key_previous.as_ref(),
            config.jwt_algorithm,
            config.credentials.jwt_leeway,
        );
        let bus = match &config.redis {
            None => None,
            Some(redis) => Some(Arc::new(
                RevocationBus::new(redis, config.pod_id.clone()).map_err(StartError::Redis)?,
            )),
        };
        let creds = Credentials::new(store.clone(), tokens.clone(), hub.clone(), bus);
        let storage = Storage::new(config.binary_storage_path.clone());
        let rollouts = Rollouts::new(
            &config,
            store.clone(),
            hub.clone(),
            metrics.clone(),
            storage.clone(),
        );
        let sessions = Arc::new(SessionContext::new(
            &config,
            store.clone(),
            hub.clone(),
            metrics.clone(),
            rollouts.clone(),
            creds.clone(),
        ));
        let jobs = Jobs::new(store.clone(), metrics.clone());
        let state = Arc::new(State {
            tokens,
            creds,
            config: Arc::new(config),
            store,
            hub,
            metrics,
            lifecycle: Arc::new(Lifecycle::new()),
            storage,
            rollouts,
            sessions,
            sign_in,
            events: Arc::new(EventHub::default()),
            jobs,
        });
        Ok(Application {
            listener,
            metrics_listener,
            state,
            tls,
        })
    }

    /// The main listener's address (SERVER_PORT).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The metrics listener's address (METRICS_PORT).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The shared state.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then drains: readiness fails at once, agents are
    /// closed with 1012 over DRAIN_WINDOW, in-flight requests finish, all within
    /// SHUTDOWN_TIMEOUT. Returns whether everything finished in time.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> bool {
        let Application {
            listener,
            metrics_listener,
            state,
            tls,
        } = self;
        spawn_background(&state);

        let header_timeout = state.config.http_header_timeout;
        let stop_accepting = CancellationToken::new();
        let acceptor = tls.map(|(acceptor, reloader)| {
            state
                .lifecycle
                .tasks()
                .spawn(reloader.run(state.lifecycle.stop().clone()));
            acceptor
        });
        let server = tokio::spawn(crate::http::serve_with_tls(
            listener,
            crate::http::router(state.clone()),
            header_timeout,
            acceptor,
            stop_accepting.clone(),
        ));
        // Scrapes keep working through the drain; the listener closes with the jobs.
        let scrapes = crate::http::serve(
            metrics_listener,
            crate::http::metrics_router(state.clone()),
            header_timeout,
            state.lifecycle.stop().clone(),
        );
        state.lifecycle.tasks().spawn(async move {
            scrapes.await;
        });

        shutdown.await;
        let started = Instant::now();
        let deadline = started + state.config.shutdown_timeout;
        tracing::info!(
            agents = state.hub.len(),
            timeout = ?state.config.shutdown_timeout,
            "shutdown requested; draining"
        );
        state.lifecycle.start_draining();
        state.metrics.draining.set(1);
        if let Some(cluster) = state.hub.cluster() {
            // Out of the counts at once, so no replica sheds agents toward this one.
            cluster.leave().await;
        }

        // Requests keep being served while agents leave: in Kubernetes the endpoint is
        // being removed concurrently, and in-flight API calls must still succeed.
        tokio::time::sleep(state.config.drain_delay).await;
        close_sessions_gradually(&state.hub, state.config.drain_window).await;

        stop_accepting.cancel();
        let connections = server.await.ok();
        let finished = tokio::time::timeout_at(deadline, async {
            state.lifecycle.stop_and_wait().await;
            if let Some(connections) = connections {
                connections.wait().await;
            }
        })
        .await
        .is_ok();
        // Last: queued writes are answered and pooled connections returned before the
        // process exits; see `Store::settle`.
        let settled = state
            .store
            .settle(deadline.max(Instant::now() + SETTLE_AT_LEAST))
            .await;
        if finished && settled {
            tracing::info!(elapsed = ?started.elapsed(), "drained; exiting");
        } else if !finished {
            tracing::warn!(
                sessions = state.hub.len(),
                "shutdown timeout reached with work still in flight; exiting anyway"
            );
        } else {
            tracing::warn!("database work still in flight; exiting anyway");
        }
        finished && settled
    }
}

/// Spawns every background job on the lifecycle's tracker, each built from the handles
/// it uses; all stop with the lifecycle.
fn spawn_background(state: &State) {
    let (config, lifecycle) = (&state.config, &*state.lifecycle);
    let tasks = lifecycle.tasks();
    let stop = lifecycle.stop();
    tasks.spawn(state.rollouts.clone().run(stop.clone()));
    if config.job_pacer {
        tasks.spawn(
            Pacer::new(
                state.store.clone(),
                state.hub.clone(),
                state.metrics.clone(),
                config.pod_id.clone(),
            )
            .run(stop.clone()),
        );
    }
    let cluster = state.hub.cluster().cloned();
    spawn_periodic(
        lifecycle,
        config.heartbeat_interval,
        None,
        PresenceRefresh {
            store: state.store.clone(),
            hub: state.hub.clone(),
            metrics: state.metrics.clone(),
        },
    );
    // After a Redis outage or resubscription, wake-ups may have been lost: sweep at once.
    spawn_periodic(
        lifecycle,
        config.command_sweep_interval.min(config.offline_timeout),
        cluster.clone(),
        Sweep {
            store: state.store.clone(),
            hub: state.hub.clone(),
            metrics: state.metrics.clone(),
            grace: config.offline_timeout + config.heartbeat_interval,
        },
    );
    spawn_periodic(
        lifecycle,
        SUMMARY_INTERVAL,
        None,
        SummaryRefresh {
            store: state.store.clone(),
            metrics: state.metrics.clone(),
            events: state.events.clone(),
        },
    );
    spawn_periodic(
        lifecycle,
        UI_SESSION_SWEEP_INTERVAL,
        None,
        UiSessionSweep {
            store: state.store.clone(),
            metrics: state.metrics.clone(),
        },
    );
    tasks.spawn(
        state
            .creds
            .last_used_flusher(LAST_USED_FLUSH_INTERVAL)
            .run(stop.clone()),
    );
    // Every heartbeat, so that a revocation whose bus message was lost closes a live
    // session within two heartbeat intervals (see `ws::session`); at least twice per
    // cache lifetime, so that the entries sessions read never age out between rounds.
    spawn_periodic(
        lifecycle,
        config.heartbeat_interval.min(CACHE_TTL / 2),
        None,
        state.creds.revocation_refresh(),
    );
    tasks.spawn(
        AuditPruner::new(state.store.clone(), config.credentials.audit_retention).run(stop.clone()),
    );
    if let Some(bus) = state.creds.bus() {
        tasks.spawn(
            bus.clone()
                .run_subscriber(state.creds.clone(), stop.clone()),
        );
    }
    if let Some(cluster) = cluster {
        tasks.spawn(cluster.clone().run_subscriber(
            state.hub.clone(),
            state.store.clone(),
            stop.clone(),
        ));
        tasks.spawn(
            cluster
                .clone()
                .forward_changes(state.store.clone(), stop.clone()),
        );
        spawn_periodic(
            lifecycle,
            config.heartbeat_interval,
            Some(cluster.clone()),
            RegistryRefresh {
                hub: state.hub.clone(),
                cluster: cluster.clone(),
            },
        );
        spawn_periodic(
            lifecycle,
            OUTAGE_POLL_INTERVAL,
            None,
            OutagePoll {
                store: state.store.clone(),
                hub: state.hub.clone(),
                cluster: cluster.clone(),
                metrics: state.metrics.clone(),
            },
        );
        spawn_periodic(
            lifecycle,
            Duration::from_secs(1),
            None,
            Rebalancer {
                hub: state.hub.clone(),
                cluster,
                metrics: state.metrics.clone(),
                lifecycle: state.lifecycle.clone(),
                enabled: config.rebalance,
                tolerance: config.rebalance_tolerance,
                rate: config.rebalance_rate,
                over_average_streak: Default::default(),
            },
        );
    }
}

/// How long the drain waits for the database pool to settle even when SHUTDOWN_TIMEOUT
/// has run out: a connection being opened takes milliseconds.
const SETTLE_AT_LEAST: Duration = Duration::from_secs(1);
/// How often, while Redis is unreachable, each replica looks for pending commands of its
/// agents: wake-ups cannot cross replicas then, and this bounds the delay of a command
/// queued through another replica instead of COMMAND_SWEEP_INTERVAL.
const OUTAGE_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// How often the UI's agents-per-pod summary is recomputed while someone watches.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(2);
/// How often the tokens' `last_used_at` is written (it is informational; batching keeps
/// it off the request path).
const LAST_USED_FLUSH_INTERVAL: Duration = Duration::from_secs(30);
/// How often expired UI sessions are removed.
const UI_SESSION_SWEEP_INTERVAL: Duration = Duration::from_secs(300);
