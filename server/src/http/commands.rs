//! `/api/v1/agents/{client_id}/commands` (queue and list) and `/api/v1/commands/{id}`.

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::agents::unknown_agent;
use super::error::{ApiError, ErrorCode, Result};
use super::extract::{AdminContext, ApiJson, ClientId, Page, Principal};
use crate::audit::{AuditAction, AuditEvent};
use crate::auth::Role;
use crate::ids::rfc3339;
use crate::limits::check_depth;
use crate::state::AppState;
use crate::store::{CommandRow, CommandStatus, NewCommand, now_ms};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateCommand {
    name: String,
    #[serde(default)]
    args: Option<Box<RawValue>>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

const MAX_COMMAND_NAME: usize = 128;
const MAX_COMMAND_TTL: u64 = 30 * 86_400;

/// A stored command as the API shows it. Serialised straight to the body, so `args` and
/// `output` go out byte for byte as they came in.
#[derive(Serialize)]
pub(super) struct CommandView<'a> {
    id: &'a str,
    agent_id: &'a str,
    name: &'a str,
    args: &'a RawValue,
    status: &'a str,
    output: Option<&'a RawValue>,
    created_at: String,
    delivered_at: Option<String>,
    completed_at: Option<String>,
    expires_at: Option<String>,
    attempts: i32,
}

impl<'a> From<&'a CommandRow> for CommandView<'a> {
    fn from(c: &'a CommandRow) -> Self {
        let null = RawValue::NULL;
        CommandView {
            id: &c.id,
            agent_id: &c.agent_id,
            name: &c.name,
            args: serde_json::from_str(&c.args).unwrap_or(null),
            status: &c.status,
            output: c
                .output
                .as_deref()
                .map(|o| serde_json::from_str(o).unwrap_or(null)),
            created_at: rfc3339(c.created_at),
            delivered_at: c.delivered_at.map(rfc3339),
            completed_at: c.completed_at.map(rfc3339),
            expires_at: c.expires_at.map(rfc3339),
            attempts: c.attempts,
        }
    }
}

/// `POST /api/v1/agents/{client_id}/commands` with `{"name", "args"?, "ttl_seconds"?}`:
/// 202 with the command's id once it is stored; the agent gets it now or on reconnect.
pub(super) async fn create(
    State(state): State<AppState>,
    ClientId(client_id): ClientId,
    AdminContext(ctx): AdminContext,
    ApiJson(body): ApiJson<CreateCommand>,
) -> Result<impl IntoResponse> {
    let invalid = |m: String| ApiError::bad_request(ErrorCode::InvalidCommand, m);
    let name = body.name.trim();
    if name.is_empty() || name.len() > MAX_COMMAND_NAME {
        return Err(invalid(format!(
            "name must be 1 to {MAX_COMMAND_NAME} characters"
        )));
    }
    let args = match body.args {
        None => "{}".to_string(),
        Some(raw) if raw.get().trim_start().starts_with('{') => raw.get().to_string(),
        Some(_) => return Err(invalid("args must be a JSON object".into())),
    };
    check_depth("args", &args).map_err(|e| invalid(e.to_string()))?;
    let now = now_ms();
    let expires_at = match body.ttl_seconds {
        None => None,
        Some(t) if (1..=MAX_COMMAND_TTL).contains(&t) => Some(now + (t as i64) * 1000),
        Some(_) => {
            return Err(invalid(format!(
                "ttl_seconds must be from 1 to {MAX_COMMAND_TTL}"
            )));
        }
    };
    if !state.store.agent_exists(client_id.clone()).await? {
        return Err(unknown_agent(&client_id));
    }
    let command_id = uuid::Uuid::now_v7().to_string();
    state
        .store
        .insert_command(NewCommand {
            id: command_id.clone(),
            agent_id: client_id.clone(),
            name: name.to_string(),
            args,
            status: CommandStatus::Pending.as_str().to_string(),
            created_at: now,
            expires_at,
        })
        .await?;
    state.metrics.command(CommandStatus::Pending, 1);
    // Stored first, then the session is told: a wake-up is only a hint to look.
    state.hub.route_wake(&client_id).await;
    tracing::info!(agent = %client_id, command = %command_id, name, "command queued");
    state
        .creds
        .audit()
        .record_or_log(
            AuditEvent::now(&ctx, AuditAction::CommandCreated, &command_id)
                .with_detail(serde_json::json!({"client_id": client_id, "name": name})),
        )
        .await;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/api/v1/commands/{command_id}"))],
        Json(serde_json::json!({
            "id": command_id,
            "agent_id": client_id,
            "status": "pending",
            "created_at": rfc3339(now),
        })),
    ))
}

/// `GET /api/v1/commands/{id}`: admins read any command, agents their own.
pub(super) async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
    principal: Principal,
) -> Result<Response> {
    match state.store.get_command(id.clone()).await? {
        Some(c) if principal.role == Role::Admin || c.agent_id == principal.client_id => {
            Ok(Json(CommandView::from(&c)).into_response())
        }
        _ => Err(ApiError::NotFound(format!("no command `{id}`"))),
    }
}

/// `GET /api/v1/agents/{client_id}/commands?limit=&before=`: newest first.
pub(super) async fn list(
    State(state): State<AppState>,
    ClientId(client_id): ClientId,
    principal: Principal,
    page: Page,
) -> Result<Response> {
    principal.require_self_or_admin(&client_id)?;
    let limit = page.limit(50, 500)?;
    let rows = state
        .store
        .list_commands(client_id, page.before()?, limit)
        .await?;
    let next = Page::next(
        rows.len(),
        limit,
        rows.last().map(|c| format!("{}.{}", c.created_at, c.id)),
    );
    #[derive(Serialize)]
    struct CommandPage<'a> {
        commands: Vec<CommandView<'a>>,
        next: Option<String>,
    }
    let commands = rows.iter().map(CommandView::from).collect();
    Ok(Json(CommandPage { commands, next }).into_response())
}
