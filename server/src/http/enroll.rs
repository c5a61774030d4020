//! `/api/v1/enroll-secrets` (admin: create, list, revoke) and `/api/v1/enroll` (no token:
//! an enroll secret turns a client id into an agent with its own token).

use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use http::StatusCode;
use serde::Serialize;

use super::error::Result;
use super::extract::{AdminContext, ApiJson, Id, Page, Source};
use super::openapi::{
    BadRequest, Conflict, ErrorBody, Forbidden, NotFound, PayloadTooLarge, TooManyRequests,
    Unauthorized, Unavailable, UnsupportedMediaType,
};
use crate::credentials::{DEFAULT_PAGE, EnrollRequest, MAX_PAGE, NewEnrollSecret};
use crate::ids::rfc3339;
use crate::state::AppState;
use crate::store::EnrollSecretRow;

/// An enroll secret as the API shows it: never the secret, nor its hash.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = EnrollSecret)]
pub(super) struct EnrollSecretView {
    id: String,
    name: String,
    /// Given to every agent that enrolls with it.
    labels: Vec<String>,
    /// Whether an enrolled client id may enroll again with it.
    allow_reenroll: bool,
    /// RFC 3339 UTC, as every time in this API.
    created_at: String,
    expires_at: Option<String>,
    max_uses: Option<i64>,
    /// Enrollments so far.
    use_count: i64,
    last_used_at: Option<String>,
    revoked_at: Option<String>,
}

impl From<EnrollSecretRow> for EnrollSecretView {
    fn from(s: EnrollSecretRow) -> Self {
        EnrollSecretView {
            labels: s.labels(),
            id: s.id,
            name: s.name,
            allow_reenroll: s.allow_reenroll,
            created_at: rfc3339(s.created_at),
            expires_at: s.expires_at.map(rfc3339),
            max_uses: s.max_uses,
            use_count: s.use_count,
            last_used_at: s.last_used_at.map(rfc3339),
            revoked_at: s.revoked_at.map(rfc3339),
        }
    }
}

/// An enroll secret just created: the only time `secret` is shown.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct EnrollSecretCreated {
    #[serde(flatten)]
    record: EnrollSecretView,
    /// What agents send to `POST /api/v1/enroll`.
    secret: String,
}

/// A page of enroll secrets, oldest first.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct EnrollSecretList {
    enroll_secrets: Vec<EnrollSecretView>,
    /// The `after` of the next page; null on the last page.
    next: Option<String>,
}

/// What an enrolled agent gets.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct Enrolled {
    client_id: String,
    /// The agent's own token (role `agent`), for `Authorization: Bearer`.
    token: String,
    /// RFC 3339 UTC.
    expires_at: String,
    /// The secret's labels, now the agent's.
    labels: Vec<String>,
}

/// `POST /api/v1/enroll-secrets` with `{"name", "labels"?, "expires_in_seconds"?,
/// "max_uses"?, "allow_reenroll"?}`: 201 with the secret, shown this once.
#[utoipa::path(
    post,
    path = "/api/v1/enroll-secrets",
    operation_id = "create_enroll_secret",
    tag = "credentials",
    request_body(content = NewEnrollSecret, content_type = "application/json"),
    responses(
        (status = 201, description = "Created; `secret` is shown this once", body = EnrollSecretCreated),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn create(
    State(state): State<AppState>,
    AdminContext(ctx): AdminContext,
    ApiJson(body): ApiJson<NewEnrollSecret>,
) -> Result<impl IntoResponse> {
    let created = state.creds.create_enroll_secret(&ctx, body).await?;
    Ok((
        StatusCode::CREATED,
        Json(EnrollSecretCreated {
            record: created.record.into(),
            secret: created.secret,
        }),
    ))
}

/// `GET /api/v1/enroll-secrets?limit=&after=`: every secret with its use count, oldest
/// first.
#[utoipa::path(
    get,
    path = "/api/v1/enroll-secrets",
    operation_id = "list_enroll_secrets",
    tag = "credentials",
    params(
        ("limit" = Option<String>, Query, pattern = r"^(0*([1-9][0-9]{0,2}|1000))?$", description = "Page size (default 100; 1 to 1000; empty: the default)"),
        ("after" = Option<String>, Query, description = "The `next` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of enroll secrets, oldest first", body = EnrollSecretList),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn list(
    State(state): State<AppState>,
    _: AdminContext,
    page: Page,
) -> Result<Json<EnrollSecretList>> {
    let limit = page.limit(i64::from(DEFAULT_PAGE), i64::from(MAX_PAGE))?;
    let secrets = state
        .creds
        .list_enroll_secrets(page.after(), Some(limit as u32))
        .await?;
    let next = Page::next(secrets.len(), limit, secrets.last().map(|s| s.id.clone()));
    Ok(Json(EnrollSecretList {
        enroll_secrets: secrets.into_iter().map(Into::into).collect(),
        next,
    }))
}

/// `DELETE /api/v1/enroll-secrets/{id}`: no agent can enroll with it any more.
#[utoipa::path(
    delete,
    path = "/api/v1/enroll-secrets/{id}",
    operation_id = "revoke_enroll_secret",
    tag = "credentials",
    params(
        ("id" = String, Path, description = "The enroll secret's id"),
    ),
    responses(
        (status = 200, description = "Revoked (revoking twice is no error); enrolled agents keep their tokens", body = EnrollSecretView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn revoke(
    State(state): State<AppState>,
    AdminContext(ctx): AdminContext,
    Id(id): Id,
) -> Result<Json<EnrollSecretView>> {
    let record = state.creds.revoke_enroll_secret(&ctx, &id).await?;
    Ok(Json(record.into()))
}

/// `POST /api/v1/enroll` with `{"secret", "client_id", "hostname"?}` and no token: 201
/// `{"client_id", "token", "expires_at", "labels"}`. Rate limited per source address.
#[utoipa::path(
    post,
    path = "/api/v1/enroll",
    operation_id = "enroll",
    tag = "credentials",
    security(()),
    request_body(content = EnrollRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Enrolled: the agent's own token", body = Enrolled),
        (status = 400, response = BadRequest),
        (status = 401, description = "The secret is unknown, expired, revoked or used up (`error.code` says which)", body = ErrorBody),
        (status = 409, response = Conflict),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn enroll(
    State(state): State<AppState>,
    Source(source): Source,
    ApiJson(body): ApiJson<EnrollRequest>,
) -> Result<impl IntoResponse> {
    let enrolled = state.creds.enroll(source, body).await?;
    Ok((
        StatusCode::CREATED,
        Json(Enrolled {
            client_id: enrolled.client_id,
            token: enrolled.token,
            expires_at: rfc3339(enrolled.expires_at_ms),
            labels: enrolled.labels,
        }),
    ))
}
