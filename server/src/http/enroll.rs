//! `/api/v1/enroll-secrets` (admin: create, list, revoke) and `/api/v1/enroll` (no token:
//! an enroll secret turns a client id into an agent with its own token).

use axum::Json;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use http::StatusCode;
use serde::Serialize;

use super::error::Result;
use super::extract::{AdminContext, ApiJson, Page, Source};
use crate::credentials::{DEFAULT_PAGE, EnrollRequest, MAX_PAGE, NewEnrollSecret};
use crate::ids::rfc3339;
use crate::state::AppState;
use crate::store::EnrollSecretRow;

/// An enroll secret as the API shows it: never the secret, nor its hash.
#[derive(Serialize)]
struct EnrollSecretView {
    id: String,
    name: String,
    labels: Vec<String>,
    allow_reenroll: bool,
    created_at: String,
    expires_at: Option<String>,
    max_uses: Option<i64>,
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

/// `POST /api/v1/enroll-secrets` with `{"name", "labels"?, "expires_in_seconds"?,
/// "max_uses"?, "allow_reenroll"?}`: 201 with the secret, shown this once.
pub(super) async fn create(
    State(state): State<AppState>,
    AdminContext(ctx): AdminContext,
    ApiJson(body): ApiJson<NewEnrollSecret>,
) -> Result<impl IntoResponse> {
    let created = state.creds.create_enroll_secret(&ctx, body).await?;
    let mut view = serde_json::to_value(EnrollSecretView::from(created.record)).unwrap_or_default();
    view["secret"] = created.secret.into();
    Ok((StatusCode::CREATED, Json(view)))
}

/// `GET /api/v1/enroll-secrets?limit=&after=`: every secret with its use count, oldest
/// first.
pub(super) async fn list(
    State(state): State<AppState>,
    _: AdminContext,
    page: Page,
) -> Result<Json<serde_json::Value>> {
    let limit = page.limit(i64::from(DEFAULT_PAGE), i64::from(MAX_PAGE))?;
    let secrets = state
        .creds
        .list_enroll_secrets(page.after(), Some(limit as u32))
        .await?;
    let next = Page::next(secrets.len(), limit, secrets.last().map(|s| s.id.clone()));
    let secrets: Vec<EnrollSecretView> = secrets.into_iter().map(Into::into).collect();
    Ok(Json(
        serde_json::json!({"enroll_secrets": secrets, "next": next}),
    ))
}

/// `DELETE /api/v1/enroll-secrets/{id}`: no agent can enroll with it any more.
pub(super) async fn revoke(
    State(state): State<AppState>,
    AdminContext(ctx): AdminContext,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>> {
    let record = state.creds.revoke_enroll_secret(&ctx, &id).await?;
    Ok(Json(
        serde_json::to_value(EnrollSecretView::from(record)).unwrap_or_default(),
    ))
}

/// `POST /api/v1/enroll` with `{"secret", "client_id", "hostname"?}` and no token: 201
/// `{"client_id", "token", "expires_at", "labels"}`. Rate limited per source address.
pub(super) async fn enroll(
    State(state): State<AppState>,
    Source(source): Source,
    ApiJson(body): ApiJson<EnrollRequest>,
) -> Result<impl IntoResponse> {
    let enrolled = state.creds.enroll(source, body).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "client_id": enrolled.client_id,
            "token": enrolled.token,
            "expires_at": rfc3339(enrolled.expires_at_ms),
            "labels": enrolled.labels,
        })),
    ))
}
