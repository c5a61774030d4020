//! `GET /ws/{client_id}`: the WebSocket upgrade. Everything is checked before the 101
//! (draining, the opening handshake, the id, the token, its role and subject), so a
//! refused agent gets a status, the headers the RFCs give and a JSON reason it can act on;
//! each refusal is counted by reason (`agent_server_ws_handshake_refusals_total`). The
//! session itself runs in `ws::session` on the lifecycle's task tracker.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use base64::Engine;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;

use super::error::{ApiError, ErrorCode, Result};
use super::extract::{ClientId, Query, bearer};
use super::openapi::{BadRequest, ErrorBody, Forbidden, Unauthorized, Unavailable};
use crate::auth::{AuthError, Claims, Role};
use crate::metrics::{HandshakeRefusalLabels, RefusalReason};
use crate::state::AppState;
use crate::ws::{session, ws_config};

/// What a proxy needs so that an upgrade passes through it, for refusals caused by one.
const NGINX_HINT: &str = "behind nginx: `proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection \"upgrade\";` (ingress-nginx and Gateway API do this by themselves)";

/// An opening handshake that does not follow RFC 6455 §4.2.1, refused before any 101.
/// A request that asks for no upgrade is a 426 naming the protocol to upgrade to (RFC 9110
/// §15.5.22); one that asks but is malformed is a 400 (RFC 6455 §4.2.1); an unknown
/// WebSocket version is a 426 listing the one we speak (§4.4).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HandshakeRefusal {
    /// Not a GET (HEAD reaches this handler with GET's route).
    #[error("a WebSocket handshake is a GET request (RFC 6455 §4.1), not {0}")]
    Method(String),
    /// HTTP/1.0 (or older): its Upgrade header must be ignored (RFC 9110 §7.8).
    #[error(
        "{0:?} cannot upgrade to a WebSocket (RFC 9110 §7.8); it must be HTTP/1.1. A proxy in between speaks HTTP/1.0 to this server: {NGINX_HINT}"
    )]
    HttpVersion(Version),
    /// No `Upgrade: websocket`.
    #[error(
        "no `Upgrade: websocket` header (got {0}): this is a plain GET, not a WebSocket handshake. If a proxy is in between, it dropped the hop-by-hop Upgrade header: {NGINX_HINT}"
    )]
    UpgradeHeader(String),
    /// `Connection` lacks the `upgrade` option.
    #[error(
        "the Connection header does not include `upgrade` (got {0}). If a proxy is in between, it replaced the hop-by-hop Connection header: {NGINX_HINT}"
    )]
    ConnectionHeader(String),
    /// HTTP/1.1 without `Host` (RFC 9110 §7.2 makes that a 400).
    #[error("no Host header; HTTP/1.1 requests must carry one (RFC 9110 §7.2)")]
    Host,
    /// `Sec-WebSocket-Key` missing, repeated, or not 16 bytes in base64.
    #[error(
        "Sec-WebSocket-Key must be one header of 16 random bytes in base64 (RFC 6455 §4.1), got {0}"
    )]
    Key(String),
    /// `Sec-WebSocket-Version` other than 13.
    #[error(
        "this server speaks WebSocket version 13 (RFC 6455 §4.4, see the Sec-WebSocket-Version response header), got {0}"
    )]
    WebSocketVersion(String),
}

