//! The REST API under `/api/v1`: agents, commands, inventories and tokens.

use std::time::Duration;

use http::{HeaderMap, Request, StatusCode, header};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::error::{ApiError, Result};
use super::{MAX_API_BODY, Response, json, read_body, read_json};
use crate::auth::{AuthError, Claims, Role};
use crate::ids::{check_client_id, rfc3339};
use crate::state::AppState;
use crate::store::{AgentFilter, AgentRow, CommandRow, CommandStatus, NewCommand, now_ms};

/// Who may call an endpoint.
pub enum Access<'a> {
    Admin,
    /// An admin, or the agent `id` itself.
    AdminOrAgent(&'a str),
}

/// The bearer token of a request, checked for the required access.
pub fn authorize(state: &AppState, headers: &HeaderMap, access: Access<'_>) -> Result<Claims> {
    let token = bearer(headers).ok_or(AuthError::Missing)?;
    let claims = state.tokens.verify(token)?;
    match (access, claims.role) {
        (_, Role::Admin) => Ok(claims),
        (Access::AdminOrAgent(id), Role::Agent) if claims.sub == id => Ok(claims),
        (Access::AdminOrAgent(_), Role::Agent) => Err(ApiError::Forbidden(format!(
            "an agent token may only act for its own client_id ({})",
            claims.sub
        ))),
        (Access::Admin, Role::Agent) => Err(ApiError::Forbidden(
            "this endpoint needs an admin token".into(),
        )),
    }
}

pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn valid_id(id: &str) -> Result<()> {
    check_client_id(id).map_err(|m| ApiError::bad_request("invalid_client_id", m))
}

/// Decoded query parameters, in order.
pub fn query_params(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => Some(hi * 16 + lo),
            _ => None,
        };
        match (decoded, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn limit_param(params: &[(String, String)], default: i64, max: i64) -> Result<i64> {
    match param(params, "limit") {
        None => Ok(default),
        Some(v) => match v.parse::<i64>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(
                "invalid_limit",
                format!("limit must be a number from 1 to {max}"),
            )),
        },
    }
}

// ---- agents ---------------------------------------------------------------------------

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
            inventory: None,
            id: a.id,
        }
    }
}

pub async fn list_agents(state: &AppState, req: Request<Incoming>) -> Result<Response> {
    authorize(state, req.headers(), Access::Admin)?;
    let params = query_params(req.uri().query());
    let online = match param(&params, "online").or_else(|| param(&params, "status")) {
        None | Some("") | Some("all") => None,
        Some("true") | Some("online") => Some(true),
        Some("false") | Some("offline") => Some(false),
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_filter",
                format!("online must be true or false (status: online or offline), not `{other}`"),
            ));
        }
    };
    let filter = AgentFilter {
        online,
        search: param(&params, "q")
            .filter(|q| !q.is_empty())
            .map(str::to_string),
        after: param(&params, "after")
            .filter(|a| !a.is_empty())
            .map(str::to_string),
        limit: limit_param(&params, 100, 1000)?,
    };
    let limit = filter.limit;
    let page = state.store.list_agents(filter).await?;
    let next = (page.agents.len() as i64 == limit)
        .then(|| page.agents.last().map(|a| a.id.clone()))
        .flatten();
    let agents: Vec<AgentView> = page.agents.into_iter().map(AgentView::new).collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "agents": agents,
            "total": page.total,
            "online": page.online,
            "offline": page.total - page.online,
            "next": next,
        }),
    ))
}

pub async fn get_agent(state: &AppState, id: &str, req: Request<Incoming>) -> Result<Response> {
    valid_id(id)?;
    authorize(state, req.headers(), Access::AdminOrAgent(id))?;
    let (agent, inventory) = state
        .store
        .get_agent(id.to_string())
        .await?
        .ok_or_else(|| unknown_agent(id))?;
    let mut view = AgentView::new(agent);
    view.inventory = inventory.map(|(size_bytes, at)| InventorySummaryView {
        size_bytes,
        received_at: rfc3339(at),
    });
    Ok(json(StatusCode::OK, &view))
}

pub async fn delete_agent(state: &AppState, id: &str, req: Request<Incoming>) -> Result<Response> {
    valid_id(id)?;
    authorize(state, req.headers(), Access::Admin)?;
    if !state.store.delete_agent(id.to_string()).await? {
        return Err(unknown_agent(id));
    }
    state.hub.route_delete(id).await;
    tracing::info!(agent = id, "agent deleted");
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"id": id, "deleted": true}),
    ))
}

