//! `/api/v1/agents` and `/api/v1/agents/{client_id}`: list, read and delete agents.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ErrorCode, Result};
use super::extract::{Admin, AdminContext, ClientId, Page, Principal, Query};
use crate::ids::rfc3339;
use crate::state::AppState;
use crate::store::{AgentFilter, AgentRow};

#[derive(Serialize)]
struct AgentView {
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
    /// What the agent reported in its hello (in lists only).
    #[serde(skip_serializing_if = "Option::is_none")]
    labels: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inventory: Option<InventorySummaryView>,
}

#[derive(Serialize)]
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
            labels: None,
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
    label: Option<String>,
}

/// `GET /api/v1/agents?online=&q=&label=&limit=&after=`: agents by client_id, each with
/// its labels, and the counts.
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
        label: query.label.filter(|l| !l.is_empty()),
        after: page.after(),
        limit,
    };
    let found = state.store.list_agents(filter).await?;
    let next = Page::next(
        found.agents.len(),
        limit,
        found.agents.last().map(|a| a.id.clone()),
    );
    let mut labels: std::collections::HashMap<String, Vec<String>> = Default::default();
    for (agent, label) in found.labels {
        labels.entry(agent).or_default().push(label);
    }
    let agents: Vec<AgentView> = found
        .agents
        .into_iter()
        .map(|a| {
            let own = labels.remove(&a.id).unwrap_or_default();
            AgentView {
                labels: Some(own),
                ..AgentView::new(a)
            }
        })
        .collect();
    Ok(Json(serde_json::json!({
        "agents": agents,
        "total": found.total,
        "online": found.online,
        "offline": found.total - found.online,
        "next": next,
    })))
}

/// `GET /api/v1/agents/{client_id}`: one agent, with its inventory's size and time.
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

/// `DELETE /api/v1/agents/{client_id}`: forgets the agent, invalidates every token
/// issued to it (so it cannot reconnect and be created again) and closes its session
/// (4002) on whichever replica holds it.
pub(super) async fn delete(
    State(state): State<AppState>,
    ClientId(client_id): ClientId,
    AdminContext(ctx): AdminContext,
) -> Result<Json<serde_json::Value>> {
    state.creds.delete_agent(&ctx, &client_id).await?;
    tracing::info!(agent = %client_id, "agent deleted");
    Ok(Json(serde_json::json!({"id": client_id, "deleted": true})))
}

/// `POST /api/v1/agents/{client_id}/revoke`: every token issued to the agent so far
/// stops working on every replica, and its live session closes (4002). The agent and
/// its history stay; it needs a new token (enrollment or `POST /api/v1/tokens`).
pub(super) async fn revoke(
    State(state): State<AppState>,
    ClientId(client_id): ClientId,
    AdminContext(ctx): AdminContext,
) -> Result<Json<serde_json::Value>> {
    let generation = state.creds.revoke_agent(&ctx, &client_id).await?;
    tracing::info!(agent = %client_id, generation, "agent credentials revoked");
    Ok(Json(
        serde_json::json!({"id": client_id, "revoked": true, "generation": generation}),
    ))
}

/// The 404 of an agent the store does not know.
pub(super) fn unknown_agent(client_id: &str) -> ApiError {
    ApiError::NotFound(format!(
        "no agent `{client_id}`; agents appear when they first connect or when a token is minted for them"
    ))
}
