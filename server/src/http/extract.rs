//! Typed extractors: who is calling ([`Principal`], [`Admin`]), which agent a path names
//! ([`ClientId`]), the shared page query ([`Page`]), other query strings ([`Query`]) and
//! JSON bodies ([`ApiJson`]). Each rejection is an [`ApiError`], so every bad input gets
//! the same JSON error body.

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use http::request::Parts;
use http::{HeaderMap, Method, header};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;

use super::error::{ApiError, ErrorCode, Result};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::ConnectInfo;

use crate::audit::{Actor, RequestContext, client_address};
use crate::auth::ui_session::{COOKIE, cookie_hash};
use crate::auth::{AuthError, Role};
use crate::ids::check_client_id;
use crate::state::AppState;
use crate::storable::check_json;
use crate::store::now_ms;

pub(crate) use crate::limits::MAX_API_BODY;

/// The caller, from `Authorization: Bearer <token>` or, without that header, the web
/// UI's session cookie (an admin). A cookie on a state-changing request must come with
/// this server's own `Origin` (see [`same_origin`]), which with SameSite=Strict keeps
/// other sites from riding on it.
#[derive(Debug, Clone)]
pub(crate) struct Principal {
    /// The token's `sub`: an agent's client_id, or an operator's name (`ui` for the UI).
    pub(crate) client_id: String,
    /// What the caller may do.
    pub(crate) role: Role,
    /// Who the audit log says acted: the token's subject and `jti`, or the UI session.
    pub(crate) actor: Actor,
}

impl Principal {
    /// An admin, or the agent `client_id` itself.
    pub(crate) fn require_self_or_admin(&self, client_id: &str) -> Result<()> {
        match self.role {
            Role::Admin => Ok(()),
            Role::Agent if self.client_id == client_id => Ok(()),
            Role::Agent => Err(ApiError::Forbidden(format!(
                "an agent token may only act for its own client_id ({})",
                self.client_id
            ))),
        }
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        if let Some(token) = bearer(&parts.headers) {
            // Signature and claims, then revocations (cached per replica).
            let claims = state.creds.authenticate(token).await?;
            return Ok(Principal {
                actor: Actor::from_claims(&claims),
                client_id: claims.sub,
                role: claims.role,
            });
        }
        if parts.headers.contains_key(header::AUTHORIZATION) {
            return Err(AuthError::Missing.into());
        }
        let Some(cookie) = session_cookie(&parts.headers) else {
            return Err(AuthError::Missing.into());
        };
        let hash = cookie_hash(cookie);
        let live = state
            .store
            .ui_session_expiry(hash.clone(), now_ms())
            .await?;
        if live.is_none() {
            // An expired or revoked session is no credential.
            return Err(AuthError::Missing.into());
        }
        let safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        if !safe && !same_origin(state, &parts.headers) {
            return Err(cross_site());
        }
        Ok(Principal {
            client_id: "ui".into(),
            role: Role::Admin,
            actor: ui_actor(&hash),
        })
    }
}

/// The audit log's name for a UI session: a short prefix of its stored hash, which
/// tells sessions apart without being usable as the cookie.
pub(crate) fn ui_actor(cookie_hash: &str) -> Actor {
    Actor::UiSession {
        id: cookie_hash.chars().take(12).collect(),
    }
}

/// The client's address: the TCP peer, or from a trusted proxy (TRUSTED_PROXIES) the
/// first untrusted `X-Forwarded-For` hop from the right (`audit::client_address`).
pub(crate) fn source_address(parts: &Parts, state: &AppState) -> IpAddr {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let forwarded = parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok());
    client_address(peer, forwarded, &state.config.credentials.trusted_proxies)
}

/// The source address of a request, for routes without a credential (enrollment).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Source(pub IpAddr);

impl FromRequestParts<AppState> for Source {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        Ok(Source(source_address(parts, state)))
    }
}

/// An admin caller and where the request came from, as every audited change takes it:
/// the actor from the [`Principal`] (token subject and `jti`, or the UI session), the
/// source from [`source_address`]. Agents get 403.
#[derive(Debug, Clone)]
pub(crate) struct AdminContext(pub RequestContext);

