//! WebSocket transport: the upgrade handshake (everything is checked before the 101) and
//! the per-connection session.

pub mod protocol;
pub mod session;

use http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};

use crate::auth::{AuthError, Role};
use crate::config::Config;
use crate::http::api::{bearer, query_params};
use crate::http::router::origin_allowed;
use crate::http::{ApiError, Response, full};
use crate::ids::check_client_id;
use crate::state::AppState;

/// Buffers sized for very many idle agents: tungstenite's defaults (128 KiB read buffer,
/// allocated and zero-filled up front) would cost ~135 KiB per connection. Agent messages
/// are small by protocol (large inventories go over HTTP) and a larger frame reserves what
/// it needs, so a 1 KiB read buffer suffices (docs/benchmarks.md, benchmark 1).
pub fn ws_config(config: &Config) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(4 * 1024)
        .max_write_buffer_size(1024 * 1024)
        .max_message_size(Some(config.ws_max_message_bytes))
        .max_frame_size(Some(config.ws_max_message_bytes))
}

/// `GET /ws/{client_id}`: validates the id, the token, the origin and the handshake, then
/// answers 101 and runs the session on the app's task tracker.
pub async fn upgrade(
    state: &AppState,
    client_id: &str,
    mut req: Request<Incoming>,
) -> Result<Response, ApiError> {
    let checked = check_upgrade(state, client_id, &req);
    let (exp, key) = match checked {
        Ok(ok) => ok,
        Err(e) => {
            state.metrics.ws_rejected_upgrades.inc();
            tracing::info!(agent = client_id, reason = %e, "websocket upgrade refused");
            return Err(e);
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let session_state = state.sessions.clone();
    let config = ws_config(&state.config);
    let id = client_id.to_string();
    state.lifecycle.tasks().spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    WsRole::Server,
                    Some(config),
                )
                .await;
                session::run(session_state, ws, id, exp).await;
            }
            Err(e) => tracing::debug!(agent = %id, error = %e, "upgrade did not complete"),
        }
    });

    let mut resp = http::Response::new(full(""));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
            .map_err(|_| ApiError::NotWebSocket)?,
    );
    Ok(resp)
}

/// Returns the token's expiry and the handshake key.
fn check_upgrade(
    state: &AppState,
    client_id: &str,
    req: &Request<Incoming>,
) -> Result<(u64, String), ApiError> {
    check_client_id(client_id).map_err(|m| ApiError::bad_request("invalid_client_id", m))?;
    if state.lifecycle.is_draining() {
        return Err(ApiError::Draining);
    }
    let headers = req.headers();
    let query = query_params(req.uri().query());
    // The header is preferred (proxies log query strings); `?token=` is the seed's form.
    let token = bearer(headers)
        .map(str::to_string)
        .or_else(|| {
            query
                .into_iter()
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v)
        })
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Missing)?;
    let claims = state.tokens.verify(&token)?;
    if claims.role != Role::Agent {
        return Err(ApiError::Forbidden(
            "WebSocket sessions need an agent token (role agent)".into(),
        ));
    }
    if claims.sub != client_id {
        return Err(ApiError::Forbidden(format!(
            "the token is for client_id `{}`, not `{client_id}`",
            claims.sub
        )));
    }
    if let Some(origin) = headers.get(header::ORIGIN)
        && !origin_allowed(state, Some(origin))
    {
        return Err(ApiError::Forbidden(format!(
            "Origin {} is not allowed; only {} (SERVER_URL) may open agent sessions from a browser",
            origin.to_str().unwrap_or("?"),
            state.config.public_origin
        )));
    }
    let key = websocket_key(headers).ok_or(ApiError::NotWebSocket)?;
    Ok((claims.exp, key))
}

fn websocket_key(headers: &HeaderMap) -> Option<String> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return None;
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION)?.to_str().ok()? != "13" {
        return None;
    }
    Some(
        headers
            .get(header::SEC_WEBSOCKET_KEY)?
            .to_str()
            .ok()?
            .to_string(),
    )
}
