//! `GET /ws/{client_id}`: the WebSocket upgrade. Everything is checked before the 101
//! (draining, the token, its role and subject, the origin, the handshake), so a refused
//! agent gets a status and a JSON reason it can act on; the session itself runs in
//! `ws::session` on the lifecycle's task tracker.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;

use super::error::{ApiError, Result};
use super::extract::{ClientId, Query, bearer};
use crate::auth::{AuthError, Role};
use crate::state::AppState;
use crate::ws::{session, ws_config};

/// The seed's way of passing the token; the `Authorization` header is preferred, since
/// proxies log query strings.
#[derive(Deserialize)]
pub(super) struct TokenQuery {
    token: Option<String>,
}

/// Validates the token, the origin and the handshake, then answers 101 and runs the
/// session.
pub(super) async fn upgrade(
    State(state): State<AppState>,
    client_id: std::result::Result<ClientId, ApiError>,
    Query(query): Query<TokenQuery>,
    mut req: Request,
) -> Result<Response> {
    let checked = client_id.and_then(|ClientId(id)| {
        let (exp, key) = check_upgrade(&state, &id, query.token, req.headers())?;
        Ok((id, exp, key))
    });
    let (client_id, exp, key) = match checked {
        Ok(ok) => ok,
        Err(e) => {
            state.metrics.ws_rejected_upgrades.inc();
            tracing::info!(reason = %e, "websocket upgrade refused");
            return Err(e);
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let context = state.sessions.clone();
    let config = ws_config(&state.config);
    state.lifecycle.tasks().spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    WsRole::Server,
                    Some(config),
                )
                .await;
                session::run(context, ws, client_id, exp).await;
            }
            Err(e) => {
                tracing::debug!(agent = %client_id, error = %e, "upgrade did not complete")
            }
        }
    });

    let mut resp = Response::new(Body::empty());
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
    query_token: Option<String>,
    headers: &HeaderMap,
) -> Result<(u64, String)> {
    if state.lifecycle.is_draining() {
        return Err(ApiError::Draining);
    }
    let token = bearer(headers)
        .map(str::to_string)
        .or(query_token)
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
        && !origin
            .to_str()
            .is_ok_and(|o| o.eq_ignore_ascii_case(&state.config.public_origin))
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

/// The `Sec-WebSocket-Key` of a well-formed RFC 6455 handshake.
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
