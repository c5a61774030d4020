//! `/api/v1/agents/{client_id}/commands` (queue and list) and `/api/v1/commands/{id}`.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::agents::unknown_agent;
use super::error::{ApiError, ErrorCode, Result};
use super::extract::{AdminContext, ApiJson, ClientId, Id, Page, Principal};
use super::openapi::{
    BadRequest, Forbidden, NotFound, PayloadTooLarge, Unauthorized, Unavailable,
    UnsupportedMediaType,
};
use crate::audit::{AuditAction, AuditEvent};
use crate::auth::Role;
use crate::ids::rfc3339;
use crate::limits::check_depth;
use crate::state::AppState;
use crate::store::{CommandRow, CommandStatus, NewCommand, now_ms};

/// Body of `POST /api/v1/agents/{client_id}/commands`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateCommand {
    /// What the agent runs (`ping`, `exec`, a plug-in's name): 1 to 128 characters,
    /// surrounding spaces trimmed.
    #[schema(min_length = 1, max_length = 128)]
    name: String,
    /// The command's arguments, a JSON object; `{}` when absent.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    args: Option<Box<RawValue>>,
    /// The command expires this long after it is queued (1 s to 30 days); never by
    /// default.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 2592000)]
    ttl_seconds: Option<u64>,
}

const MAX_COMMAND_NAME: usize = 128;
const MAX_COMMAND_TTL: u64 = 30 * 86_400;

/// A stored command.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Command)]
pub(super) struct CommandView<'a> {
    id: &'a str,
    /// The agent's client_id.
    agent_id: &'a str,
    name: &'a str,
    /// The arguments, a JSON object, as they were queued.
    #[schema(value_type = Object)]
    args: &'a RawValue,
    /// `pending`, `delivered`, `completed`, `failed` or `expired`.
    status: &'a str,
    /// The agent's result, any JSON; null until it answers.
    #[schema(value_type = Option<Value>)]
    output: Option<&'a RawValue>,
    /// RFC 3339 UTC, as every time in this API.
    created_at: String,
    delivered_at: Option<String>,
    completed_at: Option<String>,
    expires_at: Option<String>,
    /// How often it was sent (a reconnect sends an unanswered command again).
    attempts: i32,
}

impl<'a> CommandView<'a> {
    /// Renders a stored command; args and output are JSON already.
    fn new(c: &'a CommandRow) -> Self {
        let null = RawValue::NULL;
        let args: &RawValue = serde_json::from_str(&c.args).unwrap_or(null);
        let output: Option<&RawValue> = c
            .output
            .as_deref()
            .map(|o| serde_json::from_str(o).unwrap_or(null));
        CommandView {
            id: &c.id,
            agent_id: &c.agent_id,
            name: &c.name,
            args,
            status: &c.status,
            output,
            created_at: rfc3339(c.created_at),
            delivered_at: c.delivered_at.map(rfc3339),
            completed_at: c.completed_at.map(rfc3339),
            expires_at: c.expires_at.map(rfc3339),
            attempts: c.attempts,
        }
    }
}

/// A command just queued.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct CommandQueued {
    id: String,
    agent_id: String,
    /// Always `pending`.
    status: &'static str,
    created_at: String,
}

/// A page of an agent's commands, newest first.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct CommandList<'a> {
    commands: Vec<CommandView<'a>>,
    /// The `before` of the next page; null on the last page.
    next: Option<String>,
}

/// `POST /api/v1/agents/{client_id}/commands` with `{"name", "args"?, "ttl_seconds"?}`:
/// 202 with the command's id once it is stored; the agent gets it now or on reconnect.
#[utoipa::path(
    post,
    path = "/api/v1/agents/{client_id}/commands",
    operation_id = "create_command",
    tag = "commands",
    params(
        ("client_id" = String, Path, pattern = r"^([A-Za-z0-9_-][A-Za-z0-9._-]{0,127}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,126}|\.\.[A-Za-z0-9._-]{1,126})$", description = "The agent's client_id"),
    ),
    request_body(content = CreateCommand, content_type = "application/json"),
    responses(
        (status = 202, description = "Stored; delivered now or when the agent connects", body = CommandQueued, headers(("Location" = String, description = "The command's URL"))),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 503, response = Unavailable),
    ),
)]
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
    let command_id = uuid::Uuid::now_v7().to_string();
    let audit = AuditEvent::now(&ctx, AuditAction::CommandCreated, &command_id)
        .with_detail(serde_json::json!({"client_id": client_id, "name": name}));
    // The command and its audit entry are committed together, with other requests'
    // commands (group commit), and only if the agent exists.
    let stored = state
        .store
        .create_command(
            NewCommand {
                id: command_id.clone(),
                agent_id: client_id.clone(),
                name: name.to_string(),
                args,
                status: CommandStatus::Pending.as_str().to_string(),
                created_at: now,
                expires_at,
            },
            Some(audit.into_row()),
        )
        .await?;
    if !stored {
        return Err(unknown_agent(&client_id));
    }
    state.metrics.command(CommandStatus::Pending, 1);
    // Stored first, then the session is told: a wake-up is only a hint to look.
    state.hub.route_wake(&client_id).await;
    tracing::info!(agent = %client_id, command = %command_id, name, "command queued");
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/api/v1/commands/{command_id}"))],
        Json(CommandQueued {
            id: command_id,
            agent_id: client_id,
            status: CommandStatus::Pending.as_str(),
            created_at: rfc3339(now),
        }),
    ))
}

/// `GET /api/v1/commands/{id}`: admins read any command, agents their own.
#[utoipa::path(
    get,
    path = "/api/v1/commands/{id}",
    operation_id = "get_command",
    tag = "commands",
    params(
        ("id" = String, Path, description = "The command's id"),
    ),
    responses(
        (status = 200, description = "The command (an agent's own, for an agent token)", body = CommandView<'_>),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn get(
    State(state): State<AppState>,
    Id(id): Id,
    principal: Principal,
) -> Result<Response> {
    match state.store.get_command(id.clone()).await? {
        Some(c) if principal.role == Role::Admin || c.agent_id == principal.client_id => {
            Ok(Json(CommandView::new(&c)).into_response())
        }
        _ => Err(ApiError::NotFound(format!("no command `{id}`"))),
    }
}

/// `GET /api/v1/agents/{client_id}/commands?limit=&before=`: newest first.
#[utoipa::path(
    get,
    path = "/api/v1/agents/{client_id}/commands",
    operation_id = "list_commands",
    tag = "commands",
    params(
        ("client_id" = String, Path, pattern = r"^([A-Za-z0-9_-][A-Za-z0-9._-]{0,127}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,126}|\.\.[A-Za-z0-9._-]{1,126})$", description = "The agent's client_id"),
        ("limit" = Option<String>, Query, pattern = r"^(0*([1-9][0-9]?|[1-4][0-9]{2}|500))?$", description = "Page size, 1 to 500 (default 50; empty: the default)"),
        ("before" = Option<String>, Query, description = "The `next` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of the agent's commands, newest first", body = CommandList<'_>),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 503, response = Unavailable),
    ),
)]
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
    let commands = rows.iter().map(CommandView::new).collect();
    Ok(Json(CommandList { commands, next }).into_response())
}
