//! HTTP: the accept loop, routing, the REST API, probes and metrics. Only this module
//! knows status codes.

pub mod api;
pub mod binaries;
pub mod error;
pub mod events;
pub mod fleet;
pub mod health;
pub mod rollouts;
pub mod router;
pub mod ui;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::state::AppState;
pub use error::ApiError;

pub type Body = BoxBody<Bytes, std::io::Error>;
pub type Response = http::Response<Body>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

pub fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response {
    // Serialising our own types into a Vec cannot fail.
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = http::Response::new(full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

pub fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response {
    let mut resp = http::Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Reads a body of at most `limit` bytes; over the limit it is a 413 and nothing is kept.
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = req.into_body();
    if declared.is_some_and(|n| n > limit as u64) {
        discard(&mut body, limit).await;
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut collected = Vec::with_capacity(declared.unwrap_or(0) as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::bad_request(
                "body_read_failed",
                format!("could not read the request body: {e}"),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            if collected.len() + data.len() > limit {
                discard(&mut body, limit).await;
                return Err(ApiError::PayloadTooLarge { limit });
            }
            collected.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(collected))
}

/// Reads and drops what remains of an oversized body, up to a bound, so that the client
/// (usually still sending) reads our 413 instead of a broken pipe. Past the bound the
/// connection is closed, as proxies do.
async fn discard(body: &mut Incoming, limit: usize) {
    let mut budget = limit.saturating_mul(4).max(1024 * 1024);
    while let Some(Ok(frame)) = body.frame().await {
        let n = frame.data_ref().map_or(0, |d| d.len());
        if n >= budget {
            return;
        }
        budget -= n;
    }
}

/// Bound on API request bodies other than inventories.
pub const MAX_API_BODY: usize = 64 * 1024;

pub async fn read_json<T: DeserializeOwned>(
    req: Request<Incoming>,
    limit: usize,
) -> Result<T, ApiError> {
    let body = read_body(req, limit).await?;
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "empty_body",
            "the request body is empty; send a JSON object",
        ));
    }
    Ok(serde_json::from_slice(&body)?)
}

/// Accepts connections until `stop` is cancelled, then asks every open connection to
/// finish its in-flight request and close, and hands back their tracker so the caller can
/// wait for them. An upgraded (WebSocket) connection leaves this tracking the moment it
/// upgrades; sessions are tracked by the app's own `TaskTracker`.
pub async fn serve(listener: TcpListener, state: AppState, stop: CancellationToken) -> TaskTracker {
    let connections = TaskTracker::new();
    let header_timeout = state.config.http_header_timeout;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, _peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; the condition is
                // usually transient (sessions closing free descriptors).
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let service = service_fn(move |req| router::handle(state.clone(), req));
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let stop = stop.clone();
        connections.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    connections.close();
    connections
}
