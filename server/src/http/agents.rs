//! `/api/v1/agents` and `/api/v1/agents/{client_id}`: list, read and delete agents.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ErrorCode, Result};
use super::extract::{Admin, ClientId, Page, Principal, Query};
use super::openapi::{AgentListDoc, DeletedDoc, ErrorBody};
use crate::ids::rfc3339;
use crate::state::AppState;
use crate::store::{AgentFilter, AgentRow};

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct AgentView {
    id: String,
    online: bool,
    pod: Option<String>,
    created_at: String,
    connected_at: Option<String>,
    last_seen: Option<String>,
    version: Option<String>,
    hostname: Option<String>,
    os: Option<String>,
    arch: Option<String>,
    /// Only on a single agent, when it has sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(required = false)]
    inventory: Option<InventorySummaryView>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct InventorySummaryView {
    size_bytes: i64,
    received_at: String,
}

impl AgentView {
    fn new(a: AgentRow) -> Self {
        AgentView {
            online: a.online,
            pod: a.pod,
            created_at: rfc3339(a.created_at),
            connected_at: a.connected_at.filter(|_| a.online).map(rfc3339),
            last_seen: a.last_seen.map(rfc3339),
            version: a.version,
            hostname: a.hostname,
            os: a.os,
            arch: a.arch,
            inventory: None,
            id: a.id,
        }
    }
}

/// The filters of the agent list; `status` is the seed's name for `online`.
#[derive(Deserialize)]
pub(super) struct AgentQuery {
    online: Option<String>,
    status: Option<String>,
    q: Option<String>,
}

/// `GET /api/v1/agents?online=&q=&limit=&after=`: agents by client_id, with counts.
#[utoipa::path(
    get,
    path = "/api/v1/agents",
    operation_id = "list_agents",
    tag = "agents",
    params(
        ("online" = Option<String>, Query, description = "`true`/`false` (or `all`)"),
        ("status" = Option<String>, Query, description = "`online`/`offline`, the older name of `online`"),
        ("q" = Option<String>, Query, description = "Substring of the client_id"),
        ("limit" = Option<i64>, Query, description = "Page size, 1 to 1000 (default 100)"),
        ("after" = Option<String>, Query, description = "The `next` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of agents", body = AgentListDoc),
        (status = 400, description = "Invalid input; `error.code` says which rule was broken", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential does not grant this", body = ErrorBody),
        (status = 503, description = "The database does not answer or the replica is draining; retry (`Retry-After`)", body = ErrorBody),
    ),
)]
pub(super) async fn list(
    State(state): State<AppState>,
    _: Admin,
    page: Page,
    Query(query): Query<AgentQuery>,
) -> Result<Json<serde_json::Value>> {
    let online = match query.online.as_deref().or(query.status.as_deref()) {
        None | Some("") | Some("all") => None,
        Some("true") | Some("online") => Some(true),
        Some("false") | Some("offline") => Some(false),
        Some(other) => {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidFilter,
                format!("online must be true or false (status: online or offline), not `{other}`"),
            ));
        }
    };
    let limit = page.limit(100, 1000)?;
    let filter = AgentFilter {
        online,
        search: query.q.filter(|q| !q.is_empty()),
        after: page.after(),
        limit,
    };
    let found = state.store.list_agents(filter).await?;
    let next = Page::next(
        found.agents.len(),
        limit,
        found.agents.last().map(|a| a.id.clone()),
    );
    let agents: Vec<AgentView> = found.agents.into_iter().map(AgentView::new).collect();
    Ok(Json(serde_json::json!({
        "agents": agents,
        "total": found.total,
        "online": found.online,
        "offline": found.total - found.online,
        "next": next,
    })))
}

/// `GET /api/v1/agents/{client_id}`: one agent, with its inventory's size and time.
#[utoipa::path(
    get,
    path = "/api/v1/agents/{client_id}",
    operation_id = "get_agent",
    tag = "agents",
    params(
        ("client_id" = String, Path, description = "The agent's client_id"),
    ),
    responses(
        (status = 200, description = "The agent", body = AgentView),
        (status = 400, description = "Invalid input; `error.code` says which rule was broken", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential does not grant this", body = ErrorBody),
        (status = 404, description = "No such resource", body = ErrorBody),
        (status = 503, description = "The database does not answer or the replica is draining; retry (`Retry-After`)", body = ErrorBody),
    ),
)]
pub(super) async fn get(
    State(state): State<AppState>,
    ClientId(client_id): ClientId,
    principal: Principal,
) -> Result<Json<serde_json::Value>> {
    principal.require_self_or_admin(&client_id)?;
    let (agent, inventory) = state
        .store
        .get_agent(client_id.clone())
        .await?
        .ok_or_else(|| unknown_agent(&client_id))?;
    let mut view = AgentView::new(agent);
    view.inventory = inventory.map(|(size_bytes, at)| InventorySummaryView {
        size_bytes,
        received_at: rfc3339(at),
    });
    Ok(Json(serde_json::to_value(view).unwrap_or_default()))
}

/// `DELETE /api/v1/agents/{client_id}`: forgets the agent and closes its session.
#[utoipa::path(
    delete,
    path = "/api/v1/agents/{client_id}",
    operation_id = "delete_agent",
    tag = "agents",
    params(
        ("client_id" = String, Path, description = "The agent's client_id"),
    ),
    responses(
        (status = 200, description = "Forgotten; its session is closed", body = DeletedDoc),
        (status = 400, description = "Invalid input; `error.code` says which rule was broken", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential does not grant this", body = ErrorBody),
        (status = 404, description = "No such resource", body = ErrorBody),
        (status = 503, description = "The database does not answer or the replica is draining; retry (`Retry-After`)", body = ErrorBody),
    ),
)]
pub(super) async fn delete(
    State(state): State<AppState>,
    ClientId(client_id): ClientId,
    _: Admin,
) -> Result<Json<serde_json::Value>> {
    if !state.store.delete_agent(client_id.clone()).await? {
        return Err(unknown_agent(&client_id));
    }
    state.hub.route_delete(&client_id).await;
    tracing::info!(agent = %client_id, "agent deleted");
    Ok(Json(serde_json::json!({"id": client_id, "deleted": true})))
}

/// The 404 of an agent the store does not know.
pub(super) fn unknown_agent(client_id: &str) -> ApiError {
    ApiError::NotFound(format!(
        "no agent `{client_id}`; agents appear when they first connect or when a token is minted for them"
    ))
}
