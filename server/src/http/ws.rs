//! `GET /ws/{client_id}`: the WebSocket upgrade. Everything is checked before the 101
//! (draining, the token, its role and subject, the origin, the handshake), so a refused
//! agent gets a status and a JSON reason it can act on; the session itself runs in
//! `ws::session` on the lifecycle's task tracker.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use http::{HeaderMap, header};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::create_response_with_body;
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
    // Owned, so that the request body (not Sync) is not borrowed across the await.
    let headers = req.headers().clone();
    let checked = async {
        let ClientId(id) = client_id?;
        let exp = check_upgrade(&state, &id, query.token, &headers).await?;
        Ok::<_, ApiError>((id, exp))
    }
    .await
    .and_then(|(id, exp)| {
        // RFC 6455's handshake checks and the 101 with its Sec-WebSocket-Accept.
        let switching =
            create_response_with_body(&req, Body::empty).map_err(|_| ApiError::NotWebSocket)?;
        Ok((id, exp, switching))
    });
    let (client_id, exp, switching) = match checked {
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

    Ok(switching)
}

/// Returns the token's expiry. The token is checked against revocations too: a deleted
/// or revoked agent's old token gets a 401 saying so.
async fn check_upgrade(
    state: &AppState,
    client_id: &str,
    query_token: Option<String>,
    headers: &HeaderMap,
) -> Result<u64> {
    if state.lifecycle.is_draining() {
        return Err(ApiError::Draining);
    }
    let token = bearer(headers)
        .map(str::to_string)
        .or(query_token)
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Missing)?;
    let claims = state.creds.authenticate(&token).await?;
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
    Ok(claims.exp)
}
