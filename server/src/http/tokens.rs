//! `/api/v1/tokens`: mint, list and revoke the tokens recorded by their `jti`.

use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use http::StatusCode;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ErrorCode, Result};
use super::extract::{AdminContext, ApiJson, Id, Page, Query};
use super::openapi::{
    BadRequest, Forbidden, NotFound, PayloadTooLarge, Unauthorized, Unavailable,
    UnsupportedMediaType,
};
use crate::auth::Role;
use crate::credentials::{MintRequest, TokenListQuery};
use crate::ids::rfc3339;
use crate::state::AppState;
use crate::store::ApiTokenRow;

/// A recorded token as the API shows it (never the token itself).
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Token)]
pub(super) struct TokenView {
    /// The token's `jti`.
    id: String,
    name: Option<String>,
    #[schema(value_type = Role)]
    role: String,
    /// The token's `sub`: an agent's client_id or an admin's name.
    client_id: String,
    /// RFC 3339 UTC, as every time in this API.
    created_at: String,
    expires_at: String,
    /// Updated at most about once a minute.
    last_used_at: Option<String>,
    revoked_at: Option<String>,
}

/// A token just minted: the only time it is shown.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct TokenMinted {
    /// The JWT, for `Authorization: Bearer`.
    token: String,
    /// Its `jti`.
    id: String,
    name: Option<String>,
    client_id: String,
    #[schema(value_type = Role)]
    role: String,
    created_at: String,
    expires_at: String,
}

/// A page of recorded tokens, oldest first.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct TokenList {
    tokens: Vec<TokenView>,
    /// The `after` of the next page; null on the last page.
    next: Option<String>,
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
#[utoipa::path(
    post,
    path = "/api/v1/tokens",
    operation_id = "create_token",
    tag = "tokens",
    request_body(content = MintRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "The token, shown this once", body = TokenMinted),
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
    ApiJson(body): ApiJson<MintRequest>,
) -> Result<impl IntoResponse> {
    let issued = state.creds.mint_token(&ctx, body).await?;
    let record = TokenView::from(issued.record);
    Ok((
        StatusCode::CREATED,
        Json(TokenMinted {
            token: issued.token,
            id: record.id,
            name: record.name,
            client_id: record.client_id,
            role: record.role,
            created_at: record.created_at,
            expires_at: record.expires_at,
        }),
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
#[utoipa::path(
    get,
    path = "/api/v1/tokens",
    operation_id = "list_tokens",
    tag = "tokens",
    params(
        ("client_id" = Option<String>, Query, description = "Only tokens of this subject"),
        ("role" = Option<String>, Query, description = "`agent` or `admin`"),
        ("include_revoked" = Option<String>, Query, description = "`true`: expired and revoked tokens too; `false` (default): live ones only"),
        ("limit" = Option<String>, Query, pattern = r"^(0*([1-9][0-9]{0,2}|1000))?$", description = "Page size, 1 to 1000 (default 100; empty: the default)"),
        ("after" = Option<String>, Query, description = "The `next` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of recorded tokens, oldest first", body = TokenList),
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
    Query(filter): Query<TokenFilter>,
) -> Result<Json<TokenList>> {
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
    let tokens = found.tokens.into_iter().map(TokenView::from).collect();
    Ok(Json(TokenList {
        tokens,
        next: found.next,
    }))
}

/// `DELETE /api/v1/tokens/{id}`: the token stops working on every replica within a
/// second; an agent session holding it closes (4002).
#[utoipa::path(
    delete,
    path = "/api/v1/tokens/{id}",
    operation_id = "revoke_token",
    tag = "tokens",
    params(
        ("id" = String, Path, description = "The token's `jti`"),
    ),
    responses(
        (status = 200, description = "Revoked (revoking twice is no error)", body = TokenView),
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
) -> Result<Json<TokenView>> {
    let record = state.creds.revoke_token(&ctx, &id).await?;
    Ok(Json(TokenView::from(record)))
}
