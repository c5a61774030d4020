//! `GET /api/v1/events`: Server-Sent Events that tell the web UI what to refresh.
//!
//! Events carry ids, not data (`agent`, `command`, `commands`, `agents`, `binaries`,
//! `rollouts`, `job`, `jobs`), plus a periodic `summary` of agents per pod. They come from the store's
//! announcements: this replica's own and, in cluster mode, those the other replicas
//! forward over Redis (`hub::cluster`). Each stream is bounded: a client that falls
//! behind gets `resync` (refetch everything) instead of an ever-growing queue, and a
//! replica serves at most `events::MAX_STREAMS`. Streams end when the replica starts
//! draining; browsers reconnect (to another replica) on their own.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, header};
use tokio::sync::{broadcast, mpsc};

use super::error::{ApiError, Result};
use super::extract::Admin;
use super::openapi::{Forbidden, Unauthorized, Unavailable};
use crate::events::{EventHub, MAX_STREAMS};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::state::AppState;
use crate::store::{Announcement, Change};

/// Events queued per stream before the writer waits for the client.
const QUEUE: usize = 32;
/// A client that takes no event for this long is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Comment lines keep proxies from timing the stream out.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// How often a stream checks whether the replica is draining.
const DRAIN_CHECK: Duration = Duration::from_millis(500);

fn event(name: &str, data: &str) -> Event {
    Event::default().event(name).data(data)
}

fn change_event(change: Change) -> Event {
    match change {
        Change::Agent { id } => event("agent", &serde_json::json!({ "id": id }).to_string()),
        Change::Agents => event("agents", "{}"),
        Change::Command { id, agent_id } => event(
            "command",
            &serde_json::json!({ "id": id, "agent_id": agent_id }).to_string(),
        ),
        Change::Commands => event("commands", "{}"),
        Change::Binaries => event("binaries", "{}"),
        Change::Rollouts => event("rollouts", "{}"),
        Change::Job { id } => event("job", &serde_json::json!({ "id": id }).to_string()),
        Change::Jobs => event("jobs", "{}"),
    }
}

/// Releases a stream's slot when its writer ends.
struct Slot {
    events: Arc<EventHub>,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.events.close();
        self.metrics.ui_event_streams.dec();
    }
}

/// `GET /api/v1/events`: the stream; 503 while draining or at [`MAX_STREAMS`].
#[utoipa::path(
    get,
    path = "/api/v1/events",
    operation_id = "stream_events",
    tag = "events",
    responses(
        (status = 200, description = "Server-Sent Events until the replica drains: `agent`, `agents`, `command`, `commands`, `binaries`, `rollouts`, `job`, `jobs` (ids, not data), `summary` every 2 s, `resync` after a lag", content_type = "text/event-stream", body = String),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn stream(State(state): State<AppState>, _: Admin) -> Result<Response> {
    if state.lifecycle.is_draining() {
        return Err(ApiError::Draining);
    }
    if !state.events.try_open() {
        return Err(ApiError::TooManyStreams { limit: MAX_STREAMS });
    }
    state.metrics.ui_event_streams.inc();
    let slot = Slot {
        events: state.events.clone(),
        metrics: state.metrics.clone(),
    };
    let (tx, rx) = mpsc::channel::<Event>(QUEUE);
    let changes = state.store.subscribe();
    state.lifecycle.tasks().spawn(write_events(
        state.events.clone(),
        state.lifecycle.clone(),
        tx,
        changes,
        slot,
    ));
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    let mut resp = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEPALIVE).text("keepalive"))
        .into_response();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // nginx would otherwise buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

async fn write_events(
    events: Arc<EventHub>,
    lifecycle: Arc<Lifecycle>,
    tx: mpsc::Sender<Event>,
    mut changes: broadcast::Receiver<Announcement>,
    _slot: Slot,
) {
    let send = |event: Event| {
        let tx = tx.clone();
        async move {
            matches!(
                tokio::time::timeout(SEND_TIMEOUT, tx.send(event)).await,
                Ok(Ok(()))
            )
        }
    };
    let mut summary = events.summary();
    let first = summary.borrow_and_update().clone();
    if !send(event("ready", "{}").retry(Duration::from_secs(2))).await {
        return;
    }
    if !first.is_empty() && !send(event("summary", &first)).await {
        return;
    }
    let mut check = tokio::time::interval(DRAIN_CHECK);
    loop {
        let event = tokio::select! {
            _ = tx.closed() => return,
            _ = lifecycle.stop().cancelled() => return,
            change = changes.recv() => match change {
                Ok(announced) => change_event(announced.change),
                Err(broadcast::error::RecvError::Lagged(_)) => event("resync", "{}"),
                Err(broadcast::error::RecvError::Closed) => return,
            },
            changed = summary.changed() => {
                if changed.is_err() {
                    return;
                }
                let text = summary.borrow_and_update().clone();
                event("summary", &text)
            }
            _ = check.tick() => {
                if lifecycle.is_draining() {
                    return;
                }
                continue;
            }
        };
        if !send(event).await {
            return;
        }
    }
}
