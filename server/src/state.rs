//! The replica's shared state, as handed to HTTP handlers. Every field is a cheap handle
//! of its own: background tasks and sessions are given only the ones they use (see
//! `tasks.rs`, `ws::session::SessionContext`), never this whole struct.

use std::sync::Arc;

use crate::auth::Tokens;
use crate::auth::ui_session::UiSignIn;
use crate::binaries::{Rollouts, Storage};
use crate::config::Config;
use crate::credentials::Credentials;
use crate::events::EventHub;
use crate::hub::Hub;
use crate::jobs::Jobs;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::ws::session::SessionContext;

/// What a request handler may use; cloned per connection (an `Arc`).
pub type AppState = Arc<State>;

/// The replica's handles, built once by `Application::build`.
pub struct State {
    /// The parsed configuration.
    pub config: Arc<Config>,
    /// PostgreSQL or SQLite: the source of truth for agents, commands and rollouts.
    pub store: Store,
    /// The sessions on this replica and, in cluster mode, the way to reach the others.
    pub hub: Hub,
    /// Mints and verifies the JWTs of agents and operators.
    pub tokens: Tokens,
    /// Authentication against revocations, token and enroll-secret management, and the
    /// audit log (`creds.audit()`).
    pub(crate) creds: Credentials,
    /// The Prometheus registry.
    pub metrics: Arc<Metrics>,
    /// Draining flag, task tracker and stop signal.
    pub(crate) lifecycle: Arc<Lifecycle>,
    /// Binaries on the shared volume (BINARY_STORAGE_PATH).
    pub(crate) storage: Storage,
    /// Rollouts of new agent versions: the cache and the offers.
    pub(crate) rollouts: Rollouts,
    /// What every WebSocket session shares.
    pub(crate) sessions: Arc<SessionContext>,
    /// The web UI's admin password and sign-in rate limit.
    pub(crate) sign_in: UiSignIn,
    /// The web UI's event streams on this replica.
    pub(crate) events: Arc<EventHub>,
    /// Fleet jobs: the handle the `/api/v1/jobs` handlers call.
    pub(crate) jobs: Jobs,
}
