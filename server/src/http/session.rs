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
use serde::{Deserialize, Serialize};

use super::error::{ApiError, Result};
use super::extract::{ApiJson, Source, cross_site, same_origin, session_cookie, ui_actor};
use super::openapi::{
    BadRequest, ErrorBody, Forbidden, PayloadTooLarge, TooManyRequests, Unavailable,
    UnsupportedMediaType,
};
use crate::audit::{Actor, AuditAction, AuditEvent, RequestContext};
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
fn no_store(body: impl Serialize, cookie: Option<String>) -> Response {
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

/// Body of `POST /api/v1/session`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SignIn {
    /// ADMIN_PASSWORD.
    password: String,
}

/// A sign-in that worked.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct SignedIn {
    /// Always true.
    signed_in: bool,
    /// When the session ends (RFC 3339 UTC).
    expires_at: String,
}

/// Whether this browser is signed in, and what the page shows about the server.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct SessionState {
    signed_in: bool,
    /// When the session ends (RFC 3339 UTC); null unless signed in.
    expires_at: Option<String>,
    /// Whether ADMIN_PASSWORD is set, so that signing in can work.
    sign_in_enabled: bool,
    /// The replica that answered.
    pod: String,
    server_version: &'static str,
}

/// A sign-out.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct SignedOut {
    /// Always false.
    signed_in: bool,
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
        (status = 200, description = "Signed in; `Set-Cookie` carries the session", body = SignedIn, headers(("Set-Cookie" = String, description = "The session cookie: HttpOnly, SameSite=Strict"))),
        (status = 400, response = BadRequest),
        (status = 401, description = "Wrong password (`wrong_password`)", body = ErrorBody),
        (status = 403, description = "Sign-in is disabled (no ADMIN_PASSWORD: `sign_in_disabled`) or the request comes from another origin (`forbidden`)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn sign_in(
    State(state): State<AppState>,
    Source(source): Source,
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
        let ctx = RequestContext {
            actor: Actor::Anonymous,
            source: Some(source),
        };
        state
            .creds
            .audit()
            .record_or_log(AuditEvent::now(&ctx, AuditAction::SignInFailed, "ui"))
            .await;
        return Err(ApiError::WrongPassword);
    }
    let cookie = hex(&rand::random::<[u8; 32]>());
    let now = now_ms();
    let ttl = state.config.ui.session_ttl;
    let expires_at = now + ttl.as_millis() as i64;
    let hash = cookie_hash(&cookie);
    state
        .store
        .create_ui_session(hash.clone(), now, expires_at)
        .await?;
    let ctx = RequestContext {
        actor: ui_actor(&hash),
        source: Some(source),
    };
    state
        .creds
        .audit()
        .record_or_log(AuditEvent::now(&ctx, AuditAction::SignInSucceeded, "ui"))
        .await;
    state.metrics.sign_in(SignInOutcome::Ok);
    tracing::info!("web UI sign-in");
    let set = format!(
        "{COOKIE}={cookie}; {}",
        cookie_attributes(&state, &headers, ttl.as_secs())
    );
    Ok(no_store(
        SignedIn {
            signed_in: true,
            expires_at: rfc3339(expires_at),
        },
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
        (status = 200, description = "Whether this browser is signed in", body = SessionState),
        (status = 503, response = Unavailable),
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
        SessionState {
            signed_in: expires.is_some(),
            expires_at: expires.map(rfc3339),
            sign_in_enabled: state.sign_in.enabled(),
            pod: state.config.pod_id.clone(),
            server_version: env!("CARGO_PKG_VERSION"),
        },
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
        (status = 200, description = "Signed out; the cookie is cleared", body = SignedOut, headers(("Set-Cookie" = String, description = "The session cookie, expired"))),
        (status = 403, response = Forbidden),
        (status = 503, response = Unavailable),
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
    Ok(no_store(SignedOut { signed_in: false }, Some(clear)))
}
