//! `POST /api/v1/tokens`: mints agent and admin tokens.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use http::StatusCode;
use serde::Deserialize;

use super::error::{ApiError, ErrorCode, Result};
use super::extract::{Admin, ApiJson};
use super::openapi::{ErrorBody, TokenDoc};
use crate::auth::{DEFAULT_AGENT_TOKEN_TTL, Role};
use crate::ids::{check_client_id, rfc3339};
use crate::state::AppState;
use crate::store::now_ms;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateToken {
    client_id: String,
    #[serde(default)]
    #[schema(value_type = Option<super::openapi::RoleDoc>)]
    role: Option<Role>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

const MAX_TOKEN_TTL: u64 = 366 * 86_400;

/// `POST /api/v1/tokens` with `{"client_id", "role"?, "ttl_seconds"?}`: 201 with the
/// token. Minting an agent token enrolls the agent, so commands can be queued for it.
#[utoipa::path(
    post,
    path = "/api/v1/tokens",
    operation_id = "create_token",
    tag = "tokens",
    request_body(content = CreateToken, content_type = "application/json"),
    responses(
        (status = 201, description = "The token", body = TokenDoc),
        (status = 400, description = "Invalid input; `error.code` says which rule was broken", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential does not grant this", body = ErrorBody),
        (status = 413, description = "The body is larger than the endpoint accepts", body = ErrorBody),
        (status = 415, description = "The body's Content-Type is not accepted", body = ErrorBody),
        (status = 503, description = "The database does not answer or the replica is draining; retry (`Retry-After`)", body = ErrorBody),
    ),
)]
pub(super) async fn create(
    State(state): State<AppState>,
    _: Admin,
    ApiJson(body): ApiJson<CreateToken>,
) -> Result<impl IntoResponse> {
    check_client_id(&body.client_id)
        .map_err(|m| ApiError::bad_request(ErrorCode::InvalidClientId, m))?;
    let role = body.role.unwrap_or(Role::Agent);
    let ttl = match body.ttl_seconds {
        None => DEFAULT_AGENT_TOKEN_TTL,
        Some(t) if (1..=MAX_TOKEN_TTL).contains(&t) => Duration::from_secs(t),
        Some(_) => {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidTtl,
                format!("ttl_seconds must be from 1 to {MAX_TOKEN_TTL}"),
            ));
        }
    };
    if role == Role::Agent {
        state.store.ensure_agent(body.client_id.clone()).await?;
    }
    let token = state.tokens.mint(&body.client_id, role, ttl);
    let expires_at = now_ms() + ttl.as_millis() as i64;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "token": token,
            "client_id": body.client_id,
            "role": role.as_str(),
            "expires_at": rfc3339(expires_at),
        })),
    ))
}