impl FromRequestParts<AppState> for AdminContext {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        let principal = Principal::from_request_parts(parts, state).await?;
        if principal.role != Role::Admin {
            return Err(ApiError::Forbidden(
                "this endpoint needs an admin token".into(),
            ));
        }
        Ok(AdminContext(RequestContext {
            actor: principal.actor,
            source: Some(source_address(parts, state)),
        }))
    }
}

/// A caller with the admin role (a [`Principal`] that is an admin); agents get 403.
#[derive(Debug, Clone)]
pub(crate) struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        let principal = Principal::from_request_parts(parts, state).await?;
        match principal.role {
            Role::Admin => Ok(Admin),
            Role::Agent => Err(ApiError::Forbidden(
                "this endpoint needs an admin token".into(),
            )),
        }
    }
}

/// The bearer token of `Authorization`, if it has that scheme (case-insensitive).
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The session cookie's value, from any `Cookie` header.
pub(crate) fn session_cookie(headers: &HeaderMap) -> Option<&str> {
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
pub(crate) fn same_origin(state: &AppState, headers: &HeaderMap) -> bool {
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

/// The refusal of a cookie-authenticated request from another site.
pub(crate) fn cross_site() -> ApiError {
    ApiError::Forbidden(
        "cross-site request refused: requests signed in with the UI's cookie must come from this server's own pages".into(),
    )
}

/// A `{client_id}` path parameter that follows the id rules (`ids::check_client_id`);
/// anything else is a 400 `invalid_client_id`.
#[derive(Debug, Clone)]
pub(crate) struct ClientId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ClientId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(ErrorCode::InvalidClientId, e.body_text()))?;
        check_client_id(&id).map_err(|m| ApiError::bad_request(ErrorCode::InvalidClientId, m))?;
        Ok(ClientId(id))
    }
}

/// The one path parameter of a route such as `/api/v1/jobs/{id}`, percent-decoded. A
/// segment that does not decode to UTF-8 (`%FF`) is a 400 `invalid_path`, with the same
/// JSON body as every other error (axum's own rejection is plain text).
#[derive(Debug, Clone)]
pub(crate) struct Id(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| Id(id))
            .map_err(|e| ApiError::bad_request(ErrorCode::InvalidPath, e.body_text()))
    }
}

/// A query string decoded into `T` (serde_urlencoded); undecodable is a 400
/// `invalid_query`.
#[derive(Debug, Clone)]
pub(crate) struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self> {
        axum::extract::Query::try_from_uri(&parts.uri)
            .map(|q| Query(q.0))
            .map_err(|e| ApiError::bad_request(ErrorCode::InvalidQuery, e.body_text()))
    }
}

/// The page parameters shared by every list endpoint: `limit` and the cursors `before`
/// and `after` (each a `next` value from a previous page). An empty value means the
/// parameter is absent, everywhere.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub(crate) struct Page {
    limit: Option<String>,
    before: Option<String>,
    after: Option<String>,
}

