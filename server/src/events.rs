//! What the web UI's event streams share on one replica: how many are open (they are
//! bounded) and the latest agents-per-pod summary, which [`SummaryRefresh`] keeps fresh
//! while anyone watches. The streams themselves are served by `http/events.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::watch;

use crate::error::error_chain;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use crate::tasks::Task;

/// Event streams one replica serves at once.
pub(crate) const MAX_STREAMS: usize = 64;

/// The replica's event-stream bookkeeping.
#[derive(Debug)]
pub(crate) struct EventHub {
    /// Open event streams on this replica (at most [`MAX_STREAMS`]).
    streams: AtomicUsize,
    /// The latest agents-per-pod summary (JSON), refreshed while streams are open; empty
    /// until the first refresh.
    summary: watch::Sender<Arc<str>>,
}

impl Default for EventHub {
    fn default() -> Self {
        EventHub {
            streams: AtomicUsize::new(0),
            summary: watch::Sender::new(Arc::from("")),
        }
    }
}

impl EventHub {
    /// Takes a stream slot; `false` when [`MAX_STREAMS`] are open already.
    pub(crate) fn try_open(&self) -> bool {
        if self.streams.fetch_add(1, Ordering::Relaxed) >= MAX_STREAMS {
            self.streams.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Gives back a slot taken by [`EventHub::try_open`].
    pub(crate) fn close(&self) {
        self.streams.fetch_sub(1, Ordering::Relaxed);
    }

    fn watched(&self) -> bool {
        self.streams.load(Ordering::Relaxed) > 0
    }

    /// The summary, to be read now and on every change.
    pub(crate) fn summary(&self) -> watch::Receiver<Arc<str>> {
        self.summary.subscribe()
    }
}

/// Recomputes the summary while event streams are open: it is how a browser connected
/// to this replica learns about agents on the others.
pub(crate) struct SummaryRefresh {
    pub(crate) store: Store,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) events: Arc<EventHub>,
}

impl SummaryRefresh {
    /// Agents per pod as JSON, for the `summary` events.
    async fn summary(&self) -> Result<String, StoreError> {
        let (pods, total) = self.store.agents_by_pod().await?;
        let online: i64 = pods.iter().map(|(_, n)| n).sum();
        let pods: Vec<serde_json::Value> = pods
            .into_iter()
            .map(|(pod, n)| serde_json::json!({"pod": pod, "online_agents": n}))
            .collect();
        Ok(serde_json::json!({"agents": total, "online": online, "pods": pods}).to_string())
    }
}

impl Task for SummaryRefresh {
    async fn run_once(&self) {
        if !self.events.watched() {
            return;
        }
        match self.summary().await {
            Ok(text) => {
                self.events.summary.send_if_modified(|current| {
                    if **current == *text {
                        return false;
                    }
                    *current = Arc::from(text.as_str());
                    true
                });
            }
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::error!(error = %error_chain(&e), "could not summarise agents per pod");
            }
        }
    }
}
