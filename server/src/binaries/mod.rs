//! Agent binaries and fleet updates: the files on the shared volume ([`storage`]), which
//! version is newer ([`version`]), and paced rollouts that tell agents to update
//! ([`rollout`]). Metadata and rollout state live in the store; this module keeps only a
//! cache of the active rollouts so that sessions skip the database when there are none.

pub mod rollout;
pub mod storage;
pub mod version;

use std::sync::{Arc, RwLock};

use tokio::sync::Notify;

use crate::config::Config;
use crate::store::ActiveRollout;
pub use storage::{Storage, StorageError};

/// This replica's share of binaries and rollouts. Lives in the app state.
pub struct Fleet {
    /// BINARY_STORAGE_PATH.
    pub storage: Storage,
    /// Active rollouts as last read from the store (at most one ROLLOUT_CHECK_INTERVAL
    /// old): with none, which is the usual case, a session's hello costs no query.
    active: RwLock<Arc<Vec<ActiveRollout>>>,
    /// Wakes this replica's rollout task before its next tick: a slot was freed or a
    /// rollout was started here.
    kick: Notify,
}

impl Fleet {
    pub fn new(config: &Config) -> Self {
        Fleet {
            storage: Storage::new(config.binary_storage_path.clone()),
            active: RwLock::default(),
            kick: Notify::new(),
        }
    }

    pub fn active(&self) -> Arc<Vec<ActiveRollout>> {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_active(&self, rollouts: Vec<ActiveRollout>) {
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rollouts);
    }

    /// Asks the rollout task to run now (coalesces).
    pub fn kick(&self) {
        self.kick.notify_one();
    }
}
