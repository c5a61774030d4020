//! `/api/v1/tokens`: mint, list and revoke the tokens recorded by their `jti`.

use axum::Json;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use http::StatusCode;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ErrorCode, Result};
use super::extract::{AdminContext, ApiJson, Page, Query};
use crate::credentials::{MintRequest, TokenListQuery};
use crate::ids::rfc3339;
use crate::state::AppState;
use crate::store::ApiTokenRow;

/// A recorded token as the API shows it (never the token itself).
#[derive(Serialize)]
struct TokenView {
    id: String,
    name: Option<String>,
    role: String,
    client_id: String,
    created_at: String,
    expires_at: String,
    last_used_at: Option<String>,
    revoked_at: Option<String>,
}

impl From<ApiTokenRow> for TokenView {
    fn from(t: ApiTokenRow) -> Self {
        TokenView {
            id: t.jti,
            name: t.name,
            role: t.role,
            client_id: t.subject,
            created_at: rfc3339(t.created_at),
            expires_at: rfc3339(t.expires_at),
            last_used_at: t.last_used_at.map(rfc3339),
            revoked_at: t.revoked_at.map(rfc3339),
        }
    }
}

/// `POST /api/v1/tokens` with `{"client_id", "role"?, "ttl_seconds"?, "name"?}`: 201 with
/// the token, shown this once. Minting an agent token enrolls the agent, so commands can
/// be queued for it.
pub(super) async fn create(
    State(state): State<AppState>,
    AdminContext(ctx): AdminContext,
    ApiJson(body): ApiJson<MintRequest>,
) -> Result<impl IntoResponse> {
    let issued = state.creds.mint_token(&ctx, body).await?;
    let record = TokenView::from(issued.record);
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "token": issued.token,
            "id": record.id,
            "name": record.name,
            "client_id": record.client_id,
            "role": record.role,
            "created_at": record.created_at,
            "expires_at": record.expires_at,
        })),
    ))
}

/// The filters of the token list.
#[derive(Deserialize)]
pub(super) struct TokenFilter {
    client_id: Option<String>,
    role: Option<String>,
    include_revoked: Option<String>,
}

/// `GET /api/v1/tokens?client_id=&role=&include_revoked=&limit=&after=`: recorded
/// tokens, oldest first; live ones unless `include_revoked=true` (then expired and
/// revoked ones too).
pub(super) async fn list(
    State(state): State<AppState>,
    _: AdminContext,
    page: Page,
    Query(filter): Query<TokenFilter>,
) -> Result<Json<serde_json::Value>> {
    let role = match filter.role.as_deref().filter(|r| !r.is_empty()) {
        None => None,
        Some(r) => Some(
            r.parse()
                .map_err(|m: String| ApiError::bad_request(ErrorCode::InvalidFilter, m))?,
        ),
    };
    let include_inactive = match filter.include_revoked.as_deref() {
        None | Some("") | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidFilter,
                format!("include_revoked must be true or false, not `{other}`"),
            ));
        }
    };
    let limit = page.limit(
        i64::from(crate::credentials::DEFAULT_PAGE),
        i64::from(crate::credentials::MAX_PAGE),
    )?;
    let found = state
        .creds
        .list_tokens(TokenListQuery {
            subject: filter.client_id.filter(|s| !s.is_empty()),
            role,
            include_inactive,
            after: page.after(),
            limit: Some(limit as u32),
        })
        .await?;
    let tokens: Vec<TokenView> = found.tokens.into_iter().map(TokenView::from).collect();
    Ok(Json(
        serde_json::json!({"tokens": tokens, "next": found.next}),
    ))
}

/// `DELETE /api/v1/tokens/{id}`: the token stops working on every replica within a
/// second; an agent session holding it closes (4002).
pub(super) async fn revoke(
    State(state): State<AppState>,
    AdminContext(ctx): AdminContext,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>> {
    let record = state.creds.revoke_token(&ctx, &id).await?;
    Ok(Json(
        serde_json::to_value(TokenView::from(record)).unwrap_or_default(),
    ))
}