impl Page {
    /// `limit`, decimal digits from 1 to `max`; `default` when absent or empty.
    pub(crate) fn limit(&self, default: i64, max: i64) -> Result<i64> {
        match self.limit.as_deref().filter(|v| !v.is_empty()) {
            None => Ok(default),
            // Digits only: `+5` or ` 5` would parse, but no client means them.
            Some(v) => match v
                .parse::<i64>()
                .ok()
                .filter(|_| v.bytes().all(|b| b.is_ascii_digit()))
            {
                Some(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(ApiError::bad_request(
                    ErrorCode::InvalidLimit,
                    format!("limit must be a number from 1 to {max}"),
                )),
            },
        }
    }

    /// A `limit` query string made of its value alone, for tests.
    #[cfg(test)]
    pub(crate) fn with_limit(limit: &str) -> Page {
        Page {
            limit: Some(limit.to_string()),
            ..Page::default()
        }
    }

    /// `after`, an id cursor, if given.
    pub(crate) fn after(&self) -> Option<String> {
        self.after.clone().filter(|a| !a.is_empty())
    }

    /// `before`, a `{created_at}.{id}` cursor, if given.
    pub(crate) fn before(&self) -> Result<Option<(i64, String)>> {
        let Some(cursor) = self.before.as_deref().filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        cursor
            .split_once('.')
            .and_then(|(at, id)| Some((at.parse().ok()?, id.to_string())))
            .map(Some)
            .ok_or_else(|| {
                ApiError::bad_request(
                    ErrorCode::InvalidCursor,
                    "before must be a `next` value from a previous page",
                )
            })
    }

    /// The `next` cursor of a page of `len` rows: the last row's, when the page is full.
    pub(crate) fn next<T>(len: usize, limit: i64, last: Option<T>) -> Option<T> {
        (len as i64 == limit).then_some(last).flatten()
    }
}

impl<S: Sync> FromRequestParts<S> for Page {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self> {
        Query::<Page>::from_request_parts(parts, state)
            .await
            .map(|q| q.0)
    }
}

/// A JSON body of at most `LIMIT` bytes, decoded into `T`. Malformed JSON is a 400 with
/// its line and column. The Content-Type may be absent, JSON (`application/json` or
/// `*+json`) or `application/x-www-form-urlencoded`, which is what `curl -d` sends; any
/// other is a 415.
#[derive(Debug, Clone)]
pub(crate) struct ApiJson<T, const LIMIT: usize = MAX_API_BODY>(pub T);

impl<T: DeserializeOwned, S: Sync, const LIMIT: usize> FromRequest<S> for ApiJson<T, LIMIT> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self> {
        check_json_content_type(req.headers())?;
        let (parts, mut body) = req.into_parts();
        let bytes = read_body(&parts.headers, &mut body, LIMIT).await?;
        if bytes.is_empty() {
            return Err(ApiError::bad_request(
                ErrorCode::EmptyBody,
                "the request body is empty; send a JSON object",
            ));
        }
        let value = serde_json::from_slice(&bytes)?;
        json_storable("", &bytes)?;
        Ok(ApiJson(value))
    }
}

/// Refuses a JSON body that holds U+0000 anywhere (see `storable`); the error names the
/// field by its path within `document`.
pub(crate) fn json_storable(document: &str, body: &[u8]) -> Result<()> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request(ErrorCode::InvalidJson, "the body is not UTF-8"))?;
    Ok(check_json(document, text)?)
}

/// Refuses a body that declares a type other than JSON or the form type `curl -d` uses.
pub(crate) fn check_json_content_type(headers: &HeaderMap) -> Result<()> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let mime = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime == "application/json"
        || mime.ends_with("+json")
        || mime == "application/x-www-form-urlencoded"
    {
        return Ok(());
    }
    Err(ApiError::UnsupportedMediaType(format!(
        "send the body as application/json, not {mime}"
    )))
}

/// Reads a body of at most `limit` bytes; over the limit it is a 413 and nothing is kept.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: &mut Body,
    limit: usize,
) -> Result<Vec<u8>> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        discard(body, limit.saturating_mul(4).max(1024 * 1024)).await;
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut collected = Vec::with_capacity(declared.unwrap_or(0) as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::bad_request(
                ErrorCode::BodyReadFailed,
                format!("could not read the request body: {e}"),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            if collected.len() + data.len() > limit {
                discard(body, limit.saturating_mul(4).max(1024 * 1024)).await;
                return Err(ApiError::PayloadTooLarge { limit });
            }
            collected.extend_from_slice(&data);
        }
    }
    Ok(collected)
}

/// Reads and drops up to `budget` bytes of what remains of a refused body, so that the
/// client (usually still sending) reads our answer instead of a broken pipe. Past the
/// budget the connection is closed, as proxies do.
pub(crate) async fn discard(body: &mut Body, mut budget: usize) {
    while let Some(Ok(frame)) = body.frame().await {
        let n = frame.data_ref().map_or(0, |d| d.len());
        if n >= budget {
            return;
        }
        budget -= n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1; b=2".parse().unwrap());
        h.append(
            header::COOKIE,
            "theme=dark; agent_server_session=abc".parse().unwrap(),
        );
        assert_eq!(session_cookie(&h), Some("abc"));
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "agent_server_session=".parse().unwrap());
        assert_eq!(session_cookie(&h), None);
    }
}
