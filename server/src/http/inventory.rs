//! `/api/v1/agents/{client_id}/inventory`: an agent's latest inventory document.

use axum::Json;
use axum::extract::{Request, State};
use serde::Serialize;
use serde_json::value::RawValue;

use super::agents::unknown_agent;
use super::error::{ApiError, ErrorCode, Result};
use super::extract::{ClientId, Principal, check_json_content_type, json_storable, read_body};
use crate::auth::Role;
use crate::ids::rfc3339;
use crate::limits::check_depth;
use crate::state::AppState;
use crate::store::now_ms;

/// `POST /api/v1/agents/{client_id}/inventory`: replaces the inventory with the body, a
/// JSON document of at most MAX_INVENTORY_BYTES (413 above).
pub(super) async fn put(
    State(state): State<AppState>,
    ClientId(client_id): ClientId,
    principal: Principal,
    req: Request,
) -> Result<Json<serde_json::Value>> {
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
    Ok(Json(serde_json::json!({
        "agent_id": client_id,
        "size_bytes": size,
        "received_at": rfc3339(received_at),
    })))
}

#[derive(Serialize)]
pub(super) struct InventoryView {
    agent_id: String,
    size_bytes: i64,
    received_at: String,
    data: Box<RawValue>,
}

/// `GET /api/v1/agents/{client_id}/inventory`: the document as it was sent.
pub(super) async fn get(
    State(state): State<AppState>,
    ClientId(client_id): ClientId,
    principal: Principal,
) -> Result<Json<InventoryView>> {
    principal.require_self_or_admin(&client_id)?;
    let row = state
        .store
        .get_inventory(client_id.clone())
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!("agent `{client_id}` has not reported an inventory"))
        })?;
    // Serialised straight to the body: `data` goes out byte for byte as it came in.
    let data = RawValue::from_string(row.body).unwrap_or_else(|_| RawValue::NULL.to_owned());
    Ok(Json(InventoryView {
        agent_id: row.agent_id,
        size_bytes: row.size_bytes,
        received_at: rfc3339(row.received_at),
        data,
    }))
}
