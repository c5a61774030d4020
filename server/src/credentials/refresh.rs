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

use super::cache::{CredentialCache, TokenState};
use crate::store::{Store, StoreError};

/// A periodic task ([`crate::tasks::Task`]), spawned by the assembly code with
/// `spawn_periodic` every heartbeat interval.
pub(crate) struct RevocationRefresh {
    pub(super) store: Store,
    pub(super) cache: Arc<CredentialCache>,
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
}
