//! [`RevocationRefresh`]: keeps the replica's credential cache in step with the database
//! for the agents and tokens its live sessions hold.
//!
//! Revocations travel over Redis pub/sub, which is at-most-once. Without this job a lost
//! message would leave a revoked agent connected until its cache entry expired and
//! nothing would look again, since sessions never re-authenticate. Sessions mark what
//! they hold as watched at each ping (`Credentials::must_close`); this job reads the
//! watched keys in one batch per 500 and writes the answers into the cache, where the
//! next ping finds them. Entries only move towards "revoked", so a refresh racing with a
//! bus message cannot undo it.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::cache::{CredentialCache, TokenState};
use crate::audit::chain;
use crate::store::{Store, StoreError};

/// Spawned by the assembly code:
/// `tasks.spawn(credentials.revocation_refresh(heartbeat_interval).run(stop.clone()))`.
pub(crate) struct RevocationRefresh {
    pub(super) store: Store,
    pub(super) cache: Arc<CredentialCache>,
    pub(super) interval: Duration,
}

impl RevocationRefresh {
    /// Re-reads what sessions watched since the last round; returns how many agents and
    /// tokens were read.
    pub(crate) async fn refresh(&self) -> Result<usize, StoreError> {
        let (agents, tokens) = self.cache.take_watched();
        if agents.is_empty() && tokens.is_empty() {
            return Ok(0);
        }
        let states = self
            .store
            .credential_states(agents.clone(), tokens.clone())
            .await?;
        for id in &agents {
            // An agent whose generation was never bumped has none recorded: 0.
            let generation = states.generations.get(id).copied().unwrap_or(0);
            self.cache.put_generation(id, generation);
        }
        for jti in &tokens {
            let state = match states.revoked.get(jti) {
                Some(true) => TokenState::Revoked,
                Some(false) => TokenState::Live,
                None => TokenState::Unrecorded,
            };
            self.cache.put_token(jti, state);
        }
        Ok(agents.len() + tokens.len())
    }

    /// Refreshes every interval until `stop`; a failed round is logged and retried at the
    /// next tick.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.refresh().await {
                // Sessions watch again at their next ping; until the database answers,
                // the cache's entries age out and lost revocations wait.
                tracing::warn!(error = %chain(&e), "could not refresh the credentials live sessions hold");
            }
        }
    }
}
