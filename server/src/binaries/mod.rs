//! Agent binaries and their rollouts: the files on the shared volume ([`storage`]), which
//! version is newer ([`version`]), and paced rollouts that tell agents to update
//! ([`rollout`]). Metadata and rollout state live in the store; [`Rollouts`] keeps only
//! a cache of the active rollouts so that sessions skip the database when there are none.

pub mod rollout;
pub(crate) mod storage;
pub(crate) mod version;

pub(crate) use rollout::Rollouts;
pub(crate) use storage::{Storage, StorageError};