impl HandshakeRefusal {
    /// The status RFC 6455 and RFC 9110 give this refusal.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            HandshakeRefusal::Host | HandshakeRefusal::Key(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::UPGRADE_REQUIRED,
        }
    }

    /// The headers RFC 6455 and RFC 9110 require with this refusal: `Upgrade` (with the
    /// `upgrade` connection option it needs) on a 426, `Sec-WebSocket-Version` when the
    /// version was wrong.
    pub(crate) fn headers(&self) -> Vec<(header::HeaderName, HeaderValue)> {
        match self {
            HandshakeRefusal::WebSocketVersion(_) => vec![
                (
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                ),
                (header::UPGRADE, HeaderValue::from_static("websocket")),
                (header::CONNECTION, HeaderValue::from_static("upgrade")),
            ],
            _ if self.status() == StatusCode::UPGRADE_REQUIRED => vec![
                (header::UPGRADE, HeaderValue::from_static("websocket")),
                (header::CONNECTION, HeaderValue::from_static("upgrade")),
            ],
            _ => Vec::new(),
        }
    }

    fn reason(&self) -> RefusalReason {
        match self {
            HandshakeRefusal::Method(_) => RefusalReason::Method,
            HandshakeRefusal::HttpVersion(_) => RefusalReason::HttpVersion,
            HandshakeRefusal::UpgradeHeader(_) => RefusalReason::UpgradeHeader,
            HandshakeRefusal::ConnectionHeader(_) => RefusalReason::ConnectionHeader,
            HandshakeRefusal::Host => RefusalReason::Host,
            HandshakeRefusal::Key(_) => RefusalReason::Key,
            HandshakeRefusal::WebSocketVersion(_) => RefusalReason::WebsocketVersion,
        }
    }
}

/// The seed's way of passing the token; the `Authorization` header is preferred, since
/// proxies log query strings.
#[derive(Deserialize)]
pub(super) struct TokenQuery {
    pub(super) token: Option<String>,
}

/// Validates the handshake, the id and the token, then answers 101 and runs the session.
#[utoipa::path(
    get,
    path = "/ws/{client_id}",
    operation_id = "connect_agent",
    tag = "agents",
    description = "An agent's WebSocket (RFC 6455): a GET with `Upgrade: websocket`, `Connection: upgrade`, `Sec-WebSocket-Version: 13` and a `Sec-WebSocket-Key`, and the agent's own token (role `agent`, `sub` = `client_id`) in `Authorization: Bearer` (or `?token=`, which proxies log). Every check happens before the 101; after it the agent protocol of docs/protocol.md is spoken.",
    params(
        ("client_id" = String, Path, pattern = r"^([A-Za-z0-9_-][A-Za-z0-9._-]{0,127}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,126}|\.\.[A-Za-z0-9._-]{1,126})$", description = "The agent's client_id (the token's `sub`)"),
        ("token" = Option<String>, Query, description = "The token, where a client cannot set `Authorization`"),
    ),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol", headers(("Upgrade" = String, description = "`websocket`"), ("Sec-WebSocket-Accept" = String, description = "RFC 6455 §4.2.2"))),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 426, description = "Not a WebSocket opening handshake (`not_websocket`; the message names what is missing, and the proxy setting when a proxy is the likely cause)", body = ErrorBody, headers(("Upgrade" = String, description = "`websocket`"), ("Sec-WebSocket-Version" = String, description = "`13`, when the version was wrong"))),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn upgrade(
    State(state): State<AppState>,
    client_id: std::result::Result<ClientId, ApiError>,
    Query(query): Query<TokenQuery>,
    mut req: Request,
) -> Result<Response> {
    // Owned, so that the request body (not Sync) is not borrowed across the await.
    let (method, version, headers) = (req.method().clone(), req.version(), req.headers().clone());
    let checked = check_upgrade(&state, client_id, query.token, &method, version, &headers).await;
    let (claims, accept) = match checked {
        Ok(ok) => ok,
        Err(e) => {
            state.metrics.ws_rejected_upgrades.inc();
            state
                .metrics
                .ws_handshake_refusals
                .get_or_create(&HandshakeRefusalLabels {
                    reason: refusal_reason(&e),
                })
                .inc();
            // Proxy misconfigurations show here first: say what the request lacked.
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
                session::run(context, ws, Box::new(claims)).await;
            }
            Err(e) => {
                tracing::debug!(agent = %claims.sub, error = %e, "upgrade did not complete")
            }
        }
    });

    let mut switching = Response::new(Body::empty());
    *switching.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = switching.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    Ok(switching)
}

