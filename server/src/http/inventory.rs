//! `/api/v1/agents/{client_id}/inventory`: an agent's latest inventory document.

use axum::Json;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::value::RawValue;

use super::agents::unknown_agent;
use super::error::{ApiError, ErrorCode, Result};
use super::extract::{ClientId, Principal, check_json_content_type, json_storable, read_body};
use super::openapi::{
    BadRequest, Forbidden, NotFound, PayloadTooLarge, Unauthorized, Unavailable,
    UnsupportedMediaType,
};
use crate::auth::Role;
use crate::ids::rfc3339;
use crate::limits::check_depth;
use crate::state::AppState;
use crate::store::now_ms;

/// The receipt of a stored inventory.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct InventoryStored {
    agent_id: String,
    /// The document's size as sent.
    size_bytes: i64,
    /// RFC 3339 UTC.
    received_at: String,
}

/// An agent's latest inventory.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Inventory)]
pub(super) struct InventoryView<'a> {
    agent_id: &'a str,
    size_bytes: i64,
    /// RFC 3339 UTC.
    received_at: String,
    /// The document, byte for byte as the agent sent it.
    #[schema(value_type = Value)]
    data: &'a RawValue,
}

/// `POST /api/v1/agents/{client_id}/inventory`: replaces the inventory with the body, a
/// JSON document of at most MAX_INVENTORY_BYTES (413 above).
#[utoipa::path(
    post,
    path = "/api/v1/agents/{client_id}/inventory",
    operation_id = "put_inventory",
    tag = "inventory",
    params(
        ("client_id" = String, Path, pattern = r"^([A-Za-z0-9_-][A-Za-z0-9._-]{0,127}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,126}|\.\.[A-Za-z0-9._-]{1,126})$", description = "The agent's client_id"),
    ),
    request_body(content = Value, description = "Any JSON document (the agent's hardware and software), at most MAX_INVENTORY_BYTES", content_type = "application/json"),
    responses(
        (status = 200, description = "Stored, replacing the previous one", body = InventoryStored),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn put(
    State(state): State<AppState>,
    ClientId(client_id): ClientId,
    principal: Principal,
    req: Request,
) -> Result<Json<InventoryStored>> {
    principal.require_self_or_admin(&client_id)?;
    check_json_content_type(req.headers())?;
    let (parts, mut body) = req.into_parts();
    let body = read_body(&parts.headers, &mut body, state.config.max_inventory_bytes).await?;
    if body.is_empty() {
        return Err(ApiError::bad_request(
            ErrorCode::EmptyBody,
            "the inventory is empty; send a JSON document",
        ));
    }
    // Validate without building a tree: a 10 MiB document would cost several times that.
    serde_json::from_slice::<serde::de::IgnoredAny>(&body)?;
    json_storable("inventory", &body)?;
    let text = String::from_utf8(body)
        .map_err(|_| ApiError::bad_request(ErrorCode::InvalidJson, "the inventory is not UTF-8"))?;
    check_depth("inventory", &text)?;
    if principal.role == Role::Agent {
        // An agent with a valid token may report before its first connection.
        state.store.ensure_agent(client_id.clone()).await?;
    } else if !state.store.agent_exists(client_id.clone()).await? {
        return Err(unknown_agent(&client_id));
    }
    let received_at = now_ms();
    let size = text.len() as i64;
    state
        .store
        .store_inventory(client_id.clone(), text, received_at)
        .await?;
    Ok(Json(InventoryStored {
        agent_id: client_id,
        size_bytes: size,
        received_at: rfc3339(received_at),
    }))
}

/// `GET /api/v1/agents/{client_id}/inventory`: the document as it was sent.
#[utoipa::path(
    get,
    path = "/api/v1/agents/{client_id}/inventory",
    operation_id = "get_inventory",
    tag = "inventory",
    params(
        ("client_id" = String, Path, pattern = r"^([A-Za-z0-9_-][A-Za-z0-9._-]{0,127}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,126}|\.\.[A-Za-z0-9._-]{1,126})$", description = "The agent's client_id"),
    ),
    responses(
        (status = 200, description = "The inventory as it was sent", body = InventoryView<'_>),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn get(
    State(state): State<AppState>,
    ClientId(client_id): ClientId,
    principal: Principal,
) -> Result<Response> {
    principal.require_self_or_admin(&client_id)?;
    let row = state
        .store
        .get_inventory(client_id.clone())
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!("agent `{client_id}` has not reported an inventory"))
        })?;
    let data: &RawValue = serde_json::from_str(&row.body).unwrap_or(RawValue::NULL);
    Ok(Json(InventoryView {
        agent_id: &row.agent_id,
        size_bytes: row.size_bytes,
        received_at: rfc3339(row.received_at),
        data,
    })
    .into_response())
}
