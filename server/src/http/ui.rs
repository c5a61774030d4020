//! The web UI: its embedded assets at `/`, sign-in with the admin password, and the
//! session cookie that stands in for a bearer token on `/api` routes.
//!
//! A sign-in creates a server-side session (a hash of the cookie is stored, so signing
//! out ends it on every replica) and sets an HttpOnly, SameSite=Strict cookie. On API
//! routes, a request without an `Authorization` header but with a live session cookie is
//! treated as an admin request; if it changes state, its `Origin` must be this server's
//! (SERVER_URL's origin, or the Host the browser talked to), which together with
//! SameSite=Strict keeps other sites from riding on the cookie.

use std::sync::LazyLock;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use hyper::body::Incoming;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::error::{ApiError, Result};
use super::{Response, json, read_json};
use crate::auth::Role;
use crate::auth::ui_session::{COOKIE, cookie_hash};
use crate::binaries::storage::hex;
use crate::ids::rfc3339;
use crate::metrics::SignInOutcome;
use crate::state::AppState;
use crate::store::now_ms;

/// The session cookie's value, from any `Cookie` header.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|v| !v.is_empty())
}

/// Whether a browser request comes from this server's own pages: its `Origin` is
/// SERVER_URL's origin or names the host it was sent to (a port-forward, for one). A
/// browser that sends no `Origin` must say `Sec-Fetch-Site: same-origin`.
fn same_origin(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) == Some("same-origin");
    };
    if origin.eq_ignore_ascii_case(&state.config.public_origin) {
        return true;
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    match (origin.split_once("://"), host) {
        (Some((_, authority)), Some(host)) => authority.eq_ignore_ascii_case(host),
        _ => false,
    }
}

fn cross_site() -> ApiError {
    ApiError::Forbidden(
        "cross-site request refused: requests signed in with the UI's cookie must come from this server's own pages".into(),
    )
}

/// On `/api` routes: a request that carries no `Authorization` header but a live session
/// cookie is given a short-lived admin token, so every handler authorizes it as usual.
/// State-changing requests must pass the same-origin check.
pub async fn session_auth(
    state: &AppState,
    mut req: Request<Incoming>,
) -> Result<Request<Incoming>> {
    if req.headers().contains_key(header::AUTHORIZATION) {
        return Ok(req);
    }
    let Some(cookie) = session_cookie(req.headers()) else {
        return Ok(req);
    };
    let live = state
        .store
        .ui_session_expiry(cookie_hash(cookie), now_ms())
        .await?;
    if live.is_none() {
        // An expired or revoked session is no credential; the handler says 401.
        return Ok(req);
    }
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe && !same_origin(state, req.headers()) {
        return Err(cross_site());
    }
    let token = state
        .tokens
        .mint("ui", Role::Admin, Duration::from_secs(60));
    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
        req.headers_mut().insert(header::AUTHORIZATION, v);
    }
    Ok(req)
}

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

fn no_store(resp: &mut Response) {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    password: String,
}

/// `POST /api/v1/session` with `{"password": …}`: sets the session cookie.
pub async fn sign_in(state: &AppState, req: Request<Incoming>) -> Result<Response> {
    if req.headers().contains_key(header::ORIGIN) && !same_origin(state, req.headers()) {
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
    let headers = req.headers().clone();
    let body: SignIn = read_json(req, 4096).await?;
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
    let mut resp = json(
        StatusCode::OK,
        &serde_json::json!({"signed_in": true, "expires_at": rfc3339(expires_at)}),
    );
    let set = format!(
        "{COOKIE}={cookie}; {}",
        cookie_attributes(state, &headers, ttl.as_secs())
    );
    if let Ok(v) = HeaderValue::from_str(&set) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    no_store(&mut resp);
    Ok(resp)
}

/// `GET /api/v1/session`: whether this browser is signed in, and whether it could be.
pub async fn session(state: &AppState, req: Request<Incoming>) -> Result<Response> {
    let expires = match session_cookie(req.headers()) {
        Some(cookie) => {
            state
                .store
                .ui_session_expiry(cookie_hash(cookie), now_ms())
                .await?
        }
        None => None,
    };
    let mut resp = json(
        StatusCode::OK,
        &serde_json::json!({
            "signed_in": expires.is_some(),
            "expires_at": expires.map(rfc3339),
            "sign_in_enabled": state.sign_in.enabled(),
            "pod": state.config.pod_id,
            "server_version": env!("CARGO_PKG_VERSION"),
        }),
    );
    no_store(&mut resp);
    Ok(resp)
}

/// `DELETE /api/v1/session`: ends the session everywhere and clears the cookie.
pub async fn sign_out(state: &AppState, req: Request<Incoming>) -> Result<Response> {
    if let Some(cookie) = session_cookie(req.headers()) {
        state.store.delete_ui_session(cookie_hash(cookie)).await?;
        tracing::info!("web UI sign-out");
    }
    let mut resp = json(StatusCode::OK, &serde_json::json!({"signed_in": false}));
    let clear = format!("{COOKIE}=; {}", cookie_attributes(state, req.headers(), 0));
    if let Ok(v) = HeaderValue::from_str(&clear) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    no_store(&mut resp);
    Ok(resp)
}

/// An asset compiled into the binary.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: LazyLock<String>,
}

macro_rules! asset {
    ($file:literal, $type:literal) => {
        Asset {
            body: include_str!(concat!("../../ui/", $file)),
            content_type: $type,
            etag: LazyLock::new(|| {
                let digest = Sha256::digest(include_str!(concat!("../../ui/", $file)));
                format!("\"{}\"", &hex(&digest)[..16])
            }),
        }
    };
}

static INDEX: Asset = asset!("index.html", "text/html; charset=utf-8");
static APP_JS: Asset = asset!("app.js", "text/javascript; charset=utf-8");
static APP_CSS: Asset = asset!("app.css", "text/css; charset=utf-8");
static FAVICON: Asset = asset!("favicon.svg", "image/svg+xml");

/// The UI's scripts, styles, fetches and images come from this server only; nothing may
/// frame it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// `GET /` (the page) and `GET /ui/{file}` (its assets).
pub fn asset(name: Option<&str>, req: &Request<Incoming>) -> Result<Response> {
    let asset = match name {
        None => &INDEX,
        Some("app.js") => &APP_JS,
        Some("app.css") => &APP_CSS,
        Some("favicon.svg") => &FAVICON,
        Some(other) => return Err(ApiError::NotFound(format!("no UI asset `{other}`"))),
    };
    let etag: &str = &asset.etag;
    let not_modified = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut resp = if not_modified {
        let mut r = http::Response::new(super::full(""));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else if req.method() == Method::HEAD {
        super::text(StatusCode::OK, asset.content_type, "")
    } else {
        super::text(StatusCode::OK, asset.content_type, asset.body)
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    // Revalidated on every load (a cheap 304), so an upgrade is picked up at once.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        h.append(
            header::COOKIE,
            HeaderValue::from_static("theme=dark; agent_server_session=abc"),
        );
        assert_eq!(session_cookie(&h), Some("abc"));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("agent_server_session="),
        );
        assert_eq!(session_cookie(&h), None);
    }
}