/// Every check before the 101, in the order a person fixes them: this replica, the
/// transport (the handshake, where proxies go wrong), the id, then the credential. Returns
/// the token's claims (their `sub` is the id) and the `Sec-WebSocket-Accept` value. The
/// token is checked against revocations too: a deleted or revoked agent's old token gets a
/// 401 saying so.
async fn check_upgrade(
    state: &AppState,
    client_id: std::result::Result<ClientId, ApiError>,
    query_token: Option<String>,
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Result<(Claims, HeaderValue)> {
    if state.lifecycle.is_draining() {
        return Err(ApiError::Draining);
    }
    let accept = check_handshake(method, version, headers)?;
    let ClientId(client_id) = client_id?;
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
    // No Origin check: this endpoint is authorized by a bearer token the client presents,
    // never by an ambient cookie, so a cross-site page cannot ride on a visitor's
    // credentials; and non-browser clients (Python's websocket-client) send an Origin of
    // their own choosing by default.
    Ok((claims, accept))
}

/// RFC 6455 §4.2.1's checks of the opening handshake; returns `Sec-WebSocket-Accept`.
pub(crate) fn check_handshake(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> std::result::Result<HeaderValue, HandshakeRefusal> {
    let shown = |name: header::HeaderName| {
        let values: Vec<String> = headers
            .get_all(&name)
            .iter()
            .map(|v| format!("`{}`", String::from_utf8_lossy(v.as_bytes())))
            .collect();
        if values.is_empty() {
            "none".to_string()
        } else {
            values.join(", ")
        }
    };
    let tokens = |name: header::HeaderName| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .collect()
    };

    if method != Method::GET {
        return Err(HandshakeRefusal::Method(method.to_string()));
    }
    if version < Version::HTTP_11 {
        return Err(HandshakeRefusal::HttpVersion(version));
    }
    // A protocol in Upgrade may carry a version (`websocket/13` is not one RFC 6455
    // defines, but the list syntax of RFC 9110 §7.8 is honoured).
    if !tokens(header::UPGRADE)
        .iter()
        .any(|p| p.split('/').next() == Some("websocket"))
    {
        return Err(HandshakeRefusal::UpgradeHeader(shown(header::UPGRADE)));
    }
    if !tokens(header::CONNECTION).iter().any(|o| o == "upgrade") {
        return Err(HandshakeRefusal::ConnectionHeader(shown(
            header::CONNECTION,
        )));
    }
    if headers.get(header::HOST).is_none() {
        return Err(HandshakeRefusal::Host);
    }
    let versions: Vec<_> = headers
        .get_all(header::SEC_WEBSOCKET_VERSION)
        .iter()
        .collect();
    if versions.len() != 1 || versions[0].as_bytes().trim_ascii() != b"13" {
        return Err(HandshakeRefusal::WebSocketVersion(shown(
            header::SEC_WEBSOCKET_VERSION,
        )));
    }
    let keys: Vec<_> = headers.get_all(header::SEC_WEBSOCKET_KEY).iter().collect();
    let key = match keys.as_slice() {
        [key] => key.as_bytes().trim_ascii(),
        _ => return Err(HandshakeRefusal::Key(shown(header::SEC_WEBSOCKET_KEY))),
    };
    let decoded = base64::engine::general_purpose::STANDARD.decode(key);
    if !decoded.is_ok_and(|k| k.len() == 16) {
        return Err(HandshakeRefusal::Key(shown(header::SEC_WEBSOCKET_KEY)));
    }
    HeaderValue::from_str(&derive_accept_key(key))
        .map_err(|_| HandshakeRefusal::Key(shown(header::SEC_WEBSOCKET_KEY)))
}

/// The metric label of any refusal of an upgrade.
fn refusal_reason(e: &ApiError) -> RefusalReason {
    match e {
        ApiError::Handshake(refusal) => refusal.reason(),
        ApiError::Draining => RefusalReason::Draining,
        ApiError::Unauthorized(_) => RefusalReason::Unauthorized,
        ApiError::Forbidden(_) => RefusalReason::Forbidden,
        ApiError::BadRequest {
            code: ErrorCode::InvalidClientId,
            ..
        } => RefusalReason::ClientId,
        _ => RefusalReason::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake(
        version: Version,
        pairs: &[(&str, &str)],
    ) -> std::result::Result<String, HandshakeRefusal> {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        check_handshake(&Method::GET, version, &headers).map(|v| v.to_str().unwrap().to_string())
    }

    const VALID: &[(&str, &str)] = &[
        ("host", "agents.example.com"),
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("sec-websocket-version", "13"),
    ];

    fn without(name: &str) -> Vec<(&'static str, &'static str)> {
        VALID.iter().copied().filter(|(k, _)| *k != name).collect()
    }

    fn with(name: &'static str, value: &'static str) -> Vec<(&'static str, &'static str)> {
        let mut h = without(name);
        h.push((name, value));
        h
    }

    #[test]
    fn a_valid_handshake_gets_the_accept_value_of_rfc_6455() {
        // RFC 6455 §1.3's example.
        assert_eq!(
            handshake(Version::HTTP_11, VALID).as_deref(),
            Ok("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
        // Header lists and case, as browsers and proxies send them.
        let h = with("connection", "keep-alive, Upgrade");
        assert!(handshake(Version::HTTP_11, &h).is_ok());
        let h = with("upgrade", "WebSocket");
        assert!(handshake(Version::HTTP_11, &h).is_ok());
    }

    #[test]
    fn each_broken_rule_has_its_own_refusal_status_and_headers() {
        let http10 = handshake(Version::HTTP_10, VALID).unwrap_err();
        assert_eq!(http10.status(), StatusCode::UPGRADE_REQUIRED);
        assert!(
            http10.to_string().contains("proxy_http_version 1.1"),
            "{http10}"
        );

        type Headers = Vec<(&'static str, &'static str)>;
        let cases: Vec<(Headers, RefusalReason, u16)> = vec![
            (without("upgrade"), RefusalReason::UpgradeHeader, 426),
            (with("upgrade", "h2c"), RefusalReason::UpgradeHeader, 426),
            (
                with("connection", "close"),
                RefusalReason::ConnectionHeader,
                426,
            ),
            (without("host"), RefusalReason::Host, 400),
            (without("sec-websocket-key"), RefusalReason::Key, 400),
            (
                with("sec-websocket-key", "c2hvcnQ="),
                RefusalReason::Key,
                400,
            ),
            (
                with("sec-websocket-key", "not base64 at all!!!!!!!"),
                RefusalReason::Key,
                400,
            ),
            (
                with("sec-websocket-version", "8"),
                RefusalReason::WebsocketVersion,
                426,
            ),
            (
                without("sec-websocket-version"),
                RefusalReason::WebsocketVersion,
                426,
            ),
        ];
        for (headers, reason, status) in cases {
            let refusal = handshake(Version::HTTP_11, &headers).unwrap_err();
            assert_eq!(
                (refusal.reason(), refusal.status().as_u16()),
                (reason, status),
                "{headers:?}"
            );
            let names: Vec<_> = refusal.headers().into_iter().map(|(k, _)| k).collect();
            if status == 426 {
                assert!(names.contains(&header::UPGRADE), "{refusal}");
            }
            if reason == RefusalReason::WebsocketVersion {
                assert!(names.contains(&header::SEC_WEBSOCKET_VERSION), "{refusal}");
            }
        }

        let head = check_handshake(&Method::HEAD, Version::HTTP_11, &HeaderMap::new()).unwrap_err();
        assert_eq!(head.reason(), RefusalReason::Method);
    }
}
