//! `GET /api/v1/events`: Server-Sent Events that tell the web UI what to refresh.
//!
//! Events carry ids, not data (`agent`, `command`, `commands`, `agents`, `binaries`,
//! `rollouts`), plus a periodic `summary` of agents per pod. They come from the store's
//! announcements: this replica's own and, in cluster mode, those the other replicas
//! forward over Redis (`hub::cluster`). Each stream is bounded: a client that falls behind gets `resync`
//! (refetch everything) instead of an ever-growing queue, and a replica serves at most
//! [`MAX_STREAMS`]. Streams end when the replica starts draining; browsers reconnect
//! (to another replica) on their own.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use tokio::sync::{broadcast, mpsc};

use super::Response;
use super::api::{Access, authorize};
use super::error::{ApiError, Result};
use crate::app::AppState;
use crate::store::{Announcement, Change};

/// Event streams one replica serves at once.
pub const MAX_STREAMS: usize = 64;
/// Events queued per stream before the writer waits for the client.
const QUEUE: usize = 32;
/// A client that takes no event for this long is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Comment lines keep proxies from timing the stream out.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// How often a stream checks whether the replica is draining.
const DRAIN_CHECK: Duration = Duration::from_millis(500);

fn event(name: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

fn change_event(change: Change) -> Bytes {
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
    }
}

/// Releases a stream's slot when its writer ends.
struct Slot(AppState);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.ui.streams.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.ui_event_streams.dec();
    }
}

pub async fn stream(state: &AppState, req: Request<Incoming>) -> Result<Response> {
    authorize(state, req.headers(), Access::Admin)?;
    if state.draining.load(Ordering::Relaxed) {
        return Err(ApiError::Draining);
    }
    if state.ui.streams.fetch_add(1, Ordering::Relaxed) >= MAX_STREAMS {
        state.ui.streams.fetch_sub(1, Ordering::Relaxed);
        return Err(ApiError::TooManyStreams { limit: MAX_STREAMS });
    }
    state.metrics.ui_event_streams.inc();
    let slot = Slot(state.clone());
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
    let changes = state.store.subscribe();
    state
        .tasks
        .spawn(write_events(state.clone(), tx, changes, slot));

    let mut resp = http::Response::new(ChannelBody(rx).boxed());
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // nginx would otherwise buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

async fn write_events(
    state: AppState,
    tx: mpsc::Sender<Bytes>,
    mut changes: broadcast::Receiver<Announcement>,
    _slot: Slot,
) {
    let send = |bytes: Bytes| {
        let tx = tx.clone();
        async move {
            matches!(
                tokio::time::timeout(SEND_TIMEOUT, tx.send(bytes)).await,
                Ok(Ok(()))
            )
        }
    };
    let mut summary = state.ui.summary.subscribe();
    let first = summary.borrow_and_update().clone();
    let mut hello = Bytes::from_static(b"retry: 2000\n\n").to_vec();
    hello.extend_from_slice(&event("ready", "{}"));
    if !first.is_empty() {
        hello.extend_from_slice(&event("summary", &first));
    }
    if !send(Bytes::from(hello)).await {
        return;
    }
    let mut check = tokio::time::interval(DRAIN_CHECK);
    let mut since_keepalive = Duration::ZERO;
    loop {
        let bytes = tokio::select! {
            _ = tx.closed() => return,
            _ = state.stop.cancelled() => return,
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
                if state.draining.load(Ordering::Relaxed) {
                    return;
                }
                since_keepalive += DRAIN_CHECK;
                if since_keepalive < KEEPALIVE {
                    continue;
                }
                since_keepalive = Duration::ZERO;
                Bytes::from_static(b": keepalive\n\n")
            }
        };
        if !send(bytes).await {
            return;
        }
    }
}

/// A response body fed by a channel; it ends when the writer drops its sender.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}
