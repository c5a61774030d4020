//! The replica's lifecycle: the tasks it runs, the drain flag set at SIGTERM, the stop
//! signal that ends background work, and the gradual close of agent sessions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::Hub;
use crate::ws::protocol;

/// Shared by everything that runs for the life of the process. Shutdown sets `draining`,
/// then cancels `stop` and waits for `tasks`.
#[derive(Debug, Default)]
pub(crate) struct Lifecycle {
    /// Set at SIGTERM: readiness fails, new WebSocket upgrades and event streams get 503,
    /// and this replica stops counting in the cluster's balance.
    draining: AtomicBool,
    /// Every WebSocket session and background task; shutdown waits for them.
    tasks: TaskTracker,
    /// Cancelled at the end of shutdown to stop background tasks.
    stop: CancellationToken,
}

impl Lifecycle {
    /// A lifecycle that is neither draining nor stopped.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Whether shutdown has begun.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks the start of shutdown.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// The tracker every long-lived task is spawned on.
    pub(crate) fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Cancelled when background work must end.
    pub(crate) fn stop(&self) -> &CancellationToken {
        &self.stop
    }

    /// Stops background tasks and waits for them and every session to end.
    pub(crate) async fn stop_and_wait(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Closes every session with 1012, spread evenly over `window` so agents do not all
/// reconnect in the same second. Sessions that arrive meanwhile (an upgrade that passed
/// the draining check just before it was set) are closed at the end.
pub(crate) async fn close_sessions_gradually(hub: &Hub, window: Duration) {
    let sessions = hub.sessions();
    let start = Instant::now();
    let n = sessions.len().max(1) as u32;
    for (i, session) in sessions.iter().enumerate() {
        tokio::time::sleep_until(start + window * i as u32 / n).await;
        session.close(protocol::DRAINING);
    }
    for session in hub.sessions() {
        session.close(protocol::DRAINING);
    }
}
