//! `/api/v1/agents` and `/api/v1/agents/{client_id}`: list, read and delete agents.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ErrorCode, Result};
use super::extract::{Admin, AdminContext, ClientId, Page, Principal, Query};
use super::openapi::{BadRequest, Forbidden, NotFound, Unauthorized, Unavailable};
use crate::ids::rfc3339;
use crate::state::AppState;
use crate::store::{AgentFilter, AgentRow};

/// An agent as the API shows it.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Agent)]
pub(super) struct AgentView {
    /// The agent's client_id.
    id: String,
    /// Whether a session is open on some replica now.
    online: bool,
    /// The replica that holds (or last held) its session.
    pod: Option<String>,
    /// RFC 3339 UTC, as every time in this API.
    created_at: String,
    /// When the open session started; null while offline.
    connected_at: Option<String>,
    last_seen: Option<String>,
    /// What the agent reported in its hello.
    version: Option<String>,
    hostname: Option<String>,
    os: Option<String>,
    arch: Option<String>,
    /// What the agent reported in its hello (in lists only).
    #[serde(skip_serializing_if = "Option::is_none")]
    labels: Option<Vec<String>>,
    /// Its inventory's size and time (on a single agent, when it has sent one).
    #[serde(skip_serializing_if = "Option::is_none")]
    inventory: Option<InventorySummaryView>,
}

/// The size and time of an agent's latest inventory.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = InventorySummary)]
pub(super) struct InventorySummaryView {
    size_bytes: i64,
    received_at: String,
}

/// A page of agents by client_id, with the fleet's counts.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct AgentList {
    agents: Vec<AgentView>,
    /// Agents matching the filters (all pages).
    total: i64,
    online: i64,
    offline: i64,
    /// The `after` of the next page; null on the last page.
    next: Option<String>,
}

/// A deleted agent.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct AgentDeleted {
    id: String,
    /// Always true.
    deleted: bool,
}

/// An agent whose credentials were revoked.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct AgentRevoked {
    id: String,
    /// Always true.
    revoked: bool,
    /// The agent's credential generation now: tokens minted before it are refused.
    generation: i64,
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

impl AgentQuery {
    /// The store's filter for these parameters and `page`; 400 `invalid_filter` or
    /// `invalid_limit`. Empty values mean absent.
    pub(super) fn filter(self, page: &Page) -> Result<AgentFilter> {
        let online = match self.online.as_deref().or(self.status.as_deref()) {
            None | Some("") | Some("all") => None,
            Some("true") | Some("online") => Some(true),
            Some("false") | Some("offline") => Some(false),
            Some(other) => {
                return Err(ApiError::bad_request(
                    ErrorCode::InvalidFilter,
                    format!(
                        "online must be true or false (status: online or offline), not `{other}`"
                    ),
                ));
            }
        };
        Ok(AgentFilter {
            online,
            search: self.q.filter(|q| !q.is_empty()),
            label: self.label.filter(|l| !l.is_empty()),
            after: page.after(),
            limit: page.limit(100, 1000)?,
        })
    }
}

/// `GET /api/v1/agents?online=&q=&label=&limit=&after=`: agents by client_id, each with
/// its labels, and the counts.
#[utoipa::path(
    get,
    path = "/api/v1/agents",
    operation_id = "list_agents",
    tag = "agents",
    params(
        ("online" = Option<String>, Query, description = "`true` or `false` (`all` or empty: both)"),
        ("status" = Option<String>, Query, description = "`online` or `offline`: the older name of `online`"),
        ("q" = Option<String>, Query, description = "Part of the client_id (ASCII case folded)"),
        ("label" = Option<String>, Query, description = "Only agents that reported this label"),
        ("limit" = Option<String>, Query, pattern = r"^(0*([1-9][0-9]{0,2}|1000))?$", description = "Page size, 1 to 1000 (default 100; empty: the default)"),
        ("after" = Option<String>, Query, description = "The `next` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of agents", body = AgentList),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn list(
    State(state): State<AppState>,
    _: Admin,
    page: Page,
    Query(query): Query<AgentQuery>,
) -> Result<Json<AgentList>> {
    let filter = query.filter(&page)?;
    let limit = filter.limit;
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
    Ok(Json(AgentList {
        agents,
        total: found.total,
        online: found.online,
        offline: found.total - found.online,
        next,
    }))
}

/// `GET /api/v1/agents/{client_id}`: one agent, with its inventory's size and time.
#[utoipa::path(
    get,
    path = "/api/v1/agents/{client_id}",
    operation_id = "get_agent",
    tag = "agents",
    params(
        ("client_id" = String, Path, pattern = r"^([A-Za-z0-9_-][A-Za-z0-9._-]{0,127}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,126}|\.\.[A-Za-z0-9._-]{1,126})$", description = "The agent's client_id"),
    ),
    responses(
        (status = 200, description = "The agent", body = AgentView),
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
) -> Result<Json<AgentView>> {
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
    Ok(Json(view))
}

/// `DELETE /api/v1/agents/{client_id}`: forgets the agent, invalidates every token
/// issued to it (so it cannot reconnect and be created again) and closes its session
/// (4002) on whichever replica holds it.
#[utoipa::path(
    delete,
    path = "/api/v1/agents/{client_id}",
    operation_id = "delete_agent",
    tag = "agents",
    params(
        ("client_id" = String, Path, pattern = r"^([A-Za-z0-9_-][A-Za-z0-9._-]{0,127}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,126}|\.\.[A-Za-z0-9._-]{1,126})$", description = "The agent's client_id"),
    ),
    responses(
        (status = 200, description = "Forgotten; its tokens are refused and its session is closed", body = AgentDeleted),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn delete(
    State(state): State<AppState>,
    ClientId(client_id): ClientId,
    AdminContext(ctx): AdminContext,
) -> Result<Json<AgentDeleted>> {
    state.creds.delete_agent(&ctx, &client_id).await?;
    tracing::info!(agent = %client_id, "agent deleted");
    Ok(Json(AgentDeleted {
        id: client_id,
        deleted: true,
    }))
}

/// `POST /api/v1/agents/{client_id}/revoke`: every token issued to the agent so far
/// stops working on every replica, and its live session closes (4002). The agent and
/// its history stay; it needs a new token (enrollment or `POST /api/v1/tokens`).
#[utoipa::path(
    post,
    path = "/api/v1/agents/{client_id}/revoke",
    operation_id = "revoke_agent",
    tag = "agents",
    params(
        ("client_id" = String, Path, pattern = r"^([A-Za-z0-9_-][A-Za-z0-9._-]{0,127}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,126}|\.\.[A-Za-z0-9._-]{1,126})$", description = "The agent's client_id"),
    ),
    responses(
        (status = 200, description = "Its tokens so far are refused everywhere; its session is closed", body = AgentRevoked),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn revoke(
    State(state): State<AppState>,
    ClientId(client_id): ClientId,
    AdminContext(ctx): AdminContext,
) -> Result<Json<AgentRevoked>> {
    let generation = state.creds.revoke_agent(&ctx, &client_id).await?;
    tracing::info!(agent = %client_id, generation, "agent credentials revoked");
    Ok(Json(AgentRevoked {
        id: client_id,
        revoked: true,
        generation,
    }))
}

/// The 404 of an agent the store does not know.
pub(super) fn unknown_agent(client_id: &str) -> ApiError {
    ApiError::NotFound(format!(
        "no agent `{client_id}`; agents appear when they first connect or when a token is minted for them"
    ))
}
