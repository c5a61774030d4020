//! `/api/v1/session`: the web UI's sign-in with the admin password.
//!
//! A sign-in creates a server-side session (a hash of the cookie is stored, so signing
//! out ends it on every replica) and sets an HttpOnly, SameSite=Strict cookie. On API
//! routes the cookie stands in for an admin token (`extract::Principal`); a
//! state-changing request with it must come from this server's own origin.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode, header};
use serde::Deserialize;

use super::error::{ApiError, Result};
use super::extract::{ApiJson, cross_site, same_origin, session_cookie};
use super::openapi::{ErrorBody, SessionDoc};
use crate::auth::ui_session::{COOKIE, cookie_hash};
use crate::binaries::storage::hex;
use crate::ids::rfc3339;
use crate::metrics::SignInOutcome;
use crate::state::AppState;
use crate::store::now_ms;

/// `Secure` only when the browser is talking to SERVER_URL over https; a port-forward
/// to plain http must still get a cookie it will send back.
fn cookie_attributes(state: &AppState, headers: &HeaderMap, max_age: u64) -> String {
    let public = &state.config.public_origin;
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let secure = public
        .strip_prefix("https://")
        .is_some_and(|authority| host.is_some_and(|h| h.eq_ignore_ascii_case(authority)));
    format!(
        "Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        if secure { "; Secure" } else { "" }
    )
}

/// The UI's answers carry a cookie or say who is signed in: never cached.
fn no_store(body: serde_json::Value, cookie: Option<String>) -> Response {
    let mut resp = (StatusCode::OK, Json(body)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    if let Some(v) = cookie.and_then(|c| http::HeaderValue::from_str(&c).ok()) {
        h.insert(header::SET_COOKIE, v);
    }
    resp
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SignIn {
    password: String,
}

/// `POST /api/v1/session` with `{"password": …}`: sets the session cookie.
#[utoipa::path(
    post,
    path = "/api/v1/session",
    operation_id = "sign_in",
    tag = "session",
    request_body(content = SignIn, content_type = "application/json"),
    security(()),
    responses(
        (status = 200, description = "Signed in; `Set-Cookie` carries the session", body = SessionDoc),
        (status = 400, description = "Invalid input; `error.code` says which rule was broken", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential does not grant this", body = ErrorBody),
        (status = 413, description = "The body is larger than the endpoint accepts", body = ErrorBody),
        (status = 415, description = "The body's Content-Type is not accepted", body = ErrorBody),
        (status = 503, description = "The database does not answer or the replica is draining; retry (`Retry-After`)", body = ErrorBody),
        (status = 429, description = "Too many failed sign-ins (`Retry-After`)", body = ErrorBody),
    ),
)]
pub(super) async fn sign_in(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: std::result::Result<ApiJson<SignIn, 4096>, ApiError>,
) -> Result<Response> {
    if headers.contains_key(header::ORIGIN) && !same_origin(&state, &headers) {
        return Err(cross_site());
    }
    if !state.sign_in.enabled() {
        state.metrics.sign_in(SignInOutcome::Disabled);
        return Err(ApiError::SignInDisabled);
    }
    if let Some(retry_after) = state.sign_in.limited() {
        state.metrics.sign_in(SignInOutcome::RateLimited);
        return Err(ApiError::TooManyRequests {
            message: format!("too many failed sign-ins; try again in {retry_after} seconds"),
            retry_after,
        });
    }
    let ApiJson(body) = body?;
    if !state.sign_in.password_matches(&body.password) {
        state.sign_in.failed();
        state.metrics.sign_in(SignInOutcome::WrongPassword);
        tracing::warn!("web UI sign-in with a wrong password");
        return Err(ApiError::WrongPassword);
    }
    let cookie = hex(&rand::random::<[u8; 32]>());
    let now = now_ms();
    let ttl = state.config.ui.session_ttl;
    let expires_at = now + ttl.as_millis() as i64;
    state
        .store
        .create_ui_session(cookie_hash(&cookie), now, expires_at)
        .await?;
    state.metrics.sign_in(SignInOutcome::Ok);
    tracing::info!("web UI sign-in");
    let set = format!(
        "{COOKIE}={cookie}; {}",
        cookie_attributes(&state, &headers, ttl.as_secs())
    );
    Ok(no_store(
        serde_json::json!({"signed_in": true, "expires_at": rfc3339(expires_at)}),
        Some(set),
    ))
}

/// `GET /api/v1/session`: whether this browser is signed in, and whether it could be.
#[utoipa::path(
    get,
    path = "/api/v1/session",
    operation_id = "get_session",
    tag = "session",
    security(()),
    responses(
        (status = 200, description = "Whether this browser is signed in", body = SessionDoc),
        (status = 503, description = "The database does not answer or the replica is draining; retry (`Retry-After`)", body = ErrorBody),
    ),
)]
pub(super) async fn get(State(state): State<AppState>, headers: HeaderMap) -> Result<Response> {
    let expires = match session_cookie(&headers) {
        Some(cookie) => {
            state
                .store
                .ui_session_expiry(cookie_hash(cookie), now_ms())
                .await?
        }
        None => None,
    };
    Ok(no_store(
        serde_json::json!({
            "signed_in": expires.is_some(),
            "expires_at": expires.map(rfc3339),
            "sign_in_enabled": state.sign_in.enabled(),
            "pod": state.config.pod_id,
            "server_version": env!("CARGO_PKG_VERSION"),
        }),
        None,
    ))
}

/// `DELETE /api/v1/session`: ends the session everywhere and clears the cookie. Like
/// every state-changing request made with the cookie, it must come from this origin.
#[utoipa::path(
    delete,
    path = "/api/v1/session",
    operation_id = "sign_out",
    tag = "session",
    security(()),
    responses(
        (status = 200, description = "Signed out; the cookie is cleared", body = SessionDoc),
        (status = 403, description = "The credential does not grant this", body = ErrorBody),
        (status = 503, description = "The database does not answer or the replica is draining; retry (`Retry-After`)", body = ErrorBody),
    ),
)]
pub(super) async fn sign_out(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response> {
    if let Some(cookie) = session_cookie(&headers) {
        if !same_origin(&state, &headers) {
            return Err(cross_site());
        }
        state.store.delete_ui_session(cookie_hash(cookie)).await?;
        tracing::info!("web UI sign-out");
    }
    let clear = format!("{COOKIE}=; {}", cookie_attributes(&state, &headers, 0));
    Ok(no_store(
        serde_json::json!({"signed_in": false}),
        Some(clear),
    ))
}
