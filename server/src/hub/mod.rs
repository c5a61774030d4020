//! The hub: which agents are connected to this process, and how to reach them.
//!
//! A [`SessionHandle`] is the only way other parts of the server touch a live WebSocket
//! session: they may wake it (new commands are in the store) or close it with a reason.
//! Waking carries no data on purpose: the store is the source of truth, so a wake-up that
//! is lost or duplicated costs latency, never a command.
//!
//! In cluster mode the hub also consults the [`cluster::Cluster`] registry: `route_wake`
//! and `route_close` reach an agent on whichever replica holds it.

mod batch;
pub mod cluster;
pub mod rebalance;
pub(crate) mod redis_conn;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::ws::protocol::{self, Close};
use cluster::{BusMessage, Claim, Cluster};

/// One live session, shared between its task and the hub.
pub struct SessionHandle {
    /// The agent's `client_id`, the key of its registration.
    pub client_id: String,
    /// The connection's epoch from the store; the highest epoch wins.
    pub epoch: i64,
    /// Milliseconds since the epoch when the session was registered.
    pub(crate) connected_at_ms: i64,
    /// Signalled when commands may be waiting; coalesces, so it never queues.
    wake: Notify,
    /// Cancelled to make the session close itself with `close_reason`.
    closing: CancellationToken,
    close_reason: OnceLock<Close>,
    /// Milliseconds since the epoch of the last frame received.
    last_inbound_ms: AtomicI64,
    /// Set by inbound frames, cleared by the presence refresher.
    active: AtomicBool,
}

impl SessionHandle {
    /// Tells the session that commands may be waiting in the store; wake-ups coalesce, and
    /// a lost one costs latency only (the sweep wakes sessions too).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Resolves at the next [`SessionHandle::wake`] (or at once if one came since the last).
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// Asks the session to close; the first reason given wins.
    pub fn close(&self, reason: Close) {
        let _ = self.close_reason.set(reason);
        self.closing.cancel();
    }

    /// Resolves once [`SessionHandle::close`] was called, with the close to send (RFC 6455
    /// close code and reason); `1012` draining if none was recorded.
    pub async fn closing(&self) -> Close {
        self.closing.cancelled().await;
        *self.close_reason.get().unwrap_or(&protocol::DRAINING)
    }

    /// Records a frame from the agent at `now_ms` (milliseconds since the Unix epoch), for
    /// the offline timeout and the presence refresh.
    pub fn touch(&self, now_ms: i64) {
        self.last_inbound_ms.store(now_ms, Ordering::Relaxed);
        self.active.store(true, Ordering::Relaxed);
    }

    pub(crate) fn last_inbound_ms(&self) -> i64 {
        self.last_inbound_ms.load(Ordering::Relaxed)
    }

    /// Whether a frame arrived since the last call.
    pub(crate) fn take_active(&self) -> bool {
        self.active.swap(false, Ordering::Relaxed)
    }
}

/// Registry of this process's sessions. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    sessions: Arc<Mutex<HashMap<String, Arc<SessionHandle>>>>,
    metrics: Arc<Metrics>,
    /// Present in cluster mode (REDIS_HOST set).
    cluster: Option<Arc<Cluster>>,
}

/// A newer connection of the same agent is already registered here.
#[derive(Debug)]
pub struct Superseded;

impl Hub {
    /// An empty registry; `cluster` is given in cluster mode (REDIS_HOST or REDIS_SENTINELS
    /// set).
    pub fn new(metrics: Arc<Metrics>, cluster: Option<Arc<Cluster>>) -> Self {
        Hub {
            sessions: Arc::default(),
            metrics,
            cluster,
        }
    }

    /// The cross-replica part; `None` outside cluster mode.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Registers a session. An older session of the same agent is closed as replaced; if
    /// the registered one is newer (a race between two handshakes), this one loses.
    pub fn register(
        &self,
        client_id: &str,
        epoch: i64,
        now_ms: i64,
    ) -> Result<Arc<SessionHandle>, Superseded> {
        let handle = Arc::new(SessionHandle {
            client_id: client_id.to_string(),
            epoch,
            connected_at_ms: now_ms,
            wake: Notify::new(),
            closing: CancellationToken::new(),
            close_reason: OnceLock::new(),
            last_inbound_ms: AtomicI64::new(now_ms),
            active: AtomicBool::new(true),
        });
        let previous = {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            match sessions.get(client_id) {
                Some(existing) if existing.epoch > epoch => return Err(Superseded),
                _ => sessions.insert(client_id.to_string(), handle.clone()),
            }
        };
        match previous {
            Some(old) => old.close(protocol::REPLACED),
            None => {
                self.metrics.connected_agents.inc();
            }
        }
        Ok(handle)
    }