fn unknown_agent(id: &str) -> ApiError {
    ApiError::NotFound(format!(
        "no agent `{id}`; agents appear when they first connect or when a token is minted for them"
    ))
}

// ---- commands -------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateCommand {
    name: String,
    #[serde(default)]
    args: Option<Box<RawValue>>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

const MAX_COMMAND_NAME: usize = 128;
const MAX_COMMAND_TTL: u64 = 30 * 86_400;

#[derive(Serialize)]
pub struct CommandView<'a> {
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

/// Renders a stored command; args and output are JSON already.
pub fn command_json(c: &CommandRow) -> serde_json::Value {
    let null = RawValue::NULL;
    let args: &RawValue = serde_json::from_str(&c.args).unwrap_or(null);
    let output: Option<&RawValue> = c
        .output
        .as_deref()
        .map(|o| serde_json::from_str(o).unwrap_or(null));
    serde_json::to_value(CommandView {
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
    })
    .unwrap_or_default()
}

pub async fn create_command(
    state: &AppState,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response> {
    valid_id(id)?;
    authorize(state, req.headers(), Access::Admin)?;
    let body: CreateCommand = read_json(req, MAX_API_BODY).await?;
    let name = body.name.trim();
    if name.is_empty() || name.len() > MAX_COMMAND_NAME {
        return Err(ApiError::bad_request(
            "invalid_command",
            format!("name must be 1 to {MAX_COMMAND_NAME} characters"),
        ));
    }
    let args = match body.args {
        None => "{}".to_string(),
        Some(raw) if raw.get().trim_start().starts_with('{') => raw.get().to_string(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_command",
                "args must be a JSON object",
            ));
        }
    };
    let now = now_ms();
    let expires_at = match body.ttl_seconds {
        None => None,
        Some(t) if (1..=MAX_COMMAND_TTL).contains(&t) => Some(now + (t as i64) * 1000),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_command",
                format!("ttl_seconds must be from 1 to {MAX_COMMAND_TTL}"),
            ));
        }
    };
    if !state.store.agent_exists(id.to_string()).await? {
        return Err(unknown_agent(id));
    }
    let command_id = uuid::Uuid::now_v7().to_string();
    state
        .store
        .insert_command(NewCommand {
            id: command_id.clone(),
            agent_id: id.to_string(),
            name: name.to_string(),
            args,
            status: CommandStatus::Pending.as_str().to_string(),
            created_at: now,
            expires_at,
        })
        .await?;
    state.metrics.command(CommandStatus::Pending, 1);
    // Stored first, then the session is told: a wake-up is only a hint to look.
    state.hub.route_wake(id).await;
    tracing::info!(agent = id, command = %command_id, name, "command queued");
    let mut resp = json(
        StatusCode::ACCEPTED,
        &serde_json::json!({"id": command_id, "agent_id": id, "status": "pending", "created_at": rfc3339(now)}),
    );
    if let Ok(v) = format!("/api/v1/commands/{command_id}").parse() {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

pub async fn get_command(state: &AppState, id: &str, req: Request<Incoming>) -> Result<Response> {
    // Any valid token: agents may read their own commands; ownership is checked below.
    let claims = state
        .tokens
        .verify(bearer(req.headers()).ok_or(AuthError::Missing)?)?;
    let command = state.store.get_command(id.to_string()).await?;
    match command {
        Some(c) if claims.role == Role::Admin || c.agent_id == claims.sub => {
            Ok(json(StatusCode::OK, &command_json(&c)))
        }
        _ => Err(ApiError::NotFound(format!("no command `{id}`"))),
    }
}

pub async fn list_agent_commands(
    state: &AppState,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response> {
    valid_id(id)?;
    authorize(state, req.headers(), Access::AdminOrAgent(id))?;
    let params = query_params(req.uri().query());
    let limit = limit_param(&params, 50, 500)?;
    let before = match param(&params, "before") {
        None | Some("") => None,
        Some(cursor) => Some(parse_cursor(cursor)?),
    };
    let rows = state
        .store
        .list_commands(id.to_string(), before, limit)
        .await?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|c| format!("{}.{}", c.created_at, c.id)))
        .flatten();
    let commands: Vec<serde_json::Value> = rows.iter().map(command_json).collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"commands": commands, "next": next}),
    ))
}

