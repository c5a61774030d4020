//! Agent binaries and their rollouts: the files on the shared volume ([`storage`]) and
//! paced rollouts that tell agents to update ([`rollout`]); which version is newer is the
//! protocol's rule (`agent_protocol::version`). Metadata and rollout state live in the store; [`Rollouts`] keeps only
//! a cache of the active rollouts so that sessions skip the database when there are none.

pub mod rollout;
pub(crate) mod storage;

pub(crate) use rollout::Rollouts;
pub(crate) use storage::{Storage, StorageError};