    /// Removes the session if it is still the registered one.
    pub(crate) fn unregister(&self, handle: &SessionHandle) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions
            .get(&handle.client_id)
            .is_some_and(|s| s.epoch == handle.epoch)
        {
            sessions.remove(&handle.client_id);
            self.metrics.connected_agents.dec();
        }
    }

    /// This replica's session of `client_id`, if it is connected here.
    pub fn get(&self, client_id: &str) -> Option<Arc<SessionHandle>> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(client_id)
            .cloned()
    }

    /// Wakes the agent's session if it is connected here.
    pub fn wake(&self, client_id: &str) -> bool {
        self.get(client_id).map(|s| s.wake()).is_some()
    }

    /// Closes the agent's session if it is connected here.
    pub fn close(&self, client_id: &str, reason: Close) -> bool {
        self.get(client_id).map(|s| s.close(reason)).is_some()
    }

    /// Registers a new session here and, in cluster mode, in the registry; an older
    /// connection of the same agent is closed wherever it is.
    pub async fn connect(
        &self,
        client_id: &str,
        epoch: i64,
        now_ms: i64,
    ) -> Result<Arc<SessionHandle>, Superseded> {
        let handle = self.register(client_id, epoch, now_ms)?;
        // While Redis is down, handshakes do not wait on it: the refresh loop registers
        // every session once it is back, and the database epoch fences meanwhile.
        if let Some(cluster) = &self.cluster {
            cluster.mark_routable();
        }
        if let Some(cluster) = self.cluster.as_ref().filter(|c| c.is_healthy()) {
            // The claim also tells a replica that held the agent to close its session.
            match cluster.claim(client_id, epoch, now_ms).await {
                Claim::Claimed { .. } | Claim::Unknown => {}
                Claim::Superseded => {
                    self.unregister(&handle);
                    return Err(Superseded);
                }
            }
        }
        Ok(handle)
    }

    /// Unregisters a session here and its registry entry, if still its own.
    pub(crate) async fn disconnect(&self, handle: &SessionHandle) {
        self.unregister(handle);
        if let Some(cluster) = &self.cluster {
            cluster.release(&handle.client_id, handle.epoch).await;
        }
    }

    /// Wakes the agent's session on whichever replica holds it.
    pub(crate) async fn route_wake(&self, client_id: &str) {
        if !self.wake(client_id) {
            self.tell_owner(
                client_id,
                BusMessage::Wake {
                    id: client_id.to_string(),
                },
            )
            .await;
        }
    }

    /// Closes a deleted agent's session on whichever replica holds it.
    pub async fn route_delete(&self, client_id: &str) {
        if !self.close(client_id, protocol::DELETED) {
            self.tell_owner(
                client_id,
                BusMessage::Deleted {
                    id: client_id.to_string(),
                },
            )
            .await;
        }
    }

    /// Publishes `msg` to the replica holding the agent, if that is another one. While
    /// Redis is down nothing is attempted, so API calls do not wait on it: the periodic
    /// sweep delivers commands instead, and a deleted agent's session is refused at its
    /// next result.
    async fn tell_owner(&self, client_id: &str, msg: BusMessage) {
        if let Some(cluster) = self.cluster.as_ref().filter(|c| c.is_healthy())
            && let Some(pod) = cluster
                .owner(client_id)
                .await
                .filter(|p| p != cluster.pod())
        {
            cluster.publish(&pod, &msg).await;
        }
    }

    /// A snapshot of this replica's sessions.
    pub fn sessions(&self) -> Vec<Arc<SessionHandle>> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Sessions open on this replica (the `agent_server_connected_agents` gauge).
    pub fn len(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Whether no session is open on this replica.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Hub {
        Hub::new(Arc::new(Metrics::new()), None)
    }

    #[tokio::test]
    async fn newer_connection_replaces_older_and_older_is_told_why() {
        let hub = hub();
        let old = hub.register("a", 1, 0).unwrap();
        let new = hub.register("a", 2, 0).unwrap();
        assert_eq!(old.closing().await, protocol::REPLACED);
        assert_eq!(hub.get("a").unwrap().epoch, new.epoch);
        assert_eq!(hub.len(), 1);
    }

    #[test]
    fn older_epoch_cannot_displace_a_newer_session() {
        let hub = hub();
        hub.register("a", 5, 0).unwrap();
        assert!(hub.register("a", 4, 0).is_err());
        assert_eq!(hub.get("a").unwrap().epoch, 5);
    }

    #[test]
    fn stale_session_unregistering_leaves_the_newer_one() {
        let hub = hub();
        let old = hub.register("a", 1, 0).unwrap();
        hub.register("a", 2, 0).unwrap();
        hub.unregister(&old);
        assert_eq!(hub.get("a").unwrap().epoch, 2);
    }
}