fn parse_cursor(cursor: &str) -> Result<(i64, String)> {
    cursor
        .split_once('.')
        .and_then(|(at, id)| Some((at.parse().ok()?, id.to_string())))
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_cursor",
                "before must be a `next` value from a previous page",
            )
        })
}

// ---- inventory ------------------------------------------------------------------------

pub async fn put_inventory(state: &AppState, id: &str, req: Request<Incoming>) -> Result<Response> {
    valid_id(id)?;
    let claims = authorize(state, req.headers(), Access::AdminOrAgent(id))?;
    let body = read_body(req, state.config.max_inventory_bytes).await?;
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "empty_body",
            "the inventory is empty; send a JSON document",
        ));
    }
    // Validate without building a tree: a 10 MiB document would cost several times that.
    serde_json::from_slice::<serde::de::IgnoredAny>(&body)?;
    let text = String::from_utf8(Vec::from(body))
        .map_err(|_| ApiError::bad_request("invalid_json", "the inventory is not UTF-8"))?;
    if claims.role == Role::Agent {
        // An agent with a valid token may report before its first connection.
        state.store.ensure_agent(id.to_string()).await?;
    } else if !state.store.agent_exists(id.to_string()).await? {
        return Err(unknown_agent(id));
    }
    let received_at = now_ms();
    let size = text.len() as i64;
    state
        .store
        .store_inventory(id.to_string(), text, received_at)
        .await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"agent_id": id, "size_bytes": size, "received_at": rfc3339(received_at)}),
    ))
}

pub async fn get_inventory(state: &AppState, id: &str, req: Request<Incoming>) -> Result<Response> {
    valid_id(id)?;
    authorize(state, req.headers(), Access::AdminOrAgent(id))?;
    let row = state
        .store
        .get_inventory(id.to_string())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("agent `{id}` has not reported an inventory")))?;
    #[derive(Serialize)]
    struct View<'a> {
        agent_id: &'a str,
        size_bytes: i64,
        received_at: String,
        data: &'a RawValue,
    }
    let data: &RawValue = serde_json::from_str(&row.body).unwrap_or(RawValue::NULL);
    Ok(json(
        StatusCode::OK,
        &View {
            agent_id: &row.agent_id,
            size_bytes: row.size_bytes,
            received_at: rfc3339(row.received_at),
            data,
        },
    ))
}

// ---- tokens ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    client_id: String,
    #[serde(default)]
    role: Option<Role>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

pub const DEFAULT_AGENT_TOKEN_TTL: Duration = Duration::from_secs(30 * 86_400);
const MAX_TOKEN_TTL: u64 = 366 * 86_400;

pub async fn create_token(state: &AppState, req: Request<Incoming>) -> Result<Response> {
    authorize(state, req.headers(), Access::Admin)?;
    let body: CreateToken = read_json(req, MAX_API_BODY).await?;
    valid_id(&body.client_id)?;
    let role = body.role.unwrap_or(Role::Agent);
    let ttl = match body.ttl_seconds {
        None => DEFAULT_AGENT_TOKEN_TTL,
        Some(t) if (1..=MAX_TOKEN_TTL).contains(&t) => Duration::from_secs(t),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_ttl",
                format!("ttl_seconds must be from 1 to {MAX_TOKEN_TTL}"),
            ));
        }
    };
    if role == Role::Agent {
        // Enrollment: the agent is known from now on, so commands can be queued for it.
        state.store.ensure_agent(body.client_id.clone()).await?;
    }
    let token = state.tokens.mint(&body.client_id, role, ttl);
    let expires_at = now_ms() + ttl.as_millis() as i64;
    Ok(json(
        StatusCode::CREATED,
        &serde_json::json!({
            "token": token,
            "client_id": body.client_id,
            "role": role.as_str(),
            "expires_at": rfc3339(expires_at),
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_percent_decoded() {
        let p = query_params(Some("q=web%20server&online=true&x=a+b&bad=%zz&tail=%4"));
        assert_eq!(param(&p, "q"), Some("web server"));
        assert_eq!(param(&p, "x"), Some("a b"));
        assert_eq!(param(&p, "bad"), Some("%zz"));
        assert_eq!(param(&p, "tail"), Some("%4"));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
